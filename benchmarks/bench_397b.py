"""Qwen3.5-397B-A17B on a laptop, emulated on the GPU box (issue 16): slices, scaled budgets, replayed routing, and
the tier simulator's projection to 60 layers on the target machine (8 GB VRAM, 64 GB RAM, 7 GB/s NVMe, PCIe 25 GB/s).

Phases (each one device call of < 9 minutes; --work keeps layouts and state.json between calls on a warm machine, and
a phase rebuilds what it needs when the machine came back cold):
  write    two random q4 slices of the 397B shape (tools/write_random_layout.py, 3:1 DeltaNet:attention): A with N
           layers and B with M layers (N, M multiples of 4; N as large as the free disk allows after B and a margin;
           nothing outside --work is touched). About 1 GB/s: 8 + 4 layers (46 GB) in about a minute.
  slice    per slice, K = 10 and K = 4 (--experts-per-token), routing replayed from the reference model's eval traces
           (predict/replay.py map_routing) and uniform (the pessimistic case): batch-1 decode tok/s and ms per
           layer, hit rates, bytes, at the target's budgets scaled to the slice:
             VRAM  7.45 GiB: the embeddings and lm_head are subtracted, the rest scaled by N/60. When tiered's own
                   dense weights of the slice do not fit that (session 5: Gated DeltaNet projections were not
                   quantized and the embeddings stayed bf16 on the GPU, 14.8 GB at 60 layers; since session 53 an
                   untied table is left out, --embed auto keeping it in pinned RAM), the slice gets the expert slots
                   the target would have with Flash-MoE's 5.5 GB of non-expert weights (--target-dense-gb), scaled,
                   and the JSON says so (budget_mode). The projection's "today" slots are tiered's own 60-layer
                   dense bytes on the GPU as placed by this commit.
             RAM   64 GiB less --os-gib for the OS and the process, scaled by N/60: the pinned RAM tier.
             PCIe  --h2d-gbps 25 (when this tiered has the option; the achieved GB/s is reported beside it).
           At the native K also "replay-staged": the same run with --io-register off (the RAM tier as pinned
           copies filled by page-cache reads on the I/O threads), against the registered mapped blocks of "replay".
           And "replay-pfC" for each C of --prefetch (default 4): history prefetch one layer ahead, C candidates per
           layer, ranked by router-history transitions fitted on the reference model's fit/ routing (mapped the
           same way as the replayed eval routing); the projection simulates the same predictor (fit_c bisects the
           per-layer cost, since a layer's compute hides its prefetch copies).
           --extra-kinds adds run kinds named by parts after the routing: "direct" (--io direct: O_DIRECT reads
           into the pinned RAM tier, the target's mode: 64 GB of RAM below a 209 GB model) and "cpuN" (--cpu-experts
           auto --cpu-threads N: misses whose block is in the RAM tier computed on N of this box's cores when that
           finishes first, beside the paced link), e.g. replay-direct,replay-direct-cpu8. The projection of a cpuN
           run gives the target's CPU the run's measured CPU-expert GB/s (--target-cpu-gbps overrides it).
  batch    aggregate decode tok/s of the batch scheduler at --batches (8, 32) on slice --batch-slice (B) at K = 10,
           the slice's budget flags, routing replayed per row (a different mapped window per row) and uniform;
           the rows' state (DeltaNet slots: fixed bytes per sequence; K/V pages) is reserved inside the VRAM
           budget, and the JSON gives the per-sequence bytes at 60 layers (what batch 32 costs the 8 GB target).
  balloon  slice A at K = 10, replayed routing, --io direct, with a separate process locking (mlock) the RAM the
           laptop's share does not allow, so that page cache + pinned tier cannot exceed it: the disk tier is
           exercised for real. Reported beside raw O_DIRECT reads of the same experts.bin in the same run (caches
           dropped before each).
           The target's --io direct projection (project.direct) takes the host terms of the balloon run.
  project  (CPU only) the tier simulator of `tiered tune` (predict/simulate.py, its pipelined model: the step's
           RAM-tier reads concurrent, the host walking the misses, copies queued on the link behind it), set up from
           each run's stats only: its slots and RAM slots, its link rate (the pace target), its host seconds per
           device miss and per RAM-tier miss (the cache's `host` stats; results without them: derived from
           host_s_per_layer and the disk tier's rate). One free parameter, the per-layer fixed cost (compute and the
           host's routing work), is fitted on slice A and checked on slice B: calibration_error = |predicted -
           measured| / measured must be <= 0.10 before the projection counts. Then 60 layers on the target: its
           slots and RAM tier, PCIe 25 GB/s, each RAM-tier miss read from the NVMe at 7 GB/s plus the host's
           measured work per RAM-tier miss (host.work_s_per_ram_miss: not blocked on reads), the per-layer cost plus the active bytes over the target's HBM
           (--target-hbm-gbps). projected_tok_s_k10 / _k4, and per run the per-token busy time of each term
           (compute, PCIe, host per miss, host per RAM-tier miss, disk reads) for A, B and the projection. The
           slices start with a cold RAM tier, and so does this projection; projected_tok_s_k10_warm is the same
           after --warm-tokens more tokens of routing (the target's 56 GiB RAM tier filled, as in a session).

    python3 benchmarks/bench_397b.py --phases write,slice --work /root/b397          # call 1 (~6-8 min)
    python3 benchmarks/bench_397b.py --phases balloon,project --work /root/b397      # call 2 (~3-5 min)
    python3 benchmarks/bench_397b.py --phases batch --work /root/b397                # call 3 (~4-8 min)
    python3 benchmarks/bench_397b.py --small --phases all --work /tmp/b397s          # the pipeline, tiny, CPU (~1 min)
Prints a table, then one JSON line last; writes $OUT/397b.json when OUT is set (and --work/state.json always, after
every run: a `slice` call cut short by the time limit resumes where it stopped; --redo measures everything again).
Result keys: projected_tok_s_k10, projected_tok_s_k4 (the "replay" run's projection; without one, the best run in the
target's --io direct mode with at most --target-cpu-threads CPU-expert threads, named by projected_kind_k10 / _k4),
calibration_error, plus the raw figures; date, commit, device.
"""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tools"))

from bench_offload_gpu import drop_caches, free  # noqa: E402
from benchmeta import git_commit, write_out  # noqa: E402
from write_random_layout import plan as layout_plan, write_layout  # noqa: E402

from tiered.engine import EngineError, load  # noqa: E402
from tiered.predict.predictors import History, transition_params  # noqa: E402
from tiered.predict.replay import ReplayRouting, map_routing, routing_stats, uniform_routing  # noqa: E402
from tiered.predict.simulate import TierModel, simulate  # noqa: E402
from tiered.predict.trace import Trace, TraceRecorder, record, split_ids  # noqa: E402
from tiered.store.budget import estimate_dense_bytes, estimate_kv_bytes, estimate_scratch_bytes  # noqa: E402
from tiered.store.cache import ExpertCache, resolve_embed  # noqa: E402
from tiered.store.disk import Layout  # noqa: E402
from tiered.store.options import BUDGET_KEYS, TierConfig  # noqa: E402

GiB = 1 << 30
PHASES = ("write", "slice", "batch", "balloon", "project")
TARGET_LAYERS = 60
FLASH_MOE = {"m3_max_48gb_k4": 4.36, "m3_max_48gb_k10": 1.20, "rtx4090_64gb_k4_avg": 5.35, "rtx4090_64gb_k4_peak": 5.86}


def log(msg: str) -> None:
    print(f"[397b] {msg}", file=sys.stderr, flush=True)


def meminfo(key: str) -> int | None:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# --- state ---------------------------------------------------------------------------------------------
def load_state(work: Path) -> dict:
    p = work / "state.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def save_state(work: Path, st: dict) -> None:
    (work / "state.json").write_text(json.dumps(st, indent=1))


