"""Greedy decoding with the host one step ahead (decode/ahead.py) against the engine's per-token loop.

CPU: the loop over a fake step (positions, the one discarded step, the ring), TokenSink's stop strings and held-back
text, and the engine on the reference model (fp32) with the eager step and with GraphedDecode's captured body run
eagerly: identical tokens, text and stop reasons to the per-token loop for max-tokens, EOS, stop-string and context
stops, and a following generation on the same engine equal to a fresh engine's. CUDA (marked `cuda`): the graphed
step-ahead against the eager engine, triton and SDPA across a span boundary, and a timing print.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tiered
from tiered.decode.ahead import Readback, TokenSink, run_ahead
from tiered.decode.graphed import GraphedDecode
from tiered.layout.tokenizer import Tokenizer

PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n"
OTHER = "class Stack:\n    def __init__(self):\n"
CTX = 300


class FakeStep:
    """token -> (7 * token + 3) % 101, checking that every launch's host position is the device buffer's."""

    def __init__(self) -> None:
        self.token = torch.zeros(1, dtype=torch.int64)
        self.pos = torch.zeros(1, dtype=torch.int64)
        self.launches: list[int] = []

    def launch(self, pos: int) -> torch.Tensor:
        assert int(self.pos) == pos, (int(self.pos), pos)
        self.launches.append(pos)
        self.token.copy_((self.token * 7 + 3) % 101)
        self.pos.add_(1)
        return torch.zeros(1, 101)


def fake_chain(first: int, n: int) -> list[int]:
    out = [first]
    while len(out) < n:
        out.append((out[-1] * 7 + 3) % 101)
    return out


def one_hot(tok: int) -> torch.Tensor:
    x = torch.zeros(1, 101)
    x[0, tok] = 1.0
    return x


@pytest.mark.parametrize("max_new,stop_at,ctx,want_stop,want_n,want_extra", [
    (1, None, 100, "length", 1, 0),  # the prefill's token only: no step
    (6, None, 100, "length", 6, 0),  # never a step past max_new
    (30, 4, 100, "eos", 4, 1),  # EOS is token 4: the step making token 5 was enqueued and is discarded
    (30, 0, 100, "eos", 0, 1),  # EOS first
    (30, None, 14, "context", 5, 0),  # prompt of 10, context 14: steps at 10..13
])
def test_run_ahead_fake_step(max_new, stop_at, ctx, want_stop, want_n, want_extra):
    chain = fake_chain(5, 40)
    eos = {chain[stop_at]} if stop_at is not None else set()
    assert stop_at is None or chain.index(chain[stop_at]) == stop_at
    step, got = FakeStep(), []

    def sink(tok: int) -> str | None:
        if tok in eos:
            return "eos"
        got.append(tok)
        return None

    run = run_ahead(step, one_hot(5), 10, max_new=max_new, max_context=ctx, sink=sink, ring=Readback(step.token.device, 2))
    assert run.stop == want_stop and got == chain[:want_n]
    assert run.launched - run.used == want_extra
    assert step.launches == list(range(10, 10 + run.launched))  # consecutive positions from the prompt's end
    assert run.t_last >= run.t_first > 0


def test_token_sink_stop_strings(reference_model):
    """Stop strings across token boundaries: the text ends before the earliest one, streamed text never shows a
    part of it, and the token that completed it is kept."""
    tok = Tokenizer(reference_model / "tokenizer.json", {})
    ids = tok.encode("def main(argv):\n    return argv[0]\n")
    full = tok.decode(ids)
    pieces: list[str] = []
    s = TokenSink(eos=set(), tokenizer=tok, stop=("argv[", "return"), on_text=pieces.append)
    n = next(i for i, t in enumerate(ids) if s(t) is not None) + 1
    cut = full.index("return")
    assert n < len(ids) and s.text == full[:cut]
    assert full[:cut].startswith("".join(pieces))  # held back, never past the cut
    assert s.finish("stop") == "stop" and "".join(pieces) == full[:cut]
    assert s.ids == ids[:n] and "return" in tok.decode(ids[:n]) and "return" not in tok.decode(ids[:n - 1])
    # no stop string: everything streams at once (no hold), the same text as decoding the ids
    pieces2: list[str] = []
    s2 = TokenSink(eos={ids[-1]}, tokenizer=tok, on_text=pieces2.append)
    assert [s2(t) for t in ids][-1] == "eos" and s2.finish("eos") == "eos"
    assert s2.text == "".join(pieces2) == tok.decode(ids[:-1]) and s2.ids == ids[:-1]


def _engine(layout, **kw):
    return tiered.load(layout, device="cpu", max_context=CTX, **kw)


def _run(e, ahead, prompt=PROMPT, **kw):
    e.step_ahead = ahead  # None: with the whole-step graphs (here GraphedDecode's body run eagerly)
    g = e.generate(prompt, **kw)
    assert g.stats["step_ahead"] is (ahead is True or (ahead is None and e.graphed is not None))
    return g


@pytest.fixture(scope="module")
def plain(reference_layout):
    """The per-token loop's greedy run of PROMPT, and the engine."""
    e = _engine(reference_layout)
    return e, _run(e, False, max_new_tokens=24, stop_at_eos=False)


