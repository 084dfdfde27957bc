"""CPU decode and prefill through the native kernel (kernels/cpu_kernel.c: the dense q8/q4/bf16 GEMVs and GEMMs, one
token's experts, a prompt's experts) against
the torch path of the same engine (TIERED_CPU_KERNEL=torch) and against llama.cpp on the CPU, same model, same run.

The model: a checkpoint (-m), or tools/make_random_checkpoint.py's qwen3-10b-2l-v8k built under --work (the 10.6B
shape's layer widths, 2 layers, the reference tokenizer's vocabulary: 1.27B parameters, 2.5 GB in bf16), repacked as
stored (bf16) and with --experts q4 --dense q4 (reused when present). Each tiered row is `tiered run --json` in a
fresh process: a --prompt-tokens prompt from ../shared/text/eval's first file, then --new-tokens greedy tokens; the
engine's own decode and prefill rates, median of --repeats processes; then the prompt's prefill warm (--repeats
more in one process after a first, as llama-bench times its pp); then a batch job (`tiered batch`, --batch prompts
of --batch-prompt-tokens asking --batch-new-tokens each, one step at most --batch rows) against llama-batched-bench
at the same sizes (its S_TG against our decode rate; generated tokens over both phases against our job rate).
The q4 rows also run in the native kernel's q8 activation mode (TIERED_CPU_ACT=q8: q4 products from inputs rounded
to 8 bits per group, integer dot products; its own rounding, so its texts are reported, not required equal). The
torch path of q4 runs --torch-tokens tokens only (about 1 tok/s here: it dequantizes every expert and matrix each
step).
Correctness first: in fp32 the native and the torch runs must give the same greedy tokens (the first --torch-tokens),
or the benchmark fails.
llama.cpp (--llama-bin DIR with llama-bench and llama-quantize, built by tools/build_llamacpp.sh with LLAMA_CUDA=OFF):
the checkpoint converted to a bf16 GGUF (tools/convert_gguf.py, --llama-dir) and quantized to Q4_0 (llama-quantize:
it keeps output.weight at q6_K, the routers and norms at f32), then llama-bench tg and pp at the same sizes and
threads.

    python3 benchmarks/bench_cpu_native.py --work /tmp/cpu-native --llama-bin /tmp/lbcpu/bin \\
        --llama-dir .carry/llama.cpp --threads 2
    # a 2,048-token prompt's warm prefill (q4, both activation modes) against llama-bench pp2048, alone:
    python3 benchmarks/bench_cpu_native.py --work /tmp/cpu-native --llama-bin /tmp/lbcpu/bin --threads 2 \\
        --long-prompt-tokens 2048 --only-long --out benchmarks/results/cpu-native-long-DATE.json

Prints a table, then one JSON line last; writes benchmarks/results/cpu-native-<date>.json (--out) and $OUT/.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
from benchmeta import git_commit, write_out  # noqa: E402

PRESET = "qwen3-10b-2l-v8k"


def log(msg: str) -> None:
    print(f"[cpu-native] {msg}", file=sys.stderr, flush=True)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def prepare(a: argparse.Namespace) -> tuple[Path, dict[str, Path]]:
    """The checkpoint and its two layouts (bf16 as stored; q4 experts and dense), made when absent."""
    from tiered.layout.repack import repack

    ckpt = a.model or a.work / "ckpt"
    if not (ckpt / "config.json").exists():
        from make_random_checkpoint import make

        log(f"building {PRESET} under {ckpt}")
        make(PRESET, ckpt, device="cpu", tokenizer=REPO / "tiered" / "data" / "olmoe-code-17m")
    lays = {"bf16": a.work / "layout-bf16", "q4": a.work / "layout-q4"}
    for name, kw in (("bf16", {}), ("q4", {"experts": "q4", "dense": "q4"})):
        if not (lays[name] / "manifest.json").exists():
            log(f"repacking {name} (q4 on the CPU takes minutes)")
            repack(ckpt, lays[name], force=True, progress=False, **kw)
    return ckpt, lays


def kernel_env(mode: str, threads: int) -> dict:
    """The environment of a row's process: mode "native", "torch" (TIERED_CPU_KERNEL) or "native-q8" (the native
    kernel in its q8 activation mode, TIERED_CPU_ACT=q8)."""
    return {**os.environ, "TIERED_CPU_KERNEL": "torch" if mode == "torch" else "native",
            "TIERED_CPU_ACT": "q8" if mode == "native-q8" else "float", "OMP_NUM_THREADS": str(threads)}


def tiered_run(layout: Path, prompt: Path, new: int, dtype: str, mode: str, threads: int) -> dict:
    """One `tiered run --json` in a fresh process; its stats plus the generated token ids."""
    env = kernel_env(mode, threads)
    cmd = [sys.executable, "-m", "tiered", "run", "-m", str(layout), "--device", "cpu", "--dtype", dtype,
           "--prompt-file", str(prompt), "--max-new-tokens", str(new), "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if r.returncode != 0:
        raise SystemExit(f"tiered run failed ({' '.join(cmd)}):\n{r.stderr[-2000:]}")
    stats = json.loads(r.stderr.strip().splitlines()[-1])
    stats["text"] = r.stdout
    return stats


WARM = """
import json, sys
from tiered.engine import load
eng = load(sys.argv[1], device="cpu", dtype=sys.argv[2])
ids = eng.encode(open(sys.argv[3]).read())
runs = [eng.generate(ids, max_new_tokens=1).stats["prefill_s"] for _ in range(int(sys.argv[4]) + 1)]
print(json.dumps({"tokens": len(ids), "cold_s": runs[0], "warm_s": runs[1:]}))
"""


def warm_prefill(layout: Path, prompt: Path, dtype: str, mode: str, threads: int, repeats: int) -> dict:
    """The prompt's prefill `repeats` more times in one process after a first (cold) one, as llama-bench's pp times
    it (a warm-up run, then the average of its repetitions): the cold one pays the first touch of each mapped
    expert block, which a `tiered run` prefill includes."""
    env = kernel_env(mode, threads)
    r = subprocess.run([sys.executable, "-c", WARM, str(layout), dtype, str(prompt), str(repeats)],
                       capture_output=True, text=True, env=env, timeout=3600)
    if r.returncode != 0:
        raise SystemExit(f"warm prefill of {layout} ({dtype}, {mode}) failed:\n{r.stderr[-2000:]}")
    d = json.loads(r.stdout.strip().splitlines()[-1])
    warm = statistics.mean(d["warm_s"])
    return {"prompt_tokens": d["tokens"], "cold_tok_s": d["tokens"] / d["cold_s"], "warm_tok_s": d["tokens"] / warm,
            "warm_runs_s": d["warm_s"]}


def tiered_rows(a: argparse.Namespace, lays: dict[str, Path], prompt: Path) -> dict:
    rows: dict = {}
    plan = [("bf16", "float32", "native", a.new_tokens), ("bf16", "float32", "torch", a.new_tokens),
            ("q4", "float32", "native", a.new_tokens), ("q4", "float32", "torch", a.torch_tokens),
            ("q4", "bfloat16", "native", a.new_tokens), ("q4", "float32", "native-q8", a.new_tokens),
            ("q4", "bfloat16", "native-q8", a.new_tokens)]
    for lay, dtype, mode, new in plan:
        runs = [tiered_run(lays[lay], prompt, new, dtype, mode, a.threads) for _ in range(a.repeats)]
        key = f"{lay}/{dtype}/{mode}"
        rows[key] = {"layout": lay, "dtype": dtype, "kernel": mode, "new_tokens": new,
                     "decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs),
                     "prefill_tok_s": statistics.median(r["prefill_tok_s"] for r in runs),
                     "decode_runs": [r["decode_tok_s"] for r in runs], "prompt_tokens": runs[0]["tokens_prompt"],
                     "text": runs[0]["text"]}
        # the torch path's prefill (up to about 3 s a prompt here) is warm-timed once
        w = warm_prefill(lays[lay], prompt, dtype, mode, a.threads, a.repeats if mode != "torch" else 1)
        rows[key]["prefill_warm_tok_s"] = w["warm_tok_s"]
        rows[key]["prefill_warm"] = w
        log(f"{key}: decode {rows[key]['decode_tok_s']:.2f} tok/s, prefill {rows[key]['prefill_tok_s']:.1f}, "
            f"warm {rows[key]['prefill_warm_tok_s']:.1f}")
    return rows


def check_tokens(rows: dict, a: argparse.Namespace) -> dict:
    """fp32: the native run's text starts with the torch run's (the torch q4 run is shorter): else fail."""
    out = {}
    for lay in ("bf16", "q4"):
        # the shorter text may end inside a character its next token completes (decoded as U+FFFD)
        n, t = (rows[f"{lay}/float32/{m}"]["text"].rstrip("\n").rstrip("\ufffd") for m in ("native", "torch"))
        same = n.startswith(t) if len(t) <= len(n) else t.startswith(n)
        out[lay] = same
        if not same:
            raise SystemExit(f"{lay}: the native and torch runs generated different text in fp32:\n{n!r}\n{t!r}")
    return out


def batch_rows(a: argparse.Namespace, lays: dict[str, Path], tok) -> dict:
    """`tiered batch` of --batch prompts (--batch-prompt-tokens tokens each, windows of the eval file) asking
    --batch-new-tokens greedy tokens, --max-batch --batch, in fp32: native and torch kernels, same texts or fail."""
    text = sorted((REPO.parent / "shared" / "text" / "eval").glob("*"))[0].read_text()
    ids = tok.encode(text)
    n, L = a.batch, a.batch_prompt_tokens
    if len(ids) < n * L:
        raise SystemExit(f"the eval file has {len(ids)} tokens, fewer than {n} prompts of {L}")
    inp = a.work / f"batch-{n}x{L}.jsonl"
    inp.write_text("".join(json.dumps({"prompt": tok.decode(ids[i * L:(i + 1) * L]), "max_tokens": a.batch_new_tokens})
                           + "\n" for i in range(n)))
    rows: dict = {}
    for lay in ("bf16", "q4"):
        texts = {}
        for mode in ("native", "torch") + (("native-q8",) if lay == "q4" else ()):
            out = a.work / f"batch-out-{lay}-{mode}.jsonl"
            out.unlink(missing_ok=True)
            env = kernel_env(mode, a.threads)
            cmd = [sys.executable, "-m", "tiered", "batch", "-m", str(lays[lay]), "--device", "cpu", "--dtype",
                   "float32", "--input", str(inp), "--output", str(out), "--max-batch", str(n), "--no-progress",
                   "--json"]
            r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
            if r.returncode != 0:
                raise SystemExit(f"tiered batch failed ({' '.join(cmd)}):\n{r.stderr[-2000:]}")
            st = json.loads(r.stderr.strip().splitlines()[-1])
            recs = [json.loads(x) for x in out.read_text().splitlines()]
            texts[mode] = {x["custom_id"]: x["response"]["body"]["choices"][0]["text"] for x in recs}
            rows[f"{lay}/{mode}"] = {k: st[k] for k in ("tokens_generated", "tok_s", "decode_tok_s", "busy_s",
                                                         "decode_s", "rows_per_step", "distinct_experts_per_step")}
            log(f"batch {lay}/{mode}: {st['tok_s']:.1f} tok/s over the job, decode {st['decode_tok_s']:.1f}")
        if lay == "q4":  # the q8 mode's texts may differ (its own rounding): how many of the rows are the same
            rows["q4/native-q8_texts_same"] = sum(texts["native-q8"][k] == v for k, v in texts["native"].items())
        if texts["native"] != texts["torch"]:
            raise SystemExit(f"batch {lay}: the native and torch runs generated different texts in fp32")
        rows[f"{lay}/texts_identical"] = True
    return rows


def llama_batched(a: argparse.Namespace) -> dict:
    """llama-batched-bench at --batch sequences of --batch-prompt-tokens + --batch-new-tokens, both GGUFs."""
    B, pp, tg = a.batch, a.batch_prompt_tokens, a.batch_new_tokens
    rows = {}
    for name, path in (("bf16", a.work / "model-bf16.gguf"), ("Q4_0", a.work / "model-q4_0.gguf")):
        r = subprocess.run([str(a.llama_bin / "llama-batched-bench"), "-m", str(path), "-t", str(a.threads),
                            "-c", str(B * (pp + tg + 16)), "-b", "2048", "-ub", "512", "-npp", str(pp), "-ntg",
                            str(tg), "-npl", str(B), "--output-format", "jsonl"],
                           capture_output=True, text=True, check=True, timeout=3600)
        rec = next(json.loads(x) for x in r.stdout.splitlines() if x.startswith("{") and "speed_tg" in x)
        rows[name] = {"t_pp_s": rec["t_pp"], "t_tg_s": rec["t_tg"], "s_tg_tok_s": rec["speed_tg"],
                      "gen_tok_s": B * tg / rec["t"], "pl": rec["pl"]}
        log(f"llama.cpp batched {name}: S_TG {rec['speed_tg']:.1f}, generated / job {B * tg / rec['t']:.1f}")
    return rows


def llama_rows(a: argparse.Namespace, ckpt: Path, prompt_tokens: int) -> dict:
    """llama-bench tg / pp on the bf16 GGUF and its Q4_0 (made when absent)."""
    bf16, q40 = a.work / "model-bf16.gguf", a.work / "model-q4_0.gguf"
    if not bf16.exists():
        log("converting to a bf16 GGUF")
        subprocess.run([sys.executable, str(REPO / "tools" / "convert_gguf.py"), "--llama-dir", str(a.llama_dir),
                        str(ckpt), "--outtype", "bf16", "--outfile", str(bf16)], check=True, capture_output=True)
    kept = []
    if not q40.exists():
        r = subprocess.run([str(a.llama_bin / "llama-quantize"), str(bf16), str(q40), "Q4_0"], capture_output=True,
                           text=True, check=True)
        kept = sorted({ln.split(" - ")[0].split("]")[-1].strip() + " " + ln.split("converting to")[1].split()[0]
                       for ln in r.stdout.splitlines() + r.stderr.splitlines()
                       if "converting to" in ln and "converting to q4_0" not in ln})
    rows: dict = {}
    for name, path in (("bf16", bf16), ("Q4_0", q40)):
        r = subprocess.run([str(a.llama_bin / "llama-bench"), "-m", str(path), "-t", str(a.threads), "-p",
                            str(prompt_tokens), "-n", str(a.new_tokens), "-r", str(a.repeats), "-o", "json"],
                           capture_output=True, text=True, check=True, timeout=3600)
        recs = json.loads(r.stdout)
        tg = next(x for x in recs if x["n_gen"] > 0)
        pp = next(x for x in recs if x["n_prompt"] > 0)
        rows[name] = {"tg_tok_s": tg["avg_ts"], "tg_stddev": tg["stddev_ts"], "pp_tok_s": pp["avg_ts"],
                      "pp_tokens": pp["n_prompt"], "gguf": path.name}
        log(f"llama.cpp {name}: tg {tg['avg_ts']:.2f}, pp{pp['n_prompt']} {pp['avg_ts']:.1f}")
    rows["q4_0_kept_higher"] = kept
    return rows


def long_prompt(a: argparse.Namespace, lays: dict[str, Path], tok, ckpt: Path) -> dict:
    """--long-prompt-tokens N: the q4 layout's warm prefill of an N-token prompt (the eval files one after another)
    in each activation mode and compute dtype, and llama-bench's ppN on the Q4_0 GGUF in the same run."""
    n = a.long_prompt_tokens
    text = "".join(f.read_text() for f in sorted((REPO.parent / "shared" / "text" / "eval").glob("*")))
    ids = tok.encode(text)[:n]
    if len(ids) < n:
        raise SystemExit(f"the eval files hold {len(ids)} tokens, fewer than --long-prompt-tokens {n}")
    prompt = a.work / f"prompt-{n}.txt"
    prompt.write_text(tok.decode(ids))
    out: dict = {"prompt_tokens": n, "rows": {}}
    for dtype, mode in (("float32", "native"), ("bfloat16", "native"), ("float32", "native-q8"),
                        ("bfloat16", "native-q8")):
        w = warm_prefill(lays["q4"], prompt, dtype, mode, a.threads, 2)
        out["rows"][f"q4/{dtype}/{mode}"] = w
        log(f"long prompt q4/{dtype}/{mode}: {w['prompt_tokens']} tokens, warm {w['warm_tok_s']:.1f} tok/s")
    if a.llama_bin:
        q40 = a.work / "model-q4_0.gguf"
        if not q40.exists():
            llama_rows(a, ckpt, a.prompt_tokens)  # makes the GGUFs
        r = subprocess.run([str(a.llama_bin / "llama-bench"), "-m", str(q40), "-t", str(a.threads), "-p", str(n),
                            "-n", "0", "-r", "2", "-o", "json"], capture_output=True, text=True, check=True,
                           timeout=3600)
        pp = next(x for x in json.loads(r.stdout) if x["n_prompt"] > 0)
        out["llamacpp_q4_0_pp_tok_s"] = pp["avg_ts"]
        out["vs_llamacpp"] = {k: v["warm_tok_s"] / pp["avg_ts"] for k, v in out["rows"].items()}
        log(f"llama.cpp Q4_0 pp{n}: {pp['avg_ts']:.1f}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", type=Path, default=None, help=f"checkpoint (default: {PRESET} under --work)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tiered-cpu-native")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--torch-tokens", type=int, default=6, help="new tokens of the (slow) torch q4 row")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--batch", type=int, default=16, help="prompts of the batch job (and --max-batch); 0 skips it")
    ap.add_argument("--batch-prompt-tokens", type=int, default=64)
    ap.add_argument("--batch-new-tokens", type=int, default=32)
    ap.add_argument("--llama-bin", type=Path, default=None, help="llama.cpp's bin/ (CPU build); omit to skip")
    ap.add_argument("--llama-dir", type=Path, default=REPO / ".carry" / "llama.cpp", help="llama.cpp source")
    ap.add_argument("--long-prompt-tokens", type=int, default=0,
                    help="also a long prompt's warm prefill (a document to summarise): q4 in both activation modes "
                         "and compute dtypes against llama-bench's ppN (0: skip)")
    ap.add_argument("--only-long", action="store_true", help="run the long prompt's rows only (needs the layouts)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" /
                    f"cpu-native-{datetime.date.today().isoformat()}.json")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ckpt, lays = prepare(a)
    from tiered.engine import load

    eng = load(lays["bf16"], device="cpu")
    tok = eng.tokenizer
    text = sorted((REPO.parent / "shared" / "text" / "eval").glob("*"))[0].read_text()
    ids = tok.encode(text)[:a.prompt_tokens]
    prompt = a.work / "prompt.txt"
    prompt.write_text(tok.decode(ids))
    del eng
    if a.only_long:
        if not a.long_prompt_tokens:
            raise SystemExit("--only-long needs --long-prompt-tokens N")
        res = {"bench": "cpu-native-long", "model": str(ckpt), "preset": None if a.model else PRESET,
               "threads": a.threads, "cpu": cpu_name(), "host": platform.node(),
               "long_prompt": long_prompt(a, lays, tok, ckpt), "commit": git_commit(),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "seconds": time.perf_counter() - t0}
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=1) + "\n")
        print(write_out(res, a.out.name))
        return
    rows = tiered_rows(a, lays, prompt)
    batch = batch_rows(a, lays, tok) if a.batch else None
    res: dict = {"bench": "cpu-native", "model": str(ckpt), "preset": None if a.model else PRESET,
                 "threads": a.threads, "cpu": cpu_name(), "host": platform.node(), "tiered": rows,
                 "tokens_identical_fp32": check_tokens(rows, a)}
    for r in rows.values():
        r.pop("text")
    nat = {k: rows[f"{k}/float32/native"]["decode_tok_s"] for k in ("bf16", "q4")}
    res["native_vs_torch_decode"] = {k: nat[k] / rows[f"{k}/float32/torch"]["decode_tok_s"] for k in nat}
    res["q4_vs_bf16_native_decode"] = nat["q4"] / nat["bf16"]
    if a.llama_bin:
        lr = llama_rows(a, ckpt, rows["bf16/float32/native"]["prompt_tokens"])
        res["llamacpp"] = lr
        res["vs_llamacpp_decode"] = {"bf16": nat["bf16"] / lr["bf16"]["tg_tok_s"],
                                     "q4_fp32": nat["q4"] / lr["Q4_0"]["tg_tok_s"],
                                     "q4_bf16": rows["q4/bfloat16/native"]["decode_tok_s"] / lr["Q4_0"]["tg_tok_s"],
                                     "q4_fp32_q8act": rows["q4/float32/native-q8"]["decode_tok_s"] /
                                     lr["Q4_0"]["tg_tok_s"],
                                     "q4_bf16_q8act": rows["q4/bfloat16/native-q8"]["decode_tok_s"] /
                                     lr["Q4_0"]["tg_tok_s"]}
        res["vs_llamacpp_prefill"] = {"bf16": rows["bf16/float32/native"]["prefill_tok_s"] / lr["bf16"]["pp_tok_s"],
                                      "q4": rows["q4/float32/native"]["prefill_tok_s"] / lr["Q4_0"]["pp_tok_s"]}
        # llama-bench's pp is warm (a warm-up run first): the like-for-like ratio
        res["vs_llamacpp_prefill_warm"] = {
            "bf16": rows["bf16/float32/native"]["prefill_warm_tok_s"] / lr["bf16"]["pp_tok_s"],
            "q4": rows["q4/float32/native"]["prefill_warm_tok_s"] / lr["Q4_0"]["pp_tok_s"],
            "q4_bf16": rows["q4/bfloat16/native"]["prefill_warm_tok_s"] / lr["Q4_0"]["pp_tok_s"],
            "q4_q8act": rows["q4/float32/native-q8"]["prefill_warm_tok_s"] / lr["Q4_0"]["pp_tok_s"]}
    if batch:
        res["batch"] = {"prompts": a.batch, "prompt_tokens": a.batch_prompt_tokens,
                        "new_tokens": a.batch_new_tokens, "rows": batch}
        res["batch"]["native_vs_torch_job"] = {k: batch[f"{k}/native"]["tok_s"] / batch[f"{k}/torch"]["tok_s"]
                                               for k in ("bf16", "q4")}
        if a.llama_bin:
            lb = llama_batched(a)
            res["batch"]["llamacpp"] = lb
            res["batch"]["vs_llamacpp_decode"] = {
                k: batch[f"{k}/native"]["decode_tok_s"] / lb[g]["s_tg_tok_s"] for k, g in (("bf16", "bf16"),
                                                                                          ("q4", "Q4_0"))}
            res["batch"]["vs_llamacpp_job"] = {
                k: batch[f"{k}/native"]["tok_s"] / lb[g]["gen_tok_s"] for k, g in (("bf16", "bf16"), ("q4", "Q4_0"))}
            res["batch"]["vs_llamacpp_job"]["q4_q8act"] = batch["q4/native-q8"]["tok_s"] / lb["Q4_0"]["gen_tok_s"]
            res["batch"]["vs_llamacpp_decode"]["q4_q8act"] = \
                batch["q4/native-q8"]["decode_tok_s"] / lb["Q4_0"]["s_tg_tok_s"]
    for k in ("bf16", "q4"):
        res.setdefault("native_vs_torch_prefill_warm", {})[k] = \
            rows[f"{k}/float32/native"]["prefill_warm_tok_s"] / rows[f"{k}/float32/torch"]["prefill_warm_tok_s"]
    if a.long_prompt_tokens:
        res["long_prompt"] = long_prompt(a, lays, tok, ckpt)
    res.update({"commit": git_commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                "seconds": time.perf_counter() - t0})
    print(f"{'row':<24} {'decode tok/s':>13} {'prefill tok/s':>14} {'warm prefill':>13}")
    for k, r in rows.items():
        print(f"{k:<24} {r['decode_tok_s']:>13.2f} {r['prefill_tok_s']:>14.1f} "
              f"{r['prefill_warm_tok_s']:>13.1f}")
    for k, r in res.get("llamacpp", {}).items():
        if isinstance(r, dict):
            print(f"{'llama.cpp ' + k:<24} {r['tg_tok_s']:>13.2f} {r['pp_tok_s']:>14.1f}")
    for k, r in (batch or {}).items():
        if isinstance(r, dict):
            print(f"{'batch ' + k:<24} {r['decode_tok_s']:>13.2f} {'':>14} job {r['tok_s']:.1f} tok/s")
    for k, r in res.get("batch", {}).get("llamacpp", {}).items():
        print(f"{'llama.cpp batched ' + k:<24} {r['s_tg_tok_s']:>13.2f} {'':>14} job {r['gen_tok_s']:.1f} tok/s")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1) + "\n")
    print(write_out(res, a.out.name))


if __name__ == "__main__":
    main()
