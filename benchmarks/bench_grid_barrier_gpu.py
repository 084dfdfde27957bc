"""What a dependent kernel boundary costs: a kernel per phase (with and without PDL) against grid barriers inside one
persistent kernel, over a chain of small GEMVs (GPU).

    python3 benchmarks/bench_grid_barrier_gpu.py                 # dims 256, 1024, 2048; 64 phases: under a minute
    python3 benchmarks/bench_grid_barrier_gpu.py --dims 2048 --phases 32

Why (issue 13): the q4 decode step of the 8-layer 10.6B shape is a chain of about ten dependent kernels a layer
(add+norm, qkv, q/k rope, attention split, combine, o_proj, router, top-k, gate_up, down). On the H100 they take 42
us a layer, of which the bytes at HBM rate are about 11 (notes/Q4_DECODE.md, session 43). The rest is the chain's
latency: the previous kernel's tail, its completion reaching the next kernel's wait, then the next kernel's loads
of what the previous one wrote. A persistent per-layer kernel would replace each boundary with a grid barrier (an
atomic count and a spin) and could load the next phase's weights while it waits. Before building one, this
measures the boundary alone, on a chain whose every phase depends on all of the previous phase's outputs:

    x_{i+1} = W_i x_i   (W_i [D, D] bf16, distinct for every phase: 64 x 8 MB at D 2,048 is past L2; x fp32)

Variants, each as one CUDA graph replayed many times:
- `kernels`: a launch per phase, BR rows a program (D / BR = 128 programs); PDL on where the device has it, each
  program loading its weight rows before the wait (as quant_moe's dense GEMVs do);
- `kernels_nopdl`: the same launches in plain stream order (loads after the start, no overlap);
- `persist`: one launch of 128 programs (at most one a SM, all resident), looping over the phases; after its
  stores a program counts itself on phase i's counter (release) and, before phase i + 1, spins until the count
  reaches 128 (acquire), then reads x_{i+1} from L2 (.cg); the counters are zeroed in the graph before the launch;
- `persist_pre`: the same with the next phase's weight rows loaded before the spin.
Every variant runs the same tile (BR rows x D columns, the same warps), so x_N is bit for bit the same; it is also
checked against a float64 chain. A spin that runs past its cap (a program that never arrived) flags the run and
fails it: never a timing of a wrong chain.

Prints a row per dims and one JSON line; writes $OUT/grid_barrier.json when OUT is set. The persistent kernel
cannot run under Triton's interpreter (its programs run one after another, so the first spin would wait forever):
this file is GPU-only.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_moe_kernels import time_graph  # noqa: E402
from benchmeta import git_commit, write_out  # noqa: E402
from tiered.kernels.pdl import launch_args  # noqa: E402

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the CPU wheel without triton
    triton = tl = None

PROGRAMS = 128  # programs a phase: D / BR
SPIN_MAX = 4_000_000  # spins before a program gives up and flags the run (a missing program: a bug, not a wait)


def _phase_fn(X, W, C: tl.constexpr, BR: tl.constexpr, GDC: tl.constexpr = False):
    """One phase as its own launch: rows pid*BR.. of x_out = W x_in; X points at x_in, x_out follows it."""
    pid = tl.program_id(0)
    rows = pid * BR + tl.arange(0, BR)
    cols = tl.arange(0, C)
    w = tl.load(W + rows[:, None] * C + cols[None, :])  # the weights: before the wait
    if GDC:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    x = tl.load(X + cols)
    tl.store(X + C + rows, tl.sum(w.to(tl.float32) * x[None, :], axis=1))


def _persist_fn(X, W, CNT, ERR, N, C: tl.constexpr, BR: tl.constexpr, PRE: tl.constexpr, SPIN: tl.constexpr):
    """Every phase in one launch of C / BR programs, a grid barrier between phases (CNT [N] int32 at 0)."""
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    rows = pid * BR + tl.arange(0, BR)
    cols = tl.arange(0, C)
    wp = W + rows[:, None] * C + cols[None, :]
    for i in range(N):
        if PRE:
            w = tl.load(wp + i * C * C)
        if i > 0:  # phase i - 1 complete: all G programs counted (acquire: their stores are visible)
            c = tl.atomic_add(CNT + i - 1, 0, sem="acquire", scope="gpu")
            n = pid * 0
            while (c < G) & (n < SPIN):
                c = tl.atomic_add(CNT + i - 1, 0, sem="acquire", scope="gpu")
                n += 1
            if n >= SPIN:
                tl.atomic_max(ERR, 1)
        if not PRE:
            w = tl.load(wp + i * C * C)
        x = tl.load(X + i * C + cols, cache_modifier=".cg")  # written by other SMs in this launch: from L2
        tl.store(X + (i + 1) * C + rows, tl.sum(w.to(tl.float32) * x[None, :], axis=1))
        tl.debug_barrier()  # every thread's stores done before the program counts itself
        tl.atomic_add(CNT + i, 1, sem="release", scope="gpu")


_PHASE = _PERSIST = None
if triton is not None:
    _PHASE = triton.jit(_phase_fn)
    _PERSIST = triton.jit(_persist_fn)


def _warps(br: int, d: int) -> int:
    return 4 if br * d <= 8192 else 8


def chain(d: int, phases: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights [N, D, D] bf16 (scaled so that x keeps its size) and the buffer X [N + 1, D] fp32 with x_0."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    w = (torch.randn(phases, d, d, generator=g) / d ** 0.5).to(torch.bfloat16).to(device)
    x = torch.zeros(phases + 1, d, dtype=torch.float32, device=device)
    x[0] = torch.randn(d, generator=g).to(device)
    return w, x


def reference(w: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    x = x0.double()
    for i in range(w.shape[0]):
        x = w[i].double() @ x
    return x


def build(variant: str, w: torch.Tensor, x: torch.Tensor, cnt: torch.Tensor, err: torch.Tensor):
    """The variant's work as a function (captured into a graph by the caller)."""
    n, d, _ = w.shape
    br = d // PROGRAMS
    warps = _warps(br, d)
    if variant.startswith("kernels"):
        extra = launch_args(x.device) if variant == "kernels" else {}

        def run():
            for i in range(n):
                _PHASE[(PROGRAMS,)](x[i], w[i], C=d, BR=br, num_warps=warps, **extra)
        return run

    pre = variant == "persist_pre"

    def run():
        cnt.zero_()
        _PERSIST[(PROGRAMS,)](x, w, cnt, err, n, C=d, BR=br, PRE=pre, SPIN=SPIN_MAX, num_warps=warps)
    return run


