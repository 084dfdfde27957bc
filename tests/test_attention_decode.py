"""The triton attention backend inside the model: one-token steps through the paged decode kernel.

On CPU the kernel runs under Triton's interpreter (slow: a few tokens, tiny models), so these check the
wiring: greedy tokens equal SDPA's on the trained reference model, the static (graph-capturable) step equals
the eager step bit for bit (the same kernel, the same splits), windows, and which spans get captured.
"""
from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # see test_attention_kernel.py: chosen at triton's import

import tiered  # noqa: E402
from tiered.kernels import attention as ka  # noqa: E402
from tiered.model.layers import pick_backend  # noqa: E402
from tests.conftest import make_checkpoint  # noqa: E402

needs_kernel = pytest.mark.skipif(ka.triton is None or not (CUDA or ka.interpreted()),
                                  reason="needs triton (CUDA, or its interpreter on CPU)")
DEV = "cuda" if CUDA else "cpu"
PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n"


@needs_kernel
def test_triton_backend_keeps_greedy_tokens(reference_layout):
    """The reference model, fp32: greedy tokens with one-token steps through the kernel equal SDPA's."""
    kw = dict(device=DEV, dtype="float32", max_context=256, cuda_graphs=False)
    want = tiered.load(reference_layout, attn="sdpa", **kw).generate(PROMPT, max_new_tokens=3)
    e = tiered.load(reference_layout, attn="triton", **kw)
    got = e.generate(PROMPT, max_new_tokens=3)  # the first token from the prefill (SDPA), two kernel steps
    assert got.token_ids == want.token_ids
    assert got.stats["attention"] == "triton" and e.model.cache.paged is not None


@pytest.fixture(scope="module")
def tiny_layouts(tmp_path_factory, tiny_checkpoints):
    """Qwen3-MoE (GQA 2, hd 16) and Mixtral with a sliding window of 5, repacked."""
    from tiered.layout.repack import repack

    root = tmp_path_factory.mktemp("attn")
    window = make_checkpoint(root / "window-ck", "mixtral", sliding_window=5)
    for name, ck in [("qwen3", tiny_checkpoints["qwen3_moe"]), ("window", window)]:
        repack(ck, root / name, progress=False)
    return {name: root / name for name in ("qwen3", "window")}


@needs_kernel
@pytest.mark.parametrize("name", ["qwen3", "window"])
def test_static_step_equals_eager_step(tiny_layouts, name):
    """decode_static (device position, one span for every position) gives exactly the eager one-token step's
    logits, and both are within fp32 rounding of SDPA; with a window of 5 the kernel skips old keys."""
    e = tiered.load(tiny_layouts[name], device=DEV, dtype="float32", attn="triton", max_context=40,
                    cuda_graphs=False)
    s = tiered.load(tiny_layouts[name], device=DEV, dtype="float32", attn="sdpa", max_context=40,
                    cuda_graphs=False)
    m = e.model
    assert m.graph_spans() == [40] and m.graph_span(0) == m.graph_span(39) == 40
    ids = torch.tensor([3, 17, 5, 9, 30, 2, 11, 8, 4], device=DEV)
    with torch.inference_mode():
        m.forward(ids, 0)
        s.model.forward(ids, 0)
        for pos, tok in [(9, 7), (10, 12)]:
            t = torch.tensor([tok], device=DEV)
            static = m.decode_static(t, torch.tensor([pos], device=DEV), m.graph_span(pos)).clone()
            eager = m.forward(t, pos)  # rewrites the same K/V at pos, then the same kernel call
            assert torch.equal(static, eager)
            ref = s.model.forward(t, pos)
            assert torch.allclose(eager, ref, atol=1e-5, rtol=1e-5), (eager - ref).abs().max()


def test_kernel_capacity_buckets():
    """The paged kernel's grid: sized for SHORT_CAPACITY while the cache fits it, else for max_context."""
    from tiered.model.layers import SHORT_CAPACITY, kernel_capacity

    assert SHORT_CAPACITY == 1024
    assert kernel_capacity(1, 40) == kernel_capacity(40, 40) == 40
    assert kernel_capacity(1, 4096) == kernel_capacity(1024, 4096) == 1024
    assert kernel_capacity(1025, 4096) == kernel_capacity(4096, 4096) == 4096
    assert kernel_capacity(1024, 1024) == 1024


