"""How fast can a kernel read pinned host memory over PCIe? Ways of reading it, against the copy engine (GPU box).

The device step's demand gather (kernels/slot_table.gather) copies a miss's block from pinned RAM into its VRAM slot
with the SMs' own loads over UVA: no host round trip, so the whole step is one CUDA graph. Session 54 measured it at
49.9-50.9 GB/s where the copy engine moves the same bytes at 54.3 (H100): the step's copy time is 8% longer than the
link allows, about 65 us of a 1.36 ms token at --vram-gb 4, and the demand goal (0.85 of serial Belady) is missed by
about that much. This times other ways for the SMs to read the same bytes, each from a CUDA graph of --calls
launches, 1 and K rows of a 9.4 MB bf16 block (rows rotating over --rows pinned host rows), every copy checked
byte for byte:
  ce          the copy engine (cudaMemcpyAsync, one a row): the link's rate;
  gather      slot_table.gather as the device step calls it (4 programs a SM, 4 warps, 1,024 words a load);
  l2_256      the same with ld.global.L2::256B.v4 (a 256-byte L2 fetch hint) by inline PTX (gather's hint 1);
  nc_256      the same with ld.global.nc.L1::no_allocate.L2::256B.v4 (hint 2);
  cg          a loop of 4,096-word items read with ld.global.cg (L2 only);
  tmah_BM     gather's TMA path (tma=BM): a descriptor made on the host over the pool viewed as [*, 32] int32
              (128-byte lines), boxes of BM lines loaded to shared memory, then stored;
  tma_BM      the same copy under a descriptor made on the device;
  tmahs_BM    tmah_BM storing through a TMA descriptor over the slots too.
The hint and tmah ways are the engine's own (TIERED_GATHER=4:1024:4:l2_256, tma:BM, ...), so what wins here can run
in the device step as it is.
Ways that fail to compile or copy wrong bytes are reported as such, not timed.

    python3 benchmarks/bench_h2d_read.py                  # GPU box, about 30 s
    python3 benchmarks/bench_h2d_read.py --ways ce,gather,tma_128 --ctas 132,528
Prints one line per figure, then one JSON line last; writes $OUT/h2d_read.json when OUT is set.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
from benchmeta import git_commit, write_out  # noqa: E402

from bench_slot_table import graph_us  # noqa: E402

from tiered.kernels import slot_table  # noqa: E402

BLOCK_BYTES = 9_437_184  # the 10.6B shape's bf16 expert block


def log(msg: str) -> None:
    print(f"[bench-h2d-read] {msg}", file=sys.stderr, flush=True)


@triton.jit
def _cg_kernel(src, row_src, row_dst, dst, row_words, n_items, n_chunks, BLOCK: tl.constexpr):
    """Programs looping over (row, chunk) items of BLOCK words, read with ld.global.cg (L2 only)."""
    for it in range(tl.program_id(0), n_items, tl.num_programs(0)):
        r = it // n_chunks
        s = tl.load(row_src + r)
        if s >= 0:
            d = tl.load(row_dst + r)
            offs = (it % n_chunks).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            m = offs < row_words
            tl.store(dst + d * row_words + offs, tl.load(src + s * row_words + offs, mask=m, cache_modifier=".cg"),
                     mask=m)


@triton.jit
def _tma_device_kernel(src, row_src, row_dst, dst, n_host_lines, lines_per_row, n_items, tiles_per_row,
                       BM: tl.constexpr):
    """The engine's TMA gather (slot_table._tma_copy_item) under a descriptor made on the device (global scratch
    from triton.set_allocator) instead of the host."""
    desc = tl.make_tensor_descriptor(src, shape=[n_host_lines, 32], strides=[32, 1], block_shape=[BM, 32])
    for it in range(tl.program_id(0), n_items, tl.num_programs(0)):
        slot_table._tma_copy_item(desc, row_src, row_dst, dst, lines_per_row, it, tiles_per_row, BM)


@triton.jit
def _tma_store_kernel(desc, out, row_src, row_dst, lines_per_row, n_items, tiles_per_row, BM: tl.constexpr):
    """The host-descriptor TMA read, stored through a TMA descriptor over the slots too (rows of whole boxes)."""
    for it in range(tl.program_id(0), n_items, tl.num_programs(0)):
        r = it // tiles_per_row
        s = tl.load(row_src + r)
        if s >= 0:
            d = tl.load(row_dst + r)
            t = it % tiles_per_row
            v = desc.load([(s * lines_per_row + t * BM).to(tl.int32), 0])
            out.store([(d * lines_per_row + t * BM).to(tl.int32), 0], v)


def way_call(way: str, host: torch.Tensor, slots: torch.Tensor, ctas: int):
    """fn(srcs, dst) for one way, and whether it takes host lists: copies slots[dst[r]] <- host[srcs[r]] for every
    srcs[r] >= 0."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    B = slots.shape[1]
    words, lines = B // 4, B // 128
    hp = slot_table.HostPointer(host.view(torch.int32))
    if way == "ce":
        def fn(srcs_cpu, dst_cpu):
            for s, d in zip(srcs_cpu, dst_cpu):
                if s >= 0:
                    slots[d].copy_(host[s], non_blocking=True)
        return fn, True
    if way in ("gather", "l2_256", "nc_256"):  # the engine's gather: plain loads, or a hint (slot_table.GATHER_HINTS)
        hint = slot_table.GATHER_HINTS.get(way, 0)
        return (lambda srcs, dst: slot_table.gather(host, srcs, dst, slots, ctas=ctas, hint=hint)), False
    if way.startswith("tmah_"):  # the engine's TMA gather (a host-made descriptor)
        return (lambda srcs, dst: slot_table.gather(host, srcs, dst, slots, ctas=ctas, tma=int(way[5:]))), False
    if way == "cg":
        BLOCK = 4096
        n_c = triton.cdiv(words, BLOCK)

        def fn(srcs, dst):
            n = srcs.shape[0] * n_c
            _cg_kernel[(min(ctas, n),)](hp, srcs, dst, slots.view(torch.int32), words, n, n_c, BLOCK=BLOCK,
                                        num_warps=4)
        return fn, False
    if way.startswith("tmahs_"):
        BM = int(way[6:])
        if lines % BM:
            raise ValueError(f"{lines} lines a row are not a multiple of {BM}")
        tiles = lines // BM
        desc = TensorDescriptor(hp, [host.shape[0] * lines, 32], [32, 1], [BM, 32])
        out = TensorDescriptor(slots.view(torch.int32), [slots.shape[0] * lines, 32], [32, 1], [BM, 32])

        def fn(srcs, dst):
            n = srcs.shape[0] * tiles
            _tma_store_kernel[(min(ctas, n),)](desc, out, srcs, dst, lines, n, tiles, BM=BM, num_warps=4)
        return fn, False
    if way.startswith("tma_"):
        BM = int(way[4:])
        tiles = triton.cdiv(lines, BM)

        def fn(srcs, dst):
            n = srcs.shape[0] * tiles
            _tma_device_kernel[(min(ctas, n),)](hp, srcs, dst, slots.view(torch.int32), host.shape[0] * lines, lines,
                                                n, tiles, BM=BM, num_warps=4)
        return fn, False
    raise SystemExit(f"unknown way {way!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # (the engine's ways first, the device-made descriptors last: a way that faults the context ends the rest)
    ap.add_argument("--ways", default="ce,gather,l2_256,nc_256,cg,tmah_64,tmah_128,tmah_256,tmahs_128,tma_64,tma_128,"
                                      "tma_256")
    ap.add_argument("--ctas", default="528", help="looping-grid sizes (programs) of the SM ways")
    ap.add_argument("--calls", type=int, default=12, help="launches a captured graph")
    ap.add_argument("--rows", type=int, default=40, help="pinned host rows (rotating sources)")
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--block-bytes", type=int, default=BLOCK_BYTES)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_h2d_read needs a CUDA device (it times reads of pinned host memory over PCIe)")
    dev = "cuda"
    K, B = a.top_k, a.block_bytes
    # device-side TMA descriptors live in a global scratch Triton asks for
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=dev))
    host = torch.empty(a.rows, B, dtype=torch.uint8).pin_memory()
    host.view(torch.int32).random_()
    slots = torch.zeros(K, B, dtype=torch.uint8, device=dev)
    dst = torch.arange(K, dtype=torch.int64, device=dev)
    res: dict = {"device": torch.cuda.get_device_name(), "commit": git_commit(), "block_bytes": B, "top_k": K,
                 "calls": a.calls, "rows": a.rows, "figures": {}, "errors": {}}
    for way in a.ways.split(","):
        for ctas in ([0] if way == "ce" else [int(c) for c in a.ctas.split(",")]):
            name = way if way == "ce" else f"{way}@{ctas}"
            try:
                fn, host_ids = way_call(way, host, slots, ctas)
                for m in (1, K):  # the check first: the last host row into slot 0 (and m - 1 more)
                    slots.zero_()
                    src = [a.rows - 1 - j if j < m else -1 for j in range(K)]
                    args = (src, dst.tolist()) if host_ids else (torch.tensor(src, device=dev), dst)
                    fn(*args)
                    torch.cuda.synchronize()
                    for j in range(m):
                        if not torch.equal(slots[j].cpu(), host[a.rows - 1 - j]):
                            raise RuntimeError(f"row {j} of {m} copied wrong bytes")
                    srcs = [[(i * m + j) % a.rows if j < m else -1 for j in range(K)] for i in range(a.calls)]
                    if host_ids:
                        dl = dst.tolist()
                        us = graph_us(lambda i: fn(srcs[i], dl), a.calls)
                    else:
                        st = torch.tensor(srcs, dtype=torch.int64, device=dev)
                        us = graph_us(lambda i: fn(st[i], dst), a.calls)
                    gbps = m * B / (us * 1e-6) / 1e9
                    res["figures"][f"{name}_{m}row_gbps"] = round(gbps, 2)
                    log(f"{name:16s} {m} row(s): {us:8.1f} us  {gbps:6.2f} GB/s")
            except Exception as e:  # a way that does not compile or copies wrong bytes is reported, not timed
                res["errors"][name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                log(f"{name}: {res['errors'][name]}")
    write_out(res, "h2d_read.json")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
