"""What `--verify first-use` costs with every expert resident: load time with and without the block checksums.

Resident experts are hashed (xxh3_64, on up to 8 threads) while they are copied to the GPU at load, and on first
touch on CPU. This script times, on one layout:
  1. hashing every expert block from the mmap: a first pass (page cache as found) and a warm pass;
  2. `ResidentExperts.from_layout` with --verify none and first-use, alternated (--repeats each; median),
     after one untimed pass that warms the page cache: on CUDA that is the copy of every block to the device,
     on CPU the mmap alone (hashing there happens on first touch, so step 3 measures it);
  3. on CPU only: a prefill of --prompt-tokens random ids on a fresh engine, with and without the check, and
     the time spent inside the checks (stats verify_s).

    python3 tools/bench_resident_verify.py --layout /root/bench/qwen3-10b-layout --device cuda   # GPU box, ~2 min
    python3 tools/bench_resident_verify.py --device cpu                     # the embedded reference model, ~30 s

The 10.6B Qwen3-MoE layout is the one bench_offload_gpu.py makes (tools/make_random_checkpoint.py, qwen3-10b).
Prints a table, then one JSON line last; writes $OUT/bench_resident_verify.json when OUT is set.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
from benchmeta import git_commit, write_out  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layout", type=Path, default=None, help="layout directory (default: the embedded model)")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto")
    ap.add_argument("--repeats", type=int, default=2, help="timed loads per setting")
    ap.add_argument("--threads", type=int, default=None, help="hash threads (default: min(8, CPUs))")
    ap.add_argument("--prompt-tokens", type=int, default=256, help="CPU prefill length (step 3)")
    a = ap.parse_args()

    from tiered.engine import load, resolve_device, resolve_layout
    from tiered.store.resident import ResidentExperts
    from tiered.store.blockcheck import BlockChecker
    from tiered.store.disk import Layout

    dev = resolve_device(a.device)
    lay = Layout.open(resolve_layout(a.layout))
    cfg = lay.config
    blocks = cfg.num_layers * cfg.num_experts
    nbytes = blocks * lay.block_size
    rows = range(blocks)

    def hash_all() -> float:
        c = BlockChecker(lay, threads=a.threads)
        t = time.perf_counter()
        c.check(rows)
        return time.perf_counter() - t

    cold_s = hash_all()
    warm_s = hash_all()
    threads = BlockChecker(lay, threads=a.threads).threads

    def load_s(verify: str) -> float:
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.synchronize(dev)
        t = time.perf_counter()
        p = ResidentExperts.from_layout(lay, device=dev, verify=verify)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        dt = time.perf_counter() - t
        del p
        return dt

    load_s("none")  # untimed: page cache and allocator warm
    times: dict[str, list[float]] = {"none": [], "first-use": []}
    for _ in range(a.repeats):
        for v in ("none", "first-use"):
            times[v].append(load_s(v))
    med = {v: statistics.median(t) for v, t in times.items()}

    res = {"bench": "resident_verify", "commit": git_commit(), "layout": str(lay.path), "device": str(dev),
           "family": cfg.family, "layers": cfg.num_layers, "experts": cfg.num_experts, "block_size": lay.block_size,
           "expert_bytes": nbytes, "hash_threads": threads,
           "hash_first_pass_s": cold_s, "hash_warm_s": warm_s, "hash_warm_gbps": nbytes / warm_s / 1e9,
           "load_none_s": med["none"], "load_first_use_s": med["first-use"],
           "load_extra_s": med["first-use"] - med["none"], "load_times": times}

    rows_out = [("expert bytes", f"{nbytes / 1e9:.2f} GB in {blocks} blocks of {lay.block_size:,} B"),
                ("hash, first pass", f"{cold_s:.2f} s ({nbytes / cold_s / 1e9:.1f} GB/s, {threads} threads)"),
                ("hash, warm", f"{warm_s:.2f} s ({nbytes / warm_s / 1e9:.1f} GB/s)"),
                (f"load on {dev.type}, --verify none", f"{med['none']:.2f} s"),
                (f"load on {dev.type}, --verify first-use", f"{med['first-use']:.2f} s"),
                ("extra for the check at load", f"{med['first-use'] - med['none']:+.2f} s")]
    if dev.type == "cpu":
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, cfg.vocab_size, (a.prompt_tokens,), generator=g).tolist()
        pre = {}
        for v in ("none", "first-use", "none", "first-use"):
            e = load(lay.path, device="cpu", budget={"verify": v}, cuda_graphs=False)
            e.generate(ids, max_new_tokens=1)
            pre.setdefault(v, []).append(e.stats["prefill_s"])
            if v == "first-use":
                res["verified_blocks"] = e.stats["verified_blocks"]
                res["prefill_hash_s"] = e.stats["verify_s"]  # time inside the checks (prefill times are noisier)
        res["prefill_none_s"] = min(pre["none"])
        res["prefill_first_use_s"] = min(pre["first-use"])
        rows_out += [(f"prefill {a.prompt_tokens} tokens, fresh engine, none", f"{res['prefill_none_s']:.3f} s"),
                     (f"prefill {a.prompt_tokens} tokens, fresh engine, first-use",
                      f"{res['prefill_first_use_s']:.3f} s ({res['verified_blocks']} blocks hashed on first touch)"),
                     ("  of which hashing", f"{res['prefill_hash_s']:.3f} s")]
    w = max(len(k) for k, _ in rows_out)
    for k, v in rows_out:
        print(f"{k:<{w}}  {v}")
    print(write_out(res, "bench_resident_verify.json"))


if __name__ == "__main__":
    main()
