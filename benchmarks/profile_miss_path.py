"""Where the host time of an expert-cache miss goes (issue 16: the 397B slice is host-bound), on the CPU, or on the
GPU box with --device cuda.

Parts, on a layout written by tools/write_random_layout.py (the 397B shape at q4: 7 MB blocks):
  misses  host µs per RAM-tier miss in batches of K through ram.PinnedPool: copy mode (the pinned staging pool,
          reads landing in its slots on the reader's threads) with buffered or O_DIRECT reads, register mode, from
          the page cache and cold from disk, first-use checks due / already verified / off. Per miss: the batch's
          wall time, the calling thread's CPU time, the pool's own split (host work not blocked on reads), the
          reader threads' CPU time. --device cuda: real pinning, real cudaHostRegister, async copies as blocks land
          (then also "copied": until the last copy finished), bytes compared with the layout's.
  cache_cpu  the cache's get() with the device copy a no-op on the CPU (the stand-in for issuing an async copy;
          real copies with --device cuda): main-thread CPU per get() split by least squares into per device miss
          and per RAM-tier miss.
  parts   one block at a time, each on blocks this process has not touched before: a buffered pread from the page
          cache (the reader's chunks on its threads), the same read cold (the file's pages dropped with
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
    python3 benchmarks/profile_miss_path.py --layout /tmp/b397/L1 --only misses,cache_cpu --miss-batches 10
    python3 benchmarks/profile_miss_path.py --layout /root/b397/B --device cuda --only misses,cache_cpu   # GPU box
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


# --- host µs per miss, batches of K: the RAM tier's miss path alone, then the cache's get() -------------------
def _drop_or_warm(lay: Layout, keys: list[int], cold: bool) -> None:
    if cold:
        drop_file_cache(lay.path / "experts.bin")
    else:
        warm_file_cache(lay, keys)


def pool_misses(lay: Layout, a, *, mode: str, io_mode: str, verify: str, cold: bool, reverify: bool,
                chunk: int) -> dict:
    """Batches of --k fresh RAM-tier misses through ram.PinnedPool (R = 2K slots, so every batch evicts the one
    before it), each block handed out as it becomes readable and nothing done with it (the device copy's issue is
    the cache's part). Per miss, medians over --miss-batches batches after one warm-up batch:
      wall_us        the calling thread's time from fetch() to the last block handed out (the batch's latency / K)
      main_cpu_us    CPU time of the calling thread (time.thread_time): the host work on the critical path
      work_us        the pool's own split: fetch() time not blocked on reads, checks or copies (pool.wait_s -
                     pool.blocked_s): what the cache's `host` stats report as work_s_per_ram_miss
      helper_cpu_us  CPU time of every other thread (the reader's: reads into the slots, hashes)
    cold: the file's pages dropped before each batch (a disk-tier miss); else read first (a page-cache miss).
    reverify: the blocks were read and checked once before (first-use: no hash again)."""
    import tiered.store.ram as ram_mod
    from tiered.store.ram import PinnedPool

    E = lay.config.num_experts
    total = lay.config.num_layers * E
    k, nb = a.k, a.miss_batches + 1
    keys = np.random.default_rng(3).permutation(total)[:k * nb].tolist()
    cuda = a.device == "cuda"
    keep = ram_mod.HostRegistrar
    if mode == "register" and not cuda:
        ram_mod.HostRegistrar = TouchRegistrar
    try:
        reader = BlockReader(lay, io=io_mode, verify=verify, threads=a.threads, chunk_bytes=chunk)
        pool = PinnedPool(2 * k, reader, make_policy("lru"), mode=mode, pin=cuda, cuda=cuda)
        if pool.rows is not None:
            pool.rows.fill_(0)  # fault the buffer in once, as pinning at load does
        dev = torch.empty(2 * k, lay.block_size, dtype=torch.uint8, device="cuda") if cuda else None
        stream = torch.cuda.Stream() if cuda else None
        file_rows = lay.expert_file_pool()
        if reverify:
            scratch, own = aligned_empty(lay.block_size, pin=False)
            for key in keys:
                reader.read_into(key, scratch)
            own.release()
        per: dict[str, list[float]] = {"wall_us": [], "main_cpu_us": [], "work_us": [], "helper_cpu_us": []}
        for b in range(nb):
            batch = keys[b * k:(b + 1) * k]
            _drop_or_warm(lay, batch, cold)
            w0, bl0 = pool.wait_s, getattr(pool, "blocked_s", 0.0)
            p0, c0, t0 = time.process_time(), time.thread_time(), time.perf_counter()
            got = []
            for key, slot in pool.fetch(batch, b + 1):
                if cuda:  # the device copy is issued as each block lands (async, on a side stream)
                    with torch.cuda.stream(stream):
                        dev[slot].copy_(pool.host_row(slot), non_blocking=True)
                    pool.mark_dma(slot, stream)
                got.append((key, slot))
            wall, main = time.perf_counter() - t0, time.thread_time() - c0
            proc = time.process_time() - p0
            if cuda:
                stream.synchronize()
                if b:
                    per.setdefault("copied_us", []).append((time.perf_counter() - t0) / k * 1e6)
            if b <= 1:  # bytes check (not timed): every block of the first batches equals the layout's
                for key, slot in got:
                    where = dev[slot].cpu() if cuda else pool.host_row(slot)
                    if not torch.equal(where, file_rows[key]):
                        raise SystemExit(f"{label_of(mode, io_mode)}: block {key} differs from the layout's")
            if b == 0:
                continue  # warm-up: threads started, code paths loaded
            per["wall_us"].append(wall / k * 1e6)
            per["main_cpu_us"].append(main / k * 1e6)
            per["work_us"].append((pool.wait_s - w0 - (getattr(pool, "blocked_s", 0.0) - bl0)) / k * 1e6)
            per["helper_cpu_us"].append(max(0.0, proc - main) / k * 1e6)
        out = {x: float(np.median(v)) for x, v in per.items()}
        if not hasattr(pool, "blocked_s"):
            out["work_us"] = None  # this tiered does not split blocked time
        pool.close()
        reader.close()
    finally:
        ram_mod.HostRegistrar = keep
    return out


def label_of(mode: str, io_mode: str) -> str:
    return f"{mode}/{io_mode}"


def miss_part(lay: Layout, a) -> dict:
    """Host µs per RAM-tier miss: from the page cache and cold from disk, copy mode (pinned staging pool, reads
    land in the slots on the reader's threads) with buffered and O_DIRECT reads, register mode (page-touch
    stand-in for cudaHostRegister), first-use checks due / already verified / off."""
    import inspect

    chunk = a.chunk_kib << 10 if a.chunk_kib else inspect.signature(BlockReader).parameters["chunk_bytes"].default
    cases = [  # (label, mode, io, verify, cold, reverify)
        ("copy/mmap/page-cache/first-use", "copy", "mmap", "first-use", False, False),
        ("copy/mmap/page-cache/verified", "copy", "mmap", "first-use", False, True),
        ("copy/mmap/page-cache/none", "copy", "mmap", "none", False, False),
        ("register/mmap/page-cache/first-use", "register", "mmap", "first-use", False, False),
        ("register/mmap/page-cache/verified", "register", "mmap", "first-use", False, True),
        ("copy/direct/disk/first-use", "copy", "direct", "first-use", True, False),
        ("copy/direct/disk/verified", "copy", "direct", "first-use", True, True),
        ("copy/mmap/disk/first-use", "copy", "mmap", "first-use", True, False),
        ("register/mmap/disk/first-use", "register", "mmap", "first-use", True, False),
    ]
    out: dict = {"k": a.k, "batches": a.miss_batches, "chunk_bytes": chunk, "threads": a.threads}
    for label, mode, io_mode, verify, cold, reverify in cases:
        if a.miss_cases and not any(c in label for c in a.miss_cases.split(",")):
            continue
        try:
            out[label] = pool_misses(lay, a, mode=mode, io_mode=io_mode, verify=verify, cold=cold,
                                     reverify=reverify, chunk=chunk)
        except Exception as e:  # noqa: BLE001 - tmpfs refuses O_DIRECT: report it
            out[label] = {"error": str(e)}
    return out


def cache_cpu(lay: Layout, a) -> dict:
    """The cache's get() on the CPU with the device copy replaced by a no-op (the stand-in for issuing an async
    H2D copy): CPU time of the calling thread per get(), split by least squares into a fixed part, per device
    miss (served by the RAM tier) and per RAM-tier miss (the file in the page cache), first-use checks on."""
    E, bs = lay.config.num_experts, lay.block_size
    ram_gb = a.ram_slots * bs / 2**30 + 1e-6
    cache = make_provider(lay, device=a.device, quiet=True, expert_slots=a.slots, ram_gb=ram_gb, verify="first-use",
                          io=a.io, io_threads=a.threads, **({"io_register": a.io_register, "slot_table": "host"} if a.device == "cuda" else {}))
    if cache.ram is not None and cache.ram.rows is not None:
        cache.ram.rows.fill_(0)
    vram = cache.vram

    def issue_copy(slot: int, src: torch.Tensor) -> None:  # what an async copy's issue leaves on the host
        vram.bytes_in += vram.block_size

    if a.device != "cuda":  # on CUDA the copies are real (async on the cache's side stream)
        vram.copy_in = issue_copy
    rng = np.random.default_rng(1)
    w = 1.0 / (np.arange(E) + 8.0)
    pop = rng.permutation(E)
    steps = [pop[rng.choice(E, a.k, replace=False, p=w / w.sum())].tolist() for _ in range(a.steps)]
    warm_file_cache(lay, list(range(E)))
    rows, rows_wall = [], []
    for i, ids in enumerate(steps):
        vm0, rm0 = cache.vram.misses, cache.ram.misses
        c0, t0 = time.thread_time(), time.perf_counter()
        cache.get_slots(0, ids)
        dt, dw = time.thread_time() - c0, time.perf_counter() - t0
        if i >= 5:
            rows.append((cache.vram.misses - vm0, cache.ram.misses - rm0, dt))
            rows_wall.append((cache.vram.misses - vm0, cache.ram.misses - rm0, dw))
    s = cache.stats()
    cache.close()
    return {"device": a.device, "io": cache.io, "steps": len(rows), "vram_misses": sum(r[0] for r in rows), "ram_misses": sum(r[1] for r in rows),
            "fit_main_cpu": fit_per_miss(rows), "fit_wall": fit_per_miss(rows_wall), "stats_host": s.get("host")}


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
    ap.add_argument("--miss-batches", type=int, default=6, help="batches of --k misses per case of the misses part (0: skip)")
    ap.add_argument("--miss-cases", default="", help="comma-separated substrings: only the misses cases whose label has one")
    ap.add_argument("--chunk-kib", type=int, default=0, help="reader chunk size in KiB (0: the reader's default)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="cuda: real pinned pool, real cudaHostRegister and async copies (misses and cache_cpu parts)")
    ap.add_argument("--io-register", default="auto", choices=("auto", "off"), help="cache_cpu part on CUDA")
    ap.add_argument("--only", default="", help="comma-separated parts to run: parts,register,misses,cache_cpu,cache")
    a = ap.parse_args()
    lay = Layout.open(a.layout)
    res: dict = {"bench": "profile_miss", "layout": str(a.layout), "block_bytes": lay.block_size,
                 "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    only = set(a.only.split(",")) if a.only else None
    if only is not None:
        a.skip_parts, a.skip_cache = "parts" not in only, "cache" not in only
        a.register_batches = a.register_batches if "register" in only else 0
        a.miss_batches = a.miss_batches if "misses" in only else 0
    if a.miss_batches:
        m = miss_part(lay, a)
        res["misses"] = m
        print(f"host µs per RAM-tier miss, batches of {m['k']}, chunk {m['chunk_bytes'] >> 10} KiB, {m['threads']} "
              f"reader threads, {os.cpu_count()} CPUs (medians of {m['batches']} batches)")
        print(f"  {'case':<38} {'wall':>8} {'main cpu':>9} {'work':>8} {'readers':>8}"
              + (f" {'copied':>8}" if a.device == "cuda" else ""))
        for lab, r in m.items():
            if isinstance(r, dict) and "error" in r:
                print(f"  {lab:<38} error: {r['error'][:80]}")
            elif isinstance(r, dict):
                wk = f"{r['work_us']:8.0f}" if r["work_us"] is not None else f"{'n/a':>8}"
                cp = f" {r['copied_us']:8.0f}" if "copied_us" in r else ""
                print(f"  {lab:<38} {r['wall_us']:8.0f} {r['main_cpu_us']:9.0f} {wk} {r['helper_cpu_us']:8.0f}{cp}")
    if only is None or "cache_cpu" in only:
        r = cache_cpu(lay, a)
        res["cache_cpu"] = r
        f, fw = r["fit_main_cpu"], r["fit_wall"]
        print(f"cache get(), device copy a no-op: main-thread CPU {f['fixed_us']:.0f} µs + {f['per_vram_miss_us']:.0f} "
              f"µs/device miss + {f['per_ram_miss_us']:.0f} µs/RAM-tier miss; wall {fw['fixed_us']:.0f} + "
              f"{fw['per_vram_miss_us']:.0f} + {fw['per_ram_miss_us']:.0f} µs ({r['vram_misses']} device misses, "
              f"{r['ram_misses']} RAM-tier misses)")
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
