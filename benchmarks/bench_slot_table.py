"""Device time of the offloaded step's per-layer slot-table kernels (kernels/slot_table.py), GPU box.

The device step (decode/devstep.py) runs `resolve` then `gather` once per MoE layer inside its CUDA graph. This
times each of them alone, replayed from a CUDA graph of --calls launches (so launch overhead is the graph's, as in
the step), at the slot counts and block sizes of the 10.6B-shape model at --vram-gb 4 (q4: 1,513 slots of 2.65 MB;
bf16: 420 slots of 9.4 MB), K = 8:
  resolve_hits   every id resident (the steady state of a warm cache);
  resolve_mixed  ids drawn from 2 * S keys, so about half miss (the victim search runs);
  gather_hits    no row to copy (what every layer pays when all its experts hit), per grid: one program per
                 (row, chunk) ("grid", ctas=0) and a fixed number of looping programs (--ctas; the default is 4 per SM);
  gather_misses  1 and K rows copied from pinned RAM over UVA, in GB/s, sources rotating over --rows host rows.
--old PATH times a saved copy of kernels/slot_table.py too (the same tables and ids), for a before/after in one run.
--shapes W:B:C,... times the gather's 1- and K-row rates at other load shapes (warps, words a load, loads an item)
and the copy engine's rate for the same bytes (session 53: the H100's offload step ran 0.53 ms a token slower than
compute plus its copies at the copy engine's 54 GB/s; the gather over UVA is the suspect).

    python3 benchmarks/bench_slot_table.py                                  # GPU box, about 20 s
    python3 benchmarks/bench_slot_table.py --old .carry/old/slot_table_9ba170a.py
    python3 benchmarks/bench_slot_table.py --shapes 4:1024:4,8:1024:4,4:2048:2,4:512:8
Prints one line per figure, then one JSON line last; writes $OUT/slot_table.json when OUT is set.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
from benchmeta import git_commit, write_out  # noqa: E402

from tiered.kernels import slot_table as new_st  # noqa: E402

SHAPES = {"q4": (1513, 2_654_208), "bf16": (420, 9_437_184)}  # slots, block bytes (10.6B shape, --vram-gb 4)


def log(msg: str) -> None:
    print(f"[bench-slot-table] {msg}", file=sys.stderr, flush=True)


def load_module(path: str):
    spec = importlib.util.spec_from_file_location("old_slot_table", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tables(N: int, S: int, dev: str) -> dict[str, torch.Tensor]:
    return {"slot_of": torch.full((N,), -1, dtype=torch.int32, device=dev),
            "key_of": torch.full((S,), -1, dtype=torch.int32, device=dev),
            "last": torch.zeros(S, dtype=torch.int64, device=dev), "uses": torch.zeros(S, dtype=torch.int64, device=dev),
            "clock": torch.zeros(1, dtype=torch.int64, device=dev),
            "counts": torch.zeros(4, dtype=torch.int64, device=dev),
            "host_row": torch.arange(N, dtype=torch.int64, device=dev)}


def graph_us(fn, calls: int, reps: int = 5) -> float:
    """Device µs per call of fn(i) (i = 0..calls-1), captured once as one CUDA graph and replayed."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(min(3, calls)):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(i)
    g.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        best = min(best, a.elapsed_time(b) * 1e3 / calls)
    return best