@pytest.mark.parametrize("body", ["eager", "graph-body"])
@pytest.mark.parametrize("stop", ["length", "eos", "stop", "context"])
def test_ahead_matches_plain_loop(reference_layout, plain, body, stop):
    """The reference model, fp32: step-ahead greedy decoding gives the per-token loop's tokens, text, stop reason
    and token count for each stop; "graph-body" runs GraphedDecode's captured step (argmax and position increment
    on the device buffers) eagerly, through both loops."""
    e0, ref = plain
    toks = ref.token_ids
    kw: dict = dict(max_new_tokens=24, stop_at_eos=False)
    if stop == "eos":  # make the 9th generated token (first occurrence) the EOS
        k = next(i for i in range(8, 24) if toks.index(toks[i]) == i)
        kw["stop_at_eos"] = True
    elif stop == "stop":  # a stop string inside the text of tokens 10..11
        tok = e0.tokenizer
        frag = tok.decode(toks[10:12]).strip() or tok.decode(toks[9:12])
        kw["stop"] = (frag,)
    # context: 5 positions after the prompt
    e = _engine(reference_layout) if stop != "context" else tiered.load(
        reference_layout, device="cpu", max_context=len(e0.encode(PROMPT)) + 5)
    if stop == "eos":
        e.config = dataclasses.replace(e.config, eos_token_ids=(toks[k],))
    if body == "graph-body":
        e.graphed = GraphedDecode(e.model, graphs=False)
    a = _run(e, True if body == "eager" else None, **kw)
    b = _run(e, False, **kw)
    assert a.token_ids == b.token_ids and a.text == b.text and a.stop_reason == b.stop_reason == stop
    assert a.stats["decode_steps"] == b.stats["decode_steps"] and a.stats["tokens_generated"] == len(a.token_ids)
    if stop == "length":
        assert a.token_ids == toks and a.stats["ahead_extra_steps"] == 0
    if stop == "eos":
        assert a.token_ids == toks[:k] and a.stats["ahead_extra_steps"] == 1
    if stop == "stop":
        assert kw["stop"][0] not in a.text and ref.text.startswith(a.text) and a.stats["ahead_extra_steps"] == 1
        assert len(a.token_ids) < 24
    if stop == "context":
        assert a.token_ids == toks[:6] and a.stats["ahead_extra_steps"] == 0


def test_graph_body_equals_eager_forward(reference_layout, plain):
    """GraphedDecode's step body (decode_static at the device position, argmax into the token buffer) run eagerly
    on CPU gives the eager engine's greedy tokens, step-ahead and per-token alike."""
    _, ref = plain
    e = _engine(reference_layout)
    e.graphed = GraphedDecode(e.model, graphs=False)
    assert _run(e, None, max_new_tokens=24, stop_at_eos=False).token_ids == ref.token_ids
    assert _run(e, False, max_new_tokens=24, stop_at_eos=False).token_ids == ref.token_ids


def test_graph_body_across_span_boundary(reference_layout):
    """SDPA steps switch graphs at the 128-position span from the host's count while the device advances the
    position itself: a prompt ending at 120, 20 tokens step-ahead through GraphedDecode's body (run eagerly) equal
    the eager per-token loop's."""
    e = _engine(reference_layout)
    ids = (e.encode(PROMPT * 12) * 2)[:120]
    want = _run(e, False, ids, max_new_tokens=20, stop_at_eos=False).token_ids
    e.graphed = GraphedDecode(e.model, graphs=False)
    assert e.model.graph_span(127) == 128 and e.model.graph_span(128) == 256
    assert _run(e, None, ids, max_new_tokens=20, stop_at_eos=False).token_ids == want


