"""The device step's eviction and prefetch, simulated on CPU over replayed routing, against the serial Belady bound.

What runs is the device step's own body (decode/devstep.py DeviceStep._body, graphs off) over a stand-in model whose
segments only hand out the replayed routing, and the device slot table's methods (store/devtable.py) with the
resolve reference (kernels/slot_table.resolve_reference, the kernel's algorithm): the same resolve, next-use
updates and prefetch calls, in the same order, as the captured step. Only the copies are counted, not made.

Routing: the reference model (olmoe-code-17m) traced on ../shared/text/{fit,eval} and mapped onto the benchmark
model as bench_cpu_experts_gpu.py does (`mapped`: for the 8-layer 10.6B shape, map_routing onto 8 x 128 experts,
top-8, jitter 0). Transitions and next-use weights are fitted on fit/; figures are on eval/.
Per eval document, as bench_cpu_experts_gpu.py runs it: the prompt's positions 0..P-1 are prefilled (one step per
layer with the union of the prompt's experts, LRU through the resolve reference: the host cache's prefill, handed
to the device table), then positions P..P+N-2 are decoded (the benchmark's --new-tokens N gives N-1 decode steps).
Belady (store/policy.belady) runs over the same steps, counted from the first decode step.

Time model per token, per MoE layer l (CONTRACTS' serial bound uses the same compute and link):
    demand copies of l (serial, at --pcie-gbps) + max(compute / L, the prefetch copies for l+1 issued beside it)
and the serial Belady bound: compute + Belady's miss bytes / PCIe. Ratio = bound time / simulated time.
Not modelled: kernel launches inside the graph (the next-use update is one kernel per layer), the gather's 49-50
GB/s (vs the copy engine's 54), the prefetch gather sharing SMs with compute. Against the H200 runs on the same two
eval documents: lru/device (offload-devstep-bf16-2026-12-01-h200.json) hit rates 0.853/0.886 measured, 0.854/0.887
here, ratio 0.60/0.63 measured, 0.67/0.71 here; lru+pf8/device with prefetched blocks inserted as newest (the
measured run, offload-devstep-prefetch-2026-12-01-h200.json) hit rates 0.792/0.854 and 189/119 MB per token
measured, 0.792/0.854 and 189/120 MB here, ratio 0.38/0.47 measured, 0.46/0.56 here. So the counts are the
engine's; the times run 10% (demand) to 17% (prefetch) optimistic. On an H100 (session 53, the table in pinned RAM:
316 slots, --compute-ms 0.756, sim-h100-316-2026-12-07-s53.json against offload-embed-auto-2026-12-07-h100-s53.json)
lru on csv hit 0.931 with 41.6 MB a token here, 0.931 and 41.7 measured, in 1.527 ms against 2.059: 35% optimistic
on that box. On another H100 (session 54, offload-profile-2026-12-07-h100-s54.json) the device step's gather read pinned
RAM at 49.9 GB/s and lru/device's token was compute + the gather's bytes at that rate + 4%: at --pcie-gbps 50 this
gives lru 1.588 ms on csv against 1.651 measured (1.457 against 1.510, five documents), and lru+cpu with the run's own
take table (--cpu-take 0,1,1,2,2,3,4,4,5) the measured hit rate, 0.876, and 1.592 ms against 1.564.

CPU experts (runs ending in +cpu, decode/devstep.py with a mailbox): resolve sends take[m] of a layer's m misses to
the CPU (--cpu-take, default the cost model's at --pcie-gbps, --cpu-gbps and --cpu-overhead-us); a layer then
takes max(its copies, the CPU's fixed cost + its experts at --cpu-gbps). Against the H200 (session 11 call E,
csv.py.txt, take 0,0,1,1,2,2,3,3,4): lru+cpu measured 0.71 of serial Belady, 0.78 here at 49 GB/s, 65 GB/s, 10 us.
A row split (--cpu-split F: the CPU computes F of one more miss's FFN rows, the link the rest; --split-down: down's
columns split too, else copied whole; --cpu-frac: a continuous split, an upper bound) is timed the same way, the
split miss not admitted, as the device step does it. Session 12 (fit/, 54 GB/s, 44 GB/s CPU, 17 us): nextuse+cpu
0.759 whole, 0.795 at --cpu-split 0.5, 0.820 with --split-down 0.375, 0.86-0.875 --cpu-frac; but the device step
(--cpu-split auto: rows per miss count, down's columns too, the --cpu-frac case) measured 1.03x lru and 0.96x
nextuse against whole experts: its hit rate fell 3 points (csv.py.txt) where this predicts under 1.

The background fill (runs lru+fillN, lru+fillNid, @S: decode/devstep.py's pick and install references): its blocks
share the link with the step's demand copies while it picks, and cost the fill graph's own --fill-overhead-us.
Against the H200 (session 20, call D, q4+q4 at --vram-gb 4 = 1,024 slots, csv.py.txt, 127 tokens; here --slots 1024
--block-bytes 2654208 --pcie-gbps 50 --compute-ms 0.405, the device step without misses): lru 0.507 ms a token
(measured 0.496), fill 6 0.430 (0.426), 7 0.424 (0.420), 8 0.423 (0.429), 6 in id order from the 8th step 0.456
(the untuned default: 0.449); hit rates the same to the third decimal (0.970 / 0.997 / 0.998).

    python3 benchmarks/sim_devtable.py --text ../shared/text                     # all runs, five eval docs
    python3 benchmarks/sim_devtable.py --text ../shared/text --docs 2 --runs lru,nextuse,nextuse+pf1
    python3 benchmarks/sim_devtable.py --text ../shared/text --fit               # refit the next-use weights
    python3 benchmarks/sim_devtable.py --text ../shared/text --runs lru --slots 316 --compute-ms 0.756 --lookahead 1,2,4,8
        # the prefetch goal's ceiling: Belady's misses, perfectly predicted D layers ahead, on one link
    python3 benchmarks/sim_devtable.py --text ../shared/text --split fit --runs lru+cpu --slots 316 --adapt reused
        # the take table refitted after each step with the admission penalty the run's evictions measured
    python3 benchmarks/sim_devtable.py --text ../shared/text --runs nextuse+cpu,nextuse+gate1+cpu --gate-top 4
        # the reference model's next-gate predictor as the prefetch's candidates (traced once with hidden states)
    python3 benchmarks/sim_devtable.py --text ../shared/text --runs lru,lru+cpu,nextuse+cpu --slots 316 \
        --compute-ms 0.756 --pcie-gbps 50 --cpu-gbps 76 --cpu-overhead-us 18 --overlap-us 17
        # the overlapped gather (decode/devstep.py): a layer with misses hides its hit experts' share of 17 us of
        # gate_up behind its copies. Session 55: lru 0.785 -> 0.802 here (five documents); measured 1.022x / 1.021x
        # (offload-overlap-2026-12-07-h100-s55.json)
Prints a table, then one JSON line last; writes $OUT/sim_devtable.json when OUT is set.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tools"))

from benchmeta import git_commit  # noqa: E402

from tiered.decode.devpolicy import DEFAULT_PARAMS, fit_next_use  # noqa: E402
from tiered.decode.devstep import DeviceStep  # noqa: E402
from tiered.kernels import slot_table as st  # noqa: E402
from tiered.predict.predictors import transition_params  # noqa: E402
from tiered.predict.replay import map_routing, map_trace  # noqa: E402
from tiered.predict.trace import Trace, load as load_trace, save as save_trace  # noqa: E402
from tiered.store.devtable import DeviceSlotTable  # noqa: E402
from tiered.store.policy import belady, belady_misses  # noqa: E402


class SimTable(DeviceSlotTable):
    """The device slot table's tensors and calls on CPU, with the copies counted instead of made, and the
    prefetched blocks tracked until used."""

    def __init__(self, num_layers: int, num_experts: int, slots: int, w: int) -> None:
        N = num_layers * num_experts
        self.kern, self.w, self.num_experts = st, int(w), num_experts
        self.t = {"slot_of": torch.full((N,), -1, dtype=torch.int32), "key_of": torch.full((slots,), -1, dtype=torch.int32),
                  "last": torch.zeros(slots, dtype=torch.int64), "uses": torch.zeros(slots, dtype=torch.int64),
                  "clock": torch.zeros(1, dtype=torch.int64), "counts": torch.zeros(7, dtype=torch.int64),
                  "host_row": torch.arange(N, dtype=torch.int64)}
        self.zero_slot = slots  # CPU experts (kernels/slot_table.resolve's cpu split): their slot row
        self.device = torch.device("cpu")
        self.cpu_take = None
        self.cpu_split = self.split_spec = None  # the row split is timed by --cpu-split/--cpu-frac, not resolved
        self.split_admit = False
        self.copy_fill = None  # (the copy engines' fill is not simulated: --fill N times the gather fill)
        self.h2d_gbps = 0.0
        self.cpu = 0  # misses sent to the CPU
        self.owner = "device"
        self.pending: set[int] = set()  # keys a prefetch loaded that no demand call has used yet
        self.demand = self.pf = self.pf_used = 0
        self.evicted = self.evicted_hits = self.evicted_reused = 0  # evictions, the hits their experts had, reused ones
        self.gathers: list[tuple[str, int]] = []  # ("demand" | "prefetch", blocks) in issue order

    def resolve(self, layer, ids, out_slot, out_src, *, nt=None, cpu_row=None, topk=None):
        keys = [layer * self.num_experts + int(e) for e in ids.tolist()]
        res = [int(self.t["slot_of"][k]) >= 0 for k in keys]
        key0, uses0 = self.t["key_of"].clone(), self.t["uses"].clone()
        super().resolve(layer, ids, out_slot, out_src, nt=nt, cpu_row=cpu_row, topk=topk)
        gone = (key0 >= 0) & (self.t["key_of"] != key0)  # evicted this call: was the expert used again after its load?
        self.evicted += int(gone.sum())
        self.evicted_hits += int((uses0[gone] - 1).clamp(min=0).sum())
        self.evicted_reused += int((uses0[gone] >= 2).sum())
        nc = int((cpu_row >= 0).sum()) if cpu_row is not None else 0
        self.cpu += nc
        self.gathers.append(("cpu", nc))
        for k, r in zip(keys, res):
            if r and k in self.pending:
                self.pf_used += 1
            self.pending.discard(k)
        n = int((out_src >= 0).sum())
        self.demand += n
        self.gathers.append(("demand", n))

    def prefetch(self, layer, ids, pin, out_slot, out_src, *, nt=None, margin=0):
        super().prefetch(layer, ids, pin, out_slot, out_src, nt=nt, margin=margin)
        n = 0
        for e, s in zip(ids.tolist(), out_src.tolist()):
            if s >= 0:
                self.pending.add(layer * self.num_experts + int(e))
                n += 1
        self.pf += n
        self.gathers.append(("prefetch", n))

    def gather(self, src, slot, *, ctas=None, layer=None, landed=None, **shape):
        pass


class _Routed:
    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids  # [1, K]
        self.weights = torch.ones_like(ids, dtype=torch.float32)
        self.x = torch.zeros(1, 1)
        self.topk_pending = False  # the replayed ids are the routing: no router top-k is left to resolve
        self.looked_up = False  # (no complete table here: the copy fill is not simulated)


class SimBox:
    """The CPU-expert mailbox's host side (model/cpu_mailbox.py) without a worker: posts are counted, answers zero."""

    overhead_s = None

    def __init__(self) -> None:
        self._seq = 0

    def post(self, x, rows, wts) -> bool:
        if not bool((rows >= 0).any()):
            return False
        self._seq += 1
        return True

    def wait(self, out, posted, *, timeout_s=0.0):
        return out.zero_()


