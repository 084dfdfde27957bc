"""`tiered batch`: an offline job of many requests through the scheduler, one output line per request.

Owns: parsing input lines (OpenAI batch lines {"custom_id", "method", "url", "body"} with a completions or
chat body, or bare {"prompt", "max_tokens", ...} lines whose id is their line number), error records for
malformed lines, the output file (one JSON line per request, written and flushed as each finishes, so the
order is completion order), `--resume` (ids already in the output are skipped; a torn last line left by a
kill is cut off first), and the progress bar (requests done / total, generated tok/s, ETA).
Does not own: scheduling or generation (decode/scheduler.py), HTTP (app.py).

Bare lines default to greedy decoding (temperature 0); OpenAI lines follow the API's defaults (temperature 1).
"""
from __future__ import annotations

import json
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from tiered.decode.scheduler import QueueFull, Request, RequestError, SamplingParams, Scheduler
from tiered.serve.chat import parse_tool_calls, render_chat

URLS = ("/v1/completions", "/v1/chat/completions")


@dataclass
class Job:
    """One input line: a request to run, or an error to report."""
    custom_id: str
    url: str  # /v1/completions or /v1/chat/completions
    request: Request | None = None
    error: dict[str, str] | None = None
    tools: bool = False


class LineError(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _num(body: dict, key: str, default: Any, *, kind: type | tuple = (int, float)) -> Any:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, kind):
        raise LineError("invalid_type", f"{key} must be {'an integer' if kind is int else 'a number'}, got {v!r}")
    return v


def parse_line(line: str, lineno: int, sch: Scheduler) -> Job:
    """One input line -> a Job (errors become a Job with `error`; never raises)."""
    cid = str(lineno)
    url = URLS[0]
    try:
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise LineError("invalid_json", f"line {lineno} is not JSON: {e}") from None
        if not isinstance(obj, dict):
            raise LineError("invalid_line", f"line {lineno} must be a JSON object")
        if "custom_id" in obj:
            if not isinstance(obj["custom_id"], str) or not obj["custom_id"]:
                raise LineError("invalid_custom_id", "custom_id must be a non-empty string")
            cid = obj["custom_id"]
        if "body" in obj or "url" in obj:
            url = obj.get("url")
            if url not in URLS:
                raise LineError("invalid_url", f"url must be one of {list(URLS)}, got {url!r}")
            if obj.get("method", "POST") != "POST":
                raise LineError("invalid_method", "method must be POST")
            body = obj.get("body")
            if not isinstance(body, dict):
                raise LineError("invalid_body", "body must be a JSON object")
            greedy_default = False
        else:
            body = {k: v for k, v in obj.items() if k != "custom_id"}
            greedy_default = True
        job = Job(cid, url)
        job.request, job.tools = _request(body, url, sch, greedy_default, cid)
        return job
    except LineError as e:
        return Job(cid, url, error={"code": e.code, "message": str(e)})
    except RequestError as e:
        return Job(cid, url, error={"code": "invalid_request", "message": str(e)})


def _request(body: dict, url: str, sch: Scheduler, greedy_default: bool, cid: str) -> tuple[Request, bool]:
    tok = sch.tokenizer
    chat = url == URLS[1]
    tools = False
    if chat:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                             for m in msgs):
            raise LineError("invalid_messages", "messages must be a non-empty list of {role, content} objects")
        tools_v = body.get("tools")
        if tools_v is not None and not isinstance(tools_v, list):
            raise LineError("invalid_type", "tools must be a list")
        tools = bool(tools_v)
        if tok is None:
            raise LineError("no_tokenizer", "this model has no tokenizer: chat needs one")
        try:
            ids = tok.encode(render_chat(tok, msgs, tools_v), add_special_tokens=False)
        except Exception as e:  # the template refused the conversation
            raise LineError("invalid_messages", f"the chat template failed: {e}") from None
    else:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
            p = p[0]
        if isinstance(p, str):
            if tok is None:
                raise LineError("no_tokenizer", "this model has no tokenizer: send token ids")
            ids = tok.encode(p)
        elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            ids = list(p)
        else:
            raise LineError("invalid_prompt", "prompt must be a string or a list of token ids")
    if body.get("n", 1) != 1:
        raise LineError("unsupported", "n must be 1")
    if body.get("logprobs") not in (None, False, 0):
        raise LineError("unsupported", "logprobs are not supported")
    room = sch.max_context - len(ids)
    if room < 0:
        raise LineError("context_length_exceeded", f"the prompt has {len(ids)} tokens; the context is "
                        f"{sch.max_context}")
    mt = body.get("max_completion_tokens", body.get("max_tokens"))
    mt = _num({"max_tokens": mt}, "max_tokens", (room + 1) if chat else 16, kind=int)
    if mt < 0 or mt > room + 1:
        raise LineError("invalid_max_tokens", f"max_tokens must be in 0..{room + 1}, got {mt}")
    stop = body.get("stop")
    stop = (stop,) if isinstance(stop, str) else stop
    if stop is not None and (not isinstance(stop, list | tuple) or not all(isinstance(s, str) and s for s in stop)):
        raise LineError("invalid_stop", "stop must be a string or a list of non-empty strings")
    seed = _num(body, "seed", None, kind=int)
    params = SamplingParams(max_tokens=mt, temperature=float(_num(body, "temperature", 0.0 if greedy_default else 1.0)),
                            top_p=float(_num(body, "top_p", 1.0)), top_k=_num(body, "top_k", 0, kind=int),
                            seed=seed, stop=tuple(stop or ()))
    params.check()
    return Request(id=cid, prompt_ids=ids, params=params, stream=False), tools  # its text is written at the end


