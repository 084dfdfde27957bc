"""Per-layer sequence state for batched decoding: a budgeted pool of pages (K/V, MLA latents) and of
per-sequence slots (DeltaNet recurrent state).

Owns: `LayerState` (one layer's pool, with its kind), `StatePool` (the pools of every layer, sized once
from a byte budget, the page allocator shared by the paged layers and the slot allocator shared by the
recurrent ones), `pages_for_budget`, `page_bytes`, `slot_bytes`, `pool_pages`, `pool_bytes`.
Does not own: which rows exist or when they grow (scheduler.py), the math that reads and writes the state
(batchstep.py, model/).

Kinds of per-layer state, so that one budget covers every family (model layer kind -> state kind):
  "kv"         (attention) keys and values, paged: k, v [N, P, KV, hd]; n tokens hold ceil(n / P) pages.
  "latent"     (MLA, DeepSeek-V3) the normed latent and the roped shared key of each token, paged:
               latent [N, P, R], k_rope [N, P, dr]; same page table as "kv".
  "recurrent"  (Gated DeltaNet) a fixed-size state per sequence, one slot per row: conv [S, C, W-1] in the
               compute dtype and recurrent [S, Hv, dk, dv] fp32 (model/state.py's LinearState with a slot dim).
Paged kinds share one page table per sequence (page i of a sequence is the same page id in every paged
layer); recurrent layers share one slot per row (slot s of every recurrent layer belongs to one sequence).
A page id costs `page_bytes` (every paged layer's share of P tokens); a slot costs `slot_bytes`
(ModelConfig.state_bytes_per_sequence). A slot is zeroed when it is handed out (a new sequence, or a
preempted one that recomputes its state from its tokens).

Legend: N pages, P tokens per page, KV key/value heads, hd head dim, R kv_lora_rank, dr rope dims,
S slots (max batch), C conv channels, W conv kernel, Hv value heads, dk/dv head dims, L layers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tiered.decode.options import BatchConfig
from tiered.layout.config import ModelConfig

PAGED_KINDS = ("kv", "latent")
SLOT_KINDS = ("recurrent",)
STATE_KIND = {"attention": "kv", "mla": "latent", "linear": "recurrent"}  # model layer kind -> state kind
GB = 1 << 30  # --kv-gb is GiB, like --vram-gb


class StateBudgetError(ValueError):
    """The state budget cannot hold what was asked for; the message gives the numbers and what to change."""


@dataclass(frozen=True)
class LayerState:
    """One layer's state pool; the tensors of its kind are set, the others None."""
    kind: str  # "kv", "latent" or "recurrent"
    k: Tensor | None = None  # kv: [N, P, KV, hd]
    v: Tensor | None = None  # kv: [N, P, KV, hd]
    latent: Tensor | None = None  # latent: [N, P, R]
    k_rope: Tensor | None = None  # latent: [N, P, dr]
    conv: Tensor | None = None  # recurrent: [S, C, W-1] compute dtype
    recurrent: Tensor | None = None  # recurrent: [S, Hv, dk, dv] fp32

    @property
    def page_bytes(self) -> int:
        """Bytes of one page id in this layer (0 for a recurrent layer)."""
        ts = (self.k, self.v) if self.kind == "kv" else (self.latent, self.k_rope) if self.kind == "latent" else ()
        return sum(t[0].numel() * t.element_size() for t in ts)

    @property
    def slot_bytes(self) -> int:
        """Bytes of one sequence slot in this layer (0 for a paged layer)."""
        if self.kind != "recurrent":
            return 0
        return sum(t[0].numel() * t.element_size() for t in (self.conv, self.recurrent))


def layer_kinds(config: ModelConfig) -> list[str]:
    """The state kind of every layer: "kv" (attention), "latent" (MLA) or "recurrent" (Gated DeltaNet)."""
    return [STATE_KIND[config.layer_kind(l)] for l in range(config.num_layers)]


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def page_bytes(config: ModelConfig, page_size: int, dtype: torch.dtype) -> int:
    """Bytes one page id costs across all paged layers: K and V of page_size tokens per attention layer,
    (kv_lora_rank + rope dims) per token per MLA layer (ModelConfig.kv_bytes_per_token, times P)."""
    return page_size * config.kv_bytes_per_token(_itemsize(dtype))


