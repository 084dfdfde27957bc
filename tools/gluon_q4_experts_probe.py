"""The experts' gate_up and down products on tensor cores in Gluon, with K split across warps: a probe for issue 13
beside tools/gluon_q4_probe.py (the dense GEMV), not used by the engine.

    python3 tools/gluon_q4_experts_probe.py          # offline: SASS per input for sm_90, the index math on CPU
    python3 tools/gluon_q4_experts_probe.py --gpu    # on the GPU box: checked against the reference, then timed
                                                     # against TUNED's quant_gate_up / quant_down (8 experts)

Why a second layout: gate_up's experts have 768 rows each, so the dense probe's blocks of 64+ rows stacked over 4
warps leave too few programs (and loads in flight). Here the 4 warps of a program take the same 32 rows (16 gate
rows and the 16 up rows of the same FFN index) and each its own quarter of K: the operands are batched, [4 (warp),
rows, K], so mma_v2 runs each warp's K slice as one batch element, and one cross-warp sum ends the program.
- A [4, 32, 64] in DotOperandLayout(0, mma v2 [4, 1, 1], k_width 8): a thread holds one stored word of a row, as in
  the dense probe (same words, same pairs: one shift and one lop3 a pair, 128 + c in bf16).
- B [4, 64, 8]: warp b's x for its step's group in column step mod 8 (a masked 16-byte load a thread).
- After each 8 groups the scales and minima apply; after the last, the warps' sums are added, and since the rows
  16 apart (a gate row and its up row) sit in one thread, h = silu(gate) * up is taken there and stored.
Programs: (F / 16 row blocks) x (8 experts): 384 programs of 4 warps at the 10.6B shape (TUNED's gate_up: 768 of
4). Needs D a multiple of 4 x 64 (each warp the same number of groups), groups of 64, bf16 x.
G groups a step (1, 2, 4; quant_gluon's K order: a thread's 2G words of a row adjacent, so 8-byte loads at G 1 and
16-byte from G 2) and D steps a load (the next load issued before the current steps are computed): VARIANTS.
gate_up reads gate and up rows from one base pointer (up's codes at 16 uoff words from gate's): session 43's
select between two row pointers, and a select between two offsets as well, hid the words' alignment from the
compiler, which then loaded them 4 bytes at a time (64 LDG.E a thread; now 32 LDG.E.64, or 16 LDG.E.128 from G 2).
down: 8 warps, warp k taking expert k's rows and h[k] (fp32, rounded to bf16 for the tensor cores), its routing
weight applied in its epilogue, the warps' sums added: 16 rows a program, 128 programs of 8 warps at the 10.6B shape.
The kernels are the engine's (tiered/kernels/quant_gluon_moe.py); this probe checks and times them. Offline (sm_90,
Triton 3.9): gate_up 2.05 SASS an input with the epilogue and silu (64 registers; 2.0-2.02 and 72-74 from G 2),
down 2.69 (66 registers; h's conversion to bf16 included; 2.65-2.69 and 78-96 from G 2). The index math of both is
emulated in torch against the dequantized reference on CPU; the kernels themselves are checked only by --gpu.
Session 45 (H100): gate_up 8.25 us at G 4 against the word tile's 10.45, down 6.41 against 9.64.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "benchmarks"))
if "--gpu" not in sys.argv:
    os.environ["TRITON_INTERPRET"] = "0"  # offline: compile, never interpret (Gluon has no interpreter)

import torch  # noqa: E402

from gluon_q4_probe import gluon, triton  # noqa: E402
from tiered.kernels import quant_gluon_moe as qgm  # noqa: E402
from tiered.kernels.quant_gluon_moe import GROUP, PAIR, ROWS, WARPS, fit, layouts  # noqa: E402

VARIANTS = ((1, 1), (2, 1), (2, 2), (2, 4), (4, 1), (4, 2))  # (groups a step, steps a load)


def gate_up(x, slots, gate, up, groups: int = 1, ahead: int = 1):
    """x [D] bf16, slots [K] int64 (CUDA), gate/up q4 stacks [E, F, D] -> h [K, F] fp32 through the engine's
    kernel (quant_gluon_moe.gate_up, no PDL)."""
    return qgm.gate_up(x[None], slots, gate, up, groups=groups, ahead=ahead)


def emulate(x, slots, gate, up, groups: int = 1):
    return qgm.emulate_gate_up(x, slots, gate, up, groups)


def reference(x, slots, gate, up):
    """silu(x . gate_k) * (x . up_k) with the dequantized rows (fp32), [K, F]."""
    xf = x.float()
    return torch.stack([torch.nn.functional.silu(gate[s].dequantize(torch.float32) @ xf)
                        * (up[s].dequantize(torch.float32) @ xf) for s in slots.tolist()])


def down(h, slots, wts, dw, groups: int = 1):
    """h [8, F] fp32, slots [8] int64, wts [8] fp32 (CUDA), dw q4 stack [E, D, F] -> y [D] fp32 through the engine's
    kernel (quant_gluon_moe.down, no PDL), h rounded to bf16."""
    return qgm.down(h, slots, wts, dw, torch.float32, groups=groups)[0]


def emulate_down(h, slots, wts, dw, groups: int = 1):
    return qgm.emulate_down(h, slots, wts, dw, groups)


def reference_down(h, slots, wts, dw):
    """sum_k wts[k] (dequantized dw[slots[k]] @ round_bf16(h[k])) in fp32."""
    return sum(float(wts[b]) * (dw[s].dequantize(torch.float32) @ h[b].to(torch.bfloat16).float())
               for b, s in enumerate(slots.tolist()))


def _record(res: dict, name: str, groups: int, got, ref) -> None:
    """res[name (+ " G<groups>")] = the relative error of an emulation; past 1e-6 the probe stops."""
    err = float((got - ref).norm() / ref.norm())
    res[name + (f" G{groups}" if groups > 1 else "")] = err
    if err > 1e-6:
        raise SystemExit(f"the emulated index math misses the reference at {name}, {groups} groups a step: relative "
                         f"error {err:.2e}")


def cpu_check(seed: int = 0) -> dict:
    from tiered.layout.quant import quantize

    g = torch.Generator().manual_seed(seed)
    res = {}
    for e, f, d, k in ((3, 40, 256, 2), (4, 24, 2048, 3)):  # one epilogue a warp; a partial row block
        gate = quantize(torch.randn(e, f, d, generator=g) * d ** -0.5, "q4")
        up = quantize(torch.randn(e, f, d, generator=g) * d ** -0.5, "q4")
        x = torch.randn(d, generator=g).to(torch.bfloat16)
        slots = torch.randperm(e, generator=g)[:k]
        ref = reference(x, slots, gate, up).double()
        for gr in (1, 2, 4):
            _record(res, f"{e}x{f}x{d}", gr, emulate(x, slots, gate, up, gr), ref)
    for e, d, f in ((10, 40, 768), (9, 24, 128)):  # down: 12 groups (a partial epilogue); 2
        dw = quantize(torch.randn(e, d, f, generator=g) * f ** -0.5, "q4")
        h = torch.randn(8, f, generator=g)
        slots = torch.randperm(e, generator=g)[:8]
        wts = torch.rand(8, generator=g)
        ref = reference_down(h, slots, wts, dw).double()
        for gr in (1, 2, 4):
            _record(res, f"down {e}x{d}x{f}", gr, emulate_down(h, slots, wts, dw, gr), ref)
    return res


def _sass(kernel, sig: dict, cst: dict, warps: int, per_thread: float) -> dict:
    """Static SASS of one program of `kernel` compiled for sm_90 (pointers and strides marked divisible by 16)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from kernel_regs import cuobjdump, sass_ops

    attrs = {(i,): [["tt.divisibility", 16]] for i, (k, v) in enumerate(sig.items()) if v.startswith("*")
             or k.startswith("stride") or k == "uoff"}
    sig = {**sig, **{c: "constexpr" for c in cst}}
    kern = triton.compile(GluonASTSource(kernel, sig, cst, attrs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps})
    ops = sass_ops(kern.asm["cubin"])
    loads = collections.Counter(re.findall(r"\bLDG\.[\w.]+", cuobjdump(kern.asm["cubin"], "-sass")))
    total = sum(ops.values())
    usage = cuobjdump(kern.asm["cubin"], "-res-usage")
    regs = next((w for line in usage.splitlines() for w in line.split() if w.startswith("REG")), "")
    return {"instructions": total, "per_input": total / per_thread, "registers": regs,
            "shared_stores": ops.get("STS", 0), "loads": dict(loads), "top": dict(ops.most_common(8))}


