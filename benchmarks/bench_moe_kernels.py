"""MoE kernel micro-benchmark (GPU): achieved GB/s of each expert kernel against measured HBM read bandwidth.

    python3 benchmarks/bench_moe_kernels.py                 # H200: about 2 minutes (Triton compiles included)
    python3 benchmarks/bench_moe_kernels.py --quick         # default configs only

What it measures, all in one run:
  - HBM read bandwidth: torch.sum over a 4 GiB fp32 tensor (a read-only reduction, not a copy).
  - Decode (T = 1 and small T), per shape (10.6B: D 2048, F 768, K 8; 397B: D 4096, F 1024, K 10): the
    current torch path (moe.experts_from_slots: gather + GEMV), torch grouped_mm (kernels/grouped.py),
    and the Triton kernels of tiered/kernels/moe_decode.py over a sweep of tile sizes (split, split-K
    down, fused). Timed as a CUDA graph of --layers calls, each layer on other slots of a pool larger
    than L2, so every byte comes from HBM. GB/s = the K experts' weight bytes / time per layer.
  - Grouped (prefill and batched decode), 10.6B shape, E 128: the current torch loop
    (moe.experts_grouped), torch._grouped_mm over the layer (moe_grouped.grouped_mm_layer) and the
    Triton grouped kernel over a sweep of block sizes; TFLOP/s and GB/s of the distinct experts' bytes.
  - Dense GEMVs of one decode token (lm_head 151936 x 2048, qkv, o_proj, router): cuBLAS through F.linear.
Each variant is checked against an fp32 loop over experts (rel. error printed) after timing.
Prints a table, then one JSON line last; writes $OUT/moe_kernels.json when OUT is set.
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

from tiered.layout.format import plan_block  # noqa: E402
from tiered.kernels.moe_decode import DecodeConfig, decode_down, decode_gate_up, moe_decode  # noqa: E402
from tiered.kernels.moe_grouped import GroupedConfig, grouped_mm_layer, moe_grouped, pick_config  # noqa: E402
from tiered.kernels.moe_naive import experts_loop  # noqa: E402
from tiered.kernels.grouped import experts_decode_grouped  # noqa: E402
from tiered.model.moe import experts_from_slots, experts_grouped  # noqa: E402
from tiered.store.disk import expert_views  # noqa: E402

DEV = torch.device("cuda")


class _Resident:
    """The provider protocol over a pool whose slot row = expert id (one layer)."""

    def __init__(self, W, n):
        self.weights, self.max_experts_per_call = W, n

    def get(self, layer, ids):
        return ids

    def prefetch(self, layer, ids):
        pass


def make_pool(S: int, D: int, F: int, seed: int = 0):
    specs, bs = plan_block({"gate": ((F, D), "bfloat16"), "up": ((F, D), "bfloat16"),
                            "down": ((D, F), "bfloat16")})
    pool = torch.empty(S, bs, dtype=torch.uint8, device=DEV)
    W = expert_views(pool, specs)
    g = torch.Generator(device=DEV).manual_seed(seed)
    for t in (W.gate, W.up, W.down):
        t.copy_(torch.randn(t.shape, generator=g, device=DEV).mul_(D ** -0.5 * 2).to(torch.bfloat16))
    return pool, W


def time_graph(fns, reps: int = 20) -> float:
    """Seconds per call of each fn in `fns`, replayed inside one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    g.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(reps):
        g.replay()
    e1.record()
    torch.cuda.synchronize()
    del g
    return e0.elapsed_time(e1) / 1e3 / (reps * len(fns))


