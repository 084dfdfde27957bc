"""The offloaded one-token decode step as one CUDA graph: slot lookup, eviction and miss copies on the device.

Owns: `DeviceStep` (static token/position buffers, per-layer slot and miss rows, one captured graph per attended
span, `capture_all`, the hand-over of the slot table to the device before a step, the background fill of free
slots and its host watch, with a second graph per span without the fill) and its stats.
Used with the expert cache when its slot table lives on the device (store/devtable.py: every expert in the
pinned RAM tier, lru/flru eviction or eviction by predicted next use (devpolicy.py, --device-evict nextuse), no
observer, no prefetch hook, no pacing; CPU experts through the mailbox). Where the piecewise
step (piecewise.py) reads each layer's top-k back to the host, resolves slots in Python and issues copies, here
each MoE layer inside the graph runs
    router (in the model's segment) -> resolve (kernels/slot_table.py: hits, victims, table updates)
    -> gather (the misses' blocks copied from pinned RAM over UVA by a kernel) -> the experts read the slots,
so the host launches one graph per token and waits only for the logits. Greedy decoding runs the host one step
ahead (decode/ahead.py: `launch` reads the token and position the previous step left on the device), so even the
host's launch work overlaps the device's previous step.
A routing override (predict/replay.py, benchmarks) is applied inside the graph too: its rows for the step's
position are gathered on the device.
With --device-fill N, each step also copies up to N experts that are not resident into free slots beside its
compute (a pick kernel before the first layer, a gather on a side stream, an install kernel after the argmax).
With --device-fill copy (the default), the copy engines do it outside the graph (store/copyfill.py): the step's
first kernel enters the blocks that have landed, and the host queues more copies after each launch. Once its
plan, which then holds every key not resident, has landed, the table is complete (every MoE key resident, nothing
to evict): the steps after replay a third graph per span whose MoE layers only look their slots up (the table's
`lookup`: no resolve, gather, CPU hand-off or prefetch). While such a plan is in flight nothing is evicted either:
the filling steps replay a fourth graph whose layers look their slots up, loading a planned key into its reserved
slot, and gather those (no resolve).
With --cpu-experts auto (a CpuMailbox, model/cpu_mailbox.py), each MoE layer runs
    resolve (some misses to the CPU, by `cpu_split`'s table) -> post (kernels/cpu_handoff.py: their rows, weights
    and x to the mailbox) -> gather (the others) -> the device's experts -> wait (the worker's sum, added),
so the CPU computes its share while the link copies the rest and the device computes its experts.
Does not own: the math (model/transformer.py segments), the tables and kernels, nor the choice of step
(engine.py).

Legend: L layers, K top-k, V vocab.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Any

import torch
from torch import Tensor

from tiered.decode.capture import pool_bytes
from tiered.decode.devpolicy import DEFAULT_PARAMS, NextUse, NextUseParams
from tiered.decode.fillpace import FILL_AUTO_MAX, FillPace
from tiered.decode.sampling import argmax_into
from tiered.kernels import cpu_handoff
from tiered.kernels.moe_decode import Landing
from tiered.kernels.slot_table import (demand_gather_ctas, demand_gather_options, fill_gather_options, fill_windows,
                                       gather_overlap_mode, row_chunks, split_granule, topk_resolve_enabled)
from tiered.layout.quant import QuantWeight
from tiered.model.transformer import Transformer
from tiered.store.copyfill import CopyFill
from tiered.store.offload import CostModel, admit_penalty

COMPLETE_STEP_ENV = "TIERED_COMPLETE_STEP"


def complete_step_mode() -> str:
    """TIERED_COMPLETE_STEP (a benchmark's knob): where the copy fill plans every key not resident, unset or 1 (the
    default) looks the slots up without resolve both while the plan is in flight (planned keys load into their
    reserved slots, the gather copies them) and after it has landed (no gather either); `after`: only after it has
    landed; 0: neither (resolve and gather in every step)."""
    v = os.environ.get(COMPLETE_STEP_ENV, "").strip() or "1"
    if v not in ("0", "1", "after"):
        raise ValueError(f"{COMPLETE_STEP_ENV}={v!r}: expected 1 (the default), after or 0")
    return v


NEXT_USE_STREAM_ENV = "TIERED_NEXT_USE_STREAM"


def next_use_stream_enabled() -> bool:
    """TIERED_NEXT_USE_STREAM (a benchmark's knob): "0" runs eviction by predicted next use's per-layer update in the
    step's stream, between the layer's resolve and its gather (the measured comparison); unset or "1": on a stream
    of its own beside the layer's copies and experts, joined before the next resolve."""
    v = os.environ.get(NEXT_USE_STREAM_ENV, "").strip()
    if v not in ("", "0", "1"):
        raise ValueError(f"{NEXT_USE_STREAM_ENV}={v!r}: expected 0 (in the step's stream) or 1 (its own, the default)")
    return v != "0"


CPU_RETUNE_ENV = "TIERED_CPU_RETUNE"
# The CPU-rate guard lowers the take table when the worker's achieved rate falls below this share of the rate the
# load-time table assumed (the probe's rate times CPU_CONTENTION).
CPU_GUARD = 0.8
CPU_GUARD_MIN_EXPERTS = 16  # experts the worker computes in a window before its rate is trusted


def cpu_retune_steps() -> int:
    """TIERED_CPU_RETUNE: the CPU-rate guard's window in steps (default 16); 0 turns the guard off."""
    v = os.environ.get(CPU_RETUNE_ENV, "").strip() or "16"
    if not v.isdigit():
        raise ValueError(f"{CPU_RETUNE_ENV}={v!r}: expected a number of steps (0: off; default 16)")
    return int(v)


class DeviceStep:
    """The one-token step of a model whose provider has a DeviceSlotTable (`provider.devtable`).

    graphs=False runs the same body eagerly (any device; on CPU the table's torch reference and a copy loop
    stand in for the kernels): what the CPU tests run, token for token the algorithm the graph replays."""

    def __init__(self, model: Transformer, *, graphs: bool = True, prefetch: int = 0,
                 transitions: tuple[Tensor, Tensor] | None = None, time_mix: float = 0.5, prefetch_ctas: int = 32,
                 evict: str = "policy", nextuse: NextUseParams | None = None, fill: int | str = 0,
                 fill_ctas: int = 32, cpu: Any = None, cpu_take: list[int] | None = None,
                 cpu_rows: list[int] | bool | None = None, cpu_admit: bool = False, split_ctas: int = 32,
                 topk_resolve: bool | None = None) -> None:
        """evict: "policy" (the table's lru/flru) or "nextuse" (decode/devpolicy.py: evict the latest predicted next
        use; a prefetch then takes the non-resident candidates of highest probability, over victims predicted
        later only). nextuse: its weights (default DEFAULT_PARAMS). Both prediction modes need `transitions`.
        fill: experts per step copied into free slots in the background (0 = off; "auto": as many as the link
        moves in FILL_SHARE of a step, timed in the first steps of a decode (decode/fillpace.py); off with
        cpu_admit); fill_ctas: the programs of that copy (it runs beside the step's compute, which keeps the other
        SMs). fill "copy": the copy engines instead (store/copyfill.py): a plan of every key not resident at the
        decode's start, reserved in free slots, copied by cudaMemcpyAsync outside the graph, which only enters
        what has landed (its first kernel); not with cpu_admit nor a paced link (--h2d-gbps).
        cpu: a started CpuMailbox (model/cpu_mailbox.py; --cpu-experts auto): resolve sends some of a layer's misses
        to it, by cpu_take[m] of m misses (None: the provider's cost model, `cpu_split`). cpu_rows: besides, one
        miss a layer split by FFN rows, the CPU computing its first cpu_rows[m] (None: the cost model's
        `cpu_row_split` where the table can split, with cpu_take None; False: no split). cpu_admit: the split miss
        takes a slot of its own, reserved while the CPU's rows are copied after the layer's experts on a side stream
        (split_ctas programs), and enters the table at the step's end (else it goes to the split row and is not
        kept).
        topk_resolve: where the model's one-token router runs as its Triton kernel, its softmax-top-k runs inside
        each layer's resolve launch (one launch a layer less); None = off unless TIERED_TOPK_RESOLVE=1 (a benchmark
        knob: measured 2% slower on the H200, session 21)."""
        table = getattr(model.provider, "devtable", None)
        if table is None:
            raise ValueError("DeviceStep needs an expert cache with a device slot table (--slot-table device)")
        if model.observer is not None or model.prefetch_hook is not None:
            raise ValueError("the device step runs no routing observer or prefetch hook (they read the routing on "
                             "the host): use --slot-table host with prefetch or --policy predicted")
        self.model = model
        self.table = table
        cfg = model.config
        self.L, self.K = cfg.num_layers, cfg.top_k
        dev = model.device
        self.device = dev
        self.graphed = bool(graphs) and dev.type == "cuda"
        cuda = dev.type == "cuda"
        self.step_host = torch.zeros(2, dtype=torch.int64, pin_memory=cuda)  # token, position
        self._step_ev = torch.cuda.Event() if cuda else None
        self.step_dev = torch.zeros(2, dtype=torch.int64, device=dev) if cuda else self.step_host
        # decode/ahead.py's GreedyStep: the step reads its token and position here and leaves its argmax and
        # position + 1 (views of step_dev, which `step` fills from the host instead)
        self.token, self.pos = self.step_dev[0:1], self.step_dev[1:2]
        self.slots = torch.zeros(self.L, self.K, dtype=torch.int64, device=dev)  # [L, K] rows the experts read
        self.src = torch.full((self.L, self.K), -1, dtype=torch.int64, device=dev)  # [L, K] RAM rows of misses
        self.routing = model.routing
        # Prefetch one layer ahead: during layer l's experts (on a side stream), the `prefetch` experts of layer l+1
        # that router history ranks highest, (1 - m) * sum of P(e' at l+1 | e at l) over layer l's ids + m * sum of
        # P(e at t | e' at t-1) over the previous token's ids at l+1 (predict/predictors.py History), are loaded.
        self.prefetch = int(prefetch)
        self.moe_index = {l: i for i, l in enumerate(cfg.moe_layers)}
        if evict not in ("policy", "nextuse"):
            raise ValueError(f"evict must be 'policy' or 'nextuse', got {evict!r}")
        self.nu: NextUse | None = None
        if evict == "nextuse":
            if transitions is None:
                raise ValueError("eviction by predicted next use needs router-history transitions "
                                 "(PredictorParams.layer_trans, .time_trans): run `tiered tune --fit-trace`")
            self.nu = NextUse(nextuse or DEFAULT_PARAMS, transitions[0], transitions[1],
                              moe_layers=list(cfg.moe_layers), num_layers=cfg.num_layers,
                              num_experts=cfg.num_experts, top_k=cfg.top_k, device=dev)
        # The next-use update of layer l (one kernel, which also writes the nt layer l+1's resolve reads) needs only
        # layer l's ids: on CUDA it runs on a stream of its own, forked after layer l's resolve and joined before
        # layer l+1's (and before layer l's prefetch, which reads its probabilities), so it is off the path from
        # resolve through the copies to the experts.
        self.nu_stream = (torch.cuda.Stream(dev) if self.nu is not None and dev.type == "cuda"
                          and next_use_stream_enabled() else None)
        if self.prefetch:
            if transitions is None:
                raise ValueError("device prefetch needs router-history transitions (PredictorParams.layer_trans, "
                                 ".time_trans): run `tiered tune --fit-trace` on the layout")
            lt, tt = transitions
            self.ltrans = lt.to(dev, torch.float32) * (1.0 - time_mix)  # [M-1, E, E]
            self.ttrans = tt.to(dev, torch.float32) * time_mix  # [M, E, E]
            self.prev_ids = torch.zeros(self.L, self.K, dtype=torch.int64, device=dev)  # last token's ids
            # layer l's ids as the side stream reads them: a static row, not the segment's output, whose memory the
            # compute stream may reuse while the prefetch still runs (in graphs, allocations are per stream)
            self.pf_ids = torch.zeros(self.L, self.K, dtype=torch.int64, device=dev)
            C = self.prefetch
            self.pf_slot = torch.full((self.L, C), -1, dtype=torch.int64, device=dev)
            self.pf_src = torch.full((self.L, C), -1, dtype=torch.int64, device=dev)
            self.pf_stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None
            self.pf_ctas = int(prefetch_ctas)
        # Background fill: while the table has free slots (more than one layer's K, kept for demand misses), each
        # step copies `fill` experts that are not resident into them, on a side stream beside the whole step, and
        # installs them at its end. The order interleaves the layers (each layer's likeliest expert, then its
        # second, ...; likeliest by the column sums of the router-history time transitions when given, else by
        # expert id), so every layer fills at the same pace. A fill never evicts. It beats demand paging where the
        # budget has room to spare: the misses a demand policy takes at a key's first use are loaded before it.
        # The host watches how many blocks the fill has picked (read back without waiting, a step or more late);
        # once it has picked nothing for `fill_windows` reads in a row, the steps replay graphs without the fill
        # (captured beside the others), until the next decode phase.
        self.pace: FillPace | None = None
        self.copy: CopyFill | None = None
        copy = fill == "copy"
        if copy:  # the copy engines fill instead (store/copyfill.py): no pick, copy or join in the step's graph
            if cpu_admit:
                raise ValueError("--device-fill copy runs without --cpu-split admit (its later copies take slots too)")
            if table.h2d_gbps > 0:
                raise ValueError("--device-fill copy moves blocks with the copy engines, which --h2d-gbps cannot "
                                 "pace: use --device-fill auto or N with a paced link")
            fill = 0
        if fill == "auto":
            fill = 0 if cpu_admit else FILL_AUTO_MAX  # (admit's later copies race a fill: auto leaves it off)
            if fill:
                self.pace = FillPace(_link_gbps(table), table.block_size, cap=fill)
        elif isinstance(fill, str) or int(fill) < 0:
            raise ValueError(f"fill must be 'auto' or >= 0 experts per step, got {fill!r}")
        self.fill = int(fill)
        self.idle: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = {}  # span -> the graph without the fill
        self.filling = self.fill > 0 or copy  # a second graph per span: with the fill's kernels
        self.fill_active = self.fill > 0
        self._fill_held = False  # hold_fill: a benchmark's warm-up without the fill
        if self.filling:
            E = cfg.num_experts
            if transitions is not None:  # [M, E]: how often each expert follows any other, per MoE layer
                rank = transitions[1].to(torch.float32).sum(1).argsort(dim=1, descending=True, stable=True).tolist()
            else:
                rank = [list(range(E))] * len(cfg.moe_layers)
            self.fill_order = torch.tensor([l * E + rank[i][r] for r in range(E)
                                            for i, l in enumerate(cfg.moe_layers)], dtype=torch.int64, device=dev)
        if table.copy_fill is not None:  # a step made before on this table: its plan released first
            table.copy_fill.drain()
        if copy:
            self.copy = CopyFill(table, self.fill_order.tolist(), keep_free=self.K)
            self._copy_last = False  # every block has landed: one more step with the install, then idle
        table.copy_fill = self.copy  # drained by the table's give_back
        # A complete table: the copy fill's plan held every MoE key not resident and has landed, so every key the
        # step can route to is resident and no miss, eviction or copy can happen until the table goes back to the
        # host. Those steps replay `whole` (a graph per span whose layers only look their slots up). Possible when
        # the slots can hold every MoE key.
        # While such a plan is in flight, nothing is evicted either (a miss is on a planned key, which loads into its
        # reserved slot): the filling steps replay `planned` graphs, whose layers look their slots up and load a
        # planned key in place of resolve, then gather.
        moe = list(cfg.moe_layers)
        E = cfg.num_experts
        mode = complete_step_mode()
        self.can_complete = (self.copy is not None and table.slots.shape[0] >= len(moe) * E and mode != "0")
        self.can_plan = self.can_complete and mode == "1"
        self.complete = False
        self.planned = False  # this phase's plan holds every key not resident (and can_plan)
        self.complete_steps = self.planned_steps = 0
        self.planned_graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self.n_lookups = len(moe) * self.K  # a complete step's hits
        self.whole: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        if self.can_complete:
            def lt(v):
                return torch.tensor(v, dtype=torch.int64, device=dev)
            # lookup's rows: per MoE layer, its own routed ids (row 0); a replayed routing's rows, all layers at once
            self._lookup_one = {l: (lt([0]), lt([l]), lt([l * E])) for l in moe}
            if self.routing is not None:
                self._lookup_all = (lt([self.routing._layer(l) for l in moe]), lt(moe), lt([l * E for l in moe]))
        if self.fill:
            self.fill_cursor = torch.zeros(1, dtype=torch.int64, device=dev)
            self.fill_picked = torch.zeros(1, dtype=torch.int64, device=dev)
            self._fill_seen = torch.zeros(1, dtype=torch.int64, pin_memory=cuda)
            self._fill_ev = torch.cuda.Event() if cuda else None
            self._fill_pending = False
            self._fill_last = -1
            self._fill_dry = 0
            self._fill_windows = fill_windows(self.fill_order.shape[0])
            # experts a step fills, read by the captured kernel at each replay: 0 while graphs are captured (their
            # warm-ups run the step for real, and a fill there would load blocks no step counts)
            self.fill_n = torch.full((1,), self._fill_count(), dtype=torch.int64, device=dev)
            self.fill_key = torch.full((self.fill,), -1, dtype=torch.int64, device=dev)
            self.fill_slot = torch.full((self.fill,), -1, dtype=torch.int64, device=dev)
            self.fill_src = torch.full((self.fill,), -1, dtype=torch.int64, device=dev)
            self.fill_stream = torch.cuda.Stream(dev) if cuda else None
            self.fill_ctas = int(fill_ctas)
            self.fill_gather = fill_gather_options()  # the copy's warps:block:chunks (TIERED_FILL_GATHER)
            # auto: the steps timed (CUDA events recorded after a replay, or the host clock when eager), marks
            # where pace.marks_at says; the oldest two give a window's mean step once the later one has completed
            self._pace_marks: list[tuple[int, Any]] = []
            self._pace_count = 0
        # CPU experts: per MoE layer, resolve's RAM rows of the misses sent to the CPU (the worker's sum is added
        # to the layer's device experts' output, `_cpu_add`); seq: the handshake's numbers (kernels/cpu_handoff.py)
        self.cpu = cpu
        self.cpu_take: list[int] | None = None
        self.cpu_split: list[int] | None = None
        self.cpu_admit = False
        self._layer = 0  # the MoE layer whose experts run now (`_cpu_add` copies its split's rest)
        self._split_forked = False  # an admitted split's later copy is on split_stream, not joined yet
        if cpu is not None:
            self.cpu_row = torch.full((self.L, self.K), -1, dtype=torch.int64, device=dev)
            self.cpu_seq = torch.zeros(3, dtype=torch.int32, device=dev)
            rs = None
            if (cpu_take is None and cpu_rows is None and table.split_spec is not None
                    and (cpu_admit or table.split_slot is not None)):  # (a split needs its row, unless admitted)
                rs = cpu_row_split(model.provider, self.K, cpu, table.split_F, split_granule(table.split_F))
            if rs is not None:
                self.cpu_take, self.cpu_split = rs
            else:
                self.cpu_take = list(cpu_take) if cpu_take is not None else cpu_split(model.provider, self.K, cpu)
                self.cpu_split = list(cpu_rows) if cpu_rows not in (None, False) else None
            if len(self.cpu_take) != self.K + 1:
                raise ValueError(f"cpu_take needs K + 1 = {self.K + 1} entries (misses 0..K), got {len(self.cpu_take)}")
            self.cpu_admit = bool(cpu_admit) and self.cpu_split is not None
            if self.cpu_admit and (self.prefetch or self.fill):
                raise ValueError("--cpu-split admit runs without device prefetch or fill (their copies and pins "
                                 "would race the split's later copy)")
            if self.cpu_admit and table.slots.shape[0] < self.K + len(cfg.moe_layers):
                raise ValueError(f"--cpu-split admit reserves up to one slot a MoE layer until the step's end: it "
                                 f"needs at least top-k + {len(cfg.moe_layers)} device slots, the table has "
                                 f"{table.slots.shape[0]} (raise --vram-gb)")
            table.set_cpu_take(self.cpu_take, self.cpu_split, admit=self.cpu_admit)
            # The CPU-rate guard (the cost model's whole-expert table only): every `retune_every` steps the worker's
            # achieved rate over the window (its own counters, no sync); below CPU_GUARD of the rate the load-time
            # table assumed, the table again at that rate, never above the load-time one (`guarded_take`). In one
            # lease (session 56, call B) the worker's time an expert ranged 83-239 us between fresh processes on
            # one box, while each process kept the table its load-time probe gave.
            self.take_load = list(self.cpu_take)
            self.retune_every = (cpu_retune_steps() if cpu_take is None and self.cpu_split is None
                                 and not self.cpu_admit else 0)
            self.cpu_retunes = 0
            self.cpu_gbps_seen: float | None = None
            self._retune_mark = (0, 0.0)
            if self.retune_every:  # (the load-time probe's experts are not the step's)
                st = cpu.stats()
                self._retune_mark = (st["experts"], st["compute_s"])
            # the admitted splits' later copies: on their own stream beside the CPU's tail and the next layers, joined
            # at the step's end
            self.split_stream = torch.cuda.Stream(dev) if cuda and self.cpu_admit else None
            self.split_ctas = int(split_ctas)
        self.demand_ctas = demand_gather_ctas()  # the misses' copy programs (None: 4 per SM; TIERED_GATHER_CTAS)
        # and their copy shape (TIERED_GATHER; {}: gather's defaults)
        self.demand_gather = demand_gather_options(paced=table.h2d_gbps > 0)
        # The overlapped gather: a layer's resident experts compute while its misses copy. The experts' gate_up
        # follows the gather in the stream under PDL without waiting for it: each copied chunk raises its row's
        # count in `landed`, and only the misses' gate_up programs wait for their own rows (kernels/moe_decode
        # .Landing); the down projection waits for gate_up as a whole (TIERED_GATHER_OVERLAP=down: it starts
        # beside gate_up too, summing the resident pairs once their gate_up programs are done (`done`), then the
        # copied ones; measured slower in its first form). gate_up launches once every gather program is resident
        # (and down, with `down`, once every gate_up program is), so the copies always progress. Without PDL the
        # kernels keep the stream order (no overlap, the same results). The resident pairs are summed first with
        # the overlap off too (`ordered`), so every mode gives the same bits. Float experts through the decode
        # kernels only (the quantized kernels take no wait), and not with a row split of a miss (its copies are not
        # counted).
        self.ordered = (cuda and table.cpu_split is None and bool(model.kernels)
                        and not isinstance(model.provider.weights.gate, QuantWeight))
        self.overlap = self.ordered and gather_overlap_mode() != "off"
        self.down_per_pair = self.overlap and gather_overlap_mode() == "down"
        if self.ordered:  # [L, 2, K]: per layer the pairs' landed chunks, then their finished gate_up programs
            self.landed = torch.zeros(self.L, 2, self.K, dtype=torch.int32, device=dev)
            self.land_chunks = row_chunks(table.block_size, **{k: v for k, v in self.demand_gather.items()
                                                               if k in ("block", "chunks", "tma")})
        self.topk_resolve = topk_resolve_enabled() if topk_resolve is None else bool(topk_resolve)
        self.norm_topk = bool(cfg.norm_topk_prob)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.graphed else None
        self.steps = 0
        self.launch_s = 0.0  # host seconds per step: the hand-over check, the inputs' copy and the replay
        self.capture_s = 0.0
        self.graph_mem_bytes = 0

    # --- the step's body (captured) ---
    def _body(self, span: int, fill: bool = False, complete: bool = False, planned: bool = False) -> Tensor:
        """complete: the table holds every MoE key (the copy fill has landed its whole plan): each MoE layer looks
        its slots up and does nothing else of the table's (no fill either). planned (with fill, the copy fill's):
        its plan holds every key not resident and is in flight: each MoE layer looks its slots up, loading a planned
        key into its reserved slot, then gathers those."""
        m = self.model
        if fill and self.copy is not None:
            self.copy.install()
        elif fill:
            self._fill_start()
        plan = m.static_plan(self.step_dev[1:2], span)
        only = complete or planned  # no resolve: slots by lookup
        if self.overlap and not only:  # every row's count from zero (a memset after the last step's kernels)
            self.landed.zero_()
        src = self.src if planned else None
        defer = self.topk_resolve and not only
        rows = self._replay_rows() if self.routing is not None else None
        look = only and rows is None  # the router's top-k launches write the slots too (their `lookup`)
        r = m.segment_first(self.step_dev[0:1], plan, defer_topk=defer,
                            lookup=self._lookup_args(0, planned) if look else None)
        out = None
        joined = True
        nu_forked = False  # an update in flight on nu_stream (joined before the next resolve and at the end)
        if only and rows is not None:  # every layer's replayed ids are known now: one lookup for all of them
            id_row, out_row, base = self._lookup_all
            self.table.lookup(rows[0], id_row, self.slots, out_row, base, src)
        for l in range(self.L):
            if m.layers[l].moe is not None and only:
                if rows is not None:
                    i = self.routing._layer(l)
                    r = dataclasses.replace(r, ids=rows[0][i:i + 1], weights=rows[1][i:i + 1])
                elif not r.looked_up:  # (a router the softmax-top-k kernel does not serve: a launch of its own)
                    one = self._lookup_one[l]
                    self.table.lookup(r.ids, one[0], self.slots, one[1], one[2], src)
                if planned:  # the planned keys this layer loads (no split: the CPU takes none of them)
                    self.table.gather(self.src[l], self.slots[l], ctas=self.demand_ctas, **self.demand_gather)
            elif m.layers[l].moe is not None:
                # the router's own top-k, when it left it to resolve (computed there even under an override, whose
                # row then replaces it: the step does the real path's work)
                topk = (r.logits[0], r.ids[0], r.weights[0], self.norm_topk) if r.topk_pending else None
                if rows is not None:  # the override's row for this layer replaces the router's choice
                    i = self.routing._layer(l)
                    r = dataclasses.replace(r, ids=rows[0][i:i + 1], weights=rows[1][i:i + 1])
                if not joined:  # layer l's prefetch (issued during layer l-1) lands before its lookups
                    torch.cuda.current_stream(self.device).wait_stream(self.pf_stream)
                    joined = True
                if nu_forked:  # layer l-1's update wrote the nt this resolve reads
                    torch.cuda.current_stream(self.device).wait_stream(self.nu_stream)
                    nu_forked = False
                nu = self.nu
                cpu = self.cpu is not None
                self._layer = l
                self.table.resolve(l, r.ids[0], self.slots[l], self.src[l],
                                   nt=nu.demand_nt(self.moe_index[l]) if nu is not None else None,
                                   cpu_row=self.cpu_row[l] if cpu else None, topk=topk)
                if topk is not None:
                    r = dataclasses.replace(r, topk_pending=False)
                if cpu:  # the CPU starts on its share before the copies of the others (in this stream: a post on a
                    # stream of its own measured about 0.95x in session 56, probably queued behind the early experts)
                    cpu_handoff.post(r.x, r.weights[0], self.cpu_row[l], self.cpu_seq, self.cpu)
                # the predictions' update and the prefetch's copies of the ids before the gather, so that nothing
                # comes between the gather and the experts (the overlap: gate_up follows the gather under PDL); the
                # update on its own stream where there is one, beside the copies
                if nu is not None and self.nu_stream is not None:
                    self.nu_stream.wait_stream(torch.cuda.current_stream(self.device))
                    r.ids.record_stream(self.nu_stream)  # (read there while this stream goes on)
                    with torch.cuda.stream(self.nu_stream):
                        nu.update(self.moe_index[l], r.ids[0])
                    nu_forked = True
                elif nu is not None:
                    nu.update(self.moe_index[l], r.ids[0])
                pf = self.prefetch and l + 1 < self.L and m.layers[l + 1].moe is not None
                if pf:
                    self.pf_ids[l].copy_(r.ids[0])
                if self.prefetch:  # (layer l-1's prefetch, which read this row, was joined before resolve)
                    self.prev_ids[l].copy_(r.ids[0])
                self.table.gather(self.src[l], self.slots[l], layer=l, ctas=self.demand_ctas,
                                  landed=self.landed[l, 0] if self.overlap else None, **self.demand_gather)
                if pf:
                    joined = self._prefetch_next(l)
            part = self._cpu_add if self.cpu is not None and m.layers[l].moe is not None and not only else None
            wait = (Landing(self.landed[l, 0], self.src[l], self.land_chunks, self.landed[l, 1], self.overlap,
                            self.down_per_pair)
                    if self.ordered and m.layers[l].moe is not None and not only else None)
            if l + 1 < self.L:
                r = m.segment_mid(l + 1, r, self.slots[l], plan, part, defer_topk=defer,
                                  lookup=self._lookup_args(l + 1, planned) if look else None, wait=wait)
            else:
                out = m.segment_last(r, self.slots[l], part, wait=wait)
        if nu_forked:  # the last layer's update, beside the last layer and the head
            torch.cuda.current_stream(self.device).wait_stream(self.nu_stream)
        if self.cpu_admit:  # the later copies have landed: their reserved slots enter the table
            self._split_join()
            self.table.split_install()
        argmax_into(out, self.token)  # the greedy pick and the next position, for `launch` (ahead.py)
        self.pos.add_(1)
        if fill and self.copy is None:
            self._fill_end()
        return out

    def _lookup_args(self, l: int, planned: bool = False) -> tuple | None:
        """fused_route.softmax_topk's lookup for MoE layer l of a complete table (planned: with its load, a plan of
        every key in flight; None for a dense layer)."""
        if self.model.layers[l].moe is None:
            return None
        t = self.table.t
        a = (t["slot_of"], l * self.model.config.num_experts, self.slots[l], t["bad_key"])
        return a + (t["host_row"], self.src[l], t["counts"]) if planned else a

    def _cpu_add(self, out: Tensor) -> Tensor:
        """moe.expert_mix's `partial`: after the layer's device experts (which run while the CPU computes), wait for
        the worker's answer to this layer's post, if any, and add it to `out` in place."""
        if self.cpu_admit:  # the layer's experts have read its split's slot: copy the CPU's rows into it on a side
            # stream, beside the CPU's tail and the next layers (the slot stays reserved until the step's end)
            cuda = self.split_stream is not None
            if cuda:
                self.split_stream.wait_stream(torch.cuda.current_stream(self.device))
                self._split_forked = True
            with torch.cuda.stream(self.split_stream) if cuda else contextlib.nullcontext():
                self.table.split_rest(self._layer, ctas=self.split_ctas)
        cpu_handoff.wait(self.cpu_seq, self.cpu, out)
        return out

    def _split_join(self) -> None:
        """The step's stream waits for the admitted splits' later copies, when any was issued since the last join
        (only then: a captured stream may wait only on work forked from it in the same capture)."""
        if self._split_forked:
            torch.cuda.current_stream(self.device).wait_stream(self.split_stream)
            self._split_forked = False

    def _fill_start(self) -> None:
        """Reserve free slots for the next non-resident experts (on the step's stream: it orders the reservation
        with the step's resolves) and copy them on the fill stream, beside the step."""
        self.table.fill_pick(self.fill_order, self.fill_cursor, self.fill_n, self.K, self.fill_key, self.fill_slot,
                             self.fill_src, self.fill_picked)
        cuda = self.fill_stream is not None
        if cuda:
            self.fill_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.fill_stream) if cuda else contextlib.nullcontext():
            self.table.gather(self.fill_src, self.fill_slot, ctas=self.fill_ctas, **self.fill_gather)

    def _fill_end(self) -> None:
        """The fill's copies have landed: its slots take their keys (a graph joins its side streams anyway)."""
        if self.fill_stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.fill_stream)
        self.table.fill_install(self.fill_key, self.fill_slot)

    def _fill_watch(self) -> None:
        """After a step with the fill: read the fill's pick count copied after an earlier step, if it has landed
        (never waiting; eager on CPU it has), and copy the current one. Picks that stop growing for `_fill_windows`
        reads in a row mean the fill has run dry (no free slot beyond top-k, or every key resident): it goes idle."""
        if self.pace is not None and (self._pace_tick() or not self.pace.settled):
            return  # (while the first window is timed, nothing is picked: that is not a dry fill)
        if self._fill_pending and (self._fill_ev is None or self._fill_ev.query()):
            self._fill_pending = False
            v = int(self._fill_seen[0])
            self._fill_dry = self._fill_dry + 1 if v == self._fill_last else 0
            self._fill_last = v
            if self._fill_dry >= self._fill_windows:
                self.fill_active = False
                return
        if not self._fill_pending:
            self._fill_seen.copy_(self.fill_picked, non_blocking=True)
            if self._fill_ev is not None:
                self._fill_ev.record(torch.cuda.current_stream(self.device))
            self._fill_pending = True

    def _copy_watch(self) -> None:
        """After a step with the copy fill's install: queue more copies (never waiting); once the host has seen every
        block land, the next step's install enters the last of them, and the steps after replay the graphs without
        it."""
        if self._copy_last:
            self.fill_active = False
            self.complete = self.can_complete and self.copy.completes
            self.planned = False
            return
        self._copy_last = self.copy.pump()

    def _fill_restart(self) -> None:
        """A decode phase starts (the table just came to the device): fill again until it runs dry (under auto,
        with the N chosen in an earlier phase; none when it chose 0)."""
        if self.copy is not None:
            self._copy_last = False
            self.complete = self.planned = False
            self.fill_active = not self._fill_held and self.copy.start() > 0
            if self.fill_active:
                self.planned = self.can_plan and self.copy.completes
                self.copy.pump(most=1)  # one batch before the first step; the rest after its launch (session 22's
                # timeline: the first step took 2.25 ms with the whole queue issued before it)
            elif not self._fill_held:  # nothing to plan: complete when every key is resident already
                self.complete = self.can_complete and self.copy.completes
        if self.fill:
            self.fill_active = self.pace is None or self.pace.n != 0
            self._fill_dry = 0
            self._fill_last = -1
            if self.pace is not None:
                self._pace_marks.clear()  # a mark from the last phase would time the prefill too
                self._pace_count = 0

    def hold_fill(self, held: bool) -> None:
        """Benchmarks: steps without the fill while held (the graphs without it replay, nothing is picked and auto's
        pace times nothing), e.g. a warm-up that should leave the cache a demand run would; False restores it."""
        self._fill_held = bool(held)
        if self.fill:
            self.fill_n.fill_(0 if held else self._fill_count())

    def _fill_count(self) -> int:
        """The experts a step fills now: --device-fill N, or auto's choice (0 while its first window is timed)."""
        if self.pace is None:
            return self.fill
        return self.pace.n or 0

    def _pace_tick(self) -> bool:
        """--device-fill auto, after a step with the fill graph: mark where the pace says (pace.marks_at: after
        the phase's first step, after its first window, then every pace.window steps; an event on the step's stream,
        or the host clock when eager) and, once the later of the two oldest marks has completed
        (never waiting), hand the window's mean step to the pace and write its N where the captured pick reads it.
        True when the fill goes off (auto chose or backed off to 0)."""
        p = self.pace
        self._pace_count += 1
        if p.marks_at(self._pace_count):
            self._pace_marks.append((self._pace_count, self._pace_mark()))
        if len(self._pace_marks) >= 2:
            (c0, e0), (c1, e1) = self._pace_marks[0], self._pace_marks[1]
            if not e1.done():
                return False
            dt = e0.seconds_to(e1)
            self._pace_marks.pop(0)
            before = p.n
            n = p.observe(dt / (c1 - c0))
            if n != before:
                self.fill_n.fill_(n)  # on the step's stream: the next replay's pick reads it
            if n == 0:
                self.fill_active = False
                return True
        return False

    def _pace_mark(self) -> "StepMark":
        """A time mark after the steps launched so far: a CUDA event on the step's stream, or the host clock."""
        return StepMark(torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None)

    def _prefetch_next(self, l: int) -> bool:
        """Issue layer l+1's prefetch (from layer l's ids in pf_ids[l]); on CUDA on the side stream, after layer
        l's copies, beside its experts. Returns whether the current stream is joined already (CPU: it ran inline)."""
        i = self.moe_index[l]
        cuda = self.pf_stream is not None
        if cuda:
            self.pf_stream.wait_stream(torch.cuda.current_stream(self.device))
            if self.nu_stream is not None:  # layer l's update (forked before the gather) wrote what it ranks by
                self.pf_stream.wait_stream(self.nu_stream)
        with torch.cuda.stream(self.pf_stream) if cuda else contextlib.nullcontext():
            if self.nu is not None:  # the non-resident experts most likely used, over victims predicted later
                cand = self.nu.prefetch(i, self.table.t["slot_of"], self.prefetch)
                self.table.prefetch(l + 1, cand, self.slots[l], self.pf_slot[l + 1], self.pf_src[l + 1],
                                    nt=self.nu.nt_pf)
            else:
                sc = (self.ltrans[i].index_select(0, self.pf_ids[l]).sum(0)
                      + self.ttrans[i + 1].index_select(0, self.prev_ids[l + 1]).sum(0))
                cand = sc.topk(self.prefetch).indices  # [C]
                self.table.prefetch(l + 1, cand, self.slots[l], self.pf_slot[l + 1], self.pf_src[l + 1])
            self.table.gather(self.pf_src[l + 1], self.pf_slot[l + 1], ctas=self.pf_ctas)
        return not cuda

    def _replay_rows(self) -> tuple[Tensor, Tensor]:
        """The override's rows at the step's position, every MoE layer at once (two device gathers a step, no sync):
        ids int64 [L', K] and weights fp32 [L', K], read by the layers through views."""
        ro = self.routing
        pos = self.step_dev[1:2]
        return ro.ids.index_select(0, pos)[0], ro.weights.index_select(0, pos)[0]

    # --- capture ---
    def capture_all(self) -> None:
        """Capture every span's graph now (a step never captures inside a timed decode)."""
        if not self.graphed:
            return
        for span in self.model.graph_spans():
            if span not in self.graphs:
                self._add(span)

    def _capture(self, span: int, fill: bool, complete: bool = False,
                 planned: bool = False) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._body(span, fill, complete, planned)
        graph.replay()  # the first launch uploads the graph: not in the first timed step
        return graph, out

    def _add(self, span: int) -> None:
        dev = self.device
        t0 = time.perf_counter()
        self.table.take()
        mem0 = pool_bytes(self.pool, dev)
        counts = self.table.t["counts"].clone()
        bad = self.table.t["bad_key"].clone()
        inputs = self.step_dev.clone()  # the warm-ups and the upload replay advance the token and position
        if self.fill:
            self.fill_n.zero_()
        with self.model.preserve_state():
            # Warm-ups execute the step (Triton compiles, cuBLAS workspaces): slot lookups, evictions and copies
            # happen for real, so the table and the slots stay consistent; only this step's own K/V position is
            # written, which the real step rewrites. Their hits and misses are not counted.
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._body(span, self.filling)
            torch.cuda.current_stream(dev).wait_stream(side)
            graph, out = self._capture(span, self.filling)
            if self.filling:
                self.idle[span] = self._capture(span, False)
            if self.can_complete:  # (warmed up first: its lookup kernel compiles outside the capture)
                with torch.cuda.stream(side):
                    self._body(span, False, True)
                    if self.can_plan:
                        self._body(span, True, False, True)
                torch.cuda.current_stream(dev).wait_stream(side)
                self.whole[span] = self._capture(span, False, True)
                if self.can_plan:
                    self.planned_graphs[span] = self._capture(span, True, False, True)
            torch.cuda.synchronize(dev)
        # (the table is rarely complete here: the complete body's warm-up and upload looked up keys not resident,
        # which raised bad_key; nothing else of the table changed)
        self.table.t["bad_key"].copy_(bad)
        self.table.t["counts"].copy_(counts)
        self.step_dev.copy_(inputs)
        if self.fill:
            self.fill_n.fill_(self._fill_count())
        self.graphs[span] = (graph, out)
        self.capture_s += time.perf_counter() - t0
        self.graph_mem_bytes += pool_bytes(self.pool, dev) - mem0

    # --- one step ---
    def ready(self) -> bool:
        """Every span's graph is captured (or no graphs are used): `launch` never captures."""
        return not self.graphed or all(s in self.graphs for s in self.model.graph_spans())

    @torch.inference_mode()
    def step(self, token: int, pos: int) -> Tensor:
        """Logits [1, V] (a static buffer: read it before the next step) of `token` at position `pos`."""
        return self._run(pos, token)

    @torch.inference_mode()
    def launch(self, pos: int) -> Tensor:
        """One step from the device buffers as they are (decode/ahead.py's GreedyStep): the token and position the
        previous step left in self.token and self.pos (or the prefill's argmax put there). pos: the host's count of
        that position (it picks the span's graph; the device buffer is never read back). Returns the logits."""
        return self._run(pos, None)

    def _run(self, pos: int, token: int | None) -> Tensor:
        """A step at `pos`: with `token`, copied from the host first (step); None: the device buffers (launch)."""
        m = self.model
        if pos >= m.max_context:
            raise ValueError(f"position {pos} is beyond max_context={m.max_context}")
        if self.routing is not None:
            self.routing._check(pos, 1)
        t0 = time.perf_counter()
        if self.table.owner != "device":
            self.table.take()
            self._fill_restart()
        span = m.graph_span(pos)
        if not self.graphed:
            if token is not None:
                self.step_host[0] = token
                self.step_host[1] = pos
                if self.step_dev is not self.step_host:
                    self.step_dev.copy_(self.step_host)
            fill = self.fill_active and not self._fill_held
            complete = self.complete and not fill
            planned = self.planned and fill
            out = self._body(span, fill, complete, planned)
            if fill and self.copy is not None:
                self._copy_watch()
            elif fill:
                self._fill_watch()
        else:
            if span not in self.graphs:
                self._add(span)
                t0 = time.perf_counter()
            if token is not None:
                self._step_ev.synchronize()  # the previous step's copy of step_host is done
                self.step_host[0] = token
                self.step_host[1] = pos
                self.step_dev.copy_(self.step_host, non_blocking=True)
                self._step_ev.record(torch.cuda.current_stream(self.device))
            fill = self.fill_active and not self._fill_held
            complete = self.complete and not fill
            planned = self.planned and fill
            if complete:
                graph, out = self.whole[span]
            elif planned:
                graph, out = self.planned_graphs[span]
            else:
                graph, out = self.graphs[span] if fill or not self.filling else self.idle[span]  # fill idle
            graph.replay()
            if fill and self.copy is not None:
                self._copy_watch()
            elif self.fill and fill:
                self._fill_watch()
        if complete:  # its lookups are hits the device does not count
            self.table.host_hits += self.n_lookups
            self.complete_steps += 1
        self.planned_steps += planned
        self.model.provider.note_device_token()
        self.steps += 1
        if self.cpu is not None and self.retune_every and self.steps % self.retune_every == 0:
            self._cpu_guard()
        self.launch_s += time.perf_counter() - t0
        return out

    def _cpu_guard(self) -> None:
        """The CPU-rate guard's window (see __init__): the worker's rate since the last trusted window, and the take
        table set again when `guarded_take` says so (a small copy, ordered after the steps in flight)."""
        st = self.cpu.stats()
        n, sec = st["experts"] - self._retune_mark[0], st["compute_s"] - self._retune_mark[1]
        if n < CPU_GUARD_MIN_EXPERTS or sec <= 0:
            return  # (too few experts yet: the window grows)
        self._retune_mark = (st["experts"], st["compute_s"])
        self.cpu_gbps_seen = n * self.model.provider.block_size / sec / 1e9
        take = guarded_take(self.model.provider, self.K, self.cpu, self.cpu_gbps_seen, self.take_load)
        if take != self.cpu_take:
            self.cpu_take = take
            self.table.set_cpu_take(take)
            self.cpu_retunes += 1

    # --- stats ---
    @property
    def host_s_per_layer(self) -> float | None:
        """Host seconds per layer of a step (the whole step's host work / L); None before any step."""
        return self.launch_s / (self.steps * self.L) if self.steps else None

    def stats(self) -> dict:
        if self.cpu is not None:  # a wait that gave up added zeros: the tokens since are not the model's
            cpu_handoff.check(self.cpu_seq)
            if int(self.cpu.ctl[3]):  # the worker refused a job (a row split of a quantized expert: -3)
                raise RuntimeError(f"the CPU expert worker refused a job (code {int(self.cpu.ctl[3])}): the tokens "
                                   "since are not the model's; rerun with --cpu-experts off")
        return {"spans": sorted(self.graphs), "steps": self.steps, "launch_s": self.launch_s,
                "host_s_per_layer": self.host_s_per_layer, "capture_s": self.capture_s,
                "graph_mem_bytes": self.graph_mem_bytes, "evict": "nextuse" if self.nu is not None else "policy",
                "next_use_stream": self.nu_stream is not None, "prefetch": self.prefetch,
                "fill": "copy" if self.copy is not None else "auto" if self.pace is not None else self.fill,
                "fill_auto": self.pace.stats() if self.pace is not None else None,
                "fill_picked": int(self.fill_picked[0]) if self.fill else 0,
                "fill_copy": self.copy.stats() if self.copy is not None else None,
                "fill_active": self.fill_active,
                "complete": self.complete, "complete_steps": self.complete_steps,
                "planned_steps": self.planned_steps, "gather_overlap": self.overlap,
                "down_overlap": self.down_per_pair,
                "cpu": None if self.cpu is None else {**self.cpu.stats(), "take": self.cpu_take,
                                                      "split": self.cpu_split, "admit": self.cpu_admit,
                                                      "take_load": self.take_load, "retunes": self.cpu_retunes,
                                                      "gbps_seen": self.cpu_gbps_seen}}

    def reset_stats(self) -> None:
        self.steps = self.complete_steps = self.planned_steps = 0
        self.launch_s = self.capture_s = 0.0


