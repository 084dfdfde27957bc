"""Decode-only batch steps replayed from CUDA graphs, one graph per bucket of row counts.

Owns: `BatchGraphs` (the static input buffers of each bucket, its captured step and logits, `eligible` (which
steps a graph may run), `run` (fill the buffers, capture on a bucket's first step, replay), what capturing
cost, and the buckets that could not be captured), `bucket_for` (rows -> the bucket's row count), `shared_bank`
(whether the rows' routing overrides come from one replay bank) and `bank_layers` (the bank layer of each MoE
layer, or why the bank cannot serve the model).
A step whose rows all decode one token runs with every shape fixed by its bucket: the tokens, positions, K/V
store places, lengths, bank rows, sampling parameters and block tables [bucket, max_context / page] go into the
bucket's buffer in one copy, the paged decode kernel reads the lengths on the device, the experts take the
model's own path over the resident pool (BatchStep experts="model": no host read), the graph ends with each row's
next token (the argmax, or a draw by kernels/nucleus.py for rows that sample without top-k: no launch of the
host's after the replay), and padding rows (token 0 at position 0, length 0: zero attention, a K/V store into a
free page, routing marks sent to the uncounted column) fill the bucket.
Replayed routing (benchmark mode, predict/replay.py): rows whose routing comes from one ReplayBank are graphed
too; each row's bank row (base + position, -1 for own routing and padding) is in the buffer and the step gathers
the bank's ids and weights on the device (batchstep.py `replay_gather`). A bucket is bound to the bank of the
first replayed step it runs (its graph reads that bank's tensors; own-routing steps run it with every row -1); a
replayed step of another bank, or on a graph captured before any bank, binds it again and captures it again
(`recaptures`: the simple correct choice, which a benchmark with one bank per job does not pay). Rows whose
routing is not a bank's, or of two banks in one step, run eagerly.
Does not own: the step's math (batchstep.py `BatchStep.layers`, shared with the eager step), the pages
(state.py), nor which rows run (scheduler.py).

Legend: B rows of the step, Bb its bucket, MP pages per row (max_context / page size), V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tiered.decode.batchstep import BankRows, BatchStep, Segment, StepCounts
from tiered.decode.capture import BucketGraphs
from tiered.decode.sampling import RowNoise, Sampling, draw_step
from tiered.kernels import nucleus, step_io
from tiered.kernels.quant_moe import qlinear as linear

SMALL = 16  # up to this many rows the buckets are powers of two; above it, multiples of STEP
STEP = 16
HEAD = 5 + nucleus.PARAMS  # buffer rows before the block table: token, position, store place, length, bank row,
#                            then the sampling kernels' parameters of each row (kernels/nucleus.py fill_params)


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
    rows: Tensor  # [HEAD + MP, Bb] int64, one copy a step: token, position, K/V store place (pools viewed as
    #               [N * P, ...]), length (0 for padding rows), bank row (-1: own routing), the sampling
    #               parameters (nucleus.PARAMS rows: temperature 0 = greedy), then the block table, row b in column b
    graph: torch.cuda.CUDAGraph | None = None
    logits: Tensor | None = None  # [Bb, V], written by each replay
    picks: Tensor | None = None  # [Bb] int64: each row's next token (argmax, or its draw), written by each replay
    bank: Any = None  # the ReplayBank whose tensors the body gathers from (None: every row routes itself)
    layers: dict[int, int] | None = None  # model layer -> bank layer (bank_layers), with `bank`


class BatchGraphs(BucketGraphs):
    """CUDA graphs of a BatchStep's decode-only steps (every expert resident, attention layers only).

    graphs=False runs the same bucketed body eagerly (any device): what the CPU tests of the buffers, the
    padding rows and the marks run."""

    def __init__(self, step: BatchStep, *, graphs: bool = True) -> None:
        self.step = step
        self.model = step.model
        if graphs and step.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the model is on {step.device}: "
                             "use BatchGraphs(step, graphs=False)")
        why = unsupported(step)
        if why:
            raise ValueError(f"the batch step cannot be graphed: {why}")
        super().__init__(step.device, graphs)
        P = step.state.page_size
        self.max_pages = -(-self.model.max_context // P)
        self.recaptures = 0  # captures of a bucket again: a replayed step of a bank its graph was not captured with
        self.vocab = int(self.model.lm_head.shape[-2])  # the logits' width (the sampling kernels' candidates)
        self.picks: Tensor | None = None  # the last run's picks [B] (on the device)

    def eligible(self, segs: list[Segment]) -> bool:
        """A graph may run this step: every row decodes one token and wants its logits, the rows' routing
        overrides (if any) all come from one ReplayBank, and the bucket was not refused before."""
        if not segs or any(len(s.tokens) != 1 or not s.want_logits for s in segs):
            return False
        return shared_bank(segs)[0] and bucket_for(len(segs)) not in self.failed

    @torch.inference_mode()
    def run(self, segs: list[Segment], *, prev: Tensor | None = None, src: list[int] | None = None,
            count: bool = True, sampling: list[tuple[Sampling, RowNoise | None]] | None = None) -> Tensor | None:
        """The step's logits [B, V] (a view of the bucket's static buffer: read it before the next step), or
        None when no graph can run it (the caller runs it eagerly): padding needs a free page and none is, or
        the bucket's capture failed, or the rows' routing is not one bank's (see `eligible`).
        sampling: each row's parameters and stream (decode/sampling.py graph_ok must hold: no top-k): the graph
        then also draws each row's next token (greedy rows: the argmax), left in `self.picks` [B] (the bucket's
        static buffer, on the device), one key taken from each sampled row's stream. None: `self.picks` holds
        every row's argmax.
        prev [B'] int64 on the device with src [B]: row i's token is prev[src[i]] (the previous step's picks,
        never read by the host: decode/scheduler.py's steps ahead), not segs[i].tokens. count=False leaves the
        step's expert marks on the device for the caller (BatchStep.marks_to_host, count_marks): no host read.
        Raises ValueError when the rows' replay bank cannot serve the model (`bank_layers`), IndexError when a
        row's position is past its replayed routing (as the eager step does)."""
        st = self.step.state
        P, MP = st.page_size, self.max_pages
        B = len(segs)
        Bb = bucket_for(B)
        ok, bank = shared_bank(segs)
        scratch = st.peek_free_page() if Bb > B else 0
        if not ok or scratch is None or any(s.start >= MP * P for s in segs):
            return None
        # padding rows: token 0 at position 0, length 0 (no keys read), K/V stored into the free page, own
        # routing (bank row -1); unused block-table entries stay page 0 (any valid id: the kernel reads a row's
        # pages up to its length)
        if self.device.type == "cuda":  # pinned: the copy does not wait for the stream (a step may still run)
            buf = torch.empty((HEAD + MP, Bb), dtype=torch.int64, pin_memory=True)
            host = buf.numpy()
            host.fill(0)
        else:
            host = np.zeros((HEAD + MP, Bb), dtype=np.int64)
            buf = torch.from_numpy(host)
        host[2, B:] = scratch * P
        host[4] = -1
        cols = np.arange(Bb)
        temps, top_ps, keys = np.zeros(Bb), np.ones(Bb), np.zeros(Bb, dtype=np.int64)
        for i, (p, noise) in enumerate(sampling or ()):
            if p.temperature != 0:
                temps[i], top_ps[i], keys[i] = p.temperature, p.top_p, noise.take()
        nucleus.fill_params(host[5:HEAD], cols, self.vocab, cols, keys, temps, top_ps, cols)
        if (prev is None) != (src is None) or (src is not None and len(src) != B):
            raise ValueError("prev and src go together, src with one index per row")
        for i, s in enumerate(segs):
            p = s.start
            host[:4, i] = (s.tokens[0] if src is None else src[i], p, s.pages[p // P] * P + p % P, p + 1)
            if s.routing is not None:
                s.routing._check(p, 1)  # past its end the gather would read the next member's rows
                host[4, i] = s.routing.base + p
            pages = s.pages[:MP]
            host[HEAD:HEAD + len(pages), i] = pages
        b = self.buckets.get(Bb)
        if b is None:
            b = self.buckets[Bb] = _Bucket(rows=torch.zeros(HEAD + MP, Bb, dtype=torch.int64, device=self.device))
        if bank is not None and b.bank is not bank:
            self._bind(b, bank)
        b.rows.copy_(buf, non_blocking=True)
        if prev is not None:  # the tokens from the device: row i's column holds src[i] until here
            b.rows[0, :B].copy_(prev.index_select(0, b.rows[0, :B]))
        self.step.last = StepCounts(rows=B, tokens=B)
        if not self.graphed:
            logits, picks = self._body(b)
            if count:
                self.step._count_used()
            self.picks = picks[:B]
            return logits[:B]
        if b.graph is None:
            got = self._capture(Bb, lambda: self._body(b), warmups=2)
            if got is None:  # e.g. an operation that cannot be captured: this bucket runs eagerly
                return None
            b.graph, (b.logits, b.picks) = got.graph, got.out
        b.graph.replay()
        self.replays += 1
        if count:
            self.step._count_used()
        self.picks = b.picks[:B]
        return b.logits[:B]

    def stats(self) -> dict:
        return {**super().stats(), "recaptures": self.recaptures}

    def _bind(self, b: _Bucket, bank: Any) -> None:
        """Tie bucket b to `bank`: its body gathers from the bank's tensors, so a graph captured without it or
        with another bank is dropped (captured again on this step). ValueError when the bank cannot serve."""
        b.layers = bank_layers(self.step, bank)
        if b.graph is not None:
            b.graph = b.logits = b.picks = None
            self.recaptures += 1
        b.bank = bank

    def _body(self, b: _Bucket) -> tuple[Tensor, Tensor]:
        """The graphed step: every shape depends on the bucket only. Returns (logits [Bb, V], picks [Bb] int64:
        the argmax, replaced by a draw in rows whose temperature is not 0)."""
        m, step = self.model, self.step
        kernels = m.glue and step_io.enabled()  # the inputs in one launch, the argmax in two (kernels/step_io.py)
        if kernels:
            ins = step_io.rows_inputs(b.rows, HEAD, m.embed, m.rope.cos, m.rope.sin)
            x0 = ins.pop("h")
        else:
            tokens, pos, seqlens = b.rows[0], b.rows[1], b.rows[3].to(torch.int32)
            ins = {"seqlens": seqlens, "bt": b.rows[HEAD:].t().to(torch.int32).contiguous(), "valid": seqlens > 0,
                   "cos": m.rope.cos.index_select(0, pos), "sin": m.rope.sin.index_select(0, pos)}
            x0 = m.embed_rows(tokens)
        plan = {"decode": [0], "other": [], "all_decode": True, "flat": b.rows[2], **ins}
        if b.bank is not None:
            plan["replay"] = BankRows(b.rows[4], b.bank.ids, b.bank.weights, b.layers)
        step.used_marks().zero_()
        h, delta = step.layers(x0, plan, None, None)
        logits = linear(m.add_norm(h, delta, m.final_norm)[1], m.lm_head)  # [Bb, V]
        if kernels:
            picks = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
            step_io.greedy_pick(logits, picks)
        else:
            picks = torch.argmax(logits, dim=-1)
        draw_step(logits, b.rows[5:HEAD], picks, kernel=self.graphed)
        return logits, picks


def shared_bank(segs: list[Segment]) -> tuple[bool, Any]:
    """(ok, bank): whether the rows' routing overrides allow a graph, and their ReplayBank. (True, None): no row
    has one; (True, bank): every row that has one reads `bank` (predict/replay.py ReplayBank.routing); (False,
    None): a row's routing is not a bank's (a host callback), or two rows' banks differ."""
    bank = None
    for s in segs:
        if s.routing is None:
            continue
        rb = getattr(s.routing, "bank", None)
        if rb is None or (bank is not None and rb is not bank):
            return False, None
        bank = rb
    return True, bank


def bank_layers(step: BatchStep, bank: Any) -> dict[int, int]:
    """The bank layer of each MoE layer of the step's model (dense layers route nothing). Raises ValueError,
    saying what to change, when the bank cannot serve the model's steps: another top-k, another device, or a
    MoE layer it does not replay."""
    _, Lb, K = bank.ids.shape
    if K != step.cfg.top_k:
        raise ValueError(f"the replay bank routes top-{K} and the model top-{step.cfg.top_k}: map the routing onto "
                         f"the model's top-k (predict/replay.py map_routing)")
    dev = bank.ids.device
    if dev.type != step.device.type or (None not in (dev.index, step.device.index) and dev.index != step.device.index):
        raise ValueError(f"the replay bank is on {dev} and the model on {step.device}: build the ReplayBank with "
                         f"device={step.device}")
    out = {}
    for l, lw in enumerate(step.model.layers):
        if lw.moe is None:
            continue
        try:
            j = bank.layer(l)
        except IndexError as e:
            raise ValueError(f"{e}: build the ReplayBank with moe_layers naming every MoE layer of the model") from None
        if not 0 <= j < Lb:
            raise ValueError(f"the replay bank has {Lb} layers and MoE layer {l} of the model maps to its layer {j}: "
                             f"give moe_layers (the model layer of each bank layer) for a model with dense layers")
        out[l] = j
    return out


def unsupported(step: BatchStep) -> str | None:
    """Why a BatchStep's decode-only steps cannot be graphed (None: they can)."""
    if step.experts != "model":
        return "its experts are resolved on the host (an expert cache: experts='major')"
    if {ls.kind for ls in step.state.layers} != {"kv"}:
        return "it has DeltaNet or MLA layers (only attention layers are graphed)"
    if step.decode_attention != "paged":
        return "its decode attention runs row by row (decode_attention='rows')"
    return None
