"""Issue 15 on the GPU box, one call: bf16 correctness of each new family against transformers bf16 on the same
GPU, and Qwen3.5's long-context prefill with its constant DeltaNet state.

Per family (qwen3_5_moe tiny, qwen3_5_moe at transformers' default text config = the 35B-A3B shape cut to
--layers layers, gpt_oss tiny, deepseek_v3 tiny): random weights rounded to bf16, saved, repacked, then logits of
one --tokens prompt from
  hf16   transformers bf16 (the contract's reference: ||ours - hf16|| / ||hf16|| <= 2e-2),
  hf32   transformers fp32 on the same bf16 weights (the truth both bf16 runs approximate),
  ours   tiered bf16 with its own routing, and `pinned`: tiered bf16 with transformers' bf16 top-k replayed
         (benchmarks/hf_routing.py). Random MoE weights with many experts have near-tied k-th router scores,
         so bf16 rounding flips experts in *any* implementation (`flips`: share of (token, layer) top-k sets
         that differ between hf16 and hf32); `pinned` is the arithmetic alone.
Then on the 35B-A3B-shape layout: prefill tok/s and peak memory (torch.cuda.max_memory_allocated) for
--short-tokens and --long-tokens prompts, and the sequence state's bytes before/after each (the DeltaNet
state is fixed; only the attention layers' KV grows). Reuses bench_qwen35_gpu's builder and prefill probe.

    python3 benchmarks/bench_families_gpu.py                 # H200: ~3-4 min (35B shape: build, save, repack ~40 s)
    python3 benchmarks/bench_families_gpu.py --small         # the same pipeline at CPU sizes (tests it anywhere)

Prints a table, then one JSON line last; writes $OUT/families_gpu.json when OUT is set.
"""
from __future__ import annotations

import argparse
import gc
import shutil
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_qwen35_gpu as q35  # noqa: E402  (puts the repo and tools/ on sys.path)
from benchmeta import git_commit, write_out  # noqa: E402
from hf_routing import Replay, capture, flips  # noqa: E402

import tiered  # noqa: E402
from tiered.layout.repack import repack  # noqa: E402

BF16_TOL = q35.BF16_TOL
log = q35.log


def tiny_config(family: str):
    """A small transformers config of `family` (fast to build; shapes that exercise every path)."""
    import transformers as tf

    common = dict(vocab_size=512, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=4096, rms_norm_eps=1e-6)
    if family == "qwen3_5_moe":
        return tf.Qwen3_5MoeTextConfig(**common, num_hidden_layers=4, head_dim=32, linear_num_key_heads=2,
                                       linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=32,
                                       num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                                       shared_expert_intermediate_size=64)
    if family == "gpt_oss":
        return tf.GptOssConfig(**common, num_hidden_layers=4, intermediate_size=64, num_local_experts=8,
                               num_experts_per_tok=2, head_dim=32, sliding_window=32)
    if family == "deepseek_v3":
        return tf.DeepseekV3Config(**{**common, "num_key_value_heads": 4}, num_hidden_layers=3, intermediate_size=192,
                                   moe_intermediate_size=64, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
                                   topk_group=2, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=64,
                                   kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32)
    raise ValueError(family)


