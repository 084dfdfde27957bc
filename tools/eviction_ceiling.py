"""How close can a demand policy get to Belady on the reference model? Learned eviction scores and oracles.

Issue 5 asks for the best demand policy within 5 points of Belady (per-layer caches of 16 slots = 25% of
experts, current step pinned, first 2048 tokens of each eval file). This tool measures what limits that:

  - `learned`: a logistic score per (layer, expert), fitted on fitting text only (never the reported text), of features known
    at eviction time (step t, layer l): exponential averages of uses (5 decays) and router probabilities
    (3 decays), the token-to-token transition score, log tokens since last use, used now, the prior;
    the target is "used again within H tokens". Evicts the lowest score (LRU among ties), like
    `PredictedEviction`.
  - `learned+next-token-gate`: the same plus a per-layer logistic "next-token gate" that predicts token
    t+1's experts at layer l from token t's router probs, routing and hidden state after layer l's
    attention (all known at step (t, l)); fitted on fit/ (cross-fitted by document halves there).
  - `oracle-next-N`: the same plus the TRUE routing of the next N tokens at layer l (not a policy: a
    ceiling for any policy whose extra knowledge is the next N tokens).
Reported on each eval file and their mean, next to LRU, the shipped `predicted` policy and Belady.

    python3 tools/eviction_ceiling.py [--horizon 4] [--out benchmarks/results/eviction-ceiling-<date>.json]

Nothing here is used at run time; it explains the number in the issue's closing note.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
TEXT = REPO.parent / "shared" / "text"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from tiered.predict.predictors import _fit_logistic, transition_params  # noqa: E402
from tiered.predict.prefetch import PredictedEviction  # noqa: E402
from tiered.predict.simulate import TierModel, simulate  # noqa: E402
from tiered.predict.trace import Trace, concat  # noqa: E402

USE_DECAYS = (0.5, 0.8, 0.9, 0.95, 0.98)
PROB_DECAYS = (0.0, 0.7, 0.95)


def _hot_probs(tr: Trace) -> tuple[torch.Tensor, torch.Tensor]:
    hot = torch.from_numpy(tr.multi_hot()).float()  # [N, L, E]
    return hot, torch.softmax(torch.from_numpy(tr.router_logits.astype(np.float32)), -1)


def _ema(x: torch.Tensor, d: float, starts: set[int]) -> torch.Tensor:
    out, a = torch.zeros_like(x), torch.zeros_like(x[0])
    for n in range(x.shape[0]):
        a = (torch.zeros_like(a) if n in starts else a) * d + (1 - d) * x[n]
        out[n] = a
    return out


def features(tr: Trace, time_trans: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """[N, L, E, F]: what exists at step (n, l) once layer l of token n is routed."""
    hot, probs = _hot_probs(tr)
    starts = set(tr.doc_offsets[:-1].tolist())
    fs = [torch.log(_ema(hot, d, starts).clamp_min(1e-4)) for d in USE_DECAYS]
    fs += [torch.log(_ema(probs, d, starts).clamp_min(1e-4)) for d in PROB_DECAYS]
    fs.append(torch.log(torch.einsum("nle,lef->nlf", hot, time_trans).clamp_min(1e-4)))
    since, s = torch.zeros_like(hot), torch.full(hot.shape[1:], 1e4)
    for n in range(hot.shape[0]):
        s = torch.where(hot[n] > 0, torch.zeros_like(s), (torch.full_like(s, 1e4) if n in starts else s) + 1)
        since[n] = s
    fs += [torch.log1p(since), hot, torch.log(prior)[None].expand_as(hot)]
    return torch.stack(fs, -1)


def next_use(tr: Trace) -> np.ndarray:
    """[N, L, E] tokens until the next use (1 = the next token), 1e9 when not used again in the document."""
    hot = tr.multi_hot().astype(bool)
    out = np.full(hot.shape, 1e9)
    for d in range(tr.num_docs):
        a, b = int(tr.doc_offsets[d]), int(tr.doc_offsets[d + 1])
        nxt = np.full(hot.shape[1:], 1e9)
        for n in range(b - 1, a - 1, -1):
            out[n] = nxt - n
            nxt = np.where(hot[n], n, nxt)
    return out


def _nt_inputs(tr: Trace, l: int) -> torch.Tensor:
    hot, probs = _hot_probs(tr)
    h = torch.from_numpy(tr.hidden[:, l].astype(np.float32))
    h = h / (h.pow(2).mean(-1, keepdim=True).sqrt() + 1e-6)
    return torch.cat([torch.log(probs[:, l].clamp_min(1e-6)), hot[:, l], h], 1)


def fit_next_token_gate(tr: Trace) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: token t's (router log-probs, routing, normalised hidden) -> token t+1's routing at that layer."""
    hot, _ = _hot_probs(tr)
    nxt = torch.zeros_like(hot)
    nxt[:-1] = hot[1:]
    ok = torch.ones(hot.shape[0], dtype=torch.bool)
    ok[torch.from_numpy(tr.doc_offsets[1:] - 1)] = False  # the last token of a document has no next token
    E = tr.num_experts
    return [_fit_logistic(_nt_inputs(tr, l)[ok], nxt[ok, l], init_eye=E, steps=200, l2=1e-4)
            for l in range(tr.num_layers)]


