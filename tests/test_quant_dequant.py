"""kernels/quant_dequant.py under Triton's interpreter: the dense copy equals the reference dequantization (to one
ulp of the dtype: the kernel may fuse code * scale + min into one FMA) in every format, rows cut at any offset, short
last groups, odd widths and steps of one or many groups; dequant_matmul's slices give the reference product."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from tiered.kernels.quant_dequant import dequant_matmul, dequant_ok, dequantize_rows  # noqa: E402
from tiered.layout.quant import quantize  # noqa: E402


def _close_ulp(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal, or one step of a's dtype apart (compared as fp32)."""
    a32, b32 = a.float(), b.float()
    ulp = torch.finfo(a.dtype).eps * torch.maximum(a32.abs(), b32.abs()).clamp_min(torch.finfo(a.dtype).tiny)
    return bool(((a32 - b32).abs() <= ulp).all())


interp = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter tests run on CPU")


@interp
@pytest.mark.parametrize("fmt", ["q4", "q8", "mxfp4", "fp8"])
@pytest.mark.parametrize("N,K", [(40, 256), (33, 200), (17, 48), (130, 130)])  # whole groups; a short last group;
def test_dense_copy_equals_reference(fmt, N, K):  # K < group; fp8's scale rows of 128 outputs
    g = torch.Generator().manual_seed(N * K)
    w = quantize(torch.randn(N, K, generator=g), fmt)
    for dtype in (torch.float32, torch.bfloat16):
        ref = w.dequantize(dtype)
        assert _close_ulp(dequantize_rows(w, 0, N, dtype), ref)
        assert _close_ulp(dequantize_rows(w, 5, N - 9, dtype), ref[5:N - 4])
        for block in ((16, 64, 4), (32, 512, 8)):  # a step inside one group (or a part of one); many groups a step
            assert _close_ulp(dequantize_rows(w, 3, N - 3, dtype, block=block), ref[3:])


@interp
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


def test_qlinear_threshold_knob(monkeypatch):
    """The copy from DEQUANT_ROWS_ONE rows where it is one slice (the 10.6B qkv in bf16: 21 MB), from DEQUANT_ROWS
    where it is several (the lm_head: 622 MB) or its size is not given; TIERED_DEQUANT_ROWS: a row count for every
    matrix, 0 for never; anything else is refused with what to give."""
    from tiered.kernels.quant_moe import (DEQUANT_ROWS, DEQUANT_ROWS_ENV, DEQUANT_ROWS_ONE, DEQUANT_SCRATCH,
                                          dequant_rows)

    monkeypatch.delenv(DEQUANT_ROWS_ENV, raising=False)
    assert DEQUANT_ROWS_ONE < DEQUANT_ROWS
    assert dequant_rows() == DEQUANT_ROWS
    assert dequant_rows(5120 * 2048 * 2) == dequant_rows(DEQUANT_SCRATCH) == DEQUANT_ROWS_ONE
    assert dequant_rows(151936 * 2048 * 2) == dequant_rows(DEQUANT_SCRATCH + 1) == DEQUANT_ROWS
    monkeypatch.setenv(DEQUANT_ROWS_ENV, "64")
    assert dequant_rows() == dequant_rows(5120 * 2048 * 2) == dequant_rows(151936 * 2048 * 2) == 64
    monkeypatch.setenv(DEQUANT_ROWS_ENV, "0")
    assert dequant_rows() > 1 << 40
    monkeypatch.setenv(DEQUANT_ROWS_ENV, "many")
    with pytest.raises(ValueError, match="row count"):
        dequant_rows()


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["q4", "q8"])
def test_cuda_dense_copy_at_model_shapes(fmt):
    """On the GPU: the copy of the 10.6B qkv and o_proj equals the reference, and the lm_head's product in slices
    matches the reference product."""
    for N, K in ((5120, 2048), (2048, 4096)):
        w = quantize(torch.randn(N, K, device="cuda") * K ** -0.5, fmt)
        assert _close_ulp(dequantize_rows(w, 0, N, torch.bfloat16), w.dequantize(torch.bfloat16))
    w = quantize(torch.randn(151936, 2048, device="cuda") * 2048 ** -0.5, fmt)
    x = torch.randn(300, 2048, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ w.dequantize(torch.float32).T
    got = dequant_matmul(x, w).float()
    assert ((got - ref).norm() / ref.norm()).item() < 1e-2
