"""The expert-cache options: one definition for the command line, `load(budget=...)` and the cache.

Owns: `TierConfig` (each option once, with its default, its validation and its command-line help:
cli/options.py builds the click options from these fields, `load()` checks its keys against them),
`BUDGET_KEYS`, `BudgetError`, the names of the I/O and verify modes, and the run-time sizes that the
budget estimates share with the engine (`DEFAULT_CONTEXT`, `PREFILL_CHUNK`).
Does not own: what the options turn into (budget.py: slot counts; cache.py: the cache), nor the policies
(policy.py). Imports no torch, so the command line's --help stays fast.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from tiered.store.policy import DEVICE_POLICIES, POLICIES

DEFAULT_CONTEXT = 4096  # KV cache positions when none are asked for (capped by the model's limit)
PREFILL_CHUNK = 512  # tokens per prefill forward: bounds the [H, T, S] attention scores and expert groups
RESIDENT_PREFILL_CHUNK = 4096  # the longest chunk engine.pick_prefill_chunk gives a prefill with every expert resident


def default_context(cfg: Any, max_context: int | None = None) -> int:
    """KV cache positions: `max_context` when given, else min(DEFAULT_CONTEXT, the model's limit)."""
    return int(max_context or min(DEFAULT_CONTEXT, cfg.max_position_embeddings))


IO_MODES = ("mmap", "direct")
VERIFY_MODES = ("first-use", "none")
CPU_EXPERT_MODES = ("auto", "off", "all")


class BudgetError(ValueError):
    """A budget that cannot work (too small for one layer's top-k, or larger than the machine)."""


EMBED_PLACES = ("gpu", "host")  # where the model keeps its token-embedding table
EMBED_CHOICES = ("auto",) + EMBED_PLACES  # --embed: auto is decided by the cache's slot counts
TIED_EMBED_HOST = ("--embed host: this model's lm_head is tied to its embedding table (tie_word_embeddings), and the "
                   "lm_head reads all of it every token: use --embed gpu (or auto, which keeps it there)")


def _opt(default: Any, help: str, kind: Any = None) -> Any:
    """A TierConfig field with its command-line description (cli/options.py builds the click option from it).

    kind: None = the field's own type, a tuple of choices, ("min", n) an integer >= n, or "flag"."""
    return field(default=default, metadata={"help": help, "kind": kind})


@dataclass(frozen=True)
class TierConfig:
    """The expert-cache options: the one definition of the budget flags of `run`/`trace`, of `load(budget=...)`'s
    accepted keys (BUDGET_KEYS) and of the cache's behaviour. None = choose a default (docs/cli.md)."""

    vram_gb: float | None = _opt(None, "GiB of GPU memory for the whole model: dense + KV cache + scratch + "
                                       "expert slots")
    expert_slots: int | None = _opt(None, "Global device-tier expert slots S (wins over --vram-gb)", ("min", 1))
    ram_gb: float | None = _opt(None, "GiB of pinned RAM for experts")
    io: str = _opt("mmap", "Disk reads: page cache (mmap) or O_DIRECT (direct)", IO_MODES)
    policy: str = _opt("lru", "Device-tier eviction policy (predicted: scored by the routers)",
                       tuple(sorted(DEVICE_POLICIES)))
    ram_policy: str = _opt("lru", "RAM-tier eviction policy", tuple(sorted(POLICIES)))
    verify: str = _opt("first-use", "Check each expert's xxh3 the first time it is read from disk", VERIFY_MODES)
    io_register: str = _opt("auto", "--io mmap on CUDA: register mapped experts for zero-copy DMA (auto), or "
                                    "stage copies through pinned memory (off)", ("auto", "off"))
    io_threads: int = _opt(16, "Reader threads (O_DIRECT queue depth, parallel page-cache copies)", ("min", 1))
    ram_preload: bool = _opt(False, "Fill the RAM tier at start-up (a RAM-backed run)", "flag")
    flru_w: float | None = _opt(None, "flru weight in get() ticks [default: the number of layers, one use ~ "
                                      "one token]")
    prefetch_depth: int | None = _opt(None, "Layers ahead to prefetch (the predictor's prefetcher)", ("min", 0))
    prefetch_budget: int | None = _opt(None, "Experts prefetched per layer [default: 1.5 x top-k]", ("min", 0))
    # default (unset): auto where the device slot table runs, off on the host path, resolved by budget.py
    # (`resolve_cpu_experts`). Measured on the H200 box, bf16, --vram-gb 4, replayed routing: with the device slot table
    # auto gives 1.25-1.29x (offload-cpu-device-2026-12-01-h200-s11.json, s12, offload-default-2026-12-02-h200-s14.json)
    # and 2.2-2.6x at 12 GB/s; on the host path at the native link it measured 1.23x and 0.91x in two processes (s14)
    # and 0.93-1.05x at 25 GB/s (s6), so it stays off there. Where the load-time probe gives the CPU none of a layer's
    # two misses (q4 on the H200 box: 0.96-0.99x with the handshake kernels and nothing to hand over), the default
    # drops the CPU path again (engine.py).
    cpu_experts: str | None = _opt(None, "Decode misses computed on the CPU from the RAM tier: off, auto (per miss, "
                                         "where it finishes first: PCIe copy or CPU; on a CPU device only with "
                                         "--h2d-gbps), or all (every routed expert on the CPU, like llama.cpp's -ot "
                                         "exps=CPU). auto works with --slot-table device too (a native thread team "
                                         "answers the step's kernels; it spins on all cores but one while decoding). "
                                         "[default: auto where the device slot table runs and the load-time probe "
                                         "finds the CPU worth one of a layer's two misses, else off]",
                                   CPU_EXPERT_MODES)
    # default off: measured on the H200 box (offload-paced-demand-2026-12-01-h200-s6.json, call D3) it lifted auto
    # from 143.8 to 153.9 tok/s at --h2d-gbps 12 but cost 15% at 25 GB/s (202.1 -> 172.3), where the link is busier
    cpu_write_behind: str = _opt("off", "With --cpu-experts auto on CUDA: while the link is idle, also copy one expert "
                                        "the CPU computed into a device slot, so that its next use hits (on, off; pays "
                                        "on slow links: measured +7% at 12 GB/s, -15% at 25)",
                                 ("on", "off"))
    # default off: measured on the H200 box (offload-cpu-device-2026-12-01-h200-s12.json, call J) lru 509.5 against
    # 495.1 whole (1.03x), nextuse 478.1 against 495.5 (0.96x): the link copies less, but a split expert is not
    # admitted to VRAM, so the hit rate falls (0.853 -> 0.825 under lru) and the misses it saves come back.
    # admit (offload-cpu-admit-2026-12-02-h200-s13.json): lru 497.2 against 512.0, nextuse 486.9 against 523.3: the
    # hit rate holds, but the CPU computes more and the later copy stalled the next layer's lookup. Without that stall
    # (the slot reserved until the step's end; offload-default-2026-12-02-h200-s14.json, call A): lru 0.93x, nextuse
    # 1.00x and 1.01x: the link moves the same bytes either way, and the CPU computes more
    cpu_split: str = _opt("off", "With --cpu-experts auto and the device slot table: also split one miss a layer "
                                 "by FFN rows between the CPU and the link where the cost model says that finishes "
                                 "first (dense bf16/fp16/fp32 experts only). auto: the link's rows go to a split row "
                                 "(one more expert row of VRAM) and the expert is not kept; admit: the expert takes a "
                                 "slot, reserved while the CPU's rows are copied after the layer beside the next ones, "
                                 "and kept from the step's end; off (measured auto 1.03x under lru, 0.96x under "
                                 "nextuse; admit 0.93x and 1.00-1.01x)",
                          ("auto", "admit", "off"))
    cpu_threads: int = _opt(0, "Threads of the CPU-expert worker (0 = the physical cores: the usable CPUs, halved "
                               "when SMT is on)", ("min", 0))
    # default auto: measured on the H200 box (offload-devstep-2026-12-01-h200*.json, replayed routing, --vram-gb 4) the
    # device step decoded 1.19x (bf16) and 1.43x (q4) faster than the host step, at 7-10 us of host time per layer
    slot_table: str = _opt("auto", "Where decode resolves expert slots: host (a routing read-back per layer, with "
                                   "every policy, prefetch and CPU experts), device (one CUDA graph per step: slot "
                                   "lookup, LRU/flru eviction and the miss copies run on the GPU, which reads the "
                                   "pinned RAM tier; needs every expert in RAM), or auto (device when it can)",
                           ("host", "device", "auto"))
    device_prefetch: int = _opt(0, "With the device slot table: experts per layer prefetched one layer ahead on a side "
                                   "stream, ranked by router-history transitions (fitted by `tiered tune --fit-trace`)",
                                ("min", 0))
    # default copy (session 22, benchmarks/results/offload-fill-copy-2026-12-03-h200-s22.json): on the H200 box, q4
    # at --vram-gb 4 with replayed routing, the copy engines against the gather fill (auto, the default since session
    # 19) and a fixed 7 in the same calls; the bf16 table has no free slot after the prefill, so nothing is planned.
    # With --h2d-gbps (the copy engines cannot be paced) or --cpu-split admit the default is auto.
    device_fill: int | str = _opt("copy", "With the device slot table: how experts not resident are copied in the "
                                     "background into free slots (never evicting; a budget with room to spare "
                                     "loads what demand paging would miss at first use). copy: the copy engines, "
                                     "outside the decode step, as fast as the link moves them; auto: N a step by a "
                                     "kernel beside the step, N what the link moves in 0.9 of a step timed in the "
                                     "decode's first steps (the default with --h2d-gbps or --cpu-split admit); N: "
                                     "that many a step; 0 = off",
                                  ("auto-or-min", 0, ("auto", "copy")))
    device_evict: str = _opt("auto", "With the device slot table: evict by --policy (lru/flru), or by nextuse (each "
                                     "expert's predicted next use from router-history transitions and its use "
                                     "history; the prefetch then loads only likely experts over later-needed ones); "
                                     "auto: nextuse where the layout has router history (`tiered tune --fit-trace`) "
                                     "or the predictor given carries it, else policy",
                             ("auto", "policy", "nextuse"))
    h2d_gbps: float = _opt(0.0, "Benchmark option: pace host->GPU expert copies to this many GB/s (10^9 B/s), "
                                "emulating a slower PCIe link (0 = unpaced)")
    # default auto: on an H100 (session 53, the bf16 8-layer 10.6B shape at --vram-gb 4, replayed routing) the table in
    # pinned RAM gave 249 -> 315 slots and every-option-default offload 1.20x over the five eval documents (587.8
    # against 489.9 tok/s; offload-embed-auto-2026-12-07-h100-s53.json)
    embed: str = _opt("auto", "Where the token-embedding table lives on CUDA: gpu; host (pinned RAM: a token's row is "
                             "read over PCIe, and the table's GPU memory becomes expert slots; for models whose "
                             "lm_head is not tied to the table); auto (host when the experts do not all fit the GPU "
                             "beside the table, the lm_head is untied and --expert-slots is not given)", EMBED_CHOICES)

    def __post_init__(self) -> None:
        if self.io not in IO_MODES:
            raise BudgetError(f"--io must be one of {list(IO_MODES)}, got {self.io!r}")
        if self.embed not in EMBED_CHOICES:
            raise BudgetError(f"--embed must be one of {list(EMBED_CHOICES)}, got {self.embed!r}")
        if self.verify not in VERIFY_MODES:
            raise BudgetError(f"--verify must be one of {list(VERIFY_MODES)}, got {self.verify!r}")
        for name, allowed in (("policy", DEVICE_POLICIES), ("ram_policy", POLICIES)):
            if getattr(self, name) not in allowed:
                raise BudgetError(f"--{name.replace('_', '-')} must be one of {sorted(allowed)}, "
                                  f"got {getattr(self, name)!r}")
        f = self.device_fill
        if not (f in ("auto", "copy") or (isinstance(f, int) and not isinstance(f, bool) and f >= 0)):
            raise BudgetError(f"--device-fill must be auto, copy or an integer >= 0 (experts a step; 0 = off), got "
                              f"{self.device_fill!r}")
        if self.device_evict not in ("auto", "policy", "nextuse"):
            raise BudgetError(f"--device-evict must be auto, policy or nextuse, got {self.device_evict!r}")
        if self.io_register not in ("auto", "off"):
            raise BudgetError(f"--io-register must be auto or off, got {self.io_register!r}")
        for name in ("vram_gb", "ram_gb"):
            v = getattr(self, name)
            if v is not None and not (v >= 0 and math.isfinite(v)):
                raise BudgetError(f"--{name.replace('_', '-')} must be a non-negative number of GiB, got {v}")
        if self.expert_slots is not None and self.expert_slots < 1:
            raise BudgetError(f"--expert-slots must be >= 1, got {self.expert_slots}")
        if self.io_threads < 1:
            raise BudgetError(f"--io-threads must be >= 1, got {self.io_threads}")
        if self.cpu_experts is not None and self.cpu_experts not in CPU_EXPERT_MODES:
            raise BudgetError(f"--cpu-experts must be one of {list(CPU_EXPERT_MODES)}, got {self.cpu_experts!r}")
        if self.cpu_split not in ("auto", "admit", "off"):
            raise BudgetError(f"--cpu-split must be auto, admit or off, got {self.cpu_split!r}")
        if self.slot_table not in ("host", "device", "auto"):
            raise BudgetError(f"--slot-table must be host, device or auto, got {self.slot_table!r}")
        if not isinstance(self.cpu_threads, int) or self.cpu_threads < 0:
            raise BudgetError(f"--cpu-threads must be an integer >= 0 (0 = the physical cores), got {self.cpu_threads!r}")
        if not (isinstance(self.h2d_gbps, (int, float)) and self.h2d_gbps >= 0 and math.isfinite(self.h2d_gbps)):
            raise BudgetError(f"--h2d-gbps must be a non-negative number of GB/s (0 = unpaced), got {self.h2d_gbps!r}")
        if self.flru_w is not None and not (self.flru_w > 0 and math.isfinite(self.flru_w)):
            raise BudgetError(f"--flru-w must be a positive number of get() ticks, got {self.flru_w}")

    @classmethod
    def from_flags(cls, flags: dict[str, Any]) -> "TierConfig":
        """Flags as given (None = not set) -> a TierConfig; an unknown key is a BudgetError naming the known ones."""
        unknown = set(flags) - set(BUDGET_KEYS)
        if unknown:
            raise BudgetError(f"unknown budget options {sorted(unknown)}; known: {list(BUDGET_KEYS)}")
        return cls(**{k: v for k, v in flags.items() if v is not None})


BUDGET_KEYS = tuple(f.name for f in fields(TierConfig))  # what load(budget=...) accepts
# Keys that apply with or without the expert cache: alone they keep every expert resident (engine.make_provider).
# The CPU-expert and pacing options act on the expert cache's misses; with resident experts there are none.
NON_CACHE_KEYS = ("verify", "cpu_experts", "cpu_threads", "cpu_write_behind", "cpu_split", "h2d_gbps", "slot_table",
                  "embed")


def physical_cores() -> int:
    """The CPUs this process may use, halved when the machine runs two hardware threads per core (SMT)."""
    import os

    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/sys/devices/system/cpu/smt/active") as f:
            smt = f.read().strip() == "1"
    except OSError:
        smt = False
    return max(1, n // 2 if smt else n)
