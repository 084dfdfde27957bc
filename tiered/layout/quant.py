"""Quantized weight formats: how an nn.Linear weight [N, K] is stored in fewer bits, and the plain torch
reference that turns it back into a dense matrix.

Owns: the formats below, `quantize` (a dense weight -> its stored parts), `QuantWeight` (the stored parts of
one matrix or of a stack of matrices, as tensors or zero-copy views; `dequantize` is the reference every
kernel is tested against), the pass-through wrappers of checkpoints already stored in fp8 or MXFP4,
`part_shapes` (each part's shape and dtype from the logical shape alone: what the repacker needs to plan a
block) and `linear` (dequantize-then-matmul, the CPU path).
Does not own: where the parts sit in a block or file (format.py, repack.py), fused kernels (tiered/kernels/).

Every format groups along the input dimension K (the last dim of an nn.Linear weight):
  q8     int8 symmetric, one bf16 scale per 128 inputs:                  w = q * s
  q4     uint4 affine, one bf16 scale and one bf16 min per 64 inputs     w = q * s + m
         (the whole row when K < 64); two values per byte, the lower input index in the low nibble
         (MLX's and Flash-MoE's format; MLX packs 8 per uint32, which is the same bytes little-endian)
  fp8    float8 e4m3, one fp32 scale per 128 x 128 block (DeepSeek-V3's `weight_scale_inv`): w = q * s
  mxfp4  e2m1 in blocks of 32 inputs, a shared e8m0 exponent per block (OCP MX, gpt-oss):
         w = fp4(q) * 2^(e - 127); two values per byte, low nibble first, as gpt-oss stores `*_blocks`
The last group of a row may be shorter (K not a multiple of the group): it holds the remaining inputs, and
the packed row is padded with zero codes to whole groups (q8, q4: to whole bytes only).

Dequantization computes in fp32 and rounds once to the requested dtype, so the reference is exact up to
that last rounding (products of a bf16 scale and an 8-bit code are exact in fp32).

Legend: N output rows, K inputs, G groups per row, S stacked matrices (experts or slots).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

QUANT_FORMATS = ("q8", "q4", "fp8", "mxfp4")
EXPERT_STORAGE = ("source", "bf16") + QUANT_FORMATS  # repack --experts
DENSE_STORAGE = ("source", "bf16", "q8", "q4")  # repack --dense
# repack --q4-refine (quantize's refine, "none" = None; "auto": repack picks by the quantizing device)
Q4_REFINES = ("auto", "lsq", "search", "none")
GROUP = {"q8": 128, "q4": 64, "fp8": 128, "mxfp4": 32}  # inputs per group (fp8: the block edge)
FP8_MAX = 448.0  # largest finite float8_e4m3fn
# e2m1 code -> value; bit 3 is the sign
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


class QuantError(ValueError):
    """A weight or stored parts that do not fit the format; the message says which and why."""


def group_size(fmt: str, k: int) -> int:
    """Inputs per group for a matrix with k inputs (q4 uses the whole row when k < 64)."""
    if fmt not in GROUP:
        raise QuantError(f"unknown quantized format {fmt!r}: use one of {QUANT_FORMATS}")
    if fmt == "q4" and k < GROUP["q4"]:
        return k
    return GROUP[fmt]


def part_shapes(fmt: str, shape: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The stored parts of one [N, K] matrix: {"q", "scale"[, "min"]} -> (shape, dtype)."""
    n, k = shape
    g = group_size(fmt, k)
    groups = math.ceil(k / g)
    if fmt == "q8":
        return {"q": ((n, k), torch.int8), "scale": ((n, groups), torch.bfloat16)}
    if fmt == "q4":
        return {"q": ((n, (k + 1) // 2), torch.uint8), "scale": ((n, groups), torch.bfloat16),
                "min": ((n, groups), torch.bfloat16)}
    if fmt == "fp8":
        return {"q": ((n, k), torch.float8_e4m3fn), "scale": ((math.ceil(n / g), groups), torch.float32)}
    return {"q": ((n, groups * 16), torch.uint8), "scale": ((n, groups), torch.uint8)}  # mxfp4


def bits_per_weight(fmt: str, shape: tuple[int, int]) -> float:
    """Stored bits per logical weight, parts included (before any block alignment)."""
    n, k = shape
    total = sum(math.prod(s) * torch.empty((), dtype=dt).element_size() for s, dt in part_shapes(fmt, shape).values())
    return 8 * total / (n * k)


@dataclass(frozen=True)
class QuantWeight:
    """The stored parts of a quantized [N, K] weight, or of a stack [..., N, K] sharing leading dims.

    Indexing and `index_select` act on the leading (stack) dims of every part at once, so a stack over
    the expert pool behaves like the bf16 [S, N, K] view it replaces; `dequantize` gives the dense matrix.
    """

    fmt: str  # one of QUANT_FORMATS
    matrix: tuple[int, int]  # logical [N, K] of one matrix
    group: int  # inputs per group (fp8: the edge of a square block)
    q: Tensor  # [..., N, Kq] packed codes
    scale: Tensor  # [..., N, G] (fp8: [..., ceil(N/128), G])
    min: Tensor | None = None  # [..., N, G], q4 only

    def __post_init__(self) -> None:
        want = part_shapes(self.fmt, self.matrix)
        lead = tuple(self.q.shape[:-2])
        for name in want:
            t = getattr(self, name)
            s, dt = want[name]
            if t is None or tuple(t.shape) != lead + s or t.dtype != dt:
                got = None if t is None else f"{t.dtype} {list(t.shape)}"
                raise QuantError(f"{self.fmt} weight {list(self.matrix)}: part {name} is {got}, expected "
                                 f"{dt} {list(lead + s)}")

    @property
    def lead(self) -> tuple[int, ...]:
        return tuple(self.q.shape[:-2])

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical shape [..., N, K], as the dense stack it stands for."""
        return self.lead + tuple(self.matrix)

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts().values())

    def parts(self) -> dict[str, Tensor]:
        p = {"q": self.q, "scale": self.scale}
        if self.min is not None:
            p["min"] = self.min
        return p

    def _map(self, fn) -> "QuantWeight":
        return replace(self, **{k: fn(v) for k, v in self.parts().items()})

    def __getitem__(self, idx) -> "QuantWeight":
        if not self.lead:
            raise IndexError("a single quantized matrix has no stack dims to index")
        return self._map(lambda t: t[idx])

    def index_select(self, dim: int, index: Tensor) -> "QuantWeight":
        if dim != 0 or not self.lead:
            raise IndexError("QuantWeight.index_select selects along the first stack dim (dim 0) only")
        return self._map(lambda t: t.index_select(0, index))

    def to_device(self, device: torch.device | str) -> "QuantWeight":
        return self._map(lambda t: t.to(device))

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> Tensor:
        """The dense weight [..., N, K] in `dtype` (computed in fp32, rounded once)."""
        n, k = self.matrix
        if self.fmt == "q8":
            w = _by_group(self.q, self.group, k) * self.scale.float()[..., None]
            w = w.flatten(-2)[..., :k]
        elif self.fmt == "q4":
            codes = _by_group(unpack_nibbles(self.q, k), self.group, k)
            w = (codes * self.scale.float()[..., None] + self.min.float()[..., None]).flatten(-2)[..., :k]
        elif self.fmt == "fp8":
            s = _expand(self.scale, self.group, k)  # [..., Nb, K]
            w = self.q.float() * s.repeat_interleave(self.group, dim=-2)[..., :n, :]
        else:
            vals = fp4_value(unpack_nibbles(self.q, self.q.shape[-1] * 2))  # [..., N, G*32]
            exp = torch.exp2(self.scale.float() - 127.0)  # [..., N, G]
            w = (vals.view(*vals.shape[:-1], -1, 32) * exp[..., None]).flatten(-2)[..., :k]
        return w.to(dtype)


def _by_group(codes: Tensor, group: int, k: int) -> Tensor:
    """Codes [..., K] -> fp32 [..., G, group] (the last group zero-padded), so that per-group values broadcast over
    it: the same products and sums as expanding them per input, in half the time on a CPU."""
    pad = -k % group
    c = F.pad(codes[..., :k], (0, pad)) if pad else codes[..., :k]
    return c.reshape(*c.shape[:-1], -1, group).float()


def _expand(s: Tensor, group: int, k: int) -> Tensor:
    """Per-group values [..., G] -> per-input [..., K] (the last group may be short)."""
    return s.repeat_interleave(group, dim=-1)[..., :k]


def fp4_value(code: Tensor) -> Tensor:
    """e2m1 codes (uint8 0..15) -> fp32 values, by arithmetic (no table copied to the device, so a CUDA
    graph can capture it): bit 3 sign, bits 2..1 exponent, bit 0 mantissa; exponent 0 is subnormal."""
    c = code.to(torch.int32)
    e, m = (c >> 1) & 3, (c & 1).float()
    mag = torch.where(e == 0, 0.5 * m, torch.exp2((e - 1).float()) * (1.0 + 0.5 * m))
    return torch.where((c & 8) != 0, -mag, mag)


def unpack_nibbles(packed: Tensor, k: int) -> Tensor:
    """uint8 [..., ceil(k/2)] -> uint8 [..., k]: the low nibble is the even input, the high one the odd."""
    both = torch.stack((packed & 0xF, packed >> 4), dim=-1)  # [..., Kq, 2]
    return both.flatten(-2)[..., :k]


def pack_nibbles(codes: Tensor) -> Tensor:
    """uint8 codes 0..15 [..., k] -> uint8 [..., ceil(k/2)] (an odd k is padded with a zero code)."""
    if codes.shape[-1] % 2:
        codes = F.pad(codes, (0, 1))
    pair = codes.view(*codes.shape[:-1], -1, 2)
    return (pair[..., 0] | (pair[..., 1] << 4)).contiguous()


def _groups(w: Tensor, group: int) -> Tensor:
    """[..., N, K] fp32 -> [..., N, G, group], zero-padded at the end of each row."""
    pad = -w.shape[-1] % group
    return F.pad(w, (0, pad)).view(*w.shape[:-1], -1, group)


def _bf16_up(x: Tensor) -> Tensor:
    """The smallest bf16 >= x (fp32), as bf16: a scale rounded up never clips the largest weight."""
    b = x.to(torch.bfloat16)
    up = torch.nextafter(b, torch.full_like(b, math.inf))
    return torch.where(b.float() < x, up, b)


def _bf16_down(x: Tensor) -> Tensor:
    """The largest bf16 <= x (fp32), as bf16."""
    b = x.to(torch.bfloat16)
    down = torch.nextafter(b, torch.full_like(b, -math.inf))
    return torch.where(b.float() > x, down, b)


def quantize(w: Tensor, fmt: str, *, refine: str | None = None) -> QuantWeight:
    """A dense weight [N, K] (any float dtype) -> its stored parts in `fmt`; a stack [..., N, K] (e.g. every
    expert of a layer) is quantized in one pass, each matrix exactly as on its own.

    Args:
        refine: q4 only: None rounds from each group's min/max; "lsq" then alternates rounding with a
            least-squares fit of each group's scale and min (data-free, minimises weight MSE; a group keeps
            whichever of the two has the lower error).
    """
    if w.dim() < 2:
        raise QuantError(f"quantize takes [..., N, K] matrices, got shape {list(w.shape)}")
    if not torch.isfinite(w).all():
        raise QuantError(f"weight {list(w.shape)} has non-finite values: it cannot be quantized")
    if refine is not None and fmt != "q4":
        raise QuantError(f"refine={refine!r} applies to q4 only")
    n, k = w.shape[-2:]
    g = group_size(fmt, k)
    wf = w.float()
    if fmt == "q8":
        parts = _quant_q8(wf, g)
    elif fmt == "q4":
        parts = _quant_q4(wf, g, refine)
    elif fmt == "fp8":
        parts = _quant_fp8(wf, g)
    else:
        parts = _quant_mxfp4(wf, g)
    return QuantWeight(fmt, (int(n), int(k)), g, **parts)


def _quant_q8(w: Tensor, g: int) -> dict[str, Tensor]:
    k = w.shape[-1]
    x = _groups(w, g)  # [..., N, G, g]
    s = _bf16_up(x.abs().amax(-1) / 127.0)  # [N, G]
    sf = s.float()
    q = torch.where(sf[..., None] > 0, torch.round(x / sf.clamp_min(1e-30)[..., None]), torch.zeros_like(x))
    q = q.clamp(-127, 127).to(torch.int8).flatten(-2)[..., :k].contiguous()
    return {"q": q, "scale": s}


def _q4_codes(x: Tensor, s: Tensor, m: Tensor) -> Tensor:
    """x [N, G, g], bf16 scale/min [N, G] -> codes 0..15 as fp32 [N, G, g]."""
    sf, mf = s.float()[..., None], m.float()[..., None]
    return torch.where(sf > 0, torch.round((x - mf) / sf.clamp_min(1e-30)), torch.zeros_like(x)).clamp(0, 15)


def _quant_q4(w: Tensor, g: int, refine: str | None) -> dict[str, Tensor]:
    k = w.shape[-1]
    x = _groups(w, g)  # [..., N, G, g]
    valid = _groups(torch.ones_like(w), g) > 0  # padding does not count towards min/max or the fit
    lo = torch.where(valid, x, torch.full_like(x, math.inf)).amin(-1)
    hi = torch.where(valid, x, torch.full_like(x, -math.inf)).amax(-1)
    m = _bf16_down(lo)  # the min rounds down and the scale up, so no weight falls outside the grid
    s = _bf16_up((hi - m.float()) / 15.0)
    q = _q4_codes(x, s, m)
    if refine in ("lsq", "search"):
        s, m, q = _refine_lsq(x, valid, s, m, q)
        if refine == "search":
            s, m, q = _refine_search(x, valid, lo, hi, s, m, q)
    elif refine is not None:
        raise QuantError(f"unknown q4 refinement {refine!r}: use None, 'lsq' or 'search'")
    q = q.to(torch.uint8).flatten(-2)[..., :k]
    return {"q": pack_nibbles(q), "scale": s, "min": m}


def _group_err(x: Tensor, valid: Tensor, s: Tensor, m: Tensor, q: Tensor) -> Tensor:
    d = (q * s.float()[..., None] + m.float()[..., None] - x) * valid
    return (d * d).sum(-1)  # [N, G]


def _refine_lsq(x: Tensor, valid: Tensor, s: Tensor, m: Tensor, q: Tensor, iters: int = 6):
    """Alternate: codes by rounding for fixed (scale, min); (scale, min) by least squares for fixed codes."""
    best = (s, m, q, _group_err(x, valid, s, m, q))
    v = valid.float()
    cnt = v.sum(-1)
    for _ in range(iters):
        qv = q * v
        sq, sx, sqq, sqx = qv.sum(-1), (x * v).sum(-1), (qv * q).sum(-1), (qv * x).sum(-1)
        det = cnt * sqq - sq * sq
        ok = det > 0
        s_new = torch.where(ok, (cnt * sqx - sq * sx) / det.where(ok, torch.ones_like(det)), s.float())
        m_new = torch.where(ok, (sx - s_new * sq) / cnt, m.float())
        s, m = s_new.clamp_min(0).to(torch.bfloat16), m_new.to(torch.bfloat16)
        q = _q4_codes(x, s, m)
        err = _group_err(x, valid, s, m, q)
        better = err < best[3]
        best = (torch.where(better, s, best[0]), torch.where(better, m, best[1]),
                torch.where(better[..., None], q, best[2]), torch.where(better, err, best[3]))
    return best[0], best[1], best[2]


SEARCH_SHRINK = (0.0, 0.02, 0.04, 0.06, 0.08, 0.11)  # q4 "search": shares of a group's range cut from each end


def _refine_search(x: Tensor, valid: Tensor, lo: Tensor, hi: Tensor, s: Tensor, m: Tensor, q: Tensor,
                   shrink: tuple[float, ...] = SEARCH_SHRINK, iters: int = 6):
    """A wider start for the least-squares alternation. Each group's range [lo, hi] with its bottom raised by a
    and its top lowered by b (a, b in `shrink`, shares of hi - lo) is a grid to round onto; the start with the
    lowest weight MSE after rounding is refined by `iters` rounds of _refine_lsq, and a group keeps that or
    (s, m, q), the lsq refinement already made, whichever has the lower error (never worse than lsq).
    Clipping the range's ends trades the two extreme weights' error for a finer grid under the others, which the
    alternation from min/max alone does not reach. Measured on olmoe-code-17m's experts: relative weight MSE
    5.996e-3 against lsq's 6.507e-3, about 5x lsq's quantizing time (benchmarks/results/quant-quality-2026-12-04.json,
    notes/Q4_DECODE.md "Session 36")."""
    r = hi - lo
    start = None
    for a in shrink:
        for b in shrink:
            m0 = (lo + a * r).to(torch.bfloat16)
            s0 = ((hi - b * r - m0.float()) / 15.0).clamp_min(0).to(torch.bfloat16)
            q0 = _q4_codes(x, s0, m0)
            e0 = _group_err(x, valid, s0, m0, q0)
            if start is None:
                start = (s0, m0, q0, e0)
                continue
            better = e0 < start[3]
            start = (torch.where(better, s0, start[0]), torch.where(better, m0, start[1]),
                     torch.where(better[..., None], q0, start[2]), torch.where(better, e0, start[3]))
    s1, m1, q1 = _refine_lsq(x, valid, start[0], start[1], start[2], iters=iters)
    better = _group_err(x, valid, s1, m1, q1) < _group_err(x, valid, s, m, q)
    return (torch.where(better, s1, s), torch.where(better, m1, m), torch.where(better[..., None], q1, q))


def _quant_fp8(w: Tensor, g: int) -> dict[str, Tensor]:
    *lead, n, k = w.shape
    x = F.pad(w, (0, -k % g, 0, -n % g))  # [..., Np, Kp]
    nb, kb = x.shape[-2] // g, x.shape[-1] // g
    blocks = x.view(*lead, nb, g, kb, g)
    amax = blocks.abs().amax(dim=(-3, -1))  # [..., Nb, Kb]
    s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))  # fp32, DeepSeek-V3's scale_inv
    q = (blocks / s[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return {"q": q.view(*lead, nb * g, kb * g)[..., :n, :k].contiguous(), "scale": s}


def _quant_mxfp4(w: Tensor, g: int) -> dict[str, Tensor]:
    x = _groups(w, g)  # [..., N, G, 32]
    amax = x.abs().amax(-1)  # [N, G]
    # the smallest power of two that puts the block's largest magnitude within e2m1's 6 (no clipping)
    e = torch.where(amax > 0, torch.ceil(torch.log2(amax / 6.0)), torch.full_like(amax, -127.0)).clamp(-127, 127)
    y = x / torch.exp2(e)[..., None]  # |y| <= 6
    grid = torch.tensor(FP4_VALUES[:8], dtype=torch.float32, device=w.device)
    mids = (grid[1:] + grid[:-1]) / 2
    code = torch.bucketize(y.abs(), mids)  # 0..7: nearest magnitude
    code = code | ((y < 0) & (code > 0)).to(code.dtype) << 3
    packed = pack_nibbles(code.to(torch.uint8).flatten(-2))  # [..., N, G*16]
    return {"q": packed, "scale": (e + 127).to(torch.uint8)}


def from_fp8_checkpoint(weight: Tensor, scale_inv: Tensor) -> QuantWeight:
    """Wrap a DeepSeek-V3-style fp8 weight [N, K] and its `weight_scale_inv` [ceil(N/128), ceil(K/128)] fp32
    as stored: no round trip through bf16."""
    if weight.dtype != torch.float8_e4m3fn:
        raise QuantError(f"an fp8 pass-through needs a float8_e4m3fn weight, got {weight.dtype}")
    return QuantWeight("fp8", tuple(weight.shape), GROUP["fp8"], weight, scale_inv.float())


def from_mxfp4_checkpoint(blocks: Tensor, scales: Tensor, k: int | None = None) -> QuantWeight:
    """Wrap gpt-oss-style MXFP4 parts as stored: blocks uint8 [..., N, G, 16], scales uint8 [..., N, G]."""
    n, groups = blocks.shape[-3], blocks.shape[-2]
    if blocks.shape[-1] != 16 or tuple(scales.shape) != tuple(blocks.shape[:-1]):
        raise QuantError(f"MXFP4 blocks {list(blocks.shape)} / scales {list(scales.shape)}: expected "
                         f"[..., N, G, 16] and [..., N, G]")
    return QuantWeight("mxfp4", (n, k or groups * 32), GROUP["mxfp4"], blocks.flatten(-2), scales)


def error_bound(qw: QuantWeight, w: Tensor) -> Tensor:
    """An upper bound on |w - dequantize(qw)| per weight [N, K] from the format's step size (tests use it)."""
    n, k = qw.matrix
    if qw.fmt == "q8":
        return _expand(qw.scale.float(), qw.group, k) * 0.5
    if qw.fmt == "q4":  # plus the bf16 rounding of the min (a constant group has scale 0)
        return _expand(qw.scale.float(), qw.group, k) * 0.5 + _expand(qw.min.float().abs(), qw.group, k) * 2.0 ** -7
    if qw.fmt == "fp8":
        s = _expand(qw.scale, qw.group, k).repeat_interleave(qw.group, dim=-2)[..., :n, :]
        return w.float().abs() * 2.0 ** -4 + s * 2.0 ** -10  # half a unit in the last place; subnormal step
    e = _expand(qw.scale.float(), qw.group, k) - 127.0
    return torch.exp2(e)  # half the widest e2m1 gap (4 -> 6)


def linear(x: Tensor, w: Tensor | QuantWeight, bias: Tensor | None = None) -> Tensor:
    """F.linear over a dense or quantized weight; a quantized one is dequantized into x's dtype first."""
    if isinstance(w, QuantWeight):
        w = w.dequantize(x.dtype)
    return F.linear(x, w, bias)


def dense(w: Tensor | QuantWeight, dtype: torch.dtype) -> Tensor:
    """A stored weight (plain tensor or quantized parts) as a dense tensor in `dtype`."""
    return w.dequantize(dtype) if isinstance(w, QuantWeight) else w.to(dtype)


def cat_rows(ws: list[QuantWeight]) -> QuantWeight:
    """Matrices of one format and input width stacked along N (q, k and v into one qkv matrix): with
    per-row groups every part is a concatenation; fp8's 128-row blocks need each N but the last to be a
    multiple of 128."""
    f, k, g = ws[0].fmt, ws[0].matrix[1], ws[0].group
    if any(w.fmt != f or w.matrix[1] != k or w.group != g or w.lead for w in ws):
        raise QuantError("cat_rows needs single matrices of one format, input width and group")
    if f == "fp8" and any(w.matrix[0] % g for w in ws[:-1]):
        raise QuantError("fp8 matrices stack along N only when each has a multiple of 128 rows")
    parts = {name: torch.cat([w.parts()[name] for w in ws], dim=0) for name in ws[0].parts()}
    return QuantWeight(f, (sum(w.matrix[0] for w in ws), k), g, **parts)
