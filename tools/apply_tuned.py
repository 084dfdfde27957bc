"""Apply a bench_quant_kernels.py result to the decode kernels' tile table: the fastest deterministic tiles per
(kernel, format, K, N) become TUNED entries of tiered/kernels/quant_moe.py.

Reads the JSON's "suggested" (per shape: the fastest config, the default's time, whether the default is within 5%),
keeps the entries whose fastest config sums each output in one program (split 1: deterministic, greedy tokens
unchanged) and beats the default by more than 5%, and inserts them at the end of the TUNED literal (a later key
wins in a dict literal, so an existing entry for the same shape is overridden). Prints each applied line and, last,
one JSON line of what it did. The same JSON applied twice gives the same table (entries already present are not
added again).

    python3 tools/apply_tuned.py quant_kernels.json                       # edits tiered/kernels/quant_moe.py
    python3 tools/apply_tuned.py quant_kernels.json --dry-run             # prints the lines only
    python3 tools/apply_tuned.py quant_kernels.json --fused               # the fused MoE's table instead

With --fused it reads the JSON's "fused_best" (per expert shape: the fastest fused q4 MoE config of a --fused-sweep
run and the picked config's time) and adds the entries that beat the picked config by more than 2% to TUNED_FUSED
in tiered/kernels/quant_moe_fused.py (every fused config is deterministic).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
END = "}\n\n\ndef pick_config("
END_FUSED = "}\n\n\ndef pick_fused("


def pick(suggested: dict) -> tuple[list[str], list[dict]]:
    """(TUNED lines to add, skipped entries with the reason)."""
    lines, skipped = [], []
    for key, v in sorted(suggested.items()):
        c = v.get("config") or {}
        if v.get("best_us") is None:
            skipped.append({"key": key, "why": "not measured"})
        elif c.get("split", 1) != 1:
            skipped.append({"key": key, "why": f"fastest uses split {c['split']} (atomics, not deterministic)"})
        elif v.get("default_within_5pct"):
            skipped.append({"key": key, "why": "the default is within 5%"})
        else:
            lines.append(v["tuned"])
    return lines, skipped


def pick_fused(best: dict) -> tuple[list[str], list[dict]]:
    """(TUNED_FUSED lines to add, skipped shapes with the reason) from a result's "fused_best"."""
    lines, skipped = [], []
    for shape, v in sorted(best.items()):
        if not v.get("default_us"):
            skipped.append({"key": shape, "why": "the picked config was not measured"})
        elif v["us"] >= 0.98 * v["default_us"]:
            skipped.append({"key": shape, "why": "the picked config is within 2%"})
        else:
            lines.append(v["tuned"])
    return lines, skipped


def apply(src: str, lines: list[str], end: str = END) -> tuple[str, list[str]]:
    """src with `lines` inserted at the end of the table that `end` closes (TUNED, or TUNED_FUSED with END_FUSED;
    those not already there), and the lines inserted."""
    if end not in src:
        raise SystemExit(f"apply_tuned: the end of the table (a '}}' line before `{end.split('def ')[1]}`) was not "
                         "found in the target: update tools/apply_tuned.py to the file's shape")
    head, tail = src.split(end, 1)
    new = [ln for ln in lines if ln.strip() not in {x.strip() for x in head.splitlines()}]
    block = "".join(f"    {ln}\n" for ln in new)
    note = ("    # applied by tools/apply_tuned.py from a bench_quant_kernels.py run (fastest deterministic tiles)\n"
            if new else "")
    return head + note + block + end + tail, new


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("result", type=Path, help="bench_quant_kernels.py's JSON ($OUT/quant_kernels.json)")
    ap.add_argument("--target", type=Path, default=None,
                    help="the file to edit (default: tiered/kernels/quant_moe.py, with --fused quant_moe_fused.py)")
    ap.add_argument("--fused", action="store_true", help="apply the fused q4 MoE's fastest configs (fused_best)")
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args()
    a.target = a.target or REPO / "tiered" / "kernels" / ("quant_moe_fused.py" if a.fused else "quant_moe.py")
    res = json.loads(a.result.read_text().strip().splitlines()[-1])
    key = "fused_best" if a.fused else "suggested"
    if key not in res:
        raise SystemExit(f"apply_tuned: {a.result} has no {key!r} (is it bench_quant_kernels.py's decode JSON"
                         + (", run with --fused-sweep?)" if a.fused else "?)"))
    lines, skipped = pick_fused(res[key]) if a.fused else pick(res[key])
    src = a.target.read_text()
    out, new = apply(src, lines, END_FUSED if a.fused else END)
    for ln in new:
        print(ln)
    if not a.dry_run and out != src:
        a.target.write_text(out)
    print(json.dumps({"applied": new, "skipped": skipped, "target": str(a.target), "dry_run": a.dry_run,
                      "source_commit": res.get("commit")}))


if __name__ == "__main__":
    sys.exit(main())