def apply_next_token_gate(models: list, tr: Trace) -> torch.Tensor:
    return torch.stack([F.logsigmoid(_nt_inputs(tr, l) @ w.T + b) for l, (w, b) in enumerate(models)], 1)


def fit_score(X: torch.Tensor, y: torch.Tensor, *, samples: int = 400_000, steps: int = 300) -> tuple[torch.Tensor, float]:
    """Logistic regression X [N, L, E, F] -> y (0/1) on a random subsample: weights [F] and bias."""
    x, t = X.reshape(-1, X.shape[-1]), y.reshape(-1).float()
    take = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:samples]
    x, t = x[take], t[take]
    mu, sd = x.mean(0), x.std(0) + 1e-4
    lin = torch.nn.Linear(x.shape[1], 1)
    opt = torch.optim.Adam(lin.parameters(), lr=3e-2)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            F.binary_cross_entropy_with_logits(lin((x - mu) / sd)[:, 0], t).backward()
            opt.step()
    w = lin.weight.detach()[0] / sd
    return w, float(lin.bias.detach()[0] - w @ mu)


class TableEviction(PredictedEviction):
    """PredictedEviction whose scores come from a precomputed [N, L, E] table (offline analysis only).

    simulate() calls update(layer, ...) once per token and layer in trace order; `rows` lists the trace
    row of each simulated token, so the k-th update of a layer reads row rows[k]."""

    def __init__(self, L: int, E: int, table: torch.Tensor, rows: list[int]) -> None:
        super().__init__(L, E)
        self.table, self.rows = table.numpy(), rows
        self.seen = [0] * L

    def update(self, layer: int, probs, used=None) -> None:
        n = self.rows[self.seen[layer]]
        self.seen[layer] += 1
        self.score[layer * self.E:(layer + 1) * self.E] = self.table[n, layer]


def hit_rate(tr: Trace, table: torch.Tensor | None, policy: str, max_tokens: int, slots: int) -> tuple[float, float]:
    """(hit rate, Belady) of one document's first max_tokens tokens."""
    import tiered.predict.simulate as sim

    L, E = tr.num_layers, tr.num_experts
    if table is None:
        r = simulate(tr, TierModel(slots=slots * L, policy=policy), max_tokens=max_tokens)
        return r.hits / r.uses, r.belady_hits / r.uses
    rows = list(range(min(tr.num_tokens, max_tokens)))
    orig = sim._make_policy
    sim._make_policy = lambda tiers, L_, E_: TableEviction(L, E, table, rows)
    try:
        r = simulate(tr, TierModel(slots=slots * L, policy="predicted"), max_tokens=max_tokens)
    finally:
        sim._make_policy = orig
    return r.hits / r.uses, r.belady_hits / r.uses


