"""Sampling a step's rows on the GPU: the kernels (kernels/nucleus.py) against a sort of the vocabulary.

    python3 benchmarks/bench_sampling.py                     # H200: about 20 s, compiles included
    python3 benchmarks/bench_sampling.py --rows 1,32 --vocab 151936
    python3 benchmarks/bench_sampling.py --small             # CPU smoke run (Triton's interpreter); times mean nothing

What it times, per number of rows R (bf16 logits [R, V], N(0, s) with s = --scale, the spread of the 10.6B
benchmark model's logits, so the nucleus of top_p 0.95 holds a large share of the vocabulary, the hard case):
  - "kernels": decode/sampling.py sample_rows (the default on CUDA): three launches for every row;
  - "sort": the previous way (session 28's sample_rows: fp32 copy, a sort of each row, softmax, cumsum, scatter
    back, V uniforms a row from its own generator, argmax of x + Gumbel);
  - "torch": sample_rows(kernel=False), the CPU path run on the GPU (a sort a row, one generator a row).
for temperature 0.8 with top_p 0.95, and with top_k 40 too. The time of a call is from the host's first launch to
the stream's end (torch.cuda.synchronize), the median of --iters calls: what a decode step waits.
Before timing, the kernels' picks of every row are checked against the reference rule applied to the kernels' own
noise (tests/test_sampling.py's check); a mismatch stops the benchmark.
Prints a row per (variant, R), then one JSON line last; writes $OUT/sampling.json when OUT is set.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def sort_way(logits, temps, top_ps, gens):
    """Session 28's sample_rows for rows that all sample with top_p < 1 (the path it took): kept for this timing."""
    import torch

    R, V = logits.shape
    dev = logits.device
    pin = dev.type == "cuda"
    temp = torch.tensor(temps, dtype=torch.float32, pin_memory=pin).to(dev, non_blocking=True)
    x = logits.float() / temp[:, None]
    sx, order = torch.sort(x, dim=-1, descending=True)
    probs = torch.softmax(sx, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs
    tp = torch.tensor(top_ps, dtype=torch.float32, pin_memory=pin).to(dev, non_blocking=True)
    sx = sx.masked_fill(before >= tp[:, None], float("-inf"))
    x = torch.full_like(x, float("-inf")).scatter(1, order, sx)
    u = torch.stack([torch.rand(V, generator=g, device=dev) for g in gens])
    gumbel = -torch.log(-torch.log(u.clamp_(min=torch.finfo(torch.float32).tiny)))
    return torch.argmax(x + gumbel, dim=-1)


def timed(fn, iters: int, sync) -> tuple[float, float]:
    """(median seconds from the first launch to the stream's end, median seconds the host spent launching)."""
    fn()
    sync()
    ts, hs = [], []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        hs.append(time.perf_counter() - t)
        sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), statistics.median(hs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="1,8,32,128")
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--scale", type=float, default=2.0, help="std of the random logits")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--small", action="store_true", help="CPU smoke run under Triton's interpreter")
    a = ap.parse_args()
    if a.small:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        a.rows, a.vocab, a.iters = "1,3", 300, 2
    import torch

    from tiered.decode.sampling import RowNoise, Sampling, sample_rows
    from tests.test_sampling import _reference_picks

    dev = torch.device("cpu" if a.small else "cuda")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rows = [int(r) for r in a.rows.split(",")]
    out: dict = {"vocab": a.vocab, "scale": a.scale, "iters": a.iters, "device": torch.cuda.get_device_name(dev)
                 if dev.type == "cuda" else "cpu", "runs": []}
    g = torch.Generator().manual_seed(0)
    for R in rows:
        logits = (torch.randn(R, a.vocab, generator=g) * a.scale).to(dev, torch.bfloat16)
        for name, p in (("top_p", Sampling(0.8, top_p=0.95)), ("top_k+top_p", Sampling(0.8, top_k=40, top_p=0.95))):
            params = [p] * R
            keys0 = [RowNoise(i) for i in range(R)]
            got = sample_rows(logits, params, keys0, kernel=True)
            want = _reference_picks(logits, params, [RowNoise(i).take() for i in range(R)])
            if got.tolist() != want:
                print(f"FAILED: the kernels' picks differ from the reference at R={R} {name}", file=sys.stderr)
                return 1
            noises = [RowNoise(i) for i in range(R)]
            t_k, h_k = timed(lambda: sample_rows(logits, params, noises, kernel=True), a.iters, sync)
            t_t, h_t = timed(lambda: sample_rows(logits, params, noises, kernel=False), max(2, a.iters // 5), sync)
            row = {"rows": R, "params": name, "kernels_us": t_k * 1e6, "kernels_host_us": h_k * 1e6,
                   "torch_us": t_t * 1e6, "torch_host_us": h_t * 1e6}
            if name == "top_p":
                gens = [torch.Generator(device=dev).manual_seed(i) for i in range(R)]
                t_s, h_s = timed(lambda: sort_way(logits, [0.8] * R, [0.95] * R, gens), a.iters, sync)
                row["sort_us"], row["sort_host_us"] = t_s * 1e6, h_s * 1e6
            out["runs"].append(row)
            print(f"R={R:4d} {name:12s} kernels {t_k * 1e6:9.1f} us (host {h_k * 1e6:7.1f})  torch {t_t * 1e6:9.1f} us"
                  + (f"  sort {t_s * 1e6:9.1f} us (host {h_s * 1e6:7.1f})" if name == "top_p" else ""), flush=True)
    line = json.dumps(out)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "sampling.json").write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
