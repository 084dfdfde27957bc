"""Make a random-weight Hugging Face MoE checkpoint for bandwidth benchmarks (needs transformers).

Shapes are presets; `qwen3-10b` is the 10.59B Qwen3-MoE shape used by the benchmarks (16 layers,
128 experts, top-8, hidden 2048, expert FFN 768, 32 q / 4 kv heads, head_dim 128, vocab 151936).
On a GPU box the weights are initialised on the GPU (about 1 s for 10.6B parameters).

    python3 tools/make_random_checkpoint.py --preset qwen3-10b --out /tmp/qwen3-10b
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

PRESETS = {
    "qwen3-10b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                      num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                      num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=4096,
                      rms_norm_eps=1e-6, tie_word_embeddings=False),
    # qwen3-10b with 8 layers (5.61B params, 11.2 GB bf16): the model of the llama.cpp comparisons
    # (benchmarks/bench_peers.py), whose checkpoint, GGUF and layout fit the GPU box's disk together
    "qwen3-10b-8l": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                         num_hidden_layers=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                         num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=4096,
                         rms_norm_eps=1e-6, tie_word_embeddings=False),
    # the smallest shape llama.cpp's converter takes with the reference tokenizer (its ids < 8192 must fit the
    # vocab): bench_peers.py --tiny runs both engines on it on a CPU
    "qwen3-peers-tiny": dict(vocab_size=8192, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                             num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=2048,
                             rms_norm_eps=1e-6, tie_word_embeddings=False),
    # qwen3-10b's widths (a layer's bytes) cut to 2 layers with the reference tokenizer's 8,192-token vocab (1.27B
    # params, 2.5 GB bf16): CPU decode of dense GEMVs and experts that read DRAM, not cache (bench_decode_cpu.py)
    "qwen3-10b-2l-v8k": dict(vocab_size=8192, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                             num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                             num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                             max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False),
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
# gpt-oss shapes (GptOssConfig; sliding and full attention layers alternate, YaRN rope, attention sinks, expert
# biases, 201,088-token vocab): gpt-oss-20b's widths (hidden 2880, 32 experts top-4 of FFN 2880, 64 q / 8 kv heads
# of 64) cut to 4 layers (4.4B params, 8.8 GB bf16): the decode benchmark of gpt-oss's experts
GPT_OSS_PRESETS = {
    "gpt-oss-20b-4l": dict(vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=4,
                           num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=32,
                           num_experts_per_tok=4, sliding_window=128, max_position_embeddings=131072,
                           layer_types=["sliding_attention", "full_attention"] * 2, tie_word_embeddings=False),
    "gpt-oss-tiny": dict(vocab_size=1024, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=8,
                         num_experts_per_tok=2, sliding_window=16, max_position_embeddings=1024,
                         layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=False),
}
PRESETS.update(GPT_OSS_PRESETS)


def qwen3_config(preset: str):
    """The transformers config of `preset` (Qwen3-MoE, or GptOss for the gpt-oss presets)."""
    if preset in GPT_OSS_PRESETS:
        from transformers import GptOssConfig

        return GptOssConfig(**PRESETS[preset])
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(**PRESETS[preset])


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def copy_tokenizer(src: Path, out: Path) -> list[str]:
    """Copy a tokenizer (tokenizer.json and its configs) into a checkpoint, so that converters that need one
    (llama.cpp's convert_hf_to_gguf.py) accept it. Its ids must be below the model's vocab_size."""
    src = Path(src)
    if not (src / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {src}: pass a directory holding a Hugging Face tokenizer")
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, Path(out) / name)
            copied.append(name)
    return copied


def make(preset: str, out: Path, *, seed: int = 0, device: str | None = None, shard_size: str = "5GB",
         tokenizer: Path | None = None) -> dict:
    """Build the model with random bf16 weights, save it (with `tokenizer`'s files when given); return timings."""
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
    vocab = model.config.vocab_size
    del model
    tok = None
    if tokenizer is not None:
        tok = copy_tokenizer(tokenizer, out)
        size = len(json.loads((Path(out) / "tokenizer.json").read_text())["model"]["vocab"])
        if size > vocab:
            raise ValueError(f"the tokenizer in {tokenizer} has {size} tokens but preset {preset} has vocab_size "
                             f"{vocab}: pick a preset whose vocab holds it")
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"preset": preset, "params": n, "init_s": t1 - t0, "save_s": t2 - t1, "path": str(out),
            "tokenizer": tok}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="qwen3-10b")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--tokenizer", type=Path, default=None,
                    help="copy this directory's tokenizer.json (+ configs) in, e.g. tiered/data/olmoe-code-17m")
    a = ap.parse_args()
    print(json.dumps(make(a.preset, a.out, seed=a.seed, device=a.device, tokenizer=a.tokenizer)))


if __name__ == "__main__":
    main()
