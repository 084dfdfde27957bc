"""gpt-oss in VRAM: its experts through the fused kernels (decode) and the grouped kernels (prefill) against the
torch expert path, same run.

gpt-oss's experts have biases and a clamped SwiGLU. Until session 30 the decode kernels computed the plain SwiGLU
only, so a gpt-oss token took model/moe.py's torch path: the K experts gathered into new tensors every layer
(quantized ones dequantized into bf16 copies), then GEMVs over the copies. Now moe_decode (bf16) and quant_moe
(mxfp4, q4, ...) read each expert in place with the biases and the clamp inside. This times both in one process
per layout: the default engine (kernels) and `kernels=False` (the torch expert path, what gpt-oss ran before).

From a random bf16 checkpoint of the gpt-oss-20b widths cut to 4 layers (tools/make_random_checkpoint.py
gpt-oss-20b-4l: hidden 2880, 32 experts top-4 of FFN 2880, 64 q / 8 kv heads, sliding and full layers alternating),
repacked with `--experts source` (bf16), `--experts mxfp4` (gpt-oss's own format) and `--experts q4`: per layout and
path (for the quantized layouts also the kernels under other tiles, TILES, through TIERED_QCONFIG), the prefill
tok/s of each --prefill-tokens prompt (the experts' grouped kernels, with the biases and the clamp since session 31,
against the torch path that dequantized each quantized expert; on CUDA replayed from the prefill graphs, eagerly,
and eagerly with TIERED_SINK_ATTN=naive: the sinks' plain-matmul attention instead of flash, session 32), greedy
decode tok/s (median of --repeats after a
warm-up: graphs captured, kernels compiled) of --new tokens after a --prompt-tokens prompt of random ids; the bytes
one step reads (dense + K expert blocks a layer) over the measured HBM read rate as the bound; whether the two
paths' greedy tokens agree (random weights give near-ties: informative, the CUDA tests check equality on the
trained-shape tiny model).

    python3 benchmarks/bench_gpt_oss_gpu.py --work /root/bench-gptoss     # GPU box: about 2-3 minutes
    python3 benchmarks/bench_gpt_oss_gpu.py --small --work /tmp/bgo       # the same pipeline, tiny, CPU

Prints a table, then one JSON line last; writes $OUT/gpt_oss_gpu.json when OUT is set.
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
sys.path.insert(0, str(REPO / "benchmarks"))
from benchmeta import git_commit, write_out  # noqa: E402
from bench_quant_gpu import step_bytes  # noqa: E402 (dense + K whole expert blocks a layer)


def log(msg: str) -> None:
    print(f"[gpt-oss] {msg}", file=sys.stderr, flush=True)


# Tiles tried beside the defaults at the gpt-oss-20b widths (D = F = 2880, K = 4; no TUNED entry for that shape,
# so the format's default, the grouped tile, serves it): the flat tile (algo 1) at the 397B-shape q4 picks, and for
# q4 the word tile (algo 2) at the 10.6B-shape picks. Set through TIERED_QCONFIG for one engine.
TILES = {
    "flat": "gate_up,{f},2880,2880:bn=4,bg=32,warps=4,algo=1;down,{f},2880,2880:bn=8,bg=16,warps=4,algo=1",
    "word": "gate_up,{f},2880,2880:bn=8,bg=16,warps=4,algo=2;down,{f},2880,2880:bn=8,bg=16,warps=8,algo=2,hw=1",
}


def run_path(lay_dir: Path, device: str, ids: list[int], new: int, repeats: int, kernels: bool | None,
             tiles: str | None = None, longs: list[list[int]] | None = None) -> dict:
    import os

    import tiered
    from tiered.store.disk import Layout

    os.environ.pop("TIERED_QCONFIG", None)
    if tiles:
        os.environ["TIERED_QCONFIG"] = tiles
    ctx = max([len(ids) + new] + [len(x) + 1 for x in longs or []]) + 16
    eng = tiered.load(lay_dir, device=device, max_context=ctx, kernels=kernels)
    eng.generate(ids, max_new_tokens=new, stop_at_eos=False)  # warm-up: kernels compiled, graphs captured
    runs, g = [], None
    for _ in range(repeats):
        g = eng.generate(ids, max_new_tokens=new, stop_at_eos=False)
        runs.append(g.stats["decode_tok_s"])
    lay = Layout.open(lay_dir)
    step = step_bytes(lay)
    out = {"decode_tok_s": statistics.median(runs), "runs": runs, "prefill_tok_s": g.stats["prefill_tok_s"],
           "decode_graphs": g.stats.get("decode_graphs"), "attention": g.stats.get("attention"),
           "tokens": g.token_ids, "bytes_per_step": step, "block_size": lay.block_size}
    for i, long_ids in enumerate(longs or []):  # prefill: a long prompt, one new token (past decode_max_t: grouped)
        graphs = eng.prefill_graphs
        for _ in range(2):  # warm-up: eager, then (with prefill graphs) the bucket's capture
            eng.generate(long_ids, max_new_tokens=1, stop_at_eos=False)
        pre = [eng.generate(long_ids, max_new_tokens=1, stop_at_eos=False).stats["prefill_tok_s"]
               for _ in range(repeats)]
        r = {"tokens": len(long_ids), "prefill_tok_s": statistics.median(pre), "runs": pre,
             "prefill_graphs": eng.stats.get("prefill_graphs")}
        if graphs is not None:  # the same prompt eagerly, in the same process
            eng.prefill_graphs = None
            eager = [eng.generate(long_ids, max_new_tokens=1, stop_at_eos=False).stats["prefill_tok_s"]
                     for _ in range(repeats)]
            r["eager_tok_s"] = statistics.median(eager)
            r["eager_runs"] = eager
        if device == "cuda":  # eagerly again on the plain sink path (TIERED_SINK_ATTN=naive: scores in memory)
            eng.prefill_graphs = None
            os.environ["TIERED_SINK_ATTN"] = "naive"
            try:
                naive = [eng.generate(long_ids, max_new_tokens=1, stop_at_eos=False).stats["prefill_tok_s"]
                         for _ in range(repeats)]
            finally:
                os.environ.pop("TIERED_SINK_ATTN", None)
            r["eager_naive_sinks_tok_s"] = statistics.median(naive)
        eng.prefill_graphs = graphs
        log(f"prefill of {len(long_ids)} tokens: {r['prefill_tok_s']:.0f} tok/s"
            + "".join(f", {k} {r[k]:.0f}" for k in ("eager_tok_s", "eager_naive_sinks_tok_s") if k in r))
        out.setdefault("long_prefills", []).append(r)
        if i == 0:  # the first long prompt under the keys of earlier sessions
            out["long_prefill_tok_s"], out["long_prefill_runs"] = r["prefill_tok_s"], pre
            out["long_prefill_tokens"], out["prefill_graphs"] = len(long_ids), r["prefill_graphs"]
            if "eager_tok_s" in r:
                out["long_prefill_eager_tok_s"] = r["eager_tok_s"]
    del eng
    os.environ.pop("TIERED_QCONFIG", None)
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/tiered-bench-gptoss"))
    ap.add_argument("--preset", default=None, help="make_random_checkpoint preset (default gpt-oss-20b-4l; "
                                                   "gpt-oss-tiny with --small)")
    ap.add_argument("--experts", default="source,mxfp4,q4",
                    help="comma list of repack --experts formats, each optionally +DENSE (--dense), e.g. q4+q4")
    ap.add_argument("--tiles", default="flat,word", help="other tiles timed beside the defaults for quantized experts "
                    "(comma list of TILES keys; word: q4 only; empty: none)")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--prefill-tokens", default="512",
                    help="comma-separated lengths of the long prompts whose prefill is timed, graphed and eager, on "
                         "the synchronised clock (0 or empty: none)")
    ap.add_argument("--no-torch", action="store_true", help="time the kernels only (no torch expert path)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and layouts in --work (for llama.cpp)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--small", action="store_true", help="tiny shape on the CPU (tests this script anywhere)")
    a = ap.parse_args()
    from make_random_checkpoint import make

    from tiered.layout.repack import repack

    device = "cpu" if a.small or not torch.cuda.is_available() else "cuda"
    preset = a.preset or ("gpt-oss-tiny" if a.small else "gpt-oss-20b-4l")
    new, repeats = (4, 1) if a.small else (a.new, a.repeats)
    ck = a.work / "ck"
    shutil.rmtree(a.work, ignore_errors=True)
    a.work.mkdir(parents=True)
    t0 = time.perf_counter()
    # the embedded model's tokenizer (8,192 ids, inside gpt-oss's vocabulary): llama.cpp's converter needs one
    tok = REPO / "tiered" / "data" / "olmoe-code-17m" if not a.small else None
    made = make(preset, ck, seed=a.seed, device=device, tokenizer=tok)
    log(f"checkpoint {preset}: {made['params'] / 1e9:.2f}B params in {time.perf_counter() - t0:.1f} s")
    res = {"bench": "gpt_oss_gpu", "date": time.strftime("%Y-%m-%d"), "commit": git_commit(),
           "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "preset": preset,
           "params": made["params"], "prompt_tokens": a.prompt_tokens, "new_tokens": new, "layouts": {}}
    if device == "cuda":
        from bench_moe_kernels import hbm_read_gbps

        res["hbm_read_gbps"] = hbm_read_gbps()
    g = torch.Generator().manual_seed(a.seed + 1)
    for spec in a.experts.split(","):
        fmt, _, dense = spec.partition("+")
        lay = a.work / f"layout-{spec}"
        t0 = time.perf_counter()
        repack(ck, lay, experts=fmt, dense=dense or "source", progress=False,
               **({"quant_device": "cuda"} if device == "cuda" else {}))
        log(f"repack --experts {fmt} --dense {dense or 'source'}: {time.perf_counter() - t0:.1f} s")
        from tiered.store.disk import Layout

        vocab = Layout.open(lay).config.vocab_size
        ids = torch.randint(0, vocab, (a.prompt_tokens,), generator=g).tolist()
        lens = [int(x) for x in str(a.prefill_tokens).split(",") if x and int(x) > 0]
        lens = [min(n, 24) for n in lens] if a.small else lens
        longs = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]
        n_long = lens[0] if lens else 0
        row = {}
        paths = [("kernels", None, None)] + ([] if a.no_torch else [("torch_experts", False, None)])
        if fmt in ("mxfp4", "q4", "q8") and device == "cuda":
            paths += [(f"kernels_{t}", None, TILES[t].format(f=fmt)) for t in a.tiles.split(",") if t
                      and (t != "word" or fmt == "q4")]
        for name, kernels, tiles in paths:
            row[name] = run_path(lay, device, ids, new, repeats, kernels, tiles, None if tiles else longs)
            if tiles:
                row[name]["tiles"] = tiles
            log(f"{spec} {name}: {row[name]['decode_tok_s']:.1f} tok/s")
        k, t = row["kernels"], row.get("torch_experts")
        if t is not None:
            row["kernels_vs_torch_experts"] = k["decode_tok_s"] / t["decode_tok_s"]
            row["greedy_tokens_agree"] = sum(x == y for x, y in zip(k["tokens"], t["tokens"]))
            if longs:
                row["prefill_kernels_vs_torch_experts"] = k["long_prefill_tok_s"] / t["long_prefill_tok_s"]
        if "hbm_read_gbps" in res:
            bound = res["hbm_read_gbps"]["read_gbps"] * 1e9 / k["bytes_per_step"]
            row["hbm_bound_tok_s"] = bound
            row["kernels_vs_hbm_bound"] = k["decode_tok_s"] / bound
        row["experts"], row["dense"] = fmt, dense or "source"
        res["layouts"][spec] = row
    print(f"{'layout':<10} {'kernels tok/s':>14} {'torch tok/s':>12} {'ratio':>7} {'bytes/step':>14} {'vs HBM':>7} "
          f"{'agree':>6}")
    nan = float("nan")
    for fmt, r in res["layouts"].items():
        t = r.get("torch_experts", {})
        print(f"{fmt:<10} {r['kernels']['decode_tok_s']:>14.1f} {t.get('decode_tok_s', nan):>12.1f} "
              f"{r.get('kernels_vs_torch_experts', nan):>7.2f} {r['kernels']['bytes_per_step']:>14,} "
              f"{r.get('kernels_vs_hbm_bound', nan):>7.3f} {r.get('greedy_tokens_agree', -1):>3}/{new}")
    if not a.no_torch and any("long_prefill_tok_s" in r["kernels"] for r in res["layouts"].values()):
        print(f"prefill of {n_long} tokens, tok/s: " + ", ".join(
            f"{fmt} kernels {r['kernels']['long_prefill_tok_s']:.0f} / torch "
            f"{r['torch_experts']['long_prefill_tok_s']:.0f} ({r['prefill_kernels_vs_torch_experts']:.2f}x)"
            for fmt, r in res["layouts"].items()))
    for fmt, r in res["layouts"].items():
        for p in r["kernels"].get("long_prefills", []):
            print(f"  {fmt} prefill of {p['tokens']} tokens: {p['prefill_tok_s']:.0f} tok/s"
                  + (f" (graphs) against eager {p['eager_tok_s']:.0f} ({p['prefill_tok_s'] / p['eager_tok_s']:.2f}x; "
                     f"{p['prefill_graphs']})" if "eager_tok_s" in p else " (eager)")
                  + (f"; eager on the plain sink path {p['eager_naive_sinks_tok_s']:.0f}"
                     if "eager_naive_sinks_tok_s" in p else ""))
    for r in res["layouts"].values():
        for k, v in list(r.items()):
            if k.startswith("kernels_") and isinstance(v, dict):
                print(f"  {k}: {v['decode_tok_s']:.1f} tok/s ({v['decode_tok_s'] / r['kernels']['decode_tok_s']:.3f}x "
                      "the default tiles)")
            if isinstance(v, dict):
                v.pop("tokens", None)
    if not a.small and not a.keep:
        shutil.rmtree(a.work, ignore_errors=True)
    print(write_out(res, "gpt_oss_gpu.json"))


if __name__ == "__main__":
    main()
