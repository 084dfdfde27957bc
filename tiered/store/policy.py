"""Eviction policies: which resident expert leaves a full tier.

Owns: the `Policy` classes (LRU, LFU, frequency-weighted LRU, and `ScoredEviction`, which evicts the
lowest score that someone else computes: predict/prefetch.py scores experts from the routers),
`make_policy`, and the offline
Belady optimum `belady` used as the ceiling of every demand policy. Keys are ints,
`layer * E + expert`; times `t` are the caller's clock (any non-decreasing number: the cache
uses its get() counter, the simulator its step index).

Does not own: the slots or bytes themselves (that is `ram.py` / `vram.py`), nor the choice of
which keys are pinned (the cache passes the current step's experts as `pinned`).

Every policy tracks exactly the keys inserted and not yet removed, and raises
`PolicyInvariantError` on a double insert, a touch or remove of an absent key, a clock that runs
backwards, or a victim request with every candidate pinned. These checks are cheap and catch
bookkeeping bugs in the tiers at the point where they happen.
"""
from __future__ import annotations

import heapq
from collections import OrderedDict
from typing import Collection, Iterable, Sequence

import numpy as np


class PolicyInvariantError(AssertionError):
    """A tier's bookkeeping broke a policy invariant (a bug in the caller, never a user error)."""


class Policy:
    """Base class: key set + clock checks. Subclasses rank keys for eviction.

    API (SEAMS.md): insert(key, t), touch(key, t), remove(key), victim(resident, pinned) -> key.
    """

    name = "base"

    def __init__(self) -> None:
        self._t = float("-inf")  # last clock value seen

    # --- invariants shared by all policies ---
    def _clock(self, t: float) -> None:
        if t < self._t:
            raise PolicyInvariantError(f"{self.name}: clock went backwards ({t} after {self._t})")
        self._t = t

    def _check_absent(self, key: int) -> None:
        if key in self:
            raise PolicyInvariantError(f"{self.name}: double insert of key {key}")

    def _check_present(self, key: int, op: str) -> None:
        if key not in self:
            raise PolicyInvariantError(f"{self.name}: {op} of key {key}, which is not resident")

    @staticmethod
    def _as_set(resident: Iterable[int] | None) -> Collection[int] | None:
        if resident is None or isinstance(resident, (set, frozenset, dict)):
            return resident
        return set(resident)

    def _none_left(self, resident: Collection[int] | None, pinned: Collection[int]) -> PolicyInvariantError:
        n = len(self) if resident is None else len(resident)
        return PolicyInvariantError(
            f"{self.name}: no evictable key: {n} candidates, {len(pinned)} pinned "
            "(the tier is smaller than one step's experts; the cache must size waves by its slot count)"
        )

    # --- API ---
    def insert(self, key: int, t: float) -> None:
        raise NotImplementedError

    def touch(self, key: int, t: float) -> None:
        raise NotImplementedError

    def remove(self, key: int) -> None:
        raise NotImplementedError

    def victim(self, resident: Iterable[int] | None = None, pinned: Collection[int] = ()) -> int:
        """The key to evict among `resident` (default: every tracked key), never one in `pinned`."""
        raise NotImplementedError

    def victims(self, n: int, resident: Iterable[int] | None = None, pinned: Collection[int] = ()) -> list[int]:
        """`n` distinct keys to evict, in the order victim() would pick them if each were removed in turn.

        The default asks victim() n times; array-backed policies answer in one pass."""
        out: list[int] = []
        excl = set(pinned)
        for _ in range(n):
            v = self.victim(resident, excl)
            out.append(v)
            excl.add(v)
        return out

    def __contains__(self, key: int) -> bool:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError


class LRU(Policy):
    """Least recently used: evicts the key whose last insert/touch is oldest."""

    name = "lru"

    def __init__(self) -> None:
        super().__init__()
        self._order: OrderedDict[int, float] = OrderedDict()  # oldest first

    def insert(self, key: int, t: float) -> None:
        self._clock(t)
        self._check_absent(key)
        self._order[key] = t

    def touch(self, key: int, t: float) -> None:
        self._clock(t)
        self._check_present(key, "touch")
        self._order[key] = t
        self._order.move_to_end(key)

    def remove(self, key: int) -> None:
        self._check_present(key, "remove")
        del self._order[key]

    def victim(self, resident: Iterable[int] | None = None, pinned: Collection[int] = ()) -> int:
        cand = self._as_set(resident)
        for key in self._order:  # oldest first: usually the first key is the answer
            if key not in pinned and (cand is None or key in cand):
                return key
        raise self._none_left(cand, pinned)

    def __contains__(self, key: int) -> bool:
        return key in self._order

    def __len__(self) -> int:
        return len(self._order)


