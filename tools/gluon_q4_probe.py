"""The Gluon q4 GEMV on tensor cores (tiered/kernels/quant_gluon.py, QConfig.algo 3; its docstring has the
layouts) counted, checked and timed: a probe for issue 13.

    python3 tools/gluon_q4_probe.py            # offline: SASS per input for sm_90, and the index math checked on CPU
    python3 tools/gluon_q4_probe.py --gpu      # on the GPU box: the kernel against the reference, then timed
                                               # against TUNED's q4 GEMV at the lm_head, qkv and o_proj shapes
    python3 tools/gluon_q4_probe.py --gpu --bn 64 --persist 0 --ahead 1,4 --groups 1,2 --only lm_head
                                               # ... its last line: "best" and each product's fastest variant as
                                               # a TIERED_QCONFIG entry

Why: on the H200 the q4 lm_head (151,936 x 2,048) reads 57% of HBM at 3.69 SASS an input (tools/count_sass.py,
TUNED's word tile), so fewer instructions an input looked like the lever there; tl.dot does not give it (tools/
mma_q4_sass.py: 3.8-4.6, the operand goes through shared memory). Counted offline (Triton 3.9 and 3.6, sm_90, 4
warps): 1.88 / 1.57 / 1.41 SASS an input at BN 64 / 128 / 256 (63 / 92 / 180 registers) against the word tile's
3.69. Timed (session 44, H100): exact; at best 0.99x of the word tile in the decode step (notes/Q4_DECODE.md).
Gluon cannot run under Triton's interpreter, so the CPU check runs `emulate`, the kernel's own index math in torch,
against quant_matvec_ref; the kernel itself is checked only by --gpu (and tests/test_quant_gluon.py on CUDA).
"""
from __future__ import annotations

import argparse
import json
import os
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

from tiered.kernels import quant_gluon  # noqa: E402
from tiered.kernels.quant_gluon import GROUP, PAIR, emulate, gl, gluon, layouts, mma_v2, triton  # noqa: E402,F401

DENSE = {"lm_head": (151936, 2048), "qkv": (5120, 2048), "o_proj": (2048, 4096)}
__all__ = ["GROUP", "PAIR", "emulate", "gl", "gluon", "layouts", "mma_v2", "triton"]  # the experts probe's


def matvec(x, w, bn: int = 128, persist: int = 0, launch: dict | None = None, ahead: int = 1, groups: int = 1):
    """x [K] bf16 (CUDA), w one q4 QuantWeight [N, K] -> y [N] fp32 through the engine's Gluon kernel."""
    return quant_gluon.matvec(x[None], w, out_dtype=torch.float32, bn=bn, ahead=ahead, groups=groups,
                              persist=persist, launch=launch)[0]


def cpu_check(seed: int = 0) -> dict:
    """emulate against quant_matvec_ref on small q4 matrices (K of 1, 8 and 11 groups: a partial epilogue)."""
    from tiered.kernels.quant_moe import quant_matvec_ref
    from tiered.layout.quant import quantize

    g = torch.Generator().manual_seed(seed)
    res = {}
    for n, k in ((48, 64), (33, 512), (70, 704)):
        w = quantize(torch.randn(n, k, generator=g) * k ** -0.5, "q4")
        x = torch.randn(k, generator=g).to(torch.bfloat16)
        ref = quant_matvec_ref(x.float()[None], w)[0].double()
        err = float((emulate(x, w) - ref).norm() / ref.norm())
        res[f"{n}x{k}"] = err
        if err > 1e-6:
            raise SystemExit(f"the emulated index math misses the reference at {n}x{k}: relative error {err:.2e}")
    return res


