"""Budget planning: the expert-cache options and the slot counts they give.

Owns: `plan_budget` (the options of options.py -> slot counts, with the VRAM breakdown and every budget check) and its byte estimates (dense weights from
the safetensors header, KV cache, scratch), and the machine's memory (/proc/meminfo).
Does not own: the options themselves (options.py), the runtime cache (cache.py), policies (policy.py),
reads (io.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from tiered.layout.format import DENSE_FILE, ST_ITEMSIZE, read_safetensors_header
from tiered.store.devtable import refusal as device_table_refusal
from tiered.store.options import PREFILL_CHUNK, BudgetError, TierConfig

GiB = 1 << 30
MiB = 1 << 20


@dataclass(frozen=True)
class CachePlan:
    """Slot counts chosen from the flags, with the byte breakdown that justified them."""

    expert_slots: int  # S
    ram_slots: int  # R (0 = no RAM tier: CPU only)
    block_size: int  # bytes per expert block
    vram_budget_gib: float | None  # the --vram-gb it came from, if any
    breakdown: dict[str, int] = field(default_factory=dict)  # bytes by use (dense, kv_cache, scratch, ...)
    notes: tuple[str, ...] = ()
    cpu_experts: str = "off"  # --cpu-experts as given, or its default resolved (`resolve_cpu_experts`)

    def describe(self) -> str:
        b = self.breakdown
        lines = [f"expert slots: {self.expert_slots} x {self.block_size / MiB:.2f} MiB = "
                 f"{self.expert_slots * self.block_size / GiB:.2f} GiB"]
        if self.vram_budget_gib is not None:
            lines.append("vram budget {:.2f} GiB = dense {:.2f} + KV cache {:.2f} + scratch {:.2f} + slots {:.2f} "
                         "+ unused {:.2f} GiB".format(self.vram_budget_gib, b["dense"] / GiB, b["kv_cache"] / GiB,
                                                    b["scratch"] / GiB, b["slots"] / GiB, b["unused"] / GiB))
        lines.append(f"ram tier: {self.ram_slots} slots = {self.ram_slots * self.block_size / GiB:.2f} GiB")
        lines.extend(self.notes)
        return "\n".join(lines)


def meminfo(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def estimate_dense_bytes(layout: Any, dtype: torch.dtype, skip: tuple[str, ...] = ()) -> int:
    """Bytes of the dense weights on the compute device: float tensors converted to the compute dtype; the parts of
    quantized weights (codes, scales, mins: the manifest's dense quant descriptions) as stored, since the model keeps
    them so (QuantWeight). skip: tensors kept elsewhere (`embed` under --embed host)."""
    entries, _ = read_safetensors_header(layout.path / DENSE_FILE)
    entries = {n: e for n, e in entries.items() if n not in skip}
    size = torch.empty((), dtype=dtype).element_size()
    quant = getattr(getattr(layout, "manifest", None), "dense_quant", None) or {}
    stored = {q.get(p_, n) if p_ != "q" else n for n, q in quant.items() for p_ in ("q", "scale", "min")}
    return sum(e.nbytes if n in stored else e.nbytes // ST_ITEMSIZE[e.dtype] * size for n, e in entries.items())


def estimate_kv_bytes(cfg: Any, max_context: int, dtype: torch.dtype) -> int:
    """The sequence state (model/state.py): K and V of the attention layers for max_context positions, plus the
    fixed conv and recurrent state of the DeltaNet layers."""
    size = torch.empty((), dtype=dtype).element_size()
    return cfg.kv_bytes_per_token(size) * max_context + cfg.state_bytes_per_sequence(size)


def estimate_scratch_bytes(cfg: Any, block_size: int, dtype: torch.dtype, prefill_chunk: int = PREFILL_CHUNK) -> int:
    """Working memory: gathered top-k expert weights (decode), prefill activations and logits, allocator slack."""
    size = torch.empty((), dtype=dtype).element_size()
    gathered = cfg.top_k * block_size * max(1, size // 2)  # index_select of K experts, converted on use
    acts = prefill_chunk * (cfg.hidden_size * 16 + cfg.num_heads * prefill_chunk) * 4
    logits = cfg.vocab_size * 4 * 2
    return 256 * MiB + gathered + acts + logits


def plan_budget(cfg: Any, block_size: int, tiers: TierConfig, *, device: torch.device, dense_bytes: int,
                kv_bytes: int, scratch_bytes: int, gpu_total: int | None = None, gpu_free: int | None = None,
                ram_total: int | None = None, ram_avail: int | None = None) -> CachePlan:
    """Turn the flags into slot counts; raise BudgetError with the numbers when they cannot work.

    Explicit flags win over defaults; defaults never come from MemTotal alone (the GPU box's RAM
    grows as it is used), and a --ram-gb above MemTotal only warns.
    """
    n_all = cfg.num_layers * cfg.num_experts
    K = cfg.top_k
    cuda = device.type == "cuda"
    notes: list[str] = []
    if tiers.ram_gb is not None:
        R = int(tiers.ram_gb * GiB) // block_size
        if R < 1:
            raise BudgetError(f"--ram-gb {tiers.ram_gb} holds no expert block ({block_size / MiB:.2f} MiB each): "
                              f"pass --ram-gb {block_size / GiB:.4f} or more")
        if ram_total is not None and tiers.ram_gb * GiB > ram_total:
            notes.append(f"warning: --ram-gb {tiers.ram_gb} is above MemTotal ({ram_total / GiB:.1f} GiB); "
                         "kept, since explicit flags win (some machines grow their RAM as it is used)")
        R = min(R, n_all)
    elif cuda:
        avail = ram_avail if ram_avail is not None else 8 * GiB
        R = max(1, min(n_all, avail // 2 // block_size))
        notes.append(f"no --ram-gb: {R} RAM slots from half of MemAvailable ({avail / GiB:.1f} GiB)")
    else:
        R = 0  # CPU: the device tier is RAM already; slots are filled straight from the file
    cpu_mode = resolve_cpu_experts(tiers, cuda=cuda, ram_slots=R, num_keys=n_all, block_size=block_size)
    if cpu_mode != "off" and cuda:  # the all-zero expert row the CPU-expert steps point at (vram.py)
        scratch_bytes += block_size
        if tiers.slot_table != "host" and tiers.cpu_split == "auto":  # and the split row (--cpu-split auto)
            scratch_bytes += block_size
    fixed = dense_bytes + kv_bytes + scratch_bytes
    brk = {"dense": dense_bytes, "kv_cache": kv_bytes, "scratch": scratch_bytes}
    need_min = f"one layer's top-k = {K} slots x {block_size / MiB:.2f} MiB = {K * block_size / GiB:.3f} GiB"
    if tiers.vram_gb is not None and cuda and gpu_total is not None and tiers.vram_gb * GiB > gpu_total:
        raise BudgetError(f"--vram-gb {tiers.vram_gb} GiB is more than this GPU has ({gpu_total / GiB:.2f} GiB): "
                          "pass at most that")
    if tiers.expert_slots is not None:
        S = tiers.expert_slots
        if S < K:
            raise BudgetError(f"--expert-slots {S} is below {need_min}: pass --expert-slots {K} or more")
        if S > n_all:
            notes.append(f"--expert-slots {S} is more than the model's {n_all} experts: using {n_all}")
            S = n_all
        if tiers.vram_gb is not None and fixed + S * block_size > tiers.vram_gb * GiB:
            raise BudgetError(
                f"--expert-slots {S} ({S * block_size / GiB:.2f} GiB) + dense {dense_bytes / GiB:.2f} + KV cache "
                f"{kv_bytes / GiB:.2f} + scratch {scratch_bytes / GiB:.2f} GiB exceed --vram-gb {tiers.vram_gb}: "
                "drop one of the two flags or make them agree")
    elif tiers.vram_gb is not None:
        room = int(tiers.vram_gb * GiB) - fixed
        S = max(0, room) // block_size
        if S < K:
            raise BudgetError(
                f"--vram-gb {tiers.vram_gb} leaves {max(room, 0) / GiB:.3f} GiB for experts after dense "
                f"{dense_bytes / GiB:.2f} + KV cache {kv_bytes / GiB:.2f} + scratch {scratch_bytes / GiB:.2f} GiB, "
                f"below {need_min}: pass --vram-gb {(fixed + K * block_size) / GiB:.2f} or more "
                "(or lower --max-context to shrink the KV cache)")
        S = min(S, n_all)
    elif cuda:
        room = (gpu_free if gpu_free is not None else 0) - fixed
        S = min(n_all, max(0, int(room * 0.9)) // block_size)
        if S < K:
            raise BudgetError(f"the GPU has {(gpu_free or 0) / GiB:.2f} GiB free, not enough for dense + KV cache "
                              f"+ {need_min}: free GPU memory or lower --max-context")
        notes.append(f"no --vram-gb/--expert-slots: {S} slots from 90% of the free GPU memory")
    else:
        S = n_all
    if cuda and gpu_free is not None and S * block_size > gpu_free:
        raise BudgetError(f"{S} expert slots need {S * block_size / GiB:.2f} GiB but the GPU has "
                          f"{gpu_free / GiB:.2f} GiB free: lower --expert-slots/--vram-gb")
    brk["slots"] = S * block_size
    brk["unused"] = max(0, int((tiers.vram_gb or 0) * GiB) - fixed - S * block_size) if tiers.vram_gb else 0

    return CachePlan(S, R, block_size, tiers.vram_gb, brk, tuple(notes), cpu_mode)


def resolve_cpu_experts(tiers: TierConfig, *, cuda: bool, ram_slots: int, num_keys: int, block_size: int) -> str:
    """--cpu-experts as given; unset: auto where the device slot table will run (CUDA, every expert in the RAM
    tier, lru/flru, no host prefetch, --slot-table auto|device: store/devtable.refusal finds nothing), else off.
    The engine drops a default auto again when the load-time probe gives the CPU none of a layer's two misses."""
    if tiers.cpu_experts is not None:
        return tiers.cpu_experts
    if tiers.slot_table == "host":
        return "off"
    why = device_table_refusal(cuda=cuda, ram_slots=ram_slots, num_keys=num_keys, block_size=block_size,
                               policy=tiers.policy, cpu_experts="auto", h2d_gbps=tiers.h2d_gbps,
                               prefetch_depth=tiers.prefetch_depth or 0)
    return "auto" if why is None else "off"