class _ScoredPolicy(Policy):
    """Evicts the lowest score; scores only grow on touch, so a lazy min-heap stays exact.

    Heap entries are (score, seq, key); an entry is stale when `seq` differs from the key's current
    sequence number. `seq` also breaks score ties by age (older first).
    """

    def __init__(self) -> None:
        super().__init__()
        self._uses: dict[int, int] = {}  # key -> uses while resident
        self._last: dict[int, float] = {}  # key -> last insert/touch time
        self._seq: dict[int, int] = {}  # key -> sequence number of its live heap entry
        self._heap: list[tuple[float, int, int]] = []
        self._next_seq = 0

    def _score(self, key: int) -> float:
        raise NotImplementedError

    def _push(self, key: int) -> None:
        self._next_seq += 1
        self._seq[key] = self._next_seq
        heapq.heappush(self._heap, (self._score(key), self._next_seq, key))
        if len(self._heap) > 4 * len(self._seq) + 64:  # drop stale entries now and then
            self._heap = [e for e in self._heap if self._seq.get(e[2]) == e[1]]
            heapq.heapify(self._heap)

    def insert(self, key: int, t: float) -> None:
        self._clock(t)
        self._check_absent(key)
        self._uses[key] = 1
        self._last[key] = t
        self._push(key)

    def touch(self, key: int, t: float) -> None:
        self._clock(t)
        self._check_present(key, "touch")
        self._uses[key] += 1
        self._last[key] = t
        self._push(key)

    def remove(self, key: int) -> None:
        self._check_present(key, "remove")
        del self._uses[key], self._last[key], self._seq[key]

    def set_uses(self, key: int, uses: int) -> None:
        """Restore a resident key's use count (a table handed back from the device: store/devtable.py)."""
        self._check_present(key, "set_uses")
        self._uses[key] = int(uses)
        self._push(key)

    def victim(self, resident: Iterable[int] | None = None, pinned: Collection[int] = ()) -> int:
        cand = self._as_set(resident)
        skipped: list[tuple[float, int, int]] = []
        found = None
        while self._heap:
            entry = heapq.heappop(self._heap)
            score, seq, key = entry
            if self._seq.get(key) != seq:
                continue  # stale
            skipped.append(entry)  # victim() does not remove: the caller calls remove()
            if key not in pinned and (cand is None or key in cand):
                found = key
                break
        for entry in skipped:
            heapq.heappush(self._heap, entry)
        if found is None:
            raise self._none_left(cand, pinned)
        return found

    def __contains__(self, key: int) -> bool:
        return key in self._seq

    def __len__(self) -> int:
        return len(self._seq)


class LFU(_ScoredPolicy):
    """Least frequently used (uses counted while resident); ties go to the least recent."""

    name = "lfu"

    def _score(self, key: int) -> float:
        return float(self._uses[key])


class FrequencyLRU(_ScoredPolicy):
    """Frequency-weighted LRU: score = uses * w + last-use time; the lowest score is evicted.

    `w` is in clock units: one more use is worth `w` ticks of recency. w=0 is plain LRU, a very
    large w is LFU. The cache's clock ticks once per get() (one layer of one step), so w = L makes
    one use worth one token of recency.
    """

    name = "flru"

    def __init__(self, w: float = 1.0) -> None:
        super().__init__()
        if w < 0:
            raise ValueError(f"flru weight w must be >= 0, got {w}")
        self.w = float(w)

    def _score(self, key: int) -> float:
        return self._uses[key] * self.w + self._last[key]


