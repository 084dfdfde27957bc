"""The grouped dequantizing MoE kernels (tiered/kernels/quant_grouped.py) against the plain loop over experts
(dequantize each expert, matmul, SwiGLU, weighted sum), and the model's several-token path over them.

On CPU through Triton's interpreter (tiny shapes: 1 token, odd token counts, inputs below a group, groups cut
short at the end of a row, reduction steps spanning several groups, experts that receive no rows, slots
scattered in a pool larger than the layer); a subprocess compiles the kernels for an sm_90 target without a
GPU (the real compiler is stricter than the interpreter); on CUDA (marked `cuda`) at the 10.6B shape in bf16.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from tiered.kernels.moe_grouped import GroupedConfig  # noqa: E402
from tiered.kernels.quant_grouped import (WFMT, QuantGroupedMoE, block_k_for, moe_grouped_quant,  # noqa: E402
                                          qgrouped_ok)
from tiered.layout.format import plan_block  # noqa: E402
from tiered.layout.quant import quantize  # noqa: E402
from tiered.store.disk import expert_views  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
INTERP = DEV == "cpu"
interp = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter tests run on CPU")
FORMATS = sorted(WFMT)
REPO = Path(__file__).resolve().parent.parent


def _pool(fmt: str, S: int, F_: int, D: int, seed: int = 0, device: str = DEV):
    """ExpertWeights over a uint8 [S, block] pool in `fmt` (the layout's block placement), quantized from
    random weights."""
    specs, bs = plan_block({"gate": ((F_, D), fmt), "up": ((F_, D), fmt), "down": ((D, F_), fmt)})
    pool = torch.zeros(S, bs, dtype=torch.uint8, device=device)
    W = expert_views(pool, specs)
    g = torch.Generator(device=device).manual_seed(seed)
    for w in (W.gate, W.up, W.down):
        q = quantize(torch.randn(w.shape, generator=g, device=device) * w.matrix[1] ** -0.5 * 2, fmt)
        for name, t in q.parts().items():
            w.parts()[name].copy_(t)
    return W


def _routing(T: int, K: int, E: int, seed: int = 1):
    """ids [T, K] distinct per token in [0, E), weights [T, K] fp32 (softmax)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    return ids, torch.softmax(torch.randn(T, K, generator=g), -1)


def _reference(x, ids, wts, W, slot_map):
    """The plain loop: for each expert with rows, dequantize (fp32), matmul, SwiGLU, times the routing weight,
    summed over each token's K experts (fp64)."""
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64, device=x.device)
    xf = x.float()
    for e in ids.unique().tolist():
        t, k = (ids == e).nonzero(as_tuple=True)
        s = int(slot_map[e])
        gw, uw, dw = (w[s].dequantize(torch.float32) for w in (W.gate, W.up, W.down))
        y = (F.silu(xf[t] @ gw.T) * (xf[t] @ uw.T)) @ dw.T
        out.index_add_(0, t, (y * wts[t, k].float()[:, None]).double())
    return out


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12))


# T, K, E, D, F, config. D 48 / F 40: one q4 group per row (inputs < 64), one short q8 / fp8 group; D 130 /
# F 72: several groups, the last one short (q4 64+64+2, mxfp4 4x32+2); block_k 128 makes a step span 2 q4 or
# 4 mxfp4 groups; T = 1 and E = 8 or 12 leave experts without rows.
CASES = [
    (1, 2, 8, 48, 40, None),
    (7, 3, 6, 130, 72, GroupedConfig(block_m=16, block_n=64, block_k=32)),
    (5, 2, 12, 130, 72, GroupedConfig(block_m=16, block_n=32, block_k=128)),
    (3, 1, 4, 64, 33, GroupedConfig(block_m=16, block_n=16, block_k=64)),
    # the products transposed (the weight tile the MMA's first operand): the same tiles (swap 1), loaded as
    # stored (2), and with the scales applied after each step's product (3; its step kept inside one group)
    (7, 3, 6, 130, 72, GroupedConfig(block_m=16, block_n=64, block_k=32, swap=1)),
    (5, 2, 12, 130, 72, GroupedConfig(block_m=16, block_n=32, block_k=128, swap=2)),
    (7, 3, 6, 130, 72, GroupedConfig(block_m=16, block_n=64, block_k=64, swap=3)),
    (1, 2, 8, 48, 40, GroupedConfig(block_m=16, block_n=32, block_k=128, swap=3)),
    # the weight tile interleaved back into input order, one tl.dot a step, as loaded (4) or transposed (5):
    # steps of 2 q4 groups, of half a group, and of one short row (D 48)
    (7, 3, 6, 130, 72, GroupedConfig(block_m=16, block_n=32, block_k=128, swap=4)),
    (5, 2, 12, 130, 72, GroupedConfig(block_m=32, block_n=16, block_k=32, swap=4)),
    (7, 3, 6, 130, 72, GroupedConfig(block_m=16, block_n=64, block_k=64, swap=5)),
    (1, 2, 8, 48, 40, GroupedConfig(block_m=16, block_n=32, block_k=128, swap=5)),
    # q4's codes to values without int->float conversions (dq 1) and in the compute dtype (dq 2; fp32 here)
    (7, 3, 6, 130, 72, GroupedConfig(block_m=16, block_n=32, block_k=128, swap=4, dq=1)),
    (5, 2, 12, 130, 72, GroupedConfig(block_m=32, block_n=16, block_k=32, swap=5, dq=1)),
    (7, 3, 6, 130, 72, GroupedConfig(block_m=16, block_n=64, block_k=64, swap=5, dq=2)),
    # the next step's scales loaded during this step (ps 1): steps of 2 groups, half a group, one short row
    (7, 3, 6, 130, 72, GroupedConfig(block_m=16, block_n=32, block_k=128, swap=4, ps=1)),
    (5, 2, 12, 130, 72, GroupedConfig(block_m=32, block_n=16, block_k=32, swap=5, ps=1)),
    (1, 2, 8, 48, 40, GroupedConfig(block_m=16, block_n=32, block_k=128, swap=5, ps=1)),
    (7, 3, 6, 130, 72, GroupedConfig(block_m=16, block_n=64, block_k=64, swap=5, dq=1, ps=1)),
    (7, 3, 6, 130, 72, GroupedConfig(block_m=16, block_n=64, block_k=32, ps=1)),
    (5, 2, 12, 130, 72, GroupedConfig(block_m=16, block_n=32, block_k=128, ps=1)),
    (1, 2, 8, 48, 40, GroupedConfig(block_m=16, block_n=32, block_k=128, swap=1, ps=1)),
]


