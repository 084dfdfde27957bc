"""The grouped-GEMM decode kernel against a plain loop over experts."""
from __future__ import annotations

import pytest
import torch

from tiered.layout.format import plan_block
from tiered.kernels.grouped import experts_decode_grouped
from tiered.store.disk import expert_views

needs_gmm = pytest.mark.skipif(getattr(torch.nn.functional, "grouped_mm", None) is None
                               and getattr(torch, "_grouped_mm", None) is None, reason="torch has no grouped_mm")


def _pool(S, F, D, dtype, device="cpu"):
    name = str(dtype).removeprefix("torch.")
    specs, bs = plan_block({"gate": ((F, D), name), "up": ((F, D), name), "down": ((D, F), name)})
    pool = torch.zeros(S, bs, dtype=torch.uint8, device=device)
    W = expert_views(pool, specs)
    g = torch.Generator().manual_seed(0)
    for t in (W.gate, W.up, W.down):
        t.copy_((torch.randn(t.shape, generator=g) * 0.1).to(dtype))
    return W


def _loop(x, slots, w, W):
    out = torch.zeros(1, x.shape[1], dtype=torch.float64)
    for k, s in enumerate(slots.tolist()):
        h = torch.nn.functional.silu(x.double() @ W.gate[s].double().T) * (x.double() @ W.up[s].double().T)
        out += w[0, k].double() * (h @ W.down[s].double().T)
    return out


@needs_gmm
@pytest.mark.parametrize("K,S", [(1, 4), (3, 10), (8, 64)])
def test_grouped_decode_matches_loop(K, S):
    """experts_decode_grouped equals a loop over the K experts (fp32, any slot order)."""
    D, F = 64, 32
    W = _pool(S, F, D, torch.float32)
    x = torch.randn(1, D)
    slots = torch.randperm(S)[:K]
    w = torch.softmax(torch.randn(1, K), -1)
    out = experts_decode_grouped(x, slots, w, W.gate, W.up, W.down)
    ref = _loop(x, slots, w, W)
    err = float((out.double() - ref).norm() / ref.norm())
    assert err < 1e-5, f"rel err {err}"


@pytest.mark.cuda
@needs_gmm
def test_grouped_decode_cuda_bf16():
    """On CUDA in bf16 the grouped kernel stays within bf16 rounding of the fp64 loop."""
    D, F, S, K = 256, 96, 40, 8
    W = _pool(S, F, D, torch.bfloat16, "cuda")
    x = torch.randn(1, D, device="cuda").bfloat16()
    slots = torch.randperm(S, device="cuda")[:K]
    w = torch.softmax(torch.randn(1, K, device="cuda"), -1).bfloat16()
    out = experts_decode_grouped(x, slots, w, W.gate, W.up, W.down).cpu()
    ref = _loop(x.cpu(), slots.cpu(), w.cpu(), type(W)(W.gate.cpu(), W.up.cpu(), W.down.cpu()))
    assert float((out.double() - ref).norm() / ref.norm()) < 2e-2
