"""Grouped expert GEMMs over quantized slot pools (q8, q4, fp8, mxfp4) for prefill and batches: the packed
codes and scales are read in place and dequantized in registers, tile by tile; no bf16 copy of an expert.

Owns: the Triton kernels `_qgrouped_gate_up_kernel` and `_qgrouped_down_kernel` with their weight-tile
loader `_qdot` (and `_wtile`), `QuantGroupedMoE` (GroupedMoE's rows and waves over quantized stacks), `pick_qconfig` (tile
sizes per format and rows), `block_k_for` (the reduction step a format and a matrix allow), `qgrouped_ok`
(whether these kernels serve a pool) and the one-call `moe_grouped_quant`; and, on the same tile loader,
`_qmatmul_kernel` / `quant_matmul` (one quantized dense matrix at prefill sizes, quant_moe.qlinear's path
above its GEMV rows) with `qmatmul_ok`.
Does not own: the formats and their reference dequantization (layout/quant.py), the row alignment and the
bf16 kernels (moe_grouped.py, whose kernels this module leaves untouched), the one-token GEMV kernels
(quant_moe.py), the reference loop (a test's dequantize-then-matmul).

Same shape as moe_grouped.py (vLLM's fused_moe): the (token, k) rows sorted by expert and padded to
BLOCK_M (`align_rows`), one program per (output block, row block), blocks of experts outside the wave
return at once, gate and up share the x tile and write h = silu(x gate^T) * (x up^T) [T*K, F] in the compute
dtype, the down kernel scales each row by its routing weight into [T*K, D], and the K rows of a token are
summed at the end (so waves do not change the result). gpt-oss's experts add their bf16 gate and up biases in
fp32 before its clamped SwiGLU, and the down bias to each row's product before its routing weight.

How a weight tile is read. Every format groups its inputs along the reduction dimension (the last dim of
the stored [N, Kin] matrix). A step covers BLOCK_K inputs of BLOCK_N output rows:
  - q8, fp8: one code per input, a [BLOCK_K, BLOCK_N] tile, value * scale;
  - q4, mxfp4: two codes per byte (the even input in the low nibble), so a step loads [BLOCK_K/2, BLOCK_N]
    bytes and splits them into the even-input and odd-input tiles; the activation tile [BLOCK_M, BLOCK_K] is
    split into its even and odd columns (tl.split), and the step is two tl.dot of BLOCK_K/2 (swap 0-3); or
    the two nibbles' values are joined back into input order (`_wtile`, swap 4 / 5: tl.join, then a reshape that
    merges the new axis), so the activation tile is used as loaded, once for gate and up, in one tl.dot a step
    (1.05-1.22x a layer above 16 rows an expert in session 33, the pick there);
  - scales (and q4's minimums) are loaded once per group and output row ([R, BLOCK_N], R = groups in the
    step) and broadcast over the group's inputs: the step never straddles a group boundary unevenly because
    BLOCK_K is a multiple or a divisor of the group (`block_k_for`), or the row is one group;
  - the dequantized tile (fp32 arithmetic) is rounded to the compute dtype for tl.dot, as the torch path
    rounds its dequantized expert to the compute dtype before its matmul.
fp8 is read as float8e4nv on CUDA; off CUDA (Triton's interpreter has no fp8) as uint8 and decoded from
its bits (WFMT 5). All pool offsets are int64 (slot * stride), so pools above 2 GiB are safe.

Legend: T tokens, D hidden, K top-k, F expert FFN, E experts per layer, S slots, P padded rows, G groups
per row, R groups per reduction step.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from tiered.kernels.moe_grouped import GroupedConfig, GroupedMoE
from tiered.kernels.moe_grouped import pick_config as bf16_config
from tiered.kernels.fused_norm import act_fn
from tiered.kernels.moe_operands import Activation, ExpertOperands, WeightFormat, check_biases
from tiered.layout.quant import QuantWeight

# format -> the kernels' WFMT (moe_operands.WeightFormat's values); FP8_BITS: fp8 decoded from its bits (interpreter)
WFMT = {"q8": int(WeightFormat.Q8), "q4": int(WeightFormat.Q4), "fp8": int(WeightFormat.FP8),
        "mxfp4": int(WeightFormat.MXFP4)}
FP8_BITS = 5
NIBBLES = ("q4", "mxfp4")


_act = triton.jit(act_fn)  # the gated activation in fp32 (SwiGLU, or gpt-oss's clamped form)


@triton.jit
def _scales(sn, mask_n, k0, NG: tl.constexpr, GROUP: tl.constexpr, R: tl.constexpr):
    """[R, BLOCK_N] fp32: the R groups from input k0 on, of the rows whose scale (or min) rows start at sn."""
    g = k0 // GROUP + tl.arange(0, R)
    return tl.load(sn[None, :] + g[:, None], mask=(g < NG)[:, None] & mask_n[None, :], other=0).to(tl.float32)


@triton.jit
def _grouped(v, s, m, BK: tl.constexpr, BN: tl.constexpr, R: tl.constexpr, HAS_MIN: tl.constexpr):
    """v [BK, BN] fp32 codes' values over R consecutive groups along BK; s, m [R, BN] -> v * s (+ m)."""
    if R == 1:
        out = v * s
        if HAS_MIN:
            out = out + m
    else:
        v3 = tl.reshape(v, (R, BK // R, BN))
        out3 = v3 * s[:, None, :]
        if HAS_MIN:
            out3 = out3 + m[:, None, :]
        out = tl.reshape(out3, (BK, BN))
    return out


@triton.jit
def _scales_t(sn, mask_n, k0, NG: tl.constexpr, GROUP: tl.constexpr, R: tl.constexpr):
    """[BLOCK_N, R] fp32: `_scales` for a weight tile stored [BLOCK_N, BLOCK_K] (SWAP 2)."""
    g = k0 // GROUP + tl.arange(0, R)
    return tl.load(sn[:, None] + g[None, :], mask=mask_n[:, None] & (g < NG)[None, :], other=0).to(tl.float32)


@triton.jit
def _grouped_t(v, s, m, BN: tl.constexpr, BK: tl.constexpr, R: tl.constexpr, HAS_MIN: tl.constexpr):
    """v [BN, BK] fp32 codes' values over R consecutive groups along BK; s, m [BN, R] -> v * s (+ m)."""
    if R == 1:
        out = v * s
        if HAS_MIN:
            out = out + m
    else:
        v3 = tl.reshape(v, (BN, R, BK // R))
        out3 = v3 * s[:, :, None]
        if HAS_MIN:
            out3 = out3 + m[:, :, None]
        out = tl.reshape(out3, (BN, BK))
    return out


@triton.jit
def _e2m1(c):
    """e2m1 codes (int32 0..15) -> fp32 values, built from bits: sign bit 3, exponent bits 2..1, mantissa 0."""
    em = c & 7
    b = tl.where(em >= 2, (em << 22) + (126 << 23), tl.where(em == 1, 0x3F000000, 0))
    return (b | ((c & 8) << 28)).to(tl.float32, bitcast=True)


@triton.jit
def _qdot(acc, a_rows, mask_m, qn, s, m, mask_n, k0, KIN: tl.constexpr, KQ: tl.constexpr, WFMT: tl.constexpr,
          R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, DT: tl.constexpr,
          PREC: tl.constexpr, SWAP: tl.constexpr = 0, LOAD: tl.constexpr = False, NG: tl.constexpr = 1,
          GROUP: tl.constexpr = 1):
    """acc [BLOCK_M, BLOCK_N] += a[:, k0:k0+BLOCK_K] @ W[n-block, k0:k0+BLOCK_K]^T, W dequantized in registers.
    SWAP 1: acc is [BLOCK_N, BLOCK_M] and the product is taken as W @ a^T (the weight tile the MMA's first
    operand, the few rows its second), from the same tiles.

    a_rows [BLOCK_M] pointers to each activation row; qn [BLOCK_N] pointers to each output row's packed codes;
    s, m the step's scales and minimums (`_scale_pair`'s, loaded a step ahead), or with LOAD each output row's
    scale and minimum pointers, loaded here after the codes (m unused but for q4)."""
    if WFMT == 2 or WFMT == 4:  # q4, mxfp4: two codes per byte
        offs_j = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # byte of the row
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_rows[:, None] + offs_k[None, :], mask=mask_m[:, None] & (offs_k < KIN)[None, :], other=0.0)
        a_e, a_o = tl.split(tl.reshape(a, (BLOCK_M, BLOCK_K // 2, 2)))  # even and odd inputs
        b = tl.load(qn[None, :] + offs_j[:, None], mask=(offs_j < KQ)[:, None] & mask_n[None, :],
                    other=0).to(tl.int32)  # [BLOCK_K/2, BLOCK_N]
        if LOAD:
            s = _scales(s, mask_n, k0, NG, GROUP, R)
        if WFMT == 2:  # q4: code * scale + min
            if LOAD:
                m = _scales(m, mask_n, k0, NG, GROUP, R)
            w_e = _grouped((b & 15).to(tl.float32), s, m, BLOCK_K // 2, BLOCK_N, R, True)
            w_o = _grouped(((b >> 4) & 15).to(tl.float32), s, m, BLOCK_K // 2, BLOCK_N, R, True)
        else:  # mxfp4: e2m1 value * 2^(e8m0 - 127)
            e = tl.exp2(s - 127.0)
            w_e = _grouped(_e2m1(b & 15), e, e, BLOCK_K // 2, BLOCK_N, R, False)
            w_o = _grouped(_e2m1((b >> 4) & 15), e, e, BLOCK_K // 2, BLOCK_N, R, False)
        if SWAP == 1:
            acc = tl.dot(tl.trans(w_e.to(DT)), tl.trans(a_e), acc=acc, input_precision=PREC)
            acc = tl.dot(tl.trans(w_o.to(DT)), tl.trans(a_o), acc=acc, input_precision=PREC)
        else:
            acc = tl.dot(a_e, w_e.to(DT), acc=acc, input_precision=PREC)
            acc = tl.dot(a_o, w_o.to(DT), acc=acc, input_precision=PREC)
    else:  # q8 (int8), fp8 (e4m3): one code per input, value * scale
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mk = offs_k < KIN
        a = tl.load(a_rows[:, None] + offs_k[None, :], mask=mask_m[:, None] & mk[None, :], other=0.0)
        mb = mk[:, None] & mask_n[None, :]
        if WFMT == 5:  # fp8 e4m3 as uint8, decoded from its bits (the interpreter has no fp8)
            c = tl.load(qn[None, :] + offs_k[:, None], mask=mb, other=0).to(tl.int32)
            mag = tl.where((c & 0x78) != 0, (((c & 0x7F) << 20) + (120 << 23)).to(tl.float32, bitcast=True),
                           (c & 7).to(tl.float32) * 0.001953125)
            v = tl.where((c & 0x80) != 0, -mag, mag)
        elif WFMT == 3:  # fp8 e4m3: no `other` (an int cannot be cast to fp8); masked values zeroed after
            v = tl.where(mb, tl.load(qn[None, :] + offs_k[:, None], mask=mb).to(tl.float32), 0.0)
        else:
            v = tl.load(qn[None, :] + offs_k[:, None], mask=mb, other=0).to(tl.float32)
        if LOAD:
            s = _scales(s, mask_n, k0, NG, GROUP, R)
        w = _grouped(v, s, s, BLOCK_K, BLOCK_N, R, False)
        if SWAP == 1:
            acc = tl.dot(tl.trans(w.to(DT)), tl.trans(a), acc=acc, input_precision=PREC)
        else:
            acc = tl.dot(a, w.to(DT), acc=acc, input_precision=PREC)
    return acc


@triton.jit
def _magic(c, DT: tl.constexpr):
    """Codes c (int32, 0..15) -> (values in DT, their offset): in bf16 / fp16 the exponent bits are or-ed in, so the
    value is OFF + c exactly with no conversion instruction (bf16 0x4300 = 128, fp16 0x6400 = 1024); else c."""
    if DT == tl.bfloat16:
        v = (c | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
        off = 128.0
    elif DT == tl.float16:
        v = (c | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
        off = 1024.0
    else:
        v = c.to(DT)
        off = 0.0
    return v, off


@triton.jit
def _bytes_t(qn, offs_k, mb, WFMT: tl.constexpr):
    """q8 / fp8 codes of a weight tile stored [BLOCK_N, inputs] (qn: each row's codes, offs_k the inputs, mb the mask)
    -> fp32 values [BLOCK_N, BLOCK_K] before their scales; masked codes give 0."""
    if WFMT == 5:  # fp8 e4m3 as uint8, decoded from its bits (the interpreter has no fp8)
        c = tl.load(qn[:, None] + offs_k[None, :], mask=mb, other=0).to(tl.int32)
        mag = tl.where((c & 0x78) != 0, (((c & 0x7F) << 20) + (120 << 23)).to(tl.float32, bitcast=True),
                       (c & 7).to(tl.float32) * 0.001953125)
        v = tl.where((c & 0x80) != 0, -mag, mag)
    elif WFMT == 3:  # fp8 e4m3: no `other` (an int cannot be cast to fp8); masked values zeroed after
        v = tl.where(mb, tl.load(qn[:, None] + offs_k[None, :], mask=mb).to(tl.float32), 0.0)
    else:
        v = tl.load(qn[:, None] + offs_k[None, :], mask=mb, other=0).to(tl.float32)
    return v


@triton.jit
def _nibbles_t(b, s, m, WFMT: tl.constexpr, R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """q4 / mxfp4 bytes b [BLOCK_N, BLOCK_K/2] (int32) with their scales s and q4's minimums m [BLOCK_N, R] -> the
    even- and odd-input values (fp32) of the tile: q4 code * scale + min, mxfp4 e2m1 * 2^(e8m0 - 127) (m unused)."""
    if WFMT == 2:
        w_e = _grouped_t((b & 15).to(tl.float32), s, m, BLOCK_N, BLOCK_K // 2, R, True)
        w_o = _grouped_t(((b >> 4) & 15).to(tl.float32), s, m, BLOCK_N, BLOCK_K // 2, R, True)
    else:
        e = tl.exp2(s - 127.0)
        w_e = _grouped_t(_e2m1(b & 15), e, e, BLOCK_N, BLOCK_K // 2, R, False)
        w_o = _grouped_t(_e2m1((b >> 4) & 15), e, e, BLOCK_N, BLOCK_K // 2, R, False)
    return w_e, w_o


@triton.jit
def _qdot_t(acc, a_rows, mask_m, qn, sn, mn, mask_n, k0, KIN: tl.constexpr, KQ: tl.constexpr, NG: tl.constexpr,
            GROUP: tl.constexpr, WFMT: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
            BLOCK_N: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, POST: tl.constexpr = 0):
    """SWAP 2: acc [BLOCK_N, BLOCK_M] += W[n-block, k0:k0+BLOCK_K] @ a[:, k0:k0+BLOCK_K]^T, the weight tile loaded,
    dequantized and multiplied as stored ([BLOCK_N, inputs], inputs contiguous): the MMA's first operand, so
    few rows (the second operand, at least 16 wide) waste none of the weight tile's work.
    POST 1 (SWAP 3; a step inside one group, R 1): the codes' values go into the MMA as they are (exact in the
    compute dtype) and the group's scale (and q4's minimum, times the step's sum of each activation row) is applied
    to the fp32 product: acc += s * (codes @ a^T) + m * sum(a). No per-weight multiply; the weight is never rounded
    (the reference rounds w = code * s + m to the compute dtype first: within that rounding of it)."""
    if POST:
        tl.static_assert(R == 1, "swap 3 takes steps inside one group (quant_grouped._step)")
    if WFMT == 2 or WFMT == 4:  # q4, mxfp4: two codes per byte
        offs_j = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_rows[:, None] + offs_k[None, :], mask=mask_m[:, None] & (offs_k < KIN)[None, :], other=0.0)
        a_e, a_o = tl.split(tl.reshape(a, (BLOCK_M, BLOCK_K // 2, 2)))  # [BLOCK_M, BLOCK_K/2] even, odd inputs
        b = tl.load(qn[:, None] + offs_j[None, :], mask=mask_n[:, None] & (offs_j < KQ)[None, :],
                    other=0).to(tl.int32)  # [BLOCK_N, BLOCK_K/2]
        s = _scales_t(sn, mask_n, k0, NG, GROUP, R)
        if POST:
            if WFMT == 2:  # q4: (OFF + c) s + (m - OFF s) = c s + m
                v_e, off = _magic(b & 15, DT)
                v_o, off = _magic((b >> 4) & 15, DT)
            else:  # mxfp4: e2m1 values are exact in 16-bit floats
                v_e = _e2m1(b & 15).to(DT)
                v_o = _e2m1((b >> 4) & 15).to(DT)
            p = tl.dot(v_e, tl.trans(a_e), input_precision=PREC)
            p = tl.dot(v_o, tl.trans(a_o), acc=p, input_precision=PREC)
            if WFMT == 2:
                m = _scales_t(mn, mask_n, k0, NG, GROUP, R)
                asum = tl.sum(a.to(tl.float32), axis=1)  # [BLOCK_M]
                acc += p * s + (m - off * s) * asum[None, :]
            else:
                acc += p * tl.exp2(s - 127.0)
        else:
            m = _scales_t(mn, mask_n, k0, NG, GROUP, R) if WFMT == 2 else s
            w_e, w_o = _nibbles_t(b, s, m, WFMT, R, BLOCK_N, BLOCK_K)
            acc = tl.dot(w_e.to(DT), tl.trans(a_e), acc=acc, input_precision=PREC)
            acc = tl.dot(w_o.to(DT), tl.trans(a_o), acc=acc, input_precision=PREC)
    else:  # q8, fp8
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mk = offs_k < KIN
        a = tl.load(a_rows[:, None] + offs_k[None, :], mask=mask_m[:, None] & mk[None, :], other=0.0)
        mb = mask_n[:, None] & mk[None, :]
        v = _bytes_t(qn, offs_k, mb, WFMT)
        s = _scales_t(sn, mask_n, k0, NG, GROUP, R)
        if POST:  # int8 and e4m3 values are exact in 16-bit floats
            acc += tl.dot(v.to(DT), tl.trans(a), input_precision=PREC) * s
        else:
            w = _grouped_t(v, s, s, BLOCK_N, BLOCK_K, R, False)
            acc = tl.dot(w.to(DT), tl.trans(a), acc=acc, input_precision=PREC)
    return acc


@triton.jit
def _scale_pair(sn, mn, mask_n, k0, NG: tl.constexpr, GROUP: tl.constexpr, WFMT: tl.constexpr, R: tl.constexpr,
                T: tl.constexpr):
    """A step's scales and minimums (q4's; the scales again for the other formats), fp32: [BLOCK_N, R] with T (the
    interleaved tiles' orientation, `_wtile_s`), else [R, BLOCK_N] (`_qdot`). Groups past the matrix read 0: a
    kernel loads the next step's while it computes this one's (GroupedConfig.ps), the last step's next included."""
    if T:
        s = _scales_t(sn, mask_n, k0, NG, GROUP, R)
        m = _scales_t(mn, mask_n, k0, NG, GROUP, R) if WFMT == 2 else s
    else:
        s = _scales(sn, mask_n, k0, NG, GROUP, R)
        m = _scales(mn, mask_n, k0, NG, GROUP, R) if WFMT == 2 else s
    return s, m


@triton.jit
def _wtile_s(qn, s, m, mask_n, k0, KQ: tl.constexpr, WFMT: tl.constexpr, R: tl.constexpr, BLOCK_K: tl.constexpr,
             BLOCK_N: tl.constexpr, DT: tl.constexpr, DQ: tl.constexpr = 0, LOAD: tl.constexpr = False,
             NG: tl.constexpr = 1, GROUP: tl.constexpr = 1):
    """`_wtile` with the tile's scales and minimums given (`_scale_pair`'s s, m, loaded a step ahead), or with LOAD
    their rows' pointers (sn, mn), loaded here after the codes (`_wtile`)."""
    if WFMT == 2 or WFMT == 4:
        offs_j = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        b = tl.load(qn[:, None] + offs_j[None, :], mask=mask_n[:, None] & (offs_j < KQ)[None, :],
                    other=0).to(tl.int32)  # [BLOCK_N, BLOCK_K/2]
        if LOAD:
            s, m = _scale_pair(s, m, mask_n, k0, NG, GROUP, WFMT, R, True)
        if WFMT == 2 and DQ == 2:
            v_e, off = _magic(b & 15, DT)
            v_o, off = _magic((b >> 4) & 15, DT)
            sd = s.to(DT)
            md = m.to(DT)
            w_e = _grouped_t(v_e - off, sd, md, BLOCK_N, BLOCK_K // 2, R, True)
            w_o = _grouped_t(v_o - off, sd, md, BLOCK_N, BLOCK_K // 2, R, True)
        elif WFMT == 2 and DQ == 1:
            c_e = ((b & 15) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            c_o = (((b >> 4) & 15) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            w_e = _grouped_t(c_e, s, m, BLOCK_N, BLOCK_K // 2, R, True)
            w_o = _grouped_t(c_o, s, m, BLOCK_N, BLOCK_K // 2, R, True)
        else:
            w_e, w_o = _nibbles_t(b, s, m, WFMT, R, BLOCK_N, BLOCK_K)
        w = tl.reshape(tl.join(w_e.to(DT), w_o.to(DT)), (BLOCK_N, BLOCK_K))
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mb = mask_n[:, None] & (offs_k < KQ)[None, :]
        if LOAD:
            s = _scales_t(s, mask_n, k0, NG, GROUP, R)
        w = _grouped_t(_bytes_t(qn, offs_k, mb, WFMT), s, s, BLOCK_N, BLOCK_K, R, False).to(DT)
    return w


@triton.jit
def _wtile(qn, sn, mn, mask_n, k0, KQ: tl.constexpr, NG: tl.constexpr, GROUP: tl.constexpr, WFMT: tl.constexpr,
           R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, DT: tl.constexpr, DQ: tl.constexpr = 0):
    """SWAP 4 / 5: the weight tile W[n-block, k0:k0+BLOCK_K] dequantized in DT, [BLOCK_N, BLOCK_K] in input order.
    q4 and mxfp4 load [BLOCK_N, BLOCK_K/2] bytes and interleave the two nibbles' values back into input order
    (tl.join along a new last axis, then a reshape that merges it: input 2j from the low nibble of byte j), so the
    activation tile is used as loaded (no tl.split) and a step is one tl.dot of BLOCK_K. Inputs past the matrix
    read codes, scales and minimums as 0, so their values are 0.
    DQ (GroupedConfig.dq; q4): how a code becomes a value. 0: int -> fp32 conversions (`I2FP` on sm_90), then
    code * scale + min in fp32, rounded to DT; 1: the same values with no conversion instruction (the code or-ed
    into the mantissa of 2^23, 2^23 subtracted: exact); 2: in DT itself (bf16's exponent or-ed in, `_magic`, then
    (v - offset) * scale + min in DT: no fp32 round trip, one or two roundings in DT where 0 and 1 round once).
    Session 33 measured 1 within 1% of 0 and 2 3-7% slower: the picks take 0."""
    return _wtile_s(qn, sn, mn, mask_n, k0, KQ, WFMT, R, BLOCK_K, BLOCK_N, DT, DQ, True, NG, GROUP)


@triton.jit
def _atile(a_rows, mask_m, k0, KIN: tl.constexpr, BLOCK_K: tl.constexpr):
    """SWAP 4 / 5: the activation tile [BLOCK_M, BLOCK_K] at input k0 (rows past num_rows and inputs past KIN 0)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    return tl.load(a_rows[:, None] + offs_k[None, :], mask=mask_m[:, None] & (offs_k < KIN)[None, :], other=0.0)


@triton.jit
def _jdot(acc, a, w, PREC: tl.constexpr, SWAP: tl.constexpr):
    """SWAP 4: acc [BLOCK_M, BLOCK_N] += a @ w^T; 5: acc [BLOCK_N, BLOCK_M] += w @ a^T (the weight tile the MMA's
    first operand, which Hopper's wgmma can take from registers). a: `_atile`'s, w: `_wtile`'s."""
    if SWAP == 4:
        acc = tl.dot(a, tl.trans(w), acc=acc, input_precision=PREC)
    else:
        acc = tl.dot(w, tl.trans(a), acc=acc, input_precision=PREC)
    return acc


@triton.jit
def _pstep(acc, a, a_rows, mask_m, qn, s, m, mask_n, k0, KIN: tl.constexpr, KQ: tl.constexpr, WFMT: tl.constexpr,
           R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, DT: tl.constexpr,
           DQ: tl.constexpr, PREC: tl.constexpr, SW: tl.constexpr, LOAD: tl.constexpr, NG: tl.constexpr,
           GROUP: tl.constexpr):
    """One step of swap SW's product: 4 / 5 take the activation tile `a` (loaded once for gate and up), the others
    load theirs (`a` unused). s, m: the step's scales and minimums (`_scale_pair`'s, loaded a step ahead), or with
    LOAD their rows' pointers, loaded in the step after the codes (swaps 2 / 3 always load them so)."""
    if SW == 4 or SW == 5:
        acc = _jdot(acc, a, _wtile_s(qn, s, m, mask_n, k0, KQ, WFMT, R, BLOCK_K, BLOCK_N, DT, DQ, LOAD, NG, GROUP),
                    PREC, SW)
    elif SW == 0 or SW == 1:
        acc = _qdot(acc, a_rows, mask_m, qn, s, m, mask_n, k0, KIN, KQ, WFMT, R, BLOCK_M, BLOCK_K, BLOCK_N, DT,
                    PREC, SW, LOAD, NG, GROUP)
    else:
        acc = _qdot_t(acc, a_rows, mask_m, qn, s, m, mask_n, k0, KIN, KQ, NG, GROUP, WFMT, R, BLOCK_M, BLOCK_K,
                      BLOCK_N, DT, PREC, SW == 3)
    return acc


@triton.jit
def _pair(acc_g, acc_u, a_rows, mask_m, gqn, gsn, gmn, uqn, usn, umn, mask_n, KIN: tl.constexpr, KQ: tl.constexpr,
          NG: tl.constexpr, GROUP: tl.constexpr, WFMT: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr,
          BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, DT: tl.constexpr, DQ: tl.constexpr, PREC: tl.constexpr,
          SW: tl.constexpr, PS: tl.constexpr):
    """Gate and up over all KIN inputs in swap SW's steps (gsn / usn, gmn / umn: each output row's scales and
    minimums). PS 1 (swaps 0, 1, 4, 5; GroupedConfig.ps): each step loads the next step's scales and minimums before
    its products, so their latency overlaps a step's work instead of stalling its dequantize: Triton's pipeliner
    stages the codes and activations (cp.async) but not these loads (2 bytes a row). PS 0: each step loads its own
    after its codes."""
    T: tl.constexpr = SW == 4 or SW == 5
    if PS == 1:
        sg, mg = _scale_pair(gsn, gmn, mask_n, 0, NG, GROUP, WFMT, R, T)
        su, mu = _scale_pair(usn, umn, mask_n, 0, NG, GROUP, WFMT, R, T)
        for k0 in range(0, KIN, BLOCK_K):
            sg2, mg2 = _scale_pair(gsn, gmn, mask_n, k0 + BLOCK_K, NG, GROUP, WFMT, R, T)
            su2, mu2 = _scale_pair(usn, umn, mask_n, k0 + BLOCK_K, NG, GROUP, WFMT, R, T)
            a = _atile(a_rows, mask_m, k0, KIN, BLOCK_K) if T else None
            acc_g = _pstep(acc_g, a, a_rows, mask_m, gqn, sg, mg, mask_n, k0, KIN, KQ, WFMT, R, BLOCK_M, BLOCK_K,
                           BLOCK_N, DT, DQ, PREC, SW, False, NG, GROUP)
            acc_u = _pstep(acc_u, a, a_rows, mask_m, uqn, su, mu, mask_n, k0, KIN, KQ, WFMT, R, BLOCK_M, BLOCK_K,
                           BLOCK_N, DT, DQ, PREC, SW, False, NG, GROUP)
            sg, mg, su, mu = sg2, mg2, su2, mu2
    else:
        for k0 in range(0, KIN, BLOCK_K):
            a = _atile(a_rows, mask_m, k0, KIN, BLOCK_K) if T else None
            acc_g = _pstep(acc_g, a, a_rows, mask_m, gqn, gsn, gmn, mask_n, k0, KIN, KQ, WFMT, R, BLOCK_M, BLOCK_K,
                           BLOCK_N, DT, DQ, PREC, SW, True, NG, GROUP)
            acc_u = _pstep(acc_u, a, a_rows, mask_m, uqn, usn, umn, mask_n, k0, KIN, KQ, WFMT, R, BLOCK_M, BLOCK_K,
                           BLOCK_N, DT, DQ, PREC, SW, True, NG, GROUP)
    return acc_g, acc_u


@triton.jit
def _one(acc, a_rows, mask_m, qn, sn, mn, mask_n, k_lo, k_hi, KIN: tl.constexpr, KQ: tl.constexpr,
         NG: tl.constexpr, GROUP: tl.constexpr, WFMT: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr,
         BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, DT: tl.constexpr, DQ: tl.constexpr, PREC: tl.constexpr,
         SW: tl.constexpr, PS: tl.constexpr):
    """`_pair` for one weight over inputs [k_lo, k_hi) (down, quant_matmul's splits)."""
    T: tl.constexpr = SW == 4 or SW == 5
    if PS == 1:
        s, m = _scale_pair(sn, mn, mask_n, k_lo, NG, GROUP, WFMT, R, T)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            s2, m2 = _scale_pair(sn, mn, mask_n, k0 + BLOCK_K, NG, GROUP, WFMT, R, T)
            a = _atile(a_rows, mask_m, k0, KIN, BLOCK_K) if T else None
            acc = _pstep(acc, a, a_rows, mask_m, qn, s, m, mask_n, k0, KIN, KQ, WFMT, R, BLOCK_M, BLOCK_K, BLOCK_N,
                         DT, DQ, PREC, SW, False, NG, GROUP)
            s, m = s2, m2
    else:
        for k0 in range(k_lo, k_hi, BLOCK_K):
            a = _atile(a_rows, mask_m, k0, KIN, BLOCK_K) if T else None
            acc = _pstep(acc, a, a_rows, mask_m, qn, sn, mn, mask_n, k0, KIN, KQ, WFMT, R, BLOCK_M, BLOCK_K, BLOCK_N,
                         DT, DQ, PREC, SW, True, NG, GROUP)
    return acc


@triton.jit
def _qgrouped_gate_up_kernel(x_ptr, rows_ptr, bslot_ptr, gq, gs, gm, uq, us, um, h_ptr, num_rows, stride_xt,
                             sq0, sq1, ss0, ss1, sm0, sm1, D: tl.constexpr, F: tl.constexpr, K: tl.constexpr,
                             KQ: tl.constexpr, NG: tl.constexpr, GROUP: tl.constexpr, ROWBLK: tl.constexpr,
                             WFMT: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr, PREC: tl.constexpr, SWAP: tl.constexpr = 0, gb_ptr=None,
                             ub_ptr=None, stride_bs=0, alpha=1.702, limit=7.0, ACT: tl.constexpr = 0,
                             HAS_BIAS: tl.constexpr = False, DQ: tl.constexpr = 0, PS: tl.constexpr = 0):
    """Grid (cdiv(F, BLOCK_N), P / BLOCK_M): h[rows, n-block] = act(x[tok] @ gate.T + bg, x[tok] @ up.T + bu).
    gate and up share their strides (one block layout); ROWBLK output rows share a scale row (fp8: 128).
    SWAP (GroupedConfig.swap) 1, 2 or 3: the products are taken transposed (weight tile first), see _qdot / _qdot_t
    (3: with the scales applied after the product); 4 / 5: the weight tile interleaved back into input order
    (`_wtile`), one activation tile a step for both products, as loaded (4) or transposed (5).
    ACT 0: SwiGLU; 1: gpt-oss's clamped form (alpha, limit). PS 1 (swap 0, 1, 4, 5; GroupedConfig.ps): each step
    loads the next step's scales and minimums before its products (`_pair`), so their latency overlaps its work.
    HAS_BIAS: the slot's gate and up biases (rows of stride stride_bs) added in fp32 before the activation."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    slot = tl.load(bslot_ptr + pid_m).to(tl.int64)
    if slot < 0:
        return
    rows = tl.load(rows_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BLOCK_M]
    mask_m = rows < num_rows
    a_rows = x_ptr + (rows // K).to(tl.int64) * stride_xt
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < F
    n64 = offs_n.to(tl.int64)
    qo = slot * sq0 + n64 * sq1
    so = slot * ss0 + (n64 // ROWBLK) * ss1
    mo = slot * sm0 + n64 * sm1
    DT = x_ptr.dtype.element_ty
    if SWAP == 0 or SWAP == 4:
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    else:  # the products transposed: [BLOCK_N, BLOCK_M]
        acc_g = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        acc_u = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    acc_g, acc_u = _pair(acc_g, acc_u, a_rows, mask_m, gq + qo, gs + so, gm + mo, uq + qo, us + so, um + mo, mask_n,
                         D, KQ, NG, GROUP, WFMT, R, BLOCK_M, BLOCK_K, BLOCK_N, DT, DQ, PREC, SWAP, PS)
    if SWAP == 0 or SWAP == 4:
        if HAS_BIAS:
            acc_g += tl.load(gb_ptr + slot * stride_bs + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            acc_u += tl.load(ub_ptr + slot * stride_bs + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        h = _act(acc_g, acc_u, ACT, alpha, limit)
        tl.store(h_ptr + rows[:, None].to(tl.int64) * F + offs_n[None, :], h.to(h_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])
    else:
        if HAS_BIAS:
            acc_g += tl.load(gb_ptr + slot * stride_bs + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
            acc_u += tl.load(ub_ptr + slot * stride_bs + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
        h = _act(acc_g, acc_u, ACT, alpha, limit)  # [BLOCK_N, BLOCK_M]
        tl.store(h_ptr + rows[None, :].to(tl.int64) * F + offs_n[:, None], h.to(h_ptr.dtype.element_ty),
                 mask=mask_n[:, None] & mask_m[None, :])


@triton.jit
def _qgrouped_down_kernel(h_ptr, rows_ptr, bslot_ptr, wt_ptr, dq, ds, dm, out_ptr, num_rows, sq0, sq1, ss0, ss1,
                          sm0, sm1, D: tl.constexpr, F: tl.constexpr, KQ: tl.constexpr, NG: tl.constexpr,
                          GROUP: tl.constexpr, ROWBLK: tl.constexpr, WFMT: tl.constexpr, R: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          PREC: tl.constexpr, SWAP: tl.constexpr = 0, db_ptr=None, stride_bs=0,
                          HAS_BIAS: tl.constexpr = False, DQ: tl.constexpr = 0, PS: tl.constexpr = 0):
    """Grid (cdiv(D, BLOCK_N), P / BLOCK_M): out[rows, n-block] = w[rows] * (h[rows] @ down.T + bd). HAS_BIAS: the
    slot's down bias (a row of stride stride_bs) added to the product before the routing weight. PS: as gate_up's."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    slot = tl.load(bslot_ptr + pid_m).to(tl.int64)
    if slot < 0:
        return
    rows = tl.load(rows_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    mask_m = rows < num_rows
    rows64 = rows.to(tl.int64)
    a_rows = h_ptr + rows64 * F
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < D
    n64 = offs_n.to(tl.int64)
    qn = dq + slot * sq0 + n64 * sq1
    sn = ds + slot * ss0 + (n64 // ROWBLK) * ss1
    mn = dm + slot * sm0 + n64 * sm1
    DT = h_ptr.dtype.element_ty
    w = tl.load(wt_ptr + rows, mask=mask_m, other=0.0).to(tl.float32)
    if SWAP == 0 or SWAP == 4:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    else:  # the product transposed: [BLOCK_N, BLOCK_M]
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    acc = _one(acc, a_rows, mask_m, qn, sn, mn, mask_n, 0, F, F, KQ, NG, GROUP, WFMT, R, BLOCK_M, BLOCK_K, BLOCK_N, DT,
               DQ, PREC, SWAP, PS)
    if SWAP == 0 or SWAP == 4:
        if HAS_BIAS:
            acc += tl.load(db_ptr + slot * stride_bs + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rows64[:, None] * D + offs_n[None, :], (acc * w[:, None]).to(out_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])
    else:
        if HAS_BIAS:
            acc += tl.load(db_ptr + slot * stride_bs + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + rows64[None, :] * D + offs_n[:, None], (acc * w[None, :]).to(out_ptr.dtype.element_ty),
                 mask=mask_n[:, None] & mask_m[None, :])


@triton.jit
def _qmatmul_kernel(x_ptr, q, s, m, out_ptr, T, stride_xt, stride_ot, sq1, ss1, sm1, N: tl.constexpr,
                    KIN: tl.constexpr, KQ: tl.constexpr, NG: tl.constexpr, GROUP: tl.constexpr,
                    ROWBLK: tl.constexpr, WFMT: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr, KSPLIT,
                    SWAP: tl.constexpr = 0, DQ: tl.constexpr = 0, PS: tl.constexpr = 0):
    """Grid (cdiv(N, BLOCK_N), cdiv(T, BLOCK_M), splits): out[m-block, n-block] = x[m-block] @ W[n-block]^T, one
    quantized [N, KIN] matrix (a dense layer's weight at prefill sizes). Split s sums inputs [s KSPLIT, (s + 1)
    KSPLIT) (KSPLIT a multiple of BLOCK_K); with more than one split, out is the fp32 partials [splits, T, N]
    (row stride stride_ot) that `_split_sum_kernel` adds in split order. SWAP 4: the weight tile interleaved into
    input order (`_wtile`), one tl.dot a step; 5: the same with the weight tile the MMA's first operand (acc
    [BLOCK_N, BLOCK_M], stored transposed); 0: `_qdot`'s split tiles (GroupedConfig.swap; others refused). PS 1
    (swaps 0, 4, 5): the next step's scales loaded during this one (`_one`)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    ks = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < T
    m64 = offs_m.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    n64 = offs_n.to(tl.int64)
    DT = x_ptr.dtype.element_ty
    base = out_ptr + ks.to(tl.int64) * T * stride_ot  # split ks's [T, N] partial (ks is 0 unless split)
    k_lo = ks * KSPLIT
    k_hi = tl.minimum(ks * KSPLIT + KSPLIT, KIN)
    if SWAP == 5:  # the product transposed: [BLOCK_N, BLOCK_M]
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc = _one(acc, x_ptr + m64 * stride_xt, mask_m, q + n64 * sq1, s + (n64 // ROWBLK) * ss1, m + n64 * sm1, mask_n,
               k_lo, k_hi, KIN, KQ, NG, GROUP, WFMT, R, BLOCK_M, BLOCK_K, BLOCK_N, DT, DQ, PREC, SWAP, PS)
    if SWAP == 5:
        tl.store(base + m64[None, :] * stride_ot + offs_n[:, None], acc.to(out_ptr.dtype.element_ty),
                 mask=mask_n[:, None] & mask_m[None, :])
    else:
        tl.store(base + m64[:, None] * stride_ot + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _split_sum_kernel(part_ptr, out_ptr, numel, SPLITS: tl.constexpr, BLOCK: tl.constexpr):
    """out[i] = sum over s in order of part[s, i] (fp32), rounded once to out's dtype: split-K's fixed-order
    reduction (the same sum every run, unlike atomics)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.load(part_ptr + offs, mask=mask, other=0.0)
    for sp in range(1, SPLITS):
        acc += tl.load(part_ptr + sp * numel + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def block_k_for(w: QuantWeight, block_k: int) -> tuple[int, int]:
    """(BLOCK_K, R) for a matrix: the config's step, at least 32 for the nibble formats (each half is a tl.dot of
    >= 16) and 16 otherwise; R = groups per step when the step spans several whole groups, else 1 (a step inside
    one group: the group is a multiple of the step, or the row is a single group)."""
    bk = max(block_k, 32 if w.fmt in NIBBLES else 16)
    groups = w.scale.shape[-1]
    if groups == 1 or bk <= w.group:
        return bk, 1
    if bk % w.group or w.group & (w.group - 1):
        raise ValueError(f"{w.fmt} group {w.group} and BLOCK_K {bk} do not tile: use a power-of-two BLOCK_K")
    return bk, bk // w.group


INTERLEAVE_ENV = "TIERED_QGROUPED_INTERLEAVE"  # benchmarks: "0" keeps the split tiles of q4 and mxfp4
DQ_ENV = "TIERED_QGROUPED_DQ"  # benchmarks: the picks' GroupedConfig.dq for q4's interleaved tiles (0, 1, 2)
FEW_ENV = "TIERED_QGROUPED_FEW"  # benchmarks: the tiles at <= 16 rows an expert, e.g. "m16:n128:k64:w8:s4:swap3"
_FEW_KEYS = {"m": "block_m", "n": "block_n", "k": "block_k", "w": "warps", "s": "stages", "swap": "swap",
             "dq": "dq", "ps": "ps"}


@functools.lru_cache(maxsize=8)
def parse_few(spec: str) -> GroupedConfig:
    """TIERED_QGROUPED_FEW's tiles: fields `m16:n128:k64:w8:s4:swap3` (any subset; the rest GroupedConfig's
    defaults). A malformed spec raises ValueError naming it."""
    fields = {}
    for part in filter(None, (p.strip() for p in spec.split(":"))):
        key = part.rstrip("0123456789")
        if key not in _FEW_KEYS or key == part:
            raise ValueError(f"{FEW_ENV}: cannot read {part!r} in {spec!r} (want fields such as "
                             "m16:n128:k64:w8:s4:swap3)")
        fields[_FEW_KEYS[key]] = int(part[len(key):])
    return GroupedConfig(**fields)


DQ_DEFAULT = 0  # q4's codes to values in the picked interleaved tiles (GroupedConfig.dq)
PS_ENV = "TIERED_QGROUPED_PS"  # benchmarks: "0" loads each step's scales in that step in the picked interleaved tiles
# the picked swap-5 tiles (m128) load the next step's scales during this one (GroupedConfig.ps 1); the others do
# not. Session 35 (benchmarks/results/prefill-scales-2026-12-04-h200-s35.json), us a layer, ps 1 against 0: swap 5
# m128 (call B), q4 10.6B T 2048 (reference routing) 757 / 837, gpt-oss's shape 1,395 / 1,609, mxfp4 10.6B 993 /
# 1,063; swap 4 m64, q4 10.6B T 512 383 / 391, gpt-oss's shape 695 / 729, but the 397B shape at T 2048 4,753 /
# 4,432; swap 0 (call D), q4 m16 at 1 / 8 rows an expert 134 / 137 and 262 / 268, but q8 m16 173 / 135 and 350 /
# 259, mxfp4 m16 238 / 228, q8 m128 at T 2048 933 / 938, and batches of 128 rows (q4+q4) 30,765 / 31,522 tok/s


def _dq(fmt: str) -> int:
    """The picks' dq: DQ_DEFAULT for q4 (TIERED_QGROUPED_DQ overrides it), 0 for other formats (it reads q4 only)."""
    if fmt != "q4":
        return 0
    v = os.environ.get(DQ_ENV, "")
    if v not in ("", "0", "1", "2"):
        raise ValueError(f"{DQ_ENV} must be 0, 1 or 2, got {v!r}")
    return int(v) if v else DQ_DEFAULT


def _ps(default: int) -> int:
    """GroupedConfig.ps of a picked interleaved tile: TIERED_QGROUPED_PS (0 / 1) when set, else `default`."""
    v = os.environ.get(PS_ENV, "")
    if v not in ("", "0", "1"):
        raise ValueError(f"{PS_ENV} must be 0 or 1, got {v!r}")
    return int(v) if v else default


def pick_qconfig(rows: int, num_experts: int, fmt: str) -> GroupedConfig:
    """Tiles for a quantized pool: moe_grouped's choice by rows per expert (measured for bf16 on the H200), with
    the reduction step capped at the format's group (one scale per step and row); q4 and mxfp4 take their own tiles
    at 16 rows an expert or fewer (q4) and above 16 (the interleaved weight tile: q4 above 16 rows, mxfp4 from
    64; both take the many-rows tile from 64), where they measured faster. At 16 rows an expert or fewer (the batch
    decode regime), TIERED_QGROUPED_FEW's tiles when set (benchmarks compare tiles that way); with
    TIERED_QGROUPED_INTERLEAVE=0, q4 and mxfp4 keep the split tiles (benchmarks time the two in one call). The
    swap-5 tiles load the next step's scales during this one (GroupedConfig.ps 1; the others do not);
    TIERED_QGROUPED_PS=0 / 1 sets it for every pick, for a comparison."""
    c = bf16_config(rows, num_experts)
    spec = os.environ.get(FEW_ENV, "")
    if spec and c.block_m == 16:
        return parse_few(spec)
    if fmt == "q4" and c.block_m == 16:
        # two groups a step (64 bytes of each weight row): session 27 (batch-align-2026-12-03-h200-s27.json, call C)
        # timed it against one group a step at 1 / 8 rows an expert, 181 / 257 us a layer against 191 / 271 in the
        # sweep, and gate_up + down 239 against 251 us a layer in the B = 128 decode's profile (about 5%)
        return GroupedConfig(block_m=16, block_n=c.block_n, block_k=128, warps=c.warps, stages=3, ps=_ps(0))
    interleave = fmt in NIBBLES and os.environ.get(INTERLEAVE_ENV, "1") != "0"
    if interleave and c.block_m == 128:
        # many rows an expert, the weight tile interleaved and first (swap 5). Session 33 (benchmarks/results/
        # quant-interleave-2026-12-04-h200-s33.json), T 2048, us a layer against the split tiles below: q4 (call A)
        # 10.6B shape 787 / 937, gpt-oss's shape 1,614 / 1,974 (1.19x, 1.22x); mxfp4 (call B) gpt-oss's shape
        # 1,814 / 2,187 (1.21x)
        return GroupedConfig(block_m=128, block_n=64, block_k=64, warps=4, stages=4, swap=5, dq=_dq(fmt),
                             ps=_ps(1))
    if fmt in NIBBLES and c.block_m == 128:
        # many rows an expert: half as wide a tile on 4 warps. Session 31 (benchmarks/results/
        # gpt-oss-prefill-batch-2026-12-04-h200-s31.json, tile_sweeps), T 2048, us a layer against bf16's m128 n128
        # w8 s3: 10.6B shape mxfp4 1,041 / 1,153, q4 943 / 1,029; gpt-oss's shape mxfp4 2,188 / 2,472, q4 1,988 /
        # 2,197 (1.09-1.13x); q8 gained nothing (858 / 857), so it keeps bf16's tiles
        return GroupedConfig(block_m=128, block_n=64, block_k=64, warps=4, stages=4, ps=_ps(0))
    if interleave and c.block_m == 64 and rows >= 64 * min(num_experts, rows):
        # 64-96 rows an expert: the many-rows tile (swap 5, m128) already. Session 33 (call B), mxfp4 at gpt-oss's
        # shape, T 512 (64 rows an expert): 807 us a layer against 1,004 for bf16's m64 split tile (1.24x); session
        # 35 (call B), q4 there: 598 with the scales a step ahead against 730 for the swap-4 m64 tile (1.22x; 695
        # with its own scales a step ahead)
        return GroupedConfig(block_m=128, block_n=64, block_k=64, warps=4, stages=4, swap=5, dq=_dq(fmt), ps=_ps(1))
    if interleave and fmt == "q4" and c.block_m == 64:
        # 17-63 rows an expert: bf16's tile with the weight tile interleaved (swap 4). Session 33 (call A), q4 at T
        # 512, us a layer against the split tile: 10.6B shape 375 / 395, gpt-oss's shape 734 / 801 (1.05x, 1.09x)
        return GroupedConfig(block_m=64, block_n=c.block_n, block_k=min(c.block_k, 64), warps=c.warps,
                             stages=c.stages, swap=4, dq=_dq(fmt), ps=_ps(0))
    cap = {"q8": 128, "q4": 64, "fp8": 128, "mxfp4": 64}[fmt]
    return GroupedConfig(block_m=c.block_m, block_n=c.block_n, block_k=min(c.block_k, cap), warps=c.warps,
                         stages=c.stages, ps=_ps(0))


def _strides(w: QuantWeight) -> tuple[int, int, int, int, int, int]:
    """(slot, row) strides of q, scale and min (min = scale when absent)."""
    m = w.min if w.min is not None else w.scale
    return w.q.stride(0), w.q.stride(1), w.scale.stride(0), w.scale.stride(1), m.stride(0), m.stride(1)


def _codes(w: QuantWeight) -> Tensor:
    """The packed codes as the kernel reads them: fp8 off CUDA as uint8 (decoded from its bits)."""
    return w.q.view(torch.uint8) if w.fmt == "fp8" and not w.q.is_cuda else w.q


def _geometry(w: QuantWeight, block_k: int) -> dict:
    bk, r = block_k_for(w, block_k)
    fmt = FP8_BITS if w.fmt == "fp8" and not w.q.is_cuda else WFMT[w.fmt]
    return dict(KQ=w.q.shape[-1], NG=w.scale.shape[-1], GROUP=w.group, ROWBLK=w.group if w.fmt == "fp8" else 1,
                WFMT=fmt, R=r, BLOCK_K=bk)


def _step(w: QuantWeight, cfg: GroupedConfig) -> int:
    """The reduction step the expert kernels take over `w`: the config's, kept inside one group under swap 3 (its
    scales multiply each step's product; a row of one group has one scale whatever the step)."""
    return min(cfg.block_k, w.group) if cfg.swap == 3 and w.scale.shape[-1] > 1 else cfg.block_k


def qgrouped_ok(W, *, interpret: bool = False) -> bool:
    """Whether these kernels serve a pool's experts: gate/up/down quantized stacks [S, ...] of one fused format,
    gate and up with one layout, every part contiguous along its last dim, on CUDA (or, for tests, Triton's CPU
    interpreter when `interpret` is passed)."""
    ws = (W.gate, W.up, W.down)
    if not all(isinstance(w, QuantWeight) and len(w.lead) == 1 for w in ws):
        return False
    if len({w.fmt for w in ws}) != 1 or W.gate.fmt not in WFMT or _strides(W.gate) != _strides(W.up):
        return False
    if not (W.gate.q.is_cuda or interpret):
        return False
    return all(t.stride(-1) == 1 for w in ws for t in w.parts().values())


class QuantGroupedMoE(GroupedMoE):
    """GroupedMoE over quantized expert stacks: the same rows, waves and result, other kernels."""

    def __init__(self, x: Tensor, ids: Tensor, weights: Tensor, num_experts: int, fmt: str,
                 config: GroupedConfig | None = None) -> None:
        """x [T, D] compute dtype, ids [T, K] experts in [0, E), weights [T, K], fmt the pool's format."""
        T, K = ids.shape
        super().__init__(x, ids, weights, num_experts, config or pick_qconfig(T * K, num_experts, fmt))

    def wave(self, W, slot_map: Tensor, act: Any = None) -> None:
        """Compute the rows of the experts that `slot_map` ([E] int64: slot row, -1 = not this wave) places.
        W: gate, up [S, F, D] and down [S, D, F] QuantWeight stacks (store.disk.ExpertWeights), with gpt-oss's
        gate_bias, up_bias [S, F] and down_bias [S, D] where it has them; act: None (SwiGLU) or ClampedSwiGLU."""
        g, u, d = W.gate, W.up, W.down
        if not qgrouped_ok(W, interpret=True):
            raise ValueError("QuantGroupedMoE: gate/up/down must be [S, ...] QuantWeight stacks of one format "
                             f"({', '.join(WFMT)}), gate and up with one layout, parts contiguous along the last dim")
        x, cfg, al = self.x, self.cfg, self.aligned
        Fe, D = g.matrix
        if x.shape[1] != D or tuple(d.matrix) != (D, Fe):
            raise ValueError(f"x has hidden size {x.shape[1]}; experts gate {list(g.matrix)}, down {list(d.matrix)}")
        if self.h is None:
            self.h = torch.empty(al.num_rows, Fe, dtype=x.dtype, device=x.device)
        be = al.block_expert
        bslot = torch.where(be >= 0, slot_map.index_select(0, be.clamp(min=0)), -1)  # [P / block_m]
        nb = be.shape[0]
        prec = "ieee" if x.dtype == torch.float32 else "tf32"
        gm = g.min if g.min is not None else g.scale
        um = u.min if u.min is not None else u.scale
        dm = d.min if d.min is not None else d.scale
        ops = ExpertOperands(g.q, u.q, d.q, act=Activation.SWIGLU if act is None else Activation.SWIGLU_CLAMP,
                             gate_bias=getattr(W, "gate_bias", None), up_bias=getattr(W, "up_bias", None),
                             down_bias=getattr(W, "down_bias", None),
                             **({} if act is None else {"alpha": float(act.alpha), "limit": float(act.limit)}))
        check_biases(ops, Fe, D)
        gb, ub, sb = ops.bias_args(("gate_bias", "up_bias"))
        db, dbs = ops.bias_args(("down_bias",))
        _qgrouped_gate_up_kernel[(triton.cdiv(Fe, cfg.block_n), nb)](
            x, al.rows, bslot, _codes(g), g.scale, gm, _codes(u), u.scale, um, self.h, al.num_rows, x.stride(0),
            *_strides(g), D=D, F=Fe, K=self.K, **_geometry(g, _step(g, cfg)), BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n, PREC=prec, SWAP=cfg.swap, gb_ptr=gb, ub_ptr=ub, stride_bs=sb, alpha=ops.alpha,
            limit=ops.limit, ACT=int(ops.act), HAS_BIAS=ops.has_bias, DQ=cfg.dq, PS=cfg.ps, num_warps=cfg.warps,
            num_stages=cfg.stages)
        _qgrouped_down_kernel[(triton.cdiv(D, cfg.block_n), nb)](
            self.h, al.rows, bslot, self.weights, _codes(d), d.scale, dm, self.out, al.num_rows, *_strides(d), D=D,
            F=Fe, **_geometry(d, _step(d, cfg)), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, PREC=prec,
            SWAP=cfg.swap, db_ptr=db, stride_bs=dbs, HAS_BIAS=ops.has_bias, DQ=cfg.dq, PS=cfg.ps, num_warps=cfg.warps,
            num_stages=cfg.stages)


def moe_grouped_quant(x: Tensor, ids: Tensor, weights: Tensor, W, slot_map: Tensor,
                      config: GroupedConfig | None = None, *, act: Any = None) -> Tensor:
    """All experts in one wave: x [T, D], ids [T, K] experts, weights [T, K], W quantized stacks (with gpt-oss's
    biases where it has them), slot_map [E] int64 (every routed expert must have a slot) -> [T, D]. No host sync.
    act: None (SwiGLU) or gpt-oss's ClampedSwiGLU."""
    run = QuantGroupedMoE(x, ids, weights, slot_map.shape[0], W.gate.fmt, config)
    run.wave(W, slot_map, act)
    return run.result()


def qmatmul_ok(x: Tensor, w: QuantWeight, *, interpret: bool = False) -> bool:
    """Whether `quant_matmul` serves x @ w^T: one matrix (no stack dims) of a fused format, parts contiguous
    along the last dim, x on CUDA (or the interpreter, for tests)."""
    return (w.fmt in WFMT and not w.lead and (x.is_cuda or interpret)
            and all(t.stride(-1) == 1 for t in w.parts().values()))


# quant_matmul's tiles, largest first: (block_m, block_n, warps, stages); block_k is 64. Session 24's call C swept
# 14 tiles at the 10.6B dense shapes (qkv 5120 x 2048, o_proj 2048 x 4096, lm_head 151936 x 2048) and 16-2048 rows;
# these are the ones that won somewhere (benchmarks/results/quant-libraries-2026-12-03-h200-s24.json)
_MATMUL_TILES = ((256, 128, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 4), (32, 64, 4, 4), (16, 32, 2, 4))
MATMUL_MIN_PROGRAMS = 128  # about one wave of the H200's 132 multiprocessors
SUM_BLOCK = 1024  # outputs a program of the split-K sum adds
SPLIT_MAX_ROWS = 256  # up to this many rows pick_matmul_config splits the reduction of a narrow matrix
SPLIT_PROGRAMS = 256  # ... until the grid has this many programs (about two a multiprocessor)
SPLIT_MIN_INPUTS = 512  # ... keeping at least this many inputs (8 steps of 64) in each split


def pick_matmul_config(rows: int, n: int, fmt: str, k: int | None = None) -> GroupedConfig:
    """Tiles for one dense [n, k] matrix at `rows` rows.

    Up to SPLIT_MAX_ROWS rows of a narrow matrix: a tile as tall as the rows (16 to 128) and 64 outputs wide, with
    the reduction split over the fewest programs (a power of two) that give SPLIT_PROGRAMS programs, each keeping at
    least SPLIT_MIN_INPUTS inputs; where that needs no split (a wide matrix such as the lm_head, or k short; k None:
    never), the rule below. Session 25's call A swept 7 tiles x splits 1-8 at 8-256 rows of the
    10.6B qkv (5120 x 2048) and o_proj (2048 x 4096): this rule's pick is the fastest or within 6% of it at all 12
    points (o_proj at 128 rows 18.4 us against 31.4 without a split, qkv at 8 rows 11.4 against 14.0).
    Else: the largest tile no taller than the rows need whose grid still has MATMUL_MIN_PROGRAMS programs, else the
    smallest. Larger tiles dequantize each weight tile for more rows; smaller ones keep the multiprocessors busy on
    a narrow matrix. Session 24's call C read that rule at 512 and 2,048 rows (in-sample: the fastest of 14 tiles
    at 9 of 12 points, within 15% at the others; out of sample in call D 0.87-1.0 of the best). `fmt` does not
    change the choice: every format's group allows a 64-input step. ps: TIERED_QGROUPED_PS when set, else 0.
    """
    if rows <= SPLIT_MAX_ROWS and k is not None:
        bm = min(128, max(16, triton.next_power_of_2(rows)))
        programs = triton.cdiv(n, 64) * triton.cdiv(rows, bm)
        split = 1
        while split * programs < SPLIT_PROGRAMS and 2 * split * SPLIT_MIN_INPUTS <= k:
            split *= 2
        if split > 1:
            return GroupedConfig(block_m=bm, block_n=64, block_k=64, warps=4, stages=3 if bm == 128 else 4,
                                 split=split, ps=_ps(0))
    tall = max(16, triton.next_power_of_2(rows))
    fits = [t for t in _MATMUL_TILES if t[0] <= tall] if rows > 16 else [_MATMUL_TILES[-1]]
    for bm, bn, wp, st in fits:
        if triton.cdiv(n, bn) * triton.cdiv(rows, bm) >= MATMUL_MIN_PROGRAMS:
            break
    return GroupedConfig(block_m=bm, block_n=bn, block_k=64, warps=wp, stages=st, ps=_ps(0))


def quant_matmul(x: Tensor, w: QuantWeight, config: GroupedConfig | None = None) -> Tensor:
    """x [T, K] @ dequantize(w)^T -> [T, N] in x's dtype, dequantizing tiles in registers (no dense copy of w):
    the prefill-sized product of a quantized dense layer. With config.split > 1 the reduction is shared by that
    many programs (whole steps each), which write fp32 partials that one more launch adds in split order. No host
    sync."""
    n, k = w.matrix
    T = x.shape[0]
    if x.stride(-1) != 1:
        x = x.contiguous()
    cfg = config or pick_matmul_config(T, n, w.fmt, k)
    if cfg.swap not in (0, 4, 5):
        raise ValueError(f"quant_matmul takes GroupedConfig.swap 0, 4 or 5, got {cfg.swap}")
    geo = _geometry(w, cfg.block_k)
    bk = geo["BLOCK_K"]
    ksplit = triton.cdiv(triton.cdiv(k, cfg.split), bk) * bk  # inputs a split, whole steps
    splits = triton.cdiv(k, ksplit)
    out = torch.empty(T, n, dtype=x.dtype, device=x.device)
    dst = out if splits == 1 else torch.empty(splits, T, n, dtype=torch.float32, device=x.device)
    m = w.min if w.min is not None else w.scale
    _qmatmul_kernel[(triton.cdiv(n, cfg.block_n), triton.cdiv(T, cfg.block_m), splits)](
        x, _codes(w), w.scale, m, dst, T, x.stride(0), n, w.q.stride(0), w.scale.stride(0), m.stride(0),
        N=n, KIN=k, **geo, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        PREC="ieee" if x.dtype == torch.float32 else "tf32", KSPLIT=ksplit, SWAP=cfg.swap, DQ=cfg.dq, PS=cfg.ps,
        num_warps=cfg.warps, num_stages=cfg.stages)
    if splits > 1:
        _split_sum_kernel[(triton.cdiv(T * n, SUM_BLOCK),)](dst, out, T * n, SPLITS=splits, BLOCK=SUM_BLOCK,
                                                             num_warps=4)
    return out
