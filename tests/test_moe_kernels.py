"""The MoE kernels (tiered/kernels) against the plain loop over experts.

On CPU through Triton's interpreter (TRITON_INTERPRET=1, set here before the kernels are imported; tiny
shapes, fp32 and one bf16 case), and on CUDA in bf16 at the 10.6B shape (marked `cuda`). Slots are
scattered in the pool, sizes include T = 1, odd T and odd D / F.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # the kernels are decorated at import: the interpreter must be on first
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from tiered.layout.format import plan_block  # noqa: E402
from tiered.kernels.moe_decode import DecodeConfig, moe_decode  # noqa: E402
from tiered.kernels.moe_grouped import (GroupedConfig, GroupedMoE, align_rows, grouped_mm_layer,  # noqa: E402
                                        moe_grouped)
from tiered.kernels.moe_naive import align_reference, experts_loop  # noqa: E402
from tiered.kernels.moe_operands import ExpertOperands, WeightFormat  # noqa: E402
from tiered.store.disk import expert_views  # noqa: E402

interp = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter tests run on CPU")


def _pool(S: int, F: int, D: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0):
    """ExpertWeights over a uint8 [S, block] pool with the layout's block placement, random values."""
    name = str(dtype).removeprefix("torch.")
    specs, bs = plan_block({"gate": ((F, D), name), "up": ((F, D), name), "down": ((D, F), name)})
    pool = torch.zeros(S, bs, dtype=torch.uint8, device=device)
    W = expert_views(pool, specs)
    g = torch.Generator().manual_seed(seed)
    for t in (W.gate, W.up, W.down):
        t.copy_((torch.randn(t.shape, generator=g) * D ** -0.5 * 2).to(dtype))
    return W


def _routing(T: int, K: int, n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [T, K] distinct per token in [0, n), weights [T, K] fp32 (softmax)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(n, generator=g)[:K] for _ in range(T)])
    return ids, torch.softmax(torch.randn(T, K, generator=g), -1)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


DECODE_CASES = [  # T, K, D, F, config
    (1, 1, 32, 16, DecodeConfig(block_f=8, block_d=16, down_block_d=8, down_block_f=16)),
    (1, 4, 40, 24, DecodeConfig(block_f=16, block_d=32, down_block_d=4, down_block_f=16, down_split=2)),
    (3, 3, 37, 19, DecodeConfig(block_f=8, block_d=16, down_block_d=16, down_block_f=8)),
    (3, 3, 37, 19, DecodeConfig(variant="fused", block_f=8, block_d=32, block_o=16)),
    (1, 8, 48, 24, DecodeConfig(variant="fused", block_f=16, block_d=64, block_o=32)),
    (2, 6, 40, 24, DecodeConfig(block_f=32, block_d=64, down_block_d=8, down_block_f=32, down_split=3)),
]


@interp
@pytest.mark.parametrize("T,K,D,F,cfg", DECODE_CASES)
def test_decode_matches_loop(T, K, D, F, cfg):
    """moe_decode (every variant, split-K, odd sizes, masks) equals the loop over experts in fp32."""
    S = 2 * K + 3
    W = _pool(S, F, D, torch.float32)
    ids, w = _routing(T, K, S)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(2))
    out = moe_decode(x, ids if T > 1 else ids[0], w, W, cfg)
    ref = experts_loop(x, ids, w, W)
    assert out.shape == (T, D) and out.dtype == x.dtype
    err = _rel(out, ref)
    assert err < 1e-5, f"rel err {err:.2e}, max abs diff {float((out - ref).abs().max()):.2e}"


