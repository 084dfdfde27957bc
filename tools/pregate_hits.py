"""How often the pre-gate's guess (model/pregate.py) names the experts the router then picks, per layer, on a model's
own routing in a real decode (GPU; the model must qualify for the pre-gate: resident on CUDA, glue on).

Eager one-token steps (no graphs) with TIERED_PREGATE=1: each layer's qk_rope call records the top-k of its guess
columns, each router launch its chosen ids; the share of the router's experts the guess named, per layer and
overall, over --tokens tokens after a --prompt-token prompt.

    python3 tools/pregate_hits.py -m /root/peers/layout-q4 --tokens 32

Prints a line per layer, then one JSON object; with OUT set, also $OUT/pregate-hits.json.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=None, help="layout (default: the embedded reference model)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=32)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("pregate_hits: needs a CUDA GPU (the pre-gate serves resident experts on the GPU)")
    os.environ["TIERED_PREGATE"] = "1"
    import tiered
    from benchmeta import git_commit, write_out

    from tiered.kernels import fused_rope

    eng = tiered.load(a.model, device="cuda", dtype="bfloat16", attn="triton", cuda_graphs=False,
                      max_context=a.prompt + a.tokens + 16)
    m = eng.model
    if not m.pregate_layers:
        sys.exit("pregate_hits: the model does not qualify for the pre-gate (model/pregate.py's 'When')")
    guesses: list = []
    picks: list = []
    real_rope, real_router = fused_rope.qk_rope, m._router_norm_kernel

    def rope(qkv, *args, pregate=None, **kw):
        if pregate is not None and qkv.shape[0] == 1:
            g = qkv[0, pregate.col:pregate.col + pregate.experts].float()
            guesses.append(set(torch.topk(g, pregate.top).indices.tolist()))
        return real_rope(qkv, *args, pregate=pregate, **kw)

    def router(*args, **kw):
        out = real_router(*args, **kw)
        if out[3].shape[0] == 1:
            picks.append(set(out[3][0].tolist()))
        return out

    fused_rope.qk_rope = rope
    m._router_norm_kernel = router
    try:
        eng.generate(list(range(100, 100 + a.prompt)), max_new_tokens=a.tokens, stop_at_eos=False)
    finally:
        fused_rope.qk_rope, m._router_norm_kernel = real_rope, real_router
    L = m.config.num_layers
    n = min(len(guesses), len(picks)) // L * L
    if n == 0:
        sys.exit("pregate_hits: no one-token step went through the pre-gate")
    by_layer = []
    for layer in range(L):
        pairs = [(guesses[i], picks[i]) for i in range(layer, n, L)]
        by_layer.append(sum(len(g & p) for g, p in pairs) / sum(len(p) for _, p in pairs))
        print(f"layer {layer}: {by_layer[-1]:.3f} of the router's experts guessed ({len(pairs)} tokens)")
    res = {"model": str(a.model or "embedded"), "device": torch.cuda.get_device_name(), "commit": git_commit(),
           "tokens": n // L, "hits_by_layer": by_layer, "hits_mean": sum(by_layer) / L}
    print(write_out(res, "pregate-hits.json"))


if __name__ == "__main__":
    main()
