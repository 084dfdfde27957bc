"""The native kernel's q8 activation mode (TIERED_CPU_ACT=q8, kernels/cpu_kernel.c ACT_Q8): q4 products take their
inputs rounded to 8 bits per quantization group (d = max |x| / 127, round(x / d) ties to even, clamped to +-127),
then integer dot products. Every entry point (one token's experts, the GEMV and GEMM, expert rows, the device
step's mailbox loop) against the torch reference of that math: the inputs rounded by `_act_q8` below, then the
fp32 dequantized weights. Native-only: skips where this machine cannot build the kernel."""
from __future__ import annotations

import platform

import pytest
import torch
import torch.nn.functional as F

from tiered.kernels import cpu_kernel
from tiered.kernels.cpu_kernel import CpuKernel
from tiered.layout.quant import group_size, quantize

from test_cpu_kernel import _jobs, _pool, _rel

# (D, F): 9 groups of 64 (one block of 8, one left), 19 with a short last one, F under 64 (one whole-row group),
# F with a short group of 16, 12 groups (a block of 8 and one of 4) and 5 (a block of 4 and one left)
SHAPES = [(576, 208), (1200, 96), (130, 40), (64, 80), (768, 320)]


@pytest.fixture(scope="module")
def kq() -> CpuKernel:
    k = CpuKernel.load(warn=False, act="q8")
    if k is None:
        pytest.skip("no native CPU kernel on this machine (no C compiler or the build failed)")
    return k


def _act_q8(x: torch.Tensor, G: int, *, ties: str = "even") -> torch.Tensor:
    """x [..., K] fp32 rounded to 8 bits per group of G inputs along K, as the kernel does it."""
    x = x.float()
    out = torch.empty_like(x)
    for g0 in range(0, x.shape[-1], G):
        v = x[..., g0:g0 + G]
        d = v.abs().amax(-1, keepdim=True) / 127
        safe = torch.where(d > 0, d, torch.ones_like(d))
        r = v / safe
        c = torch.round(r) if ties == "even" else torch.sign(r) * torch.floor(r.abs() + 0.5)
        out[..., g0:g0 + G] = torch.where(d > 0, c.clamp(-127, 127), torch.zeros_like(v)) * d
    return out


def _expert_q8(x: torch.Tensor, W, s: int) -> torch.Tensor:
    """One q4 expert over x [n, D] in the mode's math: its inputs and h rounded per group, fp32 weights."""
    g, u, d = (m.dequantize(torch.float32)[s] for m in (W.gate, W.up, W.down))
    xq = _act_q8(x, group_size("q4", g.shape[1]))
    h = F.silu(xq @ g.T) * (xq @ u.T)
    return _act_q8(h, group_size("q4", d.shape[1])) @ d.T


@pytest.mark.parametrize("D,F_", SHAPES)
def test_experts_match_the_rounded_reference(kq, D, F_):
    """One token's experts (tiered_cpu_experts): within 1e-5 of the reference in fp32 compute, and clearly apart
    from the float mode (the rounding is there); bf16 compute within bf16 rounding; 1 and 2 threads alike."""
    W = _pool("q4", D, F_, 5)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, D, generator=g)
    w = torch.softmax(torch.randn(8, generator=g), 0)
    jobs = _jobs(W, [4, 0, 2])
    ref = sum(w[k] * _expert_q8(x, W, r) for k, _, r in jobs)
    for threads in (1, 2):
        got = kq.partial(x, w, jobs, threads=threads, fp32_weights=True)
        assert got is not None and _rel(got, ref) <= 1e-5, threads
    plain = CpuKernel.load(warn=False).partial(x, w, jobs, threads=2, fp32_weights=True)
    assert _rel(plain, ref) > 1e-3  # the float mode does not round: the test sees the difference
    gb = kq.partial(x.bfloat16(), w, jobs, threads=2, fp32_weights=True)
    assert gb.dtype == torch.bfloat16 and _rel(gb, ref) <= 2e-2