@interp
def test_decode_bf16_pool_interpreted():
    """bf16 weights and input: within bf16 rounding of the fp32 loop over the same weights."""
    T, K, D, F = 1, 4, 64, 32
    W = _pool(3 * K, F, D, torch.bfloat16)
    ids, w = _routing(T, K, 3 * K)
    x = torch.randn(T, D).bfloat16()
    out = moe_decode(x, ids[0], w, W, DecodeConfig(block_f=16, block_d=32, down_block_d=16, down_block_f=32))
    assert out.dtype == torch.bfloat16
    err = _rel(out, experts_loop(x.float(), ids, w, W))
    assert err < 1e-2, f"rel err {err:.2e}"


@interp
@pytest.mark.parametrize("cfg", [DecodeConfig(block_f=16, block_d=32, down_block_d=16, down_block_f=32),
                                 DecodeConfig(variant="fused", block_f=16, block_d=64, block_o=32)])
def test_decode_slot_base_and_weight_rounding(cfg):
    """moe_decode with slot_base (added in the kernels) and fp32 weights rounded to bf16 inside (round_to) equals,
    bit for bit, the call with the slots added and the weights cast by torch first (what model/moe.py did)."""
    K, D, F = 4, 64, 32
    W = _pool(3 * K + 5, F, D, torch.bfloat16)
    ids, w = _routing(1, K, 3 * K)
    x = torch.randn(1, D).bfloat16()
    assert not torch.equal(w, w.bfloat16().float())
    want = moe_decode(x, ids[0] + 5, w.bfloat16(), W, cfg)
    got = moe_decode(x, ids[0], w, W, cfg, slot_base=5, round_to=torch.bfloat16)
    assert torch.equal(got, want)


@interp
@pytest.mark.parametrize("T,K,E,bm", [(1, 1, 4, 16), (1, 4, 8, 16), (5, 3, 6, 16), (13, 2, 40, 32), (9, 4, 4, 16)])
def test_align_rows_matches_reference(T, K, E, bm):
    """align_rows groups rows by expert in (t, k) order, pads each group to block_m with the sentinel,
    gives experts without rows no block, and fills the tail with sentinels and expert -1."""
    ids, _ = _routing(T, K, E, seed=T * 31 + E)
    al = align_rows(ids, E, bm)
    rows, experts = align_reference(ids, E, bm)
    assert al.rows.shape[0] % bm == 0 and al.rows.shape[0] >= len(rows)
    assert al.rows[:len(rows)].tolist() == rows
    assert al.block_expert[:len(experts)].tolist() == experts
    assert set(al.rows[len(rows):].tolist()) <= {T * K}
    assert set(al.block_expert[len(experts):].tolist()) <= {-1}


@interp
@pytest.mark.parametrize("T,K,E,bm", [(1, 1, 4, 16), (5, 3, 6, 16), (13, 2, 40, 32), (300, 8, 128, 16),
                                      (130, 8, 64, 64)])
