"""Greedy decoding with the host one step ahead of the device: step n+1 is enqueued before step n's token is read.

Owns: `GreedyStep` (what a step the host runs ahead of provides: a token and a position buffer on the device, and
`launch(pos)`, one step that reads both and leaves its argmax and pos + 1 there), `EagerGreedy` (that step without
graphs: the eager forward), `Readback` (page-locked ring of token copies, one CUDA event each), `TokenSink` (the
host's side of each generated token, shared with the engine's per-token loop: EOS, stop strings, streamed text,
the callbacks) and `run_ahead` (the loop).

How the loop goes: the prefill's argmax is written into the step's token buffer (no host sync), then
    enqueue step 1; for i = 0, 1, ...: read token i back (its event), hand it to the sink, enqueue step i + 2
so the device always has the next step queued while the host reads, streams and checks stops. Stop conditions are
checked on the tokens read back: after EOS or a stop string the one step already enqueued is discarded. It wrote
the K/V (or DeltaNet state) of the position after the sequence's last one, which nothing reads: the next sequence
starts at position 0 (the model resets there) and every step's position comes from the host's count, never from
the device buffer. Steps are never enqueued past max_new tokens or the context, so only EOS and stop strings
cost an extra step.
Does not own: the step (graphed.py: GraphedDecode captures the argmax and the position increment in its graphs),
sampling (sampling.py), which requests may run ahead and the stats (engine.py).

Legend: V vocab.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch
from torch import Tensor

from tiered.decode.sampling import argmax_into
from tiered.layout.tokenizer import StreamDecoder, Tokenizer


class GreedyStep(Protocol):
    """A one-token greedy step driven from device buffers."""
    token: Tensor  # [1] int64 on the device: the next launch's input; a launch leaves its argmax here
    pos: Tensor  # [1] int64 on the device: the next launch's position; a launch adds 1

    def launch(self, pos: int) -> Tensor:
        """Enqueue one step; `pos` is the host's count of the position in self.pos (it may pick a graph)."""
        ...


class EagerGreedy:
    """The greedy step without graphs (any device): the model's eager forward at the host's position, then the
    argmax into the token buffer. What the CPU runs when the engine is told to run ahead there."""

    def __init__(self, model) -> None:
        self.model = model
        self.token = torch.zeros(1, dtype=torch.int64, device=model.device)
        self.pos = torch.zeros(1, dtype=torch.int64, device=model.device)

    def launch(self, pos: int) -> Tensor:
        out = self.model.forward(self.token, pos)  # [1, V]
        argmax_into(out, self.token)
        self.pos.add_(1)
        return out


class Readback:
    """Token ids copied device -> page-locked host memory without blocking, each copy followed by a CUDA event;
    `get(i)` waits for copy i only. A ring of `size` slots: copy i + size may start once token i was read."""

    def __init__(self, device: torch.device, size: int = 4) -> None:
        cuda = device.type == "cuda"
        self.size = size
        self.host = torch.zeros(size, dtype=torch.int64, pin_memory=cuda)
        self.view = self.host.numpy()  # reads without a torch op per token
        self.slots = [self.host[j:j + 1] for j in range(size)]
        self.events = [torch.cuda.Event() for _ in range(size)] if cuda else None

    def push(self, i: int, src: Tensor) -> None:
        """Enqueue the copy of src [1] int64 (on the device) into slot i on the current stream."""
        j = i % self.size
        self.slots[j].copy_(src, non_blocking=True)
        if self.events is not None:
            self.events[j].record()

    def get(self, i: int) -> int:
        """Token i, once its copy has landed."""
        j = i % self.size
        if self.events is not None:
            self.events[j].synchronize()
        return int(self.view[j])


