"""Qwen3.5-MoE on the GPU box (issue 15): correctness in bf16, decode in VRAM, long-context prefill.

Three parts, each one 600-s device call (run them in this order on one warm machine: `decode` leaves the layout
under --work for `prefill`; each part builds it again when it is missing):

  tiny     bf16 logits of a tiny hybrid Qwen3.5-MoE (4 layers: 3 Gated DeltaNet + 1 gated attention, grouped
           value heads) within 2e-2 relative of transformers bf16 on the same GPU: a 150-token prefill, and a
           prefill of 100 + 8 one-token steps; with fla importable, also fla against our torch DeltaNet.
  decode   transformers' default Qwen3.5-MoE text config (the 35B-A3B shape: hidden 2048, 256 experts, top-8,
           expert FFN 512, 16 q / 2 kv heads of 256, DeltaNet 16 k / 32 v heads of 128) cut to 8 layers (6 DeltaNet,
           2 attention), random bf16 weights made on the GPU with transformers, saved, repacked, every expert in
           VRAM: batch-1 greedy decode tok/s (64-token prompt, 64 new tokens; CUDA graphs) against transformers'
           own `generate` on the same weights (which uses fla when it imports), and the prompt's logits.
  prefill  the same model: prefill tok/s and peak GPU memory for an 8k and a 32k-token prompt (chunks of 512), and
           the sequence-state bytes before and after: the DeltaNet state must not grow with the prompt (only the
           KV rows of the 2 attention layers do). transformers' prefill of the 8k prompt is measured beside it.

    python3 benchmarks/bench_qwen35_gpu.py --part tiny                      # ~1 min
    python3 benchmarks/bench_qwen35_gpu.py --part decode --work /root/q35   # ~4 min (build 1, save + repack 2)
    python3 benchmarks/bench_qwen35_gpu.py --part prefill --work /root/q35  # ~3 min with the layout kept
    python3 benchmarks/bench_qwen35_gpu.py --part all --small               # the whole pipeline, tiny, on a CPU

Prints a table, then one JSON line last; writes $OUT/qwen35_<part>.json when OUT is set.
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

import tiered  # noqa: E402

BF16_TOL = 2e-2  # CONTRACTS: ||a-b|| / ||b|| on bf16 logits against transformers on the same GPU


def log(msg: str) -> None:
    print(f"[qwen35-gpu] {msg}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


def text_config(small: bool, layers: int):
    """transformers' default Qwen3.5-MoE text config (the 35B-A3B shape) with `layers` layers; --small: a CPU size."""
    from transformers import Qwen3_5MoeTextConfig

    kw = dict(num_hidden_layers=layers, max_position_embeddings=40960)
    if small:
        kw.update(vocab_size=1024, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                  num_experts=16, num_experts_per_tok=4, moe_intermediate_size=32, shared_expert_intermediate_size=32)
    kw["layer_types"] = ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(layers)]
    return Qwen3_5MoeTextConfig(**kw)


