"""The OpenAI-compatible server, live on 127.0.0.1, through the real `openai` client and raw HTTP."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402
import uvicorn  # noqa: E402

from tiered.decode.scheduler import Request, SamplingParams, Scheduler  # noqa: E402
from tiered.engine import load  # noqa: E402
from tiered.serve.app import create_app  # noqa: E402
from tiered.serve.chat import parse_tool_calls, render_chat  # noqa: E402
from tiered.serve.worker import EngineWorker  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
KEY = "sk-test"


class LiveServer:
    """uvicorn in a thread on an ephemeral 127.0.0.1 port."""

    def __init__(self, app) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(500):
            if self.server.started:
                break
            time.sleep(0.01)
        assert self.server.started, "uvicorn did not start"
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def engine():
    return load(None, device="cpu", dtype="float32", max_context=512)


@pytest.fixture(scope="module")
def live(engine):
    sch = Scheduler(engine, max_batch=8, max_queue=64)
    worker = EngineWorker(sch).start()
    srv = LiveServer(create_app(worker, model_name="ref", api_key=KEY, drain_s=5))
    yield srv, sch, worker
    srv.stop()
    assert not worker.alive  # the app's shutdown stopped the engine thread


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live[0].url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_models_health_and_key(live, client):
    """/v1/models lists the model, /health answers without a key, /v1/* needs the Bearer key."""
    srv = live[0]
    assert [m.id for m in client.models.list().data] == ["ref"]
    assert httpx.get(srv.url + "/health").json()["status"] == "ok"
    r = httpx.get(srv.url + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_streamed_equals_full_equals_run(live, client, engine):
    """Greedy: streamed text == non-streamed text == `tiered run`'s stdout; the usage chunk comes last."""
    prompt = "def fibonacci(n):\n"
    full = client.completions.create(model="ref", prompt=prompt, max_tokens=24, temperature=0)
    parts, usage = [], None
    for ch in client.completions.create(model="ref", prompt=prompt, max_tokens=24, temperature=0, stream=True,
                                        stream_options={"include_usage": True}):
        if ch.choices:
            parts.append(ch.choices[0].text)
        else:
            usage = ch.usage
    assert "".join(parts) == full.choices[0].text
    assert usage is not None and usage.completion_tokens == full.usage.completion_tokens == 24
    run = subprocess.run([sys.executable, "-m", "tiered", "run", "--device", "cpu", "--max-new-tokens", "24",
                          "--max-context", "512", prompt], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout == full.choices[0].text


def test_sse_ends_with_done(live):
    """Raw SSE: data lines of JSON chunks, then `data: [DONE]`."""
    with httpx.stream("POST", live[0].url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"prompt": "x = ", "max_tokens": 3, "temperature": 0, "stream": True}, timeout=60) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    assert all(json.loads(ln[6:])["object"] == "text_completion" for ln in lines[:-1])


def test_concurrent_clients(live, client, engine):
    """8 clients at once, each gets its own batch-1 greedy continuation (and a seeded sample repeats)."""
    prompts = [f"def f{i}(x):\n    return x * {i}" for i in range(8)]
    want = [engine.generate(p, max_new_tokens=16).text for p in prompts]

    def ask(p):
        return client.completions.create(model="ref", prompt=p, max_tokens=16, temperature=0).choices[0].text

    with ThreadPoolExecutor(8) as ex:
        got = list(ex.map(ask, prompts))
    assert got == want
    seeded = [client.completions.create(model="ref", prompt="import", max_tokens=8, temperature=1.0, seed=3)
              .choices[0].text for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_chat_and_tools(live, client, engine):
    """Chat renders through a template (ChatML fallback here) with tools; streamed chat == full chat."""
    msgs = [{"role": "user", "content": "hi"}]
    full = client.chat.completions.create(model="ref", messages=msgs, max_tokens=8, temperature=0)
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="ref", messages=msgs, max_tokens=8, temperature=0, stream=True) if c.choices)
    assert text == full.choices[0].message.content and full.usage.completion_tokens <= 8
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    prompt = render_chat(engine.tokenizer, msgs, tools)
    assert "get_weather" in prompt and "<tool_call>" in prompt
    r = client.chat.completions.create(model="ref", messages=msgs, tools=tools, max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    content, calls = parse_tool_calls('Sure.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}'
                                      '\n</tool_call>')
    assert content == "Sure." and calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    assert parse_tool_calls("<tool_call>not json</tool_call>") == ("<tool_call>not json</tool_call>", [])


def test_cancelled_stream_frees_row(live, client):
    """A client that closes a stream mid-generation: its row leaves the batch within a step or two."""
    _, sch, _ = live
    stream = client.completions.create(model="ref", prompt="def f():", max_tokens=400, temperature=0, stream=True)
    it = iter(stream)
    next(it)
    next(it)
    assert len(sch.running) == 1
    steps0 = sch.steps
    stream.close()
    for _ in range(500):
        if not sch.running:
            break
        time.sleep(0.01)
    assert not sch.running and sch.state.free_pages == sch.state.num_pages
    assert sch.steps - steps0 < 50  # (the close reaches the server asynchronously; the row then goes in one step)


HOSTILE = [
    (b'{"prompt": 5, "max_tokens": 3}', 400),
    (b'{"prompt": "a", "max_tokens": "3"}', 400),
    (b'{"prompt": "a", "max_tokens": -1}', 400),
    (b'{"prompt": "a", "max_tokens": 10000000}', 400),
    (b'{"prompt": "a", "temperature": "hot"}', 400),
    (b'{"prompt": "a", "unknown_field": 1}', 400),
    (b'{"prompt": "a", "n": 2}', 400),
    (b'{"prompt": "a", "logprobs": 2}', 400),
    (b'{"prompt": "\xff\xfe"}', 400),
    (b'\xff\xfe\x00', 400),
    (b'[1, 2]', 400),
    (b'{"prompt": ""}', 400),
    (b'{"prompt": [99999999]}', 400),
]


@pytest.mark.parametrize("body,status", HOSTILE)
def test_hostile_inputs(live, body, status):
    """Bad requests get a 4xx with an OpenAI error body, and the server keeps serving."""
    r = httpx.post(live[0].url + "/v1/completions", content=body, timeout=30,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]
    ok = httpx.post(live[0].url + "/v1/completions", json={"prompt": "a", "max_tokens": 1},
                    headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert ok.status_code == 200


def test_hostile_big_body_and_chat(live):
    """A 10 MB body gets 413; chat with wrong types or no messages gets 400."""
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    big = b'{"prompt": "' + b"a" * (10 * 1000 * 1000) + b'"}'
    assert httpx.post(live[0].url + "/v1/completions", content=big, headers=h, timeout=60).status_code == 413
    for body in ({"messages": []}, {"messages": [{"role": "user", "content": 3}]},
                 {"messages": [{"role": "wizard", "content": "x"}]}, {"messages": "hi"}):
        r = httpx.post(live[0].url + "/v1/chat/completions", json=body, headers=h, timeout=30)
        assert r.status_code == 400, (body, r.text)


def test_queue_full_is_503(engine):
    """With the wait queue full, a request gets 503 and Retry-After."""
    sch = Scheduler(engine, max_batch=1, max_queue=1)
    worker = EngineWorker(sch)  # not started: nothing leaves the queue
    sch.submit(Request("filler", [1, 2], SamplingParams(max_tokens=1)))
    srv = LiveServer(create_app(worker, model_name="ref", drain_s=0))
    try:
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "a", "max_tokens": 1}, timeout=30)
        assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"]["code"] == "queue_full"
    finally:
        srv.stop()


def _rss_kb() -> int:
    with open(f"/proc/{os.getpid()}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_soak_rss_flat(live, client):
    """200 sequential requests (bounded to 120 s): RSS after the last is within 20 MiB of RSS after 50."""
    t0 = time.monotonic()
    rss = []
    for i in range(200):
        r = client.completions.create(model="ref", prompt=f"x{i} = ", max_tokens=2, temperature=0,
                                      stream=bool(i % 2))
        if i % 2:
            list(r)
        if i in (49, 199):
            rss.append(_rss_kb())
        assert time.monotonic() - t0 < 120, f"soak too slow: {i} requests in 120 s"
    assert rss[1] - rss[0] < 20 * 1024, f"RSS grew {(rss[1] - rss[0]) / 1024:.1f} MiB over 150 requests"


def test_graceful_shutdown_finishes_running_rows(tmp_path):
    """`tiered serve` on SIGTERM: a running stream still completes (with [DONE]) and the process exits."""
    import signal
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "tiered", "serve", "--device", "cpu", "--port", str(port),
                          "--max-context", "256", "--drain-s", "60"], cwd=REPO, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        lines = []
        with httpx.stream("POST", url + "/v1/completions", timeout=120,
                          json={"prompt": "def f(x):", "max_tokens": 40, "temperature": 0, "stream": True,
                                "stream_options": {"include_usage": True}}) as r:
            for ln in r.iter_lines():
                if ln and not lines:
                    p.send_signal(signal.SIGTERM)  # mid-stream
                if ln:
                    lines.append(ln)
        assert lines[-1] == "data: [DONE]"
        usage = json.loads(lines[-2][6:])["usage"]
        assert usage["completion_tokens"] == 40  # the row was finished, not cut
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
