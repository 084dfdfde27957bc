"""The copy-engine fill of free device slots (--device-fill copy): experts not resident after the prefill are copied
into free slots by cudaMemcpyAsync on a side stream, outside the step's graph, while the decode runs.

Owns: `CopyFill` (the plan: keys, their reserved slots and RAM rows; the copy stream and its batches in flight; the
landed and installed counters the step's install kernel reads), its host pump (`pump`, after each step's launch)
and `drain` (before the table goes back to the host).
Does not own: the table (store/devtable.py: `plan_fill` reserves the plan's slots), the install kernel
(kernels/slot_table.fill_land, through the table's kernels), nor when a step runs (decode/devstep.py).

Why: the gather fill (--device-fill N or auto) copies with a kernel on a side stream inside each step's graph: a pick
kernel, a fork and a join cost the step about 17 us while it fills (session 20, H200), its copy kernel's programs
sit on SMs beside compute, and it moves N blocks a step, N timed from the first steps. The copy engines move
blocks with no SM and no graph node: the plan is made once on the host when the decode starts (its table is the
host's, just handed over), each planned key reserved in its slot (slot_of = -2 - slot, key_of = -2 - key); the host
keeps about `queue_bytes` of copies queued, each batch followed by a copy of its cumulative count into `landed`;
each step's first kernel enters what has landed. A demand miss on a planned key is copied into its reserved slot by
the step's own gather (the same bytes the copy engine writes there), so it takes no free slot and evicts nothing.

Legend: P planned blocks, B block bytes.
"""
from __future__ import annotations

import collections
import contextlib
import math
import time
from typing import Any

import torch
from torch import Tensor


