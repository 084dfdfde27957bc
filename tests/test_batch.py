"""`tiered batch`: input forms, error records, completion-order output, kill -9 and --resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tiered.decode.scheduler import Scheduler
from tiered.engine import load
from tiered.serve.batch import done_ids, run_batch

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def engine():
    return load(None, device="cpu", dtype="float32", max_context=256)


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_input_forms_and_bad_lines(engine, tmp_path):
    """OpenAI completion/chat lines and bare lines run; malformed lines become error records; each id once;
    bare lines are greedy and take their line number as id."""
    inp = tmp_path / "in.jsonl"
    rows = [
        json.dumps({"prompt": "def fib(n):", "max_tokens": 6}),
        "{not json",
        json.dumps({"custom_id": "c1", "method": "POST", "url": "/v1/completions",
                    "body": {"prompt": "import os\n", "max_tokens": 5, "temperature": 0}}),
        "",
        json.dumps({"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}}),
        json.dumps({"prompt": "x", "max_tokens": -2}),
        json.dumps({"prompt": ["a", "b"], "max_tokens": 1}),
        json.dumps({"custom_id": "u", "url": "/v1/embeddings", "body": {}}),
        json.dumps([1, 2]),
        json.dumps({"prompt": "x", "max_tokens": "5"}),
    ]
    inp.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out.jsonl"
    sch = Scheduler(engine, max_batch=3)
    summary = run_batch(sch, inp, out, progress=False)
    recs = {r["custom_id"]: r for r in _lines(out)}
    assert len(recs) == len(_lines(out)) == 9 == summary["requests"]
    ok = {k for k, r in recs.items() if r["error"] is None}
    assert ok == {"1", "c1", "chat"}
    assert summary["errors"] == 6
    assert recs["2"]["error"]["code"] == "invalid_json"
    assert recs["6"]["error"]["code"] == "invalid_max_tokens"
    assert recs["u"]["error"]["code"] == "invalid_url"
    body = recs["1"]["response"]["body"]
    assert body["choices"][0]["text"] == engine.generate("def fib(n):", max_new_tokens=6).text
    assert body["usage"]["completion_tokens"] == 6
    assert recs["chat"]["response"]["body"]["object"] == "chat.completion"
    with pytest.raises(FileExistsError):
        run_batch(sch, inp, out, progress=False)


def test_done_ids_cuts_torn_line(tmp_path):
    """A last line without its newline (a kill mid-write) is removed and not counted as done."""
    out = tmp_path / "o.jsonl"
    out.write_text(json.dumps({"custom_id": "a"}) + "\n" + '{"custom_id": "b", "resp')
    assert done_ids(out) == {"a"}
    assert out.read_text() == json.dumps({"custom_id": "a"}) + "\n"


def test_kill9_and_resume(engine, tmp_path):
    """kill -9 mid-job, then --resume: every id appears exactly once and the greedy texts equal an
    uninterrupted run's (that one with every expert in memory, the killed one through a 24-slot expert cache)."""
    n = 16
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"prompt": f"def f{i}(x):\n    return", "max_tokens": 24 + (i % 5)}) + "\n"
                           for i in range(n)))
    ref_out = tmp_path / "ref.jsonl"
    run_batch(Scheduler(engine, max_batch=4), inp, ref_out, progress=False)
    want = {r["custom_id"]: r["response"]["body"]["choices"][0]["text"] for r in _lines(ref_out)}
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "tiered", "batch", "--input", str(inp), "--output", str(out), "--max-batch", "2",
           "--max-context", "256", "--device", "cpu", "--no-progress", "--expert-slots", "24"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and p.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 3:
            break
        time.sleep(0.02)
    assert p.poll() is None, f"the job ended before it could be killed: {p.stderr.read().decode()[-2000:]}"
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    first = out.read_text().count("\n")
    assert 3 <= first < n
    r = subprocess.run(cmd + ["--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    recs = _lines(out)
    ids = [x["custom_id"] for x in recs]
    assert sorted(ids) == sorted(want) and len(ids) == len(set(ids)) == n
    assert {x["custom_id"]: x["response"]["body"]["choices"][0]["text"] for x in recs} == want
