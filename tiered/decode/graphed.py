"""The whole one-token step replayed from CUDA graphs: when the attention reads the cache length from the device,
one graph for every position (flash) or one per kernel capacity (triton: a short grid, then max_context), else one
graph per attended span (a power of two).

Owns: `GraphedDecode` (the static token/position buffers, the captured graphs, `capture_all`, which captures
every graph a step may replay before the first timed step, and what capturing cost: seconds and memory).
Each graph ends with the greedy pick: it writes the argmax of its logits into the token buffer and adds 1 to the
position buffer (kernels/step_io.py's two launches where the glue kernels run, else torch's ops), so consecutive
replays (`launch`) decode greedily with no host input (decode/ahead.py runs the host one step ahead of them); `step`
overwrites both buffers first and returns the logits (sampling).
Sampled decoding has graphs of its own, one set per top-k (`capture_all(sampled=k)`, 0 for none, on first use):
after the argmax they draw the token with kernels/nucleus.py (over the top-k logits of a torch.topk in the graph,
or the whole vocabulary), keyed by the next entry of a device table of the sequence's draw keys (`set_sampling`
fills it: decode/sampling.py RowNoise), so sampled replays chain with no host input either, and the engine runs
the host ahead of them as for greedy decoding.
Used when every expert is on the device (ResidentExperts: `get` never syncs), with no observer and no
routing override (a replay would skip them).
Does not own: the step itself (model/transformer.py, `decode_static`, and which spans exist:
`graph_span(s)`), the piecewise step for providers that need the routing on the host (piecewise.py), the
step-ahead loop (ahead.py), nor the choice between them (engine.py).
"""
from __future__ import annotations

import time

import torch
from torch import Tensor

from tiered.decode.capture import pool_bytes
from tiered.decode.sampling import RowNoise, Sampling, argmax_into, draw_step
from tiered.kernels import nucleus, step_io
from tiered.model.transformer import Transformer


