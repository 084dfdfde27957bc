"""The peer benchmark: tiered against llama.cpp on the same random Qwen3-MoE, same box, same lease.

The model is the 10.6B shape with 8 layers (preset qwen3-10b-8l: 5.6B parameters, 11.2 GB in bf16), made by
tools/make_random_checkpoint.py with the reference model's tokenizer copied in (ids below 8192 are real tokens).
State lives under --work (default /root/peers), so that each phase fits one 600-s device call and later calls
reuse what earlier ones made (files under /root survive while the box stays warm):

  --phase model   checkpoint -> GGUF bf16 (llama.cpp's convert_hf_to_gguf.py through tools/convert_gguf.py,
                  which answers its pre-tokenizer check with "qwen2") -> GGUF Q4_0 (llama-quantize; the tensors
                  it kept at another type are recorded from its log) -> tiered layout (`python3 -m tiered repack`).
                  Each step is skipped when its output exists; outputs appear only when complete.
  --phase llama   llama-bench -ngl 99 -p 512 -n 128 on bf16 and Q4_0 (all on GPU); bf16 with experts on the CPU
                  (-ngl 99 -ot exps=CPU -t 16); llama-batched-bench at B = 1, 8, 32, 128 with 64-token prompts,
                  all on GPU and experts on CPU. Outputs are read from -o jsonl / --output-format jsonl.
  --phase tiered  HBM read bandwidth (a reduction over a few GiB: reads only), then tiered through
                  tiered.load(...).generate(...), in VRAM and at --vram-gb 4: prefill of a 512-token prompt
                  (first call after load, then warm), decode tok/s for 32 and 256 new tokens after a 64-token prompt.
  --phase report  combines the three into peers-DATE-DEVICE.json with, per model, decode_vs_llamacpp,
                  prefill_vs_llamacpp and decode_vs_hbm_bound (ratios, tiered / other) beside the raw figures.
  --phase all     the four in order.

    bash tools/build_llamacpp.sh && python3 benchmarks/bench_peers.py --phase model     # GPU box
    python3 benchmarks/bench_peers.py --phase llama
    python3 benchmarks/bench_peers.py --phase tiered
    python3 benchmarks/bench_peers.py --phase report
    python3 benchmarks/bench_peers.py --phase all --tiny --device cpu --llama-bin /tmp/lbcpu/bin --work /tmp/pw
        # the whole pipeline on a CPU, tiny model, CPU build of llama.cpp (checks every parser and path)

Each phase prints a table, then one JSON line last, and writes its JSON under $OUT when set (model.json,
llama.json, tiered.json, peers-DATE-DEVICE.json).

On the GPU box (one lease, calls back to back so that /root survives; carry [".carry/llama.cpp"], made here by
tools/fetch_llamacpp.sh; set TIERED_COMMIT since the box has no .git):
  1. bash tools/build_llamacpp.sh && python3 benchmarks/bench_peers.py --phase model    (~4 + ~3 min)
  2. python3 benchmarks/bench_peers.py --phase llama                                     (~3-5 min)
  3. python3 benchmarks/bench_peers.py --phase tiered && ... --phase report              (~3 min)
Every step is idempotent: a call cut at its time limit is simply made again.
Another tiered layout of the same checkpoint (e.g. quantized experts):
  python3 benchmarks/bench_peers.py --phase model --variant q4 --repack-args "--experts q4 --dense q4"
  python3 benchmarks/bench_peers.py --phase tiered --variant q4     # then --phase report compares it with Q4_0
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
from benchmeta import git_commit, write_out  # noqa: E402

GB = 1e9
GiB = 1 << 30
PHASES = ("model", "llama", "tiered", "report")

# Sizes of the real run (GPU box) and of the --tiny pipeline check (CPU).
FULL = dict(preset="qwen3-10b-8l", pp=512, tg=128, reps=5, cpu_reps=3, batch=(1, 8, 32, 128), bb_pp=64, bb_tg=32,
            threads=16, short=32, long=256, decode_prompt=64, prefill=512, repeats=3, hbm_gib=4.0, vram_gb=4.0)
TINY = dict(preset="qwen3-peers-tiny", pp=64, tg=16, reps=2, cpu_reps=2, batch=(1, 2, 4), bb_pp=16, bb_tg=8,
            threads=2, short=8, long=32, decode_prompt=16, prefill=64, repeats=2, hbm_gib=0.25, vram_gb=None)


def log(msg: str) -> None:
    print(f"[peers] {msg}", file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    """A step that cannot run (missing input, no disk space, a tool that failed); the message says what to do."""


# --- files and disk ----------------------------------------------------------------------------------------
class Paths:
    """Everything under the work dir; outputs are written to NAME.tmp and renamed when complete."""

    def __init__(self, work: Path, variant: str = "bf16") -> None:
        self.work = work
        self.variant = variant
        self.ckpt = work / "ckpt"
        self.gguf_bf16 = work / "model-bf16.gguf"
        self.gguf_q4 = work / "model-q4_0.gguf"
        # the bf16 layout, or another repack of the same checkpoint (--variant NAME --repack-args ...)
        self.layout = work / ("layout" if variant == "bf16" else f"layout-{variant}")
        self.convert_log = work / "convert.log"
        self.quant_log = work / "quantize.log"

    def state(self, phase: str) -> Path:
        if phase == "tiered" and self.variant != "bf16":
            return self.work / f"tiered-{self.variant}.json"
        return self.work / f"{phase}.json"


def free_gb(path: Path) -> float:
    p = path
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free / GB


def need_disk(path: Path, need_gb: float, step: str) -> None:
    have = free_gb(path)
    if have < need_gb:
        raise BenchError(f"{step} needs about {need_gb:.1f} GB free under {path}, only {have:.1f} GB are: delete "
                         f"what you no longer need there (the checkpoint's *.safetensors once the GGUF and layout "
                         f"exist: --drop-checkpoint) or pass a --work on a larger disk")


def dir_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def est_params(preset: str) -> int:
    """Parameter count of a make_random_checkpoint preset (disk sizes before the checkpoint exists)."""
    from make_random_checkpoint import PRESETS

    p = PRESETS[preset]
    D, L, E, F = p["hidden_size"], p["num_hidden_layers"], p["num_experts"], p["moe_intermediate_size"]
    q, kv = p["num_attention_heads"] * p["head_dim"], p["num_key_value_heads"] * p["head_dim"]
    per_layer = D * q + 2 * D * kv + q * D + D * E + E * 3 * D * F + 2 * D + 2 * p["head_dim"]
    return p["vocab_size"] * D * (1 if p["tie_word_embeddings"] else 2) + L * per_layer + D


def run_tool(cmd: list[str], log_path: Path, timeout: float, cwd: Path | None = None) -> str:
    """Run a command, keep its stdout+stderr in log_path; raise BenchError with the tail on failure."""
    log(" ".join(str(c) for c in cmd))
    t0 = time.perf_counter()
    try:
        r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, cwd=cwd)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        log_path.write_text(out)
        raise BenchError(f"{cmd[0]} ran past {timeout:.0f} s (log: {log_path}); raise --tool-timeout") from None
    text = r.stdout + ("\n" if r.stdout and r.stderr else "") + r.stderr
    log_path.write_text(text)
    if r.returncode != 0:
        tail = "\n".join(text.splitlines()[-25:])
        raise BenchError(f"{Path(cmd[0]).name} exited {r.returncode} after {time.perf_counter() - t0:.1f} s "
                         f"(log: {log_path}):\n{tail}")
    return text  # stdout, then stderr: the parsers pick their JSON lines from either


# --- phase: model ------------------------------------------------------------------------------------------
QUANT_LINE = re.compile(r"\[\s*\d+/\s*\d+\]\s+(\S+)\s+-\s+\[([^\]]*)\],\s+type\s+=\s+(\S+),\s*(.*)")
CONVERT_TO = re.compile(r"converting to (\S+)")


def parse_quantize_log(text: str, target: str = "q4_0") -> dict:
    """llama-quantize's per-tensor lines -> the tensors left at a type other than `target`, grouped by type."""
    tensors, kept = {}, {}
    for line in text.splitlines():
        m = QUANT_LINE.search(line)
        if not m:
            continue
        name, shape, src, rest = m.groups()
        c = CONVERT_TO.search(rest)
        to = c.group(1) if c else src
        tensors[name] = {"shape": [int(x) for x in shape.replace(" ", "").split(",") if x], "from": src, "to": to}
        if to != target:
            kept.setdefault(to, []).append(name)
    if not tensors:
        raise BenchError("no per-tensor lines found in llama-quantize's log: its format changed; "
                         "update QUANT_LINE in benchmarks/bench_peers.py")
    summary = {t: {"count": len(v), "examples": v[:6]} for t, v in sorted(kept.items())}
    return {"tensors": len(tensors), "target": target, "quantized": sum(1 for t in tensors.values() if t["to"] == target),
            "kept_other_types": summary,
            "kept_not_1d": sorted(n for n, t in tensors.items() if t["to"] != target and len([d for d in t["shape"] if d > 1]) > 1)}