class StepMark:
    """A point in the step stream for --device-fill auto's timing: a timing event recorded on `stream` (CUDA), or
    the host clock now (stream None: an eager step on the CPU has finished when the host goes on)."""

    def __init__(self, stream: Any = None) -> None:
        self.event = None
        self.t = 0.0
        if stream is not None:
            self.event = torch.cuda.Event(enable_timing=True)
            self.event.record(stream)
        else:
            self.t = time.perf_counter()

    def done(self) -> bool:
        """The work before the mark has finished (never waits)."""
        return self.event is None or self.event.query()

    def seconds_to(self, later: "StepMark") -> float:
        """Seconds from this mark to a later one (both done)."""
        if self.event is not None:
            return self.event.elapsed_time(later.event) * 1e-3
        return later.t - self.t


def _link_gbps(table: Any) -> float:
    """The host->device rate the fill's copies see (GB/s): the paced target under --h2d-gbps, else the cost
    model's measured rate when the cache has one, else block copies into scratch memory timed now."""
    if getattr(table, "h2d_gbps", 0.0):
        return float(table.h2d_gbps)
    cm = getattr(table.cache, "cost_model", None)
    if cm is not None and cm.pcie_gbps > 0:
        return float(cm.pcie_gbps)
    return float(table.cache.vram.measure_h2d_gbps(scratch=True))


