"""The key <-> slot table of a fixed pool, with its eviction policy and hit/miss counters.

Owns: which expert key (layer*E + expert) sits in which slot of a pool of n slots, the free list,
and the call into the pool's `Policy` when the pool is full. Shared by the pinned RAM tier
(ram.py) and the device tier (vram.py), so both keep the same invariants.
Does not own: the bytes in the slots, copies or their ordering (events), nor which keys are
pinned (the caller passes the current step's keys).
"""
from __future__ import annotations

from typing import Collection

from tiered.store.policy import Policy, PolicyInvariantError


class SlotTable:
    """n slots; every resident key has exactly one slot and is tracked by the policy."""

    def __init__(self, n_slots: int, policy: Policy) -> None:
        if n_slots < 0:
            raise ValueError(f"n_slots must be >= 0, got {n_slots}")
        self.n_slots = n_slots
        self.policy = policy
        self.key_of = [-1] * n_slots  # slot -> key, -1 when free
        self.slot_of: dict[int, int] = {}  # key -> slot
        self._free = list(range(n_slots - 1, -1, -1))  # pop() hands out slot 0 first

    def lookup(self, key: int) -> int | None:
        return self.slot_of.get(key)

    def touch(self, key: int, t: float) -> None:
        self.policy.touch(key, t)

    def assign(self, key: int, t: float, pinned: Collection[int]) -> tuple[int, int | None]:
        """Give `key` a slot: a free one, else the policy's victim (never in `pinned`).

        Returns (slot, evicted key or None). The key is resident (and in the policy) on return.
        """
        return self.assign_many([key], t, pinned)[0]

    def assign_many(self, keys: list[int], t: float, pinned: Collection[int]) -> list[tuple[int, int | None]]:
        """assign() for several keys (all of them in `pinned`) with one victim search: the same slots and
        evictions as assigning them one by one, since none of them can be a victim of another."""
        for key in keys:
            if key in self.slot_of:
                raise PolicyInvariantError(f"slot table: key {key} is already in slot {self.slot_of[key]}")
        need = len(keys) - len(self._free)
        if need > 0 and self.n_slots == 0:
            raise PolicyInvariantError("slot table: assign on a pool with no slots")
        victims = iter(self.policy.victims(need, self.slot_of, pinned) if need > 0 else ())
        out = []
        for key in keys:
            evicted = None
            if self._free:
                slot = self._free.pop()
            else:
                evicted = next(victims)
                slot = self.slot_of.pop(evicted)
                self.policy.remove(evicted)
            self.key_of[slot] = key
            self.slot_of[key] = slot
            self.policy.insert(key, t)
            out.append((slot, evicted))
        return out

    def drop(self, key: int) -> int:
        """Forget `key` (a failed load): its slot goes back to the free list. Returns the slot."""
        slot = self.slot_of.pop(key)
        self.policy.remove(key)
        self.key_of[slot] = -1
        self._free.append(slot)
        return slot

    def __len__(self) -> int:
        return len(self.slot_of)

    def check(self) -> None:
        """Full consistency check (tests and debugging; O(n))."""
        assert len(self.slot_of) + len(self._free) == self.n_slots, "slot table: slots leaked"
        assert len(self.policy) == len(self.slot_of), "slot table: policy and table disagree"
        for k, s in self.slot_of.items():
            assert self.key_of[s] == k, f"slot table: slot {s} holds {self.key_of[s]}, expected {k}"
        for s in self._free:
            assert self.key_of[s] == -1, f"slot table: free slot {s} still holds key {self.key_of[s]}"
