"""Engines loaded one after another in one process: does decode with CPU experts slow down as the process ages?

Session 12 saw CPU-expert runs late in one bench_cpu_experts_gpu.py process compute 2-3x slower (15-20 GB/s against
44-55 fresh). One suspect: each run's RAM tier (every expert pinned: 9.4 GB at the 8-layer 10.6B shape) stayed
resident after its cache closed, until the garbage collector freed the mapping, so that runs piled gigabytes up.
The host buffer's release now returns the pages at once (store/hostmem.py). This runs the same decode --runs times
in one process (bf16, --vram-gb 4, replayed routing of the first eval document, lru with CPU experts in the device
step, as bench_cpu_experts_gpu.py's lru+cpu/device; then one lru/device without CPU experts) and prints per run
tok/s, the CPU experts' rate, the process's RSS and the machine's MemAvailable.

Session 13 call G (H200, 3 + 1 runs, 64 new tokens): with the release returning the pages, RSS 1.8 GiB after every
run; without it, 10.7 GiB (one closed run's tier waits for the collector; it did not pile up); tok/s held either way,
so this did not reproduce session 12's slowdown.

    python3 benchmarks/bench_reload.py --layout /root/peers/layout --text ../shared/text --runs 4

Prints a line per run and one JSON object last; writes $OUT/reload.json when OUT is set.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from bench_cpu_experts_gpu import mapped, one_run  # noqa: E402
from bench_offload_gpu import GiB, prompt_ids  # noqa: E402
from bench_predict_gpu import reference_trace  # noqa: E402
from benchmeta import git_commit  # noqa: E402

from tiered.predict.predictors import NoPrediction  # noqa: E402
from tiered.store.disk import Layout  # noqa: E402


def memory() -> dict:
    out = {}
    for path, key, name in (("/proc/self/status", "VmRSS", "rss_gib"), ("/proc/meminfo", "MemAvailable", "avail_gib")):
        try:
            out[name] = next(int(ln.split()[1]) for ln in open(path) if ln.startswith(key + ":")) / 2**20
        except (OSError, StopIteration):
            out[name] = None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layout", type=Path, required=True)
    ap.add_argument("--text", type=Path, required=True, help="folder with eval/ (the replayed routing)")
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--vram-gb", type=float, default=4.0)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=96)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_reload.py needs CUDA (the device slot table)")
    device = torch.device("cuda")
    lay = Layout.open(a.layout)
    cfg, bs = lay.config, lay.block_size
    n_all = cfg.num_layers * cfg.num_experts
    ev = mapped(reference_trace(a.text / "eval", device), cfg)
    n_tok = a.prompt_tokens + a.new_tokens
    doc = ev.doc(0, n_tok + 16)
    prompt = prompt_ids(cfg.vocab_size, a.prompt_tokens)
    base = {"vram_gb": a.vram_gb, "ram_gb": bs * n_all / GiB * 1.02 + 0.01, "io": "mmap", "ram_preload": True,
            "policy": "lru", "slot_table": "device"}
    res = {"bench": "reload", "commit": git_commit(), "date": time.strftime("%Y-%m-%d"),
           "device": torch.cuda.get_device_name(), "runs": [], "start": memory()}
    plan = [("lru+cpu/device", "auto")] * a.runs + [("lru/device", "off")]
    for i, (label, cpu) in enumerate(plan):
        t0 = time.perf_counter()
        s = one_run(a.layout, device, prompt, a.new_tokens, doc, budget={**base, "cpu_experts": cpu},
                    predictor=NoPrediction(cfg.num_layers, cfg.num_experts), warmup=8)
        ce = s.get("cpu_experts") or {}
        r = {"run": i, "label": label, "decode_tok_s": s.get("decode_tok_s"), "decode_graphs": s.get("decode_graphs"),
             "cpu_count": ce.get("count"), "cpu_gbps": ce.get("gbps"),
             "take": ((s.get("device_step") or {}).get("cpu") or {}).get("take"), "wall_s": time.perf_counter() - t0,
             **memory()}
        res["runs"].append(r)
        print(json.dumps(r), flush=True)
    print(json.dumps(res))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "reload.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