# --- write ---------------------------------------------------------------------------------------------
def slice_sizes(a, work: Path) -> tuple[int, int]:
    """(N, M): M = --layers-b; N the largest multiple of 4 (<= --max-layers) whose layout fits the free disk next to
    B's and a margin (layouts already under --work count as free: they are replaced)."""
    if a.layers:
        return a.layers, a.layers_b
    per = layout_plan(a.preset, 4, a.experts, a.dense)
    fixed = per["dense_bytes_not_per_layer"]
    per_layer = (per["expert_bytes"] + per["dense_bytes"] - fixed) / 4
    have = shutil.disk_usage(work).free + sum(_du(work / n) for n in ("A", "B"))
    room = have - a.margin_gb * 1e9 - 2 * fixed - a.layers_b * per_layer
    n = int(room // per_layer) // 4 * 4
    n = min(n, a.max_layers)
    if n < a.layers_b + 4:
        raise SystemExit(f"{have / 1e9:.1f} GB free under {work}: not enough for two slices ({per_layer / 1e9:.2f} GB "
                         f"per layer, {fixed / 1e9:.2f} GB of embeddings each, margin {a.margin_gb} GB)")
    return n, a.layers_b


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) if Path(path).exists() else 0


def ensure_slices(a, work: Path, st: dict) -> dict:
    """Layouts A and B under --work (written when missing or of another size)."""
    want = st.get("slices") or {}
    n, m = (want.get("A", {}).get("layers"), want.get("B", {}).get("layers")) if want else slice_sizes(a, work)
    out = {}
    for name, layers in (("B", m), ("A", n)):  # B first: it is small, and A takes what is left
        path = work / name
        ok = (path / "manifest.json").is_file() and Layout.open(path).config.num_layers == layers
        info = {"layers": layers, "path": str(path)}
        if not ok:
            log(f"writing slice {name}: {layers} layers, experts {a.experts}, dense {a.dense} -> {path}")
            info["write"] = write_layout(path, preset=a.preset, layers=layers, experts=a.experts, dense=a.dense,
                                         seed=a.seed, force=True, progress=not a.no_progress, margin_gb=a.margin_gb)
        else:
            info["write"] = (want.get(name) or {}).get("write", "reused")
        out[name] = info
    st["slices"] = out
    return out


# --- routing -------------------------------------------------------------------------------------------
def find_text(a) -> Path:
    for c in ([a.text] if a.text else []) + [REPO / "shared" / "text" / "eval", REPO.parent / "shared" / "text" / "eval",
                                               REPO / ".carry" / "shared" / "text" / "eval", Path("/work/shared/text/eval")]:
        if c is not None and Path(c).is_dir():
            return Path(c)
    raise SystemExit("no eval text found: pass --text DIR (../shared/text/eval)")


def reference_trace(a, work: Path, split: str = "eval") -> Trace:
    """The reference model's routing over the eval files (router logits kept: top-10 needs them), cached in --work;
    split "fit": over the fit files beside them (what the prefetch runs' predictor learns from)."""
    from tiered.layout.families import default_model_path
    from tiered.predict.trace import load as load_trace, save as save_trace

    p = work / f"reference_{split}.npz"
    if p.is_file():
        return load_trace(p)
    text = find_text(a)
    if split != "eval":
        text = text.parent / split
        if not text.is_dir():
            raise SystemExit(f"no {split} text beside {find_text(a)}: the prefetch runs fit their predictor on it")
    dev = "cuda" if torch.cuda.is_available() and not a.small else "cpu"
    rec = TraceRecorder(logits=True, hidden=False)
    eng = load(default_model_path(), device=dev, dtype=torch.float32, max_context=2048, observer=rec, cuda_graphs=False)
    docs = []
    for f in sorted(text.iterdir()):
        docs += split_ids(f.name, eng.encode(f.read_text()), 2048)[:1]
    tr = record(eng, rec, docs)
    free(eng)
    save_trace(tr, p)
    return tr


def routing_for(kind: str, ref: Trace, layers: int, experts: int, k: int, tokens: int, a) -> Trace:
    """One document of `tokens` rows: "replay" (the first eval document long enough, mapped) or "uniform" (a
    suffix such as "-staged" names a run variant with the same routing)."""
    kind = kind.split("-")[0]
    if kind == "uniform":
        return uniform_routing(tokens, num_layers=layers, num_experts=experts, top_k=k, seed=a.seed)
    m = map_routing(ref, num_layers=layers, num_experts=experts, top_k=k, segment=a.segment, jitter=a.jitter)
    for d in range(m.num_docs):
        doc = m.doc(d, tokens)
        if doc.num_tokens >= tokens:
            return doc
    raise SystemExit(f"no mapped eval document has {tokens} tokens: lower --prompt-tokens/--new-tokens")


