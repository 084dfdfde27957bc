"""What quantized experts and dense weights cost in quality, on olmoe-code-17m (CPU, fp32 compute).

Repacks the reference model once per storage variant and scores each against the bf16 layout with
`tiered eval`'s measurement (tiered/serve/evaluate.py) on every file of ../shared/text/eval and their mean:
perplexity ratio, mean and p99 KL(bf16 || variant), top-1 agreement, mean per-layer expert Jaccard; plus
how many of 64 greedy tokens (prompt: each file's first 128 tokens) match bf16's, position by position,
and the length of the identical prefix. The q4 least-squares refinement is also judged on the weights
alone (relative MSE, data-free) and on ../shared/text/fit (the text a choice may be tuned on).
Bytes: block size per expert format on this model (4 KiB padding dominates) and on the 10.6B shape.
A variant name with "@q8" (e.g. q4-search@q8) runs that storage with the native kernel's q8 activation mode
(TIERED_CPU_ACT=q8: q4 products from inputs rounded to 8 bits per group, integer dot products), for eval and greedy.
Prints a table, then one JSON line last; writes benchmarks/results/quant-quality-<date>.json (and $OUT/).

    python3 benchmarks/bench_quant_quality.py [-m CHECKPOINT] [--max-tokens N] [--variants q8,q4,...]
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

# name -> (experts, dense, q4_refine). "q4" is min/max rounding; "q4-lsq" adds the least-squares refinement
# (repack's default since it lowered weight MSE and fit-text KL); "q4-search" starts that refinement from the best of
# a grid of clipped ranges (--q4-refine search); dense-q4 variants use min/max unless their name says search.
VARIANTS = {
    "q8": ("q8", "source", "none"),
    "q4": ("q4", "source", "none"),
    "q4-lsq": ("q4", "source", "lsq"),
    "q4-search": ("q4", "source", "search"),
    "fp8": ("fp8", "source", "none"),
    "mxfp4": ("mxfp4", "source", "none"),
    "dense-q8": ("source", "q8", "none"),
    "dense-q4": ("source", "q4", "none"),
    "q4+dense-q4": ("q4", "q4", "none"),
    "dense-q4-search": ("source", "q4", "search"),
    "q4+dense-q4-search": ("q4", "q4", "search"),
}
Q4_GOALS = {"perplexity_ratio": ("<=", 1.03), "top1_agreement": (">=", 0.95), "kl_mean": ("<=", 0.03)}
GOALS = {"q8": {"perplexity_ratio": ("<=", 1.005)}, "q4": Q4_GOALS, "q4-lsq": Q4_GOALS, "q4-search": Q4_GOALS}
PROMPT_TOKENS, GREEDY_TOKENS = 128, 64


def text_dir(kind: str) -> Path:
    for root in (REPO.parent / "shared", Path("/work/shared")):
        if (root / "text" / kind).is_dir():
            return root / "text" / kind
    raise SystemExit(f"no ../shared/text/{kind} directory found")


def greedy(engine, ids: list[int]) -> list[int]:
    return engine.generate(ids, max_new_tokens=GREEDY_TOKENS, stop_at_eos=False).token_ids


def q4_weight_mse(layout) -> dict:
    """Relative weight MSE of q4 (min/max rounding) and q4 with each refinement (least squares, search), over every
    expert matrix of the bf16 layout: a data-free measure."""
    from tiered.layout.quant import quantize

    num = {"q4": 0.0, "q4-lsq": 0.0, "q4-search": 0.0}
    den = 0.0
    c = layout.config
    for l in range(c.num_layers):
        for e in range(c.num_experts):
            for w in layout.expert_tensors(l, e).values():
                wf = w.float()
                den += float((wf * wf).sum())
                for name, refine in (("q4", None), ("q4-lsq", "lsq"), ("q4-search", "search")):
                    d = quantize(w, "q4", refine=refine).dequantize(torch.float32) - wf
                    num[name] += float((d * d).sum())
    return {k: v / den for k, v in num.items()}


def block_bytes() -> dict:
    """Block size per expert format: this model (D 256, F 32) and the 10.6B shape (D 2048, F 768)."""
    from tiered.layout.format import plan_block

    out = {}
    for shape_name, (D, Fe) in {"olmoe-code-17m": (256, 32), "qwen3-10b": (2048, 768)}.items():
        shapes = {"gate": (Fe, D), "up": (Fe, D), "down": (D, Fe)}
        row = {}
        for fmt in ("bfloat16", "q8", "q4", "fp8", "mxfp4"):
            specs, bs = plan_block({r: (s, fmt) for r, s in shapes.items()})
            row[fmt] = {"block": bs, "tensor_bytes": sum(s.nbytes for s in specs)}
        for fmt in row:
            row[fmt]["vs_bf16_block"] = row[fmt]["block"] / row["bfloat16"]["block"]
            row[fmt]["vs_bf16_tensor_bytes"] = row[fmt]["tensor_bytes"] / row["bfloat16"]["tensor_bytes"]
        out[shape_name] = row
    return out


def main() -> None:
    from benchmeta import git_commit, write_out
    from tiered.engine import load
    from tiered.kernels.cpu_kernel import ACT_ENV
    from tiered.serve.evaluate import RouteRecorder, evaluate
    from tiered.layout.families import default_model_path
    from tiered.layout.repack import repack
    from tiered.store.disk import Layout

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", type=Path, default=default_model_path())
    ap.add_argument("--max-tokens", type=int, default=None, help="cap per eval file (default: all)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" /
                    f"quant-quality-{datetime.date.today().isoformat()}.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = [v for v in args.variants.split(",") if v]
    evals = {p.name: p.read_text() for p in sorted(text_dir("eval").glob("*"))}
    fits = {p.name: p.read_text() for p in sorted(text_dir("fit").glob("*"))}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = Path(tmp) / "bf16"
        repack(args.model, base_dir, progress=False)
        base_routes = RouteRecorder()
        base = load(base_dir, device="cpu", dtype="float32", max_context=2048, observer=base_routes)
        prompts = {n: base.encode(t)[:PROMPT_TOKENS] for n, t in evals.items()}
        base_greedy = {n: greedy(base, ids) for n, ids in prompts.items()}
        res: dict = {"variants": {}}
        for name in names:
            store, _, act = name.partition("@")
            if store not in VARIANTS or act not in ("", "q8"):
                raise SystemExit(f"unknown variant {name!r}: use one of {', '.join(VARIANTS)}, optionally with @q8")
            experts, dense, refine = VARIANTS[store]
            os.environ[ACT_ENV] = act or "float"  # read at each CPU product (kernels/cpu_kernel.shared)
            d = Path(tmp) / store
            if not (d / "manifest.json").exists():
                repack(args.model, d, experts=experts, dense=dense, q4_refine=refine, progress=False)
            routes = (RouteRecorder(), base_routes)
            eng = load(d, device="cpu", dtype="float32", max_context=2048, observer=routes[0])
            out = evaluate(eng, evals, reference=base, max_tokens=args.max_tokens, routes=routes)
            files = []
            for f in out["files"]:
                g = greedy(eng, prompts[f["file"]])
                b = base_greedy[f["file"]]
                same = sum(x == y for x, y in zip(g, b))
                prefix = next((i for i, (x, y) in enumerate(zip(g, b)) if x != y), len(b))
                files.append({**{k: f[k] for k in ("file", "tokens", "perplexity", "reference_perplexity",
                                                   "perplexity_ratio", "kl_mean", "kl_p99", "top1_agreement")},
                              "expert_jaccard_mean": sum(f["expert_jaccard"]) / len(f["expert_jaccard"]),
                              "greedy_match": same, "greedy_prefix": prefix})
            mean = {k: sum(f[k] for f in files) / len(files) for k in files[0] if k != "file"}
            summary = Layout.open(d).summary()
            v = {"experts": experts, "dense": dense, "q4_refine": refine, "cpu_act": act or "float",
                 "files": files, "mean": mean,
                 "pooled": {k: out[k] for k in ("tokens", "perplexity", "reference_perplexity", "perplexity_ratio",
                                                "kl_mean", "kl_p99", "top1_agreement")},
                 "block_size": summary["block_size"], "bytes_per_expert": summary["bytes_per_expert"],
                 "dense_bytes": summary["dense_bytes"]}
            if name.startswith("q4") and "+" not in name:
                v["fit"] = {k: evaluate(eng, fits, reference=base, max_tokens=args.max_tokens)[k]
                            for k in ("perplexity_ratio", "kl_mean", "top1_agreement")}
            res["variants"][name] = v
            os.environ[ACT_ENV] = "float"
            print(f"{name}: done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        res["bf16"] = {"dense_bytes": Layout.open(base_dir).summary()["dense_bytes"],
                       "block_size": Layout.open(base_dir).block_size}
        res["q4_weight_rel_mse"] = q4_weight_mse(Layout.open(base_dir))
    res["bytes"] = block_bytes()
    res["goals"] = check_goals(res["variants"])
    res["q4_bytes_vs_bf16_10b"] = res["bytes"]["qwen3-10b"]["q4"]["vs_bf16_block"]
    res.update({"model": str(args.model), "compute_dtype": "float32", "device": "cpu", "window": 2048,
                "max_tokens": args.max_tokens, "greedy": {"prompt_tokens": PROMPT_TOKENS, "tokens": GREEDY_TOKENS},
                "commit": git_commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                "host": platform.node(), "seconds": time.perf_counter() - t0})
    print_table(res)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(write_out(res, args.out.name))


def check_goals(variants: dict) -> dict:
    """Each goal on the mean over the eval files and on the worst file; met only when both meet it."""
    out = {}
    for name, goals in GOALS.items():
        if name in variants:
            v = variants[name]
            for key, (op, lim) in goals.items():
                vals = [f[key] for f in v["files"]]
                worst = max(vals) if op == "<=" else min(vals)
                met_mean = v["mean"][key] <= lim if op == "<=" else v["mean"][key] >= lim
                met_worst = worst <= lim if op == "<=" else worst >= lim
                out[f"{name}.{key}"] = {"goal": f"{op} {lim}", "mean": v["mean"][key], "worst_file": worst,
                                        "met_on_mean": met_mean, "met": met_mean and met_worst}
    return out


def print_table(res: dict) -> None:
    print(f"{'variant':<13} {'file':<28} {'ppl':>8} {'ratio':>7} {'KL mean':>8} {'KL p99':>7} {'top-1':>7} "
          f"{'jacc':>6} {'greedy':>6} {'prefix':>6}")
    for name, v in res["variants"].items():
        for f in v["files"] + [{"file": "mean", **v["mean"]}]:
            print(f"{name:<13} {f['file'][:28]:<28} {f['perplexity']:>8.3f} {f['perplexity_ratio']:>7.4f} "
                  f"{f['kl_mean']:>8.4f} {f['kl_p99']:>7.3f} {f['top1_agreement']:>7.2%} "
                  f"{f['expert_jaccard_mean']:>6.3f} {f['greedy_match']:>6.1f} {f['greedy_prefix']:>6.1f}")
    print("goals: " + "; ".join(f"{k} {g['goal']}: mean {g['mean']:.4f}, worst {g['worst_file']:.4f} "
                                f"{'met' if g['met'] else 'MISSED'}" for k, g in res["goals"].items()))
    print("q4 weight relative MSE: " + ", ".join(f"{k} {v:.3e}" for k, v in res["q4_weight_rel_mse"].items()))
    for shape, row in res["bytes"].items():
        print(f"bytes per expert block, {shape}: " + ", ".join(
            f"{f} {r['block']:,} ({r['vs_bf16_block']:.3f}x; tensors {r['vs_bf16_tensor_bytes']:.3f}x)"
            for f, r in row.items()))


if __name__ == "__main__":
    main()