class SimModel:
    """What DeviceStep._body calls on a model, handing out the replayed ids of the current position."""

    def __init__(self, ids: np.ndarray, table: SimTable) -> None:
        T, L, K = ids.shape
        self.ids = torch.from_numpy(ids.astype(np.int64))
        self.config = SimpleNamespace(num_layers=L, top_k=K, num_experts=int(table.num_experts),
                                      moe_layers=list(range(L)), hidden_size=1, norm_topk_prob=False)
        self.dtype = torch.float32
        self.provider = SimpleNamespace(devtable=table)
        self.device = torch.device("cpu")
        self.observer = self.prefetch_hook = self.routing = None
        self.layers = [SimpleNamespace(moe=True) for _ in range(L)]
        self.pos = 0

    def static_plan(self, pos, span):
        return None

    def segment_first(self, tok, plan, *, defer_topk=False, lookup=None):
        return _Routed(self.ids[self.pos, 0].clone()[None])

    def segment_mid(self, l, r, slots, plan, partial, *, defer_topk=False, lookup=None, wait=None):
        return _Routed(self.ids[self.pos, l].clone()[None])

    def segment_last(self, r, slots, partial, wait=None):
        return torch.zeros(1, 2)  # logits [1, V] (the step's argmax reads them; their values do not matter here)


