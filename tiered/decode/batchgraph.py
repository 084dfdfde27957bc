"""Decode-only batch steps replayed from CUDA graphs, one graph per bucket of row counts.

Owns: `BatchGraphs` (the static input buffers of each bucket, its captured step and logits, `eligible` (which
steps a graph may run), `run` (fill the buffers, capture on a bucket's first step, replay), what capturing
cost, and the buckets that could not be captured) and `bucket_for` (rows -> the bucket's row count).
A step whose rows all decode one token runs with every shape fixed by its bucket: the tokens, positions, K/V
store places, block tables [bucket, max_context / page] and lengths are copied into the bucket's buffers, the
paged decode kernel reads the lengths on the device, the experts take the model's own path over the
resident pool (BatchStep experts="model": no host read), and padding rows (token 0 at position 0, length 0:
zero attention, a K/V store into a free page, routing marks sent to the uncounted column) fill the bucket.
Does not own: the step's math (batchstep.py `BatchStep.layers`, shared with the eager step), the pages
(state.py), nor which rows run (scheduler.py).

Legend: B rows of the step, Bb its bucket, MP pages per row (max_context / page size), V vocabulary.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from tiered.decode.batchstep import BatchStep, Segment, StepCounts
from tiered.kernels.quant_moe import qlinear as linear

SMALL = 16  # up to this many rows the buckets are powers of two; above it, multiples of STEP
STEP = 16


def bucket_for(rows: int) -> int:
    """The bucket of a step of `rows` rows: 1, 2, 4, 8, 16, then multiples of 16 (at most 1.5x the rows
    above 16, 2x below it)."""
    if rows < 1:
        raise ValueError(f"a step has at least one row, got {rows}")
    if rows <= SMALL:
        return 1 << (rows - 1).bit_length()
    return -(-rows // STEP) * STEP


@dataclass
class _Bucket:
    tokens: Tensor  # [Bb] int64
    pos: Tensor  # [Bb] int64
    flat: Tensor  # [Bb] int64: K/V store place in the pools viewed as [N * P, ...]
    block_table: Tensor  # [Bb, MP] int32
    seqlens: Tensor  # [Bb] int32 (0 for padding rows)
    valid: Tensor  # [Bb] bool
    graph: torch.cuda.CUDAGraph | None = None
    logits: Tensor | None = None  # [Bb, V], written by each replay


class BatchGraphs:
    """CUDA graphs of a BatchStep's decode-only steps (every expert resident, attention layers only).

    graphs=False runs the same bucketed body eagerly (any device): what the CPU tests of the buffers, the
    padding rows and the marks run."""

    def __init__(self, step: BatchStep, *, graphs: bool = True) -> None:
        self.step = step
        self.model = step.model
        self.device = step.device
        self.graphed = bool(graphs)
        if self.graphed and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the model is on {self.device}: "
                             "use BatchGraphs(step, graphs=False)")
        why = unsupported(step)
        if why:
            raise ValueError(f"the batch step cannot be graphed: {why}")
        P = step.state.page_size
        self.max_pages = -(-self.model.max_context // P)
        self.buckets: dict[int, _Bucket] = {}
        self.failed: dict[int, str] = {}  # bucket -> why its capture failed (those steps run eagerly)
        self.pool = torch.cuda.graph_pool_handle() if self.graphed else None
        self.capture_s = 0.0
        self.graph_mem_bytes = 0
        self.replays = 0

    def eligible(self, segs: list[Segment]) -> bool:
        """A graph may run this step: every row decodes one token, wants its logits and has no routing
        override, and the bucket was not refused before."""
        if not segs or any(len(s.tokens) != 1 or not s.want_logits or s.routing is not None for s in segs):
            return False
        return bucket_for(len(segs)) not in self.failed

    @torch.inference_mode()
    def run(self, segs: list[Segment]) -> Tensor | None:
        """The step's logits [B, V] (a view of the bucket's static buffer: read it before the next step), or
        None when no graph can run it (the caller runs it eagerly): padding needs a free page and none is, or
        the bucket's capture failed."""
        st = self.step.state
        P, MP = st.page_size, self.max_pages
        B = len(segs)
        Bb = bucket_for(B)
        pad = Bb - B
        scratch = st.peek_free_page() if pad else 0
        if scratch is None:
            return None
        tokens, pos, flat, seqlens, table = [], [], [], [], []
        for s in segs:
            p = s.start
            if p >= MP * P:
                return None
            tokens.append(s.tokens[0])
            pos.append(p)
            flat.append(s.pages[p // P] * P + p % P)
            seqlens.append(p + 1)
            row = s.pages[:MP]
            table.append(row + [row[0]] * (MP - len(row)))
        for _ in range(pad):
            tokens.append(0)
            pos.append(0)
            flat.append(scratch * P)
            seqlens.append(0)
            table.append([scratch] * MP)
        b = self.buckets.get(Bb)
        if b is None:
            b = self._buffers(Bb)
        b.tokens.copy_(torch.tensor(tokens, dtype=torch.int64), non_blocking=True)
        b.pos.copy_(torch.tensor(pos, dtype=torch.int64), non_blocking=True)
        b.flat.copy_(torch.tensor(flat, dtype=torch.int64), non_blocking=True)
        b.seqlens.copy_(torch.tensor(seqlens, dtype=torch.int32), non_blocking=True)
        b.block_table.copy_(torch.tensor(table, dtype=torch.int32), non_blocking=True)
        b.valid.copy_(torch.arange(Bb) < B, non_blocking=True)
        self.step.last = StepCounts(rows=B, tokens=B)
        if not self.graphed:
            out = self._body(b)
            self.step._count_used()
            return out[:B]
        if b.graph is None:
            try:
                self._capture(Bb, b)
            except RuntimeError as e:  # e.g. an operation that cannot be captured: run this bucket eagerly
                self.failed[Bb] = f"{type(e).__name__}: {e}"[:500]
                self.buckets.pop(Bb, None)
                torch.cuda.synchronize(self.device)
                return None
        b.graph.replay()
        self.replays += 1
        self.step._count_used()
        return b.logits[:B]

    def stats(self) -> dict:
        return {"buckets": sorted(k for k, b in self.buckets.items() if b.graph is not None), "replays": self.replays,
                "capture_s": self.capture_s, "graph_mem_bytes": self.graph_mem_bytes,
                "failed": dict(self.failed)}

    # --- internals ---
    def _buffers(self, Bb: int) -> _Bucket:
        dev = self.device
        b = _Bucket(tokens=torch.zeros(Bb, dtype=torch.int64, device=dev),
                    pos=torch.zeros(Bb, dtype=torch.int64, device=dev),
                    flat=torch.zeros(Bb, dtype=torch.int64, device=dev),
                    block_table=torch.zeros(Bb, self.max_pages, dtype=torch.int32, device=dev),
                    seqlens=torch.zeros(Bb, dtype=torch.int32, device=dev),
                    valid=torch.zeros(Bb, dtype=torch.bool, device=dev))
        self.buckets[Bb] = b
        return b

    def _body(self, b: _Bucket) -> Tensor:
        """The graphed step: every shape depends on the bucket only."""
        m, step = self.model, self.step
        plan = {"decode": [0], "other": [], "all_decode": True, "bt": b.block_table, "seqlens": b.seqlens,
                "flat": b.flat, "valid": b.valid,
                "cos": m.rope.cos.index_select(0, b.pos), "sin": m.rope.sin.index_select(0, b.pos)}
        step.used_marks().zero_()
        h, delta = step.layers(F.embedding(b.tokens, m.embed), plan, None, None)
        return linear(m.add_norm(h, delta, m.final_norm)[1], m.lm_head)  # [Bb, V]

    def _capture(self, Bb: int, b: _Bucket) -> None:
        """Warm up on a side stream (Triton compiles, cuBLAS workspaces; the warm-ups store this step's own
        K/V, which the replay stores again), capture, and upload with one replay now."""
        dev = self.device
        t0 = time.perf_counter()
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        mem0 = torch.cuda.memory_reserved(dev)
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._body(b)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._body(b)
        b.graph, b.logits = graph, out
        torch.cuda.synchronize(dev)
        self.capture_s += time.perf_counter() - t0
        self.graph_mem_bytes += torch.cuda.memory_reserved(dev) - mem0


def unsupported(step: BatchStep) -> str | None:
    """Why a BatchStep's decode-only steps cannot be graphed (None: they can)."""
    if step.experts != "model":
        return "its experts are resolved on the host (an expert cache: experts='major')"
    if {ls.kind for ls in step.state.layers} != {"kv"}:
        return "it has DeltaNet or MLA layers (only attention layers are graphed)"
    if step.decode_attention != "paged":
        return "its decode attention runs row by row (decode_attention='rows')"
    return None
