"""Where the host time of an expert-cache miss goes, on the CPU (issue 16: the 397B slice is host-bound).

Two parts, on a layout written by tools/write_random_layout.py (the 397B shape at q4: 7 MB blocks):
  parts   one block at a time, each on blocks this process has not touched before: a buffered pread from the page
          cache (the reader's two 4 MiB chunks on its threads), the same read cold (the file's pages dropped with
          posix_fadvise first), an O_DIRECT read (cold), the first touch of a mapped block (page faults: what
          cudaHostRegister of a mapped block pays before pinning), a second touch, the xxh3_64 of a block (first-use
          verification), a memcpy into a slot (the CPU device tier's "H2D"), and a slot-table assign (bookkeeping).
  register  the RAM tier's register mode with a page-touching stand-in for cudaHostRegister (ram.PinnedPool):
          host seconds per RAM-tier miss of batches of K fresh blocks, first-use checks on.
  cache   an ExpertCache (the engine's provider) on the CPU with S device slots and a RAM tier of R slots, fed
          skewed top-K routing of one layer: host seconds per get(), per device-tier miss and per RAM-tier miss
          (a least-squares split of the get() times by their miss counts), with verify on and off, and a cProfile
          of the verify-on loop (top functions by own time).

    python3 tools/write_random_layout.py --preset qwen35-397b --layers 1 --experts q4 --dense q4 --out /tmp/b397/L1
    python3 benchmarks/profile_miss_path.py --layout /tmp/b397/L1 --steps 60
Prints a table, then one JSON line last; writes $OUT/profile_miss.json when OUT is set.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
from pathlib import Path

import numpy as np
import torch
import xxhash

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from benchmeta import write_out  # noqa: E402

from tiered.store.cache import make_provider  # noqa: E402
from tiered.store.disk import Layout  # noqa: E402
from tiered.store.hostmem import aligned_empty, as_memoryview  # noqa: E402
from tiered.store.io import BlockReader  # noqa: E402
from tiered.store.policy import make_policy  # noqa: E402
from tiered.store.slots import SlotTable  # noqa: E402


def drop_file_cache(path: Path) -> bool:
    """Drop the file's clean pages from the page cache (no root needed); False when the call is missing."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return True
    except (AttributeError, OSError):
        return False


def warm_file_cache(lay: Layout, keys: list[int]) -> None:
    buf = bytearray(lay.block_size)
    with open(lay.path / "experts.bin", "rb", buffering=0) as f:
        for k in keys:
            _, off, _, _ = lay.block_offset(*divmod(k, lay.config.num_experts))
            f.seek(off)
            f.readinto(buf)


def med_us(xs: list[float]) -> float:
    return float(np.median(xs)) * 1e6


