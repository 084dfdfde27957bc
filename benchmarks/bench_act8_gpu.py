"""q4 decode kernels with 8-bit inputs (QConfig.act 1: integer dot products) against the float inputs (GPU).

    python3 benchmarks/bench_act8_gpu.py                 # H200: about 2-3 minutes (compiles included)
    python3 benchmarks/bench_act8_gpu.py --quick         # TUNED's tiles only, act 0 and 1

For each decode product of the 10.6B shape (the dense GEMVs lm_head 151936 x 2048, qkv 5120 x 2048 and o_proj
2048 x 4096 through quant_matvec; one token's 8 experts of 2048 x 768 through experts_quant_decode), the float
inputs under TUNED's tiles against act 1 under TUNED's tiles and a few others (rows a program, warps; the experts'
gate_up and down tiles one at a time). Timed as a CUDA graph of --layers calls, each call on another copy of the
matrix (experts: other slots of a pool larger than L2), so that no call reads what the previous one left in L2.
Every variant is checked first against the plain reference (dequantized rows, fp32 products; act 1 over the inputs
rounded by quant_moe.round_inputs_q8) with fp32 outputs; a variant that misses (relative error over 1e-4) is
reported as failed and not timed.

Prints a row per variant, then one JSON line; writes $OUT/act8_kernels.json when OUT is set. Its "best" holds, per
product, the fastest act 1 config and its time against the float default's, and "qconfig" a TIERED_QCONFIG value
that sets each act 1 winner (only where it beats the float default), for an end-to-end run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "benchmarks"))

from benchmeta import git_commit, write_out  # noqa: E402
from bench_moe_kernels import rel, time_graph  # noqa: E402
from bench_quant_kernels import qpool  # noqa: E402
from tiered.kernels import quant_moe as qm  # noqa: E402
from tiered.kernels.quant_moe import QConfig, round_inputs_q8  # noqa: E402
from tiered.layout.quant import group_size, quantize  # noqa: E402

DENSE = {"lm_head": (151936, 2048), "qkv": (5120, 2048), "o_proj": (2048, 4096)}
D, F, K, POOL = 2048, 768, 8, 128


def dense_variants(kernel_shape: tuple[int, int], quick: bool) -> list[QConfig]:
    n, k = kernel_shape
    base = qm.pick_config("gemv", "q4", k, n)
    out = [base, dataclasses.replace(base, act=1)]
    if not quick:
        for bn in (8, 16, 32, 64):
            for warps in (4, 8):
                if bn * k // 8 // (32 * warps) > 64:  # more than 64 words a thread a step: registers spill
                    continue
                out.append(QConfig(bn=bn, bg=base.bg, warps=warps, algo=2, act=1))
        for bn, persist in ((8, 1), (8, 2), (16, 2), (32, 2), (16, 4), (32, 4)):  # programs looping over row blocks
            if n // bn > persist * 132:
                out.append(QConfig(bn=bn, bg=base.bg, warps=4, algo=2, act=1, persist=persist))
    seen, uniq = set(), []
    for c in out:  # one of each tile (the word tile's conv means nothing under act 1)
        key = (c.act, c.bn, c.bg, c.warps, c.persist, c.regs if not c.act else 0)
        if key not in seen:
            seen.add(key)
            uniq.append(c)
    return uniq


def time_configs(name: str, n: int, k: int, cfgs: list[QConfig], layers: int) -> list[dict]:
    """A row per config of the dense GEMV `name` [n, k] in q4: checked against the reference (act 1: over the
    rounded inputs) with fp32 outputs, then timed as a graph of calls on other copies of the matrix (2 copies past
    100 M weights, else `layers`) if within 1e-4; a tile that fails to compile is reported, not fatal."""
    g = torch.Generator(device="cuda").manual_seed(n)
    copies = 2 if n * k > 1e8 else layers
    mats = [quantize(torch.randn(n, k, generator=g, device="cuda") * k ** -0.5, "q4") for _ in range(copies)]
    x = torch.randn(1, k, generator=g, device="cuda").to(torch.bfloat16)
    rows = []
    for cfg in cfgs:
        ref = qm.quant_matvec_ref(round_inputs_q8(x, group_size("q4", k)) if cfg.act else x.float(), mats[0])
        row = {"product": name, "shape": [n, k], "config": dataclasses.asdict(cfg)}
        try:
            err = rel(qm.quant_matvec(x, mats[0], config=cfg, out_dtype=torch.float32), ref.float())
            row["rel_err"] = err
            if err > 1e-4:
                row["failed"] = f"relative error {err:.2e}"
            else:
                t = time_graph([lambda m=m: qm.quant_matvec(x, m, config=cfg) for m in mats], reps=20)
                row["us"] = t * 1e6
                row["gbps"] = mats[0].nbytes / t / 1e9
        except Exception as e:  # a tile that does not compile (registers, shared memory) is reported, not fatal
            row["failed"] = f"{type(e).__name__}: {str(e)[:200]}"
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def time_dense(name: str, quick: bool, layers: int) -> list[dict]:
    n, k = DENSE[name]
    return time_configs(name, n, k, dense_variants((n, k), quick), layers)


def _experts_ref(x, slots, wts, W, act: bool, hw: int):
    out = torch.zeros(1, D, dtype=torch.float64, device="cuda")
    xf = round_inputs_q8(x, group_size("q4", D)) if act else x.float()
    for kk, s in enumerate(slots.tolist()):
        gw, uw, dw = (w[s].dequantize(torch.float32) for w in (W.gate, W.up, W.down))
        h = torch.nn.functional.silu(xf @ gw.T) * (xf @ uw.T)
        if hw == 2:
            h = h.bfloat16().float()
        if act:
            h = round_inputs_q8(h, group_size("q4", F))
        out += (wts[0, kk] * (h @ dw.T)).double()
    return out


def expert_variants(quick: bool) -> list[tuple[QConfig, QConfig]]:
    gu = qm.pick_config("gate_up", "q4", D, F)
    dn = qm.pick_config("down", "q4", F, D)
    gu1, dn1 = dataclasses.replace(gu, act=1), dataclasses.replace(dn, act=1)
    out = [(gu, dn), (gu1, dn1), (gu1, dn), (gu, dn1)]
    if not quick:
        for bn, warps in ((4, 4), (16, 4), (8, 8), (16, 8)):
            out.append((QConfig(bn=bn, bg=gu.bg, warps=warps, algo=2, act=1), dn1))
        for bn, warps, hw in ((4, 4, 1), (16, 8, 1), (8, 4, 1), (8, 8, 0), (8, 8, 2)):
            out.append((gu1, QConfig(bn=bn, bg=dn.bg, warps=warps, algo=2, hw=hw, act=1)))
    return out


def time_experts(quick: bool, layers: int) -> list[dict]:
    _, W = qpool("q4", POOL, D, F)
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(1, D, generator=g, device="cuda")
    xb = x.to(torch.bfloat16)
    slots = [torch.randperm(POOL, generator=g, device="cuda")[:K] for _ in range(layers)]
    wts = torch.rand(1, K, generator=g, device="cuda")
    rows = []
    for gu, dn in expert_variants(quick):
        hw = qm.down_h_layout(W.down, dn, K)
        row = {"product": "experts", "gate_up": dataclasses.asdict(gu), "down": dataclasses.asdict(dn), "h_layout": hw}
        try:
            if gu.act != dn.act:
                row["rel_err"] = None  # mixed: checked through its parts' own rows
                got = qm.experts_quant_decode(x, slots[0], wts, W.gate, W.up, W.down, configs=(gu, dn))
                assert got is not None and torch.isfinite(got).all()
            else:
                got = qm.experts_quant_decode(x, slots[0], wts, W.gate, W.up, W.down, configs=(gu, dn))
                row["rel_err"] = err = rel(got, _experts_ref(x, slots[0], wts, W, bool(gu.act), hw))
                if err > 1e-4:
                    row["failed"] = f"relative error {err:.2e}"
            if "failed" not in row:
                t = time_graph([lambda s=s: qm.experts_quant_decode(xb, s, wts, W.gate, W.up, W.down, configs=(gu, dn))
                                for s in slots], reps=20)
                row["us"] = t * 1e6
        except Exception as e:
            row["failed"] = f"{type(e).__name__}: {str(e)[:200]}"
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def _fields(c: dict) -> str:
    """A QConfig (as a dict) as TIERED_QCONFIG's field list."""
    return ",".join(f"{f}={v}" for f, v in c.items())


