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
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
START = "\nTUNED: dict"  # the table's first line; it ends at the first line that is just "}"


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


def apply(src: str, lines: list[str]) -> tuple[str, list[str]]:
    """src with `lines` inserted at the end of TUNED (those not already there), and the lines inserted."""
    i = src.find(START)
    j = src.find("\n}\n", i) if i >= 0 else -1
    if j < 0:
        raise SystemExit("apply_tuned: TUNED (a `TUNED: dict` line, then a line that is just '}') was not found in "
                         "quant_moe.py: update tools/apply_tuned.py to the file's shape")
    head, tail = src[:j + 1], src[j + 1:]
    new = [ln for ln in lines if ln.strip() not in {x.strip() for x in head.splitlines()}]
    block = "".join(f"    {ln}\n" for ln in new)
    note = ("    # applied by tools/apply_tuned.py from a bench_quant_kernels.py run (fastest deterministic tiles)\n"
            if new else "")
    return head + note + block + tail, new


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("result", type=Path, help="bench_quant_kernels.py's JSON ($OUT/quant_kernels.json)")
    ap.add_argument("--target", type=Path, default=REPO / "tiered" / "kernels" / "quant_moe.py")
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args()
    res = json.loads(a.result.read_text().strip().splitlines()[-1])
    if "suggested" not in res:
        raise SystemExit(f"apply_tuned: {a.result} has no 'suggested' (is it bench_quant_kernels.py's decode JSON?)")
    lines, skipped = pick(res["suggested"])
    src = a.target.read_text()
    out, new = apply(src, lines)
    for ln in new:
        print(ln)
    if not a.dry_run and out != src:
        a.target.write_text(out)
    print(json.dumps({"applied": new, "skipped": skipped, "target": str(a.target), "dry_run": a.dry_run,
                      "source_commit": res.get("commit")}))


if __name__ == "__main__":
    sys.exit(main())
