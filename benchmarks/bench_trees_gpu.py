"""The same decode measured at several source trees in one lease (a restructure must not change speed).

Each tree is a copy of the package at some commit (e.g. `git archive <sha>` unpacked without the embedded
model). For each tree, in a fresh subprocess that imports tiered from that tree only, on one layout:
  - all experts in VRAM: 64-token prompt of random ids, 256 new tokens, greedy; the second of two calls is timed;
  - `--vram-gb X` (expert cache, piecewise graphs): 128 new tokens, second call timed.
Trees run interleaved (A B A B ...), so drift of the box shows up in both. Greedy tokens must be identical
across the trees named by --expect-identical (exit 1 otherwise); speeds are reported with their ratio to the first tree.

    python3 benchmarks/bench_trees_gpu.py --layout /root/peers/layout-old --tree old=.carry/old \\
        --tree house=.carry/house --tree main=. --repeats 2

Prints a table, then one JSON line last; writes $OUT/trees-gpu.json when OUT is set.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
from benchmeta import git_commit, write_out  # noqa: E402

CHILD = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
import tiered
layout, vram_gb, seed = sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
g = torch.Generator().manual_seed(seed)
prompt = torch.randint(0, 8192, (64,), generator=g).tolist()
out = {"tiered_file": tiered.__file__}
for name, budget, new in (("vram", None, 256), ("offload", {"vram_gb": vram_gb}, 128)):
    t0 = time.perf_counter()
    e = tiered.load(layout, device="cuda", dtype="bfloat16", budget=budget)
    load_s = time.perf_counter() - t0
    e.generate(prompt, max_new_tokens=new, stop_at_eos=False)
    g2 = e.generate(prompt, max_new_tokens=new, stop_at_eos=False)
    s = g2.stats
    out[name] = {"decode_tok_s": s.get("decode_tok_s"), "prefill_tok_s": s.get("prefill_tok_s"),
                 "load_s": load_s, "tokens": g2.token_ids}
    del e
    torch.cuda.empty_cache()
print("RESULT " + json.dumps(out))
"""


def run_tree(path: Path, layout: Path, vram_gb: float, seed: int) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, str(path.resolve()), str(layout), str(vram_gb), str(seed)],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    lines = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        raise SystemExit(f"tree {path} failed (exit {r.returncode}):\n{r.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layout", type=Path, required=True, help="a layout every tree can read")
    ap.add_argument("--tree", action="append", required=True, help="NAME=PATH (a source tree with tiered/)")
    ap.add_argument("--vram-gb", type=float, default=4.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--expect-identical", default=None,
                    help="comma-separated trees whose greedy tokens must equal the first tree's (default: all); "
                         "a tree with other kernels may round differently in bf16")
    a = ap.parse_args()
    trees = [(t.split("=", 1)[0], Path(t.split("=", 1)[1])) for t in a.tree]
    runs: dict[str, list[dict]] = {n: [] for n, _ in trees}
    for _ in range(a.repeats):
        for name, path in trees:
            runs[name].append(run_tree(path, a.layout, a.vram_gb, a.seed))
            print(f"[trees] {name}: vram {runs[name][-1]['vram']['decode_tok_s']:.1f} tok/s, "
                  f"offload {runs[name][-1]['offload']['decode_tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
    first = trees[0][0]
    expect = None if a.expect_identical is None else set(a.expect_identical.split(","))
    res: dict = {"bench": "trees-gpu", "commit": git_commit(), "layout": str(a.layout), "vram_gb": a.vram_gb,
                 "device": _device(), "trees": {}}
    ok = True
    ref_tokens = {k: runs[first][0][k]["tokens"] for k in ("vram", "offload")}
    print(f"{'tree':10} {'vram tok/s':>11} {'ratio':>6} {'offload tok/s':>14} {'ratio':>6} tokens")
    for name, _ in trees:
        row = {}
        for k in ("vram", "offload"):
            vals = [r[k]["decode_tok_s"] for r in runs[name]]
            same = all(r[k]["tokens"] == ref_tokens[k] for r in runs[name])
            if expect is None or name in expect:
                ok &= same
            row[k] = {"decode_tok_s_median": statistics.median(vals), "decode_tok_s_all": vals,
                      "tokens_identical_to_" + first: same,
                      "tokens_sha": hashlib.sha1(json.dumps(runs[name][0][k]["tokens"]).encode()).hexdigest()[:12]}
        res["trees"][name] = row
    for name, _ in trees:
        for k in ("vram", "offload"):
            base = res["trees"][first][k]["decode_tok_s_median"]
            res["trees"][name][k]["ratio_to_" + first] = res["trees"][name][k]["decode_tok_s_median"] / base
        r = res["trees"][name]
        print(f"{name:10} {r['vram']['decode_tok_s_median']:11.1f} {r['vram']['ratio_to_' + first]:6.3f} "
              f"{r['offload']['decode_tok_s_median']:14.1f} {r['offload']['ratio_to_' + first]:6.3f} "
              f"{'same' if r['vram']['tokens_identical_to_' + first] and r['offload']['tokens_identical_to_' + first] else 'DIFFERENT'}")
    res["tokens_identical"] = ok
    print(write_out(res, "trees-gpu.json"))
    if not ok:
        raise SystemExit("greedy tokens differ between trees")


def _device() -> str:
    import torch
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    main()
