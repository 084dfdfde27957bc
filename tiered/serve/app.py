"""The OpenAI-compatible HTTP API (FastAPI) over the engine thread.

Owns: `create_app` (GET /v1/models, GET /health, POST /v1/completions, POST /v1/chat/completions), request
validation (strict types, unknown fields, max_tokens range, the body-size limit; 4xx with OpenAI error
bodies, 400 for what is not supported: n > 1, logprobs, echo, best_of, penalties, logit_bias, suffix),
SSE streaming (ending in `data: [DONE]`, the usage chunk with stream_options.include_usage), tool calls
parsed back into `tool_calls`, the Bearer --api-key check, 503 + Retry-After when the queue is full, and
freeing a row when its client goes away.
Does not own: the model or the batch (worker.py and the scheduler), the chat template (chat.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from typing import Any, Literal, Union

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from tiered.decode.scheduler import QueueFull, Request, RequestError, SamplingParams
from tiered.serve.chat import parse_tool_calls, render_chat
from tiered.serve.worker import EngineWorker, ShuttingDown

MAX_BODY = 10 * 1000 * 1000  # bytes: larger bodies get 413
TAG = "<tool_call>"
Number = Union[StrictInt, StrictFloat]


def error(status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
          code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    """An OpenAI-style error response."""
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: StrictBool = False


class _Common(_Body):
    model: StrictStr | None = None
    max_tokens: StrictInt | None = Field(None, ge=0)
    temperature: Number = Field(1.0, ge=0, le=2)
    top_p: Number = Field(1.0, gt=0, le=1)
    top_k: StrictInt = Field(0, ge=0)  # an extension (vLLM spells it the same way)
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    logprobs: Any = None
    top_logprobs: Any = None
    presence_penalty: Number = 0
    frequency_penalty: Number = 0
    logit_bias: dict[str, Any] | None = None
    user: StrictStr | None = None


class CompletionBody(_Common):
    prompt: StrictStr | list[StrictStr] | list[StrictInt]
    max_tokens: StrictInt | None = Field(16, ge=0)
    echo: StrictBool = False
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None


class FunctionCall(_Body):
    name: StrictStr
    arguments: StrictStr


class ToolCall(_Body):
    id: StrictStr
    type: Literal["function"] = "function"
    function: FunctionCall


class ContentPart(_Body):
    type: Literal["text"]
    text: StrictStr


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: StrictStr | None = None


class ChatBody(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=0)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: StrictBool | None = None
    response_format: dict[str, Any] | None = None


def _unsupported(b: _Common) -> str | None:
    """The first parameter this server does not implement, as a message (answered with 400)."""
    if b.n != 1:
        return "n must be 1: this server returns one choice per request"
    if b.logprobs not in (None, False, 0) or b.top_logprobs not in (None, 0):
        return "logprobs are not supported"
    if b.presence_penalty or b.frequency_penalty:
        return "presence_penalty and frequency_penalty are not supported"
    if b.logit_bias:
        return "logit_bias is not supported"
    if isinstance(b, CompletionBody):
        if b.echo:
            return "echo is not supported"
        if b.best_of not in (None, 1):
            return "best_of is not supported"
        if b.suffix:
            return "suffix is not supported"
    if isinstance(b, ChatBody) and b.response_format and b.response_format.get("type") != "text":
        return "response_format other than text is not supported"
    return None


def create_app(worker: EngineWorker, *, model_name: str, api_key: str | None = None,
               drain_s: float = 30.0) -> FastAPI:
    """The FastAPI app; `worker` must be started (the app stops it at shutdown, draining for drain_s)."""
    sch = worker.scheduler
    tok = sch.tokenizer
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(worker.stop, drain_s=drain_s)  # graceful: running rows finish, then cancel

    app = FastAPI(title="tiered", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.middleware("http")
    async def guard(request: HTTPRequest, call_next):
        if api_key is not None and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization") != f"Bearer {api_key}":
                return error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                             type_="authentication_error", code="invalid_api_key")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            return error(413, f"the request body is larger than {MAX_BODY} bytes", code="body_too_large")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: HTTPRequest, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        msg = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            msg = "the body is not valid JSON (or not UTF-8)"
        return error(400, f"{'.'.join(loc) + ': ' if loc else ''}{msg}", param=".".join(loc) or None)

    @app.get("/health")
    def health():
        if not worker.alive:
            return error(503, "the engine thread is not running", type_="server_error")
        return {"status": "ok", "running": len(sch.running), "waiting": sch.queued}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "tiered", "max_model_len": sch.max_context}]}

    async def _read_body(request: HTTPRequest) -> bytes | JSONResponse:
        """The raw body, refusing bodies over MAX_BODY even without (or with a false) Content-Length."""
        chunks, n = [], 0
        async for c in request.stream():
            n += len(c)
            if n > MAX_BODY:
                return error(413, f"the request body is larger than {MAX_BODY} bytes", code="body_too_large")
            chunks.append(c)
        return b"".join(chunks)

    async def _parse(request: HTTPRequest, cls: type[_Common]) -> _Common | JSONResponse:
        raw = await _read_body(request)
        if isinstance(raw, JSONResponse):
            return raw
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return error(400, "the body is not valid JSON (or not UTF-8)")
        if not isinstance(data, dict):
            return error(400, "the body must be a JSON object")
        try:
            return cls.model_validate(data)
        except Exception as e:  # pydantic.ValidationError
            errs = getattr(e, "errors", lambda: [])()
            first = errs[0] if errs else {}
            loc = ".".join(str(x) for x in first.get("loc", ()))
            return error(400, f"{loc + ': ' if loc else ''}{first.get('msg', str(e))}", param=loc or None)

    def _request(b: _Common, ids: list[int], max_tokens: int | None) -> Request | JSONResponse:
        msg = _unsupported(b)
        if msg:
            return error(400, msg, code="unsupported")
        room = sch.max_context - len(ids)
        if room < 0:
            return error(400, f"the prompt has {len(ids)} tokens; this model's context is {sch.max_context}",
                         param="messages" if isinstance(b, ChatBody) else "prompt", code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = room + 1
        if max_tokens > room + 1:
            return error(400, f"max_tokens {max_tokens} is more than the {room + 1} tokens left in the "
                         f"{sch.max_context}-token context after the prompt", param="max_tokens")
        stop = (b.stop,) if isinstance(b.stop, str) else tuple(b.stop or ())
        if len(stop) > 4 or any(not s for s in stop):
            return error(400, "stop takes up to 4 non-empty strings", param="stop")
        params = SamplingParams(max_tokens=max_tokens, temperature=float(b.temperature), top_k=b.top_k,
                                top_p=float(b.top_p), seed=b.seed, stop=stop)
        return Request(id=uuid.uuid4().hex, prompt_ids=ids, params=params)

    async def _run(request: HTTPRequest, req: Request, respond) -> Any:
        """Submit req; stream or wait for it. `respond(kind, ...)` formats the OpenAI objects."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        req.sink = lambda r, piece, done: loop.call_soon_threadsafe(q.put_nowait, (piece, done))
        try:
            worker.submit(req)
        except QueueFull as e:
            return error(503, f"the server is busy ({e}): retry later", type_="server_error",
                         code="queue_full", headers={"Retry-After": "1"})
        except ShuttingDown as e:
            return error(503, str(e), type_="server_error", headers={"Retry-After": "5"})
        except RequestError as e:
            return error(400, str(e))
        if respond.stream:
            async def events():
                try:
                    async for chunk in respond.stream_chunks(req, q):
                        yield f"data: {json.dumps(chunk)}\n\n"
                    yield "data: [DONE]\n\n"
                finally:
                    worker.cancel(req)  # no-op once done; frees the row when the client went away
            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            while True:
                try:
                    _, done = await asyncio.wait_for(q.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        worker.cancel(req)
                        return error(499, "client disconnected")
                    continue
                if done:
                    break
        finally:
            worker.cancel(req)
        if req.finish_reason == "error":
            return error(500, f"generation failed: {req.error}", type_="server_error")
        return respond.full(req)

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        b = await _parse(request, CompletionBody)
        if isinstance(b, JSONResponse):
            return b
        p = b.prompt
        if isinstance(p, list) and p and isinstance(p[0], str):
            if len(p) != 1:
                return error(400, "prompt must be one string (batches of prompts are not supported)", param="prompt")
            p = p[0]
        if isinstance(p, str):
            if tok is None:
                return error(400, "this model has no tokenizer: send token ids", param="prompt")
            ids = tok.encode(p)
        else:
            ids = list(p)
        if not ids:
            return error(400, "the prompt is empty", param="prompt")
        if min(ids) < 0 or max(ids) >= sch.config.vocab_size:
            return error(400, f"token ids must be in 0..{sch.config.vocab_size - 1}", param="prompt")
        req = _request(b, ids, b.max_tokens)
        if isinstance(req, JSONResponse):
            return req
        return await _run(request, req, _CompletionFormat(b, model_name))

    @app.post("/v1/chat/completions")
    async def chat(request: HTTPRequest):
        b = await _parse(request, ChatBody)
        if isinstance(b, JSONResponse):
            return b
        if tok is None:
            return error(400, "this model has no tokenizer: chat needs one")
        try:
            text = render_chat(tok, [m.model_dump(exclude_none=True) for m in b.messages], b.tools)
        except Exception as e:  # a template that raises on this conversation
            return error(400, f"the chat template failed on these messages: {e}", param="messages")
        ids = tok.encode(text, add_special_tokens=False)
        mt = b.max_completion_tokens if b.max_completion_tokens is not None else b.max_tokens
        req = _request(b, ids, mt)
        if isinstance(req, JSONResponse):
            return req
        return await _run(request, req, _ChatFormat(b, model_name))

    return app


def _usage(r: Request) -> dict[str, int]:
    p, c = len(r.prompt_ids), len(r.out_ids)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _finish(r: Request) -> str:
    return "length" if r.finish_reason == "length" else "stop"


class _CompletionFormat:
    """OpenAI text_completion objects."""

    def __init__(self, b: CompletionBody, model: str) -> None:
        self.stream = b.stream
        self.usage = bool(b.stream_options and b.stream_options.include_usage)
        self.model = model
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _obj(self, choices: list, usage: dict | None = None) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": usage}

    def full(self, r: Request) -> dict:
        return self._obj([{"index": 0, "text": r.text, "logprobs": None, "finish_reason": _finish(r)}], _usage(r))

    async def stream_chunks(self, r: Request, q: asyncio.Queue):
        while True:
            piece, done = await q.get()
            if piece or done:
                yield self._obj([{"index": 0, "text": piece, "logprobs": None,
                                  "finish_reason": _finish(r) if done else None}])
            if done:
                break
        if r.finish_reason == "error":
            yield {"error": {"message": f"generation failed: {r.error}", "type": "server_error"}}
        if self.usage:
            yield self._obj([], _usage(r))


class _ChatFormat:
    """OpenAI chat.completion objects; `<tool_call>` blocks become tool_calls when tools were given."""

    def __init__(self, b: ChatBody, model: str) -> None:
        self.stream = b.stream
        self.usage = bool(b.stream_options and b.stream_options.include_usage)
        self.tools = bool(b.tools)
        self.model = model
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _obj(self, kind: str, choices: list, usage: dict | None = None) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices, "usage": usage}

    def _message(self, r: Request) -> tuple[dict, str]:
        content, calls = parse_tool_calls(r.text) if self.tools else (r.text, [])
        msg: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            msg["tool_calls"] = calls
            return msg, "tool_calls"
        return msg, _finish(r)

    def full(self, r: Request) -> dict:
        msg, reason = self._message(r)
        return self._obj("chat.completion", [{"index": 0, "message": msg, "logprobs": None,
                                              "finish_reason": reason}], _usage(r))

    async def stream_chunks(self, r: Request, q: asyncio.Queue):
        kind = "chat.completion.chunk"
        yield self._obj(kind, [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        sent = 0  # characters of r.text streamed as content
        while True:
            piece, done = await q.get()
            if self.tools:  # content streams up to a tool call (held back while a tag may be forming)
                text = r.text
                avail = len(text) if done else r.emitted
                cut = text.find(TAG)
                limit = min(avail, cut if cut >= 0 else (avail if done else avail - len(TAG) + 1))
                piece = text[sent:limit] if limit > sent else ""
                sent = max(sent, limit)
            if piece:
                yield self._obj(kind, [{"index": 0, "delta": {"content": piece}, "finish_reason": None}])
            if done:
                break
        if r.finish_reason == "error":
            yield {"error": {"message": f"generation failed: {r.error}", "type": "server_error"}}
        msg, reason = self._message(r)
        delta: dict[str, Any] = {}
        if msg.get("tool_calls"):
            delta["tool_calls"] = [dict(tc, index=i) for i, tc in enumerate(msg["tool_calls"])]
        yield self._obj(kind, [{"index": 0, "delta": delta, "finish_reason": reason}])
        if self.usage:
            yield self._obj(kind, [], _usage(r))
