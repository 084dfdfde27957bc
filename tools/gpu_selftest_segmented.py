"""GPU self-test of the piecewise decode step (tiered/piecewise.py): correctness, then speed.

1. Identity, on the embedded reference model (olmoe-code-17m, repacked into the layout cache):
   - resident experts, fp32: whole-step graphs vs eager, greedy tokens over 150 steps (crosses span 128);
   - expert cache at --expert-slots 16 and 64, fp32, copies "graph" and "host": piecewise graphs vs the
     eager step, greedy tokens over 150 steps (crossing span 128);
   - fp32 and bf16, slots 16: piecewise graphs vs the same segments run eagerly (same kernels): logits
     bit-identical at every step, and the same cache get() sequence;
   - an observer and a prefetch hook set: piecewise graphs vs eager segments, same tokens, routing seen by
     the observer and prefetches.
2. Speed, on --layout (e.g. the 10.6B Qwen3-MoE layout of bench_offload_gpu.py), bf16, batch 1,
   --prompt-tokens random ids, --new-tokens greedy (a warm-up generate of the same lengths with
   another prompt first, so that graphs are captured and the cache is warm but not primed):
   resident + whole-step graphs, resident + piecewise (the cost of the per-layer host round trip alone),
   cache eager, cache piecewise ("graph" copies), cache piecewise ("host" copies), at --budget.
   Also: host->GPU GB/s of block-sized copies from pinned memory, and the issue-4 bound
   max(compute time, miss bytes / H2D GB/s) with compute time = 1 / resident-graphs tok/s.

    python3 tools/gpu_selftest_segmented.py --layout /root/bench/qwen3-10b-layout      # GPU box, < 3 min
    python3 tools/gpu_selftest_segmented.py --skip-timing                              # identity only
    python3 tools/gpu_selftest_segmented.py --device cpu --layout /tmp/tiny-layout     # script check, CPU

Prints a table, then one JSON line last; writes $OUT/gpu_selftest_segmented.json when OUT is set.
Exit code 1 when an identity check fails.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmeta import git_commit, write_out  # noqa: E402

import tiered  # noqa: E402
from tiered.piecewise import PiecewiseDecode  # noqa: E402

PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n"


def log(msg: str) -> None:
    print(f"[selftest] {msg}", file=sys.stderr, flush=True)


def free(*engines) -> None:
    for e in engines:
        close = getattr(e.model.provider, "close", None) if e is not None else None
        if close is not None:
            close()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# --- 1. identity ---------------------------------------------------------------------------------
def identity_checks(device: str, new: int) -> list[dict]:
    from tiered.families import default_model_path
    from tiered.repack import ensure_layout

    lay = ensure_layout(default_model_path())
    cuda = device == "cuda"
    checks: list[dict] = []

    def check(name: str, fn) -> None:
        t0 = time.perf_counter()
        try:
            ok, detail = fn()
        except Exception as e:  # noqa: BLE001 - report every failure, keep going
            ok, detail = False, f"{type(e).__name__}: {e}"
        checks.append({"check": name, "ok": bool(ok), "detail": detail, "s": round(time.perf_counter() - t0, 1)})
        log(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")

    def gen(budget, mode, dtype="float32", copies=None, observe=False):
        """mode: "graphs" (the engine's choice with cuda_graphs), "eager" (cuda_graphs=False), or "segments"
        (PiecewiseDecode run eagerly with static positions: the same kernels as the piecewise graphs)."""
        e = tiered.load(lay, device=device, dtype=dtype, max_context=300, budget=budget,
                        cuda_graphs=mode == "graphs")
        if mode == "segments":
            e.pieces = PiecewiseDecode(e.model, graphs=False, static_positions=True)
        if copies is not None and e.pieces is not None:
            e.pieces.copies = copies
        rec = []
        if observe:
            class Obs:
                def on_route(self, layer, hidden, ids, w, logits):
                    rec.append((layer, ids.cpu().tolist(), float(hidden.float().norm())))
            e.model.observer = Obs()
            L = e.config.num_layers
            e.model.prefetch_hook = lambda l, ids: e.model.provider.prefetch(l + 1, ids) if l + 1 < L else None
        g = e.generate(PROMPT, max_new_tokens=new, stop_at_eos=False)
        out = (g.token_ids, g.stats, rec, e.pieces.stats() if e.pieces is not None else None)
        free(e)
        return out

    def resident():
        a, sa, _, _ = gen(None, "graphs")
        b, sb, _, _ = gen(None, "eager")
        same = a == b
        return same and (sa["decode_graphs"] == "full" or not cuda), \
            f"tokens {'identical' if same else 'DIFFER'}; modes {sa['decode_graphs']} vs {sb['decode_graphs']}"

    check("resident fp32: whole-step graphs == eager", resident)

    for slots in (16, 64):
        for copies in ("graph", "host"):
            def cache(slots=slots, copies=copies):
                budget = {"expert_slots": slots, "ram_gb": 0.05}
                a, sa, _, pa = gen(budget, "graphs", copies=copies)
                b, sb, _, _ = gen(budget, "eager")
                same = a == b
                mode_ok = sa["decode_graphs"] == "piecewise" or not cuda
                copies_ok = pa is None or pa["copies"] == copies
                detail = (f"tokens {'identical' if same else 'DIFFER'} (hits/misses {sa['decode']['hits']}/"
                          f"{sa['decode']['misses']} vs {sb['decode']['hits']}/{sb['decode']['misses']}), mode "
                          f"{sa['decode_graphs']}, copies {pa and pa['copies']}, spans {pa and pa['spans']}")
                return same and mode_ok and copies_ok, detail

            check(f"cache slots={slots} copies={copies} fp32: piecewise graphs == eager", cache)

    def bitwise(dtype):
        budget = {"expert_slots": 16, "ram_gb": 0.05}
        ref = tiered.load(lay, device=device, dtype=dtype, max_context=300, budget=budget, cuda_graphs=False)
        seg = tiered.load(lay, device=device, dtype=dtype, max_context=300, budget=budget, cuda_graphs=False)
        eager = PiecewiseDecode(ref.model, graphs=False, static_positions=True)
        graphed = PiecewiseDecode(seg.model, graphs=cuda, static_positions=True)
        ref.model.provider.trace, seg.model.provider.trace = [], []
        ids = ref.encode(PROMPT)
        with torch.inference_mode():
            la = ref.model.forward(torch.tensor(ids, device=ref.device), 0)
            seg.model.forward(torch.tensor(ids, device=seg.device), 0)
            pos, worst, n_diff = len(ids), 0.0, 0
            for _ in range(new - 10):
                tok = int(la[0].argmax())
                la = eager.step(tok, pos)
                lb = graphed.step(tok, pos)
                if not torch.equal(la, lb):
                    n_diff += 1
                    worst = max(worst, float((la.float() - lb.float()).abs().max()))
                pos += 1
        same_gets = ref.model.provider.trace == seg.model.provider.trace
        detail = f"{new - 10} steps, {n_diff} differ (max |diff| {worst:.3g}), cache get()s " \
                 f"{'identical' if same_gets else 'DIFFER'}, copies {graphed.copies}, spans {sorted(graphed.chains)}"
        free(ref, seg)
        return n_diff == 0 and same_gets, detail

    check("cache slots=16 fp32: piecewise graphs bit-identical to eager segments", lambda: bitwise("float32"))
    check("cache slots=16 bf16: piecewise graphs bit-identical to eager segments", lambda: bitwise("bfloat16"))

    def observed():
        budget = {"expert_slots": 16, "ram_gb": 0.05}
        a, sa, ra, _ = gen(budget, "graphs", observe=True)
        b, sb, rb, _ = gen(budget, "segments", observe=True)
        # On CUDA both run the same kernels (norms must match exactly); the CPU dry run compares the unsplit
        # eager step with static-span segments, equal only up to rounding.
        tol = 0.0 if cuda else 1e-5
        norms = len(ra) == len(rb) and all(abs(x[2] - y[2]) <= tol * abs(y[2]) for x, y in zip(ra, rb))
        same = a == b and [x[:2] for x in ra] == [y[:2] for y in rb] and norms \
            and sa["prefetch_issued"] == sb["prefetch_issued"]
        return same and (sa["decode_graphs"] == "piecewise" or not cuda), \
            f"tokens, routing, hidden norms, prefetches {'identical' if same else 'DIFFER'} ({len(ra)} on_route " \
            f"calls, {sa['prefetch_issued']} vs {sb['prefetch_issued']} prefetches), mode {sa['decode_graphs']}"

    check("observer + prefetch hook: piecewise graphs == eager segments", observed)
    return checks


# --- 2. speed ------------------------------------------------------------------------------------
def h2d_gbps(block: int, n: int, device: str) -> float | None:
    if device != "cuda":
        return None
    from tiered.store.io import aligned_empty

    buf, owner = aligned_empty(n * block, pin=True)
    src = buf.view(n, block)
    src.fill_(1)
    dst = torch.empty((n, block), dtype=torch.uint8, device="cuda")
    for i in range(min(n, 4)):
        dst[i].copy_(src[i], non_blocking=True)
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(3):
        for i in range(n):
            dst[i].copy_(src[i], non_blocking=True)
    b.record()
    b.synchronize()
    gbps = 3 * n * block / (a.elapsed_time(b) / 1e3) / 1e9
    del dst
    owner.release()
    return gbps


def timed(engine, prompt: list[int], warm_prompt: list[int], new: int) -> dict:
    engine.generate(warm_prompt, max_new_tokens=new, stop_at_eos=False)  # captures the spans, warms the tiers
    prov = engine.model.provider
    if hasattr(prov, "reset_stats"):
        prov.reset_stats()
    g = engine.generate(prompt, max_new_tokens=new, stop_at_eos=False)
    s = g.stats
    d = s.get("decode") or {}
    row = {"decode_tok_s": s["decode_tok_s"], "mode": s["decode_graphs"], "tokens": g.token_ids[:8],
           "hit_rate": d.get("hit_rate"), "bytes_h2d_per_token": s.get("bytes_h2d_per_token"),
           "stall_share": s.get("stall_share"), "h2d_copy_busy_s": (s.get("vram") or {}).get("copy_s"),
           "decode_s": s.get("decode_s"), "expert_slots": s.get("expert_slots")}
    pw = s.get("piecewise")
    if pw:
        steps = max(1, pw["steps"])
        row.update({"copies": pw["copies"], "host_wait_ms_per_tok": pw["wait_s"] / steps * 1e3,
                    "host_route_ms_per_tok": pw["route_s"] / steps * 1e3})
    return row


def speed(layout: Path, device: str, budget: dict, prompt_n: int, new: int) -> dict:
    from tiered.store.disk import Layout

    lay = Layout.open(layout)
    V = lay.config.vocab_size
    g = torch.Generator().manual_seed(1234)
    prompt = torch.randint(10, V, (prompt_n,), generator=g).tolist()
    warm = torch.randint(10, V, (prompt_n,), generator=g).tolist()
    ctx = prompt_n + new + 8
    dtype = "bfloat16" if device == "cuda" else "float32"
    rows: dict[str, dict] = {}

    def run(make, variants) -> None:
        """One engine (loading the resident 10.6B model once is the slow part), timed once per variant."""
        e = None
        try:
            e = make()
        except Exception as ex:  # noqa: BLE001 - report and go on with the next engine
            for name, _ in variants:
                rows[name] = {"error": f"load: {type(ex).__name__}: {ex}"}
        for name, tweak in variants if e is not None else ():
            t0 = time.perf_counter()
            try:
                if tweak is not None:
                    tweak(e)
                rows[name] = timed(e, prompt, warm, new)
            except Exception as ex:  # noqa: BLE001
                rows[name] = {"error": f"{type(ex).__name__}: {ex}"}
            rows[name]["wall_s"] = round(time.perf_counter() - t0, 1)
            log(f"{name}: {rows[name]}")
        if e is not None:
            free(e)
        del e
        free()

    def resident_pieces(e) -> None:
        e.graphed = None
        e.pieces = PiecewiseDecode(e.model, graphs=device == "cuda")

    def host_copies(e) -> None:
        if e.pieces is not None:
            e.pieces.copies = "host"

    def cache(graphs: bool):
        return lambda: tiered.load(layout, device=device, dtype=dtype, max_context=ctx, budget=budget,
                                   cuda_graphs=graphs)

    run(lambda: tiered.load(layout, device=device, dtype=dtype, max_context=ctx),
        [("resident graphs", None), ("resident piecewise", resident_pieces)])
    # A fresh cache per row: the same timed prompt must not find the experts a previous row loaded.
    run(cache(False), [("cache eager", None)])
    run(cache(True), [("cache piecewise", None)])
    run(cache(True), [("cache piecewise host-copies", host_copies)])

    out: dict = {"rows": rows, "layout": str(layout), "budget": budget, "prompt_tokens": prompt_n, "new_tokens": new}
    out["h2d_gbps"] = h2d_gbps(lay.block_size, 64, device)
    comp = rows.get("resident graphs", {}).get("decode_tok_s")
    if comp and out["h2d_gbps"]:
        for name, r in rows.items():
            if name.startswith("cache") and r.get("decode_tok_s") and r.get("bytes_h2d_per_token") is not None:
                pcie_s = r["bytes_h2d_per_token"] / (out["h2d_gbps"] * 1e9)
                bound = 1.0 / max(1.0 / comp, pcie_s)
                r["bound_tok_s"] = bound
                r["ratio_vs_bound"] = r["decode_tok_s"] / bound
    return out


def table(checks: list[dict], sp: dict | None) -> None:
    print("identity checks")
    for c in checks:
        print(f"  {'ok  ' if c['ok'] else 'FAIL'} {c['check']:<64} {c['detail']}")
    if not sp:
        return
    print(f"\ndecode speed on {sp['layout']} (budget {sp['budget']}, prompt {sp['prompt_tokens']}, "
          f"new {sp['new_tokens']}); H2D {sp['h2d_gbps'] and round(sp['h2d_gbps'], 1)} GB/s")
    hdr = f"  {'run':<30}{'tok/s':>8}{'mode':>11}{'hit':>7}{'MB/tok':>8}{'stall':>7}{'wait':>7}{'route':>7}" \
          f"{'bound':>8}{'ratio':>7}"
    print(hdr)

    def f(v, fmt):
        width = int(fmt.split(".")[0])
        return format(v, fmt) if isinstance(v, (int, float)) else "-".rjust(width)

    for name, r in sp["rows"].items():
        if "error" in r:
            print(f"  {name:<30} ERROR {r['error']}")
            continue
        mb = r["bytes_h2d_per_token"] / 1e6 if r.get("bytes_h2d_per_token") is not None else None
        print(f"  {name:<30}{f(r['decode_tok_s'], '8.1f')}{r['mode']:>11}{f(r.get('hit_rate'), '7.2f')}"
              f"{f(mb, '8.1f')}{f(r.get('stall_share'), '7.2f')}{f(r.get('host_wait_ms_per_tok'), '7.2f')}"
              f"{f(r.get('host_route_ms_per_tok'), '7.2f')}{f(r.get('bound_tok_s'), '8.1f')}"
              f"{f(r.get('ratio_vs_bound'), '7.2f')}")
    print("  (wait / route: host ms per token blocked on segments / spent between them; ratio = tok/s / bound, "
          "goal >= 0.85)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layout", type=Path, default=None, help="layout to time (none: identity checks only)")
    ap.add_argument("--budget", default='{"vram_gb": 4, "ram_gb": 18.4}', help="cache budget flags, JSON")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--identity-tokens", type=int, default=150, help="greedy steps per identity check")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--skip-identity", action="store_true")
    ap.add_argument("--skip-timing", action="store_true")
    a = ap.parse_args()
    t0 = time.perf_counter()
    checks = [] if a.skip_identity else identity_checks(a.device, a.identity_tokens)
    sp = None
    if a.layout is not None and not a.skip_timing:
        sp = speed(a.layout, a.device, json.loads(a.budget), a.prompt_tokens, a.new_tokens)
    table(checks, sp)
    res = {"tool": "gpu_selftest_segmented", "commit": git_commit(), "date": time.strftime("%Y-%m-%d"),
           "device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu", "torch": torch.__version__,
           "all_ok": all(c["ok"] for c in checks), "checks": checks, "speed": sp,
           "wall_s": round(time.perf_counter() - t0, 1)}
    line = write_out(res, "gpu_selftest_segmented.json")
    print(line)
    sys.exit(0 if res["all_ok"] else 1)


if __name__ == "__main__":
    main()