# --- budgets -------------------------------------------------------------------------------------------
def budgets(a, lay: Layout, k: int, device: torch.device, ctx: int) -> dict:
    """The slice's share of the target machine (module doc): the budget flags and how they were derived."""
    cfg = lay.config
    N, bs = cfg.num_layers, lay.block_size
    frac = N / TARGET_LAYERS
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    per = layout_plan(a.preset, 4, a.experts, a.dense)
    fixed = per["dense_bytes_not_per_layer"]  # embeddings + lm_head + final norm, as stored (not scaled)
    vram_slice_gib = (fixed + (a.target_vram_gib * GiB - fixed) * frac) / GiB
    dense = estimate_dense_bytes(lay, dt, ("embed",) if embed_in_pinned_ram(cfg) else ())  # the engine's --embed
    kv = estimate_kv_bytes(cfg, ctx, dt)
    scratch = estimate_scratch_bytes(cfg, bs, dt)
    slots_vram = int((vram_slice_gib * GiB - dense - kv - scratch) // bs)
    # the target with Flash-MoE's non-expert bytes: what is left of the whole 7.45 GiB for slots, scaled
    kv60 = estimate_kv_bytes(_scaled_cfg(cfg, TARGET_LAYERS), ctx, dt)
    slots_target60 = int((a.target_vram_gib * GiB - a.target_dense_gb * 1e9 - kv60 - scratch) // bs)
    # tiered as it is: its own 60-layer dense weights (embeddings and lm_head included) in the 7.45 GiB
    slots_tiered60 = int((a.target_vram_gib * GiB - a.dense_60_bytes - kv60 - scratch) // bs)
    ram_target_gib = a.target_ram_gib - a.os_gib
    out = {"vram_slice_gib": vram_slice_gib, "tiered_dense_bytes_slice": dense, "kv_bytes": kv, "scratch_bytes": scratch,
           "embeddings_lm_head_bytes": fixed, "slots_at_vram_slice": slots_vram, "slots_target_60": slots_target60,
           "slots_tiered_60": slots_tiered60,
           "ram_tier_target_gib": ram_target_gib, "ram_gb": ram_target_gib * frac, "scale": frac}
    if device.type == "cuda" and slots_vram >= k and not a.force_slots:
        out["budget_mode"] = "vram_gb"
        out["flags"] = {"vram_gb": vram_slice_gib}
    else:
        s = max(k, round(slots_target60 * frac))
        out["budget_mode"] = ("expert_slots: tiered's dense weights of the slice do not fit the scaled VRAM"
                              if slots_vram < k else "expert_slots") + \
            f" ({s} slots = the target's {slots_target60} with {a.target_dense_gb} GB of non-expert weights, x N/60)"
        out["flags"] = {"expert_slots": s}
    if a.small:  # the tiny preset's blocks are too small for the target's byte budgets: 25% slots, 40% RAM tier
        out["flags"] = {"expert_slots": max(k, N * cfg.num_experts // 4)}
        out["ram_gb"] = 0.4 * N * cfg.num_experts * bs / GiB
        out["budget_mode"] = "small: 25% of the experts in slots, 40% in the RAM tier"
    out["flags"]["ram_gb"] = out["ram_gb"]
    if a.io_register != "auto":  # every run's RAM tier as pinned copies (the staged mode), not registered blocks
        out["flags"]["io_register"] = a.io_register
    if "h2d_gbps" in BUDGET_KEYS and device.type == "cuda":
        out["flags"]["h2d_gbps"] = a.h2d_gbps
    out["h2d_paced"] = "h2d_gbps" in out["flags"]
    return out


def _scaled_cfg(cfg, layers: int):
    import dataclasses

    types = tuple("attention" if (l + 1) % 4 == 0 else "linear" for l in range(layers)) if cfg.layer_types else ()
    return dataclasses.replace(cfg, num_layers=layers, layer_types=types)


# --- one run -------------------------------------------------------------------------------------------
def kind_flags(kind: str) -> dict:
    """The budget flags a run kind's parts add: "direct" -> --io direct (the target's mode: O_DIRECT reads into
    the pinned RAM tier); "cpuN" -> --cpu-experts auto --cpu-threads N (CPU experts from the RAM tier, N threads:
    the target's CPU emulated by N of this box's cores)."""
    out: dict = {}
    for part in kind.split("-")[1:]:
        if part == "direct":
            out["io"] = "direct"
        elif part.startswith("cpu") and part[3:].isdigit():
            out.update(cpu_experts="auto", cpu_threads=int(part[3:]))
    return out


def pf_budget(kind: str) -> int:
    """Prefetch candidates per layer of a run kind: "replay-pf4" -> 4; 0 for kinds without prefetch."""
    tail = [x for x in kind.split("-")[1:] if x.startswith("pf")]
    return int(tail[0][2:]) if tail else 0


def history_predictor(a, layers: int, experts: int, k: int) -> History:
    """The router-history predictor of the prefetch runs: transitions of the reference model's fit/ routing, mapped
    onto the slice (or the 60-layer model) the same way as the replayed eval routing (never fitted on eval/)."""
    fit = map_routing(reference_trace(a, a.work, "fit"), num_layers=layers, num_experts=experts, top_k=k,
                      segment=a.segment, jitter=a.jitter)
    return History(layers, experts, transition_params(fit))


def one_run(path: Path, device: torch.device, k: int, routing: Trace, budget: dict, a,
            predictor: History | None = None) -> dict:
    """Batch-1 greedy decode of --new-tokens after a --prompt-tokens prompt, routing replayed by position; with a
    predictor (and budget prefetch_depth), the prefetcher ranks the next layer's experts with it."""
    P, n = a.prompt_tokens, a.new_tokens
    ids = torch.randint(10, 8000, (P,), generator=torch.Generator().manual_seed(7)).tolist()
    replay = ReplayRouting(routing.topk_ids, routing.topk_weights, device=device)
    t0 = time.perf_counter()
    eng = load(path, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
               max_context=P + n + 8, budget=budget, routing=replay, experts_per_token=k, predictor=predictor)
    load_s = time.perf_counter() - t0
    prov = eng.model.provider
    eng.generate(ids[:8], max_new_tokens=a.warmup, stop_at_eos=False)
    if predictor is not None:
        predictor.reset()
    if isinstance(prov, ExpertCache):
        prov.reset_stats()
    g = eng.generate(ids, max_new_tokens=n, stop_at_eos=False)
    s = dict(g.stats)
    head_s = head_seconds(eng, device)
    free(eng)
    L = routing.num_layers
    dec = s.get("decode") or {}
    tok_s = s.get("decode_tok_s")
    return {"decode_tok_s": tok_s, "ms_per_layer": 1e3 / tok_s / L if tok_s else None, "load_s": load_s,
            "prefill_tok_s": s.get("prefill_tok_s"), "hit_rate": dec.get("hit_rate"), "decode_tokens": dec.get("tokens"),
            "bytes_h2d_per_token": s.get("bytes_h2d_per_token"), "stall_share": s.get("stall_share"),
            "expert_slots": s.get("expert_slots"), "ram_slots": s.get("ram_slots"), "io": s.get("io"),
            "vram": s.get("vram"), "ram": s.get("ram"), "disk": s.get("disk"), "h2d_gbps_target": s.get("h2d_gbps_target"),
            "host_s_per_layer": s.get("host_s_per_layer"), "host": s.get("host"), "cpu_experts": s.get("cpu_experts"),
            "decode_graphs": s.get("decode_graphs"), "linear_attention": s.get("linear_attention"),
            "experts_per_token": s.get("experts_per_token"), "head_s": head_s, "budget": budget,
            "prefetch": s.get("prefetch")}


def head_seconds(eng, device: torch.device, reps: int = 20) -> float:
    """Per-token time outside the layers: the final norm, lm_head and argmax of one position (measured, so that
    the simulator's per-layer cost need not absorb it)."""
    m = eng.model
    h = torch.randn(1, m.config.hidden_size, device=device, dtype=m.dtype if hasattr(m, "dtype") else torch.float32)
    with torch.inference_mode():
        for _ in range(3):
            m.head(h).argmax(-1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            int(m.head(h).argmax(-1))
        return (time.perf_counter() - t0) / reps


def batch_routings(kind: str, ref: Trace, cfg, k: int, tokens: int, rows: int, a, device: torch.device) -> list:
    """One ReplayRouting per row: "replay" = a different `tokens`-long window of the mapped reference per row
    (round-robin over the documents), "uniform" = a different uniform trace per row (seed + row)."""
    if kind == "uniform":
        trs = [uniform_routing(tokens, num_layers=cfg.num_layers, num_experts=cfg.num_experts, top_k=k, seed=a.seed + i)
               for i in range(rows)]
        return [ReplayRouting(t.topk_ids, t.topk_weights, device=device) for t in trs]
    m = map_routing(ref, num_layers=cfg.num_layers, num_experts=cfg.num_experts, top_k=k, segment=a.segment,
                    jitter=a.jitter)
    per_doc = [[(d, o) for o in range(0, m.doc(d).num_tokens - tokens + 1, tokens)] for d in range(m.num_docs)]
    picks, i = [], 0
    while len(picks) < rows and any(per_doc):
        if per_doc[i % len(per_doc)]:
            picks.append(per_doc[i % len(per_doc)].pop(0))
        i += 1
    if len(picks) < rows:
        raise SystemExit(f"the mapped reference has {len(picks)} windows of {tokens} tokens for {rows} rows: "
                         "lower --prompt-tokens / --batch-new-tokens")
    out = []
    for d, o in picks:
        doc = m.doc(d)
        out.append(ReplayRouting(doc.topk_ids[o:o + tokens], doc.topk_weights[o:o + tokens], device=device))
    return out


def phase_batch(a, st: dict, device: torch.device) -> None:
    """Aggregate decode tok/s of the batch scheduler at --batches (8 and 32) on slice B (--batch-slice) at K = 10:
    the slice's budget flags, routing replayed per row and uniform, --prompt-tokens prompts of random ids, then
    --batch-new-tokens greedy tokens per row (bench_batch_gpu.run_b: a warm-up job, then the timed decode steps).
    The rows' state (DeltaNet slots, fixed bytes per sequence, and the attention layers' K/V pages) is reserved
    inside the slice's VRAM budget (load(state_bytes=)); the JSON gives it per sequence, and at 60 layers."""
    from bench_batch_gpu import run_b

    from tiered.decode.state import page_bytes, slot_bytes

    slices = ensure_slices(a, a.work, st)
    ref = reference_trace(a, a.work)
    name = a.batch_slice
    path = Path(slices[name]["path"])
    lay = Layout.open(path)
    cfg = lay.config
    batches = [int(x) for x in a.batches.split(",")]
    k = 10 if not a.small else cfg.top_k
    P, n, page = a.prompt_tokens, a.batch_new_tokens, 16
    tokens = P + n + 8
    B_max = max(batches)
    kv_pages = B_max * -(-tokens // page)
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    state = kv_pages * page_bytes(cfg, page, dt) + B_max * slot_bytes(cfg, dt)
    b = budgets(a, lay, k, device, tokens)
    res = st.setdefault("batch", {})
    res.update({"slice": name, "layers": cfg.num_layers, "k": k, "batches": batches, "prompt_tokens": P,
                "new_tokens": n, "state_bytes": state, "slot_bytes_per_sequence": slot_bytes(cfg, dt),
                "slot_bytes_per_sequence_60": slot_bytes(_scaled_cfg(cfg, TARGET_LAYERS), dt),
                "budget_mode": b["budget_mode"], "flags": b["flags"]})
    g = torch.Generator().manual_seed(a.seed)
    prompts = [torch.randint(10, min(8000, cfg.vocab_size), (P,), generator=g).tolist() for _ in range(B_max)]
    for kind in a.routings.split(","):
        rows = batch_routings(kind, ref, cfg, k, tokens, B_max, a, device)
        try:
            eng = load(path, device=device, dtype=dt, max_context=tokens, budget=b["flags"], experts_per_token=k,
                       cuda_graphs=False, state_bytes=state)
        except (EngineError, ValueError) as e:  # e.g. the rows' state does not fit the scaled VRAM budget
            res[kind] = {"error": str(e)}
            log(f"batch {name}/k{k}/{kind}: {e}")
            continue
        runs = res.setdefault(kind, {})
        for B in batches:
            t0 = time.perf_counter()
            r = run_b(eng, B, prompts, n, rows, kv_pages, B * P)
            runs[str(B)] = {x: y for x, y in r.items() if not x.startswith("_")}
            log(f"batch {name}/k{k}/{kind} B={B}: {r['tok_s']:.2f} tok/s aggregate, "
                f"{r['distinct_experts_per_step']:.0f} experts/step, hit {r['hit_rate']} "
                f"({time.perf_counter() - t0:.0f} s)")
            save_state(a.work, st)
        free(eng)


def phase_slice(a, st: dict, device: torch.device) -> None:
    slices = ensure_slices(a, a.work, st)
    ref = reference_trace(a, a.work)
    tokens = a.prompt_tokens + a.new_tokens + 8
    res = st.setdefault("slice", {})
    for name in ("A", "B"):
        lay = Layout.open(slices[name]["path"])
        cfg = lay.config
        for k in (10, 4) if not a.small else (cfg.top_k, max(1, cfg.top_k // 2)):
            if a.ks and k not in a.ks:
                continue
            b = budgets(a, lay, k, device, a.prompt_tokens + a.new_tokens + 8)
            kinds = a.routings.split(",")
            if a.staged and a.io_register == "auto" and k == ((10, 4) if not a.small else (cfg.top_k,))[0]:
                kinds.append("replay-staged")  # the RAM tier as pinned copies (--io-register off), native K only
            kinds += [f"replay-pf{c}" for c in a.prefetch]  # history prefetch one layer ahead, c per layer
            kinds += [x for x in a.extra_kinds.split(",") if x]
            if a.only_kinds:
                kinds = [x for x in kinds if x in a.only_kinds]
            for kind in kinds:
                key = f"{name}/k{k}/{kind}"
                if key in res and res[key].get("layers") == cfg.num_layers and not a.redo:
                    log(f"slice {key}: kept from an earlier call (--redo measures it again)")
                    continue
                log(f"slice {key}: {cfg.num_layers} layers, {b['flags']}")
                tr = routing_for(kind, ref, cfg.num_layers, cfg.num_experts, k, tokens, a)
                flags = {**b["flags"], "io_register": "off"} if kind.endswith("-staged") else dict(b["flags"])
                flags.update(kind_flags(kind))
                pred = None
                if pf_budget(kind):
                    flags.update(prefetch_depth=1, prefetch_budget=pf_budget(kind))
                    pred = history_predictor(a, cfg.num_layers, cfg.num_experts, k)
                r = one_run(Path(slices[name]["path"]), device, k, tr, flags, a, pred)
                r["routing"] = {"kind": kind, **routing_stats(tr)}
                r["budgets"] = {x: y for x, y in b.items() if x != "flags"}
                r["layers"] = cfg.num_layers
                res[key] = r
                log(f"  {r['decode_tok_s']:.2f} tok/s, {r['ms_per_layer']:.2f} ms/layer, hit {r['hit_rate']}")
                save_state(a.work, st)


# --- balloon -------------------------------------------------------------------------------------------
BALLOON = r"""
import ctypes, mmap, os, sys, time
n = int(sys.argv[1]); ready = sys.argv[2]
libc = ctypes.CDLL("libc.so.6", use_errno=True)
buf = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
locked = libc.mlock(ctypes.c_void_p(addr), ctypes.c_size_t(n)) == 0
if not locked:  # no CAP_IPC_LOCK / RLIMIT_MEMLOCK: touch every page instead (no swap on the box: they stay)
    for off in range(0, n, 4096):
        buf[off] = 1
open(ready, "w").write("locked" if locked else "touched")
while True:
    time.sleep(3600)
"""


def start_balloon(nbytes: int, work: Path) -> tuple[subprocess.Popen | None, str]:
    if nbytes <= 0:
        return None, "none"
    ready = work / "balloon.ready"
    ready.unlink(missing_ok=True)
    p = subprocess.Popen([sys.executable, "-c", BALLOON, str(nbytes), str(ready)])
    t0 = time.time()
    while not ready.is_file():
        if p.poll() is not None:
            return None, f"failed (exit {p.returncode})"
        if time.time() - t0 > 240:
            p.kill()
            return None, "timed out"
        time.sleep(0.5)
    return p, ready.read_text()


def phase_balloon(a, st: dict, device: torch.device) -> None:
    from bench_offload_gpu import odirect_bandwidth

    slices = ensure_slices(a, a.work, st)
    lay = Layout.open(slices["A"]["path"])
    cfg = lay.config
    ref = reference_trace(a, a.work)
    k = cfg.top_k
    b = budgets(a, lay, k, device, a.prompt_tokens + a.new_tokens + 8)
    kind = a.balloon_kind
    flags = {**b["flags"], "io": "direct", **kind_flags(kind)}
    allowed = b["ram_gb"] * GiB + a.process_gib * GiB  # the laptop's share for this slice: RAM tier + the process
    avail = meminfo("MemAvailable") or 0
    size = int(max(0, avail - allowed - a.balloon_safety_gib * GiB)) if not a.small else 0
    out: dict = {"allowed_gib": allowed / GiB, "mem_available_gib": avail / GiB, "balloon_gib": size / GiB,
                 "experts_bytes": cfg.num_layers * cfg.num_experts * lay.block_size, "kind": kind}
    log(f"balloon: {size / GiB:.1f} GiB of {avail / GiB:.1f} available (the slice may use {allowed / GiB:.1f} GiB)")
    proc, how = start_balloon(size, a.work)
    out["balloon"] = how
    try:
        out["drop_caches"] = drop_caches()
        raw = odirect_bandwidth(lay.experts_path, lay.block_size,
                                int(a.odirect_gb * 1e9) if not a.small else lay.manifest.experts_size, a.io_threads,
                                4 << 20 if lay.block_size >= 4 << 20 else lay.block_size)
        out["odirect_raw"] = raw
        drop_caches()
        tr = routing_for(kind, ref, cfg.num_layers, cfg.num_experts, k, a.prompt_tokens + a.new_tokens + 8, a)
        r = one_run(Path(slices["A"]["path"]), device, k, tr, flags, a)
        r["mem_available_during_gib"] = (meminfo("MemAvailable") or 0) / GiB
        r["layers"] = cfg.num_layers
        out["run"] = r
        disk = r.get("disk") or {}
        out["disk_gbps"] = disk.get("gbps")
        out["disk_vs_odirect"] = disk["gbps"] / raw["gbps"] if disk.get("gbps") and raw.get("gbps") else None
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    st["balloon"] = out


# --- project -------------------------------------------------------------------------------------------
TERMS = ("compute", "pcie", "host_miss", "host_ram_miss", "disk_read", "cpu_experts")


def sim_decode(tr: Trace, tm: TierModel, prompt: int, warm: int, head_s: float = 0.0,
               predictor: History | None = None) -> tuple[float, int, dict]:
    """Modelled decode seconds and tokens of a run: the warm-up rows, then prompt + decode rows (the engine replays
    by position, so both start at row 0); decode = everything after the prompt of the second pass, plus head_s
    (final norm, lm_head, argmax) per token. The dict is the simulator's, with "terms_ms_per_token": each
    resource's busy time per decode token (they overlap in the pipelined model, so they need not add up)."""
    n = tr.num_tokens
    rows = np.concatenate([np.arange(min(warm, n)), np.arange(n)])
    pre = np.concatenate([np.arange(min(warm, n)), np.arange(prompt)])

    def run(idx):
        t = Trace(tr.tokens[idx], np.array([0, len(idx)], dtype=np.int64), tr.topk_ids[idx], tr.topk_weights[idx],
                  meta=tr.meta)
        return simulate(t, tm, predictor=predictor, with_belady=False)

    full, first = run(rows), run(pre)
    n_dec = full.tokens - first.tokens
    d = full.to_dict()
    ft, st = full.extra["terms_s"], first.extra["terms_s"]
    terms = {k: (ft[k] - st[k]) / max(n_dec, 1) * 1e3 for k in TERMS}
    terms["head"] = head_s * 1e3
    terms["total"] = (full.seconds - first.seconds + head_s * n_dec) / max(n_dec, 1) * 1e3
    d["terms_ms_per_token"] = terms
    d["decode_ram_misses"] = full.disk_reads - first.disk_reads
    d["decode_misses"] = full.misses - first.misses
    d["decode_cpu_experts"] = full.cpu_experts - first.cpu_experts
    return full.seconds - first.seconds + head_s * n_dec, n_dec, d


def host_terms(r: dict, block: int) -> dict:
    """The host seconds per device-tier miss and per RAM-tier miss of run `r`, from its stats only: the expert
    cache's `host` (the miss path timed in get(): docs/stats.md) when the run has it; else (results of a tiered
    without it) derived from `host_s_per_layer` and the disk tier's measured rate: a RAM-tier miss costs one
    block at disk.gbps (the registration path was serial on the host), and the rest of the decode's host time is
    spread over its device misses (decode RAM-tier misses estimated by the RAM tier's miss share)."""
    h = r.get("host") or {}
    if h.get("s_per_vram_miss") is not None:
        rm = h.get("ram_misses") or 0
        reg = (h.get("register_s") or 0.0) / rm if rm else 0.0
        # on the target a RAM-tier miss pays its NVMe read (the disk term) plus the host's own work on it: the RAM
        # tier's time not blocked on reads or checks (registration included); older stats: registration alone
        work = h.get("work_s_per_ram_miss")
        hv = h["s_per_vram_miss"]
        ncpu = (r.get("cpu_experts") or {}).get("count") or 0
        if ncpu and "cpu_misses" not in h and h.get("vram_misses", 0) > ncpu:
            # results of a tiered whose s_per_vram_miss divided the miss path's time by every device miss, the
            # CPU experts included (they spend none of it): per copied miss instead (CPU experts are decode-only)
            hv = hv * h["vram_misses"] / (h["vram_misses"] - ncpu)
        return {"source": "stats.host", "s_per_vram_miss": hv,
                "s_per_ram_miss": h.get("s_per_ram_miss") or 0.0, "register_s_per_ram_miss": reg,
                "target_s_per_ram_miss": work if work is not None else reg,
                "verify_s_per_block": (h.get("verify_s") or 0.0) / h["verified_blocks"]
                if h.get("verified_blocks") else None}
    L, toks, K = r["layers"], r.get("decode_tokens") or 0, r.get("experts_per_token") or 1
    gbps = (r.get("disk") or {}).get("gbps") or 0.0
    hr = block / (gbps * 1e9) if gbps > 0 else 0.0
    vm = (1.0 - (r.get("hit_rate") or 0.0)) * toks * L * K
    vram_m = (r.get("vram") or {}).get("misses") or 0
    rm = ((r.get("ram") or {}).get("misses") or 0) * vm / vram_m if vram_m else 0.0
    host = (r.get("host_s_per_layer") or 0.0) * L * toks
    hv = max(0.0, (host - rm * hr) / vm) if vm else 0.0
    return {"source": "derived: host_s_per_layer, disk.gbps", "s_per_vram_miss": hv, "s_per_ram_miss": hr,
            "register_s_per_ram_miss": hr, "target_s_per_ram_miss": hr}


def link_gbps(r: dict) -> float:
    """The run's host->device rate: the pace target when copies were paced, else the device tier's measured rate."""
    return r.get("h2d_gbps_target") or (r.get("vram") or {}).get("gbps") or 25.0


def cpu_rate(r: dict) -> float:
    """A run's CPU-expert GB/s (bytes of expert blocks over the worker's compute seconds), 0 without CPU experts."""
    ce = r.get("cpu_experts") or {}
    return float(ce.get("gbps") or 0.0) if ce.get("mode") not in (None, "off") and ce.get("count") else 0.0


def calibrated_model(r: dict, block: int, layers: int, c: float) -> TierModel:
    """The simulator set up like run `r`: its slots and RAM slots, its link rate, its measured host seconds per
    device miss and per RAM-tier miss (the wait for a RAM-tier miss's read is inside the latter, so the disk term
    is off), per-layer cost c; the pipelined model (copies overlap the host's work on later misses); with CPU
    experts, the run's measured CPU-expert rate (the rest of a CPU step's cost, hand-off and result copy, is in c)."""
    ht = host_terms(r, block)
    bud = r.get("budget") or {}
    depth = int(bud.get("prefetch_depth") or 0)
    return TierModel(slots=r["expert_slots"], partition="global", policy="lru",
                     ram_slots=r["ram_slots"] or None, block_bytes=block, h2d_gbps=link_gbps(r), disk_gbps=1e9,
                     compute_s_per_layer=c, host_s_per_miss=ht["s_per_vram_miss"],
                     host_s_per_ram_miss=ht["s_per_ram_miss"], overlap=True, prefetch_depth=depth,
                     prefetch_budget=int(bud.get("prefetch_budget") or 0) if depth else 0, cpu_gbps=cpu_rate(r))


def fit_c(r: dict, tr: Trace, block: int, a, predictor: History | None = None) -> float:
    """The per-layer fixed cost (compute and the host's per-layer routing work) that makes the simulator reproduce
    run r's measured decode time: the only fitted parameter. Without prefetch the modelled time is linear in it
    (closed form); with prefetch a layer's compute hides its prefetch copies (max(c, prefetch bytes / link)), so it
    is found by bisection (the modelled time never decreases with c)."""
    meas = 1.0 / r["decode_tok_s"]  # seconds per token
    head = r.get("head_s") or 0.0

    def per_token(c: float) -> float:
        s, n, _ = sim_decode(tr, calibrated_model(r, block, tr.num_layers, c), a.prompt_tokens, a.warmup + 8, head,
                             predictor)
        return s / max(n, 1)

    if calibrated_model(r, block, tr.num_layers, 0.0).prefetch_depth == 0:
        return max(0.0, (meas - per_token(0.0)) / tr.num_layers)
    lo, hi = 0.0, meas / tr.num_layers
    if per_token(lo) >= meas:
        return 0.0
    for _ in range(24):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if per_token(mid) < meas else (lo, mid)
    return (lo + hi) / 2


def target_projection(a, ref: Trace, kind: str, k: int, c: float, ht: dict, ra: dict, block: int, E: int,
                      tokens: int, lm_head_bytes: int) -> dict:
    """The 60-layer projection on the target machine: slice A's calibrated per-layer cost `c` plus the target's
    active bytes over its HBM, host seconds `ht` (host_terms of the run whose mode the target runs), the target's
    slots, RAM tier, PCIe and NVMe rates; cold, warm (after --warm-tokens) and with tiered's dense as it is."""
    row: dict = {}
    # 60 layers on the target: slots and RAM tier of the target, its links, the per-layer cost + active bytes/HBM
    b = ra["budgets"]
    active = k * block + a.target_dense_gb * 1e9 / TARGET_LAYERS  # experts + the non-expert bytes, per layer
    c_t = c + active / (a.target_hbm_gbps * 1e9)
    tr60 = routing_for(kind, ref, TARGET_LAYERS, E, k, tokens, a)
    # host terms of slice A; a RAM-tier miss on the target reads its block from the NVMe (the disk term: the
    # step's reads concurrent at --target-disk-gbps) and then pays the host's own work on it, measured (the RAM
    # tier's time not blocked on reads: registration, bookkeeping; for results without `host` stats, the whole
    # measured host cost per RAM-tier miss: conservative)
    pf = pf_budget(kind)  # prefetch runs: the same history predictor, fitted on fit/ mapped onto 60 layers
    pred = history_predictor(a, TARGET_LAYERS, E, k) if pf else None
    # CPU-expert runs: the target's CPU computes at --target-cpu-gbps, default the run's own measured rate (N of
    # this box's cores, the run kind's cpuN: the emulated CPU)
    cpu_g = cpu_rate(ra)
    if cpu_g and a.target_cpu_gbps is not None:
        cpu_g = a.target_cpu_gbps
    tm = TierModel(slots=max(k, b["slots_target_60"]), partition="global", policy="lru",
                   ram_slots=int(b["ram_tier_target_gib"] * GiB // block), block_bytes=block,
                   h2d_gbps=a.h2d_gbps, disk_gbps=a.target_disk_gbps, compute_s_per_layer=c_t,
                   host_s_per_miss=ht["s_per_vram_miss"], host_s_per_ram_miss=ht["target_s_per_ram_miss"],
                   overlap=True, prefetch_depth=1 if pf else 0, prefetch_budget=pf, cpu_gbps=cpu_g)
    head_t = (ra.get("head_s") or 0.0) + lm_head_bytes / (a.target_hbm_gbps * 1e9)
    s60, n60, d60 = sim_decode(tr60, tm, a.prompt_tokens, a.warmup + 8, head_t, pred)
    if a.warm_tokens > 0:  # the same after --warm-tokens more tokens of routing: RAM tier and slots in use
        try:
            trw = routing_for(kind, ref, TARGET_LAYERS, E, k, tokens + a.warm_tokens, a)
            sw, nw, dw = sim_decode(trw, tm, a.warm_tokens + a.prompt_tokens, 0, head_t, pred)
            row["projected_tok_s_warm"] = nw / sw if sw > 0 else None
            row["sim_60_warm"] = {x: dw.get(x) for x in ("ram_hit_rate", "terms_ms_per_token", "cpu_share")}
        except SystemExit as e:  # no eval document that long
            row["projected_tok_s_warm"] = None
            row["sim_60_warm"] = {"error": str(e)}
    import dataclasses
    # tiered's own dense bytes on the GPU as this commit places them (a.dense_60_bytes: --embed's default applied),
    # from the slots the target has with --target-dense-gb of them (the same KV cache and scratch; within one slot of
    # the slice phase's slots_tiered_60, which a state from before session 53 computed with the table on the GPU)
    today = int(b["slots_target_60"] + (a.target_dense_gb * 1e9 - a.dense_60_bytes) // block)
    tm_today = dataclasses.replace(tm, slots=max(k, today))
    st60, nt60, _ = sim_decode(tr60, tm_today, a.prompt_tokens, a.warmup + 8, head_t, pred)
    row["projected_tok_s_today"] = nt60 / st60 if st60 > 0 else None  # tiered's dense as it is
    row["target_slots_today"] = tm_today.slots
    row.update({"projected_tok_s": n60 / s60 if s60 > 0 else None, "c_target_s_per_layer": c_t,
                "head_target_s": head_t, "target_cpu_gbps": cpu_g,
                "target_slots": tm.slots, "target_ram_slots": tm.ram_slots,
                "sim_60": {x: d60.get(x) for x in ("hit_rate", "ram_hit_rate", "bytes_h2d_per_token",
                                                   "bytes_disk_per_token", "stall_share", "terms_ms_per_token",
                                                   "prefetch_precision", "cpu_share")}})
    return row


def embed_in_pinned_ram(cfg) -> bool:
    """Whether tiered's default --embed keeps this model's embedding table in pinned RAM on the target: auto (or
    host) and an lm_head not tied to the table; the 397B's experts never all fit an 8 GB card, so auto takes the
    host (store/cache.auto_embed_plan)."""
    return resolve_embed(TierConfig.embed, cuda=True, tied=bool(getattr(cfg, "tie_word_embeddings", False)),
                         slots_given=False) != "gpu"


def phase_project(a, st: dict) -> None:
    sl = st.get("slice") or {}
    if not sl:
        raise SystemExit("project needs the slice phase's results in --work/state.json: run --phases slice first")
    ref = reference_trace(a, a.work)
    slices = st["slices"]
    E = int(sl[next(iter(sl))]["routing"]["num_experts"])
    lay_a = Layout.open(slices["A"]["path"]) if Path(slices["A"]["path"]).exists() else None
    block = lay_a.block_size if lay_a is not None else layout_plan(a.preset, 4, a.experts, a.dense)["block_size"]
    tokens = a.prompt_tokens + a.new_tokens + 8
    lm_head_bytes = st["model_60"]["embeddings_lm_head_bytes"] - st["model_60"].get("embedding_bytes", 0)
    out: dict = {"target": {"vram_gib": a.target_vram_gib, "ram_gib": a.target_ram_gib, "os_gib": a.os_gib,
                            "nvme_gbps": a.target_disk_gbps, "pcie_gbps": a.h2d_gbps, "hbm_gbps": a.target_hbm_gbps,
                            "non_expert_gb": a.target_dense_gb},
                 "runs": {}}
    proj: dict = {}
    for key, ra in sl.items():
        name, kk, kind = key.split("/")
        if name != "A":
            continue
        rb = sl.get(f"B/{kk}/{kind}")
        k = int(kk[1:])
        tra = routing_for(kind, ref, ra["layers"], E, k, tokens, a)
        pa = history_predictor(a, ra["layers"], E, k) if pf_budget(kind) else None
        c = fit_c(ra, tra, block, a, pa)
        ht = host_terms(ra, block)
        _, _, da = sim_decode(tra, calibrated_model(ra, block, ra["layers"], c), a.prompt_tokens, a.warmup + 8,
                              ra.get("head_s") or 0.0, pa)
        row: dict = {"c_s_per_layer": c, "measured_A_tok_s": ra["decode_tok_s"], "host_terms_A": ht,
                     "link_gbps_A": link_gbps(ra), "terms_A_ms_per_token": da["terms_ms_per_token"],
                     "measured_A_ms_per_token": 1e3 / ra["decode_tok_s"]}
        if rb:
            trb = routing_for(kind, ref, rb["layers"], E, k, tokens, a)
            pb = history_predictor(a, rb["layers"], E, k) if pf_budget(kind) else None
            sb, nb, db = sim_decode(trb, calibrated_model(rb, block, rb["layers"], c), a.prompt_tokens,
                                    a.warmup + 8, rb.get("head_s") or 0.0, pb)
            pred = nb / sb if sb > 0 else None
            row.update({"predicted_B_tok_s": pred, "measured_B_tok_s": rb["decode_tok_s"],
                        "calibration_error": abs(pred - rb["decode_tok_s"]) / rb["decode_tok_s"] if pred else None,
                        "host_terms_B": host_terms(rb, block), "terms_B_ms_per_token": db["terms_ms_per_token"]})
        row.update(target_projection(a, ref, kind, k, c, ht, ra, block, E, tokens, lm_head_bytes))
        out["runs"][f"{kk}/{kind}"] = row
        proj[(k, kind)] = row
    bal = (st.get("balloon") or {}).get("run")
    bal_kind = (st.get("balloon") or {}).get("kind") or "replay"
    cal = out["runs"].get(f"k{bal['experts_per_token']}/{bal_kind}") if bal else None
    if bal and cal and bal.get("decode_tok_s"):  # the disk term checked too: slice A from disk, predicted with A's cost
        trb = routing_for(bal_kind, ref, bal["layers"] if "layers" in bal else st["slices"]["A"]["layers"], E,
                          bal["experts_per_token"], tokens, a)
        sb, nb, _ = sim_decode(trb, calibrated_model(bal, block, trb.num_layers, cal["c_s_per_layer"]),
                               a.prompt_tokens, a.warmup + 8, bal.get("head_s") or 0.0)
        pred = nb / sb if sb > 0 else None
        out["balloon_check"] = {"kind": bal_kind, "predicted_tok_s": pred, "measured_tok_s": bal["decode_tok_s"],
                                "error": abs(pred - bal["decode_tok_s"]) / bal["decode_tok_s"] if pred else None}
        # The target's RAM (64 GB) is far below the model (209 GB): it runs --io direct, the RAM tier a pinned pool
        # that O_DIRECT reads land in (no page cache to register). The balloon run is that mode, so its host terms
        # are the target's; each K's per-layer cost stays the one calibrated on its slice A replay run, and the
        # balloon check above validates the model on the direct run. K = 4 borrows K = 10's host terms (per-miss
        # work does not depend on K).
        ht_d = host_terms(bal, block)
        out["direct"] = {"host_terms": ht_d, "balloon_check_error": out["balloon_check"]["error"], "runs": {}}
        for (k, kind), r in sorted(proj.items()):
            if kind != "replay" and not pf_budget(kind):
                continue
            ra = sl[f"A/k{k}/{kind}"]
            row = target_projection(a, ref, kind, k, r["c_s_per_layer"], ht_d, ra, block, E, tokens, lm_head_bytes)
            row["host_terms_from"] = f"balloon run (io direct, K={bal['experts_per_token']})"
            out["direct"]["runs"][f"k{k}/{kind}"] = row
    errs = [r["calibration_error"] for r in out["runs"].values() if r.get("calibration_error") is not None]
    out["calibration_error"] = max(errs) if errs else None
    out["calibration_ok"] = out["calibration_error"] is not None and out["calibration_error"] <= 0.10
    ks = sorted({k for k, _ in proj})
    for label, k in (("k10", ks[-1]), ("k4", ks[0])):  # native and cut K (10 and 4; the tiny preset's 4 and 2)
        r = proj.get((k, "replay"))
        kind_used = "replay" if r else None
        if r is None:  # no mmap run: the best of the runs in the target's own mode (--io direct, cpuN or not)
            best = max(((kd, x) for (kp, kd), x in proj.items() if kp == k and kind_flags(kd).get("io") == "direct"
                        and kind_flags(kd).get("cpu_threads", 0) <= a.target_cpu_threads
                        and not pf_budget(kd) and x.get("projected_tok_s")), key=lambda t: t[1]["projected_tok_s"],
                       default=(None, None))
            kind_used, r = best
        st[f"projected_kind_{label}"] = kind_used
        st[f"projected_tok_s_{label}"] = r["projected_tok_s"] if r else None
        u = proj.get((k, "uniform"))
        st[f"projected_tok_s_{label}_uniform"] = u["projected_tok_s"] if u else None
        st[f"projected_tok_s_{label}_today"] = r.get("projected_tok_s_today") if r else None
        st[f"projected_tok_s_{label}_warm"] = r.get("projected_tok_s_warm") if r else None
        g = proj.get((k, "replay-staged"))
        st[f"projected_tok_s_{label}_staged"] = g["projected_tok_s"] if g else None
        dr = ((out.get("direct") or {}).get("runs") or {}).get(f"k{k}/replay")
        st[f"projected_tok_s_{label}_direct"] = dr["projected_tok_s"] if dr else None
        st[f"projected_tok_s_{label}_direct_warm"] = dr.get("projected_tok_s_warm") if dr else None
        for (kp, kind), r in proj.items():  # runs of the extra kinds (direct, cpuN): their own mode's host terms
            if kp == k and kind_flags(kind) and not pf_budget(kind):
                tag = kind.split("-", 1)[1]
                st[f"projected_tok_s_{label}_{tag}"] = r["projected_tok_s"]
                st[f"projected_tok_s_{label}_{tag}_warm"] = r.get("projected_tok_s_warm")
        for (kp, kind), r in proj.items():  # prefetch runs: mmap mode, and direct with the balloon's host terms
            if kp == k and pf_budget(kind):
                tag = kind.split("-", 1)[1]
                st[f"projected_tok_s_{label}_{tag}"] = r["projected_tok_s"]
                drp = ((out.get("direct") or {}).get("runs") or {}).get(f"k{k}/{kind}")
                st[f"projected_tok_s_{label}_direct_{tag}"] = drp["projected_tok_s"] if drp else None
                st[f"projected_tok_s_{label}_direct_{tag}_warm"] = drp.get("projected_tok_s_warm") if drp else None
    st["calibration_error"] = out["calibration_error"]
    st["project"] = out


# --- main ----------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phases", default="write,slice")
    ap.add_argument("--work", type=Path, default=Path("/root/b397"))
    ap.add_argument("--small", action="store_true", help="the tiny preset on the CPU: checks the whole pipeline")
    ap.add_argument("--layers", type=int, default=None, help="slice A's layers [default: as many as fit the disk]")
    ap.add_argument("--layers-b", type=int, default=4, help="slice B's layers (the calibration check)")
    ap.add_argument("--max-layers", type=int, default=16)
    ap.add_argument("--margin-gb", type=float, default=4.0, help="disk left free after both slices")
    ap.add_argument("--experts", default="q4")
    ap.add_argument("--dense", default="q4")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--text", type=Path, default=None, help="eval texts [default: ../shared/text/eval]")
    ap.add_argument("--routings", default="replay,uniform")
    ap.add_argument("--no-staged", dest="staged", action="store_false",
                    help="skip the replay-staged runs (native K, replayed routing, --io-register off: the RAM tier "
                         "as pinned copies read on the I/O threads instead of registered mapped blocks)")
    ap.add_argument("--io-register", default="auto", choices=("auto", "off"),
                    help="the RAM tier of every run: registered mapped blocks when CUDA accepts them (auto), or "
                         "pinned copies filled on the I/O threads (off; then no separate replay-staged runs)")
    ap.add_argument("--segment", type=int, default=128)
    ap.add_argument("--jitter", type=float, default=0.25)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--target-vram-gib", type=float, default=7.45)
    ap.add_argument("--target-ram-gib", type=float, default=64.0)
    ap.add_argument("--os-gib", type=float, default=8.0, help="the target's RAM kept by the OS, apps and the process")
    ap.add_argument("--target-dense-gb", type=float, default=5.5, help="non-expert bytes on the target (Flash-MoE's)")
    ap.add_argument("--target-disk-gbps", type=float, default=7.0)
    ap.add_argument("--warm-tokens", type=int, default=256,
                    help="project: also project after this many more tokens of routing (the target's RAM tier "
                         "warm, as in a session), beside the cold start the slices measured (0: skip)")
    ap.add_argument("--target-hbm-gbps", type=float, default=400.0)
    ap.add_argument("--target-cpu-gbps", type=float, default=None,
                    help="the target CPU's expert GB/s for cpuN runs [default: the run's measured rate]")
    ap.add_argument("--target-cpu-threads", type=int, default=8,
                    help="the target's CPU cores: the headline takes cpuN runs with N up to this [default 8]")
    ap.add_argument("--extra-kinds", default="",
                    help="slice phase: more run kinds, routing plus parts (direct, cpuN), e.g. replay-direct-cpu8")
    ap.add_argument("--h2d-gbps", type=float, default=25.0)
    ap.add_argument("--force-slots", action="store_true", help="use the target's scaled slot count even if VRAM fits")
    ap.add_argument("--process-gib", type=float, default=6.0, help="balloon: RAM the engine process needs beyond its tier")
    ap.add_argument("--balloon-safety-gib", type=float, default=4.0)
    ap.add_argument("--odirect-gb", type=float, default=4.0)
    ap.add_argument("--balloon-kind", default="replay",
                    help="balloon: the run kind (routing plus parts, e.g. replay-direct-cpu8; --io direct always)")
    ap.add_argument("--io-threads", type=int, default=16)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--redo", action="store_true", help="measure slice runs again that state.json already holds")
    ap.add_argument("--resume-from", type=Path, default=None,
                    help="a 397b.json of an earlier call: its results seed --work/state.json when that is missing (a "
                         "machine that came back cold; or `--phases project` on a CPU from the returned JSON)")
    ap.add_argument("--prefetch", default="4",
                    help="slice phase: history-prefetch runs (kind replay-pfC, one layer ahead, C candidates per layer), "
                         "comma-separated C; empty for none")
    ap.add_argument("--only-kinds", default=None,
                    help="slice phase: only these run kinds (e.g. replay-pf4; the others are kept from --resume-from)")
    ap.add_argument("--ks", default=None, help="slice phase: only these experts per token (e.g. 10; default 10 and 4)")
    ap.add_argument("--batches", default="8,32", help="batch phase: rows per step")
    ap.add_argument("--batch-slice", default="B", choices=("A", "B"), help="batch phase: the slice it runs on")
    ap.add_argument("--batch-new-tokens", type=int, default=32, help="batch phase: tokens generated per row")
    a = ap.parse_args()
    a.prefetch = [int(x) for x in a.prefetch.split(",") if x.strip()]
    a.only_kinds = set(a.only_kinds.split(",")) if a.only_kinds else None
    a.ks = {int(x) for x in a.ks.split(",")} if a.ks else None
    phases = list(PHASES) if a.phases == "all" else a.phases.split(",")
    bad = set(phases) - set(PHASES)
    if bad:
        raise SystemExit(f"unknown phases {sorted(bad)}; choose from {PHASES} or all")
    cuda = torch.cuda.is_available() and not a.small
    device = torch.device("cuda" if cuda else "cpu")
    if a.small:
        a.preset = "qwen35-397b-tiny"
        a.layers, a.layers_b = a.layers or 8, min(a.layers_b, 4)
        a.new_tokens, a.prompt_tokens = min(a.new_tokens, 24), min(a.prompt_tokens, 8)
    else:
        a.preset = "qwen35-397b"
        if not cuda and set(phases) & {"slice", "balloon"}:
            raise SystemExit("no CUDA device: run with --small to check the pipeline on the CPU")
    a.work.mkdir(parents=True, exist_ok=True)
    st = load_state(a.work)
    if not st and a.resume_from is not None:
        st = json.loads(Path(a.resume_from).read_text())
        log(f"state seeded from {a.resume_from}")
    st.update({"bench": "397b", "date": time.strftime("%Y-%m-%d"), "commit": git_commit(),
               "device": torch.cuda.get_device_name() if cuda else "cpu", "small": a.small, "preset": a.preset,
               "flash_moe": FLASH_MOE, "h2d_gbps_option": "h2d_gbps" in BUDGET_KEYS})
    p60 = layout_plan(a.preset, TARGET_LAYERS, a.experts, a.dense)
    # tiered today: --embed's default (auto) keeps an untied table in pinned RAM where the experts do not all fit
    a.embed_host = embed_in_pinned_ram(p60["cfg"])
    a.dense_60_bytes = p60["dense_bytes"] - (p60["embed_bytes"] if a.embed_host else 0)
    st.setdefault("box", {}).update({"disk_free_gb_at_start": shutil.disk_usage(a.work).free / 1e9,
                                     "mem_available_gib_at_start": (meminfo("MemAvailable") or 0) / GiB,
                                     "torch": torch.__version__})
    st["model_60"] = {"expert_bytes": p60["expert_bytes"], "block_size": p60["block_size"],
                      "tiered_dense_bytes": p60["dense_bytes"], "embeddings_lm_head_bytes": p60["dense_bytes_not_per_layer"],
                      "embedding_bytes": p60["embed_bytes"], "embedding_in_pinned_ram": a.embed_host,
                      "tiered_dense_bytes_on_gpu": a.dense_60_bytes}
    t0 = time.perf_counter()
    for ph in phases:
        t = time.perf_counter()
        if ph == "write":
            ensure_slices(a, a.work, st)
        elif ph == "slice":
            phase_slice(a, st, device)
        elif ph == "batch":
            phase_batch(a, st, device)
        elif ph == "balloon":
            phase_balloon(a, st, device)
        else:
            phase_project(a, st)
        st.setdefault("phase_s", {})[ph] = time.perf_counter() - t
        save_state(a.work, st)
        log(f"phase {ph} done in {time.perf_counter() - t:.0f}s")
    st["wall_s"] = time.perf_counter() - t0
    save_state(a.work, st)
    report(st)


def report(st: dict) -> None:
    for key, r in (st.get("slice") or {}).items():
        print(f"slice {key:<20} {r['layers']:>3} layers  {r['decode_tok_s'] or 0:8.2f} tok/s  "
              f"{r['ms_per_layer'] or 0:7.2f} ms/layer  hit {r['hit_rate'] or 0:.3f}  slots {r['expert_slots']}")
    bt = st.get("batch") or {}
    for kind in ("replay", "uniform"):
        if "error" in (bt.get(kind) or {}):
            print(f"batch {kind}: {bt[kind]['error']}")
            continue
        for B, r in (bt.get(kind) or {}).items():
            print(f"batch {bt['slice']}/k{bt['k']}/{kind:<8} B={B:>3} {r['tok_s'] or 0:8.2f} tok/s aggregate  "
                  f"hit {r['hit_rate'] or 0:.3f}  {r['distinct_experts_per_step']:.0f} experts/step")
    bal = st.get("balloon")
    if bal:
        print(f"balloon {bal.get('balloon')} {bal['balloon_gib']:.1f} GiB: disk {bal.get('disk_gbps')} GB/s vs raw "
              f"O_DIRECT {(bal.get('odirect_raw') or {}).get('gbps')} GB/s")
    pr = st.get("project")
    if pr:
        print("per-token terms, ms (busy time of each resource; pipelined, so they overlap): "
              + " ".join(f"{t:>9}" for t in TERMS + ("head", "total")) + "   measured")
        for key, r in pr["runs"].items():
            for lab, tk, meas in (("A", "terms_A_ms_per_token", r.get("measured_A_tok_s")),
                                  ("B", "terms_B_ms_per_token", r.get("measured_B_tok_s")),
                                  ("60", None, None)):
                tm = r.get(tk) if tk else (r.get("sim_60") or {}).get("terms_ms_per_token")
                if tm:
                    print(f"terms {key:<12} {lab:>2}  " + " ".join(f"{tm.get(t, 0.0):9.2f}" for t in TERMS +
                                                               ("head", "total"))
                          + (f"   {1e3 / meas:8.2f}" if meas else ""))
            h = r.get("host_terms_A") or {}
            print(f"host  {key:<12}  {(h.get('s_per_vram_miss') or 0) * 1e3:.3f} ms per device miss, "
                  f"{(h.get('s_per_ram_miss') or 0) * 1e3:.3f} ms per RAM-tier miss "
                  f"({(h.get('target_s_per_ram_miss', h.get('register_s_per_ram_miss')) or 0) * 1e3:.3f} ms on the "
                  f"target, registration {(h.get('register_s_per_ram_miss') or 0) * 1e3:.3f}) from {h.get('source')}")
        for key, r in pr["runs"].items():
            print(f"project {key:<14} calib err {r.get('calibration_error')}  projected 60 layers "
                  f"{r['projected_tok_s']:.2f} tok/s, warm RAM tier {r.get('projected_tok_s_warm') or 0:.2f} "
                  f"({r['target_slots']} slots; tiered's dense as it is: "
                  f"{r['projected_tok_s_today']:.2f} tok/s, {r['target_slots_today']} slots)")
        for key, r in ((pr.get("direct") or {}).get("runs") or {}).items():
            tm = (r.get("sim_60") or {}).get("terms_ms_per_token") or {}
            print(f"terms {key + '-direct':<12} 60  " + " ".join(f"{tm.get(t, 0.0):9.2f}" for t in TERMS + ("head", "total")))
            print(f"project {key}-direct (io direct, host terms of the balloon run; its check error "
                  f"{pr['direct']['balloon_check_error']}) projected 60 layers {r['projected_tok_s']:.2f} tok/s, "
                  f"warm RAM tier {r.get('projected_tok_s_warm') or 0:.2f}")
    for k in sorted(x for x in st if x.startswith("projected_tok_s_") and "uniform" not in x and "today" not in x):
        print(f"{k:<36} {st.get(k)}")
    print(f"{'calibration_error':<36} {st.get('calibration_error')}")
    print(write_out(st, "397b.json"))


if __name__ == "__main__":
    main()
