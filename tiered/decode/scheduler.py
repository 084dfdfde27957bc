"""Continuous batching: requests become rows of expert-major steps, up to --max-batch at once.

Owns: `SamplingParams` (per request: max_tokens, temperature, top-k/p, seed, stop strings), `Request`
(a request and its row state: tokens, pages, text, finish reason), `Scheduler` (a bounded wait queue,
admission against the page budget, prefill chunks riding the same step as decode rows, preemption by
recompute when the pages run out, sampling, stop strings, the `sink` callbacks, and the batch stats of
CONTRACTS: decode_tok_s, rows_per_step, distinct_experts_per_step, bytes_per_generated_token).
Does not own: the forward (batchstep.py), page storage (state.py), threads or HTTP (serve/).

Thread rule: `submit` and `cancel` may be called from any thread; `step` and `run_until_idle` run on the one
thread that owns the model (the engine thread).

Sampling runs on the model's device for the whole step (decode/sampling.py `sample_rows`: on CUDA three kernel
launches for all the step's sampled rows; each draw's noise is keyed by its row's seed and draw count, so a seeded
request draws the same tokens whatever its batch).

Steps ahead (`ahead`, on by default): when every row decodes one token from a CUDA graph, the step's picks
stay on the device and the next step is launched from them before the host reads them; the host then accepts the
first step's tokens (detokenise, stop checks, sinks) while the device runs the second. A row that a pick ends (EOS,
a stop string) has run one step too many: that pick is dropped. Rows the length limit ends are known in advance and
are left out. A cancel, a request that could be admitted, a row short of pages, or a step no graph can run ends the
chain: the step in flight is accepted and the next step runs as before.

A row's tokens are `seq` = prompt + generated; `cached` of them have their K/V in the row's pages. Each step
feeds a row seq[cached:cached+n]: n = 1 for a decoding row, a chunk of the prompt while it prefills, and
the whole sequence again after a preemption. The logits of the last token of seq are sampled.
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from tiered.decode.batchstep import BatchStep, RowRouting, Segment, StepCounts
from tiered.decode.options import PREFILL_TOKENS, RESIDENT_PREFILL_TOKENS, BatchConfig
from tiered.decode.state import StatePool, pool_pages, pool_slots
from tiered.decode.sampling import (RowNoise, Sampling, SamplingError, check_sampling, graph_ok, row_noise,
                                    sample_rows)
from tiered.layout.tokenizer import StreamDecoder

Sink = Callable[["Request", str, bool], None]  # (request, new text, finished), called on the engine thread


class RequestError(ValueError):
    """A request the scheduler cannot take (empty or too long a prompt, bad parameters); says what to do."""


class QueueFull(RuntimeError):
    """The wait queue is full: retry later (the server answers 503 with Retry-After)."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16  # generated tokens at most (EOS and stop strings may end it sooner)
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None  # None = nondeterministic sampling
    stop: tuple[str, ...] = ()  # generation ends before the first occurrence of any of these
    stop_at_eos: bool = True

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_k, self.top_p, self.seed)

    def check(self) -> None:
        if self.max_tokens < 0:
            raise RequestError(f"max_tokens must be >= 0, got {self.max_tokens}")
        try:
            check_sampling(self.sampling)
        except SamplingError as e:
            raise RequestError(str(e)) from None
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise RequestError("stop strings must be non-empty strings")


