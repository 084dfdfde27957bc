"""The pinned RAM tier: a fixed pool of host expert slots between the disk and the device.

Owns: `PinnedPool`, R slots of one block each with its own eviction policy, in one of two modes:
  - "copy": one page-locked buffer [R, block_size] allocated at start-up (page aligned, so O_DIRECT
    can read into it); misses are read by the `BlockReader` (page cache or O_DIRECT).
  - "register": no buffer at all. A slot is a block of the experts.bin mapping registered with
    cudaHostRegister(ReadOnly): the GPU DMAs straight from the page cache. Loading a batch of slots
    starts the first-use checks of all its blocks at once on the reader's threads (the hash is the
    block's first touch: its pages fault in there), then registers each block on the calling thread
    as its check lands; eviction unregisters (measured: per-block register/unregister, so a model
    larger than RAM still works).
Both modes keep, per slot, the event of the last device copy that read it, and wait for it
before the slot's bytes are overwritten or unregistered.
Does not own: the device slots (vram.py), the order in which the cache asks for keys, nor reads
themselves (io.py).
"""
from __future__ import annotations

import time
from concurrent.futures import wait
from queue import SimpleQueue
from typing import Any, Collection, Iterator

import torch

from tiered.store.hostmem import HostRegistrar, aligned_empty
from tiered.store.io import BlockReader
from tiered.store.policy import Policy
from tiered.store.slots import SlotTable