class TokenSink:
    """The host's side of each generated token: `sink(tok)` returns a stop reason ("eos", "stop") or None.

    EOS is never appended nor emitted. Text is decoded incrementally when it is streamed (on_text) or checked for
    stop strings; the text ends before the first stop string, whose token is kept in `ids`; streamed text is held
    back by the longest stop string less one character, so that no part of a stop string is ever emitted."""

    def __init__(self, *, eos: set[int], tokenizer: Tokenizer | None, stop: Sequence[str] = (),
                 on_text: Callable[[str], None] | None = None, on_token: Callable[[int], None] | None = None) -> None:
        self.eos = eos
        self.stop = tuple(stop)
        self.tokenizer = tokenizer
        self.on_text, self.on_token = on_text, on_token
        self.decoder = StreamDecoder(tokenizer) if tokenizer is not None and (on_text or self.stop) else None
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self._text = ""
        self.emitted = 0  # characters of _text handed to on_text
        self.checked = 0  # characters of _text searched for stop strings

    def __call__(self, tok: int) -> str | None:
        if tok in self.eos:
            return "eos"
        self.ids.append(tok)
        if self.on_token is not None:
            self.on_token(tok)
        if self.decoder is not None:
            self._text += self.decoder.feed(tok)
            if self._cut():
                return "stop"
            self._emit(len(self._text) - self.hold)
        return None

    def finish(self, reason: str) -> str:
        """End of generation for `reason`: the held-back text is flushed (it may complete a stop string, and
        then the reason becomes "stop") and emitted. Returns the final reason."""
        if self.decoder is not None and reason != "stop":
            self._text += self.decoder.flush()
            if self._cut():
                reason = "stop"
        self._emit(len(self._text))
        return reason

    @property
    def text(self) -> str:
        if self.decoder is not None:
            return self._text
        return self.tokenizer.decode(self.ids) if self.tokenizer is not None else ""

    def _cut(self) -> bool:
        """Cut the text before the earliest stop string in it (searching only text not searched before)."""
        hits = [i for s in self.stop if (i := self._text.find(s, max(0, self.checked - len(s) + 1))) >= 0]
        self.checked = len(self._text)
        if not hits:
            return False
        self._text = self._text[:min(hits)]
        return True

    def _emit(self, upto: int) -> None:
        if upto > self.emitted:
            piece, self.emitted = self._text[self.emitted:upto], upto
            if self.on_text is not None:
                self.on_text(piece)


@dataclass(frozen=True)
class AheadRun:
    stop: str  # "eos", "stop" (the sink's), "length" or "context"
    t_first: float  # perf_counter when the first token was read back
    t_last: float  # perf_counter when the last token was read back and handed to the sink
    launched: int  # steps enqueued
    used: int  # steps whose token was read back (launched - used were computed past a stop and discarded)


def run_ahead(step: GreedyStep, logits: Tensor, pos: int, *, max_new: int, max_context: int,
              sink: Callable[[int], str | None], ring: Readback, first: Tensor | None = None) -> AheadRun:
    """Decoding from the prefill's logits [1, V] (the last prompt token's, at position pos - 1) with the host one
    step ahead. Token 0 is the argmax of `logits` (or `first` [1] int64 on the device, a draw); step i (i >= 1)
    reads token i - 1 at position pos + i - 1 and makes token i (its argmax, or its draw: graphed.py's sampled
    graphs). Stops as the engine's per-token loop does: at the sink's reason, after max_new tokens (max_new >= 1),
    or when the next step's position would reach max_context."""
    if first is None:
        argmax_into(logits, step.token)
    else:
        step.token.copy_(first.view(1))
    step.pos.fill_(pos)
    ring.push(0, step.token)
    launched = 0

    def issue(i: int) -> None:  # the step that makes token i + 1, at position pos + i, if it is ever needed
        nonlocal launched
        if i + 1 < max_new and pos + i < max_context:
            step.launch(pos + i)
            ring.push(i + 1, step.token)
            launched += 1

    issue(0)
    i, t_first = 0, 0.0
    while True:
        tok = ring.get(i)  # token i; the step making token i + 1 is already enqueued
        if i == 0:
            t_first = time.perf_counter()
        reason = sink(tok)
        if reason is None and i + 1 == max_new:
            reason = "length"
        if reason is None and pos + i >= max_context:
            reason = "context"
        if reason is not None:
            return AheadRun(reason, t_first, time.perf_counter(), launched, i)
        issue(i + 1)
        i += 1