def resolve_figures(mod, S: int, K: int, calls: int, seed: int) -> dict:
    dev = "cuda"
    E, L = 128, max(2, (2 * S) // 128 + 1)
    N = L * E
    g = torch.Generator().manual_seed(seed)
    out_slot = torch.empty(calls, K, dtype=torch.int64, device=dev)
    out_src = torch.empty(calls, K, dtype=torch.int64, device=dev)
    res = {}
    # hits: fill S slots with the first S keys, then ask for K of them per call (layer 0's ids offset by rows)
    t = tables(N, S, dev)
    keys = torch.arange(S, device=dev)
    t["slot_of"][:S] = torch.arange(S, dtype=torch.int32, device=dev)
    t["key_of"].copy_(keys.to(torch.int32))
    ids = torch.stack([torch.randperm(min(S, E), generator=g)[:K] for _ in range(calls)]).to(dev)
    res["resolve_hits_us"] = graph_us(lambda i: mod.resolve(ids[i], 0, E, t, 0, out_slot[i], out_src[i]), calls)
    assert int(t["counts"][1]) == 0, "the hit case missed"
    # mixed: ids over 2 * S keys (layers 0..), about half resident
    t = tables(N, S, dev)
    lay = torch.randint(0, max(1, (2 * S) // E), (calls,), generator=g).tolist()
    ids2 = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(calls)]).to(dev)
    res["resolve_mixed_us"] = graph_us(lambda i: mod.resolve(ids2[i], lay[i], E, t, 0, out_slot[i], out_src[i]),
                                       calls)
    c = t["counts"].tolist()
    res["resolve_mixed_miss_share"] = c[1] / max(1, c[0] + c[1])
    return res


def copy_engine_figures(B: int, K: int, rows: int, calls: int) -> dict:
    """The same bytes as the gathers' misses by the copy engine (cudaMemcpyAsync of 1 and K pinned rows, one copy
    per row, from a CUDA graph): the link's rate the gather is compared against."""
    dev = "cuda"
    slots = torch.empty(K, B, dtype=torch.uint8, device=dev)
    host = torch.empty(rows, B, dtype=torch.uint8).pin_memory()
    res = {}
    for m in (1, K):
        def fn(i: int, m: int = m) -> None:
            for j in range(m):
                slots[j].copy_(host[(i * m + j) % rows], non_blocking=True)
        us = graph_us(fn, min(calls, 16), reps=3)
        res[f"copy_engine_{m}miss_gbps"] = m * B / (us * 1e-6) / 1e9
    return res


def shape_figures(mod, B: int, K: int, rows: int, calls: int, shapes: list[tuple[int, int, int]]) -> dict:
    """The gather's 1- and K-row rates at the default grid (4 programs a SM) for each (warps, block, chunks): its
    load footprint (kernels/slot_table.gather's warps, block and chunks)."""
    dev = "cuda"
    slots = torch.empty(K, B, dtype=torch.uint8, device=dev)
    host = torch.empty(rows, B, dtype=torch.uint8).pin_memory()
    dst = torch.arange(K, dtype=torch.int64, device=dev)
    res = {}
    for w, b, c in shapes:
        for m in (1, K):
            srcs = torch.full((calls, K), -1, dtype=torch.int64)
            for i in range(calls):
                srcs[i, :m] = torch.tensor([(i * m + j) % rows for j in range(m)])
            srcs = srcs.to(dev)
            us = graph_us(lambda i: mod.gather(host, srcs[i], dst, slots, warps=w, block=b, chunks=c),
                          min(calls, 16), reps=3)
            res[f"gather_{m}miss_gbps_w{w}_b{b}_c{c}"] = m * B / (us * 1e-6) / 1e9
    return res


def gather_figures(mod, S: int, B: int, K: int, rows: int, calls: int, ctas: list[int]) -> dict:
    dev = "cuda"
    n_slots = min(S, 2 * K + 2)  # the destination slots (the figure does not depend on how many there are)
    slots = torch.empty(n_slots, B, dtype=torch.uint8, device=dev)
    host = torch.empty(rows, B, dtype=torch.uint8).pin_memory()
    host.view(torch.int32).random_()
    none = torch.full((K,), -1, dtype=torch.int64, device=dev)
    dst = torch.arange(K, dtype=torch.int64, device=dev)
    res = {}
    for c in [0, *ctas]:
        name = "grid" if c == 0 else f"ctas{c}"
        res[f"gather_hits_us_{name}"] = graph_us(lambda i: mod.gather(host, none, dst, slots, ctas=c), calls)
        for m in (1, K):
            srcs = torch.full((calls, K), -1, dtype=torch.int64)
            for i in range(calls):
                srcs[i, :m] = torch.tensor([(i * m + j) % rows for j in range(m)])
            srcs = srcs.to(dev)
            us = graph_us(lambda i: mod.gather(host, srcs[i], dst, slots, ctas=c), min(calls, 16), reps=3)
            res[f"gather_{m}miss_gbps_{name}"] = m * B / (us * 1e-6) / 1e9
    i = rows - 1  # the copy is exact
    src = torch.full((K,), -1, dtype=torch.int64, device=dev)
    src[0] = i
    mod.gather(host, src, dst, slots)
    torch.cuda.synchronize()
    if not torch.equal(slots[0].cpu(), host[i]):
        raise SystemExit("gather copied wrong bytes")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", default=None, help="a saved kernels/slot_table.py to time beside this tree's")
    ap.add_argument("--calls", type=int, default=64, help="launches per captured graph")
    ap.add_argument("--rows", type=int, default=48, help="pinned host rows the gathers read (rotating)")
    ap.add_argument("--ctas", default="132,264,528", help="looping-grid sizes of the gather to time")
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--shapes", default="",
                    help="gather load shapes to time at the default grid, as warps:block:chunks,... (e.g. "
                         "4:1024:4,8:1024:4,4:2048:2,4:512:8); the copy engine's rate for the same bytes beside them")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_slot_table times CUDA kernels: run it on the GPU box")
    mods = {"new": new_st}
    if a.old:
        mods["old"] = load_module(a.old)
    ctas = [int(c) for c in a.ctas.split(",") if c]
    shapes = [tuple(int(x) for x in t.split(":")) for t in a.shapes.split(",") if t]
    if any(len(t) != 3 for t in shapes):
        raise SystemExit(f"--shapes takes warps:block:chunks,...: got {a.shapes!r}")
    res = {"bench": "slot_table", "commit": git_commit(), "device": torch.cuda.get_device_name(), "top_k": a.top_k,
           "calls_per_graph": a.calls, "old": a.old, "shapes": {}}
    for shape, (S, B) in SHAPES.items():
        r = {"slots": S, "block_bytes": B}
        for name, mod in mods.items():
            rr = resolve_figures(mod, S, a.top_k, a.calls, seed=1)
            rr.update(gather_figures(mod, S, B, a.top_k, a.rows, a.calls, ctas if name == "new" else []))
            if a.shapes and name == "new":
                rr.update(shape_figures(mod, B, a.top_k, a.rows, a.calls, shapes))
                rr.update(copy_engine_figures(B, a.top_k, a.rows, a.calls))
            r[name] = rr
            for k, v in rr.items():
                log(f"{shape} {name} {k}: {v:.3f}")
        res["shapes"][shape] = r
    print(write_out(res, "slot_table.json"))


if __name__ == "__main__":
    main()
