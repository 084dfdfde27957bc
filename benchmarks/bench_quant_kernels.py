"""Quantized decode kernels (GPU): µs per layer and GB/s of the fused dequantizing kernels against bf16.

    python3 benchmarks/bench_quant_kernels.py --formats q4,q8  # H200: about 140 s (compiles included)
    python3 benchmarks/bench_quant_kernels.py --quick         # default configs only
    python3 benchmarks/bench_quant_kernels.py --small         # CPU smoke run (Triton's interpreter, tiny shapes)
    python3 benchmarks/bench_quant_kernels.py --phase prefill # grouped prefill kernels: under 2 minutes

What it measures, in one run (tiered/kernels/quant_moe.py against tiered/kernels/moe_decode.py):
  - HBM read bandwidth (bench_moe_kernels.hbm_read_gbps).
  - Experts, one decode token, per shape (10.6B: D 2048, F 768, K 8; 397B: D 4096, F 1024, K 10): the bf16
    Triton decode kernel (its default config) and, per format (q4, q8, mxfp4, fp8), `experts_quant_decode`
    with the default tiles (quant_moe.TUNED; timed again after a sweep, the faster row counting) and, for q4 and
    q8, a sweep over the tile algorithms
    (QConfig.algo 0 = the grouped tile, 1 = the flat tile, 2 = the word tile, q4 only): gate/up tiles first
    (default down), then per algorithm down tiles with that algorithm's best gate/up (the best pair is taken
    among split-1 downs: split rows are timed, not chosen); then each algorithm's best gate_up and down
    timed alone ("parts", with their own GB/s). Timed as a CUDA graph of --layers calls, each layer on
    other slots of a pool larger than L2 (bench_moe_kernels.time_graph). GB/s = bytes of the K experts'
    stored parts (codes, scales, mins) / time per layer; `vs_bf16` = bf16 time / this time.
  - Dense GEMVs of one decode token (lm_head 151936 x 2048, qkv 5120 x 2048, o_proj 2048 x 4096) through
    `quant_matvec` in q4 and q8 (default tiles, a sweep over both algorithms, the default again), `qlinear` (the
    model's entry) once, against cuBLAS bf16 (F.linear).
  - With --regs 64,80,...: the default tiles under those register caps (QConfig.regs) in place of the sweeps.
  - Kept libraries' A16W4 GEMVs at the same dense shapes and copies: PyTorch's tinygemm (aten _weight_int4pack_mm,
    torchao's int4 kernel) on our q4 parts, GemLite and torchao when they import (else the reason is recorded;
    carry them as wheels: `pip wheel --no-deps gemlite`, `pip download torchao`).
Every variant is checked against the plain reference (dequantize, fp32 matmul) before it is timed; one
that fails (relative error > 2e-2) is reported as failed and not timed. The sweeps stop at shares of
--max-seconds (the rows not reached are simply absent).
Prints each row as it is measured, the table, the suggested TUNED lines, then one JSON line last; writes
$OUT/quant_kernels.json when OUT is set. Its "suggested" holds, per (kernel, format, K, N), the fastest tiles
("tuned": the line to paste into quant_moe.TUNED), the best time per algorithm ("best_by_algo"), and whether
TUNED's default is within 5%; "tuned_lines" lists the lines alone. An expert shape's gate_up and down entries
come from the same fastest pair.
--small runs every path of the decode phase on the CPU (Triton's interpreter, tiny shapes of the same kinds,
the sweeps cut to three tiles, the baselines plain torch): a smoke test (tests/test_quant_kernels.py runs it);
its times mean nothing. Writes $OUT/quant_kernels_small.json.

--phase prefill (tiered/kernels/quant_grouped.py against moe_grouped.py): one resident layer of E experts
(slot = expert) per shape (10.6B: D 2048, F 768, E 128, K 8; 397B: D 4096, F 1024, E 512, K 10), T tokens
(--tokens, default 16, 128, 512, 2048) with uniform random top-K routing (--routing replay: the reference model's
routing over --text mapped onto the shape, as the offload benchmarks replay it), per format (bf16, then
--prefill-formats, default q8, q4, mxfp4):
  - "triton grouped": the grouped kernels with the picked tiles (bf16: moe_grouped, else quant_grouped), timed
    inside a CUDA graph; with --prefill-sweep also a few other tiles;
  - "triton gemv": at T <= 16 the one-token kernels over the T*K (token, expert) pairs (moe_decode /
    quant_moe), which the model takes up to moe_gpu.DECODE_MAX_T tokens;
  - "torch loop": model/moe.experts_grouped, the torch path (quantized: each expert dequantized to bf16, then
    matmuls), timed eagerly (it syncs with the host);
  - with --with-dense, the 10.6B dense matrices (qkv, o_proj, lm_head) at the same T in q4 and q8: qlinear's
    quant_matmul against dequantize-then-cuBLAS and cuBLAS over bf16 (shape column = the matrix), and "qlinear
    (model)", the path the model takes at that T (the GEMV up to quant_moe.MAX_ROWS rows); with --split-sweep
    also quant_matmul under SPLIT_TILES x SPLITS (split-K) at T <= 256 for qkv and o_proj;
  - "gemlite": last, q4 at the 10.6B shape, GemLite's A16W4 GEMM per expert in the torch loop's plan, when
    gemlite imports (`pip install --no-deps gemlite-*.whl` first; --no-gemlite skips). Optional: never a failure.
Each is checked against the fp32 loop over the first 16 tokens' experts (dequantized) before timing; a
failed check fails the row, which is not timed. TFLOP/s = 2 T K 3 D F / time; GB/s = stored bytes of the
distinct experts the tokens use (codes, scales, mins; bf16 elements) / time; vs_bf16 = the bf16 grouped
kernel's time / this time. Writes $OUT/quant_prefill.json; --max-seconds bounds it (rows past it are skipped
and listed).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

if "--small" in sys.argv:  # before Triton is imported: the kernels run interpreted on the CPU
    os.environ["TRITON_INTERPRET"] = "1"
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "benchmarks"))
from benchmeta import git_commit, write_out  # noqa: E402
from bench_moe_kernels import hbm_read_gbps, make_pool, rel, time_eager, time_graph  # noqa: E402

from tiered.kernels.moe_decode import moe_decode  # noqa: E402
from tiered.kernels.quant_moe import (QConfig, down_h_layout, experts_quant_decode, pick_config,  # noqa: E402
                                      quant_down, quant_gate_up, qlinear)
from tiered.layout.format import plan_block  # noqa: E402
from tiered.layout.quant import QuantWeight, quantize  # noqa: E402
from tiered.store.disk import expert_views  # noqa: E402

DEV = torch.device("cuda")
TOL = 2e-2
SHAPES = {"10.6B": (2048, 768, 8), "397B": (4096, 1024, 10)}  # D, F, K
DENSE = {"lm_head": (151936, 2048), "qkv": (5120, 2048), "o_proj": (2048, 4096)}  # N, K
# --small (CPU, Triton's interpreter): tiny shapes of the same kinds, so the script's paths run anywhere
SMALL_SHAPES = {"10.6B": (128, 32, 2), "397B": (64, 64, 3)}
SMALL_DENSE = {"lm_head": (20, 128), "qkv": (12, 64), "o_proj": (8, 256)}


def C(bn, bg, warps, conv=1, split=1, algo=0, hw=0) -> QConfig:
    return QConfig(bn=bn, bg=bg, warps=warps, split=split, conv=conv, algo=algo, hw=hw)


def label(c: QConfig) -> str:
    return (f"a{c.algo} bn{c.bn} bg{c.bg} w{c.warps} c{c.conv}" + (f" split{c.split}" if c.split != 1 else "")
            + (f" regs{c.regs}" if c.regs else "") + (f" hw{c.hw}" if c.hw else ""))


# Sweeps per format: (gate_up, down, gemv) tiles. Algo 0 (the grouped tile): the fastest of the 2026-11-30 sweep
# (quant-kernels-2026-11-30-h200.json); algo 1 (the flat tile): bg groups per step (a whole row in one step
# when bg * group >= the row: 10.6B gate/up 32 groups of q4, 397B 64), from small programs (many of them) to
# wide ones. split SPLIT_K = K (the down kernel's experts spread over programs, fp32 atomics: not deterministic).
A1 = 1  # algo 1
A2 = 2  # algo 2 (the word tile, q4 only)
SPLIT_K = 1 << 10
UP4 = [C(4, 32, 4, algo=A2), C(2, 32, 2, algo=A2), C(8, 32, 4, algo=A2), C(4, 16, 2, algo=A2), C(8, 16, 4, algo=A2),
       C(16, 32, 8, algo=A2),
       C(4, 32, 4, algo=A1), C(2, 32, 2, algo=A1), C(8, 32, 4, algo=A1), C(4, 8, 2, algo=A1), C(8, 16, 4, algo=A1),
       C(2, 64, 4, algo=A1), C(4, 64, 8, algo=A1), C(4, 32, 4, conv=0, algo=A1),
       C(8, 8, 4), C(4, 16, 4), C(4, 8, 2, conv=0)]
DOWN4 = [C(4, 16, 4, algo=A2), C(2, 16, 2, algo=A2), C(8, 16, 4, algo=A2), C(4, 16, 8, algo=A2), C(1, 16, 1, algo=A2),
         C(2, 16, 4, algo=A2), C(8, 16, 8, algo=A2), C(1, 16, 2, algo=A2), C(8, 4, 4, split=SPLIT_K, algo=A2),
         C(4, 16, 4, algo=A1), C(2, 16, 2, algo=A1), C(8, 16, 4, algo=A1), C(4, 4, 2, algo=A1), C(1, 16, 1, algo=A1),
         C(8, 4, 4, split=SPLIT_K, algo=A1),
         C(4, 4, 1), C(8, 8, 4), C(16, 4, 4, split=SPLIT_K),
         # word tiles of several steps (the next step's codes in flight): 32-64 registers a thread against the
         # default's 128, so an SM holds 2-4x the warps (tools/kernel_regs.py under Triton 3.6, session 15)
         C(4, 4, 8, algo=A2), C(2, 4, 8, algo=A2), C(8, 4, 8, algo=A2), C(4, 2, 8, algo=A2), C(2, 8, 8, algo=A2),
         C(4, 8, 8, algo=A2), C(2, 4, 4, algo=A2), C(8, 2, 8, algo=A2),
         # h handed over word-major (QConfig.hw 1: fp32, 2: bf16): the down kernel's loads of x_j contiguous
         C(8, 16, 8, algo=A2, hw=1), C(8, 16, 8, algo=A2, hw=2), C(4, 4, 8, algo=A2, hw=2), C(2, 4, 8, algo=A2, hw=2)]
UP8 = [C(2, 4, 2, algo=A1), C(4, 8, 4, algo=A1), C(2, 16, 4, algo=A1), C(1, 16, 2, algo=A1),
       C(2, 4, 2), C(4, 4, 4)]
DOWN8 = [C(4, 8, 4, algo=A1), C(2, 8, 2, algo=A1), C(1, 8, 1, algo=A1),
         C(2, 8, 2), C(8, 8, 8)]
GEMV4 = [C(8, 32, 4, algo=A2), C(4, 32, 2, algo=A2), C(16, 32, 8, algo=A2), C(2, 32, 1, algo=A2), C(16, 8, 4, algo=A2),
         C(8, 16, 4, algo=A2), C(32, 32, 8, algo=A2),
         C(8, 32, 4, algo=A1), C(16, 32, 8, algo=A1), C(4, 32, 2, algo=A1), C(16, 8, 4, algo=A1), C(32, 8, 8, algo=A1),
         C(2, 32, 1, algo=A1),
         C(16, 8, 4), C(8, 8, 4), C(8, 16, 8)]
GEMV8 = [C(4, 16, 4, algo=A1), C(8, 16, 8, algo=A1), C(4, 4, 2, algo=A1), C(2, 16, 2, algo=A1),
         C(8, 2, 4), C(2, 4, 2)]
SWEEPS = {"q4": (UP4, DOWN4, GEMV4), "q8": (UP8, DOWN8, GEMV8)}
SMALL_SWEEP = [C(2, 1, 1, algo=A2), C(2, 1, 1, algo=A1), C(4, 2, 2, conv=0, algo=A1), C(2, 1, 1)]  # --small
SMALL_DOWN = SMALL_SWEEP + [C(2, 1, 1, split=SPLIT_K, algo=A1), C(2, 1, 1, algo=A2, hw=2)]


def timer(fns: list, small: bool) -> float:
    """Seconds per call: a CUDA graph of the calls on the GPU; one eager pass on the CPU (--small)."""
    if not small:
        return time_graph(fns)
    t0 = time.perf_counter()
    for f in fns:
        f()
    return (time.perf_counter() - t0) / len(fns)


def note_best(best_cfg: dict, key: str, cfg: QConfig, us: float | None, dflt: QConfig,
              default_us: float | None, by_algo: dict) -> None:
    """best_cfg[key]: the fastest tiles of (kernel, fmt, K, N), the default's time, the best per algo and the
    TUNED line to paste."""
    kernel, fmt, k, n = key.split("/")
    c = vars(cfg)
    best_cfg[key] = {"config": c, "default": vars(dflt), "best_us": us, "default_us": default_us,
                     "default_within_5pct": bool(default_us and us and default_us <= 1.05 * us),
                     "best_by_algo": {str(a): {"us": v[0], "config": vars(v[1])} for a, v in sorted(by_algo.items())},
                     "tuned": f"({kernel!r}, {fmt!r}, {k}, {n}): QConfig(bn={c['bn']}, bg={c['bg']}, "
                              f"warps={c['warps']}, split={c['split']}, conv={c['conv']}, algo={c['algo']}"
                              + (f", regs={c['regs']}" if c.get("regs") else "")
                              + (f", hw={c['hw']}" if c.get("hw") else "") + "),"}


def qpool(fmt: str, S: int, D: int, Fe: int, seed: int = 0):
    """ExpertWeights over a uint8 [S, block] GPU pool in `fmt` (the layout's block placement)."""
    specs, bs = plan_block({"gate": ((Fe, D), fmt), "up": ((Fe, D), fmt), "down": ((D, Fe), fmt)})
    pool = torch.zeros(S, bs, dtype=torch.uint8, device=DEV)
    W = expert_views(pool, specs)
    g = torch.Generator(device=DEV).manual_seed(seed)
    for w in (W.gate, W.up, W.down):
        q = quantize(torch.randn(w.shape, generator=g, device=DEV) * (w.matrix[1] ** -0.5 * 2), fmt)
        for name, t in q.parts().items():
            w.parts()[name].copy_(t)
    return pool, W


def expert_bytes(W) -> int:
    """Stored bytes of one expert's parts (codes, scales, mins), without block padding."""
    return sum(t[0].numel() * t.element_size() for w in (W.gate, W.up, W.down) for t in w.parts().values())


def ref_experts(x, slots, wts, W) -> torch.Tensor:
    """fp32 loop: dequantize each of the K experts, SwiGLU, weight, sum. x [1, D], slots [K]."""
    out = torch.zeros(1, W.down.matrix[0], device=DEV)
    xf = x.float()
    for k, s in enumerate(slots.tolist()):
        gw, uw, dw = (w[s].dequantize(torch.float32) for w in (W.gate, W.up, W.down))
        out += wts[0, k].float() * (F.silu(xf @ gw.T) * (xf @ uw.T)) @ dw.T
    return out


def layer_inputs(S: int, K: int, D: int, layers: int, seed: int = 1):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    perm = torch.randperm(S, device=DEV, generator=gen)
    out = []
    for l in range(layers):
        sl = perm[(l * K) % (S - K):(l * K) % (S - K) + K].contiguous()
        x = torch.randn(1, D, device=DEV, generator=gen).bfloat16()
        w = torch.softmax(torch.randn(1, K, device=DEV, generator=gen), -1).bfloat16()
        out.append((x, sl, w))
    return out


def bench_experts(shape: str, fmts: list[str], layers: int, quick: bool, end: float, rows: list, best_cfg: dict,
                  small: bool = False, regs: list[int] | None = None, down_only: bool = False):
    D, Fe, K = (SMALL_SHAPES if small else SHAPES)[shape]
    S = layers * K + 8
    per = layer_inputs(S, K, D, layers)
    bf16_bytes = 3 * D * Fe * 2
    if small:  # the baseline on the CPU: dense fp32 experts, the torch loop
        Wd = [torch.randn(3, Fe, D) * D ** -0.5 for _ in range(K)]
        x0 = per[0][0].float()
        t_bf16 = timer([lambda: sum(F.linear(F.silu(F.linear(x0, w[0])) * F.linear(x0, w[1]), w[2].T) for w in Wd)],
                       True)
        variant = "torch loop fp32 (CPU)"
    else:
        pool, Wb = make_pool(S, D, Fe)
        t_bf16 = timer([lambda x=x, s=s, w=w: moe_decode(x, s[None], w, Wb) for x, s, w in per], small)
        variant = "moe_decode default"
        del pool, Wb
        torch.cuda.empty_cache()
    rows.append({"section": "experts", "shape": shape, "fmt": "bf16", "variant": variant, "us": t_bf16 * 1e6,
                 "gbps": K * bf16_bytes / t_bf16 / 1e9, "vs_bf16": 1.0, "rel_err": 0.0})
    for fmt in fmts:
        pool, W = qpool(fmt, S, D, Fe)
        ebytes = expert_bytes(W)
        x0, s0, w0 = per[0]
        ref = ref_experts(x0, s0, w0, W)

        def run(label_, up, down):
            if time.perf_counter() > end:
                return None
            r = {"section": "experts", "shape": shape, "fmt": fmt, "variant": label_,
                 "up": None if up is None else vars(up), "down": None if down is None else vars(down)}
            try:
                out = experts_quant_decode(x0, s0, w0, W.gate, W.up, W.down, configs=(up, down), interpret=small)
                if out is None:
                    raise RuntimeError("experts_quant_decode declined (kernel_ok False): the engine would take "
                                       "the dequantize reference")
                r["rel_err"] = rel(out.float(), ref)
                if not r["rel_err"] <= TOL:
                    r["error"] = f"wrong result: rel err {r['rel_err']:.3g} > {TOL}: not timed"
                else:
                    t = timer([lambda x=x, s=s, w=w: experts_quant_decode(x, s, w, W.gate, W.up, W.down,
                                                                          configs=(up, down), interpret=small)
                               for x, s, w in per], small)
                    r.update(us=t * 1e6, gbps=K * ebytes / t / 1e9, vs_bf16=t_bf16 / t)
            except Exception as e:  # report and go on: the other variants still run
                r["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(r)
            print(_line(r), flush=True)
            return r

        default_up, default_down = pick_config("gate_up", fmt, D, Fe), pick_config("down", fmt, Fe, D)
        d = run("default (TUNED)", None, None)
        default_us = d.get("us") if d else None
        inf = float("inf")
        best = (d.get("us", inf) if d else inf, default_up, default_down)
        best_by = {default_up.algo: best}  # algo -> (us, up, down)
        if regs:  # --regs: the default tiles under each register cap, in place of the tile sweep
            ups = [dataclasses.replace(default_up, regs=r) for r in regs]
            downs = [dataclasses.replace(default_down, regs=r) for r in regs]
        elif not quick and fmt in SWEEPS:
            ups, downs, _ = SWEEPS[fmt]
            ups, downs = (SMALL_SWEEP, SMALL_DOWN) if small else (ups, downs)
            if down_only:  # --down-only: the default gate/up with every down tile
                ups = []
        if regs or (not quick and fmt in SWEEPS):
            # gate/up tiles with the default down; then, per algo, down tiles with that algo's best gate/up
            for c in ups:
                r = run(f"up {label(c)}", c, default_down)
                if r and r.get("us", inf) < best_by.get(c.algo, (inf,))[0]:
                    best_by[c.algo] = (r["us"], c, default_down)
            for c in downs:
                c = QConfig(**{**vars(c), "split": K if c.split == SPLIT_K else c.split})
                for algo, (_, up, _) in list(best_by.items()):
                    if algo != c.algo:
                        continue
                    r = run(f"up {label(up)} | down {label(c)}", up, c)
                    # the best pair sums each output in one program (split 1): split rows are timed and
                    # reported, but their atomics are not deterministic, so they are not what TUNED takes
                    if r and c.split == 1 and r.get("us", inf) < best_by[algo][0]:
                        best_by[algo] = (r["us"], up, c)
            # the default again after the others (a row timed first can read slow: see bench_dense); its time is
            # the faster of its two rows
            again = run("default (TUNED), again", None, None)
            if again and "us" in again:
                default_us = min(default_us or inf, again["us"])
                a0 = default_up.algo
                if best_by[a0][1:] == (default_up, default_down) or default_us < best_by[a0][0]:
                    best_by[a0] = (default_us, default_up, default_down)
            best = min(best_by.values(), key=lambda v: v[0])
            # the two kernels of each algo's best config alone (where the time goes)
            for algo, (us, up, down) in sorted(best_by.items()):
                try:
                    hl = down_h_layout(W.down, down, K)
                    hs = [quant_gate_up(x, s[None], W.gate, W.up, up, h_layout=hl) for x, s, w in per]
                    tu = timer([lambda x=x, s=s: quant_gate_up(x, s[None], W.gate, W.up, up, h_layout=hl)
                                for x, s, w in per], small)
                    td = timer([lambda h=h, s=s, w=w: quant_down(h, s[None], w, W.down, torch.bfloat16, down,
                                                                 h_layout=hl)
                                for h, (x, s, w) in zip(hs, per)], small)
                    r = {"section": "parts", "shape": shape, "fmt": fmt, "algo": algo, "gate_up_us": tu * 1e6,
                         "down_us": td * 1e6, "up": vars(up), "down": vars(down),
                         "gate_up_gbps": K * 2 * W.gate[0].nbytes / tu / 1e9,
                         "down_gbps": K * W.down[0].nbytes / td / 1e9}
                except Exception as e:
                    r = {"section": "parts", "shape": shape, "fmt": fmt, "algo": algo,
                         "error": f"{type(e).__name__}: {e}"}
                rows.append(r)
                print(_line(r), flush=True)
        for kernel, (k, n), i, dflt in (("gate_up", (D, Fe), 1, default_up), ("down", (Fe, D), 2, default_down)):
            note_best(best_cfg, f"{kernel}/{fmt}/{k}/{n}", best[i], best[0] if best[0] < inf else None, dflt,
                      default_us, {a: (v[0], v[i]) for a, v in best_by.items() if v[0] < inf})
        del pool, W
        if not small:
            torch.cuda.empty_cache()


def bench_dense(fmts: list[str], quick: bool, end: float, rows: list, best_cfg: dict, lib_end: float,
                small: bool = False, regs: list[int] | None = None):
    from tiered.kernels.quant_moe import quant_matvec

    for name, (n, k) in (SMALL_DENSE if small else DENSE).items():
        reps = 1 if name == "lm_head" or small else 8  # 8 copies (8 layers): small matrices not served from L2
        x = torch.randn(1, k, device=DEV).bfloat16()
        ws = [torch.randn(n, k, device=DEV).mul_(k ** -0.5).bfloat16() for _ in range(reps)]
        t_bf16 = timer([lambda w=w: F.linear(x, w) for w in ws], small)
        rows.append({"section": "dense", "gemv": name, "shape": [n, k], "fmt": "bf16", "variant": "cuBLAS F.linear",
                     "us": t_bf16 * 1e6, "gbps": n * k * 2 / t_bf16 / 1e9, "vs_bf16": 1.0, "rel_err": 0.0})
        for fmt in fmts:
            qs = [quantize(w, fmt) for w in ws]
            ref = F.linear(x.float(), qs[0].dequantize(torch.float32))
            nbytes = qs[0].nbytes
            inf = float("inf")
            dflt = pick_config("gemv", fmt, k, n)
            cfgs = [("default (TUNED)", None)]
            if regs:  # --regs: the default tiles under each register cap, in place of the tile sweep
                cfgs += [(label(c), c) for c in (dataclasses.replace(dflt, regs=r) for r in regs)]
            elif not quick and fmt in SWEEPS:
                sweep = SWEEPS[fmt][2]
                cfgs += [(label(c), c) for c in (SMALL_SWEEP if small else sweep)]
            if len(cfgs) > 1:  # the default again after the others: a row timed first can read slow (session 15's
                # calls D and E: lm_head's first q4 row 78.7-79.2 us, the same tiles 71.7 later), and the default's
                # time (the faster of its two rows) decides whether TUNED takes another config
                cfgs.append(("default (TUNED), again", None))
            default_us = None
            best_by = {}
            for label_, c in cfgs:
                if time.perf_counter() > end:
                    break
                r = {"section": "dense", "gemv": name, "shape": [n, k], "fmt": fmt, "variant": label_}
                try:
                    out = quant_matvec(x, qs[0], config=c)
                    r["rel_err"] = rel(out.float(), ref)
                    if not r["rel_err"] <= TOL:
                        r["error"] = f"wrong result: rel err {r['rel_err']:.3g} > {TOL}: not timed"
                    else:
                        t = timer([lambda q=q: quant_matvec(x, q, config=c) for q in qs], small)
                        r.update(us=t * 1e6, gbps=nbytes / t / 1e9, vs_bf16=t_bf16 / t)
                        cc = c or dflt
                        if t * 1e6 < best_by.get(cc.algo, (inf,))[0]:
                            best_by[cc.algo] = (t * 1e6, cc)
                        if c is None:
                            default_us = min(default_us or inf, t * 1e6)
                except Exception as e:
                    import traceback

                    r["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    r["traceback"] = traceback.format_exc()[-1500:]
                rows.append(r)
                print(_line(r), flush=True)
            # the model's entry point, once: qlinear must take the kernel (not the dequantize reference)
            try:
                t = timer([lambda q=q: qlinear(x, q) for q in qs], small)
                r = {"section": "dense", "gemv": name, "shape": [n, k], "fmt": fmt, "variant": "qlinear (model)",
                     "us": t * 1e6, "gbps": nbytes / t / 1e9, "vs_bf16": t_bf16 / t,
                     "rel_err": rel(qlinear(x, qs[0]).float(), ref)}
            except Exception as e:
                r = {"section": "dense", "gemv": name, "fmt": fmt, "variant": "qlinear (model)",
                     "error": f"{type(e).__name__}: {str(e)[:300]}"}
            rows.append(r)
            print(_line(r), flush=True)
            if best_by:
                us, cfg = min(best_by.values(), key=lambda v: v[0])
                note_best(best_cfg, f"gemv/{fmt}/{k}/{n}", cfg, us, dflt, default_us, best_by)
            del qs
        if not small and time.perf_counter() < lib_end - 15:  # a library's own autotuning can take seconds
            bench_libraries(name, n, k, x, ws, t_bf16, rows)
        del ws
        if not small:
            torch.cuda.empty_cache()


def _line(r: dict, hbm: float | None = None) -> str:
    """One table row."""
    where = r.get("shape") if r["section"] != "dense" else r.get("gemv", "")
    if r["section"] == "parts":
        if "error" in r:
            return f"{'parts':<8} {where:<14} {r['fmt']:<6} algo {r['algo']} ERROR {r['error']}"
        return (f"{'parts':<8} {where:<14} {r['fmt']:<6} algo {r['algo']}: gate_up alone {r['gate_up_us']:.1f} us "
                f"({r['gate_up_gbps']:.0f} GB/s), down alone {r['down_us']:.1f} us ({r['down_gbps']:.0f} GB/s)")
    if "error" in r:
        return f"{r['section']:<8} {str(where):<14} {r['fmt']:<6} ERROR {r['error']}  {r.get('variant', '')}"
    x = f"{r['gbps'] / hbm:5.2f}" if hbm else f"{'':>5}"
    return (f"{r['section']:<8} {str(where):<14} {r['fmt']:<6} {r['us']:8.1f} {r['gbps']:7.0f} {x} "
            f"{r['vs_bf16']:7.2f} {r['rel_err']:8.1e}  {r['variant']}")


def tinygemm_parts(qw, k: int, device) -> tuple:
    """Our q4 parts in PyTorch's tinygemm convention (aten `_weight_int4pack_mm`, torchao's int4 tile-packed kernel):
    w = (code - 8) * scale + zero, so zero = min + 8 * scale (rounded to bf16: the only difference from our
    dequantization). Returns (packed codes, scales_and_zeros [K / group, N, 2] bf16). On the CPU the packing is
    `_convert_weight_to_int4pack_for_cpu` of the int32 codes; on CUDA two codes a byte, the even one high."""
    from tiered.layout.quant import unpack_nibbles

    codes = unpack_nibbles(qw.q, k)
    s, m = qw.scale.float(), qw.min.float()
    sz = torch.stack([s, m + 8 * s], -1).transpose(0, 1).contiguous().to(torch.bfloat16).to(device)
    if torch.device(device).type == "cpu":
        return torch._convert_weight_to_int4pack_for_cpu(codes.int(), 2), sz
    byte = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8).to(device)
    return torch._convert_weight_to_int4pack(byte, 8), sz  # 8 inner k tiles: K a multiple of 128


def tinygemm_matvec(x, packed, group: int, sz):
    """x @ w.T through tinygemm (CUDA) or its CPU twin, from `tinygemm_parts`."""
    if x.device.type == "cpu":
        return torch._weight_int4pack_mm_for_cpu(x, packed, group, sz)
    return torch._weight_int4pack_mm(x, packed, group, sz)


def bench_libraries(name: str, n: int, k: int, x, ws: list, t_bf16: float, rows: list) -> None:
    """Kept libraries' A16W4 GEMVs at one dense shape, over the same copies as our kernel's row (so that the small
    matrices are not served from L2 for them either): PyTorch's own tinygemm on our q4 parts, GemLite on our q4
    parts, torchao's int4 weight-only on the bf16 weights (its own rounding). A library that does not import or
    fails is recorded with the reason; a wrong result is not timed."""
    qs = [quantize(w, "q4") for w in ws]
    ref_q = F.linear(x.float(), qs[0].dequantize(torch.float32))  # the same quantized weights as ours
    ref_w = F.linear(x.float(), ws[0].float())  # torchao rounds the bf16 weights itself

    def rec(lib, fns, nbytes, ref, tol):
        r = {"section": "dense", "gemv": name, "shape": [n, k], "fmt": "q4", "variant": lib}
        try:
            r["rel_err"] = rel(fns[0]().float(), ref)
            if not r["rel_err"] <= tol:
                r["error"] = f"wrong result: rel err {r['rel_err']:.3g} > {tol}: not timed"
            else:
                t = time_graph(fns)
                r.update(us=t * 1e6, gbps=nbytes / t / 1e9 if nbytes else None, vs_bf16=t_bf16 / t)
        except Exception as e:
            r["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(r)
        print(_line(r), flush=True)

    try:
        parts = [tinygemm_parts(q, k, DEV) for q in qs]
        rec(f"torch {torch.__version__} tinygemm _weight_int4pack_mm g64",
            [lambda p=p: tinygemm_matvec(x, p[0], qs[0].group, p[1]) for p in parts],
            sum(t.nbytes for t in parts[0]), ref_q, TOL)
        del parts
    except Exception as e:
        rows.append({"section": "dense", "gemv": name, "fmt": "q4", "variant": "torch tinygemm",
                     "error": f"{type(e).__name__}: {str(e)[:200]}"})
    try:
        import gemlite

        gls = [gemlite_layer(qw) for qw in qs]
        rec(f"gemlite {getattr(gemlite, '__version__', '?')} A16W4 g64", [lambda g=g: g(x) for g in gls],
            qs[0].nbytes, ref_q, TOL)
        del gls
    except Exception as e:
        rows.append({"section": "dense", "gemv": name, "fmt": "q4", "variant": "gemlite",
                     "error": f"{type(e).__name__}: {str(e)[:200]}"})
    try:
        import torchao
        from torchao.quantization import Int4WeightOnlyConfig, quantize_

        for fmt_kw in ({"int4_packing_format": "tile_packed_to_4d"}, {}):
            lins = []
            for w in ws:
                lin = torch.nn.Sequential(torch.nn.Linear(k, n, bias=False, device=DEV, dtype=torch.bfloat16))
                lin[0].weight.data.copy_(w)
                try:
                    quantize_(lin, Int4WeightOnlyConfig(group_size=64, **fmt_kw))
                except Exception as e:
                    rows.append({"section": "dense", "gemv": name, "fmt": "q4",
                                 "variant": f"torchao {fmt_kw or 'default'}",
                                 "error": f"{type(e).__name__}: {str(e)[:200]}"})
                    break
                lins.append(lin)
            if len(lins) == len(ws):
                try:  # its own rounding: checked against its own dequantized weight where it gives one
                    ref_t, tol = F.linear(x.float(), lins[0][0].weight.dequantize().float()), TOL
                except Exception:
                    ref_t, tol = ref_w, 0.2  # q4 of Gaussian weights is about 0.1 from them
                rec(f"torchao {torchao.__version__} int4 weight-only g64 {fmt_kw or 'default'}",
                    [lambda m=m: m(x) for m in lins], n * k // 2 + n * k // 64 * 4, ref_t, tol)
            del lins
    except Exception as e:
        rows.append({"section": "dense", "gemv": name, "fmt": "q4", "variant": "torchao",
                     "error": f"{type(e).__name__}: {str(e)[:200]}"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", choices=("decode", "prefill"), default="decode",
                    help="decode: one-token kernels and dense GEMVs; prefill: grouped kernels at T tokens")
    ap.add_argument("--layers", type=int, default=8, help="decode calls per graph (each on other slots)")
    ap.add_argument("--quick", action="store_true", help="default configs only, no sweep")
    ap.add_argument("--formats", default="q4,q8,mxfp4,fp8")
    ap.add_argument("--regs", default="",
                    help="decode: comma-separated register caps (QConfig.regs, ptxas maxnreg) to time the default "
                         "tiles under, in place of the tile sweeps (e.g. 64,80,96)")
    ap.add_argument("--no-dense", action="store_true", help="decode: skip the dense GEMVs")
    ap.add_argument("--down-only", action="store_true",
                    help="decode: sweep the down tiles only (gate/up keeps its default tile)")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="decode (default 140): sweeps stop at shares of this (experts 10.6B 35%%, 397B 60%%, "
                         "dense 93%%, libraries 100%%); prefill (default 100): rows past it are skipped")
    ap.add_argument("--small", action="store_true",
                    help="decode: on the CPU through Triton's interpreter, tiny shapes and a few tiles (a smoke "
                         "run of every path of the script; its times mean nothing)")
    ap.add_argument("--prefill-formats", default="q8,q4,mxfp4", help="prefill: quantized formats besides bf16")
    ap.add_argument("--tokens", default="16,128,512,2048", help="prefill: token counts T")
    ap.add_argument("--shapes", default="10.6B,397B",
                    help="expert shapes (10.6B, 397B: decode and prefill; gpt-oss: prefill); none: the dense "
                         "matrices alone")
    ap.add_argument("--routing", choices=("uniform", "replay"), default="uniform",
                    help="prefill: the experts' rows: distinct top-k drawn uniformly, or the reference model's "
                         "routing over --text mapped onto the shape (tiered.predict.replay.map_routing; 10.6B and "
                         "397B only: the shape's experts must be a multiple of its 64)")
    ap.add_argument("--text", default=str(REPO.parent / "shared" / "text" / "fit"),
                    help="prefill with --routing replay: the text files the reference model routes (default "
                         "../shared/text/fit; on the GPU box .carry/shared/text/fit)")
    ap.add_argument("--prefill-sweep", action="store_true", help="prefill: also time a few other tiles")
    ap.add_argument("--many-sweep", action="store_true",
                    help="prefill: at 32+ rows an expert also MANY_SWEEP's tiles of the quantized formats (the "
                         "interleaved weight tile, swap 4 / 5), and with --with-dense DENSE_SWAP's")
    ap.add_argument("--ps-sweep", action="store_true",
                    help="prefill: the quantized formats' picked tile with GroupedConfig.ps flipped (the next "
                         "step's scales loaded during this one, or not), and PS_SWEEP's tiles at both")
    ap.add_argument("--dq-sweep", action="store_true",
                    help="prefill: at 32+ rows an expert also DQ_SWEEP's tiles of q4 (GroupedConfig.dq 0-2)")
    ap.add_argument("--swap-sweep", action="store_true",
                    help="prefill: also the transposed-product tiles (GroupedConfig.swap) of the quantized formats")
    ap.add_argument("--no-gemlite", action="store_true",
                    help="prefill: skip the GemLite row (and, with --with-dense, the kept libraries' dense rows)")
    ap.add_argument("--dense-sweep", action="store_true",
                    help="prefill with --with-dense: also quant_matmul under DENSE_SWEEP's tiles")
    ap.add_argument("--dequant-sweep", action="store_true",
                    help="prefill with --with-dense: the dense copy alone (quant_dequant.dequantize_rows) under "
                         "DEQUANT_SWEEP's blocks, at the first T (implied by --dense-sweep)")
    ap.add_argument("--split-sweep", action="store_true",
                    help="prefill with --with-dense: also quant_matmul's split-K (SPLIT_TILES x SPLITS) at T <= 256")
    ap.add_argument("--with-dense", action="store_true",
                    help="prefill: also qlinear's dense GEMM (quant_matmul) at the 10.6B dense shapes")
    a = ap.parse_args()
    if a.phase == "prefill":
        return main_prefill(a)
    if a.small:  # CPU: Triton's interpreter (set at import), tiny shapes, the sweeps cut to a few tiles each
        global DEV
        DEV = torch.device("cpu")
        import bench_moe_kernels

        bench_moe_kernels.DEV = DEV
        a.layers = 1
    a.max_seconds = a.max_seconds or (600.0 if a.small else 140.0)
    t0 = time.perf_counter()
    fmts = a.formats.split(",")
    torch.manual_seed(0)
    if a.small:
        bw = {"read_gbps": None}
    else:
        bw = hbm_read_gbps()
        torch.cuda.empty_cache()
        print(f"HBM read {bw['read_gbps']:.0f} GB/s (sum over 4 GiB)", flush=True)
    rows: list = []
    best_cfg: dict = {}
    regs = [int(r) for r in a.regs.split(",") if r]
    shapes = a.shapes.split(",")
    if "10.6B" in shapes:
        bench_experts("10.6B", fmts, a.layers, a.quick, t0 + 0.35 * a.max_seconds, rows, best_cfg, a.small, regs,
                      a.down_only)
    if "397B" in shapes:
        bench_experts("397B", [f for f in fmts if f in ("q4", "q8")], a.layers, a.quick, t0 + 0.6 * a.max_seconds,
                      rows, best_cfg, a.small, regs, a.down_only)
    if not a.no_dense:
        bench_dense([f for f in fmts if f in ("q4", "q8")], a.quick, t0 + 0.93 * a.max_seconds, rows, best_cfg,
                    t0 + a.max_seconds, a.small, regs)
    hbm = bw["read_gbps"]
    print(f"\n{'section':<8} {'shape':<14} {'fmt':<6} {'us':>8} {'GB/s':>7} {'xHBM':>5} {'vs bf16':>7} {'err':>8}  "
          "variant")
    for r in rows:
        print(_line(r, hbm))
    print("\nfastest tiles per (kernel, format, K, N): paste into tiered/kernels/quant_moe.py TUNED where the "
          "default is not within 5%:")
    for key, v in best_cfg.items():
        algos = ", ".join(f"algo {k} {b['us']:.1f} us" for k, b in v["best_by_algo"].items())
        print(f"    {v['tuned']}  # {v['best_us']} us ({algos}); default {v['default_us']} us, "
              f"within 5%: {v['default_within_5pct']}")
    summary = {}
    for r in rows:
        key = f"{r['shape']}/{r['fmt']}" if r["section"] == "experts" else None
        if (key and "us" in r and (r["fmt"] == "bf16" or r["variant"].startswith("default"))
                and r["us"] < summary.get(key, {}).get("us", float("inf"))):  # the default's faster row
            summary[key] = {"us": r["us"], "gbps": r["gbps"], "vs_bf16": r["vs_bf16"]}
    failed = [f"{r['section']}/{r.get('shape') or r.get('gemv')}/{r['fmt']}/{r.get('variant')}: {r['error']}"
              for r in rows
              if "error" in r and not r.get("variant", "").startswith(("gemlite", "torchao", "torch "))]
    dev = "cpu (Triton interpreter, --small)" if a.small else torch.cuda.get_device_name()
    res = {"bench": "quant_kernels", "commit": git_commit(), "device": dev,
           "torch": torch.__version__, "triton": __import__("triton").__version__,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "hbm": bw, "experts_default": summary,
           "suggested": best_cfg, "tuned_lines": [v["tuned"] for v in best_cfg.values()], "failed": failed,
           "rows": rows, "seconds": time.perf_counter() - t0}
    print(write_out(res, "quant_kernels_small.json" if a.small else "quant_kernels.json"))


# --- prefill: grouped kernels over one resident layer ---

PREFILL_SHAPES = {"10.6B": (2048, 768, 128, 8), "397B": (4096, 1024, 512, 10),
                  "gpt-oss": (2880, 2880, 32, 4)}  # D, F, E, K (gpt-oss-20b's experts)
PREFILL_SWEEP = [(16, 64, 64, 4, 4), (16, 64, 128, 4, 4), (16, 128, 64, 4, 4), (32, 64, 128, 4, 4),
                 (64, 64, 64, 4, 4), (64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 64, 64, 4, 4),
                 (64, 64, 32, 4, 4)]  # block_m, block_n, block_k, warps, stages
# --swap-sweep (quantized formats only): the transposed products (GroupedConfig.swap 1-3) at few rows per expert,
# and longer reduction steps (swap 0, several groups a step): a q4 step of 64 inputs reads 32 bytes of each weight
# row, 256 inputs a whole 128-byte line (session 27)
SWAP_SWEEP = [(16, 64, 64, 4, 4, 1), (16, 64, 64, 4, 4, 2), (16, 128, 64, 4, 4, 2), (16, 64, 64, 4, 4, 3),
              (16, 128, 64, 4, 4, 3), (16, 128, 64, 8, 4, 3), (16, 64, 64, 8, 4, 3), (16, 64, 64, 4, 3, 3),
              (16, 256, 64, 8, 3, 3), (32, 64, 64, 4, 4, 3), (32, 128, 64, 8, 4, 3), (64, 64, 64, 4, 4, 3),
              (64, 128, 64, 4, 3, 3),
              (16, 64, 128, 4, 3, 0), (16, 64, 128, 8, 3, 0), (16, 128, 128, 8, 3, 0), (16, 32, 256, 4, 3, 0),
              (16, 32, 256, 8, 3, 0), (16, 64, 256, 8, 3, 0), (16, 64, 256, 8, 2, 0), (16, 64, 128, 4, 3, 2),
              (32, 64, 256, 8, 3, 0), (64, 64, 128, 8, 3, 0), (64, 64, 256, 8, 3, 0), (64, 128, 128, 8, 3, 0)]


class _Resident:
    """The provider protocol over one layer's pool whose slot row = expert id."""

    def __init__(self, W, n):
        self.weights, self.max_experts_per_call = W, n

    def get(self, layer, ids):
        return ids

    def prefetch(self, layer, ids):
        pass


def layer_pool(fmt: str, E: int, D: int, Fe: int, seed: int = 3):
    """One layer's E experts over a uint8 [E, block] GPU pool in `fmt` ("bf16" or a quantized format),
    filled 32 experts at a time (bounded temporaries at the 397B shape)."""
    kind = "bfloat16" if fmt == "bf16" else fmt
    specs, bs = plan_block({"gate": ((Fe, D), kind), "up": ((Fe, D), kind), "down": ((D, Fe), kind)})
    pool = torch.zeros(E, bs, dtype=torch.uint8, device=DEV)
    W = expert_views(pool, specs)
    g = torch.Generator(device=DEV).manual_seed(seed)
    for w in (W.gate, W.up, W.down):
        n, k = w.shape[-2:]
        for e0 in range(0, E, 32):
            dense = torch.randn(min(32, E - e0), n, k, generator=g, device=DEV) * (k ** -0.5 * 2)
            if fmt == "bf16":
                w[e0:e0 + 32].copy_(dense)
            else:
                q = quantize(dense, fmt)
                for name, t in q.parts().items():
                    w.parts()[name][e0:e0 + 32].copy_(t)
            del dense
    return pool, W


def stored_bytes(W, fmt: str) -> int:
    """Bytes of one expert's stored weights (codes, scales, mins; bf16 elements), no block padding."""
    if fmt == "bf16":
        return sum(w[0].numel() * w.element_size() for w in (W.gate, W.up, W.down))
    return expert_bytes(W)


def ref_tokens(x, ids, wts, W) -> torch.Tensor:
    """fp32 loop over the experts of x's tokens (dequantized): [T, D]."""
    out = torch.zeros(x.shape[0], x.shape[1], device=DEV)
    xf = x.float()
    for e in torch.unique(ids).tolist():
        t, k = (ids == e).nonzero(as_tuple=True)
        gw, uw, dw = (w[e].dequantize(torch.float32) if isinstance(w, QuantWeight) else w[e].float()
                      for w in (W.gate, W.up, W.down))
        out.index_add_(0, t, ((F.silu(xf[t] @ gw.T) * (xf[t] @ uw.T)) @ dw.T) * wts[t, k].float()[:, None])
    return out


def gemlite_layer(q):
    """A GemLite A16W4 layer from one matrix's q4 parts (w = (code - zero) * scale with zero = -min / scale, rounded
    to bf16), or raise why not."""
    from gemlite.helper import A16Wn

    from tiered.layout.quant import unpack_nibbles

    sc = q.scale.float()
    zero = torch.where(sc > 0, -q.min.float() / sc.clamp_min(1e-30), torch.zeros_like(sc))
    return A16Wn(device=f"{DEV.type}:0", dtype=torch.bfloat16).from_weights(
        unpack_nibbles(q.q, q.matrix[1]).contiguous(), q.scale.contiguous(), zero.to(torch.bfloat16),
        W_nbits=4, group_size=q.group)


def gemlite_experts(W, E: int):
    """GemLite layers of every expert's gate/up/down from our q4 parts, or raise why not."""
    return [tuple(gemlite_layer(w[e]) for w in (W.gate, W.up, W.down)) for e in range(E)]


def gemlite_loop(x, ids, wts, layers):
    """model/moe.experts_grouped's loop with GemLite GEMMs: rows grouped by expert (one host sync)."""
    T, K = ids.shape
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    used, counts = torch.unique_consecutive(flat[order], return_counts=True)
    out = torch.zeros(T * K, x.shape[1], dtype=torch.float32, device=DEV)
    a = 0
    wflat = wts.reshape(-1)
    for e, c in zip(used.tolist(), counts.tolist()):
        r = order[a:a + c]
        g, u, d = layers[e]
        xe = x[r // K]
        y = d(F.silu(g(xe)) * u(xe))
        out.index_copy_(0, r, y.float() * wflat[r, None].float())
        a += c
    return out.view(T, K, -1).sum(1).to(x.dtype)


def prefill_inputs(shape: str, tokens: list[int], trace=None) -> dict:
    """T -> (x [T, D] bf16, ids [T, K], weights [T, K] fp32, distinct experts); the same on every call (fixed seed).
    ids: distinct top-K drawn uniformly, or with `trace` (the reference model's, --routing replay) its first T
    tokens of layer 0 mapped onto the shape's experts and top-k (`replayed_rows`)."""
    D, Fe, E, K = PREFILL_SHAPES[shape]
    gen = torch.Generator(device=DEV).manual_seed(7)
    inputs = {}
    for T in tokens:
        x = torch.randn(T, D, device=DEV, generator=gen).bfloat16()
        ids = torch.rand(T, E, device=DEV, generator=gen).topk(K, dim=-1).indices
        w = torch.softmax(torch.randn(T, K, device=DEV, generator=gen), -1)
        if trace is not None:
            ids, w = (t.to(DEV) for t in replayed_rows(trace, E, K, T))
        inputs[T] = (x, ids, w, int(torch.unique(ids).numel()))
    return inputs


def replayed_rows(trace, num_experts: int, top_k: int, tokens: int, layer: int = 0) -> tuple:
    """The reference routing of `tokens` tokens at one layer, as a prompt of a model with `num_experts` experts and
    `top_k` would see it: `tiered.predict.replay.map_routing` (each source expert owns a group of target experts
    whose members take turns every 128 tokens; top-k above the source's from its router logits), the trace's
    documents in order -> (ids [T, top_k] int64, weights [T, top_k] fp32). The experts must be a multiple of the
    source's (10.6B: 128 of 64; 397B: 512), and the trace must hold `tokens` tokens."""
    from tiered.predict.replay import map_routing

    m = map_routing(trace, num_layers=trace.num_layers, num_experts=num_experts, top_k=top_k)
    if m.num_tokens < tokens:
        raise ValueError(f"--routing replay: the trace maps {m.num_tokens} tokens, {tokens} asked: give --text "
                         f"a directory with more text")
    ids = torch.from_numpy(m.topk_ids[:tokens, layer].astype("int64"))
    return ids, torch.from_numpy(m.topk_weights[:tokens, layer].astype("float32"))


def reference_trace(text_dir: Path, device: torch.device):
    """The reference model's routing (with router logits, for top-k above its 8) over every file of text_dir, whole
    (bench_predict_gpu.reference_trace)."""
    from bench_predict_gpu import reference_trace as trace_text

    if not text_dir.is_dir():
        raise SystemExit(f"--routing replay: {text_dir} is not a directory of text files (give --text)")
    return trace_text(text_dir, device, logits=True, whole=True)


def bench_gemlite(shape: str, tokens: list[int], end: float, rows: list, skipped: list, bf16_us: dict) -> None:
    """q4 experts through GemLite's A16W4 GEMM, one expert at a time (the torch loop's plan), when it imports."""
    D, Fe, E, K = PREFILL_SHAPES[shape]
    r0 = {"section": "prefill", "shape": shape, "fmt": "q4", "variant": "gemlite", "config": "A16W4 g64 per expert"}
    try:
        import gemlite
    except Exception as e:  # ImportError, or a wheel that does not fit this torch / Triton
        rows.append({**r0, "T": 0, "error": f"not importable: {type(e).__name__}: {str(e)[:200]}"})
        print(_prefill_line(rows[-1]), flush=True)
        return
    r0["config"] += f" (gemlite {getattr(gemlite, '__version__', '?')})"
    pool, W = layer_pool("q4", E, D, Fe)
    ebytes = stored_bytes(W, "q4")
    try:
        layers = gemlite_experts(W, E)
    except Exception as e:
        rows.append({**r0, "T": 0, "error": f"building layers: {type(e).__name__}: {str(e)[:300]}"})
        print(_prefill_line(rows[-1]), flush=True)
        return
    for T, (x, ids, w, distinct) in prefill_inputs(shape, tokens).items():
        if time.perf_counter() > end:
            skipped.append(f"{shape}/T{T}/q4/gemlite")
            continue
        r = {**r0, "T": T, "distinct_experts": distinct}
        try:
            sub = slice(0, min(T, 16))
            fn = (lambda: gemlite_loop(x, ids, w, layers))
            r["rel_err"] = rel(fn()[sub].float(), ref_tokens(x[sub], ids[sub], w[sub], W))
            if not r["rel_err"] <= 0.1:  # GemLite's zero point is rounded to bf16
                r["error"] = f"wrong result: rel err {r['rel_err']:.3g} > 0.1: not timed"
            else:
                t = time_eager(fn, reps=3)
                r.update(us=t * 1e6, tflops=2 * T * K * 3 * D * Fe / t / 1e12, gbps=distinct * ebytes / t / 1e9)
                if T in bf16_us:
                    r["vs_bf16"] = bf16_us[T] / r["us"]
        except Exception as e:
            r["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(r)
        print(_prefill_line(r), flush=True)
    del pool, W, layers
    torch.cuda.empty_cache()


# --many-sweep (quantized formats, 32+ rows an expert): the weight tile interleaved back into input order (swap 4:
# one tl.dot of BLOCK_K a step, the activation tile as loaded, shared by gate and up; 5: the same transposed, the
# weight tile the MMA's first operand) against the split tiles the pick takes (swap 0)
MANY_SWEEP = [(128, 64, 64, 4, 4, 0), (128, 64, 64, 4, 4, 4), (128, 64, 64, 4, 3, 4), (128, 128, 64, 8, 3, 4),
              (128, 128, 64, 4, 3, 4), (128, 64, 128, 4, 3, 4), (128, 128, 128, 8, 3, 4), (64, 128, 64, 4, 3, 4),
              (256, 64, 64, 8, 3, 4), (128, 256, 64, 8, 3, 4), (64, 64, 64, 4, 4, 4),
              (128, 64, 64, 4, 4, 5), (128, 128, 64, 8, 3, 5), (64, 128, 64, 4, 3, 5), (128, 128, 128, 8, 3, 5),
              (64, 256, 64, 8, 3, 5),
              # 32 outputs a program: gate and up's two accumulators in half the registers (127 a thread for m128 n32
              # w4 swap 4, against 255 at n64: offline, Triton 3.6, sm_90), each weight still used by 128 / 256 rows
              (128, 32, 64, 4, 4, 4), (128, 32, 64, 4, 3, 4), (256, 32, 64, 8, 3, 4), (128, 64, 64, 8, 4, 5)]
# --dq-sweep (q4, 32+ rows an expert): how the interleaved tile turns codes into values (GroupedConfig.dq: 0 int->float
# conversions, 1 exponent bits or-ed in, 2 in the compute dtype) on the picked tiles and two others
# --ps-sweep: tiles timed with the next step's scales loaded during this one (GroupedConfig.ps 1) and without, at
# block_m / 2 rows an expert or more: the picks' and MANY_SWEEP's nearest rivals (session 33)
PS_SWEEP = [(64, 64, 64, 4, 4, 4), (128, 64, 64, 4, 4, 5), (128, 64, 64, 4, 3, 4), (128, 128, 64, 8, 3, 5),
            (64, 128, 64, 4, 3, 5)]  # block_m, block_n, block_k, warps, stages, swap
DQ_SWEEP = [(128, 64, 64, 4, 4, 5, 0), (128, 64, 64, 4, 4, 5, 1), (128, 64, 64, 4, 4, 5, 2),
            (64, 64, 64, 4, 4, 4, 0), (64, 64, 64, 4, 4, 4, 1), (64, 64, 64, 4, 4, 4, 2),
            (128, 64, 64, 4, 3, 4, 1), (128, 64, 64, 4, 3, 4, 2), (128, 128, 64, 8, 3, 5, 1),
            (128, 128, 64, 8, 3, 5, 2)]
# --many-sweep --with-dense: quant_matmul's interleaved tiles (swap 4; 5: the weight tile the MMA's first operand,
# taken from registers by wgmma: no shared-memory stores of it, offline under Triton 3.6). m64 n128 w4 and m128 n256
# w8 at swap 4 fail Triton 3.6's compile (PassManager::run, "Illegal shared layout": session 34 call A)
DENSE_SWAP = [(128, 128, 64, 8, 3, 4), (128, 64, 64, 4, 3, 4), (64, 64, 64, 4, 4, 4), (256, 128, 64, 8, 3, 4),
              (128, 64, 64, 4, 3, 5), (128, 64, 64, 4, 4, 5), (128, 128, 64, 8, 3, 5), (256, 64, 64, 8, 3, 5),
              (64, 128, 64, 4, 3, 5), (64, 256, 64, 8, 3, 5), (256, 128, 64, 8, 3, 5)]


def bench_prefill(shape: str, fmts: list[str], tokens: list[int], a, end: float, rows: list, skipped: list) -> dict:
    """Every format and T at one shape; returns the bf16 grouped kernel's us per T."""
    from tiered.kernels.moe_grouped import GroupedConfig, moe_grouped
    from tiered.kernels.moe_grouped import pick_config as bf16_pick
    from tiered.kernels.quant_grouped import moe_grouped_quant, pick_qconfig
    from tiered.model.moe import experts_grouped

    D, Fe, E, K = PREFILL_SHAPES[shape]
    inputs = prefill_inputs(shape, tokens, a.trace)
    slot_map = torch.arange(E, device=DEV)
    bf16_us: dict = {}
    for fmt in ["bf16"] + fmts:
        if time.perf_counter() > end:
            skipped.append(f"{shape}/{fmt}: all T (time budget)")
            continue
        pool, W = layer_pool(fmt, E, D, Fe)
        prov = _Resident(W, E)
        ebytes = stored_bytes(W, fmt)
        for T in tokens:
            x, ids, w, distinct = inputs[T]
            flops = 2 * T * K * 3 * D * Fe
            sub = slice(0, min(T, 16))
            ref = ref_tokens(x[sub], ids[sub], w[sub], W)
            pick = bf16_pick(T * K, E) if fmt == "bf16" else pick_qconfig(T * K, E, fmt)

            def grouped(cfg=None):
                if fmt == "bf16":
                    return moe_grouped(x, ids, w, W, slot_map, cfg)
                return moe_grouped_quant(x, ids, w, W, slot_map, cfg)

            variants = [("triton grouped", f"auto m{pick.block_m} n{pick.block_n} k{pick.block_k} w{pick.warps} "
                         f"s{pick.stages}" + (f" swap{pick.swap} ps{pick.ps}" if fmt != "bf16" else ""), grouped, True)]
            if a.prefill_sweep:
                variants += [("triton grouped", f"m{m} n{n} k{k} w{wp} s{st}",
                              (lambda c=GroupedConfig(m, n, k, wp, st): grouped(c)), True)
                             for m, n, k, wp, st in PREFILL_SWEEP]
            if a.many_sweep and fmt != "bf16" and T * K >= 32 * E:
                variants += [("triton grouped", f"m{m} n{n} k{k} w{wp} s{st} swap{sw}",
                              (lambda c=GroupedConfig(m, n, k, wp, st, swap=sw): grouped(c)), True)
                             for m, n, k, wp, st, sw in MANY_SWEEP]
            if a.ps_sweep and fmt != "bf16":
                flips = [dataclasses.replace(pick, ps=1 - pick.ps)] if pick.swap in (0, 1, 4, 5) else []
                flips += [GroupedConfig(m, n, k, wp, st, swap=sw, ps=ps) for m, n, k, wp, st, sw in PS_SWEEP
                          for ps in (0, 1) if T * K >= (m // 2) * E]
                variants += [("triton grouped", f"m{c.block_m} n{c.block_n} k{c.block_k} w{c.warps} s{c.stages} "
                              f"swap{c.swap} ps{c.ps}", (lambda c=c: grouped(c)), True) for c in flips]
            if a.dq_sweep and fmt == "q4" and T * K >= 32 * E:
                variants += [("triton grouped", f"m{m} n{n} k{k} w{wp} s{st} swap{sw} dq{dq}",
                              (lambda c=GroupedConfig(m, n, k, wp, st, swap=sw, dq=dq): grouped(c)), True)
                             for m, n, k, wp, st, sw, dq in DQ_SWEEP]
            if a.swap_sweep and fmt != "bf16":
                variants += [("triton grouped", f"m{m} n{n} k{k} w{wp} s{st} swap{sw}",
                              (lambda c=GroupedConfig(m, n, k, wp, st, swap=sw): grouped(c)), True)
                             for m, n, k, wp, st, sw in SWAP_SWEEP]
            if T <= 16:
                if fmt == "bf16":
                    variants.append(("triton gemv", "moe_decode over T*K pairs",
                                     lambda: moe_decode(x, ids, w, W), True))
                else:
                    variants.append(("triton gemv", "quant_moe over T*K pairs",
                                     lambda: quant_down(quant_gate_up(x, ids, W.gate, W.up), ids, w, W.down,
                                                        x.dtype), True))
            variants.append(("torch loop", "dequantize per expert" if fmt != "bf16" else "per expert",
                             lambda: experts_grouped(x, ids, w.bfloat16(), prov, 0), False))
            for variant, cfg, fn, graph in variants:
                if time.perf_counter() > end:
                    skipped.append(f"{shape}/T{T}/{fmt}/{variant} {cfg}")
                    continue
                r = {"section": "prefill", "shape": shape, "T": T, "fmt": fmt, "variant": variant, "config": cfg,
                     "distinct_experts": distinct}
                try:
                    r["rel_err"] = rel(fn()[sub].float(), ref)
                    if not r["rel_err"] <= TOL:
                        r["error"] = f"wrong result: rel err {r['rel_err']:.3g} > {TOL}: not timed"
                    else:
                        t = time_graph([fn], reps=10) if graph else time_eager(fn, reps=3)
                        r.update(us=t * 1e6, tflops=flops / t / 1e12, gbps=distinct * ebytes / t / 1e9)
                        if fmt == "bf16" and variant == "triton grouped" and cfg.startswith("auto"):
                            bf16_us[T] = r["us"]
                        if T in bf16_us:
                            r["vs_bf16"] = bf16_us[T] / r["us"]
                except Exception as e:  # report and go on
                    r["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                rows.append(r)
                print(_prefill_line(r), flush=True)
        del pool, W, prov
        torch.cuda.empty_cache()
    return bf16_us


def _prefill_line(r: dict) -> str:
    head = f"{r['shape']:<6} {r['T']:>5} {r['fmt']:<6} {r['variant']:<15}"
    if "error" in r:
        return f"{head} ERROR {r['error']}  ({r['config']})"
    vs = f"{r['vs_bf16']:7.2f}" if "vs_bf16" in r else f"{'':>7}"
    return (f"{head} {r['us']:10.1f} {r['tflops']:7.1f} {r['gbps']:7.0f} {vs} {r['rel_err']:8.1e}  {r['config']}")


class LibParts(dict):
    """A q4 matrix's parts for the kept libraries, built on first use: "tinygemm" (packed codes, group, scales and
    zeros) and "gemlite" (a layer). A library that cannot build them raises its reason at each use."""

    def __init__(self, q, k: int):
        super().__init__()
        self.q, self.k = q, k

    def __missing__(self, lib: str):
        self[lib] = ((lambda p: (p[0], self.q.group, p[1]))(tinygemm_parts(self.q, self.k, DEV))
                     if lib == "tinygemm" else gemlite_layer(self.q))
        return self[lib]


# BLOCK_N, BLOCK_K, warps of the dense copy (session 34: the kernel reads quant_grouped's weight tile, `_wtile`)
DEQUANT_SWEEP = [(16, 256, 4), (32, 256, 4), (64, 128, 4), (32, 512, 8), (64, 256, 8), (128, 128, 8), (8, 512, 4),
                 (16, 512, 4), (64, 64, 4), (32, 128, 4)]
DENSE_SWEEP = [(16, 64, 64, 4, 4), (16, 128, 64, 4, 4), (16, 32, 64, 2, 4), (32, 32, 64, 2, 4), (32, 64, 64, 4, 4),
               (32, 128, 64, 4, 4), (64, 64, 64, 4, 4), (64, 128, 64, 4, 3), (64, 128, 64, 8, 3),
               (128, 64, 64, 4, 3), (128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3),
               (256, 128, 64, 8, 3)]  # block_m, block_n, block_k, warps, stages
SPLIT_TILES = [(16, 32, 64, 2, 4), (16, 64, 64, 4, 4), (32, 64, 64, 4, 4), (64, 64, 64, 4, 4), (64, 128, 64, 4, 3),
               (128, 64, 64, 4, 3), (128, 128, 64, 8, 3)]
SPLITS = (1, 2, 4, 8)
PREFILL_DENSE = {"qkv": (5120, 2048), "o_proj": (2048, 4096), "lm_head": (151936, 2048)}  # N, K (10.6B)


def bench_dense_prefill(fmts: list[str], tokens: list[int], end: float, rows: list, skipped: list,
                        sweep: bool = False, split_sweep: bool = False, swap: bool = False,
                        libs_too: bool = True, dequant_sweep: bool = False) -> None:
    """qlinear at prefill rows over the 10.6B dense shapes: quant_matmul (tiles dequantized in registers; with
    `sweep` also DENSE_SWEEP's tiles) and dequant_matmul (a dense copy by a kernel, then cuBLAS, in slices of
    64 MB) against the reference (dequantize into bf16 by torch, then cuBLAS), cuBLAS over a bf16 weight and,
    for q4, the kept libraries on the same parts."""
    from tiered.kernels.moe_grouped import GroupedConfig
    from tiered.kernels.quant_dequant import dequant_matmul, dequantize_rows
    from tiered.kernels.quant_grouped import quant_matmul
    from tiered.kernels.quant_moe import qlinear
    from tiered.layout.quant import linear as linear_ref

    gen = torch.Generator(device=DEV).manual_seed(11)
    for name, (n, k) in PREFILL_DENSE.items():
        w = (torch.randn(n, k, device=DEV, generator=gen) * k ** -0.5).bfloat16()
        qs = {f: quantize(w, f) for f in fmts}
        libs = LibParts(qs["q4"], k) if "q4" in qs else None
        for T in tokens:
            x = torch.randn(T, k, device=DEV, generator=gen).bfloat16()
            flops = 2 * T * n * k
            t_bf16 = None
            variants = [("bf16", "cuBLAS F.linear", lambda: F.linear(x, w), n * k * 2, x.float() @ w.float().T)]
            for f, q in qs.items():
                ref = x.float() @ q.dequantize(torch.float32).T
                variants += [(f, "qlinear (model)", lambda q=q: qlinear(x, q), q.nbytes, ref),
                             (f, "quant_matmul", lambda q=q: quant_matmul(x, q), q.nbytes, ref),
                             (f, "dequantize + cuBLAS", lambda q=q: linear_ref(x, q), q.nbytes, ref),
                             (f, "dequant kernel + cuBLAS", lambda q=q: dequant_matmul(x, q), q.nbytes, ref)]
                for b in (DEQUANT_SWEEP if (sweep or dequant_sweep) and T == tokens[0] else ()):  # the copy alone
                    variants.append((f, "dense copy bn{} bk{} w{}".format(*b),
                                     lambda q=q, b=b: dequantize_rows(q, 0, n, torch.bfloat16, block=b),
                                     q.nbytes + n * k * 2, None))
                for c in (DENSE_SWEEP if sweep else ()):  # --dense-sweep: quant_matmul's tiles at this shape
                    variants.append((f, "quant_matmul m{} n{} k{} w{} s{}".format(*c),
                                     lambda q=q, c=c: quant_matmul(x, q, GroupedConfig(*c)), q.nbytes, ref))
                for c in (DENSE_SWAP if swap and T >= 128 else ()):  # --many-sweep: the interleaved weight tile
                    variants.append((f, "quant_matmul m{} n{} k{} w{} s{} swap{}".format(*c),
                                     lambda q=q, c=c: quant_matmul(x, q, GroupedConfig(*c[:5], swap=c[5])),
                                     q.nbytes, ref))
                tall = max(16, 1 << (T - 1).bit_length())
                for c in (SPLIT_TILES if split_sweep and T <= 256 and name != "lm_head" else ()):
                    for sp in (SPLITS if c[0] <= tall else ()):  # --split-sweep: split-K at few rows
                        variants.append((f, "quant_matmul m{} n{} k{} w{} s{} split{}".format(*c, sp),
                                         lambda q=q, c=c, sp=sp: quant_matmul(x, q, GroupedConfig(*c, split=sp)),
                                         q.nbytes, ref))
                if f == "q4" and libs_too:  # the kept libraries on the same q4 parts (absent ones: the reason)
                    variants += [(f, "torch tinygemm", lambda L=libs: tinygemm_matvec(x, *L["tinygemm"]),
                                  q.nbytes, ref),
                                 (f, "gemlite A16W4", lambda L=libs: L["gemlite"](x), q.nbytes, ref)]
            for fmt, variant, fn, nbytes, ref in variants:
                if time.perf_counter() > end:
                    skipped.append(f"dense/{name}/T{T}/{fmt}/{variant}")
                    continue
                r = {"section": "prefill", "shape": name, "T": T, "fmt": fmt, "variant": variant, "config": f"{n}x{k}"}
                try:
                    if ref is None:  # a dense copy: against the reference dequantization
                        ref = qs[fmt].dequantize(torch.bfloat16).float()
                    r["rel_err"] = rel(fn().float(), ref)
                    if not r["rel_err"] <= TOL:
                        r["error"] = f"wrong result: rel err {r['rel_err']:.3g} > {TOL}: not timed"
                    else:
                        t = time_graph([fn], reps=10)
                        r.update(us=t * 1e6, tflops=flops / t / 1e12, gbps=nbytes / t / 1e9)
                        t_bf16 = t_bf16 or (r["us"] if fmt == "bf16" else None)
                        if t_bf16:
                            r["vs_bf16"] = t_bf16 / r["us"]
                except Exception as e:
                    r["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                rows.append(r)
                print(_prefill_line(r), flush=True)
        del w, qs, libs
        torch.cuda.empty_cache()


def main_prefill(a) -> None:
    t0 = time.perf_counter()
    end = t0 + (a.max_seconds or 100.0)
    torch.manual_seed(0)
    fmts = [f for f in a.prefill_formats.split(",") if f]
    tokens = [int(t) for t in a.tokens.split(",")]
    rows: list = []
    skipped: list = []
    print(f"{'shape':<6} {'T':>5} {'fmt':<6} {'variant':<15} {'us':>10} {'TFLOP/s':>7} {'GB/s':>7} {'vs bf16':>7} "
          f"{'err':>8}  config", flush=True)
    bf16_us = {}
    a.trace = None
    if a.routing == "replay":
        odd = [sh for sh in a.shapes.split(",") if sh != "none" and PREFILL_SHAPES[sh][2] % 64]
        if odd:
            raise SystemExit(f"--routing replay maps the reference's 64 experts onto a multiple of them: "
                             f"{', '.join(odd)} has {PREFILL_SHAPES[odd[0]][2]} (drop it from --shapes)")
        a.trace = reference_trace(Path(a.text), DEV)
    for shape in a.shapes.split(","):
        if shape != "none":  # --shapes none --with-dense: the dense matrices alone
            bf16_us[shape] = bench_prefill(shape, fmts, tokens, a, end, rows, skipped)
    if a.with_dense:
        bench_dense_prefill([f for f in fmts if f in ("q4", "q8")], tokens, end, rows, skipped, a.dense_sweep,
                            a.split_sweep, a.many_sweep, libs_too=not a.no_gemlite, dequant_sweep=a.dequant_sweep)
    if not a.no_gemlite and "q4" in fmts and "10.6B" in bf16_us:  # last: 3 E GemLite layers, the 10.6B shape
        bench_gemlite("10.6B", tokens, end, rows, skipped, bf16_us["10.6B"])
    summary = {f"{r['shape']}/T{r['T']}/{r['fmt']}/{r['variant']}": {k: r.get(k) for k in ("us", "tflops", "gbps",
                                                                                           "vs_bf16")}
               for r in rows if "us" in r and (r["variant"] != "triton grouped" or r["config"].startswith("auto"))}
    failed = [f"{r['shape']}/T{r['T']}/{r['fmt']}/{r['variant']} {r['config']}: {r['error']}" for r in rows
              if "error" in r and not r["variant"].startswith(("gemlite", "torch tinygemm"))]
    if skipped:
        print(f"skipped (time budget --max-seconds): {len(skipped)} rows", flush=True)
    res = {"bench": "quant_prefill", "commit": git_commit(), "device": torch.cuda.get_device_name(),
           "torch": torch.__version__, "triton": __import__("triton").__version__,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "shapes": PREFILL_SHAPES, "summary": summary,
           "failed": failed, "skipped": skipped, "rows": rows, "seconds": time.perf_counter() - t0,
           "routing": a.routing if a.routing == "uniform" else f"replay of {a.text} (map_routing, layer 0)"}
    print(write_out(res, "quant_prefill.json"))


if __name__ == "__main__":
    main()