# The worker's rate beside the step's own copies, against its rate alone: on the H200 box (bench_mailbox.py, session
# 11 call D, 15 threads, 1 / 2 / 4 experts a post) 57 / 63 / 64 GB/s against 67 / 69 / 76 while the gather kernel
# pulled other blocks out of the same RAM.
CPU_CONTENTION = 0.85


def cpu_split(provider: Any, K: int, box: Any, gbps: float | None = None) -> list[int]:
    """take[m], m = 0..K: how many of a layer's m misses the CPU computes, by the provider's cost model
    (store/offload.py CostModel.place: each miss where it would finish first, the copies queued on the link and
    the CPU's jobs on the worker, a CPU placement charged offload.admit_penalty() of a copy for the admission it
    forgoes). The CPU's rate and fixed cost are the mailbox's own, as the step's kernels see
    them (CpuMailbox.probe_device; the rate times CPU_CONTENTION), else the provider's load-time probe; gbps: the
    CPU's rate as achieved beside the step instead (the CPU-rate guard's). No cost model (or no CPU rate): nothing
    goes to the CPU."""
    costs = _cpu_costs(provider, box, gbps)
    if costs is None:
        return [0] * (K + 1)
    pcie, rate, over = costs
    dm = CostModel(pcie, rate, cpu_overhead_s=over, fixed=True, reuse_penalty=admit_penalty())
    return [sum(dm.place(m, provider.block_size)) for m in range(K + 1)]


