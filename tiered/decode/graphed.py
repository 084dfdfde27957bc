"""The whole one-token step replayed from CUDA graphs: one graph per attended span (a power of two).

Owns: `GraphedDecode`. Used when every expert is on the device (ResidentExperts: `get` never syncs), with no
observer and no routing override (a replay would skip them).
Does not own: the step itself (model/transformer.py, `decode_static`), the piecewise step for providers that
need the routing on the host (piecewise.py), nor the choice between them (engine.py).
"""
from __future__ import annotations

import torch
from torch import Tensor

from tiered.decode.piecewise import span_for
from tiered.model.transformer import Transformer


class GraphedDecode:
    """The one-token step replayed from CUDA graphs: one graph per attended span (a power of two)."""

    def __init__(self, model: Transformer) -> None:
        self.model = model
        dev = model.device
        self.token = torch.zeros(1, dtype=torch.int64, device=dev)  # static input buffers the graphs read
        self.pos = torch.zeros(1, dtype=torch.int64, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def span(self, pos: int) -> int:
        return span_for(pos, self.model.max_context)

    def step(self, token: Tensor, pos: int) -> Tensor:
        """token [1] int64 on device at position pos -> logits [1, V] (a static buffer: read before the next step)."""
        self.token.copy_(token.view(1))
        self.pos.fill_(pos)
        span = self.span(pos)
        if span not in self.graphs:
            self.graphs[span] = self._capture(span)
        graph, out = self.graphs[span]
        graph.replay()
        return out

    def _capture(self, span: int) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        # Warm-up runs on a side stream (cuBLAS workspaces, lazy inits); they write this step's own K/V,
        # which the replay rewrites with the same values.
        # The DeltaNet state is not addressed by position, so it is restored after the warm-ups.
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