def phase_model(a, S: dict, P: Paths) -> dict:
    from make_random_checkpoint import make

    P.work.mkdir(parents=True, exist_ok=True)
    prev = P.state("model")
    res: dict = json.loads(prev.read_text()) if prev.is_file() else {}  # a --variant run adds to the first one
    res.update({"phase": "model", "preset": S["preset"], "work": str(P.work)})
    params = est_params(S["preset"])
    res["params_est"] = params
    bf16_gb = params * 2 / GB
    for tmp in P.work.glob("*.tmp"):  # a step killed half-way (e.g. at the call's time limit)
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink()

    have_ckpt = (P.ckpt / "config.json").is_file() and any(P.ckpt.glob("*.safetensors"))
    need_ckpt = not (P.gguf_bf16.is_file() and (P.layout / "manifest.json").is_file() and
                     (P.work / "layout" / "manifest.json").is_file())
    if need_ckpt and not have_ckpt:
        need_disk(P.work, bf16_gb * 1.05 + 1, "making the checkpoint")
        tmp = P.work / "ckpt.tmp"
        t0 = time.perf_counter()
        res["make"] = make(S["preset"], tmp, seed=a.seed, device=a.device, tokenizer=a.tokenizer)
        shutil.rmtree(P.ckpt, ignore_errors=True)
        tmp.rename(P.ckpt)
        res["make_s"] = time.perf_counter() - t0
        log(f"checkpoint {P.ckpt}: {res['make']['params'] / 1e9:.2f}B params in {res['make_s']:.1f} s")

    if not P.gguf_bf16.is_file():
        need_disk(P.work, bf16_gb * 1.05 + 1, "converting to GGUF bf16")
        tmp = P.work / "model-bf16.gguf.tmp"
        t0 = time.perf_counter()
        run_tool([sys.executable, REPO / "tools/convert_gguf.py", "--llama-dir", a.llama_src, P.ckpt,
                  "--outtype", "bf16", "--outfile", tmp], P.convert_log, a.tool_timeout, cwd=REPO)
        tmp.rename(P.gguf_bf16)
        res["convert_s"] = time.perf_counter() - t0
        log(f"GGUF bf16 in {res['convert_s']:.1f} s")

    if not (P.layout / "manifest.json").is_file():
        need_disk(P.work, bf16_gb * 1.05 + 1, "repacking the tiered layout")
        t0 = time.perf_counter()
        if not any(P.ckpt.glob("*.safetensors")):
            raise BenchError(f"the layout {P.layout} needs the checkpoint, whose safetensors were dropped from {P.ckpt}: "
                             "run --phase model without --variant again (it remakes the checkpoint) first")
        extra = shlex.split(a.repack_args or "")
        out = run_tool([sys.executable, "-m", "tiered", "repack", P.ckpt, P.layout, "--force", "--json", *extra],
                       P.work / f"repack-{P.variant}.log", a.tool_timeout, cwd=REPO)
        key = "repack" if P.variant == "bf16" else f"repack_{P.variant}"
        res[f"{key}_s"] = time.perf_counter() - t0
        res[key] = last_json(out)
        res[f"{key}_args"] = extra
        log(f"layout {P.layout} in {res[f'{key}_s']:.1f} s")

    if not P.gguf_q4.is_file():
        need_disk(P.work, bf16_gb * 0.35 + 1, "quantizing to Q4_0")
        quant = bin_path(a, "llama-quantize")
        tmp = P.work / "model-q4_0.gguf.tmp"
        t0 = time.perf_counter()
        run_tool([quant, P.gguf_bf16, tmp, "Q4_0", str(S["threads"])], P.quant_log, a.tool_timeout)
        tmp.rename(P.gguf_q4)
        res["quantize_s"] = time.perf_counter() - t0
        log(f"GGUF Q4_0 in {res['quantize_s']:.1f} s")
    if P.quant_log.is_file():
        res["q4_0_kept"] = parse_quantize_log(P.quant_log.read_text())

    if a.drop_checkpoint or free_gb(P.work) < a.min_free_gb:
        for f in P.ckpt.glob("*.safetensors"):
            f.unlink()
        res["checkpoint_dropped"] = True
        log("dropped the checkpoint's safetensors (the GGUFs and the layout are made)")
    res["files_gb"] = {"checkpoint": dir_bytes(P.ckpt) / GB, "gguf_bf16": dir_bytes(P.gguf_bf16) / GB,
                       "gguf_q4_0": dir_bytes(P.gguf_q4) / GB}
    for lay in sorted(P.work.glob("layout*")):
        res["files_gb"][lay.name] = dir_bytes(lay) / GB
    res["free_gb"] = free_gb(P.work)
    rows = [(k, f"{v:.2f} GB") for k, v in res["files_gb"].items()]
    for k in ("make_s", "convert_s", "quantize_s", "repack_s", f"repack_{P.variant}_s"):
        if k in res:
            rows.append((k, f"{res[k]:.1f}"))
    if "q4_0_kept" in res:
        q = res["q4_0_kept"]
        rows.append(("Q4_0 tensors quantized", f"{q['quantized']} of {q['tensors']}"))
        for t, v in q["kept_other_types"].items():
            rows.append((f"  kept as {t}", f"{v['count']} (e.g. {', '.join(v['examples'][:3])})"))
    print_rows(rows)
    return res


