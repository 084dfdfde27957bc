"""The device tier's slot table kept on the device, so that an offloaded decode step needs no host round trip.

Owns: `DeviceSlotTable` (the device tensors of kernels/slot_table.py: key -> slot, slot -> key, eviction state,
clock, hit/miss counters, each key's row in the pinned RAM tier), which side owns the truth ("host": the
SlotTable in vram.py that get() uses; "device": these tensors, updated inside the captured step), and the hand-over
both ways (`take`, `give_back`), `refusal` (why a cache cannot use it), and the counters folded into the cache's
stats (`harvest`).
Does not own: the bytes (vram.SlotPool's slots, ram.PinnedPool's pinned rows), the kernels
(kernels/slot_table.py), nor the step that calls them (decode/devstep.py).

What it needs: CUDA; every expert in the pinned RAM tier (copy mode: one page-locked buffer the GPU reads over
UVA), so a miss is a copy from RAM, never a disk read; an eviction policy the device runs (lru, or flru with its
weight). Pacing (--h2d-gbps, a benchmark's slower link) is the gather kernel's (kernels/slot_table.gather, gbps),
`measure_pace` reports the rate it reaches. CPU experts (--cpu-experts auto) are a device decision: resolve
splits a call's misses between copies and the CPU by the cost model's table (`set_cpu_take`), and the step hands
the CPU's share to a native worker through mapped memory (model/cpu_mailbox.py); with --cpu-split auto|admit one
more miss may be split by FFN rows, its other rows copied into the split row after the zero row (auto) or into a
slot of its own, reserved while its CPU rows are copied after the layer and entered at the step's end (admit).

Legend: N keys = L * E, S device slots.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


DEVICE_TABLE_POLICIES = ("lru", "flru")
SLOT_TABLE_MODES = ("host", "device", "auto")


def refusal(*, cuda: bool, ram_slots: int, num_keys: int, block_size: int, policy: str, cpu_experts: str,
            h2d_gbps: float, prefetch_depth: int = 0) -> str | None:
    """Why the device slot table cannot serve this cache (a sentence that says what to change), or None."""
    if not cuda:
        return "the device slot table needs a CUDA device"
    if ram_slots < num_keys:
        gib = num_keys * block_size / 2 ** 30
        return (f"the device slot table needs every expert in the pinned RAM tier ({num_keys} blocks, "
                f"{gib:.2f} GiB): pass --ram-gb {gib * 1.001 + 0.01:.2f} or more")
    if policy not in DEVICE_TABLE_POLICIES:
        return (f"the device slot table evicts by {' or '.join(DEVICE_TABLE_POLICIES)}; --policy {policy} is "
                "scored on the host")
    if cpu_experts == "all":
        return "--cpu-experts all computes every expert on the host's worker: use --slot-table host with it"
    if prefetch_depth > 0:
        return "--prefetch-depth runs the predictor on the host: use --slot-table host with it"
    return None  # --h2d-gbps: the device step's gather kernel paces its own copies (DeviceSlotTable.h2d_gbps)


class DeviceSlotTable:
    """The slot table of `cache` (an ExpertCache) on its device.

    Args:
        cache: the ExpertCache whose device tier (vram), pinned RAM tier (ram, copy mode, holding every key) and
            clock this table mirrors.
        w: eviction weight (kernels/slot_table.py): 0 = LRU, else uses are worth w clock ticks (flru).
        kernels: the kernels/slot_table module (resolve, gather); the engine attaches the table (engine.load).
    """

    def __init__(self, cache: Any, *, w: int, kernels: Any) -> None:
        self.cache = cache
        self.kern = kernels  # kernels/slot_table (handed in: the store layer does not import kernels)
        self.w = int(w)
        vram, ram = cache.vram, cache.ram
        if ram is None or ram.rows is None or (vram.cuda and not ram.rows.is_pinned()):
            raise ValueError("the device slot table reads experts from a pinned RAM tier in copy mode")
        self.device = vram.device
        self.num_experts = cache.num_experts
        self.block_size = cache.block_size
        N, S = cache.num_layers * cache.num_experts, vram.n_slots
        dev = self.device
        self.t: dict[str, Tensor] = {
            "slot_of": torch.full((N,), -1, dtype=torch.int32, device=dev),
            "key_of": torch.full((S,), -1, dtype=torch.int32, device=dev),
            "last": torch.zeros(S, dtype=torch.int64, device=dev),
            "uses": torch.zeros(S, dtype=torch.int64, device=dev),
            "clock": torch.zeros(1, dtype=torch.int64, device=dev),
            # hits, misses (CPU experts included), prefetch: resident, loaded; misses computed on the CPU; misses
            # split with the CPU, and the FFN rows the CPU computed of them
            "counts": torch.zeros(7, dtype=torch.int64, device=dev),
            "host_row": torch.full((N,), -1, dtype=torch.int64, device=dev),
            # a complete table's lookup found a key not resident: key + 1 (an internal error; harvest raises)
            "bad_key": torch.zeros(1, dtype=torch.int64, device=dev),
        }
        self.host_pool = ram.rows  # uint8 [R, B] pinned
        self.slots = vram.pool[:S]  # uint8 [S, B] device (the zero slot, if any, is never handed out here)
        self.owner = "host"
        self.hits = self.misses = 0  # harvested from the device counters
        self.prefetched = 0  # blocks the device step's prefetch loaded
        self.host_hits = 0  # unharvested hits of steps that looked a complete table up (`lookup`: no device counter)
        self.handovers = 0
        self.cpu_misses = 0  # misses the device step computed on the CPU (--cpu-experts auto)
        self.bytes_h2d = 0  # what the device step's gathers copied (demand, prefetch, an admitted split's later rows)
        # CPU experts in the device step: of m misses in a call, cpu_take[m] go to the CPU (set_cpu_take), into the
        # all-zero slot row after the S slots
        self.zero_slot = vram.zero_slot
        self.cpu_take: Tensor | None = None
        # ... and of the rest, a miss split by FFN rows (cpu_split[m] rows on the CPU; kernels/slot_table.resolve,
        # gather's split mask): the others copied into the split row after the zero row (--cpu-split auto), or,
        # admitted (--cpu-split admit), into a slot of its own, the CPU's rows copied after the layer (`split_rest`)
        self.split_slot = getattr(vram, "split_slot", None)
        self.cpu_split: Tensor | None = None
        self.split_admit = False
        self.split_spec: Tensor | None = None  # gather's mask (slot_table.split_spec), None: no split possible
        # per layer, its call's split [rows, slot, RAM row] (resolve -> the gathers; the later copy of layer l runs
        # while layer l+1 resolves into its own row)
        self.split_c = torch.zeros(cache.num_layers, 3, dtype=torch.int64, device=dev)
        self.split_F = 0  # the experts' FFN rows, when a split is possible
        self.cpu_split_misses = 0
        self.cpu_split_rows = 0
        spec = kernels.split_spec(vram.pool, vram.weights) if vram.zero_slot is not None else None
        if spec is not None:
            spec[0] = -1 if self.split_slot is None else self.split_slot
            self.split_spec = torch.tensor(spec, dtype=torch.int64, device=dev)
            self.split_F = spec[5] * 4 // spec[7]
        # --h2d-gbps: every gather of the device step (demand, prefetch, fill) paced to this rate; measure_pace, at
        # the first hand-over, times one and reports the rate reached
        self.h2d_gbps = float(getattr(vram, "h2d_gbps", 0.0) or 0.0)
        self.h2d_gbps_achieved: float | None = None
        # the demand gather's own GB/s over UVA (1 and K blocks a launch), timed once at the first hand-over on CUDA:
        # the step's gathers run inside its graph, untimed, so this is what a per-token copy time is estimated from
        self.gather_gbps: dict[str, float] | None = None
        self.gather_shape: dict[str, int] = {}  # the demand gather's copy shape when not the default (TIERED_GATHER)
        # --device-fill copy (store/copyfill.py, attached by the device step): drained before a give_back; its plan
        # is made from the host's table as `take` handed it over (_taken: key_of, slot_of, host rows)
        self.copy_fill: Any = None
        self._taken: tuple[list[int], dict[int, int], list[int]] | None = None

    # --- the hand-over ---
    def take(self) -> None:
        """The host's table, eviction state and clock -> the device; copies the host issued finish first."""
        if self.owner == "device":
            return
        c = self.cache
        vram, ram = c.vram, c.ram
        N = c.num_layers * c.num_experts
        host_row = [ram.table.lookup(k) for k in range(N)]
        missing = [k for k, r in enumerate(host_row) if r is None]
        if missing:
            ram.preload(missing, c._t)
            host_row = [ram.table.lookup(k) for k in range(N)]
            if any(r is None for r in host_row):
                raise RuntimeError("the pinned RAM tier could not hold every expert for the device slot table")
        ram.settle()
        vt = vram.table
        last, uses = _policy_state(vt.policy, vt.key_of)
        cpu = {"slot_of": torch.full((N,), -1, dtype=torch.int32),
               "key_of": torch.tensor(vt.key_of, dtype=torch.int32),
               "last": torch.tensor(last, dtype=torch.int64), "uses": torch.tensor(uses, dtype=torch.int64),
               "clock": torch.tensor([c._t], dtype=torch.int64),
               "host_row": torch.tensor(host_row, dtype=torch.int64)}
        if vt.slot_of:  # one indexed write (element by element took most of a hand-over's ~2-3 ms)
            cpu["slot_of"][torch.tensor(list(vt.slot_of.keys()))] = torch.tensor(list(vt.slot_of.values()),
                                                                                 dtype=torch.int32)
        if vram.cuda:
            cur = torch.cuda.current_stream(self.device)
            cur.wait_stream(vram.stream)  # the host's copies into the slots land before the step reads them
        vram._pending.clear()
        for name, v in cpu.items():
            self.t[name].copy_(v)
        # (kept for the copy fill's plan only: a hand-over without one copies nothing more)
        self._taken = (list(vt.key_of), dict(vt.slot_of), host_row) if self.copy_fill is not None else None
        self.owner = "device"
        self.handovers += 1
        if self.h2d_gbps > 0 and self.h2d_gbps_achieved is None and vram.cuda:
            self.measure_pace()
        if self.gather_gbps is None and vram.cuda:
            rates = {str(n): self.measure_gather(n) for n in (1, self.cache.layout.config.top_k)}
            self.gather_gbps = {n: g for n, g in rates.items() if g is not None} or None

    def measure_gather(self, blocks: int) -> float | None:
        """Time one gather (paced under --h2d-gbps, as the step's are) of up to `blocks` resident blocks onto
        themselves (each slot re-copied from its own key's RAM row: the table's contents do not change) with CUDA
        events, after one warm launch; returns the GB/s reached (None when fewer than `blocks` slots are resident)."""
        key_of = self.t["key_of"][: self.slots.shape[0]]
        res = (key_of >= 0).nonzero().flatten()[:blocks]
        if res.numel() < blocks:
            return None
        dst = res.to(torch.int64)
        src = self.t["host_row"].index_select(0, key_of.index_select(0, res).to(torch.int64))
        # the demand gather's programs and copy shape (the benchmark knobs TIERED_GATHER_CTAS and TIERED_GATHER)
        ctas, shape = self.kern.demand_gather_ctas(), self.kern.demand_gather_options(paced=self.h2d_gbps > 0)
        self.gather_shape = shape
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.gather(src, dst, ctas=ctas, **shape)  # warm: compiles the kernel
        e0.record()
        self.gather(src, dst, ctas=ctas, **shape)
        e1.record()
        e1.synchronize()
        return dst.numel() * self.block_size / (e0.elapsed_time(e1) * 1e-3) / 1e9

    def measure_pace(self, blocks: int = 8) -> float | None:
        """The paced gather's rate (measure_gather of up to `blocks` blocks, fewer when fewer are resident); sets
        and returns h2d_gbps_achieved (None when no slot is resident yet)."""
        n = min(blocks, int((self.t["key_of"][: self.slots.shape[0]] >= 0).sum()))
        self.h2d_gbps_achieved = self.measure_gather(n) if n > 0 else None
        return self.h2d_gbps_achieved

    def give_back(self) -> None:
        """The device's table -> the host's SlotTable, policy and clock (syncs: a phase change, not per token)."""
        if self.owner == "host":
            return
        if self.copy_fill is not None:
            self.copy_fill.drain()
        self.harvest()
        self._taken = None
        c = self.cache
        vt = c.vram.table
        key_of = self.t["key_of"].tolist()
        last, uses = self.t["last"].tolist(), self.t["uses"].tolist()
        c._t = max(c._t, int(self.t["clock"][0]))
        policy = c.make_vram_policy()
        order = sorted((last[s], s) for s in range(len(key_of)) if key_of[s] >= 0)
        for t, s in order:
            policy.insert(key_of[s], t)
            if uses[s] > 1 and hasattr(policy, "set_uses"):
                policy.set_uses(key_of[s], uses[s])
        vt.policy = policy
        vt.key_of = key_of
        vt.slot_of = {k: s for s, k in enumerate(key_of) if k >= 0}
        vt._free = [s for s in range(len(key_of) - 1, -1, -1) if key_of[s] < 0]
        # the host's next copies into these slots must wait for the device steps that read them
        c.vram._handoff_t = -1
        self.owner = "host"
        self.handovers += 1

    # --- the step's calls (captured in its graph) ---
    def set_cpu_take(self, take: list[int], split: list[int] | None = None, *, admit: bool = False) -> None:
        """take[m] (m = 0..K): how many of a call's m misses the CPU computes (the cost model's split, decided per
        miss count once, so that the captured step only looks it up); split[m]: the FFN rows of one more miss the
        CPU computes, the device the others (0: none; None: no split at all); admit: that miss takes a slot (the
        step copies the CPU's rows after the layer, `split_rest`), else the split row."""
        if self.zero_slot is None:
            raise ValueError("CPU experts need the zero slot row (an expert cache built with --cpu-experts)")
        v = torch.tensor(take, dtype=torch.int32)
        if self.cpu_take is None or self.cpu_take.shape != v.shape:
            self.cpu_take = torch.zeros(v.shape, dtype=torch.int32, device=self.device)
        self.cpu_take.copy_(v)
        self.cpu_split = None
        if split is not None and any(split):
            if self.split_spec is None or (not admit and self.split_slot is None):
                raise ValueError("a row split needs plain (unquantized, unbiased) expert weights, and without admit "
                                 "the split row (--cpu-split auto)")
            if len(split) != len(take) or any(not 0 <= r < self.split_F for r in split) or any(
                    r and take[m] >= m for m, r in enumerate(split)):
                raise ValueError(f"split needs {len(take)} entries, each below the FFN's {self.split_F} rows, and a "
                                 f"split only where take[m] < m: got {split} with take {take}")
            self.cpu_split = torch.tensor(split, dtype=torch.int32, device=self.device)
            self.split_admit = bool(admit)

    def resolve(self, layer: int, ids: Tensor, out_slot: Tensor, out_src: Tensor, *, nt: Tensor | None = None,
                cpu_row: Tensor | None = None, topk: tuple | None = None) -> None:
        """ids int64 [K] of `layer` -> out_slot [K] slot rows, out_src [K] RAM rows of the misses (-1 on hits).
        nt int64 [N]: evict by these predicted next uses instead of the table's lru/flru (kernels/slot_table).
        cpu_row int64 [K]: send misses to the CPU by set_cpu_take's split; their RAM rows land here (-1 elsewhere)
        and their slot row is the zero slot.
        topk = (logits [E], router ids [K], weights [K], norm_topk): the router's softmax-top-k first, in the same
        launch (kernels/slot_table.resolve's topk)."""
        cpu = None
        if cpu_row is not None:
            if self.cpu_take is None:
                raise ValueError("resolve(cpu_row=...) before set_cpu_take")
            cpu = (self.cpu_take, cpu_row, self.zero_slot)
            if self.cpu_split is not None:
                cpu += (self.cpu_split, -1 if self.split_slot is None else self.split_slot, self.split_c[layer],
                        self.split_admit)
        self.kern.resolve(ids, layer, self.num_experts, self.t, self.w, out_slot, out_src, nt=nt, cpu=cpu, topk=topk)

    def gather(self, src: Tensor, slot: Tensor, *, ctas: int | None = None, layer: int | None = None,
               landed: Tensor | None = None, **shape: int) -> None:
        """Copy the misses resolve found from the pinned RAM tier into their slots (on the current stream); ctas
        bounds the copy's programs (a prefetch beside compute should not take every SM). layer: a demand call's
        copies, the split miss's rows among them (the device slots' pool, split row included). shape: the copy's
        warps, block and chunks (kernels/slot_table.gather; the fill's from fill_gather_options). landed: the
        rows' landed-chunk counts (the device step's overlapped gather; not with a row split)."""
        if layer is not None and self.cpu_split is not None:  # (kernels/slot_table.gather refuses landed here)
            self.kern.gather(self.host_pool, src, slot, self.cache.vram.pool, ctas=ctas, gbps=self.h2d_gbps,
                             split=(self.split_spec, self.split_c[layer]), landed=landed)
        else:
            self.kern.gather(self.host_pool, src, slot, self.slots, ctas=ctas, gbps=self.h2d_gbps, landed=landed,
                             **shape)

    def split_rest(self, layer: int, *, ctas: int | None = None) -> None:
        """--cpu-split admit: copy the CPU's rows of `layer`'s split miss into its slot (after the layer's experts
        read the slot with those rows zeroed); nothing when the call split none."""
        sc = self.split_c[layer]
        self.kern.gather(self.host_pool, sc[2:3], sc[1:2], self.slots, ctas=ctas, gbps=self.h2d_gbps,
                         split=(self.split_spec, sc), inverse=True)

    def split_install(self) -> None:
        """--cpu-split admit, at the step's end (after its later copies landed): each layer's admitted split slot,
        reserved by resolve, enters the table under its key (kernels/slot_table.split_install)."""
        self.kern.split_install(self.split_c, self.t)

    def prefetch(self, layer: int, ids: Tensor, pin: Tensor, out_slot: Tensor, out_src: Tensor, *,
                 nt: Tensor | None = None, margin: int = 0) -> None:
        """Candidates ids int64 [C] of `layer` (-1 = skipped) loaded where slots are free to take, never one in `pin`
        [K] (the slots the layer being computed reads); resident ones untouched; with nt, only over victims
        predicted to be needed later (kernels/slot_table.resolve, prefetch=True)."""
        self.kern.resolve(ids, layer, self.num_experts, self.t, self.w, out_slot, out_src, pin=pin, prefetch=True,
                          nt=nt, margin=margin)

    def fill_pick(self, order: Tensor, cursor: Tensor, n_fill: Tensor, keep_free: int, out_key: Tensor,
                  out_slot: Tensor, out_src: Tensor, picked: Tensor) -> None:
        """Background fill: reserve up to n_fill[0] (a device scalar) free slots (leaving keep_free) for the first
        keys of `order` from `cursor` on that are not resident; out_src holds their RAM rows for `gather`, picked
        counts them (kernels/slot_table.fill_pick)."""
        self.kern.fill_pick(order, cursor, self.t, n_fill, keep_free, out_key, out_slot, out_src, picked)

    def plan_fill(self, order: list[int], keep_free: int) -> tuple[list[int], list[int], list[int], int]:
        """The copy-engine fill's plan, right after `take` (the device's table is then the host's, so no read-back):
        the keys of `order` not resident, each paired with a free slot (highest first: demand misses take the lowest),
        leaving keep_free free, with its RAM row. Each is reserved on the device (slot_of = -2 - slot, key_of = -2 -
        key) until the fill's install (kernels/slot_table.fill_land). keep_free applies only when the free slots
        cannot take every such key. Returns (keys, slots, rows, left): left, the keys of `order` neither resident nor
        planned (0: once the plan has landed, every key of `order` is resident)."""
        if self._taken is None or self.owner != "device":
            raise RuntimeError("plan_fill follows a hand-over to the device (take), before any step")
        key_of, slot_of, host_row = self._taken
        self._taken = None
        free = [s for s in range(len(key_of) - 1, -1, -1) if key_of[s] == -1]
        keys = [k for k in order if k not in slot_of]
        # keep_free is room for demand misses on keys the plan leaves out; a plan of every key needs none (a miss on
        # a planned key loads into its reserved slot), and once it has landed the table is complete
        n = len(keys) if len(keys) <= len(free) else max(0, min(len(keys), len(free) - int(keep_free)))
        left = len(keys) - n
        keys, slots = keys[:n], free[:n]
        if n:
            kt = torch.tensor(keys, dtype=torch.int64, device=self.device)
            st = torch.tensor(slots, dtype=torch.int64, device=self.device)
            self.t["slot_of"].index_copy_(0, kt, (-2 - st).to(torch.int32))
            self.t["key_of"].index_copy_(0, st, (-2 - kt).to(torch.int32))
        return keys, slots, [int(host_row[k]) for k in keys], left

    def lookup(self, ids: Tensor, id_row: Tensor, out: Tensor, out_row: Tensor, base: Tensor,
               src: Tensor | None = None) -> None:
        """A complete table (every key the step can route to is resident, and nothing is evicted): slots only, in
        place of resolve and gather (kernels/slot_table.lookup; the caller counts the hits, `host_hits`). src (shaped
        as out): a plan of every key is in flight instead: planned keys load into their reserved slots, their RAM
        rows go to src for `gather`, and the device counts hits and loads (lookup's `load`)."""
        load = None if src is None else (self.t["host_row"], src, self.t["counts"])
        self.kern.lookup(ids, id_row, out, out_row, base, self.t["slot_of"], self.t["bad_key"], load)

    def fill_install(self, fill_key: Tensor, fill_slot: Tensor) -> None:
        """After the fill's copies landed: the reserved slots take their keys (kernels/slot_table.fill_install)."""
        self.kern.fill_install(fill_key, fill_slot, self.t)

    # --- stats ---
    def harvest(self) -> tuple[int, int]:
        """Fold the device's counters into the cache's (its device tier and its decode phase: the device step runs
        one-token decode steps only; prefetched blocks count as bytes crossing PCIe and as prefetches) and zero
        them; returns the (hits, misses) added. Syncs the device."""
        h, m, pr, pl, nc, ns, nr = (int(x) for x in self.t["counts"].tolist())
        bad = int(self.t["bad_key"][0])
        if bad:
            E = self.num_experts
            raise RuntimeError(f"the device slot table: a complete-table step looked up layer {(bad - 1) // E} expert "
                               f"{(bad - 1) % E}, which was not resident (an internal error; the tokens since are "
                               "wrong). Rerun with TIERED_COMPLETE_STEP=0 and report it")
        h += self.host_hits
        self.host_hits = 0
        if self.copy_fill is not None:  # the copy engine's blocks seen landed: loaded ahead of use, as a fill's
            pl += self.copy_fill.take_landed()
        if h or m or pr or pl or nc or ns:
            self.t["counts"].zero_()
            c = self.cache
            B = self.block_size
            # a CPU expert is not copied; a split one is, but for the CPU's rows (nr of them, all splits together),
            # which an admitted split copies after the layer
            cpu_w = nc * B + (nr * B // self.split_F if ns else 0)  # what the CPU computed
            copied = (m + pl) * B - (nc * B if self.split_admit else cpu_w)  # the CPU's share was not copied
            self.hits += h
            self.misses += m
            self.prefetched += pl
            self.cpu_misses += nc + ns
            self.cpu_split_misses += ns
            self.cpu_split_rows += nr
            c.vram.hits += h
            c.vram.misses += m
            self.bytes_h2d += copied
            c.vram.bytes_in += copied
            ph = c._phases["decode"]
            ph.hits += h
            ph.misses += m
            ph.cpu += nc + ns
            ph.bytes_h2d += copied
            if nc or ns:
                with c.cpu.lock:
                    c.cpu.count += nc + ns
                    c.cpu.bytes += cpu_w
            ph.bytes_prefetch += pl * B
            c.prefetch_issued += pl
        box = getattr(self.cache, "cpu_box", None)
        if box is not None:  # the mailbox worker's compute time and layers served since the last harvest
            secs, layers = box.take_times()
            with self.cache.cpu.lock:
                self.cache.cpu.seconds += secs
                self.cache.cpu.layers += layers
        return h, m

    def stats(self) -> dict:
        return {"mode": "device", "owner": self.owner, "hits": self.hits, "misses": self.misses,
                "bytes": self.bytes_h2d,
                "prefetched": self.prefetched, "cpu_misses": self.cpu_misses,
                "cpu_split_misses": self.cpu_split_misses, "cpu_split_rows": self.cpu_split_rows,
                **({"h2d_gbps_target": self.h2d_gbps, "h2d_gbps_achieved": self.h2d_gbps_achieved}
                   if self.h2d_gbps > 0 else {}),
                **({"gather_gbps": self.gather_gbps} if self.gather_gbps else {}),
                **({"gather_shape": self.gather_shape} if self.gather_shape else {}),
                "handovers": self.handovers,
                "policy": "lru" if self.w == 0 else f"flru(w={self.w})"}

    def reset_stats(self) -> None:
        self.hits = self.misses = self.prefetched = self.cpu_misses = self.bytes_h2d = 0
        self.cpu_split_misses = self.cpu_split_rows = 0


def _policy_state(policy: Any, key_of: list[int]) -> tuple[list[int], list[int]]:
    """Per slot (last use tick, uses) from a host policy (LRU: its order's times, one use; flru: its counters)."""
    last, uses = [0] * len(key_of), [0] * len(key_of)
    order = getattr(policy, "_order", None)
    lasts, counts = getattr(policy, "_last", None), getattr(policy, "_uses", None)
    for s, k in enumerate(key_of):
        if k < 0:
            continue
        if order is not None:
            last[s], uses[s] = int(order[k]), 1
        elif lasts is not None:
            last[s], uses[s] = int(lasts[k]), int(counts[k])
        else:
            raise ValueError(f"the device slot table cannot take the state of a {type(policy).__name__} policy")
    return last, uses