def slot_bytes(config: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes one sequence slot costs across the recurrent layers (0 without DeltaNet layers)."""
    return config.state_bytes_per_sequence(_itemsize(dtype))


def pages_for_budget(config: ModelConfig, kv_gb: float, page_size: int, dtype: torch.dtype, slots: int = 0) -> int:
    """How many page ids a --kv-gb budget (GiB) buys once `slots` sequence slots are paid for."""
    room = int(kv_gb * GB) - slots * slot_bytes(config, dtype)
    if room < 0:
        raise StateBudgetError(f"--kv-gb {kv_gb} GiB cannot hold the recurrent state of {slots} rows "
                               f"({slot_bytes(config, dtype):,} bytes each): raise --kv-gb or lower --max-batch")
    per = page_bytes(config, page_size, dtype)
    return room // per if per else 1 << 20  # no paged layer: pages cost nothing (the page table still counts tokens)


def pool_pages(opts: BatchConfig, config: ModelConfig, max_context: int, dtype: torch.dtype) -> int:
    """Page ids of the pool: from --kv-gb (after max_batch recurrent slots), else max_batch full contexts
    (the pages at most 2 GiB)."""
    if opts.kv_gb is not None:
        return max(1, pages_for_budget(config, opts.kv_gb, opts.page_size, dtype, pool_slots(opts, config)))
    full = opts.max_batch * -(-max_context // opts.page_size)
    return max(1, min(full, pages_for_budget(config, 2.0, opts.page_size, dtype)))


def pool_slots(opts: BatchConfig, config: ModelConfig) -> int:
    """Sequence slots of the pool: one per row when the model has recurrent layers, else none."""
    return opts.max_batch if config.num_linear_layers else 0


def pool_bytes(opts: BatchConfig, config: ModelConfig, max_context: int, dtype: torch.dtype) -> int:
    """Device bytes of that pool, pages and slots (what load(state_bytes=...) reserves inside --vram-gb)."""
    return (pool_pages(opts, config, max_context, dtype) * page_bytes(config, opts.page_size, dtype)
            + pool_slots(opts, config) * slot_bytes(config, dtype))


class StatePool:
    """Every layer's state pool plus the free lists of page ids and sequence slots (allocated once, at start-up).

    Args:
        config: the model.
        num_pages: page ids (each costs `page_bytes` across the paged layers).
        page_size: tokens per page.
        device, dtype: where and in what the state lives (the compute dtype; recurrent state fp32).
        num_slots: sequence slots of the recurrent layers (the scheduler's max_batch); ignored without them.
    """

    def __init__(self, config: ModelConfig, *, num_pages: int, page_size: int, device: torch.device,
                 dtype: torch.dtype, num_slots: int = 0) -> None:
        if page_size < 1 or num_pages < 1:
            raise StateBudgetError(f"the state pool needs >= 1 page of >= 1 token, got {num_pages} pages of "
                                   f"{page_size}: raise --kv-gb")
        kinds = layer_kinds(config)
        if "recurrent" in kinds and num_slots < 1:
            raise StateBudgetError(f"{config.family} has Gated DeltaNet layers: the state pool needs >= 1 sequence "
                                   f"slot (one per row), got {num_slots}")
        self.config = config
        self.page_size = page_size
        self.device = torch.device(device)
        self.dtype = dtype
        self.num_slots = num_slots if "recurrent" in kinds else 0
        dev, c = self.device, config
        n = {k: kinds.count(k) for k in ("kv", "latent", "recurrent")}
        # a model without paged layers keeps no page tensors: its page table only counts tokens
        self.num_pages = num_pages
        kv = lat = rec = None
        if n["kv"]:
            shape = (n["kv"], num_pages, page_size, c.num_kv_heads, c.head_dim)
            kv = (torch.zeros(shape, device=dev, dtype=dtype), torch.zeros(shape, device=dev, dtype=dtype))
        if n["latent"]:
            m = c.extra["mla"]
            R, dr = int(m["kv_lora_rank"]), int(m["qk_rope_head_dim"])
            lat = (torch.zeros(n["latent"], num_pages, page_size, R, device=dev, dtype=dtype),
                   torch.zeros(n["latent"], num_pages, page_size, dr, device=dev, dtype=dtype))
        if n["recurrent"]:
            S = self.num_slots
            # one tensor per part with the layer dim first (model/state.py's LinearState plus a slot dim), so a
            # slot is zeroed for every layer in one call
            rec = (torch.zeros(n["recurrent"], S, c.linear_conv_dim, c.linear_conv_kernel - 1, device=dev, dtype=dtype),
                   torch.zeros(n["recurrent"], S, c.linear_num_value_heads, c.linear_key_head_dim,
                               c.linear_value_head_dim, device=dev, dtype=torch.float32))
        self.recurrent = rec  # (conv [Ll, S, C, W-1], recurrent [Ll, S, Hv, dk, dv]) or None
        self.layers: list[LayerState] = []
        seen = {"kv": 0, "latent": 0, "recurrent": 0}
        for kind in kinds:
            i = seen[kind]
            seen[kind] += 1
            if kind == "kv":
                self.layers.append(LayerState(kind, k=kv[0][i], v=kv[1][i]))
            elif kind == "latent":
                self.layers.append(LayerState(kind, latent=lat[0][i], k_rope=lat[1][i]))
            else:
                self.layers.append(LayerState(kind, conv=rec[0][i], recurrent=rec[1][i]))
        self._free = list(range(num_pages - 1, -1, -1))  # a stack: the lowest ids are handed out first
        self._free_slots = list(range(self.num_slots - 1, -1, -1))

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def free_slots(self) -> int:
        """Sequence slots free (always enough when the model has no recurrent layers: see needs_slot)."""
        return len(self._free_slots)

    @property
    def needs_slot(self) -> bool:
        """Whether a sequence needs a slot (the model has recurrent layers)."""
        return self.num_slots > 0

    @property
    def page_bytes(self) -> int:
        """Bytes of one page id across the paged layers."""
        return sum(ls.page_bytes for ls in self.layers)

    @property
    def slot_bytes(self) -> int:
        """Bytes of one sequence slot across the recurrent layers."""
        return sum(ls.slot_bytes for ls in self.layers)

    @property
    def nbytes(self) -> int:
        return self.page_bytes * self.num_pages + self.slot_bytes * self.num_slots

    def bytes_for(self, tokens: int) -> int:
        """Device bytes a sequence of `tokens` tokens holds: its pages and its slot."""
        return self.pages_needed(tokens) * self.page_bytes + self.slot_bytes

    def pages_needed(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def alloc(self, n: int) -> list[int]:
        """n free page ids (raises StateBudgetError when fewer are free: callers check free_pages first)."""
        if n > len(self._free):
            raise StateBudgetError(f"asked for {n} pages, {len(self._free)} free of {self.num_pages}")
        out = [self._free.pop() for _ in range(n)]
        return out

    def peek_free_page(self) -> int | None:
        """A free page's id without taking it (None when every page is taken): a graphed step's padding rows
        store their K/V there, which no row reads (decode/batchgraph.py)."""
        return self._free[-1] if self._free else None

    def free(self, pages: list[int]) -> None:
        """Return pages to the pool (a double free is a bug: asserted)."""
        assert len(set(pages)) == len(pages) and not set(pages) & set(self._free), f"double free of pages {pages}"
        self._free.extend(reversed(pages))

    def alloc_slot(self) -> int:
        """A free sequence slot, zeroed in every recurrent layer (a new sequence: no tokens seen);
        -1 when the model has no recurrent layers. Raises StateBudgetError when none is free."""
        if not self.needs_slot:
            return -1
        if not self._free_slots:
            raise StateBudgetError(f"all {self.num_slots} sequence slots are in use")
        s = self._free_slots.pop()
        self.recurrent[0][:, s].zero_()
        self.recurrent[1][:, s].zero_()
        return s

    def free_slot(self, slot: int) -> None:
        """Return a slot (-1, the slot of a model without recurrent layers, is ignored; a double free asserts)."""
        if slot < 0:
            return
        assert slot not in self._free_slots and slot < self.num_slots, f"double free of slot {slot}"
        self._free_slots.append(slot)
