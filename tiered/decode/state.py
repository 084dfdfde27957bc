"""Per-layer sequence state for batched decoding: a budgeted pool of pages (KV now; latents and recurrent slots later).

Owns: `LayerState` (one layer's pool, with its kind), `StatePool` (the pools of every layer, sized once
from a byte budget, and the page allocator shared by them), `pages_for_budget`.
Does not own: which rows exist or when they grow (scheduler.py), the attention math (batchstep.py).

Kinds of per-layer state, so that one budget covers every family:
  "kv"         keys and values, paged: k, v [N, P, KV, hd]; a sequence of n tokens holds ceil(n / P) pages.
  "latent"     (MLA) one paged latent per token: [N, P, C]; same page table as "kv".
  "recurrent"  (DeltaNet / linear attention) a fixed-size state per sequence: [R, ...]; one slot per row.
Paged kinds share one page table per sequence (page i of a sequence is the same page id in every paged
layer); slot kinds share one slot per row. Only "kv" is implemented; the others are the place to add them.

Legend: N pages, P tokens per page, KV key/value heads, hd head dim, R rows (max batch), L layers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tiered.decode.options import BatchConfig
from tiered.layout.config import ModelConfig

PAGED_KINDS = ("kv", "latent")
SLOT_KINDS = ("recurrent",)
GB = 1 << 30  # --kv-gb is GiB, like --vram-gb


class StateBudgetError(ValueError):
    """The state budget cannot hold what was asked for; the message gives the numbers and what to change."""


@dataclass(frozen=True)
class LayerState:
    """One layer's state pool."""
    kind: str  # "kv" (paged keys/values); "latent" and "recurrent" are reserved for MLA and DeltaNet layers
    k: Tensor  # [N, P, KV, hd]
    v: Tensor  # [N, P, KV, hd]

    @property
    def page_bytes(self) -> int:
        return (self.k[0].numel() * self.k.element_size()) + (self.v[0].numel() * self.v.element_size())


def layer_kinds(config: ModelConfig) -> list[str]:
    """The state kind of every layer (every family implemented today has full attention: "kv")."""
    return ["kv"] * config.num_layers


def page_bytes(config: ModelConfig, page_size: int, dtype: torch.dtype) -> int:
    """Bytes one page id costs across all paged layers (K and V of page_size tokens per layer)."""
    size = torch.empty((), dtype=dtype).element_size()
    per_layer = 2 * page_size * config.num_kv_heads * config.head_dim * size
    return per_layer * sum(k in PAGED_KINDS for k in layer_kinds(config))


def pages_for_budget(config: ModelConfig, kv_gb: float, page_size: int, dtype: torch.dtype) -> int:
    """How many page ids a --kv-gb budget (GiB) buys."""
    return int(kv_gb * GB) // page_bytes(config, page_size, dtype)


def pool_pages(opts: BatchConfig, config: ModelConfig, max_context: int, dtype: torch.dtype) -> int:
    """Page ids of the pool: from --kv-gb, else max_batch full contexts (at most 2 GiB)."""
    if opts.kv_gb is not None:
        return max(1, pages_for_budget(config, opts.kv_gb, opts.page_size, dtype))
    full = opts.max_batch * -(-max_context // opts.page_size)
    return max(1, min(full, pages_for_budget(config, 2.0, opts.page_size, dtype)))


def pool_bytes(opts: BatchConfig, config: ModelConfig, max_context: int, dtype: torch.dtype) -> int:
    """Device bytes of that pool (what load(state_bytes=...) reserves inside --vram-gb)."""
    return pool_pages(opts, config, max_context, dtype) * page_bytes(config, opts.page_size, dtype)


class StatePool:
    """Every layer's state pool plus the free list of page ids (allocated once, at start-up).

    Args:
        config: the model.
        num_pages: page ids (each costs `page_bytes` across layers).
        page_size: tokens per page.
        device, dtype: where and in what the state lives (the compute dtype).
    """

    def __init__(self, config: ModelConfig, *, num_pages: int, page_size: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        if page_size < 1 or num_pages < 1:
            raise StateBudgetError(f"the state pool needs >= 1 page of >= 1 token, got {num_pages} pages of "
                                   f"{page_size}: raise --kv-gb")
        self.config = config
        self.page_size = page_size
        self.num_pages = num_pages
        self.device = torch.device(device)
        self.dtype = dtype
        shape = (num_pages, page_size, config.num_kv_heads, config.head_dim)
        self.layers: list[LayerState] = []
        for l, kind in enumerate(layer_kinds(config)):
            if kind != "kv":
                raise NotImplementedError(f"layer {l} needs {kind!r} state, which the batch scheduler does not "
                                          "hold yet: add it to tiered/decode/state.py")
            self.layers.append(LayerState(kind, torch.zeros(shape, device=self.device, dtype=dtype),
                                          torch.zeros(shape, device=self.device, dtype=dtype)))
        self._free = list(range(num_pages - 1, -1, -1))  # a stack: the lowest ids are handed out first

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def nbytes(self) -> int:
        return sum(ls.page_bytes for ls in self.layers) * self.num_pages

    def pages_needed(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def alloc(self, n: int) -> list[int]:
        """n free page ids (raises StateBudgetError when fewer are free: callers check free_pages first)."""
        if n > len(self._free):
            raise StateBudgetError(f"asked for {n} pages, {len(self._free)} free of {self.num_pages}")
        out = [self._free.pop() for _ in range(n)]
        return out

    def free(self, pages: list[int]) -> None:
        """Return pages to the pool (a double free is a bug: asserted)."""
        assert len(set(pages)) == len(pages) and not set(pages) & set(self._free), f"double free of pages {pages}"
        self._free.extend(reversed(pages))