def summarize(rows: list[dict]) -> tuple[dict, str]:
    best, entries = {}, []
    for name, (n, k) in DENSE.items():
        mine = [r for r in rows if r["product"] == name and "us" in r]
        base = next((r for r in mine if not r["config"]["act"]), None)
        act = min((r for r in mine if r["config"]["act"]), key=lambda r: r["us"], default=None)
        if base and act:
            best[name] = {"float_us": base["us"], "act8_us": act["us"], "speedup": base["us"] / act["us"],
                          "config": act["config"]}
            if act["us"] < base["us"]:
                entries.append(f"gemv,q4,{k},{n}:" + _fields(act["config"]))
    ex = [r for r in rows if r["product"] == "experts" and "us" in r]
    if ex:
        base = ex[0]
        act = min(ex[1:] or ex, key=lambda r: r["us"])
        best["experts"] = {"float_us": base["us"], "best_us": act["us"], "speedup": base["us"] / act["us"],
                           "gate_up": act["gate_up"], "down": act["down"]}
        if act["us"] < base["us"]:
            for kern, (kk, n) in (("gate_up", (D, F)), ("down", (F, D))):
                entries.append(f"{kern},q4,{kk},{n}:" + _fields(act[kern]))
    return best, ";".join(entries)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="TUNED's tiles only, act 0 and 1")
    ap.add_argument("--layers", type=int, default=8, help="calls per graph, each on another copy")
    ap.add_argument("--only", default="lm_head,qkv,o_proj,experts", help="products to time")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_act8_gpu.py times CUDA kernels: run it on the GPU box")
    t0 = time.time()
    rows = []
    for name in args.only.split(","):
        rows += time_experts(args.quick, args.layers) if name == "experts" else time_dense(name, args.quick,
                                                                                         args.layers)
    best, qconfig = summarize(rows)
    out = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
           "commit": git_commit(),
           "seconds": round(time.time() - t0, 1), "rows": rows, "best": best, "qconfig": qconfig}
    for k, v in best.items():
        print(f"{k}: float {v['float_us']:.1f} us, best act8 {v.get('act8_us', v.get('best_us')):.1f} us "
              f"({v['speedup']:.2f}x)")
    print("TIERED_QCONFIG=" + qconfig)
    print(write_out(out, "act8_kernels.json"))


if __name__ == "__main__":
    main()