def main() -> None:
    from tiered.engine import load
    from tiered.predict.trace import TraceRecorder, record, split_ids

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--horizon", type=int, default=4, help="target: used again within this many tokens")
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--slots-per-layer", type=int, default=16)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    t0 = time.perf_counter()
    rec = TraceRecorder()
    eng = load(None, device="cpu", dtype="float32", observer=rec)

    def trace_files(part: str) -> list[Trace]:
        return [record(eng, rec, split_ids(p.name, eng.encode(p.read_text()), min(a.max_tokens, eng.max_context)))
                for p in sorted((TEXT / part).glob("*"))]

    fit_docs, evals = trace_files("fit"), trace_files("eval")
    fit = concat(fit_docs)
    params = transition_params(fit)
    print(f"traced fit ({fit.num_tokens} tokens) and eval in {time.perf_counter() - t0:.0f} s", flush=True)
    Xf = features(fit, params.time_trans, params.prior)
    target = torch.from_numpy(next_use(fit) <= a.horizon)
    # next-token gate: cross-fitted on fit/ (each half's feature from a gate fitted on the other half)
    halves = [[d for i, d in enumerate(fit_docs) if i % 2 == h] for h in (0, 1)]
    gates = [fit_next_token_gate(concat(hv)) for hv in halves]
    ntf = torch.cat([apply_next_token_gate(gates[1 - (i % 2)], d) for i, d in enumerate(fit_docs)])
    nt_all = fit_next_token_gate(fit)
    use_f = torch.from_numpy(next_use(fit))
    variants = {
        "learned": (Xf, lambda tr, X: X),
        "learned+next-token-gate": (torch.cat([Xf, ntf[..., None]], -1),
                                    lambda tr, X: torch.cat([X, apply_next_token_gate(nt_all, tr)[..., None]], -1)),
    }
    for k in (1, 2):
        orc = torch.stack([(use_f <= j).float() for j in range(1, k + 1)], -1)
        variants[f"oracle-next-{k}"] = (torch.cat([Xf, orc], -1), lambda tr, X, k=k: torch.cat(
            [X, torch.stack([(torch.from_numpy(next_use(tr)) <= j).float() for j in range(1, k + 1)], -1)], -1))
    weights = {name: fit_score(X, target) for name, (X, _) in variants.items()}
    rows: dict[str, dict[str, float]] = {}
    for tr in evals:
        tr = tr.doc(0, a.max_tokens)  # the first max_tokens tokens of each eval file (docs/metrics.md)
        name = tr.doc_names[0]
        Xe = features(tr, params.time_trans, params.prior)
        row = {}
        row["lru"], row["belady"] = hit_rate(tr, None, "lru", a.max_tokens, a.slots_per_layer)
        row["predicted"] = hit_rate(tr, None, "predicted", a.max_tokens, a.slots_per_layer)[0]
        for v, (_, make) in variants.items():
            w, b = weights[v]
            row[v] = hit_rate(tr, make(tr, Xe) @ w + b, "", a.max_tokens, a.slots_per_layer)[0]
        rows[name] = row
        print(name, {k: round(x, 4) for k, x in row.items()}, flush=True)
    cols = list(next(iter(rows.values())))
    mean = {c: float(np.mean([r[c] for r in rows.values()])) for c in cols}
    print(f"\n{'file':<28}" + "".join(f"{c[:14]:>15}" for c in cols))
    for f, r in [*rows.items(), ("MEAN", mean)]:
        print(f"{f[:27]:<28}" + "".join(f"{r[c]:>15.1%}" for c in cols))
    gap = {c: 100 * (mean["belady"] - mean[c]) for c in cols if c != "belady"}
    print("points below Belady (mean): " + ", ".join(f"{c} {g:.1f}" for c, g in gap.items()))
    from benchmeta import git_commit

    out = {"bench": "eviction_ceiling", "date": time.strftime("%Y-%m-%d"), "commit": git_commit(short=True),
           "device": f"cpu ({os.cpu_count()} cores)", "horizon": a.horizon, "slots_per_layer": a.slots_per_layer, "max_tokens": a.max_tokens, "files": rows,
           "mean": mean, "gap_points": gap, "seconds": time.perf_counter() - t0}
    if a.out:
        a.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
