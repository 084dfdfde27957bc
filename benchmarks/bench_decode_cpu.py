"""CPU decode speed: tiered's engine against transformers `generate` on the reference model, fp32, same run.

Both generate 64 greedy tokens (batch 1) after the same prompt. Decode tok/s counts the one-token steps
after the first generated token: for transformers, (time of a 64-token generate - time of a 1-token
generate) / 63; for tiered, the engine's own decode timer (63 steps). Median of --repeats runs each,
after a warm-up. The tokens are checked for identity after timing.

    python3 benchmarks/bench_decode_cpu.py [--model DIR] [--prompt-tokens 64] [--new-tokens 64] [--repeats 5]

Prints a table, then one JSON line last; writes the JSON to $OUT/decode_cpu.json when $OUT is set,
and to --save PATH when given.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
from benchmeta import git_commit, write_out  # noqa: E402

import tiered  # noqa: E402
from tiered.layout.families import default_model_path  # noqa: E402


def prompt_ids(engine, n: int) -> list[int]:
    text_dir = REPO.parent / "shared" / "text" / "eval"
    files = sorted(text_dir.glob("*")) if text_dir.is_dir() else []
    text = files[0].read_text() if files else "import os\nimport sys\n\n\ndef main(argv):\n" * 20
    ids = engine.tokenizer.encode(text)[:n]
    if len(ids) < n:
        raise SystemExit(f"prompt text has only {len(ids)} tokens, need {n}")
    return ids


def time_hf(model, ids: list[int], new: int) -> tuple[float, list[int]]:
    x = torch.tensor([ids])
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    return time.perf_counter() - t0, out[0, len(ids):].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=default_model_path(), help="HF checkpoint (transformers reads it)")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--save", type=Path, default=None)
    a = ap.parse_args()
    import transformers as tf

    torch.manual_seed(0)
    engine = tiered.load(a.model, device="cpu", dtype="float32", max_context=a.prompt_tokens + a.new_tokens + 8)
    ids = prompt_ids(engine, a.prompt_tokens)
    hf = tf.AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="sdpa").eval()
    n = a.new_tokens

    # Warm-up both (allocator, thread pools, lazy inits).
    engine.generate(ids, max_new_tokens=8, stop_at_eos=False)
    time_hf(hf, ids, 8)

    ours, hf_dec, hf_one_t, hf_full_t = [], [], [], []
    ours_tokens = hf_tokens = None
    for _ in range(a.repeats):
        g = engine.generate(ids, max_new_tokens=n, stop_at_eos=False)
        ours.append(g.stats["decode_tok_s"])
        ours_tokens = g.token_ids
        t1, _ = time_hf(hf, ids, 1)
        tn, hf_tokens = time_hf(hf, ids, n)
        hf_one_t.append(t1)
        hf_full_t.append(tn)
        hf_dec.append((n - 1) / max(tn - t1, 1e-9))
    prefill = engine.generate(ids, max_new_tokens=1).stats["prefill_tok_s"]

    ours_med, hf_med = statistics.median(ours), statistics.median(hf_dec)
    same = ours_tokens == hf_tokens
    res = {
        "bench": "decode_cpu", "model": str(a.model), "dtype": "float32", "device": "cpu",
        "threads": torch.get_num_threads(), "prompt_tokens": a.prompt_tokens, "new_tokens": n,
        "repeats": a.repeats, "tiered_decode_tok_s": ours_med, "transformers_decode_tok_s": hf_med,
        "ratio": ours_med / hf_med, "tiered_runs": ours, "transformers_runs": hf_dec,
        "tiered_prefill_tok_s": prefill,
        "transformers_generate_s": statistics.median(hf_full_t), "tokens_identical": same,
        "torch": torch.__version__, "transformers": tf.__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": git_commit(),
    }
    print(f"{'engine':<14}{'decode tok/s':>14}")
    print(f"{'tiered':<14}{ours_med:>14.1f}")
    print(f"{'transformers':<14}{hf_med:>14.1f}")
    print(f"ratio {res['ratio']:.2f}x; tokens identical: {same}")
    line = write_out(res, "decode_cpu.json")
    if a.save:
        a.save.parent.mkdir(parents=True, exist_ok=True)
        a.save.write_text(line + "\n")
    print(line)
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