@pytest.mark.parametrize("skewed", [False, True])
def test_align_kernel_equals_torch(T, K, E, bm, skewed):
    """The one-launch align kernel (what CUDA runs) writes every element of rows and block_expert (the buffers
    start as garbage) exactly as align_rows_torch: ids past one chunk (T K > 1024), experts without rows,
    E not a power of two, every token on the same experts (skewed)."""
    from tiered.kernels.moe_grouped import align_launch, align_rows_torch, padded_rows

    if skewed:
        ids = torch.tensor([[(3 * j) % E for j in range(K)]] * T)
    else:
        ids, _ = _routing(T, K, E, seed=T * 7 + E)
    ref = align_rows_torch(ids, E, bm)
    n = T * K
    P = padded_rows(n, E, bm)
    rows = torch.full((P,), -7, dtype=torch.int32)
    be = torch.full((P // bm,), -7, dtype=torch.int64)
    align_launch(ids.reshape(n), rows, be, E, bm)
    assert torch.equal(rows, ref.rows) and torch.equal(be, ref.block_expert)


def test_align_rows_skewed_routing():
    """Every token on the same K experts (the worst padding case) still fits the static buffer."""
    T, E, bm = 7, 16, 16
    ids = torch.tensor([[15, 0, 9]] * T)
    al = align_rows(ids, E, bm)
    rows, experts = align_reference(ids, E, bm)
    assert al.rows[:len(rows)].tolist() == rows and al.block_expert[:len(experts)].tolist() == experts


GROUPED_CASES = [  # T, K, E, D, F, config
    (1, 1, 4, 32, 16, GroupedConfig(block_m=16, block_n=16, block_k=16)),
    (1, 4, 8, 40, 24, GroupedConfig(block_m=16, block_n=32, block_k=16)),
    (5, 3, 6, 37, 19, GroupedConfig(block_m=16, block_n=16, block_k=32)),
    (13, 2, 3, 48, 40, GroupedConfig(block_m=32, block_n=32, block_k=16)),
]


@interp
@pytest.mark.parametrize("T,K,E,D,F,cfg", GROUPED_CASES)
def test_grouped_matches_loop(T, K, E, D, F, cfg):
    """moe_grouped over scattered slots equals the loop over experts in fp32 (T = 1, odd T, odd D / F)."""
    S = 2 * E + 1
    W = _pool(S, F, D, torch.float32)
    ids, w = _routing(T, K, E)
    slot_map = torch.randperm(S, generator=torch.Generator().manual_seed(3))[:E]
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(4))
    out = moe_grouped(x, ids, w, W, slot_map, cfg)
    err = _rel(out, experts_loop(x, slot_map[ids], w, W))
    assert err < 1e-5, f"rel err {err:.2e}"


@interp
def test_grouped_waves_equal_one_wave():
    """Computing the experts in waves (slot maps that each place a subset) gives the one-wave result
    bit for bit, whatever the split."""
    T, K, E, D, F = 6, 3, 8, 32, 16
    cfg = GroupedConfig(block_m=16, block_n=16, block_k=16)
    W = _pool(E + 2, F, D, torch.float32)
    ids, w = _routing(T, K, E)
    slot_map = torch.randperm(E + 2)[:E]
    x = torch.randn(T, D)
    one = moe_grouped(x, ids, w, W, slot_map, cfg)
    run = GroupedMoE(x, ids, w, E, cfg)
    for part in torch.randperm(E).split(3):
        m = torch.full((E,), -1, dtype=torch.int64)
        m[part] = slot_map[part]
        run.wave(W, m)
    assert torch.equal(run.result(), one)


def test_grouped_mm_layer_matches_loop():
    """The torch._grouped_mm comparison path equals the loop (fp32 on CPU), when torch has grouped_mm."""
    if getattr(torch.nn.functional, "grouped_mm", None) is None and getattr(torch, "_grouped_mm", None) is None:
        pytest.skip("torch has no grouped_mm")
    T, K, E, D, F = 9, 3, 6, 64, 32
    W = _pool(E, F, D, torch.float32)
    ids, w = _routing(T, K, E)
    x = torch.randn(T, D)
    try:
        out = grouped_mm_layer(x, ids, w, W.gate, W.up, W.down)
    except RuntimeError as e:  # some CPU builds lack fp32 grouped_mm
        pytest.skip(f"grouped_mm on CPU: {e}")
    assert _rel(out, experts_loop(x, ids, w, W)) < 1e-5


def _gpt_oss_pool(S: int, F: int, D: int, dtype: torch.dtype, seed: int = 0):
    """_pool with gpt-oss's expert biases in the blocks (gate_bias, up_bias [S, F], down_bias [S, D]), large enough
    that the clamp at `limit` bites."""
    from tiered.store.disk import ExpertWeights

    name = str(dtype).removeprefix("torch.")
    specs, bs = plan_block({"gate": ((F, D), name), "up": ((F, D), name), "down": ((D, F), name),
                            "gate_bias": ((F,), name), "up_bias": ((F,), name), "down_bias": ((D,), name)})
    pool = torch.zeros(S, bs, dtype=torch.uint8)
    W = expert_views(pool, specs)
    g = torch.Generator().manual_seed(seed)
    for t in (W.gate, W.up, W.down):
        t.copy_((torch.randn(t.shape, generator=g) * D ** -0.5 * 6).to(dtype))
    for t in (W.gate_bias, W.up_bias, W.down_bias):
        t.copy_((torch.randn(t.shape, generator=g) * 0.5).to(dtype))
    assert isinstance(W, ExpertWeights) and W.down_bias is not None
    return W


@interp
@pytest.mark.parametrize("T,K,D,F,cfg", [c for c in DECODE_CASES if c[4].variant == "split"])
def test_decode_clamped_swiglu_with_biases(T, K, D, F, cfg):
    """gpt-oss's experts (biases, the clamped activation) through moe_decode equal the loop with the same act; the
    clamp is exercised (some gate/up values past the limit) and the biases matter (a run without them differs)."""
    from tiered.model.moe import ClampedSwiGLU

    act = ClampedSwiGLU(alpha=1.702, limit=0.6)
    S = 2 * K + 3
    W = _gpt_oss_pool(S, F, D, torch.float32)
    ids, w = _routing(T, K, S)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(2))
    out = moe_decode(x, ids if T > 1 else ids[0], w, W, cfg, act=act)
    ref = experts_loop(x, ids, w, W, act)
    assert _rel(out, ref) < 1e-5, _rel(out, ref)
    gx = torch.einsum("td,sfd->tsf", x, W.gate) + W.gate_bias
    assert (gx > act.limit).any() and (gx < act.limit).any()
    from types import SimpleNamespace

    plain = SimpleNamespace(gate=W.gate, up=W.up, down=W.down)
    assert _rel(experts_loop(x, ids, w, plain, act), ref) > 1e-2  # the biases count
    assert _rel(experts_loop(x, ids, w, W), ref) > 1e-2  # the activation counts


