"""Kernels per decode token, where their device time goes, and the graphed step's wall time: glue kernels on vs off.

On CUDA: every expert resident, the one-token step that the graphs capture (Transformer.decode_static) runs eagerly
for N tokens under torch.profiler; printed per token: kernel launches, per layer, device us by kernel name (top 25) and the total
kernel us, against the wall time of the same step replayed from a CUDA graph (decode/graphed.py) on the same model.
On CPU (no GPU; the count only): each aten op of the step that is not a view is counted as one launch, and the
glue kernels' launches (run by Triton's interpreter) are counted separately; times are not meaningful there.

    python3 tools/profile_kernels.py --preset qwen3-10b-8l --work /root/pk                  # build + repack, bf16
    python3 tools/profile_kernels.py --preset qwen3-10b-8l --work /root/pk --experts q4 --dense q4
    python3 tools/profile_kernels.py -m LAYOUT_OR_CHECKPOINT --tokens 32 --glue both
    python3 tools/profile_kernels.py -m LAYOUT --glue on --timeline    # + what each kernel adds to a replayed step
    python3 tools/profile_kernels.py --preset qwen3-tiny --work /tmp/pk                     # CPU: launch counts

The last stdout line is one JSON object (per glue setting: kernels_per_token, kernels_per_layer, kernel_us_per_token,
graphed_ms_per_token, graphed_tok_s, top kernels); --json also writes it to $OUT/profile-kernels.json.
"""
from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():  # the glue kernels run on CPU tensors only under Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
from benchmeta import git_commit, write_out  # noqa: E402


def log(msg: str) -> None:
    print(f"[profile-kernels] {msg}", file=sys.stderr, flush=True)


def layout_for(a: argparse.Namespace, device: str) -> Path:
    """-m as given (a checkpoint is repacked by tiered.load's cache), or the preset built and repacked under --work
    (reused when present)."""
    if a.model:
        return Path(a.model)
    from make_random_checkpoint import make

    from tiered.layout.repack import repack

    work = Path(a.work)
    ck = work / f"ckpt-{a.preset}"
    if not (ck / "config.json").is_file():
        t0 = time.perf_counter()
        make(a.preset, ck, seed=a.seed, device=device)
        log(f"built {a.preset} in {time.perf_counter() - t0:.1f}s")
    lay = work / f"layout-{a.preset}-{a.experts}-{a.dense}"
    if not (lay / "manifest.json").is_file():
        t0 = time.perf_counter()
        repack(ck, lay, experts=a.experts, dense=a.dense, force=True, progress=False, quant_device=device)
        log(f"repacked --experts {a.experts} --dense {a.dense} in {time.perf_counter() - t0:.1f}s")
    return lay


VIEW_OPS = {"view", "_unsafe_view", "reshape", "slice", "select", "transpose", "t", "unsqueeze", "squeeze", "expand",
            "as_strided", "permute", "detach", "alias", "unbind", "split", "split_with_sizes", "narrow", "empty",
            "empty_strided", "empty_like", "lift_fresh", "_reshape_alias", "unflatten", "flatten", "contiguous",
            "item", "_local_scalar_dense", "is_same_size", "view_as", "numpy_T", "clone_if_needed", "sym_size",
            "sym_stride", "sym_numel", "dim", "size", "stride", "set_", "resize_", "resolve_conj", "resolve_neg"}


class _Counting:
    """A Triton kernel handle that counts its launches (CPU mode: the interpreter's launches are not aten ops)."""

    def __init__(self, kernel, name: str, counts: collections.Counter, state: dict) -> None:
        self.kernel, self.name, self.counts, self.state = kernel, name, counts, state

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kw):
            self.counts[f"triton:{self.name}"] += 1
            if self.state["trace"] is not None:
                self.state["trace"].append(f"triton:{self.name}")
            self.state["paused"] = True  # the interpreter's own tensor copies are not launches
            try:
                return launch(*args, **kw)
            finally:
                self.state["paused"] = False

        return run


