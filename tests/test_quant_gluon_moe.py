"""The experts' q4 gate_up and down on tensor cores in Gluon (tiered/kernels/quant_gluon_moe.py, QConfig.algo 3 of
the expert kernels).

Gluon has no interpreter, so on CPU: the kernels' index math (`emulate_gate_up`, `emulate_down`) against the
dequantized references at 1, 2 and 4 groups a step, where the kernels serve, and both kernels compiled for sm_90 with
PDL (gate_up waits before its first load: the slots come from the kernel right before; down loads its slots, routing
weights and first codes before the wait) and 8- / 16-byte loads of the words. On CUDA (marked `cuda`): the kernels
against the references with a slot base, every h layout, the weight rounding, PDL and inside a CUDA graph, and
experts_quant_decode dispatching to them.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from tiered.kernels import quant_gluon_moe as qgm  # noqa: E402
from tiered.layout.quant import quantize  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
REPO = Path(__file__).resolve().parent.parent


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12))


def ref_gate_up(x, slots, gate, up):
    """silu(x . gate_k) * (x . up_k) with the dequantized rows (fp32), [K, F]."""
    xf = x.reshape(-1).float()
    return torch.stack([torch.nn.functional.silu(gate[s].dequantize(torch.float32) @ xf)
                        * (up[s].dequantize(torch.float32) @ xf) for s in slots.reshape(-1).tolist()])


def ref_down(h, slots, wts, dw):
    """sum_k wts[k] (dequantized dw[slots[k]] @ round_bf16(h[k])) in fp32, [D]."""
    return sum(float(wts.reshape(-1)[b]) * (dw[s].dequantize(torch.float32) @ h[b].to(torch.bfloat16).float())
               for b, s in enumerate(slots.reshape(-1).tolist()))


def _stacks(e, f, d, seed, device="cpu"):
    g = torch.Generator(device=device).manual_seed(seed)
    gate = quantize(torch.randn(e, f, d, generator=g, device=device) * d ** -0.5, "q4")
    up = quantize(torch.randn(e, f, d, generator=g, device=device) * d ** -0.5, "q4")
    return g, gate, up


@pytest.mark.parametrize("e,f,d,k", [(3, 40, 256, 2), (4, 24, 2048, 3), (5, 16, 1280, 1)])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_emulated_gate_up_matches_reference(e, f, d, k, groups):
    """Each warp's quarter of K (one group a warp at D 256, 8 at 2,048: one epilogue; 5 at 1,280: G 4 falls back to
    1), 1, 2 or 4 groups a step, the warps' sum, silu(gate) * up: within 1e-6 of the dequantized reference."""
    g, gate, up = _stacks(e, f, d, e * d)
    x = torch.randn(d, generator=g).to(torch.bfloat16)
    slots = torch.randperm(e, generator=g)[:k]
    assert rel(qgm.emulate_gate_up(x, slots, gate, up, groups), ref_gate_up(x, slots, gate, up)) < 1e-6


@pytest.mark.parametrize("e,d,f", [(10, 40, 768), (9, 24, 128), (12, 16, 1024)])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_emulated_down_matches_reference(e, d, f, groups):
    """Warp k's expert (12 groups: a partial epilogue; 2; 16: two), h rounded to bf16, the routing weights, the
    warps' sum: within 1e-6 of the reference."""
    g = torch.Generator().manual_seed(e * f)
    dw = quantize(torch.randn(e, d, f, generator=g) * f ** -0.5, "q4")
    h = torch.randn(8, f, generator=g)
    slots = torch.randperm(e, generator=g)[:8]
    wts = torch.rand(8, generator=g)
    assert rel(qgm.emulate_down(h, slots, wts, dw, groups), ref_down(h, slots, wts, dw)) < 1e-6


def test_emulate_catches_swapped_gate_and_up():
    """The checks above can fail: gate and up exchanged miss the reference."""
    g, gate, up = _stacks(3, 24, 512, 7)
    x = torch.randn(512, generator=g).to(torch.bfloat16)
    slots = torch.tensor([2, 0])
    assert rel(qgm.emulate_gate_up(x, slots, up, gate, 2), ref_gate_up(x, slots, gate, up)) > 0.1


def test_fit_and_where_it_serves():
    """fit halves G and D until they divide; neither kernel serves CPU tensors."""
    assert qgm.fit(8, 4, 2) == (4, 2) and qgm.fit(12, 4, 2) == (4, 1) and qgm.fit(5, 4, 4) == (1, 1)
    assert qgm.fit(6, 2, 4) == (2, 1) and qgm.fit(12, 2, 2) == (2, 2)
    _, gate, up = _stacks(2, 16, 256, 1)
    x = torch.zeros(1, 256, dtype=torch.bfloat16)
    assert not qgm.gate_up_ok(x, gate, up)
    dw = quantize(torch.randn(2, 16, 128) * 0.1, "q4")
    assert not qgm.down_ok(torch.zeros(8, 128), torch.zeros(8, dtype=torch.long), dw)
    with pytest.raises(ValueError, match="does not serve"):
        qgm.gate_up(x, torch.zeros(2, dtype=torch.long), gate, up)


