"""`tiered tune`: sweep predictors, demand policies and prefetch settings over a trace; recommend one.

Owns: the click command and the sweeps it runs (`sweep_predictors`, `sweep_policies`, `sweep_prefetch`,
also used by benchmarks/bench_predict.py), and finding or fitting the predictor parameters
(`load_or_fit_params`: <layout>/predictor.safetensors, or --params FILE; --fit-trace fits them).
Does not own: the predictors (predictors.py), the replay (simulate.py), the trace (trace.py).

--json prints one JSON object on the last line of stdout: predictor{name,
candidates_per_layer, recall, precision} for the best predictor at C <= 1.8 K, policies{<name>:
{hit_rate}} for every demand policy and belady, cache_fraction, plus the sweeps and the recommendation.
Fit predictors on a trace of one set of texts only; tune on traces of other text (docs/metrics.md).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import click

from tiered.cli.options import experts_per_token_option

DEMAND_POLICIES = ("lru", "lfu", "flru", "predicted")


def load_or_fit_params(layout: Any, *, params_path: Path | None, fit_trace: Path | None, gates: Any,
                       log=print) -> Any:
    """Fitted PredictorParams: fit on `fit_trace` (and save) if given, else read the saved file, else None."""
    from tiered.predict.predictors import PARAMS_FILE, PredictorParams, fit_params
    from tiered.predict.trace import load

    path = params_path or Path(layout.path) / PARAMS_FILE
    if fit_trace is not None:
        log(f"fitting predictors on {fit_trace} (fit text only) ...")
        params = fit_params(load(fit_trace), gates, progress=True)
        try:
            params.save(path)
        except OSError:
            path = Path(fit_trace).with_name(PARAMS_FILE)
            params.save(path)
        log(f"predictor parameters -> {path}")
        return params
    if path.is_file():
        return PredictorParams.load(path)
    return None


def sweep_predictors(trace: Any, predictors: dict[str, Any], candidates: tuple[int, ...]) -> dict[str, dict]:
    """{name: {C: {recall, precision, per_layer}}} from each predictor's score_trace."""
    from tiered.predict.predictors import recall_precision

    out: dict[str, dict] = {}
    for name, p in predictors.items():
        s = p.score_trace(trace)
        out[name] = {C: recall_precision(s, trace, C) for C in candidates}
    return out


def best_predictor(sweep: dict[str, dict], top_k: int, *, goal: float = 0.9) -> dict:
    """The predictor and C <= 1.8 K: the fewest candidates reaching `goal` recall, else the best recall at 1.8 K."""
    cmax = math.floor(1.8 * top_k)
    rows = [(name, C, r) for name, byc in sweep.items() for C, r in byc.items() if C <= cmax]
    if not rows:
        raise ValueError(f"no candidate count <= 1.8 K = {cmax} was swept")
    good = [x for x in rows if x[2]["recall"] >= goal]
    name, C, r = min(good, key=lambda x: (x[1], -x[2]["recall"])) if good else max(rows, key=lambda x: x[2]["recall"])
    return {"name": name, "candidates_per_layer": C, "recall": r["recall"], "precision": r["precision"]}


def sweep_policies(trace: Any, slots_per_layer: int, *, max_tokens: int | None) -> dict[str, dict]:
    """Demand hit rates (no prefetch) with per-layer caches, current step pinned, plus Belady."""
    from tiered.predict.simulate import TierModel, simulate

    L = trace.num_layers
    hits = {p: 0 for p in DEMAND_POLICIES}
    bel = uses = 0
    for d in range(trace.num_docs):
        doc = trace.doc(d, max_tokens)
        for i, p in enumerate(DEMAND_POLICIES):
            r = simulate(doc, TierModel(slots=slots_per_layer * L, policy=p), with_belady=i == 0)
            hits[p] += r.hits
            if i == 0:
                bel += r.belady_hits
                uses += r.uses
    out = {p: {"hit_rate": h / uses} for p, h in hits.items()}
    out["belady"] = {"hit_rate": bel / uses}
    return out


