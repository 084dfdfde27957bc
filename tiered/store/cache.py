"""The expert cache: device slots over a pinned RAM tier over the layout on disk.

Owns: `ExpertCache` (the `ExpertProvider` of SEAMS.md that composes vram.SlotPool, ram.PinnedPool
and io.BlockReader; it also serves host slot ids, `HostSlotProvider`), its stats (docs/stats.md),
and `make_provider`, which the engine calls when a budget option is set.
Does not own: the options and the slot counts (budget.py), policies (policy.py: the device tier's
`predicted` policy is a `ScoredEviction` whose scores predict/ computes), bytes and copy ordering
(vram.py, ram.py), reads (io.py), nor what to prefetch (the prefetcher calls `prefetch`).

get(layer, ids) semantics (SEAMS.md): the ids of one call are the current step; they are pinned
until the next get(), so neither demand loads nor prefetches evict them. A call may ask for at
most `max_experts_per_call` = S experts; the MoE block splits larger sets (prefill) into waves.

Tiers per mode (the RAM tier has R slots, the device tier S):
  mmap + CUDA, registration accepted -> RAM slots are registered blocks of the mapping ("mmap-registered")
  mmap + CUDA, registration refused or off -> RAM slots are pinned copies ("mmap-staged")
  direct -> RAM slots are pinned copies filled by O_DIRECT ("direct")
  CPU, no --ram-gb -> R = 0: slots are filled straight from the mapping (mmap) or by O_DIRECT (direct)
"""
from __future__ import annotations

import sys
import time
from dataclasses import replace
from typing import Any, Callable, Sequence

import torch

from tiered.store.devtable import DeviceSlotTable, refusal as device_table_refusal  # noqa: F401
from tiered.store.budget import (GiB, CachePlan, estimate_dense_bytes, estimate_kv_bytes,
                                 estimate_scratch_bytes, meminfo, plan_budget)
from tiered.store.hostmem import HostRegistrar
from tiered.store.disk import expert_views
from tiered.store.io import BlockReader, Faults
from tiered.store.offload import CostModel, CpuExpertCounts, CpuWorker, cpu_threads, slow_link_hint
from tiered.store.options import (PREFILL_CHUNK, TIED_EMBED_HOST, BudgetError, TierConfig, default_context,
                                  physical_cores)
from tiered.store.policy import PREDICTED, ScoredEviction, make_policy
from tiered.store.provider import HostSlotProvider
from tiered.store.ram import PinnedPool
from tiered.store.vram import SlotPool

class _PhaseCounts:
    """Counters of one phase (prefill or decode)."""

    def __init__(self) -> None:
        self.hits = 0
        self.misses = 0
        self.bytes_h2d = 0  # every host->device expert copy: demand misses and prefetches
        self.bytes_prefetch = 0  # ... of which prefetches
        self.stall_s = 0.0
        self.tokens = 0  # get() calls at layer 0 in one-token steps (decode)
        self.ram_misses = 0  # device misses that missed the RAM tier too (read from the file)
        self.cpu = 0  # device misses computed on the CPU (--cpu-experts): no copy, not in the miss path's time
        self.miss_host_s = 0.0  # host seconds in get()'s miss path: slots assigned, RAM tier, copies issued
        self.ram_host_s = 0.0  # ... of which the host was in the RAM tier (bookkeeping, reads, checks, registration)
        self.ram_blocked_s = 0.0  # ... of which blocked on the reader's threads (reads, checks) or a slot's last copy


