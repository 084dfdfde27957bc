"""Decode attention on the GPU: the Triton paged kernel (tiered/kernels/attention.py) against SDPA.

For each batch size B and context length n, one query token per row (bf16, the 10.6B shape by default:
32 q / 4 kv heads, hd 128):
  - triton:      `decode_attention` over a contiguous cache seen as pages (B = 1) or over page pools with
                 scattered pages of --page-size (B > 1), lengths in a device tensor (one graph, any n);
  - sdpa:        SDPA over exactly n positions of a contiguous cache [B, KV, S, hd] (eager decode today);
  - sdpa-span:   SDPA over the power-of-two span >= n with a device-built mask (what a per-span CUDA
                 graph replays today).
Each is captured in a CUDA graph of --reps calls and timed over replays (GPU time, no launch overhead),
after a warm-up; outputs are checked against the torch reference after timing. GB/s counts the K and V
bytes a step must read (B * n * KV * hd * 2 tensors * 2 bytes), against the HBM read bandwidth measured
in the same run with a read-only reduction over --hbm-gib GiB.

    python3 benchmarks/bench_attention.py                      # GPU box, about 1 minute
    python3 benchmarks/bench_attention.py --contexts 512,4096 --batches 1 --reps 5   # a quicker look
    TRITON_INTERPRET=1 python3 benchmarks/bench_attention.py --cpu-smoke   # the script's own check, CPU

Prints a table, then one JSON line last; writes $OUT/attention.json when OUT is set.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
from benchmeta import git_commit, write_out  # noqa: E402

if "--cpu-smoke" in sys.argv:  # Triton's interpreter is chosen when triton is imported
    import os
    os.environ.setdefault("TRITON_INTERPRET", "1")
from tiered.kernels import attention as ka  # noqa: E402
from tiered.model.transformer import span_for  # noqa: E402


def log(msg: str) -> None:
    print(f"[attention] {msg}", file=sys.stderr, flush=True)


def graph_time_us(fn, reps: int, iters: int) -> float:
    """Mean GPU time of one fn() call in microseconds: `reps` calls captured in one graph, replayed `iters`
    times. On CPU (--cpu-smoke) wall time of plain calls."""
    if not torch.cuda.is_available():
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) * 1e6 / reps
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) * 1e3 / (iters * reps)


def hbm_read_gbps(gib: float, dev: torch.device) -> float:
    """Read bandwidth in GB/s: a sum over `gib` GiB of bf16 (reads it once; writes one scalar)."""
    x = torch.ones(int(gib * 2 ** 30) // 2, dtype=torch.bfloat16, device=dev)
    out = torch.empty((), dtype=torch.float32, device=dev)

    def fn():
        torch.sum(x, 0, dtype=torch.float32, out=out)

    us = graph_time_us(fn, 2, 5)
    return x.numel() * 2 / (us * 1e-6) / 1e9


def one_case(B: int, n: int, args, bw: float, dev: torch.device) -> dict:
    H, KV, hd, PS = args.heads, args.kv_heads, args.head_dim, args.page_size
    G = H // KV
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    S = max(n, 128)
    cap = 1 << (S - 1).bit_length()  # the contiguous cache's positions (the span of the last bucket)
    torch.manual_seed(0)
    k = torch.randn(B, KV, cap, hd, device=dev, dtype=dt)  # contiguous caches, SDPA layout
    v = torch.randn(B, KV, cap, hd, device=dev, dtype=dt)
    q = torch.randn(B, 1, H, hd, device=dev, dtype=dt)
    sl = torch.full((B,), n, dtype=torch.int32, device=dev)
    scale = hd ** -0.5
    if B == 1:
        kp, bt = ka.paged_view(k[0], heads_first=True)
        vp, _ = ka.paged_view(v[0], heads_first=True)
    else:  # the same keys copied into page pools, each row's pages scattered
        mp = -(-cap // PS)
        perm = torch.randperm(B * mp, device=dev)
        bt = perm.view(B, mp).to(torch.int32)
        kp = torch.empty(B * mp, PS, KV, hd, device=dev, dtype=dt)
        vp = torch.empty_like(kp)
        kp[bt.long()] = k.view(B, KV, mp, PS, hd).permute(0, 2, 3, 1, 4)
        vp[bt.long()] = v.view(B, KV, mp, PS, hd).permute(0, 2, 3, 1, 4)
    out = torch.empty_like(q)
    max_seqlen = args.max_context or cap  # what a graph captured at load knows: the cache's capacity

    def triton_fn():
        ka.decode_attention(q, kp, vp, bt, sl, scale=scale, out=out, max_seqlen=max_seqlen)

    qg = q.view(B, 1, KV, G, hd).permute(0, 2, 3, 1, 4).reshape(B, KV, G, hd)  # [B, KV, G, hd] rows g

    def sdpa_fn():
        return F.scaled_dot_product_attention(qg, k[:, :, :n], v[:, :, :n], scale=scale)

    span = span_for(n - 1, cap)  # the step at position n - 1 reads n keys
    pos = torch.full((1,), n - 1, device=dev)

    def sdpa_span_fn():  # the mask is built on the device each step, as Transformer.static_plan does
        m = (torch.arange(span, device=dev)[None, :] <= pos[:, None]).expand(G, span)
        return F.scaled_dot_product_attention(qg, k[:, :, :span], v[:, :, :span], attn_mask=m, scale=scale)

    ns = ka.pick_splits(B * KV, max_seqlen, device=dev)
    res = {"B": B, "n": n, "splits": ns}
    kv_bytes = B * n * KV * hd * 2 * 2
    for name, fn in (("triton", triton_fn), ("sdpa", sdpa_fn), ("sdpa_span", sdpa_span_fn)):
        try:
            us = graph_time_us(fn, args.reps, args.iters)
        except Exception as e:  # noqa: BLE001 - a backend this torch refuses: report it, go on
            log(f"B={B} n={n} {name}: {type(e).__name__}: {e}")
            res[name] = None
            continue
        res[name] = {"us": us, "gbps": kv_bytes / (us * 1e-6) / 1e9, "vs_hbm": kv_bytes / (us * 1e-6) / 1e9 / bw}
    # check after timing: the kernel against the torch reference and against SDPA
    triton_fn()
    ref = ka.decode_attention_ref(q, kp, vp, bt, sl, scale=scale)
    o_sdpa = sdpa_fn().view(B, KV * G, hd).view(B, 1, H, hd)
    res["max_err_vs_ref"] = float((out.float() - ref.float()).abs().max())
    res["max_err_vs_sdpa"] = float((out.float() - o_sdpa.float()).abs().max())
    tol = 2e-2 if dt == torch.bfloat16 else 1e-4
    if res["max_err_vs_ref"] > tol:
        log(f"B={B} n={n}: kernel differs from the reference by {res['max_err_vs_ref']:.3g} > {tol}")
    res["ok"] = res["max_err_vs_ref"] <= tol
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="128,512,2048,8192,32768", help="context lengths n, comma-separated")
    ap.add_argument("--batches", default="1,8", help="rows B, comma-separated")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--page-size", type=int, default=16, help="tokens per page when B > 1")
    ap.add_argument("--max-context", type=int, default=None,
                    help="the splits are sized for this capacity (as a graph captured at load is); default the "
                         "power of two >= n")
    ap.add_argument("--reps", type=int, default=20, help="calls per captured graph")
    ap.add_argument("--iters", type=int, default=20, help="graph replays timed")
    ap.add_argument("--hbm-gib", type=float, default=4.0)
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny shapes on CPU under Triton's interpreter (checks the script, times nothing useful)")
    args = ap.parse_args()
    if args.cpu_smoke:
        args.contexts, args.batches, args.heads, args.kv_heads, args.head_dim = "5,130", "1,2", 4, 2, 16
        args.reps, args.iters, args.hbm_gib, args.page_size = 1, 1, 0.01, 8
        dev = torch.device("cpu")
    elif not torch.cuda.is_available() or ka.triton is None:
        sys.exit("bench_attention needs a CUDA GPU and triton (or --cpu-smoke)")
    else:
        dev = torch.device("cuda")
    bw = hbm_read_gbps(args.hbm_gib, dev)
    log(f"HBM read bandwidth {bw:.0f} GB/s ({args.hbm_gib} GiB reduction)")
    rows = []
    for B in [int(x) for x in args.batches.split(",")]:
        for n in [int(x) for x in args.contexts.split(",")]:
            rows.append(one_case(B, n, args, bw, dev))
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    hdr = f"{'B':>3} {'n':>6} {'splits':>6} | {'triton us':>9} {'GB/s':>6} {'%HBM':>5} | {'sdpa us':>8} {'GB/s':>6} | " \
          f"{'span us':>8} {'GB/s':>6} | {'vs sdpa':>7} {'err':>8}"
    print(hdr)
    print("-" * len(hdr))

    def cell(r, name):
        x = r[name]
        return (f"{x['us']:9.1f} {x['gbps']:6.0f}" if x else f"{'-':>9} {'-':>6}")

    for r in rows:
        t, s = r["triton"], r["sdpa"]
        speed = f"{s['us'] / t['us']:7.2f}" if t and s else f"{'-':>7}"
        pct = f"{100 * t['vs_hbm']:5.1f}" if t else f"{'-':>5}"
        print(f"{r['B']:>3} {r['n']:>6} {r['splits']:>6} | {cell(r, 'triton')} {pct} | {cell(r, 'sdpa')[1:]} | "
              f"{cell(r, 'sdpa_span')[1:]} | {speed} {r['max_err_vs_ref']:8.2g}")
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (interpreter smoke test)"
    res = {"bench": "attention", "commit": git_commit(), "device": name, "all_ok": all(r["ok"] for r in rows),
           "torch": torch.__version__, "triton": ka.triton.__version__, "hbm_read_gbps": bw,
           "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim, "dtype": "bfloat16" if dev.type == "cuda" else "float32",
           "page_size": args.page_size, "rows": rows}
    print(write_out(res, "attention.json"))


if __name__ == "__main__":
    main()
