"""Host time per layer of the piecewise decode step on CPU (graphs off): where the per-layer host work goes.

    python3 tools/profile_host_step.py [-m LAYOUT] [--budget '{"expert_slots": 16}'] [--tokens 64] [--profile]
Prints the piecewise step's host seconds per layer (routing, slot lookup, copy issue: the host work between
segments, not the segments' compute nor the wait for CPU experts) over a repeat of a warm-up generation (the
same tokens, so the same experts: hits once the slots hold them), and with --profile the top functions by own
time. On CPU the copies into slots are synchronous memcpys, so misses count as host time here.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tiered import load  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--budget", default='{"expert_slots": 16}')
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    eng = load(a.model, device="cpu", budget=json.loads(a.budget), max_context=512)
    pw = eng.use_piecewise(graphs=False)
    prompt = list(range(100, 132))
    eng.generate(prompt, max_new_tokens=a.tokens, stop_at_eos=False)  # the same tokens again below: steady state
    prof = cProfile.Profile() if a.profile else None
    if prof:
        prof.enable()
    g = eng.generate(prompt, max_new_tokens=a.tokens, stop_at_eos=False)
    if prof:
        prof.disable()
    s = g.stats
    L = eng.config.num_layers
    route = pw.route_s / max(1, pw.steps * L)
    print(f"decode {s['decode_tok_s']:.1f} tok/s; route_s per layer {route * 1e6:.1f} us; "
          f"host_s_per_layer {s.get('host_s_per_layer')}; cpu_experts {s.get('cpu_experts')}")
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