@interp
def test_decode_biases_slot_base_and_rounding():
    """With biases, slot_base and round_to behave as without: equal, bit for bit, to shifted slots and weights cast
    first; the fused variant and the grouped kernel refuse biases loudly."""
    from tiered.model.moe import ClampedSwiGLU

    K, D, F = 4, 64, 32
    W = _gpt_oss_pool(3 * K + 5, F, D, torch.bfloat16)
    ids, w = _routing(1, K, 3 * K)
    x = torch.randn(1, D).bfloat16()
    cfg = DecodeConfig(block_f=16, block_d=32, down_block_d=16, down_block_f=32)
    act = ClampedSwiGLU()
    want = moe_decode(x, ids[0] + 5, w.bfloat16(), W, cfg, act=act)
    got = moe_decode(x, ids[0], w, W, cfg, slot_base=5, round_to=torch.bfloat16, act=act)
    assert torch.equal(got, want)
    assert _rel(got.float(), experts_loop(x.float(), ids + 5, w, W, act)) < 2e-2
    with pytest.raises(NotImplementedError, match="fused"):
        moe_decode(x, ids[0], w, W, DecodeConfig(variant="fused", block_f=16, block_d=64, block_o=32), act=act)


@interp
@pytest.mark.parametrize("T,K,E,D,F,cfg", GROUPED_CASES)
def test_grouped_clamped_swiglu_with_biases(T, K, E, D, F, cfg):
    """gpt-oss's experts (biases, the clamped activation) through the grouped kernels over scattered slots equal the
    loop with the same act and biases in fp32; the clamp bites, and dropping the biases or the activation shows."""
    from types import SimpleNamespace

    from tiered.model.moe import ClampedSwiGLU

    act = ClampedSwiGLU(alpha=1.702, limit=0.6)
    S = 2 * E + 1
    W = _gpt_oss_pool(S, F, D, torch.float32)
    ids, w = _routing(T, K, E)
    slot_map = torch.randperm(S, generator=torch.Generator().manual_seed(3))[:E]
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(4))
    out = moe_grouped(x, ids, w, W, slot_map, cfg, act=act)
    ref = experts_loop(x, slot_map[ids], w, W, act)
    assert _rel(out, ref) < 1e-5, _rel(out, ref)
    gx = torch.einsum("td,sfd->tsf", x, W.gate[slot_map]) + W.gate_bias[slot_map]
    assert (gx > act.limit).any() and (gx < act.limit).any()
    plain = SimpleNamespace(gate=W.gate, up=W.up, down=W.down)
    assert _rel(moe_grouped(x, ids, w, plain, slot_map, cfg, act=act), ref) > 1e-2  # the biases count
    assert _rel(moe_grouped(x, ids, w, W, slot_map, cfg), ref) > 1e-2  # the activation counts