def build_bf16(cfg, device: torch.device, seed: int, perturb_norms: bool):
    """transformers' random model, its weights rounded to bf16 (what the checkpoint stores), on `device`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    if perturb_norms:  # zero-initialised (1 + w) norms and unit dt_bias would leave those paths untested
        with torch.no_grad():
            for n, p in hf.named_parameters():
                if "norm" in n or "dt_bias" in n:
                    p.add_(torch.randn_like(p) * 0.1)
    return hf.eval()


def check_family(name: str, cfg, a, device: torch.device, *, perturb: bool, keep_layout: Path | None = None) -> dict:
    """bf16 logits of one family against transformers on `device` (see the module doc for the four runs)."""
    work = Path(a.work) / name
    shutil.rmtree(work, ignore_errors=True)
    res: dict = {"family": cfg.model_type, "layers": cfg.num_hidden_layers}
    t0 = time.perf_counter()
    hf = build_bf16(cfg, device, a.seed, perturb)
    res["params"] = sum(p.numel() for p in hf.parameters())
    hf.save_pretrained(work / "ckpt", max_shard_size="5GB")
    lay = keep_layout or work / "layout"
    try:
        repack(work / "ckpt", lay, force=True, progress=False)
    except Exception as e:  # a family tiered cannot repack yet: say so, keep going
        res.update(ok=False, error=f"repack: {type(e).__name__}: {e}"[:300])
        return res
    finally:
        shutil.rmtree(work / "ckpt", ignore_errors=True)
    res["build_save_repack_s"] = time.perf_counter() - t0
    top_k = getattr(cfg, "num_experts_per_tok", None) or cfg.experts_per_token
    ids = torch.randint(0, cfg.vocab_size, (a.tokens,), generator=torch.Generator().manual_seed(2)).to(device)
    hf16, r16 = capture(hf, ids, top_k)
    hf.float()  # the same bf16-rounded weights, computed in fp32
    hf32, r32 = capture(hf, ids, top_k)
    del hf
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    res["flips"] = flips(r16, r32) if r16 and len(r16) == len(r32) else float("nan")
    try:
        eng = tiered.load(lay, device=device, dtype="bfloat16", max_context=a.tokens + 8, cuda_graphs=False)
        ours = eng.logits(ids.cpu())
        res["linear_attention"] = eng.model.linear_attn
        del eng
        moe_layers = sum(1 for l in range(cfg.num_hidden_layers) if getattr(cfg, "first_k_dense_replace", 0) <= l)
        pinned = None
        if len(r16) == moe_layers:  # every MoE layer's routing was captured
            eng = tiered.load(lay, device=device, dtype="bfloat16", max_context=a.tokens + 8, cuda_graphs=False,
                              routing=Replay(r16, device))
            pinned = eng.logits(ids.cpu())
            del eng
    except Exception as e:
        res.update(ok=False, error=f"load/run: {type(e).__name__}: {e}"[:300])
        return res
    res["rel_ours_hf16"] = q35.rel(ours, hf16)
    res["rel_pinned_hf16"] = q35.rel(pinned, hf16) if pinned is not None else float("nan")
    res["rel_hf16_hf32"] = q35.rel(hf16, hf32)
    res["rel_ours_hf32"] = q35.rel(ours, hf32)
    res["ok"] = res["rel_ours_hf16"] <= BF16_TOL
    res["ok_pinned"] = res["rel_pinned_hf16"] <= BF16_TOL
    res["wall_s"] = time.perf_counter() - t0
    log(f"{name}: {res}")
    return res


def long_prefill(lay: Path, a, device: torch.device) -> dict:
    """Prefill tok/s, peak memory and state bytes at --short-tokens and --long-tokens on one loaded engine."""
    res: dict = {}
    eng, res["load_s"] = q35.load_ours(lay, device, a.long_tokens + 8)
    cfg = eng.config
    res["kv_bytes_per_token"] = cfg.kv_bytes_per_token(2)
    res["linear_state_bytes_per_sequence"] = cfg.state_bytes_per_sequence(2)
    gen = torch.Generator().manual_seed(3)
    warm = torch.randint(0, cfg.vocab_size, (min(256, a.short_tokens),), generator=gen)
    eng.generate(warm, max_new_tokens=1)  # warm-up
    for n in (a.short_tokens, a.long_tokens):
        ids = torch.randint(0, cfg.vocab_size, (n,), generator=gen)
        res[str(n)] = q35.prefill_once(eng, ids, device)
        log(f"prefill {n}: {res[str(n)]}")
    s, l_ = res[str(a.short_tokens)], res[str(a.long_tokens)]
    res["linear_state_constant"] = (s["linear_state_bytes"] == l_["linear_state_bytes_after"] ==
                                    res["linear_state_bytes_per_sequence"] > 0)
    if "peak_gib" in s:
        res["peak_growth_gib"] = l_["peak_gib"] - s["peak_gib"]
        res["kv_growth_gib"] = (a.long_tokens - a.short_tokens) * res["kv_bytes_per_token"] / 2**30
    del eng
    gc.collect()
    return res


def table(out: dict) -> None:
    print(f"{'model':<22} {'params':>8} {'ours~hf16':>10} {'pinned~hf16':>12} {'hf16~hf32':>10} {'ours~hf32':>10} "
          f"{'flips':>6}  ok(pinned)")
    for name, r in out["families"].items():
        if "error" in r:
            print(f"{name:<22} {r.get('params', 0) / 1e6:>7.0f}M  {r['error']}")
            continue
        print(f"{name:<22} {r['params'] / 1e6:>7.0f}M {r['rel_ours_hf16']:>10.4f} {r['rel_pinned_hf16']:>12.4f} "
              f"{r['rel_hf16_hf32']:>10.4f} {r['rel_ours_hf32']:>10.4f} {r['flips']:>6.2f}  "
              f"{r['ok']}({r['ok_pinned']})")
    p = out.get("prefill")
    if p:
        for n in (str(out["short_tokens"]), str(out["long_tokens"])):
            row = p[n]
            print(f"prefill {n:>6} tok: {row['prefill_tok_s']:.0f} tok/s, peak {row.get('peak_gib', float('nan')):.2f} "
                  f"GiB, state {row['state_bytes_after']} B (DeltaNet {row['linear_state_bytes']} -> "
                  f"{row['linear_state_bytes_after']} B)")
        print(f"DeltaNet state constant: {p['linear_state_constant']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/root/fam"))
    ap.add_argument("--layers", type=int, default=8, help="layers of the 35B-A3B-shape model")
    ap.add_argument("--tokens", type=int, default=128, help="prompt tokens of the logits comparison")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--short-tokens", type=int, default=1024)
    ap.add_argument("--long-tokens", type=int, default=32768)
    ap.add_argument("--families", default="qwen3_5_moe,qwen3_5_moe_35b,gpt_oss,deepseek_v3")
    ap.add_argument("--small", action="store_true", help="CPU sizes (the 35B shape shrunk as in bench_qwen35_gpu)")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not a.small else "cpu")
    if device.type == "cpu":
        a.small = True
        a.short_tokens, a.long_tokens, a.tokens = min(a.short_tokens, 200), min(a.long_tokens, 600), min(a.tokens, 64)
        a.work = Path(str(a.work) + "-small")
    Path(a.work).mkdir(parents=True, exist_ok=True)
    import transformers

    out: dict = {"bench": "families_gpu", "torch": torch.__version__, "transformers": transformers.__version__,
                 "commit": git_commit(),
                 "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 "tolerance": BF16_TOL, "tokens": a.tokens, "short_tokens": a.short_tokens,
                 "long_tokens": a.long_tokens, "fla": q35._fla_importable(), "families": {}}
    t_start = time.perf_counter()
    big = Path(a.work) / "q35_35b_layout"
    for fam in a.families.split(","):
        if fam == "qwen3_5_moe_35b":
            cfg = q35.text_config(a.small, a.layers)
            cfg.max_position_embeddings = max(cfg.max_position_embeddings, a.long_tokens + 64)
            out["families"][f"qwen3_5_moe_35b_{a.layers}L"] = check_family(fam, cfg, a, device, perturb=False,
                                                                           keep_layout=big)
        else:
            out["families"][fam] = check_family(fam, tiny_config(fam), a, device, perturb=fam.startswith("qwen"))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if (big / "manifest.json").is_file():
        out["prefill"] = long_prefill(big, a, device)
    out["wall_s"] = time.perf_counter() - t_start
    table(out)
    print(write_out(out, "families_gpu.json"))


if __name__ == "__main__":
    main()