def sweep_prefetch(trace: Any, predictor: Any, slots_per_layer: int, budgets: tuple[int, ...], *, policy: str,
                   block_bytes: int, h2d_gbps: float, compute_s: float, max_tokens: int | None,
                   depth: int = 1) -> dict[int, dict]:
    """Hit rate, prefetch precision, bytes and modelled tok/s per prefetch budget (0 = demand only)."""
    from tiered.predict.simulate import TierModel, simulate

    L = trace.num_layers
    out = {}
    for b in budgets:
        tm = TierModel(slots=slots_per_layer * L, policy=policy, prefetch_depth=depth if b else 0, prefetch_budget=b,
                       block_bytes=block_bytes, h2d_gbps=h2d_gbps, compute_s_per_layer=compute_s)
        tot: dict[str, float] = {}
        for d in range(trace.num_docs):
            r = simulate(trace.doc(d, max_tokens), tm, predictor=predictor if b else None, with_belady=False)
            for k in ("hits", "uses", "prefetch_issued", "prefetch_used", "tokens", "seconds", "stall_s"):
                tot[k] = tot.get(k, 0) + getattr(r, k)
            tot["misses"] = tot.get("misses", 0) + r.misses
        out[b] = {"hit_rate": tot["hits"] / tot["uses"],
                  "prefetch_precision": tot["prefetch_used"] / tot["prefetch_issued"] if tot["prefetch_issued"] else None,
                  "bytes_h2d_per_token": (tot["misses"] + tot["prefetch_issued"]) * block_bytes / tot["tokens"],
                  "prefetch_wasted_bytes_per_token": (tot["prefetch_issued"] - tot["prefetch_used"]) * block_bytes
                  / tot["tokens"],
                  "tok_s": tot["tokens"] / tot["seconds"] if tot["seconds"] else None,
                  "stall_share": tot["stall_s"] / tot["seconds"] if tot["seconds"] else None}
    return out


@click.command("tune", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-m", "--model", "model", metavar="PATH", default=None,
              help="Layout or Hugging Face checkpoint directory the trace came from (default: the embedded model).")
@click.option("--revision", default=None, help="Branch, tag or commit of a Hugging Face model id.")
@click.option("--trace", "trace_path", type=click.Path(path_type=Path, dir_okay=False, exists=True), required=True,
              help="Trace to tune on (tiered trace); not the text the predictors were fitted on.")
@click.option("--fit-trace", type=click.Path(path_type=Path, dir_okay=False, exists=True), default=None,
              help="Fit the learned predictors on this trace (of texts kept apart from --trace's) and save them first.")
@click.option("--params", "params_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Predictor parameters file [default: <layout>/predictor.safetensors].")
@click.option("--cache-fraction", type=click.FloatRange(0, 1, min_open=True), default=0.25, show_default=True,
              help="Device-tier slots as a share of all experts (per-layer caches).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=2048, show_default=True,
              help="Cache figures over the first N tokens of each document.")
