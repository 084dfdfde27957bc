"""What cutting the expert count costs (--experts-per-token K): `tiered eval` of the reference model at K experts per
token against itself at its native top-8, on the five held-out eval files (each, plus all together).

Flash-MoE cuts Qwen3.5-397B-A17B from its native top-10 to 4 (K/K0 = 0.4); on olmoe-code-17m (top-8) that ratio
lies between K = 3 (0.375) and K = 4 (0.5). Two rules are measured:
  family        the reference model's own rule (OLMoE: softmax over all experts, the K largest, no renormalisation:
                the kept weights sum to less than 1);
  renormalised  the same K experts with their weights renormalised to sum 1, which is what Qwen3.5 (and Qwen3-MoE,
                Mixtral) do: the rule the 397B model's cut would use.
Per K and rule: perplexity, the ratio to the native model's, mean and p99 KL(native || cut), top-1 agreement.

    python3 benchmarks/bench_experts_per_token.py --json-out benchmarks/results/experts-per-token-olmoe-code-17m.json
CPU, fp32; about 1 minute per (K, rule) on a shared 2-core machine. Prints a table, then one JSON line last.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
from benchmeta import git_commit  # noqa: E402

from tiered.engine import load  # noqa: E402
from tiered.layout.families import default_model_path  # noqa: E402
from tiered.serve.evaluate import RouteRecorder, evaluate  # noqa: E402

NOTE = ("family is the measurement that counts: the model as trained, K of its experts. renormalised applies Qwen3.5's "
        "rule to a model trained without it, so even K=8 departs from the trained model (perplexity x1.43); those "
        "rows only show that the cut's relative cost grows the same way, not what a renormalising model would lose.")
KEYS = ("tokens", "perplexity", "reference_perplexity", "perplexity_ratio", "kl_mean", "kl_p99", "top1_agreement")


def one(model: Path, texts: dict[str, str], k: int, renorm: bool, window: int, max_tokens: int | None) -> dict:
    routes = (RouteRecorder(), RouteRecorder())
    eng = load(model, device="cpu", dtype=torch.float32, max_context=window, cuda_graphs=False,
               experts_per_token=k, observer=routes[0])
    if renorm:  # the family's rule with renormalised top-k weights (read per call on the eager CPU path)
        eng.model.config = dataclasses.replace(eng.model.config, norm_topk_prob=True)
    ref = load(model, device="cpu", dtype=torch.float32, max_context=window, cuda_graphs=False, observer=routes[1])
    out = evaluate(eng, texts, reference=ref, window=window, max_tokens=max_tokens, routes=routes)
    row = {k_: out.get(k_) for k_ in KEYS}
    row["expert_jaccard_mean"] = float(sum(out["expert_jaccard"]) / len(out["expert_jaccard"]))
    row["files"] = {f["file"]: {k_: f.get(k_) for k_ in KEYS} for f in out["files"]}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", type=Path, default=default_model_path())
    ap.add_argument("--text", type=Path, default=REPO.parent.parent / "shared" / "text" / "eval")
    ap.add_argument("--ks", default="8,7,6,5,4,3,2")
    ap.add_argument("--window", type=int, default=2048)
    ap.add_argument("--max-tokens", type=int, default=None, help="cap on each file's tokens (default: all)")
    ap.add_argument("--json-out", type=Path, default=None)
    a = ap.parse_args()
    if not a.text.is_dir():
        a.text = Path("/work/shared/text/eval")
    texts = {p.name: p.read_text() for p in sorted(a.text.iterdir())}
    t0 = time.perf_counter()
    cfg = load(a.model, device="cpu", cuda_graphs=False).config
    res: dict = {"bench": "experts_per_token", "model": a.model.name, "native_top_k": cfg.top_k,
                 "native_norm_topk_prob": cfg.norm_topk_prob, "texts": sorted(texts), "window": a.window,
                 "device": "cpu", "dtype": "float32", "commit": git_commit(), "date": time.strftime("%Y-%m-%d"),
                 "note": NOTE, "rules": {}}
    print(f"{'rule':<13}{'K':>3}{'ppl':>9}{'ratio':>8}{'KL mean':>10}{'KL p99':>9}{'top-1':>8}{'jaccard':>9}")
    for rule, renorm in (("family", False), ("renormalised", True)):
        rows = {}
        for k in (int(x) for x in a.ks.split(",")):
            r = rows[str(k)] = one(a.model, texts, k, renorm, a.window, a.max_tokens)
            print(f"{rule:<13}{k:>3}{r['perplexity']:>9.3f}{r['perplexity_ratio']:>8.3f}{r['kl_mean']:>10.4f}"
                  f"{r['kl_p99']:>9.3f}{r['top1_agreement']:>8.1%}{r['expert_jaccard_mean']:>9.3f}", flush=True)
        res["rules"][rule] = rows
    res["wall_s"] = time.perf_counter() - t0
    line = json.dumps(res)
    if a.json_out:
        a.json_out.write_text(json.dumps(res, indent=1) + "\n")
    print(line)


if __name__ == "__main__":
    main()