def mapped(trace: Trace, layers: int, experts: int, top_k: int) -> Trace:
    """bench_cpu_experts_gpu.mapped: map_trace when the shape is the same multiple of the reference's layers and
    experts, else map_routing with no per-token jitter."""
    try:
        return map_trace(trace, num_layers=layers, num_experts=experts)
    except ValueError:
        return map_routing(trace, num_layers=layers, num_experts=experts, top_k=top_k, jitter=0.0)


def gate_predictions(text: Path, cache: Path, ref: Trace, ev: Trace, experts: int, count: int) -> list[np.ndarray]:
    """The reference model's next-gate candidates on the documents of `ref` (traced again with hidden states, cached
    as npz; its routing must be ref's), mapped onto the target as `ev` was (map_routing, one stream)."""
    from tiered.layout.families import default_model_path
    from tiered.predict.predictors import GateWeights
    from tiered.predict.replay import map_predictions
    from tiered.predict.trace import TraceRecorder, record, split_ids
    from tiered.store.disk import Layout

    mf = ev.meta.get("mapped_from") or {}
    if mf.get("rule") != "map_routing" or mf.get("streams") != 1 or mf.get("jitter"):
        raise SystemExit(f"+gate runs replay map_routing's mapping with one stream and no jitter, not {mf}")
    from tiered import load

    rec = TraceRecorder(logits=False, hidden=True)
    eng = load(default_model_path(), device="cpu", dtype=torch.float32, observer=rec)  # (its layout: the gates)
    if not cache.is_file():
        docs = []
        for p in sorted(text.iterdir()):
            docs += split_ids(p.name, eng.encode(p.read_text()), eng.max_context)[:1]
        save_trace(record(eng, rec, docs), cache)
    hid = load_trace(cache)
    if not np.array_equal(hid.topk_ids, ref.topk_ids):
        raise SystemExit(f"{cache}: its routing is not the reference trace's: delete it to trace again")
    gates = GateWeights.from_layout(Layout.open(eng.layout_path))
    return map_predictions(hid, gates, num_experts=experts, count=count, segment=int(mf["segment"]),
                           seed=int(mf["seed"]))


