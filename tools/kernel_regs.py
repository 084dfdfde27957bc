"""Registers, spills and occupancy of the q4 decode kernels (tiered/kernels/quant_moe.py), compiled for sm_90 without a
GPU: which tiles an H200 SM can hold more of, before a GPU sweep times them.

ncu (session 15, notes/Q4_DECODE.md) found the decode kernels one wave each, their occupancy set by registers (gate_up
80 a thread, down 120, lm_head 126) and their schedulers idle 35-65% of cycles. This compiles `_qgate_up`, `_qdown`
and `_qgemv` at the 10.6B shapes as a launch would (16-byte divisibility of pointers and of arguments divisible by
16, PDL off) for the tiles given, reads the cubin's resource usage (cuobjdump -res-usage: REG, STACK, LOCAL) and
prints per tile: registers a thread, spill bytes (local memory), static SASS instructions, programs an SM holds
(the least of the register, warp and program limits of sm_90: 64K registers, 64 warps, 32 programs), resident
warps a SM, and the grid's waves over 132 SMs.

    python3 tools/kernel_regs.py                                   # TUNED's tiles of the three kernels
    python3 tools/kernel_regs.py --kernel down --tiles 2:8:4:8,2:4:4:4,2:8:16:8   # algo:bn:bg:warps[:regs]
    python3 tools/kernel_regs.py --kernel gemv --n 5120 --tiles 2:8:32:4,2:8:32:4:96
    python3 tools/kernel_regs.py --kernel down --tiles 2:8:16:8:0:0,2:8:16:8:0:2     # h word-major bf16 (hw 2)
    python3 tools/kernel_regs.py --kernel gemv --tiles 2:32:32:4,2:32:32:4:0:0:2     # nibbles in pairs (conv 2)
    python3 tools/kernel_regs.py --kernel gemv --tiles 2:16:16:4:0:0:2:3             # 3 programs a SM, looping

The last stdout line is one JSON list of the rows.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if __name__ == "__main__":  # run as a script: kernels decorated at import (fused_norm, pdl) compile, not interpret.
    # Imported (tests), the environment is left alone and `compiling` covers what is decorated here.
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

_SIG = {"torch.uint8": "*u8", "torch.int32": "*i32", "torch.bfloat16": "*bf16", "torch.float32": "*fp32",
        "torch.int64": "*i64"}
SMS, REGS_SM, WARPS_SM, PROGS_SM = 132, 65536, 64, 32  # sm_90 (H200)


@contextlib.contextmanager
def compiling():
    """Kernels decorated inside are compiled, not interpreted (TRITON_INTERPRET 0 while Triton decorates them), with
    multiply-adds fused as launches compile them; the environment is restored after (tests import this module)."""
    keys = ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def compile_sm90(kernel, args: dict, consts: dict, warps: int, regs: int = 0) -> bytes:
    """The cubin of a triton.jit kernel compiled for sm_90 as a launch with these arguments would be: tensors and
    integers divisible by 16 marked so (the launcher's specialisation), constexprs from `consts` or their defaults."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, attrs, cst = {}, {}, {}
    for i, p in enumerate(kernel.params):
        name = p.name
        if name in consts or p.is_constexpr or (name not in args and p.has_default):
            sig[name] = "constexpr"  # (a pointer argument left at its default None, e.g. ACT8's scratch rows)
            cst[name] = consts[name] if name in consts else p.default
            continue
        v = args[name]
        sig[name] = _SIG[str(v.dtype)] if isinstance(v, torch.Tensor) else "i32"
        if isinstance(v, torch.Tensor) or v % 16 == 0:
            attrs[(i,)] = [["tt.divisibility", 16]]
    opts = {"num_warps": warps}
    if regs:
        opts["maxnreg"] = regs
    kern = triton.compile(ASTSource(kernel, sig, cst, attrs), target=GPUTarget("cuda", 90, 32), options=opts)
    return kern.asm["cubin"]


def cuobjdump(cubin: bytes, flag: str) -> str:
    """The text of Triton's own cuobjdump `flag` (-sass, -res-usage) over a cubin."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(tool), flag, f.name], capture_output=True, text=True, check=True).stdout


def sass_ops(cubin: bytes) -> collections.Counter:
    """Static SASS instructions of a cubin by opcode (without modifiers; a predicate guard is skipped)."""
    ops: collections.Counter = collections.Counter()
    for line in cuobjdump(cubin, "-sass").splitlines():
        line = line.strip()
        if not (line.startswith("/*") and "*/" in line):
            continue
        body = line.split("*/", 1)[1].strip()
        if not body or body.startswith("/*"):
            continue
        parts = body.split()
        op = parts[1] if parts[0].startswith("@") and len(parts) > 1 else parts[0]
        ops[op.split(".")[0].rstrip(";")] += 1
    return ops


def usage(cubin: bytes) -> dict:
    """{reg, stack, local, shared, sass, loads} of a single-kernel cubin (cuobjdump -res-usage; sass_ops; the global
    loads by width)."""
    res = cuobjdump(cubin, "-res-usage")
    out = {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", res)}
    out["sass"] = sum(sass_ops(cubin).values())
    out["loads"] = dict(collections.Counter(re.findall(r"\bLDG\.[\w.]+", cuobjdump(cubin, "-sass"))))  # by width
    return out


def occupancy(regs: int, warps: int, programs: int) -> dict:
    """Programs and warps an SM holds at `regs` registers a thread (allocated per warp in units of 256), and the
    grid's waves."""
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = REGS_SM // (per_warp * warps)
    held = max(0, min(by_regs, WARPS_SM // warps, PROGS_SM))
    return {"programs_per_sm": held, "warps_per_sm": held * warps,
            "waves": round(programs / (held * SMS), 2) if held else None}


def row(kernel: str, algo: int, bn: int, bg: int, warps: int, regs: int, d: int, f: int, k_experts: int,
        n: int, hw: int = 0, conv: int = 1, persist: int = 0) -> dict:
    """Compile one tile of one kernel at the shape and report its resources."""
    import torch
    import triton

    from tiered.kernels import quant_moe as qm
    from tiered.layout.quant import quantize

    with compiling():
        qgemv, qgate_up, qdown = qm.decorate_kernels()
    cfg = qm.QConfig(bn=bn, bg=bg, warps=warps, algo=algo, regs=regs, hw=hw, conv=conv, persist=persist)
    hdt = torch.bfloat16 if hw == 2 else torch.float32  # the h between the expert kernels (QConfig.hw)
    names = ("stride_qs", "stride_qn", "stride_ss", "stride_sn", "stride_ms", "stride_mn")
    if kernel == "gemv":
        w = quantize(torch.randn(n, d) * d ** -0.5, "q4")
        t = qm._tiles(cfg, w)
        x = torch.zeros(1, d, dtype=torch.bfloat16)
        args = {"x_ptr": x, "slot_ptr": x, "q_ptr": qm._codes(w, t["ALGO"]), "s_ptr": w.scale, "m_ptr": w.min,
                "out_ptr": x, "N": n, "stride_xt": d, "stride_ot": n, **dict(zip(names, qm._strides(w, t["ALGO"])))}
        consts = {**qm._geometry(w), **t, "HAS_SLOTS": False, "LOOP": bool(persist)}
        jit, programs = qgemv, triton.cdiv(n, bn) if not persist else min(triton.cdiv(n, bn), persist * 132)
    else:
        shape = (f, d) if kernel == "gate_up" else (d, f)
        w = quantize(torch.randn(4, *shape) * shape[1] ** -0.5, "q4")
        t = qm._tiles(cfg, w)
        codes = qm._codes(w, t["ALGO"])
        st = dict(zip(names, qm._strides(w, t["ALGO"])))
        slots = torch.zeros(k_experts, dtype=torch.int64)
        if kernel == "gate_up":
            x = torch.zeros(1, d, dtype=torch.bfloat16)
            args = {"x_ptr": x, "slot_ptr": slots, "gq": codes, "gs": w.scale, "gm": w.min, "uq": codes,
                    "us": w.scale, "um": w.min, "h_ptr": torch.zeros(k_experts, f, dtype=hdt), "slot_base": 0,
                    "stride_xt": d, **st, "gb_ptr": x, "ub_ptr": x, "stride_bs": 0, "alpha": 0, "limit": 0}
            consts = {"F": f, "K": k_experts, **qm._geometry(w), **t, "HW": hw}
            jit, programs = qgate_up, triton.cdiv(f, bn) * k_experts
        else:
            args = {"h_ptr": torch.zeros(k_experts, f, dtype=hdt), "slot_ptr": slots, "wt_ptr": torch.zeros(k_experts),
                    "dq": codes, "ds": w.scale, "dm": w.min, "y_ptr": torch.zeros(1, d, dtype=torch.bfloat16),
                    "slot_base": 0, "stride_yt": d, **st, "db_ptr": slots, "stride_bs": 0}
            consts = {"D": d, "K": k_experts, "KP": triton.next_power_of_2(k_experts), "K_PER": k_experts,
                      "SPLIT": 1, **qm._geometry(w), **t, "WR": 1, "HW": hw}
            jit, programs = qdown, triton.cdiv(d, bn)
    with compiling():
        u = usage(compile_sm90(jit, args, consts, warps, regs))
    return {"kernel": kernel, "algo": t["ALGO"], "bn": bn, "bg": t["BG"], "warps": warps, "regs_cap": regs, "hw": hw,
            "conv": conv, "persist": persist,
            **u, "programs": programs, **occupancy(u["reg"], warps, programs)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernel", choices=("all", "gate_up", "down", "gemv"), default="all")
    ap.add_argument("--tiles", default="",
                    help="comma list of algo:bn:bg:warps[:regs[:hw[:conv[:persist]]]] (default: TUNED's; hw: "
                         "QConfig.hw, the h layout between the expert kernels, ignored by the GEMV; conv 2: the word "
                         "tile's nibbles in pairs; persist (the GEMV): programs a SM looping over row blocks)")
    ap.add_argument("--d", type=int, default=2048, help="hidden size (gate/up inputs, down outputs, GEMV inputs)")
    ap.add_argument("--f", type=int, default=768, help="expert FFN")
    ap.add_argument("--k", type=int, default=8, help="experts a token")
    ap.add_argument("--n", type=int, default=151936, help="GEMV rows (151936: lm_head, 5120: qkv)")
    a = ap.parse_args()
    from tiered.kernels.quant_moe import pick_config

    kernels = ("gate_up", "down", "gemv") if a.kernel == "all" else (a.kernel,)
    rows = []
    for kern in kernels:
        if a.tiles:
            specs = [tuple(int(v) for v in s.split(":")) for s in a.tiles.split(",")]
        else:
            key = {"gate_up": (a.d, a.f), "down": (a.f, a.d), "gemv": (a.d, a.n)}[kern]
            c = pick_config(kern, "q4", *key)
            specs = [(c.algo, c.bn, c.bg, c.warps, c.regs, c.hw, c.conv)]
        for s in specs:
            algo, bn, bg, warps = s[:4]
            hw = s[5] if len(s) > 5 and kern != "gemv" else 0
            conv = s[6] if len(s) > 6 else 1
            persist = s[7] if len(s) > 7 and kern == "gemv" else 0
            r = row(kern, algo, bn, bg, warps, s[4] if len(s) > 4 else 0, a.d, a.f, a.k, a.n, hw, conv, persist)
            rows.append(r)
            print(f"{kern:<8} algo {r['algo']} bn {bn:>2} bg {r['bg']:>2} warps {warps} cap {r['regs_cap'] or '-':>3} "
                  f"hw {hw} conv {conv} persist {persist}: "
                  f"{r['reg']:>3} registers, local {r.get('local', 0):>4} B, {r['sass']:>5} SASS, "
                  f"{r['programs_per_sm']} programs ({r['warps_per_sm']} warps) a SM, {r['waves']} waves of "
                  f"{r['programs']}", flush=True)
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