def sass_counts(d: int = 2048, f: int = 768, gdc: bool = False) -> dict:
    """gate_up ([F, D] gate and up, 16 + 16 rows a program, 4 warps) and down ([D, F], 16 rows, 8 warps) at the
    10.6B shape."""
    gsig = {"x_ptr": "*bf16", "slot_ptr": "*i64", "slot_base": "i32", "gq": "*i32", "uoff": "i64", "gs": "*bf16",
            "us": "*bf16", "gm": "*bf16", "um": "*bf16", "h_ptr": "*fp32", "F": "i32", "stride_qs": "i32",
            "stride_qn": "i32", "stride_ss": "i32", "stride_sn": "i32", "stride_ms": "i32", "stride_mn": "i32"}
    dsig = {"h_ptr": "*fp32", "slot_ptr": "*i64", "slot_base": "i32", "wt_ptr": "*fp32", "dq": "*i32", "ds": "*bf16",
            "dm": "*bf16", "y_ptr": "*bf16", "D_OUT": "i32", "stride_qs": "i32", "stride_qn": "i32",
            "stride_ss": "i32", "stride_sn": "i32", "stride_ms": "i32", "stride_mn": "i32"}
    pdl = {"GDC": gdc}
    out = {}
    for gr, ah in VARIANTS:
        tag = "" if (gr, ah) == (1, 1) else f" G{gr} D{ah}"
        G, D = fit(d // GROUP // WARPS, gr, ah)
        if (G, D) == (gr, ah):
            out["gate_up" + tag] = _sass(qgm.GATE_UP, gsig, {"KW": d // 8, "NG": d // GROUP, "G": G, "D": D, "HW": 1,
                                                             **pdl, "PAIR": PAIR, **layouts(groups=G, ahead=D)},
                                         WARPS,
                                         2 * ROWS * d / (32 * WARPS))
        G = fit(f // GROUP, gr, 1)[0]
        if ah == 1 and G == gr:  # down: a step's words a load (layouts(ahead=0))
            out["down" + (f" G{G}" if G > 1 else "")] = _sass(
                qgm.DOWN, dsig, {"KW": f // 8, "NG": f // GROUP, "G": G, "WR": 1, **pdl, "PRE": gdc, "PAIR": PAIR,
                                 **layouts(8, 16, G, 0)}, 8, 16 * f * 8 / (32 * 8))
    return out


def gpu_run() -> dict:
    """One token's 8 experts at the 10.6B shape (D 2048, F 768, 128 experts): gate_up and down each checked against
    its reference, then timed in a CUDA graph of calls on other slots against TUNED's quant_gate_up / quant_down
    (without PDL, as these kernels; TUNED's down reads h in fp32, this one rounds it to bf16)."""
    from bench_moe_kernels import rel, time_graph

    from tiered.kernels import quant_moe as qm
    from tiered.layout.quant import quantize

    e, f, d = 128, 768, 2048
    g = torch.Generator(device="cuda").manual_seed(0)
    gate = quantize(torch.randn(e, f, d, generator=g, device="cuda") * d ** -0.5, "q4")
    up = quantize(torch.randn(e, f, d, generator=g, device="cuda") * d ** -0.5, "q4")
    x = torch.randn(d, generator=g, device="cuda").to(torch.bfloat16)
    sets = [torch.randperm(e, generator=g, device="cuda")[:8] for _ in range(8)]
    row = {"shape": [e, f, d], "bytes": 2 * 8 * gate.nbytes // e}
    os.environ["TIERED_PDL"] = "0"
    try:
        row["tuned_nopdl_us"] = time_graph([lambda s=s: qm.quant_gate_up(x[None], s, gate, up) for s in sets],
                                           reps=20) * 1e6
    finally:
        os.environ.pop("TIERED_PDL")
    ref = reference(x, sets[0], gate, up)
    for gr, ah in VARIANTS:
        v = row[f"G{gr}_D{ah}"] = {"rel_err": rel(gate_up(x, sets[0], gate, up, gr, ah), ref)}
        if v["rel_err"] <= 1e-4:
            v["us"] = time_graph([lambda s=s: gate_up(x, s, gate, up, gr, ah) for s in sets], reps=20) * 1e6
            v["tbps"] = row["bytes"] / v["us"] / 1e6
            v["vs_tuned_nopdl"] = row["tuned_nopdl_us"] / v["us"]
    print("gate_up", json.dumps(row), flush=True)
    dw = quantize(torch.randn(e, d, f, generator=g, device="cuda") * f ** -0.5, "q4")
    h = torch.randn(8, f, generator=g, device="cuda")
    wts = torch.rand(8, generator=g, device="cuda")
    drow = {"shape": [e, d, f], "bytes": 8 * dw.nbytes // e}
    os.environ["TIERED_PDL"] = "0"
    try:
        drow["tuned_nopdl_us"] = time_graph([lambda s=s: qm.quant_down(h, s[None], wts[None], dw, torch.float32)
                                             for s in sets], reps=20) * 1e6
    finally:
        os.environ.pop("TIERED_PDL")
    ref = reference_down(h, sets[0], wts, dw)
    for gr in (1, 2, 4):
        if fit(f // GROUP, gr, 1)[0] != gr:
            continue
        v = drow[f"G{gr}_D1"] = {"rel_err": rel(down(h, sets[0], wts, dw, gr), ref)}
        if v["rel_err"] <= 1e-4:
            v["us"] = time_graph([lambda s=s: down(h, s, wts, dw, gr) for s in sets], reps=20) * 1e6
            v["tbps"] = drow["bytes"] / v["us"] / 1e6
            v["vs_tuned_nopdl"] = drow["tuned_nopdl_us"] / v["us"]
    print("down", json.dumps(drow), flush=True)
    best = []
    for name, r, k, n in (("gate_up", row, d, f), ("down", drow, f, d)):
        print(f"{name}: TUNED {r['tuned_nopdl_us']:.2f} us; " + ", ".join(
            f"{k} {v.get('us', float('nan')):.2f} (err {v['rel_err']:.1e})" for k, v in r.items()
            if isinstance(v, dict)), flush=True)
        timed = {key: v["us"] for key, v in r.items() if isinstance(v, dict) and "us" in v}
        if timed:
            gr, ah = (int(t[1:]) for t in min(timed, key=timed.get).split("_"))
            best.append(f"{name},q4,{k},{n}:bn=64,warps={WARPS if name == 'gate_up' else 8},algo=3,bg={gr},ahead={ah}")
    print("best " + " ".join(best), flush=True)  # TIERED_QCONFIG entries (quant_moe.parse_overrides), for a lease
    return {"gate_up": row, "down": drow}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="check and time the kernel on this machine's GPU")
    args = ap.parse_args()
    if gluon is None:
        sys.exit(f"this Triton ({getattr(triton, '__version__', 'absent')}) has no Gluon")
    res = {"triton": triton.__version__, "date": time.strftime("%Y-%m-%d"), "cpu_check": cpu_check()}
    print("emulated index math against the reference (relative error):", res["cpu_check"])
    if args.gpu:
        if not torch.cuda.is_available():
            sys.exit("--gpu needs CUDA")
        from benchmeta import git_commit, write_out

        res.update(device=torch.cuda.get_device_name(), commit=git_commit(), **gpu_run())
        print(write_out(res, "gluon_q4_experts.json"))
        return
    res["sass"] = sass_counts()
    for name, c in res["sass"].items():
        print(f"{name}: {c['instructions']} SASS, {c['per_input']:.2f} an input, {c['registers']}, "
              f"STS {c['shared_stores']}; {c['top']}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
