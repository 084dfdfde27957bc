"""The fused dequantizing kernels (tiered/kernels/quant_moe.py) against the reference dequantize-then-matmul.

On CPU through Triton's interpreter (TRITON_INTERPRET=1, set before the first launch: the kernel is
decorated lazily), tiny and odd shapes, stacks viewed over a block pool as the layout stores them; on CUDA
(marked `cuda`) at the 10.6B expert shape.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from tiered.layout.format import plan_block  # noqa: E402
from tiered.kernels.quant_moe import (FUSED_FORMATS, experts_quant_decode, quant_matvec,  # noqa: E402
                                      quant_matvec_ref, qlinear)
from tiered.layout.quant import quantize  # noqa: E402
from tiered.store.disk import expert_views  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
INTERP = DEV == "cpu"


def _pool(fmt: str, S: int, F: int, D: int, seed: int = 0):
    """ExpertWeights over a uint8 [S, block] pool in `fmt` (the layout's block placement), and the dense
    weights they were quantized from."""
    specs, bs = plan_block({"gate": ((F, D), fmt), "up": ((F, D), fmt), "down": ((D, F), fmt)})
    pool = torch.zeros(S, bs, dtype=torch.uint8)
    W = expert_views(pool, specs)
    g = torch.Generator().manual_seed(seed)
    for w in (W.gate, W.up, W.down):
        q = quantize(torch.randn(w.shape, generator=g) * w.matrix[1] ** -0.5, fmt)
        for name, t in q.parts().items():
            w.parts()[name].copy_(t)
    return expert_views(pool.to(DEV), specs)


@pytest.mark.parametrize("fmt", sorted(FUSED_FORMATS))
@pytest.mark.parametrize("N,K,T", [(1, 1, 1), (5, 33, 3), (40, 96, 1), (33, 200, 4), (7, 64, 2)])
def test_matvec_matches_reference(fmt, N, K, T):
    """quant_matvec over a stack with scattered slots (and over one matrix) equals each row times its
    dequantized matrix, within fp32 accumulation-order error."""
    g = torch.Generator().manual_seed(N * K)
    qw = quantize(torch.randn(3, N, K, generator=g) * 0.1, fmt).to_device(DEV)
    x = torch.randn(T, K, generator=g).to(DEV)
    slots = torch.tensor([2, 0, 1, 2][:T], device=DEV)
    torch.testing.assert_close(quant_matvec(x, qw, slots), quant_matvec_ref(x, qw, slots), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(quant_matvec(x, qw[1]), quant_matvec_ref(x, qw[1]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", sorted(FUSED_FORMATS))
@pytest.mark.parametrize("F,D", [(24, 32), (32, 256), (65, 48)])
def test_experts_decode_matches_reference_loop(fmt, F, D):
    """One token's K experts read in place from a block pool (strided part views) equal the plain loop over
    experts: dequantize each, SwiGLU, weight, sum."""
    W = _pool(fmt, 6, F, D)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, D, generator=g).to(DEV)
    slots = torch.tensor([4, 1, 5], device=DEV)
    wts = torch.rand(1, 3, generator=g).to(DEV)
    got = experts_quant_decode(x, slots, wts, W.gate, W.up, W.down, interpret=INTERP)
    want = torch.zeros(1, D, device=DEV)
    for k, s in enumerate(slots.tolist()):
        gw, uw, dw = (w[s].dequantize(torch.float32) for w in (W.gate, W.up, W.down))
        want += wts[0, k] * (torch.nn.functional.silu(x @ gw.T) * (x @ uw.T)) @ dw.T
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_reference_path_off_cuda():
    """Without CUDA (and without the test-only interpreter flag) qlinear and the expert path take the
    reference: qlinear equals dequantize-then-F.linear exactly, and the expert path declines."""
    qw = quantize(torch.randn(9, 40), "q4")
    x = torch.randn(2, 40)
    if DEV == "cpu":
        assert torch.equal(qlinear(x, qw), x @ qw.dequantize(torch.float32).T)
        W = _pool("q4", 2, 8, 16)
        assert experts_quant_decode(torch.randn(1, 16), torch.tensor([1]), torch.ones(1, 1), W.gate, W.up,
                                    W.down) is None


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", sorted(FUSED_FORMATS))
def test_cuda_10b_shape_bf16(fmt):
    """At the 10.6B expert shape (D 2048, F 768) in bf16 the fused path stays within bf16 rounding of the
    reference (relative error <= 1e-2)."""
    W = _pool(fmt, 8, 768, 2048)
    x = torch.randn(1, 2048, device=DEV, dtype=torch.bfloat16)
    slots = torch.tensor([7, 2, 0, 5], device=DEV)
    wts = torch.rand(1, 4, device=DEV)
    got = experts_quant_decode(x, slots, wts, W.gate, W.up, W.down).float()
    want = torch.zeros(1, 2048, device=DEV)
    for k, s in enumerate(slots.tolist()):
        gw, uw, dw = (w[s].dequantize(torch.float32) for w in (W.gate, W.up, W.down))
        xf = x.float()
        want += wts[0, k] * (torch.nn.functional.silu(xf @ gw.T) * (xf @ uw.T)) @ dw.T
    assert ((got - want).norm() / want.norm()).item() <= 1e-2
