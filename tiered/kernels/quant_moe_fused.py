"""One token's K q4 experts in one kernel: gate, up, SwiGLU and the down projection fused, with the partial down
products summed by a second, small kernel in a fixed order (deterministic).

Owns: the Triton kernels `_qmoe` (grid (F / BF, T*K): program (b, t*K + k) computes rows [b*BF, b*BF + BF) of
expert k's gate and up for token t, h = silu(g) * u * w_k (kept in a scratch row, fp32), then that slice of the
down projection for all D outputs: part[(t*K + k) * NB + b, :] = down[slot_k][:, slice] @ h[slice]) and `_qsum`
(grid (D / BR, T): y[t] = the sum of token t's K * NB partial rows, in index order, rounded once to the output
dtype); their tile config `FusedConfig` (table `TUNED_FUSED`, picked by `pick_fused`); the launcher
`quant_moe_fused`; `fused_ok` (whether it serves a set of weights) and `experts_quant_step` (the decode callers'
entry: the fused kernels where they serve and are on, else quant_moe.experts_quant_decode).
Does not own: the q4 format (layout/quant.py), the word tile and its helpers (quant_moe.py: `dot_rows_words`,
`word_nibble`), the two-kernel path (quant_moe.quant_gate_up / quant_down).

Why. A decode step's two expert kernels (gate_up, then down) are short: at the 10.6B shape a layer's 8 experts
are 14 MB of gate/up and 7 MB of down codes, a wave or two of programs each, so each kernel's ramp-up and tail are
a large part of its time (notes/Q4_DECODE.md, session 8: 71 + 67 us a token, 1.6 and 0.85 TB/s). Here each
program reads its gate/up rows and then the matching columns of the down matrix (BF / 2 bytes of each of the D
rows, with their groups' scales and minima), so the whole MoE is one wave of programs and one launch; the
reduction of the partial rows (K * F / BF of D floats, a few hundred KB, read from L2) is the second launch.
Summation order: within a program as the word tile sums (per word, per group, then the groups of the slice);
the partials in index order. It differs from the two-kernel path's order, so results agree within fp32
rounding, not bitwise.

q4 only, read as int32 words (quant_moe.words_ok for gate, up and down); BF is a multiple of 8 inputs that
either divides the down matrix's group or is a multiple of it, and divides F. Where it does not serve (other
formats, odd shapes), experts_quant_step takes the two-kernel path. TIERED_QMOE_FUSED=0 turns it off (the
benchmarks time both).

Legend: T tokens, K experts a token, D hidden (gate/up inputs, down outputs), F expert FFN (gate/up outputs,
down inputs), BF FFN rows a program, BN gate/up rows per word-tile call, BD down rows per step, NB = F / BF.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from tiered.layout.quant import QuantWeight
from tiered.kernels import quant_moe as qm

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU runtime does not need Triton
    triton = None

from tiered.kernels.fused_norm import round_weight, weight_rounding  # noqa: E402 (None without Triton)
from tiered.kernels.pdl import gdc_enter, launch_args  # noqa: E402

ENV = "TIERED_QMOE_FUSED"


@dataclass(frozen=True)
class FusedConfig:
    """Tiles of the fused q4 MoE (powers of two): `bf` FFN rows a program (a multiple of 8), `bn` gate/up rows per
    word-tile pass and `bg` groups per step of it, `bd` down rows per step, `warps`; `br` outputs per program of
    the partial sum."""
    bf: int = 16
    bn: int = 16
    bg: int = 8
    bd: int = 2048
    warps: int = 8
    br: int = 256

    def __post_init__(self) -> None:
        for name in ("bf", "bn", "bg", "bd", "warps", "br"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"FusedConfig.{name} must be a power of two, got {v}")
        if self.bf < 8 or self.bn > self.bf:
            raise ValueError(f"FusedConfig: bf must be at least 8 and at least bn, got bf={self.bf} bn={self.bn}")


# (D, F) -> config; D hidden, F expert FFN. The default serves shapes without an entry. Entries come from
# benchmarks/bench_quant_kernels.py --fused-sweep on the H200, applied by tools/apply_tuned.py --fused.
TUNED_FUSED: dict[tuple, FusedConfig] = {
}


def pick_fused(d: int, f: int) -> FusedConfig:
    """The fused config for experts of hidden size d and FFN f: the table's, else the default, with bf shrunk to
    divide f where it can."""
    cfg = TUNED_FUSED.get((d, f)) or FusedConfig()
    bf = cfg.bf
    while bf > 8 and f % bf:
        bf //= 2
    return cfg if bf == cfg.bf else FusedConfig(bf=bf, bn=min(cfg.bn, bf), bg=cfg.bg, bd=cfg.bd, warps=cfg.warps,
                                                br=cfg.br)


def enabled() -> bool:
    """Whether decode takes the fused kernels where they serve (TIERED_QMOE_FUSED=0: off)."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "off", "false", "no")


