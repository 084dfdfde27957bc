"""The fused dequantizing kernels (tiered/kernels/quant_moe.py) against the reference dequantize-then-matmul.

On CPU through Triton's interpreter (TRITON_INTERPRET=1, set before the first launch: the kernels are
decorated lazily, so the order of the suite does not matter), tiny and odd shapes (1 token, inputs below
the group size, sizes that are not multiples of a group or a tile), every tile config family, stacks
viewed over a block pool as the layout stores them; on CUDA (marked `cuda`) at the 10.6B and 397B expert
shapes, inside a CUDA graph.
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from tiered.layout.format import plan_block  # noqa: E402
from tiered.kernels import quant_moe as qm  # noqa: E402
from tiered.kernels.quant_moe import (FUSED_FORMATS, TUNED, QConfig, experts_quant_decode,  # noqa: E402
                                      flat_ok, quant_down, quant_gate_up, quant_matvec, quant_matvec_ref, qlinear)
from tiered.layout.quant import quantize  # noqa: E402
from tiered.store.disk import expert_views  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
INTERP = DEV == "cpu"
FORMATS = sorted(FUSED_FORMATS)
# tile families: the defaults, the smallest tiles (one group per step, plain conversion), wide rows
CONFIGS = [None, QConfig(bn=2, bg=1, warps=1, conv=0), QConfig(bn=16, bg=2, warps=4)]
# the flat tile (algo 1): one group per step (several steps: the prefetch of the next step's codes), a middle
# tile, wide rows over long steps (one step longer than most rows)
FLAT = [QConfig(bn=2, bg=1, warps=1, conv=0, algo=1), QConfig(bn=4, bg=2, warps=2, algo=1),
        QConfig(bn=16, bg=8, warps=4, algo=1)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12))


def _pool(fmt: str, S: int, F: int, D: int, seed: int = 0):
    """ExpertWeights over a uint8 [S, block] pool in `fmt` (the layout's block placement), quantized from
    random weights."""
    specs, bs = plan_block({"gate": ((F, D), fmt), "up": ((F, D), fmt), "down": ((D, F), fmt)})
    pool = torch.zeros(S, bs, dtype=torch.uint8, device=DEV)
    W = expert_views(pool, specs)
    g = torch.Generator(device=DEV).manual_seed(seed)  # built on the device: the CUDA shapes are large
    for w in (W.gate, W.up, W.down):
        q = quantize(torch.randn(w.shape, generator=g, device=DEV) * w.matrix[1] ** -0.5, fmt)
        for name, t in q.parts().items():
            w.parts()[name].copy_(t)
    return W


def _experts_ref(x, slots, wts, W):
    """Plain loop: dequantize each expert (fp32), SwiGLU, weight, sum over K. x [T, D], slots/wts [T, K]."""
    out = torch.zeros(x.shape[0], W.down.matrix[0], dtype=torch.float64, device=x.device)
    for t in range(x.shape[0]):
        xf = x[t:t + 1].float()
        for k, s in enumerate(slots[t].tolist()):
            gw, uw, dw = (w[s].dequantize(torch.float32) for w in (W.gate, W.up, W.down))
            out[t] += (wts[t, k].float() * (torch.nn.functional.silu(xf @ gw.T) * (xf @ uw.T)) @ dw.T)[0].double()
    return out


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("N,K,T", [(1, 1, 1), (5, 33, 3), (40, 96, 1), (33, 200, 4), (7, 64, 2), (9, 300, 1)])
def test_matvec_matches_reference(fmt, N, K, T):
    """quant_matvec over a stack with scattered slots (and over one matrix) equals each row times its
    dequantized matrix (fp32), for every tile family; K < the group (one whole-row group for q4), K not a
    multiple of the group, one row."""
    g = torch.Generator().manual_seed(N * K)
    qw = quantize(torch.randn(3, N, K, generator=g) * 0.1, fmt).to_device(DEV)
    x = torch.randn(T, K, generator=g).to(DEV)
    slots = torch.tensor([2, 0, 1, 2][:T], device=DEV)
    for cfg in (CONFIGS if N * K < 1000 else CONFIGS[:1]):
        assert rel(quant_matvec(x, qw, slots, config=cfg), quant_matvec_ref(x, qw, slots)) < 1e-5, cfg
        assert rel(quant_matvec(x, qw[1], config=cfg), quant_matvec_ref(x, qw[1])) < 1e-5, cfg


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("N,K,T", [(1, 1, 1), (5, 32, 3), (7, 33, 2), (40, 96, 1), (9, 300, 1), (3, 520, 2)])
def test_matvec_flat_matches_reference(fmt, N, K, T):
    """The flat tile (algo 1) over a stack with scattered slots and over one matrix equals the reference for
    one row, odd row counts, inputs below the group (q4: a whole-row group of 32 inputs is read flat; of 1
    and 33 inputs it is not a power of two and the launcher takes the grouped tile), rows that end inside a
    group and inside a step, several steps per row."""
    g = torch.Generator().manual_seed(N * K + 1)
    qw = quantize(torch.randn(3, N, K, generator=g) * 0.1, fmt).to_device(DEV)
    assert flat_ok(qw) == (fmt != "q4" or K not in (1, 33)), (fmt, K, qw.group)
    x = torch.randn(T, K, generator=g).to(DEV)
    slots = torch.tensor([2, 0, 1, 2][:T], device=DEV)
    for cfg in FLAT:
        assert rel(quant_matvec(x, qw, slots, config=cfg), quant_matvec_ref(x, qw, slots)) < 1e-5, cfg
        assert rel(quant_matvec(x, qw[1], config=cfg), quant_matvec_ref(x, qw[1])) < 1e-5, cfg


# the word tile (algo 2, q4 only; other formats fall back to the flat tile): one group per step, a middle tile,
# wide rows over long steps
WORDS = [QConfig(bn=2, bg=1, warps=1, algo=2), QConfig(bn=4, bg=2, warps=2, algo=2),
         QConfig(bn=16, bg=8, warps=4, algo=2)]
# conv 2: the nibbles in pairs, the even one at mantissa bits 15..18 (1 + c/256 against 16 x): its offset is 16 times
# larger against the codes' part, so the fp32 sums keep about 4 bits less of it (relative errors of 5-8e-6 on the
# interpreter at K 64-2048, against 5-7e-7 for conv 1; the bf16 output's rounding is 4e-3)
PAIRS = QConfig(bn=4, bg=2, warps=2, algo=2, conv=2)
PAIR_TOL = 5e-5


@pytest.mark.parametrize("fmt", ["q4", "q8"])
@pytest.mark.parametrize("N,K,T", [(1, 8, 1), (5, 32, 3), (7, 33, 2), (40, 96, 1), (9, 320, 1), (3, 520, 2)])
def test_matvec_words_matches_reference(fmt, N, K, T):
    """The word tile (algo 2) over a stack with scattered slots and over one matrix equals the reference: q4 rows
    of 8 and 32 inputs (a whole-row group), rows that end inside a group and inside a step, several steps per
    row; widths it cannot read as words (33: an odd group) and q8 fall back to the flat or grouped tile."""
    from tiered.kernels.quant_moe import words_ok

    g = torch.Generator().manual_seed(N * K + 2)
    qw = quantize(torch.randn(3, N, K, generator=g) * 0.1, fmt).to_device(DEV)
    assert words_ok(qw) == (fmt == "q4" and K != 33), (fmt, K)
    x = torch.randn(T, K, generator=g).to(DEV)
    slots = torch.tensor([2, 0, 1, 2][:T], device=DEV)
    for cfg in WORDS + ([PAIRS] if fmt == "q4" else []):  # (q8 reads conv 2 as 1: the flat tile's, tested above)
        tol = PAIR_TOL if cfg.conv == 2 and K != 33 else 1e-5
        assert rel(quant_matvec(x, qw, slots, config=cfg), quant_matvec_ref(x, qw, slots)) < tol, cfg
        assert rel(quant_matvec(x, qw[1], config=cfg), quant_matvec_ref(x, qw[1])) < tol, cfg


@pytest.mark.parametrize("persist", [1, 3])
@pytest.mark.parametrize("conv", [1, 2])
def test_matvec_words_programs_looping_over_row_blocks(persist, conv):
    """QConfig.persist under the word tile (gemv_loop): fewer programs than row blocks (the interpreter's 2 "SMs": 2
    or 6 programs for 10 blocks of 4 rows, the last one short), each loading the next block's first step before
    computing the current one; over a stack with two rows' slots and over one matrix, two steps a row: the
    reference, and the same values as a program a block."""
    with pytest.raises(ValueError, match="ahead must be >= 0"):
        QConfig(algo=2, ahead=-1)
    g = torch.Generator().manual_seed(persist + 10 * conv)
    qw = quantize(torch.randn(3, 37, 256, generator=g) * 0.1, "q4").to_device(DEV)
    x = torch.randn(2, 256, generator=g).to(DEV)
    slots = torch.tensor([2, 0], device=DEV)
    cfg = QConfig(bn=4, bg=2, warps=2, algo=2, conv=conv, persist=persist)
    tol = PAIR_TOL if conv == 2 else 1e-5
    for w, s in ((qw, slots), (qw[1], None)):
        got = quant_matvec(x, w, s, config=cfg)
        assert rel(got, quant_matvec_ref(x, w, s)) < tol
        assert torch.equal(got, quant_matvec(x, w, s, config=dataclasses.replace(cfg, persist=0)))


def test_word_pairs_against_float64():
    """conv 2 against the float64 product of the dequantized weights, beside conv 1, at the lm_head's row length:
    the pairs stay within PAIR_TOL, conv 1 within 1e-5; the flat and grouped tiles read conv 2 as conv 1."""
    from tiered.kernels import quant_moe as qm

    g = torch.Generator().manual_seed(7)
    qw = quantize(torch.randn(8, 2048, generator=g) * 0.05, "q4")
    x = torch.randn(1, 2048, generator=g)
    want = x.double() @ qw.dequantize(torch.float64).T
    for conv, tol in ((1, 1e-5), (2, PAIR_TOL)):
        got = quant_matvec(x.to(DEV), qw.to_device(DEV), config=QConfig(bn=4, bg=8, warps=2, algo=2, conv=conv))
        assert rel(got.double().cpu(), want) < tol, conv
    assert qm._tiles(QConfig(bn=4, bg=4, algo=1, conv=2), qw)["CONV"] == 1
    assert qm._tiles(QConfig(bn=4, bg=4, algo=2, conv=2), qw)["CONV"] == 2
    with pytest.raises(ValueError, match="conv 0, 1 or 2"):
        QConfig(conv=3)


def test_flat_fallback_constexprs():
    """The launch constexprs (_tiles): algo 1 is taken for power-of-two groups and falls back to the grouped
    tile otherwise; a flat step covers BG groups (4-bit formats: half as many bytes as inputs), at most the
    row's groups rounded up to a power of two."""
    from tiered.kernels import quant_moe as qm

    cfg = QConfig(bn=4, bg=4, algo=1)
    t = qm._tiles(cfg, quantize(torch.randn(8, 200), "q4"))
    assert (t["ALGO"], t["BK"], t["UK"]) == (1, 256, 128)
    t = qm._tiles(cfg, quantize(torch.randn(8, 200), "q8"))
    assert (t["ALGO"], t["BK"], t["UK"]) == (1, 256, 256)  # clamped to the row's 2 groups of 128
    assert qm._tiles(cfg, quantize(torch.randn(8, 40), "q4"))["ALGO"] == 0  # one group of 40 inputs
    assert qm._tiles(QConfig(bn=4, bg=4), quantize(torch.randn(8, 200), "q4"))["ALGO"] == 0
    words = QConfig(bn=4, bg=4, algo=2)
    t = qm._tiles(words, quantize(torch.randn(8, 200), "q4"))
    assert (t["ALGO"], t["BK"], t["UK"]) == (2, 256, 32)  # 32 int32 words of 8 inputs per step
    assert qm._tiles(words, quantize(torch.randn(8, 200), "q8"))["ALGO"] == 1
    assert qm._tiles(words, quantize(torch.randn(8, 40), "q4"))["ALGO"] == 0
    q4 = quantize(torch.randn(8, 200), "q4")
    # codes starting one byte into their storage: not readable as int32 words, the flat tile serves
    shifted = torch.zeros(8 * 100 + 1, dtype=torch.uint8)[1:].view(8, 100)
    odd = dataclasses.replace(q4, q=shifted)
    assert qm._tiles(words, odd)["ALGO"] == 1


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("F,D,T", [(24, 32, 1), (33, 40, 2), (40, 130, 3), (96, 64, 1)])
def test_experts_match_reference_loop(fmt, F, D, T):
    """gate_up + down over a block pool (strided part views) equal the plain loop over experts for T tokens
    with K = 3 scattered slots each; the down kernel also with split-K (atomics) and tiny tiles; every flat
    tile (algo 1: q4 reads gate/up flat at D 32, 130, 64 and down at F 96; the other widths fall back); q4 also
    with the word tile (algo 2: gate/up at D 32 and 64, down at F 24, 40 and 96)."""
    W = _pool(fmt, 7, F, D)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, D, generator=g).to(DEV)
    slots = torch.stack([torch.randperm(7, generator=g)[:3] for _ in range(T)]).to(DEV)
    wts = torch.rand(T, 3, generator=g).to(DEV)
    want = _experts_ref(x, slots, wts, W)
    cfgs = [(None, None), (CONFIGS[1], QConfig(bn=2, bg=1, split=3, conv=0)), (CONFIGS[2], QConfig(bn=16, bg=2))]
    flat = [(FLAT[0], QConfig(bn=2, bg=1, split=3, conv=0, algo=1)), (FLAT[1], QConfig(bn=4, bg=2, algo=1)),
            (FLAT[2], QConfig(bn=16, bg=8, warps=4, algo=1))]
    words = [(WORDS[0], QConfig(bn=2, bg=1, split=3, algo=2)), (WORDS[2], QConfig(bn=4, bg=2, algo=2))]
    if T == 1:  # gate_up's pairs (a word tile at D 32 and 64; a down config reads conv 2 as the word tile's 1)
        words.append((PAIRS, QConfig(bn=4, bg=2, algo=2, conv=2)))
    for up_cfg, down_cfg in cfgs[:1] + cfgs[1 + T % 2:2 + T % 2] + flat + (words if fmt == "q4" else []):
        h = quant_gate_up(x, slots, W.gate, W.up, up_cfg)
        got = quant_down(h, slots, wts, W.down, torch.float32, down_cfg)
        assert rel(got, want) < (PAIR_TOL if up_cfg is PAIRS else 1e-5), (up_cfg, down_cfg)
    if T == 1:
        got = experts_quant_decode(x, slots[0], wts, W.gate, W.up, W.down, interpret=INTERP)
        assert rel(got, want) < 1e-5


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("F,D,T", [(33, 40, 2), (96, 64, 1)])
def test_experts_clamped_swiglu_with_biases(fmt, F, D, T):
    """gpt-oss's experts (bf16 biases beside quantized weights, the clamped activation) through the fused kernels
    equal the plain loop with the same activation and biases, for every tile family (default, flat, and q4's word
    tile with its word-major h), and through experts_quant_decode; the clamp is exercised and a run without the
    biases differs."""
    from tiered.model.moe import ClampedSwiGLU

    act = ClampedSwiGLU(alpha=1.702, limit=0.5)
    W = _pool(fmt, 7, F, D)
    g = torch.Generator().manual_seed(4)
    gb, ub, db = (torch.randn(7, n, generator=g).bfloat16().to(DEV) * 0.3 for n in (F, F, D))
    x = torch.randn(T, D, generator=g).to(DEV)
    slots = torch.stack([torch.randperm(7, generator=g)[:3] for _ in range(T)]).to(DEV)
    wts = torch.rand(T, 3, generator=g).to(DEV)
    want = torch.zeros(T, D, dtype=torch.float64, device=DEV)
    clamped = 0
    for t in range(T):
        xf = x[t:t + 1].float()
        for k, s in enumerate(slots[t].tolist()):
            gw, uw, dw = (w[s].dequantize(torch.float32) for w in (W.gate, W.up, W.down))
            gx, ux = xf @ gw.T + gb[s].float(), xf @ uw.T + ub[s].float()
            clamped += int((gx > act.limit).sum() + (ux.abs() > act.limit).sum())
            want[t] += (wts[t, k].float() * (act(gx, ux) @ dw.T + db[s].float()))[0].double()
    assert clamped > 0
    cfgs = [(None, None), (FLAT[1], QConfig(bn=4, bg=2, algo=1))]
    if fmt == "q4":
        cfgs.append((WORDS[2], QConfig(bn=4, bg=2, algo=2, hw=1)))
    for up_cfg, down_cfg in cfgs:
        hl = qm.down_h_layout(W.down, down_cfg, 3) if down_cfg is not None else 0
        h = quant_gate_up(x, slots, W.gate, W.up, up_cfg, h_layout=hl, act=act, biases=(gb, ub))
        got = quant_down(h, slots, wts, W.down, torch.float32, down_cfg, h_layout=hl, bias=db)
        assert rel(got, want) < 1e-5, (up_cfg, down_cfg, rel(got, want))
    if T == 1:
        got = experts_quant_decode(x, slots[0], wts, W.gate, W.up, W.down, interpret=INTERP, act=act,
                                   biases=(gb, ub, db))
        assert rel(got, want) < 1e-5
        plain = experts_quant_decode(x, slots[0], wts, W.gate, W.up, W.down, interpret=INTERP, act=act)
        assert rel(plain, want) > 1e-2