@interp
def test_grouped_biases_in_waves_and_bf16():
    """With biases, waves give the one-wave result bit for bit, and bf16 pools stay within bf16 rounding of the
    fp32 loop (each row's down bias is applied once, in the wave that holds its expert)."""
    from tiered.model.moe import ClampedSwiGLU

    act = ClampedSwiGLU()
    T, K, E, D, F = 6, 3, 8, 32, 16
    cfg = GroupedConfig(block_m=16, block_n=16, block_k=16)
    W = _gpt_oss_pool(E + 2, F, D, torch.float32)
    ids, w = _routing(T, K, E)
    slot_map = torch.randperm(E + 2, generator=torch.Generator().manual_seed(5))[:E]
    x = torch.randn(T, D)
    one = moe_grouped(x, ids, w, W, slot_map, cfg, act=act)
    run = GroupedMoE(x, ids, w, E, cfg)
    for part in torch.randperm(E).split(3):
        m = torch.full((E,), -1, dtype=torch.int64)
        m[part] = slot_map[part]
        run.wave(W, m, act)
    assert torch.equal(run.result(), one)
    Wh = _gpt_oss_pool(E + 2, F, D, torch.float16)
    xh = x.half()
    got = moe_grouped(xh, ids, w, Wh, slot_map, cfg, act=act)
    assert _rel(got.float(), experts_loop(xh.float(), slot_map[ids], w, Wh, act)) < 1e-2


def test_unbuilt_formats_raise():
    """Formats other than FLOAT are named but not built: kernels and reference refuse them loudly."""
    W = _pool(4, 16, 32, torch.float32)
    ops = ExpertOperands(W.gate, W.up, W.down, fmt=WeightFormat.Q4)
    ids, w = _routing(1, 2, 4)
    x = torch.randn(1, 32)
    with pytest.raises(NotImplementedError, match="Q4"):
        moe_decode(x, ids[0], w, ops)
    with pytest.raises(NotImplementedError, match="Q4"):
        experts_loop(x, ids, w, ops)
    with pytest.raises(NotImplementedError, match="Q4"):
        moe_grouped(x, ids, w, ops, torch.arange(4))


# --- CUDA, bf16 ---

CUDA_DECODE = [
    DecodeConfig(),
    DecodeConfig(down_split=4),
    DecodeConfig(variant="fused", block_f=32, block_d=512, block_o=64),
]


@pytest.mark.cuda
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("cfg", CUDA_DECODE, ids=["split", "split4", "fused"])
def test_decode_cuda_bf16(T, cfg):
    """At the 10.6B shape (D 2048, F 768, K 8) in bf16: within bf16 rounding of the fp32 loop."""
    D, F, K, S = 2048, 768, 8, 24
    W = _pool(S, F, D, torch.bfloat16, "cuda")
    ids, w = _routing(T, K, S)
    x = torch.randn(T, D).bfloat16().cuda()
    out = moe_decode(x, ids.cuda(), w.cuda(), W, cfg)
    err = _rel(out.float(), experts_loop(x.float(), ids.cuda(), w.cuda(), W))
    assert err < 1e-2, f"rel err {err:.2e}"


