"""Make a random-weight Hugging Face MoE checkpoint for bandwidth benchmarks (needs transformers).

Shapes are presets; `qwen3-10b` is the 10.59B Qwen3-MoE shape of ../shared/GROUND.md (16 layers,
128 experts, top-8, hidden 2048, expert FFN 768, 32 q / 4 kv heads, head_dim 128, vocab 151936).
On a GPU box the weights are initialised on the GPU (about 1 s for 10.6B parameters).

    python3 tools/make_random_checkpoint.py --preset qwen3-10b --out /tmp/qwen3-10b
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

PRESETS = {
    "qwen3-10b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                      num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                      num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=4096,
                      rms_norm_eps=1e-6, tie_word_embeddings=False),
    # qwen3-10b with 8 layers (5.61B): the model of the llama.cpp baselines in GROUND.md
    "qwen3-10b-8l": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                         num_hidden_layers=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                         num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=4096,
                         rms_norm_eps=1e-6, tie_word_embeddings=False),
    # qwen3-10b's layer and expert counts at a CPU-sized width (replayed-routing benchmark checks)
    "qwen3-mini": dict(vocab_size=1024, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                       num_hidden_layers=16, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                       num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=1024,
                       rms_norm_eps=1e-6, tie_word_embeddings=False),
    # a small shape with the same structure, for testing benchmark scripts on a CPU
    "qwen3-tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                       num_experts=16, num_experts_per_tok=4, norm_topk_prob=True, max_position_embeddings=1024,
                       rms_norm_eps=1e-6, tie_word_embeddings=False),
}


def qwen3_config(preset: str):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(**PRESETS[preset])


def make(preset: str, out: Path, *, seed: int = 0, device: str | None = None, shard_size: str = "5GB") -> dict:
    """Build the model with random bf16 weights, save it; return timings."""
    from transformers import AutoModelForCausalLM

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(qwen3_config(preset), dtype=torch.bfloat16)
    t1 = time.perf_counter()
    model.save_pretrained(out, max_shard_size=shard_size)
    t2 = time.perf_counter()
    n = sum(p.numel() for p in model.parameters())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"preset": preset, "params": n, "init_s": t1 - t0, "save_s": t2 - t1, "path": str(out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="qwen3-10b")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    a = ap.parse_args()
    print(json.dumps(make(a.preset, a.out, seed=a.seed, device=a.device)))


if __name__ == "__main__":
    main()
