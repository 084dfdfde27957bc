"""Probe: can a GPU kernel gather expert blocks straight out of pinned (mapped) host memory, and how fast?

The device-resident slot table (offloaded decode in one CUDA graph) needs the misses of a layer copied by a kernel
reading host memory over UVA, because a captured graph cannot issue data-dependent cudaMemcpyAsync calls. This
measures, on the same pinned host pool:
  - the copy engine: one cudaMemcpyAsync per block (what SlotPool.copy_in does today);
  - a Triton gather kernel reading host memory through the device pointer of the pinned pool, for K blocks of
    block_size bytes at rows picked by a device index tensor, at several CTA counts;
for block sizes of bf16 and q4 experts of the 10.6B shape and of the 397B shape at q4. It also checks the copied
bytes (a kernel that reads the wrong rows fails the probe).

    python3 benchmarks/probe_uva_copy.py [--pool-gb 4] [--json-out PATH]

Prints a table, then one JSON line; writes $OUT/uva-probe.json when $OUT is set.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_rows(src, idx, dst, dst_idx, row_words, n_rows, BLOCK: tl.constexpr, CHUNKS: tl.constexpr):
    """dst[dst_idx[r]] = src[idx[r]] for r < n_rows, rows of row_words int32 words; program (r, c) copies
    CHUNKS*BLOCK words of row r starting at c*CHUNKS*BLOCK."""
    r = tl.program_id(0)
    c = tl.program_id(1)
    if r < n_rows:
        s = tl.load(idx + r).to(tl.int64)
        d = tl.load(dst_idx + r).to(tl.int64)
        base = c.to(tl.int64) * CHUNKS * BLOCK
        for i in tl.static_range(CHUNKS):
            offs = base + i * BLOCK + tl.arange(0, BLOCK)
            m = offs < row_words
            v = tl.load(src + s * row_words + offs, mask=m)
            tl.store(dst + d * row_words + offs, v, mask=m)


class _Ptr:
    """A host pointer Triton can take as a tensor argument (data_ptr + dtype)."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t
        self.dtype = t.dtype

    def data_ptr(self) -> int:
        return self.t.data_ptr()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool-gb", type=float, default=4.0)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    sizes = {"bf16_10.6B": 3 * 2048 * 768 * 2, "q4_10.6B": 3 * 2048 * 768 * 9 // 16,
             "q4_397B": 3 * 4096 * 1024 * 9 // 16}
    out: dict = {"bench": "uva-probe", "date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(dev),
                 "commit": os.environ.get("TIERED_COMMIT", "unknown"), "rows": []}
    for name, bs in sizes.items():
        bs = (bs + 4095) // 4096 * 4096
        words = bs // 4
        n_pool = max(16, int(args.pool_gb * 1e9 // bs))
        host = torch.empty((n_pool, words), dtype=torch.int32, pin_memory=True)
        host.view(-1)[:] = torch.arange(host.numel(), dtype=torch.int32) % 1000003
        slots = torch.empty((64, words), dtype=torch.int32, device=dev)
        gen = torch.Generator().manual_seed(0)
        for K in (1, 4, 8, 10):
            pick = torch.randperm(n_pool, generator=gen)[:K]
            idx = pick.to(dev)
            didx = torch.arange(K, device=dev)
            # copy engine: K cudaMemcpyAsync
            torch.cuda.synchronize()
            best_ce = 0.0
            for _ in range(5):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                for j, p in enumerate(pick.tolist()):
                    slots[j].copy_(host[p], non_blocking=True)
                b.record()
                b.synchronize()
                best_ce = max(best_ce, K * bs / (a.elapsed_time(b) / 1e3) / 1e9)
            row = {"block": name, "block_bytes": bs, "K": K, "copy_engine_gbps": round(best_ce, 2)}
            for chunks in (1, 2, 4, 8):
                BLOCK = 1024
                n_c = triton.cdiv(words, BLOCK * chunks)  # grid (K, n_c): each program copies `chunks` tiles
                slots.zero_()
                try:
                    _gather_rows[(K, n_c)](_Ptr(host), idx, slots, didx, words, K, BLOCK=BLOCK, CHUNKS=chunks)
                    torch.cuda.synchronize()
                except Exception as e:  # noqa: BLE001 - the probe reports why the kernel could not read host memory
                    row["kernel_error"] = f"{type(e).__name__}: {e}"[:300]
                    break
                ok = all(torch.equal(slots[j].cpu(), host[p]) for j, p in enumerate(pick.tolist()))
                best = 0.0
                for _ in range(5):
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    _gather_rows[(K, n_c)](_Ptr(host), idx, slots, didx, words, K, BLOCK=BLOCK, CHUNKS=chunks)
                    b.record()
                    b.synchronize()
                    best = max(best, K * bs / (a.elapsed_time(b) / 1e3) / 1e9)
                row[f"kernel_chunks{chunks}_gbps"] = round(best, 2)
                row[f"kernel_chunks{chunks}_ok"] = ok
            out["rows"].append(row)
            print(row, flush=True)
        del host, slots
    line = json.dumps(out)
    print(line)
    path = args.json_out or (os.path.join(os.environ["OUT"], "uva-probe.json") if os.environ.get("OUT") else None)
    if path:
        with open(path, "w") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
