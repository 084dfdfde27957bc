"""The device tier: a fixed pool of expert slots, filled by copies on a side stream.

Owns: `SlotPool`, S slots of one block each, allocated once at start-up as uint8 [S, block_size]
on the compute device (on CPU the device tier is RAM); the expert weight views over it; the key
table and policy of the tier; and the ordering of copies:
  - copies into slots run on one dedicated side CUDA stream, `non_blocking` from pinned or
    registered host memory;
  - before a batch of copies overwrites slots, the side stream waits for the victims' last readers:
    the compute enqueued before the current get() handed out its slots (`note_handoff`), or, failing
    that record, all compute enqueued so far;
  - each slot records a "ready" event after its copy; compute waits only for the slots it is about
    to use (on the ready event of the last-issued of them: the side stream completes copies in order).
Nothing here allocates after start-up: events, index buffers and timers are preallocated rings.
Does not own: where the bytes come from (ram.py, io.py) nor which keys a step needs (cache.py).

Legend: S slots, U experts of one get().
"""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Any

import torch

from tiered.store.disk import expert_views
from tiered.store.hostmem import aligned_empty
from tiered.store.policy import Policy
from tiered.store.slots import SlotTable

PACE_TOL = 0.02  # a calibrated pace is within 2% of its target
PACE_ROUNDS = 8  # calibration rounds after the copies-alone round, at most
PACE_ROUND_S = 2e-3  # a calibration round times about this long (4 to 32 blocks)


def pace_until(deadline: float) -> None:
    """Sleep (then spin for the last 100 us) until time.perf_counter() reaches `deadline`."""
    left = deadline - time.perf_counter()
    if left > 2e-4:
        time.sleep(left - 1e-4)
    while time.perf_counter() < deadline:
        pass


def sleep_cycles_per_second(device: torch.device) -> float:
    """Calibrate torch.cuda._sleep: GPU cycles per second of sleep (measured with events, best of 3)."""
    cycles = 10_000_000
    best = 0.0
    s = torch.cuda.Stream(device)
    with torch.cuda.stream(s):
        torch.cuda._sleep(1000)  # load the kernel
        for _ in range(3):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(s)
            torch.cuda._sleep(cycles)
            b.record(s)
            b.synchronize()
            best = max(best, cycles / (a.elapsed_time(b) / 1e3))
    return best


