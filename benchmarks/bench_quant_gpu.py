"""In-VRAM decode speed of quantized layouts against bf16, same GPU, same run (issue 13's speed goals).

From one bf16 checkpoint of the 10.6B Qwen3-MoE shape cut to 8 layers (random weights, seed fixed; or
--checkpoint), three layouts are repacked: bf16 (as stored), `--experts q4`, and `--experts q4 --dense q4`.
Each is loaded with every expert in VRAM (ResidentExperts, CUDA graphs) and decodes 64 greedy tokens after
a 64-token prompt of random ids; decode tok/s is the median of --repeats runs after a warm-up. Quantized
experts run through the fused dequantizing kernels (tiered/kernels/quant_moe.py), quantized dense matrices
through the same kernel at one row. Also: bytes one decode step reads per variant (dense + K experts per
layer, whole blocks), greedy tokens matching bf16's (random weights: near-ties split paths; informative).
Not measured here: llama.cpp Q4_0 (q4_vs_llamacpp_q4_0) and the offload run (q4_vs_bf16_offload).

    python3 benchmarks/bench_quant_gpu.py --work /root/bench-quant            # GPU box, ~5-10 minutes
    python3 benchmarks/bench_quant_gpu.py --small --work /tmp/bqg             # same pipeline, tiny, CPU

Prints a table, then one JSON line last (keys q4_vs_bf16_decode, q4_experts_vs_bf16_decode); writes
$OUT/quant-gpu.json when OUT is set.
"""
from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
from benchmeta import git_commit, write_out  # noqa: E402

VARIANTS = {"bf16": ("source", "source"), "q4-experts": ("q4", "source"), "q4-experts+dense": ("q4", "q4")}


def log(msg: str) -> None:
    print(f"[quant-gpu] {msg}", file=sys.stderr, flush=True)


def build_checkpoint(out: Path, preset: str, layers: int, device: str, seed: int) -> float:
    """A random bf16 checkpoint of `preset` with `layers` layers, saved with save_pretrained."""
    from make_random_checkpoint import PRESETS
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    cfg = Qwen3MoeConfig(**{**PRESETS[preset], "num_hidden_layers": layers})
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    model.save_pretrained(out, max_shard_size="5GB")
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return time.perf_counter() - t0


def step_bytes(layout) -> int:
    """Bytes one decode step reads: every dense tensor stored (embedding row aside: counted whole, as the
    CONTRACTS HBM bound does) plus top_k whole expert blocks per layer."""
    c = layout.config
    return layout.summary()["dense_bytes"] + c.num_layers * c.top_k * layout.block_size


def run_variant(lay_dir: Path, device: str, dtype: torch.dtype, ids: torch.Tensor, new: int, repeats: int) -> dict:
    import tiered
    from tiered.store.disk import Layout

    eng = tiered.load(lay_dir, device=device, dtype=dtype, max_context=ids.numel() + new + 16)
    eng.generate(ids, max_new_tokens=new, stop_at_eos=False)  # warm-up: kernels compiled, graphs captured
    runs, toks, stats = [], None, None
    for _ in range(repeats):
        g = eng.generate(ids, max_new_tokens=new, stop_at_eos=False)
        runs.append(g.stats["decode_tok_s"])
        toks, stats = g.token_ids, g.stats
    lay = Layout.open(lay_dir)
    out = {"decode_tok_s": statistics.median(runs), "runs": runs, "prefill_tok_s": stats["prefill_tok_s"],
           "decode_graphs": stats.get("decode_graphs"), "tokens": toks, "bytes_per_step": step_bytes(lay),
           "block_size": lay.block_size, "dense_bytes": lay.summary()["dense_bytes"]}
    del eng
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> None:
    from tiered.layout.repack import repack

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=None, help="bf16 HF checkpoint (default: build one)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/tiered-bench-quant"))
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--small", action="store_true", help="qwen3-tiny on the CPU (tests this script anywhere)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and layouts under --work")
    a = ap.parse_args()
    device = "cpu" if a.small else "cuda"
    dtype = torch.float32 if a.small else torch.bfloat16
    preset = "qwen3-tiny" if a.small else "qwen3-10b"
    work = a.work
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"preset": preset, "layers": a.layers, "device": device, "dtype": str(dtype).removeprefix("torch."),
                 "prompt_tokens": a.prompt_tokens, "new_tokens": a.new_tokens, "commit": git_commit()}
    ckpt = a.checkpoint
    if ckpt is None:
        ckpt = work / "ckpt"
        shutil.rmtree(ckpt, ignore_errors=True)
        res["build_s"] = build_checkpoint(ckpt, preset, a.layers, device, a.seed)
        log(f"built and saved {preset} x {a.layers} layers in {res['build_s']:.1f}s")
    if device == "cuda":
        res["gpu"] = torch.cuda.get_device_name()
    gen = torch.Generator().manual_seed(a.seed + 1)
    vocab = __import__("json").loads((ckpt / "config.json").read_text())["vocab_size"]
    ids = torch.randint(0, vocab, (a.prompt_tokens,), generator=gen)
    res["variants"] = {}
    for name, (experts, dense) in VARIANTS.items():
        lay = work / f"layout-{name}"
        t0 = time.perf_counter()
        repack(ckpt, lay, experts=experts, dense=dense, force=True, progress=False, quant_device=device)
        rep_s = time.perf_counter() - t0
        log(f"{name}: repacked in {rep_s:.1f}s")
        v = run_variant(lay, device, dtype, ids, a.new_tokens, a.repeats)
        v["repack_s"] = rep_s
        res["variants"][name] = v
        log(f"{name}: decode {v['decode_tok_s']:.1f} tok/s ({v['decode_graphs']})")
        if not a.keep:
            shutil.rmtree(lay, ignore_errors=True)
    base = res["variants"]["bf16"]
    for name, v in res["variants"].items():
        v["vs_bf16_decode"] = v["decode_tok_s"] / base["decode_tok_s"]
        v["greedy_match_bf16"] = sum(x == y for x, y in zip(v["tokens"], base["tokens"]))
        v["bytes_vs_bf16"] = v["bytes_per_step"] / base["bytes_per_step"]
    res["q4_vs_bf16_decode"] = res["variants"]["q4-experts+dense"]["vs_bf16_decode"]
    res["q4_experts_vs_bf16_decode"] = res["variants"]["q4-experts"]["vs_bf16_decode"]
    res["goal_q4_vs_bf16_decode"] = 2.5
    if not a.keep and a.checkpoint is None:
        shutil.rmtree(ckpt, ignore_errors=True)
    print(f"{'variant':<18} {'decode tok/s':>12} {'vs bf16':>8} {'bytes/step':>14} {'bytes vs bf16':>13} "
          f"{'greedy=bf16':>11} {'graphs':>9}")
    for name, v in res["variants"].items():
        print(f"{name:<18} {v['decode_tok_s']:>12.1f} {v['vs_bf16_decode']:>8.3f} {v['bytes_per_step']:>14,} "
              f"{v['bytes_vs_bf16']:>13.3f} {v['greedy_match_bf16']:>11} {str(v['decode_graphs']):>9}")
    print(write_out(res, "quant-gpu.json"))


if __name__ == "__main__":
    main()
