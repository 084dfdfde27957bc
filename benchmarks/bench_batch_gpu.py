"""Batched decode on the GPU (issue 14): aggregate tok/s of the expert-major scheduler at B = 1, 8, 32, 128.

Model: the 8-layer Qwen3-MoE shape of GROUND.md's llama.cpp baselines (qwen3-10b-8l: 5.61B, bf16, random
weights; tools/make_random_checkpoint.py), repacked once under --work; or, with --preset qwen35-397b, a slice of
the Qwen3.5-397B-A17B hybrid shape (issue 16: --layers N, 3 Gated DeltaNet : 1 gated attention, 512 experts,
top-10, --experts q4 by default) written straight as a layout by tools/write_random_layout.py. Each row: a
64-token prompt of random ids, then --new-tokens greedy tokens (no EOS stop). Prompts are prefilled first
(chunks ride the steps); timing covers the steps after every row has its first token.

Parts (--phases, each under 10 minutes; the checkpoint, layout and results under --work are reused):
  build    checkpoint + layout.
  vram     every expert resident on the GPU: tok/s per B (own routing and replayed routing); these runs also
           give the compute time per step that the batch bound uses.
  offload  --vram-gb 4 (whole budget: dense + the paged KV pool for B=128 + scratch + expert slots; RAM tier
           preloaded): tok/s per B, own routing and replayed routing.
Routing: "own" = the random model's router; "replay" = a different reference document per row (the reference
model's routing over fit/ + eval/ windows, tiered/predict/replay.py: 64 experts -> 128 by e' = 2e + (row % 2) for
the Qwen3 shape; for other shapes (the 397B slice) predict/replay.map_routing, the mapping bench_397b.py uses).

Batch PCIe bound (CONTRACTS): per decode step, max(compute time of that step in VRAM at the same B and
routing (median), Belady's miss bytes of that step / measured host->GPU GB/s), Belady run over the run's own
sequence of per-step, per-layer expert sets at the same slot count. bound tok/s = rows generated / sum of those.
vs_batch_bound = tok_s / bound tok/s; vs_own_misses uses the run's own miss bytes instead of Belady's.
llama.cpp references (tok/s at B = 1/8/32/128) come from --llamacpp-vram / --llamacpp-cpu (default: GROUND.md;
re-measure them in the same lease and pass them).

    python3 benchmarks/bench_batch_gpu.py --work /root/bb --phases build            # ~4 min
    python3 benchmarks/bench_batch_gpu.py --work /root/bb --phases vram             # ~3 min
    python3 benchmarks/bench_batch_gpu.py --work /root/bb --phases offload          # ~6 min
    python3 benchmarks/bench_batch_gpu.py --small --work /tmp/bb                    # whole pipeline on CPU
The Qwen3.5 hybrid shape (an 8-layer q4 slice of the 397B, ~28 GB; experts resident, then offloaded):
    python3 benchmarks/bench_batch_gpu.py --preset qwen35-397b --layers 8 --work /root/bb35 --batches 1,8,32 \
        --phases build,vram                                                          # ~5-7 min
    python3 benchmarks/bench_batch_gpu.py --preset qwen35-397b --layers 8 --work /root/bb35 --batches 1,8,32 \
        --phases offload --vram-gb 8                                                 # ~5 min
    python3 benchmarks/bench_batch_gpu.py --small --preset qwen35-397b-tiny --work /tmp/bb35   # CPU pipeline
With bench_peers.py's model and llama.cpp figures from the same lease (no second 11 GB checkpoint on the disk):
    python3 benchmarks/bench_batch_gpu.py --layout /root/peers/layout --llama-json /root/peers/llama.json \
        --work /root/bb --phases vram        (then --phases offload)
Prints a table, then one JSON line last; writes $OUT/batch_gpu.json (merged over the phases run so far, kept
in --work/batch_gpu.json).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_offload_gpu import GiB, free, h2d_bandwidth, log  # noqa: E402
from benchmeta import git_commit, write_out  # noqa: E402

from tiered.decode.scheduler import Request, SamplingParams, Scheduler  # noqa: E402
from tiered.decode.state import page_bytes, slot_bytes  # noqa: E402
from tiered.engine import load  # noqa: E402
from tiered.store.budget import estimate_dense_bytes, estimate_kv_bytes, estimate_scratch_bytes  # noqa: E402
from tiered.store.disk import Layout  # noqa: E402
from tiered.store.policy import belady_misses  # noqa: E402

BATCHES = (1, 8, 32, 128)
PAGE = 16
LLAMA_VRAM = "836,3174,7055,15752"  # GROUND.md, llama-batched-bench S_TG, all on GPU
LLAMA_CPU = "131,186,35,107"  # GROUND.md, experts on CPU (-ot exps=CPU)


def build(work: Path, preset: str, layers: int | None = None, experts: str = "q4", dense: str = "bf16") -> Path:
    from write_random_layout import PRESETS as LAYOUT_PRESETS, write_layout

    if preset in LAYOUT_PRESETS:  # the Qwen3.5 hybrid shapes: a random layout written directly (no checkpoint)
        lay = work / f"{preset}-{layers or 'all'}l-{experts}-{dense}-layout"
        if not (lay / "manifest.json").is_file():
            log(f"writing {lay.name}")
            write_layout(lay, preset=preset, layers=layers, experts=experts, dense=dense, progress=False, force=True)
        return lay
    from make_random_checkpoint import make

    from tiered.layout.repack import repack

    ckpt, lay = work / f"{preset}-ckpt", work / f"{preset}-layout"
    if not (ckpt / "config.json").is_file():
        log(f"making {preset}")
        make(preset, ckpt)
    if not (lay / "manifest.json").is_file():
        log("repacking")
        repack(ckpt, lay, force=True, progress=False)
    return lay


def replay_rows(cfg, n_rows: int, length: int, device: torch.device, text: Path) -> list:
    """Per row: a ReplayRouting over a different window of the reference model's trace of the texts, every row's
    from one ReplayBank (its arrays on the device once), so the decode-only steps replay the batch graphs as the
    own-routing runs do (decode/batchgraph.py gathers each row's routing from the bank)."""
    from tiered.layout.families import default_model_path
    from tiered.predict.replay import ReplayBank
    from tiered.predict.trace import TraceRecorder, record, split_ids

    rec = TraceRecorder(logits=True, hidden=False)  # map_routing needs the logits above the source's top-k
    eng = load(default_model_path(), device=device, dtype=torch.float32, max_context=max(length, 64), observer=rec)
    per_file = [split_ids(p.name, eng.encode(p.read_text()), length)
                for sub in ("fit", "eval") for p in sorted((text / sub).iterdir())]
    docs, i = [], 0
    while len(docs) < n_rows and any(per_file):  # windows round-robin over the files: a different one per row
        f = per_file[i % len(per_file)]
        i += 1
        while f and len(docs) < n_rows:
            d = f.pop(0)
            if len(d[1]) == length:
                docs.append(d)
                break
    if len(docs) < n_rows:
        raise SystemExit(f"the texts give only {len(docs)} windows of {length} tokens for {n_rows} rows")
    tr = record(eng, rec, docs)
    free(eng)
    direct = not cfg.layer_types and cfg.num_layers % tr.num_layers == 0 and cfg.num_experts % tr.num_experts == 0
    if not direct:  # the 397B slice (issue 16): bench_397b.py's mapping, one mapped document per row
        from tiered.predict.replay import map_routing

        m = map_routing(tr, num_layers=cfg.num_layers, num_experts=cfg.num_experts, top_k=cfg.top_k)
        out = [m.doc(d, length) for d in range(m.num_docs)]
        out = [d for d in out if d.num_tokens == length]
        if len(out) < n_rows:
            raise SystemExit(f"the mapped routing gives only {len(out)} rows of {length} tokens for {n_rows} rows")
        bank = ReplayBank([d.topk_ids for d in out[:n_rows]], [d.topk_weights for d in out[:n_rows]], device=device)
        return [bank.routing(i) for i in range(n_rows)]
    L, E = tr.num_layers, tr.num_experts
    if cfg.num_layers % L or cfg.num_experts % E:
        raise SystemExit(f"cannot map the reference routing ({L} layers x {E} experts) onto "
                         f"{cfg.num_layers} x {cfg.num_experts}")
    HL, HE = cfg.num_layers // L, cfg.num_experts // E
    ids, w = [], []
    for d in range(n_rows):
        doc = tr.doc(d)
        h = d % HE  # rows alternate between the two halves of the experts
        ids.append(np.concatenate([doc.topk_ids[:length].astype(np.int64) * HE + h] * HL, axis=1))  # [length, L', K]
        w.append(np.concatenate([doc.topk_weights[:length]] * HL, axis=1))
    bank = ReplayBank(ids, w, device=device)
    return [bank.routing(i) for i in range(n_rows)]


def slots_for(lay: Layout, vram_gb: float, kv_pages: int, ctx: int, prefill_tokens: int,
              rows: int = 0) -> tuple[int, dict]:
    """Expert slots left in --vram-gb after dense, the paged state pool (K/V or latent pages, and `rows`
    recurrent-state slots of DeltaNet layers), the engine's own state and scratch."""
    cfg, dt = lay.config, torch.bfloat16
    dense = estimate_dense_bytes(lay, dt)
    pool = kv_pages * page_bytes(cfg, PAGE, dt) + (rows * slot_bytes(cfg, dt) if cfg.num_linear_layers else 0)
    own_kv = estimate_kv_bytes(cfg, ctx, dt)
    scratch = estimate_scratch_bytes(cfg, lay.block_size, dt)
    rows = prefill_tokens * cfg.top_k * cfg.hidden_size * 2 * 4 + prefill_tokens * cfg.top_k * cfg.expert_ffn * 2 * 3
    room = int(vram_gb * GiB) - dense - pool - own_kv - scratch - rows
    brk = {"dense": dense, "kv_pool": pool, "engine_kv": own_kv, "scratch": scratch + rows}
    return max(0, room // lay.block_size), brk


PATHS = {  # --paths: the batch step's expert path and whether decode-only steps replay CUDA graphs
    "graphs": dict(experts="auto", cuda_graphs=True),  # the default: graphs when every expert is resident
    "model": dict(experts="auto", cuda_graphs=False),  # the model's expert path, eager steps
    "major": dict(experts="major", cuda_graphs=False),  # the expert-major path (the routing read per layer)
    "rowattn": dict(experts="auto", cuda_graphs=True, prefill_attention="rows"),  # prompts attended row by row
    "serial": dict(experts="auto", cuda_graphs=True, ahead=False),  # graphs, each step's picks read before the next
}


def run_b(engine, B: int, prompts: list, new: int, routings: list | None, kv_pages: int, prefill: int,
          path: str = "graphs", temperature: float = 0.0, top_p: float = 1.0) -> dict:
    """One batch job of B rows; per-step times, keys and own misses of the decode steps. temperature > 0: every
    row samples (seed = its index), on the device."""
    sch = Scheduler(engine, max_batch=B, kv_pages=kv_pages, page_size=PAGE, prefill_tokens=prefill, max_queue=B + 1,
                    record_keys=True, **PATHS[path])
    prov = engine.model.provider

    def submit(n_new: int) -> list:
        return [sch.submit(Request(str(i), prompts[i], SamplingParams(max_tokens=n_new, stop_at_eos=False,
                                                                      temperature=temperature, top_p=top_p, seed=i),
                                   routing=routings[i] if routings else None, stream=False))  # as `tiered batch`
                for i in range(B)]

    submit(4)
    sch.run_until_idle()  # warm-up: kernels, allocator, the cache's first fills
    reqs = submit(new)
    sync = torch.cuda.synchronize if engine.model.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    while any(not r.out_ids for r in reqs):  # the prompts (each row's first token comes from its last chunk)
        sch.step()
    sync()
    prefill_s = time.perf_counter() - t0
    prompt_tokens = sum(len(r.prompt_ids) for r in reqs)
    if hasattr(prov, "reset_stats"):
        prov.reset_stats()
    warm_keys = list(sch.step_keys)  # Belady sees the warm-up and prefill steps too (uncounted), as the cache did
    sch.reset_stats()
    own_misses = []
    vram = getattr(prov, "vram", None)
    while not sch.idle():
        m0 = vram.misses if vram is not None else 0
        sch.step()
        own_misses.append((vram.misses - m0) if vram is not None else 0)
    st = sch.stats()
    dec = [i for i, p in enumerate(sch.step_prefill) if not p]
    out = {"B": B, "tok_s": st["decode_tok_s"], "rows_per_step": st["rows_per_step"],
           "distinct_experts_per_step": st["distinct_experts_per_step"],
           "bytes_per_generated_token": st["bytes_per_generated_token"], "steps": st["steps"],
           "step_s_median": statistics.median(sch.step_times[i] for i in dec) if dec else None,
           "tokens": st["tokens_generated"], "hit_rate": (st.get("decode") or {}).get("hit_rate"),
           "path": path, "temperature": temperature, "top_p": top_p, "experts_path": st["experts_path"],
           "cuda_graphs": st["cuda_graphs"],
           "prefill_tokens_per_step": st["prefill_tokens"], "prefill_attention": st["prefill_attention"],
           "prefill_s": prefill_s, "prefill_tok_s": prompt_tokens / prefill_s,
           # llama-batched-bench's S: every prompt token and every generated token over the time of both phases
           "s_tok_s": (prompt_tokens + B + st["tokens_generated"]) / (prefill_s + st["decode_s"])}
    n0 = len(warm_keys)
    out["_keys"] = warm_keys + sch.step_keys
    out["_rows"] = [0] * n0 + sch.step_rows
    out["_own_misses"] = [0] * n0 + own_misses
    out["_counted"] = [False] * n0 + [not p for p in sch.step_prefill]  # the timed decode steps
    return out


def bound(run: dict, compute_s: float, slots: int, block: int, gbps: float) -> dict:
    """The batch PCIe bound over the run's decode steps (Belady over all its steps at `slots`)."""
    flat, owner = [], []
    for i, layers in enumerate(run["_keys"]):
        for keys in layers:
            flat.append(keys)
            owner.append(i)
    per_get = belady_misses(flat, slots)
    miss = [0] * len(run["_keys"])
    for i, m in zip(owner, per_get):
        miss[i] += m
    t_b = t_o = rows = 0.0
    for i, counted in enumerate(run["_counted"]):
        if not counted:
            continue
        rows += run["_rows"][i]
        t_b += max(compute_s, miss[i] * block / (gbps * 1e9))
        t_o += max(compute_s, run["_own_misses"][i] * block / (gbps * 1e9))
    if not rows:
        return {}
    b_tok_s, o_tok_s = rows / t_b, rows / t_o
    return {"batch_bound_tok_s": b_tok_s, "vs_batch_bound": run["tok_s"] / b_tok_s,
            "own_miss_bound_tok_s": o_tok_s, "vs_own_misses": run["tok_s"] / o_tok_s,
            "belady_miss_bytes_per_token": sum(m for m, c in zip(miss, run["_counted"]) if c) * block / rows,
            "compute_s_per_step": compute_s}


def profile_b(engine, B: int, prompts: list, kv_pages: int, prefill: int, path: str = "graphs",
              steps: int = 8) -> dict:
    """Device time by kernel over `steps` decode steps of B rows (own routing) under torch.profiler, after
    the prompts and a few unprofiled steps: what a decode step of the timed runs spends its time on."""
    from torch.profiler import ProfilerActivity, profile

    sch = Scheduler(engine, max_batch=B, kv_pages=kv_pages, page_size=PAGE, prefill_tokens=prefill, max_queue=B + 1,
                    **PATHS[path])
    reqs = [sch.submit(Request(str(i), prompts[i], SamplingParams(max_tokens=steps + 8, stop_at_eos=False)))
            for i in range(B)]
    while any(len(r.out_ids) < 4 for r in reqs):  # prompts, then unprofiled decode steps (captures included)
        sch.step()
    torch.cuda.synchronize()
    by: dict = {}
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            sch.step()
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            name = ev.name[:60]
            d = by.setdefault(name, [0.0, 0])
            d[0] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
            d[1] += 1
    sch.run_until_idle()
    total = sum(v[0] for v in by.values())
    top = sorted(by.items(), key=lambda kv: -kv[1][0])[:25]
    return {"B": B, "path": path, "steps": steps, "wall_ms_per_step": wall / steps * 1e3,
            "kernel_us_per_step": total / steps, "launches_per_step": sum(v[1] for v in by.values()) / steps,
            "top": [{"kernel": k, "us_per_step": v[0] / steps, "launches_per_step": v[1] / steps} for k, v in top]}


def profile_prompts(engine, B: int, prompts: list, kv_pages: int, prefill: int, path: str = "graphs") -> dict:
    """The prompt steps of B fresh rows (after a warm-up job) under torch.profiler, host and device: each step's wall
    time against its kernels' time (a step whose kernels are far below its wall is bound by the host), the top
    kernels and the host ops with the most self time."""
    from torch.profiler import ProfilerActivity, profile

    sch = Scheduler(engine, max_batch=B, kv_pages=kv_pages, page_size=PAGE, prefill_tokens=prefill, max_queue=B + 1,
                    **PATHS[path])

    def submit() -> list:
        return [sch.submit(Request(str(i), prompts[i], SamplingParams(max_tokens=2, stop_at_eos=False)))
                for i in range(B)]

    cuda = engine.model.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    submit()
    sch.run_until_idle()  # warm-up: kernels, allocator
    reqs = submit()
    sync()
    steps, walls = 0, []
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        while any(not r.out_ids for r in reqs):
            t0 = time.perf_counter()
            sch.step()
            sync()
            walls.append(time.perf_counter() - t0)
            steps += 1
    sch.run_until_idle()
    dev: dict = {}
    host: dict = {}
    for ev in prof.key_averages():
        d_us = getattr(ev, "self_device_time_total", None)
        if d_us is None:
            d_us = getattr(ev, "self_cuda_time_total", 0.0)
        if d_us and not ev.key.startswith("aten::"):  # the kernels themselves (an aten op repeats its kernels' time)
            dev[ev.key[:70]] = (d_us, ev.count)
        if ev.self_cpu_time_total:
            host[ev.key[:70]] = (ev.self_cpu_time_total, ev.count)
    kernel_us = sum(v[0] for v in dev.values())  # kernels, copies and memsets (streams that overlap count twice)
    tokens = sum(len(r.prompt_ids) for r in reqs)
    return {"B": B, "path": path, "prompt_tokens": tokens, "steps": steps, "wall_ms": sum(walls) * 1e3,
            "wall_ms_per_step": [w * 1e3 for w in walls], "kernel_ms": kernel_us / 1e3,
            "prompt_tok_s_profiled": tokens / sum(walls),
            "top_kernels": [{"kernel": k, "ms": v[0] / 1e3, "calls": v[1]}
                            for k, v in sorted(dev.items(), key=lambda kv: -kv[1][0])[:20]],
            "top_host_ops": [{"op": k, "self_ms": v[0] / 1e3, "calls": v[1]}
                             for k, v in sorted(host.items(), key=lambda kv: -kv[1][0])[:25]]}


def public(run: dict) -> dict:
    return {k: v for k, v in run.items() if not k.startswith("_")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/root/bb"))
    ap.add_argument("--phases", default="build,vram,offload")
    ap.add_argument("--preset", default="qwen3-10b-8l")
    ap.add_argument("--layers", type=int, default=8, help="qwen35-* presets: layers of the slice (3:1 DeltaNet)")
    ap.add_argument("--experts", default="q4", help="qwen35-* presets: expert format (write_random_layout.py)")
    ap.add_argument("--dense", default="bf16", help="qwen35-* presets: dense format (bf16, q8, q4)")
    ap.add_argument("--experts-per-token", type=int, default=None, help="route each token to K experts (397B: 4)")
    ap.add_argument("--small", action="store_true",
                    help="qwen3-mini (or qwen35-397b-tiny for a qwen35 preset) on CPU, B up to 8, few tokens")
    ap.add_argument("--batches", default=None, help="comma-separated B values (default 1,8,32,128)")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--vram-gb", type=float, default=4.0)
    ap.add_argument("--prefill-tokens", type=int, default=None,
                    help="prompt tokens per step (default: the scheduler's, 2048 with every expert resident on CUDA, "
                         "else 256)")
    ap.add_argument("--text", type=Path, default=Path("/work/shared/text"), help="folder with fit/ and eval/")
    ap.add_argument("--routing", default="own,replay")
    ap.add_argument("--paths", default="graphs",
                    help="vram phase: comma list of step paths (graphs: the default, decode-only steps from CUDA "
                         "graphs; model: the same expert path, eager; major: the expert-major path; rowattn: graphs "
                         "with each prompt chunk attended on its own; serial: graphs without steps ahead, each "
                         "step's picks read before the next step is built); results of the first go under "
                         "vram[routing], the others under vram_paths[path][routing]")
    ap.add_argument("--layout", type=Path, default=None,
                    help="an existing layout of the model (e.g. bench_peers.py's /root/peers/layout): no build")
    ap.add_argument("--llama-json", type=Path, default=None,
                    help="bench_peers.py's llama.json (same lease): its llama-batched-bench S_TG per B replaces "
                         "--llamacpp-vram / --llamacpp-cpu")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="vram and offload phases: every row samples at this temperature (0: greedy), seeded by its "
                         "index, on the device")
    ap.add_argument("--top-p", type=float, default=1.0, help="with --temperature: nucleus sampling's mass")
    ap.add_argument("--profile", default="",
                    help="vram phase: B values whose decode steps are profiled by kernel (torch.profiler, own routing)")
    ap.add_argument("--profile-prompts", default="",
                    help="vram phase: B values whose prompt steps (B fresh 64-token prompts) are profiled, host and "
                         "device (torch.profiler): is a batch of prompts bound by its kernels or by the host?")
    ap.add_argument("--llamacpp-vram", default=LLAMA_VRAM, help="llama-batched-bench S_TG at B = 1,8,32,128, all on GPU")
    ap.add_argument("--llamacpp-cpu", default=LLAMA_CPU, help="the same with experts on the CPU (-ot exps=CPU)")
    a = ap.parse_args()
    if not a.text.is_dir():
        alt = REPO / "shared" / "text"
        a.text = alt if alt.is_dir() else a.text
    device = torch.device("cuda" if torch.cuda.is_available() and not a.small else "cpu")
    if a.small:
        a.new_tokens, a.prompt_tokens = 8, 16
        a.preset = "qwen35-397b-tiny" if a.preset.startswith("qwen35") else "qwen3-mini"
    batches = [int(x) for x in (a.batches or ("1,4,8" if a.small else ",".join(map(str, BATCHES)))).split(",")]
    a.work.mkdir(parents=True, exist_ok=True)
    res_path = a.work / "batch_gpu.json"
    res = json.loads(res_path.read_text()) if res_path.is_file() else {}
    res.update({"bench": "batch_gpu", "commit": git_commit(), "date": time.strftime("%Y-%m-%d"), "preset": a.preset,
                "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                "prompt_tokens": a.prompt_tokens, "new_tokens": a.new_tokens, "batches": batches})
    lay_path = a.layout or build(a.work, a.preset, a.layers, a.experts, a.dense)
    lay = Layout.open(lay_path)
    cfg = lay.config
    res["model"] = {"family": cfg.family, "layers": cfg.num_layers, "linear_layers": cfg.num_linear_layers,
                    "experts": cfg.num_experts, "top_k": a.experts_per_token or cfg.top_k, "hidden": cfg.hidden_size,
                    "layout": str(lay_path), "block_bytes": lay.block_size}
    ctx = a.prompt_tokens + a.new_tokens + 16
    kv_pages = max(batches) * -(-ctx // PAGE)
    vocab = cfg.vocab_size
    g = torch.Generator().manual_seed(0)
    n_rows = max(batches + [int(x) for x in f"{a.profile},{a.profile_prompts}".split(",") if x])
    prompts = [torch.randint(10, vocab, (a.prompt_tokens,), generator=g).tolist() for _ in range(n_rows)]
    modes = [m for m in a.routing.split(",") if m]
    phases = a.phases.split(",")
    rows = None
    if "replay" in modes and ("vram" in phases or "offload" in phases):
        log("tracing the reference model for replayed routing")
        rows = replay_rows(cfg, max(batches), ctx, device, a.text)
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    for phase in ("vram", "offload"):
        if phase not in phases:
            continue
        budget = None
        if phase == "offload":
            a.prefill_tokens = a.prefill_tokens or 2048  # the offload figures of earlier sessions used 2048
            slots, brk = slots_for(lay, a.vram_gb, kv_pages, ctx, a.prefill_tokens, max(batches))
            if a.small:
                slots = max(cfg.top_k, cfg.num_layers * cfg.num_experts // 4)
            res["offload_budget"] = {"vram_gb": a.vram_gb, "expert_slots": slots, "bytes": brk}
            budget = {"expert_slots": slots, "ram_preload": True} if device.type == "cuda" else {"expert_slots": slots}
            bw = h2d_bandwidth(lay, device, 64)
            res["h2d"] = bw
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        engine = load(lay_path, device=device, dtype=dt, max_context=ctx, budget=budget, cuda_graphs=False,
                      experts_per_token=a.experts_per_token)
        log(f"{phase}: loaded in {time.perf_counter() - t0:.1f} s")
        out: dict = {}
        paths = [x for x in a.paths.split(",") if x] if phase == "vram" else ["graphs"]
        bad = [x for x in paths if x not in PATHS]
        if bad:
            raise SystemExit(f"unknown --paths {bad}: choose from {sorted(PATHS)}")
        for path in paths[1:]:  # the other paths first, so the default's figures come from the same warm process
            other = res.setdefault("vram_paths", {}).setdefault(path, {})
            for mode in modes:
                other[mode] = {}
                for B in batches:
                    r = run_b(engine, B, prompts, a.new_tokens, rows if mode == "replay" else None, kv_pages,
                              a.prefill_tokens, path, a.temperature, a.top_p)
                    log(f"{phase} {path} {mode} B={B}: {r['tok_s']:.1f} tok/s, prompts {r['prefill_tok_s']:.0f} tok/s, "
                        f"S {r['s_tok_s']:.0f} tok/s")
                    other[mode][str(B)] = public(r)
        for mode in modes:
            runs = []
            for B in batches:
                t0 = time.perf_counter()
                r = run_b(engine, B, prompts, a.new_tokens, rows if mode == "replay" else None, kv_pages,
                          a.prefill_tokens, paths[0], a.temperature, a.top_p)
                log(f"{phase} {paths[0]} {mode} B={B}: {r['tok_s']:.1f} tok/s, prompts {r['prefill_tok_s']:.0f} tok/s, "
                    f"S {r['s_tok_s']:.0f} tok/s ({time.perf_counter() - t0:.1f} s)")
                if phase == "offload":
                    comp = (res.get("vram", {}).get(mode, {}).get(str(B)) or {}).get("step_s_median")
                    if comp is None:
                        log(f"no vram run for {mode} B={B}: the bound uses compute 0 (run --phases vram first)")
                        comp = 0.0
                    pub = public(r)
                    pub.update(bound(r, comp, budget["expert_slots"], lay.block_size, bw["pinned_gbps"]))
                else:
                    pub = public(r)
                runs.append(pub)
                del r
            out[mode] = {str(r["B"]): r for r in runs}
        if phase == "vram" and a.profile and device.type == "cuda":
            for B in (int(x) for x in a.profile.split(",") if x):
                pr = profile_b(engine, B, prompts, kv_pages, a.prefill_tokens, paths[0])
                log(f"profile B={B}: {pr['kernel_us_per_step']:.0f} us of kernels a step, "
                    f"{pr['launches_per_step']:.0f} launches; " + ", ".join(
                        f"{t['kernel'][:40]} {t['us_per_step']:.0f}" for t in pr["top"][:8]))
                res.setdefault("vram_profile", {})[str(B)] = pr
        if phase == "vram" and a.profile_prompts:
            for B in (int(x) for x in a.profile_prompts.split(",") if x):
                pr = profile_prompts(engine, B, prompts, kv_pages, a.prefill_tokens, paths[0])
                log(f"prompts B={B}: {pr['steps']} steps, wall {pr['wall_ms']:.1f} ms, kernels {pr['kernel_ms']:.1f} "
                    f"ms; " + ", ".join(f"{t['kernel'][:40]} {t['ms']:.2f}" for t in pr["top_kernels"][:8])
                    + " | host: " + ", ".join(f"{t['op'][:30]} {t['self_ms']:.2f}" for t in pr["top_host_ops"][:10]))
                res.setdefault("vram_prompt_profile", {})[str(B)] = pr
        if device.type == "cuda":
            out["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GiB
        res[phase] = out
        free(engine)
    lv = [float(x) for x in a.llamacpp_vram.split(",")]
    lc = [float(x) for x in a.llamacpp_cpu.split(",")]
    source = "GROUND.md (2026-11-30)" if a.llama_json is None else str(a.llama_json)
    if a.llama_json is not None:
        runs = json.loads(a.llama_json.read_text())["runs"]
        lv = [runs["batched_gpu_bf16"]["batch"][str(b)]["s_tg_tok_s"] for b in BATCHES]
        lc = [runs["batched_cpu_experts_bf16"]["batch"][str(b)]["s_tg_tok_s"] for b in BATCHES]
    ref = dict(zip(BATCHES, zip(lv, lc)))
    if cfg.layer_types and a.llama_json is None:  # GROUND.md's figures are the Qwen3-MoE model's: no ratio here
        ref = {}
    for phase in ("vram", "offload"):
        for mode, runs in (res.get(phase) or {}).items():
            if not isinstance(runs, dict):
                continue
            for b, r in runs.items():
                if int(b) in ref:
                    r["vs_llamacpp_vram"] = r["tok_s"] / ref[int(b)][0]
                    r["vs_llamacpp_cpu_experts"] = r["tok_s"] / ref[int(b)][1]
    res["llamacpp"] = {"vram": lv, "cpu_experts": lc, "batches": list(BATCHES), "source": source,
                       "compared": bool(ref)}  # False: another model's figures, no ratios computed
    res_path.write_text(json.dumps(res))
    print(f"{'phase':<8}{'routing':<8}{'B':>5}{'tok/s':>10}{'rows':>6}{'experts/step':>14}{'vs bound':>10}"
          f"{'vs llama cpu':>14}")
    for phase in ("vram", "offload"):
        for mode, runs in (res.get(phase) or {}).items():
            if not isinstance(runs, dict):
                continue
            for b, r in runs.items():
                vb = r.get("vs_batch_bound")
                vl = r.get("vs_llamacpp_cpu_experts")
                print(f"{phase:<8}{mode:<8}{b:>5}{r['tok_s'] or 0:>10.1f}{r['rows_per_step']:>6.1f}"
                      f"{r['distinct_experts_per_step']:>14.1f}{vb if vb is not None else float('nan'):>10.2f}"
                      f"{vl if vl is not None else float('nan'):>14.2f}")
    print(write_out(res, "batch_gpu.json"))


if __name__ == "__main__":
    main()