class SlotPool:
    """S device slots with a side stream and per-slot ready events.

    Args:
        n_slots: S.
        block_size: bytes per expert block.
        specs: the layout's tensor specs (block layout).
        policy: eviction policy of this tier.
        device: compute device.
        max_per_call: the most slots one get() returns (sizes the index ring).
        ring: how many returned index tensors stay valid (a token's worth of layers is enough).
        zero_slot: add one more row of zero bytes after the S slots, never assigned (`zero_slot` = S): an expert
            whose weights are all zero outputs exactly 0 (SwiGLU, biases and quantized formats alike), so the
            GPU computes a step's CPU-assigned experts there at no cost to the result (CPU experts, offload.py).
        split_slot: and one more, zeroed, after it (`split_slot` = S + 1): the device step copies the rows of an
            expert it splits with the CPU there (kernels/slot_table.resolve's split), outside the table.
    """

    def __init__(self, n_slots: int, block_size: int, specs: Any, policy: Policy, *, device: torch.device,
                 max_per_call: int, ring: int = 64, zero_slot: bool = False, split_slot: bool = False) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.n_slots = n_slots
        self.block_size = block_size
        self.table = SlotTable(n_slots, policy)
        split_slot = split_slot and zero_slot
        rows = n_slots + (1 if zero_slot else 0) + (1 if split_slot else 0)
        self.zero_slot = n_slots if zero_slot else None
        self.split_slot = n_slots + 1 if split_slot else None
        if self.cuda:
            self.pool = torch.empty((rows, block_size), dtype=torch.uint8, device=self.device)  # [S(+1), block]
        else:  # page aligned, so O_DIRECT can read straight into a slot when there is no RAM tier
            flat, self._owner = aligned_empty(rows * block_size, pin=False)
            self.pool = flat.view(rows, block_size)
        if zero_slot:
            self.pool[n_slots:].zero_()
        self.weights = expert_views(self.pool, specs)
        self._rows = list(self.pool.unbind(0))  # per-slot views made once: no view creation per copy
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._ready = [torch.cuda.Event() for _ in range(n_slots)] if self.cuda else None
        self._handoff_ev = torch.cuda.Event() if self.cuda else None  # see note_handoff
        self._handoff_t = -1
        self._pending: dict[int, int] = {}  # slot -> issue number of its copy, for copies compute has not waited for
        self._issued = 0  # copies issued on the side stream so far (they complete in this order)
        # Returned index tensors: a ring of pinned host + device buffers, with an event per entry.
        self._ring_host = torch.empty((ring, max_per_call), dtype=torch.int64, pin_memory=self.cuda)
        self._ring_dev = (torch.empty((ring, max_per_call), dtype=torch.int64, device=self.device)
                          if self.cuda else self._ring_host)
        self._ring_np = self._ring_host.numpy()  # fast host writes into the pinned ring
        self._ring_ev = [torch.cuda.Event() for _ in range(ring)] if self.cuda else None
        self._ring_i = 0
        # Copy timing: (start, end) event pairs on the side stream, one per get() with copies.
        self._timers = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                        for _ in range(ring)] if self.cuda else None
        self._timer_live = [False] * ring  # recorded, elapsed not yet added
        self._timer_i = 0
        self._timer_open = False  # between begin_copies and end_copies
        self._timer_started = False  # ... and the batch's first copy recorded the start
        self._t0 = 0.0
        # Compute-side waits on copies: (before, after) event pairs on the compute stream.
        self._wait_ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                         for _ in range(ring)] if self.cuda else []
        self._wait_phase: list[str | None] = [None] * ring
        self._wait_i = 0
        self.wait_s = 0.0  # time compute waited for copies (CUDA; 0 on CPU where copies are synchronous)
        self.wait_s_by_phase: dict[str, float] = {}
        self.copy_s = 0.0  # time the side stream spent copying (CUDA: events; CPU: wall)
        self.bytes_in = 0
        self.hits = 0
        self.misses = 0
        self.h2d_gbps = 0.0  # pacing target (GB/s), 0 = unpaced: set_pace
        self._sleep_cycles_per_byte = 0.0  # CUDA: torch.cuda._sleep cycles enqueued per byte copied
        self._pace_s_per_byte = 0.0  # CPU: seconds a copy of one byte must take

    @property
    def nbytes(self) -> int:
        return self.n_slots * self.block_size

    # --- copies ---
    def note_handoff(self, t: int) -> None:
        """get() number `t` is about to hand out its slots: record where the compute stream is. Everything
        enqueued before this point is the last reader of every slot outside that get's (pinned) set, and only
        those pinned slots are read by compute enqueued later, until the next get()."""
        if self.cuda:
            self._handoff_ev.record(torch.cuda.current_stream(self.device))
            self._handoff_t = t

    def begin_copies(self, t: int | None = None) -> None:
        """Before overwriting slots (never the current get's): the side stream waits for their last readers.

        With the handoff of get() `t` recorded (note_handoff), that point suffices, so copies issued after later
        compute was enqueued (a prefetch after the next decode segment) need not wait for that compute, which
        reads only the pinned slots. Otherwise: wait for all compute enqueued so far."""
        if self.cuda:
            if t is not None and t == self._handoff_t:
                self.stream.wait_event(self._handoff_ev)
            else:
                self.stream.wait_stream(torch.cuda.current_stream(self.device))
            self._timer_open = True  # the start is recorded at the batch's first copy (copy_in): the host's
            # work before it (the RAM tier finding the first block) is not time the link spent copying
            self._timer_started = False
        else:
            self._t0 = time.perf_counter()

    def end_copies(self) -> None:
        if self.cuda:
            if self._timer_open and self._timer_started:
                i = self._timer_i % len(self._timers)
                self._timers[i][1].record(self.stream)
                self._timer_live[i] = True
                self._timer_i += 1
            self._timer_open = False
        else:
            self.copy_s += time.perf_counter() - self._t0

    def _harvest(self, i: int) -> None:
        """Add the elapsed time of timer pair i (complete long ago when the ring wraps) and free it."""
        if self._timer_live[i]:
            start, end = self._timers[i]
            end.synchronize()
            self.copy_s += start.elapsed_time(end) / 1e3
            self._timer_live[i] = False

    def harvest_all(self) -> None:
        """Fold every recorded timer into copy_s / wait_s (syncs; call at stats time only)."""
        if self.cuda:
            for i in range(len(self._timers)):
                self._harvest(i)
            for i in range(len(self._wait_ev)):
                self._harvest_wait(i)

    def copy_context(self) -> Any:
        """Make the side stream current while a batch of copies is issued (CUDA); a no-op on CPU."""
        return torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext()

    def copy_in(self, slot: int, src: torch.Tensor) -> None:
        """Copy one host block into `slot` (CUDA: async, inside copy_context(); CPU: now). Under a pace
        (set_pace) the copy is followed by a wait on the side stream (CUDA) or the host (CPU) so that the
        block takes block_size / h2d_gbps seconds."""
        if self.cuda:
            if self._timer_open and not self._timer_started:  # the batch's first copy starts its timer
                i = self._timer_i % len(self._timers)
                self._harvest(i)
                self._timers[i][0].record(self.stream)
                self._timer_started = True
            self._rows[slot].copy_(src, non_blocking=True)
            if self._sleep_cycles_per_byte:
                torch.cuda._sleep(int(self._sleep_cycles_per_byte * self.block_size))
            self._ready[slot].record(self.stream)
            self._issued += 1
            self._pending[slot] = self._issued
        else:
            t0 = time.perf_counter()
            self._rows[slot].copy_(src)
            if self._pace_s_per_byte:
                pace_until(t0 + self._pace_s_per_byte * self.block_size)
        self.bytes_in += self.block_size

    # --- pacing (benchmarks: --h2d-gbps emulates a slower link) ---
    def set_pace(self, gbps: float) -> dict:
        """Pace host->device expert copies to `gbps` GB/s (0 = unpaced). CUDA: each copy is followed by
        torch.cuda._sleep on the side stream, for a number of cycles found closed-loop (_calibrate_pace): rounds of
        copies and sleeps issued as copy_in issues them, timed with events, until a block takes block_size / gbps
        seconds within PACE_TOL. When the copies alone are slower than that (fixed per-copy costs dominate small
        blocks), no sleep is added, "h2d_gbps_floor" in the result says the rate they reach and a note goes to
        stderr. CPU (the device tier is RAM): the host sleeps until the copy has taken block_size / gbps.
        Returns what was measured."""
        self.h2d_gbps = float(gbps)
        self._sleep_cycles_per_byte = self._pace_s_per_byte = 0.0
        if gbps <= 0:
            return {}
        if not self.cuda:
            self._pace_s_per_byte = 1.0 / (gbps * 1e9)
            return {"h2d_gbps_target": gbps}
        native = self.measure_h2d_gbps()
        cps = sleep_cycles_per_second(self.device)
        cycles, info = self._calibrate_pace(gbps, native, cps)
        self._sleep_cycles_per_byte = cycles / self.block_size
        return {"h2d_gbps_target": gbps, "h2d_gbps_native": native, "sleep_cycles_per_s": cps, **info}

    def _calibrate_pace(self, gbps: float, native: float, cps: float) -> tuple[int, dict]:
        """(sleep cycles per block, what the calibration found) for a pace of `gbps` on CUDA.

        A block's time on the side stream, m(c) for c sleep cycles, is its copy, the sleep kernel's launch and
        the sleep (c / clock), or the host's issue time when that is longer: non-decreasing in c. Round 0 times
        the copies alone (m(0): the floor); the first guess is open-loop (the gap between the target and the
        native copy time, at `cps`); each next guess is the secant through the last two rounds (where m is flat,
        host-bound, at least twice the cycles), kept inside the bracket of rounds found too fast and too slow.
        The closest round wins."""
        target = self.block_size / (gbps * 1e9)  # seconds per block
        if self.n_slots < 1:  # nothing to copy into: the open-loop estimate
            return int(max(0.0, target - self.block_size / (native * 1e9)) * cps), {}
        n = max(4, min(32, int(PACE_ROUND_S / target)))  # blocks per round
        src, owner = aligned_empty(self.block_size, pin=self.cuda)
        src.fill_(0)
        try:
            self._pace_round(src, 0, n)  # warm-up
            m0 = self._pace_round(src, 0, n)
            info = {"h2d_gbps_unslept": self.block_size / m0 / 1e9}
            if m0 >= target * (1 - PACE_TOL):
                info["h2d_gbps_calibrated"] = info["h2d_gbps_unslept"]
                if m0 > target * (1 + PACE_TOL):
                    info["h2d_gbps_floor"] = info["h2d_gbps_unslept"]
                    print(f"tiered: --h2d-gbps {gbps:g}: copies of {self.block_size} B blocks alone reach only "
                          f"{info['h2d_gbps_floor']:.3g} GB/s here (fixed per-copy costs); they run unpaced",
                          file=sys.stderr)
                return 0, info
            lo, hi = (0, m0), None  # rounds known too fast / too slow: (cycles, seconds per block)
            prev = (0, m0)
            c = max(1, int((target - self.block_size / (native * 1e9)) * cps))  # open loop
            best = (abs(m0 - target), 0, m0)
            for _ in range(PACE_ROUNDS):
                m = self._pace_round(src, c, n)
                best = min(best, (abs(m - target), c, m))
                if abs(m - target) <= PACE_TOL * target:
                    break
                if m < target:
                    lo = (c, m) if c > lo[0] else lo
                else:
                    hi = (c, m) if hi is None or c < hi[0] else hi
                slope = (m - prev[1]) / (c - prev[0]) if c != prev[0] else 0.0
                prev = (c, m)
                if slope > 0:
                    nxt = int(round(c + (target - m) / slope))
                else:  # flat: the host's issue time hides the sleeps; at least double them
                    nxt = int(c + (target - m) * cps) if m > target else max(2 * c, int(c + (target - m) * cps))
                if hi is not None and not lo[0] < nxt < hi[0]:
                    nxt = (lo[0] + hi[0]) // 2  # the secant left the bracket: bisect
                c = max(1, nxt)
            _, c, m = best
            info["h2d_gbps_calibrated"] = self.block_size / m / 1e9
            if abs(m - target) > PACE_TOL * target:
                print(f"tiered: --h2d-gbps {gbps:g}: the calibrated pace reaches {info['h2d_gbps_calibrated']:.3g} "
                      f"GB/s", file=sys.stderr)
            info["sleep_cycles_per_block"] = c
            return c, info
        finally:
            owner.release()

    def _pace_round(self, src: torch.Tensor, cycles: int, n: int) -> float:
        """Seconds per block on the side stream of n copies of `src` into the slots, each followed as in copy_in
        by torch.cuda._sleep(cycles) (none for 0) and an event record; timed with events."""
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        ev = torch.cuda.Event()
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the slots' readers, if any
        with torch.cuda.stream(self.stream):
            a.record(self.stream)
            for i in range(n):
                self._rows[i % self.n_slots].copy_(src, non_blocking=True)
                if cycles:
                    torch.cuda._sleep(cycles)
                ev.record(self.stream)
            b.record(self.stream)
        b.synchronize()
        return a.elapsed_time(b) / 1e3 / n

    def measure_h2d_gbps(self, blocks: int = 8, *, scratch: bool = False) -> float:
        """The unpaced host->device rate of whole-block copies from pinned memory into the slots (GB/s), which
        overwrites the first `blocks` slots; scratch: into one block of new device memory instead (the slots may
        hold experts). On CPU: memcpy."""
        n = max(1, min(blocks, self.n_slots))
        src, owner = aligned_empty(self.block_size, pin=self.cuda)
        src.fill_(0)
        if scratch:
            buf = torch.empty(self.block_size, dtype=torch.uint8, device=self.device)
            rows = [buf] * n
        else:
            rows = self._rows[:n]
        if not self.cuda:
            t0 = time.perf_counter()
            for r in rows:
                r.copy_(src)
            return n * self.block_size / max(time.perf_counter() - t0, 1e-9) / 1e9
        best = 0.0
        for _ in range(3):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(self.stream):
                a.record(self.stream)
                for r in rows:
                    r.copy_(src, non_blocking=True)
                b.record(self.stream)
            b.synchronize()
            best = max(best, n * self.block_size / (a.elapsed_time(b) / 1e3) / 1e9)
        owner.release()
        return best

    def row(self, slot: int) -> torch.Tensor:
        """The slot's bytes (CPU: a host buffer that a reader may fill directly)."""
        return self._rows[slot]

    def note_filled(self, slot: int) -> None:
        """A reader wrote the slot directly (CPU pass-through)."""
        self.bytes_in += self.block_size

    # --- handing slots to compute ---
    def wait_for(self, slots: list[int], phase: str = "decode") -> None:
        """The current stream waits for the copies of exactly these slots (no host sync).

        The side stream runs copies in issue order, so waiting on the ready event of the last-issued of these
        slots covers them all (one wait per call), and every copy issued before it (those slots need no wait
        later). On CUDA the wait is timed with an event pair around it on the compute stream, so the time
        compute spent blocked on copies is known per phase (harvested lazily, no host sync here).
        """
        pending = self._pending
        if not pending:  # CPU, or no copy outstanding: nothing to wait for (the common decode case)
            return
        last, last_n = -1, 0
        for s in slots:
            n = pending.get(s, 0)
            if n > last_n:
                last, last_n = s, n
        if last < 0:
            return
        cur = torch.cuda.current_stream(self.device)
        i = self._wait_i % len(self._wait_ev)
        self._harvest_wait(i)
        a, b = self._wait_ev[i]
        a.record(cur)
        cur.wait_event(self._ready[last])
        b.record(cur)
        for s in [s for s, n in pending.items() if n <= last_n]:
            del pending[s]
        self._wait_phase[i] = phase
        self._wait_i += 1

    def _harvest_wait(self, i: int) -> None:
        ph = self._wait_phase[i]
        if ph is not None:
            a, b = self._wait_ev[i]
            b.synchronize()
            dt = a.elapsed_time(b) / 1e3
            self.wait_s += dt
            self.wait_s_by_phase[ph] = self.wait_s_by_phase.get(ph, 0.0) + dt
            self._wait_phase[i] = None

    def index_tensor(self, slots: list[int]) -> torch.Tensor:
        """int64 [U] slot rows on the device, from a preallocated ring (valid for `ring` calls)."""
        i = self._ring_i % self._ring_host.shape[0]
        self._ring_i += 1
        if not self.cuda:
            return torch.tensor(slots, dtype=torch.int64)
        self._ring_ev[i].synchronize()  # the previous H2D from this host row is done (long ago)
        self._ring_np[i, :len(slots)] = slots
        host = self._ring_host[i, :len(slots)]
        dev = self._ring_dev[i, :len(slots)]
        dev.copy_(host, non_blocking=True)
        self._ring_ev[i].record(torch.cuda.current_stream(self.device))
        return dev

    def stats(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "bytes_in": self.bytes_in,
                "gbps": self.bytes_in / self.copy_s / 1e9 if self.copy_s > 0 else 0.0, "copy_s": self.copy_s}