@pytest.mark.cuda
def test_decode_cuda_deterministic_and_graph_capturable():
    """The deterministic variant gives identical bits on every call, and a CUDA graph of it follows new
    slots written into its static slot buffer."""
    D, F, K, S = 2048, 768, 8, 32
    W = _pool(S, F, D, torch.bfloat16, "cuda")
    ids, w = _routing(1, K, S)
    x = torch.randn(1, D, device="cuda").bfloat16()
    slots, wts = ids[0].cuda(), w.cuda()
    a, b = moe_decode(x, slots, wts, W), moe_decode(x, slots, wts, W)
    assert torch.equal(a, b)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        moe_decode(x, slots, wts, W)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = moe_decode(x, slots, wts, W)
    other, _ = _routing(1, K, S, seed=9)
    slots.copy_(other[0])
    g.replay()
    assert torch.equal(y, moe_decode(x, slots, wts, W))


@pytest.mark.cuda
@pytest.mark.parametrize("T", [1, 7, 64, 300])
def test_grouped_cuda_bf16(T):
    """Grouped kernel in bf16 (D 2048, F 768, K 8, E 16) within bf16 rounding of the fp32 loop, and
    close to torch._grouped_mm."""
    D, F, K, E = 2048, 768, 8, 16
    W = _pool(2 * E, F, D, torch.bfloat16, "cuda")
    ids, w = _routing(T, K, E)
    ids, w = ids.cuda(), w.cuda()
    slot_map = torch.randperm(2 * E, device="cuda")[:E]
    x = torch.randn(T, D, device="cuda").bfloat16()
    out = moe_grouped(x, ids, w, W, slot_map)
    sub = torch.arange(min(T, 24), device="cuda")  # the fp32 loop is slow: check a subset of tokens
    ref = experts_loop(x[sub].float(), slot_map[ids[sub]], w[sub], W)
    assert _rel(out[sub].float(), ref) < 1e-2
    lay = torch.arange(E, device="cuda")  # a contiguous run of E slots for grouped_mm
    gm = grouped_mm_layer(x, ids, w, W.gate[:E], W.up[:E], W.down[:E])
    ours = moe_grouped(x, ids, w, W, lay)
    assert _rel(ours.float(), gm.float()) < 1e-2


@pytest.mark.cuda
def test_grouped_cuda_graph_capturable():
    """A resident layer's grouped call (alignment included) captures in a CUDA graph and follows new ids."""
    T, D, F, K, E = 16, 256, 128, 4, 8
    W = _pool(E, F, D, torch.bfloat16, "cuda")
    ids, w = _routing(T, K, E)
    ids, w = ids.cuda(), w.cuda()
    slot_map = torch.arange(E, device="cuda")
    x = torch.randn(T, D, device="cuda").bfloat16()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        moe_grouped(x, ids, w, W, slot_map)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = moe_grouped(x, ids, w, W, slot_map)
    ids.copy_(_routing(T, K, E, seed=5)[0].cuda())
    g.replay()
    assert torch.equal(y, moe_grouped(x, ids, w, W, slot_map))


class _WaveProvider:
    """A provider over a pool that serves at most `n` experts per get() (slot = a fixed scattered map)."""

    def __init__(self, W, slot_of, n):
        self.weights, self.slot_of, self.max_experts_per_call = W, slot_of, n
        self.calls = []

    def get(self, layer, ids):
        self.calls.append(ids.tolist())
        return self.slot_of[ids]

    def prefetch(self, layer, ids):
        pass


class _WholeProvider(_WaveProvider):
    """The same pool, offering slot_map(layer): every expert at hand, no get() needed."""

    def slot_map(self, layer):
        return self.slot_of


@interp
@pytest.mark.parametrize("T,n,whole", [(3, 100, False), (5, 2, False), (5, 100, False), (11, 3, False),
                                       (11, 100, False), (3, 100, True), (5, 100, True), (11, 100, True)])