@pytest.mark.parametrize("n,k", [(7, 100), (33, 576), (130, 1200), (6, 40), (9, 768)])
@pytest.mark.parametrize("tiled", [False, True])
def test_gemv_and_gemm_match_the_rounded_reference(kq, n, k, tiled):
    """The GEMV's integer dots and the GEMM's fp32 tiles over the rounded inputs give the same math: 1, 3, 5 and 37
    tokens within 1e-5 of the reference; q8 and float matrices are not affected by the mode."""
    wq = quantize((torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.1), "q4")
    x = torch.randn(37, k, generator=torch.Generator().manual_seed(1))
    for T in (1, 3, 5, 37):
        ref = _act_q8(x[:T], group_size("q4", k)) @ wq.dequantize(torch.float32).T
        assert _rel(kq.gemv(x[:T], wq, threads=2, tiled=tiled), ref) <= 1e-5, T
    w8 = quantize(torch.randn(n, k) * 0.1, "q8")
    assert _rel(kq.gemv(x[:3], w8, threads=2, tiled=tiled), x[:3] @ w8.dequantize(torch.float32).T) <= 1e-5


def _kernel_for(kq: CpuKernel, march: str) -> CpuKernel:
    if march == "native":
        return kq
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 instruction-set variants")
    try:
        return CpuKernel(cpu_kernel.build(march), "q8")
    except cpu_kernel.KernelUnavailable as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("march", ["native", "haswell"])
@pytest.mark.parametrize("n,k", [(13, 1200), (8, 640)])
def test_gemm_integer_tiles_every_width(kq, march, n, k):
    """The GEMM's integer tiles (AVX512-VNNI: up to 8 tokens a tile over 4 rows, the pieces kept past one tile;
    AVX2: up to 4 tokens, 16-bit sums of vpmaddubsw) with the row count not a multiple of 4 and a short last group of
    48 inputs, for 1 to 19 tokens, within 1e-5 of the reference."""
    k_ = _kernel_for(kq, march)
    wq = quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(8)) * 0.1, "q4")
    x = torch.randn(19, k, generator=torch.Generator().manual_seed(9))
    wf = wq.dequantize(torch.float32)
    for T in range(1, 20):
        ref = _act_q8(x[:T], 64) @ wf.T
        assert _rel(k_.gemv(x[:T], wq, threads=1 + T % 2, tiled=True), ref) <= 1e-5, T


@pytest.mark.parametrize("march", ["native", "haswell"])
def test_expert_rows_extreme_codes(kq, march):
    """Codes of 15 against inputs at +-127 (the AVX2 tile's 16-bit sums at their largest, 15,240) in expert rows of
    2 to 40 tokens: no saturation, within 1e-5 of the reference."""
    k_ = _kernel_for(kq, march)
    W = _pool("q4", 256, 128, 2)
    for m in (W.gate, W.up, W.down):
        m.q.fill_(0xFF)  # every code 15
    counts = [2, 40]
    x = torch.full((sum(counts), 256), 3.0)  # every code 127 (vpmaddubsw pairs adjacent even or odd inputs)
    x[::3] *= -1
    ref = torch.cat([_expert_q8(x[:2], W, 0), _expert_q8(x[2:], W, 1)])
    assert _rel(k_.expert_rows(x, W, [0, 1], counts, threads=2), ref) <= 1e-5


def test_rounding_ties_to_even_and_zero_groups(kq):
    """Inputs at half steps (d = 1: max |x| = 127) round to even, as torch.round does, not away from zero (the two
    references differ by far more than the tolerance, so the check can fail); an all-zero group adds nothing."""
    k = 192
    x = torch.zeros(1, k)
    x[0, :64] = torch.tensor([127.0] + [i + 0.5 for i in range(-31, 32)])  # group 0: ties, d = 1
    x[0, 128:] = torch.randn(64, generator=torch.Generator().manual_seed(2))  # group 1 all zero, group 2 random
    wq = quantize(torch.rand(16, k, generator=torch.Generator().manual_seed(3)) + 0.5, "q4")
    wf = wq.dequantize(torch.float32)
    even, away = _act_q8(x, 64) @ wf.T, _act_q8(x, 64, ties="away") @ wf.T
    assert _rel(away, even) > 1e-3
    for tiled in (False, True):
        assert _rel(kq.gemv(x, wq, threads=1, tiled=tiled), even) <= 1e-5