def _cpu_costs(provider: Any, box: Any, gbps: float | None = None) -> tuple[float, float, float] | None:
    """(link GB/s, CPU GB/s, the CPU's fixed cost in s) for the split tables: the provider's cost model, the CPU's
    rate and fixed cost the mailbox's own when measured (the rate times CPU_CONTENTION; gbps: this rate instead);
    None without a cost model or a CPU rate."""
    cm = getattr(provider, "cost_model", None)
    if cm is None:
        return None
    rate = gbps if gbps is not None else box.gbps * CPU_CONTENTION if getattr(box, "gbps", None) else cm.cpu_gbps
    if rate <= 0:
        return None
    return cm.pcie_gbps, rate, box.overhead_s if box.overhead_s is not None else cm.cpu_overhead_s


def guarded_take(provider: Any, K: int, box: Any, seen_gbps: float, take_load: list[int]) -> list[int]:
    """The CPU-rate guard's table: the load-time one (`take_load`) while the worker's achieved rate `seen_gbps` is at
    least CPU_GUARD of the rate that table assumed; below it, cpu_split at the achieved rate, never sending a layer
    more misses than the load-time table (the guard only takes work off a CPU slower than its probe said)."""
    costs = _cpu_costs(provider, box)
    if costs is None or seen_gbps >= CPU_GUARD * costs[1]:
        return list(take_load)
    return [min(a, b) for a, b in zip(cpu_split(provider, K, box, gbps=max(seen_gbps, 1e-3)), take_load)]


