"""GPU microbenchmark: decode expert compute, gather+GEMV (moe.experts_one_token) vs grouped_mm.

    python3 tools/bench_expert_kernels.py [--slots 2048] [--layers 16]
Checks both against a plain loop over experts (fp32 reference), then times them with CUDA events
inside a CUDA graph of `--layers` calls (one decode step's worth). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from tiered.kernels.grouped import experts_decode_grouped  # noqa: E402
from tiered.model.moe import experts_one_token  # noqa: E402
from tiered.store.disk import expert_views  # noqa: E402
from tiered.layout.format import plan_block  # noqa: E402


class Pool:
    def __init__(self, weights):
        self.weights = weights
        self.max_experts_per_call = 10**9

    def get(self, layer, ids):
        return ids


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slots", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--D", type=int, default=2048)
    ap.add_argument("--F", type=int, default=768)
    ap.add_argument("--K", type=int, default=8)
    a = ap.parse_args()
    dev = torch.device("cuda")
    specs, bs = plan_block({"gate": ((a.F, a.D), "bfloat16"), "up": ((a.F, a.D), "bfloat16"),
                            "down": ((a.D, a.F), "bfloat16")})
    pool = torch.randint(0, 255, (a.slots, bs), dtype=torch.uint8, device=dev)
    W = expert_views(pool, specs)
    for t in (W.gate, W.up, W.down):  # sane bf16 values (random bytes can be NaN/huge)
        t.copy_(torch.randn_like(t, dtype=torch.float32).mul_(0.02).to(torch.bfloat16))
    prov = Pool(W)
    x = torch.randn(1, a.D, device=dev, dtype=torch.bfloat16)
    ids = torch.randperm(a.slots, device=dev)[: a.K].view(1, a.K)
    wts = torch.softmax(torch.randn(1, a.K, device=dev), -1).to(torch.bfloat16)
    ref = torch.zeros(1, a.D, device=dev)
    for k in range(a.K):
        s = int(ids[0, k])
        h = torch.nn.functional.silu(x.float() @ W.gate[s].float().T) * (x.float() @ W.up[s].float().T)
        ref += wts[0, k].float() * (h @ W.down[s].float().T)
    res = {}
    fns = {"gather_gemv": lambda: experts_one_token(x, ids, wts, prov, 0),
           "grouped_mm": lambda: experts_decode_grouped(x, ids[0], wts, W.gate, W.up, W.down)}
    for name, fn in fns.items():
        try:
            out = fn().float()
            err = float((out - ref).norm() / ref.norm())
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):
                    fn()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(a.layers):
                    fn()
            for _ in range(3):
                g.replay()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for _ in range(20):
                g.replay()
            e1.record()
            torch.cuda.synchronize()
            ms = e0.elapsed_time(e1) / 20
            gb = a.layers * a.K * 3 * a.D * a.F * 2 / 1e9
            res[name] = {"rel_err": err, "ms_per_step": ms, "expert_gb_per_step": gb, "gbps": gb / ms * 1e3}
        except Exception as e:  # report, don't stop: the other variant still runs
            res[name] = {"error": f"{type(e).__name__}: {e}"}
    for k, v in res.items():
        print(f"{k:<14} {v}")
    print(json.dumps({"bench": "expert_kernels", "slots": a.slots, **res}))


if __name__ == "__main__":
    main()
