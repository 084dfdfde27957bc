"""How long `tiered repack` takes to quantize, on the CPU and on the GPU (--quant-device).

    python3 benchmarks/bench_repack_gpu.py --out /tmp/r.json                  # one layer's role + the lm_head
    python3 benchmarks/bench_repack_gpu.py --ckpt /root/peers/ckpt --out r.json  # also a whole repack on the GPU

Parts, each on both devices (random bf16 weights of the 10.6B shape; q4 with the lsq refinement, repack's
default, unless --fmt / --refine say otherwise):
  - one role of one layer's experts ([128, 768, 2048], gate): `repack.quantize_stack`, the path a repack takes
    per role and layer (a few experts at a time, 256 MiB of fp32 input a call);
  - the lm_head [151936, 2048] in the pieces repack's dense path quantizes (`repack.quantize_stack` over row
    slices of at most 256 MiB of fp32).
For each: seconds on each device, the speedup, and the share of stored bytes that differ between the two
devices (lsq's search compares fp32 error sums, which may round differently). With --ckpt, a whole
`repack(..., experts=FMT, dense=FMT, quant_device="cuda")` of that checkpoint is timed end to end (and, with
--cpu-whole, also on the CPU). Writes one JSON object (--out) and prints it.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tiered.layout.repack import QUANT_STACK_BYTES, quantize_stack, repack  # noqa: E402


def timed(fn, device: str) -> tuple[float, dict]:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def differ(a: dict, b: dict) -> float:
    """Share of stored bytes that differ between two part dicts."""
    n = d = 0
    for name in a:
        x, y = a[name].contiguous().view(torch.uint8), b[name].contiguous().view(torch.uint8)
        n += x.numel()
        d += int((x != y).sum())
    return d / max(1, n)


def part(name: str, rows: list, fmt: str, refine: str | None) -> dict:
    r = {"part": name, "shape": [len(rows), *rows[0].shape], "fmt": fmt, "refine": refine}
    outs = {}
    for dev in ("cuda", "cpu"):
        quantize_stack(rows[:1], fmt, refine=refine, device=dev)  # warm-up (kernels, allocator)
        r[f"{dev}_s"], outs[dev] = timed(lambda: quantize_stack(rows, fmt, refine=refine, device=dev), dev)
        print(f"{name}: {dev} {r[f'{dev}_s']:.2f} s", flush=True)
    r["speedup"] = r["cpu_s"] / r["cuda_s"]
    r["bytes_differ"] = differ(outs["cpu"], outs["cuda"])
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fmt", default="q4")
    ap.add_argument("--refine", default="lsq", help="q4's refinement: lsq or none")
    ap.add_argument("--ckpt", help="also time a whole repack of this checkpoint on the GPU")
    ap.add_argument("--cpu-whole", action="store_true", help="with --ckpt: also the whole repack on the CPU")
    ap.add_argument("--skip-parts", action="store_true", help="with --ckpt: only the whole repack")
    ap.add_argument("--work", default="/tmp/bench_repack")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_repack_gpu.py needs a CUDA device (it compares the GPU with the CPU)")
    refine = None if a.refine == "none" else a.refine
    g = torch.Generator().manual_seed(0)
    res = {"bench": "repack_quant_device", "date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(),
           "cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "parts": [],
           "commit": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True).stdout.strip()}
    if not (a.skip_parts and a.ckpt):
        role = [(torch.randn(768, 2048, generator=g) * 0.02).bfloat16() for _ in range(128)]
        res["parts"].append(part("expert role (gate, 128 x 768 x 2048)", role, a.fmt, refine))
        del role
        head = (torch.randn(151936, 2048, generator=g) * 0.02).bfloat16()
        rows = QUANT_STACK_BYTES // (4 * 2048)  # whole slices only (the last, shorter one left out)
        res["parts"].append(part("lm_head 151936 x 2048 (4 slices of 32768 rows)",
                                 [head[i:i + rows] for i in range(0, head.shape[0] - rows + 1, rows)], a.fmt, refine))
        del head
    if a.ckpt:
        for dev in ("cuda", "cpu") if a.cpu_whole else ("cuda",):
            dst = Path(a.work) / f"layout-{dev}"
            shutil.rmtree(dst, ignore_errors=True)
            t0 = time.perf_counter()
            repack(a.ckpt, dst, experts=a.fmt, dense=a.fmt, force=True, progress=False, quant_device=dev,
                   q4_refine=a.refine)
            res[f"whole_repack_{dev}_s"] = time.perf_counter() - t0
            res["whole_repack_bytes"] = sum(p.stat().st_size for p in dst.iterdir())
            print(f"whole repack on {dev}: {res[f'whole_repack_{dev}_s']:.1f} s", flush=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