def fused_ok(x: Tensor, gate: QuantWeight, up: QuantWeight, down: QuantWeight, cfg: FusedConfig, *,
             interpret: bool = False) -> bool:
    """Whether the fused kernels serve these stacks: q4 word tiles for all three (quant_moe.words_ok), gate and up
    in one layout, and a slice width cfg.bf that divides F and meets the down matrix's groups whole or in equal
    parts."""
    if triton is None or not all(qm.kernel_ok(x, w, interpret=interpret) and qm.words_ok(w)
                                 for w in (gate, up, down)):
        return False
    if qm._strides(gate) != qm._strides(up) or not (gate.lead and down.lead):
        return False
    fe, d = gate.matrix
    g = down.group
    return (down.matrix == (d, fe) and fe % cfg.bf == 0 and (cfg.bf % g == 0 or g % cfg.bf == 0)
            and down.scale.shape[-1] * g >= fe)


@functools.cache
def _kernels():
    """(qmoe, qsum), decorated on first use."""
    return decorate_kernels()


def decorate_kernels():
    """(qmoe, qsum) freshly decorated (compiled or interpreted, as TRITON_INTERPRET says now)."""
    bind = qm.helper_binder({"down_step": triton.jit(_down_step)})
    return bind(_qmoe), triton.jit(_qsum)


# The kernel bodies below are plain functions until _kernels() decorates them (Triton reads their source).

