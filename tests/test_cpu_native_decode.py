"""One token on the CPU through the native kernel (kernels/cpu_kernel.py): the dense q8/q4 GEMVs (qlinear's one-row
CPU path) and the routed experts (Transformer.cpu_native), against the torch reference the engine takes with
TIERED_CPU_KERNEL=torch. fp32 on the reference model: greedy tokens identical, logits within 1e-5 relative (fp32
sums in another order). Skips where the kernel cannot be built."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import step_logits
from tiered.engine import load
from tiered.kernels import cpu_kernel
from tiered.kernels.cpu_kernel import CpuKernel
from tiered.kernels.quant_moe import qlinear
from tiered.layout.quant import quantize
from tiered.layout.repack import repack

PROMPT = "def fibonacci(n):\n    "
NEW = 12


@pytest.fixture(scope="module", autouse=True)
def native_kernel():
    if CpuKernel.load(warn=False) is None:
        pytest.skip("no native CPU kernel on this machine (no C compiler or the build failed)")


@pytest.fixture(scope="module")
def q4_layout(reference_model, tmp_path_factory):
    dst = tmp_path_factory.mktemp("native") / "q4"
    repack(reference_model, dst, experts="q4", dense="q4", q4_refine="none", progress=False)
    return dst


def _run(layout, monkeypatch, mode: str, calls: dict):
    """Greedy decode of NEW tokens with TIERED_CPU_KERNEL=mode, counting the native kernel's calls; each step's
    logits."""
    monkeypatch.setenv(cpu_kernel.ENV, mode)
    for name in ("gemv", "partial"):
        real = getattr(CpuKernel, name)

        def spy(self, *a, _real=real, _name=name, **kw):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(self, *a, **kw)

        monkeypatch.setattr(CpuKernel, name, spy)
    e = load(layout, device="cpu", dtype="float32", max_context=128)
    toks, outs = step_logits(e, e.encode(PROMPT), NEW)
    monkeypatch.undo()
    return e, toks, outs


@pytest.mark.parametrize("which", ["q4", "bf16"])
def test_native_decode_matches_torch(which, q4_layout, reference_layout, monkeypatch):
    """q4 experts and dense, and the bf16 layout (its projections kept in bf16 and read by the GEMV): the same greedy
    tokens as torch, logits within 1e-5 relative; the native kernel did the one-token work (every layer's experts
    each step, the projections through the GEMV) and torch's run never called it."""
    layout = q4_layout if which == "q4" else reference_layout
    native_calls, torch_calls = {}, {}
    e, toks, outs = _run(layout, monkeypatch, "native", native_calls)
    _, want, ref = _run(layout, monkeypatch, "torch", torch_calls)
    assert e.model.cpu_native
    assert toks == want
    for a, b in zip(outs, ref):
        assert float((a - b).norm() / b.norm()) <= 1e-5
    layers = e.model.config.num_layers
    assert native_calls.get("partial", 0) >= NEW * layers
    assert native_calls.get("gemv", 0) >= NEW * layers * 2  # qkv (one matrix) and o per layer, each step
    assert torch_calls == {}
    if which == "bf16":  # kept as stored under the native kernel, in the compute dtype without it
        assert e.model.layers[0].attn.qkv.dtype == torch.bfloat16


@pytest.mark.parametrize("kind", ["q4", "bf16"])
def test_qlinear_few_rows_on_cpu_take_the_native_gemv(kind, monkeypatch):
    """qlinear on the CPU, a q4 matrix or a bf16 one under fp32 compute: up to CPU_GEMV_ROWS (q4) or
    CPU_GEMV_ROWS_FLOAT (bf16) rows the native GEMV's
    result (within 1e-5 of the fp32 reference) with the bias added; more rows, and TIERED_CPU_KERNEL=torch, the
    reference (a bf16 matrix widened per call)."""
    from tiered.kernels.quant_moe import CPU_GEMV_ROWS, CPU_GEMV_ROWS_FLOAT

    w = quantize(torch.randn(40, 96) * 0.1, "q4") if kind == "q4" else (torch.randn(40, 96) * 0.1).bfloat16()
    wf = w.dequantize(torch.float32) if kind == "q4" else w.float()
    b = torch.randn(40)
    x = torch.randn(3, 96)
    ref = x @ wf.T + b
    assert float((qlinear(x, w, b) - ref).norm() / ref.norm()) <= 1e-5
    seen = []
    monkeypatch.setattr(CpuKernel, "gemv", lambda self, x, w, **kw: seen.append(x.shape[0]) or torch.zeros(len(x), 40))
    assert torch.equal(qlinear(x, w, b), b.expand(3, 40))  # the GEMV's (here: zero) output, plus the bias
    many = torch.randn((CPU_GEMV_ROWS if kind == "q4" else CPU_GEMV_ROWS_FLOAT) + 1, 96)
    assert torch.allclose(qlinear(many, w), many @ wf.T, rtol=1e-5, atol=1e-5) and seen == [3]
    monkeypatch.setenv(cpu_kernel.ENV, "torch")
    assert torch.allclose(qlinear(x, w, b), ref, rtol=1e-5, atol=1e-5) and seen == [3]


