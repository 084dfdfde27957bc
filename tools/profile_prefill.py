"""Where a prefill's time goes: the warm prefill rate at several prompt lengths, then one prefill of each length
under torch.profiler, split into the device's kernel time (by kernel name) and the host's wall time.

A prefill whose kernel time is far below its wall time is bound by the host (Python, launches); one whose kernel
time is near its wall time is bound by the kernels, which the table then ranks. CUDA only (the CPU has no separate
device time).

    python3 tools/profile_prefill.py -m LAYOUT --tokens 512,2048,8192
    python3 tools/profile_prefill.py -m LAYOUT --tokens 512 --top 30 --json     # also $OUT/profile-prefill.json
    python3 tools/profile_prefill.py -m LAYOUT --tokens 4000 --chunks 512,2048,4096 --no-profile  # the chunk's effect
    python3 tools/profile_prefill.py -m LAYOUT --tokens 64,512 --modes graphs,eager --no-profile --repeats 5

The last stdout line is one JSON object: per length, the warm prefill tok/s (median of --repeats), the profiled
run's wall ms, kernel ms (sum over kernels; streams that overlap count twice), launches, and the top kernels.
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
from benchmeta import git_commit, write_out  # noqa: E402


def _kernel_table(prof) -> tuple[collections.Counter, collections.Counter]:
    """(launches, us) by device-side event name (kernels, memcpy, memset)."""
    n: collections.Counter = collections.Counter()
    us: collections.Counter = collections.Counter()
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            n[e.name] += 1
            us[e.name] += e.time_range.elapsed_us()
    return n, us


def profile_length(eng, vocab: int, tokens: int, repeats: int, top: int, profiled: bool = True) -> dict:
    """The warm prefill rate of a `tokens`-long prompt (each run synchronised), and one profiled prefill of it."""
    from torch.profiler import ProfilerActivity, profile

    g = torch.Generator().manual_seed(tokens)
    prompt = torch.randint(10, vocab - 10, (tokens,), generator=g).tolist()
    rates = []
    ids = torch.tensor(prompt, device=eng.device)
    for _ in range(repeats + 1):  # the first run compiles and is dropped
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            eng._prefill(ids)
        torch.cuda.synchronize()
        rates.append(tokens / (time.perf_counter() - t0))
    if not profiled:
        return {"tokens": tokens, "prefill_tok_s_warm": statistics.median(rates[1:]), "runs": rates[1:],
                "first_run_tok_s": rates[0]}
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        eng.generate(prompt, max_new_tokens=1, stop_at_eos=False)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    n, us = _kernel_table(prof)
    kernel_ms = sum(us.values()) / 1e3
    return {"tokens": tokens, "prefill_tok_s_warm": statistics.median(rates[1:]), "runs": rates[1:],
            "profiled_wall_ms": wall * 1e3, "kernel_ms": kernel_ms, "kernel_share": kernel_ms / (wall * 1e3),
            "launches": sum(n.values()),
            "top": [{"kernel": k[:120], "launches": n[k], "ms": v / 1e3} for k, v in us.most_common(top)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True, help="a layout (or a checkpoint tiered.load repacks)")
    ap.add_argument("--tokens", default="512,2048", help="prompt lengths, comma-separated")
    ap.add_argument("--repeats", type=int, default=3, help="warm prefills timed per length (median)")
    ap.add_argument("--top", type=int, default=20, help="kernels listed per length")
    ap.add_argument("--chunks", default="", help="prefill chunks (Engine.prefill_chunk) to run each length at, "
                                                 "comma-separated; 0 = the engine's own choice (the default)")
    ap.add_argument("--no-profile", action="store_true", help="only the warm rates (no profiled run)")
    ap.add_argument("--json", action="store_true", help="also write $OUT/profile-prefill.json")
    ap.add_argument("--modes", default="graphs",
                    help="comma list: graphs (the engine as loaded: a single-chunk prompt's bucket is captured on "
                         "its second prefill and replayed after), eager (the prefill graphs off)")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("profile_prefill needs CUDA: the CPU has no device time to split from the host's")
    import tiered

    lengths = [int(t) for t in a.tokens.split(",") if t]
    eng = tiered.load(a.model, device="cuda", dtype="bfloat16", max_context=max(lengths) + 16)
    vocab = eng.model.config.vocab_size
    res: dict = {"layout": a.model, "default_chunk": eng.prefill_chunk, "device": torch.cuda.get_device_name(),
                 "commit": git_commit(),
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "lengths": []}
    default = eng.prefill_chunk
    graphs = eng.prefill_graphs
    for mode, chunk in [(m, int(c) or default) for m in a.modes.split(",") if m
                        for c in (a.chunks.split(",") if a.chunks else ["0"]) if c]:
        if mode not in ("graphs", "eager"):
            sys.exit(f"--modes: graphs or eager, not {mode!r}")
        eng.prefill_chunk = chunk
        eng.prefill_graphs = graphs if mode == "graphs" else None
        for t in lengths:
            r = profile_length(eng, vocab, t, a.repeats, a.top, profiled=not a.no_profile)
            r["chunk"], r["mode"] = chunk, mode
            if mode == "graphs":
                r["prefill_graphs"] = graphs.stats() if graphs is not None else None
            res["lengths"].append(r)
            print(f"\n== {t} tokens, chunk {chunk}, {mode}: warm {r['prefill_tok_s_warm']:,.0f} tok/s", end="")
            if a.no_profile:
                print(f" {[round(x) for x in r['runs']]}")
                continue
            print(f"; profiled run {r['profiled_wall_ms']:.2f} ms wall, {r['kernel_ms']:.2f} ms of kernels "
                  f"({r['kernel_share']:.0%}), {r['launches']} launches")
            for k in r["top"]:
                print(f"   {k['kernel'][:96]:<96} {k['launches']:>5} {k['ms']:>8.3f} ms")
    print(write_out(res, "profile-prefill.json") if a.json else json.dumps(res))


if __name__ == "__main__":
    main()