def parts(lay: Layout, n: int, threads: int) -> dict:
    """Per-block costs of the pieces of a miss (µs, median over n fresh blocks each)."""
    E, bs = lay.config.num_experts, lay.block_size
    total = lay.config.num_layers * E
    rng = np.random.default_rng(0)
    order = rng.permutation(total).tolist()
    groups = [order[i * n:(i + 1) * n] for i in range(6)]
    if len(groups[-1]) < n:
        raise SystemExit(f"the layout has {total} blocks, fewer than 6 x --parts-blocks {n}")
    buf, owner = aligned_empty(bs, pin=False)
    dst, owner2 = aligned_empty(bs, pin=False)
    buf.fill_(1)
    dst.fill_(1)
    out: dict = {"block_bytes": bs}
    experts = lay.path / "experts.bin"
    # buffered pread, page cache warm (verify off: the read alone)
    warm_file_cache(lay, groups[0])
    rd = BlockReader(lay, io="mmap", verify="none", threads=threads)
    ts = []
    for k in groups[0]:
        t0 = time.perf_counter()
        rd.read_into(k, buf)
        ts.append(time.perf_counter() - t0)
    out["pread_cached_us"] = med_us(ts)
    # the same with first-use verification (the check runs on the reader's thread after the last chunk)
    rdv = BlockReader(lay, io="mmap", verify="first-use", threads=threads)
    warm_file_cache(lay, groups[1])
    ts = []
    for k in groups[1]:
        t0 = time.perf_counter()
        rdv.read_into(k, buf)
        ts.append(time.perf_counter() - t0)
    out["pread_cached_verify_us"] = med_us(ts)
    # cold: buffered and O_DIRECT, after dropping the file's pages
    dropped = drop_file_cache(experts)
    out["cold_dropped"] = dropped
    ts = []
    for k in groups[2]:
        t0 = time.perf_counter()
        rd.read_into(k, buf)
        ts.append(time.perf_counter() - t0)
    out["pread_cold_us"] = med_us(ts)
    try:
        rdd = BlockReader(lay, io="direct", verify="none", threads=threads)
        drop_file_cache(experts)
        ts = []
        for k in groups[3]:
            t0 = time.perf_counter()
            rdd.read_into(k, buf)
            ts.append(time.perf_counter() - t0)
        out["odirect_cold_us"] = med_us(ts)
        rdd.close()
    except Exception as e:  # noqa: BLE001 - tmpfs refuses O_DIRECT: report it
        out["odirect_cold_us"] = None
        out["odirect_error"] = str(e)
    # first touch of a mapped block whose pages are in the page cache (minor faults), then a second touch
    warm_file_cache(lay, groups[4])
    pool = lay.expert_file_pool()
    page = 4096
    ts, ts2, th = [], [], []
    for k in groups[4]:
        row = pool[k]
        t0 = time.perf_counter()
        int(row[::page].sum())  # one byte of every page: faults the mapping in
        ts.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        int(row[::page].sum())
        ts2.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        xxhash.xxh3_64(memoryview(lay.block_bytes(*divmod(k, E)))).hexdigest()
        th.append(time.perf_counter() - t0)
    out["mmap_first_touch_us"] = med_us(ts)
    out["mmap_second_touch_us"] = med_us(ts2)
    out["xxh3_mapped_us"] = med_us(th)
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        xxhash.xxh3_64(as_memoryview(buf)).hexdigest()
        ts.append(time.perf_counter() - t0)
    out["xxh3_buffer_us"] = med_us(ts)
    # a verify-and-fault of a mapped block, as the register path does it (hash = first touch)
    ts = []
    warm_file_cache(lay, groups[5])
    for k in groups[5]:
        t0 = time.perf_counter()
        xxhash.xxh3_64(memoryview(lay.block_bytes(*divmod(k, E)))).hexdigest()
        ts.append(time.perf_counter() - t0)
    out["xxh3_mapped_first_touch_us"] = med_us(ts)
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        dst.copy_(buf)
        ts.append(time.perf_counter() - t0)
    out["memcpy_slot_us"] = med_us(ts)
    tab = SlotTable(64, make_policy("lru"))
    ts = []
    for i in range(2000):
        t0 = time.perf_counter()
        tab.assign_many([1000 + i], float(i), {1000 + i})
        ts.append(time.perf_counter() - t0)
    out["slot_assign_us"] = med_us(ts)
    out["gbps"] = {k[:-3]: bs / (v * 1e-6) / 1e9 for k, v in out.items()
                   if k.endswith("_us") and v and k not in ("slot_assign_us",)}
    rd.close()
    rdv.close()
    owner.release()
    owner2.release()
    return out


def fit_per_miss(rows: list[tuple[int, int, float]]) -> dict:
    """Least squares of get() seconds = a + b * device misses + c * RAM misses (µs)."""
    A = np.array([[1.0, v, r] for v, r, _ in rows])
    y = np.array([s for _, _, s in rows])
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    return {"fixed_us": coef[0] * 1e6, "per_vram_miss_us": coef[1] * 1e6, "per_ram_miss_us": coef[2] * 1e6}


def cache_run(lay: Layout, a, verify: str, profile: bool) -> dict:
    """An ExpertCache on the CPU, S device slots and R RAM slots, uniform top-K routing of layer 0."""
    E, bs = lay.config.num_experts, lay.block_size
    ram_gb = a.ram_slots * bs / 2**30 + 1e-6
    cache = make_provider(lay, device="cpu", quiet=True, expert_slots=a.slots, ram_gb=ram_gb, verify=verify,
                          io=a.io, io_threads=a.threads)
    rng = np.random.default_rng(1)
    w = 1.0 / (np.arange(E) + 8.0)  # skewed (Zipf-like) popularity, so RAM hits and misses both occur
    pop = rng.permutation(E)
    steps = [pop[rng.choice(E, a.k, replace=False, p=w / w.sum())].tolist() for _ in range(a.steps)]
    warm_file_cache(lay, list(range(E)))
    rows = []
    prof = cProfile.Profile() if profile else None
    t_all = time.perf_counter()
    for ids in steps:
        vm0, rm0 = cache.vram.misses, cache.ram.misses
        t0 = time.perf_counter()
        if prof is not None:
            prof.enable()
        cache.get_slots(0, ids)
        if prof is not None:
            prof.disable()
        dt = time.perf_counter() - t0
        rows.append((cache.vram.misses - vm0, cache.ram.misses - rm0, dt))
    wall = time.perf_counter() - t_all
    s = cache.stats()
    cache.close()
    vm = sum(r[0] for r in rows)
    rm = sum(r[1] for r in rows)
    out = {"verify": verify, "io": a.io, "steps": len(rows), "vram_misses": vm, "ram_misses": rm,
           "host_s_per_get": wall / len(rows), "fit": fit_per_miss(rows),
           "ram_miss_share": rm / max(vm, 1), "stats_decode": s.get("decode"), "stats_ram": s.get("ram"),
           "stats_host": s.get("host")}
    if prof is not None:
        f = io.StringIO()
        pstats.Stats(prof, stream=f).sort_stats("tottime").print_stats(12)
        out["profile_top"] = [ln for ln in f.getvalue().splitlines() if ln.strip()][:24]
    return out