def test_model_tokens_path_matches_torch_loop(T, n, whole):
    """model/moe_gpu.experts_tokens (decode kernel for T <= DECODE_MAX_T_FLOAT when one wave serves, else the
    grouped kernel in waves of at most n experts; or the provider's slot_map) equals moe.experts_grouped,
    the torch loop the CPU keeps, and asks the provider for each used expert once."""
    from tiered.model import moe, moe_gpu

    K, E, D, F = 3, 7, 32, 16
    W = _pool(2 * E, F, D, torch.float32)
    slot_of = torch.randperm(2 * E)[:E]
    ids, w = _routing(T, K, E)
    x = torch.randn(T, D)
    ref = moe.experts_grouped(x, ids, w, _WaveProvider(W, slot_of, n), 0)
    p = (_WholeProvider if whole else _WaveProvider)(W, slot_of, n)
    out = moe_gpu.experts_tokens(x, ids, w, p, 0, E)
    assert _rel(out, ref) < 1e-5
    asked = [e for call in p.calls for e in call]
    if whole:
        assert asked == []
    else:
        assert sorted(asked) == sorted(set(ids.flatten().tolist())) and max(map(len, p.calls)) <= n


@interp
def test_model_decode_path_matches_torch():
    """model/moe_gpu's decode path equals moe.experts_from_slots (gather + GEMV) for one token."""
    from tiered.model import moe, moe_gpu

    K, D, F = 4, 32, 16
    W = _pool(9, F, D, torch.float32)
    ids, w = _routing(1, K, 9)
    x = torch.randn(1, D)
    assert _rel(moe_gpu.experts_decode(x, ids[0], w, W), moe.experts_from_slots(x, ids[0], w, W)) < 1e-5


@pytest.mark.cuda
@pytest.mark.parametrize("T,K,E,bm", [(128, 8, 128, 16), (2048, 8, 128, 64), (2048, 10, 512, 64), (3, 8, 128, 16)])
def test_cuda_align_kernel_equals_torch(T, K, E, bm):
    """On the GPU, align_rows (the kernel) equals align_rows_torch element for element at batch-decode and prefill
    sizes of the 10.6B (E 128) and 397B (E 512) shapes."""
    from tiered.kernels.moe_grouped import align_rows_torch

    ids, _ = _routing(T, K, E, seed=T + E)
    ids = ids.cuda()
    got, ref = align_rows(ids, E, bm), align_rows_torch(ids, E, bm)
    assert torch.equal(got.rows, ref.rows) and torch.equal(got.block_expert, ref.block_expert)


def test_decode_max_t_knob(monkeypatch):
    """TIERED_DECODE_MAX_T moves the GEMV/grouped cut-over (a benchmark knob); unset, DECODE_MAX_T; garbage is
    refused with the variable's name."""
    from tiered.model import moe_gpu

    monkeypatch.delenv(moe_gpu.DECODE_MAX_T_ENV, raising=False)
    assert moe_gpu.decode_max_t() == moe_gpu.DECODE_MAX_T
    assert moe_gpu.decode_max_t(quant=False) == moe_gpu.DECODE_MAX_T_FLOAT
    assert moe_gpu.decode_max_t(fmt="mxfp4") == moe_gpu.DECODE_MAX_T_MXFP4 < moe_gpu.decode_max_t(fmt="q4")
    monkeypatch.setenv(moe_gpu.DECODE_MAX_T_ENV, "6")
    assert moe_gpu.decode_max_t() == moe_gpu.decode_max_t(quant=False) == moe_gpu.decode_max_t(fmt="mxfp4") == 6
    monkeypatch.setenv(moe_gpu.DECODE_MAX_T_ENV, "four")
    with pytest.raises(ValueError, match="TIERED_DECODE_MAX_T"):
        moe_gpu.decode_max_t()