def test_expert_rows_match_the_rounded_reference(kq):
    """Experts over their own rows (none, 1, 2-3, 4+ and over 32 rows: every path of tiered_cpu_expert_rows)."""
    W = _pool("q4", 576, 208, 6)
    slots, counts = [5, 0, 2, 1, 3, 4], [1, 3, 5, 0, 40, 2]
    x = torch.randn(sum(counts), 576, generator=torch.Generator().manual_seed(4))
    ref, a = [], 0
    for s, c in zip(slots, counts):
        ref.append(_expert_q8(x[a:a + c], W, s))
        a += c
    for threads in (1, 2):
        assert _rel(kq.expert_rows(x, W, slots, counts, threads=threads), torch.cat(ref)) <= 1e-5, threads


def test_mailbox_loop_runs_in_the_mode(kq):
    """The device step's CPU loop (tiered_cpu_serve through model/cpu_mailbox.py) passes the mode on: a post of two
    q4 jobs answers the rounded reference."""
    from tiered.model.cpu_mailbox import CpuMailbox

    W = _pool("q4", 576, 208, 4)
    K = 4
    box = CpuMailbox(kq, W, K=K, D=576, dtype=torch.float32, threads=1)
    try:
        box.start()
        x = torch.randn(1, 576, generator=torch.Generator().manual_seed(5))
        w = torch.rand(K, generator=torch.Generator().manual_seed(6))
        rows = torch.tensor([-1, 3, -1, 1], dtype=torch.int64)
        out = box.wait(torch.empty(1, 576), box.post(x, rows, w), timeout_s=20)
        assert _rel(out, w[1] * _expert_q8(x, W, 3) + w[3] * _expert_q8(x, W, 1)) <= 1e-5
    finally:
        box.close()


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 instruction-set variants")
@pytest.mark.parametrize("march,i8", [("haswell", 1), ("x86-64", 0)])
def test_other_instruction_sets(kq, march, i8):
    """AVX2's vpmaddubsw path and the plain-C loop give the same math as VNNI (built here, run where they run)."""
    try:
        k = CpuKernel(cpu_kernel.build(march), "q8")
    except cpu_kernel.KernelUnavailable as e:
        pytest.skip(str(e))
    assert (k.caps >> 10 & 1) == i8 and not k.caps >> 11 & 1
    W = _pool("q4", 1200, 96, 3)
    x = torch.randn(1, 1200, generator=torch.Generator().manual_seed(7))
    w = torch.rand(3)
    jobs = _jobs(W, [1, 2, 0])
    ref = sum(w[j] * _expert_q8(x, W, r) for j, _, r in jobs)
    assert _rel(k.partial(x, w, jobs, threads=2, fp32_weights=True), ref) <= 1e-5


def test_mode_from_the_environment(monkeypatch):
    """TIERED_CPU_ACT picks the shared kernel's mode (unset or empty: float); an unknown value is an error naming
    the choices; the kernel's name says the mode."""
    monkeypatch.delenv(cpu_kernel.ACT_ENV, raising=False)
    assert cpu_kernel.act_mode() == "float"
    monkeypatch.setenv(cpu_kernel.ACT_ENV, " Q8 ")
    assert cpu_kernel.act_mode() == "q8"
    k = cpu_kernel.shared()
    if k is not None:
        assert k.act == "q8" and "q8act" in k.simd_name and k.mode(torch.bfloat16) == 1 | cpu_kernel.ACT_Q8
    monkeypatch.setenv(cpu_kernel.ACT_ENV, "int4")
    with pytest.raises(ValueError, match="float, q8"):
        cpu_kernel.act_mode()
    with pytest.raises(ValueError, match="float, q8"):
        CpuKernel(cpu_kernel.SOURCE, "int4")