def test_compile_for_sm90_with_pdl():
    """Both kernels compile for sm_90 with no GPU: gate_up with GDC waits before any global load (its slots come from
    the kernel right before) and loads a row's words 8 bytes at a time at one group a step, 16 from two; down with
    PRE loads before its wait, without PRE after it; no operand goes through shared memory before the first mma.
    In a subprocess with the interpreter off (Gluon compiles only there)."""
    pytest.importorskip("triton.experimental.gluon")
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("this Triton build has no NVIDIA backend")
    code = f"""
import sys; sys.path.insert(0, {str(REPO)!r})
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from tiered.kernels import quant_gluon_moe as qgm

def ptx(kernel, sig, cst, warps):
    attrs = {{(i,): [["tt.divisibility", 16]] for i, (k, v) in enumerate(sig.items())
              if v.startswith("*") or k.startswith("stride") or k == "uoff"}}
    sig = {{**sig, **{{c: "constexpr" for c in cst}}}}
    return triton.compile(GluonASTSource(kernel, sig, cst, attrs), target=GPUTarget("cuda", 90, 32),
                          options={{"num_warps": warps}}).asm["ptx"]

gsig = dict(x_ptr="*bf16", slot_ptr="*i64", slot_base="i32", gq="*i32", uoff="i64", gs="*bf16", us="*bf16",
            gm="*bf16", um="*bf16", h_ptr="*fp32", F="i32", stride_qs="i32", stride_qn="i32", stride_ss="i32",
            stride_sn="i32", stride_ms="i32", stride_mn="i32")
for groups, gdc in ((1, True), (2, True), (4, False)):
    p = ptx(qgm.GATE_UP, gsig, dict(KW=256, NG=32, G=groups, D=1, HW=1, GDC=gdc, PAIR=qgm.PAIR,
                                    **qgm.layouts(groups=groups)), 4)
    wait, first = p.find("griddepcontrol.wait"), p.find("ld.global")
    assert (wait >= 0) == gdc and (not gdc or wait < first), (groups, gdc, wait, first)
    assert ("ld.global.v2.b32" in p) == (groups == 1) and ("ld.global.v4.b32" in p), groups
    assert p.count("mma.sync") > 0 and "st.shared" not in p.split("mma.sync")[0], "an operand via shared memory"
dsig = dict(h_ptr="*fp32", slot_ptr="*i64", slot_base="i32", wt_ptr="*fp32", dq="*i32", ds="*bf16", dm="*bf16",
            y_ptr="*bf16", D_OUT="i32", stride_qs="i32", stride_qn="i32", stride_ss="i32", stride_sn="i32",
            stride_ms="i32", stride_mn="i32")
for pre in (True, False):
    p = ptx(qgm.DOWN, dsig, dict(KW=96, NG=12, G=2, WR=1, GDC=True, PRE=pre, PAIR=qgm.PAIR,
                                 **qgm.layouts(8, 16, 2, 0)), 8)
    wait, first = p.find("griddepcontrol.wait"), p.find("ld.global")
    assert 0 <= wait and (first < wait) == pre, (pre, wait, first)
    assert p.count("mma.sync") > 0
print("ok")
"""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