def reference_traces(text: Path, cache: Path) -> tuple[Trace, Trace]:
    """The reference model's routing over fit/ and eval/ (bench_predict_gpu.reference_trace), cached as npz."""
    out = []
    for part in ("fit", "eval"):
        f = cache / f"ref_{part}.npz"
        if not f.is_file():
            from bench_predict_gpu import reference_trace

            cache.mkdir(parents=True, exist_ok=True)
            save_trace(reference_trace(text / part, torch.device("cpu")), f)
        out.append(load_trace(f))
    return out[0], out[1]


def parse_run(spec: str) -> dict:
    """'lru', 'flru:W', 'nextuse', each optionally '+pfN' (device prefetch of N per layer); 'nextuse+oracleN': the
    prefetch given the next layer's true missing experts (up to N; a ceiling for any next-layer predictor);
    'nextuse+gateN': the prefetch given the reference model's next-gate predictions (replay.map_predictions: layer
    l+1's norm and router on the hidden state after layer l's attention, mapped as the routing is), the first N of
    its top-K that are not resident. Any of them may end in '+cpu'. 'lru+fillN' (or flru): the background fill of
    free slots, N a step in the popularity order (the fitted time transitions' column sums), 'lru+fillNid' in
    expert-id order (a layout without fitted router history), '@S' after either: from the S-th decode step on
    (--device-fill auto's timed windows come first)."""
    if "+fill" in spec:
        base, _, f = spec.partition("+fill")
        f, _, start = f.partition("@")
        order = "id" if f.endswith("id") else "popularity"
        n = f.removesuffix("id")
        if base not in ("lru", "flru") and not base.startswith("flru:") or not n.isdigit() or int(n) < 1 or (
                start and not start.isdigit()):
            raise SystemExit(f"unknown run {spec!r}: the fill runs are lru+fillN, lru+fillNid, optionally @S")
        run = parse_run(base)
        return {**run, "fill": int(n), "fill_order": order, "fill_start": int(start or 0)}
    oracle = "+oracle" in spec
    gate = "+gate" in spec
    cpu = spec.endswith("+cpu")
    spec = spec.removesuffix("+cpu")
    base, _, pf = spec.replace("+oracle", "+pf").replace("+gate", "+pf").partition("+pf")
    name, _, w = base.partition(":")
    if name not in ("lru", "flru", "nextuse") or ((oracle or gate) and name != "nextuse"):
        raise SystemExit(f"unknown run {spec!r}: use lru, flru:W or nextuse, optionally +pfN (nextuse: +oracleN, "
                         "+gateN)")
    return {"evict": "nextuse" if name == "nextuse" else "policy", "w": int(w or (8 if name == "flru" else 0)),
            "prefetch": int(pf or 0), "oracle": oracle, "gate": gate, "cpu": cpu, "fill": 0}


