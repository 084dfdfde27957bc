"""Would the decode's expert kernels run faster from L2? (GPU; a probe before building a predicted-expert prefetch.)

One token's K experts at the 10.6B shape (D 2048, F 768, K 8, q4 by default) through the engine's
`experts_quant_decode` (TUNED's kernels: the Gluon gate_up, the word-tile down), timed in a CUDA graph of --calls
calls, with PDL where the device has it, three ways:
  - cold: each call on other slots of a pool larger than L2 (what the VRAM decode sees: a layer's experts are read
    once a token);
  - warm: every call on the same K slots, so after the first call they come from L2 (the bound on what a prefetch
    of the right experts into L2 could give);
  - half: each call's first K/2 experts shared with the previous call's, the rest new (a predictor right half the time).
Each is checked against the plain reference (dequantize, fp32) first.

    python3 tools/l2_experts_probe.py                  # q4, 8 calls a graph
    python3 tools/l2_experts_probe.py --fmt q8 --calls 16

Prints one line per way, then one JSON object; with OUT set, also $OUT/l2-experts-probe.json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "benchmarks"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fmt", default="q4")
    ap.add_argument("--slots", type=int, default=512, help="pool slots (512 q4 experts: about 1.4 GB, past L2)")
    ap.add_argument("--calls", type=int, default=8, help="calls a graph")
    ap.add_argument("--reps", type=int, default=50)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("l2_experts_probe: needs a CUDA GPU (it times L2 against HBM)")
    from bench_moe_kernels import rel, time_graph
    from bench_quant_kernels import expert_bytes, qpool, ref_experts
    from benchmeta import git_commit, write_out

    from tiered.kernels.quant_moe import experts_quant_decode

    dev = torch.device("cuda")
    D, F, K = 2048, 768, 8
    pool, W = qpool(a.fmt, a.slots, D, F)
    gen = torch.Generator(device=dev).manual_seed(1)
    perm = torch.randperm(a.slots, device=dev, generator=gen)
    xs = [torch.randn(1, D, device=dev, generator=gen).bfloat16() for _ in range(a.calls)]
    ws = [torch.softmax(torch.randn(1, K, device=dev, generator=gen), -1) for _ in range(a.calls)]

    def slot_sets(way: str) -> list:
        if way == "warm":
            return [perm[:K].contiguous() for _ in range(a.calls)]
        if way == "half":  # call i: the previous call's last K/2 slots, then K/2 new ones
            return [perm[i * K // 2:i * K // 2 + K].contiguous() for i in range(a.calls)]
        return [perm[i * K:(i + 1) * K].contiguous() for i in range(a.calls)]

    res: dict = {"device": torch.cuda.get_device_name(), "commit": git_commit(), "fmt": a.fmt, "calls": a.calls,
                 "expert_bytes": expert_bytes(W), "ways": {}}
    for way in ("cold", "warm", "half", "cold"):
        sets = slot_sets(way)
        outs = [None] * a.calls

        def call(i: int, sets=sets, outs=outs) -> None:
            outs[i] = experts_quant_decode(xs[i], sets[i], ws[i], W.gate, W.up, W.down)

        for i in range(a.calls):
            call(i)
        err = max(rel(outs[i].float(), ref_experts(xs[i], sets[i], ws[i], W)) for i in range(a.calls))
        if err > 2e-2:
            sys.exit(f"l2_experts_probe: {way}: relative error {err:.3g} against the reference; not timed")
        us = time_graph([lambda i=i: call(i) for i in range(a.calls)], reps=a.reps) * 1e6
        gbps = K * expert_bytes(W) / us / 1e3
        key = way if way not in res["ways"] else way + "2"
        res["ways"][key] = {"us_per_call": us, "gb_s": gbps, "rel_err": err}
        print(f"{key:>6}: {us:7.2f} us a call ({gbps:6.0f} GB/s of the K experts' bytes), rel err {err:.2e}")
    print(write_out(res, "l2-experts-probe.json"))


if __name__ == "__main__":
    main()