def test_kernel_capacity_environment(monkeypatch):
    from tiered.model.layers import SHORT_CAPACITY_ENV, kernel_capacity

    monkeypatch.setenv(SHORT_CAPACITY_ENV, "0")  # off: max_context always
    assert kernel_capacity(1, 4096) == 4096
    monkeypatch.setenv(SHORT_CAPACITY_ENV, "2048")
    assert kernel_capacity(2048, 4096) == 2048 and kernel_capacity(2049, 4096) == 4096
    for bad in ("-1", "big"):
        monkeypatch.setenv(SHORT_CAPACITY_ENV, bad)
        with pytest.raises(ValueError, match="number of positions"):
            kernel_capacity(1, 4096)


@needs_kernel
def test_triton_graphs_per_kernel_capacity(tiny_layouts, monkeypatch):
    """SHORT_CAPACITY 64 (the tiny model allows 128 positions), max_context 100: two graphs (64 and 100); the step at
    position p takes the first while p + 1 <= 64. Around the boundary, the static step (the graph's) equals the eager
    step bit for bit, and both size the kernel's grid for the same capacity."""
    from tiered.model import layers

    monkeypatch.setattr(layers, "SHORT_CAPACITY", 64)
    e = tiered.load(tiny_layouts["qwen3"], device=DEV, dtype="float32", attn="triton", max_context=100,
                    cuda_graphs=False)
    m = e.model
    assert m.graph_spans() == [64, 100]
    assert [m.graph_span(p) for p in (0, 62, 63, 64, 99)] == [64, 64, 64, 100, 100]
    seen = []
    real = ka.decode_attention
    monkeypatch.setattr(ka, "decode_attention", lambda *a, **k: seen.append(k["max_seqlen"]) or real(*a, **k))
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, m.config.vocab_size, (62,), generator=g).to(DEV)
    layers_n = m.config.num_layers
    with torch.inference_mode():
        m.forward(prompt, 0)  # the prompt through SDPA
        assert seen == []
        for pos in (62, 63, 64):
            t = torch.tensor([int(prompt[pos % 7])], device=DEV)
            static = m.decode_static(t, torch.tensor([pos], device=DEV), m.graph_span(pos)).clone()
            eager = m.forward(t, pos)  # rewrites the same K/V at pos, then the same kernel call
            assert torch.equal(static, eager), pos
            want = 64 if pos + 1 <= 64 else 100
            assert seen == [want] * (2 * layers_n), (pos, seen)
            seen.clear()


def test_graph_spans_per_backend(reference_layout):
    """SDPA graphs are one per power-of-two span (all captured before decoding); flash needs one, triton one per
    kernel capacity (one up to 1,024 positions, else two: test_triton_graphs_per_kernel_capacity)."""
    e = tiered.load(reference_layout, device="cpu", attn="sdpa", max_context=300)
    assert e.model.graph_spans() == [128, 256, 300]
    assert [e.model.graph_span(p) for p in (0, 127, 128, 255, 256, 299)] == [128, 128, 256, 256, 300, 300]


def test_pick_backend(monkeypatch):
    """auto: SDPA on CPU; triton on CPU only under the interpreter; a clear message when triton is missing."""
    cpu = torch.device("cpu")
    assert pick_backend("auto", cpu) == "sdpa"
    assert pick_backend("sdpa", cpu) == "sdpa"
    if ka.triton is not None and ka.interpreted():
        assert pick_backend("triton", cpu) == "triton"
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "triton" else real(n, *a))
    with pytest.raises(ValueError, match="--attn triton needs"):
        pick_backend("triton", cpu)
    with pytest.raises(ValueError, match="not one of"):
        pick_backend("flashinfer", cpu)


# --- graphs captured before the clock ---

def test_piecewise_graphs_captured_before_the_first_token(reference_layout):
    """Every span's chain is captured before generate's clock starts (the fake CUDA path on CPU): stats
    report the capture apart (capture_s, capture_in_call_s), none happens inside decode, a second call
    captures nothing, and ttft_s / load_s are reported."""
    from tests.test_segmented_decode import FakeCudaPiecewise

    ids = [5, 9, 11, 200, 7] * 3
    e = tiered.load(reference_layout, device="cpu", max_context=300, budget={"expert_slots": 16})
    want = tiered.load(reference_layout, device="cpu", max_context=300,
                       budget={"expert_slots": 16}).generate(ids, max_new_tokens=4).token_ids
    pw = e.use_piecewise(FakeCudaPiecewise(e.model))
    g = e.generate(ids, max_new_tokens=4)
    assert g.token_ids == want
    assert sorted(pw.chains) == e.model.graph_spans() == [128, 256, 300]
    s = g.stats
    assert s["piecewise"]["capture_s"] == 0.0  # nothing captured between the first and the last token
    assert s["capture_in_call_s"] > 0 and s["capture_s"] >= s["capture_in_call_s"]
    assert s["ttft_s"] > 0 and s["load_s"] > 0 and s["graph_mem_bytes"] == 0  # no CUDA memory on CPU
    recorded = pw.recorded
    g2 = e.generate(ids, max_new_tokens=4)
    assert g2.token_ids == want and pw.recorded == recorded and g2.stats["capture_in_call_s"] == 0.0


