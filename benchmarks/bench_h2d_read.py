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
  cg          the same loop with ld.global.cg (L2 only);
  l2_256      ld.global.L2::256B.v4 (a 256-byte L2 fetch hint) by inline PTX;
  nc_256      ld.global.nc.L1::no_allocate.L2::256B.v4;
  tma_BM      the tensor memory accelerator: a device-side descriptor over the host rows viewed as [*, 32] int32
              (128-byte lines), boxes of BM lines loaded to shared memory, then stored;
  tmah_BM     the same with the descriptor made on the host (a kernel parameter);
  tmahs_BM    tmah_BM storing through a TMA descriptor over the slots too.
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

from tiered.kernels import slot_table  # noqa: E402

BLOCK_BYTES = 9_437_184  # the 10.6B shape's bf16 expert block


def log(msg: str) -> None:
    print(f"[bench-h2d-read] {msg}", file=sys.stderr, flush=True)


@triton.jit
def _ld(ptrs, MODE: tl.constexpr):
    """Four int32 words at each pointer (16 bytes, aligned) by inline PTX: MODE 0 ld.global.L2::256B, 1 the
    non-coherent path without L1 allocation and the same hint."""
    if MODE == 0:
        return tl.inline_asm_elementwise("ld.global.L2::256B.v4.b32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,l", [ptrs],
                                         dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
    else:
        return tl.inline_asm_elementwise("ld.global.nc.L1::no_allocate.L2::256B.v4.b32 {$0, $1, $2, $3}, [$4];",
                                         "=r,=r,=r,=r,l", [ptrs], dtype=(tl.int32, tl.int32, tl.int32, tl.int32),
                                         is_pure=True, pack=1)


@triton.jit
def _read_kernel(src, row_src, row_dst, dst, row_words, n_items, n_chunks, BLOCK: tl.constexpr,
                 MODE: tl.constexpr):
    """Programs looping over (row, chunk) items of BLOCK words: dst[row_dst[r]] <- src[row_src[r]].
    MODE 0 / 1: _ld's hints (BLOCK // 4 pointers of 16 bytes); 2: tl.load with cache_modifier .cg."""
    for it in range(tl.program_id(0), n_items, tl.num_programs(0)):
        r = it // n_chunks
        s = tl.load(row_src + r)
        if s >= 0:
            d = tl.load(row_dst + r)
            start = (it % n_chunks).to(tl.int64) * BLOCK
            if MODE == 2:
                offs = start + tl.arange(0, BLOCK)
                m = offs < row_words
                v = tl.load(src + s * row_words + offs, mask=m, cache_modifier=".cg")
                tl.store(dst + d * row_words + offs, v, mask=m)
            else:
                q = start + 4 * tl.arange(0, BLOCK // 4)
                mq = q < row_words  # row_words is a multiple of 4 (blocks are 4 KiB aligned)
                w0, w1, w2, w3 = _ld(src + s * row_words + tl.where(mq, q, 0), MODE)
                out = dst + d * row_words + q
                tl.store(out, w0, mask=mq)
                tl.store(out + 1, w1, mask=mq)
                tl.store(out + 2, w2, mask=mq)
                tl.store(out + 3, w3, mask=mq)


@triton.jit
def _tma_kernel(src, row_src, row_dst, dst, n_host_lines, lines_per_row, n_items, tiles_per_row,
                BM: tl.constexpr):
    """The host rows as one [n_host_lines, 32] int32 tensor (128-byte lines) under a device-side TMA descriptor:
    each item loads a [BM, 32] box of row r's lines to shared memory, then stores it to the slot."""
    desc = tl.make_tensor_descriptor(src, shape=[n_host_lines, 32], strides=[32, 1], block_shape=[BM, 32])
    for it in range(tl.program_id(0), n_items, tl.num_programs(0)):
        r = it // tiles_per_row
        s = tl.load(row_src + r)
        if s >= 0:
            d = tl.load(row_dst + r)
            t = it % tiles_per_row
            line0 = s * lines_per_row + t * BM
            v = desc.load([line0.to(tl.int32), 0])
            lm = t * BM + tl.arange(0, BM)
            offs = (d * lines_per_row + lm)[:, None] * 32 + tl.arange(0, 32)[None, :]
            tl.store(dst + offs, v, mask=(lm < lines_per_row)[:, None])


@triton.jit
def _tmah_kernel(desc, row_src, row_dst, dst, lines_per_row, n_items, tiles_per_row, BM: tl.constexpr):
    """_tma_kernel with the descriptor made on the host (TensorDescriptor, a kernel parameter: no global scratch)."""
    for it in range(tl.program_id(0), n_items, tl.num_programs(0)):
        r = it // tiles_per_row
        s = tl.load(row_src + r)
        if s >= 0:
            d = tl.load(row_dst + r)
            t = it % tiles_per_row
            v = desc.load([(s * lines_per_row + t * BM).to(tl.int32), 0])
            lm = t * BM + tl.arange(0, BM)
            offs = (d * lines_per_row + lm)[:, None] * 32 + tl.arange(0, 32)[None, :]
            tl.store(dst + offs, v, mask=(lm < lines_per_row)[:, None])


@triton.jit
def _tmahs_kernel(desc, out, row_src, row_dst, lines_per_row, n_items, tiles_per_row, BM: tl.constexpr):
    """_tmah_kernel storing through a TMA descriptor over the slots too (row_words a multiple of BM * 32)."""
    for it in range(tl.program_id(0), n_items, tl.num_programs(0)):
        r = it // tiles_per_row
        s = tl.load(row_src + r)
        if s >= 0:
            d = tl.load(row_dst + r)
            t = it % tiles_per_row
            v = desc.load([(s * lines_per_row + t * BM).to(tl.int32), 0])
            out.store([(d * lines_per_row + t * BM).to(tl.int32), 0], v)


def graph_us(fn, calls: int, reps: int = 3) -> float:
    """Device µs per call of fn(i), captured once as one CUDA graph of `calls` calls and replayed (best of reps)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(min(2, calls)):
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


def way_call(way: str, host: torch.Tensor, slots: torch.Tensor, ctas: int):
    """fn(srcs, dst) for one way: copies slots[dst[r]] <- host[srcs[r]] for every srcs[r] >= 0."""
    B = slots.shape[1]
    words = B // 4
    hp = slot_table.HostPointer(host.view(torch.int32))
    if way == "ce":
        def fn(srcs_cpu, dst_cpu):
            for s, d in zip(srcs_cpu, dst_cpu):
                if s >= 0:
                    slots[d].copy_(host[s], non_blocking=True)
        return fn, True
    if way == "gather":
        return (lambda srcs, dst: slot_table.gather(host, srcs, dst, slots, ctas=ctas)), False
    if way in ("l2_256", "nc_256", "cg"):
        mode = {"l2_256": 0, "nc_256": 1, "cg": 2}[way]
        BLOCK = 4096
        n_c = triton.cdiv(words, BLOCK)

        def fn(srcs, dst):
            n = srcs.shape[0] * n_c
            _read_kernel[(min(ctas, n),)](hp, srcs, dst, slots.view(torch.int32), words, n, n_c, BLOCK=BLOCK,
                                          MODE=mode, num_warps=4)
        return fn, False
    if way.startswith("tmahs_"):
        from triton.tools.tensor_descriptor import TensorDescriptor

        BM = int(way[6:])
        lines = B // 128
        if lines % BM:
            raise ValueError(f"{lines} lines a row are not a multiple of {BM}")
        tiles = lines // BM
        desc = TensorDescriptor(hp, [host.shape[0] * lines, 32], [32, 1], [BM, 32])
        out = TensorDescriptor(slots.view(torch.int32), [slots.shape[0] * lines, 32], [32, 1], [BM, 32])

        def fn(srcs, dst):
            n = srcs.shape[0] * tiles
            _tmahs_kernel[(min(ctas, n),)](desc, out, srcs, dst, lines, n, tiles, BM=BM, num_warps=4)
        return fn, False
    if way.startswith("tmah_"):
        from triton.tools.tensor_descriptor import TensorDescriptor

        BM = int(way[5:])
        lines = B // 128
        tiles = triton.cdiv(lines, BM)
        desc = TensorDescriptor(hp, [host.shape[0] * lines, 32], [32, 1], [BM, 32])

        def fn(srcs, dst):
            n = srcs.shape[0] * tiles
            _tmah_kernel[(min(ctas, n),)](desc, srcs, dst, slots.view(torch.int32), lines, n, tiles, BM=BM,
                                          num_warps=4)
        return fn, False
    if way.startswith("tma_"):
        BM = int(way[4:])
        lines = B // 128
        tiles = triton.cdiv(lines, BM)

        def fn(srcs, dst):
            n = srcs.shape[0] * tiles
            _tma_kernel[(min(ctas, n),)](hp, srcs, dst, slots.view(torch.int32), host.shape[0] * lines, lines, n,
                                         tiles, BM=BM, num_warps=4)
        return fn, False
    raise SystemExit(f"unknown way {way!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ways", default="ce,gather,cg,l2_256,nc_256,tma_64,tma_128,tma_256,tmah_64,tmah_128,tmah_256,"
                                      "tmahs_128")
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
    write_out("h2d_read.json", res)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