def simulate_doc(ids: np.ndarray, prompt: int, run: dict, *, slots: int, num_experts: int, transitions, params,
                 block: int, pcie: float, compute: float, cpu_take: list[int] | None = None,
                 cpu_gbps: float = 0.0, cpu_overhead: float = 0.0, cpu_frac: bool = False,
                 cpu_split: list[int] | None = None, split_f: float = 0.0, split_share: float = 2 / 3,
                 split_admit: float | None = None, pred: np.ndarray | None = None,
                 fill_overhead: float = 17e-6, adapt: str = "", overlap: float = 0.0) -> dict:
    """One run over one document's routing ids [T, L, K]: positions 0..prompt-1 prefilled, the rest decoded.
    pred [T, L, C]: the next-gate candidates of a '+gate' run (map_predictions). A fill run: its blocks cross the
    link beside the step with the step's demand copies, so a step takes max(its own time + fill_overhead (the fill
    graph's pick, install and side stream: 17 us on the H200, session 20), (fill + demand blocks) x the copy time)
    while the fill picks."""
    from tiered.store.offload import CostModel

    T, L, K = ids.shape
    E = num_experts
    table = SimTable(L, E, slots, run["w"])
    model = SimModel(ids, table)
    fill = run.get("fill", 0)
    step = DeviceStep(model, graphs=False, prefetch=run["prefetch"],
                      transitions=None if fill and run["fill_order"] == "id" else transitions,
                      evict=run["evict"], nextuse=params, cpu=SimBox() if run["cpu"] else None,
                      cpu_take=cpu_take if run["cpu"] else None, fill=fill)
    if run.get("oracle"):
        nu = step.nu

        def oracle(j: int, slot_of: torch.Tensor, count: int) -> torch.Tensor:
            """The next layer's experts that will miss (true routing), accepted over any victim (nt 0)."""
            torch.add(nu.dist[j], nu.base, out=nu.nt_pf)
            miss = [int(e) for e in model.ids[model.pos, j + 1] if int(slot_of[(j + 1) * E + int(e)]) < 0][:count]
            for e in miss:
                nu.nt_pf[(j + 1) * E + e] = 0
            return torch.tensor(miss + [-1] * (count - len(miss)), dtype=torch.int64)

        nu.prefetch = oracle
    if run.get("gate"):
        if pred is None:
            raise SystemExit("a +gate run needs the next-gate predictions (map_predictions)")
        nu = step.nu
        P = torch.from_numpy(pred)

        def gate(j: int, slot_of: torch.Tensor, count: int) -> torch.Tensor:
            """The predictor's candidates for the next layer that are not resident, in its order, accepted as the
            oracle's are (over any victim): the same prefetch with a real predictor's recall."""
            torch.add(nu.dist[j], nu.base, out=nu.nt_pf)
            cand = [int(e) for e in P[model.pos, j + 1] if e >= 0 and int(slot_of[(j + 1) * E + int(e)]) < 0][:count]
            for e in cand:
                nu.nt_pf[(j + 1) * E + e] = 0
            return torch.tensor(cand + [-1] * (count - len(cand)), dtype=torch.int64)

        nu.prefetch = gate
    out = torch.empty(E, dtype=torch.int64)
    src = torch.empty(E, dtype=torch.int64)
    for l in range(L):  # prefill: the prompt's experts per layer, LRU (the host cache), then handed over
        u = torch.from_numpy(np.unique(ids[:prompt, l]).astype(np.int64))
        st.resolve_reference(u, l, E, table.t, 0, out[:len(u)], src[:len(u)])
    table.t["counts"].zero_()
    table.cpu = 0
    c = block / (pcie * 1e9)
    cc = block / (cpu_gbps * 1e9) if cpu_gbps > 0 else 0.0
    comp_l = compute / L
    tim = 0.0
    link_free = 0.0  # split_admit: when the link is done with the deferred rows of admitted split misses
    fills: list[int] = []  # a fill run's blocks picked per step
    adapt_pen: list[float] = []  # --adapt: the penalty after each step
    n = T - prompt
    for p in range(prompt, T):
        model.pos = p
        table.gathers = []
        t_step = tim
        picked = int(step.fill_picked[0]) if fill else 0
        if fill:
            step.fill_n.fill_(fill if p - prompt >= run["fill_start"] else 0)
        step._body(0, fill=bool(fill))
        if adapt and run["cpu"] and table.evicted >= 32:  # the admission penalty from what admission paid this run
            pen = (table.evicted_reused if adapt == "reused" else table.evicted_hits) / table.evicted
            cm = CostModel(pcie, cpu_gbps, cpu_overhead_s=cpu_overhead, fixed=True, reuse_penalty=min(pen, 2.0))
            table.set_cpu_take([sum(cm.place(m, block)) for m in range(K + 1)])
            adapt_pen.append(pen)
        # per layer: its demand gather, then (issued after it) the prefetch for l+1 beside its compute
        g = table.gathers
        i = 0
        for l in range(L):
            nc = 0
            if g[i][0] == "cpu":  # the CPU's share, posted before the copies and waited for after them
                nc = g[i][1]
                i += 1
            kind, d = g[i]
            assert kind == "demand"
            i += 1
            pf = 0
            if i < len(g) and g[i][0] == "prefetch":
                pf = g[i][1]
                i += 1
            if split_admit is not None:  # one copied miss's first rows on the CPU now, copied after the layer
                pre, post = comp_l * split_admit, comp_l * (1 - split_admit)
                f = min(max((d * c - (0.0 if nc else cpu_overhead) - nc * cc) / (c + cc), 0.0), 1.0) if d else 0.0
                t1 = tim + pre  # the layer's attention and router, then its resolve
                copy_end = max(t1, link_free) + (d - f) * c
                cpu_end = t1 + (cpu_overhead + (nc + f) * cc if nc or f > 0 else 0.0)
                tim = max(copy_end, cpu_end) + max(post, pf * c)
                link_free = max(copy_end, tim) + f * c if f > 0 else copy_end
            elif cpu_split is not None and nc and cpu_split[d + nc]:  # one of the CPU's misses split by rows: the
                # CPU computes split_f of its intermediate rows, the link copies the rest of gate/up and all of down
                link = (d + 1 - split_f * split_share) * c
                tim += max(link, cpu_overhead + (nc - 1 + split_f) * cc) + max(comp_l, pf * c)
            elif cpu_frac and nc:  # misses split by rows: the CPU's share f where both sides finish together
                m = d + nc
                f = min(max((m * c - cpu_overhead) / (c + cc), 0.0), m)
                tim += max((m - f) * c, cpu_overhead + f * cc if f > 0 else 0.0) + max(comp_l, pf * c)
            else:
                tim += max(d * c, cpu_overhead + nc * cc if nc else 0.0) + max(comp_l, pf * c)
                if d and overlap > 0:  # the hit experts' gate_up beside the gather (--overlap-us)
                    tim -= min(d * c, overlap * (K - d) / K, comp_l)
        if fill:
            nf = int(step.fill_picked[0]) - picked
            fills.append(nf)
            if nf:  # the fill's copies beside the step, sharing the link with its demand copies
                dem = sum(cnt for kind, cnt in g if kind == "demand")
                tim = t_step + max(tim - t_step + fill_overhead, (nf + dem) * c)
    steps = [sorted(set((l * E + ids[:prompt, l]).ravel().tolist())) for l in range(L)]
    steps += [(l * E + ids[t, l]).tolist() for t in range(prompt, T) for l in range(L)]
    _, bm = belady(steps, slots, count_from=L)
    bound = compute + bm * c / n
    uses = n * L * K
    return {"tokens": n, "demand_misses": table.demand, "cpu_misses": table.cpu,
            "hit_rate": 1 - (table.demand + table.cpu) / uses,
            "demand_mb_per_token": table.demand * block / n / 1e6, "prefetch_mb_per_token": table.pf * block / n / 1e6,
            "prefetch_issued": table.pf, "prefetch_used": table.pf_used,
            "prefetch_unused_mb_per_token": (table.pf - table.pf_used) * block / n / 1e6,
            "belady_misses": bm, "belady_mb_per_token": bm * block / n / 1e6,
            "time_ms_per_token": tim / n * 1e3, "serial_belady_ms_per_token": bound * 1e3,
            "vs_serial_belady": bound / (tim / n),
            "pcie_bound_ms_per_token": max(compute, bm * c / n) * 1e3,
            "vs_pcie_bound": max(compute, bm * c / n) / (tim / n),
            "fill_picked": sum(fills), "fill_steps": sum(1 for f in fills if f),
            "adapt_penalty_last": adapt_pen[-1] if adapt_pen else None}