def response_body(job: Job, model: str) -> dict[str, Any]:
    """The OpenAI response object of a finished job."""
    r = job.request
    usage = {"prompt_tokens": len(r.prompt_ids), "completion_tokens": len(r.out_ids),
             "total_tokens": len(r.prompt_ids) + len(r.out_ids)}
    reason = "length" if r.finish_reason == "length" else "stop"
    created = int(time.time())
    if job.url == URLS[1]:
        content, calls = parse_tool_calls(r.text) if job.tools else (r.text, [])
        msg: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            msg["tool_calls"], reason = calls, "tool_calls"
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": msg, "logprobs": None, "finish_reason": reason}], "usage": usage}
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": r.text, "logprobs": None, "finish_reason": reason}], "usage": usage}


def record(job: Job, model: str) -> dict[str, Any]:
    """One output line (OpenAI batch output form)."""
    rid = f"batch_req_{uuid.uuid4().hex}"
    if job.error is not None:
        return {"id": rid, "custom_id": job.custom_id, "response": None, "error": job.error}
    r = job.request
    if r.finish_reason in ("error", "cancelled"):
        return {"id": rid, "custom_id": job.custom_id, "response": None,
                "error": {"code": r.finish_reason, "message": r.error or r.finish_reason}}
    return {"id": rid, "custom_id": job.custom_id, "error": None,
            "response": {"status_code": 200, "request_id": rid, "body": response_body(job, model)}}


def done_ids(output: Path) -> set[str]:
    """custom_ids already in `output`; a torn last line (a kill mid-write) is cut off the file first."""
    if not output.exists():
        return set()
    data = output.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(output, "r+b") as f:
            f.truncate(end)
    ids = set()
    for line in data[:end].splitlines():
        try:
            ids.add(json.loads(line)["custom_id"])
        except (ValueError, KeyError, TypeError):
            continue
    return ids


def run_batch(sch: Scheduler, input_path: Path, output_path: Path, *, resume: bool = False,
              model: str = "tiered", progress: bool = True, log: TextIO = sys.stderr) -> dict[str, Any]:
    """Run every line of input_path; returns a summary (requests, errors, skipped, tokens, seconds)."""
    if output_path.exists() and not resume and output_path.stat().st_size > 0:
        raise FileExistsError(f"{output_path} exists: pass --resume to continue it, or remove it")
    skip = done_ids(output_path) if resume else set()
    lines = input_path.read_text(encoding="utf-8", errors="replace").splitlines()
    jobs: list[Job] = []
    seen: set[str] = set()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        job = parse_line(line, i, sch)
        if job.custom_id in seen:
            print(f"tiered batch: line {i}: custom_id {job.custom_id!r} repeats an earlier line; skipped", file=log)
            continue
        seen.add(job.custom_id)
        if job.custom_id not in skip:
            jobs.append(job)
    t0 = time.perf_counter()
    tokens0 = sch.tokens_generated
    out = open(output_path, "a", encoding="utf-8")
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(jobs), desc="batch", unit="req", file=log, dynamic_ncols=True)
    n_err = 0

    def write(job: Job) -> None:
        nonlocal n_err
        rec = record(job, model)
        n_err += rec["error"] is not None
        out.write(json.dumps(rec, ensure_ascii=False) + "\n")
        out.flush()
        if bar is not None:
            dt = time.perf_counter() - t0
            bar.set_postfix_str(f"{(sch.tokens_generated - tokens0) / dt if dt > 0 else 0:.1f} tok/s", refresh=False)
            bar.update(1)

    try:
        todo = []
        for job in jobs:
            if job.error is not None:
                write(job)
            else:
                job.request.sink = (lambda j: lambda r, piece, done: write(j) if done else None)(job)
                todo.append(job)
        nxt = 0
        while nxt < len(todo) or not sch.idle():
            while nxt < len(todo):
                try:
                    sch.submit(todo[nxt].request)
                except QueueFull:
                    break
                except RequestError as e:
                    todo[nxt].error = {"code": "invalid_request", "message": str(e)}
                    write(todo[nxt])
                nxt += 1
            sch.step()
    finally:
        if bar is not None:
            bar.close()
        out.close()
    dt = time.perf_counter() - t0
    gen = sch.tokens_generated - tokens0
    return {"requests": len(jobs), "errors": n_err, "skipped": len(skip & seen), "tokens_generated": gen,
            "seconds": dt, "tok_s": gen / dt if dt > 0 else None, "output": str(output_path),
            "pid": os.getpid()}