@interp
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("T,K,E,D,F_,cfg", CASES)
def test_grouped_quant_matches_loop(fmt, T, K, E, D, F_, cfg):
    """Every format over scattered slots of a larger pool equals the dequantize-then-matmul loop in fp32."""
    S = 2 * E + 1
    W = _pool(fmt, S, F_, D)
    ids, w = _routing(T, K, E)
    slot_map = torch.randperm(S, generator=torch.Generator().manual_seed(3))[:E]
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(4))
    out = moe_grouped_quant(x, ids, w, W, slot_map, cfg)
    assert out.shape == (T, D) and out.dtype == x.dtype
    err = _rel(out, _reference(x, ids, w, W, slot_map))
    assert err < 1e-5, f"{fmt}: rel err {err:.2e}"


@interp
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("swap", [0, 1, 3, 4, 5])
def test_grouped_quant_clamped_swiglu_with_biases(fmt, swap):
    """gpt-oss's experts (bf16 biases beside quantized weights, the clamped activation) through the grouped kernels,
    straight and transposed, equal the dequantize-then-matmul loop with the same activation and biases; the clamp
    bites, a run without the biases differs, and waves give the one-wave result bit for bit."""
    from types import SimpleNamespace

    from tiered.model.moe import ClampedSwiGLU

    act = ClampedSwiGLU(alpha=1.702, limit=0.5)
    T, K, E, D, F_ = 7, 3, 6, 130, 72
    cfg = GroupedConfig(block_m=16, block_n=32, block_k=64, swap=swap)
    S = 2 * E + 1
    Wq = _pool(fmt, S, F_, D)
    g = torch.Generator().manual_seed(6)
    gb, ub, db = (torch.randn(S, n, generator=g).bfloat16().to(DEV) * 0.3 for n in (F_, F_, D))
    W = SimpleNamespace(gate=Wq.gate, up=Wq.up, down=Wq.down, gate_bias=gb, up_bias=ub, down_bias=db)
    ids, w = _routing(T, K, E)
    slot_map = torch.randperm(S, generator=torch.Generator().manual_seed(3))[:E]
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(4))
    want = torch.zeros(T, D, dtype=torch.float64)
    clamped = 0
    for t in range(T):
        for k in range(K):
            s_ = int(slot_map[ids[t, k]])
            gw, uw, dw = (m[s_].dequantize(torch.float32) for m in (W.gate, W.up, W.down))
            gx, ux = x[t] @ gw.T + gb[s_].float(), x[t] @ uw.T + ub[s_].float()
            clamped += int((gx > act.limit).sum() + (ux.abs() > act.limit).sum())
            want[t] += (w[t, k] * (act(gx, ux) @ dw.T + db[s_].float())).double()
    assert clamped > 0
    out = moe_grouped_quant(x, ids, w, W, slot_map, cfg, act=act)
    assert _rel(out, want) < 1e-5, (fmt, swap, _rel(out, want))
    assert _rel(moe_grouped_quant(x, ids, w, Wq, slot_map, cfg, act=act), want) > 1e-2  # the biases count
    run = QuantGroupedMoE(x, ids, w, E, fmt, cfg)
    for part in torch.randperm(E, generator=torch.Generator().manual_seed(7)).split(4):
        m = torch.full((E,), -1, dtype=torch.int64)
        m[part] = slot_map[part]
        run.wave(W, m, act)
    assert torch.equal(run.result(), out)
    bad = SimpleNamespace(gate=Wq.gate, up=Wq.up, down=Wq.down, gate_bias=gb, up_bias=ub, down_bias=None)
    with pytest.raises(ValueError, match="down_bias"):
        moe_grouped_quant(x, ids, w, bad, slot_map, cfg, act=act)


