"""Prediction on real transfers (issue 5, GPU box): the offload run with and without prefetch, routing replayed.

Random weights route almost uniformly, so the 10.6B Qwen3-MoE shape is made to route like the
trained reference model: its eval-text trace (recorded here with tiered's own engine) is mapped onto
16 layers x 128 experts by `tiered.predict.replay.map_trace` (deterministic, no lookahead; see its
docstring) and replaces the router's choice token by token. The history predictor is fitted on the
mapped trace of ../shared/text/fit only.

Measured in one run, per eval document (64-token prompt + 128 new tokens, --vram-gb 4, RAM-backed):
  - tok/s of each --variants run: demand paging by LRU (no prediction), predictor-informed eviction
    (--policy predicted, fed by the replayed router output), and either with history prefetch (depth 1,
    C candidates per layer);
  - stall share, hit rate, prefetch issued/used (precision), H2D bytes per token (prefetches included),
    host time per token blocked on segments and routing between them;
  - Belady's demand-paging miss bytes on the same mapped routing and slot count;
  - the Belady bound of docs/metrics.md: max(compute per token, Belady miss bytes / H2D bandwidth), where
    compute per token is the all-resident CUDA-graph decode of the same model, measured in this run.
Goal: with prediction, tok/s >= 0.85 x the Belady bound. Also reported: the ratio against the run's own
bytes (max(compute, own H2D bytes / bandwidth)), which measures transfer efficiency alone, and each
variant's figures in the tier simulator with this run's compute and bandwidth (what it would reach with no
host time between segments).

    python3 benchmarks/bench_predict_gpu.py --work /root/b --text .carry/shared/text [--ckpt C --layout L]
Prints a table, then one JSON line; writes $OUT/predict_gpu.json when OUT is set.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tools"))

from bench_offload_gpu import GiB, belady_bytes, build, free, git_commit, h2d_bandwidth, log, prompt_ids  # noqa: E402
from benchmeta import write_out  # noqa: E402

from tiered import load  # noqa: E402
from tiered.layout.families import default_model_path  # noqa: E402
from tiered.predict.predictors import History, NoPrediction, transition_params  # noqa: E402
from tiered.predict.replay import ReplayRouting, map_trace  # noqa: E402
from tiered.predict.simulate import TierModel, simulate  # noqa: E402
from tiered.predict.trace import TraceRecorder, record, split_ids  # noqa: E402
from tiered.store.cache import ExpertCache  # noqa: E402
from tiered.store.disk import Layout  # noqa: E402


def reference_trace(text_dir: Path, device: torch.device, *, logits: bool = False,
                    whole: bool = False) -> "object":
    """Trace every file of text_dir with the reference model (routing only; with `logits` its router logits too),
    one document per file: its first context's worth of tokens, or with `whole` every context of it in turn."""
    rec = TraceRecorder(logits=logits, hidden=False)
    eng = load(default_model_path(), device=device, dtype=torch.float32, observer=rec)  # context: the model's limit
    docs = []
    for p in sorted(text_dir.iterdir()):
        docs += split_ids(p.name, eng.encode(p.read_text()), eng.max_context)[slice(None) if whole else slice(1)]
    tr = record(eng, rec, docs)
    free(eng)
    return tr


def run(lay: Path, device: torch.device, prompt: list[int], new: int, routing_ids: np.ndarray,
        routing_w: np.ndarray, *, budget: dict | None, predictor=None, depth: int = 1, candidates: int = 12,
        warmup: int = 8) -> dict:
    """One engine run with replayed routing (and optionally prefetch); returns its stats and get() trace.

    budget["policy"] == "predicted": the cache's ScoredEviction is fed by the prefetcher's observer
    (with `predictor`, or a predictor that reads nothing when there is no prefetch)."""
    n_tok = len(prompt) + new
    # all-resident runs time compute only, which does not depend on the routing
    replay = ReplayRouting(routing_ids, routing_w, device=device) if budget is not None else None
    if budget is not None:
        cfg = Layout.open(lay).config
        pred = predictor if predictor is not None else NoPrediction(cfg.num_layers, cfg.num_experts)
        budget = {**budget, "prefetch_depth": depth if predictor is not None else 0, "prefetch_budget": candidates}
    else:
        pred = None
    engine = load(lay, device=device, dtype=torch.bfloat16, budget=budget, max_context=n_tok + warmup + 8,
                  routing=replay, predictor=pred)
    prov = engine.model.provider
    engine.generate(prompt[:16], max_new_tokens=warmup, stop_at_eos=False)  # warm-up (rows < 24 of the trace)
    if predictor is not None:
        predictor.reset()
    cache = isinstance(prov, ExpertCache)
    if cache:
        prov.reset_stats()
        prov.record_gets()
    g = engine.generate(prompt, max_new_tokens=new, stop_at_eos=False)
    s = dict(g.stats)
    s["get_trace"] = prov.record_gets(False) if cache else None
    if engine.pieces is not None:  # host time per decode step: blocked on segments, and routing between them
        pw = engine.pieces.stats()
        s["host_ms_per_token"] = {"wait": pw["wait_s"] / max(1, pw["steps"]) * 1e3,
                                  "route": pw["route_s"] / max(1, pw["steps"]) * 1e3,
                                  "late": pw["late_s"] / max(1, pw["steps"]) * 1e3}  # overlaps the GPU
    free(engine)
    return s


