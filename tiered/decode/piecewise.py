"""The piecewise decode step: the one-token step cut at every router, the routing read on the host
between segments, and the segments replayed from CUDA graphs (one chain of L+1 graphs per span).

Owns: `PiecewiseDecode` (static host and device buffers allocated once; the chain of captured
segments per attended span; the host work between segments: read the top-k, call the routing
observer, `provider.get_slots`, the prefetch hook, hand the slot rows to the next segment),
`capture_all` (every span's chain before the first timed step) and `GraphCaptureError`.
Does not own: the math (model/transformer.py `segment_first/mid/last`), where experts live or how
they are loaded (the provider), sampling and the generation loop (engine.py).

One step of a model with L layers:
    seg 0        embedding, layer 0 attention + post-attention norm + router      -> top-k of layer 0
    seg l        layer l-1 experts (+ shared, residual), layer l up to its router  -> top-k of layer l
    seg L        layer L-1 experts (+ shared, residual), final norm, lm_head       -> logits [1, V]
    between seg l and seg l+1 the host: waits for layer l's top-k, observer.on_route(l, ...),
    slots = provider.get_slots(l, ids) (issues copies on the provider's side stream and makes the
    compute stream wait for exactly those slots), model.prefetch_hook(l, ids), then writes the slot
    rows into the static slot buffer that seg l+1 reads. A `deferrable` observer (a prefetcher or eviction
    feeder that reads no hidden state) is called after seg l+1 is enqueued instead, from host rows, and the
    prefetch hook right after it, so that their host work and the prefetch copies overlap seg l+1's compute
    (the copies wait only for compute enqueued before get(l): vram.note_handoff).
Every segment's shapes depend only on the span, so each span bucket is captured once and replayed for
every position in it (positions are device tensors, as in `Transformer.static_plan`).

Host <-> device copies (CUDA). The host side is one page-locked block registered with cudaHostRegister
(outside torch's caching host allocator): step [2] (token, position), ids [L, K], slots [K]; a second
one holds each layer's routing weights [L, K] and router logits [L, E] for deferred observers.
  "graph" copies: the copies are captured inside the segments (H2D of the step at the start of seg 0,
      H2D of the slot rows at the start of seg l >= 1, D2H of the top-k at the end of seg l < L), so
      between segments the host waits for the compute stream and writes K ints. Checked once after
      the first capture (a probe); if the bytes do not move, or capture fails, "host" copies are used.
      The weights and logits rows are copied with the ids (the host copies them only for deferred observers).
  "host" copies: the same copies are issued by the host between replays (two more launches per layer).
Ordering: all of it runs on the current (compute) stream; the host overwrites a host buffer only after
waiting for the stream past the copy that last read it.
On CPU (graphs=False) the same segments run eagerly with the same host routing; tests compare them
bit for bit with the unsplit step.

CPU experts (a provider with `split`, --cpu-experts auto|all): get_slots(l, ids, cpu=jobs) names the experts
of layer l to compute on the CPU (their slot row is a zero expert). The host copies x [1, D] of layer l to the
host, hands the jobs to the provider's worker thread (model/cpu_experts.py), issues the copies and the slot
rows, waits for the worker, and copies the partial sum [1, D] into layer l's static device buffer, which
seg l+1 adds after the device's experts (graphs: always added; zeroed when the layer had no CPU expert). The
GPU does not run while the CPU computes (seg l+1 needs the sum before layer l+1's attention); the copies of the
other misses do.

Legend: L layers, K top-k, D hidden, V vocab, S provider slots.
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from tiered.decode.capture import pool_bytes
from tiered.model.layers import StepPlan, plan_eager
from tiered.model import cpu_experts
from tiered.model.moe import routed_logits
from tiered.model.transformer import Routed, Transformer, span_for  # noqa: F401  (span_for: re-exported)
from tiered.layout.format import align_up
from tiered.store.hostmem import aligned_empty
from tiered.store.io import ExpertReadError
from tiered.store.provider import HostSlotProvider

COPY_MODES = ("graph", "host")


class GraphCaptureError(RuntimeError):
    """Capturing the decode segments failed; the engine decodes eagerly instead (the message says why)."""


def host_slots_api(provider: Any) -> Callable[..., list[int]] | None:
    """provider.get_slots when the provider declares it (store.provider.HostSlotProvider); else None (use get())."""
    return provider.get_slots if isinstance(provider, HostSlotProvider) else None


@dataclass
class _Chain:
    """The L+1 captured segments of one span and the tensors they hand each other (kept alive here:
    the graphs read and write exactly these addresses)."""
    span: int
    graphs: list[Any]  # [L+1] torch.cuda.CUDAGraph
    plan: StepPlan  # written by seg 0 (rotary rows, mask), read by every layer's attention
    routed: list[Routed]  # [L] seg l's output: layer l's routing
    logits: Tensor  # [1, V] seg L's output
    replayed: bool = False  # a step has replayed it (captured ahead by capture_all, it may not have been yet)


class PiecewiseDecode:
    """The one-token decode step in L+1 segments with host routing between them.

    Args:
        model: the Transformer (its provider answers get_slots / get between segments).
        graphs: capture the segments in CUDA graphs (CUDA only); False = run them eagerly.
        static_positions: build positions on the device with a fixed span (what graphs need);
            default = graphs. False = the eager plan (Python positions), bit-exact with model.forward.
        copies: "graph" or "host" (module docstring); "graph" is checked and may fall back to "host".
    """

    def __init__(self, model: Transformer, *, graphs: bool = True, static_positions: bool | None = None,
                 copies: str = "graph") -> None:
        if copies not in COPY_MODES:
            raise ValueError(f"copies must be one of {COPY_MODES}, got {copies!r}")
        self.model = model
        cfg = model.config
        self.L, self.K = cfg.num_layers, cfg.top_k
        self.device = model.device
        self.cuda = self.device.type == "cuda"
        self.graphs = bool(graphs) and self.cuda
        self.static_positions = self.graphs if static_positions is None else bool(static_positions)
        if self.graphs and not self.static_positions:
            raise ValueError("CUDA graphs need static positions (static_positions=True)")
        self.copies = copies
        L, K = self.L, self.K
        n = 2 + L * K + K  # int64 entries: step (token, pos), ids [L, K], slots [K]
        self._owner: Any = None
        if self.cuda:
            raw, self._owner = aligned_empty(align_up(n * 8), pin=True)
            host = raw[:n * 8].view(torch.int64)  # unpinned by its owner at collection (io._unpin)
        else:
            host = torch.empty(n, dtype=torch.int64)
        host.zero_()
        self.step_host = host[0:2]  # [2] token, position
        self.ids_host = host[2:2 + L * K].view(L, K)  # [L, K] each layer's top-k, read by the host
        self._ids_rows = list(self.ids_host.unbind(0))  # per-layer views made once
        self.slot_host = host[2 + L * K:]  # [K] slot rows the next expert segment uses
        arr = host.numpy()
        self._step_np, self._ids_np, self._slot_np = arr[0:2], arr[2:2 + L * K].reshape(L, K), arr[2 + L * K:]
        # Layer l's routing weights and router logits on the host, for observers called after seg l+1 is
        # enqueued (`deferrable`): copied like the ids (inside the graphs, or by the host before it waits).
        E = cfg.num_experts
        nw, nl = L * K * 4, L * E * torch.finfo(model.dtype).bits // 8
        if self.cuda:
            raw2, self._owner2 = aligned_empty(align_up(nw + nl), pin=True)
        else:
            raw2, self._owner2 = torch.empty(nw + nl, dtype=torch.uint8), None
        self._w_rows = list(raw2[:nw].view(torch.float32).view(L, K).unbind(0))  # [K] fp32 per layer
        self._lg_rows = list(raw2[nw:nw + nl].view(model.dtype).view(L, E).unbind(0))  # [E] compute dtype
        if self.cuda:
            self.step_dev = torch.zeros(2, dtype=torch.int64, device=self.device)
            self.slot_dev = torch.zeros(K, dtype=torch.int64, device=self.device)
        else:
            self.step_dev, self.slot_dev = self.step_host, self.slot_host
        self._stream: Any = None  # the compute stream of the current step (the host waits on it for the top-k)
        self._get_slots = host_slots_api(model.provider)  # None: the provider is served through get()
        # CPU experts: layer l's partial sum, on the host [L, D] and (CUDA) in static device rows seg l+1 adds
        self.split = self._get_slots is not None and bool(getattr(model.provider, "host_split", False))
        D = cfg.hidden_size
        self._partial_next: Tensor | None = None  # CPU, eager segments: the sum seg l+1 adds (None: nothing)
        self._x_host = self._partial_host = self._partial_dev = None
        self._dirty = [False] * L
        self._x_ready = -1  # the layer whose x the routing copy already brought to _x_host (CUDA)
        # the layer being routed, for get_slots' cpu_start (_cpu_go): its index, routing and replayed weights
        self._cpu_l, self._cpu_r, self._cpu_w, self._cpu_fut = -1, None, None, None
        if self.split:
            pin = self.cuda
            self._x_host = torch.empty(1, D, dtype=model.dtype, pin_memory=pin)
            self._partial_host = torch.empty(L, D, dtype=model.dtype, pin_memory=pin)
            if self.cuda:
                self._partial_dev = torch.zeros(L, D, dtype=model.dtype, device=self.device)
        self.chains: dict[int, _Chain] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.graphs else None
        self.probed = False
        # Host-side time per phase, over all steps (reset with reset_stats): where a step's time goes.
        self.steps = 0
        self.wait_s = 0.0  # host blocked until a segment's top-k reached it (GPU computing)
        self.route_s = 0.0  # host work between segments: observer, get_slots (incl. its loads), hook
        self.late_s = 0.0  # deferred observers, run while the next segment computes
        self.launch_s = 0.0  # host time launching the segments' graphs (CUDA replays)
        self.cpu_wait_s = 0.0  # host blocked on the CPU-expert worker (in route_s)
        self._late: tuple | None = None
        self.capture_s = 0.0  # seconds capturing since reset_stats (the engine also keeps its own total)
        self.graph_mem_bytes = 0  # growth of the chains' graph pool over all captures (capture.pool_bytes)

    # --- copies that are captured inside the segments in "graph" mode ---
    @property
    def _inside(self) -> bool:
        return self.cuda and self.copies == "graph"

    def _seg_first(self, span: int, pos: int) -> tuple[StepPlan, Routed]:
        m = self.model
        if self._inside:
            self.step_dev.copy_(self.step_host, non_blocking=True)
        if self.static_positions:
            plan = m.static_plan(self.step_dev[1:2], span)
        else:
            plan = plan_eager(m.rope, pos, 1, groups=m.groups, window=m.config.sliding_window,
                              paged=m.attn == "triton")
        r = m.segment_first(self.step_dev[0:1], plan)
        if self._inside:
            self._copy_routing(0, r)
        return plan, r

    def _partial(self, l: int) -> Tensor | None:
        """What seg l+1 adds for layer l's CPU experts: the static device row (CUDA), this step's sum (CPU)."""
        if self._partial_dev is not None:
            return self._partial_dev[l:l + 1]
        p, self._partial_next = self._partial_next, None
        return p

    def _seg_mid(self, l: int, prev: Routed, plan: StepPlan) -> Routed:
        if self._inside:
            self.slot_dev.copy_(self.slot_host, non_blocking=True)
        r = self.model.segment_mid(l, prev, self.slot_dev, plan, self._partial(l - 1))
        if self._inside:
            self._copy_routing(l, r)
        return r

    def _copy_routing(self, l: int, r: Routed, *, ids_only: bool = False) -> None:
        """D2H of layer l's top-k (what the host routes by) and, for deferred observers, its weights and logits."""
        if self.model.layers[l].moe is None:  # a dense layer (DeepSeek-V3's first layers): no routing
            return
        self._ids_rows[l].copy_(r.ids[0], non_blocking=True)
        if not ids_only:
            self._w_rows[l].copy_(r.weights[0], non_blocking=True)
            self._lg_rows[l].copy_(r.logits[0], non_blocking=True)
            if self.split:  # CPU experts read x on the host: it crosses with the routing, before the host's wait
                self._x_host.copy_(r.x, non_blocking=True)
                self._x_ready = l

    def _seg_last(self, prev: Routed) -> Tensor:
        if self._inside:
            self.slot_dev.copy_(self.slot_host, non_blocking=True)
        return self.model.segment_last(prev, self.slot_dev, self._partial(self.L - 1))

    # --- the host between segments ---
    def _route(self, l: int, r: Routed) -> None:
        """Layer l's routing is computed (enqueued): read it, resolve the slots, hand them to seg l+1."""
        m = self.model
        if m.layers[l].moe is None:  # a dense layer: no experts, seg l+1 runs its MLP without slots
            return
        t0 = time.perf_counter()
        obs = m.observer
        late = obs is not None and obs.deferrable
        if self.cuda:
            if not self._inside:
                self._copy_routing(l, r, ids_only=not (late or self.split))
            self._wait_stream()  # everything enqueued so far, layer l's top-k copy included
            ids = self._ids_rows[l]  # int64 [K] host, a row of the static buffer (valid for this step)
            ids_list = self._ids_np[l].tolist()
        else:
            ids = r.ids[0]
            ids_list = ids.tolist()
        replayed = m.routing is not None and self.static_positions  # benchmark mode (replay.py)
        if replayed:
            ids_d, w_d = m.routing(l, int(self._step_np[1]), 1)
            r.ids.copy_(ids_d, non_blocking=True)
            r.weights.copy_(w_d, non_blocking=True)  # seg l+1 reads these weights
            ids_h, w_h = m.routing.host(l, int(self._step_np[1]), 1)  # host rows: no device sync
            ids = ids_h[0]
            ids_list = ids.tolist()
        t1 = time.perf_counter()
        if obs is not None and not late:
            self._observe(obs, l, r, ids, (ids_h, w_h) if replayed else None)
        get_slots = self._get_slots
        fut = None
        if self.split:
            jobs: list = []
            self._cpu_l, self._cpu_r, self._cpu_w = l, r, w_h[0] if replayed else None
            self._cpu_fut = None
            slots = get_slots(l, ids_list, cpu=jobs, cpu_start=self._cpu_go)  # the CPU starts before the copies
            fut = self._cpu_fut
            if fut is None and jobs:  # a provider that fills the jobs without calling cpu_start
                fut = self._start_cpu(l, r, jobs, w_h[0] if replayed else None)
            elif fut is None and self._dirty[l]:  # the static row still holds an earlier step's sum
                self._partial_dev[l].zero_()
                self._dirty[l] = False
        elif get_slots is not None:
            slots = get_slots(l, ids_list)
        else:  # a provider without the host API: its device answer, read back
            slots = m.provider.get(l, ids).tolist()
        self._slot_np[:] = slots
        if self.cuda and not self._inside:
            self.slot_dev.copy_(self.slot_host, non_blocking=True)
        if fut is not None:  # before the hook: its prefetches may reuse RAM blocks, never one a CPU job reads
            self._finish_cpu(l, fut, len(jobs))
        hook = m.prefetch_hook
        if hook is not None and not late:  # with a deferred observer the hook runs after it (_observe_late)
            hook(l, ids.clone() if self.cuda else ids)  # the host row is rewritten next step: a copy to keep
        t2 = time.perf_counter()
        self.wait_s += t1 - t0
        self.route_s += t2 - t1
        self._late = (obs, l, r, ids, (ids_h, w_h) if replayed else None) if late else None

    def _cpu_go(self, jobs: list) -> None:
        """get_slots' cpu_start: hand the step's CPU jobs to the worker now, before the misses are copied."""
        self._cpu_fut = self._start_cpu(self._cpu_l, self._cpu_r, jobs, self._cpu_w)

    def _start_cpu(self, l: int, r: Routed, jobs: list, w_replayed: Tensor | None) -> Any:
        """Hand layer l's CPU experts to the worker: x and the routing weights on the host (the host has waited
        for the stream, so the device rows are final; the weights row came with the ids)."""
        m = self.model
        if self.cuda:
            x = self._x_host
            if self._x_ready != l:  # not copied with the routing (copies captured in the graphs)
                x.copy_(r.x)  # [1, D] D2H, a few KB
            self._x_ready = -1
            w = self._w_rows[l]
        else:
            x, w = r.x, r.weights[0]
        if w_replayed is not None:
            w = w_replayed
        return cpu_experts.start(m.provider, x, w, jobs, m.layers[l].moe.act, m.fp32_route_weights)

    def _finish_cpu(self, l: int, fut: Any, n: int) -> None:
        """Wait for layer l's CPU experts; their sum goes where seg l+1 reads it."""
        t0 = time.perf_counter()
        y = cpu_experts.finish(self.model.provider, fut, n)  # [1, D] host
        if self._partial_dev is not None:
            self._partial_host[l].copy_(y[0])
            self._partial_dev[l].copy_(self._partial_host[l], non_blocking=True)  # the compute stream, before seg l+1
            self._dirty[l] = True
        else:
            self._partial_next = y
        self.cpu_wait_s += time.perf_counter() - t0

    def _observe_late(self) -> None:
        """A deferrable observer, called once the next segment is enqueued: its host work overlaps that
        segment's compute instead of delaying it. It reads host rows, so nothing here waits for the device."""
        if self._late is None:
            return
        t0 = time.perf_counter()
        obs, l, r, ids, replayed = self._late
        self._late = None
        self._observe(obs, l, r, ids, replayed, rows=True)
        hook = self.model.prefetch_hook
        if hook is not None:  # its copies overlap this segment: they wait only for compute before get(l) (vram)
            hook(l, ids.clone() if self.cuda else ids)
        self.late_s += time.perf_counter() - t0

    def _observe(self, obs: Any, l: int, r: Routed, ids_host: Tensor, replayed: tuple[Tensor, Tensor] | None, *,
                 rows: bool = False) -> None:
        """Hand layer l's routing to the observer. With graphs the outputs are rewritten by the next replay, so
        the observer gets host copies, and only of what it declares it needs (`needs_hidden` / `needs_logits`):
        ids come from the host row already read, so an observer of ids alone costs no device sync.
        With replayed routing the weights are the replayed ones and the logits are made consistent with them."""
        need_h = obs.needs_hidden
        need_lg = obs.needs_logits
        if replayed is not None:
            ids_o, w_o = replayed[0].clone(), replayed[1].clone()
            lg = routed_logits(ids_o, w_o, r.logits.shape[-1]) if need_lg else None
        elif rows and self.cuda:  # deferred: the host rows copied with the ids (the device may be busy)
            ids_o, w_o = ids_host[None].clone(), self._w_rows[l][None].clone()
            lg = self._lg_rows[l][None].to(torch.float32, copy=True) if need_lg else None
        elif self.graphs:
            ids_o, w_o = ids_host[None].clone(), r.weights.to("cpu", torch.float32, copy=True)
            lg = r.logits.to("cpu", torch.float32, copy=True) if need_lg else None
        else:
            ids_o, w_o, lg = r.ids, r.weights, r.logits.float() if need_lg else None
        if need_h:
            h = r.h.to("cpu", copy=True) if self.graphs else r.h
        else:
            h = torch.empty(r.h.shape[0], 0)
        obs.on_route(l, h, ids_o, w_o, lg)

    # --- one step ---
    @torch.inference_mode()
    def step(self, token: int, pos: int) -> Tensor:
        """Logits [1, V] (compute dtype) of `token` at position `pos` (the cache holds 0..pos-1).

        With graphs the result is a static buffer: read it before the next step.
        """
        if pos >= self.model.max_context:
            raise ValueError(f"position {pos} is beyond max_context={self.model.max_context}")
        self._step_np[0] = token
        self._step_np[1] = pos
        self.steps += 1
        span = self.model.graph_span(pos)
        if not self.graphs:
            return self._run_eager(span, pos)
        chain = self.chains.get(span)
        if chain is None:
            chain = self._capture(span)
        elif chain.replayed:
            return self._replay(chain)
        try:  # the first replay of new graphs: a refusal here still means "decode this step eagerly"
            out = self._replay(chain)
            chain.replayed = True
            return out
        except (GraphCaptureError, ExpertReadError):  # the provider's errors are not the graphs'
            raise
        except RuntimeError as e:
            self._synchronize()
            raise GraphCaptureError(f"replaying the decode segments for span {span} failed: {e}") from e

    def _replay(self, chain: _Chain) -> Tensor:
        self._stream = torch.cuda.current_stream(self.device)
        if not self._inside:
            self.step_dev.copy_(self.step_host, non_blocking=True)
        t0 = time.perf_counter()
        chain.graphs[0].replay()
        launch = time.perf_counter() - t0
        for l in range(self.L):
            self._route(l, chain.routed[l])
            t0 = time.perf_counter()
            chain.graphs[l + 1].replay()
            launch += time.perf_counter() - t0
            self._observe_late()
        self.launch_s += launch
        return chain.logits

    def _run_eager(self, span: int, pos: int) -> Tensor:
        self._stream = torch.cuda.current_stream(self.device) if self.cuda else None
        if self.cuda and not self._inside:
            self.step_dev.copy_(self.step_host, non_blocking=True)
        plan, r = self._seg_first(span, pos)
        for l in range(self.L):
            self._route(l, r)
            nxt = self._seg_mid(l + 1, r, plan) if l + 1 < self.L else self._seg_last(r)
            self._observe_late()
            r = nxt
        return r

    # --- capture ---
    def capture_all(self) -> None:
        """Capture the chain of every span a step may use (`model.graph_spans()`: one with triton or flash
        attention, every power-of-two bucket with SDPA) now, so that no timed step captures. Raises
        GraphCaptureError as a step would; a fallback to host copies clears the chains, hence two passes."""
        if not self.graphs:
            return
        for _ in range(2):
            for span in self.model.graph_spans():
                if span not in self.chains:
                    self._capture(span)
            if all(s in self.chains for s in self.model.graph_spans()):
                return

    def _capture(self, span: int) -> _Chain:
        """Warm up, then capture the L+1 segments of `span`; "graph" copies fall back to "host" once."""
        t0 = time.perf_counter()
        mem0 = pool_bytes(self.pool, self.device)
        try:
            with self.model.preserve_state():  # warm-ups and the probe run the step: keep the DeltaNet state
                chain = self._capture_chain(span)
                if self._inside and not self.probed:
                    probe_ok = self._probe(chain)
        except Exception as e:  # noqa: BLE001 - any refusal of this torch/driver: report and fall back
            self._synchronize()
            if self._inside:
                self._note(f"capturing the decode segments with copies inside the graphs failed ({e}); "
                           "issuing the copies from the host instead")
                self.copies = "host"
                self.chains.clear()
                return self._capture(span)
            raise GraphCaptureError(f"capturing the decode segments for span {span} failed: {e}") from e
        if self._inside and not self.probed and not probe_ok:
            self._note("copies captured inside the decode graphs did not move the bytes (probe); "
                       "issuing the copies from the host instead")
            self.copies = "host"
            self.chains.clear()
            return self._capture(span)
        self.probed = True
        self.chains[span] = chain
        self.capture_s += time.perf_counter() - t0
        self.graph_mem_bytes += pool_bytes(self.pool, self.device) - mem0
        return chain

    def _capture_chain(self, span: int) -> _Chain:
        # Warm-up on a side stream (cuBLAS workspaces, lazy inits), as torch asks before capture. It reads
        # whatever slot rows the buffer holds (always valid rows) and writes only this step's own K/V
        # position, which the real replay rewrites before anything reads it. The provider is not called.
        with self._warmup_stream():
            if not self._inside:  # the warm-up must write this step's position, not the last step's
                self.step_dev.copy_(self.step_host, non_blocking=True)
            for _ in range(2):
                plan, r = self._seg_first(span, 0)
                for l in range(1, self.L):
                    r = self._seg_mid(l, r, plan)
                self._seg_last(r)
        self._synchronize()
        g, (plan, r) = self._record(lambda: self._seg_first(span, 0))
        graphs, routed = [g], [r]
        for l in range(1, self.L):
            g, r = self._record(lambda l=l, prev=r: self._seg_mid(l, prev, plan))
            graphs.append(g)
            routed.append(r)
        g, logits = self._record(lambda prev=r: self._seg_last(prev))
        graphs.append(g)
        return _Chain(span, graphs, plan, routed, logits)

    # --- CUDA specifics of capture (tests on CPU replace these three) ---
    @contextlib.contextmanager
    def _warmup_stream(self) -> Iterator[None]:
        dev = self.device
        cur = torch.cuda.current_stream(dev)
        side = torch.cuda.Stream(dev)
        side.wait_stream(cur)
        with torch.cuda.stream(side):
            yield
        cur.wait_stream(side)

    def _synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def _wait_stream(self) -> None:
        """The host waits for the compute stream (one call: cheaper than recording and waiting on an event)."""
        self._stream.synchronize()

    def _record(self, fn: Callable[[], Any]) -> tuple[Any, Any]:
        """Capture fn() into a CUDA graph; returns (graph, fn's outputs: the graph's static outputs)."""
        g = torch.cuda.CUDAGraph()
        # thread_local: the cache's reader threads may make CUDA calls while this thread captures.
        with torch.cuda.graph(g, pool=self.pool, capture_error_mode="thread_local"):
            out = fn()
        return g, out

    def _probe(self, chain: _Chain) -> bool:
        """Check once that the copies captured in the graphs move the bytes at replay time.

        Replays seg 0 (D2H of layer 0's top-k) and seg 1 (H2D of probe slot rows). Like the warm-up, this
        writes only this step's own K/V position (rewritten by the real replay); no provider call.
        """
        self._ids_np[0, :] = -1
        chain.graphs[0].replay()
        self._synchronize()
        ok_ids = bool(np.array_equal(self._ids_np[0], chain.routed[0].ids[0].cpu().numpy()))
        S = int(self.model.provider.weights.gate.shape[0])
        keep = self._slot_np.copy()
        probe = [(7 * i + 3) % S for i in range(self.K)]
        self._slot_np[:] = probe
        chain.graphs[1].replay()
        self._synchronize()
        ok_slots = self.slot_dev.cpu().tolist() == probe
        self._slot_np[:] = keep
        return ok_ids and ok_slots

    def _note(self, msg: str) -> None:
        print(f"tiered: {msg}", file=sys.stderr)

    # --- stats ---
    @property
    def host_s_per_layer(self) -> float | None:
        """Host seconds per layer of a step: routing work between segments (observer, slot lookup, copy issue,
        prefetch hook, deferred observers) and graph launches; not the waits for the device's top-k nor for the
        CPU experts' result. None before any step."""
        n = self.steps * self.L
        if not n:
            return None
        return (self.route_s - self.cpu_wait_s + self.late_s + self.launch_s) / n

    def stats(self) -> dict:
        return {"copies": self.copies, "spans": sorted(self.chains), "steps": self.steps,
                "wait_s": self.wait_s, "route_s": self.route_s, "late_s": self.late_s, "launch_s": self.launch_s,
                "cpu_wait_s": self.cpu_wait_s, "host_s_per_layer": self.host_s_per_layer,
                "capture_s": self.capture_s, "graph_mem_bytes": self.graph_mem_bytes}

    def reset_stats(self) -> None:
        self.steps = 0
        self.wait_s = self.route_s = self.late_s = self.capture_s = self.launch_s = self.cpu_wait_s = 0.0
