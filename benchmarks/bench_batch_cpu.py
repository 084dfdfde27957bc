"""CPU batch job: N prompts through `tiered batch` against running them one by one with `tiered run`.

Prompts are N windows of --prompt-tokens tokens cut from the fit texts (../shared/text/fit), each asking
for --new-tokens greedy tokens. Three wall times, all on the reference model in fp32:
  batch    `python -m tiered batch --max-batch B` on the whole file (one process, startup included);
  run      `python -m tiered run --prompt-file` once per prompt, startup included (--run-sample of them,
           scaled to N when fewer: reported as `run_wall_s_est`);
  loop     engine.generate over every prompt in one process (one-by-one without process startups).
The batch output's texts are checked against the loop's (greedy, so they must be identical).

    OMP_NUM_THREADS=1 python3 benchmarks/bench_batch_cpu.py [--prompts 256] [--max-batch 64] [--run-sample 16]

Prints a table, then one JSON line; writes it to $OUT/batch_cpu.json when $OUT is set, and to --save PATH.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
from benchmeta import git_commit, write_out  # noqa: E402

from tiered.engine import load  # noqa: E402

FIT = Path("/work/shared/text/fit") if Path("/work/shared/text/fit").is_dir() else REPO.parent / "shared" / "text" / "fit"


def make_prompts(tok, n: int, length: int) -> list[str]:
    """n prompts of `length` tokens, windows taken round-robin over the fit files."""
    files = sorted(FIT.glob("*"))
    ids = [tok.encode(f.read_text()) for f in files]
    out = []
    for i in range(n):
        doc = ids[i % len(ids)]
        start = (i // len(ids)) * length * 3 % max(1, len(doc) - length)
        out.append(tok.decode(doc[start:start + length]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=48)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--run-sample", type=int, default=16, help="`tiered run` processes actually timed")
    ap.add_argument("--save", type=Path, default=None)
    a = ap.parse_args()
    eng = load(None, device="cpu", dtype="float32")
    prompts = make_prompts(eng.tokenizer, a.prompts, a.prompt_tokens)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        inp, out = d / "in.jsonl", d / "out.jsonl"
        inp.write_text("".join(json.dumps({"prompt": p, "max_tokens": a.new_tokens}) + "\n" for p in prompts))
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "tiered", "batch", "--device", "cpu", "--input", str(inp),
                            "--output", str(out), "--max-batch", str(a.max_batch), "--no-progress", "--json"],
                           cwd=REPO, env=env, capture_output=True, text=True)
        batch_s = time.perf_counter() - t0
        if r.returncode:
            raise SystemExit(r.stderr[-3000:])
        bstats = json.loads(r.stderr.strip().splitlines()[-1])
        got = {int(x["custom_id"]): x["response"]["body"]["choices"][0]["text"]
               for x in map(json.loads, out.read_text().splitlines())}
        k = min(a.run_sample, a.prompts)
        t0 = time.perf_counter()
        for i in range(k):
            pf = d / f"p{i}.txt"
            pf.write_text(prompts[i])
            rr = subprocess.run([sys.executable, "-m", "tiered", "run", "--device", "cpu", "--prompt-file", str(pf),
                                 "--max-new-tokens", str(a.new_tokens)], cwd=REPO, env=env, capture_output=True,
                                text=True)
            if rr.returncode:
                raise SystemExit(rr.stderr[-3000:])
            if rr.stdout != got[i + 1]:
                raise SystemExit(f"prompt {i}: tiered run and tiered batch differ")
        run_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    want = [eng.generate(p, max_new_tokens=a.new_tokens).text for p in prompts]
    loop_s = time.perf_counter() - t0
    same = sum(got[i + 1] == w for i, w in enumerate(want))
    res = {
        "bench": "batch_cpu", "commit": git_commit(), "prompts": a.prompts, "prompt_tokens": a.prompt_tokens,
        "new_tokens": a.new_tokens, "max_batch": a.max_batch, "threads": os.environ.get("OMP_NUM_THREADS"),
        "batch_wall_s": batch_s, "run_sampled": k, "run_wall_s_sampled": run_s,
        "run_wall_s_est": run_s * a.prompts / k, "loop_wall_s": loop_s,
        "speedup_vs_run": run_s * a.prompts / k / batch_s, "speedup_vs_loop": loop_s / batch_s,
        "texts_identical": same, "batch_decode_tok_s": bstats.get("decode_tok_s"),
        "batch_rows_per_step": bstats.get("rows_per_step"),
        "batch_distinct_experts_per_step": bstats.get("distinct_experts_per_step"),
    }
    print(f"{'mode':<34}{'wall s':>10}")
    print(f"{'tiered batch --max-batch ' + str(a.max_batch):<34}{batch_s:>10.1f}")
    print(f"{'tiered run x' + str(a.prompts) + (' (est. from ' + str(k) + ')' if k < a.prompts else ''):<34}"
          f"{res['run_wall_s_est']:>10.1f}")
    print(f"{'engine.generate loop (in process)':<34}{loop_s:>10.1f}")
    print(f"identical greedy texts: {same}/{a.prompts}")
    line = write_out(res, "batch_cpu.json")
    if a.save:
        a.save.write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