@pytest.mark.parametrize("algo", [1, 2])
def test_experts_slot_base_and_weight_rounding_in_the_kernels(algo):
    """experts_quant_decode with slot_base (the resident pool's layer * E, added in the kernels) and fp32 routing
    weights rounded to bf16 in the kernel (round_to) gives exactly what the engine's former path gave: the slots
    added and the weights cast by torch before the call. Both tiles (flat: one expert after another; word: every
    expert in one load), bf16 input as in the engine."""
    W = _pool("q4", 9, 64, 128)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 128, generator=g).bfloat16().to(DEV)
    ids = torch.randperm(4, generator=g)[:3].to(DEV)
    wts = torch.softmax(torch.randn(1, 3, generator=g), -1).to(DEV)  # fp32, not bf16-exact
    assert not torch.equal(wts, wts.bfloat16().float())
    cfg = (QConfig(bn=4, bg=1, algo=algo), QConfig(bn=4, bg=1, algo=algo))
    want = experts_quant_decode(x, ids + 5, wts.bfloat16(), W.gate, W.up, W.down, interpret=INTERP, configs=cfg)
    got = experts_quant_decode(x, ids, wts, W.gate, W.up, W.down, interpret=INTERP, configs=cfg, slot_base=5,
                               round_to=torch.bfloat16)
    assert torch.equal(got, want)
    unrounded = experts_quant_decode(x, ids, wts, W.gate, W.up, W.down, interpret=INTERP, configs=cfg, slot_base=5)
    assert not torch.equal(unrounded, want)  # the rounding is what made them equal