def lookahead_time(misses: list[int], comp: float, c: float, depth: int) -> float:
    """Seconds for the decode steps (one step = a layer of a token) when each step's misses (Belady's, known in
    advance: a perfect predictor) cross one link in step order, c seconds a block, each step's copies starting no
    earlier than the compute of the step `depth` before it (when its routing could be predicted) and the step's
    compute (comp) starting once its copies have landed and the previous step has computed. depth 0: the copies
    wait for the previous step's compute, the serial bound. Slots are not modelled: a block prefetched early is
    assumed to evict nothing needed sooner (an upper bound for any lookahead-`depth` prefetch)."""
    n = len(misses)
    start, end = [0.0] * n, [0.0] * n
    link = 0.0
    for i, m in enumerate(misses):
        prev_end = end[i - 1] if i else 0.0
        ready = prev_end if depth == 0 else (start[i - depth] if i >= depth else 0.0)
        arrive = max(link, ready) + m * c
        link = arrive
        start[i] = max(prev_end, arrive)
        end[i] = start[i] + comp
    return end[-1] if n else 0.0


def lookahead_bounds(ids: np.ndarray, prompt: int, *, slots: int, num_experts: int, block: int, pcie: float,
                     compute: float, depths: list[int]) -> dict:
    """Per lookahead depth, the serial Belady bound's time / lookahead_time's: how far above 1.0 a prefetch that
    knows Belady's misses `depth` layers ahead could take the prefetch goal's ratio (the same steps as
    simulate_doc's Belady: the prompt's union per layer warms, the decode steps count)."""
    T, L, _ = ids.shape
    E = num_experts
    steps = [sorted(set((l * E + ids[:prompt, l]).ravel().tolist())) for l in range(L)]
    steps += [(l * E + ids[t, l]).tolist() for t in range(prompt, T) for l in range(L)]
    misses = belady_misses(steps, slots)[L:]
    c, comp = block / (pcie * 1e9), compute / L
    serial = lookahead_time(misses, comp, c, 0)
    return {str(d): serial / lookahead_time(misses, comp, c, d) for d in depths}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", type=Path, required=True, help="folder with fit/ and eval/")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/tiered-sim-devtable"), help="reference traces (npz)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--slots", type=int, default=243, help="device slots (--vram-gb 4 on the 8-layer bf16 model: 243)")
    ap.add_argument("--block-bytes", type=int, default=3 * 2048 * 768 * 2)
    ap.add_argument("--pcie-gbps", type=float, default=54.0)
    ap.add_argument("--compute-ms", type=float, default=1.16, help="GPU compute per token, all layers")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--docs", type=int, default=5, help="eval documents (the GPU benchmark runs the first 2)")
    ap.add_argument("--split", choices=("eval", "fit"), default="eval", help="report on (fit: for tuning)")
    ap.add_argument("--runs", default="lru,flru:8,nextuse,lru+pf8,lru+pf1,nextuse+pf1,nextuse+pf2,nextuse+oracle1")
    ap.add_argument("--fit", action="store_true", help="refit the next-use weights on fit/ (else DEFAULT_PARAMS)")
    ap.add_argument("--cpu-gbps", type=float, default=65.0, help="the CPU experts' rate (runs ending in +cpu)")
    ap.add_argument("--fill-overhead-us", type=float, default=17.0,
                    help="+fill runs: the fill graph's own cost a step while it picks (H200, session 20: 17 us)")
    ap.add_argument("--cpu-overhead-us", type=float, default=10.0, help="a CPU post's fixed cost")
    ap.add_argument("--cpu-frac", action="store_true",
                    help="time a layer's misses as split by rows between the link and the CPU (an upper bound)")
    ap.add_argument("--cpu-split", type=float, default=0.0,
                    help="a fixed row fraction of one miss a layer computed on the CPU (the rest of its gate/up rows "
                         "and all of its down copied); the cost model picks per miss count whether to split")
    ap.add_argument("--split-admit", type=float, default=None,
                    help="+cpu runs: one copied miss a layer also has its first rows computed on the CPU now and "
                         "copied after the layer (admitted); the value is the compute share before the copy "
                         "(attention, router)")
    ap.add_argument("--split-down", action="store_true",
                    help="--cpu-split: down's columns split too (not copied whole)")
    ap.add_argument("--gate-top", type=int, default=0,
                    help="+gate runs: candidates from the gate's top R only (default: top-k)")
    ap.add_argument("--cpu-take", default="", help="comma-separated take[m], m = 0..K (default: the cost model's)")
    ap.add_argument("--admit-penalty", type=float, default=None,
                    help="the cost model's reuse penalty for its take table (default: the engine's, "
                         "store/offload.admit_penalty(); 0 = finish first)")
    ap.add_argument("--adapt", choices=("", "reused", "hits"), default="",
                    help="+cpu runs: after each step, the take table again with the admission penalty this run's "
                         "evictions measured: the share of evicted experts used again after their load (reused), or "
                         "their hits per load (hits, at most 2)")
    ap.add_argument("--overlap-us", type=float, default=0.0,
                    help="a layer's expert compute that can run beside its demand gather when all K hit (the hit "
                         "experts' share of it overlaps a layer with misses)")
    ap.add_argument("--lookahead", default="",
                    help="also report, per document, the ratio to serial Belady that Belady's misses copied D layers "
                         "ahead by a perfect predictor would reach (lookahead_time), for each D in this list: e.g. "
                         "1,2,4,8 (the prefetch goal's ceiling at each depth)")
    a = ap.parse_args()
    t0 = time.perf_counter()
    fit_ref, eval_ref = reference_traces(a.text, a.cache)
    fit = mapped(fit_ref, a.layers, a.experts, a.top_k)
    ev = mapped(eval_ref if a.split == "eval" else fit_ref, a.layers, a.experts, a.top_k)
    tp = transition_params(fit)
    transitions = (tp.layer_trans, tp.time_trans)
    params = fit_next_use(fit, *transitions) if a.fit else DEFAULT_PARAMS
    n_tok = a.prompt_tokens + a.new_tokens - 1
    if a.cpu_take:
        take = [int(v) for v in a.cpu_take.split(",")]
    else:
        from tiered.store.offload import CostModel, admit_penalty

        pen = admit_penalty() if a.admit_penalty is None else a.admit_penalty
        cm = CostModel(a.pcie_gbps, a.cpu_gbps, cpu_overhead_s=a.cpu_overhead_us * 1e-6, fixed=True,
                       reuse_penalty=pen)
        take = [sum(cm.place(m, a.block_bytes)) for m in range(a.top_k + 1)]
    split = None
    if a.cpu_split:
        share = 1.0 if a.split_down else 2 / 3  # the block's share the split saves the link (down copied whole: 2/3)
        c, cc = a.block_bytes / (a.pcie_gbps * 1e9), a.block_bytes / (a.cpu_gbps * 1e9)
        o, f = a.cpu_overhead_us * 1e-6, a.cpu_split
        take, split = [0], [0]
        for m in range(1, a.top_k + 1):
            opts = [(max((m - t) * c, o + t * cc if t else 0.0), t, 0) for t in range(m + 1)]
            opts += [(max((m - t - 1 + 1 - f * share) * c, o + (t + f) * cc), t + 1, 1) for t in range(m)]
            _, tk, sp = min(opts)
            take.append(tk)
            split.append(sp)
    res: dict = {"bench": "sim_devtable", "commit": git_commit(), "date": time.strftime("%Y-%m-%d"), "slots": a.slots, "block_bytes": a.block_bytes, "pcie_gbps": a.pcie_gbps,
                 "compute_ms": a.compute_ms, "prompt_tokens": a.prompt_tokens, "decode_steps": a.new_tokens - 1,
                 "split": a.split, "next_use_params": params.__dict__, "cpu_take": take, "cpu_split": split,
                 "cpu_gbps": a.cpu_gbps, "admit_penalty": None if a.cpu_take else pen,
                 "gate_top": a.gate_top or a.top_k, "mapping": ev.meta.get("mapped_from"),
                 "docs": {}}
    runs = [r for r in a.runs.split(",") if r]
    preds = None
    if any("+gate" in r for r in runs):
        preds = gate_predictions(a.text / a.split, a.cache / f"ref_{a.split}_hidden.npz",
                                 eval_ref if a.split == "eval" else fit_ref, ev, a.experts, a.gate_top or a.top_k)
    for d in range(min(a.docs, ev.num_docs)):
        doc = ev.doc(d)
        if doc.num_tokens < n_tok:
            continue
        ids = doc.topk_ids[:n_tok].astype(np.int64)
        res["docs"][ev.doc_names[d]] = {
            r: simulate_doc(ids, a.prompt_tokens, parse_run(r), slots=a.slots, num_experts=a.experts,
                            transitions=transitions, params=params, block=a.block_bytes, pcie=a.pcie_gbps,
                            compute=a.compute_ms * 1e-3, cpu_take=take, cpu_gbps=a.cpu_gbps,
                            cpu_overhead=a.cpu_overhead_us * 1e-6, cpu_frac=a.cpu_frac, cpu_split=split,
                            split_f=a.cpu_split, split_share=1.0 if a.split_down else 2 / 3,
                            split_admit=a.split_admit, pred=None if preds is None else preds[d][:n_tok],
                            fill_overhead=a.fill_overhead_us * 1e-6, adapt=a.adapt,
                            overlap=a.overlap_us * 1e-6)
            for r in runs}
    depths = [int(v) for v in a.lookahead.split(",") if v]
    if depths:
        res["lookahead"] = {}
        for d in range(min(a.docs, ev.num_docs)):
            doc = ev.doc(d)
            if doc.num_tokens >= n_tok:
                res["lookahead"][ev.doc_names[d]] = lookahead_bounds(
                    doc.topk_ids[:n_tok].astype(np.int64), a.prompt_tokens, slots=a.slots, num_experts=a.experts,
                    block=a.block_bytes, pcie=a.pcie_gbps, compute=a.compute_ms * 1e-3, depths=depths)
        res["lookahead"]["mean"] = {str(k): float(np.mean([v[str(k)] for v in res["lookahead"].values()]))
                                    for k in depths}
    docs = res["docs"]
    res["mean"] = {r: {k: float(np.mean([docs[d][r][k] for d in docs]))
                       for k in ("vs_serial_belady", "hit_rate", "demand_mb_per_token", "prefetch_mb_per_token",
                                 "time_ms_per_token")} for r in runs}
    res["wall_s"] = time.perf_counter() - t0
    print(f"{'doc':<26}{'run':<14}{'hit':>6}{'dem MB':>8}{'pf MB':>7}{'pf used':>9}{'Bel MB':>8}{'ms/tok':>8}"
          f"{'bound':>7}{'ratio':>7}")
    for dn, rr in docs.items():
        for r, v in rr.items():
            print(f"{dn[:25]:<26}{r:<14}{v['hit_rate']:>6.3f}{v['demand_mb_per_token']:>8.1f}"
                  f"{v['prefetch_mb_per_token']:>7.1f}{v['prefetch_used']:>4}/{v['prefetch_issued']:<4}"
                  f"{v['belady_mb_per_token']:>8.1f}{v['time_ms_per_token']:>8.3f}{v['serial_belady_ms_per_token']:>7.3f}"
                  f"{v['vs_serial_belady']:>7.3f}")
    for r, v in res["mean"].items():
        print(f"{'mean':<26}{r:<14}{v['hit_rate']:>6.3f}{v['demand_mb_per_token']:>8.1f}{v['prefetch_mb_per_token']:>7.1f}"
              f"{'':>9}{'':>8}{v['time_ms_per_token']:>8.3f}{'':>7}{v['vs_serial_belady']:>7.3f}")
    for dn, v in res.get("lookahead", {}).items():
        print(f"{'lookahead ' + dn[:16]:<26}" + "  ".join(f"D={k}: {r:.3f}" for k, r in v.items()))
    line = json.dumps(res)
    import os

    if os.environ.get("OUT"):
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        (Path(os.environ["OUT"]) / "sim_devtable.json").write_text(line)
    print(line)


if __name__ == "__main__":
    main()