class TouchRegistrar:
    """A CPU stand-in for cudaHostRegister of a mapped block: touches every page (pinning faults the pages in; the
    driver's own pinning and IOMMU work cannot be measured without a GPU)."""

    def register(self, t: torch.Tensor) -> int:
        int(t[::4096].sum())
        return 0

    def unregister(self, t: torch.Tensor) -> None:
        pass


def register_emulation(lay: Layout, a) -> dict:
    """The RAM tier's "register" mode on the CPU with TouchRegistrar: host seconds per RAM-tier miss of batches of
    --k fresh blocks (first-use checks on: every block is checked once), as the calling thread sees them."""
    import tiered.store.ram as ram_mod
    from tiered.store.ram import PinnedPool

    E = lay.config.num_experts
    keep = ram_mod.HostRegistrar
    ram_mod.HostRegistrar = TouchRegistrar
    try:
        reader = BlockReader(lay, io="mmap", verify="first-use", threads=a.threads)
        pool = PinnedPool(lay.config.num_layers * E, reader, make_policy("lru"), mode="register")
        keys = np.random.default_rng(2).permutation(lay.config.num_layers * E)[:a.k * a.register_batches].tolist()
        warm_file_cache(lay, keys)
        per = []
        for b in range(a.register_batches):
            batch = keys[b * a.k:(b + 1) * a.k]
            t0 = time.perf_counter()
            for _ in pool.fetch(batch, b):
                pass
            per.append((time.perf_counter() - t0) / len(batch))
        out = {"blocks": len(keys), "batch": a.k, "s_per_ram_miss_median": float(np.median(per)),
               "verify_s_per_block": getattr(reader, "verify_s", float("nan")) / max(getattr(reader, "verified_blocks", 0), 1),
               "register_s_per_block": getattr(pool, "register_s", float("nan")) / len(keys)}
        pool.close()
        reader.close()
    finally:
        ram_mod.HostRegistrar = keep
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layout", type=Path, required=True)
    ap.add_argument("--parts-blocks", type=int, default=12, help="fresh blocks per part measured")
    ap.add_argument("--steps", type=int, default=120, help="get() calls of the cache part")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--slots", type=int, default=20)
    ap.add_argument("--ram-slots", type=int, default=160)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--io", default="mmap", choices=("mmap", "direct"))
    ap.add_argument("--skip-parts", action="store_true")
    ap.add_argument("--register-batches", type=int, default=8, help="batches of the register-mode emulation (0: skip)")
    ap.add_argument("--skip-cache", action="store_true")
    a = ap.parse_args()
    lay = Layout.open(a.layout)
    res: dict = {"bench": "profile_miss", "layout": str(a.layout), "block_bytes": lay.block_size,
                 "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if not a.skip_parts:
        res["parts"] = parts(lay, a.parts_blocks, a.threads)
        for k, v in res["parts"].items():
            if k.endswith("_us"):
                print(f"{k:<28} {v:10.1f} µs" if v is not None else f"{k:<28} n/a")
    if a.register_batches:
        r = register_emulation(lay, a)
        res["register_emulation"] = r
        print(f"register mode (page-touch stand-in), batches of {r['batch']} fresh blocks: "
              f"{r['s_per_ram_miss_median'] * 1e6:.0f} µs per RAM-tier miss on the calling thread "
              f"(hash {r['verify_s_per_block'] * 1e6:.0f} µs/block on the reader's threads, registration "
              f"{r['register_s_per_block'] * 1e6:.0f} µs/block)")
    for verify in () if a.skip_cache else ("first-use", "none"):
        r = cache_run(lay, a, verify, profile=verify == "first-use")
        res[f"cache_verify_{verify}"] = r
        f = r["fit"]
        print(f"cache verify={verify:<9} {r['host_s_per_get'] * 1e3:7.2f} ms/get  vram misses {r['vram_misses']}  "
              f"ram misses {r['ram_misses']}  fit: fixed {f['fixed_us']:.0f} µs + {f['per_vram_miss_us']:.0f} µs/vram "
              f"miss + {f['per_ram_miss_us']:.0f} µs/ram miss")
    for ln in (res.get("cache_verify_first-use") or {}).get("profile_top", [])[:20]:
        print("  " + ln)
    print(write_out(res, "profile_miss.json"))


if __name__ == "__main__":
    main()