class PinnedPool:
    """R host slots of `block_size` bytes.

    Args:
        n_slots: R (>= 1).
        reader: the layout's BlockReader.
        policy: eviction policy of this tier.
        mode: "copy" or "register".
        pin: page-lock the copy buffer (needs CUDA); unpinned buffers are still page aligned.
        cuda: whether device copies read from these slots (events are kept per slot).
    """

    def __init__(self, n_slots: int, reader: BlockReader, policy: Policy, *, mode: str = "copy",
                 pin: bool = False, cuda: bool = False) -> None:
        if n_slots < 1:
            raise ValueError(f"the pinned RAM tier needs at least one slot, got {n_slots}")
        if mode not in ("copy", "register"):
            raise ValueError(f"PinnedPool mode must be copy or register, got {mode!r}")
        self.n_slots = n_slots
        self.block_size = reader.block_size
        self.reader = reader
        self.mode = mode
        self.table = SlotTable(n_slots, policy)
        self.rows: torch.Tensor | None = None  # uint8 [R, block_size] ("copy" mode)
        self._owner: Any = None
        if mode == "copy":
            flat, self._owner = aligned_empty(n_slots * self.block_size, pin=pin)
            self.rows = flat.view(n_slots, self.block_size)
            self._rows = list(self.rows.unbind(0))  # per-slot views made once
        self._registrar = HostRegistrar() if mode == "register" else None
        self._dma = [torch.cuda.Event() for _ in range(n_slots)] if cuda else None  # last device read
        self._dma_pending = [False] * n_slots
        self._loading: dict[int, tuple[int, Any]] = {}  # key -> (slot, Future) of a start_load read
        self.hits = 0
        self.misses = 0
        self.bytes_in = 0
        self.wait_s = 0.0  # host time in fetch()'s miss path: bookkeeping, waits for reads, registration
        self.blocked_s = 0.0  # ... of which blocked on the reader's threads (reads, first-use checks) or a slot's copy
        self.register_s = 0.0  # host time in cudaHostRegister and cudaHostUnregister ("register" mode)

    @property
    def nbytes(self) -> int:
        return self.n_slots * self.block_size

    def host_row(self, slot: int) -> torch.Tensor:
        """uint8 [block_size] host bytes of a resident slot (pinned copy, or the registered mapping)."""
        if self.rows is not None:
            return self._rows[slot]
        return self.reader.mapped_row(self.table.key_of[slot])

    def mark_dma(self, slot: int, stream: torch.cuda.Stream) -> None:
        """Record that a device copy on `stream` reads this slot: it is not reused before it finishes."""
        if self._dma is not None:
            self._dma[slot].record(stream)
            self._dma_pending[slot] = True

    def _quiesce(self, slot: int) -> None:
        """Wait for the last device copy out of `slot` (before overwriting or unregistering it)."""
        if self._dma is not None and self._dma_pending[slot]:
            t0 = time.perf_counter()
            self._dma[slot].synchronize()
            self.blocked_s += time.perf_counter() - t0
            self._dma_pending[slot] = False

    def _release(self, slot: int, key: int) -> None:
        self._quiesce(slot)
        if self._registrar is not None:
            t0 = time.perf_counter()
            self._registrar.unregister(self.reader.mapped_row(key))
            self.register_s += time.perf_counter() - t0

    def fetch(self, keys: list[int], t: float, pinned: Collection[int] = ()) -> Iterator[tuple[int, int]]:
        """Make each key resident; yield (key, slot) as each becomes readable (hits first).

        Misses load in batches of at most R keys (reads or first-use checks of a batch run in parallel on the
        reader's threads). The first batch starts before the hits are yielded when it can evict none of them (the
        hits, the batch and `pinned` fit the tier together), so its reads overlap the caller's work on the hits.
        A key yielded earlier may be evicted by a later batch: `mark_dma` makes that eviction wait for its copy.
        On a read error every read of the batch is awaited, the failed and not yet yielded keys are dropped, and
        the error is raised. The same happens to the keys not yet yielded when the caller stops early (closes the
        generator, or an error of its own unwinds it): no key stays resident with its read in flight.
        """
        self.settle(only_done=True)
        lookup = self.table.lookup
        hits = [(k, s) for k in keys if (s := lookup(k)) is not None]
        missing = [k for k in keys if lookup(k) is None]
        self.misses += len(missing)
        batches = [missing[b:b + self.n_slots] for b in range(0, len(missing), self.n_slots)]
        started = None
        if batches:
            protect = set(batches[0]) | set(pinned) | {k for k, _ in hits}
            if len(protect) <= self.n_slots:
                started = self._start_batch(batches[0], t, protect)
        try:
            for k, s in hits:
                if k in self._loading:  # started by start_load(): wait for that read
                    t0 = time.perf_counter()
                    self._settle(k)
                    dt = time.perf_counter() - t0
                    self.wait_s += dt
                    self.blocked_s += dt
                self.hits += 1
                self.table.touch(k, t)
                yield k, s
        except BaseException:
            if started is not None:  # the early batch was never handed out: forget it once its threads are done
                self._abandon(*started, range(len(started[0])))
            raise
        for i, batch in enumerate(batches):
            if i or started is None:
                started = self._start_batch(batch, t, set(batch) | set(pinned)
                                            if len(pinned) + len(batch) <= self.n_slots else set(batch))
            yield from self._finish_batch(*started)

    def _start_batch(self, batch: list[int], t: float, pinned: set[int]) -> tuple:
        """Give each key of `batch` a slot and start its read ("copy") or first-use check ("register") on the
        reader's threads; _finish_batch hands them out."""
        t0 = time.perf_counter()
        if self._loading:
            self.settle()  # in-flight prefetch reads hold slots that must not be evicted half-written
            self.blocked_s += time.perf_counter() - t0
        slots = []
        for k in batch:
            slot, evicted = self.table.assign(k, t, pinned)
            if evicted is not None:
                self._release(slot, evicted)
            slots.append(slot)
        if self.mode == "register":
            # the hash is also each block's first touch, so its pages fault in there, not in the registration
            futures = [self.reader.submit_mapped_check(k) for k in batch]
        else:
            futures = [self.reader.submit(k, self._rows[s]) for k, s in zip(batch, slots)]
        self.wait_s += time.perf_counter() - t0
        return batch, slots, futures

    def _finish_batch(self, batch: list[int], slots: list[int], futures: list) -> Iterator[tuple[int, int]]:
        t0 = time.perf_counter()
        if self.mode == "register":
            yield from self._register_batch(batch, slots, futures, t0)
            return
        # each block is handed out as soon as its own read lands (completion order), so its device copy starts
        # while the others are still being read: the reader's threads post each finished read to a queue
        landed: SimpleQueue = SimpleQueue()
        for i, f in enumerate(futures):
            f.add_done_callback(lambda f, i=i: landed.put(i))
        left = set(range(len(futures)))
        try:
            while left:
                tw = time.perf_counter()
                i = landed.get()
                self.blocked_s += time.perf_counter() - tw
                left.discard(i)
                f = futures[i]
                if f.exception() is not None:
                    left.add(i)
                    raise f.exception()
                self.bytes_in += self.block_size
                self.wait_s += time.perf_counter() - t0
                yield batch[i], slots[i]
                t0 = time.perf_counter()
        except BaseException:
            self._abandon(batch, slots, futures, left)
            raise

    def _abandon(self, batch: list[int], slots: list[int], futures: list, idx: Collection[int]) -> None:
        """Forget the keys batch[j], j in idx, after their reads or checks have finished: no thread may still write
        a slot that is about to be reused, and no key stays resident unread (or unregistered)."""
        idx = list(idx)
        wait([futures[j] for j in idx])
        for j in sorted(idx):
            self.table.drop(batch[j])

    def _register_batch(self, batch: list[int], slots: list[int], checks: list, t0: float) -> Iterator[tuple[int, int]]:
        """Register each block of the batch, in order, once its first-use check (started by _start_batch) passed."""
        handed = 0  # blocks registered and handed out
        try:
            for i, (k, s) in enumerate(zip(batch, slots)):
                row = self.reader.mapped_row(k)
                tw = time.perf_counter()
                err = checks[i].exception()
                self.blocked_s += time.perf_counter() - tw
                if err is not None:
                    for k2, c in zip(batch[i:], checks[i:]):
                        c.exception()  # the other checks finish (they only read the mapping)
                        self.table.drop(k2)
                    raise err
                tr = time.perf_counter()
                code = self._registrar.register(row)
                self.register_s += time.perf_counter() - tr
                if code:
                    for k2, c in zip(batch[i:], checks[i:]):
                        c.exception()
                        self.table.drop(k2)
                    ref = self.reader.ref(k)
                    raise RuntimeError(f"{ref.where()}: cudaHostRegister refused the mapped block (CUDA error {code}) "
                                       "after earlier blocks were accepted: lower --ram-gb (locked-memory limit?) "
                                       "or run with --io-register off")
                dt = time.perf_counter() - t0
                self.reader.note_mapped_read(self.block_size, dt)
                self.bytes_in += self.block_size
                self.wait_s += dt
                handed = i + 1
                yield k, s
                t0 = time.perf_counter()
        except GeneratorExit:  # the caller stopped: the blocks not registered yet leave the tier
            self._abandon(batch, slots, checks, range(handed, len(batch)))
            raise

    # --- asynchronous loads (prefetch from disk) ---
    def is_loading(self, key: int) -> bool:
        return key in self._loading

    def start_load(self, key: int, t: float, pinned: Collection[int] = ()) -> bool:
        """Start reading `key` into a RAM slot without blocking; False when that would block.

        Only in "copy" mode (registration happens on the calling thread). The victim must have no
        device copy in flight, else nothing starts. A failed read raises at the next fetch().
        """
        if self.mode != "copy" or self.table.lookup(key) is not None:
            return False
        protect = set(pinned) | self._loading.keys()
        if len(self.table) >= self.n_slots:
            try:
                victim = self.table.policy.victim(self.table.slot_of, protect)
            except AssertionError:
                return False
            vs = self.table.slot_of[victim]
            if self._dma is not None and self._dma_pending[vs] and not self._dma[vs].query():
                return False
        slot, evicted = self.table.assign(key, t, protect)
        if evicted is not None:
            self._release(slot, evicted)  # its copy is complete: no wait
        self._loading[key] = (slot, self.reader.submit(key, self._rows[slot]))
        return True

    def _settle(self, key: int) -> None:
        """Wait for the read of `key` started by start_load; on error forget the key and raise."""
        slot, fut = self._loading.pop(key)
        try:
            fut.result()
        except Exception:
            self.table.drop(key)
            raise
        self.bytes_in += self.block_size

    def settle(self, *, only_done: bool = False) -> None:
        """Finish started reads (only those already done when `only_done`); the first error raises."""
        for k in [k for k, (_, f) in self._loading.items() if f.done() or not only_done]:
            self._settle(k)

    def preload(self, keys: list[int], t: float) -> None:
        """Fill the tier with `keys` (start-up warm-up, e.g. a RAM-backed run); stops when full."""
        for k in keys[:self.n_slots]:
            for _ in self.fetch([k], t):
                pass
        self.hits = self.misses = self.bytes_in = 0
        self.wait_s = self.blocked_s = self.register_s = 0.0

    def close(self) -> None:
        """Unregister every registered block (register mode) after the last device copy."""
        for _, fut in self._loading.values():
            fut.exception()  # wait: no thread may write into the buffer after it is released
        self._loading.clear()
        for key, slot in list(self.table.slot_of.items()):
            self._release(slot, key)
            self.table.drop(key)
        if self._owner is not None:
            self._owner.release()

    def stats(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "bytes_in": self.bytes_in,
                "slots": self.n_slots, "mode": self.mode, "wait_s": self.wait_s, "blocked_s": self.blocked_s,
                "register_s": self.register_s}