@pytest.mark.parametrize("body", ["eager", "graph-body"])
def test_generation_after_early_stop(reference_layout, plain, body):
    """After a stop string ended a step-ahead generation (one extra step computed and discarded), the next
    generation on the same engine equals a fresh engine's, streamed text included."""
    e0, ref = plain
    want = _run(_engine(reference_layout), False, OTHER, max_new_tokens=20, stop_at_eos=False)
    e = _engine(reference_layout)
    if body == "graph-body":
        e.graphed = GraphedDecode(e.model, graphs=False)
    ahead = True if body == "eager" else None
    first = _run(e, ahead, max_new_tokens=24, stop_at_eos=False, stop=(e0.tokenizer.decode(ref.token_ids[3:5]),))
    assert first.stop_reason == "stop" and first.stats["ahead_extra_steps"] == 1
    pieces: list[str] = []
    g = _run(e, ahead, OTHER, max_new_tokens=20, stop_at_eos=False, on_text=pieces.append)
    assert g.token_ids == want.token_ids and g.text == want.text == "".join(pieces)


@pytest.mark.parametrize("top_p,top_k", [(1.0, 0), (0.9, 0), (0.9, 20), (1.0, 5)])
def test_sampled_graph_body_runs_ahead(reference_layout, top_p, top_k):
    """Sampling (temperature, top-p, top-k) runs ahead on GraphedDecode's sampled body (run eagerly on CPU): the
    seeded tokens of the per-token loop, the keys taken in the same order; a greedy generation after it is greedy
    again."""
    e = _engine(reference_layout)
    kw = dict(max_new_tokens=16, temperature=0.8, top_p=top_p, top_k=top_k, seed=5, stop_at_eos=False)
    want = _run(e, False, **kw)
    e.graphed = GraphedDecode(e.model, graphs=False)
    got = _run(e, None, **kw)
    assert got.stats["step_ahead"] is True and got.token_ids == want.token_ids and len(set(got.token_ids)) > 3
    assert e.graphed.sampled is None
    greedy = _run(e, None, max_new_tokens=8, stop_at_eos=False)
    assert greedy.token_ids == _run(_engine(reference_layout), False, max_new_tokens=8, stop_at_eos=False).token_ids


def test_sampling_keeps_per_token_loop(reference_layout):
    """Temperature > 0 does not run ahead on the eager step: the seeded samples are those of step_ahead=False."""
    e = _engine(reference_layout)
    kw = dict(max_new_tokens=12, temperature=0.8, seed=3, stop_at_eos=False)
    a = _run(e, False, **kw)
    e.step_ahead = True
    b = e.generate(PROMPT, **kw)
    assert b.stats["step_ahead"] is False and a.token_ids == b.token_ids


def test_stop_string_errors(reference_layout):
    e = _engine(reference_layout)
    with pytest.raises(tiered.engine.EngineError, match="non-empty"):
        e.generate(PROMPT, max_new_tokens=2, stop=("",))


def test_deltanet_state_after_extra_step(tiny_checkpoints, tmp_path):
    """Qwen3.5-MoE (DeltaNet layers, whose state is not addressed by position): an EOS-stopped step-ahead run
    leaves no trace in the next generation."""
    from tiered.layout.repack import repack

    repack(tiny_checkpoints["qwen3_5_moe"], tmp_path / "lay", progress=False)
    ids = list(range(3, 40))
    fresh = tiered.load(tmp_path / "lay", device="cpu", max_context=128)
    want = _run(fresh, False, ids[5:], max_new_tokens=10, stop_at_eos=False).token_ids
    e = tiered.load(tmp_path / "lay", device="cpu", max_context=128)
    toks = _run(e, False, ids, max_new_tokens=10, stop_at_eos=False).token_ids
    e.config = dataclasses.replace(e.config, eos_token_ids=(toks[3],))
    first = _run(e, True, ids, max_new_tokens=10)
    assert first.stop_reason == "eos" and first.stats["ahead_extra_steps"] == 1
    assert _run(e, True, ids[5:], max_new_tokens=10, stop_at_eos=False).token_ids == want


