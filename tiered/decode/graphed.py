"""The whole one-token step replayed from CUDA graphs: one graph for every position when the attention reads
the cache length from the device (triton, flash), else one graph per attended span (a power of two).

Owns: `GraphedDecode` (the static token/position buffers, the captured graphs, `capture_all`, which captures
every graph a step may replay before the first timed step, and what capturing cost: seconds and memory).
Used when every expert is on the device (ResidentExperts: `get` never syncs), with no observer and no
routing override (a replay would skip them).
Does not own: the step itself (model/transformer.py, `decode_static`, and which spans exist:
`graph_span(s)`), the piecewise step for providers that need the routing on the host (piecewise.py), nor
the choice between them (engine.py).
"""
from __future__ import annotations

import time

import torch
from torch import Tensor

from tiered.model.transformer import Transformer


class GraphedDecode:
    """The one-token step replayed from CUDA graphs, keyed by `model.graph_span(pos)`."""

    def __init__(self, model: Transformer) -> None:
        self.model = model
        dev = model.device
        self.token = torch.zeros(1, dtype=torch.int64, device=dev)  # static input buffers the graphs read
        self.pos = torch.zeros(1, dtype=torch.int64, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.capture_s = 0.0  # seconds spent capturing, over the object's life
        self.graph_mem_bytes = 0  # growth of reserved CUDA memory while capturing (the graphs' pool)

    def span(self, pos: int) -> int:
        return self.model.graph_span(pos)

    def capture_all(self) -> None:
        """Capture every graph a step may replay (`model.graph_spans()`) now, not inside a timed decode."""
        for span in self.model.graph_spans():
            if span not in self.graphs:
                self._add(span)

    def step(self, token: Tensor, pos: int) -> Tensor:
        """token [1] int64 on device at position pos -> logits [1, V] (a static buffer: read before the next step)."""
        self.token.copy_(token.view(1))
        self.pos.fill_(pos)
        span = self.span(pos)
        if span not in self.graphs:  # only when capture_all was not called (or a span was added since)
            self._add(span)
        graph, out = self.graphs[span]
        graph.replay()
        return out

    def stats(self) -> dict:
        return {"spans": sorted(self.graphs), "capture_s": self.capture_s, "graph_mem_bytes": self.graph_mem_bytes}

    def _add(self, span: int) -> None:
        dev = self.model.device
        t0 = time.perf_counter()
        torch.cuda.empty_cache()  # torch.cuda.graph empties the cache on entry: start from there, or the delta is negative
        mem0 = torch.cuda.memory_reserved(dev)
        graph, out = self._capture(span)
        # One replay now: the first launch of a graph pays for its upload, which would land in the first step.
        # Like the warm-up it writes only the K/V of the position in self.pos, rewritten by the step using it.
        graph.replay()
        torch.cuda.synchronize(dev)
        self.graphs[span] = (graph, out)
        self.capture_s += time.perf_counter() - t0
        self.graph_mem_bytes += torch.cuda.memory_reserved(dev) - mem0

    def _capture(self, span: int) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        # Warm-up runs on a side stream (cuBLAS workspaces, lazy inits, Triton compiles); they write this step's
        # own K/V, which the replay rewrites with the same values. The DeltaNet state is not addressed by
        # position, so it is restored after the warm-ups.
        with self.model.preserve_state():
            side = torch.cuda.Stream(device=self.model.device)
            side.wait_stream(torch.cuda.current_stream(self.model.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.model.decode_static(self.token, self.pos, span)
            torch.cuda.current_stream(self.model.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.model.decode_static(self.token, self.pos, span)
        return graph, out
