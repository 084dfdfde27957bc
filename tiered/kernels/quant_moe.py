"""Fused dequantize-and-multiply for quantized weights (q8, q4, fp8, mxfp4): decode-sized products that read
the packed codes and scales in place, so no dense copy of a quantized weight is made on the decode path (a
prompt's dense matrices, from dequant_rows() rows, are copied once a call: quant_dequant.py).

Owns: the Triton kernels `_qgemv` (out[t] = x[t] @ W[slot[t]]^T: dense matrices at a few rows, or rows of a
stack), `_qgate_up` (one token's K experts: gate and up, SwiGLU or gpt-oss's clamped form with its gate and up
biases, into h [T*K, F] fp32) and `_qdown` (h through the K experts' down projections, plus gpt-oss's down biases,
routing weights applied and summed over K); their tile
configs (`QConfig`, picked per format and shape by `pick_config` from the table `TUNED`; `algo` chooses the
grouped, the flat or the word tile, below); the launchers
`quant_matvec`, `quant_gate_up`, `quant_down` (and `down_h_layout`: how h passes between the last two); the
reference `quant_matvec_ref` (dequantize then matmul,
tiered/layout/quant.py); and the two callers the model uses: `qlinear` (a dense matrix, quantized or
not) and `experts_quant_decode` (one token's K quantized experts).
Does not own: the formats or their reference dequantization (layout/quant.py), the bf16 MoE kernels.

How a tile is read. Every format groups its inputs along K, so a program streams [BN, BG, GP] tiles of
packed units (BN rows, BG groups, GP = the group's packed units padded to a power of two; q4 and mxfp4
pack two inputs per byte, low nibble first). Each group's partial dot product is summed in fp32, then
multiplied by that group's scale once ([BN, BG] scale loads per tile, never per element); q4's minimum
enters as min * sum(x over the group), with the group sums of x computed once per tile and shared by all
BN rows. With CONV = 1 a 4-bit code c is turned into the float 1 + c/16 by placing it in the mantissa of
1.0 (shift, and, or: full-rate integer ops instead of the quarter-rate int->float conversion), and the
offset is removed per group: sum(c x) = 16 (sum((1 + c/16) x) - sum x).
The flat tile (QConfig.algo = 1, _dot_rows_flat; power-of-two groups only, else the grouped tile runs): a
step is [BN, BG * group] inputs read as contiguous [BN, packed units] code rows (16-byte loads per thread);
4-bit codes are decoded to two [BN, bytes] tensors and interleaved back into input order, so x is one
contiguous [BK] vector for all BN rows; the group sums (of c x and, for q4, of x) are one reduction in the
product's own layout; the gate and up rows of an expert are read in one pass (both code tiles in flight
together) and the next step's codes are loaded before the current step is computed. TUNED picks the algo
per (kernel, format, shape); the grouped tile stays the default until the H200 sweep shows otherwise.
The word tile (QConfig.algo = 2, _dot_rows_words; q4 only, power-of-two groups of 8 inputs or more, else the flat
tile): the flat tile spends 5.9-6.8 SASS instructions per input (sm_90, byte unpacking, the interleave, x's group
sums) and is bound by them about as much as by bytes. Here the codes are read as int32 words of 8 inputs; for each
nibble position j one shift puts the code at mantissa bits 19..22 and one lop3 (inline PTX) or-s it into 1.0, and
x[8w + j] (a strided load shared by the rows) meets it in one FMA, accumulated per word and reduced per group once
per step: 4.4-5.8 instructions per input compiled. Its down kernel (_down_words) loads every
expert's codes of a step in one [K, BN, UK] tile, since the down rows are short and a loop over experts waits
for each load in turn; the sum over k is in a fixed order.
The 8-bit-input tile (QConfig.act 1, TIERED_GPU_ACT=q8; q4 where the word tile reads it, _dot_rows_q8): each
program rounds its row of x once into a scratch row (_q8_fill), then two dp4a per code word sum the codes times the
inputs' codes exactly. Measured slower than the float tiles on an H100 (session 41, notes/Q4_DECODE.md): off by
default.
The expert kernels follow moe_decode.py: grid (F blocks, T*K) for gate/up, (D blocks, T*SPLIT) for down;
slots are a device tensor and the grid depends only on T, K and the shapes, so CUDA graphs capture them.
With SPLIT = 1 each output is summed by one program in a fixed order (deterministic).
Without CUDA (or Triton) the reference path runs: the model dequantizes one expert or one matrix at a time.
For more rows than MAX_ROWS (batches, prefill) on CUDA, qlinear takes quant_grouped.quant_matmul (tiles dequantized
in registers; the GEMV's grid gives each row its own programs, which read the matrix again) and the experts above
moe_gpu.DECODE_MAX_T tokens moe_gpu's grouped kernels (quant_grouped.QuantGroupedMoE).

Kernels are decorated on first use (`_kernels()`): Triton picks compiled or interpreted code when a function
is decorated, so a CPU test may switch TRITON_INTERPRET on before its first launch.

Legend: T rows (tokens), N outputs, K inputs (D hidden, F expert FFN for the experts), G groups per row,
S stacked matrices (slots), BN rows per program, BG groups per step.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from tiered.kernels import cpu_kernel, quant_gluon, quant_gluon_moe
from tiered.layout.quant import QuantWeight, linear as linear_ref

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU runtime does not need Triton
    triton = None

from tiered.kernels.fused_norm import (act_fn, bias_sum_fn, round_weight,  # noqa: E402 (None without Triton)
                                       weight_rounding)
from tiered.kernels.pdl import (gdc_enter, l2_prefetch, l2_prefetch_enabled, launch_args,  # noqa: E402
                                preload_enabled)

FUSED_FORMATS = {"q8": 0, "q4": 1, "mxfp4": 2, "fp8": 3}  # the kernels' FMT (4: fp8 decoded from bits)
# above this many rows qlinear takes the tiled GEMM (quant_grouped.quant_matmul, split-K for narrow matrices). Session
# 25 call B, us at 1 / 2 / 3 / 4 / 8 / 16 rows, the GEMV against the GEMM: qkv 6.1 / 9.4 / 12.1 / 14.3 / 23.5 / 42.3
# against 11.3 / 11.1 / 11.5 / 11.4 / 11.3 / 11.5; o_proj 9.1 / 9.6 / 10.0 / 11.2 / 18.3 / 32.4 against 10.5 / 10.7 /
# 10.7 / 10.3 / 10.5 / 10.5; lm_head 59.3 / 116.6 / 165.2 / 222.6 / 427 (call A) / 847 against 144.0 / 146.7 / 147.5 /
# 146.8 / 147.4 / 143.7. Until session 25 it was 16.
MAX_ROWS = 2
# from this many rows a dense copy, then cuBLAS (quant_dequant.dequant_matmul; q4, q8); from DEQUANT_ROWS_ONE rows
# where the copy is one slice (at most DEQUANT_SCRATCH bytes). Session 34 (benchmarks/results/
# dense-copy-2026-12-04-h200-s34.json, call C), once the copy's kernel read the weight tile (qkv's q4 copy 8.3 us,
# about 3 TB/s, against 28-30 before), us, copy + cuBLAS against the fused GEMM (quant_matmul's pick), q4: qkv at
# 128 / 256 / 300 / 512 rows 15.3 / 18.9 / 19.9 / 25.5 against 24.4 / 39.1 / 39.3 / 73.1, o_proj 16.5 / 18.8 / 21.9
# / 25.1 against 17.9 / 26.5 / 57.2 / 51.1; the lm_head (ten slices) 526 / 609 against 327 / 531 at 128 / 256
# rows, 639 / 869 against 1,050 / 1,058 at 300 / 512. Until session 34 it was 2,048 for every matrix.
DEQUANT_ROWS = 257
DEQUANT_ROWS_ONE = 128
DEQUANT_ROWS_ENV = "TIERED_DEQUANT_ROWS"  # a benchmark knob: another threshold (0: never)
DEQUANT_SCRATCH = 64 << 20  # the dense copy's slice, bytes (quant_dequant.dequant_matmul's max_scratch)


def dequant_rows(copy_bytes: int | None = None) -> int:
    """The row count from which qlinear multiplies through a dense copy: the knob's value when set, else
    DEQUANT_ROWS_ONE for a copy of `copy_bytes` that fits one slice (DEQUANT_SCRATCH), else (and
    with no size given) DEQUANT_ROWS."""
    v = os.environ.get(DEQUANT_ROWS_ENV, "")
    if not v:
        if copy_bytes is not None and copy_bytes <= DEQUANT_SCRATCH:
            return DEQUANT_ROWS_ONE
        return DEQUANT_ROWS
    try:
        n = int(v)
    except ValueError:
        raise ValueError(f"{DEQUANT_ROWS_ENV}={v!r}: give a row count (0 turns the dense copy off)") from None
    return n if n > 0 else 1 << 62


MAX_STEPS = 32  # a row's groups are walked in at most this many (unrolled) steps: BG grows for long rows


@dataclass(frozen=True)
class QConfig:
    """Tiles of one kernel launch (powers of two): BN rows per program, BG groups per step, warps; `split`
    (down only) spreads a token's K experts over that many programs (fp32 atomics when > 1); `conv` 1 =
    the mantissa trick for 4-bit codes, 0 = plain int->float conversion, 2 = the mantissa trick with the gemv and
    gate_up word tiles' nibbles taken in pairs (word_pair: one shift per two inputs; other tiles read it as 1);
    `algo` 0 = the grouped tile
    ([BN, BG, GP], _dot_rows), 1 = the flat tile ([BN, BG * group] inputs per step, _dot_rows_flat), which
    serves power-of-two groups only (the launchers fall back to 0 for others, e.g. q4 rows narrower than 64
    of odd width), 2 = the word tile (q4 only, _dot_rows_words: codes read as int32 words of 8 inputs, one
    shift and one and-or per input; falls back to 1, then 0, where it cannot serve), 3 = on tensor cores in Gluon:
    the dense GEMV (quant_gluon: one q4 matrix in groups of 64, bf16 inputs on CUDA; bn its rows a program, 64 x 2^i,
    ahead its steps of words a load, 1, 2 or 4, bg 2 or 4 that many groups a step (16-byte loads; any other bg one),
    and persist its programs a SM; elsewhere the word tile of min(bn, 32) rows runs), and one token's expert gate_up
    and down in experts_quant_decode (quant_gluon_moe: bg its groups a step, 1, 2 or 4; ahead gate_up's steps a load;
    bn (64 to pass the check below) and warps not read; elsewhere the word tile of 8 rows, 16 groups a step);
    `regs` caps the registers a thread may use (ptxas' maxnreg; 0: the compiler's choice), which sets how many
    programs an SM holds: the decode
    kernels are one wave whose programs wait on memory, and occupancy is what hides that wait. `hw` (a down config's,
    read by experts_quant_decode): how gate_up hands h to a word-tile down kernel that reads every expert at once
    (algo 2, split 1): 0 rows of fp32 in input order; 1 word-major fp32 (input 8w + j at j * F / 8 + w, so the down
    kernel's loads of x_j are contiguous instead of stride 8); 2 word-major bf16 (half the bytes; the reference
    rounds h to the compute dtype too). Other tiles read h in input order, so hw is ignored there. `act` 1 (the
    word tile only; q4 rows it reads): the inputs rounded to 8 bits per quantization group (d = max |x| / 127,
    round(x / d) ties to even, cpu_kernel.c's ACT_Q8 rounding) and the products taken as integer dot products (dp4a:
    four code-activation pairs an instruction), the group's scale and minimum applied to the exact integer sum;
    0 the inputs as given (fp32 sums). TIERED_GPU_ACT=q8 sets it on every q4 launch (`act_mode`). `persist` (a dense
    GEMV's under the word tile): at most that many programs a SM, each looping over row blocks with the next block's
    first step loaded before the current one is computed (gemv_loop), so that its loads stay in flight between
    blocks (and, with act 1, it rounds x once for several blocks); 0: a program a row block. `ahead` (the word-tile
    GEMV on CUDA): each program also asks L2 for rows it or another program reads later (prefetch.global.L2: no
    registers held, nothing waits), so that more bytes are in flight than the registers hold: with persist, the rows
    of its block that many turns ahead; without, of one matrix only, the block `ahead` blocks after its own (before
    the PDL wait: a later wave's rows); 0: none."""
    bn: int = 4
    bg: int = 8
    warps: int = 2
    split: int = 1
    conv: int = 1
    algo: int = 0
    regs: int = 0
    hw: int = 0
    act: int = 0
    persist: int = 0
    ahead: int = 0

    def __post_init__(self) -> None:
        for name in ("bn", "bg", "warps"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"QConfig.{name} must be a power of two, got {v}")
        if self.split < 1 or self.conv not in (0, 1, 2) or self.algo not in (0, 1, 2, 3):
            raise ValueError(f"QConfig split must be >= 1, conv 0, 1 or 2 and algo 0, 1, 2 or 3, got {self.split}, "
                             f"{self.conv}, {self.algo}")
        if self.regs and not 24 <= self.regs <= 255:
            raise ValueError(f"QConfig.regs must be 0 (the compiler's choice) or 24..255, got {self.regs}")
        if self.ahead < 0:
            raise ValueError(f"QConfig.ahead must be >= 0 (0: no L2 prefetches), got {self.ahead}")
        if self.persist < 0:
            raise ValueError(f"QConfig.persist must be >= 0 (programs a SM; 0: one a row block), got {self.persist}")
        if self.act not in (0, 1):
            raise ValueError(f"QConfig.act must be 0 (float inputs) or 1 (8-bit inputs, integer products), got "
                             f"{self.act}")
        if self.algo == 3 and (self.bn < 64 or self.act or self.ahead not in (0, 1, 2, 4)):
            raise ValueError(f"QConfig.algo 3 (the Gluon q4 GEMV, quant_gluon) takes bn 64 x 2^i, act 0 and ahead 0, "
                             f"1, 2 or 4 (steps a load), got bn {self.bn}, act {self.act}, ahead {self.ahead}")
        if self.hw not in (0, 1, 2):
            raise ValueError(f"QConfig.hw must be 0 (fp32 rows), 1 (word-major fp32) or 2 (word-major bf16), got "
                             f"{self.hw}")


# (kernel, format) -> config; kernel is "gate_up", "down" or "gemv". Chosen by benchmarks/bench_quant_kernels.py
# on the H200 (its JSON's "suggested" lists the fastest per shape; a shape-specific entry (kernel, fmt, K, N)
# wins over the format's).
TUNED: dict[tuple, QConfig] = {
    # 16-byte loads per thread: BN * BG * (bytes per group) = 16 * 32 * warps. gate_up mirrors the bf16 kernel's
    # best tiles (4 rows, 512 inputs per step); down takes a whole expert row per step (F <= 1024) over 4 rows,
    # so D / 4 programs each sum their K experts in a fixed order (deterministic).
    ("gate_up", "q4"): QConfig(bn=4, bg=8, warps=2),
    ("down", "q4"): QConfig(bn=4, bg=16, warps=4),
    ("gemv", "q4"): QConfig(bn=4, bg=8, warps=2),
    ("gate_up", "q8"): QConfig(bn=4, bg=2, warps=2),
    ("down", "q8"): QConfig(bn=4, bg=8, warps=4),
    ("gemv", "q8"): QConfig(bn=4, bg=2, warps=2),
    ("gate_up", "mxfp4"): QConfig(bn=4, bg=16, warps=2),
    ("down", "mxfp4"): QConfig(bn=4, bg=32, warps=4),
    ("gemv", "mxfp4"): QConfig(bn=4, bg=16, warps=2),
    ("gate_up", "fp8"): QConfig(bn=4, bg=2, warps=2),
    ("down", "fp8"): QConfig(bn=4, bg=8, warps=4),
    ("gemv", "fp8"): QConfig(bn=4, bg=2, warps=2),
    # Shape entries (kernel, fmt, K inputs, N outputs): the fastest tiles of benchmarks/bench_quant_kernels.py on
    # the H200 (2026-11-30, quant-kernels-2026-11-30-h200.json). The expert `down` keeps split=1 (deterministic):
    # split=8 was faster still at the 10.6B shape (22.8 against 28.8 us per layer with gate_up) but sums with
    # atomics.
    ("gate_up", "q4", 2048, 768): QConfig(bn=8, bg=8, warps=4),
    ("down", "q4", 768, 2048): QConfig(bn=4, bg=4, warps=1),
    ("gate_up", "q8", 2048, 768): QConfig(bn=2, bg=4, warps=2),
    ("gate_up", "q4", 4096, 1024): QConfig(bn=8, bg=8, warps=4),
    ("down", "q4", 1024, 4096): QConfig(bn=4, bg=4, warps=1),
    ("gemv", "q4", 2048, 151936): QConfig(bn=16, bg=8, warps=4),
    ("gemv", "q8", 2048, 151936): QConfig(bn=8, bg=2, warps=4),
    ("gemv", "q4", 2048, 5120): QConfig(bn=8, bg=8, warps=4),
    ("gemv", "q8", 2048, 5120): QConfig(bn=2, bg=4, warps=2),
    ("gemv", "q4", 4096, 2048): QConfig(bn=8, bg=16, warps=8),
    # applied by tools/apply_tuned.py from a bench_quant_kernels.py run (fastest deterministic tiles)
    ('down', 'q4', 1024, 4096): QConfig(bn=8, bg=16, warps=4, split=1, conv=1, algo=1),
    ('gate_up', 'q4', 2048, 768): QConfig(bn=4, bg=32, warps=4, split=1, conv=1, algo=1),
    ('gate_up', 'q4', 4096, 1024): QConfig(bn=2, bg=32, warps=2, split=1, conv=1, algo=1),
    ('gemv', 'q4', 2048, 151936): QConfig(bn=4, bg=32, warps=2, split=1, conv=1, algo=1),
    ('gemv', 'q4', 2048, 5120): QConfig(bn=4, bg=32, warps=2, split=1, conv=1, algo=1),
    ('gemv', 'q4', 4096, 2048): QConfig(bn=8, bg=32, warps=4, split=1, conv=1, algo=1),
    # the word tile (algo 2), from the sweeps of session 7's calls A (gate_up, gemv) and B (down, after
    # _down_words), quant-kernels-2026-12-01-h200-s7.json; applied by tools/apply_tuned.py
    ('gate_up', 'q4', 2048, 768): QConfig(bn=8, bg=16, warps=4, split=1, conv=1, algo=2),
    ('gemv', 'q4', 2048, 151936): QConfig(bn=32, bg=32, warps=8, split=1, conv=1, algo=2),
    ('gemv', 'q4', 2048, 5120): QConfig(bn=8, bg=32, warps=4, split=1, conv=1, algo=2),
    ('down', 'q4', 768, 2048): QConfig(bn=8, bg=16, warps=8, split=1, conv=1, algo=2),
    # register caps (session 15, calls D and E, quant-regs-2026-12-02-h200-s15.json): the qkv GEMV at 96 registers a
    # thread took 4.6 us against 5.9-6.0 (three runs); lm_head (80: 68.9-71.9 against qlinear's 71.7-71.8 under the
    # same tiles) and o_proj (4.1 against 4.2) moved within noise, and capped expert kernels only slowed down
    ('gemv', 'q4', 2048, 5120): QConfig(bn=8, bg=32, warps=4, split=1, conv=1, algo=2, regs=96),
    # applied by tools/apply_tuned.py from a bench_quant_kernels.py run (fastest deterministic tiles)
    ('down', 'q4', 768, 2048): QConfig(bn=8, bg=16, warps=8, split=1, conv=1, algo=2, hw=1),
    # with the preload before the PDL wait (session 17, the q4+q4 VRAM decode of the 10.6B shape through
    # TIERED_QCONFIG, one warm box, quant-preload-2026-12-02-h200-s17.json): o_proj read in one step (its whole row
    # loaded before the wait) 2,683 tok/s against 2,620 (bn 4: 2,671, bn 16 w 8: 2,619, bn 8 w 8: 2,653); then the
    # lm_head at 32 rows and 4 warps 2,744-2,752 against 2,683 (bn 16 w 4 2,700-2,720, bn 16 w 2 2,706, bn 8
    # 2,674-2,688, bn 64 w 8 2,572; bn 32 w 2 and bn 64 w 4 spill: under 400). qkv (bn 4 / 16, w 2) and the expert
    # tiles stayed.
    ('gemv', 'q4', 4096, 2048): QConfig(bn=8, bg=64, warps=4, algo=2),
    ('gemv', 'q4', 2048, 151936): QConfig(bn=32, bg=32, warps=4, algo=2),
    # the nibbles in pairs (conv 2; session 19, quant-pairs-attn-2026-12-02-h200-s19.json): at TUNED's lm_head tile
    # 2,707 tok/s against 2,750 (fewer SASS offline, slower on the box), over every word GEMV and gate_up 2,669-2,678;
    # at bg 16 (128 registers, 4 programs a SM) 2,756-2,761 against 2,741-2,752 in three comparisons over two calls
    ('gemv', 'q4', 2048, 151936): QConfig(bn=32, bg=16, warps=4, algo=2, conv=2),
    # gpt-oss's experts (hidden 2880, FFN 2880: gpt-oss-20b and -120b), in the decode of bench_gpt_oss_gpu.py through
    # TIERED_QCONFIG (session 30, call D, gpt-oss-decode-2026-12-04-h200-s30.json): against the formats' default
    # (grouped) tiles, mxfp4 on the flat tile 1,118.8 tok/s against 908.5 (1.23x); q4 on the word tile 1,340.6 and
    # the flat tile 1,328.8 against 1,086.0 (1.23x / 1.22x)
    ('gate_up', 'mxfp4', 2880, 2880): QConfig(bn=4, bg=32, warps=4, algo=1),
    ('down', 'mxfp4', 2880, 2880): QConfig(bn=8, bg=16, warps=4, algo=1),
    ('gate_up', 'q4', 2880, 2880): QConfig(bn=8, bg=16, warps=4, algo=2),
    ('down', 'q4', 2880, 2880): QConfig(bn=8, bg=16, warps=8, algo=2, hw=1),
    # the experts' gate_up on tensor cores in Gluon (quant_gluon_moe, session 45, H100, s45_callB.sh,
    # gluon-q4-experts-2026-12-06-h100-s45.json): 4 groups a step, 2 steps a load, 8.25 us against the word tile's
    # 10.45 (no PDL, 8 experts); the VRAM decode of the 8-layer 10.6B shape 2,645.7 tok/s against 2,557.8 / 2,564.5
    # (h handed to the word-tile down word-major). The Gluon down (6.41 us against 9.64 alone) gave nothing in the
    # decode (2,559 / 2,568 with both): down keeps the word tile. Where the Gluon kernel cannot serve (CPU, other
    # shapes' stacks, T > 1), the word tile of bn 8, bg 16, 4 warps runs (_word_tile_for): the tile this entry
    # replaced. Not yet timed on the H200.
    ('gate_up', 'q4', 2048, 768): QConfig(bn=64, bg=4, warps=4, algo=3, ahead=2),
    # the same under ptxas's register cap of 128 (session 48, call D, H100, s48_callD.sh,
    # gate-up-regs-2026-12-06-h100-s48.json): uncapped, ptxas keeps it at 76 registers and issues a program's 16
    # word loads in four rounds, each next to its first use (an HBM latency a round); capped at 128 it takes 118 and
    # issues them in two. Decode 2,815.4 / 2,815.0 tok/s against 2,777.2 / 2,782.8 (1.013x), 3 programs a SM still
    # fit (384 programs, one wave). Copying every word into shared memory at once (cp.async) was slower: 0.906x
    ('gate_up', 'q4', 2048, 768): QConfig(bn=64, bg=4, warps=4, algo=3, ahead=2, regs=128),
}


CONFIG_ENV = "TIERED_QCONFIG"


@functools.lru_cache(maxsize=8)
def parse_overrides(spec: str) -> dict[tuple, QConfig]:
    """TIERED_QCONFIG's entries, `kernel,fmt,K,N:field=value,...` separated by `;` (fields of QConfig), e.g.
    `gemv,q4,4096,2048:bn=8,bg=64,warps=4,algo=2`: tiles to try on a new GPU or a new shape without editing TUNED
    (benchmarks time them this way). A malformed entry raises ValueError naming it."""
    out = {}
    for entry in filter(None, (e.strip() for e in spec.split(";"))):
        try:
            key, fields = entry.split(":", 1)
            kernel, fmt, k, n = key.split(",")
            cfg = QConfig(**{f.split("=")[0].strip(): int(f.split("=")[1]) for f in fields.split(",") if f.strip()})
        except (ValueError, TypeError, IndexError) as e:
            raise ValueError(f"{CONFIG_ENV}: cannot read {entry!r} (want kernel,fmt,K,N:field=value,..., e.g. "
                             f"gemv,q4,4096,2048:bn=8,bg=64,warps=4,algo=2): {e}") from None
        out[(kernel.strip(), fmt.strip(), int(k), int(n))] = cfg
    return out


ACT_ENV = "TIERED_GPU_ACT"
ACTS = ("float", "q8")


def act_mode() -> str:
    """The GPU kernels' activation mode for q4 products, from TIERED_GPU_ACT (`tiered run --gpu-act`): "float" (the
    default: the inputs as given, fp32 sums) or "q8" (each input group rounded to 8 bits, integer dot products:
    QConfig.act 1; the same rounding as the CPU kernel's TIERED_CPU_ACT=q8)."""
    v = os.environ.get(ACT_ENV, "").strip().lower() or "float"
    if v not in ACTS:
        raise ValueError(f"{ACT_ENV}={v!r}: use one of {', '.join(ACTS)}")
    return v


def round_inputs_q8(x: Tensor, group: int) -> Tensor:
    """The reference of act 1's input rounding: x [..., K] in fp32, each group of `group` inputs along K rounded to
    code * d with d = max |x| / 127 and code = round(x / d) (ties to even, clamped to +-127; 0 for a zero group),
    both divisions correctly rounded on every device (PyTorch's CUDA division by a Python scalar multiplies by its
    reciprocal, which can move d by an ulp and flip a code: 4-5e-4 of a GEMV's output on the H100)."""
    x = x.float()
    out = torch.empty_like(x)
    for g0 in range(0, x.shape[-1], group):
        v = x[..., g0:g0 + group]
        a = v.abs().amax(-1, keepdim=True)
        d = a / torch.full_like(a, 127.0)  # a tensor divisor: CUDA multiplies by 1/127 for a Python scalar's
        c = torch.round(v / torch.where(d > 0, d, torch.ones_like(d))).clamp(-127, 127)
        out[..., g0:g0 + group] = torch.where(d > 0, c, torch.zeros_like(c)) * d
    return out


def pick_config(kernel: str, fmt: str, k: int, n: int) -> QConfig:
    """The tile config for `kernel` over a [n, k] matrix (per expert) in `fmt`: TIERED_QCONFIG's entry for the shape
    (parse_overrides), else TUNED's for the shape, else TUNED's for the format; q4 under TIERED_GPU_ACT=q8 with
    act 1 (unless TIERED_QCONFIG's entry is the one picked: it says its own act)."""
    spec = os.environ.get(CONFIG_ENV, "")
    over = parse_overrides(spec).get((kernel, fmt, k, n)) if spec else None
    if over is not None:
        return over
    cfg = TUNED.get((kernel, fmt, k, n)) or TUNED[(kernel, fmt)]
    if fmt == "q4" and act_mode() == "q8":
        cfg = dataclasses.replace(cfg, act=1)
    return cfg


def _bg(cfg: QConfig, w: QuantWeight) -> int:
    """Groups per step: the config's, or more for rows longer than MAX_STEPS steps."""
    return max(cfg.bg, triton.next_power_of_2(-(-w.scale.shape[-1] // MAX_STEPS)))


def flat_ok(w: QuantWeight) -> bool:
    """Whether the flat tile (algo 1) reads this weight: a power-of-two group of whole bytes (4-bit formats:
    an even group), so that a step of BG groups is a power-of-two run of inputs and of packed units."""
    g = w.group
    return g >= 2 and g & (g - 1) == 0


def words_ok(w: QuantWeight) -> bool:
    """Whether the word tile (algo 2) reads this weight: q4 in power-of-two groups of at least 8 inputs, rows of
    a multiple of 8 inputs, and codes that can be seen as int32 words (4-byte aligned rows and stack rows)."""
    q = w.q
    return (w.fmt == "q4" and flat_ok(w) and w.group % 8 == 0 and w.matrix[1] % 8 == 0 and q.shape[-1] % 4 == 0
            and q.stride(-1) == 1 and all(st % 4 == 0 for st in q.stride()[:-1]) and q.storage_offset() % 4 == 0
            and q.data_ptr() % 4 == 0)


def _algo(cfg: QConfig, w: QuantWeight) -> int:
    """The tile algorithm a launch takes: the config's, or the next one down that serves this weight; the word tile
    wherever it serves under act 1 (only it takes 8-bit inputs)."""
    if (cfg.algo >= 2 or cfg.act) and words_ok(w):
        return 2
    return 1 if cfg.algo >= 1 and flat_ok(w) else 0


def _tiles(cfg: QConfig, w: QuantWeight) -> dict:
    """The launch's tile constexprs: BN, BG, CONV, ALGO and the flat and word tiles' BK inputs / UK packed
    units per step (bytes for algo 1, int32 words for algo 2; algo 2 falls back to 1 and 1 to 0 for a weight
    words_ok / flat_ok refuses)."""
    bg = _bg(cfg, w)
    algo = _algo(cfg, w)
    if algo >= 1:  # a flat step is never wider than the row
        bg = min(bg, triton.next_power_of_2(w.scale.shape[-1]))
    bk = bg * w.group
    uk = bk // 8 if algo == 2 else bk // 2 if w.fmt in ("q4", "mxfp4") else bk
    conv = 1 if cfg.conv == 2 and algo != 2 else cfg.conv  # the pairs are the word tile's
    return dict(BN=cfg.bn, BG=bg, CONV=conv, ALGO=algo, BK=bk, UK=uk, ACT8=bool(cfg.act) and algo == 2)


def _geometry(w: QuantWeight) -> dict:
    """Constexprs of one weight: inputs, packed units per row, groups, group stride in packed units, its
    power-of-two tile width."""
    n, k = w.matrix
    g = w.group
    gstride = (g + 1) // 2 if w.fmt in ("q4", "mxfp4") else g
    fmt = FUSED_FORMATS[w.fmt]
    if w.fmt == "fp8" and not w.q.is_cuda:
        fmt = 4  # fp8 decoded from its bits (Triton's interpreter has no fp8 type)
    return dict(KIN=k, KQ=w.q.shape[-1], NG=w.scale.shape[-1], GROUP=g, GSTRIDE=gstride,
                GP=triton.next_power_of_2(gstride), FMT=fmt)


def _codes(w: QuantWeight, algo: int = 0) -> Tensor:
    """The packed codes as the kernel reads them: fp8 as its raw bytes (uint8), q4 under the word tile (algo 2)
    as int32 words, every other format as stored. The kernel's masked loads fill with integer 0, which the
    compiler cannot cast to an fp8 element; a uint8 byte can be filled, then bitcast to fp8 (same width) and
    converted (see _dot_rows)."""
    if algo == 2:
        return w.q.view(torch.int32)
    return w.q.view(torch.uint8) if w.fmt == "fp8" else w.q


def kernel_ok(x: Tensor, w: QuantWeight, *, interpret: bool = False) -> bool:
    """Whether the fused kernels serve this product: CUDA (or, for tests, Triton's CPU interpreter when
    `interpret` is passed), a fused format, rows of codes and scales contiguous."""
    return (triton is not None and w.fmt in FUSED_FORMATS and (x.is_cuda or interpret)
          and w.q.stride(-1) == 1 and w.scale.stride(-1) == 1 and (w.min is None or w.min.stride(-1) == 1))


@functools.cache
def _kernels():
    """(qgemv, qgate_up, qdown), decorated on first use (see decorate_kernels)."""
    return decorate_kernels()


def decorate_kernels():
    """(qgemv, qgate_up, qdown) freshly decorated with triton.jit (compiled or interpreted, as TRITON_INTERPRET
    says now); the three see the decorated helpers (`dot_rows`, `dot_rows_flat`, `flat_step`, `add_pairs`,
    `nibbles`, `fp8_bits`, `dot_rows_words`, `word_nibble`, `step_codes`, `down_words`). Tests use it to compile
    for a GPU target without one."""
    helpers = {"add_pairs": triton.jit(_add_pairs), "nibbles": triton.jit(_nibbles),
               "fp8_bits": triton.jit(_fp8_bits), "step_codes": triton.jit(_step_codes)}

    def bind(f):
        g = types.FunctionType(f.__code__, {**f.__globals__, **helpers}, f.__name__, f.__defaults__,
                               f.__closure__)
        # Triton reads constexpr parameters from the annotations, which a new function object does not inherit
        g.__annotations__, g.__qualname__, g.__module__, g.__doc__ = (dict(f.__annotations__), f.__qualname__,
                                                                      f.__module__, f.__doc__)
        return triton.jit(g)

    # the inline PTX of or_one only when compiling (TRITON_INTERPRET decides, as it does for triton.jit)
    helpers["WORD_ASM"] = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"))
    for name, mask in (("LOP3_HI", "0x780000"), ("LOP3_LO", "0x78000")):  # or_one's masks: bits 19..22, 15..18
        helpers[name] = tl.constexpr(f"{{ .reg .b32 m, o; mov.b32 m, {mask}; mov.b32 o, 0x3F800000; "
                                     "lop3.b32 $0, $1, m, o, 0xEA; }")
    helpers["or_one"] = bind(_or_one)
    helpers["nibble_shift"] = bind(_nibble_shift)
    helpers["word_nibble"] = bind(_word_nibble)
    helpers["word_pair"] = bind(_word_pair)
    helpers["dot_rows"] = bind(_dot_rows)
    helpers["dp4a"] = bind(_dp4a)
    helpers["q8_code"] = bind(_q8_code)
    for name in ("q8_fill", "q8_words", "q8_x", "q8_codes", "q8_codes_k", "q8_dot", "pre_q8", "dot_rows_q8"):
        helpers[name] = bind(globals()["_" + name])
    helpers["dot_rows_words"] = bind(_dot_rows_words)
    helpers["down_words"] = bind(_down_words)
    helpers["pre_words"] = bind(_pre_words)
    helpers["l2_rows"] = bind(_l2_rows)
    helpers["gemv_loop"] = bind(_gemv_loop)
    helpers["flat_step"] = bind(_flat_step)
    helpers["dot_rows_flat"] = bind(_dot_rows_flat)
    helpers["act_fn"] = bind(act_fn)
    helpers["bias_sum"] = bind(bias_sum_fn)
    return bind(_qgemv), bind(_qgate_up), bind(_qdown)


# The kernel bodies below are plain functions until _kernels() decorates them (Triton reads their source).

def _nibbles(c, FMT: tl.constexpr, CONV: tl.constexpr):
    """(lo, hi) fp32 values of the two 4-bit codes in each byte of c (int32; low nibble = even input): q4 the code
    (CONV 1: 1 + c/16 by the mantissa trick of the module docstring), mxfp4 the e2m1 value (sign, exponent and
    mantissa bits built directly; the block scale is applied by the caller)."""
    if FMT == 1:
        if CONV == 1:
            lo = (((c << 19) & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)
            hi = (((c << 15) & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)
        else:
            lo = (c & 15).to(tl.float32)
            hi = ((c >> 4) & 15).to(tl.float32)
    else:
        lo_c = c & 15
        hi_c = (c >> 4) & 15
        em = lo_c & 7
        bl = tl.where(em >= 2, (em << 22) + (126 << 23), tl.where(em == 1, 0x3F000000, 0))
        lo = (bl | ((lo_c & 8) << 28)).to(tl.float32, bitcast=True)
        em = hi_c & 7
        bh = tl.where(em >= 2, (em << 22) + (126 << 23), tl.where(em == 1, 0x3F000000, 0))
        hi = (bh | ((hi_c & 8) << 28)).to(tl.float32, bitcast=True)
    return lo, hi


def _fp8_bits(codes):
    """fp32 values of fp8 e4m3 bytes decoded from their bits (Triton's interpreter has no fp8 type)."""
    c = codes.to(tl.int32)
    mag = tl.where((c & 0x78) != 0, (((c & 0x7F) << 20) + (120 << 23)).to(tl.float32, bitcast=True),
                   (c & 7).to(tl.float32) * 0.001953125)
    return tl.where((c & 0x80) != 0, -mag, mag)


def _dot_rows(x_row, q_rows, s_rows, m_rows, mask_n, KIN: tl.constexpr, KQ: tl.constexpr, NG: tl.constexpr,
             FMT: tl.constexpr, GROUP: tl.constexpr, GSTRIDE: tl.constexpr, GP: tl.constexpr,
             BN: tl.constexpr, BG: tl.constexpr, CONV: tl.constexpr):
    """[BN] fp32: the rows at q_rows ([BN] pointers to packed rows; s_rows / m_rows to their scale and
    min rows) times the fp32-converted x row (KIN inputs at x_row)."""
    offs_g = tl.arange(0, BG)
    offs_j = tl.arange(0, GP)
    acc = tl.zeros([BN, BG], tl.float32)
    for g0 in tl.static_range(0, NG, BG):
        g = g0 + offs_g  # [BG]
        mg = g < NG
        unit = g[:, None] * GSTRIDE + offs_j[None, :]  # [BG, GP] packed unit within the row
        mu = mg[:, None] & (offs_j[None, :] < GSTRIDE) & (unit < KQ)
        codes = tl.load(q_rows[:, None, None] + unit[None, :, :],
                        mask=mask_n[:, None, None] & mu[None, :, :], other=0)  # [BN, BG, GP]
        ms = mask_n[:, None] & mg[None, :]
        s = tl.load(s_rows[:, None] + g[None, :], mask=ms, other=0).to(tl.float32)  # [BN, BG]
        if FMT == 1 or FMT == 2:  # two 4-bit codes per byte: even input low nibble, odd input high
            xi = g[:, None] * GROUP + 2 * offs_j[None, :]  # [BG, GP]
            xe = tl.load(x_row + xi, mask=mu & (xi < KIN), other=0.0).to(tl.float32)
            xo = tl.load(x_row + xi + 1, mask=mu & (xi + 1 < KIN), other=0.0).to(tl.float32)
            lo, hi = nibbles(codes.to(tl.int32), FMT, CONV)
            d = tl.sum(lo * xe[None, :, :] + hi * xo[None, :, :], axis=2)  # [BN, BG]
            if FMT == 1:  # q4: code * scale + min
                xs = tl.sum(xe + xo, axis=1)  # [BG] group sums of x
                if CONV == 1:
                    d = (d - xs[None, :]) * 16.0
                m = tl.load(m_rows[:, None] + g[None, :], mask=ms, other=0).to(tl.float32)
                acc += d * s + m * xs[None, :]
            else:  # mxfp4: e2m1 value * 2^(e8m0 - 127)
                acc += d * tl.exp2(s - 127.0)
        else:  # q8 (int8) and fp8 (e4m3): one input per unit, value * scale
            xi = g[:, None] * GROUP + offs_j[None, :]
            xv = tl.load(x_row + xi, mask=mu & (xi < KIN), other=0.0).to(tl.float32)
            if FMT == 3:  # fp8 e4m3 bytes (uint8): bitcast to fp8 (same width), the hardware converts
                v = codes.to(tl.float8e4nv, bitcast=True).to(tl.float32)
            elif FMT == 4:  # fp8 e4m3 bytes decoded from their bits (Triton's interpreter has no fp8)
                v = fp8_bits(codes)
            else:  # q8: int8
                v = codes.to(tl.float32)
            d = tl.sum(v * xv[None, :, :], axis=2)
            acc += d * s
    return tl.sum(acc, axis=1)

def _add_pairs(a0, b0, a1, b1):
    """The combine of a two-tensor sum (tl.reduce)."""
    return a0 + a1, b0 + b1


def _flat_step(codes, xv, s, m_ptrs, ms, xs_in, FMT: tl.constexpr, GROUP: tl.constexpr, BN: tl.constexpr,
               BG: tl.constexpr, BK: tl.constexpr, CONV: tl.constexpr, HAS_XS: tl.constexpr):
    """([BN, BG], [BN, BG]) fp32: one flat step's group dot products times their scales (q4: plus min *
    sum(x)), and q4's group sums of x (given as xs_in with HAS_XS: the second matrix of a step reuses the
    first's); codes [BN, UK] packed units, xv [BK] fp32 inputs, s [BN, BG] scales, m_ptrs / ms the q4 mins'
    pointers and mask."""
    if FMT == 1 or FMT == 2:  # two 4-bit codes per byte: even input low nibble, odd input high
        lo, hi = nibbles(codes.to(tl.int32), FMT, CONV)
        v = tl.interleave(lo, hi)  # [BN, BK] in input order
    elif FMT == 3:  # fp8 e4m3 bytes (uint8): bitcast to fp8, the hardware converts
        v = codes.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    elif FMT == 4:  # fp8 e4m3 bytes decoded from their bits (Triton's interpreter has no fp8)
        v = fp8_bits(codes)
    else:  # q8: int8
        v = codes.to(tl.float32)
    xb = tl.broadcast_to(xv[None, :], [BN, BK])
    if FMT == 1 and not HAS_XS:
        # the group sums of x in the same reduction as the products (one layout: no exchange between
        # threads), each thread summing only the inputs it already holds
        d, xs = tl.reduce((tl.reshape(v * xb, [BN, BG, GROUP]), tl.reshape(xb, [BN, BG, GROUP])), 2,
                          add_pairs)  # [BN, BG] group partial sums of c * x and of x
    else:
        d = tl.sum(tl.reshape(v * xb, [BN, BG, GROUP]), axis=2)  # [BN, BG] group partial sums
        xs = xs_in
    if FMT == 1:
        if CONV == 1:
            d = (d - xs) * 16.0
        m = tl.load(m_ptrs, mask=ms, other=0).to(tl.float32)
        out = d * s + m * xs
    elif FMT == 2:
        out = d * tl.exp2(s - 127.0)
    else:
        out = d * s
    return out, xs


def _step_codes(q1, q2, mask_n, step, UK: tl.constexpr, NU: tl.constexpr, TWO: tl.constexpr):
    """([BN, UK], [BN, UK]): packed units [step * UK, step * UK + UK) of the rows at q1 (and q2 with TWO, else
    q1's again), units past the row's NU masked to 0: one step's codes for the flat and word tiles."""
    u = step * UK + tl.arange(0, UK)
    um = mask_n[:, None] & (u[None, :] < NU)
    c1 = tl.load(q1[:, None] + u[None, :], mask=um, other=0)
    if TWO:
        c2 = tl.load(q2[:, None] + u[None, :], mask=um, other=0)
    else:
        c2 = c1
    return c1, c2


def _dot_rows_flat(x_row, q1, s1, m1, q2, s2, m2, mask_n, KIN: tl.constexpr, KQ: tl.constexpr,
                  NG: tl.constexpr, FMT: tl.constexpr, GROUP: tl.constexpr, BN: tl.constexpr, BG: tl.constexpr,
                  BK: tl.constexpr, UK: tl.constexpr, CONV: tl.constexpr, TWO: tl.constexpr):
    """([BN], [BN]) fp32: _dot_rows over flat tiles for one set of rows (q1, s1, m1) or, with TWO, two sets
    that share x (gate and up; else the second result is zeros). GROUP is a power of two (a 4-bit group is
    GROUP / 2 whole bytes). Per step [BN, UK] packed units, contiguous along each row (16-byte loads), for
    BK = BG * GROUP inputs; 4-bit codes are decoded and interleaved back into input order (tl.interleave:
    low nibble = even input) so that x is read as one contiguous [BK] vector shared by the BN rows, and
    each group's partial sum is taken within the product's own layout (no data movement for the scales).
    The codes of step i + 1 (both sets) are loaded before step i is computed (registers as a double buffer:
    the loads are in flight during the step's arithmetic and its x layout exchange)."""
    offs_k = tl.arange(0, BK)
    offs_g = tl.arange(0, BG)
    acc1 = tl.zeros([BN, BG], tl.float32)
    acc2 = tl.zeros([BN, BG], tl.float32)
    nxt1, nxt2 = step_codes(q1, q2, mask_n, 0, UK, KQ, TWO)  # [BN, UK] step 0
    for k0 in tl.static_range(0, KIN, BK):
        c1 = nxt1
        c2 = nxt2
        if k0 + BK < KIN:  # prefetch the next step's codes
            nxt1, nxt2 = step_codes(q1, q2, mask_n, k0 // BK + 1, UK, KQ, TWO)
        kk = k0 + offs_k
        xv = tl.load(x_row + kk, mask=kk < KIN, other=0.0).to(tl.float32)  # [BK]
        g = k0 // GROUP + offs_g  # [BG]
        ms = mask_n[:, None] & (g[None, :] < NG)
        sv = tl.load(s1[:, None] + g[None, :], mask=ms, other=0).to(tl.float32)  # [BN, BG]
        o1, xs = flat_step(c1, xv, sv, m1[:, None] + g[None, :], ms, sv, FMT, GROUP, BN, BG, BK, CONV, False)
        acc1 += o1
        if TWO:
            sv2 = tl.load(s2[:, None] + g[None, :], mask=ms, other=0).to(tl.float32)
            o2, _ = flat_step(c2, xv, sv2, m2[:, None] + g[None, :], ms, xs, FMT, GROUP, BN, BG, BK, CONV, True)
            acc2 += o2
    return tl.sum(acc1, axis=1), tl.sum(acc2, axis=1)


def _or_one(b, MASK: tl.constexpr):
    """fp32 1 + (the bits of b under MASK (0x780000 or 0x78000), read as mantissa bits) for each int32 in b: one
    and-or into 1.0.
    Compiled, the and-or is one lop3 written in PTX: left to itself ptxas emits two (a LOP3 takes one immediate).
    WORD_ASM is False under Triton's interpreter."""
    if WORD_ASM:  # (the mask an immediate of the PTX: as a register operand it cost a few moves a kernel)
        if MASK == 0x780000:
            v = tl.inline_asm_elementwise(LOP3_HI, "=r,r", [b], dtype=tl.int32, is_pure=True, pack=1)
        else:
            v = tl.inline_asm_elementwise(LOP3_LO, "=r,r", [b], dtype=tl.int32, is_pure=True, pack=1)
    else:
        v = (b & MASK) | 0x3F800000
    return v.to(tl.float32, bitcast=True)


def _nibble_shift(w, J: tl.constexpr):
    """w shifted so that nibble J (bits 4J..4J+3) of each int32 word sits at mantissa bits 19..22."""
    if J < 5:
        b = w << (19 - 4 * J)
    else:
        b = w >> (4 * J - 19)
    return b


def _word_nibble(w, J: tl.constexpr):
    """fp32 1 + c/16 for the 4-bit code c at nibble J (bits 4J..4J+3) of each int32 word in w: the code is
    shifted to mantissa bits 19..22 and or-ed into 1.0 (one shift and one and-or: the module docstring's
    mantissa trick, without unpacking bytes)."""
    return or_one(nibble_shift(w, J), 0x780000)


def _word_pair(w, J: tl.constexpr):
    """(fp32 1 + c_J/16, fp32 1 + c_(J-1)/256) for the codes at nibbles J (odd) and J - 1 of each int32 word in w:
    one shift puts nibble J at mantissa bits 19..22 and nibble J - 1 at 15..18, and one and-or each takes its
    nibble into 1.0 (QConfig.conv 2: a shift per two inputs instead of one per input)."""
    b = nibble_shift(w, J)
    return or_one(b, 0x780000), or_one(b, 0x78000)


def _dp4a(a, b, c):
    """c + the dot product of a's four unsigned bytes with b's four signed bytes, per int32 (a, b, c one shape): PTX
    dp4a.u32.s32, one instruction; under Triton's interpreter (WORD_ASM False) the same sum in integer ops."""
    if WORD_ASM:
        s = tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32,
                                      is_pure=True, pack=1)
    else:
        s = c
        for i in tl.static_range(4):
            s += ((a >> (8 * i)) & 255) * ((((b >> (8 * i)) & 255) ^ 128) - 128)
    return s


def _q8_code(v, d):
    """round(v / d) to the nearest integer, ties to even, clamped to [-127, 127], as int32; 0 where d is 0
    (cpu_kernel.c's act_q8): the correctly rounded quotient plus 1.5 * 2^23 leaves the rounded integer in the low
    mantissa bits."""
    r = tl.math.div_rn(v, tl.where(d > 0, d, 1.0))
    c = (r + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000
    return tl.where(d > 0, tl.minimum(tl.maximum(c, -127), 127), 0)


def _q8_fill(x_row, WS: tl.constexpr, JS: tl.constexpr, ws, fs, KW: tl.constexpr, NG: tl.constexpr,
             GROUP: tl.constexpr, NGP: tl.constexpr):
    """One row of KW code words' inputs (input 8w + j at x_row + w * WS + j * JS) rounded to 8 bits per group of
    GROUP inputs (d = max |x| / 127, code = q8_code(x, d)) into a scratch row: ws[w] (int32) the codes of inputs 8w,
    8w+2, 8w+4, 8w+6 as four signed bytes, low byte first (byte b meets the low nibble of a code word's byte b),
    ws[KW + w] those of 8w+1, ..., 8w+7 (the high nibbles); fs[g] (fp32) the group's d, fs[NG + g] the sum of its
    rounded inputs (codes times d), for the minima's term. Every program of a launch computes and stores the same
    values (its threads each take a part of the row once; the products' layout would repeat the rounding in every
    thread that holds a row of the tile), then waits on the CTA barrier and reads them back in the products'
    layout (q8_x)."""
    WG: tl.constexpr = GROUP // 8
    g = tl.arange(0, NGP)
    j = tl.arange(0, 8)[None, None, :]
    word = g[:, None] * WG + tl.arange(0, WG)[None, :]  # [NGP, WG]
    mw = (g[:, None] < NG) & (word < KW)
    x = tl.load(x_row + word[:, :, None] * WS + j * JS, mask=mw[:, :, None], other=0.0).to(tl.float32)
    d = tl.math.div_rn(tl.max(tl.max(tl.abs(x), axis=2), axis=1), 127.0)  # [NGP]
    c = q8_code(x, d[:, None, None])  # [NGP, WG, 8]
    cb = c & 255
    even = tl.sum(tl.where(j % 2 == 0, cb << (4 * j), 0), axis=2)  # disjoint bytes: the sum is their or
    odd = tl.sum(tl.where(j % 2 == 1, cb << (4 * (j - 1)), 0), axis=2)
    tl.store(ws + word, even, mask=mw)
    tl.store(ws + KW + word, odd, mask=mw)
    mg = g < NG
    tl.store(fs + g, d, mask=mg)
    tl.store(fs + NG + g, tl.sum(tl.sum(c, axis=2), axis=1).to(tl.float32) * d, mask=mg)


def _q8_words(w0, BG: tl.constexpr, WG: tl.constexpr, H: tl.constexpr, KW: tl.constexpr):
    """(wa, wb [BG, H] word indices, ma, mb [BG, H] masks) of a step's code words w0 + [0, BG * WG) read as halves of
    groups: wa the first H words of each group, wb the rest (masked where WG - H < H or past the row's KW words)."""
    i = tl.arange(0, H)
    wa = w0 + tl.arange(0, BG)[:, None] * WG + i[None, :]
    wb = wa + H
    return wa, wb, wa < KW, (wb < KW) & (i[None, :] < WG - H)


def _q8_x(ws, fs, w0, BG: tl.constexpr, WG: tl.constexpr, H: tl.constexpr, KW: tl.constexpr, NG: tl.constexpr):
    """A step's 8-bit inputs from a q8_fill scratch row, for the code words w0 + [0, BG * WG) read as halves of groups
    (q8_codes): (even_a, odd_a, even_b, odd_b [BG, H] int32, d [BG], xs [BG] fp32)."""
    wa, wb, ma, mb = q8_words(w0, BG, WG, H, KW)
    gi = w0 // WG + tl.arange(0, BG)
    mg = gi < NG
    return (tl.load(ws + wa, mask=ma, other=0), tl.load(ws + KW + wa, mask=ma, other=0),
            tl.load(ws + wb, mask=mb, other=0), tl.load(ws + KW + wb, mask=mb, other=0),
            tl.load(fs + gi, mask=mg, other=0.0), tl.load(fs + NG + gi, mask=mg, other=0.0))


def _q8_codes(q, mask_n, w0, BG: tl.constexpr, WG: tl.constexpr, H: tl.constexpr, KW: tl.constexpr):
    """(a, b [BN, BG, H] int32): the code words w0 + [0, BG * WG) of the rows at q ([BN] int32 row pointers), the
    first H words of each group in a and the rest in b (0 where WG - H < H or past the row's KW words): each thread
    then holds whole halves of groups, so a group's sum needs no exchange between threads."""
    wa, wb, ma, mb = q8_words(w0, BG, WG, H, KW)
    a = tl.load(q[:, None, None] + wa[None, :, :], mask=mask_n[:, None, None] & ma[None, :, :], other=0)
    if WG > H:
        b = tl.load(q[:, None, None] + wb[None, :, :], mask=mask_n[:, None, None] & mb[None, :, :], other=0)
    else:
        b = tl.zeros_like(a)
    return a, b


def _q8_codes_k(q, mask, w0, BG: tl.constexpr, WG: tl.constexpr, H: tl.constexpr, KW: tl.constexpr):
    """q8_codes over [KP, BN] row pointers (the down kernel's K experts at once; mask [KP, BN]) -> (a, b) [KP, BN, BG,
    H]."""
    wa, wb, ma, mb = q8_words(w0, BG, WG, H, KW)
    a = tl.load(q[:, :, None, None] + wa[None, None, :, :], mask=mask[:, :, None, None] & ma[None, None, :, :], other=0)
    if WG > H:
        b = tl.load(q[:, :, None, None] + wb[None, None, :, :], mask=mask[:, :, None, None] & mb[None, None, :, :],
                    other=0)
    else:
        b = tl.zeros_like(a)
    return a, b


def _q8_dot(a, b, ea, oa, eb, ob, HB: tl.constexpr):
    """[BN, BG] int32: per row and group, sum(code x input code) over the halves a, b [BN, BG, H] against the inputs'
    words ea, oa, eb, ob [BG, H] (q8_x): the low nibbles (c & 0x0F0F0F0F, the even inputs' codes byte by byte)
    against even, the high ones ((c >> 4) & 0x0F0F0F0F) against odd, two dp4a per code word."""
    z = tl.zeros(a.shape, tl.int32)
    t = dp4a((a >> 4) & 0x0F0F0F0F, tl.broadcast_to(oa[None, :, :], a.shape),
             dp4a(a & 0x0F0F0F0F, tl.broadcast_to(ea[None, :, :], a.shape), z))
    if HB:
        t = dp4a((b >> 4) & 0x0F0F0F0F, tl.broadcast_to(ob[None, :, :], a.shape),
                 dp4a(b & 0x0F0F0F0F, tl.broadcast_to(eb[None, :, :], a.shape), t))
    return tl.sum(t, axis=2)


def _pre_q8(q1, s1, m1, mask_n, KQ: tl.constexpr, NG: tl.constexpr, GROUP: tl.constexpr, BG: tl.constexpr):
    """(codes a, b [BN, BG, H], scales [BN, BG], minima [BN, BG]) of step 0 for dot_rows_q8(PRE=True): pre_words'
    counterpart for the 8-bit-input tile."""
    WG: tl.constexpr = GROUP // 8
    H: tl.constexpr = (WG + 1) // 2
    a, b = q8_codes(q1, mask_n, 0, BG, WG, H, KQ // 4)
    g = tl.arange(0, BG)
    ms = mask_n[:, None] & (g[None, :] < NG)
    return a, b, tl.load(s1[:, None] + g[None, :], mask=ms, other=0), tl.load(m1[:, None] + g[None, :], mask=ms,
                                                                               other=0)


def _dot_rows_q8(x_row, q1, s1, m1, q2, s2, m2, mask_n, KIN: tl.constexpr, KQ: tl.constexpr, NG: tl.constexpr,
                 GROUP: tl.constexpr, BN: tl.constexpr, BG: tl.constexpr, BK: tl.constexpr, TWO: tl.constexpr,
                 PRE: tl.constexpr, pa, pb, psv, pmv, ws, fs, NGP: tl.constexpr, FILL: tl.constexpr = True):
    """([BN], [BN]) fp32: dot_rows_words with 8-bit inputs (QConfig.act 1): x's row is rounded per group once into
    the scratch row ws / fs (q8_fill, then the CTA barrier); each group's code words are read as two halves of H
    words (q8_codes: a thread holds whole halves, 16-byte loads at groups of 64) and per code word two dp4a give
    sum(c code) exactly in integers (q8_dot); then per group scale * d * that + min * sum(x'). Per eight inputs:
    three logic ops and two dp4a. Codes of step i + 1 are loaded before step i is computed; PRE: step 0's come in
    as pa, pb, psv, pmv (pre_q8). FILL False: the caller has filled the scratch row (and passed the barrier)."""
    KW: tl.constexpr = KQ // 4
    WG: tl.constexpr = GROUP // 8
    H: tl.constexpr = (WG + 1) // 2
    HB: tl.constexpr = WG > H
    offs_g = tl.arange(0, BG)
    acc1 = tl.zeros([BN, BG], tl.float32)
    acc2 = tl.zeros([BN, BG], tl.float32)
    if PRE:
        na1 = pa
        nb1 = pb
        na2 = pa
        nb2 = pb
    else:
        na1, nb1 = q8_codes(q1, mask_n, 0, BG, WG, H, KW)
        if TWO:
            na2, nb2 = q8_codes(q2, mask_n, 0, BG, WG, H, KW)
        else:
            na2 = na1
            nb2 = nb1
    if FILL:
        q8_fill(x_row, 8, 1, ws, fs, KW, NG, GROUP, NGP)
        tl.debug_barrier()
    for k0 in tl.static_range(0, KIN, BK):
        a1 = na1
        b1 = nb1
        a2 = na2
        b2 = nb2
        if k0 + BK < KIN:  # the next step's codes in flight while this step computes
            na1, nb1 = q8_codes(q1, mask_n, (k0 + BK) // 8, BG, WG, H, KW)
            if TWO:
                na2, nb2 = q8_codes(q2, mask_n, (k0 + BK) // 8, BG, WG, H, KW)
        ea, oa, eb, ob, d, xs = q8_x(ws, fs, k0 // 8, BG, WG, H, KW, NG)
        g = k0 // GROUP + offs_g
        ms = mask_n[:, None] & (g[None, :] < NG)
        if PRE and k0 == 0:
            sv = psv.to(tl.float32)
            mv = pmv.to(tl.float32)
        else:
            sv = tl.load(s1[:, None] + g[None, :], mask=ms, other=0).to(tl.float32)
            mv = tl.load(m1[:, None] + g[None, :], mask=ms, other=0).to(tl.float32)
        acc1 += q8_dot(a1, b1, ea, oa, eb, ob, HB).to(tl.float32) * (sv * d[None, :]) + mv * xs[None, :]
        if TWO:
            sv2 = tl.load(s2[:, None] + g[None, :], mask=ms, other=0).to(tl.float32)
            mv2 = tl.load(m2[:, None] + g[None, :], mask=ms, other=0).to(tl.float32)
            acc2 += q8_dot(a2, b2, ea, oa, eb, ob, HB).to(tl.float32) * (sv2 * d[None, :]) + mv2 * xs[None, :]
    return tl.sum(acc1, axis=1), tl.sum(acc2, axis=1)


def _dot_rows_words(x_row, q1, s1, m1, q2, s2, m2, mask_n, KIN: tl.constexpr, KQ: tl.constexpr,
                    NG: tl.constexpr, GROUP: tl.constexpr, BN: tl.constexpr, BG: tl.constexpr, BK: tl.constexpr,
                    UK: tl.constexpr, TWO: tl.constexpr, PRE: tl.constexpr, pc, psv, pmv,
                    PAIR: tl.constexpr = False):
    """([BN], [BN]) fp32: _dot_rows_flat for q4 read as int32 words (q1 / q2: [BN] int32 row pointers; a word
    holds inputs 8w..8w+7, nibble j = input 8w + j). Per step the [BN, UK] words of each row; for each nibble
    position j the values 1 + c/16 (word_nibble) meet x[8w + j] (a strided [UK] load shared by the BN rows)
    in one fused multiply-add into a [BN, UK] sum, which is reduced over each group's GROUP / 8 words once
    per step. Per input: a shift, an and-or, an FMA. The group sums of x are taken once per step for all rows
    (not per row), and sum(c x) = 16 (sum((1 + c/16) x) - sum x) as in the other tiles. Codes of step i + 1
    are loaded before step i is computed. KQ is the row's bytes (KQ // 4 words). PRE (one matrix, not TWO): step 0's
    codes, scales and minima come in as pc, psv, pmv (pre_words, loaded before the PDL wait).
    PAIR (QConfig.conv 2): nibbles taken two at a time (word_pair: one shift for J odd and J - 1), the even one as
    1 + c/256 against 16 x (exact: a power of two), so one sum holds both: per word sum_odd x + 16 sum_even x +
    sum(c x) / 16, and sum(c x) = 16 (d - xs_odd - 16 xs_even). Per input: half a shift, an and-or, an FMA."""
    KW: tl.constexpr = KQ // 4
    WG: tl.constexpr = GROUP // 8
    offs_w = tl.arange(0, UK)
    offs_g = tl.arange(0, BG)
    acc1 = tl.zeros([BN, BG], tl.float32)
    acc2 = tl.zeros([BN, BG], tl.float32)
    if PRE:
        nxt1 = pc
        nxt2 = pc
    else:
        nxt1, nxt2 = step_codes(q1, q2, mask_n, 0, UK, KW, TWO)  # [BN, UK] words of step 0
    for k0 in tl.static_range(0, KIN, BK):
        c1 = nxt1
        c2 = nxt2
        if k0 + BK < KIN:  # prefetch the next step's codes
            nxt1, nxt2 = step_codes(q1, q2, mask_n, k0 // BK + 1, UK, KW, TWO)
        wi = k0 // 8 + offs_w  # [UK] word index within the row
        wm = wi < KW
        t1 = tl.zeros([BN, UK], tl.float32)
        t2 = tl.zeros([BN, UK], tl.float32)
        xw = tl.zeros([UK], tl.float32)
        xe = tl.zeros([UK], tl.float32)  # PAIR: the even inputs' sum
        if PAIR:
            for jp in tl.static_range(4):
                xo = tl.load(x_row + wi * 8 + 2 * jp + 1, mask=wm, other=0.0).to(tl.float32)  # [UK] 8w + 2jp + 1
                xv = tl.load(x_row + wi * 8 + 2 * jp, mask=wm, other=0.0).to(tl.float32)  # [UK] 8w + 2jp
                xw += xo
                xe += xv
                x16 = xv * 16.0
                hi, lo = word_pair(c1, 2 * jp + 1)
                t1 += hi * xo[None, :]  # (two statements: two FMAs, not a product, an FMA and an add)
                t1 += lo * x16[None, :]
                if TWO:
                    hi2, lo2 = word_pair(c2, 2 * jp + 1)
                    t2 += hi2 * xo[None, :]
                    t2 += lo2 * x16[None, :]
        else:
            for j in tl.static_range(8):
                xj = tl.load(x_row + wi * 8 + j, mask=wm, other=0.0).to(tl.float32)  # [UK] inputs 8w + j
                xw += xj
                t1 += word_nibble(c1, j) * xj[None, :]
                if TWO:
                    t2 += word_nibble(c2, j) * xj[None, :]
        g = k0 // GROUP + offs_g  # [BG]
        ms = mask_n[:, None] & (g[None, :] < NG)
        # the group sums of x from the words' sums (a separate contiguous load and reduction compiled to more
        # instructions: its reduction crosses threads)
        xs = tl.sum(tl.reshape(xw, [BG, WG]), axis=1)[None, :]  # [1, BG] (PAIR: the odd inputs')
        if PAIR:
            xse = tl.sum(tl.reshape(xe, [BG, WG]), axis=1)[None, :]  # [1, BG] the even inputs'
            xoff = xs + 16.0 * xse  # what the sum of a word's values adds beyond sum(c x) / 16
            xs = xs + xse
        else:
            xoff = xs
        if PRE and k0 == 0:
            sv = psv.to(tl.float32)
            mv = pmv.to(tl.float32)
        else:
            sv = tl.load(s1[:, None] + g[None, :], mask=ms, other=0).to(tl.float32)
            mv = tl.load(m1[:, None] + g[None, :], mask=ms, other=0).to(tl.float32)
        d1 = tl.sum(tl.reshape(t1, [BN, BG, WG]), axis=2)  # [BN, BG]
        acc1 += (d1 - xoff) * 16.0 * sv + mv * xs
        if TWO:
            sv2 = tl.load(s2[:, None] + g[None, :], mask=ms, other=0).to(tl.float32)
            mv2 = tl.load(m2[:, None] + g[None, :], mask=ms, other=0).to(tl.float32)
            d2 = tl.sum(tl.reshape(t2, [BN, BG, WG]), axis=2)
            acc2 += (d2 - xoff) * 16.0 * sv2 + mv2 * xs
    return tl.sum(acc1, axis=1), tl.sum(acc2, axis=1)


def _pre_words(q1, s1, m1, mask_n, KQ: tl.constexpr, NG: tl.constexpr, BG: tl.constexpr, UK: tl.constexpr):
    """(codes [BN, UK] int32, scales [BN, BG], minima [BN, BG]) of step 0 of the rows at q1 / s1 / m1 for
    dot_rows_words(PRE=True): what a kernel loads before its PDL wait when the previous kernel does not write them."""
    c, _ = step_codes(q1, q1, mask_n, 0, UK, KQ // 4, False)
    g = tl.arange(0, BG)
    ms = mask_n[:, None] & (g[None, :] < NG)
    return c, tl.load(s1[:, None] + g[None, :], mask=ms, other=0), tl.load(m1[:, None] + g[None, :], mask=ms, other=0)


def _down_words(h_ptr, slot_ptr, wt_ptr, dq, ds, dm, t, d64, mask_d, slot_base, stride_qs, stride_qn, stride_ss,
                stride_sn, stride_ms, stride_mn, K: tl.constexpr, KP: tl.constexpr, KIN: tl.constexpr,
                KQ: tl.constexpr, NG: tl.constexpr, GROUP: tl.constexpr, BN: tl.constexpr, BG: tl.constexpr,
                BK: tl.constexpr, UK: tl.constexpr, WR: tl.constexpr, HW: tl.constexpr = 0, PRE: tl.constexpr = False,
                GDC: tl.constexpr = False, ACT8: tl.constexpr = False, ws=0, fs=0, NGP: tl.constexpr = 1):
    """[BN] fp32: sum over token t's K experts of w_k * (h_k @ down[slot_k].T) for the BN output rows d64, q4 read
    as int32 words with every expert's codes of a step in one [KP, BN, UK] load (KP = K padded to a power of
    two): all K experts' bytes are in flight at once, where a loop over experts would wait for each in turn
    (the down projection's rows are short, so a program's per-expert work is one small load). The per-expert
    sums are reduced over k in a fixed order (deterministic). HW > 0: h rows are word-major (QConfig.hw), input
    8w + j at j * KW + w. PRE: the slots, routing weights and step 0's codes, scales and minima are loaded first,
    then the PDL wait (gdc_enter(GDC), which the caller has not made): only h comes from the previous kernel
    (quant_down's `early`). ACT8: each expert's h rounded to 8 bits per group once into the scratch rows ws / fs
    ([K, 2 KW] int32 and [K, 2 NG] fp32 for this token; q8_fill) and integer products, the codes read as halves of
    groups (q8_codes_k; dot_rows_q8 says how)."""
    KW: tl.constexpr = KQ // 4
    WG: tl.constexpr = GROUP // 8
    H: tl.constexpr = (WG + 1) // 2  # ACT8: words in a group's first half
    HB: tl.constexpr = WG > H
    offs_k = tl.arange(0, KP)
    mk = offs_k < K
    pair = t * K + offs_k  # [KP]
    slot = tl.load(slot_ptr + pair, mask=mk, other=0).to(tl.int64) + slot_base
    wk = round_weight(tl.load(wt_ptr + pair, mask=mk, other=0).to(tl.float32), WR)
    offs_w = tl.arange(0, UK)
    offs_g = tl.arange(0, BG)
    mkd = mk[:, None] & mask_d[None, :]  # [KP, BN]
    qrow = dq + slot[:, None] * stride_qs + d64[None, :] * stride_qn  # [KP, BN] int32 row pointers
    srow = ds + slot[:, None] * stride_ss + d64[None, :] * stride_sn
    mrow = dm + slot[:, None] * stride_ms + d64[None, :] * stride_mn
    hrow = h_ptr + pair.to(tl.int64) * KIN  # [KP]
    acc = tl.zeros([KP, BN, BG], tl.float32)
    wi = offs_w  # [UK] step 0's words
    if ACT8:  # the codes as halves of groups, [KP, BN, BG, H] each
        nxt, nxb = q8_codes_k(qrow, mkd, 0, BG, WG, H, KW)
    else:
        nxt = tl.load(qrow[:, :, None] + wi[None, None, :], mask=mkd[:, :, None] & (wi < KW)[None, None, :], other=0)
        nxb = nxt
    if PRE:
        ms0 = mkd[:, :, None] & (offs_g[None, None, :] < NG)
        psv = tl.load(srow[:, :, None] + offs_g[None, None, :], mask=ms0, other=0)
        pmv = tl.load(mrow[:, :, None] + offs_g[None, None, :], mask=ms0, other=0)
        gdc_enter(GDC)
    if ACT8:  # each expert's h rounded once into its scratch rows (q8_fill), then the CTA barrier
        for k in tl.static_range(K):
            q8_fill(h_ptr + (t * K + k).to(tl.int64) * KIN, 1 if HW else 8, KW if HW else 1, ws + k * (2 * KW),
                    fs + k * (2 * NG), KW, NG, GROUP, NGP)
        tl.debug_barrier()
    for k0 in tl.static_range(0, KIN, BK):
        wi = k0 // 8 + offs_w  # [UK]
        wm = wi < KW
        c = nxt
        cb = nxb
        if k0 + BK < KIN:  # the next step's codes in flight while this step computes
            wn = wi + BK // 8
            if ACT8:
                nxt, nxb = q8_codes_k(qrow, mkd, (k0 + BK) // 8, BG, WG, H, KW)
            else:
                nxt = tl.load(qrow[:, :, None] + wn[None, None, :], mask=mkd[:, :, None] & (wn < KW)[None, None, :],
                              other=0)
        if ACT8:  # the step's 8-bit inputs of every expert from the scratch rows, [KP, BG, H] / [KP, BG]
            wa, wb, ma, mb = q8_words(k0 // 8, BG, WG, H, KW)  # [BG, H] the halves' words
            ma = mk[:, None, None] & ma[None, :, :]
            mb = mk[:, None, None] & mb[None, :, :]
            wsk = ws + offs_k[:, None, None] * (2 * KW)
            ea = tl.load(wsk + wa[None, :, :], mask=ma, other=0)
            oa = tl.load(wsk + KW + wa[None, :, :], mask=ma, other=0)
            eb = tl.load(wsk + wb[None, :, :], mask=mb, other=0)
            ob = tl.load(wsk + KW + wb[None, :, :], mask=mb, other=0)
            gi = k0 // GROUP + offs_g
            mg = mk[:, None] & (gi < NG)[None, :]
            fk = fs + offs_k[:, None] * (2 * NG) + gi[None, :]
            hd = tl.load(fk, mask=mg, other=0.0)  # [KP, BG]
            hx = tl.load(fk + NG, mask=mg, other=0.0)
            shape: tl.constexpr = [KP, BN, BG, H]
            ic = dp4a((c >> 4) & 0x0F0F0F0F, tl.broadcast_to(oa[:, None, :, :], shape),
                      dp4a(c & 0x0F0F0F0F, tl.broadcast_to(ea[:, None, :, :], shape), tl.zeros(shape, tl.int32)))
            if HB:
                ic = dp4a((cb >> 4) & 0x0F0F0F0F, tl.broadcast_to(ob[:, None, :, :], shape),
                          dp4a(cb & 0x0F0F0F0F, tl.broadcast_to(eb[:, None, :, :], shape), ic))
            d = tl.sum(ic, axis=3).to(tl.float32)  # [KP, BN, BG] sum(c code)
        else:
            tacc = tl.zeros([KP, BN, UK], tl.float32)
            xw = tl.zeros([KP, UK], tl.float32)
            for j in tl.static_range(8):
                if HW:
                    xj = tl.load(hrow[:, None] + j * KW + wi[None, :], mask=mk[:, None] & wm[None, :], other=0.0)
                else:
                    xj = tl.load(hrow[:, None] + wi[None, :] * 8 + j, mask=mk[:, None] & wm[None, :], other=0.0)
                xj = xj.to(tl.float32)  # [KP, UK] inputs 8w + j of each expert's h row
                xw += xj
                tacc += word_nibble(c, j) * xj[:, None, :]
            xs = tl.sum(tl.reshape(xw, [KP, BG, WG]), axis=2)[:, None, :]  # [KP, 1, BG]
            d = tl.sum(tl.reshape(tacc, [KP, BN, BG, WG]), axis=3)  # [KP, BN, BG]
        g = k0 // GROUP + offs_g
        ms = mkd[:, :, None] & (g[None, None, :] < NG)
        if PRE and k0 == 0:
            sv = psv.to(tl.float32)
            mv = pmv.to(tl.float32)
        else:
            sv = tl.load(srow[:, :, None] + g[None, None, :], mask=ms, other=0).to(tl.float32)
            mv = tl.load(mrow[:, :, None] + g[None, None, :], mask=ms, other=0).to(tl.float32)
        if ACT8:
            acc += d * (sv * hd[:, None, :]) + mv * hx[:, None, :]
        else:
            acc += (d - xs) * 16.0 * sv + mv * xs
    yk = tl.sum(acc, axis=2)  # [KP, BN]
    return tl.sum(yk * wk[:, None], axis=0)


def _l2_rows(q, s, m, rows, srows, stride_qn, stride_sn, stride_mn, KQ, PF_LINES: tl.constexpr,
             PF_STEP: tl.constexpr):
    """Ask L2 for the codes, scales and minima of `rows` (int64 [BN], valid rows: callers map those past N onto
    one that exists): the first PF_LINES 128-byte lines of each code row (those past its KQ bytes fold onto line
    0; PF_STEP codes a line), the scale rows `srows` (fp8: one per GROUP output rows) and the minima. CUDA only
    (pdl.l2_prefetch is inline PTX); nothing is held in registers and nothing waits."""
    lo = tl.arange(0, PF_LINES)
    lo = tl.where(lo * 128 < KQ, lo, 0)
    l2_prefetch(q + rows[:, None] * stride_qn + lo[None, :] * PF_STEP)
    l2_prefetch(s + srows * stride_sn)
    l2_prefetch(m + rows * stride_mn)


def _gemv_loop(x_ptr, slot_ptr, q_ptr, s_ptr, m_ptr, out_ptr, N, stride_xt, stride_qs, stride_qn, stride_ss,
               stride_sn, stride_ms, stride_mn, stride_ot, KIN: tl.constexpr, KQ: tl.constexpr, NG: tl.constexpr,
               GROUP: tl.constexpr, BN: tl.constexpr, BG: tl.constexpr, BK: tl.constexpr, UK: tl.constexpr,
               HAS_SLOTS: tl.constexpr, GDC: tl.constexpr, PAIR: tl.constexpr, ACT8: tl.constexpr, ws_ptr, fs_ptr,
               NGP: tl.constexpr, AHEAD: tl.constexpr, PF_LINES: tl.constexpr, PF_STEP: tl.constexpr):
    """_qgemv's LOOP body (QConfig.persist, the word tile): fewer programs than row blocks, each taking the blocks
    program_id(0), + num_programs(0), ... in turn. The next block's first step (codes, scales, minima: pre_words, or
    pre_q8 under ACT8) is loaded before the current block is computed, so a program's loads stay in flight from
    one block to the next, where a program a block waits for its first step at its start and idles at its end. A
    single matrix (no slots) loads its first block's first step before the PDL wait. ACT8: x[t] is rounded once
    into its scratch row (q8_fill, then the CTA barrier) for all the program's blocks. AHEAD > 0 (QConfig.ahead, CUDA
    only: inline PTX): before each block, the rows of the block AHEAD turns later are asked into L2 (PF_LINES 128-byte
    lines a code row, PF_STEP code elements a line; rows past N ask for the current block's again)."""
    t = tl.program_id(1)
    nprog = tl.num_programs(0)
    offs = tl.arange(0, BN)
    if HAS_SLOTS:  # the slots come from the kernels before: read after the wait
        gdc_enter(GDC)
        slot = tl.load(slot_ptr + t).to(tl.int64)
    else:
        slot = 0
    qb = q_ptr + slot * stride_qs
    sb = s_ptr + slot * stride_ss
    mb = m_ptr + slot * stride_ms
    n64 = (tl.program_id(0) * BN + offs).to(tl.int64)
    mask_n = n64 < N
    if ACT8:
        pa, pb, psv, pmv = pre_q8(qb + n64 * stride_qn, sb + n64 * stride_sn, mb + n64 * stride_mn, mask_n, KQ, NG,
                                  GROUP, BG)
    else:
        pa, psv, pmv = pre_words(qb + n64 * stride_qn, sb + n64 * stride_sn, mb + n64 * stride_mn, mask_n, KQ, NG,
                                 BG, UK)
    if not HAS_SLOTS:
        gdc_enter(GDC)
    xr = x_ptr + t * stride_xt
    if ACT8:
        ws = ws_ptr + t * (KQ // 2)
        fs = fs_ptr + t * (2 * NG)
        q8_fill(xr, 8, 1, ws, fs, KQ // 4, NG, GROUP, NGP)
        tl.debug_barrier()
    for blk in range(tl.program_id(0), tl.cdiv(N, BN), nprog):
        n64 = (blk * BN + offs).to(tl.int64)
        mask_n = n64 < N
        qr = qb + n64 * stride_qn
        sr = sb + n64 * stride_sn
        mr = mb + n64 * stride_mn
        nx = n64 + nprog * BN  # the next block's rows (masked off past N: no load)
        mask_x = nx < N
        if AHEAD > 0:
            pn = n64 + AHEAD * nprog * BN
            pn = tl.where(pn < N, pn, n64)
            l2_rows(qb, sb, mb, pn, pn, stride_qn, stride_sn, stride_mn, KQ, PF_LINES, PF_STEP)
        if ACT8:
            na, nb, nsv, nmv = pre_q8(qb + nx * stride_qn, sb + nx * stride_sn, mb + nx * stride_mn, mask_x, KQ, NG,
                                      GROUP, BG)
            y, _ = dot_rows_q8(xr, qr, sr, mr, qr, sr, mr, mask_n, KIN, KQ, NG, GROUP, BN, BG, BK, False, True, pa,
                               pb, psv, pmv, ws, fs, NGP, False)
            pb = nb
        else:
            na, nsv, nmv = pre_words(qb + nx * stride_qn, sb + nx * stride_sn, mb + nx * stride_mn, mask_x, KQ, NG,
                                     BG, UK)
            y, _ = dot_rows_words(xr, qr, sr, mr, qr, sr, mr, mask_n, KIN, KQ, NG, GROUP, BN, BG, BK, UK, False,
                                  True, pa, psv, pmv, PAIR)
        pa = na
        psv = nsv
        pmv = nmv
        tl.store(out_ptr + t * stride_ot + blk * BN + offs, y.to(out_ptr.dtype.element_ty), mask=mask_n)


def _qgemv(x_ptr, slot_ptr, q_ptr, s_ptr, m_ptr, out_ptr, N, stride_xt, stride_qs, stride_qn, stride_ss,
          stride_sn, stride_ms, stride_mn, stride_ot, KIN: tl.constexpr, KQ: tl.constexpr, NG: tl.constexpr,
          FMT: tl.constexpr, GROUP: tl.constexpr, GSTRIDE: tl.constexpr, GP: tl.constexpr, BN: tl.constexpr,
          BG: tl.constexpr, CONV: tl.constexpr, HAS_SLOTS: tl.constexpr, ALGO: tl.constexpr, BK: tl.constexpr,
          UK: tl.constexpr, GDC: tl.constexpr = False, PF_LINES: tl.constexpr = 0, PF_STEP: tl.constexpr = 1,
          PRE: tl.constexpr = False, ACT8: tl.constexpr = False, ws_ptr=None, fs_ptr=None, NGP: tl.constexpr = 1,
          LOOP: tl.constexpr = False, AHEAD: tl.constexpr = 0):
    """Grid (cdiv(N, BN), T): out[t, n-block] = x[t] @ W[slot[t]][n-block]^T.
    PF_LINES > 0 (with PDL, GDC; pdl.l2_prefetch_enabled): a single matrix's rows are asked into L2 before the wait
    for the previous kernel, which does not write them, so their reads overlap its tail (PF_LINES 128-byte lines a
    code row, PF_STEP code elements a line). PRE (a single matrix, the word tile, with PDL; pdl.preload_enabled): the
    first step's codes, scales and minima are loaded into registers before the wait (pre_words), so a kernel whose
    whole row is one step reads nothing but x after it. ACT8 (QConfig.act 1): 8-bit inputs (dot_rows_q8), through the
    scratch rows ws_ptr [T, 2 KW] int32 and fs_ptr [T, 2 NG] fp32 (NGP: NG padded to a power of two). LOOP (the word
    tile, QConfig.persist): a grid of fewer programs than row blocks, each taking the row blocks program_id,
    program_id + programs, ... with the next block's first step loaded ahead (gemv_loop; PRE is its own). AHEAD > 0
    (QConfig.ahead, CUDA only): L2 prefetches of the rows of a later block (LOOP: AHEAD turns later; else, one matrix:
    AHEAD blocks later, before the wait), PF_LINES and PF_STEP as above."""
    if LOOP:
        gemv_loop(x_ptr, slot_ptr, q_ptr, s_ptr, m_ptr, out_ptr, N, stride_xt, stride_qs, stride_qn, stride_ss,
                  stride_sn, stride_ms, stride_mn, stride_ot, KIN, KQ, NG, GROUP, BN, BG, BK, UK, HAS_SLOTS, GDC,
                  CONV == 2, ACT8, ws_ptr, fs_ptr, NGP, AHEAD, PF_LINES, PF_STEP)
    else:
        t = tl.program_id(1)
        offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
        mask_n = offs_n < N
        n64 = offs_n.to(tl.int64)
        if FMT >= 3:  # fp8: one scale row per GROUP output rows
            srow = n64 // GROUP
        else:
            srow = n64
        if GDC and not HAS_SLOTS and PF_LINES > 0:
            nn = tl.where(mask_n, n64, 0)  # rows past N prefetch row 0 again (a valid address)
            l2_rows(q_ptr, s_ptr, m_ptr, nn, tl.where(mask_n, srow, 0), stride_qn, stride_sn, stride_mn, KQ, PF_LINES,
                    PF_STEP)
        if AHEAD > 0 and not HAS_SLOTS:  # the rows of the block AHEAD blocks later (a later wave's) into L2
            pn = n64 + AHEAD * BN
            pn = tl.where(pn < N, pn, tl.where(mask_n, n64, 0))
            l2_rows(q_ptr, s_ptr, m_ptr, pn, pn, stride_qn, stride_sn, stride_mn, KQ, PF_LINES, PF_STEP)
        pcb = 0
        if PRE and ACT8:
            pc, pcb, psv, pmv = pre_q8(q_ptr + n64 * stride_qn, s_ptr + srow * stride_sn, m_ptr + n64 * stride_mn,
                                       mask_n, KQ, NG, GROUP, BG)
        elif PRE:  # a single matrix (no slots): its rows do not depend on the previous kernel
            pc, psv, pmv = pre_words(q_ptr + n64 * stride_qn, s_ptr + srow * stride_sn, m_ptr + n64 * stride_mn, mask_n,
                                     KQ, NG, BG, UK)
        else:
            pc = 0
            psv = 0
            pmv = 0
        gdc_enter(GDC)
        if HAS_SLOTS:
            slot = tl.load(slot_ptr + t).to(tl.int64)
        else:
            slot = 0
        xr = x_ptr + t * stride_xt
        qr = q_ptr + slot * stride_qs + n64 * stride_qn
        sr = s_ptr + slot * stride_ss + srow * stride_sn
        mr = m_ptr + slot * stride_ms + n64 * stride_mn
        if ACT8:
            y, _ = dot_rows_q8(xr, qr, sr, mr, qr, sr, mr, mask_n, KIN, KQ, NG, GROUP, BN, BG, BK, False, PRE, pc, pcb,
                               psv, pmv, ws_ptr + t * (KQ // 2), fs_ptr + t * (2 * NG), NGP)
        elif ALGO == 2:
            y, _ = dot_rows_words(xr, qr, sr, mr, qr, sr, mr, mask_n, KIN, KQ, NG, GROUP, BN, BG, BK, UK, False, PRE,
                                  pc, psv, pmv, CONV == 2)
        elif ALGO == 1:
            y, _ = dot_rows_flat(xr, qr, sr, mr, qr, sr, mr, mask_n, KIN, KQ, NG, FMT, GROUP, BN, BG, BK, UK, CONV,
                                 False)
        else:
            y = dot_rows(xr, qr, sr, mr, mask_n, KIN, KQ, NG, FMT, GROUP, GSTRIDE, GP, BN, BG, CONV)
        tl.store(out_ptr + t * stride_ot + offs_n, y.to(out_ptr.dtype.element_ty), mask=mask_n)

def _qgate_up(x_ptr, slot_ptr, gq, gs, gm, uq, us, um, h_ptr, slot_base, stride_xt, stride_qs, stride_qn,
              stride_ss, stride_sn, stride_ms, stride_mn, gb_ptr, ub_ptr, stride_bs, alpha, limit,
              F: tl.constexpr, K: tl.constexpr, KIN: tl.constexpr,
              KQ: tl.constexpr, NG: tl.constexpr, FMT: tl.constexpr, GROUP: tl.constexpr,
              GSTRIDE: tl.constexpr, GP: tl.constexpr, BN: tl.constexpr, BG: tl.constexpr,
              CONV: tl.constexpr, ALGO: tl.constexpr, BK: tl.constexpr, UK: tl.constexpr, HW: tl.constexpr = 0,
              ACT: tl.constexpr = 0, HAS_BIAS: tl.constexpr = False, GDC: tl.constexpr = False,
              ACT8: tl.constexpr = False, ws_ptr=None, fs_ptr=None, NGP: tl.constexpr = 1):
    """Grid (cdiv(F, BN), T*K): h[t*K + k, f-block] = act(x[t] @ gate.T, x[t] @ up.T), expert row
    slot_base + slot[t, k]: SwiGLU (ACT 0) or gpt-oss's clamped form (ACT 1, fused_norm.act_fn), HAS_BIAS: the
    gate and up biases [S, F] (row stride stride_bs, bf16 as stored) added first. gate and up share strides (views
    of one block layout)."""
    gdc_enter(GDC)
    pair = tl.program_id(1)
    offs_f = tl.program_id(0) * BN + tl.arange(0, BN)
    mask_f = offs_f < F
    slot = tl.load(slot_ptr + pair).to(tl.int64) + slot_base
    f64 = offs_f.to(tl.int64)
    if FMT >= 3:
        srow = f64 // GROUP
    else:
        srow = f64
    x_row = x_ptr + (pair // K) * stride_xt
    qo = slot * stride_qs + f64 * stride_qn
    so = slot * stride_ss + srow * stride_sn
    mo = slot * stride_ms + f64 * stride_mn
    if ACT8:  # the word tile's codes against 8-bit inputs, gate and up in one pass
        g, u = dot_rows_q8(x_row, gq + qo, gs + so, gm + mo, uq + qo, us + so, um + mo, mask_f, KIN, KQ, NG, GROUP, BN,
                           BG, BK, True, False, 0, 0, 0, 0, ws_ptr + (pair // K) * (KQ // 2),
                           fs_ptr + (pair // K) * (2 * NG), NGP)
    elif ALGO == 2:  # the word tile, gate and up in one pass
        g, u = dot_rows_words(x_row, gq + qo, gs + so, gm + mo, uq + qo, us + so, um + mo, mask_f, KIN, KQ, NG,
                              GROUP, BN, BG, BK, UK, True, False, 0, 0, 0, CONV == 2)
    elif ALGO == 1:  # gate and up in one pass: both rows' codes in flight together
        g, u = dot_rows_flat(x_row, gq + qo, gs + so, gm + mo, uq + qo, us + so, um + mo, mask_f, KIN, KQ, NG, FMT,
                             GROUP, BN, BG, BK, UK, CONV, True)
    else:
        g = dot_rows(x_row, gq + qo, gs + so, gm + mo, mask_f, KIN, KQ, NG, FMT, GROUP, GSTRIDE, GP, BN, BG, CONV)
        u = dot_rows(x_row, uq + qo, us + so, um + mo, mask_f, KIN, KQ, NG, FMT, GROUP, GSTRIDE, GP, BN, BG, CONV)
    if HW:  # word-major (QConfig.hw): input 8w + j of the down kernel at j * F / 8 + w
        hi = (offs_f % 8) * (F // 8) + offs_f // 8
    else:
        hi = offs_f
    if HAS_BIAS:
        g += tl.load(gb_ptr + slot * stride_bs + f64, mask=mask_f, other=0.0).to(tl.float32)
        u += tl.load(ub_ptr + slot * stride_bs + f64, mask=mask_f, other=0.0).to(tl.float32)
    tl.store(h_ptr + pair * F + hi, act_fn(g, u, ACT, alpha, limit).to(h_ptr.dtype.element_ty), mask=mask_f)

def _qdown(h_ptr, slot_ptr, wt_ptr, dq, ds, dm, y_ptr, slot_base, stride_qs, stride_qn, stride_ss, stride_sn,
           stride_ms, stride_mn, stride_yt, db_ptr, stride_bs, D: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
           K_PER: tl.constexpr, SPLIT: tl.constexpr, KIN: tl.constexpr, KQ: tl.constexpr, NG: tl.constexpr,
           FMT: tl.constexpr, GROUP: tl.constexpr, GSTRIDE: tl.constexpr, GP: tl.constexpr, BN: tl.constexpr,
           BG: tl.constexpr, CONV: tl.constexpr, ALGO: tl.constexpr, BK: tl.constexpr, UK: tl.constexpr,
           WR: tl.constexpr = 0, HW: tl.constexpr = 0, HAS_BIAS: tl.constexpr = False, GDC: tl.constexpr = False,
           PRE: tl.constexpr = False, ACT8: tl.constexpr = False, ws_ptr=None, fs_ptr=None, NGP: tl.constexpr = 1):
    """Grid (cdiv(D, BN), T*SPLIT): y[t, d-block] = sum over K_PER experts (rows slot_base + slot) of
    w * (h @ down.T (+ the down bias [S, D], HAS_BIAS, SPLIT 1 only)), w rounded as fused_norm.weight_rounding
    says (WR); the word tile at SPLIT 1 reads all K experts together (down_words), the other tiles one expert
    after another. PRE (that tile only; quant_down's `early`): down_words loads the slots, weights and first codes
    before the PDL wait."""
    ALL_K: tl.constexpr = ALGO == 2 and SPLIT == 1  # the word tile reads every expert's codes in one load
    EARLY: tl.constexpr = PRE and ALL_K
    if not EARLY:
        gdc_enter(GDC)
    pid = tl.program_id(1)
    t = pid // SPLIT
    offs_d = tl.program_id(0) * BN + tl.arange(0, BN)
    mask_d = offs_d < D
    d64 = offs_d.to(tl.int64)
    if FMT >= 3:
        srow = d64 // GROUP
    else:
        srow = d64
    y = tl.zeros([BN], tl.float32)
    if ALL_K:
        if ACT8:  # this token's scratch rows
            ws_t = ws_ptr + t * (K * (KQ // 2))
            fs_t = fs_ptr + t * (K * 2 * NG)
        else:
            ws_t = 0
            fs_t = 0
        y = down_words(h_ptr, slot_ptr, wt_ptr, dq, ds, dm, t, d64, mask_d, slot_base, stride_qs, stride_qn,
                       stride_ss, stride_sn, stride_ms, stride_mn, K, KP, KIN, KQ, NG, GROUP, BN, BG, BK, UK, WR, HW,
                       EARLY, GDC, ACT8, ws_t, fs_t, NGP)
    for kk in tl.static_range(0 if ALL_K else K_PER):  # otherwise one expert after another
        pair = t * K + (pid % SPLIT) * K_PER + kk
        slot = tl.load(slot_ptr + pair).to(tl.int64) + slot_base
        w = round_weight(tl.load(wt_ptr + pair).to(tl.float32), WR)
        hr = h_ptr + pair * KIN
        qr = dq + slot * stride_qs + d64 * stride_qn
        sr = ds + slot * stride_ss + srow * stride_sn
        mr = dm + slot * stride_ms + d64 * stride_mn
        if ACT8:
            yk, _ = dot_rows_q8(hr, qr, sr, mr, qr, sr, mr, mask_d, KIN, KQ, NG, GROUP, BN, BG, BK, False, False, 0, 0,
                                0, 0, ws_ptr + pair * (KQ // 2), fs_ptr + pair * (2 * NG), NGP)
            y += w * yk
        elif ALGO == 2:
            yk, _ = dot_rows_words(hr, qr, sr, mr, qr, sr, mr, mask_d, KIN, KQ, NG, GROUP, BN, BG, BK, UK, False, False,
                                   0, 0, 0)
            y += w * yk
        elif ALGO == 1:
            yk, _ = dot_rows_flat(hr, qr, sr, mr, qr, sr, mr, mask_d, KIN, KQ, NG, FMT, GROUP, BN, BG, BK, UK, CONV,
                                  False)
            y += w * yk
        else:
            y += w * dot_rows(hr, qr, sr, mr, mask_d, KIN, KQ, NG, FMT, GROUP, GSTRIDE, GP, BN, BG, CONV)
    if HAS_BIAS:
        y += bias_sum(db_ptr, slot_ptr, wt_ptr, t, d64, mask_d, slot_base, stride_bs, K, KP, WR)
    if SPLIT == 1:
        tl.store(y_ptr + t * stride_yt + offs_d, y.to(y_ptr.dtype.element_ty), mask=mask_d)
    else:
        tl.atomic_add(y_ptr + t * stride_yt + offs_d, y, mask=mask_d, sem="relaxed")


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 2 off CUDA (Triton's interpreter: two programs, so that the loops
    over row blocks run more than once in tests)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2


def _q8_scratch(tiles: dict, w: QuantWeight, rows: int, device: torch.device) -> dict:
    """The ACT8 launch's scratch rows (q8_fill: per input row its 8-bit inputs, 2 KW int32, and its groups' d and
    sums, 2 NG fp32) and NGP; nothing for other launches."""
    if not tiles["ACT8"]:
        return {}
    ng = w.scale.shape[-1]
    return dict(ws_ptr=torch.empty(rows, w.q.shape[-1] // 2, dtype=torch.int32, device=device),
                fs_ptr=torch.empty(rows, 2 * ng, dtype=torch.float32, device=device), NGP=triton.next_power_of_2(ng))


def _launch_opts(cfg: QConfig, device: torch.device) -> dict:
    """The launch's compile options beyond the tiles: num_warps, maxnreg where cfg.regs caps the registers (CUDA
    only: Triton's interpreter has no registers), and PDL's arguments (pdl.launch_args)."""
    opts = {"num_warps": cfg.warps, **launch_args(device)}
    if cfg.regs and device.type == "cuda":
        opts["maxnreg"] = cfg.regs
    return opts


def _preload_ok(opts: dict) -> bool:
    """Whether a launch with these options loads what the previous kernel does not write before its PDL wait (the
    kernels' PRE): PDL on (opts carry GDC) and pdl.preload_enabled(). Without PDL there is no wait to load before;
    tests patch this to run the PRE code under the interpreter."""
    return "GDC" in opts and preload_enabled()


def _strides(w: QuantWeight, algo: int = 0) -> tuple[int, int, int, int, int, int]:
    """(stack, row) strides of q, scale and min (0 for a single matrix; min = scale when absent); q's in int32
    words under the word tile (algo 2), else in its own elements."""
    m = w.min if w.min is not None else w.scale
    u = 4 if algo == 2 else 1
    if not w.lead:
        return 0, w.q.stride(-2) // u, 0, w.scale.stride(-2), 0, m.stride(-2)
    return w.q.stride(0) // u, w.q.stride(-2) // u, w.scale.stride(0), w.scale.stride(-2), m.stride(0), m.stride(-2)


def quant_matvec(x: Tensor, w: QuantWeight, slots: Tensor | None = None, *, out_dtype: torch.dtype | None = None,
                 config: QConfig | None = None) -> Tensor:
    """out [T, N] = x[t] @ W[slot[t]]^T with the fused kernel.

    x [T, K]; w a single [N, K] matrix (slots None) or a stack [S, N, K] with slots int64 [T] on x's device.
    """
    n, k = w.matrix
    T = x.shape[0]
    if w.lead and slots is None:
        raise ValueError(f"quant_matvec over a stack {list(w.shape)} needs slots")
    if x.stride(-1) != 1:
        x = x.contiguous()
    cfg = config or pick_config("gemv", w.fmt, k, n)
    if cfg.algo == 3:
        if quant_gluon.gemv_ok(x, w):  # x bf16 on CUDA, one q4 matrix in groups of 64
            launch = launch_args(x.device)
            if launch and not preload_enabled():
                launch["PRE"] = False
            return quant_gluon.matvec(x, w, out_dtype=out_dtype, bn=cfg.bn, ahead=max(cfg.ahead, 1),
                                      groups=cfg.bg if cfg.bg in (2, 4) else 1, persist=cfg.persist, launch=launch)
        cfg = dataclasses.replace(cfg, algo=2, bn=min(cfg.bn, 32), persist=0, ahead=0)  # its ahead: L2 prefetches
    out = torch.empty(T, n, dtype=out_dtype or x.dtype, device=x.device)
    m = w.min if w.min is not None else w.scale
    sl = slots if w.lead else out  # an unused pointer when there are no slots
    qgemv = _kernels()[0]
    tiles = _tiles(cfg, w)
    a = tiles["ALGO"]
    codes = _codes(w, a)
    opts = _launch_opts(cfg, x.device)
    if "GDC" in opts and not w.lead and l2_prefetch_enabled():  # a single matrix's rows asked into L2 before the wait
        opts.update(PF_LINES=triton.next_power_of_2(triton.cdiv(w.q.shape[-1] * w.q.element_size(), 128)),
                   PF_STEP=128 // codes.element_size())
    blocks = triton.cdiv(n, cfg.bn)
    if a == 2 and cfg.persist:  # programs that loop over row blocks, the next block's loads ahead (gemv_loop)
        blocks = min(blocks, cfg.persist * _sm_count(x.device))
        opts["LOOP"] = True
    elif not w.lead and a == 2 and _preload_ok(opts):  # its first step in registers before the wait
        opts["PRE"] = True
    if cfg.ahead and a == 2 and x.device.type == "cuda" and (cfg.persist or not w.lead):
        # L2 prefetches of later blocks (inline PTX: not under the interpreter)
        lines = triton.cdiv(w.q.shape[-1] * w.q.element_size(), 128)
        opts.update(AHEAD=cfg.ahead, PF_LINES=triton.next_power_of_2(lines), PF_STEP=128 // codes.element_size())
    qgemv[(blocks, T)](x, sl, codes, w.scale, m, out, n, x.stride(0), *_strides(w, a),
                                      out.stride(0), **_geometry(w), **tiles, HAS_SLOTS=bool(w.lead),
                                      **_q8_scratch(tiles, w, T, x.device), **opts)
    return out


def quant_matvec_ref(x: Tensor, w: QuantWeight, slots: Tensor | None = None) -> Tensor:
    """The reference of quant_matvec: each row against its dequantized matrix (fp32), in x's dtype."""
    if not w.lead:
        return F.linear(x.float(), w.dequantize(torch.float32)).to(x.dtype)
    mats = w.index_select(0, slots).dequantize(torch.float32)  # [T, N, K]
    return torch.bmm(mats, x.float()[:, :, None])[:, :, 0].to(x.dtype)


def _bias_rows(biases: tuple, like: Tensor) -> tuple:
    """(bias tensors..., their row stride, HAS_BIAS) for a launch: placeholders (never read) when `biases` is None."""
    if biases is None:
        return (*(like for _ in range(2)), 0, False)
    if len({b.stride(0) for b in biases}) != 1 or any(b.stride(-1) != 1 for b in biases):
        raise ValueError(f"expert biases need one row stride and contiguous rows, got strides "
                         f"{[b.stride() for b in biases]}")
    return (*biases, *([biases[0]] if len(biases) == 1 else []), biases[0].stride(0), True)


def quant_gate_up(x: Tensor, slots: Tensor, gate: QuantWeight, up: QuantWeight,
                  config: QConfig | None = None, *, slot_base: int = 0, h_layout: int = 0, act=None,
                  biases: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """x [T, D], slots [T, K] (or [K]) slot rows of the stacks (slot_base + slots: the kernel adds it)
    -> h [T*K, F] fp32 = silu(x gate^T) * (x up^T); h_layout 1 / 2 (QConfig.hw): each row word-major, in fp32 / bf16,
    for a word-tile down kernel that reads it so (quant_down with the same h_layout). act: gpt-oss's ClampedSwiGLU
    (model/moe.py) in place of SwiGLU; biases: (gate_bias, up_bias) [S, F], added before it."""
    Fe, D = gate.matrix
    if _strides(gate) != _strides(up) or gate.fmt != up.fmt:
        raise ValueError("quant_gate_up: gate and up must share their format and strides (one block layout)")
    T = x.shape[0]
    flat = slots.reshape(-1)
    K = flat.numel() // T
    cfg = _word_tile_for(config or pick_config("gate_up", gate.fmt, D, Fe), 4)
    if h_layout and Fe % 8:
        raise ValueError(f"quant_gate_up: a word-major h (h_layout {h_layout}) needs F a multiple of 8, got {Fe}")
    x = x.contiguous()
    h = torch.empty(T * K, Fe, dtype=torch.bfloat16 if h_layout == 2 else torch.float32, device=x.device)
    gm = gate.min if gate.min is not None else gate.scale
    um = up.min if up.min is not None else up.scale
    tiles = _tiles(cfg, gate)
    if tiles["ALGO"] == 2 and not words_ok(up):  # gate and up share a layout; be safe if they ever do not
        tiles = _tiles(QConfig(**{**vars(cfg), "algo": 1, "act": 0}), gate)
    a = tiles["ALGO"]
    gb, ub, sb, has_bias = _bias_rows(biases, h)
    _kernels()[1][(triton.cdiv(Fe, cfg.bn), T * K)](
        x, flat, _codes(gate, a), gate.scale, gm, _codes(up, a), up.scale, um, h, int(slot_base), x.stride(0),
        *_strides(gate, a), gb, ub, sb, float(act.alpha) if act is not None else 0.0,
        float(act.limit) if act is not None else 0.0, F=Fe, K=K, **_geometry(gate), **tiles, HW=int(h_layout),
        ACT=int(act is not None), HAS_BIAS=has_bias, **_q8_scratch(tiles, gate, T, x.device),
        **_launch_opts(cfg, x.device))
    return h


def quant_down(h: Tensor, slots: Tensor, weights: Tensor, down: QuantWeight, dtype: torch.dtype,
               config: QConfig | None = None, *, slot_base: int = 0, round_to: torch.dtype | None = None,
               h_layout: int = 0, early: bool = False, bias: Tensor | None = None) -> Tensor:
    """h [T*K, F] fp32, slots and weights [T, K] -> [T, D] in `dtype`: sum over k of w[t, k] * h @ down[slot]^T
    (rows slot_base + slot; w rounded to `round_to` inside the kernel, None: as given). h_layout 1 / 2: h as
    quant_gate_up wrote it with the same h_layout (word-major rows), which only the word tile reading every expert at
    once takes (down_h_layout says whether a config does). early: the caller launched the kernel that writes h
    (quant_gate_up) right before this one on the same stream, after the kernels that wrote slots, weights and the
    stacks' rows, so with PDL the word tile loads those before its wait (pdl.preload_enabled; pdl.py says why that
    is safe). bias: the down biases [S, D] (gpt-oss), added to each expert's output before its weight (one
    program sums a row's K experts then: split 1)."""
    D, Fe = down.matrix
    flat = slots.reshape(-1)
    K = slots.shape[-1]
    T = flat.numel() // K
    cfg = _word_tile_for(config or pick_config("down", down.fmt, Fe, D), 8)
    split = cfg.split if K % cfg.split == 0 and bias is None else 1
    wts = weights.reshape(-1).contiguous()
    y = (torch.empty(T, D, dtype=dtype, device=h.device) if split == 1
         else torch.zeros(T, D, dtype=torch.float32, device=h.device))
    dm = down.min if down.min is not None else down.scale
    tiles = _tiles(cfg, down)
    a = tiles["ALGO"]
    opts = _launch_opts(cfg, h.device)
    if early and a == 2 and split == 1 and _preload_ok(opts):
        opts["PRE"] = True
    if h_layout and not (a == 2 and split == 1):
        raise ValueError(f"quant_down: h_layout {h_layout} (word-major h) is read by the word tile with split 1 only; "
                         f"this launch takes algo {a}, split {split}")
    db, _, sb, has_bias = _bias_rows(None if bias is None else (bias,), h)
    _kernels()[2][(triton.cdiv(D, cfg.bn), T * split)](
        h, flat, wts, _codes(down, a), down.scale, dm, y, int(slot_base), *_strides(down, a), y.stride(0), db, sb,
        D=D, K=K, KP=triton.next_power_of_2(K), K_PER=K // split, SPLIT=split, **_geometry(down), **tiles,
        WR=weight_rounding(round_to), HW=int(h_layout), HAS_BIAS=has_bias, **_q8_scratch(tiles, down, T * K, h.device),
        **opts)
    return y if split == 1 else y.to(dtype)


# up to this many rows a CPU product reads a stored matrix in place through the native kernels (cpu_kernel.gemv:
# one token's GEMV, or from GEMM_MIN_ROWS the tiled GEMM); above, dequantizing (or widening) and MKL's sgemm is as
# fast. Measured on 2 Zen 4 cores: q4 4096 x 2048 at 512 / 1024 / 2048 rows 49 / 101 / 201 ms against 84 / 137 /
# 222; a bf16 matrix under fp32 compute at 1024 rows 105 against 95 (the widened copy's sgemm at 181 GF/s)
CPU_GEMV_ROWS = 1024  # quantized matrices
CPU_GEMV_ROWS_FLOAT = 512  # float matrices kept as stored


def _cpu_linear(x: Tensor, w: Tensor | QuantWeight, bias: Tensor | None) -> Tensor | None:
    """Up to CPU_GEMV_ROWS rows on the CPU through the native GEMV (cpu_kernel.gemv: q8 / q4 parts or a float
    matrix read as stored, fp32 sums), the bias added after; None where it does not apply."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] > (CPU_GEMV_ROWS if isinstance(w, QuantWeight) else CPU_GEMV_ROWS_FLOAT):
        return None
    kern = cpu_kernel.shared()
    y = None if kern is None else kern.gemv(rows, w, threads=torch.get_num_threads())
    if y is None:
        return None
    y = y.view(*x.shape[:-1], y.shape[-1])
    return y + bias if bias is not None else y


def qlinear(x: Tensor, w: Tensor | QuantWeight, bias: Tensor | None = None) -> Tensor:
    """F.linear over a dense or quantized weight: on CUDA the fused GEMV for up to MAX_ROWS rows, the tiled
    dequantizing GEMM (quant_grouped.quant_matmul) above, and from dequant_rows() rows (q4, q8) a dense copy
    multiplied by cuBLAS (quant_dequant.dequant_matmul); on the CPU up to CPU_GEMV_ROWS rows (CPU_GEMV_ROWS_FLOAT
    for a float matrix) the native GEMV or GEMM (cpu_kernel.gemv, the stored matrix read in place, fp32 sums;
    TIERED_CPU_KERNEL=torch turns it off), which also
    reads a float matrix kept in its stored dtype under another compute dtype (more rows widen it per call); else
    the reference (dequantize into x's dtype, then matmul). x [..., K] -> [..., N]."""
    if x.device.type == "cpu" and (isinstance(w, QuantWeight) or w.dtype != x.dtype):
        y = _cpu_linear(x, w, bias)
        if y is not None:
            return y
        if not isinstance(w, QuantWeight):  # a float matrix kept as stored (Transformer's _take): widened per call
            return F.linear(x, w.to(x.dtype), bias)
    if not isinstance(w, QuantWeight):
        return F.linear(x, w, bias)
    rows = x.reshape(-1, x.shape[-1])
    if not kernel_ok(x, w):
        return linear_ref(x, w, bias)
    n, k = w.matrix
    if rows.shape[0] >= dequant_rows(n * k * x.element_size()):  # many rows: a dense copy, then cuBLAS
        from tiered.kernels.quant_dequant import dequant_matmul, dequant_ok

        if dequant_ok(rows, w):
            y = dequant_matmul(rows, w).view(*x.shape[:-1], w.matrix[0])
            return y + bias if bias is not None else y
    if rows.shape[0] > MAX_ROWS:  # prefill sizes: the tiled GEMM of quant_grouped.py
        from tiered.kernels.quant_grouped import qmatmul_ok, quant_matmul

        if not qmatmul_ok(rows, w):
            return linear_ref(x, w, bias)
        y = quant_matmul(rows, w).view(*x.shape[:-1], w.matrix[0])
        return y + bias if bias is not None else y
    y = quant_matvec(rows, w).view(*x.shape[:-1], w.matrix[0])
    return y + bias if bias is not None else y


def experts_quant_decode(x: Tensor, slots: Tensor, weights: Tensor, gate: QuantWeight, up: QuantWeight,
                         down: QuantWeight, *, interpret: bool = False,
                         configs: tuple[QConfig | None, QConfig | None] = (None, None), slot_base: int = 0,
                         round_to: torch.dtype | None = None, act=None,
                         biases: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor | None:
    """One token's K experts from quantized stacks, fused dequantization: x [1, D], slots [K] int64 (rows
    slot_base + slots), weights [1, K] (rounded to `round_to` in the kernel; None: as given) -> [1, D] in x's
    dtype (SwiGLU and the weighted sum over K in fp32, one rounding). act: gpt-oss's ClampedSwiGLU in place of
    SwiGLU; biases: its (gate_bias, up_bias, down_bias) stacks [S, F], [S, F], [S, D].
    None when the kernels cannot serve it (the caller runs the reference). No host sync."""
    if not all(kernel_ok(x, w, interpret=interpret) for w in (gate, up, down)):
        return None
    if _strides(gate) != _strides(up) or gate.fmt != up.fmt:
        return None
    K = slots.shape[-1]
    fe, d = gate.matrix
    gcfg = configs[0] or pick_config("gate_up", gate.fmt, d, fe)
    dcfg = configs[1] or pick_config("down", down.fmt, fe, d)
    plain = act is None and biases is None
    # algo 3: the Gluon kernels (quant_gluon_moe) where they serve; h then goes to a Gluon down in input order
    gluon_down = (plain and dcfg.algo == 3 and quant_gluon_moe.down_serves(x.device, K, down)
                  and weights.dtype == torch.float32)
    hl = 0 if gluon_down else down_h_layout(down, dcfg, K)
    launch = launch_args(x.device)
    if plain and gcfg.algo == 3 and quant_gluon_moe.gate_up_ok(x, gate, up):
        h = quant_gluon_moe.gate_up(x, slots.reshape(-1), gate, up, slot_base=slot_base, h_layout=hl,
                                    groups=gcfg.bg, ahead=max(gcfg.ahead, 1), launch=launch, regs=gcfg.regs)
    else:
        h = quant_gate_up(x, slots.reshape(1, K), gate, up, gcfg, slot_base=slot_base, h_layout=hl, act=act,
                          biases=None if biases is None else biases[:2])  # [K, F]
    if gluon_down:
        if launch and not preload_enabled():
            launch["PRE"] = False
        return quant_gluon_moe.down(h, slots.reshape(-1), weights.reshape(-1), down, x.dtype, slot_base=slot_base,
                                    round_to=round_to, groups=dcfg.bg, launch=launch)
    return quant_down(h, slots.reshape(1, K), weights.reshape(1, K), down, x.dtype, dcfg, slot_base=slot_base,
                      round_to=round_to, h_layout=hl, early=True, bias=None if biases is None else biases[2])


def _word_tile_for(cfg: QConfig, warps: int) -> QConfig:
    """An expert config as the word-tile kernels take it: algo 3 (quant_gluon_moe's kernels, where
    experts_quant_decode could not use them) becomes the word tile of 8 rows, 16 groups a step and `warps` warps (the
    10.6B shape's TUNED tiles), its hw kept and no register cap (the Gluon kernel's is its own)."""
    if cfg.algo != 3:
        return cfg
    return dataclasses.replace(cfg, algo=2, bn=8, bg=16, warps=warps, ahead=0, persist=0, regs=0)


def down_h_layout(down: QuantWeight, config: QConfig | None, k: int) -> int:
    """The h layout (QConfig.hw) a down launch over `down` with this config (None: TUNED's) and k experts a token
    reads: the config's hw where the launch takes the word tile over every expert at once (algo 2, split 1) and F
    is a multiple of 8, else 0 (rows in input order)."""
    d, fe = down.matrix
    cfg = _word_tile_for(config or pick_config("down", down.fmt, fe, d), 8)
    split = cfg.split if k % cfg.split == 0 else 1
    if not cfg.hw or split != 1 or fe % 8 or _tiles(cfg, down)["ALGO"] != 2:
        return 0
    return cfg.hw