class ExpertCache(HostSlotProvider):
    """ExpertProvider over S device slots, R RAM slots and the layout on disk.

    Args:
        layout: an opened Layout.
        plan: slot counts (plan_budget).
        tiers: the flags (io, policies, verify, ...).
        device: compute device.
        faults: test hooks for the disk tier.
    """

    def __init__(self, layout: Any, plan: CachePlan, tiers: TierConfig, *, device: torch.device | str,
                 faults: Faults | None = None) -> None:
        self.layout = layout
        self.plan = plan
        self.embed_place = "gpu"  # where the model keeps its embedding table (make_provider: --embed resolved)
        self.tiers = tiers
        self.device = torch.device(device)
        cfg = layout.config
        self.num_layers, self.num_experts = cfg.num_layers, cfg.num_experts
        self.block_size = layout.block_size
        cuda = self.device.type == "cuda"
        flru_w = tiers.flru_w if tiers.flru_w is not None else float(cfg.num_layers)

        def pol(name: str) -> Any:
            if name == PREDICTED:  # scores come from the routing observer the engine builds (predict/prefetch.py)
                return ScoredEviction(cfg.num_layers, cfg.num_experts)
            return make_policy(name, **({"w": flru_w} if name == "flru" else {}))

        self.make_vram_policy = lambda: pol(tiers.policy)  # a fresh device-tier policy (devtable.give_back)
        self.reader = BlockReader(layout, io=tiers.io, verify=tiers.verify, threads=tiers.io_threads, faults=faults)
        S = plan.expert_slots
        # CPU experts (offload.py): a zero slot for the experts a step computes on the CPU, a worker thread
        # unset --cpu-experts: the plan's default (budget.resolve_cpu_experts: auto where the device slot table runs)
        self.cpu_mode = tiers.cpu_experts if tiers.cpu_experts is not None else plan.cpu_experts
        self.cpu_default = tiers.cpu_experts is None  # the engine may drop a default auto after its probe
        self.cpu_note: str | None = None  # why a default auto was dropped
        self.split = self.cpu_mode != "off"
        self.vram = SlotPool(S, self.block_size, layout.tensor_specs, pol(tiers.policy), device=self.device,
                             max_per_call=S, ring=max(64, 2 * cfg.num_layers + 2), zero_slot=self.split,
                             split_slot=(self.split and tiers.slot_table != "host"
                                         and tiers.cpu_split == "auto"))
        self.weights = self.vram.weights
        self.max_experts_per_call = S
        self.ram: PinnedPool | None = None
        self.io = "direct" if tiers.io == "direct" else "mmap-staged"
        if plan.ram_slots == 0 and cuda:
            raise BudgetError("on CUDA the RAM tier needs at least one slot: pass --ram-gb "
                              f"{self.block_size / GiB:.4f} or more")
        # --slot-table device|auto: the device resolves decode slots and copies misses out of the pinned RAM tier
        self.devtable: DeviceSlotTable | None = None
        self.device_table_w: int | None = None  # set when the device table applies (want_device)
        self.slot_table_note: str | None = None  # why auto stayed on the host
        want_device = False
        if tiers.slot_table != "host":
            why = device_table_refusal(cuda=cuda, ram_slots=plan.ram_slots, num_keys=self.num_layers * self.num_experts,
                                       block_size=self.block_size, policy=tiers.policy, cpu_experts=self.cpu_mode,
                                       h2d_gbps=tiers.h2d_gbps, prefetch_depth=tiers.prefetch_depth or 0)
            if why is not None and tiers.slot_table == "device":
                raise BudgetError(f"--slot-table device: {why}")
            self.slot_table_note = why
            want_device = why is None
        if plan.ram_slots:
            mode = "copy"
            if cuda and tiers.io == "mmap" and tiers.io_register == "auto" and not want_device:
                mode = "register" if self._probe_register() else "copy"
            self.ram = PinnedPool(plan.ram_slots, self.reader, pol(tiers.ram_policy), mode=mode, pin=cuda, cuda=cuda)
            if mode == "register":
                self.io = "mmap-registered"
        self._t = 0  # clock: one tick per get()
        self._pinned: set[int] = set()  # keys of the last get(): the current step
        self._prefetched: set[int] = set()  # loaded by prefetch, not used by a get() yet
        self._prefetch_seen = False  # prefetch() was called: every get() records its handoff point (vram.note_handoff)
        self._prefetched_ram: set[int] = set()  # read ahead into the RAM tier by prefetch, not used yet
        self.prefetch_issued = 0
        self.prefetch_used = 0
        self.phase = "decode"
        self._phases = {"prefill": _PhaseCounts(), "decode": _PhaseCounts()}
        self.gets: list[tuple[str, list[int]]] | None = None  # (phase, keys) per get() while record_gets() is on
        self.preload_s: float | None = None  # seconds --ram-preload took
        if tiers.ram_preload and self.ram is not None:
            t0 = time.perf_counter()
            self.ram.preload(list(range(self.num_layers * self.num_experts)), 0)
            self.preload_s = time.perf_counter() - t0
        if want_device:  # every expert in the pinned RAM tier: a device-step miss is a copy from RAM
            t0 = time.perf_counter()
            if not tiers.ram_preload:
                self.ram.preload(list(range(self.num_layers * self.num_experts)), 0)
                self.preload_s = time.perf_counter() - t0
            w = 0 if tiers.policy == "lru" else int(round(flru_w))
            self.device_table_w = w  # the engine attaches the DeviceSlotTable (it owns the kernels it runs)
            n = self.num_layers * self.num_experts
            print(f"tiered: slot table on the device (--slot-table {tiers.slot_table}): {n} experts in pinned RAM "
                  f"({n * self.block_size / GiB:.2f} GiB, loaded in {time.perf_counter() - t0:.1f} s)", file=sys.stderr)
            if self.cpu_mode == "off":
                hint = slow_link_hint(tiers.h2d_gbps or self.vram.measure_h2d_gbps(), physical_cores())
                if hint:
                    print("tiered: " + hint, file=sys.stderr)
        self._read_base = (self.reader.bytes_read, self.reader.blocks_read, self.reader.read_s)
        self.pace = self.vram.set_pace(tiers.h2d_gbps)
        self.cpu_threads = cpu_threads(tiers.cpu_threads) if self.split else 0
        self.cpu = CpuExpertCounts()
        self.cpu_worker: CpuWorker | None = CpuWorker(self.cpu_threads) if self.split else None
        self.cpu_dtype: str | None = None  # set by the model's CPU-expert code (model/cpu_experts.py)
        self.cpu_kernel: Any = None  # the native CPU expert kernel (model/cpu_experts.prepare), None = torch
        self.cpu_box: Any = None  # the device step's CPU-expert mailbox (model/cpu_mailbox.py; engine.load)
        # --cpu-experts auto: the cost model. CUDA: the PCIe rate is measured now (or the paced target), the CPU
        # rate by the model's probe (model/cpu_experts.prepare). A CPU device has no link to save (its device
        # tier is RAM), so auto places nothing on the CPU there, unless the copies are paced (--h2d-gbps: a
        # slow link emulated on the CPU) or a cost model is set (tests).
        self.cost_model: CostModel | None = None
        if self.cpu_mode == "auto" and (cuda or tiers.h2d_gbps > 0):
            pcie = tiers.h2d_gbps or self.pace.get("h2d_gbps_native") or self.vram.measure_h2d_gbps()
            self.cost_model = CostModel(pcie, 0.0)  # cpu_gbps 0 = "not measured": copy until the probe ran
        # write-behind (--cpu-write-behind): one expert the CPU computed is also copied into a slot while the link
        # is idle (no copy of this step, the last write-behind landed), so that its next use hits
        self.write_behind = self.cpu_mode == "auto" and cuda and tiers.cpu_write_behind == "on"
        self._wb_event: Any = None
        self.write_behind_n = 0
        self._file_views: Any = None  # ExpertWeights over the whole experts.bin mapping (row = key)
        self._ram_views: Any = None  # ExpertWeights over the RAM tier's copy buffer (row = RAM slot)

    def _probe_register(self) -> bool:
        """Try cudaHostRegister on one mapped block; False (and a note on stderr) when refused."""
        reg = HostRegistrar()
        row = self.reader.mapped_row(0)
        code = reg.register(row)
        if code:
            print(f"tiered: cudaHostRegister refused the mapped experts (CUDA error {code}); "
                  "staging copies through pinned memory instead (io = mmap-staged)", file=sys.stderr)
            return False
        reg.unregister(row)
        return True

    def record_gets(self, on: bool = True) -> list[tuple[str, list[int]]] | None:
        """Start (on) or stop recording the (phase, keys) of every get(); returns the list being filled (a fresh
        one when starting), or the finished one when stopping. Tests and benchmarks compare request streams."""
        if on:
            self.gets = []
            return self.gets
        out, self.gets = self.gets, None
        return out

    @property
    def eviction_scores(self) -> ScoredEviction | None:
        """The device tier's policy when it evicts by scores (--policy predicted): the prefetcher feeds it."""
        p = self.vram.table.policy
        return p if isinstance(p, ScoredEviction) else None

    # --- phases (optional: the engine says when decode starts) ---
    def set_phase(self, phase: str) -> None:
        """"prefill" or "decode": hit rates and stall share are reported over decode (docs/metrics.md)."""
        if phase not in self._phases:
            raise ValueError(f"phase must be prefill or decode, got {phase!r}")
        self.phase = phase

    # --- ExpertProvider ---
    def get(self, layer: int, expert_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """int64 [U] distinct ids of `layer` -> int64 [U] slot rows into `weights`, usable on the current stream."""
        return self.vram.index_tensor(self.get_slots(layer, expert_ids))

    def get_slots(self, layer: int, expert_ids: torch.Tensor | Sequence[int], *, wait: bool = True,
                  cpu: list | None = None, cpu_start: Callable[[list], None] | None = None) -> list[int]:
        """get() without the device index tensor: the slot rows as host ints (SEAMS.md, optional provider API).

        Same bookkeeping, copies and stream waits as get(); the caller hands the rows to the device itself
        (the piecewise decode step writes them into a static buffer that its next graph copies in).
        Called once per layer per token: no per-call tensors, one dict lookup per key on the hit path.
        wait=False leaves the current stream's wait to the caller (`wait_slots`), so compute on the slots
        that were resident can run while the missing ones are copied in (the batch step does this).
        cpu: a list to fill with the experts to compute on the CPU (--cpu-experts all, or auto's cost model on
        misses; only when `split`): (k, weights, row) per such expert, with k its index in expert_ids and
        weights[row] its host weights (ExpertWeights over the RAM tier or the file mapping, resident until the
        next get()). Their returned slot is `vram.zero_slot`, whose zero weights output exactly 0.
        cpu_start: called with the filled `cpu` list before the misses' copies are issued (and before any of
        their disk reads is waited for), so that the CPU computes while the link and the disk work; without it
        the list is filled after the copies are issued.
        """
        if self.devtable is not None and self.devtable.owner == "device":
            self.devtable.give_back()  # a host-routed call (prefill, the piecewise step) after device steps
        if type(expert_ids) is list:  # the piecewise step's host ints
            ids = expert_ids
        else:
            ids = expert_ids.tolist() if isinstance(expert_ids, torch.Tensor) else [int(e) for e in expert_ids]
        n = len(ids)
        if n > self.max_experts_per_call:
            raise ValueError(f"get(layer {layer}) asked for {n} experts at once, more than the "
                             f"{self.max_experts_per_call} slots: split the call into waves of max_experts_per_call")
        base = layer * self.num_experts
        keys = [base + e for e in ids]
        pinned = set(keys)
        if len(pinned) != n:
            raise ValueError(f"get(layer {layer}) got repeated expert ids {ids}: pass distinct ids")
        self._t += 1
        t = self._t
        if self.gets is not None:
            self.gets.append((self.phase, keys))
        self._pinned = pinned
        ph = self._phases[self.phase]
        if layer == 0 and self.phase == "decode":
            ph.tokens += 1
        vt = self.vram.table
        resident = vt.slot_of  # key -> slot (SlotTable's own dict: lookups without a call per key)
        touch = vt.policy.touch
        slots: list[int] = [resident.get(k, -1) for k in keys]
        on_cpu: list[int] = []
        if cpu is not None and self.split:
            on_cpu = self._place_cpu(slots, keys)
            for i in on_cpu:
                slots[i] = self.vram.zero_slot
        missing: list[int] = []
        prefetched = self._prefetched
        for i, k in enumerate(keys):  # hits are touched in key order
            if slots[i] < 0:
                missing.append(i)
                continue
            if on_cpu and i in on_cpu:
                continue
            touch(k, t)
            if prefetched and k in prefetched:
                prefetched.discard(k)
                self.prefetch_used += 1
        if missing or self._prefetch_seen:  # copies may follow (now, or a prefetch after more compute is enqueued)
            self.vram.note_handoff(t)
        nh = n - len(missing) - len(on_cpu)
        self.vram.hits += nh
        self.vram.misses += len(missing) + len(on_cpu)  # a CPU expert was not found in the device tier
        ph.hits += nh
        ph.misses += len(missing) + len(on_cpu)
        ph.cpu += len(on_cpu)
        if on_cpu and cpu_start is not None:
            self._host_blocks(layer, [keys[i] for i in on_cpu], on_cpu, t, pinned, cpu)
            cpu_start(cpu)
        if missing:
            t0 = time.perf_counter()
            ram_wait0 = self.ram.wait_s if self.ram is not None else 0.0
            ram_blocked0 = self.ram.blocked_s if self.ram is not None else 0.0
            ram_miss0 = self.ram.misses if self.ram is not None else self.reader.blocks_read
            mk = [keys[i] for i in missing]
            if self._prefetched_ram:
                for k in mk:
                    if k in self._prefetched_ram:
                        self._prefetched_ram.discard(k)
                        self.prefetch_used += self.ram.table.lookup(k) is not None
            slot_of = self._assign(mk, t, pinned)
            for i in missing:
                slots[i] = slot_of[keys[i]]
            self._load(mk, slot_of, t, pinned)
            ph.bytes_h2d += len(missing) * self.block_size
            ph.miss_host_s += time.perf_counter() - t0
            if self.ram is not None:
                ph.ram_misses += self.ram.misses - ram_miss0
                ph.ram_host_s += self.ram.wait_s - ram_wait0
                ph.ram_blocked_s += self.ram.blocked_s - ram_blocked0
            else:  # no RAM tier (CPU): every miss is read from the file
                ph.ram_misses += len(missing)
            if self.device.type == "cuda":
                ph.stall_s += (self.ram.wait_s - ram_wait0) if self.ram is not None else 0.0
            else:
                ph.stall_s += time.perf_counter() - t0
        if on_cpu and cpu_start is None:
            self._host_blocks(layer, [keys[i] for i in on_cpu], on_cpu, t, pinned, cpu)
        if on_cpu and not missing and self.write_behind:
            self._write_behind(keys[on_cpu[0]], t, pinned, ph)
        if wait:
            self.vram.wait_for(slots, self.phase)
        return slots

    # --- CPU experts ---
    def _place_cpu(self, slots: list[int], keys: list[int]) -> list[int]:
        """Indices of this step's experts to compute on the CPU: all of them (--cpu-experts all), or the misses
        the cost model sends there (auto); hot misses (a predicted-eviction score above the lowest resident
        score: the policy would keep them) are copied. With a RAM tier smaller than the model, only misses whose
        block is in the RAM tier are candidates: a block on disk is read into the RAM tier either way, and a CPU
        job must not fault it in through the mapping; those misses go to the link, and their copies count in the
        link's queue."""
        if self.cpu_mode == "all":
            return list(range(len(keys)))
        cm = self.cost_model
        if cm is None or cm.cpu_gbps <= 0:
            return []
        miss = [i for i, s in enumerate(slots) if s < 0]
        if not miss:
            return []
        sc = self.eviction_scores
        if sc is not None and sc.resident.any():
            floor = sc.score[sc.resident].min()
            miss = [i for i in miss if sc.score[keys[i]] <= floor]
        queued = len(self.vram._pending) * self.block_size / (cm.pcie_gbps * 1e9) if self.vram._pending else 0.0
        ram = self.ram
        if ram is not None and ram.n_slots < self.num_layers * self.num_experts:
            lookup = ram.table.lookup
            in_ram = [i for i in miss if lookup(keys[i]) is not None]
            if len(in_ram) < len(miss):
                queued += (len(miss) - len(in_ram)) * self.block_size / (cm.pcie_gbps * 1e9)
                miss = in_ram
                if not miss:
                    return []
        where = cm.place(len(miss), self.block_size, pcie_queue_s=queued)
        return [i for i, c in zip(miss, where) if c]

    def _write_behind(self, key: int, t: int, pinned: set[int], ph: Any) -> None:
        """Copy `key` (computed on the CPU this step, its block in the RAM tier) into a device slot when the link is
        idle: this step copies nothing and the previous write-behind has landed. The step does not wait for it;
        a later get() that hits it waits for its copy like any pending slot."""
        ev = self._wb_event
        if ev is not None and not ev.query():  # CUDA only (on a CPU device copies are synchronous: no event)
            return
        slot_of = self._assign([key], t, pinned)
        self._load([key], slot_of, t, pinned)
        ph.bytes_h2d += self.block_size
        self.write_behind_n += 1
        if self.device.type == "cuda":
            if ev is None:
                ev = self._wb_event = torch.cuda.Event()
            ev.record(self.vram.stream)

    def _host_blocks(self, layer: int, keys: list[int], idx: list[int], t: int, pinned: set[int], out: list) -> None:
        """The host weights of CPU-computed experts, read in place: the RAM tier's pinned copy when the block is
        there (a RAM hit; a read started by a prefetch is waited for), else the file mapping (the page cache,
        verified on first use). Nothing is evicted for them, so no block a CPU job reads can be reused before
        the next get(). Appends (k, weights, row) to `out`, in the order of the step's ids."""
        if self._file_views is None:
            self._file_views = expert_views(self.layout.expert_file_pool(), self.layout.tensor_specs)
        where = dict(zip(keys, idx))
        ram = self.ram
        in_ram = [k for k in keys if ram is not None and ram.rows is not None and ram.table.lookup(k) is not None]
        if in_ram:
            if self._ram_views is None:
                self._ram_views = expert_views(ram.rows, self.layout.tensor_specs)
            for k, rs in ram.fetch(in_ram, t, pinned):  # all hits: touches them, settles reads in flight
                out.append((where[k], self._ram_views, rs))
        for k in keys:
            if k not in in_ram:
                self.reader.verify_mapped(k)
                out.append((where[k], self._file_views, k))
        out.sort(key=lambda j: j[0])

    def ram_views(self) -> Any:
        """The expert views over the pinned RAM tier's rows (row r = the block in RAM row r), read in place."""
        if self.ram is None or self.ram.rows is None:
            raise ValueError("this expert cache has no RAM tier rows to read experts from")
        if self._ram_views is None:
            self._ram_views = expert_views(self.ram.rows, self.layout.tensor_specs)
        return self._ram_views

    def get_split(self, layer: int, expert_ids: torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, list]:
        """get() for a one-token step that may compute some experts on the CPU: (int64 [U] slot rows on the
        device, the CPU jobs of get_slots(cpu=...)); a CPU expert's slot row is the zero slot."""
        jobs: list = []
        slots = self.get_slots(layer, expert_ids, cpu=jobs)
        return self.vram.index_tensor(slots), jobs

    def _host_blocks_probe(self, out: list, keys: Sequence[int] = (0,)) -> None:
        """The host weights of experts `keys` (layer * E + expert; default layer 0's expert 0) as CPU jobs (the
        CPU-rate probe at load), from the verified mapping; no bookkeeping."""
        if self._file_views is None:
            self._file_views = expert_views(self.layout.expert_file_pool(), self.layout.tensor_specs)
        for k in keys:
            self.reader.verify_mapped(k)
            out.append((0, self._file_views, k))

    def note_cpu_experts(self, count: int, seconds: float) -> None:
        """The model's CPU-expert code reports a layer's work (stats; the cost model's running CPU rate)."""
        self.cpu.add(count, count * self.block_size, seconds)
        if self.cost_model is not None:
            self.cost_model.note_cpu(count * self.block_size, seconds)

    def wait_slots(self, slots: list[int]) -> None:
        """The current stream waits for the copies into these slots (after get_slots(..., wait=False))."""
        self.vram.wait_for(slots, self.phase)

    def resident(self, layer: int, expert_ids: Sequence[int]) -> list[bool]:
        """Whether each expert of `layer` is in a device slot now (no bookkeeping, no copies): the batch step
        computes those first while the others stream in."""
        if self.devtable is not None and self.devtable.owner == "device":
            self.devtable.give_back()
        base = layer * self.num_experts
        slot_of = self.vram.table.slot_of
        return [(base + int(e)) in slot_of for e in expert_ids]

    def drop_device_table(self, why: str = "the device step was not captured") -> None:
        """Resolve slots on the host from now on (the table handed back first); a default --cpu-experts auto, which
        applies with the device slot table only (budget.resolve_cpu_experts), goes with it."""
        if self.devtable is not None:
            self.devtable.give_back()
            self.devtable = None
        self.device_table_w = None
        self.slot_table_note = why
        if self.cpu_default and self.split:
            self.drop_cpu_experts(f"--cpu-experts default: off with the host slot table ({why})")

    @property
    def host_split(self) -> bool:
        """Whether one-token steps resolved on the host (the piecewise step, a batch of one row) send misses to the
        CPU: with an explicit --cpu-experts auto|all; a default auto is the device step's alone (on the host path at
        the native link it measured 1.23x and 0.91x, offload-default-2026-12-02-h200-s14.json)."""
        return self.split and not self.cpu_default

    def drop_cpu_experts(self, why: str) -> None:
        """No CPU experts from now on (a default auto the load-time probe found not worth it): the host path copies
        every miss, the worker threads stop; the zero slot stays (one block of VRAM)."""
        self.cpu_mode = "off"
        self.split = False
        self.cpu_threads = 0
        self.cost_model = None
        self.write_behind = False
        self.cpu_note = why
        if self.cpu_worker is not None:
            self.cpu_worker.close()
            self.cpu_worker = None
        if self.cpu_box is not None:
            self.cpu_box.close()
            self.cpu_box = None

    def note_device_token(self) -> None:
        """The device step decoded one token (its hits and misses arrive with DeviceSlotTable.harvest)."""
        self._phases["decode"].tokens += 1

    def _assign(self, keys: list[int], t: float, pinned: set[int]) -> dict[int, int]:
        slot_of = {}
        for k, (slot, evicted) in zip(keys, self.vram.table.assign_many(keys, t, pinned)):
            self._prefetched.discard(evicted)
            slot_of[k] = slot
        return slot_of

    def _load(self, keys: list[int], slot_of: dict[int, int], t: float, pinned: set[int]) -> None:
        """Fill the device slots of `keys` from the RAM tier (or the file); on error forget them all."""
        self.vram.begin_copies(t)
        try:
            if self.ram is None:
                self._load_passthrough(keys, slot_of)
            else:
                with self.vram.copy_context():
                    for k, rs in self.ram.fetch(keys, t, pinned):
                        self.vram.copy_in(slot_of[k], self.ram.host_row(rs))
                        self.ram.mark_dma(rs, self.vram.stream)
        except BaseException:
            for k in keys:  # a half-filled slot must never be handed out as that expert
                self.vram.table.drop(k)
            raise
        finally:
            self.vram.end_copies()

    def _load_passthrough(self, keys: list[int], slot_of: dict[int, int]) -> None:
        """CPU without a RAM tier: copy from the mapping (mmap) or O_DIRECT-read into the slot itself."""
        if self.tiers.io == "mmap":
            for k in keys:
                t0 = time.perf_counter()
                self.reader.verify_mapped(k)
                self.vram.copy_in(slot_of[k], self.reader.mapped_row(k))  # paced under --h2d-gbps
                self.reader.note_mapped_read(self.block_size, time.perf_counter() - t0)
            return
        futures = [(k, self.reader.submit(k, self.vram.row(slot_of[k]))) for k in keys]
        err = None
        for k, f in futures:  # wait for every read, even after an error: no thread may still write a slot
            e = f.exception()
            if e is None:
                self.vram.note_filled(slot_of[k])
            elif err is None:
                err = e
        if err is not None:
            raise err

    def prefetch(self, layer: int, expert_ids: Any) -> None:
        """Start loading experts likely needed soon; never evicts the current step, never changes results.

        CUDA: experts in the RAM tier are copied on the side stream (no wait); experts only on disk
        start an asynchronous read into the RAM tier (copy modes), and their device copy happens at
        the get() that needs them. CPU: loads are synchronous memcpys into the slots.
        """
        self._prefetch_seen = True
        if self.devtable is not None and self.devtable.owner == "device":
            self.devtable.give_back()
        ids = expert_ids.tolist() if isinstance(expert_ids, torch.Tensor) else list(expert_ids)
        E = self.num_experts
        vt = self.vram.table
        cuda = self.device.type == "cuda"
        keys: list[int] = []
        for e in ids:
            k = layer * E + int(e)
            if vt.lookup(k) is not None or k in keys:
                continue
            if cuda and self.ram is not None and (self.ram.table.lookup(k) is None or self.ram.is_loading(k)):
                if self.ram.start_load(k, self._t, self._pinned):  # on disk: read ahead into RAM, never wait
                    self.prefetch_issued += 1
                    self._prefetched_ram.add(k)
                continue
            keys.append(k)
        keys = keys[:max(0, self.vram.n_slots - len(self._pinned))]
        if not keys:
            return
        protect = self._pinned | set(keys)
        slot_of = self._assign(keys, self._t, protect)
        self._load(keys, slot_of, self._t, protect)
        ph = self._phases[self.phase]
        ph.bytes_h2d += len(keys) * self.block_size  # prefetches cross PCIe too (bytes_h2d_per_token, docs/stats.md)
        ph.bytes_prefetch += len(keys) * self.block_size
        self.prefetch_issued += len(keys)
        self._prefetched.update(keys)

    # --- stats ---
    def stats(self) -> dict:
        """docs/stats.md keys; per tier hits/misses/bytes_in/gbps; decode-phase figures under "decode"."""
        self.vram.harvest_all()
        if self.devtable is not None:
            self.devtable.harvest()
        d, p = self._phases["decode"], self._phases["prefill"]
        stall_dev = self.vram.wait_s
        bytes_read = self.reader.bytes_read - self._read_base[0]
        blocks_read = self.reader.blocks_read - self._read_base[1]
        read_s = self.reader.read_s - self._read_base[2]
        vram = self.vram.stats()
        if self.devtable is not None and self.devtable.bytes_h2d:  # copied in the device step's graph: not timed
            host_bytes = vram["bytes_in"] - self.devtable.bytes_h2d
            vram["gbps"] = host_bytes / self.vram.copy_s / 1e9 if self.vram.copy_s > 0 else 0.0
        if self.ram is not None:
            r = self.ram.stats()
            ram = {"hits": r["hits"], "misses": r["misses"], "bytes_in": r["bytes_in"],
                   "gbps": r["bytes_in"] / read_s / 1e9 if read_s > 0 else 0.0, "slots": r["slots"], "mode": r["mode"]}
        else:
            ram = {"hits": 0, "misses": 0, "bytes_in": 0, "gbps": 0.0, "slots": 0, "mode": "page-cache"}
        disk = {"hits": blocks_read, "misses": 0, "bytes_in": bytes_read,
                "gbps": bytes_read / read_s / 1e9 if read_s > 0 else 0.0}
        used = d.hits + d.misses
        stall = d.stall_s + self.vram.wait_s_by_phase.get("decode", 0.0)
        out = {
            "io": self.io, "expert_slots": self.plan.expert_slots, "ram_slots": self.plan.ram_slots,
            "policy": self.tiers.policy, "ram_policy": self.tiers.ram_policy, "verify": self.tiers.verify,
            "vram_budget_gib": self.plan.vram_budget_gib,
            "vram": {**vram, "slots": self.plan.expert_slots}, "ram": ram, "disk": disk,
            "bytes_h2d_per_token": d.bytes_h2d / d.tokens if d.tokens else 0.0,
            "bytes_prefetch_per_token": d.bytes_prefetch / d.tokens if d.tokens else 0.0,
            "stall_s": stall,
            "prefetch_issued": self.prefetch_issued, "prefetch_used": self.prefetch_used,
            "decode": {"hits": d.hits, "misses": d.misses, "hit_rate": d.hits / used if used else None,
                       "tokens": d.tokens, "bytes_h2d": d.bytes_h2d, "bytes_prefetch": d.bytes_prefetch,
                       "stall_s": stall},
            "prefill": {"hits": p.hits, "misses": p.misses, "bytes_h2d": p.bytes_h2d,
                        "stall_s": p.stall_s + self.vram.wait_s_by_phase.get("prefill", 0.0)},
            "device_wait_s": stall_dev,
        }
        if self.preload_s is not None:
            out["ram_preload_s"] = self.preload_s
        # host cost of the decode misses (the tier simulator's per-miss terms, predict/simulate.py)
        h_ram = d.ram_host_s if self.ram is not None else 0.0
        h_work = h_ram - d.ram_blocked_s if self.ram is not None else 0.0
        ram_ok = d.ram_misses and self.ram is not None
        copied = d.misses - d.cpu  # the miss path's time is spent on these (a CPU expert is not copied)
        out["host"] = {"vram_misses": d.misses, "cpu_misses": d.cpu, "ram_misses": d.ram_misses,
                       "miss_s": d.miss_host_s,
                       "ram_s": h_ram, "ram_blocked_s": d.ram_blocked_s if self.ram is not None else 0.0,
                       "s_per_vram_miss": (d.miss_host_s - h_ram) / copied if copied else None,
                       "s_per_ram_miss": h_ram / d.ram_misses if ram_ok else None,
                       "work_s_per_ram_miss": h_work / d.ram_misses if ram_ok else None,
                       "register_s": self.ram.register_s if self.ram is not None else 0.0,
                       "verify_s": self.reader.verify_s, "verified_blocks": self.reader.verified_blocks}
        out["slot_table"] = (self.devtable.stats() if self.devtable is not None else
                             {"mode": "host", **({"device_refused": self.slot_table_note} if self.slot_table_note else {})})
        out["cpu_experts"] = self.cpu.stats(self.cpu_mode, self.cpu_threads, self.cpu_dtype, self.cost_model)
        out["cpu_experts"]["kernel"] = getattr(self, "cpu_kernel_name", None)
        out["cpu_experts"]["write_behind"] = self.write_behind_n
        out["cpu_experts"]["default"] = self.cpu_default  # --cpu-experts was not given: mode is the default's
        if self.cpu_note:
            out["cpu_experts"]["note"] = self.cpu_note
        out["h2d_gbps_target"] = self.tiers.h2d_gbps or None
        for key in ("h2d_gbps_native", "h2d_gbps_calibrated", "h2d_gbps_floor"):  # set_pace's findings (CUDA)
            if self.pace.get(key):
                out[key] = self.pace[key]
        return out

    def reset_stats(self) -> None:
        """Zero every counter (benchmarks: measure a run after a warm-up); residency is kept."""
        self.vram.harvest_all()
        if self.devtable is not None:
            self.devtable.harvest()
            self.devtable.reset_stats()
        self.vram.hits = self.vram.misses = self.vram.bytes_in = 0
        self.vram.copy_s = self.vram.wait_s = 0.0
        self.vram.wait_s_by_phase = {}
        if self.ram is not None:
            self.ram.hits = self.ram.misses = self.ram.bytes_in = 0
            self.ram.wait_s = self.ram.blocked_s = self.ram.register_s = 0.0
        self._read_base = (self.reader.bytes_read, self.reader.blocks_read, self.reader.read_s)
        self._phases = {"prefill": _PhaseCounts(), "decode": _PhaseCounts()}
        self.prefetch_issued = self.prefetch_used = 0
        self.cpu = CpuExpertCounts()
        self.write_behind_n = 0

    def close(self) -> None:
        """Wait for copies, unregister registered blocks, stop the reader and CPU-expert threads."""
        if self.cpu_worker is not None:
            self.cpu_worker.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if self.cpu_box is not None:  # after the device: a step in flight may wait on it
            self.cpu_box.close()
        if self.ram is not None:
            self.ram.close()
        self.reader.close()


def make_provider(layout: Any, *, device: torch.device | str, dtype: torch.dtype | None = None,
                  max_context: int | None = None, faults: Faults | None = None, quiet: bool = False,
                  state_bytes: int = 0, prefill_chunk: int = PREFILL_CHUNK, **flags: Any) -> ExpertCache:
    """The engine's entry point: budget options (TierConfig fields; None = default) -> an ExpertCache; prints the
    plan on stderr. state_bytes: per-row state a batch scheduler will allocate (its paged KV pool), counted with
    the KV cache inside --vram-gb; prefill_chunk: tokens per prefill forward, whose activations the scratch
    estimate counts."""
    device = torch.device(device)
    tiers = TierConfig.from_flags(flags)
    cfg = layout.config
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    ctx = default_context(cfg, max_context)
    gpu_total = gpu_free = None
    if device.type == "cuda":
        gpu_free, gpu_total = torch.cuda.mem_get_info(device)
    if tiers.embed == "host" and cfg.tie_word_embeddings:
        raise BudgetError(TIED_EMBED_HOST)

    def plan_for(off_gpu: tuple[str, ...]) -> CachePlan:
        return plan_budget(cfg, layout.block_size, tiers, device=device,
                           dense_bytes=estimate_dense_bytes(layout, dtype, off_gpu),
                           kv_bytes=estimate_kv_bytes(cfg, ctx, dtype) + state_bytes,
                           scratch_bytes=estimate_scratch_bytes(cfg, layout.block_size, dtype, prefill_chunk),
                           gpu_total=gpu_total, gpu_free=gpu_free, ram_total=meminfo("MemTotal"),
                           ram_avail=meminfo("MemAvailable"))

    place = resolve_embed(tiers.embed, cuda=device.type == "cuda", tied=bool(cfg.tie_word_embeddings),
                          slots_given=tiers.expert_slots is not None)
    if place == "auto":  # host when the experts do not all fit the GPU with the table there
        plan, place = auto_embed_plan(plan_for, num_keys=cfg.num_layers * cfg.num_experts,
                                      table_bytes=_table_bytes(layout, dtype))
    else:
        plan = plan_for(("embed",) if place == "host" and device.type == "cuda" else ())  # in pinned RAM instead
    if not quiet:
        print("tiered: " + plan.describe().replace("\n", "\ntiered: "), file=sys.stderr)
    cache = ExpertCache(layout, plan, tiers, device=device, faults=faults)
    cache.embed_place = place
    return cache


def resolve_embed(given: str, *, cuda: bool, tied: bool, slots_given: bool) -> str:
    """--embed as the cache plans it: gpu, host, or auto still to be decided by the slot counts. auto is gpu off
    CUDA (the table is in RAM already), for a tied lm_head (it reads the whole table every token) and under
    --expert-slots (the slot count is fixed: the table's bytes would buy nothing)."""
    if given == "auto" and (not cuda or tied or slots_given):
        return "gpu"
    return given


def _table_bytes(layout: Any, dtype: torch.dtype) -> int:
    return estimate_dense_bytes(layout, dtype) - estimate_dense_bytes(layout, dtype, ("embed",))


def auto_embed_plan(plan_for: Callable[[tuple[str, ...]], CachePlan], *, num_keys: int,
                    table_bytes: int) -> tuple[CachePlan, str]:
    """--embed auto under a GPU budget: the table stays on the GPU when every expert fits beside it (no slot to
    gain, and no row read over PCIe); otherwise it goes to pinned RAM and its bytes become slots. A budget too small
    with the table on the GPU but enough without it takes the host. Returns the plan and the place chosen."""
    try:
        on_gpu: CachePlan | None = plan_for(())
    except BudgetError as e:
        on_gpu, why = None, e
    if on_gpu is not None and on_gpu.expert_slots >= num_keys:
        return on_gpu, "gpu"
    try:
        on_host = plan_for(("embed",))
    except BudgetError:
        if on_gpu is None:
            raise why from None
        return on_gpu, "gpu"
    if on_gpu is not None and on_host.expert_slots <= on_gpu.expert_slots:
        return on_gpu, "gpu"
    before = f"{on_gpu.expert_slots}" if on_gpu is not None else "too few"
    note = (f"--embed auto: the embedding table ({table_bytes / GiB:.2f} GiB) in pinned RAM, its rows read over "
            f"PCIe: expert slots {before} -> {on_host.expert_slots} of {num_keys}")
    return replace(on_host, notes=on_host.notes + (note,)), "host"