def time_variant(variant: str, w: torch.Tensor, x: torch.Tensor, reps: int) -> dict:
    n, d, _ = w.shape
    cnt = torch.zeros(n, dtype=torch.int32, device=w.device)
    err = torch.zeros(1, dtype=torch.int32, device=w.device)
    run = build(variant, w, x, cnt, err)
    x[1:].zero_()
    run()  # compile, and a first correctness run
    torch.cuda.synchronize()
    first = x[n].clone()
    us = time_graph([run], reps=reps) * 1e6  # (warmed on a side stream, captured, replayed)
    return {"variant": variant, "us": us, "us_per_phase": us / n, "spin_cap_hit": bool(err.item()),
            "x_n": x[n].clone(), "first_equal": bool(torch.equal(first, x[n]))}


def run_dims(d: int, phases: int, reps: int, device: torch.device) -> dict:
    if d % PROGRAMS:
        raise SystemExit(f"--dims {d}: must be a multiple of {PROGRAMS}")
    w, x = chain(d, phases, device)
    ref = reference(w, x[0])
    rows = [time_variant(v, w, x, reps) for v in ("kernels", "kernels_nopdl", "persist", "persist_pre", "kernels")]
    base = rows[0]["x_n"]
    out = {"dims": d, "phases": phases, "programs": PROGRAMS, "rows_per_program": d // PROGRAMS,
           "weight_bytes_per_phase": d * d * 2, "reps": reps}
    rel = float(((base.double() - ref).norm() / ref.norm()).item())
    out["rel_err_vs_float64"] = rel
    ok = rel < 1e-3
    for r in rows:
        r["bit_equal_to_kernels"] = bool(torch.equal(r.pop("x_n"), base))
        ok = ok and r["bit_equal_to_kernels"] and r["first_equal"] and not r["spin_cap_hit"]
    out["correct"] = ok
    out["rows"] = rows
    k = min(rows[0]["us_per_phase"], rows[4]["us_per_phase"])  # the PDL chain, timed first and last
    out["kernels_us_per_phase"] = k
    for r in rows[1:4]:
        out[f"{r['variant']}_us_per_phase"] = r["us_per_phase"]
    out["persist_pre_vs_kernels"] = k / rows[3]["us_per_phase"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", default="256,1024,2048", help="D of the chain's square matrices (multiples of 128)")
    ap.add_argument("--phases", type=int, default=64, help="phases (distinct weight matrices) in the chain")
    ap.add_argument("--reps", type=int, default=50, help="graph replays timed")
    args = ap.parse_args()
    if not torch.cuda.is_available() or triton is None:
        sys.exit("bench_grid_barrier_gpu.py times CUDA kernels: run it on the GPU box")
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    if sms < PROGRAMS:
        sys.exit(f"the persistent kernel needs {PROGRAMS} programs resident at once; this GPU has {sms} SMs")
    t0 = time.time()
    results = []
    for d in (int(s) for s in args.dims.split(",")):
        r = run_dims(d, args.phases, args.reps, dev)
        results.append(r)
        print(f"D {d:5d} ({r['weight_bytes_per_phase'] / 1e6:.2f} MB a phase): kernels+PDL "
              f"{r['kernels_us_per_phase']:.2f} us a phase, no PDL {r['kernels_nopdl_us_per_phase']:.2f}, persistent "
              f"{r['persist_us_per_phase']:.2f}, persistent + weights before the spin "
              f"{r['persist_pre_us_per_phase']:.2f} ({r['persist_pre_vs_kernels']:.2f}x); correct {r['correct']} "
              f"(rel err {r['rel_err_vs_float64']:.1e})")
    res = {"device": torch.cuda.get_device_name(), "sms": sms, "date": time.strftime("%Y-%m-%d"),
           "commit": git_commit(), "seconds": round(time.time() - t0, 1), "results": results,
           "correct": all(r["correct"] for r in results)}
    print(write_out(res, "grid_barrier.json"))
    if not res["correct"]:
        sys.exit("a variant's chain differs (see rows): its timings do not count")


if __name__ == "__main__":
    main()