def modelled(doc, n_tok: int, name: str, slots: int, block: int, h2d: float, compute: float, params) -> dict:
    """The same policy and prefetch in the tier simulator (simulate.py) on the same routing rows, with this run's
    compute per token and H2D bandwidth: no host time, demand copies stall, prefetches overlap compute. The
    simulator counts every row as a one-token step (the engine prefills the prompt in waves)."""
    pol, _, c = name.partition("+")
    c = int(c) if c else 0
    L = doc.num_layers
    pred = History(L, doc.num_experts, params) if c else None
    r = simulate(doc, TierModel(slots=slots, partition="global", policy=pol, prefetch_depth=1 if c else 0,
                                prefetch_budget=c, block_bytes=block, h2d_gbps=h2d, compute_s_per_layer=compute / L),
                 predictor=pred, max_tokens=n_tok, with_belady=False).to_dict()
    return {k: r[k] for k in ("tok_s", "hit_rate", "bytes_h2d_per_token", "stall_share", "prefetch_precision")}


DEFAULT_VARIANTS = "lru,predicted,lru+4,predicted+4"


def parse_variants(spec: str) -> list[tuple[str, int]]:
    """"lru,predicted,predicted+4,lru+12" -> [(policy, prefetch candidates per layer; 0 = no prefetch)]."""
    out = []
    for v in spec.split(","):
        pol, _, c = v.strip().partition("+")
        if pol not in ("lru", "lfu", "flru", "predicted"):
            raise SystemExit(f"--variants: unknown policy {pol!r} in {v!r}")
        out.append((pol, int(c) if c else 0))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/tiered-predict"))
    ap.add_argument("--text", type=Path, required=True, help="folder with fit/ and eval/")
    ap.add_argument("--ckpt", type=Path)
    ap.add_argument("--layout", type=Path)
    ap.add_argument("--preset", default="qwen3-10b")
    ap.add_argument("--vram-gb", type=float, default=4.0)
    ap.add_argument("--expert-slots", type=int, default=None, help="instead of --vram-gb (CPU checks)")
    ap.add_argument("--docs", type=int, default=5, help="eval documents to run (each a separate sequence)")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--variants", default=DEFAULT_VARIANTS,
                    help="policy[+C] runs, comma-separated: demand policy, and history prefetch of C candidates per "
                         "layer (depth 1) when +C is given; the first is the baseline without prediction "
                         f"(default {DEFAULT_VARIANTS})")
    ap.add_argument("--no-preload", dest="preload", action="store_false",
                    help="do not fill the RAM tier before timing (first-use hashing then lands in decode)")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    a.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res: dict = {"bench": "predict_gpu", "commit": git_commit(), "date": time.strftime("%Y-%m-%d"),
                 "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "preset": a.preset}
    ckpt, lay_path, info = build(a.work, a.preset, a.ckpt, a.layout)
    lay = Layout.open(lay_path)
    cfg = lay.config
    log("tracing the reference model on fit/ and eval/")
    fit = map_trace(reference_trace(a.text / "fit", device), num_layers=cfg.num_layers, num_experts=cfg.num_experts)
    ev = map_trace(reference_trace(a.text / "eval", device), num_layers=cfg.num_layers, num_experts=cfg.num_experts)
    params = transition_params(fit)
    res["mapping"] = {"source_layers": 8, "source_experts": 64, "H": cfg.num_layers // 8,
                      "fit_tokens": fit.num_tokens, "eval_tokens": ev.num_tokens}
    res["bandwidth"] = h2d_bandwidth(lay, device, 64)
    h2d = res["bandwidth"].get("registered_gbps") or res["bandwidth"]["pinned_gbps"]
    prompt = prompt_ids(cfg.vocab_size, a.prompt_tokens)
    n_tok = a.prompt_tokens + a.new_tokens
    # RAM-backed: every block is registered and verified (first-use xxh3) before timing, as a steady state.
    # Runs at d60b494 and before did not preload, so up to 2048 first-use hashes and registrations of 9 MiB
    # blocks (about 1 ms and 0.4 ms each) fell inside their timed decode.
    budget = {"vram_gb": a.vram_gb, "ram_gb": lay.block_size * cfg.num_layers * cfg.num_experts / GiB * 1.02 + 0.01,
              "io": "mmap", "ram_preload": a.preload}
    if a.expert_slots:
        budget = {"expert_slots": a.expert_slots, "io": "mmap"}
    variants = parse_variants(a.variants)
    rows = []
    for d in range(min(a.docs, ev.num_docs)):
        doc = ev.doc(d, n_tok + 16)
        if doc.num_tokens < n_tok + 16:
            continue
        log(f"doc {ev.doc_names[d]}: resident (compute per token)")
        rs = run(lay_path, device, prompt, a.new_tokens, doc.topk_ids, doc.topk_weights, budget=None)
        compute = 1 / rs["decode_tok_s"]
        runs = {}
        for pol, c in variants:
            name = pol + (f"+{c}" if c else "")
            log(f"doc {ev.doc_names[d]}: {name} ({'demand paging' if not c else f'history prefetch, C={c}'})")
            pred = History(cfg.num_layers, cfg.num_experts, params) if c else None
            s_ = run(lay_path, device, prompt, a.new_tokens, doc.topk_ids, doc.topk_weights,
                     budget={**budget, "policy": pol}, predictor=pred, candidates=c or 1)
            runs[name] = s_
        base = runs[next(iter(runs))]
        tokens = base["decode"]["tokens"]
        bel = belady_bytes(base["get_trace"], base["expert_slots"], lay.block_size, tokens)
        bound_s = max(compute, bel["miss_bytes_per_token"] / (h2d * 1e9))
        row = {"doc": ev.doc_names[d], "expert_slots": base["expert_slots"], "compute_s_per_token": compute,
               "belady": bel, "h2d_gbps": h2d, "belady_bound_tok_s": 1 / bound_s, "variants": {}}
        for name, s_ in runs.items():
            dec = s_["decode"]
            v = {k: s_.get(k) for k in ("decode_tok_s", "stall_share", "bytes_h2d_per_token", "bytes_prefetch_per_token",
                                          "prefetch_issued", "prefetch_used", "host_ms_per_token")}
            v["hit_rate"] = dec["hits"] / max(1, dec["hits"] + dec["misses"])
            v["prefetch_precision"] = s_["prefetch_used"] / s_["prefetch_issued"] if s_.get("prefetch_issued") else None
            v["ratio_to_belady_bound"] = s_["decode_tok_s"] * bound_s
            # docs/metrics.md: the ratio against the run's own bytes measures transfer efficiency alone
            own_s = max(compute, (s_["bytes_h2d_per_token"] or 0) / (h2d * 1e9))
            v["ratio_to_own_bytes_bound"] = s_["decode_tok_s"] * own_s
            v["modelled"] = modelled(doc, n_tok, name, s_["expert_slots"], lay.block_size, h2d, compute, params)
            row["variants"][name] = v
        rows.append(row)
    res["docs"] = rows
    res["variants"] = [pol + (f"+{c}" if c else "") for pol, c in variants]
    if rows:
        res["mean"] = {n: {k: float(np.mean([r["variants"][n][k] or 0 for r in rows]))
                           for k in ("decode_tok_s", "ratio_to_belady_bound", "ratio_to_own_bytes_bound", "hit_rate",
                                     "bytes_h2d_per_token", "stall_share")}
                       for n in res["variants"]}
        res["mean_belady_bound_tok_s"] = float(np.mean([r["belady_bound_tok_s"] for r in rows]))
        res["mean_modelled_tok_s"] = {n: float(np.mean([r["variants"][n]["modelled"]["tok_s"] for r in rows]))
                                      for n in res["variants"]}
        res["best"] = max(res["mean"], key=lambda n: res["mean"][n]["decode_tok_s"])
    res["goal"] = 0.85
    res["wall_s"] = time.perf_counter() - t0
    print(f"{'doc':<24}{'variant':<15}{'tok/s':>7}{'bound':>7}{'/bnd':>6}{'/own':>6}{'hit':>6}{'MB/t':>7}"
          f"{'stall':>6}{'prec':>6}{'wait':>6}{'route':>6}{'sim t/s':>8}{'sim hit':>8}")
    for r in rows:
        for n, v in r["variants"].items():
            hm = v.get("host_ms_per_token") or {}
            print(f"{r['doc'][:23]:<24}{n:<15}{v['decode_tok_s']:>7.1f}{r['belady_bound_tok_s']:>7.1f}"
                  f"{v['ratio_to_belady_bound']:>6.2f}{v['ratio_to_own_bytes_bound']:>6.2f}{v['hit_rate']:>6.2f}"
                  f"{v['bytes_h2d_per_token'] / 1e6:>7.0f}{v['stall_share'] or 0:>6.2f}"
                  f"{v['prefetch_precision'] or 0:>6.2f}{hm.get('wait', 0):>6.1f}{hm.get('route', 0):>6.1f}"
                  f"{v['modelled']['tok_s']:>8.1f}{v['modelled']['hit_rate']:>8.2f}")
        print(f"{'':<24}{'belady':<15}{'':>7}{'':>7}{'':>6}{'':>6}{r['belady']['hit_rate']:>6.2f}"
              f"{r['belady']['miss_bytes_per_token'] / 1e6:>7.0f}")
    line = write_out(res, "predict_gpu.json")
    print(line)


if __name__ == "__main__":
    main()