def _qmoe(x_ptr, slot_ptr, wt_ptr, gq, gs, gm, uq, us, um, dq, ds, dm, h_ptr, part_ptr, slot_base, stride_xt,
          stride_qs, stride_qn, stride_ss, stride_sn, stride_ms, stride_mn, dstride_qs, dstride_qn, dstride_ss,
          dstride_sn, dstride_ms, dstride_mn, D: tl.constexpr, F: tl.constexpr, K: tl.constexpr,
          KQ: tl.constexpr, NG: tl.constexpr, GROUP: tl.constexpr, DGROUP: tl.constexpr, BF: tl.constexpr,
          BN: tl.constexpr, BG: tl.constexpr, BK: tl.constexpr, UK: tl.constexpr, BD: tl.constexpr,
          WR: tl.constexpr, GDC: tl.constexpr = False):
    """Grid (F / BF, T*K): see the module docstring. gate/up rows are [F, D] (KQ bytes a row, NG groups of GROUP);
    down rows are [D, F] as int32 words (DGROUP inputs a group)."""
    gdc_enter(GDC)
    b = tl.program_id(0)
    pair = tl.program_id(1)
    NB: tl.constexpr = F // BF
    slot = tl.load(slot_ptr + pair).to(tl.int64) + slot_base
    w = round_weight(tl.load(wt_ptr + pair).to(tl.float32), WR)
    x_row = x_ptr + (pair // K) * stride_xt
    h_row = h_ptr + pair.to(tl.int64) * F
    # the down projection's columns [b*BF, b*BF + BF) of every output row, BD rows a step: the first step's codes,
    # scales and minima are loaded now, so that they are in flight during gate and up (they depend on the slot only)
    WB: tl.constexpr = BF // 8  # int32 words of the slice in a row
    PART: tl.constexpr = BF if BF < DGROUP else DGROUP  # inputs of the slice in one group (all of it, or a group)
    NP: tl.constexpr = BF // PART  # groups (or parts of one) in the slice
    WP: tl.constexpr = PART // 8
    offs_w = tl.arange(0, WB)
    gi = (b * BF) // DGROUP + tl.arange(0, NP)  # [NP] the groups of the slice
    dq_row = dq + slot * dstride_qs + b * WB + offs_w  # [WB] the slice's words in row 0
    ds_row = ds + slot * dstride_ss + gi
    dm_row = dm + slot * dstride_ms + gi
    nc, ns, nm = down_step(dq_row, ds_row, dm_row, 0, dstride_qn, dstride_sn, dstride_mn, D, BD)
    # gate and up for this program's BF rows, BN at a time (the word tile, both matrices in one pass)
    for r0 in tl.static_range(0, BF, BN):
        offs_f = b * BF + r0 + tl.arange(0, BN)
        mask_f = offs_f < F
        f64 = offs_f.to(tl.int64)
        qo = slot * stride_qs + f64 * stride_qn
        so = slot * stride_ss + f64 * stride_sn
        mo = slot * stride_ms + f64 * stride_mn
        g, u = dot_rows_words(x_row, gq + qo, gs + so, gm + mo, uq + qo, us + so, um + mo, mask_f, D, KQ, NG,
                              GROUP, BN, BG, BK, UK, True)
        tl.store(h_row + offs_f, g * tl.sigmoid(g) * u * w, mask=mask_f)
    tl.debug_barrier()  # the slice of h, written by all threads, is read by all threads below
    hw = h_row + b * BF + offs_w * 8  # [WB] pointers: input 8w + j of the slice at hw + j
    xw = tl.zeros([WB], tl.float32)
    for j in tl.static_range(8):
        xw += tl.load(hw + j)
    xs = tl.sum(tl.reshape(xw, [NP, WP]), axis=1)[None, :]  # [1, NP] sums of h over each group's part
    out = part_ptr + (pair.to(tl.int64) * NB + b) * D
    for d0 in tl.static_range(0, D, BD):
        c = nc
        sv = ns
        mv = nm
        if d0 + BD < D:  # the next step's codes, scales and minima in flight during this step
            nc, ns, nm = down_step(dq_row, ds_row, dm_row, d0 + BD, dstride_qn, dstride_sn, dstride_mn, D, BD)
        t = tl.zeros([BD, WB], tl.float32)
        for j in tl.static_range(8):
            t += word_nibble(c, j) * tl.load(hw + j)[None, :]
        dsum = tl.sum(tl.reshape(t, [BD, NP, WP]), axis=2)  # [BD, NP]
        y = tl.sum((dsum - xs) * 16.0 * sv + mv * xs, axis=1)  # [BD]
        offs_d = d0 + tl.arange(0, BD)
        tl.store(out + offs_d, y, mask=offs_d < D)


def _down_step(dq_row, ds_row, dm_row, d0, dstride_qn, dstride_sn, dstride_mn, D: tl.constexpr, BD: tl.constexpr):
    """([BD, WB] int32 codes, [BD, NP] fp32 scales, [BD, NP] fp32 minima) of down rows [d0, d0 + BD) of a slice
    (rows past D: zeros)."""
    d64 = (d0 + tl.arange(0, BD)).to(tl.int64)
    md = (d64 < D)[:, None]
    c = tl.load(dq_row[None, :] + d64[:, None] * dstride_qn, mask=md, other=0)
    sv = tl.load(ds_row[None, :] + d64[:, None] * dstride_sn, mask=md, other=0).to(tl.float32)
    mv = tl.load(dm_row[None, :] + d64[:, None] * dstride_mn, mask=md, other=0).to(tl.float32)
    return c, sv, mv


def _qsum(part_ptr, y_ptr, stride_yt, D: tl.constexpr, P: tl.constexpr, PC: tl.constexpr, BR: tl.constexpr,
          GDC: tl.constexpr = False):
    """Grid (cdiv(D, BR), T): y[t, r-block] = the sum of part[t*P + p, r-block] over p, PC rows at a time in index
    order (fp32), rounded once to y's dtype."""
    gdc_enter(GDC)
    t = tl.program_id(1)
    offs_r = tl.program_id(0) * BR + tl.arange(0, BR)
    mask_r = offs_r < D
    acc = tl.zeros([BR], tl.float32)
    rows = part_ptr + t.to(tl.int64) * P * D
    for p0 in tl.static_range(0, P, PC):
        p = p0 + tl.arange(0, PC)
        v = tl.load(rows + p[:, None] * D + offs_r[None, :], mask=(p[:, None] < P) & mask_r[None, :], other=0.0)
        acc += tl.sum(v, axis=0)
    tl.store(y_ptr + t * stride_yt + offs_r, acc.to(y_ptr.dtype.element_ty), mask=mask_r)


def quant_moe_fused(x: Tensor, slots: Tensor, weights: Tensor, gate: QuantWeight, up: QuantWeight,
                    down: QuantWeight, dtype: torch.dtype, config: FusedConfig | None = None, *, slot_base: int = 0,
                    round_to: torch.dtype | None = None) -> Tensor:
    """x [T, D], slots and weights [T, K] (rows slot_base + slots of the stacks; weights rounded to `round_to` in the
    kernel, None: as given) -> [T, D] in `dtype`: sum over k of w[t, k] * down(silu(gate x) * up x). The caller
    checks fused_ok. No host sync; every shape depends on T, K and the weights only (CUDA graphs capture it)."""
    fe, d = gate.matrix
    cfg = config or pick_fused(d, fe)
    K = slots.shape[-1]
    flat = slots.reshape(-1)
    T = flat.numel() // K
    x = x.contiguous()
    wts = weights.reshape(-1).contiguous()
    nb = fe // cfg.bf
    h = torch.empty(T * K, fe, dtype=torch.float32, device=x.device)
    part = torch.empty(T * K * nb, d, dtype=torch.float32, device=x.device)
    y = torch.empty(T, d, dtype=dtype, device=x.device)
    tiles = qm._tiles(qm.QConfig(bn=cfg.bn, bg=cfg.bg, warps=cfg.warps, algo=2), gate)
    pdl = launch_args(x.device)
    gm = gate.min if gate.min is not None else gate.scale
    um = up.min if up.min is not None else up.scale
    dm = down.min if down.min is not None else down.scale
    qmoe, qsum = _kernels()
    qmoe[(nb, T * K)](x, flat, wts, qm._codes(gate, 2), gate.scale, gm, qm._codes(up, 2), up.scale, um,
                      qm._codes(down, 2), down.scale, dm, h, part, int(slot_base), x.stride(0), *qm._strides(gate, 2),
                      *qm._strides(down, 2), D=d, F=fe, K=K, KQ=gate.q.shape[-1], NG=gate.scale.shape[-1],
                      GROUP=gate.group, DGROUP=down.group, BF=cfg.bf, BN=cfg.bn, BG=tiles["BG"], BK=tiles["BK"],
                      UK=tiles["UK"], BD=min(cfg.bd, triton.next_power_of_2(d)), WR=weight_rounding(round_to),
                      num_warps=cfg.warps, **pdl)
    p = K * nb
    br = min(cfg.br, triton.next_power_of_2(d))
    qsum[(triton.cdiv(d, br), T)](part, y, y.stride(0), D=d, P=p, PC=min(16, triton.next_power_of_2(p)), BR=br,
                                  num_warps=4, **pdl)
    return y


def experts_quant_step(x: Tensor, slots: Tensor, weights: Tensor, gate: QuantWeight, up: QuantWeight,
                       down: QuantWeight, *, interpret: bool = False, fused: bool | None = None,
                       config: FusedConfig | None = None, slot_base: int = 0,
                       round_to: torch.dtype | None = None) -> Tensor | None:
    """One token's K quantized experts (the arguments of quant_moe.experts_quant_decode): the fused kernels where
    they serve and `fused` (None: TIERED_QMOE_FUSED, on by default) allows, else experts_quant_decode's two
    kernels. None when neither serves (the caller runs the reference)."""
    use = enabled() if fused is None else fused
    if use and gate.fmt == "q4":
        fe, d = gate.matrix
        cfg = config or pick_fused(d, fe)
        if fused_ok(x, gate, up, down, cfg, interpret=interpret):
            K = slots.shape[-1]
            return quant_moe_fused(x, slots.reshape(1, K), weights.reshape(1, K), gate, up, down, x.dtype, cfg,
                                   slot_base=slot_base, round_to=round_to)
    return qm.experts_quant_decode(x, slots, weights, gate, up, down, interpret=interpret, slot_base=slot_base,
                                   round_to=round_to)