def count_cpu(model, tokens: int, start: int, trace: list | None = None) -> dict:
    """CPU: the launches of the one-token step the graphs capture (decode_static; aten ops that are not views, +
    the glue kernels). The expert and attention ops are the CPU path's, not the CUDA kernels'."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts: collections.Counter = collections.Counter()
    state = {"paused": False, "trace": trace}

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.__name__.split(".")[0]
            out = func(*args, **(kwargs or {}))
            if name == "to" and args and out is args[0]:
                return out  # a no-op cast launches nothing
            if not state["paused"] and name not in VIEW_OPS:
                counts[f"aten:{name}"] += 1
                if trace is not None:
                    trace.append(f"aten:{name}")
            return out

    from tiered.kernels import fused_norm, fused_rope, fused_route

    saved = (fused_norm._ADD_NORM, fused_rope._QK_ROPE, fused_route._SOFTMAX_TOPK, fused_route._ROUTER)
    fused_norm._ADD_NORM = _Counting(saved[0], "add_rms_norm", counts, state)
    fused_rope._QK_ROPE = _Counting(saved[1], "qk_rope", counts, state)
    fused_route._SOFTMAX_TOPK = _Counting(saved[2], "softmax_topk", counts, state)
    fused_route._ROUTER = _Counting(saved[3], "router_topk", counts, state)
    try:
        toks = torch.arange(7, 7 + tokens)
        pos = torch.arange(start, start + tokens)
        span = model.graph_span(start + tokens)
        with torch.inference_mode(), Mode():
            for i in range(tokens):  # the step the graphs capture
                model.decode_static(toks[i:i + 1], pos[i:i + 1], span)
    finally:
        fused_norm._ADD_NORM, fused_rope._QK_ROPE, fused_route._SOFTMAX_TOPK, fused_route._ROUTER = saved
    per_tok = {k: v / tokens for k, v in counts.most_common()}
    return {"launches_per_token": sum(per_tok.values()), "by_op": per_tok}


def profile_cuda(model, tokens: int, start: int) -> dict:
    """CUDA: the one-token step the graphs capture (Transformer.decode_static), run eagerly under torch.profiler;
    kernel launches and device time per token. Tokens and positions are device rows made before profiling."""
    from torch.profiler import ProfilerActivity, profile

    dev = model.device
    toks = torch.arange(7, 7 + tokens + 3, device=dev)
    pos = torch.arange(start, start + tokens + 3, device=dev)
    span = model.graph_span(start + tokens + 3)

    def step(i: int) -> None:
        model.decode_static(toks[i:i + 1], pos[i:i + 1], span)

    with torch.inference_mode():
        for i in range(3):  # warm-up: Triton compiles, cuBLAS handles
            step(i)
        torch.cuda.synchronize(dev)
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for i in range(3, tokens + 3):
                step(i)
            torch.cuda.synchronize(dev)
    n: collections.Counter = collections.Counter()
    us: collections.Counter = collections.Counter()
    events = list(prof.events())
    for e in events:  # device-side events (kernels, memcpy, memset) as the profiler lists them
        if e.device_type == torch.autograd.DeviceType.CUDA:
            n[e.name] += 1
            us[e.name] += e.time_range.elapsed_us()
    if not n:  # older layouts of the profiler's results: the kernels hang off the CPU ops that launched them
        for e in events:
            for k in getattr(e, "kernels", []):
                n[k.name] += 1
                us[k.name] += k.duration
    top = [{"kernel": k[:120], "per_token": n[k] / tokens, "us_per_token": us[k] / tokens}
           for k, _ in us.most_common(25)]
    return {"launches_per_token": sum(n.values()) / tokens, "kernel_us_per_token": sum(us.values()) / tokens,
            "top": top}


def graphed_ms(model, tokens: int, start: int) -> float:
    """Wall ms per token of the one-token step replayed from a CUDA graph (decode/graphed.py) on the same model."""
    from tiered.decode.graphed import GraphedDecode

    g = GraphedDecode(model)
    g.capture_all()
    tok = torch.tensor([11], device=model.device)
    for i in range(5):
        g.step(tok, start + i)
    torch.cuda.synchronize(model.device)
    t0 = time.perf_counter()
    for i in range(tokens):
        g.step(tok, start + 5 + i)
    torch.cuda.synchronize(model.device)
    ms = (time.perf_counter() - t0) * 1e3 / tokens
    del g
    return ms


def timeline_cuda(model, tokens: int, start: int) -> dict:
    """CUDA: the step replayed from its CUDA graph (GraphedDecode.launch, greedy, the pick included) for `tokens`
    steps under torch.profiler; from each kernel's device start and end (the chrome trace's kernel events), per kernel
    name and per token: launches, device us (with PDL a kernel's span includes its wait), and `advance_us`: how much
    later than every kernel before it the kernel ends, i.e. what it adds to the token (the advances of a step sum to
    its span from its first kernel's start). `gap_us`: from a step's last kernel's end to the next step's first
    kernel's start (the graph launch between two replays)."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    from tiered.decode.graphed import GraphedDecode

    g = GraphedDecode(model)
    g.capture_all()
    g.start(torch.tensor([11], device=model.device), start)
    for i in range(5):
        g.launch(start + i)
    torch.cuda.synchronize(model.device)
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for i in range(tokens):
            g.launch(start + 5 + i)
        torch.cuda.synchronize(model.device)
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        trace = json.loads(Path(f.name).read_text())
    ks = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"]), e["name"]) for e in trace.get("traceEvents", [])
                if e.get("cat") == "kernel" and "dur" in e)
    del g
    return step_advances(ks, tokens)


def step_advances(ks: list[tuple[float, float, str]], tokens: int) -> dict:
    """The timeline's arithmetic: ks = every kernel of `tokens` consecutive steps as (start, end, name) in start order
    (us) -> per name and per position in the step: launches and us a token, `advance_us` (how much later than every
    kernel before it in its step the kernel ends: what it adds to the token), `start_after_us` (its start against
    the latest end before it: negative where it overlapped, PDL), the steps' span and the gap between steps."""
    if not ks:
        return {"error": "the profiler recorded no kernel inside the graph replays"}
    per = len(ks) / tokens
    if per != int(per):
        return {"error": f"{len(ks)} kernels over {tokens} replays: not a whole number a step"}
    per = int(per)
    n: collections.Counter = collections.Counter()
    dur: collections.Counter = collections.Counter()
    adv: collections.Counter = collections.Counter()
    at_dur, at_adv, at_lag = [0.0] * per, [0.0] * per, [0.0] * per  # by position in the step
    gaps = []
    for t in range(tokens):
        step = ks[t * per:(t + 1) * per]
        if t:
            gaps.append(step[0][0] - ks[t * per - 1][1])
        done = step[0][0]
        for i, (s0, s1, name) in enumerate(step):
            n[name] += 1
            dur[name] += s1 - s0
            a = max(0.0, s1 - done)
            adv[name] += a
            at_dur[i] += s1 - s0
            at_adv[i] += a
            at_lag[i] += s0 - done  # negative: it started before everything before it had ended (PDL)
            done = max(done, s1)
    rows = [{"kernel": k[:120], "per_token": n[k] / tokens, "us_per_token": dur[k] / tokens,
             "advance_us_per_token": adv[k] / tokens} for k, _ in adv.most_common()]
    names = [name for _, _, name in ks[:per]]
    steps = [{"at": i, "kernel": names[i][:60], "us": at_dur[i] / tokens, "advance_us": at_adv[i] / tokens,
              "start_after_us": at_lag[i] / tokens} for i in range(per)]
    return {"kernels_per_step": per, "span_us_per_token": sum(adv.values()) / tokens,
            "gap_us": sum(gaps) / max(1, len(gaps)), "rows": rows, "steps": steps}


def share_dense(model, which: str) -> None:
    """A diagnostic: every attention layer's o_proj ("o"), qkv ("qkv") or both read layer 0's weights (same shapes),
    so that across a step those bytes come from L2 instead of HBM. The tokens are not the model's; the timing tells
    what L2-resident dense weights would save the step (before building prefetches that put them there)."""
    import dataclasses

    first = next(lw.attn for lw in model.layers if lw.attn is not None)
    for i, lw in enumerate(model.layers):
        if lw.attn is None:
            continue
        kw = {}
        if which in ("o", "both"):
            kw["o"] = first.o
        if which in ("qkv", "both"):
            kw["qkv"] = first.qkv
        model.layers[i] = dataclasses.replace(lw, attn=dataclasses.replace(lw.attn, **kw))
    log(f"share-dense {which}: every layer reads layer 0's weights (a diagnostic: not the model's tokens)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=None, help="layout or checkpoint (default: --preset under --work)")
    ap.add_argument("--preset", default="qwen3-10b-8l", help="tools/make_random_checkpoint.py preset")
    ap.add_argument("--work", default="/tmp/tiered-profile-kernels")
    ap.add_argument("--experts", default="source", help="repack --experts for --preset (source, q4, q8, ...)")
    ap.add_argument("--dense", default="source", help="repack --dense for --preset")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokens", type=int, default=16, help="profiled one-token steps")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens before the profiled steps")
    ap.add_argument("--glue", choices=("on", "off", "both"), default="both")
    ap.add_argument("--attn", default="auto")
    ap.add_argument("--json", action="store_true", help="also write $OUT/profile-kernels.json")
    ap.add_argument("--trace", action="store_true", help="CPU: print the launches of one step in order")
    ap.add_argument("--timeline", action="store_true",
                    help="CUDA: also profile the graph replays: what each kernel adds to the token (timeline_cuda)")
    ap.add_argument("--share-dense", choices=("none", "o", "qkv", "both"), default="none",
                    help="a diagnostic, not the model: every layer reads layer 0's o_proj / qkv / both, so those "
                         "weights stay in L2 across layers; what the step would gain were they L2-resident "
                         "(share_dense)")
    a = ap.parse_args()
    import tiered

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    lay = layout_for(a, device)
    res: dict = {"layout": str(lay), "device": torch.cuda.get_device_name() if cuda else "cpu", "tokens": a.tokens,
                 "experts": a.experts, "dense": a.dense, "commit": git_commit(), "runs": {}}
    for glue in ((False, True) if a.glue == "both" else (a.glue == "on",)):
        name = "glue" if glue else "torch"
        eng = tiered.load(lay, device=device, dtype="bfloat16", attn=a.attn,
                          max_context=a.prompt + 3 * a.tokens + 64, cuda_graphs=False, glue=glue)
        m = eng.model
        L = m.config.num_layers
        if a.share_dense != "none":
            share_dense(m, a.share_dense)
            res["share_dense"] = a.share_dense
        prompt = torch.arange(100, 100 + a.prompt, device=m.device)
        m.forward(prompt, 0)
        if cuda:
            r = profile_cuda(m, a.tokens, a.prompt)
            r["graphed_ms_per_token"] = graphed_ms(m, a.tokens, a.prompt + a.tokens + 3)
            r["graphed_tok_s"] = 1e3 / r["graphed_ms_per_token"]
            if a.timeline:
                r["timeline"] = timeline_cuda(m, a.tokens, a.prompt + 2 * a.tokens + 8)
        else:
            r = count_cpu(m, min(a.tokens, 4), a.prompt)
            if a.trace:
                seq: list = []
                count_cpu(m, 1, a.prompt + 4, seq)
                print(f"\n-- one step, glue {'on' if glue else 'off'}: " + " ".join(seq))
        r["kernels_per_token"] = r["launches_per_token"]
        r["kernels_per_layer"] = r["launches_per_token"] / L
        r["layers"] = L
        res["runs"][name] = r
        print(f"\n== glue {'on' if glue else 'off'}: {r['kernels_per_token']:.1f} launches per token, "
              f"{r['kernels_per_layer']:.1f} per layer ({L} layers, head included)")
        if cuda:
            print(f"   kernel time {r['kernel_us_per_token']:.1f} us per token; graphed step "
                  f"{r['graphed_ms_per_token'] * 1e3:.1f} us ({r['graphed_tok_s']:.1f} tok/s)")
            print(f"   {'kernel':<90} {'n/tok':>6} {'us/tok':>8}")
            for t in r["top"]:
                print(f"   {t['kernel'][:90]:<90} {t['per_token']:>6.1f} {t['us_per_token']:>8.1f}")
            tl_ = r.get("timeline")
            if tl_ and "rows" in tl_:
                print(f"   replayed: {tl_['kernels_per_step']} kernels a step, span {tl_['span_us_per_token']:.1f} us, "
                      f"gap between replays {tl_['gap_us']:.1f} us")
                print(f"   {'kernel':<70} {'n/tok':>6} {'us/tok':>8} {'adds/tok':>9}")
                for t in tl_["rows"]:
                    print(f"   {t['kernel'][:70]:<70} {t['per_token']:>6.1f} {t['us_per_token']:>8.1f} "
                          f"{t['advance_us_per_token']:>9.1f}")
                print(f"   {'at':>4} {'kernel (the first layer, then the last kernels)':<48} {'us':>7} {'adds':>7} "
                      f"{'starts':>7}")
                st = tl_["steps"]
                for t in st[:12] + st[-6:]:
                    print(f"   {t['at']:>4} {t['kernel'][:48]:<48} {t['us']:>7.2f} {t['advance_us']:>7.2f} "
                          f"{t['start_after_us']:>7.2f}")
            elif tl_:
                print(f"   replayed: {tl_['error']}")
        else:
            print(f"   {'op':<40} {'n/tok':>6}")
            for k, v in r["by_op"].items():
                print(f"   {k:<40} {v:>6.1f}")
        del eng, m
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    runs = res["runs"]
    if "glue" in runs and "torch" in runs:
        res["kernels_per_layer_torch"] = runs["torch"]["kernels_per_layer"]
        res["kernels_per_layer_glue"] = runs["glue"]["kernels_per_layer"]
        if cuda:
            res["graphed_speedup"] = runs["torch"]["graphed_ms_per_token"] / runs["glue"]["graphed_ms_per_token"]
    line = write_out(res, "profile-kernels.json") if a.json else json.dumps(res)
    print(line)


if __name__ == "__main__":
    main()