def time_eager(fn, reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def hbm_read_gbps(gib: float = 4.0) -> dict:
    n = int(gib * (1 << 30) // 4)
    a = torch.ones(n, dtype=torch.float32, device=DEV)
    out = torch.empty((), dtype=torch.float32, device=DEV)
    t = time_graph([lambda: torch.sum(a, 0, out=out)], reps=10)
    read = a.numel() * 4 / t / 1e9
    b = torch.empty_like(a)
    tc = time_graph([lambda: b.copy_(a)], reps=5)
    return {"read_gbps": read, "copy_gbps_rw": 2 * n * 4 / tc / 1e9}


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


UPS = [(4, 2048, 4), (4, 1024, 4), (8, 512, 4), (8, 1024, 4), (8, 1024, 8), (16, 256, 4), (16, 512, 8),
       (32, 256, 8), (2, 2048, 4), (4, 512, 2)]  # gate/up: block_f, block_d, warps
DOWNS = [(4, 256, 1, 4), (2, 1024, 1, 4), (4, 1024, 1, 8), (8, 256, 1, 4), (2, 256, 1, 2), (1, 1024, 1, 4),
         (8, 256, 2, 4), (16, 256, 4, 4), (16, 256, 0, 4), (32, 256, 0, 8), (8, 1024, 0, 4)]  # d, f, split (0 = K), warps
FUSED = [(16, 512, 64, 4), (32, 512, 64, 4), (32, 256, 128, 8), (64, 256, 64, 8), (16, 1024, 32, 4)]  # f, d, o, warps


def bench_decode(name, D, F, K, layers, T_list, quick, hbm, budget_end, sweep=(UPS, DOWNS, FUSED)):
    """Decode variants at one shape; returns rows of results."""
    S = max(layers * K + 8, 64 if D * F < 4e6 else 0)
    pool, W = make_pool(S, D, F)
    gen = torch.Generator(device=DEV).manual_seed(1)
    perm = torch.randperm(S, device=DEV, generator=gen)
    per_layer = []  # (x [T,D], slots [T,K], w [T,K]) per layer, distinct slots per layer
    Tmax = max(T_list)
    for l in range(layers):
        sl = perm[(l * K) % (S - K):(l * K) % (S - K) + K]
        x = torch.randn(Tmax, D, device=DEV, generator=gen).bfloat16()
        w = torch.softmax(torch.randn(Tmax, K, device=DEV, generator=gen), -1)
        # T > 1: each token routes to a permutation of the layer's K experts plus others
        slots = torch.stack([sl] + [perm[torch.randperm(S, device=DEV, generator=gen)[:K]] for _ in range(Tmax - 1)])
        per_layer.append((x, slots, w))
    ebytes = 3 * D * F * 2
    rows = []

    def run(variant, cfg, fn_of, T):
        if time.perf_counter() > budget_end:
            return
        try:
            fns = [fn_of(x[:T], s[:T], w[:T]) for x, s, w in per_layer]
            t = time_graph(fns)
            x, s, w = per_layer[0]
            out = fns[0]().float()
            ref = experts_loop(x[:T].float(), s[:T], w[:T], W)
            distinct = len(set(s[:T].flatten().tolist()))
            gbps = distinct * ebytes / t / 1e9
            rows.append({"shape": name, "T": T, "variant": variant, "config": cfg, "us": t * 1e6,
                         "gbps": gbps, "vs_hbm": gbps / hbm, "rel_err": rel(out, ref)})
        except Exception as e:  # report and go on: the other variants still run
            rows.append({"shape": name, "T": T, "variant": variant, "config": cfg,
                         "error": f"{type(e).__name__}: {str(e)[:300]}"})

    wc = lambda w: w.bfloat16()  # noqa: E731  (the model passes routing weights in the compute dtype)
    for T in T_list:
        if T == 1:
            run("torch_gather_gemv", "", lambda x, s, w: (lambda: experts_from_slots(x, s[0], wc(w), W)), 1)
            run("torch_grouped_mm", "", lambda x, s, w: (lambda: experts_decode_grouped(x, s[0], wc(w), W.gate, W.up,
                                                                                        W.down)), 1)
        run("triton_split", "default (for_shape)", lambda x, s, w: (lambda: moe_decode(x, s, w, W)), T)
    if quick:
        return rows, pool
    # stage 1: gate/up tiles (default down); stage 2: down tiles with the best gate/up; stage 3: fused
    ups, downs, fused = sweep
    downs = [(bd, bf, sp or K, wp) for bd, bf, sp, wp in downs]
    best = None
    for bf, bd, wp in ups:
        cfg = DecodeConfig(block_f=bf, block_d=bd, warps=wp)
        label = f"up f{bf} d{bd} w{wp}"
        run("triton_split", label, lambda x, s, w, c=cfg: (lambda: moe_decode(x, s, w, W, c)), 1)
        r = rows[-1] if rows else {}
        if r.get("config") == label and "us" in r and (best is None or r["us"] < best[0]):
            best = (r["us"], cfg)
    up = best[1] if best else DecodeConfig()
    for bd, bf, sp, wp in downs:
        if K % sp:
            continue
        cfg = DecodeConfig(block_f=up.block_f, block_d=up.block_d, warps=up.warps, down_block_d=bd,
                           down_block_f=bf, down_split=sp, down_warps=wp)
        run("triton_split", f"up f{up.block_f} d{up.block_d} w{up.warps} | down d{bd} f{bf} split{sp} w{wp}",
            lambda x, s, w, c=cfg: (lambda: moe_decode(x, s, w, W, c)), 1)
    for bf, bd, bo, wp in fused:
        cfg = DecodeConfig(variant="fused", block_f=bf, block_d=bd, block_o=bo, warps=wp)
        run("triton_fused", f"f{bf} d{bd} o{bo} w{wp}", lambda x, s, w, c=cfg: (lambda: moe_decode(x, s, w, W, c)), 1)
    # the two kernels of the best split config, alone (where the time goes)
    split_rows = [r for r in rows if r["variant"] == "triton_split" and r.get("T") == 1 and "us" in r]
    if split_rows:
        bestr = min(split_rows, key=lambda r: r["us"])
        cfgs = {f"up f{up.block_f} d{up.block_d} w{up.warps} | down d{bd} f{bf} split{sp} w{wp}":
                DecodeConfig(block_f=up.block_f, block_d=up.block_d, warps=up.warps, down_block_d=bd,
                             down_block_f=bf, down_split=sp, down_warps=wp) for bd, bf, sp, wp in downs}
        c = cfgs.get(bestr["config"], up)
        try:
            hs = [decode_gate_up(x[:1], s[:1], W, c) for x, s, w in per_layer]
            tu = time_graph([lambda x=x, s=s: decode_gate_up(x[:1], s[:1], W, c) for x, s, w in per_layer])
            td = time_graph([lambda h=h, s=s, w=w: decode_down(h, s[:1], w[:1], W, torch.bfloat16, c)
                             for h, (x, s, w) in zip(hs, per_layer)])
            rows.append({"shape": name, "T": 1, "variant": "split_parts", "config": bestr["config"],
                         "gate_up_us": tu * 1e6, "gate_up_gbps": K * 2 * D * F * 2 / tu / 1e9,
                         "down_us": td * 1e6, "down_gbps": K * D * F * 2 / td / 1e9})
        except Exception as e:
            rows.append({"shape": name, "variant": "split_parts", "error": f"{type(e).__name__}: {e}"})
        for T in T_list[1:]:
            run("triton_split", bestr["config"] + " (best at T=1)",
                lambda x, s, w, c=c: (lambda: moe_decode(x, s, w, W, c)), T)
    return rows, pool


def bench_grouped(D, F, K, E, T_list, quick, hbm, budget_end):
    """Grouped variants over one resident layer of E experts (slot = expert)."""
    pool, W = make_pool(E, D, F, seed=3)
    prov = _Resident(W, E)
    gen = torch.Generator(device=DEV).manual_seed(2)
    slot_map = torch.arange(E, device=DEV)
    rows = []
    configs = [GroupedConfig(16, 64, 128, 4, 4), GroupedConfig(32, 64, 128, 4, 4), GroupedConfig(64, 128, 64, 4, 3),
               GroupedConfig(64, 64, 64, 4, 4), GroupedConfig(128, 128, 64, 8, 3),
               GroupedConfig(128, 64, 64, 4, 4), GroupedConfig(32, 128, 64, 4, 4)]
    for T in T_list:
        if time.perf_counter() > budget_end:
            break
        x = torch.randn(T, D, device=DEV, generator=gen).bfloat16()
        ids = torch.stack([torch.randperm(E, device=DEV, generator=gen)[:K] for _ in range(T)])
        w = torch.softmax(torch.randn(T, K, device=DEV, generator=gen), -1)
        distinct = int(torch.unique(ids).numel())
        flops = 2 * T * K * 3 * D * F
        sub = torch.arange(min(T, 16), device=DEV)
        ref = experts_loop(x[sub].float(), ids[sub], w[sub], W)

        def rec(variant, cfg, t, out):
            rows.append({"T": T, "variant": variant, "config": cfg, "us": t * 1e6, "tflops": flops / t / 1e12,
                         "gbps": distinct * 3 * D * F * 2 / t / 1e9, "distinct_experts": distinct,
                         "rel_err": rel(out[sub].float(), ref)})

        variants = [("torch_loop", "", lambda: experts_grouped(x, ids, w.bfloat16(), prov, 0), False),
                    ("torch_grouped_mm", "", lambda: grouped_mm_layer(x, ids, w, W.gate, W.up, W.down), True),
                    ("triton_grouped", "auto " + str(pick_config(T * K, E)),
                     lambda: moe_grouped(x, ids, w, W, slot_map), True)]
        if not quick:
            variants += [("triton_grouped", f"m{c.block_m} n{c.block_n} k{c.block_k} w{c.warps} s{c.stages}",
                          (lambda c=c: moe_grouped(x, ids, w, W, slot_map, c)), True) for c in configs]
        if T <= 8:
            variants.append(("triton_decode", "default split", lambda: moe_decode(x, ids, w, W), True))
        for variant, cfg, fn, graph in variants:
            if time.perf_counter() > budget_end:
                break
            try:
                t = time_graph([fn], reps=10) if graph else time_eager(fn, reps=3)
                rec(variant, cfg, t, fn())
            except Exception as e:
                rows.append({"T": T, "variant": variant, "config": cfg, "error": f"{type(e).__name__}: {str(e)[:300]}"})
    return rows, pool


def bench_dense(hbm) -> list[dict]:
    """One decode token's dense GEMVs (10.6B shape) through F.linear (cuBLAS)."""
    shapes = {"lm_head": (151936, 2048), "qkv": ((32 + 8) * 128, 2048), "o_proj": (2048, 32 * 128),
              "router": (128, 2048)}
    rows = []
    for name, (n, k) in shapes.items():
        reps = 1 if name == "lm_head" else 8  # 8 copies (8 layers) so small matrices are not served from L2
        ws = [torch.randn(n, k, device=DEV).mul_(0.02).bfloat16() for _ in range(reps)]
        x = torch.randn(1, k, device=DEV).bfloat16()
        t = time_graph([lambda w=w: F.linear(x, w) for w in ws])
        gb = n * k * 2 / t / 1e9
        rows.append({"gemv": name, "shape": [n, k], "us": t * 1e6, "gbps": gb, "vs_hbm": gb / hbm})
        del ws
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8, help="decode calls per graph (each on other slots)")
    ap.add_argument("--quick", action="store_true", help="default configs only, no sweep")
    ap.add_argument("--max-seconds", type=float, default=200.0, help="stop sweeping after this long")
    ap.add_argument("--decode-T", default="1,2,4,8")
    ap.add_argument("--grouped-T", default="1,8,32,128,512,2048")
    a = ap.parse_args()
    t0 = time.perf_counter()
    end = t0 + a.max_seconds
    torch.manual_seed(0)
    bw = hbm_read_gbps()
    torch.cuda.empty_cache()
    hbm = bw["read_gbps"]
    print(f"HBM read {hbm:.0f} GB/s (sum over 4 GiB); copy {bw['copy_gbps_rw']:.0f} GB/s (read+write)")
    T_dec = [int(v) for v in a.decode_T.split(",")]
    decode, grouped, dense = [], [], []

    def dec(name, D, Fe, K, end):
        big = name == "10.6B"  # the second shape sweeps fewer tiles (device time)
        sweep = (UPS, DOWNS, FUSED) if big else (UPS[1:4] + UPS[6:7], DOWNS[:4] + DOWNS[8:9], FUSED[:2])
        r, pool = bench_decode(name, D, Fe, K, a.layers, T_dec if big else [1], a.quick, hbm, end, sweep)
        decode.extend(r)
        del pool
        torch.cuda.empty_cache()

    dec("10.6B", 2048, 768, 8, t0 + 0.45 * a.max_seconds)  # each section stops sweeping at its share
    r, pool = bench_grouped(2048, 768, 8, 128, [int(v) for v in a.grouped_T.split(",")], a.quick, hbm,
                            t0 + 0.8 * a.max_seconds)
    grouped += r
    del pool
    torch.cuda.empty_cache()
    dec("397B", 4096, 1024, 10, end)
    dense = bench_dense(hbm)
    print(f"\n{'shape':<6} {'T':>4} {'variant':<18} {'us':>8} {'GB/s':>7} {'xHBM':>5} {'err':>8}  config")
    for r in decode:
        if "error" in r:
            print(f"{r['shape']:<6} {r.get('T', ''):>4} {r['variant']:<18} ERROR {r['error']}  {r.get('config', '')}")
        elif r["variant"] == "split_parts":
            print(f"{r['shape']:<6} {r['T']:>4} {'  gate_up alone':<18} {r['gate_up_us']:8.1f} {r['gate_up_gbps']:7.0f}")
            print(f"{r['shape']:<6} {r['T']:>4} {'  down alone':<18} {r['down_us']:8.1f} {r['down_gbps']:7.0f}")
        else:
            print(f"{r['shape']:<6} {r['T']:>4} {r['variant']:<18} {r['us']:8.1f} {r['gbps']:7.0f} {r['vs_hbm']:5.2f} "
                  f"{r['rel_err']:8.1e}  {r['config']}")
    print(f"\n{'T':>5} {'variant':<18} {'us':>9} {'TFLOP/s':>8} {'GB/s':>7} {'err':>8}  config")
    for r in grouped:
        if "error" in r:
            print(f"{r['T']:>5} {r['variant']:<18} ERROR {r['error']}  {r['config']}")
        else:
            print(f"{r['T']:>5} {r['variant']:<18} {r['us']:9.1f} {r['tflops']:8.1f} {r['gbps']:7.0f} "
                  f"{r['rel_err']:8.1e}  {r['config']}")
    print(f"\n{'gemv':<8} {'shape':<14} {'us':>8} {'GB/s':>7} {'xHBM':>5}")
    for r in dense:
        print(f"{r['gemv']:<8} {str(r['shape']):<14} {r['us']:8.1f} {r['gbps']:7.0f} {r['vs_hbm']:5.2f}")
    best = {}
    for r in decode:
        if "us" in r and r["T"] == 1:
            k = (r["shape"], r["variant"])
            if k not in best or r["us"] < best[k]["us"]:
                best[k] = r
    res = {"bench": "moe_kernels", "commit": git_commit(), "device": torch.cuda.get_device_name(),
           "torch": torch.__version__, "triton": __import__("triton").__version__,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "hbm": bw,
           "best_decode_t1": {f"{k[0]}/{k[1]}": {"us": v["us"], "gbps": v["gbps"], "vs_hbm": v["vs_hbm"],
                                                 "config": v["config"]} for k, v in best.items()},
           "decode": decode, "grouped": grouped, "dense": dense, "seconds": time.perf_counter() - t0}
    print(write_out(res, "moe_kernels.json"))


if __name__ == "__main__":
    main()
