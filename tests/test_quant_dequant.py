"""kernels/quant_dequant.py under Triton's interpreter: the dense copy equals the reference dequantization (to one
ulp of the dtype: the kernel may fuse code * scale + min into one FMA), rows cut at any offset, short last groups
and odd widths; dequant_matmul's slices give the reference product."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tiered.kernels.quant_dequant import dequant_matmul, dequant_ok, dequantize_rows  # noqa: E402
from tiered.layout.quant import quantize  # noqa: E402


def _close_ulp(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal, or one step of a's dtype apart (compared as fp32)."""
    a32, b32 = a.float(), b.float()
    ulp = torch.finfo(a.dtype).eps * torch.maximum(a32.abs(), b32.abs()).clamp_min(torch.finfo(a.dtype).tiny)
    return bool(((a32 - b32).abs() <= ulp).all())


@pytest.mark.parametrize("fmt", ["q4", "q8"])
@pytest.mark.parametrize("N,K", [(40, 256), (33, 200), (17, 48)])  # whole groups; a short last group; K < group
def test_dense_copy_equals_reference(fmt, N, K):
    g = torch.Generator().manual_seed(N * K)
    w = quantize(torch.randn(N, K, generator=g), fmt)
    for dtype in (torch.float32, torch.bfloat16):
        ref = w.dequantize(dtype)
        assert _close_ulp(dequantize_rows(w, 0, N, dtype), ref)
        assert _close_ulp(dequantize_rows(w, 5, N - 9, dtype), ref[5:N - 4])


@pytest.mark.parametrize("fmt", ["q4", "q8"])
def test_dequant_matmul_in_slices(fmt):
    g = torch.Generator().manual_seed(3)
    N, K, T = 100, 128, 5
    w = quantize(torch.randn(N, K, generator=g) * K ** -0.5, fmt)
    x = torch.randn(T, K, generator=g)
    ref = x @ w.dequantize(torch.float32).T
    whole = dequant_matmul(x, w)
    sliced = dequant_matmul(x, w, max_scratch=32 * K * 4)  # 32 rows a slice: 4 slices, the last short
    for got in (whole, sliced):
        assert got.shape == (T, N) and ((got - ref).norm() / ref.norm()).item() < 1e-5
    assert dequant_ok(x, w, interpret=True) and not dequant_ok(x, w)  # x on the CPU: CUDA or the interpreter only
    assert not dequant_ok(x, quantize(torch.randn(N, K, generator=g), "fp8"), interpret=True)
