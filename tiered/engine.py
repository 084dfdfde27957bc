"""The generation engine: a layout, a provider and a decoder composed into `load(...).generate(...)`.

Owns: `load` (path -> layout -> provider -> prefetcher -> Transformer, tokenizer; resolving the device,
dtype and layout), `Engine` (prefill in chunks, the decode loop, stopping at EOS or the token budget,
streaming text, stats with the keys of docs/stats.md) and the choice of decode path per step: whole-step graphs
(decode/graphed.py: resident experts, no observer), piecewise graphs (decode/piecewise.py: a provider whose
get() needs the routing on the host, e.g. the expert cache), or eager; greedy decoding with the whole-step graphs
runs the host one step ahead of the device (decode/ahead.py), every other request samples per token here.
Does not own: the model's math (model/), where experts live (store/: resident.py or the expert cache), what
to prefetch (predict/), sampling (decode/sampling.py), parsing flags or printing (cli/).
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor

from tiered.decode.ahead import EagerGreedy, GreedyStep, Readback, TokenSink, run_ahead
from tiered.decode.devstep import CPU_CONTENTION, DeviceStep, cpu_split
from tiered.kernels import slot_table as slot_table_kernels
from tiered.store.devtable import DeviceSlotTable
from tiered.decode.graphed import GraphedDecode
from tiered.decode.graphedprefill import GraphedPrefill
from tiered.decode.piecewise import GraphCaptureError, PiecewiseDecode
from tiered.decode.sampling import Sampling, SamplingError, check_sampling, row_noise, sample
from tiered.layout.config import ModelConfig
from tiered.layout.families import default_model_path
from tiered.layout.format import DTYPES, MANIFEST
from tiered.layout.tokenizer import Tokenizer
from tiered.model import cpu_experts
from tiered.kernels.cpu_kernel import KernelUnavailable, shared as cpu_kernel_shared
from tiered.model.cpu_mailbox import CpuMailbox
from tiered.model.layers import pick_backend
from tiered.model.moe import PrefetchHook, RoutingObserver
from tiered.model.transformer import RoutingOverride, Transformer
from tiered.predict.predictors import PARAMS_FILE, Predictor, PredictorParams
from tiered.predict.prefetch import Prefetcher, prefetcher_for_layout
from tiered.store.cache import ExpertCache
from tiered.store.cache import make_provider as make_cache
from tiered.store.disk import Layout
from tiered.store.budget import estimate_scratch_bytes
from tiered.store.options import (BUDGET_KEYS, NON_CACHE_KEYS, PREFILL_CHUNK, RESIDENT_PREFILL_CHUNK, BudgetError,
                                  TierConfig, default_context)
from tiered.store.provider import ExpertProvider
from tiered.store.offload import cpu_pin_enabled, worker_cpus
from tiered.store.resident import ResidentExperts

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")  # names in layout.format.DTYPES the model computes in
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

__all__ = ["BUDGET_KEYS", "Engine", "EngineError", "Generation", "Sampling", "load", "sample"]


class EngineError(ValueError):
    """A request the engine cannot serve (bad device, prompt too long, ...); the message says what to do."""


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    stop_reason: str  # "eos", "stop" (a stop string), "length" or "context"
    stats: dict[str, Any] = field(default_factory=dict)


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto" -> cuda when available, else cpu; a CUDA request without CUDA is an EngineError."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise EngineError(f"unknown device {device!r}: use cpu, cuda or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EngineError("--device cuda was asked for but this torch has no usable CUDA device: "
                          "use --device cpu (or auto)")
    if dev.type not in ("cpu", "cuda"):
        raise EngineError(f"device {dev.type!r} is not supported: use cpu, cuda or auto")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    name = DTYPE_ALIASES.get(dtype, dtype)
    if name not in COMPUTE_DTYPES:
        raise EngineError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
    return DTYPES[name]


def resolve_layout(path: str | Path | None, revision: str | None = None, *, experts: str = "source",
                   dense: str = "source") -> Path:
    """A layout directory for `path` (None = the embedded model; a Hugging Face id such as Qwen/Qwen3-30B-A3B is
    resolved through the local HF cache or downloaded, layout/hub.py); checkpoints are repacked into the cache
    with the given expert and dense storage (part of the cache key). A layout is used as it is."""
    if path is None:
        path = default_model_path()
    p = Path(path)
    if not p.exists():
        from tiered.layout.hub import HubError, looks_like_repo_id, resolve_model

        if not looks_like_repo_id(str(path)):
            raise EngineError(f"model path {p} does not exist: pass a layout or Hugging Face checkpoint directory, "
                              "or a Hugging Face model id (OWNER/NAME)")
        try:
            p = resolve_model(str(path), revision)
        except HubError as e:
            raise EngineError(str(e)) from None
    if (p / MANIFEST).is_file():
        return p
    from tiered.layout.repack import ensure_layout  # the repacker is imported only when handed a checkpoint
    return ensure_layout(p, experts=experts, dense=dense)


def config_with_experts_per_token(cfg: ModelConfig, k: int | None) -> ModelConfig:
    """`cfg` routing `k` experts per token (None: unchanged); a bad k is an EngineError."""
    if k is None:
        return cfg
    try:
        return cfg.with_experts_per_token(k)
    except ValueError as e:
        raise EngineError(str(e)) from None


def uses_cache(budget: dict[str, Any] | None) -> bool:
    """Whether these budget options need the expert cache (any set option but NON_CACHE_KEYS'); else every expert
    stays resident."""
    return bool({k for k, v in (budget or {}).items() if v is not None} - set(NON_CACHE_KEYS))


def make_provider(layout: Any, *, device: torch.device, budget: dict[str, Any] | None,
                  dtype: torch.dtype | None = None, max_context: int | None = None,
                  state_bytes: int = 0, prefill_chunk: int = PREFILL_CHUNK) -> ExpertProvider:
    """ResidentExperts when no budget option is set; otherwise the expert cache (store/cache.py)."""
    budget = {k: v for k, v in (budget or {}).items() if v is not None}
    try:
        TierConfig.from_flags(budget)  # unknown keys and bad values, before anything is opened
    except BudgetError as e:
        raise EngineError(str(e)) from None
    if not uses_cache(budget):  # --verify applies to resident experts too; the cache options need it
        return ResidentExperts.from_layout(layout, device=device, verify=budget.get("verify", "first-use"))
    return make_cache(layout, device=device, dtype=dtype, max_context=max_context, state_bytes=state_bytes,
                      prefill_chunk=prefill_chunk, **budget)


def embed_place(provider: ExpertProvider, budget: dict[str, Any] | None) -> str:
    """Where the model keeps its embedding table: the cache's resolved --embed, else the option as given (auto with
    every expert resident: gpu, since every expert fits)."""
    place = getattr(provider, "embed_place", None) or (budget or {}).get("embed") or TierConfig.embed
    return "gpu" if place == "auto" else place


def pick_prefill_chunk(requested: int | None, *, resident: bool, device: torch.device, cfg: Any, block_size: int,
                       dtype: torch.dtype, max_context: int) -> int:
    """Tokens per prefill forward. A request (>= 1) is kept, capped at max_context. None: PREFILL_CHUNK (512)
    with an expert cache, whose budget counted that; with every expert resident on CUDA, the longest chunk from
    RESIDENT_PREFILL_CHUNK (4,096) down, halving, whose scratch estimate (activations and the [H, T, S] scores:
    store/budget.py) takes at most a tenth of the free GPU memory, and not below PREFILL_CHUNK.

    Why longer: a prefill's host work (Python and launches, about 20 ms a chunk for the 8-layer 10.6B model) is per
    chunk, and at 512 tokens it is 4-5x the kernels' time. Session 25 call E (H200, the 8-layer 10.6B shape in VRAM,
    a 4,000-token prompt): q4+q4 39.7k tok/s at 512, 53.8k at 1,024, 130.4k at 2,048, 143.5k at 4,096; bf16 39.1k,
    94.4k, 124.5k, 188.7k (benchmarks/results/prefill-chunk-2026-12-03-h200-s25.json)."""
    if requested is not None:
        if int(requested) < 1:
            raise EngineError(f"prefill_chunk must be at least 1 token, got {requested}")
        return min(int(requested), max_context)
    if not resident or device.type != "cuda":
        return min(PREFILL_CHUNK, max_context)
    free = torch.cuda.mem_get_info(device)[0]
    chunk = RESIDENT_PREFILL_CHUNK
    while chunk > PREFILL_CHUNK and estimate_scratch_bytes(cfg, block_size, dtype, chunk) > free // 10:
        chunk //= 2
    return min(chunk, max_context)


def load(path: str | Path | None = None, *, device: str | torch.device = "auto",
         dtype: str | torch.dtype | None = None, max_context: int | None = None, attn: str = "auto",
         budget: dict[str, Any] | None = None, observer: RoutingObserver | None = None,
         prefetch_hook: PrefetchHook | None = None, routing: RoutingOverride | None = None,
         predictor: Predictor | None = None, cuda_graphs: bool = True,
         kernels: bool | None = None, state_bytes: int = 0, revision: str | None = None,
         experts: str = "source", dense: str = "source", experts_per_token: int | None = None,
         linear_attn: str = "auto", delta_step: str = "auto", glue: bool | None = None,
         prefill_chunk: int | None = None) -> "Engine":
    """Open a model for generation.

    Args:
        path: a layout or Hugging Face checkpoint directory, or a Hugging Face model id; None = the embedded
            default model.
        device: "cpu", "cuda", "cuda:N" or "auto".
        dtype: compute dtype (float32 / bfloat16 / float16); default fp32 on CPU, bf16 on CUDA.
        max_context: KV cache positions (prompt + generated); default min(DEFAULT_CONTEXT, the model's limit).
        attn: "auto", "triton", "flash" or "sdpa" (layers.pick_backend: auto = triton on CUDA when it imports).
        budget: expert-cache options (the fields of store.options.TierConfig, BUDGET_KEYS); None/empty = every
            expert in memory. prefetch_depth > 0 or policy "predicted" adds a Prefetcher (predict/prefetch.py).
        observer: routing observer (SEAMS.md), called once per layer per forward.
        prefetch_hook: called per layer of one-token steps after that layer's get() (SEAMS.md).
        routing: a routing override (benchmark mode, predict/replay.py).
        predictor: the prefetcher's predictor (predict/predictors.py) instead of the layout's default; used
            with an expert-cache budget whose prefetch_depth > 0 (or policy "predicted").
        cuda_graphs: capture the one-token decode step in CUDA graphs when possible: the whole step with
            resident experts, L+1 segments with host routing between them with the expert cache. Every graph
            a step may replay is captured here (one with triton attention, one per span bucket with SDPA).
        kernels: routed experts through the Triton kernels (model/moe_gpu.py); None = on CUDA when Triton is
            installed. False keeps the plain torch paths (the CPU path; the kernels' reference).
        glue: the fused Triton kernels for norms, residual adds, q/k norm + rotary + K/V store and softmax-top-k
            routing (Transformer's `glue`); None = on CUDA when Triton is installed, False = the torch ops.
        state_bytes: device bytes a batch scheduler will add for its rows' state (decode/state.py), counted in
            --vram-gb when the expert cache plans its slots.
        revision: branch, tag or commit of a Hugging Face model id.
        experts, dense: storage formats when `path` is a checkpoint (repack --experts/--dense).
        experts_per_token: route each token to this many experts instead of the model's top-k (a speed/quality
            trade, measured by `tiered eval`); the family's rule picks them and renormalises as it always does
            (ModelConfig.with_experts_per_token). None = the model as trained. Budgets, slots and graphs follow it.
        linear_attn: Gated DeltaNet layers' backend for several tokens: "auto" (fla on CUDA when it imports), "fla",
            "torch". delta_step: their one-token step: "auto" (our fused Triton kernels where the Triton kernels
            run), "triton", "fla", "torch" (model/deltanet.py).
        prefill_chunk: tokens per prefill forward; None = `pick_prefill_chunk`'s choice (longer chunks with every
            expert resident on CUDA: a prefill's host work is per chunk).
    Returns:
        an Engine (engine.load_s: seconds to load; engine.capture_s: seconds capturing graphs).
    """
    t0 = time.perf_counter()
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    layout = Layout.open(resolve_layout(path, revision, experts=experts, dense=dense))
    if experts_per_token is not None:
        layout.config = config_with_experts_per_token(layout.config, experts_per_token)
    cfg = layout.config
    hint = cpu_dtype_hint(dev, dt, layout.manifest.expert_format)
    if hint:
        print(f"tiered: {hint}", file=sys.stderr)
    ctx = default_context(cfg, max_context)
    if ctx < 1:
        raise EngineError(f"max_context must be positive, got {ctx}")
    if ctx > cfg.max_position_embeddings:
        raise EngineError(f"--max-context {ctx} is above this model's limit of {cfg.max_position_embeddings} "
                          f"positions (max_position_embeddings): use at most {cfg.max_position_embeddings}")
    dense = layout.dense()
    backend = pick_backend(attn, dev, dt, sinks=any(name.endswith(".sinks") for name in dense))
    chunk = pick_prefill_chunk(prefill_chunk, resident=not uses_cache(budget), device=dev, cfg=cfg,
                               block_size=layout.block_size, dtype=dt, max_context=ctx)
    provider = make_provider(layout, device=dev, budget=budget, dtype=dt, max_context=ctx, state_bytes=state_bytes,
                             prefill_chunk=chunk)
    prefetcher = make_prefetcher(layout, provider, budget or {}, predictor=predictor, chain=observer,
                                 chain_hook=prefetch_hook)
    if prefetcher is not None:
        observer, prefetch_hook = prefetcher, prefetcher.prefetch_hook
    if getattr(provider, "device_table_w", None) is not None:  # --slot-table device|auto chose the device table
        provider.devtable = DeviceSlotTable(provider, w=provider.device_table_w, kernels=slot_table_kernels)
    if getattr(provider, "devtable", None) is not None and (observer is not None or prefetch_hook is not None):
        why = ("the device slot table runs no routing observer or prefetch hook (they read the routing on the host): "
               "drop --prefetch-depth, or use --slot-table host")
        if (budget or {}).get("slot_table") == "device":
            raise EngineError(f"--slot-table device: {why}")
        provider.drop_device_table(why)
    dpf = int((budget or {}).get("device_prefetch") or 0)
    dev_evict = (budget or {}).get("device_evict") or "auto"
    fill_given = (budget or {}).get("device_fill")
    dev_fill = TierConfig.device_fill if fill_given is None else fill_given  # the default: copy
    dev_fill = dev_fill if dev_fill in ("auto", "copy") else int(dev_fill)
    paced = getattr(getattr(provider, "devtable", None), "h2d_gbps", 0) > 0
    if fill_given is None and dev_fill == "copy" and (paced or (budget or {}).get("cpu_split") == "admit"):
        dev_fill = "auto"  # the default where the copy engines cannot go: a paced link (--h2d-gbps), an admitted split
    flags = [f for f, on in (("--device-prefetch", dpf), ("--device-evict nextuse", dev_evict == "nextuse"),
                             (f"--device-fill {dev_fill}", fill_given)) if on]
    if getattr(provider, "devtable", None) is None and fill_given is None:
        dev_fill = 0  # the default applies to the device step only
    if flags and getattr(provider, "devtable", None) is None:
        raise EngineError(f"{flags[0]} needs the device slot table (--slot-table device or auto), which this run "
                          f"does not use: {getattr(provider, 'slot_table_note', None) or 'no expert cache'}")
    if dev_evict == "auto":
        dev_evict = _auto_evict(layout, predictor, getattr(provider, "devtable", None) is not None)
    transitions = None
    if dpf or dev_evict != "policy":
        transitions = _transitions(layout, predictor)
    elif dev_fill and getattr(provider, "devtable", None) is not None:
        try:  # the fill's order: each layer's likeliest experts first; without transitions, by expert id
            transitions = _transitions(layout, predictor)
        except EngineError:
            transitions = None
            print(f"tiered: --device-fill copies experts in expert-id order: {layout.path} has no router history; "
                  f"`tiered trace -m {layout.path} --prompt-file F -o fit.npz` on text like yours, then `tiered tune "
                  f"-m {layout.path} --trace T.npz --fit-trace fit.npz` ranks them by use (1.03x measured on the "
                  "H200 with --device-fill copy, q4 at --vram-gb 4)", file=sys.stderr)
    model = Transformer(cfg, dense, provider, device=dev, dtype=dt, max_context=ctx, attn=backend,
                        linear_attn=linear_attn, delta_step=delta_step,
                        observer=observer, prefetch_hook=prefetch_hook, routing=routing, kernels=kernels,
                        glue=glue, embed=embed_place(provider, budget))
    cpu_experts.prepare(provider, dt, model.layers[cfg.first_moe_layer].moe.act)  # --cpu-experts dtype, rate
    box = None
    if getattr(provider, "devtable", None) is not None and getattr(provider, "split", False):
        box, why = _cpu_mailbox(provider, cfg, dt, model.fp32_route_weights)
        if box is None and getattr(provider, "cpu_default", False):  # the default's CPU path only: keep the table
            provider.drop_cpu_experts(why)
        elif box is None:
            if (budget or {}).get("slot_table") == "device":
                raise EngineError(f"--slot-table device with --cpu-experts {provider.cpu_mode}: {why}")
            provider.drop_device_table(why)
        elif getattr(provider, "cpu_default", False):
            take, why = _default_take(provider, cfg.top_k, box)
            if why is not None:
                provider.drop_cpu_experts(why)
                box = None
                print(f"tiered: {why}", file=sys.stderr)
            else:
                print(f"tiered: --cpu-experts default: auto with the device slot table ({box.threads} CPU threads at "
                      f"{box.gbps or 0:.0f} GB/s beside the link; of m misses a layer the CPU computes "
                      f"{take}[m]; --cpu-experts off copies them all)", file=sys.stderr)
    if getattr(provider, "cpu_default", False) and provider.split and getattr(provider, "devtable", None) is None:
        provider.drop_cpu_experts("--cpu-experts default: off without the device slot table")
    tok = Tokenizer.from_dir(layout.path) if layout.tokenizer_path else None
    engine = Engine(model, tok, layout_path=layout.path, cuda_graphs=cuda_graphs and dev.type == "cuda",
                    prefetcher=prefetcher, device_prefetch=(dpf, transitions) if transitions is not None else None,
                    device_evict=dev_evict, device_fill=dev_fill, cpu_box=box,
                    cpu_split=(budget or {}).get("cpu_split") or "off")
    engine.prefill_chunk = chunk
    engine._sync()
    engine.load_s = time.perf_counter() - t0
    engine.capture_graphs()
    return engine


def cpu_dtype_hint(dev: torch.device, dtype: torch.dtype, expert_format: str) -> str | None:
    """A line for a CPU run in bf16 / fp16 over float (unquantized) experts, else None: those take torch's
    per-op path (transformers' roundings: model/moe.py experts_decode), while fp32 compute reads the same stored
    weights in place with the native kernel. On this project's 2-core VM (Sapphire Rapids), a bf16 layout of the
    10.6B widths cut to 2 layers decoded 17.8 tok/s in bf16 against 74.2 in fp32."""
    if dev.type != "cpu" or dtype not in (torch.bfloat16, torch.float16) or expert_format in ("q8", "q4", "fp8",
                                                                                              "mxfp4"):
        return None
    if cpu_kernel_shared() is None:
        return None
    name = str(dtype).removeprefix("torch.")
    return (f"--dtype {name} on the CPU computes {expert_format} experts with torch (exact {name} roundings, "
            "slow); --dtype float32 reads the same weights in place with the native kernel, several times faster")


def _cpu_kernel_name() -> str:
    """The kernel a CPU device's products take (kernels/cpu_kernel.py `shared`): native-<simd>[-q8act], or torch."""
    kern = cpu_kernel_shared()
    return f"native-{kern.simd_name}" if kern is not None else "torch"


def _cpu_mailbox(provider: Any, cfg: Any, dtype: torch.dtype, fp32_weights: bool) -> tuple[Any, str | None]:
    """The device step's CPU experts: a started mailbox over the pinned RAM tier (model/cpu_mailbox.py) with its
    round trip measured, or (None, why not)."""
    kern = getattr(provider, "cpu_kernel", None)
    if kern is None:
        return None, ("CPU experts in the device step need the native CPU kernel (kernels/cpu_kernel.c), which is "
                      "unavailable here (see the warning above); --slot-table host computes them with torch")
    # the worker's team spins between posts: it leaves one core to the thread that launches the steps (on the
    # H200 box, 16 spinning threads on its 16 cores took bf16 lru+cpu/device from 468 to 355 tok/s)
    threads = max(1, min(provider.cpu_threads, (os.cpu_count() or 2) - 1))
    try:
        box = CpuMailbox(kern, provider.ram_views(), K=cfg.top_k, D=cfg.hidden_size, dtype=dtype,
                         threads=threads, fp32_weights=fp32_weights,
                         pin=provider.device.type == "cuda", block_bytes=provider.block_size,
                         cpus=worker_cpus(threads) if cpu_pin_enabled() else None)
    except (KernelUnavailable, ValueError) as e:
        return None, f"CPU experts in the device step: {e}; --slot-table host computes them with torch"
    box.start()
    table = provider.ram.table
    n = provider.num_layers * provider.num_experts  # experts across the tier, as a step's misses fall
    rows = [table.lookup(k) for k in sorted({i * n // 16 for i in range(16)})]
    probed = False
    if provider.device.type == "cuda":  # the round trip and the rate the step's kernels see
        try:
            box.probe_device(rows, provider.device)
            probed = True
        except Exception as e:  # noqa: BLE001 - a refusal of this driver or Triton: the host-side probe instead
            print(f"tiered: the CPU experts' device-side probe failed ({type(e).__name__}: {e}); the split uses "
                  "the host-side round trip", file=sys.stderr)
    if not probed:
        box.probe(rows)
    provider.cpu_box = box
    return box, None


# Probe windows the default --cpu-experts times at most before it drops the CPU path (the pauses between them double
# from _default_take's pause_s).
PROBE_WINDOWS = 3


def _default_take(provider: Any, K: int, box: Any, *, pause_s: float = 0.25,
                  windows: int = PROBE_WINDOWS) -> tuple[list[int], str | None]:
    """The default --cpu-experts' split (devstep.cpu_split) and why the engine drops it (None: kept). While a
    device-side probe window would drop it, another is timed after a pause (pause_s, then doubling), up to `windows`
    in all, and the fastest window is kept: a probe can read a CPU slower than it is (beside a process's exit or a
    fresh layout's write-back, or a busy host), never faster. Session 23 (call E) read 26 GB/s right after a repack
    and another process, where the worker reads 44-60; the CPU path went off and bf16 decoded at 408 tok/s against
    525 with it (call D). Session 57 (H100, one of ten processes) read 26 GB/s in two windows 0.25 s apart, where the
    worker achieved 34-99 GB/s (median about 72) in the other unpinned processes: the path went off and that
    document decoded at 555 tok/s against 668-689; a third window, 0.5 s later, is timed since."""
    take = cpu_split(provider, K, box)
    why = _default_cpu_refusal(provider, take, box)
    best = (box.overhead_s, box.gbps)
    for w in range(1, max(1, int(windows))):
        if why is None or not getattr(box, "probe_rows", None):
            break
        time.sleep(pause_s * (1 << (w - 1)))
        try:
            box.probe_device(box.probe_rows, provider.device)
        except Exception as e:  # noqa: BLE001 - the fastest window so far stands
            print(f"tiered: the CPU experts' probe window {w + 1} failed ({type(e).__name__}: {e})", file=sys.stderr)
            break
        if (box.gbps or 0.0) > (best[1] or 0.0):
            best = (box.overhead_s, box.gbps)
        box.overhead_s, box.gbps = best
        take = cpu_split(provider, K, box)
        why = _default_cpu_refusal(provider, take, box)
    box.overhead_s, box.gbps = best
    return take, why


def _default_cpu_refusal(provider: Any, take: list[int], box: Any) -> str | None:
    """Why the default --cpu-experts (auto with the device slot table) is not worth its per-layer handshake here, or
    None: the cost model's table `take` (devstep.cpu_split, from the probe's rates; take[m] of m misses to the CPU)
    gives the CPU none of a layer's two misses, so the CPU would take a miss only when several miss at once, which
    is rare where a lone miss is not worth it. Measured on the H200 box at --vram-gb 4
    (offload-default-2026-12-02-h200-s14.json): q4, take[2] = 0, 0.956-0.985x without CPU experts; bf16,
    take[2] = 1, 1.29x."""
    m = min(2, len(take) - 1)
    if take[m] > 0:
        return None
    return (f"--cpu-experts default: off here, since the load-time probe gives the CPU none of a layer's {m} misses "
            f"(CPU {box.gbps or 0:.0f} GB/s x {CPU_CONTENTION} against the link's "
            f"{provider.cost_model.pcie_gbps if provider.cost_model else 0:.0f}; take {take}); pass --cpu-experts auto "
            "to keep it")


def _auto_evict(layout: Any, predictor: Predictor | None, device_table: bool) -> str:
    """--device-evict auto: nextuse where the device slot table runs and router-history transitions exist (the
    given predictor's or the layout's), else policy. Measured on an H100 (session 56, bf16 at --vram-gb 4, replayed
    routing, five eval documents): nextuse with CPU experts 733.7 tok/s against lru's default 706.0."""
    if not device_table:
        return "policy"
    try:
        _transitions(layout, predictor)
    except EngineError:
        return "policy"
    print("tiered: --device-evict auto: nextuse (each expert's predicted next use, from the router history; "
          "--device-evict policy evicts by --policy)", file=sys.stderr)
    return "nextuse"


def _transitions(layout: Any, predictor: Predictor | None) -> tuple[Tensor, Tensor]:
    """Router-history transitions (layer_trans, time_trans) for the device step's prefetch: the given predictor's
    fitted parameters, else the layout's (`tiered tune --fit-trace`)."""
    p = getattr(predictor, "p", None)
    if p is not None and getattr(p, "layer_trans", None) is not None and p.layer_trans.numel():
        return p.layer_trans, p.time_trans
    path = Path(layout.path) / PARAMS_FILE
    if not path.is_file():
        raise EngineError(f"--device-prefetch ranks experts by router-history transitions, and {layout.path} has none: "
                          f"run `tiered tune -m {layout.path} --trace T.npz --fit-trace FIT.npz` first (traces from "
                          f"`tiered trace`; it writes {PARAMS_FILE})")
    params = PredictorParams.load(path)
    return params.layer_trans, params.time_trans


def make_prefetcher(layout: Any, provider: ExpertProvider, budget: dict[str, Any], *,
                    predictor: Predictor | None = None, chain: Any = None,
                    chain_hook: Any = None) -> Prefetcher | None:
    """The Prefetcher for --prefetch-depth (predict/prefetch.py picks the predictor) and, with --policy
    predicted, the feeder of the cache's ScoredEviction; None when neither is asked for or every expert is
    resident."""
    depth = int(budget.get("prefetch_depth") or 0)
    eviction = provider.eviction_scores if isinstance(provider, ExpertCache) else None
    if isinstance(provider, ResidentExperts) or (depth <= 0 and eviction is None):
        return None
    pf = prefetcher_for_layout(layout, provider, depth=depth, budget=budget.get("prefetch_budget"),
                               eviction=eviction, predictor=predictor, chain=chain, chain_hook=chain_hook)
    if depth:
        print(f"tiered: prefetch with the {pf.predictor.name} predictor, depth {depth}, {pf.budget} candidates "
              "per layer", file=sys.stderr)
    return pf


class Engine:
    """A loaded model: `generate` for text, `logits` for teacher-forced scoring."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer | None, *, layout_path: Path | None = None,
                 cuda_graphs: bool = False, prefetcher: Prefetcher | None = None,
                 device_prefetch: tuple[int, tuple[Tensor, Tensor]] | None = None,
                 device_evict: str = "policy", device_fill: int | str = 0, cpu_box: Any = None,
                 cpu_split: str = "off") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config: ModelConfig = model.config
        self.layout_path = layout_path
        self.device = model.device
        self.dtype = model.dtype
        self.prefetcher = prefetcher  # the model's observer and prefetch hook, when load() built one
        cuda_graphs = cuda_graphs and self.device.type == "cuda"
        resident = isinstance(model.provider, ResidentExperts)
        # Resident experts, no observer, no routing override: the whole step in one graph per span.
        self.graphed = (GraphedDecode(model) if cuda_graphs and resident and model.observer is None
                        and model.routing is None else None)
        # With the whole step graphed, a prompt's first chunk too (a bucket's second use captures it).
        self.prefill_graphs = (GraphedPrefill(model, max_tokens=model.max_context)
                               if self.graphed is not None and model.prefill_graphable else None)
        # A provider whose get() needs the routing on the host: L+1 graphs per span, host routing between.
        self.pieces: PiecewiseDecode | None = None
        # The expert cache with its slot table on the device: the whole step in one graph per span.
        self.devstep: DeviceStep | None = None
        if cuda_graphs and not resident and getattr(model.provider, "devtable", None) is not None:
            n, tr = device_prefetch or (0, None)
            self.devstep = DeviceStep(model, prefetch=n, transitions=tr, evict=device_evict, fill=device_fill,
                                      cpu=cpu_box, cpu_rows=None if cpu_split != "off" else False,
                                      cpu_admit=cpu_split == "admit")
        elif cuda_graphs and not resident:
            try:
                self.pieces = PiecewiseDecode(model, graphs=True)
            except RuntimeError as e:  # e.g. the page-locked host buffer was refused
                print(f"tiered: piecewise CUDA graphs unavailable ({e}); decoding eagerly", file=sys.stderr)
        self.decode_mode = "eager"  # what the last generate's one-token steps ran: full, piecewise or eager
        # Greedy decoding with the host one step ahead (decode/ahead.py): None = with the whole-step graphs,
        # True = also the eager step (CPU tests of the loop), False = never (the per-token loop).
        self.step_ahead: bool | None = None
        self._readback: Readback | None = None
        self.stats: dict[str, Any] = {}
        self.load_s: float | None = None  # set by load(): seconds from the call to a ready model (no capture)
        self.capture_s = 0.0  # seconds spent capturing CUDA graphs (at load, or before a generate's clock)
        self._sampled_refused = False  # the sampled whole-step graphs failed to capture once (_capture_sampled)
        self.prefill_chunk = PREFILL_CHUNK  # tokens per prefill forward (store/options.py)

    def capture_graphs(self) -> float:
        """Capture every CUDA graph the one-token steps may replay, now: all span buckets with SDPA, a
        single graph when the attention reads the length from the device (triton, flash). load() calls it
        and generate() calls it before its clock starts, so no capture lands in ttft_s or decode_s. A refused
        capture falls back as in a step (whole-step graphs -> eager; piecewise -> host copies, then eager).
        Returns the seconds spent (also added to self.capture_s)."""
        t0 = time.perf_counter()
        before = self._graph_stats()[0], self.graphed, self.pieces
        if self.devstep is not None:
            try:
                self.devstep.capture_all()
            except Exception as e:  # noqa: BLE001 - a refusal of this torch/driver/Triton: the host step instead
                print(f"tiered: the device slot table's step could not be captured ({type(e).__name__}: {e}); "
                      "resolving slots on the host instead", file=sys.stderr)
                self._sync()
                self.model.provider.drop_device_table()
                self.devstep = None
                self.pieces = PiecewiseDecode(self.model, graphs=True)
                self.pieces.capture_all()
        if self.graphed is not None:
            try:
                self.graphed.capture_all()
            except RuntimeError as e:
                print(f"tiered: CUDA graph capture failed ({e}); decoding without graphs", file=sys.stderr)
                self.graphed = None
                self._sync()
        if self.pieces is not None:
            try:
                self.pieces.capture_all()
            except GraphCaptureError as e:
                print(f"tiered: {e}; decoding without graphs", file=sys.stderr)
                self.pieces = None
                self._sync()
        # only a capture (or a fallback) counts: once everything is captured this is a few dict lookups
        changed = before != (self._graph_stats()[0], self.graphed, self.pieces)
        spent = time.perf_counter() - t0 if changed else 0.0
        self.capture_s += spent
        return spent

    def _graph_stats(self) -> tuple[float, int]:
        """(seconds capturing, bytes the graphs hold) of the decode paths in use."""
        cap, mem = 0.0, 0
        if self.graphed is not None:
            cap, mem = self.graphed.capture_s, self.graphed.graph_mem_bytes
        if self.pieces is not None:
            cap, mem = cap + self.pieces.capture_s, mem + self.pieces.graph_mem_bytes
        if self.devstep is not None:
            cap, mem = cap + self.devstep.capture_s, mem + self.devstep.graph_mem_bytes
        return cap, mem

    def use_piecewise(self, pieces: PiecewiseDecode | None = None, **options: Any) -> PiecewiseDecode | None:
        """Decode one-token steps with `pieces`, or a PiecewiseDecode(self.model, **options) built here (e.g.
        graphs=False on CPU, static_positions=True, copies="host"); `use_piecewise(None)` with no options
        decodes without it (whole-step graphs or eager). Returns what is now used."""
        if pieces is None and options:
            pieces = PiecewiseDecode(self.model, **options)
        self.pieces = pieces
        return pieces

    @contextlib.contextmanager
    def graphs_off(self) -> Iterator[None]:
        """Decode eagerly for the duration (benchmarks: what the graphs buy); the captured graphs are kept."""
        saved = self.graphed, self.pieces, self.devstep
        self.graphed = self.pieces = self.devstep = None
        try:
            yield
        finally:
            self.graphed, self.pieces, self.devstep = saved

    @property
    def max_context(self) -> int:
        return self.model.max_context

    # --- prompts ---
    def encode(self, text: str, *, chat: bool = False) -> list[int]:
        """Token ids of a prompt; with chat=True the text is one user message under the chat template."""
        if self.tokenizer is None:
            raise EngineError(f"{self.layout_path} has no tokenizer.json, so text cannot be encoded: copy the "
                              f"model's tokenizer.json (and tokenizer_config.json) into {self.layout_path}")
        if chat:
            rendered = self.tokenizer.apply_chat_template([{"role": "user", "content": text}])
            return self.tokenizer.encode(rendered, add_special_tokens=False)
        return self.tokenizer.encode(text)

    def _ids(self, prompt: str | Sequence[int] | Tensor) -> Tensor:
        ids = torch.as_tensor(self.encode(prompt) if isinstance(prompt, str) else prompt, dtype=torch.int64)
        if ids.dim() != 1 or ids.numel() == 0:
            raise EngineError("the prompt is empty: give at least one token")
        if ids.numel() > self.max_context:
            raise EngineError(f"the prompt has {ids.numel()} tokens but max_context is {self.max_context}: "
                              "raise --max-context or shorten the prompt")
        if int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size:
            raise EngineError(f"token ids must be in 0..{self.config.vocab_size - 1}")
        return ids.to(self.device)

    # --- forward passes ---
    @torch.inference_mode()
    def logits(self, token_ids: str | Sequence[int] | Tensor) -> Tensor:
        """Teacher-forced logits [T, V] (float32, on the engine's device) of a whole sequence from position 0."""
        ids = self._ids(token_ids)
        n = self.prefill_chunk
        outs = [self.model.forward(ids[a:a + n], a, all_logits=True).float() for a in range(0, ids.numel(), n)]
        return torch.cat(outs)

    def _prefill(self, ids: Tensor) -> Tensor:
        out = None
        n = self.prefill_chunk
        if self.prefill_graphs is not None and ids.numel() <= n:  # one chunk: from its bucket's graph if captured
            out = self.prefill_graphs.run(ids)
            if out is not None:
                return out
        for a in range(0, ids.numel(), n):
            out = self.model.forward(ids[a:a + n], a)
        return out  # [1, V]

    def _whole_step_graphs(self) -> bool:
        return self.graphed is not None

    def _planned_mode(self) -> str:
        if self._whole_step_graphs():
            return "full"
        if self.devstep is not None:
            return "device"
        return "piecewise" if self.pieces is not None else "eager"

    def _capture_sampled(self, params: Sampling) -> float:
        """Capture the whole-step graphs' sampled variants (decode/graphed.py) the first time a generation samples
        with parameters they serve, before its clock; returns the seconds spent (added to self.capture_s)."""
        g = self.graphed
        if g is None or not g.graphed or not g.can_sample(params) or self._sampled_refused:
            return 0.0
        k = g.variant(params)
        if g.ready(sampled=k):
            return 0.0
        t0 = time.perf_counter()
        try:
            g.capture_all(sampled=k)
        except RuntimeError as e:  # a refusal of this torch/driver/Triton: sampled decoding keeps its per-token loop
            print(f"tiered: the sampled step's CUDA graphs could not be captured ({e}); sampling per token",
                  file=sys.stderr)
            g.sgraphs.clear()
            g.sampled = None
            self._sampled_refused = True  # not tried again: every later sampled generation loops per token
            self._sync()
        spent = time.perf_counter() - t0
        self.capture_s += spent
        return spent

    def _ahead_step(self, params: Sampling) -> GreedyStep | None:
        """The step decoding runs one step ahead of (decode/ahead.py), or None for the per-token loop: the
        whole-step graphs (or the device slot table's step) when every span is captured; the eager step only
        when step_ahead is True. Sampling runs ahead on the whole-step graphs' sampled variants only (one set per
        top-k, captured by _capture_sampled)."""
        if self.step_ahead is False:
            return None
        if params.temperature != 0:
            g = self.graphed
            return g if g is not None and g.can_sample(params) and g.ready(sampled=g.variant(params)) else None
        if self.graphed is not None and self.graphed.ready():
            return self.graphed
        if self.devstep is not None and (self.step_ahead or (self.devstep.graphed and self.devstep.ready())):
            return self.devstep  # the offloaded step in one graph (decode/devstep.py)
        if self.step_ahead and self._planned_mode() == "eager":
            return EagerGreedy(self.model)
        return None

    def _step(self, token: Tensor, tok: int, pos: int) -> Tensor:
        """token [1] int64 (any device) = tok, at position pos -> logits [1, V]."""
        if self._whole_step_graphs():
            try:
                self.decode_mode = "full"
                return self.graphed.step(token.to(self.device), pos)
            except RuntimeError as e:  # a capture this torch/driver refuses: decode eagerly instead
                print(f"tiered: CUDA graph capture failed ({e}); decoding without graphs", file=sys.stderr)
                self.graphed = None
                torch.cuda.synchronize(self.device)
        if self.devstep is not None:
            self.decode_mode = "device"
            return self.devstep.step(tok, pos)
        if self.pieces is not None:
            try:
                self.decode_mode = "piecewise"
                return self.pieces.step(tok, pos)
            except GraphCaptureError as e:  # raised before this step ran anything: decode it eagerly
                print(f"tiered: {e}; decoding without graphs", file=sys.stderr)
                self.pieces = None
                self._sync()
        self.decode_mode = "eager"
        return self.model.forward(token.to(self.device).view(1), pos)

    # --- generation ---
    @torch.inference_mode()
    def generate(self, prompt: str | Sequence[int] | Tensor, *, max_new_tokens: int = 128,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 stop_at_eos: bool = True, on_text: Callable[[str], None] | None = None,
                 on_token: Callable[[int], None] | None = None, stop: Sequence[str] = ()) -> Generation:
        """Generate a continuation of `prompt` (text or token ids).

        Greedy decoding (temperature 0) with the whole-step graphs runs the host one step ahead of the device
        (decode/ahead.py; stats["step_ahead"]): the callbacks come one device step after their token was computed,
        and EOS or a stop string costs one step computed and discarded (stats["ahead_extra_steps"]). Sampling,
        the piecewise and device-table steps and eager decoding read each token back before the next step.

        Args:
            max_new_tokens: stop after this many tokens (fewer if EOS comes first or the context fills).
            temperature: 0 = greedy; otherwise sample from softmax(logits / temperature).
            top_k / top_p: filters applied before sampling (0 / 1.0 = off).
            seed: seeds the sampler, so that a run can be repeated.
            on_text: called with each new piece of decoded text (EOS text is never emitted).
            on_token: called with each new token id.
            stop: strings that end generation; the text ends before the first one (its token is kept in token_ids,
                stop_reason "stop"). Needs a tokenizer.
        Returns:
            Generation(text, token_ids, stop_reason, stats); stats are also kept in `self.stats`.
        """
        if max_new_tokens < 0:
            raise EngineError("max_new_tokens must be >= 0")
        params = Sampling(temperature, top_k, top_p, seed)
        try:
            check_sampling(params)
        except SamplingError as e:
            raise EngineError(str(e)) from None
        capture_now = self.capture_graphs() if max_new_tokens > 1 else 0.0  # no-op once captured
        if max_new_tokens > 1 and self.step_ahead is not False:
            capture_now += self._capture_sampled(params)
        t_call = time.perf_counter()
        noise = row_noise(seed)  # the draws' keys: sampling runs on the logits' device
        ids = self._ids(prompt)
        stops = (stop,) if isinstance(stop, str) else tuple(stop)
        if any(not isinstance(x, str) or not x for x in stops):
            raise EngineError("stop strings must be non-empty strings")
        if stops and self.tokenizer is None:
            raise EngineError(f"stop strings need the model's tokenizer: copy tokenizer.json into {self.layout_path}")
        eos = set(self.config.eos_token_ids) if stop_at_eos else set()
        sink = TokenSink(eos=eos, tokenizer=self.tokenizer, stop=stops, on_text=on_text, on_token=on_token)
        ahead = self._ahead_step(params) if max_new_tokens > 1 else None
        reason, extra = "length", 0
        self._sync()
        self.decode_mode = self._planned_mode()
        if self.pieces is not None:
            self.pieces.reset_stats()
        if self.devstep is not None:
            self.devstep.reset_stats()
        cap0 = self._graph_stats()[0]  # the piecewise count restarts at reset_stats
        t0 = time.perf_counter()
        self._phase("prefill")
        logits = self._prefill(ids) if max_new_tokens else None
        self._sync()  # the prefill's kernels finished: a replayed or eager prefill returns before its GPU work does
        self._phase("decode")
        pos = ids.numel()
        t1 = t_first = t2 = time.perf_counter()
        if ahead is not None:
            if self._readback is None:
                self._readback = Readback(self.device)
            first = None
            if params.temperature != 0:  # draw 0 here, the graphs draw the rest with the stream's next keys
                first = sample(logits[0], params, noise)
                ahead.set_sampling(params, noise, min(max_new_tokens - 1, self.max_context))
            try:
                run = run_ahead(ahead, logits, pos, max_new=max_new_tokens, max_context=self.max_context,
                                sink=sink, ring=self._readback, first=first)
            finally:
                if first is not None:
                    ahead.set_sampling(None)
            reason, t_first, t2, extra = run.stop, run.t_first, run.t_last, run.launched - run.used
            self._sync()  # the step computed past EOS or a stop string, if any: after the clock (its token is dropped)
        elif max_new_tokens:
            i = 0
            while True:
                tok_t = sample(logits[0], params, noise)  # [1] int64 on the logits' device
                tok = int(tok_t)
                if i == 0:
                    t_first = time.perf_counter()
                reason = sink(tok) or ("length" if i + 1 == max_new_tokens else
                                       "context" if pos >= self.max_context else None)
                if reason is not None:
                    break
                logits = self._step(tok_t, tok, pos)
                pos += 1
                i += 1
            self._sync()
            t2 = time.perf_counter()
        out = sink.ids
        # A capture inside the loop (only after a fallback, or a span capture_graphs did not know of) is
        # reported as capture_s, never as decode time.
        cap_in_loop = max(0.0, self._graph_stats()[0] - cap0)
        self.capture_s += cap_in_loop
        stop = sink.finish(reason)
        # no prefill ran for max_new_tokens=0: its time and rate are unknown (None), not a near-zero interval
        self.stats = self._stats(ids.numel(), len(out), t1 - t0 if max_new_tokens else None,
                                 t2 - t_first - cap_in_loop, max(0, len(out) - 1))
        self.stats["stop_reason"] = stop
        self.stats["step_ahead"] = ahead is not None
        self.stats["ahead_extra_steps"] = extra
        self.stats["ttft_s"] = t_first - t_call if out or stop == "eos" else None
        self.stats["load_s"] = self.load_s
        self.stats["capture_s"] = self.capture_s
        self.stats["capture_in_call_s"] = capture_now + cap_in_loop
        self.stats["graph_mem_bytes"] = self._graph_stats()[1]
        return Generation(text=sink.text, token_ids=out, stop_reason=stop, stats=dict(self.stats))

    def _phase(self, phase: str) -> None:
        """Tell a provider that counts per phase (the expert cache) whether prefill or decode runs."""
        if isinstance(self.model.provider, ExpertCache):
            self.model.provider.set_phase(phase)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _stats(self, n_prompt: int, n_gen: int, prefill_s: float | None, decode_s: float, decode_steps: int) -> dict:
        """Stats (docs/stats.md). decode_tok_s counts the one-token steps (n_gen - 1: the first token comes from prefill)."""
        s: dict[str, Any] = {
            "tokens_prompt": n_prompt, "tokens_generated": n_gen,
            "prefill_s": prefill_s, "decode_s": decode_s, "decode_steps": decode_steps,
            "prefill_tok_s": n_prompt / prefill_s if prefill_s else None,
            "decode_tok_s": decode_steps / decode_s if decode_s > 0 and decode_steps else None,
            "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
            "attention": self.model.attn, "linear_attention": self.model.linear_attn,
            "delta_step": self.model.delta_step,
            "cuda_graphs": self.decode_mode != "eager",
            "prefill_graphs": self.prefill_graphs.stats() if self.prefill_graphs is not None else None,
            "decode_graphs": self.decode_mode, "expert_kernels": "triton" if self.model.kernels else "torch",
            "glue_kernels": "triton" if self.model.glue else "torch",
            "max_context": self.max_context, "family": self.config.family,
            "experts_per_token": self.config.top_k,
            "native_top_k": int(self.config.extra.get("native_top_k", self.config.top_k)),
            "model": str(self.layout_path) if self.layout_path else None,
            "cpu_kernel": _cpu_kernel_name() if self.device.type == "cpu" else None,
            "embed": "host" if self.model.embed.device.type != self.device.type else "device",
        }
        ps = self.model.provider.stats()
        s.update(ps)
        s.setdefault("cpu_experts", {"mode": "off", "count": 0, "bytes": 0, "gbps": 0.0})  # resident experts
        s.setdefault("h2d_gbps_target", None)
        s["host_s_per_layer"] = None
        if self.decode_mode == "piecewise" and self.pieces is not None:
            s["piecewise"] = self.pieces.stats()  # host time between segments: wait_s (GPU busy), route_s
            s["host_s_per_layer"] = self.pieces.host_s_per_layer
        if self.decode_mode == "device" and self.devstep is not None:
            s["device_step"] = self.devstep.stats()
            s["host_s_per_layer"] = self.devstep.host_s_per_layer
        if s.get("stall_s") is not None and decode_s > 0:  # the provider's stall time is over decode
            s["stall_share"] = s["stall_s"] / decode_s
        return s

