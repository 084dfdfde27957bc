"""Next-layer prediction and demand-policy hit rates on olmoe-code-17m (CPU; definitions in docs/metrics.md).

Fits the learned predictors on traces of ../shared/text/fit only, then reports on each file of
../shared/text/eval and their mean:
  - recall / precision at C in {8, 12, 14} for no prediction, previous-token reuse, next-gate, router
    history, activation matching and the fitted combination (every token of each file, in documents of
    at most 2048 tokens; target layers 1..L-1);
  - demand hit rates with per-layer caches of 16 slots (25% of experts), current step pinned, over the
    first 2048 tokens of each file, for LRU, LFU, flru, predictor-informed eviction and Belady.
Prints a table, then one JSON line last; writes benchmarks/results/predict-<date>.json (and $OUT/ if set).

    python3 benchmarks/bench_predict.py [-m MODEL] [--max-tokens 2048]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
TEXT = REPO.parent / "shared" / "text"
CANDIDATES = (8, 12, 14)
PREDICTORS = ("none", "prev-token", "next-gate", "history", "activation-matching", "combined")


def main() -> None:
    from tiered.engine import load
    from tiered.predict.predictors import GateWeights, fit_params, make_predictor
    from tiered.predict.simulate import TierModel, simulate
    from tiered.predict.trace import TraceRecorder, concat, record, split_ids
    from tiered.cli.tune import DEMAND_POLICIES, sweep_predictors
    from tiered.store.disk import Layout

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--max-tokens", type=int, default=2048, help="cache figures over the first N tokens per file")
    ap.add_argument("--slots-per-layer", type=int, default=16)
    a = ap.parse_args()

    t0 = time.perf_counter()
    rec = TraceRecorder()
    eng = load(a.model, device="cpu", dtype="float32", observer=rec)
    cfg = eng.config
    L, E = len(cfg.moe_layers), cfg.num_experts  # predictors index the MoE layers, as traces do

    def trace_file(p: Path):
        return record(eng, rec, split_ids(p.name, eng.encode(p.read_text()), min(2048, eng.max_context)))

    fit_files = sorted((TEXT / "fit").glob("*"))
    eval_files = sorted((TEXT / "eval").glob("*"))
    fit = concat([trace_file(p) for p in fit_files])
    evals = {p.name: trace_file(p) for p in eval_files}
    t_trace = time.perf_counter() - t0
    gates = GateWeights.from_layout(Layout.open(eng.layout_path))
    t1 = time.perf_counter()
    params = fit_params(fit, gates)  # fit/ only
    t_fit = time.perf_counter() - t1
    preds = {n: make_predictor(n, num_layers=L, num_experts=E, gates=gates, params=params) for n in PREDICTORS}

    pred_rows: dict[str, dict] = {}
    pol_rows: dict[str, dict] = {}
    for name, tr in evals.items():
        sw = sweep_predictors(tr, preds, CANDIDATES)
        pred_rows[name] = {n: {str(c): {"recall": r["recall"], "precision": r["precision"],
                                        "per_layer": r["per_layer"]} for c, r in byc.items()} for n, byc in sw.items()}
        doc = tr.doc(0, a.max_tokens)
        row = {}
        for i, pol in enumerate(DEMAND_POLICIES):
            r = simulate(doc, TierModel(slots=a.slots_per_layer * L, policy=pol), with_belady=i == 0)
            row[pol] = r.hits / r.uses
            if i == 0:
                row["belady"] = r.belady_hits / r.uses
        pol_rows[name] = row
    mean_pred = {n: {str(c): {k: float(np.mean([pred_rows[f][n][str(c)][k] for f in evals]))
                              for k in ("recall", "precision")} for c in CANDIDATES} for n in PREDICTORS}
    mean_pol = {p: float(np.mean([pol_rows[f][p] for f in evals])) for p in (*DEMAND_POLICIES, "belady")}

    print(f"next-layer recall / precision (fitted on {len(fit_files)} fit files, {fit.num_tokens} tokens; "
          f"reported on eval)")
    hdr = f"{'file':<28}{'predictor':<21}" + "".join(f"{'C=' + str(c):>15}" for c in CANDIDATES)
    print(hdr)
    for f in [*evals, "MEAN"]:
        for n in PREDICTORS:
            src = mean_pred[n] if f == "MEAN" else pred_rows[f][n]
            print(f"{f[:27]:<28}{n:<21}" + "".join(f"{src[str(c)]['recall']:>8.1%} /{src[str(c)]['precision']:>4.0%}"
                                                   for c in CANDIDATES))
    print(f"\ndemand hit rates, {a.slots_per_layer} slots per layer ({a.slots_per_layer / E:.0%} of experts), "
          f"first {a.max_tokens} tokens, current step pinned")
    cols = (*DEMAND_POLICIES, "belady")
    print(f"{'file':<28}" + "".join(f"{c:>11}" for c in cols))
    for f in [*evals, "MEAN"]:
        src = mean_pol if f == "MEAN" else pol_rows[f]
        print(f"{f[:27]:<28}" + "".join(f"{src[c]:>11.1%}" for c in cols))
    best_pol = max(DEMAND_POLICIES, key=lambda p: mean_pol[p])
    comb = mean_pred["combined"]
    goal_files = all(pred_rows[f]["combined"][str(c)]["recall"] >= 0.9 for f in evals for c in (12, 14))
    print(f"\ngoal recall >= 90% at precision >= 50% (C <= 14): combined C=12 mean {comb['12']['recall']:.1%} "
          f"(precision {comb['12']['precision']:.0%}), every file at C=12 and 14: {goal_files}")
    print(f"goal best demand policy within 5 points of Belady: {best_pol} {mean_pol[best_pol]:.1%} vs Belady "
          f"{mean_pol['belady']:.1%} -> gap {100 * (mean_pol['belady'] - mean_pol[best_pol]):.1f} points")

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    date = datetime.date.today().isoformat()
    out = {"bench": "predict", "date": date, "commit": commit, "device": f"cpu ({platform.processor() or platform.machine()}, "
           f"{os.cpu_count()} cores)", "model": str(eng.layout_path), "fit_files": [p.name for p in fit_files],
           "fit_tokens": fit.num_tokens, "eval_tokens": {f: t.num_tokens for f, t in evals.items()},
           "candidates": list(CANDIDATES), "predictors": pred_rows, "predictors_mean": mean_pred,
           "slots_per_layer": a.slots_per_layer, "cache_fraction": a.slots_per_layer / E, "max_tokens": a.max_tokens,
           "policies": pol_rows, "policies_mean": mean_pol, "best_demand_policy": best_pol,
           "belady_gap_points": 100 * (mean_pol["belady"] - mean_pol[best_pol]),
           "seconds": {"trace": t_trace, "fit": t_fit, "total": time.perf_counter() - t0}}
    res = REPO / "benchmarks" / "results" / f"predict-{date}.json"
    res.write_text(json.dumps(out, indent=1) + "\n")
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / res.name).write_text(json.dumps(out, indent=1) + "\n")
    for f in out["predictors"].values():  # keep the last line short: per-layer lists stay in the file
        for n in f.values():
            for c in n.values():
                c.pop("per_layer", None)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
