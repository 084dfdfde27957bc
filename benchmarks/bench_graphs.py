"""Decode speed does not depend on the run's length once graphs are captured at load (GPU box).

For each attention backend (--attns, default triton and sdpa), in one process on one layout:
  - load (load_s) and capture every graph the one-token step may replay (capture_s, graph_mem_bytes);
  - one warm-up generate (8 tokens), then greedy runs of 32 and 256 new tokens after a short prompt
    (stop_at_eos off): decode_tok_s of each and their ratio (goal: 32-token within 10% of the 256-token
    figure), ttft_s, and capture_in_call_s (0 when nothing was captured inside a call);
  - ttft_s of a --long-prompt token prompt (random ids, 1 new token).
With --budget-gb the expert cache is used (--vram-gb, piecewise graphs) instead of resident experts.

    python3 benchmarks/bench_graphs.py -m /root/q8-layout                 # GPU box, about 2 minutes
    python3 benchmarks/bench_graphs.py --device cpu --attns sdpa --new 4,8 --long-prompt 32   # CPU check

Prints a table, then one JSON line last; writes $OUT/graphs.json when OUT is set.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
from benchmeta import git_commit, write_out  # noqa: E402

import tiered  # noqa: E402

PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n    \"\"\"Parse the arguments and run.\"\"\"\n"
KEYS = ("decode_tok_s", "ttft_s", "prefill_tok_s", "capture_in_call_s", "decode_graphs", "tokens_generated")


def log(msg: str) -> None:
    print(f"[graphs] {msg}", file=sys.stderr, flush=True)


def one_backend(args, attn: str) -> dict:
    budget = {"vram_gb": args.budget_gb} if args.budget_gb else None
    e = tiered.load(args.model, device=args.device, attn=attn, max_context=args.max_context, budget=budget)
    res = {"attn": e.model.attn, "load_s": e.load_s, "capture_s": e.capture_s,
           "graph_spans": e.model.graph_spans() if e.device.type == "cuda" else [],
           "graph_mem_bytes": e._graph_stats()[1]}
    log(f"{attn}: loaded in {e.load_s:.2f} s, graphs captured in {e.capture_s:.2f} s")
    e.generate(PROMPT, max_new_tokens=8, stop_at_eos=False)  # warm-up: first prefill, cuBLAS, allocator
    for n in args.new:
        g = e.generate(PROMPT, max_new_tokens=n, stop_at_eos=False)
        res[f"new{n}"] = {k: g.stats.get(k) for k in KEYS}
    a, b = res[f"new{min(args.new)}"]["decode_tok_s"], res[f"new{max(args.new)}"]["decode_tok_s"]
    res["short_vs_long"] = a / b if a and b else None
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(8192, e.config.vocab_size), (args.long_prompt,), generator=gen).tolist()
    g = e.generate(ids, max_new_tokens=1)
    res[f"ttft_prompt{args.long_prompt}_s"] = g.stats["ttft_s"]
    res["capture_s_end"] = e.capture_s
    del e
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=None, help="layout or checkpoint (default: the embedded model)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--attns", default="triton,sdpa")
    ap.add_argument("--new", default="32,256", help="new-token counts, comma-separated")
    ap.add_argument("--long-prompt", type=int, default=512, help="prompt tokens of the ttft run")
    ap.add_argument("--max-context", type=int, default=None)
    ap.add_argument("--budget-gb", type=float, default=None, help="--vram-gb for the expert cache (piecewise)")
    args = ap.parse_args()
    args.new = sorted(int(x) for x in args.new.split(","))
    rows = [one_backend(args, a) for a in args.attns.split(",")]
    lo, hi = args.new[0], args.new[-1]
    print(f"{'attn':>7} | {'load s':>7} {'capture s':>9} {'graphs':>6} {'graph MiB':>9} | "
          f"{f'tok/s {lo}':>10} {f'tok/s {hi}':>10} {'ratio':>6} | {'ttft s':>7} {f'ttft {args.long_prompt}':>9}")
    for r in rows:
        s, l = r[f"new{lo}"], r[f"new{hi}"]

        def f(v, w, p=1):
            return f"{v:{w}.{p}f}" if isinstance(v, (int, float)) else f"{'-':>{w}}"
        print(f"{r['attn']:>7} | {f(r['load_s'], 7, 2)} {f(r['capture_s'], 9, 2)} {len(r['graph_spans']):>6} "
              f"{f(r['graph_mem_bytes'] / 2 ** 20, 9)} | {f(s['decode_tok_s'], 10)} {f(l['decode_tok_s'], 10)} "
              f"{f(r['short_vs_long'], 6, 3)} | {f(s['ttft_s'], 7, 3)} {f(r[f'ttft_prompt{args.long_prompt}_s'], 9, 3)}")
    res = {"bench": "graphs", "commit": git_commit(), "model": str(args.model), "device": args.device,
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
           "goal_short_vs_long": ">= 0.9", "rows": rows}
    print(write_out(res, "graphs.json"))


if __name__ == "__main__":
    main()
