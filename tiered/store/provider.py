"""The expert-provider interfaces: what the model asks of a store (SEAMS.md).

Owns: `ExpertProvider` (the protocol every provider satisfies: slot weights, `get`, `prefetch`, `stats`) and
`HostSlotProvider` (the base class by which a provider declares that it can also answer `get` with host
ints, `get_slots`, which the piecewise decode step writes into its static slot buffer).
Does not own: any provider (resident.py, cache.py), nor the model that calls them (model/).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Protocol, Sequence

from torch import Tensor


class ExpertProvider(Protocol):
    """SEAMS.md: the only way the model touches routed-expert weights."""
    weights: Any  # ExpertWeights: gate [S, F, D], up [S, F, D], down [S, D, F]
    max_experts_per_call: int

    def get(self, layer: int, expert_ids: Tensor) -> Tensor: ...

    def prefetch(self, layer: int, expert_ids: Tensor) -> None: ...

    def stats(self) -> dict: ...


class HostSlotProvider(ABC):
    """A provider whose `get` can be answered on the host: subclass it to declare so.

    `get_slots(layer, ids)` must do exactly what `get(layer, ids)` does (bookkeeping, copies, stream waits)
    and return the slot rows as host ints instead of a device tensor. A provider that does not subclass
    this (e.g. a wrapper that adds work to `get`) is served through `get`.
    """

    @abstractmethod
    def get_slots(self, layer: int, expert_ids: Tensor | Sequence[int]) -> list[int]: ...