def cpu_row_split(provider: Any, K: int, box: Any, F: int, granule: int) -> tuple[list[int], list[int]] | None:
    """(take[m], split[m]), m = 0..K: of a layer's m misses, take[m] whole ones on the CPU and, when split[m] > 0,
    one more split by FFN rows (the CPU its first split[m], a multiple of `granule` below F; the link copies the
    rest): per m the choice that finishes first, max(link: (m - take - split / F) blocks, CPU: its fixed cost +
    (take + split / F) blocks at its rate), with cpu_split's rates and fixed cost; ties go to less CPU work. A
    split shortens a layer's copies where whole experts cannot balance the two sides (a lone miss: the link alone
    takes a block's time, the CPU its fixed cost and a block at its rate). None without a CPU rate."""
    costs = _cpu_costs(provider, box)
    if costs is None or costs[0] <= 0 or F < 2 * granule:
        return None
    pcie, rate, over = costs
    c, cc = provider.block_size / (pcie * 1e9), provider.block_size / (rate * 1e9)
    take, split = [0], [0]
    for m in range(1, K + 1):
        best = (m * c, 0.0, 0, 0)  # (time, the CPU's blocks, take, split rows)
        for t in range(m + 1):
            for r in range(0, F, granule) if t < m else (0,):
                f = t + r / F
                if f == 0:
                    continue
                best = min(best, (max((m - f) * c, over + f * cc), f, t, r))
        take.append(best[2])
        split.append(best[3])
    return take, split