@interp
def test_grouped_quant_waves_equal_one_wave():
    """Experts computed in waves (slot maps that each place a subset) give the one-wave result bit for bit."""
    T, K, E, D, F_ = 6, 3, 8, 64, 40
    cfg = GroupedConfig(block_m=16, block_n=32, block_k=64)
    W = _pool("q4", E + 2, F_, D)
    ids, w = _routing(T, K, E)
    slot_map = torch.randperm(E + 2)[:E]
    x = torch.randn(T, D)
    one = moe_grouped_quant(x, ids, w, W, slot_map, cfg)
    run = QuantGroupedMoE(x, ids, w, E, "q4", cfg)
    for part in torch.randperm(E).split(3):
        m = torch.full((E,), -1, dtype=torch.int64)
        m[part] = slot_map[part]
        run.wave(W, m)
    assert torch.equal(run.result(), one)


@interp
@pytest.mark.parametrize("fmt", ["q4", "mxfp4"])
@pytest.mark.parametrize("swap,dq", [(0, 0), (3, 0), (4, 0), (4, 1), (5, 2)])
def test_grouped_quant_half_within_rounding(fmt, swap, dq):
    """16-bit activations: the dequantized tile is rounded to the compute dtype for tl.dot, within that
    rounding of the fp32 loop. fp16 here: the interpreter's tl.dot is wrong for bf16 (numpy has no bf16);
    the CUDA tests below run bf16. Swap 3 feeds q4's codes as 1024 + c (fp16's exponent or-ed in) and takes
    the offset out after the product, dq 2 dequantizes in fp16 after the same trick: several groups a row, so a
    wrong offset or scale per group shows."""
    T, K, E, D, F_ = 5, 2, 4, 130, 32
    W = _pool(fmt, E, F_, D)
    ids, w = _routing(T, K, E)
    x = torch.randn(T, D).half()
    out = moe_grouped_quant(x, ids, w, W, torch.arange(E),
                            GroupedConfig(block_m=16, block_n=32, block_k=64, swap=swap, dq=dq))
    assert out.dtype == torch.float16
    assert _rel(out.float(), _reference(x, ids, w, W, torch.arange(E))) < 2e-2


@interp
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("T,N,K,cfg", [(1, 40, 48, None), (17, 130, 130, GroupedConfig(block_m=16, block_n=64,
                                                                                         block_k=128)),
                                       (33, 24, 200, GroupedConfig(block_m=32, block_n=32, block_k=32)),
                                       (5, 40, 200, GroupedConfig(block_m=16, block_n=32, block_k=32, split=4)),
                                       (17, 130, 130, GroupedConfig(block_m=16, block_n=64, block_k=128, split=2)),
                                       (3, 24, 48, GroupedConfig(block_m=16, block_n=32, block_k=32, split=8)),
                                       (17, 130, 130, GroupedConfig(block_m=16, block_n=64, block_k=128, swap=4)),
                                       (33, 24, 200, GroupedConfig(block_m=32, block_n=32, block_k=32, split=2,
                                                                   swap=4)),
                                       (17, 130, 130, GroupedConfig(block_m=16, block_n=64, block_k=128, swap=5)),
                                       (33, 24, 200, GroupedConfig(block_m=32, block_n=16, block_k=32, split=2,
                                                                   swap=5, dq=1)),
                                       (17, 130, 130, GroupedConfig(block_m=16, block_n=64, block_k=128, swap=4,
                                                                   ps=1)),
                                       (33, 24, 200, GroupedConfig(block_m=32, block_n=16, block_k=32, split=4,
                                                                   swap=5, ps=1)),
                                       (5, 40, 200, GroupedConfig(block_m=16, block_n=32, block_k=32, split=4,
                                                                  ps=1))])
def test_quant_matmul_matches_reference(fmt, T, N, K, cfg):
    """The dense tiled GEMM (qlinear above its GEMV rows) equals x @ dequantize(w)^T in fp32: one row, odd
    rows, a q4 row of one group, groups cut short, steps over several groups, fp8 scale rows of 128 outputs;
    split-K: four splits with a short last one, two splits over several groups, more splits asked than steps;
    and the interleaved weight tile (swap 4), alone and split; the same tile first and the output stored transposed
    (swap 5), alone and split (with q4's codes or-ed into 2^23, dq 1); each with the next step's scales loaded a
    step ahead (ps 1), split into four (the last split's look-ahead reads past its own inputs)."""
    from tiered.kernels.quant_grouped import quant_matmul

    g = torch.Generator().manual_seed(N + K)
    w = quantize(torch.randn(N, K, generator=g) * K ** -0.5, fmt)
    x = torch.randn(T, K, generator=g)
    got = quant_matmul(x, w, cfg)
    assert got.shape == (T, N) and got.dtype == x.dtype
    assert _rel(got, x @ w.dequantize(torch.float32).T) < 1e-5


