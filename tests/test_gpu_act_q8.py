"""The GPU kernels' q8 activation mode (QConfig.act 1, TIERED_GPU_ACT=q8; tiered/kernels/quant_moe.py): q4 products
through the word tile take their inputs rounded to 8 bits per quantization group (d = max |x| / 127, round(x / d)
ties to even, clamped to +-127: the CPU kernel's ACT_Q8 rounding) and sum code x code products exactly in integers
(dp4a on CUDA; the same sums in integer ops under Triton's interpreter).

Each entry point (the dense GEMV over one matrix and over a stack, the experts' gate_up and down in each h layout, the
down kernel's per-expert loop under split-K) against the torch reference of that math: the inputs rounded by
quant_moe.round_inputs_q8, then the fp32 dequantized weights. On CPU through the interpreter, tiny shapes; on CUDA
(marked `cuda`) at the 10.6B shapes. The reference is the package's round_inputs_q8, the CPU mode's rounding."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from tiered.kernels import quant_moe as qm  # noqa: E402
from tiered.kernels.quant_moe import (QConfig, experts_quant_decode, quant_matvec, quant_matvec_ref,  # noqa: E402
                                      round_inputs_q8 as _act_q8)
from tiered.layout.quant import group_size, quantize  # noqa: E402

from test_cpu_act_q8 import _act_q8 as _cpu_act_q8  # noqa: E402
from test_quant_kernels import DEV, INTERP, _pool, rel  # noqa: E402

# one group a step, two groups a step, wide rows over long steps (one step longer than most rows)
WORDS8 = [QConfig(bn=2, bg=1, warps=1, algo=2, act=1), QConfig(bn=4, bg=2, warps=2, algo=2, act=1),
          QConfig(bn=16, bg=8, warps=4, algo=2, act=1)]


def _round_bf16(h: torch.Tensor) -> torch.Tensor:
    """h rounded to bf16 as the kernel stores it: to nearest on CUDA, toward zero under Triton's interpreter (its
    fp32 -> bf16 cast drops the low bits)."""
    if INTERP:
        return (h.float().contiguous().view(torch.int32) & ~0xFFFF).view(torch.float32)
    return h.bfloat16().float()


@pytest.mark.parametrize("N,K,T", [(5, 64, 1), (7, 320, 2), (3, 520, 1), (4, 32, 1), (9, 96, 2)])
def test_matvec_matches_the_rounded_reference(N, K, T):
    """The word tile's GEMV with 8-bit inputs, over a stack with scattered slots and over one matrix, equals the
    rounded inputs times the dequantized rows (1e-5), and is clearly apart from the float product (the rounding is
    there): one group (64), several steps, a short last group (520 = 8 x 64 + 8), a whole-row group (32)."""
    g = torch.Generator().manual_seed(N * K)
    qw = quantize(torch.randn(3, N, K, generator=g) * 0.1, "q4").to_device(DEV)
    x = torch.randn(T, K, generator=g).to(DEV)
    slots = torch.tensor([2, 0, 1][:T], device=DEV)
    xr = _act_q8(x, group_size("q4", K))
    for cfg in WORDS8:
        got = quant_matvec(x, qw, slots, config=cfg)
        assert rel(got, quant_matvec_ref(xr, qw, slots)) < 1e-5, cfg
        assert rel(got, quant_matvec_ref(x, qw, slots)) > 1e-3, cfg  # not the float product
        assert rel(quant_matvec(x, qw[1], config=cfg), quant_matvec_ref(xr, qw[1])) < 1e-5, cfg


@pytest.mark.parametrize("persist", [1, 3])
def test_matvec_programs_looping_over_row_blocks(persist):
    """QConfig.persist: fewer programs than row blocks (under the interpreter 2 "SMs": 2 or 6 programs for 10 blocks),
    each rounding x once and looping over blocks, over a stack and one matrix, two rows: the rounded reference."""
    g = torch.Generator().manual_seed(persist)
    qw = quantize(torch.randn(3, 37, 256, generator=g) * 0.1, "q4").to_device(DEV)
    x = torch.randn(2, 256, generator=g).to(DEV)
    slots = torch.tensor([2, 0], device=DEV)
    cfg = QConfig(bn=4, bg=2, warps=2, algo=2, act=1, persist=persist)
    xr = _act_q8(x, 64)
    assert rel(quant_matvec(x, qw, slots, config=cfg), quant_matvec_ref(xr, qw, slots)) < 1e-5
    assert rel(quant_matvec(x, qw[1], config=cfg), quant_matvec_ref(xr, qw[1])) < 1e-5


def test_integer_sums_take_signed_inputs_at_the_extremes():
    """Inputs whose codes reach -127 and 127 and codes 0 and 15: the dp4a emulation (unsigned code bytes, signed input
    bytes) sums them exactly; a sign error in the input bytes would miss by far."""
    K = 128
    w = torch.zeros(2, K)
    w[0] = torch.linspace(-1, 1, K)
    w[1, ::2] = 1.0
    qw = quantize(w, "q4").to_device(DEV)
    x = torch.zeros(1, K)
    x[0, :64] = torch.where(torch.arange(64) % 2 == 0, 3.0, -3.0)  # codes +-127
    x[0, 64:] = torch.linspace(-2, 1, 64)
    x = x.to(DEV)
    want = quant_matvec_ref(_act_q8(x, 64), qw)
    assert rel(quant_matvec(x, qw, config=WORDS8[1]), want) < 1e-6


def test_preload_before_the_wait_computes_the_same(monkeypatch):
    """PRE with 8-bit inputs (the dense GEMV's first step of codes as halves of groups, the down kernel's slots and
    codes loaded before the PDL wait): forced on under the interpreter, bit for bit what the launches give without
    it, over two steps of a row."""
    g = torch.Generator().manual_seed(11)
    qw = quantize(torch.randn(40, 256, generator=g) * 0.1, "q4").to_device(DEV)
    x = torch.randn(1, 256, generator=g).to(DEV)
    W = _pool("q4", 6, 128, 64)
    xe = torch.randn(1, 64, generator=g).to(DEV)
    slots = torch.randperm(6, generator=g)[:3].to(DEV)
    wts = torch.rand(1, 3, generator=g).to(DEV)
    cfg = QConfig(bn=4, bg=2, warps=2, algo=2, act=1)
    down = QConfig(bn=4, bg=1, warps=2, algo=2, hw=1, act=1)

    def run():
        return (quant_matvec(x, qw, config=cfg),
                experts_quant_decode(xe, slots, wts, W.gate, W.up, W.down, interpret=INTERP, configs=(cfg, down)))

    plain = run()
    seen = []
    monkeypatch.setattr(qm, "_preload_ok", lambda opts: seen.append(1) or True)
    pre = run()
    assert len(seen) == 2
    assert torch.equal(pre[0], plain[0]) and torch.equal(pre[1], plain[1])
    assert rel(pre[0], quant_matvec_ref(_act_q8(x, 64), qw)) < 1e-5


def _experts_q8(x, slots, wts, W, h_round=None):
    """One token's experts in the mode's math: x rounded per group, SwiGLU in fp32, h rounded (h_round, e.g. to
    bf16) and then to 8 bits per group, the dequantized down rows, weighted and summed."""
    out = torch.zeros(1, W.down.matrix[0], dtype=torch.float64, device=x.device)
    xq = _act_q8(x.float(), group_size("q4", W.gate.matrix[1]))
    for k, s in enumerate(slots.tolist()):
        g, u, d = (w[s].dequantize(torch.float32) for w in (W.gate, W.up, W.down))
        h = F.silu(xq @ g.T) * (xq @ u.T)
        if h_round is not None:
            h = h_round(h)
        out += (wts[0, k] * (_act_q8(h, group_size("q4", d.shape[1])) @ d.T)).double()
    return out


@pytest.mark.parametrize("down,h_round", [(QConfig(bn=4, bg=2, warps=2, algo=2, hw=1, act=1), None),
                                          (QConfig(bn=4, bg=1, warps=2, algo=2, hw=2, act=1), _round_bf16),
                                          (QConfig(bn=4, bg=2, warps=2, algo=2, act=1), None),
                                          (QConfig(bn=4, bg=1, warps=2, algo=2, split=3, act=1), None)],
                         ids=["word-major-fp32", "word-major-bf16", "rows-fp32", "split-k"])
def test_experts_match_the_rounded_reference(down, h_round):
    """gate_up and down with 8-bit inputs (h rounded per group in the down kernel): every expert's codes in one load
    over a word-major h in fp32 and in bf16 and over h in input order, and the per-expert loop of split-K (atomics),
    against the loop in the mode's math (1e-5)."""
    W = _pool("q4", 6, 64, 128)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 128, generator=g).to(DEV)
    slots = torch.randperm(6, generator=g)[:3].to(DEV)
    wts = torch.rand(1, 3, generator=g).to(DEV)
    got = experts_quant_decode(x, slots, wts, W.gate, W.up, W.down, interpret=INTERP,
                               configs=(QConfig(bn=4, bg=1, algo=2, act=1), down))
    assert rel(got, _experts_q8(x, slots, wts, W, h_round)) < 1e-5