def last_json(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


# --- phase: llama ------------------------------------------------------------------------------------------
def bin_path(a, name: str) -> Path:
    p = Path(a.llama_bin) / name
    if not p.is_file():
        raise BenchError(f"no {name} in {a.llama_bin}: build llama.cpp first (bash tools/build_llamacpp.sh on the GPU "
                         "box) or pass --llama-bin")
    return p


def parse_llama_bench(text: str) -> dict:
    """llama-bench -o jsonl: one object per test -> {pp_tok_s, tg_tok_s, ...} with the raw records kept."""
    recs = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and "avg_ts" in line:
            recs.append(json.loads(line))
    if not recs:
        raise BenchError("llama-bench printed no jsonl records (is -o jsonl supported by this build?)")
    out: dict = {"records": [{k: r.get(k) for k in ("n_prompt", "n_gen", "n_depth", "avg_ts", "stddev_ts", "avg_ns",
                                                     "samples_ts", "n_threads", "n_gpu_layers", "flash_attn",
                                                     "tensor_buft_overrides", "model_type")} for r in recs]}
    first = recs[0]
    out.update({"model_size": first.get("model_size"), "model_n_params": first.get("model_n_params"),
                "model_type": first.get("model_type"), "gpu_info": first.get("gpu_info"),
                "cpu_info": first.get("cpu_info"), "backends": first.get("backends"),
                "build_commit": first.get("build_commit"), "build_number": first.get("build_number")})
    for r in recs:
        if r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0:
            out[f"pp{r['n_prompt']}_tok_s"] = r["avg_ts"]
            out["pp_tok_s"], out["pp_tokens"] = r["avg_ts"], r["n_prompt"]
        elif r.get("n_gen", 0) > 0 and r.get("n_prompt", 0) == 0:
            out[f"tg{r['n_gen']}_tok_s"] = r["avg_ts"]
            out["tg_tok_s"], out["tg_tokens"] = r["avg_ts"], r["n_gen"]
    return out


def parse_batched_bench(text: str) -> dict:
    """llama-batched-bench --output-format jsonl -> {B: {pp, tg, s_pp, s_tg, ...}}."""
    rows = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and "speed_tg" in line:
            r = json.loads(line)
            rows[str(r["pl"])] = {"pp": r["pp"], "tg": r["tg"], "n_kv": r["n_kv"], "t_pp_s": r["t_pp"],
                                  "s_pp_tok_s": r["speed_pp"], "t_tg_s": r["t_tg"], "s_tg_tok_s": r["speed_tg"],
                                  "s_tok_s": r["speed"], "n_gpu_layers": r.get("n_gpu_layers"),
                                  "n_threads": r.get("n_threads")}
    if not rows:
        raise BenchError("llama-batched-bench printed no jsonl rows (is --output-format jsonl supported?)")
    return rows


def llama_runs(a, S: dict, P: Paths) -> list[tuple[str, str, Path, list[str]]]:
    """(name, tool, model, args) of every llama.cpp run, in the order they run."""
    cpu = ["-ot", "exps=CPU", "-t", str(S["threads"])]
    bench = ["-ngl", "99", "-p", str(S["pp"]), "-n", str(S["tg"]), "-o", "jsonl"]
    npl = ",".join(str(b) for b in S["batch"])
    ctx = max(S["batch"]) * (S["bb_pp"] + S["bb_tg"] + 16)  # a multiple of the sequences: each gets ctx / B_max
    batched = ["-ngl", "99", "-c", str(ctx), "-b", "2048", "-ub", "512", "-npp", str(S["bb_pp"]),
               "-ntg", str(S["bb_tg"]), "-npl", npl, "--output-format", "jsonl"]
    # On a CPU-only check, Q4_0 weights would be repacked for AMX, whose instructions a sandbox may trap (SIGILL
    # was seen): --repack 0 keeps the plain CPU kernels. On the GPU box Q4_0 runs on the GPU.
    q4_cpu = ["--repack", "0"] if a.device == "cpu" else []
    runs = [("gpu_bf16", "llama-bench", P.gguf_bf16, bench + ["-r", str(S["reps"])]),
            ("gpu_q4_0", "llama-bench", P.gguf_q4, bench + ["-r", str(S["reps"])] + q4_cpu),
            ("cpu_experts_bf16", "llama-bench", P.gguf_bf16, bench + ["-r", str(S["cpu_reps"])] + cpu),
            ("batched_gpu_bf16", "llama-batched-bench", P.gguf_bf16, batched),
            ("batched_cpu_experts_bf16", "llama-batched-bench", P.gguf_bf16, batched + cpu)]
    if a.llama_only:
        keep = set(a.llama_only.split(","))
        unknown = keep - {r[0] for r in runs}
        if unknown:
            raise BenchError(f"unknown --llama-only runs {sorted(unknown)}; choose from {[r[0] for r in runs]}")
        runs = [r for r in runs if r[0] in keep]
    return runs


def batched_retry(cmd: list[str], parsed: dict, S: dict, log_path: Path, timeout: float) -> None:
    """Run the batch sizes whose rows are missing once more (a row was seen lost at exit: its log is written
    by a background thread); record which were retried, and raise if a row is still missing."""
    missing = [b for b in S["batch"] if str(b) not in parsed["batch"]]
    if not missing:
        return
    log(f"llama-batched-bench printed no row for B = {missing}: running those again")
    i = cmd.index("-npl")
    out = run_tool([*cmd[:i + 1], ",".join(map(str, missing)), *cmd[i + 2:]], log_path, timeout)
    parsed["batch"].update(parse_batched_bench(out))
    parsed["retried"] = missing
    still = [b for b in S["batch"] if str(b) not in parsed["batch"]]
    if still:
        raise BenchError(f"llama-batched-bench gave no row for B = {still} twice (log: {log_path})")


def phase_llama(a, S: dict, P: Paths) -> dict:
    res: dict = {"phase": "llama", "runs": {}, "commands": {}}
    prev = P.state("llama")
    if a.llama_only and prev.is_file():  # re-running some runs keeps the others
        res = json.loads(prev.read_text())
    for name, tool, model, args in llama_runs(a, S, P):
        if not model.is_file():
            raise BenchError(f"no {model}: run --phase model first (same --work)")
        cmd = [str(bin_path(a, tool)), "-m", str(model), *args]
        res["commands"][name] = " ".join(cmd)
        t0 = time.perf_counter()
        try:
            out = run_tool(cmd, P.work / f"llama-{name}.log", a.tool_timeout)
            parsed = parse_llama_bench(out) if tool == "llama-bench" else {"batch": parse_batched_bench(out)}
            if tool == "llama-batched-bench":
                batched_retry(cmd, parsed, S, P.work / f"llama-{name}-retry.log", a.tool_timeout)
        except BenchError as e:  # keep the other runs' figures; the report says which one failed
            log(f"{name} failed: {e}")
            parsed = {"error": str(e)[-3000:]}
        parsed["wall_s"] = time.perf_counter() - t0
        res["runs"][name] = parsed
    rows = []
    for name, r in res["runs"].items():
        if "error" in r:
            rows.append((name, "FAILED"))
        elif "batch" in r:
            for b, v in r["batch"].items():
                rows.append((f"{name} B={b}", f"S_TG {v['s_tg_tok_s']:.1f} tok/s, S_PP {v['s_pp_tok_s']:.1f} tok/s"))
        else:
            rows.append((name, f"pp{r.get('pp_tokens')} {r.get('pp_tok_s', float('nan')):.1f} tok/s, "
                               f"tg{r.get('tg_tokens')} {r.get('tg_tok_s', float('nan')):.1f} tok/s"))
    print_rows(rows)
    return res


# --- phase: tiered -----------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def read_bandwidth(device: torch.device, gib: float, repeats: int = 5) -> dict:
    """Read-only memory bandwidth: full reductions (sum, amax) over `gib` GiB of fp32, best of `repeats`.
    A reduction reads each byte once and writes almost nothing, unlike a copy (which reads and writes)."""
    n = int(gib * GiB) // 4
    x = torch.ones(n, dtype=torch.float32, device=device)
    out = {"bytes": n * 4}
    for name, fn in (("sum", torch.sum), ("amax", torch.amax)):
        fn(x)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            r = fn(x)
            sync(device)
            best = min(best, time.perf_counter() - t0)
        if name == "sum" and abs(float(r) - n) > 1e-3 * n:  # the reduction ran over every element
            raise BenchError(f"sum over {n} ones gave {float(r)}")
        out[f"{name}_gbps"] = n * 4 / best / GB
    del x
    if device.type == "cuda":
        torch.cuda.empty_cache()
    out["gbps"] = max(out["sum_gbps"], out["amax_gbps"])
    return out


def step_bytes(layout_path: Path) -> dict:
    """Bytes one decode token reads, from the layout: dense weights (the embedding only when tied: a decode step
    reads one row of it), K experts of every layer, and the KV cache per position attended."""
    from tiered.store.disk import Layout

    lay = Layout.open(layout_path)
    cfg = lay.config
    dense = 0
    for name, t in lay.dense().items():
        if name == "embed" and not cfg.tie_word_embeddings:
            continue
        dense += t.nbytes if not isinstance(t, torch.Tensor) else t.numel() * t.element_size()
    expert = sum(s.nbytes for s in lay.tensor_specs)
    kv_heads = getattr(cfg, "num_kv_heads", None) or getattr(cfg, "num_key_value_heads")
    kv_per_pos = cfg.num_layers * 2 * kv_heads * cfg.head_dim * 2  # K and V, bf16
    return {"dense_bytes": dense, "expert_bytes": expert, "active_expert_bytes": cfg.num_layers * cfg.top_k * expert,
            "kv_bytes_per_position": kv_per_pos, "layers": cfg.num_layers, "top_k": cfg.top_k,
            "experts": cfg.num_experts, "vocab": cfg.vocab_size}


def prompt_ids(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, min(vocab, 8192), (n,), generator=g).tolist()  # real tokens of the tokenizer


KEEP_STATS = ("decode_tok_s", "prefill_tok_s", "ttft_s", "capture_s", "load_s", "decode_graphs", "attention", "io",
              "expert_slots", "vram_budget_gib", "bytes_h2d_per_token", "stall_share", "host_s_per_layer", "policy")


def run_tiered(layout: Path, device: torch.device, dtype: torch.dtype, budget: dict | None, S: dict,
               vocab: int) -> dict:
    import tiered

    ctx = S.get("max_context") or max(S["prefill"], S["decode_prompt"] + S["long"]) + 16
    sync(device)
    t0 = time.perf_counter()
    eng = tiered.load(layout, device=device, dtype=dtype, budget=budget, max_context=ctx, attn=S.get("attn", "auto"))
    sync(device)
    res: dict = {"budget": budget, "load_s": time.perf_counter() - t0}
    for k in ("capture_s", "load_capture_s"):
        v = getattr(eng, k, None)
        if isinstance(v, (int, float)):
            res[f"engine_{k}"] = v
    long_p = prompt_ids(S["prefill"], vocab, 1)
    short_p = prompt_ids(S["decode_prompt"], vocab, 2)

    def gen(prompt: list[int], new: int) -> dict:
        sync(device)
        t = time.perf_counter()
        g = eng.generate(prompt, max_new_tokens=new, stop_at_eos=False)
        sync(device)
        s = {k: g.stats.get(k) for k in KEEP_STATS if g.stats.get(k) is not None}
        s["wall_s"] = time.perf_counter() - t
        s["tokens"] = len(g.token_ids)
        if "ttft_s" not in s and new == 1:
            s["ttft_s"] = s["wall_s"]  # one new token: the whole call is the time to the first token
        return s

    # Prefill of a long prompt: the first call after load, then warm.
    res["prefill_first"] = gen(long_p, 1)
    warm = [gen(long_p, 1) for _ in range(S["repeats"])]
    res["prefill_warm"] = {"prefill_tok_s": statistics.median(w["prefill_tok_s"] for w in warm),
                           "ttft_s": statistics.median(w["ttft_s"] for w in warm), "runs": warm}
    # Decode: the first short run (graph capture may land in it), then long and short warm runs.
    res["decode_short_first"] = gen(short_p, S["short"])
    for key, new in (("decode_long", S["long"]), ("decode_short", S["short"])):
        runs = [gen(short_p, new) for _ in range(S["repeats"])]
        res[key] = {"new_tokens": new, "decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs),
                    "runs": [r["decode_tok_s"] for r in runs], "last": runs[-1]}
    res["short_over_long"] = res["decode_short"]["decode_tok_s"] / res["decode_long"]["decode_tok_s"]
    cap = [r.get("capture_s") for r in (res["prefill_first"], res["decode_short_first"]) if r.get("capture_s")]
    if cap:
        res["capture_s"] = max(cap)
    st = eng.stats
    res["stats_last"] = {k: v for k, v in st.items() if isinstance(v, (int, float, str, bool)) or v is None}
    for tier in ("vram", "ram", "disk", "decode"):
        if isinstance(st.get(tier), dict):
            res["stats_last"][tier] = {k: v for k, v in st[tier].items() if isinstance(v, (int, float, str, bool))}
    close = getattr(eng.model.provider, "close", None)
    if close is not None:
        close()
    eng = None  # noqa: F841 - drop the engine before the next one loads
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return res


def phase_tiered(a, S: dict, P: Paths) -> dict:
    if not (P.layout / "manifest.json").is_file():
        raise BenchError(f"no layout at {P.layout}: run --phase model first (same --work)")
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    res: dict = {"phase": "tiered", "variant": P.variant, "layout": str(P.layout), "repack_args": a.repack_args,
                 "device": device_name(device), "dtype": str(dtype).removeprefix("torch.")}
    log(f"read bandwidth: reductions over {S['hbm_gib']} GiB on {device}")
    res["read_bw"] = read_bandwidth(device, S["hbm_gib"])
    res["bytes"] = step_bytes(P.layout)
    vocab = res["bytes"]["vocab"]
    b = res["bytes"]
    if a.offload_budget:
        offload = json.loads(a.offload_budget)
    elif device.type == "cuda" and S["vram_gb"]:
        offload = {"vram_gb": S["vram_gb"]}  # what `tiered run --vram-gb 4` does
    else:  # on a CPU there is no VRAM budget: 25% of the experts stand in for it
        offload = {"expert_slots": max(b["top_k"], b["layers"] * b["experts"] // 4)}
    res["modes"] = {}
    res["attn"] = S["attn"] = a.attn
    res["max_context"] = S["max_context"] = a.max_context
    for mode, budget in (("vram", None), ("offload", offload)):
        if a.tiered_only and mode not in a.tiered_only.split(","):
            continue
        log(f"tiered {mode}: budget {budget}")
        try:
            res["modes"][mode] = run_tiered(P.layout, device, dtype, budget, S, vocab)
        except Exception as e:  # noqa: BLE001 - keep the other mode's figures; the report names the failure
            log(f"tiered {mode} failed: {type(e).__name__}: {e}")
            res["modes"][mode] = {"budget": budget, "error": f"{type(e).__name__}: {e}"[-3000:]}
    rows = [("read bandwidth GB/s (sum, amax)", f"{res['read_bw']['sum_gbps']:.0f}, {res['read_bw']['amax_gbps']:.0f}")]
    for mode, r in res["modes"].items():
        if "error" in r:
            rows.append((f"tiered {mode}", "FAILED: " + r["error"][:120]))
            continue
        rows += [(f"tiered {mode} load s", f"{r['load_s']:.1f}"),
                 (f"tiered {mode} prefill{S['prefill']} tok/s first / warm",
                  f"{r['prefill_first']['prefill_tok_s']:.1f} / {r['prefill_warm']['prefill_tok_s']:.1f}"),
                 (f"tiered {mode} ttft s first / warm",
                  f"{r['prefill_first']['ttft_s']:.4f} / {r['prefill_warm']['ttft_s']:.4f}"),
                 (f"tiered {mode} decode tok/s {S['short']} (first) / {S['short']} / {S['long']}",
                  f"{r['decode_short_first']['decode_tok_s']:.1f} / {r['decode_short']['decode_tok_s']:.1f} / "
                  f"{r['decode_long']['decode_tok_s']:.1f}")]
    print_rows(rows)
    return res


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


# --- phase: report -----------------------------------------------------------------------------------------
def ratio(x, y):
    return x / y if isinstance(x, (int, float)) and isinstance(y, (int, float)) and y else None


def hbm_bound(tier: dict, S: dict) -> dict | None:
    """Bytes one decode token reads in the tiered run it is compared with ÷ the read bandwidth of the same run.
    Decode follows a short prompt, so the mean attended context is prompt + new/2 positions."""
    b = tier.get("bytes")
    if not b or not tier.get("read_bw"):
        return None
    pos = S["decode_prompt"] + S["long"] / 2
    per_tok = b["dense_bytes"] + b["active_expert_bytes"] + b["kv_bytes_per_position"] * pos
    gbps = tier["read_bw"]["gbps"]
    return {"bytes_per_token": per_tok, "dense_bytes": b["dense_bytes"], "active_expert_bytes": b["active_expert_bytes"],
            "kv_bytes": b["kv_bytes_per_position"] * pos, "mean_positions": pos, "read_gbps": gbps,
            "read_gbps_sum": tier["read_bw"]["sum_gbps"], "read_gbps_amax": tier["read_bw"]["amax_gbps"],
            "tok_s": gbps * GB / per_tok}


def tiered_fig(r: dict | None, S: dict) -> dict:
    if not r or "error" in r:
        return {"error": r.get("error", "not run")} if r else {"error": "not run"}
    return {"decode_tok_s": r["decode_long"]["decode_tok_s"],
            f"decode_tok_s_{S['long']}": r["decode_long"]["decode_tok_s"],
            f"decode_tok_s_{S['short']}": r["decode_short"]["decode_tok_s"],
            f"decode_tok_s_{S['short']}_first": r["decode_short_first"]["decode_tok_s"],
            "short_over_long": r["short_over_long"],
            f"prefill{S['prefill']}_tok_s_warm": r["prefill_warm"]["prefill_tok_s"],
            f"prefill{S['prefill']}_tok_s_first": r["prefill_first"]["prefill_tok_s"],
            "ttft_s_warm": r["prefill_warm"]["ttft_s"], "ttft_s_first": r["prefill_first"]["ttft_s"],
            "load_s": r["load_s"], "capture_s": r.get("capture_s", r.get("engine_capture_s")),
            "decode_graphs": r["decode_long"]["last"].get("decode_graphs"), "budget": r.get("budget"),
            "expert_slots": r["decode_long"]["last"].get("expert_slots")}


def llama_fig(r: dict | None) -> dict:
    if not r or "error" in r:
        return {"error": r.get("error", "not run")[:500]} if r else {"error": "not run"}
    return {k: r.get(k) for k in ("pp_tok_s", "pp_tokens", "tg_tok_s", "tg_tokens", "model_size", "model_n_params",
                                  "model_type", "gpu_info", "backends")}


def model_entry(tier: dict, ref: dict, cpu: dict, S: dict) -> dict:
    """One tiered layout against llama.cpp on the GGUF of the same precision: the figures and the ratios."""
    t_v = tiered_fig(tier.get("modes", {}).get("vram"), S)
    t_o = tiered_fig(tier.get("modes", {}).get("offload"), S)
    bound = hbm_bound(tier, S)
    pp_time = ratio(ref.get("pp_tokens"), ref.get("pp_tok_s"))
    pre = f"prefill{S['prefill']}_tok_s"
    return {"tiered_vram": t_v, "tiered_offload": t_o, "llamacpp_gpu": ref, "llamacpp_cpu_experts": cpu,
            "hbm_bound": bound,
            "decode_vs_llamacpp": ratio(t_v.get("decode_tok_s"), ref.get("tg_tok_s")),
            "prefill_vs_llamacpp": ratio(t_v.get(f"{pre}_warm"), ref.get("pp_tok_s")),
            "prefill_first_vs_llamacpp": ratio(t_v.get(f"{pre}_first"), ref.get("pp_tok_s")),
            "ttft_warm_over_llamacpp_pp_time": ratio(t_v.get("ttft_s_warm"), pp_time),
            "ttft_first_over_llamacpp_pp_time": ratio(t_v.get("ttft_s_first"), pp_time),
            "decode_vs_hbm_bound": ratio(t_v.get("decode_tok_s"), (bound or {}).get("tok_s")),
            "llamacpp_decode_vs_hbm_bound": ratio(ref.get("tg_tok_s"), (bound or {}).get("tok_s")),
            "offload_decode_vs_llamacpp_cpu_experts": ratio(t_o.get("decode_tok_s"), cpu.get("tg_tok_s")),
            "offload_prefill_vs_llamacpp_cpu_experts": ratio(t_o.get(f"{pre}_warm"), cpu.get("pp_tok_s")),
            "offload_decode_vs_vram": ratio(t_o.get("decode_tok_s"), t_v.get("decode_tok_s")),
            "short_over_long_vram": t_v.get("short_over_long")}


def phase_report(a, S: dict, P: Paths) -> tuple[dict, str]:
    model = json.loads(P.state("model").read_text()) if P.state("model").is_file() else {}
    llama = json.loads(P.state("llama").read_text()).get("runs", {}) if P.state("llama").is_file() else {}
    # tiered.json is the bf16 layout; tiered-VARIANT.json another layout of the same checkpoint (--variant)
    tiers = {"bf16": json.loads(P.state("tiered").read_text())} if P.state("tiered").is_file() else {}
    for f in sorted(P.work.glob("tiered-*.json")):
        tiers[f.stem.removeprefix("tiered-")] = json.loads(f.read_text())
    missing = [ph for ph, ok in (("model", model), ("llama", llama), ("tiered", tiers)) if not ok]
    device = next((t.get("device") for t in tiers.values() if t.get("device")), None) or (
        device_name(torch.device(a.device)) if not a.device.startswith("cuda") or torch.cuda.is_available() else "?")
    date = time.strftime("%Y-%m-%d", time.gmtime())
    res: dict = {"bench": "peers", "date": date, "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "commit": git_commit(), "device": device, "preset": S["preset"], "tiny": a.tiny,
                 "torch": torch.__version__, "missing_phases": missing, "sizes": dict(S)}
    gpu, q4 = llama_fig(llama.get("gpu_bf16")), llama_fig(llama.get("gpu_q4_0"))
    cpu = llama_fig(llama.get("cpu_experts_bf16"))
    res["llamacpp_build"] = next((llama[k].get("build_commit") for k in llama if llama[k].get("build_commit")), None)

    models: dict = {}
    m = model_entry(tiers.get("bf16", {}), gpu, cpu, S)
    m["llamacpp_batched"] = {key: (llama.get(run, {}).get("batch") or
                                   {"error": llama.get(run, {}).get("error", "not run")[:500]})
                             for key, run in (("gpu", "batched_gpu_bf16"), ("cpu_experts", "batched_cpu_experts_bf16"))}
    models[f"{S['preset']}-bf16"] = m
    q = {"llamacpp_gpu": q4, "quantize": model.get("q4_0_kept"), "gguf_gb": (model.get("files_gb") or {}).get("gguf_q4_0")}
    for variant, tier in tiers.items():
        if variant == "bf16":
            continue
        # a 4-bit tiered layout is compared with llama.cpp's Q4_0, any other with its bf16 run
        ref = q4 if variant.startswith("q4") else gpu
        e = model_entry(tier, ref, cpu, S)
        e["repack_args"] = tier.get("repack_args")
        e["decode_vs_tiered_bf16"] = ratio(e["tiered_vram"].get("decode_tok_s"), m["tiered_vram"].get("decode_tok_s"))
        e["offload_decode_vs_tiered_bf16"] = ratio(e["tiered_offload"].get("decode_tok_s"),
                                                   m["tiered_offload"].get("decode_tok_s"))
        if variant.startswith("q4"):
            e.update(quantize=q["quantize"], gguf_gb=q["gguf_gb"])
        models[f"{S['preset']}-{variant}"] = e
    if not any(v.startswith("q4") for v in tiers):
        models[f"{S['preset']}-q4_0"] = q
    res["models"] = models
    res["files_gb"] = model.get("files_gb")
    failures = {f"llama {k}": v["error"] for k, v in llama.items() if isinstance(v, dict) and v.get("error")}
    for variant, tier in tiers.items():
        failures.update({f"tiered {variant} {k}": v["error"] for k, v in tier.get("modes", {}).items() if v.get("error")})
    if failures:
        res["failures"] = failures
    print_table(res, S)
    return res, f"peers-{date}-{short_device(device)}.json"


def short_device(name: str) -> str:
    n = name.lower()
    for k in ("h200", "h100", "a100", "l40s", "4090"):
        if k in n:
            return k
    return re.sub(r"[^a-z0-9]+", "-", n).strip("-") or "unknown"


def fmt(v, spec=".1f") -> str:
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def print_table(res: dict, S: dict) -> None:
    """A llama-bench-style markdown table of every figure, then the ratios."""
    rows = []
    for mname, m in res["models"].items():
        for eng, key, tests in (
                ("llama.cpp", "llamacpp_gpu", (("pp", "pp_tok_s", "pp_tokens"), ("tg", "tg_tok_s", "tg_tokens"))),
                ("llama.cpp -ot exps=CPU", "llamacpp_cpu_experts",
                 (("pp", "pp_tok_s", "pp_tokens"), ("tg", "tg_tok_s", "tg_tokens")))):
            r = m.get(key)
            if not r:
                continue
            for t, k, n in tests:
                rows.append((mname, eng, f"{t}{r.get(n) or ''}", fmt(r.get(k)) if "error" not in r else
                             "not run" if r["error"] == "not run" else "FAILED"))
        for eng, key in (("tiered VRAM", "tiered_vram"), ("tiered offload", "tiered_offload")):
            r = m.get(key)
            if not r:
                continue
            if "error" in r:
                rows.append((mname, eng, "-", "not run" if r["error"] == "not run" else "FAILED"))
                continue
            if r.get("budget"):
                eng += " " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in r["budget"].items())
            rows += [(mname, eng, f"pp{S['prefill']} first", fmt(r[f"prefill{S['prefill']}_tok_s_first"])),
                     (mname, eng, f"pp{S['prefill']} warm", fmt(r[f"prefill{S['prefill']}_tok_s_warm"])),
                     (mname, eng, f"tg{S['short']} first", fmt(r[f"decode_tok_s_{S['short']}_first"])),
                     (mname, eng, f"tg{S['short']}", fmt(r[f"decode_tok_s_{S['short']}"])),
                     (mname, eng, f"tg{S['long']}", fmt(r[f"decode_tok_s_{S['long']}"]))]
        for where, bt in (m.get("llamacpp_batched") or {}).items():
            if isinstance(bt, dict) and "error" not in bt:
                for bsz, v in bt.items():
                    rows.append((mname, f"llama-batched-bench {where}", f"B={bsz} S_TG", fmt(v["s_tg_tok_s"])))
        if m.get("hbm_bound"):
            rows.append((mname, "HBM bound", f"{m['hbm_bound']['bytes_per_token'] / 1e6:.0f} MB/token at "
                                             f"{m['hbm_bound']['read_gbps']:.0f} GB/s", fmt(m["hbm_bound"]["tok_s"])))
    w = [max(len(str(r[i])) for r in rows + [("model", "engine", "test", "t/s")]) for i in range(4)]
    print(f"| {'model':<{w[0]}} | {'engine':<{w[1]}} | {'test':>{w[2]}} | {'t/s':>{w[3]}} |")
    print(f"| {'-' * w[0]} | {'-' * w[1]} | {'-' * w[2]}:| {'-' * w[3]}:|")
    for r in rows:
        print(f"| {r[0]:<{w[0]}} | {r[1]:<{w[1]}} | {r[2]:>{w[2]}} | {r[3]:>{w[3]}} |")
    for mname, m in res["models"].items():
        for k, v in m.items():
            if k.endswith("_llamacpp") or "_vs_" in k or k.startswith("short_over") or "_over_" in k:
                print(f"{mname}  {k} = {fmt(v, '.3f')}")


def print_rows(rows: list[tuple[str, str]]) -> None:
    if not rows:
        return
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")


# --- main --------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", choices=(*PHASES, "all"), required=True)
    ap.add_argument("--work", type=Path, default=None, help="state dir (default /root/peers; /tmp/peers-tiny with --tiny)")
    ap.add_argument("--tiny", action="store_true", help="tiny model and sizes: checks the pipeline on a CPU")
    ap.add_argument("--device", default=None, help="cuda or cpu (default cuda when available)")
    ap.add_argument("--llama-bin", default=os.environ.get("LLAMA_BIN", "/root/lb/bin"),
                    help="folder of llama-bench, llama-batched-bench, llama-quantize (tools/build_llamacpp.sh)")
    ap.add_argument("--llama-src", type=Path, default=REPO / ".carry/llama.cpp",
                    help="llama.cpp source (for convert_hf_to_gguf.py; tools/fetch_llamacpp.sh)")
    ap.add_argument("--tokenizer", type=Path, default=REPO / "tiered/data/olmoe-code-17m",
                    help="tokenizer copied into the checkpoint (the reference model's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--drop-checkpoint", action="store_true",
                    help="delete the checkpoint's safetensors once the GGUFs and the layout exist")
    ap.add_argument("--min-free-gb", type=float, default=10.0,
                    help="drop the checkpoint's safetensors when less disk than this is left after --phase model")
    ap.add_argument("--tool-timeout", type=float, default=560.0, help="seconds for one external command")
    ap.add_argument("--llama-only", default=None, help="comma list of llama runs (others kept from an earlier call)")
    ap.add_argument("--tiered-only", default=None, help="comma list of tiered modes: vram,offload")
    ap.add_argument("--attn", default="auto", help="tiered's --attn (auto, triton, sdpa)")
    ap.add_argument("--max-context", type=int, default=None,
                    help="KV positions tiered's engine is loaded with (default: the longest run's + 16); the decode "
                         "attention's splits are sized for it, e.g. 4096 as `tiered run` defaults to")
    ap.add_argument("--offload-budget", default=None,
                    help='budget of the offloaded tiered run as JSON (default {"vram_gb": 4} on CUDA), e.g. '
                         '\'{"vram_gb": 4, "ram_gb": 12, "io": "mmap"}\'')
    ap.add_argument("--variant", default="bf16",
                    help="another tiered layout of the same checkpoint, made by --phase model with --repack-args and "
                         "measured by --phase tiered into tiered-VARIANT.json (q4* variants compare with Q4_0)")
    ap.add_argument("--repack-args", default=None, help='extra `tiered repack` flags of --variant, e.g. '
                                                        '"--experts q4 --dense q4"')
    ap.add_argument("--results-dir", type=Path, default=None,
                    help="also copy the report JSON here (e.g. benchmarks/results)")
    a = ap.parse_args()
    S = dict(TINY if a.tiny else FULL)
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: pass --device cpu (with --tiny to check the pipeline)")
    a.work = a.work or Path("/tmp/peers-tiny" if a.tiny else "/root/peers")
    P = Paths(a.work, a.variant)
    P.work.mkdir(parents=True, exist_ok=True)
    phases = PHASES if a.phase == "all" else (a.phase,)
    t_start = time.perf_counter()
    try:
        for ph in phases:
            t0 = time.perf_counter()
            log(f"phase {ph} (work {P.work}, preset {S['preset']}, device {a.device})")
            if ph == "report":
                res, name = phase_report(a, S, P)
            else:
                res = {"model": phase_model, "llama": phase_llama, "tiered": phase_tiered}[ph](a, S, P)
                name = P.state(ph).name
            res["phase_s"] = time.perf_counter() - t0
            res["commit"] = git_commit()
            (P.work / name).write_text(json.dumps(res, indent=1) + "\n")
            if ph == "report" and a.results_dir:
                a.results_dir.mkdir(parents=True, exist_ok=True)
                (a.results_dir / name).write_text(json.dumps(res, indent=1) + "\n")
            line = write_out(res, name)
            log(f"phase {ph} done in {res['phase_s']:.1f} s (total {time.perf_counter() - t_start:.1f} s)")
        print(line)
    except BenchError as e:
        raise SystemExit(f"bench_peers: {e}") from None


if __name__ == "__main__":
    main()