def test_dense_matmul_tiles_fill_the_grid():
    """quant_matmul's own tile choice: a tile no taller than the rows need, and two waves of programs where any tile
    gives them (the experts' per-expert choice gave o_proj, n 2048, at 128 rows 16 programs)."""
    from tiered.kernels.quant_grouped import MATMUL_MIN_PROGRAMS, _MATMUL_TILES, pick_matmul_config

    def programs(c, rows, n):
        return -(-n // c.block_n) * -(-rows // c.block_m)

    for fmt in ("q4", "q8", "fp8", "mxfp4"):
        for n in (2048, 5120, 151936):
            for rows in (1, 16, 17, 128, 300, 512, 2048, 8192):
                c = pick_matmul_config(rows, n, fmt)
                assert c.block_m <= max(16, 1 << (rows - 1).bit_length()) and c.block_k == 64
                best = max(-(-n // bn) * -(-rows // bm) for bm, bn, _, _ in _MATMUL_TILES
                           if bm <= max(16, 1 << (rows - 1).bit_length()))
                assert programs(c, rows, n) >= min(MATMUL_MIN_PROGRAMS, best), (fmt, n, rows, c)
    assert pick_matmul_config(128, 2048, "q4").block_m <= 32
    assert pick_matmul_config(2048, 151936, "q4") == pick_matmul_config(8192, 151936, "q4")


def test_dense_matmul_splits_narrow_matrices():
    """Given k, up to SPLIT_MAX_ROWS rows a narrow matrix (qkv, o_proj) splits its reduction until the grid has
    SPLIT_PROGRAMS programs or a split would keep fewer than SPLIT_MIN_INPUTS inputs, with a tile as tall as the rows;
    a wide one (the lm_head), a short k and more rows keep the unsplit rule."""
    from tiered.kernels.quant_grouped import (SPLIT_MAX_ROWS, SPLIT_MIN_INPUTS, SPLIT_PROGRAMS,
                                              pick_matmul_config)

    for n, k in ((5120, 2048), (2048, 4096)):
        for rows in (2, 8, 16, 33, 64, 128, 256):
            c = pick_matmul_config(rows, n, "q4", k)
            programs = -(-n // c.block_n) * -(-rows // c.block_m)
            assert c.split > 1 and c.block_m == min(128, max(16, 1 << (rows - 1).bit_length())), (n, rows, c)
            assert k // c.split >= SPLIT_MIN_INPUTS
            assert programs * c.split >= SPLIT_PROGRAMS or k // (2 * c.split) < SPLIT_MIN_INPUTS, (n, rows, c)
            assert programs * c.split // 2 < SPLIT_PROGRAMS, (n, rows, c)  # the fewest splits that do
    assert pick_matmul_config(8, 2048, "q4", 4096).split == 8 and pick_matmul_config(128, 5120, "q4", 2048).split == 4
    for rows in (8, 256):
        assert pick_matmul_config(rows, 151936, "q4", 2048) == pick_matmul_config(rows, 151936, "q4")
    assert pick_matmul_config(64, 2048, "q4", 512) == pick_matmul_config(64, 2048, "q4")  # k too short to split
    assert pick_matmul_config(SPLIT_MAX_ROWS + 1, 2048, "q4", 4096).split == 1


def test_expert_tiles_by_rows(monkeypatch):
    """pick_qconfig: at <= 16 rows an expert q4 steps over two groups (128 inputs), the other formats keep their
    capped step; more rows keep one q4 group a step with the interleaved weight tile (swap 4), and from 64 rows q4
    and mxfp4 take 64-column tiles on 4 warps, interleaved and first (swap 5); TIERED_QGROUPED_FEW replaces the
    few-row tiles only, and a malformed spec names itself. The swap-5 tiles load the next step's scales during this
    one (ps 1), the others do not, and TIERED_QGROUPED_PS sets it for every pick."""
    from tiered.kernels.quant_grouped import DQ_ENV, FEW_ENV, INTERLEAVE_ENV, PS_ENV, pick_qconfig

    monkeypatch.delenv(FEW_ENV, raising=False)
    monkeypatch.delenv(DQ_ENV, raising=False)
    monkeypatch.delenv(INTERLEAVE_ENV, raising=False)
    few = pick_qconfig(1024, 128, "q4")
    assert (few.block_m, few.block_k, few.stages, few.swap) == (16, 128, 3, 0)
    assert pick_qconfig(1024, 128, "mxfp4").block_k == 64 and pick_qconfig(1024, 128, "q8").block_k == 128
    mid = pick_qconfig(8000, 128, "q4")  # 62.5 rows an expert
    assert (mid.block_m, mid.block_k, mid.swap) == (64, 64, 4) and pick_qconfig(4096, 128, "mxfp4").swap == 0
    for fmt in ("q4", "mxfp4"):  # 64 rows an expert: the many-rows tile already
        mx64 = pick_qconfig(8192, 128, fmt)
        assert (mx64.block_m, mx64.swap) == (128, 5) and pick_qconfig(8000, 128, fmt).block_m == 64
    for fmt, swap in (("q4", 5), ("mxfp4", 5)):  # > 96 rows an expert: the narrower tile on 4 warps; q8 keeps bf16's
        many = pick_qconfig(16384, 128, fmt)
        assert (many.block_m, many.block_n, many.block_k, many.warps, many.stages, many.swap) == (128, 64, 64, 4, 4,
                                                                                                  swap)
    assert (pick_qconfig(16384, 128, "q8").block_n, pick_qconfig(16384, 128, "q8").warps) == (128, 8)
    monkeypatch.setenv(DQ_ENV, "2")  # the benchmarks' choice of how codes become values
    assert pick_qconfig(8192, 128, "q4").dq == 2 and pick_qconfig(16384, 128, "mxfp4").dq == 0
    monkeypatch.setenv(DQ_ENV, "3")
    with pytest.raises(ValueError, match=DQ_ENV):
        pick_qconfig(8192, 128, "q4")
    monkeypatch.delenv(DQ_ENV)
    monkeypatch.delenv(PS_ENV, raising=False)  # the swap-5 tiles load the next step's scales a step ahead
    assert [pick_qconfig(r, 128, f).ps for r, f in ((8192, "q4"), (16384, "q4"), (8192, "mxfp4"))] == [1, 1, 1]
    assert [pick_qconfig(r, 128, f).ps for r, f in ((8000, "q4"), (1024, "q4"), (16384, "q8"))] == [0, 0, 0]
    monkeypatch.setenv(PS_ENV, "0")
    assert pick_qconfig(16384, 128, "q4").ps == 0 and pick_qconfig(8192, 128, "mxfp4").ps == 0
    monkeypatch.setenv(PS_ENV, "1")
    assert [pick_qconfig(r, 128, f).ps for r, f in ((8000, "q4"), (1024, "q4"), (16384, "q8"))] == [1, 1, 1]
    monkeypatch.setenv(PS_ENV, "2")
    with pytest.raises(ValueError, match=PS_ENV):
        pick_qconfig(8192, 128, "q4")
    monkeypatch.delenv(PS_ENV)
    monkeypatch.setenv(INTERLEAVE_ENV, "0")  # the benchmarks' way back to the split tiles
    assert all(pick_qconfig(r, 128, f).swap == 0 for r in (8192, 16384) for f in ("q4", "mxfp4"))
    monkeypatch.delenv(INTERLEAVE_ENV)
    monkeypatch.setenv(FEW_ENV, "m32:n128:w8:swap3")
    c = pick_qconfig(1024, 128, "q4")
    assert (c.block_m, c.block_n, c.warps, c.swap) == (32, 128, 8, 3) and pick_qconfig(8000, 128, "q4").swap == 4
    monkeypatch.setenv(FEW_ENV, "m16:z4")
    with pytest.raises(ValueError, match="z4"):
        pick_qconfig(1024, 128, "q4")


def test_scales_ahead_needs_a_step_that_takes_them():
    """GroupedConfig.ps loads the next step's scales for swaps 0, 1, 4 and 5; 2 and 3 apply theirs otherwise, so
    ps with them is refused, naming both."""
    for sw in (0, 1, 4, 5):
        assert GroupedConfig(swap=sw, ps=1).ps == 1
    for sw in (2, 3):
        with pytest.raises(ValueError, match=f"ps 1 with swap {sw}"):
            GroupedConfig(swap=sw, ps=1)


def test_block_k_rules():
    """A step lies inside one group, spans whole groups, or the row is one group; nibble formats step >= 32."""
    W = _pool("q4", 1, 8, 130, device="cpu")
    assert block_k_for(W.gate, 32) == (32, 1) and block_k_for(W.gate, 128) == (128, 2)
    assert block_k_for(W.down, 16) == (32, 1)  # F 8 < 64: one group per row
    M = _pool("mxfp4", 1, 8, 130, device="cpu")
    assert block_k_for(M.gate, 128) == (128, 4)
    Q = _pool("q8", 1, 8, 300, device="cpu")
    assert block_k_for(Q.gate, 16) == (16, 1) and block_k_for(Q.gate, 256) == (256, 2)


def test_qgrouped_ok_off_cuda():
    """Off CUDA the runtime never takes these kernels (the torch loop is the CPU path); a bf16 pool is not
    theirs either; quant_matmul serves single matrices only."""
    from tiered.kernels.quant_grouped import qmatmul_ok

    W = _pool("q4", 2, 8, 16, device="cpu")
    assert not qgrouped_ok(W) and qgrouped_ok(W, interpret=True)
    x = torch.randn(20, 16)
    assert not qmatmul_ok(x, W.gate[0]) and qmatmul_ok(x, W.gate[0], interpret=True)
    assert not qmatmul_ok(x, W.gate, interpret=True)
    specs, bs = plan_block({"gate": ((8, 16), "bfloat16"), "up": ((8, 16), "bfloat16"), "down": ((16, 8), "bfloat16")})
    assert not qgrouped_ok(expert_views(torch.zeros(2, bs, dtype=torch.uint8), specs), interpret=True)


class _WaveProvider:
    """A provider over a pool whose experts sit in scattered slots, serving waves of at most n experts."""

    def __init__(self, W, slot_of, n):
        self.weights, self.slot_of, self.max_experts_per_call, self.calls = W, slot_of, n, []

    def get(self, layer, ids):
        self.calls.append(ids.tolist())
        return self.slot_of[ids]

    def prefetch(self, layer, ids):
        pass


class _WholeProvider(_WaveProvider):
    def slot_map(self, layer):
        return self.slot_of


@interp
@pytest.mark.parametrize("fmt", ["q4", "q8"])
@pytest.mark.parametrize("T,n,whole", [(3, 100, False), (11, 2, False), (11, 100, True)])
def test_model_tokens_path_quantized(fmt, T, n, whole):
    """moe_gpu.experts_tokens over a quantized pool (the GEMV kernels up to DECODE_MAX_T tokens, the grouped
    kernels in waves of n experts above, or the provider's slot_map) equals moe.experts_grouped, the torch
    dequantize-per-expert path that the CPU keeps."""
    from tiered.model import moe, moe_gpu

    K, E, D, F_ = 3, 7, 40, 24
    W = _pool(fmt, 2 * E, F_, D)
    slot_of = torch.randperm(2 * E)[:E]
    ids, w = _routing(T, K, E)
    x = torch.randn(T, D)
    ref = moe.experts_grouped(x, ids, w, _WaveProvider(W, slot_of, n), 0)
    p = (_WholeProvider if whole else _WaveProvider)(W, slot_of, n)
    out = moe_gpu.experts_tokens(x, ids, w, p, 0, E)
    assert _rel(out, ref) < 1e-5
    asked = sorted(e for call in p.calls for e in call)
    assert asked == ([] if whole else sorted(set(ids.flatten().tolist())))


@interp
def test_expert_mix_routes_quantized_tokens_to_the_kernels(monkeypatch):
    """expert_mix(kernels=True) sends several tokens over a quantized pool to the grouped kernels when they
    serve the pool (here: the interpreter stands in for CUDA), and to the torch loop when they do not."""
    from tiered.kernels import quant_grouped
    from tiered.model import moe, moe_gpu

    K, E, D, F_, T = 2, 6, 64, 24, 11
    W = _pool("q4", E, F_, D)
    p = _WholeProvider(W, torch.arange(E), 100)
    ids, w = _routing(T, K, E)
    x = torch.randn(T, D)
    mw = moe.MoEWeights(router=torch.zeros(E, D))
    waves = []
    real_wave = quant_grouped.QuantGroupedMoE.wave
    monkeypatch.setattr(quant_grouped.QuantGroupedMoE, "wave", lambda self, *a: (waves.append(1), real_wave(self, *a)))
    ref = moe.experts_grouped(x, ids, w, p, 0)
    assert _rel(moe.expert_mix(x, ids, w, mw, p, 0, kernels=True, fp32_weights=True), ref) < 1e-12 and not waves
    monkeypatch.setattr(moe_gpu, "quant_kernels_ok", lambda W: qgrouped_ok(W, interpret=True))
    assert _rel(moe.expert_mix(x, ids, w, mw, p, 0, kernels=True, fp32_weights=True), ref) < 1e-5 and waves


def test_kernels_compile_for_sm90():
    """The real compiler (not the interpreter) accepts both kernels in every format, down to a cubin for sm_90,
    with no GPU: tools/compile_quant_grouped.py in a subprocess without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO)
    r = subprocess.run([sys.executable, str(REPO / "tools" / "compile_quant_grouped.py"), "--quick"], env=env,
                       capture_output=True, text=True, timeout=300)
    if r.returncode == 3:
        pytest.skip(r.stdout.strip().splitlines()[-1])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    # a line a format and tile (swap 0, 3, 5 with the scales a step ahead, 0 with them): gate/up, down, dense
    assert r.stdout.count(" ok ") == 4 * len(FORMATS)


# --- CUDA, bf16, the 10.6B expert shape ---

@pytest.mark.cuda
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("T", [9, 128, 513])
@pytest.mark.parametrize("swap", [None, 2, 3, 4, 5, "5dq1", "4dq2", "4ps1", "5ps1", "0ps1", "1ps1"])
def test_cuda_grouped_quant_10b_shape(fmt, T, swap):
    """D 2048, F 768, E 128, K 8 in bf16 with the picked tiles (swap None) or the transposed products at 16 rows
    a block (swap 3: bf16's exponent or-ed into q4's codes, scales after the product; ps 1: the next step's scales
    loaded a step ahead): within bf16 rounding of the fp32 loop."""
    D, F_, E, K = 2048, 768, 128, 8
    sw, dq, ps = (swap, 0, 0) if not isinstance(swap, str) else (int(swap[0]), int(swap[-1]) * ("dq" in swap),
                                                                 int("ps" in swap))
    cfg = None if swap is None else GroupedConfig(block_m=16, block_n=128, block_k=64, warps=8, stages=4, swap=sw,
                                                  dq=dq, ps=ps)
    W = _pool(fmt, E + 3, F_, D)
    ids, w = _routing(T, K, E)
    ids, w = ids.to(DEV), w.to(DEV)
    slot_map = torch.randperm(E + 3, device=DEV)[:E]
    x = torch.randn(T, D, device=DEV, dtype=torch.bfloat16)
    out = moe_grouped_quant(x, ids, w, W, slot_map, cfg)
    assert _rel(out.float(), _reference(x, ids, w, W, slot_map)) <= 1e-2


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["bf16", "mxfp4", "q4", "q8"])
@pytest.mark.parametrize("T", [16, 300, 600])
def test_cuda_grouped_gpt_oss_shape(fmt, T):
    """gpt-oss-20b's experts (D = F = 2880, top-4 of 32) in the grouped kernels with bf16 biases and the clamped
    SwiGLU, bf16 activations, the picked tiles: within bf16 rounding of the fp32 loop (bf16 pools: moe_grouped).
    T 600 is 75 rows an expert, where q4 and mxfp4 take the many-rows tile (swap 5, m128, the scales a step ahead)."""
    from types import SimpleNamespace

    from tiered.kernels.moe_grouped import moe_grouped
    from tiered.model.moe import ClampedSwiGLU

    D = F_ = 2880
    E, K = 32, 4
    act = ClampedSwiGLU()
    g = torch.Generator().manual_seed(8)
    gb, ub, db = (torch.randn(E + 3, n, generator=g).bfloat16().to(DEV) * 0.3 for n in (F_, F_, D))
    if fmt == "bf16":
        Wq = SimpleNamespace(**{n: (torch.randn(E + 3, *shape, generator=g) * D ** -0.5 * 2).bfloat16().to(DEV)
                                for n, shape in (("gate", (F_, D)), ("up", (F_, D)), ("down", (D, F_)))})
        mats = lambda s: (Wq.gate[s].float(), Wq.up[s].float(), Wq.down[s].float())  # noqa: E731
    else:
        Wq = _pool(fmt, E + 3, F_, D)
        mats = lambda s: tuple(m[s].dequantize(torch.float32) for m in (Wq.gate, Wq.up, Wq.down))  # noqa: E731
    W = SimpleNamespace(gate=Wq.gate, up=Wq.up, down=Wq.down, gate_bias=gb, up_bias=ub, down_bias=db)
    ids, w = _routing(T, K, E)
    ids, w = ids.to(DEV), w.to(DEV)
    slot_map = torch.randperm(E + 3, device=DEV)[:E]
    x = torch.randn(T, D, device=DEV, dtype=torch.bfloat16)
    if fmt == "bf16":
        out = moe_grouped(x, ids, w.bfloat16(), W, slot_map, act=act)
    else:
        out = moe_grouped_quant(x, ids, w.bfloat16(), W, slot_map, act=act)
    want = torch.zeros(T, D, dtype=torch.float64, device=DEV)
    xf = x.float()
    for e in ids.unique().tolist():
        t, k = (ids == e).nonzero(as_tuple=True)
        s_ = int(slot_map[e])
        gw, uw, dw = mats(s_)
        y = act(xf[t] @ gw.T + gb[s_].float(), xf[t] @ uw.T + ub[s_].float()) @ dw.T + db[s_].float()
        want.index_add_(0, t, (y * w[t, k].float()[:, None]).double())
    assert _rel(out.float(), want) <= 1e-2, _rel(out.float(), want)


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("N,K", [(5120, 2048), (2048, 4096), (151936, 2048), (100, 70)])
def test_cuda_qlinear_prefill_rows(fmt, N, K):
    """qlinear above its GEMV rows (17, 128 and 300 rows: quant_matmul, and for q4 and q8 the dense copy through
    cuBLAS from DEQUANT_ROWS_ONE rows where it is one slice, from DEQUANT_ROWS for the lm_head, with the knob both
    ways) is within bf16 rounding of the fp32 reference at the 10.6B dense shapes (qkv, o_proj, lm_head: sliced) and
    an odd one."""
    import os

    from tiered.kernels.quant_moe import DEQUANT_ROWS_ENV, qlinear

    w = quantize(torch.randn(N, K, device=DEV) * K ** -0.5, fmt)
    for T, knob in ((17, ""), (128, ""), (300, ""), (300, "0"), (17, "1"), (300, "256")):
        x = torch.randn(T, K, device=DEV, dtype=torch.bfloat16)
        os.environ[DEQUANT_ROWS_ENV] = knob
        try:
            got = qlinear(x, w)
        finally:
            os.environ.pop(DEQUANT_ROWS_ENV)
        assert _rel(got.float(), x.float() @ w.dequantize(torch.float32).T) <= 1e-2, (T, knob)


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("N,K", [(5120, 2048), (2048, 4096), (100, 70)])
def test_cuda_quant_matmul_split_k(fmt, N, K):
    """quant_matmul with its reduction split over 2-8 programs (the fp32 partials added in order by a second
    launch) is within bf16 rounding of the fp32 reference, equals itself run to run, and its own tile choice (which
    may split) too; at 16-128 rows of the 10.6B qkv and o_proj and an odd shape."""
    from tiered.kernels.moe_grouped import GroupedConfig
    from tiered.kernels.quant_grouped import quant_matmul

    w = quantize(torch.randn(N, K, device=DEV) * K ** -0.5, fmt)
    for T in (16, 33, 128):
        x = torch.randn(T, K, device=DEV, dtype=torch.bfloat16)
        ref = x.float() @ w.dequantize(torch.float32).T
        for cfg in (None, GroupedConfig(16, 32, 64, 2, 4, split=2), GroupedConfig(32, 64, 64, 4, 4, split=8),
                    GroupedConfig(128, 64, 64, 4, 3, split=4)):
            got = quant_matmul(x, w, cfg)
            assert _rel(got.float(), ref) <= 1e-2, (T, cfg)
            assert torch.equal(got, quant_matmul(x, w, cfg)), (T, cfg)


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("N,K", [(5120, 2048), (2048, 4096), (100, 70)])
def test_cuda_quant_matmul_interleaved(fmt, N, K):
    """quant_matmul's interleaved weight tile at prefill rows (300, 700), as loaded (swap 4) and as the MMA's first
    operand with the output stored transposed (swap 5, alone and split over 2 programs): within bf16 rounding of the
    fp32 reference, at the 10.6B qkv and o_proj and an odd shape; and its own tile choice at those rows."""
    from tiered.kernels.moe_grouped import GroupedConfig
    from tiered.kernels.quant_grouped import quant_matmul

    w = quantize(torch.randn(N, K, device=DEV) * K ** -0.5, fmt)
    for T in (300, 700):
        x = torch.randn(T, K, device=DEV, dtype=torch.bfloat16)
        ref = x.float() @ w.dequantize(torch.float32).T
        for cfg in (None, GroupedConfig(128, 64, 64, 4, 3, swap=4), GroupedConfig(128, 64, 64, 4, 4, swap=5),
                    GroupedConfig(128, 128, 64, 8, 3, swap=5), GroupedConfig(256, 64, 64, 8, 3, swap=5),
                    GroupedConfig(64, 128, 64, 4, 3, split=2, swap=5), GroupedConfig(128, 64, 64, 4, 4, swap=5, ps=1),
                    GroupedConfig(128, 64, 64, 4, 3, swap=4, ps=1), GroupedConfig(64, 64, 64, 4, 4, split=2, ps=1)):
            assert _rel(quant_matmul(x, w, cfg).float(), ref) <= 1e-2, (T, cfg)


@pytest.mark.cuda
def test_cuda_grouped_quant_graph_capturable():
    """A resident layer's grouped quantized call is captured in a CUDA graph and replays with new inputs."""
    D, F_, E, K, T = 2048, 768, 16, 4, 64
    W = _pool("q4", E, F_, D)
    ids, w = _routing(T, K, E)
    ids, w = ids.to(DEV), w.to(DEV)
    x = torch.randn(T, D, device=DEV, dtype=torch.bfloat16)
    sm = torch.arange(E, device=DEV)
    moe_grouped_quant(x, ids, w, W, sm)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = moe_grouped_quant(x, ids, w, W, sm)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    assert _rel(out.float(), _reference(x, ids, w, W, sm)) <= 1e-2


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["q4", "mxfp4"])
def test_cuda_engine_prefill_takes_the_grouped_kernels(reference_model, tmp_path, monkeypatch, fmt):
    """A quantized layout on CUDA (fp32): a prompt of more than DECODE_MAX_T tokens is prefilled through the
    grouped dequantizing kernels, and the greedy tokens equal those of the torch dequantize-per-expert path."""
    import tiered
    from tiered.kernels import quant_grouped, quant_moe
    from tiered.layout.repack import repack
    from tiered.model import moe_gpu

    lay = tmp_path / fmt
    repack(reference_model, lay, experts=fmt, progress=False)
    prompt = "import os\nimport sys\n\n\ndef main(argv):\n    return 0\n"
    waves = []
    real_wave = quant_grouped.QuantGroupedMoE.wave
    monkeypatch.setattr(quant_grouped.QuantGroupedMoE, "wave", lambda self, *a: (waves.append(1), real_wave(self, *a)))
    k = tiered.load(lay, device="cuda", dtype="float32", max_context=200)
    a = k.generate(prompt, max_new_tokens=24, stop_at_eos=False)
    assert waves, "prefill did not reach the grouped quantized kernels"
    monkeypatch.setattr(moe_gpu, "quant_kernels_ok", lambda W: False)  # several tokens: the torch loop
    monkeypatch.setattr(quant_moe, "kernel_ok", lambda *args, **kw: False)  # one token: the reference
    ref = tiered.load(lay, device="cuda", dtype="float32", max_context=200, cuda_graphs=False)
    n = len(waves)
    b = ref.generate(prompt, max_new_tokens=24, stop_at_eos=False)
    assert len(waves) == n and a.token_ids == b.token_ids
