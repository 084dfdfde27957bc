"""The fused q4 MoE kernels (tiered/kernels/quant_moe_fused.py) against the plain loop over experts and against the
two-kernel path, on CPU through Triton's interpreter (tiny shapes) and on CUDA (marked `cuda`) at the 10.6B expert
shape, inside a CUDA graph."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from tests.test_quant_kernels import DEV, INTERP, _experts_ref, _pool, rel  # noqa: E402
from tiered.kernels.quant_moe import experts_quant_decode  # noqa: E402
from tiered.kernels.quant_moe_fused import (FusedConfig, experts_quant_step, fused_ok, pick_fused,  # noqa: E402
                                            quant_moe_fused)


def _case(S, F, D, T, K, seed=1):
    W = _pool("q4", S, F, D, seed=seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g).to(DEV)
    slots = torch.stack([torch.randperm(S, generator=g)[:K] for _ in range(T)]).to(DEV)
    wts = torch.rand(T, K, generator=g).to(DEV)
    return W, x, slots, wts


@pytest.mark.parametrize("F,D,T,cfg", [
    (64, 64, 1, FusedConfig(bf=64, bn=8, bg=1, bd=16, warps=1, br=32)),  # one slice of one whole group a program
    (128, 64, 2, FusedConfig(bf=32, bn=8, bg=1, bd=32, warps=2, br=16)),  # half a down group a program, 2 tokens
    (256, 128, 1, FusedConfig(bf=128, bn=16, bg=2, bd=64, warps=2, br=64)),  # two down groups a program
    (64, 96, 1, FusedConfig(bf=8, bn=8, bg=1, bd=64, warps=1, br=128)),  # 8 inputs a slice; D not a power of two
])
def test_fused_matches_the_loop_over_experts(F, D, T, cfg):
    """quant_moe_fused over a block pool with K = 3 scattered slots a token equals the plain loop (dequantize each
    expert, SwiGLU, weight, sum) within fp32 rounding, and the two-kernel path to the same tolerance: slices of a
    whole down group, half of one, two; several output steps (bd < D), D not a multiple of bd or of br."""
    W, x, slots, wts = _case(5, F, D, T, 3)
    assert fused_ok(x, W.gate, W.up, W.down, cfg, interpret=INTERP)
    want = _experts_ref(x, slots, wts, W)
    got = quant_moe_fused(x, slots, wts, W.gate, W.up, W.down, torch.float32, cfg)
    assert got.shape == (T, D) and got.dtype == torch.float32
    assert rel(got, want) < 1e-5, cfg
    if T == 1:
        two = experts_quant_decode(x, slots[0], wts, W.gate, W.up, W.down, interpret=INTERP)
        assert rel(got, two.double()) < 1e-5


def test_slot_base_weight_rounding_and_bf16_output():
    """slot_base is added in the kernel and fp32 routing weights are rounded to bf16 there: the same result as the
    slots shifted and the weights cast by torch before the call; the output is bf16 (one rounding)."""
    W, _, _, _ = _case(9, 64, 128, 1, 3, seed=3)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 128, generator=g).bfloat16().to(DEV)
    ids = torch.randperm(4, generator=g)[:3].to(DEV)
    wts = torch.softmax(torch.randn(1, 3, generator=g), -1).to(DEV)
    assert not torch.equal(wts, wts.bfloat16().float())
    cfg = FusedConfig(bf=32, bn=8, bg=1, bd=64, warps=2, br=64)
    want = quant_moe_fused(x, (ids + 5)[None], wts.bfloat16(), W.gate, W.up, W.down, torch.bfloat16, cfg)
    got = quant_moe_fused(x, ids[None], wts, W.gate, W.up, W.down, torch.bfloat16, cfg, slot_base=5,
                          round_to=torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    unrounded = quant_moe_fused(x, ids[None], wts, W.gate, W.up, W.down, torch.bfloat16, cfg, slot_base=5)
    assert not torch.equal(unrounded, want)  # the rounding is what made them equal
    ref = _experts_ref(x, (ids + 5)[None], wts.bfloat16(), W)
    assert rel(got.float(), ref) < 1e-2


def test_step_dispatch_and_what_it_refuses(monkeypatch):
    """experts_quant_step takes the fused kernels for q4 where they serve and the two-kernel path otherwise (q8,
    TIERED_QMOE_FUSED=0, fused=False): all equal the loop. fused_ok refuses a slice that does not divide F or
    that cuts a down group unevenly."""
    W, x, slots, wts = _case(5, 96, 64, 1, 3)
    want = _experts_ref(x, slots, wts, W)
    cfg = FusedConfig(bf=32, bn=8, bg=1, bd=32, warps=1, br=64)
    assert fused_ok(x, W.gate, W.up, W.down, cfg, interpret=INTERP)
    assert not fused_ok(x, W.gate, W.up, W.down, FusedConfig(bf=64, bn=8), interpret=INTERP)  # 96 % 64
    assert 96 % pick_fused(64, 96).bf == 0 and pick_fused(64, 24).bf == 8  # shrunk to divide F where needed
    fused = experts_quant_step(x, slots[0], wts, W.gate, W.up, W.down, interpret=INTERP, config=cfg)
    assert rel(fused, want) < 1e-5
    monkeypatch.setenv("TIERED_QMOE_FUSED", "0")
    two = experts_quant_step(x, slots[0], wts, W.gate, W.up, W.down, interpret=INTERP, config=cfg)
    assert rel(two, want) < 1e-5 and not torch.equal(two, fused)  # another summation order: another kernel ran
    W8 = _pool("q8", 5, 96, 64)
    monkeypatch.delenv("TIERED_QMOE_FUSED")
    assert not fused_ok(x, W8.gate, W8.up, W8.down, cfg, interpret=INTERP)
    got8 = experts_quant_step(x, slots[0], wts, W8.gate, W8.up, W8.down, interpret=INTERP, config=cfg)
    assert rel(got8, _experts_ref(x, slots, wts, W8)) < 1e-5


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_at_the_10b_shape_in_a_graph():
    """The 10.6B expert shape (D 2048, F 768, K 8 of 128) with the picked config: the loop's answer within fp32
    rounding, deterministic across replays of a CUDA graph (fixed summation order), and the graph follows new slots
    written into its static buffer."""
    W, x, slots, wts = _case(128, 768, 2048, 1, 8)
    cfg = pick_fused(2048, 768)
    assert fused_ok(x, W.gate, W.up, W.down, cfg)
    want = _experts_ref(x, slots, wts, W)
    y = quant_moe_fused(x, slots, wts, W.gate, W.up, W.down, torch.float32, cfg)
    assert rel(y, want) < 1e-5
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = quant_moe_fused(x, slots, wts, W.gate, W.up, W.down, torch.float32, cfg)
    g.replay()
    first = out.clone()
    g.replay()
    assert torch.equal(out, first) and torch.equal(out, y)
    slots.copy_(torch.randperm(128, device=DEV)[:8][None])
    g.replay()
    assert rel(out, _experts_ref(x, slots, wts, W)) < 1e-5
