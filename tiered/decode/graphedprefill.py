"""A prompt's first chunk replayed from CUDA graphs, one graph per bucket of lengths.

Owns: `GraphedPrefill` (per bucket: the static token and last-position buffers, the uses seen, the captured
forward and its logits; `run`, which pads the prompt to its bucket, captures on the bucket's second use and
replays from then on; what capturing cost) and `bucket_for` (prompt length -> the bucket's length).
A short prompt's prefill is bound by the host: each chunk pays its Python and launch work once, about 1.5 ms a
layer at the 10.6B shape, for kernels that take a third of that at 512 tokens (session 25). A replay pays it
never. A bucket's first prompt runs eagerly (a one-off prompt would pay a capture for one use); its second
captures. Prompts longer than the engine's chunk and prompts after the first of a sequence run eagerly.
Used when the whole one-token step is graphed (every expert resident, no observer, no routing override) and
the model's state is addressed by position (`Transformer.prefill_graphable`).
Does not own: the forward (model/transformer.py `prefill_static`), nor when a prefill runs (engine.py).

Legend: n prompt tokens, Tb the bucket's length, V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tiered.decode.capture import BucketGraphs
from tiered.model.transformer import Transformer

STEP = 64  # buckets are multiples of STEP up to FINE, then of COARSE
FINE = 1024
COARSE = 256


def bucket_for(n: int) -> int:
    """The bucket of an n-token prompt: the next multiple of 64 up to 1,024 tokens, of 256 above (at most 64 or
    255 tokens of padding)."""
    if n < 1:
        raise ValueError(f"a prompt has at least one token, got {n}")
    if n <= FINE:
        return -(-n // STEP) * STEP
    return -(-n // COARSE) * COARSE


@dataclass
class _Bucket:
    tokens: Tensor  # [Tb] int64
    last: Tensor  # [1] int64: the prompt's last position
    uses: int = 0
    graph: torch.cuda.CUDAGraph | None = None
    logits: Tensor | None = None  # [1, V], written by each replay


class GraphedPrefill(BucketGraphs):
    """The first chunk of a prompt from CUDA graphs (graphs=False: the same padded body run eagerly, for the
    CPU tests of the padding)."""

    def __init__(self, model: Transformer, *, max_tokens: int, graphs: bool = True, capture_on: int = 2) -> None:
        """max_tokens: the longest prompt served (the engine's prefill chunk, at most max_context);
        capture_on: the use of a bucket that captures it (2: its first prompt runs eagerly)."""
        if not model.prefill_graphable:
            raise ValueError("this model's prefill cannot be graphed with padding (DeltaNet or MLA layers, mixed "
                             "attention windows, an observer or a routing override)")
        if graphs and model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the model is on {model.device}: "
                             "use GraphedPrefill(..., graphs=False)")
        super().__init__(model.device, graphs)
        self.model = model
        self.max_tokens = min(int(max_tokens), model.max_context)
        self.capture_on = max(1, int(capture_on))

    @torch.inference_mode()
    def run(self, ids: Tensor) -> Tensor | None:
        """ids [n] int64 on the device, a fresh sequence's prompt -> the logits [1, V] of its last token (a
        static buffer when replayed: read it before the next prefill), or None: the caller prefills eagerly
        (a bucket's first use, a prompt too long, a bucket whose capture failed)."""
        n = ids.shape[0]
        if n > self.max_tokens:
            return None
        Tb = min(bucket_for(n), self.model.max_context)
        if Tb in self.failed:
            return None
        b = self.buckets.get(Tb)
        if b is None:
            b = self.buckets[Tb] = _Bucket(tokens=torch.zeros(Tb, dtype=torch.int64, device=self.device),
                                           last=torch.zeros(1, dtype=torch.int64, device=self.device))
        b.uses += 1
        if b.graph is None and b.uses < self.capture_on:
            return None
        self.model.state.reset()
        b.tokens[:n].copy_(ids)
        b.tokens[n:].zero_()
        b.last.fill_(n - 1)
        if not self.graphed:
            return self.model.prefill_static(b.tokens, b.last)
        if b.graph is None:  # one warm-up: the bucket's first prompt already ran (eagerly, at its own length)
            got = self._capture(Tb, lambda: self.model.prefill_static(b.tokens, b.last), warmups=1)
            if got is None:  # an operation that cannot be captured: this bucket stays eager
                return None
            b.graph, b.logits = got.graph, got.out
        b.graph.replay()
        self.replays += 1
        return b.logits