class ScoredEviction(Policy):
    """Evict the resident key with the lowest score; LRU order breaks ties.

    The scores are written by a caller that knows more than the access sequence (`set_scores(layer, scores)`,
    from the prefetcher's router-fed scorer in predict/prefetch.py); this policy only keeps them and ranks by
    them. Keys are layer * E + expert, like every policy; all scores start at 0 (pure LRU).

    State is arrays over all L*E keys (resident mask, score, LRU sequence number), so `victims` is a few
    numpy operations, with no Python loop over experts or residents.
    """

    name = "predicted"

    def __init__(self, num_layers: int, num_experts: int) -> None:
        super().__init__()
        n = num_layers * num_experts
        self.E = num_experts
        self.score = np.zeros(n)  # [L*E] higher = keep
        self.resident = np.zeros(n, dtype=bool)  # [L*E] tracked keys
        self.seq = np.zeros(n, dtype=np.int64)  # [L*E] order of the last insert/touch (LRU tie-break)
        self._next = 0
        self._count = 0

    def set_scores(self, layer: int, scores: np.ndarray) -> None:
        """scores [E]: the keep-score of each expert of `layer` (higher = more likely needed soon)."""
        self.score[layer * self.E:(layer + 1) * self.E] = scores

    def _stamp(self, key: int) -> None:
        self._next += 1
        self.seq[key] = self._next

    def insert(self, key: int, t: float) -> None:
        self._clock(t)
        self._check_absent(key)
        self.resident[key] = True
        self._count += 1
        self._stamp(key)

    def touch(self, key: int, t: float) -> None:
        self._clock(t)
        self._check_present(key, "touch")
        self._stamp(key)

    def remove(self, key: int) -> None:
        self._check_present(key, "remove")
        self.resident[key] = False
        self._count -= 1

    def victim(self, resident: Iterable[int] | None = None, pinned: Collection[int] = ()) -> int:
        return self.victims(1, resident, pinned)[0]

    def victims(self, n: int, resident: Iterable[int] | None = None, pinned: Collection[int] = ()) -> list[int]:
        """The n lowest scores among evictable keys, least recently used first among equal scores."""
        cand = self._as_set(resident)
        mask = self.resident
        if (cand is not None and len(cand) != self._count) or pinned:
            mask = mask.copy()
            if cand is not None and len(cand) != self._count:  # a subset of the tracked keys
                sub = np.zeros_like(mask)
                sub[np.fromiter(cand, dtype=np.int64, count=len(cand))] = True
                mask &= sub
            if pinned:
                mask[np.fromiter(pinned, dtype=np.int64, count=len(pinned))] = False
        idx = np.flatnonzero(mask)
        if idx.size < n:
            raise self._none_left(cand, pinned)
        order = np.lexsort((self.seq[idx], self.score[idx]))[:n]  # by score, then by age
        return idx[order].tolist()

    def __contains__(self, key: int) -> bool:
        return 0 <= key < self.resident.size and bool(self.resident[key])

    def __len__(self) -> int:
        return self._count


POLICIES: dict[str, type[Policy]] = {"lru": LRU, "lfu": LFU, "flru": FrequencyLRU}  # policies of the access sequence
PREDICTED = ScoredEviction.name  # the device tier's scored policy (its scores need the model's routers)
DEVICE_POLICIES = frozenset(POLICIES) | {PREDICTED}


def make_policy(name: str, **kw) -> Policy:
    """A fresh policy by name ("lru", "lfu", "flru"); keyword options go to its constructor (flru: w)."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}: choose one of {sorted(POLICIES)}") from None
    return cls(**kw)


def belady(steps: Sequence[Sequence[int]], capacity: int, *, count_from: int = 0) -> tuple[int, int]:
    """Offline optimal demand paging (Belady/MIN) with the current step's keys pinned.

    Args:
        steps: the keys each step needs, in order (one step = one get(): a layer of a token, or a
            prefill wave). Keys of one step are loaded together and cannot evict each other.
        capacity: resident slots (>= the largest step).
        count_from: count only steps from this index on (earlier steps warm the cache, e.g. prefill).
    Returns:
        (hits, misses) counted per key use.
    """
    misses = belady_misses(steps, capacity)[count_from:]
    uses = sum(len(set(s)) for s in steps[count_from:])
    return uses - sum(misses), sum(misses)


def belady_misses(steps: Sequence[Sequence[int]], capacity: int) -> list[int]:
    """Belady's misses at each step (same rules as `belady`): what a batch bound charges step by step."""
    if steps and capacity < max(len(set(s)) for s in steps):
        raise ValueError(f"capacity {capacity} is smaller than the largest step ({max(len(set(s)) for s in steps)} keys)")
    never = len(steps)
    next_use: list[dict[int, int]] = [dict() for _ in steps]  # step i: key -> next step index using it
    upcoming: dict[int, int] = {}
    for i in range(len(steps) - 1, -1, -1):
        keys = set(steps[i])
        for k in keys:
            next_use[i][k] = upcoming.get(k, never)
        for k in keys:
            upcoming[k] = i
    resident: dict[int, int] = {}  # key -> the step that uses it next
    heap: list[tuple[int, int]] = []  # (-next use, key); stale when resident[key] differs
    out: list[int] = []
    for i, step in enumerate(steps):
        keys = set(step)
        missing = [k for k in keys if k not in resident]
        out.append(len(missing))
        # Keys of this step are resident with next use == i, the smallest possible value, so the
        # max-heap reaches them only after every unpinned key: pinning needs no special case.
        for _ in range(len(resident) + len(missing) - capacity):
            while True:
                nu, v = heapq.heappop(heap)
                if resident.get(v) == -nu:
                    break
            assert v not in keys, "belady: evicted a key of the current step"
            del resident[v]
        for k in keys:
            resident[k] = next_use[i][k]
            heapq.heappush(heap, (-next_use[i][k], k))
    return out