@pytest.mark.cuda
def test_cuda_triton_graphs_across_the_capacity_cut(reference_layout):
    """max_context 1,500 on CUDA (fp32): load() captures the 1,024-position graph and the 1,500 one; a decode from a
    1,000-token prompt crosses the cut and gives the eager steps' greedy tokens (each step sizing its grid the same
    way)."""
    kw = dict(device="cuda", dtype="float32", max_context=1500, attn="triton")
    g = tiered.load(reference_layout, **kw)
    assert sorted(g.graphed.graphs) == [1024, 1500]
    prompt = [(7 * i) % 1000 + 5 for i in range(1000)]
    a = g.generate(prompt, max_new_tokens=60, stop_at_eos=False)
    b = tiered.load(reference_layout, cuda_graphs=False, **kw).generate(prompt, max_new_tokens=60, stop_at_eos=False)
    assert a.token_ids == b.token_ids and a.stats["decode_graphs"] == "full"


@pytest.mark.cuda
@pytest.mark.parametrize("attn", ["triton", "sdpa"])
def test_cuda_graphs_captured_at_load(reference_layout, attn):
    """On CUDA, load() captures every whole-step graph (one with triton, one per span with SDPA); decoding
    across the 128-position bucket captures nothing more and gives the eager step's greedy tokens (fp32)."""
    kw = dict(device="cuda", dtype="float32", max_context=300, attn=attn)
    g = tiered.load(reference_layout, **kw)
    assert sorted(g.graphed.graphs) == ([300] if attn == "triton" else [128, 256, 300])
    assert g.capture_s > 0 and g.graphed.graph_mem_bytes > 0  # the graphs' pool holds their temporaries
    a = g.generate(PROMPT, max_new_tokens=150, stop_at_eos=False)
    b = tiered.load(reference_layout, cuda_graphs=False, **kw).generate(PROMPT, max_new_tokens=150, stop_at_eos=False)
    assert a.token_ids == b.token_ids
    s = a.stats
    assert s["decode_graphs"] == "full" and s["attention"] == attn and s["capture_in_call_s"] == 0.0
    assert s["ttft_s"] > 0 and s["load_s"] > 0 and s["capture_s"] == g.capture_s


@pytest.mark.cuda
def test_cuda_piecewise_triton_one_chain(reference_layout):
    """The expert cache's piecewise step with triton attention: one chain of L+1 graphs for every position,
    captured at load; greedy tokens equal the eager cache engine's (fp32)."""
    kw = dict(device="cuda", dtype="float32", max_context=300, attn="triton",
              budget={"expert_slots": 16, "slot_table": "host"})  # the host table: this tests the piecewise step
    g = tiered.load(reference_layout, **kw)
    assert sorted(g.pieces.chains) == [300]
    a = g.generate(PROMPT, max_new_tokens=140, stop_at_eos=False)
    b = tiered.load(reference_layout, cuda_graphs=False, **kw).generate(PROMPT, max_new_tokens=140, stop_at_eos=False)
    assert a.token_ids == b.token_ids
    assert a.stats["decode_graphs"] == "piecewise" and a.stats["piecewise"]["capture_s"] == 0.0


@pytest.mark.cuda
def test_cuda_run_json_reports_first_token_and_capture(reference_layout):
    """`tiered run --json` on CUDA: the stats carry ttft_s, load_s and a positive capture_s (graphs captured at
    load, none inside the call), with the triton backend chosen by auto."""
    import json

    from click.testing import CliRunner

    from tiered.cli.main import main

    r = CliRunner().invoke(main, ["run", "-m", str(reference_layout), "--device", "cuda", "--max-new-tokens", "32",
                                  "--json", PROMPT], catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    s = json.loads(r.stderr.strip().splitlines()[-1])
    assert s["attention"] == ("triton" if ka.triton is not None else "sdpa")
    assert s["ttft_s"] > 0 and s["load_s"] > 0 and s["capture_s"] > 0 and s["capture_in_call_s"] == 0.0
    assert s["decode_graphs"] == "full"
