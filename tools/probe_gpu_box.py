"""Probe the GPU box for the APIs tiered relies on; prints one JSON line (and $OUT/probe.json).

Checks: torch/transformers versions, cudaHostRegister(ReadOnly) of an mmap'd file region and a copy
from it, CUDA graph capture of an index_select + bmm decode-like step, SDPA flash with GQA,
O_DIRECT reads, drop_caches, pinned host→device bandwidth.
"""
from __future__ import annotations

import mmap
import os
import time
import traceback
from pathlib import Path

import torch

from benchmeta import write_out  # tools/ is on sys.path when this script runs


def attempt(fn):
    try:
        return {"ok": True, **(fn() or {})}
    except Exception as e:  # the probe reports every failure instead of stopping
        return {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-800:]}


def host_register(tmp: Path):
    n = 64 * 2**20
    p = tmp / "reg.bin"
    p.write_bytes(os.urandom(n))
    f = open(p, "rb")
    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    t = torch.frombuffer(mm, dtype=torch.uint8)
    cud = torch.cuda.cudart()
    err = cud.cudaHostRegister(t.data_ptr(), n, 8)
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        dev.copy_(t, non_blocking=True)
    torch.cuda.synchronize()
    gbps = 10 * n / (time.perf_counter() - t0) / 1e9
    same = bool(torch.equal(dev.cpu(), t))
    err2 = cud.cudaHostUnregister(t.data_ptr())
    return {"register_err": int(err), "unregister_err": int(err2), "gbps": gbps, "bytes_equal": same}


def pinned_bw():
    n = 256 * 2**20
    h = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    d = torch.empty(n, dtype=torch.uint8, device="cuda")
    d.copy_(h, non_blocking=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        d.copy_(h, non_blocking=True)
    torch.cuda.synchronize()
    return {"h2d_gbps": 10 * n / (time.perf_counter() - t0) / 1e9}


def graph_capture():
    E, F, D, K = 128, 768, 2048, 8
    w = torch.randn(E, F, D, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, D, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(E, D, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(K, F, device="cuda", dtype=torch.bfloat16)

    def step():
        ids = torch.topk(x @ r.T, K, dim=-1).indices[0]
        out.copy_(torch.bmm(w.index_select(0, ids), x.T.expand(K, D, 1).contiguous()).squeeze(-1))

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    g.replay()
    torch.cuda.synchronize()
    return {"replayed": True}


def sdpa_flash():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 4, 64, 128, device="cuda", dtype=torch.bfloat16)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        o = torch.nn.functional.scaled_dot_product_attention(q, k, k, enable_gqa=True)
    return {"shape": list(o.shape)}


def odirect(tmp: Path):
    p = tmp / "od.bin"
    p.write_bytes(os.urandom(16 * 2**20))
    fd = os.open(p, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 8 * 2**20)
    n = os.preadv(fd, [buf], 4096)
    os.close(fd)
    return {"read": n}


def drop_caches():
    os.system("sync")
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    return {}


def main() -> None:
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / "tiered-probe"
    tmp.mkdir(parents=True, exist_ok=True)
    import transformers

    res = {"torch": torch.__version__, "transformers": transformers.__version__, "cuda": torch.cuda.is_available(),
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "meminfo_total_kb": int(open("/proc/meminfo").readline().split()[1]), "nproc": os.cpu_count()}
    for name, fn in [("pinned", pinned_bw), ("host_register", lambda: host_register(tmp)),
                     ("graph_capture", graph_capture), ("sdpa_flash_gqa", sdpa_flash),
                     ("odirect", lambda: odirect(tmp)), ("drop_caches", drop_caches)]:
        res[name] = attempt(fn)
    line = write_out(res, "probe.json")
    print(line)


if __name__ == "__main__":
    main()
