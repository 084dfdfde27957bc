"""Offload benchmark (issue 4, GPU box): the three-tier expert cache on the 10.6B Qwen3-MoE shape.

Everything is measured in one run, batch 1, a 64-token prompt of random ids, greedy:
  0. bandwidth: host->GPU copies of expert blocks from pinned memory and from registered mmap blocks;
     in-VRAM compute time per token (every expert resident, CUDA graphs): the compute side of the bound.
  1. RAM-backed, --vram-gb 4 (--io mmap, registered, RAM tier >= all expert bytes, page cache warm):
     tok/s, miss bytes/token, Belady's miss bytes at the same slot count from the run's own get() trace,
     the two PCIe bounds of docs/metrics.md (max(compute, bytes / H2D bandwidth) with Belady's and the run's
     own miss bytes), stall share and where the decode time goes (CUDA events).
  3. --io mmap with registration on vs off (staged through pinned copies) at a RAM tier below the
     expert bytes, page cache warm: the ratio of decode tok/s.
  A. transformers + accelerate, device_map="auto", max_memory={0: "4GiB", "cpu": "100GiB"}, 16 new tokens
     (a subprocess, so that its memory never mixes with ours).
  2. disk-backed: --io direct, RAM tier below the expert bytes, after `sync; echo 3 > drop_caches`:
     the cache's sustained expert-read GB/s against raw O_DIRECT reads of the same file measured here.

    python3 benchmarks/bench_offload_gpu.py --work /root/bench            # GPU box, < 10 minutes
    python3 benchmarks/bench_offload_gpu.py --small --work /tmp/offl     # whole pipeline, tiny shape, CPU
--ckpt/--layout reuse a checkpoint and layout made elsewhere (the disk holds about one pair of 10.6B
copies: ~21 GB each). Phases can be picked with --phases (e.g. --phases build,bw,resident,ram to split across calls; the
checkpoint and layout under --work are reused). Prints a table, then one JSON line last; writes
$OUT/offload_gpu.json when OUT is set.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
from benchmeta import git_commit, write_out  # noqa: E402

from tiered.engine import load  # noqa: E402
from tiered.store.cache import ExpertCache  # noqa: E402
from tiered.store.disk import Layout  # noqa: E402
from tiered.store.hostmem import HostRegistrar, aligned_empty  # noqa: E402
from tiered.store.policy import belady  # noqa: E402

GiB = 1 << 30
ALL_PHASES = ("build", "bw", "resident", "ram", "mmap", "accelerate", "disk")


def log(msg: str) -> None:
    print(f"[offload] {msg}", file=sys.stderr, flush=True)


# --- setup ---------------------------------------------------------------------------------------
def build(work: Path, preset: str, ckpt: Path | None, lay: Path | None) -> tuple[Path, Path, dict]:
    """The random checkpoint (tools/make_random_checkpoint.py) and its layout; reused when present."""
    from make_random_checkpoint import make

    from tiered.layout.repack import repack

    ckpt = ckpt or work / f"{preset}-ckpt"
    lay = lay or work / f"{preset}-layout"
    info: dict = {"ckpt": str(ckpt), "layout": str(lay)}
    if not (ckpt / "config.json").is_file():
        t0 = time.perf_counter()
        info["make"] = make(preset, ckpt)
        info["make_s"] = time.perf_counter() - t0
    if not (lay / "manifest.json").is_file():
        t0 = time.perf_counter()
        repack(ckpt, lay, force=True, progress=False)
        info["repack_s"] = time.perf_counter() - t0
    return ckpt, lay, info


def prompt_ids(vocab: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(10, vocab, (n,), generator=g).tolist()


def free(engine=None) -> None:
    if engine is not None:
        close = getattr(engine.model.provider, "close", None)
        if close is not None:
            close()
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError as e:
        log(f"drop_caches refused ({e.strerror}): cold-read figures are not cold")
        return False


# --- 0. bandwidths -------------------------------------------------------------------------------
def h2d_bandwidth(layout: Layout, device: torch.device, n_blocks: int) -> dict:
    """GB/s of block-sized host->device copies: from a pinned buffer, and from registered mmap blocks."""
    bs = layout.block_size
    n = min(n_blocks, layout.config.num_layers * layout.config.num_experts)
    out: dict = {"block_bytes": bs, "blocks": n}
    cuda = device.type == "cuda"
    dst = torch.empty((n, bs), dtype=torch.uint8, device=device)
    buf, owner = aligned_empty(n * bs, pin=cuda)
    src = buf.view(n, bs)
    src.copy_(layout.expert_file_pool()[:n])

    def timed(rows) -> float:
        for i in range(min(4, n)):  # warm-up
            dst[i].copy_(rows[i], non_blocking=True)
        if cuda:
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for i in range(n):
                dst[i].copy_(rows[i], non_blocking=True)
            b.record()
            b.synchronize()
            secs = a.elapsed_time(b) / 1e3
        else:
            t0 = time.perf_counter()
            for i in range(n):
                dst[i].copy_(rows[i])
            secs = time.perf_counter() - t0
        return n * bs / secs / 1e9

    out["pinned_gbps"] = timed(src)
    owner.release()
    if cuda:
        mapped = layout.expert_file_pool()[:n]
        reg = HostRegistrar()
        t0 = time.perf_counter()
        codes = [reg.register(mapped[i]) for i in range(n)]
        out["register_ms_per_block"] = (time.perf_counter() - t0) / n * 1e3
        if not any(codes):
            out["registered_gbps"] = timed(mapped)
            for i in range(n):
                reg.unregister(mapped[i])
        else:
            out["registered_gbps"] = None
            out["register_error"] = max(codes)
    del dst
    free()
    return out


def odirect_bandwidth(path: Path, block: int, nbytes: int, threads: int, chunk: int) -> dict:
    """Raw O_DIRECT reads of whole expert blocks spread over the file, `threads` in parallel, `chunk` per request."""
    size = path.stat().st_size
    nblk = max(1, min(nbytes, size) // block)
    stride = max(1, (size // block) // nblk)
    offsets = [i * stride * block for i in range(nblk)]
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    lock = threading.Lock()
    todo = [(o + c, min(chunk, block - c)) for o in offsets for c in range(0, block, chunk)]
    got = [0]

    def worker() -> None:
        buf, owner = aligned_empty(chunk, pin=False)
        import ctypes

        mv = memoryview((ctypes.c_char * chunk).from_address(buf.data_ptr())).cast("B")
        while True:
            with lock:
                if not todo:
                    return
                off, n = todo.pop()
            r = os.preadv(fd, [mv[:n]], off)
            with lock:
                got[0] += r

    t0 = time.perf_counter()
    ts = [threading.Thread(target=worker) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    secs = time.perf_counter() - t0
    os.close(fd)
    return {"gbps": got[0] / secs / 1e9, "bytes": got[0], "threads": threads, "chunk_bytes": chunk}


# --- runs of the engine --------------------------------------------------------------------------
def run_engine(layout_path: Path, device: torch.device, prompt: list[int], new: int, *, budget: dict | None,
               warmup: int, trace: bool = False) -> tuple[dict, list[int], list | None, object]:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    engine = load(layout_path, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                  budget=budget, max_context=len(prompt) + new + warmup + 8)
    prov = engine.model.provider
    if warmup:
        engine.generate(prompt, max_new_tokens=warmup, stop_at_eos=False)
    cache = isinstance(prov, ExpertCache)
    if cache:
        prov.reset_stats()
        if trace:
            prov.record_gets()
    g = engine.generate(prompt, max_new_tokens=new, stop_at_eos=False)
    if device.type == "cuda":
        g.stats["peak_vram_gib"] = torch.cuda.max_memory_allocated() / GiB  # torch allocations, context excluded
    steps = prov.record_gets(False) if cache and trace else None
    return dict(g.stats), g.token_ids, steps, engine


def belady_bytes(steps: list, slots: int, block: int, tokens: int) -> dict:
    """Belady's misses over the decode get()s of the run (prefill gets warm the cache but are not counted)."""
    first = next((i for i, (ph, _) in enumerate(steps) if ph == "decode"), len(steps))
    hits, misses = belady([keys for _, keys in steps], slots, count_from=first)
    return {"hits": hits, "misses": misses, "hit_rate": hits / max(1, hits + misses),
            "miss_bytes_per_token": misses * block / max(1, tokens)}