def test_bench_small_runs_on_cpu(tmp_path):
    """benchmarks/bench_quant_kernels.py --small (the CPU smoke run: interpreter, tiny shapes) runs every path
    of the decode phase without a failed row, and suggests TUNED lines that mention the three algorithms. q4 only: the
    pipeline is the same for every format (q8's kernels are checked against the reference above), and each format
    costs minutes under the interpreter."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(repo / "benchmarks" / "bench_quant_kernels.py"), "--small",
                        "--formats", "q4"], env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "quant_kernels_small.json").read_text())
    assert res["failed"] == [], res["failed"]
    keys = {"gate_up/q4/128/32", "down/q4/32/128", "gemv/q4/128/20"}
    assert keys <= set(res["suggested"]), sorted(res["suggested"])
    assert {"0", "1", "2"} <= set(res["suggested"]["gate_up/q4/128/32"]["best_by_algo"])
    assert all(line.startswith("(") and "QConfig(" in line for line in res["tuned_lines"])
    parts = [r for r in res["rows"] if r["section"] == "parts"]
    assert {(r["fmt"], r["algo"]) for r in parts} >= {("q4", 0), ("q4", 1), ("q4", 2)}


def test_tinygemm_parts_match_our_dequantization():
    """The benchmark's PyTorch tinygemm row runs on our q4 parts: its (code - 8) * scale + zero form, with
    zero = min + 8 * scale rounded to bf16, gives our dequantized product (checked through the op's CPU twin)."""
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(repo / "benchmarks"))
    from bench_quant_kernels import tinygemm_matvec, tinygemm_parts

    torch.manual_seed(0)
    n, k = 96, 256
    w = torch.randn(n, k).bfloat16()
    qw = quantize(w, "q4")
    x = torch.randn(1, k).bfloat16()
    ref = torch.nn.functional.linear(x.float(), qw.dequantize(torch.float32))
    packed, sz = tinygemm_parts(qw, k, "cpu")
    assert sz.shape == (k // 64, n, 2) and sz.dtype == torch.bfloat16
    y = tinygemm_matvec(x, packed, qw.group, sz).float()
    assert ((y - ref).norm() / ref.norm()).item() < 1e-2
    sz_bad = sz.clone()
    sz_bad[..., 1] -= 8 * sz[..., 0]  # the plain minimum as zero would shift every weight by 8 scales
    y_bad = tinygemm_matvec(x, packed, qw.group, sz_bad).float()
    assert ((y_bad - ref).norm() / ref.norm()).item() > 0.1


def test_reference_path_off_cuda(monkeypatch):
    """Without CUDA (and without the test-only interpreter flag) qlinear and the expert path take no Triton kernel:
    qlinear equals dequantize-then-F.linear exactly under TIERED_CPU_KERNEL=torch (by default a few rows take the
    native CPU GEMV: within 1e-5, fp32 sums in another order), and the expert path declines."""
    qw = quantize(torch.randn(9, 40), "q4")
    x = torch.randn(2, 40)
    if DEV == "cpu":
        ref = x @ qw.dequantize(torch.float32).T
        assert float((qlinear(x, qw) - ref).norm() / ref.norm()) <= 1e-5
        monkeypatch.setenv("TIERED_CPU_KERNEL", "torch")
        assert torch.equal(qlinear(x, qw), ref)
        W = _pool("q4", 2, 8, 16)
        assert experts_quant_decode(torch.randn(1, 16), torch.tensor([1]), torch.ones(1, 1), W.gate, W.up,
                                    W.down) is None


def test_config_overrides_from_the_environment(monkeypatch):
    """TIERED_QCONFIG replaces TUNED's tile for the shapes it names, leaves the others, and a malformed entry is an
    error that names it."""
    from tiered.kernels.quant_moe import pick_config

    base = pick_config("gemv", "q4", 4096, 2048)
    monkeypatch.setenv("TIERED_QCONFIG", "gemv,q4,4096,2048:bn=4,bg=64,warps=2,algo=2; down,q4,768,2048:bn=4,hw=1")
    assert pick_config("gemv", "q4", 4096, 2048) == QConfig(bn=4, bg=64, warps=2, algo=2) != base
    assert pick_config("down", "q4", 768, 2048) == QConfig(bn=4, hw=1)
    assert pick_config("gemv", "q4", 2048, 5120) == TUNED[("gemv", "q4", 2048, 5120)]
    monkeypatch.setenv("TIERED_QCONFIG", "gemv,q4,4096:bn=8")
    with pytest.raises(ValueError, match="gemv,q4,4096:bn=8"):
        pick_config("gemv", "q4", 4096, 2048)
    monkeypatch.setenv("TIERED_QCONFIG", "gemv,q4,4096,2048:bn=3")
    with pytest.raises(ValueError, match="power of two"):
        pick_config("gemv", "q4", 4096, 2048)


def test_tuned_table_is_complete():
    """Every fused format has a config for each kernel (pick_config's fallback)."""
    for fmt in FUSED_FORMATS:
        for kernel in ("gate_up", "down", "gemv"):
            assert isinstance(TUNED[(kernel, fmt)], QConfig)


_SIG = {torch.uint8: "*u8", torch.int8: "*i8", torch.bfloat16: "*bf16", torch.float16: "*fp16",
        torch.float32: "*fp32", torch.int32: "*i32", torch.int64: "*i64", torch.float8_e4m3fn: "*fp8e4nv"}


def _compile_for_sm90(kernel, args: dict, consts: dict):
    """Compile one kernel for an H100/H200 (sm_90) without a GPU: tensors in `args` become pointers of their
    dtype, ints i32, `consts` constexprs. Triton's front end (the casts the interpreter lets through), its
    NVIDIA passes and ptxas all run."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {}
    consts = dict(consts)
    for p in kernel.params:  # a constexpr with a default (GDC, WR) takes it unless `consts` names it
        name = p.name
        if name not in consts and name not in args and p.is_constexpr and p.has_default:
            consts[name] = p.default
        if name in consts:
            sig[name] = "constexpr"
        else:
            v = args.get(name, 0)  # slot_base: an int
            sig[name] = _SIG[v.dtype] if isinstance(v, torch.Tensor) else "fp32" if isinstance(v, float) else "i32"
    return triton.compile(ASTSource(kernel, sig, consts), target=GPUTarget("cuda", 90, 32))


def compile_kernels_sm90(fmt: str) -> None:
    """Compile _qgemv, _qgate_up and _qdown (split 1 and 2) for sm_90 with the arguments the launchers pass on
    CUDA: codes as _codes gives them and FUSED_FORMATS' FMT (fp8 through the hardware conversion, not the
    interpreter's bit decoding). Needs a process where Triton was imported with TRITON_INTERPRET off."""
    from tiered.kernels import quant_moe as qm

    qgemv, qgate_up, qdown = qm.decorate_kernels()
    W = _pool(fmt, 3, 96, 200)  # F 96, D 200: a partial last group, a partial row tile
    geo = {**qm._geometry(W.gate), "FMT": FUSED_FORMATS[fmt]}
    gdown = {**qm._geometry(W.down), "FMT": FUSED_FORMATS[fmt]}
    names = ("stride_qs", "stride_qn", "stride_ss", "stride_sn", "stride_ms", "stride_mn")
    x = torch.zeros(1, 200, dtype=torch.bfloat16)
    slots = torch.zeros(2, dtype=torch.int64)
    h = torch.zeros(2, 96)

    def parts(w, prefix, algo):
        return {prefix + "q": qm._codes(w, algo), prefix + "s": w.scale, prefix + "m": w.min if w.min is not None
                else w.scale}

    # the grouped tile, the flat tile and (q4) the word tile (the launchers' constexprs, qm._tiles)
    for algo in ((0, 1, 2) if fmt == "q4" else (0, 1)):
        tiles = qm._tiles(QConfig(bn=4, bg=2, algo=algo), W.gate)
        dtiles = qm._tiles(QConfig(bn=4, bg=2, algo=algo), W.down)
        assert tiles["ALGO"] == dtiles["ALGO"] == algo
        p = parts(W.gate, "", algo)
        # a stack read by slot rows; one matrix (qlinear: with PDL, the L2 prefetch; the word tile: the preload)
        for has_slots, pre in ((True, False), (False, False), (False, True)):
            if pre and algo != 2:
                continue
            pf = {} if has_slots else {"GDC": True, "PF_LINES": 2, "PF_STEP": 32 if algo == 2 else 128, "PRE": pre}
            k = _compile_for_sm90(qgemv, {"x_ptr": x, "slot_ptr": slots, "q_ptr": p["q"], "s_ptr": p["s"],
                                          "m_ptr": p["m"], "out_ptr": x, "N": 96, "stride_xt": 200,
                                          "stride_ot": 96, **dict(zip(names, qm._strides(W.gate, algo)))},
                                  {**geo, **tiles, "HAS_SLOTS": has_slots, **pf})
            if not has_slots:
                assert "prefetch.global.L2" in k.asm["ptx"] and "griddepcontrol.wait" in k.asm["ptx"]
            if pre:  # code loads (ld.global) come before the wait in the PTX
                ptx = k.asm["ptx"]
                assert ptx.find("ld.global") < ptx.find("griddepcontrol.wait"), "no load before the wait"
            if fmt == "fp8":  # the e4m3 bytes go through the hardware conversion
                assert "e4m3" in k.asm["ptx"]
        _compile_for_sm90(qgate_up, {"x_ptr": x, "slot_ptr": slots, **parts(W.gate, "g", algo),
                                     **parts(W.up, "u", algo), "h_ptr": h, "stride_xt": 200,
                                     **dict(zip(names, qm._strides(W.gate, algo)))},
                          {**geo, **tiles, "F": 96, "K": 2, "GDC": True})
        # gpt-oss's experts: bf16 biases, the clamped activation (alpha and limit fp32 arguments)
        bias = torch.zeros(3, 96, dtype=torch.bfloat16)
        _compile_for_sm90(qgate_up, {"x_ptr": x, "slot_ptr": slots, **parts(W.gate, "g", algo),
                                     **parts(W.up, "u", algo), "h_ptr": h, "stride_xt": 200, "gb_ptr": bias,
                                     "ub_ptr": bias, "stride_bs": 96, "alpha": 1.702, "limit": 7.0,
                                     **dict(zip(names, qm._strides(W.gate, algo)))},
                          {**geo, **tiles, "F": 96, "K": 2, "GDC": True, "ACT": 1, "HAS_BIAS": True})
        _compile_for_sm90(qdown, {"h_ptr": h, "slot_ptr": slots, "wt_ptr": h, **parts(W.down, "d", algo),
                                  "y_ptr": x, "stride_yt": 200, "db_ptr": torch.zeros(3, 200, dtype=torch.bfloat16),
                                  "stride_bs": 200, **dict(zip(names, qm._strides(W.down, algo)))},
                          {**gdown, **dtiles, "D": 200, "K": 2, "KP": 2, "K_PER": 2, "SPLIT": 1, "WR": 1,
                           "GDC": True, "PRE": algo == 2, "HAS_BIAS": True})
        for split, pre in ((1, False), (2, False), (1, True)):
            if pre and algo != 2:
                continue
            k = _compile_for_sm90(qdown, {"h_ptr": h, "slot_ptr": slots, "wt_ptr": h, **parts(W.down, "d", algo),
                                          "y_ptr": x if split == 1 else h, "stride_yt": 200,
                                          **dict(zip(names, qm._strides(W.down, algo)))},
                                  {**gdown, **dtiles, "D": 200, "K": 2, "KP": 2, "K_PER": 2 // split, "SPLIT": split,
                                   "WR": 1, "GDC": split == 1, "PRE": pre})
            if pre:  # the slots and codes are read before the wait, h after it
                ptx = k.asm["ptx"]
                assert ptx.find("ld.global") < ptx.find("griddepcontrol.wait") < ptx.rfind("ld.global")
    if fmt == "q4":  # 8-bit inputs (QConfig.act 1): dp4a in PTX, the scratch rows written before the CTA barrier
        scratch = {"ws_ptr": torch.zeros(1, dtype=torch.int32), "fs_ptr": torch.zeros(1)}
        ngp = {"NGP": 4}
        tiles = qm._tiles(QConfig(bn=4, bg=2, algo=2, act=1), W.gate)
        dtiles = qm._tiles(QConfig(bn=4, bg=2, algo=2, act=1), W.down)
        assert tiles["ACT8"] and dtiles["ACT8"]
        p = parts(W.gate, "", 2)
        built = [_compile_for_sm90(qgemv, {**scratch, "x_ptr": x, "slot_ptr": slots, "q_ptr": p["q"], "s_ptr": p["s"],
                                           "m_ptr": p["m"], "out_ptr": x, "N": 96, "stride_xt": 200, "stride_ot": 96,
                                           **dict(zip(names, qm._strides(W.gate, 2)))},
                                   {**geo, **tiles, **ngp, "HAS_SLOTS": has_slots, "GDC": not has_slots,
                                    "PRE": not has_slots})
                 for has_slots in (True, False)]
        built.append(_compile_for_sm90(qgemv, {**scratch, "x_ptr": x, "slot_ptr": slots, "q_ptr": p["q"],
                                               "s_ptr": p["s"], "m_ptr": p["m"], "out_ptr": x, "N": 96,
                                               "stride_xt": 200, "stride_ot": 96,
                                               **dict(zip(names, qm._strides(W.gate, 2)))},
                                       {**geo, **tiles, **ngp, "HAS_SLOTS": False, "GDC": True, "LOOP": True}))
        built.append(_compile_for_sm90(qgate_up, {**scratch, "x_ptr": x, "slot_ptr": slots, **parts(W.gate, "g", 2),
                                                  **parts(W.up, "u", 2), "h_ptr": h, "stride_xt": 200,
                                                  **dict(zip(names, qm._strides(W.gate, 2)))},
                                       {**geo, **tiles, **ngp, "F": 96, "K": 2, "GDC": True}))
        for split, hw in ((1, 0), (1, 1), (2, 0)):
            built.append(_compile_for_sm90(qdown, {**scratch, "h_ptr": h, "slot_ptr": slots, "wt_ptr": h,
                                                   **parts(W.down, "d", 2), "y_ptr": x if split == 1 else h,
                                                   "stride_yt": 200, **dict(zip(names, qm._strides(W.down, 2)))},
                                           {**gdown, **dtiles, "NGP": 2, "D": 200, "K": 2, "KP": 2, "K_PER": 2 // split,
                                            "SPLIT": split, "WR": 1, "GDC": split == 1, "PRE": split == 1, "HW": hw}))
        for k in built:
            ptx = k.asm["ptx"]
            assert "dp4a.u32.s32" in ptx and "div.rn.f32" in ptx and "st.global" in ptx
            assert ptx.rfind("bar.sync") > ptx.find("st.global"), "no CTA barrier after the scratch rows' stores"
        # the float word tile's loop over row blocks (QConfig.persist): one matrix loads its first step before the
        # PDL wait, a stack reads its slot after it; in both the loop carries the next block's codes. QConfig.ahead:
        # L2 prefetches in the loop, or (a program a block, one matrix) of a later block's rows before the wait
        for has_slots, conv, ahead, loop in ((False, 1, 0, True), (False, 2, 2, True), (True, 1, 1, True),
                                             (False, 2, 6, False)):
            ftiles = qm._tiles(QConfig(bn=4, bg=2, algo=2, conv=conv), W.gate)
            k = _compile_for_sm90(qgemv, {"x_ptr": x, "slot_ptr": slots, "q_ptr": p["q"], "s_ptr": p["s"],
                                          "m_ptr": p["m"], "out_ptr": x, "N": 96, "stride_xt": 200, "stride_ot": 96,
                                          **dict(zip(names, qm._strides(W.gate, 2)))},
                                  {**geo, **ftiles, "HAS_SLOTS": has_slots, "GDC": True, "LOOP": loop,
                                   "PRE": not loop, "AHEAD": ahead, "PF_LINES": 2, "PF_STEP": 32})
            ptx = k.asm["ptx"]
            first_load, wait = ptx.find("ld.global"), ptx.find("griddepcontrol.wait")
            assert 0 <= wait and (first_load < wait) != has_slots, (has_slots, conv)
            assert "dp4a" not in ptx and ("prefetch.global.L2" in ptx) == bool(ahead), (has_slots, conv, ahead)


def test_kernels_compile_for_sm90():
    """The kernels compile for sm_90 (H100/H200) in every format, no GPU needed. The interpreter accepts casts
    the compiler refuses (an integer `other` into an fp8 load did), so the CPU tests alone cannot catch them.
    In a subprocess: this process may have imported Triton interpreted (its own library functions are then
    interpreted too and cannot be compiled)."""
    import subprocess
    import sys
    from pathlib import Path

    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("this Triton build has no NVIDIA backend")
    here = Path(__file__).resolve().parent
    code = (f"import sys; sys.path[:0] = [{str(here.parent)!r}, {str(here)!r}]\n"
            "import test_quant_kernels as t\n"
            f"for fmt in {FORMATS!r}: t.compile_kernels_sm90(fmt)\n")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=here.parent, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def ptxas_report(ptx: str) -> tuple[int, int, int] | None:
    """(registers, stack frame bytes, spill store bytes) of `ptx` for sm_90a by ptxas -v: the first of Triton's
    bundled ptxas builds that accepts the PTX's version; None if none does."""
    import re
    import subprocess
    import tempfile
    from pathlib import Path

    bins = sorted((Path(triton.__file__).parent / "backends" / "nvidia" / "bin").glob("ptxas*"))
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        for b in bins:
            r = subprocess.run([str(b), "-v", "--gpu-name", "sm_90a", str(src), "-o", str(Path(d) / "k.cubin")],
                               capture_output=True, text=True, timeout=300)
            if r.returncode:
                continue
            regs = re.search(r"Used (\d+) registers", r.stderr)
            stack = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores", r.stderr)
            if regs and stack:
                return int(regs.group(1)), int(stack.group(1)), int(stack.group(2))
    return None


def down_report() -> tuple[int, int, int] | None:
    """ptxas_report of the word-tile down at the 10.6B shape (TUNED's tile, 8 experts, PDL with the early loads).
    Needs a process where Triton was imported with TRITON_INTERPRET off."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tiered.kernels import quant_moe as qm

    _, _, qdown = qm.decorate_kernels()
    D, F_ = 2048, 768
    dw = quantize(torch.randn(2, D, F_) * 0.03, "q4")
    cfg = qm._word_tile_for(qm.pick_config("down", "q4", F_, D), 8)
    names = ("stride_qs", "stride_qn", "stride_ss", "stride_sn", "stride_ms", "stride_mn")
    args = {"h_ptr": torch.zeros(8, F_), "slot_ptr": torch.zeros(8, dtype=torch.int64), "wt_ptr": torch.zeros(8),
            "dq": qm._codes(dw, 2), "ds": dw.scale, "dm": dw.min, "y_ptr": torch.zeros(1, D, dtype=torch.bfloat16),
            "stride_yt": D, "db_ptr": torch.zeros(1, D, dtype=torch.bfloat16), "stride_bs": D,
            **dict(zip(names, qm._strides(dw, 2)))}
    consts = {**qm._geometry(dw), **qm._tiles(cfg, dw), "D": D, "K": 8, "KP": 8, "K_PER": 8, "SPLIT": 1,
              "WR": 1, "HW": cfg.hw, "GDC": True, "PRE": True}
    sig = {}
    for p in qdown.params:
        n = p.name
        if n not in consts and n not in args and p.is_constexpr and p.has_default:
            consts[n] = p.default
        v = args.get(n, 0)
        sig[n] = "constexpr" if n in consts else _SIG[v.dtype] if isinstance(v, torch.Tensor) else "i32"
    k = triton.compile(ASTSource(qdown, sig, consts), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": cfg.warps})
    return ptxas_report(k.asm["ptx"])


def test_down_compiles_without_a_stack():
    """The word-tile down at the 10.6B shape and TUNED's tile compiles for sm_90 with no stack frame and no spills.
    Session 50's folded top-k (since removed) compiled under Triton 3.6 to a 5.4 KB stack frame and ran 65x slower,
    where Triton 3.9 compiled it cleanly: a CPU compile says little about the GPU box's Triton, so run this under
    that Triton too (PYTHONPATH to a Triton 3.6 install). Skips where no bundled ptxas accepts the PTX."""
    import subprocess
    import sys
    from pathlib import Path

    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("this Triton build has no NVIDIA backend")
    here = Path(__file__).resolve().parent
    code = (f"import sys; sys.path[:0] = [{str(here.parent)!r}, {str(here)!r}]\n"
            "import test_quant_kernels as t\n"
            "print('REPORT', t.down_report())\n")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=here.parent, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = eval(r.stdout.split("REPORT", 1)[1].strip())
    if got is None:
        pytest.skip("no bundled ptxas accepts this Triton's PTX")
    assert got[1] == 0 and got[2] == 0, f"the down kernel spills: {got} (registers, stack, spill stores)"


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("D,F,K", [(2048, 768, 8), (4096, 1024, 10)])
def test_cuda_expert_shapes_bf16_graph(fmt, D, F, K):
    """At the 10.6B and 397B expert shapes in bf16, captured in a CUDA graph and replayed on new slots, the
    fused path stays within bf16 rounding of the reference (relative error <= 1e-2)."""
    W = _pool(fmt, K + 4, F, D)
    x = torch.randn(1, D, device=DEV, dtype=torch.bfloat16)
    slots = torch.arange(K, device=DEV)
    wts = torch.rand(1, K, device=DEV)
    experts_quant_decode(x, slots, wts, W.gate, W.up, W.down)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = experts_quant_decode(x, slots, wts, W.gate, W.up, W.down)
    slots.copy_(torch.randperm(K + 4, device=DEV)[:K])
    graph.replay()
    torch.cuda.synchronize()
    assert rel(out.float(), _experts_ref(x, slots[None], wts, W)) <= 1e-2


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("D,F,K", [(2048, 768, 8), (4096, 1024, 10)])
def test_cuda_flat_tiles_at_model_shapes(fmt, D, F, K):
    """The flat tile (algo 1) at the 10.6B and 397B expert shapes (gate/up a whole row per step, down several
    experts per program) and for the dense GEMV over the 10.6B lm_head and o_proj, in bf16: within bf16
    rounding of the reference (relative error <= 1e-2)."""
    W = _pool(fmt, K + 4, F, D)
    x = torch.randn(1, D, device=DEV, dtype=torch.bfloat16)
    slots = torch.randperm(K + 4, device=DEV)[:K]
    wts = torch.rand(1, K, device=DEV)
    for up, down in ((QConfig(bn=4, bg=64, warps=4, algo=1), QConfig(bn=4, bg=16, warps=4, algo=1)),
                     (QConfig(bn=8, bg=8, warps=4, algo=1), QConfig(bn=2, bg=4, warps=2, algo=1))):
        out = experts_quant_decode(x, slots, wts, W.gate, W.up, W.down, configs=(up, down))
        assert rel(out.float(), _experts_ref(x, slots[None], wts, W)) <= 1e-2, (up, down)
    if fmt in ("q4", "q8"):
        for n, k in ((151936, 2048), (2048, 4096)):
            w = quantize(torch.randn(n, k, device=DEV) * k ** -0.5, fmt)
            xd = torch.randn(1, k, device=DEV, dtype=torch.bfloat16)
            got = quant_matvec(xd, w, config=QConfig(bn=16, bg=32, warps=8, algo=1))
            assert rel(got.float(), xd.float() @ w.dequantize(torch.float32).T) <= 1e-2


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["q4", "q8"])
@pytest.mark.parametrize("N,K", [(151936, 2048), (5120, 2048), (2048, 4096), (100, 70)])
def test_cuda_qlinear_dense_shapes(fmt, N, K):
    """qlinear at one and three rows over the 10.6B dense shapes (lm_head, qkv, o_proj) and an odd one."""
    w = quantize(torch.randn(N, K, device=DEV) * K ** -0.5, fmt)
    for T in (1, 3):
        x = torch.randn(T, K, device=DEV, dtype=torch.bfloat16)
        assert rel(qlinear(x, w).float(), x.float() @ w.dequantize(torch.float32).T) <= 1e-2


@pytest.mark.cuda
@pytest.mark.parametrize("N,K", [(151936, 2048), (5120, 2048), (2048, 4096)])
def test_cuda_gemv_loop_dense_shapes(N, K):
    """The looping GEMV (QConfig.persist; the next block's first step loaded ahead) at the 10.6B shape's lm_head, qkv
    and o_proj, compiled, with and without the nibble pairs and the L2 prefetches (ahead), in a CUDA graph: the
    reference, and what a program a block gives (within 1e-6)."""
    g = torch.Generator(device="cuda").manual_seed(N)
    qw = quantize(torch.randn(N, K, generator=g, device="cuda") * K ** -0.5, "q4")
    x = torch.randn(1, K, generator=g, device="cuda").to(torch.bfloat16)
    want = quant_matvec_ref(x.float(), qw)
    for cfg in (QConfig(bn=16, bg=16, warps=4, algo=2, conv=2, persist=4),
                QConfig(bn=8, bg=32, warps=4, algo=2, conv=1, persist=2),
                QConfig(bn=16, bg=16, warps=4, algo=2, conv=1, persist=4, ahead=2),
                QConfig(bn=32, bg=16, warps=4, algo=2, conv=2, ahead=528)):
        plain = quant_matvec(x, qw, config=dataclasses.replace(cfg, persist=0), out_dtype=torch.float32)
        out = torch.empty_like(plain)
        graph = torch.cuda.CUDAGraph()
        quant_matvec(x, qw, config=cfg, out_dtype=torch.float32)  # compiled outside the capture
        with torch.cuda.graph(graph):
            out.copy_(quant_matvec(x, qw, config=cfg, out_dtype=torch.float32))
        graph.replay()
        torch.cuda.synchronize()
        assert rel(out, want) < (PAIR_TOL if cfg.conv == 2 else 1e-5), cfg
        assert rel(out, plain) < 1e-6, cfg  # the same sums (compiled apart: contractions may differ)


@pytest.mark.cuda
@pytest.mark.parametrize("budget", [None, {"expert_slots": 64, "ram_gb": 0.05, "slot_table": "host"},
                                    {"expert_slots": 64, "ram_gb": 0.05, "slot_table": "device"}],
                         ids=["resident", "cache", "device_table"])
def test_cuda_engine_runs_the_fused_kernels(reference_model, tmp_path, monkeypatch, budget):
    """A `--experts q4 --dense q4` layout on CUDA (fp32): decode goes through the fused expert kernels and
    the dense GEMV (counted at capture or call), inside the whole-step graphs (resident) or the piecewise
    graphs (cache), and its greedy tokens equal the dequantize-then-matmul reference path's."""
    import tiered
    from tiered.kernels import quant_moe
    from tiered.layout.repack import repack

    lay = tmp_path / "q4"
    repack(reference_model, lay, experts="q4", dense="q4", progress=False)
    prompt = "import os\nimport sys\n\n\ndef main(argv):\n"
    calls = {"gate_up": 0, "gemv": 0}
    gate_up, gemv = quant_moe.quant_gate_up, quant_moe.quant_matvec

    def count_gate_up(*a, **k):
        calls["gate_up"] += 1
        return gate_up(*a, **k)

    def count_gemv(*a, **k):
        calls["gemv"] += 1
        return gemv(*a, **k)

    monkeypatch.setattr(quant_moe, "quant_gate_up", count_gate_up)
    monkeypatch.setattr(quant_moe, "quant_matvec", count_gemv)
    k = tiered.load(lay, device="cuda", dtype="float32", max_context=200, budget=budget)
    a = k.generate(prompt, max_new_tokens=40, stop_at_eos=False)
    assert calls["gate_up"] > 0 and calls["gemv"] > 0, calls
    assert a.stats["decode_graphs"] == ("full" if budget is None else
                                        "device" if budget["slot_table"] == "device" else "piecewise")
    monkeypatch.setattr(quant_moe, "kernel_ok", lambda *args, **kw: False)  # the reference path everywhere
    ref = tiered.load(lay, device="cuda", dtype="float32", max_context=200, budget=budget, cuda_graphs=False)
    b = ref.generate(prompt, max_new_tokens=40, stop_at_eos=False)
    assert a.token_ids == b.token_ids


def test_register_cap_is_a_cuda_launch_option():
    """QConfig.regs (ptxas maxnreg) is checked at construction, passed to CUDA launches only (Triton's interpreter
    has no registers), and a capped config computes what the uncapped one does (here, interpreted: the same
    kernel)."""
    from tiered.kernels import quant_moe as qm

    with pytest.raises(ValueError, match="regs"):
        QConfig(regs=8)
    capped = QConfig(bn=4, bg=2, algo=2, regs=96)
    assert qm._launch_opts(capped, torch.device("cpu")).get("maxnreg") is None
    assert qm._launch_opts(QConfig(), torch.device("cuda")).get("maxnreg") is None
    assert qm._launch_opts(capped, torch.device("cuda"))["maxnreg"] == 96
    qw = quantize(torch.randn(2, 24, 128) * 0.1, "q4").to_device(DEV)
    x = torch.randn(3, 128).to(DEV)
    slots = torch.tensor([1, 0, 1]).to(DEV)
    a = quant_matvec(x, qw, slots, config=capped)
    b = quant_matvec(x, qw, slots, config=QConfig(bn=4, bg=2, algo=2))
    assert torch.equal(a, b) and rel(a, quant_matvec_ref(x, qw, slots)) < 1e-5


@pytest.mark.parametrize("bg", [1, 8])
def test_preload_before_the_wait_computes_the_same(monkeypatch, bg):
    """PRE (the dense word-tile GEMV's first step and the down kernel's slots and first codes loaded before the PDL
    wait): forced on under the interpreter (no PDL there), the word tiles give bit for bit what they give without
    it, over one step (bg 8: the whole row) and several (bg 1: step 0 preloaded, the rest loaded in the loop)."""
    from tiered.kernels import quant_moe as qm

    g = torch.Generator().manual_seed(11)
    qw = quantize(torch.randn(40, 320, generator=g) * 0.1, "q4").to_device(DEV)
    x = torch.randn(2, 320, generator=g).to(DEV)
    W = _pool("q4", 6, 64, 128)
    xe = torch.randn(1, 128, generator=g).to(DEV)
    slots = torch.randperm(6, generator=g)[:3].to(DEV)
    wts = torch.rand(1, 3, generator=g).to(DEV)
    cfg = QConfig(bn=4, bg=bg, warps=2, algo=2)
    down = QConfig(bn=4, bg=bg, warps=2, algo=2, hw=1)
    seen = []

    def run():
        return (quant_matvec(x, qw, config=cfg),
                experts_quant_decode(xe, slots, wts, W.gate, W.up, W.down, interpret=INTERP, configs=(cfg, down)))

    plain = run()
    monkeypatch.setattr(qm, "_preload_ok", lambda opts: seen.append(1) or True)
    pre = run()
    assert len(seen) == 2  # the dense GEMV and the down launch asked
    assert torch.equal(pre[0], plain[0]) and torch.equal(pre[1], plain[1])
    assert rel(pre[0], quant_matvec_ref(x, qw)) < 1e-5
    assert rel(pre[1], _experts_ref(xe, slots[None], wts, W)) < 1e-5


@pytest.mark.parametrize("F,D", [(64, 128), (96, 64)])
def test_word_major_h_between_the_expert_kernels(F, D):
    """QConfig.hw on a word-tile down config: gate_up writes h word-major (1: fp32, 2: bf16) and down reads it so.
    fp32 equals the loop within fp32 rounding (and the default layout's result to the same tolerance); bf16 within
    its rounding of h. Configs that cannot read it (the flat tile, split-K) keep h in input order, and quant_down
    refuses a word-major h for them."""
    from tiered.kernels.quant_moe import down_h_layout

    W = _pool("q4", 6, F, D)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, D, generator=g).to(DEV)
    slots = torch.randperm(6, generator=g)[:3].to(DEV)
    wts = torch.rand(1, 3, generator=g).to(DEV)
    want = _experts_ref(x, slots[None], wts, W)
    up = QConfig(bn=4, bg=1, algo=2)
    plain = experts_quant_decode(x, slots, wts, W.gate, W.up, W.down, interpret=INTERP,
                                 configs=(up, QConfig(bn=4, bg=1, warps=2, algo=2)))
    for hw, tol in ((1, 1e-5), (2, 1e-2)):
        down = QConfig(bn=4, bg=1, warps=2, algo=2, hw=hw)
        assert down_h_layout(W.down, down, 3) == hw
        got = experts_quant_decode(x, slots, wts, W.gate, W.up, W.down, interpret=INTERP, configs=(up, down))
        assert rel(got, want) < tol, hw
        assert rel(got, plain.double()) < tol, hw
    assert down_h_layout(W.down, QConfig(bn=4, bg=1, algo=1, hw=2), 3) == 0  # the flat tile reads rows in order
    assert down_h_layout(W.down, QConfig(bn=4, bg=1, algo=2, split=3, hw=2), 3) == 0  # split-K: one expert a program
    h = torch.zeros(3, F, device=DEV)
    with pytest.raises(ValueError, match="word tile"):
        quant_down(h, slots[None], wts, W.down, torch.float32, QConfig(bn=4, bg=1, algo=1), h_layout=1)


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["q4", "mxfp4"])
def test_cuda_gpt_oss_shape_tuned_tiles(fmt):
    """gpt-oss's expert shape (D = F = 2880, K = 4 of 32) under TUNED's entries for it (mxfp4: the flat tile; q4:
    the word tile with word-major h), with biases and the clamped activation: within fp32 rounding of the loop.
    (Checked once under the interpreter at K = 1 when the entries were added: rel 1.8e-6 q4, 8e-7 mxfp4.)"""
    from tiered.model.moe import ClampedSwiGLU

    D = F = 2880
    W = _pool(fmt, 32, F, D)
    g = torch.Generator().manual_seed(6)
    gb, ub, db = (torch.randn(32, n, generator=g).bfloat16().to(DEV) * 0.3 for n in (F, F, D))
    x = torch.randn(1, D, generator=g).to(DEV)
    slots = torch.randperm(32, generator=g)[:4].to(DEV)
    wts = torch.softmax(torch.randn(1, 4, generator=g), -1).to(DEV)
    act = ClampedSwiGLU()
    assert qm.pick_config("gate_up", fmt, D, F).algo == (2 if fmt == "q4" else 1)
    got = experts_quant_decode(x, slots, wts, W.gate, W.up, W.down, act=act, biases=(gb, ub, db))
    want = torch.zeros(1, D, dtype=torch.float64, device=DEV)
    for k, s in enumerate(slots.tolist()):
        gw, uw, dw = (w[s].dequantize(torch.float32) for w in (W.gate, W.up, W.down))
        want += (wts[0, k] * (act(x @ gw.T + gb[s].float(), x @ uw.T + ub[s].float()) @ dw.T + db[s].float())).double()
    assert rel(got, want) < 1e-5, rel(got, want)


