"""ResidentExperts: the ExpertProvider that keeps every routed expert in memory.

Owns: the "all experts in memory" provider of SEAMS.md. On CPU its weights are the zero-copy views
over the layout's mmap of experts.bin; on CUDA it copies the whole expert pool to the device once,
at start-up. Slot = layer * E + expert, so `get` is one add on the ids' device and never syncs (and
`slot_base` lets the one-token kernels do that add themselves),
which lets a whole decode step be captured in a CUDA graph. It is the reference path that the
expert cache (store/cache.py) must match.
Does not own: budgets, eviction or I/O scheduling (that is the cache), nor dtype conversion
(the model converts on use).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tiered.store.blockcheck import BlockChecker, progress_bar
from tiered.store.disk import expert_views
from tiered.store.options import VERIFY_MODES
from tiered.store.provider import HostSlotProvider


class ResidentExperts(HostSlotProvider):
    """All L*E experts addressable at once; weights are views in the stored dtype."""

    def __init__(self, weights: Any, *, num_layers: int, num_experts: int, io: str = "resident",
                 pool: Tensor | None = None, checker: Any = None) -> None:
        """weights: ExpertWeights (gate [L*E, F, D], up [L*E, F, D], down [L*E, D, F]), any device.
        checker: a store.blockcheck.BlockChecker whose unchecked blocks get()/get_slots() hash on first touch."""
        n = weights.gate.shape[0]
        if n != num_layers * num_experts:
            raise ValueError(f"expert pool holds {n} experts, expected num_layers*num_experts = "
                             f"{num_layers}*{num_experts}: the layout and its config disagree, re-run tiered repack")
        self.weights = weights
        self.pool = pool  # the uint8 [L*E, block] pool the views stand on (kept alive), if any
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.max_experts_per_call = num_experts
        self.io = io
        self.device = weights.gate.device
        self._served = 0  # experts handed out by get(): all hits, nothing is ever missing
        self.checker = checker

    @classmethod
    def from_layout(cls, layout: Any, *, device: torch.device | str = "cpu",
                    verify: str = "first-use") -> "ResidentExperts":
        """CPU: zero-copy views over the mmap, each block hashed when first touched (verify="first-use").
        CUDA: one copy of experts.bin into device memory, every block hashed on the way (a progress bar on a
        terminal), so that get() never waits for the host."""

        if verify not in VERIFY_MODES:
            raise ValueError(f"--verify must be one of {list(VERIFY_MODES)}, got {verify!r}")
        device = torch.device(device)
        cfg = layout.config
        pool = layout.expert_file_pool()  # uint8 [L*E, block], zero-copy over the mmap
        checker = BlockChecker(layout) if verify == "first-use" else None
        io = "mmap"
        if device.type != "cpu":
            dev_pool = torch.empty(pool.shape, dtype=torch.uint8, device=device)
            step = max(1, (1 << 30) // pool.shape[1])  # copy ~1 GiB at a time: bounded host staging
            bar = progress_bar(pool.numel(), "load experts" + (" (xxh3)" if checker else ""))
            try:
                for i in range(0, pool.shape[0], step):
                    if checker is not None:
                        checker.check(range(i, min(i + step, pool.shape[0])))
                    dev_pool[i:i + step].copy_(pool[i:i + step])
                    bar.update(pool[i:i + step].numel())
            finally:
                bar.close()
            pool, io = dev_pool, "resident"
        return cls(expert_views(pool, layout.tensor_specs), num_layers=cfg.num_layers,
                   num_experts=cfg.num_experts, io=io, pool=pool, checker=checker)

    def get(self, layer: int, expert_ids: Tensor) -> Tensor:
        """expert_ids int64 [U] -> slot rows [U] on the weights' device (layer*E + id); no host sync."""
        self._served += expert_ids.numel()
        if self.checker is not None and self.checker.pending:  # CPU only: on CUDA every block was checked at load
            self.checker.check((expert_ids + layer * self.num_experts).tolist())
        ids = expert_ids.to(self.device, non_blocking=True)
        return ids + layer * self.num_experts

    def slot_base(self, layer: int, expert_ids: Tensor) -> int | None:
        """layer * E when get(layer, ids) would only add it (ids [..., U] on the weights' device, no block left to
        check): the one-token expert kernels then add the base themselves, with no add kernel per layer (the
        optional provider call of SEAMS.md; model/moe.py expert_mix). None: call get()."""
        if expert_ids.device != self.device or (self.checker is not None and self.checker.pending):
            return None
        self._served += expert_ids.shape[-1]
        return layer * self.num_experts

    def slot_map(self, layer: int) -> Tensor:
        """Slot row of every expert of `layer` (int64 [E] on the weights' device), no host sync: the optional
        provider call of SEAMS.md by which several-token expert paths (model/moe_gpu.py) skip get()."""
        E = self.num_experts
        return torch.arange(layer * E, (layer + 1) * E, device=self.device)

    def get_slots(self, layer: int, expert_ids: Any) -> list[int]:
        """Host ids -> slot rows as host ints (the optional provider API the piecewise decode step uses)."""
        ids = expert_ids.tolist() if isinstance(expert_ids, Tensor) else [int(e) for e in expert_ids]
        self._served += len(ids)
        base = layer * self.num_experts
        if self.checker is not None and self.checker.pending:
            self.checker.check([base + e for e in ids])
        return [base + e for e in ids]

    def prefetch(self, layer: int, expert_ids: Any) -> None:
        """Nothing to fetch: every expert is resident."""

    def stats(self) -> dict:
        tier = {"hits": 0, "misses": 0, "bytes_in": 0, "gbps": 0.0}
        here = {**tier, "hits": self._served}
        return {"io": self.io, "expert_slots": self.num_layers * self.num_experts, "policy": "resident",
                "vram_budget_gib": None, "vram": here if self.device.type != "cpu" else dict(tier),
                "ram": here if self.device.type == "cpu" else dict(tier), "disk": dict(tier),
                "bytes_h2d_per_token": 0.0, "stall_s": 0.0, "stall_share": 0.0,
                "prefetch_issued": 0, "prefetch_used": 0,
                **(self.checker.stats() if self.checker is not None else {"verify": "none"})}