def time_split(s: dict) -> dict:
    """Where the decode time went (seconds): copies on the side stream, compute blocked on copies, host reads."""
    d = s.get("decode") or {}
    return {"decode_s": s.get("decode_s"), "h2d_copy_busy_s": s["vram"].get("copy_s"),
            "stall_s": s.get("stall_s"), "stall_share": s.get("stall_share"),
            "device_wait_s": s.get("device_wait_s"), "decode_tokens": d.get("tokens")}


def accelerate_baseline(ckpt: Path, prompt: list[int], new: int, small: bool) -> dict:
    """transformers (+ accelerate offload on CUDA) generate in a subprocess: decode tok/s from t(new) - t(1)."""
    code = f"""
import json, time, torch
from transformers import AutoModelForCausalLM
ids = torch.tensor([{prompt!r}])
cuda = torch.cuda.is_available() and not {small!r}
t0 = time.perf_counter()
if cuda:
    m = AutoModelForCausalLM.from_pretrained({str(ckpt)!r}, dtype=torch.bfloat16, device_map="auto",
                                             max_memory={{0: "4GiB", "cpu": "100GiB"}})
    ids = ids.to(0)
    how = 'accelerate device_map=auto max_memory={{0:"4GiB","cpu":"100GiB"}}'
else:
    m = AutoModelForCausalLM.from_pretrained({str(ckpt)!r}, dtype=torch.float32)
    how = "transformers on CPU (no GPU: the pipeline check of --small)"
load_s = time.perf_counter() - t0
def gen(n):
    if cuda: torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.no_grad():
        out = m.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    if cuda: torch.cuda.synchronize()
    return time.perf_counter() - t, out[0, ids.shape[1]:].tolist()
t1, _ = gen(1)
tn, toks = gen({new})
print(json.dumps({{"how": how, "load_s": load_s, "t_1_s": t1, "t_n_s": tn, "new_tokens": {new},
                  "decode_tok_s": ({new} - 1) / (tn - t1) if tn > t1 else None, "tokens": toks}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=540)
    if r.returncode != 0:
        return {"error": r.stderr[-2000:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


# --- main ----------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tiered-offload")
    ap.add_argument("--small", action="store_true", help="tiny shape on CPU: checks the whole pipeline")
    ap.add_argument("--ckpt", type=Path, default=None, help="existing HF checkpoint (e.g. bench_decode_gpu --keep)")
    ap.add_argument("--layout", type=Path, default=None, help="existing layout of --ckpt")
    ap.add_argument("--phases", default=",".join(ALL_PHASES))
    ap.add_argument("--vram-gb", type=float, default=4.0)
    ap.add_argument("--ram-gb-small", type=float, default=8.0, help="RAM tier below the expert bytes (phases 2, 3)")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--mmap-new-tokens", type=int, default=64)
    ap.add_argument("--disk-new-tokens", type=int, default=32)
    ap.add_argument("--accel-new-tokens", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--io-threads", type=int, default=16)
    ap.add_argument("--odirect-gb", type=float, default=2.0, help="bytes read by the raw O_DIRECT measurement")
    a = ap.parse_args()
    phases = set(a.phases.split(","))
    unknown = phases - set(ALL_PHASES)
    if unknown:
        raise SystemExit(f"unknown phases {sorted(unknown)}; choose from {ALL_PHASES}")
    preset = "qwen3-tiny" if a.small else "qwen3-10b"
    device = torch.device("cpu" if a.small or not torch.cuda.is_available() else "cuda")
    if not a.small and device.type != "cuda":
        raise SystemExit("no CUDA device: run with --small to check the pipeline on CPU")
    a.work.mkdir(parents=True, exist_ok=True)
    res: dict = {"bench": "offload_gpu", "commit": git_commit(), "preset": preset, "device": str(device),
                 "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
                 "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "small": a.small}
    t_start = time.perf_counter()
    ckpt, lay_path, info = build(a.work, preset, a.ckpt, a.layout)
    res["build"] = info
    lay = Layout.open(lay_path)
    cfg = lay.config
    bs = lay.block_size
    n_all = cfg.num_layers * cfg.num_experts
    expert_bytes = n_all * bs
    res["shape"] = {"layers": cfg.num_layers, "experts": cfg.num_experts, "top_k": cfg.top_k, "block_bytes": bs,
                    "expert_bytes": expert_bytes, "active_expert_bytes_per_token": cfg.num_layers * cfg.top_k * bs}
    prompt = prompt_ids(cfg.vocab_size, a.prompt_tokens)
    # On CPU (--small) there is no VRAM budget: 25% of the experts stand in for --vram-gb.
    vram_flags = {"vram_gb": a.vram_gb} if device.type == "cuda" else {"expert_slots": max(cfg.top_k, n_all // 4)}
    ram_all = expert_bytes / GiB * 1.02 + 0.01
    ram_small = a.ram_gb_small if device.type == "cuda" else expert_bytes * 0.4 / GiB
    if ram_small * GiB >= expert_bytes:
        raise SystemExit(f"--ram-gb-small {ram_small} must be below the expert bytes ({expert_bytes / GiB:.2f} GiB)")

    if "bw" in phases:
        log("host->device bandwidth")
        res["bandwidth"] = h2d_bandwidth(lay, device, 64 if not a.small else n_all)
    if "resident" in phases:
        log("every expert resident (compute time per token)")
        s, toks, _, eng = run_engine(lay_path, device, prompt, a.new_tokens, budget=None, warmup=a.warmup)
        res["resident"] = {"decode_tok_s": s["decode_tok_s"], "compute_s_per_token": 1 / s["decode_tok_s"],
                           "cuda_graphs": s.get("cuda_graphs"), "tokens": toks}
        free(eng)
    if "ram" in phases:
        log(f"1. RAM-backed: {vram_flags}, io mmap, RAM tier {ram_all:.2f} GiB")
        budget = {**vram_flags, "ram_gb": ram_all, "io": "mmap"}
        s, toks, steps, eng = run_engine(lay_path, device, prompt, a.new_tokens, budget=budget, warmup=a.warmup,
                                         trace=True)
        tokens = s["decode"]["tokens"]
        bel = belady_bytes(steps, s["expert_slots"], bs, tokens)
        bw = res.get("bandwidth", {})
        h2d = (bw.get("registered_gbps") if s["io"] == "mmap-registered" else None) or bw.get("pinned_gbps")
        r = {"budget": budget, "io": s["io"], "expert_slots": s["expert_slots"], "decode_tok_s": s["decode_tok_s"],
             "prefill_tok_s": s["prefill_tok_s"], "miss_bytes_per_token": s["bytes_h2d_per_token"],
             "hit_rate": s["decode"]["hit_rate"], "belady": bel, "h2d_gbps_used_for_bound": h2d,
             "vram": s["vram"], "ram": s["ram"], "time": time_split(s), "peak_vram_gib": s.get("peak_vram_gib"),
             "tokens_match_resident": toks == res.get("resident", {}).get("tokens")}
        comp = res.get("resident", {}).get("compute_s_per_token")
        if h2d and comp:
            own_s = max(comp, s["bytes_h2d_per_token"] / (h2d * 1e9))
            bel_s = max(comp, bel["miss_bytes_per_token"] / (h2d * 1e9))
            r["bound_own_tok_s"], r["bound_belady_tok_s"] = 1 / own_s, 1 / bel_s
            r["ratio_to_own_bound"] = s["decode_tok_s"] * own_s
            r["ratio_to_belady_bound"] = s["decode_tok_s"] * bel_s
        res["ram_backed"] = r
        free(eng)
    if "mmap" in phases:
        out = {}
        for reg in ("auto", "off"):
            log(f"3. mmap io_register={reg}, RAM tier {ram_small:.2f} GiB (page cache warm)")
            budget = {**vram_flags, "ram_gb": ram_small, "io": "mmap", "io_register": reg}
            s, _, _, eng = run_engine(lay_path, device, prompt, a.mmap_new_tokens, budget=budget, warmup=a.warmup)
            out[s["io"] if reg == "auto" else "staged"] = {"io": s["io"], "decode_tok_s": s["decode_tok_s"],
                                                          "ram": s["ram"], "disk": s["disk"], "time": time_split(s)}
            free(eng)
        vals = list(out.values())
        out["registered_over_staged"] = (vals[0]["decode_tok_s"] / vals[1]["decode_tok_s"]
                                         if vals[0]["io"] == "mmap-registered" else None)
        res["mmap"] = out
    if "accelerate" in phases:
        log(f"A. transformers baseline, {a.accel_new_tokens} new tokens")
        acc = accelerate_baseline(ckpt, prompt, a.accel_new_tokens, a.small)
        res["accelerate"] = acc
        ours = res.get("ram_backed", {}).get("decode_tok_s")
        if ours and acc.get("decode_tok_s"):
            res["accelerate"]["speedup_ours"] = ours / acc["decode_tok_s"]
    if "disk" in phases:
        log(f"2. disk-backed: io direct, RAM tier {ram_small:.2f} GiB < {expert_bytes / GiB:.2f} GiB of experts")
        dropped = drop_caches()
        raw = odirect_bandwidth(lay.experts_path, bs, int(a.odirect_gb * 1e9) if not a.small else expert_bytes,
                                a.io_threads, 4 << 20 if bs >= 4 << 20 else bs)
        drop_caches()
        budget = {**vram_flags, "ram_gb": ram_small, "io": "direct"}
        s, _, _, eng = run_engine(lay_path, device, prompt, a.disk_new_tokens, budget=budget, warmup=0)
        disk = s["disk"]
        res["disk_backed"] = {"budget": budget, "drop_caches": dropped, "odirect_raw": raw,
                              "decode_tok_s": s["decode_tok_s"], "disk": disk, "ram": s["ram"], "vram": s["vram"],
                              "sustained_read_gbps": disk["gbps"],
                              "ratio_to_odirect": disk["gbps"] / raw["gbps"] if raw["gbps"] else None,
                              "time": time_split(s)}
        free(eng)
    res["wall_s"] = time.perf_counter() - t_start
    report(res)


def report(res: dict) -> None:
    rows = []
    bw = res.get("bandwidth", {})
    if bw:
        rows.append(("H2D pinned GB/s", bw.get("pinned_gbps")))
        rows.append(("H2D registered mmap GB/s", bw.get("registered_gbps")))
    if "resident" in res:
        rows.append(("all resident decode tok/s", res["resident"]["decode_tok_s"]))
    r = res.get("ram_backed")
    if r:
        rows += [("1. RAM-backed io", r["io"]), ("   expert slots", r["expert_slots"]),
                 ("   decode tok/s", r["decode_tok_s"]), ("   miss MB/token", r["miss_bytes_per_token"] / 1e6),
                 ("   Belady miss MB/token", r["belady"]["miss_bytes_per_token"] / 1e6),
                 ("   bound tok/s (own misses)", r.get("bound_own_tok_s")),
                 ("   bound tok/s (Belady)", r.get("bound_belady_tok_s")),
                 ("   ratio to own bound (goal >= 0.85)", r.get("ratio_to_own_bound")),
                 ("   ratio to Belady bound", r.get("ratio_to_belady_bound")),
                 ("   stall share", r["time"].get("stall_share"))]
    m = res.get("mmap")
    if m:
        for k, v in m.items():
            if isinstance(v, dict):
                rows.append((f"3. mmap {k} decode tok/s", v["decode_tok_s"]))
        rows.append(("   registered / staged", m.get("registered_over_staged")))
    acc = res.get("accelerate")
    if acc:
        rows.append(("A. baseline decode tok/s", acc.get("decode_tok_s")))
        rows.append(("   ours / baseline (goal >= 100)", acc.get("speedup_ours")))
    d = res.get("disk_backed")
    if d:
        rows += [("2. disk-backed decode tok/s", d["decode_tok_s"]),
                 ("   sustained expert read GB/s", d["sustained_read_gbps"]),
                 ("   raw O_DIRECT GB/s", d["odirect_raw"]["gbps"]),
                 ("   ratio (goal >= 0.8)", d["ratio_to_odirect"]), ("   caches dropped", d["drop_caches"])]
    for k, v in rows:
        print(f"{k:<40} {v:.3f}" if isinstance(v, float) else f"{k:<40} {v}")
    line = write_out(res, "offload_gpu.json")
    print(line)
    if res.get("ram_backed", {}).get("tokens_match_resident") is False:
        print("FAIL: the RAM-backed run's greedy tokens differ from the all-resident run's", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