@pytest.mark.cuda
@pytest.mark.parametrize("e,f,d", [(128, 768, 2048), (9, 40, 1280)])
def test_cuda_gate_up_matches_reference(e, f, d):
    """The 10.6B shape and a small odd one (a partial row block; 5 groups a warp: G falls back to 1): 1, 2 and 4
    groups a step, 1 and 2 steps a load, a slot base, with and without PDL, h in input order (fp32) and word-major
    (fp32, bf16), against the dequantized reference; then inside a CUDA graph."""
    from tiered.kernels.pdl import launch_args

    g, gate, up = _stacks(e, f, d, f, DEV)
    x = torch.randn(1, d, generator=g, device=DEV).to(torch.bfloat16)
    slots = torch.randperm(e - 1, generator=g, device=DEV)[:8]
    ref = ref_gate_up(x, slots + 1, gate, up)
    word_major = torch.arange(f, device=DEV).view(f // 8, 8).t().reshape(-1) if f % 8 == 0 else None
    assert qgm.gate_up_ok(x, gate, up)
    for groups, ahead in ((1, 1), (2, 1), (2, 2), (4, 1), (4, 2)):
        for launch in (None, launch_args(x.device)):
            for hl in ((0, 1, 2) if word_major is not None else (0,)):
                h = qgm.gate_up(x, slots, gate, up, slot_base=1, h_layout=hl, groups=groups, ahead=ahead,
                                launch=launch)
                if hl:  # word-major: input 8w + j at j F / 8 + w
                    h = h[:, torch.argsort(word_major)]
                assert rel(h.float(), ref) < (1e-5 if hl < 2 else 1e-2), (groups, ahead, launch, hl)
        capped = qgm.gate_up(x, slots, gate, up, slot_base=1, groups=groups, ahead=ahead, launch=launch, regs=128)
        assert torch.equal(capped, qgm.gate_up(x, slots, gate, up, slot_base=1, groups=groups, ahead=ahead,
                                               launch=launch)), (groups, ahead, "a register cap changed h")
    qgm.gate_up(x, slots, gate, up, groups=2)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = qgm.gate_up(x, slots, gate, up, groups=2)
    x.copy_(torch.randn(1, d, generator=g, device=DEV).to(torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    assert rel(out, ref_gate_up(x, slots, gate, up)) < 1e-5


@pytest.mark.cuda
@pytest.mark.parametrize("e,d,f", [(128, 2048, 768), (12, 40, 128)])
def test_cuda_down_matches_reference(e, d, f):
    """The 10.6B shape (12 groups a row) and a small one (2: G falls back to 2 and 1): 1, 2 and 4 groups a step, a slot
    base, with PDL (with and without the early loads) and without, weights as given and rounded to bf16, fp32 and
    bf16 out."""
    from tiered.kernels.pdl import launch_args

    g = torch.Generator(device=DEV).manual_seed(d)
    dw = quantize(torch.randn(e, d, f, generator=g, device=DEV) * f ** -0.5, "q4")
    h = torch.randn(8, f, generator=g, device=DEV)
    slots = torch.randperm(e - 2, generator=g, device=DEV)[:8]
    wts = torch.rand(8, generator=g, device=DEV)
    ref = ref_down(h, slots + 2, wts, dw)
    ref_bf = ref_down(h, slots + 2, wts.to(torch.bfloat16).float(), dw)
    assert qgm.down_ok(h, slots, dw)
    pdl = launch_args(h.device)
    for groups in (1, 2, 4):
        for launch in (None, pdl, {**pdl, "PRE": False} if pdl else None):
            y = qgm.down(h, slots, wts, dw, torch.float32, slot_base=2, groups=groups, launch=launch)
            assert y.shape == (1, d) and rel(y[0], ref) < 1e-5, (groups, launch)
        y = qgm.down(h, slots, wts, dw, torch.bfloat16, slot_base=2, round_to=torch.bfloat16, groups=groups)
        assert y.dtype == torch.bfloat16 and rel(y[0].float(), ref_bf) < 1e-2


@pytest.mark.cuda
def test_cuda_experts_quant_decode_dispatches_to_gluon(monkeypatch):
    """experts_quant_decode with algo 3 configs for gate_up and down (TIERED_QCONFIG's form) runs the Gluon kernels
    (counted) and matches the word tiles' result; with algo 3 on gate_up only, h goes to the word-tile down
    word-major."""
    from tiered.kernels import quant_moe as qm

    e, f, d = 128, 768, 2048
    g, gate, up = _stacks(e, f, d, 5, DEV)
    dw = quantize(torch.randn(e, d, f, generator=g, device=DEV) * f ** -0.5, "q4")
    x = torch.randn(1, d, generator=g, device=DEV).to(torch.bfloat16)
    slots = torch.randperm(e, generator=g, device=DEV)[:8]
    wts = torch.softmax(torch.randn(1, 8, generator=g, device=DEV), -1)
    base = qm.experts_quant_decode(x, slots, wts, gate, up, dw, round_to=torch.bfloat16)
    calls = []
    for name in ("gate_up", "down"):
        real = getattr(qgm, name)
        monkeypatch.setattr(qgm, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    glu = qm.QConfig(bn=64, bg=2, warps=4, algo=3)
    both = qm.experts_quant_decode(x, slots, wts, gate, up, dw, round_to=torch.bfloat16, configs=(glu, glu))
    assert calls == ["gate_up", "down"] and rel(both.float(), base.float()) < 1e-2
    calls.clear()
    one = qm.experts_quant_decode(x, slots, wts, gate, up, dw, round_to=torch.bfloat16, configs=(glu, None))
    assert calls == ["gate_up"] and rel(one.float(), base.float()) < 1e-2


def test_tuned_gate_up_caps_the_gluon_kernel_only():
    """TUNED's 10.6B gate_up is the Gluon kernel under a register cap of 128 (session 48); where that kernel cannot
    serve, the word tile it falls back to runs uncapped (the cap was measured for the Gluon kernel only)."""
    from tiered.kernels import quant_moe as qm

    cfg = qm.pick_config("gate_up", "q4", 2048, 768)
    assert cfg.algo == 3 and cfg.regs == 128
    word = qm._word_tile_for(cfg, 4)
    assert word.algo == 2 and word.regs == 0 and (word.bn, word.bg, word.warps) == (8, 16, 4)
