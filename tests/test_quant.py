"""Quantized formats (tiered/layout/quant.py): quantize -> stored parts -> reference dequantization."""
from __future__ import annotations

import math

import pytest
import torch

from tiered.layout.quant import (FP4_VALUES, QUANT_FORMATS, QuantError, QuantWeight, bits_per_weight,
                                 error_bound, from_fp8_checkpoint, from_mxfp4_checkpoint, linear, pack_nibbles,
                                 part_shapes, quantize, unpack_nibbles)

SHAPES = [(1, 1), (3, 7), (32, 256), (256, 32), (5, 63), (7, 64), (9, 65), (130, 129), (17, 300)]


def _weight(shape, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    w[0, 0] = 0.3  # an outlier per matrix, as trained weights have
    return w.to(dtype)


@pytest.mark.parametrize("fmt", QUANT_FORMATS)
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_within_bound(fmt, shape):
    """Every format's dequantization stays within its step-size bound of the weight, for odd shapes too,
    and the parts have the shapes and dtypes that part_shapes (the repacker's plan) promises."""
    w = _weight(shape)
    qw = quantize(w, fmt)
    for name, (s, dt) in part_shapes(fmt, shape).items():
        t = qw.parts()[name]
        assert tuple(t.shape) == s and t.dtype == dt, (name, t.shape, t.dtype)
    back = qw.dequantize(torch.float32)
    assert back.shape == w.shape
    err = (back - w.float()).abs()
    bound = error_bound(qw, w) * (1 + 1e-5) + 1e-12
    worst = (err - bound).max().item()
    assert worst <= 0, f"{fmt} {shape}: error exceeds the bound by {worst:.3g} (max err {err.max():.3g})"


@pytest.mark.parametrize("fmt,limit", [("q8", 0.008), ("q4", 0.11), ("fp8", 0.032), ("mxfp4", 0.14)])
def test_relative_error_typical(fmt, limit):
    """On a gaussian [64, 256] matrix the relative Frobenius error is near what the step size predicts
    (uniform rounding over a +-3 sigma range: q8 ~ 0.007, q4 ~ 0.1; fp8 ~ 2^-5; mxfp4 ~ 2^-3), within a
    factor below 1.25: a scale or code off by a factor of two fails it."""
    w = _weight((64, 256), seed=1)
    back = quantize(w, fmt).dequantize(torch.float32)
    rel = ((back - w.float()).norm() / w.float().norm()).item()
    assert rel < limit, f"{fmt}: relative error {rel:.4f}"
    assert rel > limit / 20, f"{fmt}: relative error {rel:.2e} is implausibly small (is it quantizing?)"


def test_q4_whole_row_group_below_64():
    """q4 with K < 64 uses one group per row; at K >= 64 groups of 64 (the last one short)."""
    assert quantize(_weight((4, 32)), "q4").scale.shape == (4, 1)
    assert quantize(_weight((4, 63)), "q4").group == 63
    assert quantize(_weight((4, 65)), "q4").scale.shape == (4, 2)


def test_q4_exact_on_grid():
    """A q4 row whose values already lie on a 16-level bf16 grid is reproduced exactly."""
    levels = torch.arange(16, dtype=torch.float32) * 0.125 - 1.0  # scale 1/8, min -1: exact in bf16
    w = levels.repeat(2, 4)  # [2, 64]
    back = quantize(w, "q4").dequantize(torch.float32)
    assert torch.equal(back, w)


def test_q4_lsq_refinement_not_worse():
    """The least-squares refinement never increases any group's error (it keeps the better of the two)."""
    w = _weight((64, 256), seed=2).float()
    plain = quantize(w, "q4").dequantize(torch.float32)
    ref = quantize(w, "q4", refine="lsq").dequantize(torch.float32)
    ep = ((plain - w) ** 2).view(64, 4, 64).sum(-1)
    er = ((ref - w) ** 2).view(64, 4, 64).sum(-1)
    assert (er <= ep * (1 + 1e-6) + 1e-12).all()
    assert er.sum() < ep.sum(), "the refinement changed nothing on a gaussian matrix"


@pytest.mark.parametrize("shape", [(64, 256), (16, 32), (8, 65)])
def test_q4_search_refinement_not_worse_than_lsq(shape):
    """--q4-refine search keeps, per group, the better of lsq's result and its own (a clipped start refined by least
    squares): no group's error grows, and on a gaussian matrix the total falls (whole-row groups below 64 inputs and
    a one-input last group included)."""
    w = _weight(shape, seed=4).float()
    n, k = shape
    g = k if k < 64 else 64
    pad = -k % g

    def group_err(refine):
        d = quantize(w, "q4", refine=refine).dequantize(torch.float32) - w
        return torch.nn.functional.pad(d * d, (0, pad)).view(n, -1, g).sum(-1)

    lsq, search = group_err("lsq"), group_err("search")
    assert (search <= lsq * (1 + 1e-6) + 1e-12).all()
    assert search.sum() < lsq.sum() * 0.99, "the search found nothing better than lsq on a gaussian matrix"


def test_nibble_order():
    """Packing puts input 0 in the low nibble of byte 0 (MLX / gpt-oss order); odd K pads a zero code."""
    codes = torch.tensor([[1, 2, 3]], dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.tolist() == [[0x21, 0x03]]
    assert torch.equal(unpack_nibbles(packed, 3), codes)


def test_fp8_pass_through_is_exact():
    """A checkpoint's fp8 weight and weight_scale_inv are kept bit for bit and dequantize to q * s."""
    g = torch.Generator().manual_seed(3)
    q = (torch.randn(200, 300, generator=g) * 50).clamp(-448, 448).to(torch.float8_e4m3fn)
    s = torch.rand(2, 3, generator=g) + 0.01
    qw = from_fp8_checkpoint(q, s)
    assert qw.q.data_ptr() == q.data_ptr()
    want = q.float() * s.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :300]
    assert torch.equal(qw.dequantize(torch.float32), want)


def test_mxfp4_pass_through_is_exact():
    """gpt-oss-style blocks [N, G, 16] and e8m0 scales [N, G] pass through unchanged; dequantization is
    the e2m1 table times 2^(e-127), element by element."""
    g = torch.Generator().manual_seed(4)
    blocks = torch.randint(0, 256, (6, 3, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(120, 134, (6, 3), dtype=torch.uint8, generator=g)
    qw = from_mxfp4_checkpoint(blocks, scales)
    out = qw.dequantize(torch.float32)  # [6, 96]
    for r, c in [(0, 0), (0, 1), (5, 95), (3, 33), (2, 64)]:
        byte = int(blocks[r, c // 32, (c % 32) // 2])
        code = byte & 0xF if c % 2 == 0 else byte >> 4
        want = FP4_VALUES[code] * 2.0 ** (int(scales[r, c // 32]) - 127)
        assert out[r, c].item() == want


def test_stack_indexing_matches_single():
    """A stack of quantized matrices indexes like the dense stack (index_select then dequantize equals
    dequantize then index_select), and quantizing the stack in one pass gives each matrix's own parts."""
    ws = [_weight((12, 70), seed=s) for s in range(5)]
    for fmt in QUANT_FORMATS:
        qs = [quantize(w, fmt) for w in ws]
        stack = QuantWeight(fmt, qs[0].matrix, qs[0].group,
                            **{k: torch.stack([q.parts()[k] for q in qs]) for k in qs[0].parts()})
        idx = torch.tensor([4, 1, 1])
        got = stack.index_select(0, idx).dequantize(torch.float32)
        want = torch.stack([qs[i].dequantize(torch.float32) for i in idx.tolist()])
        assert torch.equal(got, want), fmt
        assert stack.shape == (5, 12, 70) and stack.index_select(0, idx).shape == (3, 12, 70)
        batched = quantize(torch.stack(ws), fmt)  # one pass over the stack quantizes each matrix alone
        for name, t in stack.parts().items():
            assert torch.equal(batched.parts()[name].view(torch.uint8), t.view(torch.uint8)), (fmt, name)
        assert torch.equal(stack[2].dequantize(torch.float32), want[0] * 0 + qs[2].dequantize(torch.float32))


def test_linear_matches_dequantized_matmul():
    """linear(x, qw) is F.linear over the dequantized weight in x's dtype."""
    w = _weight((40, 96))
    x = torch.randn(3, 96)
    qw = quantize(w, "q4")
    assert torch.equal(linear(x, qw), x @ qw.dequantize(torch.float32).T)


def test_bits_per_weight():
    """q4 at group 64 is 4.5 bits per weight, q8 8.125, fp8 just over 8, mxfp4 4.25 (large matrices)."""
    shape = (2048, 768 * 2)
    assert bits_per_weight("q4", shape) == 4.5
    assert bits_per_weight("q8", shape) == 8.125
    assert math.isclose(bits_per_weight("fp8", shape), 8 + 32 / 128 ** 2)
    assert bits_per_weight("mxfp4", shape) == 4.25


def test_errors_name_the_problem():
    """Unknown formats, non-finite weights and wrong part shapes are refused with a message."""
    with pytest.raises(QuantError, match="unknown quantized format"):
        quantize(torch.ones(2, 2), "q3")
    with pytest.raises(QuantError, match="non-finite"):
        quantize(torch.tensor([[1.0, math.nan]]), "q8")
    with pytest.raises(QuantError, match="part scale"):
        QuantWeight("q8", (2, 4), 128, torch.zeros(2, 4, dtype=torch.int8), torch.zeros(2, 2, dtype=torch.bfloat16))


@pytest.mark.parametrize("fmt,refine", [("q4", "lsq"), ("q4", "search"), ("q4", None), ("q8", None), ("fp8", None),
                                        ("mxfp4", None)])
def test_repack_stack_in_chunks_equals_one_pass(fmt, refine):
    """repack quantizes a layer's experts a few at a time (bounded memory): the parts are bit for bit those of
    one pass over the whole stack, however the chunks fall (1, 2 or 3 experts of 5, a partial last chunk)."""
    from tiered.layout.repack import quantize_stack

    g = torch.Generator().manual_seed(3)
    rows = [torch.randn(40, 192, generator=g).to(torch.bfloat16) for _ in range(5)]
    whole = quantize(torch.stack(rows), fmt, refine=refine).parts()
    for per in (1, 2, 3):
        got = quantize_stack(rows, fmt, refine=refine, chunk_bytes=per * 4 * 40 * 192)
        assert got.keys() == whole.keys()
        for name in whole:
            assert torch.equal(got[name].view(torch.uint8), whole[name].view(torch.uint8)), (fmt, per, name)


def test_repack_quant_device_choice(monkeypatch):
    """--quant-device: auto takes the CPU where no CUDA device is (or has too little free memory); cuda without a
    device and an unknown value fail naming the fix."""
    from tiered.layout import repack as rp

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert rp.resolve_quant_device("auto") == "cpu" and rp.resolve_quant_device("cpu") == "cpu"
    with pytest.raises(rp.RepackError, match="--quant-device cpu"):
        rp.resolve_quant_device("cuda")
    with pytest.raises(rp.RepackError, match="auto, cpu or cuda"):
        rp.resolve_quant_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (3 * 2 ** 30, 8 * 2 ** 30))
    assert rp.resolve_quant_device("auto") == "cpu"  # 3 GiB free: below the working set's margin
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (6 * 2 ** 30, 8 * 2 ** 30))
    assert rp.resolve_quant_device("auto") == "cuda"


def test_repack_quantizes_each_dense_weight_once(reference_model, tmp_path, monkeypatch):
    """--dense q4 writes a weight's scale, min and codes at three places in the file; the one pass that makes them
    keeps the later parts, so each dense chunk is quantized once (three times with nothing kept), and the file is
    byte for byte the same either way."""
    from tiered.layout import repack as rp

    calls = []
    real = rp.quantize
    monkeypatch.setattr(rp, "quantize", lambda t, *a, **k: calls.append(tuple(t.shape)) or real(t, *a, **k))
    files, counts = {}, {}
    for name, limit in (("kept", rp.QUANT_KEEP_BYTES), ("redone", 0)):
        monkeypatch.setattr(rp, "QUANT_KEEP_BYTES", limit)
        calls.clear()
        rp.repack(reference_model, tmp_path / name, experts="bf16", dense="q4", progress=False, quant_device="cpu")
        files[name] = (tmp_path / name / "dense.safetensors").read_bytes()
        counts[name] = len(calls)
    assert files["kept"] == files["redone"]
    assert counts["kept"] > 0 and counts["redone"] == 3 * counts["kept"], counts


def test_parts_kept_hold_only_parts_still_to_write():
    """A weight too large to keep on its first part's pass is quantized again for the next part; that pass keeps
    the parts still to come, never the one already written (it would sit in the store for good)."""
    from tiered.layout.repack import _PartsKept

    kept = _PartsKept(limit=100)
    assert kept.take("w", "scale") is None  # scale's turn: nothing kept, quantized; q (200 bytes) did not fit
    kept.keep("w", {"q": [b"x" * 200], "min": [b"m" * 10]})
    assert kept.held == 0
    assert kept.take("w", "min") is None  # min's turn: quantized again; scale is past, q still to come
    kept.keep("w", {"scale": [b"s" * 10], "q": [b"y" * 50]})
    assert kept.held == 50 and kept.take("w", "scale") is None
    assert kept.take("w", "q") == [b"y" * 50] and kept.held == 0
