"""Builds of the native CPU kernel against each other, end to end, in one process: each variant is kernels/cpu_kernel.c
compiled with its own -D flags (cpu_kernel.build(defines=...); e.g. PFQ=16: the q4 prefetch distance), and the
engine's decode (or a prompt's prefill) runs with each in turn, round after round, so that the VM's drifting speed
falls on every variant alike (two processes a minute apart differed by 10-20% on this 2-core VM; variants
alternating in one process keep their order from round to round). The engine takes the variant through
`cpu_kernel.shared` (patched), so every CPU product of the step (dense GEMVs, the experts, a prompt's GEMMs and
expert rows) uses it.

    python3 benchmarks/ab_cpu_builds.py -m /tmp/cn/layout-q4 --act q8 --variant base= --variant pf16=PFQ=16
    python3 benchmarks/ab_cpu_builds.py -m /tmp/cn/layout-q4 --phase prefill --dtype bfloat16 \\
        --variant base= --variant pf8=PFQ=8 --rounds 10

Prints each variant's median tok/s and its runs, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
from benchmeta import git_commit  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True, help="a layout (q4 experts and dense for the q4 paths)")
    ap.add_argument("--variant", action="append", required=True, metavar="NAME=DEFINES",
                    help="a build: NAME=D1,D2 (-D flags, comma-separated; empty for the source as it is)")
    ap.add_argument("--act", choices=["float", "q8"], default="float", help="the kernel's activation mode")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--phase", choices=["decode", "prefill"], default="decode")
    ap.add_argument("--prompt-file", type=Path, default=None,
                    help="the prompt (default: the first eval file's first --prompt-tokens tokens)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=49)
    ap.add_argument("--rounds", type=int, default=8)
    a = ap.parse_args()

    from tiered.kernels import cpu_kernel

    kerns = {}
    for v in a.variant:
        name, _, defs = v.partition("=")
        path = cpu_kernel.build(defines=tuple(d for d in defs.split(",") if d))
        kerns[name] = cpu_kernel.CpuKernel(path, a.act)
    cur = {"k": next(iter(kerns.values()))}
    cpu_kernel.shared = lambda: cur["k"]  # every caller looks it up through the module at each call

    from tiered.engine import load

    eng = load(a.model, device="cpu", dtype=a.dtype)
    if a.prompt_file is not None:
        ids = eng.encode(a.prompt_file.read_text())
    else:
        text = sorted((REPO.parent / "shared" / "text" / "eval").glob("*"))[0].read_text()
        ids = eng.encode(text)[:a.prompt_tokens]
    eng.generate(ids, max_new_tokens=8)
    runs: dict[str, list[float]] = {n: [] for n in kerns}
    for _ in range(a.rounds):
        for n, k in kerns.items():
            cur["k"] = k
            if a.phase == "decode":
                runs[n].append(eng.generate(ids, max_new_tokens=a.new_tokens).stats["decode_tok_s"])
            else:
                runs[n].append(len(ids) / eng.generate(ids, max_new_tokens=1).stats["prefill_s"])
    med = {n: statistics.median(v) for n, v in runs.items()}
    for n, v in runs.items():
        print(f"{n:<12} {a.phase} median {med[n]:8.1f} tok/s   runs {[round(x) for x in v]}")
    print(json.dumps({"bench": "ab_cpu_builds", "model": a.model, "act": a.act, "dtype": a.dtype, "phase": a.phase,
                      "prompt_tokens": len(ids), "variants": dict(v.partition("=")[::2] for v in a.variant),
                      "median_tok_s": med, "runs": runs, "commit": git_commit()}))


if __name__ == "__main__":
    main()