def _spy_rows(monkeypatch, name: str, sink: list, tag: str | None = None) -> None:
    """Record the row count (x.shape[0]) of every CpuKernel.<name> call in sink, as (tag, rows) when tagged."""
    real = getattr(CpuKernel, name)

    def spy(self, x, *a, **kw):
        sink.append(x.shape[0] if tag is None else (tag, x.shape[0]))
        return real(self, x, *a, **kw)

    monkeypatch.setattr(CpuKernel, name, spy)


def _teacher_forced(layout, monkeypatch, mode: str, dtype: str, rows: list):
    """Teacher-forced logits of a 60-token text with TIERED_CPU_KERNEL=mode, recording each native GEMM/GEMV call's
    row count (and each expert-rows call's, tagged "experts")."""
    monkeypatch.setenv(cpu_kernel.ENV, mode)
    _spy_rows(monkeypatch, "gemv", rows)
    _spy_rows(monkeypatch, "expert_rows", rows, "experts")
    e = load(layout, device="cpu", dtype=dtype, max_context=128)
    ids = e.encode(PROMPT * 6)[:60]
    out = e.logits(ids)
    monkeypatch.undo()
    return out


@pytest.mark.parametrize("which", ["q4", "bf16"])
def test_native_prefill_matches_torch(which, q4_layout, reference_layout, monkeypatch):
    """A prompt's experts (each expert's rows) and projections (all 60 rows) through the native GEMMs, in fp32: every
    position's logits within 1e-5 relative of the torch path (dequantize or widen, then matmul), the same argmax;
    the tiled GEMM did run (calls of several rows) and torch's run never called the kernel."""
    layout = q4_layout if which == "q4" else reference_layout
    rows, none = [], []
    got = _teacher_forced(layout, monkeypatch, "native", "float32", rows)
    want = _teacher_forced(layout, monkeypatch, "torch", "float32", none)
    assert float((got - want).norm() / want.norm()) <= 1e-5
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    experts = [r for r in rows if isinstance(r, tuple)]
    gemv = [r for r in rows if not isinstance(r, tuple)]
    assert none == [] and max(gemv) == 60 and sum(r >= cpu_kernel.GEMM_MIN_ROWS for r in gemv) > 10
    cfg = json.loads((layout / "manifest.json").read_text())["config"]
    assert len(experts) == cfg["num_layers"] and all(n == 60 * cfg["top_k"] for _, n in experts)  # one call a layer


def test_native_prefill_q4_in_bf16(q4_layout, monkeypatch):
    """bf16 compute, q4 experts and dense: the native GEMMs use the weights as q * s + m in fp32 where the torch path
    rounds them to bf16 first, so the two agree to bf16's precision, not bit for bit."""
    got = _teacher_forced(q4_layout, monkeypatch, "native", "bfloat16", [])
    want = _teacher_forced(q4_layout, monkeypatch, "torch", "bfloat16", [])
    assert float((got - want).norm() / want.norm()) <= 2e-2
    assert float((got.argmax(-1) == want.argmax(-1)).float().mean()) >= 0.9


def _batch(layout, monkeypatch, mode: str, calls: list):
    from tiered.decode.scheduler import Request, SamplingParams, Scheduler

    monkeypatch.setenv(cpu_kernel.ENV, mode)
    _spy_rows(monkeypatch, "expert_rows", calls)
    e = load(layout, device="cpu", dtype="float32", max_context=128)
    sch = Scheduler(e, max_batch=6, page_size=8, prefill_tokens=64)
    prompts = [PROMPT, "import os\n", "class Foo:\n    def", "x = [1, 2, 3]\nfor", "print(", "while True:\n"]
    reqs = [sch.submit(Request(str(i), e.encode(p), SamplingParams(max_tokens=NEW))) for i, p in enumerate(prompts)]
    while not sch.idle():
        sch.step()
    monkeypatch.undo()
    return [r.out_ids for r in reqs]


@pytest.mark.parametrize("which", ["q4", "bf16"])
def test_native_batch_matches_torch(which, q4_layout, reference_layout, monkeypatch):
    """A batch of 6 rows on the CPU: each step's experts (prompt chunks and decode rows) in one native call per wave;
    every row's greedy tokens are torch's, and torch's run never called the kernel."""
    layout = q4_layout if which == "q4" else reference_layout
    native, none = [], []
    got = _batch(layout, monkeypatch, "native", native)
    want = _batch(layout, monkeypatch, "torch", none)
    assert got == want and none == []
    assert len(native) >= NEW * 2 and max(native) > 6 * 8  # decode steps' rows, and a prompt chunk's