def test_bench_ahead_cpu(tmp_path):
    """benchmarks/bench_ahead.py at CPU sizes: its rows, table and JSON line (the GPU box runs it on a real layout)."""
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "benchmarks/bench_ahead.py", "--device", "cpu", "--new", "4", "--repeats", "1",
                        "--prompt-tokens", "8"], cwd=Path(__file__).resolve().parent.parent, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res == json.loads((tmp_path / "ahead.json").read_text())
    assert set(res["rows"]) == {"per-token", "ahead", "per-token+text", "ahead+text"} and res["tokens_equal"]
    assert res["replay_tok_s"] is None  # no graphs on CPU


# --- CUDA ---

@pytest.mark.cuda
@pytest.mark.parametrize("attn", ["triton", "sdpa"])
def test_cuda_graphed_ahead_matches_eager(reference_layout, attn):
    """fp32 on CUDA: the graphed step-ahead greedy tokens equal the eager engine's across the 128-position span
    (SDPA switches graphs there from the host's count) and the graphed per-token loop's; after an EOS-stopped run
    (one step discarded) another prompt gives the tokens it gave before. Prints tok/s of both loops."""
    kw = dict(device="cuda", dtype="float32", max_context=CTX, attn=attn)
    g = tiered.load(reference_layout, **kw)
    e = tiered.load(reference_layout, cuda_graphs=False, **kw)
    want = e.generate(PROMPT, max_new_tokens=150, stop_at_eos=False)
    a = _run(g, None, max_new_tokens=150, stop_at_eos=False)
    assert a.token_ids == want.token_ids and a.stats["decode_graphs"] == "full"
    b = _run(g, False, max_new_tokens=150, stop_at_eos=False)
    assert b.token_ids == want.token_ids
    other = _run(g, None, OTHER, max_new_tokens=40, stop_at_eos=False).token_ids  # before any early stop
    k = next(i for i in range(20, 150) if want.token_ids.index(want.token_ids[i]) == i)
    g.config = dataclasses.replace(g.config, eos_token_ids=(want.token_ids[k],))
    c = _run(g, None, max_new_tokens=150)
    assert c.token_ids == want.token_ids[:k] and c.stop_reason == "eos" and c.stats["ahead_extra_steps"] == 1
    assert _run(g, None, OTHER, max_new_tokens=40, stop_at_eos=False).token_ids == other
    rates = {}
    for ahead in (False, None):
        g.step_ahead = ahead
        g.generate(PROMPT, max_new_tokens=8, stop_at_eos=False)
        torch.cuda.synchronize()
        t = time.perf_counter()
        s = g.generate(PROMPT, max_new_tokens=128, stop_at_eos=False).stats
        rates["ahead" if ahead is None else "per-token"] = (s["decode_tok_s"], time.perf_counter() - t)
    print(f"\n{attn}: decode tok/s (wall s of the call): " +
          ", ".join(f"{k} {r:.0f} ({w:.3f})" for k, (r, w) in rates.items()))


@pytest.mark.cuda
def test_cuda_ahead_bf16_matches_graphed_per_token(reference_layout):
    """bf16 (the benchmarks' dtype): the step-ahead loop and the graphed per-token loop replay the same graphs,
    so their greedy tokens are identical."""
    g = tiered.load(reference_layout, device="cuda", max_context=CTX)
    a = _run(g, None, max_new_tokens=200, stop_at_eos=False)
    b = _run(g, False, max_new_tokens=200, stop_at_eos=False)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 200


@pytest.mark.cuda
def test_cuda_sampled_ahead_matches_per_token(reference_layout):
    """bf16 on CUDA: sampled decoding (temperature 0.8, top-p 0.9, seeded; without and with top-k 40) runs ahead on
    the sampled graphs and draws the per-token loop's tokens (the nucleus kernels with the same keys, inside the
    graph and outside)."""
    g = tiered.load(reference_layout, device="cuda", max_context=CTX)
    for top_k in (0, 40):
        kw = dict(max_new_tokens=120, temperature=0.8, top_p=0.9, top_k=top_k, seed=11, stop_at_eos=False)
        a = _run(g, None, **kw)
        b = _run(g, False, **kw)
        assert a.token_ids == b.token_ids and len(a.token_ids) == 120 and len(set(a.token_ids)) > 10
    assert {k for _, k in g.graphed.stats()["sampled_spans"]} == {0, 40}