def build_hf(cfg, device: torch.device, seed: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.eval()
    sync(device)
    return model, time.perf_counter() - t0


def ensure_layout(a, device: torch.device, hf=None) -> tuple[Path, dict, object]:
    """The 8-layer layout under --work (built from `hf`, or a fresh random model, when missing)."""
    from tiered.layout.repack import repack

    work = Path(a.work)
    lay = work / "layout"
    info: dict = {}
    if (lay / "manifest.json").is_file() and hf is None:
        info["layout"] = "reused"
        return lay, info, None
    if hf is None:
        hf, info["init_s"] = build_hf(text_config(a.small, a.layers), device, a.seed)
    ck = work / "ckpt"
    shutil.rmtree(ck, ignore_errors=True)
    t0 = time.perf_counter()
    hf.save_pretrained(ck, max_shard_size="5GB")
    info["save_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    repack(ck, lay, force=True, progress=False)
    info["repack_s"] = time.perf_counter() - t0
    if getattr(a, "llama_bin", None):  # the same weights as a bf16 GGUF, before the checkpoint goes
        info["llama_gguf"] = to_gguf(a, ck, work / "model-bf16.gguf")
    shutil.rmtree(ck, ignore_errors=True)  # the disk holds one copy at a time
    log(f"saved in {info['save_s']:.1f}s, repacked in {info['repack_s']:.1f}s -> {lay}")
    return lay, info, hf


def to_gguf(a, ck: Path, gguf: Path) -> dict:
    """The saved checkpoint -> a bf16 GGUF with llama.cpp's converter (tools/convert_gguf.py; the reference model's
    tokenizer is copied in, since a random checkpoint has none and the converter needs one; `--no-mtp`: it has no
    multi-token-prediction block either)."""
    from bench_peers import run_tool
    from make_random_checkpoint import copy_tokenizer

    copy_tokenizer(REPO / "tiered" / "data" / "olmoe-code-17m", ck)
    t0 = time.perf_counter()
    run_tool([sys.executable, REPO / "tools" / "convert_gguf.py", "--llama-dir", a.llama_src, ck,
              "--outtype", "bf16", "--no-mtp", "--outfile", gguf], Path(a.work) / "convert.log", timeout=400)
    return {"path": str(gguf), "bytes": gguf.stat().st_size, "convert_s": time.perf_counter() - t0}


def llama_decode(a, gguf: Path) -> dict:
    """llama-bench tg (batch-1 decode, every layer on the GPU, flash attention) on the GGUF: tok/s."""
    from bench_peers import parse_llama_bench, run_tool

    exe = Path(a.llama_bin) / "llama-bench"
    if not exe.is_file():
        raise SystemExit(f"no llama-bench in {a.llama_bin}: build llama.cpp (tools/build_llamacpp.sh) or drop --llama-bin")
    out = run_tool([exe, "-m", gguf, "-ngl", "99", "-fa", "1", "-p", "0", "-n", str(a.new_tokens), "-r", "3",
                    "-o", "jsonl"], Path(a.work) / "llama-bench.log", timeout=300)
    r = parse_llama_bench(out)
    return {"tg_tok_s": r.get("tg_tok_s"), "tg_tokens": r.get("tg_tokens"), "build_commit": r.get("build_commit"),
            "model_type": r.get("model_type"), "model_size": r.get("model_size"), "backends": r.get("backends")}


def load_ours(path: Path, device: torch.device, ctx: int, **kw):
    t0 = time.perf_counter()
    eng = tiered.load(path, device=device, dtype="bfloat16", max_context=ctx, **kw)
    sync(device)
    return eng, time.perf_counter() - t0


# --- tiny: bf16 correctness ---

def part_tiny(a, device: torch.device) -> dict:
    from transformers import AutoModelForCausalLM, Qwen3_5MoeTextConfig

    from tiered.model.deltanet import fla_available
    from tiered.layout.repack import repack

    cfg = Qwen3_5MoeTextConfig(vocab_size=512, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
                               linear_key_head_dim=32, linear_value_head_dim=32, num_experts=8, num_experts_per_tok=2,
                               moe_intermediate_size=64, shared_expert_intermediate_size=64)
    torch.manual_seed(a.seed)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # zero-initialised (1 + w) norms would leave the offset untested
        for n, p in hf.named_parameters():
            if "norm" in n or "dt_bias" in n:
                p.add_(torch.randn_like(p) * 0.1)
    work = Path(a.work) / "tiny"
    shutil.rmtree(work, ignore_errors=True)
    hf.to(torch.bfloat16).save_pretrained(work / "ckpt")
    repack(work / "ckpt", work / "layout", progress=False)
    hf = hf.to(device).eval()
    ids = torch.randint(0, cfg.vocab_size, (150,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids[None].to(device)).logits[0].float()
    res: dict = {"fla": fla_available(device)}
    backends = ["torch"] + (["fla"] if res["fla"] else [])
    for be in backends:
        eng, _ = load_ours(work / "layout", device, 256, cuda_graphs=False)
        if be != eng.model.linear_attn:
            eng.model.linear_attn = be
        full = eng.logits(ids)
        m = eng.model
        steps = [m.forward(ids[:100].to(device), 0, all_logits=True)]
        steps += [m.forward(ids[i:i + 1].to(device), i) for i in range(100, 108)]
        inc = torch.cat(steps).float()
        res[f"{be}_prefill_rel"] = rel(full, ref)
        res[f"{be}_incremental_rel"] = rel(inc, ref[:108])
        res[f"{be}_ok"] = res[f"{be}_prefill_rel"] <= BF16_TOL and res[f"{be}_incremental_rel"] <= BF16_TOL
        if be == "fla":
            res["fla_vs_torch_rel"] = rel(full, res.pop("_torch_full"))
        else:
            res["_torch_full"] = full
        del eng
    res.pop("_torch_full", None)
    res["ok"] = all(res[f"{be}_ok"] for be in backends)
    return res


# --- decode in VRAM ---

def hf_generate_s(model, ids: torch.Tensor, new: int, device: torch.device) -> tuple[float, list[int]]:
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids[None], max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                             eos_token_id=None)
    sync(device)
    return time.perf_counter() - t0, out[0, ids.numel():].tolist()


def part_decode(a, device: torch.device) -> dict:
    res: dict = {}
    hf, res["init_s"] = build_hf(text_config(a.small, a.layers), device, a.seed)
    res["params"] = sum(p.numel() for p in hf.parameters())
    log(f"built {res['params'] / 1e9:.2f}B params in {res['init_s']:.1f}s")
    lay, info, _ = ensure_layout(a, device, hf)
    res.update(info)
    ids = torch.randint(0, hf.config.vocab_size, (a.prompt_tokens,), generator=torch.Generator().manual_seed(2))
    n = a.new_tokens
    if not a.skip_hf:
        hf_generate_s(hf, ids.to(device), 4, device)  # warm-up
        dec = []
        for _ in range(a.hf_repeats):
            t1, _ = hf_generate_s(hf, ids.to(device), 1, device)
            tn, hf_toks = hf_generate_s(hf, ids.to(device), n, device)
            dec.append((n - 1) / max(tn - t1, 1e-9))
        res["transformers_decode_tok_s"] = statistics.median(dec)
        res["transformers_runs"] = dec
        res["transformers_fla"] = _fla_importable()
        with torch.no_grad():
            hf_logits = hf(ids[None].to(device)).logits[0].float().cpu()
    del hf
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    eng, res["load_s"] = load_ours(lay, device, a.prompt_tokens + n + 16)
    res["linear_attention"] = eng.model.linear_attn
    if not a.skip_hf:
        ours = eng.logits(ids).cpu()
        res["prompt_logits_rel_err"] = rel(ours, hf_logits)
    eng.generate(ids, max_new_tokens=n, stop_at_eos=False)  # warm-up, captures the graphs
    runs = []
    for _ in range(a.repeats):
        g = eng.generate(ids, max_new_tokens=n, stop_at_eos=False)
        runs.append(g.stats["decode_tok_s"])
    res["tiered_decode_tok_s"] = statistics.median(runs)
    res["tiered_runs"] = runs
    res["decode_graphs"] = g.stats.get("decode_graphs")
    res["delta_step"] = g.stats.get("delta_step")
    if res["delta_step"] == "triton" and res["linear_attention"] == "fla":  # measured against fla's one-token kernel
        del eng
        gc.collect()
        torch.cuda.empty_cache()
        eng, _ = load_ours(lay, device, a.prompt_tokens + n + 16, delta_step="fla")
        eng.generate(ids, max_new_tokens=n, stop_at_eos=False)
        fla_runs = [eng.generate(ids, max_new_tokens=n, stop_at_eos=False).stats["decode_tok_s"]
                    for _ in range(a.repeats)]
        res["tiered_fla_step_decode_tok_s"] = statistics.median(fla_runs)
        res["fused_step_vs_fla_step"] = res["tiered_decode_tok_s"] / res["tiered_fla_step_decode_tok_s"]
    if "llama_gguf" in res:
        del eng
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        try:
            res["llamacpp"] = llama_decode(a, Path(res["llama_gguf"]["path"]))
            res["ratio_vs_llamacpp"] = res["tiered_decode_tok_s"] / res["llamacpp"]["tg_tok_s"]
        except Exception as e:  # noqa: BLE001 - recorded: the comparison is reported as not run, with why
            res["llamacpp"] = {"error": f"{type(e).__name__}: {e}"[-2000:]}
        Path(res["llama_gguf"]["path"]).unlink(missing_ok=True)
    if not a.skip_hf:
        res["ratio_vs_transformers"] = res["tiered_decode_tok_s"] / res["transformers_decode_tok_s"]
        same = next((i for i, (x, y) in enumerate(zip(g.token_ids, hf_toks)) if x != y), len(hf_toks))
        res["greedy_tokens_matching_prefix"] = same  # random weights: near-ties may split the paths
    return res


def _fla_importable() -> bool:
    try:
        import fla  # noqa: F401
    except Exception:
        return False
    return True


# --- long-context prefill ---

def prefill_once(eng, ids: torch.Tensor, device: torch.device) -> dict:
    st = eng.model.state
    before = st.nbytes()
    lin_before = 0 if st.linear is None else st.linear.conv.nbytes + st.linear.recurrent.nbytes
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    g = eng.generate(ids, max_new_tokens=1, stop_at_eos=False)
    out = {"tokens": int(ids.numel()), "prefill_tok_s": g.stats["prefill_tok_s"],
           "state_bytes_before": before, "state_bytes_after": st.nbytes(),
           "linear_state_bytes": lin_before,
           "linear_state_bytes_after": 0 if st.linear is None else st.linear.conv.nbytes + st.linear.recurrent.nbytes}
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["peak_over_resident_gib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
    return out


def hf_prefill(hf, ids: torch.Tensor, device: torch.device) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        hf(ids[None].to(device), logits_to_keep=1, use_cache=True)
    sync(device)
    out = {"tokens": int(ids.numel()), "prefill_tok_s": ids.numel() / (time.perf_counter() - t0)}
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def part_prefill(a, device: torch.device) -> dict:
    res: dict = {}
    lay, info, hf = ensure_layout(a, device)
    res.update(info)
    long = a.long_tokens
    eng, res["load_s"] = load_ours(lay, device, long + 8)
    cfg = eng.config
    res["kv_bytes_per_token"] = cfg.kv_bytes_per_token(2)
    res["linear_state_bytes_per_sequence"] = cfg.state_bytes_per_sequence(2)
    gen = torch.Generator().manual_seed(3)
    rows = {}
    eng.generate(torch.randint(0, cfg.vocab_size, (min(1024, a.short_tokens),), generator=gen), max_new_tokens=1)
    for n in (a.short_tokens, long):
        ids = torch.randint(0, cfg.vocab_size, (n,), generator=gen)
        rows[str(n)] = prefill_once(eng, ids, device)
        log(f"tiered prefill {n}: {rows[str(n)]}")
    res["tiered"] = rows
    s, l_ = rows[str(a.short_tokens)], rows[str(long)]
    res["linear_state_constant"] = (s["linear_state_bytes"] == l_["linear_state_bytes"] ==
                                    l_["linear_state_bytes_after"] == res["linear_state_bytes_per_sequence"]
                                    if eng.model.state.linear is not None else None)
    if "peak_gib" in s:  # what the longer prompt costs beyond the shorter one, against the KV it must add
        res["peak_growth_gib"] = l_["peak_gib"] - s["peak_gib"]
    del eng
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not a.skip_hf:
        if hf is None:
            hf, res["hf_init_s"] = build_hf(text_config(a.small, a.layers), device, a.seed)
            log("transformers' model rebuilt from the same seed (its weights equal the layout's)")
        ids = torch.randint(0, cfg.vocab_size, (a.short_tokens,), generator=torch.Generator().manual_seed(4))
        hf_prefill(hf, ids[:256], device)  # warm-up
        res["transformers"] = {str(a.short_tokens): hf_prefill(hf, ids, device)}
        res["transformers_fla"] = _fla_importable()
    return res


def table(out: dict) -> None:
    p = out["parts"]
    print(f"{'part':<9} {'metric':<44} value")
    for name, r in p.items():
        for k, v in r.items():
            if isinstance(v, (dict, list)):
                continue
            print(f"{name:<9} {k:<44} {v:.4g}" if isinstance(v, float) else f"{name:<9} {k:<44} {v}")
        for n, row in (r.get("tiered") or {}).items():
            print(f"{name:<9} tiered prefill {n:>6} tok: {row['prefill_tok_s']:.0f} tok/s, peak "
                  f"{row.get('peak_gib', float('nan')):.2f} GiB, DeltaNet state {row['linear_state_bytes']} -> "
                  f"{row['linear_state_bytes_after']} B")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["tiny", "decode", "prefill", "all"], required=True)
    ap.add_argument("--work", type=Path, default=Path("/root/q35"))
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hf-repeats", type=int, default=3)
    ap.add_argument("--short-tokens", type=int, default=8192)
    ap.add_argument("--long-tokens", type=int, default=32000)
    ap.add_argument("--skip-hf", action="store_true", help="skip transformers in decode/prefill")
    ap.add_argument("--small", action="store_true", help="tiny shapes on the CPU (tests this script anywhere)")
    ap.add_argument("--llama-bin", default=None,
                    help="decode: also convert the model to a bf16 GGUF and time llama-bench tg from this folder")
    ap.add_argument("--llama-src", default=str(REPO / ".carry" / "llama.cpp"),
                    help="llama.cpp source (its convert_hf_to_gguf.py), with --llama-bin")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not a.small else "cpu")
    if device.type == "cpu" and not a.small:
        log("no CUDA device: running the --small pipeline on the CPU")
        a.small = True
    if a.small:
        a.short_tokens, a.long_tokens = min(a.short_tokens, 300), min(a.long_tokens, 700)
        a.new_tokens, a.repeats, a.hf_repeats = min(a.new_tokens, 8), 1, 1
        a.work = Path(str(a.work) + "-small")
    Path(a.work).mkdir(parents=True, exist_ok=True)
    env = {"torch": torch.__version__, "commit": git_commit(),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    parts = ["tiny", "decode", "prefill"] if a.part == "all" else [a.part]
    out: dict = {"bench": "qwen35_gpu", "small": a.small, "layers": a.layers, **env, "parts": {}}
    t_start = time.perf_counter()
    for p in parts:
        t0 = time.perf_counter()
        out["parts"][p] = {"tiny": part_tiny, "decode": part_decode, "prefill": part_prefill}[p](a, device)
        out["parts"][p]["wall_s"] = time.perf_counter() - t0
        log(f"part {p} done in {out['parts'][p]['wall_s']:.0f}s")
    out["wall_s"] = time.perf_counter() - t_start
    table(out)
    print(write_out(out, f"qwen35_{a.part}.json"))


if __name__ == "__main__":
    main()