@dataclass(eq=False)
class Request:
    """A request and its row. Fields below `routing` are the scheduler's (read them in the sink)."""
    id: str
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    sink: Sink | None = None
    routing: RowRouting | None = None  # benchmark mode: this row's replayed routing
    stream: bool = True  # False (batch jobs): with no stop strings the text is decoded once, when the row ends
    out_ids: list[int] = field(default_factory=list)
    text: str = ""  # generated text (cut at a stop string)
    emitted: int = 0  # characters of `text` handed to the sink
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"
    error: str | None = None
    pages: list[int] = field(default_factory=list)
    slot: int = -1  # the row's recurrent-state slot (DeltaNet models; -1 = none held)
    cached: int = 0
    t_submit: float = 0.0
    t_first: float | None = None  # when the first token was sampled
    t_done: float | None = None
    _noise: RowNoise | None = None  # the row's random stream (seed, draws made)
    _sampling: Sampling | None = None
    _decoder: StreamDecoder | None = None
    _admitted: int = -1  # admission order (preemption takes the youngest)

    @property
    def seq_len(self) -> int:
        return len(self.prompt_ids) + len(self.out_ids)

    def token_at(self, i: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[i] if i < n else self.out_ids[i - n]

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass
class _Ahead:
    """A graphed decode step whose picks the host has not read yet (see "Steps ahead")."""
    rows: list[Request]  # the step's rows, in its order
    picks: torch.Tensor  # [B] int64 on the device: each row's pick, the next step's tokens
    host: torch.Tensor  # [B] int64 on the host (pinned on CUDA): the picks, once `ready`
    marks: torch.Tensor  # [L, E] bool on the host: the experts the step used, once `ready`
    ready: Any  # torch.cuda.Event recorded after both copies (None off CUDA: already there)
    counts: StepCounts


class Scheduler:
    """Continuous batching over one Engine (its model, provider and tokenizer).

    Args:
        engine: a loaded Engine (tiered.engine.load).
        max_batch: rows per step at most.
        kv_gb: GiB for the per-row state (K/V pages of attention layers, latent pages of MLA layers, and
            max_batch recurrent-state slots of DeltaNet layers, paid first); default enough for max_batch full contexts,
            capped at 2 GiB. On CUDA it is part of --vram-gb.
        page_size: tokens per page.
        max_queue: waiting requests at most (submit raises QueueFull beyond it).
        prefill_tokens: prompt tokens per step at most (chunks of new prompts ride the decode steps); None =
            RESIDENT_PREFILL_TOKENS when the step takes the model's expert path on CUDA (every expert resident:
            a step's host work is paid once for more tokens), else PREFILL_TOKENS (an expert cache's scratch and
            the decode rows' wait stay small).
        record_keys: keep each step's per-layer expert keys (benchmarks: Belady over the run).
        decode_attention: BatchStep's choice ("auto", "rows", "paged").
        experts: BatchStep's expert path ("auto", "major", "model").
        prefill_attention: BatchStep's attention of prompt chunks ("auto", "rows", "batched").
        cuda_graphs: replay decode-only steps from CUDA graphs (decode/batchgraph.py) when the step allows it:
            CUDA, every expert resident (experts "model"), attention layers only; other steps run eagerly.
        kv_pages: the page count itself (wins over kv_gb; tests).
        ahead: launch a graphed decode step before the host reads the previous one's picks (the module's
            "Steps ahead"); False: every step's picks are read and accepted before the next step is built.
    """

    def __init__(self, engine: Any, *, max_batch: int = 8, kv_gb: float | None = None, page_size: int = 16,
                 max_queue: int = 256, prefill_tokens: int | None = None, record_keys: bool = False,
                 decode_attention: str = "auto", kv_pages: int | None = None, experts: str = "auto",
                 cuda_graphs: bool = True, prefill_attention: str = "auto", ahead: bool = True) -> None:
        if max_batch < 1:
            raise RequestError(f"--max-batch must be >= 1, got {max_batch}")
        self.engine = engine
        self.model = engine.model
        self.config = engine.config
        self.tokenizer = engine.tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_context = engine.max_context
        cfg, dt = self.config, self.model.dtype
        opts = BatchConfig(max_batch=max_batch, kv_gb=kv_gb, page_size=page_size)
        pages = kv_pages
        if pages is None:
            pages = pool_pages(opts, cfg, self.max_context, dt)
        self.state = StatePool(cfg, num_pages=max(1, pages), page_size=page_size, device=self.model.device, dtype=dt,
                               num_slots=pool_slots(opts, cfg))
        self.step_fn = BatchStep(self.model, self.state, record_keys=record_keys, decode_attention=decode_attention,
                                 experts=experts, prefill_attention=prefill_attention)
        if prefill_tokens is None:
            resident = self.step_fn.experts == "model" and self.model.device.type == "cuda"
            prefill_tokens = RESIDENT_PREFILL_TOKENS if resident else PREFILL_TOKENS
        self.prefill_tokens = max(1, int(prefill_tokens))
        self.graphs = None  # BatchGraphs of the decode-only steps, when they can be graphed
        if cuda_graphs and self.model.device.type == "cuda":
            from tiered.decode.batchgraph import BatchGraphs, unsupported

            if unsupported(self.step_fn) is None:
                self.graphs = BatchGraphs(self.step_fn)
        self.eos = set(cfg.eos_token_ids)
        self.ahead = bool(ahead)
        self._ahead: _Ahead | None = None  # the launched step whose picks are still on their way
        self._lock = threading.Lock()
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self._cancel: set[Request] = set()
        self._admissions = 0
        self.reset_stats()

    @classmethod
    def from_config(cls, engine: Any, config: BatchConfig, **kw: Any) -> "Scheduler":
        kw.setdefault("cuda_graphs", not config.no_cuda_graphs)
        return cls(engine, max_batch=config.max_batch, kv_gb=config.kv_gb, page_size=config.page_size,
                   max_queue=config.max_queue, prefill_tokens=config.prefill_tokens, **kw)

    # --- thread-safe entry points ---
    def submit(self, req: Request) -> Request:
        """Queue a request (validated here: errors raise RequestError, a full queue QueueFull)."""
        req.params.check()
        ids = req.prompt_ids
        if not ids:
            raise RequestError("the prompt is empty: give at least one token")
        if len(ids) > self.max_context:
            raise RequestError(f"the prompt has {len(ids)} tokens but max_context is {self.max_context}: "
                              "shorten the prompt or raise --max-context")
        V = self.config.vocab_size
        if min(ids) < 0 or max(ids) >= V:
            raise RequestError(f"token ids must be in 0..{V - 1}")
        if self.state.pages_needed(len(ids) + 1) > self.state.num_pages:
            raise RequestError(f"the prompt needs {self.state.pages_needed(len(ids) + 1)} pages of state but "
                              f"--kv-gb holds {self.state.num_pages}: raise --kv-gb or shorten the prompt")
        with self._lock:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (the queue holds {self.max_queue})")
            req.t_submit = time.perf_counter()
            req._noise = row_noise(req.params.seed)
            req._sampling = req.params.sampling
            req._decoder = StreamDecoder(self.tokenizer) if self.tokenizer is not None else None
            self.waiting.append(req)
        return req

    def cancel(self, req: Request) -> None:
        """Drop a request; its row and pages are freed at the start of the next step."""
        with self._lock:
            self._cancel.add(req)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    def idle(self) -> bool:
        with self._lock:
            return not self.waiting and not self.running and not self._cancel and self._ahead is None

    # --- the engine thread ---
    def run_until_idle(self) -> None:
        while not self.idle():
            self.step()

    @torch.inference_mode()
    def step(self) -> int:
        """Admit, run one step over every row, sample, emit. Returns the rows that ran (0 = nothing to do)."""
        t0 = time.perf_counter()  # the step's host work counts: admission and segments too
        if self._ahead is not None:
            try:
                c, sampled = self._step_ahead()
            except BaseException:
                self._ahead = None
                raise
            self._tally(time.perf_counter() - t0, False, c, sampled)
            return c.rows
        self._apply_cancels()
        self._admit()
        segs, rows = self._segments()
        if not segs:
            return 0
        prov = self.model.provider
        set_phase = getattr(prov, "set_phase", None)
        prefill = any(len(s.tokens) > 1 for s in segs)
        if set_phase is not None:
            set_phase("prefill" if prefill else "decode")
        graphed = self.graphs is not None and self.graphs.eligible(segs)
        ahead = graphed and self.ahead
        samp = self._in_graph(rows) if graphed else None
        logits = self.graphs.run(segs, count=not ahead, sampling=samp) if graphed else None
        picks = self.graphs.picks if logits is not None and samp is not None else None
        if logits is not None and ahead:  # the picks stay on the device: the next call launches from them
            self._ahead = self._launch(rows, logits, picks)
            self._tally(time.perf_counter() - t0, False, None, 0)
            return len(segs)
        if logits is None:
            logits = self.step_fn.forward(segs)
        for r, s in zip(rows, segs):
            if not s.want_logits:  # a prompt chunk short of the end: its K/V are in, nothing to sample
                r.cached += len(s.tokens)
        sampled = self._sample(logits, [r for r, s in zip(rows, segs) if s.want_logits], picks)
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)
        self._tally(time.perf_counter() - t0, prefill, self.step_fn.last, sampled)
        return len(segs)

    def _tally(self, dt: float, prefill: bool, c: StepCounts | None, sampled: int) -> None:
        """Count a step() call of dt seconds; c None: it only launched a step (its counts come when accepted)."""
        self.busy_s += dt
        if not prefill:
            self.decode_s += dt
            self.decode_tokens += sampled
        if c is None:
            return
        self.steps += 1
        self.rows_sum += c.rows
        self.distinct_sum += c.distinct_experts
        self.provider_calls += c.provider_calls
        if self.step_fn.record_keys:
            self.step_keys.append(c.keys)
            self.step_times.append(dt)
            self.step_prefill.append(prefill)
            self.step_rows.append(c.rows)

    def _picks(self, logits: torch.Tensor, rows: list[Request]) -> torch.Tensor:
        """[R] int64 on the logits' device: argmax for greedy rows, a draw keyed by each sampled row's stream."""
        return sample_rows(logits, [r._sampling for r in rows], [r._noise for r in rows])

    def _in_graph(self, rows: list[Request]) -> list[tuple[Sampling, RowNoise | None]] | None:
        """The rows' sampling for a graphed step to draw inside its graph, or None when a row's top-k keeps it out
        (those steps draw after the graph, by sample_rows)."""
        params = [r._sampling for r in rows]
        return list(zip(params, [r._noise for r in rows])) if graph_ok(params, self.graphs.vocab) else None

    # --- steps ahead ---
    def _launch(self, rows: list[Request], logits: torch.Tensor, picks: torch.Tensor | None = None) -> _Ahead:
        """The picks of a launched step (greedy or sampled, on the device; drawn here unless its graph drew them),
        left there, and their copies (and the step's expert marks) to the host, not waited for."""
        if picks is None:
            picks = self._picks(logits, rows)
        if picks.device.type == "cuda":
            host = torch.empty(picks.shape, dtype=picks.dtype, pin_memory=True).copy_(picks, non_blocking=True)
            marks = self.step_fn.marks_to_host()
            ready = torch.cuda.Event()
            ready.record()
        else:
            host, marks, ready = picks.clone(), self.step_fn.marks_to_host(), None
        return _Ahead(rows, picks, host, marks, ready, self.step_fn.last)

    def _step_ahead(self) -> tuple[StepCounts, int]:
        """Launch the next step from the picks of the one in flight (when `_chain` allows), then wait for the
        one in flight and accept its picks. Returns its counts and the tokens accepted."""
        a = self._ahead
        self._ahead = self._chain(a)
        if a.ready is not None:
            a.ready.synchronize()
        self.step_fn.count_marks(a.counts, a.marks.numpy())
        now, sampled = time.perf_counter(), 0
        for r, tok in zip(a.rows, a.host.tolist()):
            if r.done:  # ended by the previous step's pick (or cancelled): this pick ran one step too many
                continue
            r.cached = r.seq_len
            if r.t_first is None:
                r.t_first = now
            self._accept(r, tok)
            sampled += 1
        if self._ahead is not None and all(r.done for r in self._ahead.rows):
            self._ahead = None  # every row of the launched step has ended: nothing of it will be read
        return a.counts, sampled

    def _chain(self, a: _Ahead) -> _Ahead | None:
        """The step after `a`, launched with a's picks as its tokens, or None when the chain must end: a cancel
        or an admissible request waits, a row runs short of pages or past its replayed routing, a row is
        not a's, or no graph can run the step. Rows the length limit ends at a's pick are left
        out; rows an EOS or a stop string ends there cannot be known yet, and run."""
        rows, src, segs = [], [], []
        need = live = ending = 0
        for i, r in enumerate(a.rows):
            if r.done:
                continue
            live += 1
            if r.cached != r.seq_len - 1:
                return None
            if len(r.out_ids) + 1 >= r.params.max_tokens or r.seq_len >= self.max_context:
                ending += 1
                continue  # a's pick is its last token
            start = r.seq_len  # a's pick goes here
            if r.routing is not None and hasattr(r.routing, "_check"):
                try:
                    r.routing._check(start, 1)
                except IndexError:
                    return None
            need += max(0, self.state.pages_needed(start + 1) - len(r.pages))
            rows.append(r)
            src.append(i)
            segs.append(Segment([0], start, r.pages, True, r.routing, r.slot))
        if not rows or need > self.state.free_pages or len(self.running) != live:  # a running row is not a's
            return None
        with self._lock:  # a request the rows left after a's pick would admit joins now, as without the chain
            if self._cancel or (self.waiting and live - ending < self.max_batch):
                return None
        if not self.graphs.eligible(segs):
            return None
        for r, s in zip(rows, segs):
            grow = self.state.pages_needed(s.start + 1) - len(r.pages)
            if grow > 0:
                r.pages += self.state.alloc(grow)  # s.pages is r.pages: the segment sees them
        samp = self._in_graph(rows)
        logits = self.graphs.run(segs, prev=a.picks, src=src, count=False, sampling=samp)
        if logits is None:
            return None
        return self._launch(rows, logits, self.graphs.picks if samp is not None else None)

    def _apply_cancels(self) -> None:
        with self._lock:
            cancels, self._cancel = self._cancel, set()
            for r in cancels:
                if r in self.waiting:
                    self.waiting.remove(r)
        for r in cancels:
            if not r.done:
                self._finish(r, "cancelled")

    def _admit(self) -> None:
        """FIFO: the head of the queue joins when a row is free, its prompt's pages are, and (DeltaNet models)
        a recurrent-state slot is: a sequence's state is its pages plus its slot (StatePool.bytes_for)."""
        st = self.state
        while len(self.running) < self.max_batch:
            with self._lock:
                if not self.waiting:
                    return
                r = self.waiting[0]
                need = st.pages_needed(r.seq_len + 1) - len(r.pages)
                if need > st.free_pages or (st.needs_slot and r.slot < 0 and not st.free_slots):
                    return
                self.waiting.popleft()
            r.pages += st.alloc(need)
            if r.slot < 0:
                r.slot = st.alloc_slot()  # zeroed: the row's state starts from its first token
            r._admitted = self._admissions
            self._admissions += 1
            self.running.append(r)

    def _segments(self) -> tuple[list[Segment], list[Request]]:
        """Each running row's tokens for this step: decode rows first, then prompt chunks within the budget."""
        budget = self.prefill_tokens
        segs: list[Segment] = []
        rows: list[Request] = []
        todo = {id(r): r.seq_len - r.cached for r in self.running}
        preempted0 = self.preemptions
        for r in sorted(self.running, key=lambda r: (todo[id(r)] > 1, r._admitted)):
            if r.done or (self.preemptions != preempted0 and r not in self.running):  # finished, or preempted
                continue  # by an earlier row of this loop
            left = todo[id(r)]
            n = 1 if left == 1 else min(left, budget)
            if n <= 0 or (left > 1 and budget <= 0):
                continue
            if not self._ensure_pages(r, r.cached + n, segs, rows):
                continue
            if left > 1:
                budget -= n
            if n == 1 and r.cached >= len(r.prompt_ids):  # a decode row: its last sampled token
                toks = [r.out_ids[r.cached - len(r.prompt_ids)]]
            else:
                toks = [r.token_at(i) for i in range(r.cached, r.cached + n)]
            segs.append(Segment(toks, r.cached, r.pages, n == left, r.routing, r.slot))  # its last token: logits
            rows.append(r)
        return segs, rows

    def _ensure_pages(self, r: Request, tokens: int, segs: list[Segment], rows: list[Request]) -> bool:
        """Grow r's page table to hold `tokens`. When the pool is empty the youngest row is preempted
        (dropped from this step if it was in it); False when that is r itself (it waits in the queue)."""
        need = self.state.pages_needed(tokens) - len(r.pages)
        while need > self.state.free_pages:
            rivals = [v for v in self.running if not v.done]
            if rivals == [r]:
                self._finish(r, "length")  # the pool cannot hold this one sequence
                return False
            v = max(rivals, key=lambda v: v._admitted)
            if v in rows:
                i = rows.index(v)
                del rows[i], segs[i]
            self._preempt(v)
            if v is r:
                return False
        if need > 0:
            r.pages += self.state.alloc(need)
        return True

    def _preempt(self, v: Request) -> None:
        """Free v's pages and slot and queue it first again: it recomputes its state from seq when readmitted
        (a DeltaNet state cannot be rewound, so the slot starts again from zero)."""
        self.state.free(v.pages)
        self.state.free_slot(v.slot)
        v.pages, v.cached, v.slot = [], 0, -1
        self.running.remove(v)
        self.preemptions += 1
        with self._lock:
            self.waiting.appendleft(v)

    def _sample(self, logits: torch.Tensor, rows: list[Request], picks: torch.Tensor | None = None) -> int:
        """Pick each row's next token (on the logits' device; `picks`: the graph drew them), advance its state, emit
        text; returns tokens sampled."""
        picks = (self._picks(logits, rows) if picks is None else picks).tolist()
        now = time.perf_counter()
        for i, r in enumerate(rows):
            r.cached = r.seq_len
            if r.t_first is None:
                r.t_first = now
            self._accept(r, picks[i])
        return len(rows)

    def _accept(self, r: Request, tok: int) -> None:
        """Append a sampled token to r (or finish it) and hand new text to its sink."""
        p = r.params
        if len(r.out_ids) >= p.max_tokens:
            self._finish(r, "length")
            return
        if p.stop_at_eos and tok in self.eos:
            self._finish(r, "stop")
            return
        r.out_ids.append(tok)
        self.tokens_generated += 1
        if r._decoder is not None and (r.stream or p.stop):
            r.text += r._decoder.feed(tok)
            if self._cut_stop(r):
                return
        if len(r.out_ids) >= p.max_tokens or r.seq_len - 1 >= self.max_context:
            self._finish(r, "length")
            return
        hold = max((len(s) for s in p.stop), default=1) - 1  # a stop string may still be forming
        safe = len(r.text) - hold
        if safe > r.emitted and r.sink is not None:
            piece, r.emitted = r.text[r.emitted:safe], safe
            r.sink(r, piece, False)

    def _cut_stop(self, r: Request) -> bool:
        for s in r.params.stop:
            i = r.text.find(s, max(0, r.emitted - len(s)))
            if i >= 0:
                r.text = r.text[:i]
                self._finish(r, "stop", flush=False)
                return True
        return False

    def _finish(self, r: Request, reason: str, *, flush: bool = True, error: str | None = None) -> None:
        if r.done:
            return
        if r._decoder is not None and not (r.stream or r.params.stop):  # the text was left to the end
            r.text = self.tokenizer.decode(r.out_ids)
        elif flush and reason in ("stop", "length") and r._decoder is not None:
            r.text += r._decoder.flush()
            if self._cut_stop(r):
                return
        r.finish_reason = reason
        r.error = error
        r.t_done = time.perf_counter()
        if r in self.running:  # the row and its pages are free for the next step
            self.running.remove(r)
            self.state.free(r.pages)
            self.state.free_slot(r.slot)
            r.pages, r.slot = [], -1
        piece = r.text[r.emitted:] if reason in ("stop", "length") else ""
        r.emitted = len(r.text)
        if r.sink is not None:
            r.sink(r, piece, True)
        self.finished += 1

    # --- stats ---
    def reset_stats(self) -> None:
        """Zero the counters; with record_keys, step_keys / step_times / step_prefill / step_rows hold, per step,
        each layer's expert keys, the seconds, whether prompt tokens rode it, and its rows."""
        self.steps = self.rows_sum = self.distinct_sum = self.provider_calls = 0
        self.tokens_generated = self.decode_tokens = self.finished = self.preemptions = 0
        self.busy_s = self.decode_s = 0.0
        self._bytes0 = self._provider_bytes()
        self.step_keys, self.step_times, self.step_prefill, self.step_rows = [], [], [], []

    def _provider_bytes(self) -> int:
        s = self.model.provider.stats()
        return int(s.get("decode", {}).get("bytes_h2d", 0)) + int(s.get("prefill", {}).get("bytes_h2d", 0))

    def stats(self) -> dict[str, Any]:
        """CONTRACTS batch keys plus the provider's tier stats."""
        n = max(1, self.steps)
        s: dict[str, Any] = dict(self.model.provider.stats())
        s.update({
            "steps": self.steps, "tokens_generated": self.tokens_generated, "requests_finished": self.finished,
            "rows_per_step": self.rows_sum / n, "distinct_experts_per_step": self.distinct_sum / n,
            "provider_calls_per_step": self.provider_calls / n,
            "decode_tok_s": self.decode_tokens / self.decode_s if self.decode_s > 0 else None,
            "gen_tok_s": self.tokens_generated / self.busy_s if self.busy_s > 0 else None,
            "busy_s": self.busy_s, "decode_s": self.decode_s, "preemptions": self.preemptions,
            "bytes_per_generated_token": ((self._provider_bytes() - self._bytes0) / self.tokens_generated
                                          if self.tokens_generated else 0.0),
            "max_batch": self.max_batch, "kv_pages": self.state.num_pages, "page_size": self.state.page_size,
            "kv_gib": self.state.nbytes / (1 << 30),
            "state_slots": self.state.num_slots, "slot_bytes": self.state.slot_bytes,
            "page_bytes": self.state.page_bytes,
            "device": str(self.model.device), "dtype": str(self.model.dtype).removeprefix("torch."),
            "decode_attention": self.step_fn.decode_attention, "experts_path": self.step_fn.experts,
            "prefill_attention": self.step_fn.prefill_attention, "prefill_tokens": self.prefill_tokens,
            "cuda_graphs": self.graphs.stats() if self.graphs is not None else None,
        })
        return s