def test_replayed_rows_are_the_reference_routing_mapped(tmp_path):
    """bench_quant_kernels --routing replay: the reference model's routing of a text (recorded on the CPU here),
    mapped onto the 10.6B shape's 128 experts at top-8 and the 397B's 512 at top-10: each row holds distinct experts
    of the target, and the source expert of each (target // group) is one the reference chose at that token (top-8
    as recorded; top-10 from its router logits); a prompt longer than the trace is refused with what to give."""
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(repo / "benchmarks"))
    from bench_quant_kernels import reference_trace, replayed_rows

    (tmp_path / "a.txt").write_text((repo / "README.md").read_text()[:3000])
    (tmp_path / "b.txt").write_text((repo / "tiered" / "predict" / "replay.py").read_text()[:2000])
    tr = reference_trace(tmp_path, torch.device("cpu"))
    T = min(300, tr.num_tokens)
    assert T >= 200
    src8 = tr.topk_ids[:T, 0]
    src10 = torch.from_numpy(tr.router_logits[:T, 0].astype("float32")).topk(10, dim=-1).indices
    for E, K, src in ((128, 8, torch.from_numpy(src8.astype("int64"))), (512, 10, src10)):
        ids, w = replayed_rows(tr, E, K, T)
        assert ids.shape == w.shape == (T, K) and ids.dtype == torch.int64 and w.dtype == torch.float32
        assert int(ids.min()) >= 0 and int(ids.max()) < E and bool((w > 0).all())
        assert all(len(set(r)) == K for r in ids.tolist())
        G = E // tr.num_experts
        assert [sorted(r) for r in (ids // G).tolist()] == [sorted(r) for r in src.tolist()]
        assert len(torch.unique(ids % G)) > 1  # the group's members take turns (not one fixed member)
    with pytest.raises(ValueError, match="more text"):
        replayed_rows(tr, 128, 8, tr.num_tokens + 1)