@click.option("--h2d-gbps", type=float, default=53.0, show_default=True, help="Host->device GB/s for tok/s estimates.")
@click.option("--compute-ms", type=float, default=0.1, show_default=True, help="Compute per layer and token, ms.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on the last line of stdout.")
@click.option("--plot", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Recall vs candidates per predictor, PNG (needs matplotlib).")
@click.option("--vram-gb", type=float, default=None, help="Accepted for symmetry with run; tune uses --cache-fraction.")
@click.option("--expert-slots", type=click.IntRange(min=1), default=None,
              help="Global device slots to evaluate instead of --cache-fraction.")
@click.option("--ram-gb", type=float, default=None, help="Accepted for symmetry with run.")
@click.option("--io", type=click.Choice(["mmap", "direct"]), default=None, help="Accepted for symmetry with run.")
@click.option("--policy", type=str, default=None, help="Policy for the prefetch sweep [default: the best demand policy].")
@click.option("--prefetch-depth", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--prefetch-budget", type=click.IntRange(min=0), default=None,
              help="Also evaluate this prefetch budget.")
@experts_per_token_option
def tune(model, revision, trace_path, fit_trace, params_path, cache_fraction, max_tokens, h2d_gbps, compute_ms, as_json, plot,
         vram_gb, expert_slots, ram_gb, io, policy, prefetch_depth, prefetch_budget, experts_per_token) -> None:
    """Sweep predictors, demand policies and prefetch budgets over TRACE and recommend a setting.

    \b
    Examples:
      tiered trace --prompt-file fit.txt -o fit.npz && tiered trace --prompt-file other.txt -o t.npz
      tiered tune --trace t.npz --fit-trace fit.npz --json
    """
    from tiered.engine import EngineError, config_with_experts_per_token, resolve_layout
    from tiered.predict.predictors import PREDICTORS, GateWeights, make_predictor
    from tiered.predict.trace import TraceError, load
    from tiered.store.disk import Layout

    log = (lambda m: click.echo(m, err=True)) if as_json else click.echo
    try:
        layout = Layout.open(resolve_layout(model, revision))
        layout.config = config_with_experts_per_token(layout.config, experts_per_token)  # a trace made at a cut K
        tr = load(trace_path)
    except (EngineError, TraceError) as e:
        raise click.UsageError(str(e)) from None
    cfg = layout.config
    L, E, K = len(cfg.moe_layers), cfg.num_experts, cfg.top_k  # traces and predictors index the MoE layers
    if (tr.moe_layers, tr.num_experts, tr.top_k) != (cfg.moe_layers, E, K):
        raise click.UsageError(f"{trace_path} routes layers {_span(tr.moe_layers)}, top-{tr.top_k} of {tr.num_experts}; "
                               f"the model routes layers {_span(cfg.moe_layers)}, top-{K} of {E}: pass the -m (and "
                               "--experts-per-token) the trace was recorded with")
    gates = GateWeights.from_layout(layout)
    params = load_or_fit_params(layout, params_path=params_path, fit_trace=fit_trace, gates=gates, log=log)
    names = [n for n in PREDICTORS if (params is not None or n not in ("history", "activation-matching", "combined"))
             and (tr.hidden is not None or n not in ("next-gate", "combined"))]
    if params is None:
        log("note: no fitted predictor parameters: history, activation-matching and combined are skipped "
            "(pass --fit-trace FIT.npz)")
    preds = {n: make_predictor(n, num_layers=L, num_experts=E, gates=gates, params=params) for n in names}
    cands = tuple(sorted({K, int(1.5 * K), math.floor(1.8 * K), 2 * K}))
    psweep = sweep_predictors(tr, preds, cands)
    best = best_predictor(psweep, K)
    log(f"\nnext-layer prediction on {trace_path.name} ({tr.num_tokens} tokens): recall / precision")
    log(f"{'predictor':<22}" + "".join(f"{'C=' + str(c):>16}" for c in cands))
    for n, byc in psweep.items():
        log(f"{n:<22}" + "".join(f"{byc[c]['recall']:>9.1%} / {byc[c]['precision']:>4.0%}" for c in cands))

    per_layer = max(K, round(cache_fraction * E)) if expert_slots is None else max(K, expert_slots // L)
    frac = per_layer * L / (L * E)
    pol = sweep_policies(tr, per_layer, max_tokens=max_tokens)
    log(f"\ndemand hit rates, {per_layer} slots per layer ({frac:.0%} of experts), first {max_tokens} tokens per doc:")
    for n, r in pol.items():
        log(f"  {n:<10} {r['hit_rate']:.1%}")
    from tiered.store.policy import DEVICE_POLICIES  # recommend only what `run --policy` accepts

    best_pol = max((p for p in DEMAND_POLICIES if p in DEVICE_POLICIES), key=lambda p: pol[p]["hit_rate"])
    pf_policy = policy or best_pol
    budgets = tuple(sorted({0, K, best["candidates_per_layer"]} | ({prefetch_budget} if prefetch_budget else set())))
    pf = sweep_prefetch(tr, preds[best["name"]], per_layer, budgets, policy=pf_policy, block_bytes=layout.block_size,
                        h2d_gbps=h2d_gbps, compute_s=compute_ms / 1e3, max_tokens=max_tokens, depth=prefetch_depth)
    log(f"\nprefetch with {best['name']} (depth {prefetch_depth}, policy {pf_policy}), modelled at {h2d_gbps} GB/s, "
        f"{compute_ms} ms compute per layer:")
    for b, r in pf.items():
        prec = "-" if r["prefetch_precision"] is None else f"{r['prefetch_precision']:.0%}"
        log(f"  budget {b:>3}: hit {r['hit_rate']:.1%}, prefetch precision {prec}, "
            f"{r['bytes_h2d_per_token'] / 1e6:.2f} MB/token, {r['tok_s']:.1f} tok/s (modelled)")
    rec_b = max(pf, key=lambda b: pf[b]["tok_s"] or 0)
    rec = {"policy": pf_policy, "predictor": best["name"] if rec_b else None, "prefetch_depth": prefetch_depth if rec_b else 0,
           "prefetch_budget": rec_b}
    log(f"\nrecommended: --policy {rec['policy']} --prefetch-depth {rec['prefetch_depth']} "
        f"--prefetch-budget {rec['prefetch_budget']}" + (f" (predictor {rec['predictor']})" if rec_b else ""))
    if plot is not None and not _plot(psweep, plot):
        log("--plot skipped: matplotlib is not installed (pip install 'tiered[plot]')")
    if as_json:
        out = {"predictor": best, "policies": pol, "cache_fraction": frac, "slots_per_layer": per_layer,
               "predictors": {n: {str(c): {"recall": r["recall"], "precision": r["precision"]} for c, r in byc.items()}
                              for n, byc in psweep.items()},
               "prefetch": {str(b): r for b, r in pf.items()}, "recommended": rec, "trace": str(trace_path),
               "tokens": tr.num_tokens}
        sys.stdout.write(json.dumps(out) + "\n")


def _span(layers: list[int]) -> str:
    """[1, 2, 3] -> "1..3" (the MoE layers are a contiguous run in every family so far), else the list."""
    if layers and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}..{layers[-1]}"
    return str(layers)


def _plot(psweep: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for n, byc in psweep.items():
        cs = sorted(byc)
        ax.plot(cs, [byc[c]["recall"] for c in cs], marker="o", label=n)
    ax.set_xlabel("candidates per layer (C)")
    ax.set_ylabel("next-layer recall")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