def test_reference_rounding_is_the_cpu_kernels():
    """round_inputs_q8 (the GPU mode's reference) is the CPU mode's rounding (test_cpu_act_q8's), bit for bit, ties
    included, on a whole-row group and on groups of 64 with a short last one."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 200, generator=g)
    x[0, :64] = torch.arange(64) - 31.5
    x[0, 0] = 127.0  # d = 1: x / d on halves, ties to even
    assert _act_q8(x, 64)[0, 1:5].tolist() == [-30.0, -30.0, -28.0, -28.0]
    for G in (64, 200):
        assert torch.equal(_act_q8(x, G), _cpu_act_q8(x, G))


def test_mode_from_the_environment(monkeypatch):
    """TIERED_GPU_ACT=q8 gives q4's configs act 1 (and with it the word tile where it reads the weight: the format's
    default tile is the grouped one); other formats and a TIERED_QCONFIG entry keep theirs; a wrong value names the
    choices."""
    monkeypatch.delenv(qm.ACT_ENV, raising=False)
    monkeypatch.delenv(qm.CONFIG_ENV, raising=False)
    assert qm.act_mode() == "float" and qm.pick_config("gemv", "q4", 2048, 5120).act == 0
    monkeypatch.setenv(qm.ACT_ENV, "q8")
    assert qm.pick_config("gemv", "q4", 2048, 5120).act == 1
    assert qm.pick_config("gate_up", "q4", 200, 96).act == 1  # the format's entry (algo 0)
    assert qm.pick_config("gemv", "q8", 2048, 5120).act == 0
    qw = quantize(torch.randn(16, 128) * 0.1, "q4")
    assert qm._tiles(qm.pick_config("gemv", "q4", 128, 16), qw)["ALGO"] == 2
    assert qm._tiles(qm.pick_config("gemv", "q4", 128, 16), qw)["ACT8"]
    odd = quantize(torch.randn(16, 33) * 0.1, "q4")  # not readable as words: the flat tile, float inputs
    assert not qm._tiles(qm.pick_config("gemv", "q4", 33, 16), odd)["ACT8"]
    monkeypatch.setenv(qm.CONFIG_ENV, "gemv,q4,2048,5120:bn=8,bg=32,warps=4,algo=2")
    assert qm.pick_config("gemv", "q4", 2048, 5120).act == 0
    monkeypatch.setenv(qm.ACT_ENV, "int8")
    with pytest.raises(ValueError, match="float, q8"):
        qm.act_mode()
    with pytest.raises(ValueError, match="QConfig.act"):
        QConfig(act=2)


@pytest.mark.cuda
@pytest.mark.parametrize("N,K", [(5120, 2048), (2048, 4096), (151936, 2048)])
def test_cuda_dense_shapes(N, K):
    """The 10.6B dense matrices (qkv, o_proj, lm_head) under TUNED's tiles with act 1, against the rounded
    reference."""
    g = torch.Generator(device="cuda").manual_seed(N)
    qw = quantize(torch.randn(N, K, generator=g, device="cuda") * K ** -0.5, "q4")
    x = torch.randn(1, K, generator=g, device="cuda", dtype=torch.bfloat16)
    cfg = qm.dataclasses.replace(qm.pick_config("gemv", "q4", K, N), act=1)
    got = quant_matvec(x, qw, config=cfg, out_dtype=torch.float32)
    assert rel(got, quant_matvec_ref(_act_q8(x, 64), qw).float()) < 1e-5


@pytest.mark.cuda
@pytest.mark.parametrize("D,F_,K", [(2048, 768, 8), (4096, 1024, 10)])
def test_cuda_expert_shapes_in_a_graph(D, F_, K):
    """One token's experts at the 10.6B and 397B shapes, TUNED's tiles with act 1, captured in a CUDA graph and
    replayed, against the mode's loop (fp32 inputs and output: 1e-4), and the same bits eagerly."""
    W = _pool("q4", 2 * K, F_, D)
    g = torch.Generator(device="cuda").manual_seed(D)
    x = torch.randn(1, D, generator=g, device="cuda")
    slots = torch.randperm(2 * K, generator=g, device="cuda")[:K]
    wts = torch.rand(1, K, generator=g, device="cuda")
    cfgs = tuple(qm.dataclasses.replace(qm.pick_config(k, "q4", a, b), act=1)
                 for k, a, b in (("gate_up", D, F_), ("down", F_, D)))
    hl = qm.down_h_layout(W.down, cfgs[1], K)
    run = lambda: experts_quant_decode(x, slots, wts, W.gate, W.up, W.down, configs=cfgs)  # noqa: E731
    run()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    graph.replay()
    torch.cuda.synchronize()
    want = _experts_q8(x, slots, wts, W, _round_bf16 if hl == 2 else None)
    assert rel(out, want) < 1e-4
    assert torch.equal(run(), out)