def sass_counts(k: int = 2048) -> list[dict]:
    """Static SASS of one program for sm_90 at BN 64, 128, 256 (no GPU: Triton's ptxas and cuobjdump)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from kernel_regs import cuobjdump, sass_ops

    rows = []
    for bn in (64, 128, 256):
        cst = quant_gluon.constexprs(k, bn)
        sig = {"x_ptr": "*bf16", "q_ptr": "*i32", "s_ptr": "*bf16", "m_ptr": "*bf16", "out_ptr": "*fp32", "N": "i32",
               "stride_xt": "i32", "stride_qn": "i32", "stride_sn": "i32", "stride_mn": "i32", "stride_ot": "i32",
               **{c: "constexpr" for c in cst}}
        attrs = {(i,): [["tt.divisibility", 16]] for i in range(11) if i != 5}
        kern = triton.compile(GluonASTSource(quant_gluon.KERNEL, sig, cst, attrs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": 4})
        ops = sass_ops(kern.asm["cubin"])
        total = sum(ops.values())
        usage = cuobjdump(kern.asm["cubin"], "-res-usage")
        regs = next((w for line in usage.splitlines() for w in line.split() if w.startswith("REG")), "")
        rows.append({"bn": bn, "instructions": total, "per_input": total / (bn * k / 128), "registers": regs,
                     "top": dict(ops.most_common(8)), "shared_stores": ops.get("STS", 0)})
    return rows


def gpu_run(bns: list[int], persists: list[int], aheads: list[int], only: str = "", groups: tuple = (1,)) -> dict:
    """On CUDA: each BN against quant_matvec_ref (fp32 outputs), then timed in CUDA graphs of calls on other copies
    of the matrix against TUNED's quant_matvec (PDL as the engine launches it, and without); then the engine's path
    (quant_matvec with algo 3, PDL on, bf16 out) checked at 1 and 2 rows."""
    from bench_moe_kernels import rel, time_graph

    from tiered.kernels import pdl
    from tiered.kernels import quant_moe as qm
    from tiered.layout.quant import quantize

    out = {}
    for name, (n, k) in DENSE.items():
        if only and name not in only.split(","):
            continue
        g = torch.Generator(device="cuda").manual_seed(n)
        copies = 2 if n * k > 1e8 else 8
        mats = [quantize(torch.randn(n, k, generator=g, device="cuda") * k ** -0.5, "q4") for _ in range(copies)]
        x = torch.randn(k, generator=g, device="cuda").to(torch.bfloat16)
        ref = qm.quant_matvec_ref(x.float()[None], mats[0])[0]
        row = {"shape": [n, k], "bytes": mats[0].nbytes}
        t = time_graph([lambda m=m: qm.quant_matvec(x[None], m) for m in mats], reps=20)
        row["tuned_pdl_us"] = t * 1e6
        os.environ["TIERED_PDL"] = "0"
        try:
            row["tuned_nopdl_us"] = time_graph([lambda m=m: qm.quant_matvec(x[None], m) for m in mats], reps=20) * 1e6
        finally:
            os.environ.pop("TIERED_PDL")
        launch = pdl.launch_args(x.device)
        variants = [(bn, pp, ah, gr) for bn in bns for pp in persists for ah in aheads for gr in groups]
        for bn, pp, ah, gr in variants:
            def run(m, launch=None, bn=bn, pp=pp, ah=ah, gr=gr):
                return matvec(x, m, bn, pp, launch, ah, gr)
            r = {"rel_err": rel(run(mats[0]), ref.float())}
            if r["rel_err"] <= 1e-4:
                r["us"] = time_graph([lambda m=m: run(m) for m in mats], reps=20) * 1e6
                r["tbps"] = mats[0].nbytes / r["us"] / 1e6
                r["vs_tuned_nopdl"] = row["tuned_nopdl_us"] / r["us"]
                if launch:
                    r["rel_err_pdl"] = rel(run(mats[0], dict(launch)), ref.float())
                    r["us_pdl"] = time_graph([lambda m=m: run(m, dict(launch)) for m in mats], reps=20) * 1e6
                    r["vs_tuned_pdl"] = row["tuned_pdl_us"] / r["us_pdl"]
            row[f"bn{bn}_p{pp}_a{ah}_g{gr}"] = r
        # the engine's dispatch: algo 3 through quant_matvec, bf16 out, two rows (the second row's own x)
        cfg = qm.QConfig(bn=128, algo=3)
        x2 = torch.stack([x, torch.randn(k, generator=g, device="cuda").to(torch.bfloat16)])
        y2 = qm.quant_matvec(x2, mats[0], config=cfg)
        row["engine_rel_err_t2"] = rel(y2.float(), qm.quant_matvec_ref(x2.float(), mats[0]).float())
        row["engine_dtype"] = str(y2.dtype)
        out[name] = row
        print(name, json.dumps(row), flush=True)
    return out


def best_qconfigs(products: dict) -> list[str]:
    """TIERED_QCONFIG entries for each product's fastest checked variant with PDL (as the engine launches it)."""
    out = []
    for row in products.values():
        timed = [(r["us_pdl"], key) for key, r in row.items() if isinstance(r, dict) and r.get("us_pdl")]
        if timed:
            bn, _, ahead, groups = min(timed)[1].split("_")
            n, k = row["shape"]
            out.append(f"gemv,q4,{k},{n}:bn={bn[2:]},algo=3,ahead={ahead[1:]},bg={groups[1:]}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="check and time the kernel on this machine's GPU")
    ap.add_argument("--bn", default="64,128,256", help="rows a program to try with --gpu")
    ap.add_argument("--persist", default="0,4", help="programs a SM looping over blocks to try (0: a program a block)")
    ap.add_argument("--ahead", default="1,2,4", help="steps of words a load to try (the next load ahead)")
    ap.add_argument("--groups", default="1", help="groups a step to try (1: 8-byte loads, 2: 16-byte)")
    ap.add_argument("--only", default="", help="products to run, e.g. lm_head (default: all of lm_head, qkv, o_proj)")
    args = ap.parse_args()
    if gluon is None:
        sys.exit(f"this Triton ({getattr(triton, '__version__', 'absent')}) has no Gluon")
    res = {"triton": triton.__version__, "date": time.strftime("%Y-%m-%d"), "cpu_check": cpu_check()}
    print("emulated index math against quant_matvec_ref (relative error):", res["cpu_check"])
    if args.gpu:
        if not torch.cuda.is_available():
            sys.exit("--gpu needs CUDA")
        from benchmeta import git_commit, write_out

        res.update(device=torch.cuda.get_device_name(), commit=git_commit(),
                   products=gpu_run([int(b) for b in args.bn.split(",")], [int(v) for v in args.persist.split(",")],
                                        [int(v) for v in args.ahead.split(",")], args.only,
                                        tuple(int(v) for v in args.groups.split(","))))
        print(write_out(res, "gluon_q4.json"))
        for name, row in res["products"].items():
            print(f"{name}: TUNED {row['tuned_nopdl_us']:.1f} / {row['tuned_pdl_us']:.1f} us (no PDL / PDL)")
            for key, r in row.items():
                if isinstance(r, dict):
                    print(f"  {key}: rel err {r['rel_err']:.1e}, {r.get('us', 0):.1f} / {r.get('us_pdl', 0):.1f} us")
        print("best", " ".join(best_qconfigs(res["products"])))
        return
    res["sass"] = sass_counts()
    for r in res["sass"]:
        print(f"BN {r['bn']:3d}: {r['instructions']} SASS, {r['per_input']:.2f} an input, {r['registers']}, "
              f"STS {r['shared_stores']}; {r['top']}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