class CopyFill:
    """The copy-engine fill of `table` (a DeviceSlotTable) in `order` (keys, likeliest first), leaving `keep_free`
    free slots for demand misses.

    queue_bytes: how much the host keeps queued on the copy stream (it pumps once a step, without waiting: enough
    for about two steps at the link's rate keeps the link busy); batch: blocks per batch (None: a quarter of the
    queue). On CPU the copies are synchronous (the eager step's tests)."""

    def __init__(self, table: Any, order: list[int], keep_free: int, *, queue_bytes: int = 64 << 20,
                 batch: int | None = None) -> None:
        self.table = table
        self.order = [int(k) for k in order]
        self.keep_free = int(keep_free)
        dev = table.device
        self.cuda = dev.type == "cuda"
        n = max(1, len(self.order))
        B = table.block_size
        self.batch = int(batch) if batch else max(1, math.ceil(queue_bytes / 4 / B))
        self.depth = max(1, math.ceil(queue_bytes / (self.batch * B)))
        # static buffers a captured install reads at every replay
        self.plan_key = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.plan_slot = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.landed = torch.zeros(1, dtype=torch.int64, device=dev)  # written by the copy stream
        self.installed = torch.zeros(1, dtype=torch.int64, device=dev)
        self._marks = torch.arange(1, n + 1, dtype=torch.int64, pin_memory=self.cuda)  # landed's values
        self.stream = torch.cuda.Stream(dev) if self.cuda else None
        self._rows: list[int] = []
        self._slots: list[int] = []
        self.n = 0  # planned this phase
        self.left: int | None = None  # keys of the order neither resident nor planned this phase (0: it completes)
        self.issued = 0
        self._pending: collections.deque = collections.deque()  # (blocks landed once done, event or None)
        self.done_blocks = 0  # landed, as the host knows it (events)
        self._counted = 0  # of those, what `take_landed` has reported
        self.phases = 0
        self.planned_total = 0
        self._t0 = 0.0
        self.fill_s: float | None = None  # host seconds from the plan to the last batch seen landed

    @property
    def active(self) -> bool:
        """A plan with blocks not yet seen landed."""
        return self.n > 0 and self.done_blocks < self.n

    def start(self) -> int:
        """At a decode phase's start, right after the table's hand-over (table.take): plan and reserve; the copy
        stream waits for the reservations. Returns the blocks planned."""
        if self.active:  # (blocks not issued yet are not landed either)
            raise RuntimeError("CopyFill.start: the last plan is still in flight (drain it first)")
        keys, slots, rows, self.left = self.table.plan_fill(self.order, self.keep_free)
        n = len(keys)
        self.n, self.issued, self.done_blocks, self._counted = n, 0, 0, 0
        self._rows, self._slots = rows, slots
        self._pending.clear()
        self.landed.zero_()
        self.installed.zero_()
        if n:
            self.plan_key[:n].copy_(torch.tensor(keys, dtype=torch.int64))
            self.plan_slot[:n].copy_(torch.tensor(slots, dtype=torch.int64))
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(self.table.device))
        self.phases += 1
        self.planned_total += n
        self._t0 = time.perf_counter()
        self.fill_s = None
        return n

    def pump(self, most: int | None = None) -> bool:
        """After a step's launch: retire the batches that have landed (never waits) and queue more (at most `most`
        batches this call: the decode's first step is launched after one batch, not after the host has queued
        them all). True when every planned block has landed (the next step's install enters the last of them)."""
        while self._pending:
            b, ev = self._pending[0]
            if ev is not None and not ev.query():
                break
            self._pending.popleft()
            self.done_blocks = b
        room = self.depth if most is None else min(self.depth, int(most))
        while self.issued < self.n and len(self._pending) < self.depth and room > 0:
            self._issue()
            room -= 1
        if self.n and self.done_blocks >= self.n and self.fill_s is None:
            self.fill_s = time.perf_counter() - self._t0
        return self.done_blocks >= self.n

    def _issue(self) -> None:
        a, b = self.issued, min(self.issued + self.batch, self.n)
        pool, slots = self.table.host_pool, self.table.slots
        ev = None
        with torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext():
            for i in range(a, b):
                slots[self._slots[i]].copy_(pool[self._rows[i]], non_blocking=self.cuda)
            self.landed.copy_(self._marks[b - 1:b], non_blocking=self.cuda)
            if self.cuda:
                ev = torch.cuda.Event()
                ev.record(self.stream)
        self._pending.append((b, ev))
        self.issued = b

    def install(self) -> None:
        """The step's first kernel (captured): enter what has landed (kernels/slot_table.fill_land)."""
        self.table.kern.fill_land(self.plan_key, self.plan_slot, self.landed, self.installed, self.table.t)

    def drain(self) -> None:
        """Before the table goes back to the host: wait for the copies in flight, enter them, and release the
        reservations of blocks never copied (a demand miss that loaded one keeps it). Syncs."""
        if self.n == 0:
            return
        if self.stream is not None:
            self.stream.synchronize()
        self._pending.clear()
        self.done_blocks = self.issued
        self.install()
        if self.issued < self.n:
            self.table.kern.fill_cancel(self.plan_key[self.issued:self.n], self.plan_slot[self.issued:self.n],
                                        self.table.t)
        if self.cuda:
            torch.cuda.current_stream(self.table.device).synchronize()
        self.n = self.issued = 0

    def take_landed(self) -> int:
        """Blocks seen landed since the last call (the table's harvest counts them as loaded ahead of use)."""
        v = self.done_blocks - self._counted
        self._counted = self.done_blocks
        return v

    @property
    def completes(self) -> bool:
        """This phase's plan holds every key of the order that was not resident: once it has landed (and nothing
        evicts: every miss meanwhile is on a planned key), each of them is resident."""
        return self.left == 0

    def stats(self) -> dict:
        return {"mode": "copy", "planned": self.planned_total, "left": self.left, "phases": self.phases,
                "issued": self.issued,
                "landed": self.done_blocks, "batch": self.batch, "depth": self.depth, "fill_s": self.fill_s}

