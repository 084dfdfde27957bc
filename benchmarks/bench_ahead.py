"""What running the host one step ahead buys in greedy VRAM decode (GPU box): the engine's decode loop against
back-to-back replays of the same graph.

In one process on one layout (resident experts, the whole-step graphs), after a warm-up:
  - `replay`: the captured step launched --new times back to back from its own buffers (argmax and position
    advanced on the device, nothing read back): the device's rate, the ceiling of any host loop;
  - `per-token`: engine.generate with step_ahead=False (each token read back before the next step);
  - `ahead`: engine.generate with the host one step ahead (the default for greedy);
  - the same two with a streaming text callback (on_text), as `tiered run` decodes.
Each engine row is the median decode_tok_s of --repeats greedy runs of --new tokens (stop_at_eos off) after a
--prompt-token prompt of random ids; `tokens_equal` says whether every row produced the same tokens.

    python3 benchmarks/bench_ahead.py -m W/layout                      # GPU box, about a minute after load
    python3 benchmarks/bench_ahead.py --device cpu --new 8 --repeats 1  # CPU check (no graphs: replay is skipped)

Prints a table, then one JSON line last; writes $OUT/ahead.json when OUT is set.
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


def log(msg: str) -> None:
    print(f"[ahead] {msg}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def replay_tok_s(e, prompt: list[int], n: int) -> float | None:
    """Back-to-back launches of the captured step from its own buffers: tokens per second of the device alone."""
    g = e.graphed
    if g is None or not g.ready():
        return None
    e.generate(prompt, max_new_tokens=1)  # the prompt's K/V, so that the steps attend to a real prefix
    pos = len(prompt)
    g.start(torch.tensor([11], device=e.device), pos)
    for i in range(4):
        g.launch(pos + i)
    g.start(torch.tensor([11], device=e.device), pos)
    sync(e.device)
    t = time.perf_counter()
    for i in range(n):
        g.launch(pos + i)
    sync(e.device)
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=None, help="layout or checkpoint (default: the embedded model)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None, help="compute dtype (default: bf16 on CUDA)")
    ap.add_argument("--attn", default="auto")
    ap.add_argument("--new", type=int, default=256, help="new tokens per run")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    ctx = a.prompt_tokens + a.new + 16
    t0 = time.perf_counter()
    e = tiered.load(a.model, device=a.device, dtype=a.dtype, attn=a.attn, max_context=ctx)
    log(f"loaded in {time.perf_counter() - t0:.1f} s; attention {e.model.attn}, graphs {e.graphed is not None}")
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, min(8192, e.config.vocab_size), (a.prompt_tokens,), generator=gen).tolist()
    rows: dict[str, dict] = {}
    tokens: dict[str, list[int]] = {}
    for name, ahead, stream in (("per-token", False, False), ("ahead", None, False),
                                ("per-token+text", False, True), ("ahead+text", None, True)):
        e.step_ahead = ahead
        on_text = (lambda s: None) if stream else None
        e.generate(prompt[:8], max_new_tokens=8, stop_at_eos=False, on_text=on_text)  # warm-up
        runs = []
        for _ in range(a.repeats):
            sync(e.device)
            t = time.perf_counter()
            g = e.generate(prompt, max_new_tokens=a.new, stop_at_eos=False, on_text=on_text)
            wall = time.perf_counter() - t
            runs.append({"decode_tok_s": g.stats["decode_tok_s"], "wall_s": wall, "ttft_s": g.stats["ttft_s"],
                         "step_ahead": g.stats["step_ahead"], "decode_graphs": g.stats["decode_graphs"]})
            tokens[name] = g.token_ids
        rows[name] = {"decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs), "runs": runs}
        log(f"{name}: {rows[name]['decode_tok_s']:.1f} tok/s")
    e.step_ahead = None
    rep = replay_tok_s(e, prompt, a.new)
    first = next(iter(tokens.values()))
    res = {"bench": "ahead", "commit": git_commit(), "model": str(a.model), "device": a.device,
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "attention": e.model.attn,
           "dtype": str(e.dtype).removeprefix("torch."), "new": a.new, "prompt_tokens": a.prompt_tokens,
           "replay_tok_s": rep, "rows": rows, "tokens_equal": all(t == first for t in tokens.values()),
           "ahead_over_per_token": rows["ahead"]["decode_tok_s"] / rows["per-token"]["decode_tok_s"],
           "ahead_over_replay": rows["ahead"]["decode_tok_s"] / rep if rep else None}
    print(f"{'loop':>15} | {'tok/s':>8} | {'vs replay':>9} | {'ttft s':>7} | ahead")
    if rep:
        print(f"{'replay':>15} | {rep:8.1f} | {1.0:9.3f} | {'-':>7} | -")
    for name, r in rows.items():
        last = r["runs"][-1]
        vs = f"{r['decode_tok_s'] / rep:9.3f}" if rep else f"{'-':>9}"
        print(f"{name:>15} | {r['decode_tok_s']:8.1f} | {vs} | {last['ttft_s']:7.4f} | {last['step_ahead']}")
    print(f"tokens equal across loops: {res['tokens_equal']}")
    print(write_out(res, "ahead.json"))


if __name__ == "__main__":
    main()