class GraphedDecode:
    """The one-token step replayed from CUDA graphs, keyed by `model.graph_span(pos)`.

    graphs=False runs the same body eagerly (any device): what the CPU tests of the step-ahead loop run."""

    def __init__(self, model: Transformer, *, graphs: bool = True) -> None:
        self.model = model
        dev = model.device
        self.graphed = bool(graphs)
        if self.graphed and dev.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the model is on {dev}: use GraphedDecode(graphs=False)")
        self.token = torch.zeros(1, dtype=torch.int64, device=dev)  # static buffers the graphs read and advance
        self.pos = torch.zeros(1, dtype=torch.int64, device=dev)
        self.vocab = int(model.lm_head.shape[-2])
        # sampled graphs: the kernels' parameters of the one row (its key copied in from keys[draw] each step), the
        # sequence's draw keys in order, the index of the next one (advanced by each sampled replay)
        self.sparams = nucleus.pack_params([0], [self.vocab], [0], [0], [0.0], [1.0]).to(dev)
        self.keys = torch.zeros(model.max_context + 1, dtype=torch.int64, device=dev)
        self.draw = torch.zeros(1, dtype=torch.int64, device=dev)
        self.sampled: int | None = None  # launch replays the greedy graphs (None), or the sampled ones of this top-k
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = {}  # greedy, by span
        self.sgraphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, Tensor]] = {}  # sampled, by (span, top-k)
        self.pool = torch.cuda.graph_pool_handle() if self.graphed else None
        # the greedy pick and the position's advance in two PDL launches (kernels/step_io.py) where the glue kernels
        # run, else torch's argmax, copy and add
        self.kernel_pick = model.glue and step_io.enabled()
        self.capture_s = 0.0  # seconds spent capturing, over the object's life
        self.graph_mem_bytes = 0  # growth of the graphs' pool while capturing (capture.pool_bytes)

    def span(self, pos: int) -> int:
        return self.model.graph_span(pos)

    def capture_all(self, sampled: int | None = None) -> None:
        """Capture every graph a step may replay (`model.graph_spans()`) now, not inside a timed decode; sampled:
        the sampled graphs of that top-k (0: none; None: the greedy graphs)."""
        if not self.graphed:
            return
        for span in self.model.graph_spans():
            if not self._has(span, sampled):
                self._add(span, sampled)

    def ready(self, sampled: int | None = None) -> bool:
        """Every span's graph (sampled: sampled graph of that top-k) is captured, or no graphs are used: `launch`
        never captures."""
        return not self.graphed or all(self._has(s, sampled) for s in self.model.graph_spans())

    def can_sample(self, params: Sampling) -> bool:
        """Whether the sampled graphs can draw for these parameters: temperature > 0 (any top-p, any top-k)."""
        return params.temperature != 0

    def variant(self, params: Sampling) -> int:
        """The sampled graphs that draw for `params`: their top-k (0: the whole vocabulary)."""
        return params.top_k if 0 < params.top_k < self.vocab else 0

    def set_sampling(self, params: Sampling | None, noise: RowNoise | None = None, draws: int = 0) -> None:
        """Make `launch` replay the sampled graphs, drawing with `params` and the keys of `noise`'s next `draws`
        draws (taken from it now, in order; at most max_context + 1); None: greedy graphs again."""
        if params is None:
            self.sampled = None
            return
        if not self.can_sample(params):
            raise ValueError(f"the sampled graphs draw with temperature > 0, got {params}")
        k = self.variant(params)
        n = min(draws, self.keys.shape[0])
        self.keys[:n].copy_(noise.take_many(n))
        self.sparams.copy_(nucleus.pack_params([0], [k or self.vocab], [0], [0], [params.temperature],
                                               [params.top_p]))
        self.draw.zero_()
        self.sampled = k

    def step(self, token: Tensor, pos: int) -> Tensor:
        """token [1] int64 on device at position pos -> logits [1, V] (a static buffer: read before the next step)."""
        self.token.copy_(token.view(1))
        self.pos.fill_(pos)
        return self.launch(pos)

    def start(self, token: Tensor, pos: int) -> None:
        """Set the inputs of the next `launch`: token [1] int64 on device (e.g. the prefill's argmax) at `pos`."""
        self.token.copy_(token.view(1))
        self.pos.fill_(pos)

    def launch(self, pos: int) -> Tensor:
        """One step from the buffers as they are (the previous launch leaves its argmax and pos + 1 there).

        pos: the host's count of the position in self.pos, which picks the span's graph (a step never reads the
        device buffer back). Returns the logits [1, V] (a static buffer)."""
        span = self.span(pos)
        if not self.graphed:
            return self._body(span, self.sampled)
        if not self._has(span, self.sampled):  # only when capture_all was not called (or a span was added since)
            self._add(span, self.sampled)
        graph, out = self.graphs[span] if self.sampled is None else self.sgraphs[(span, self.sampled)]
        graph.replay()
        return out

    def stats(self) -> dict:
        return {"spans": sorted(self.graphs), "sampled_spans": sorted(self.sgraphs), "capture_s": self.capture_s,
                "graph_mem_bytes": self.graph_mem_bytes}

    def _has(self, span: int, sampled: int | None) -> bool:
        return span in self.graphs if sampled is None else (span, sampled) in self.sgraphs

    def _body(self, span: int, sampled: int | None = None) -> Tensor:
        """The captured step: logits of (token, pos), then the greedy pick into token (sampled: replaced by the
        draw keyed by keys[draw] among the top `sampled` logits (0: all), and draw + 1) and pos + 1."""
        out = self.model.decode_static(self.token, self.pos, span)
        if sampled is None and self.kernel_pick:
            step_io.greedy_pick(out, self.token, self.pos)
            return out
        argmax_into(out, self.token)
        if sampled is not None:
            self.sparams[3:4].copy_(self.keys.index_select(0, self.draw))
            draw_step(out, self.sparams, self.token, kernel=self.graphed, top_k=sampled)
            self.draw.add_(1)
        self.pos.add_(1)
        return out

    def _add(self, span: int, sampled: int | None = None) -> None:
        dev = self.model.device
        t0 = time.perf_counter()
        mem0 = pool_bytes(self.pool, dev)
        inputs = self.token.clone(), self.pos.clone(), self.draw.clone()  # stream-ordered after any step in flight
        graph, out = self._capture(span, inputs, sampled)
        # One replay now: the first launch of a graph pays for its upload, which would land in the first step.
        # Like the warm-up it writes only the K/V of the position in self.pos, rewritten by the step using it.
        graph.replay()
        self._restore(inputs)
        torch.cuda.synchronize(dev)
        if sampled is None:
            self.graphs[span] = (graph, out)
        else:
            self.sgraphs[(span, sampled)] = (graph, out)
        self.capture_s += time.perf_counter() - t0
        self.graph_mem_bytes += pool_bytes(self.pool, dev) - mem0

    def _restore(self, inputs: tuple[Tensor, Tensor, Tensor]) -> None:
        """Put back the token, position and draw index a warm-up or upload replay advanced."""
        self.token.copy_(inputs[0])
        self.pos.copy_(inputs[1])
        self.draw.copy_(inputs[2])

    def _capture(self, span: int, inputs: tuple[Tensor, Tensor, Tensor],
                 sampled: int | None) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        # Warm-up runs on a side stream (cuBLAS workspaces, lazy inits, Triton compiles); they write this step's
        # own K/V, which the replay rewrites with the same values. The DeltaNet state is not addressed by
        # position, so it is restored after the warm-ups, and so are the token and position they advance.
        with self.model.preserve_state():
            side = torch.cuda.Stream(device=self.model.device)
            side.wait_stream(torch.cuda.current_stream(self.model.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._body(span, sampled)
                    self._restore(inputs)
            torch.cuda.current_stream(self.model.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self._body(span, sampled)
        return graph, out
