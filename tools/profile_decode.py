"""Profile decode on a layout: where the host time goes per token, resident vs expert cache.

    python3 tools/profile_decode.py LAYOUT [--budget '{"vram_gb": 4, "ram_gb": 18.4}'] [--tokens 32]
Prints tok/s for each configuration and the top functions by own time (cProfile) for the last one.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import tiered  # noqa: E402


def one(layout: str, budget: dict | None, graphs: bool, tokens: int, profile: bool) -> float:
    eng = tiered.load(layout, device="cuda" if torch.cuda.is_available() else "cpu", dtype="bfloat16",
                      budget=budget, cuda_graphs=graphs, max_context=512)
    prompt = list(range(100, 164))
    eng.generate(prompt, max_new_tokens=8, stop_at_eos=False)
    prof = cProfile.Profile() if profile else None
    if prof:
        prof.enable()
    t0 = time.perf_counter()
    out = eng.generate(prompt, max_new_tokens=tokens, stop_at_eos=False)
    secs = time.perf_counter() - t0
    if prof:
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    st = out.stats
    print(f"budget={budget} graphs={graphs}: decode {st['decode_tok_s']:.1f} tok/s, wall {tokens / secs:.1f} tok/s; "
          f"vram {st['vram']} stall_s {st['stall_s']:.3f}", flush=True)
    del eng
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return tokens / secs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("layout")
    ap.add_argument("--budget", default='{"vram_gb": 4, "ram_gb": 18.4}')
    ap.add_argument("--tokens", type=int, default=32)
    a = ap.parse_args()
    one(a.layout, None, True, a.tokens, False)
    one(a.layout, None, False, a.tokens, False)
    one(a.layout, {"expert_slots": 2048}, False, a.tokens, False)
    one(a.layout, json.loads(a.budget), False, a.tokens, True)


if __name__ == "__main__":
    main()
