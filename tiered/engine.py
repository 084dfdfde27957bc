"""The generation engine: a layout, a provider and a decoder turned into `load(...).generate(...)`.

Owns: `load` (path -> layout -> provider -> Transformer, tokenizer), `Engine` (prefill in chunks, the
decode loop, sampling with temperature / top-k / top-p and a seed, stopping at EOS or the token
budget, streaming text, stats with the CONTRACTS keys), `GraphedDecode` (one CUDA graph per
attended span for the one-token step, used when every expert is on the device), and the choice of
decode path per step: whole-step graphs (resident experts, no observer), piecewise graphs
(tiered/piecewise.py: a provider whose get() needs the routing on the host, e.g. the expert cache),
or eager.
Does not own: the model's math (model/), where experts live (the provider: model/resident.py or
the expert cache), parsing flags or printing (run_cli.py).
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from tiered.config import ModelConfig
from tiered.model.layers import pick_backend
from tiered.model.moe import ExpertProvider, RoutingObserver
from tiered.model.resident import ResidentExperts
from tiered.model.transformer import Transformer
from tiered.piecewise import GraphCaptureError, PiecewiseDecode, span_for
from tiered.tokenizer import StreamDecoder, Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BUDGET_KEYS = ("vram_gb", "expert_slots", "ram_gb", "io", "policy", "prefetch_depth", "prefetch_budget",
               "verify", "io_register", "ram_preload")
PREFILL_CHUNK = 512  # tokens per prefill forward: bounds the [H, T, S] attention scores and expert groups


class EngineError(ValueError):
    """A request the engine cannot serve (bad device, prompt too long, ...); the message says what to do."""


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1 = no nucleus filter
    seed: int | None = None  # None = nondeterministic


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    stop_reason: str  # "eos", "length" or "context"
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
    if dtype not in DTYPES:
        raise EngineError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
    return DTYPES[dtype]


def resolve_layout(path: str | Path | None) -> Path:
    """A layout directory for `path` (None = the embedded model); checkpoints are repacked into the cache."""
    from tiered.format import MANIFEST

    if path is None:
        from tiered.families import default_model_path
        path = default_model_path()
    p = Path(path)
    if not p.exists():
        raise EngineError(f"model path {p} does not exist: pass a layout or Hugging Face checkpoint directory")
    if (p / MANIFEST).is_file():
        return p
    from tiered.repack import ensure_layout  # the repacker is imported only when handed a checkpoint
    return ensure_layout(p)


def make_provider(layout: Any, *, device: torch.device, budget: dict[str, Any] | None,
                  dtype: torch.dtype | None = None, max_context: int | None = None) -> ExpertProvider:
    """ResidentExperts when no budget flag is set; otherwise the expert cache (store/cache.py)."""
    budget = {k: v for k, v in (budget or {}).items() if v is not None}
    unknown = set(budget) - set(BUDGET_KEYS)
    if unknown:
        raise EngineError(f"unknown budget options {sorted(unknown)}; known: {BUDGET_KEYS}")
    if not budget:
        return ResidentExperts.from_layout(layout, device=device)
    try:
        from tiered.store.cache import make_provider as make_cache
    except ImportError:
        raise EngineError(f"budget flags {sorted(budget)} need the expert cache (tiered.store.cache), which this "
                          "build lacks: drop the flags to keep every expert in memory") from None
    return make_cache(layout, device=device, dtype=dtype, max_context=max_context, **budget)


def load(path: str | Path | None = None, *, device: str | torch.device = "auto",
         dtype: str | torch.dtype | None = None, max_context: int | None = None, attn: str = "auto",
         budget: dict[str, Any] | None = None, observer: RoutingObserver | None = None,
         cuda_graphs: bool = True) -> "Engine":
    """Open a model for generation.

    Args:
        path: a layout or Hugging Face checkpoint directory; None = the embedded default model.
        device: "cpu", "cuda", "cuda:N" or "auto".
        dtype: compute dtype (float32 / bfloat16 / float16); default fp32 on CPU, bf16 on CUDA.
        max_context: KV cache positions (prompt + generated); default min(4096, the model's limit).
        attn: "auto", "flash" or "sdpa".
        budget: expert-cache options (BUDGET_KEYS); None/empty = every expert in memory.
        observer: routing observer (SEAMS.md), called once per layer per forward.
        cuda_graphs: capture the one-token decode step in CUDA graphs when possible: the whole step with
            resident experts, L+1 segments with host routing between them with the expert cache.
    Returns:
        an Engine.
    """
    from tiered.store.disk import Layout

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    layout = Layout.open(resolve_layout(path))
    cfg = layout.config
    ctx = int(max_context or min(4096, cfg.max_position_embeddings))
    if ctx < 1:
        raise EngineError(f"max_context must be positive, got {ctx}")
    backend = pick_backend(attn, dev, dt)
    provider = make_provider(layout, device=dev, budget=budget, dtype=dt, max_context=ctx)
    model = Transformer(cfg, layout.dense(), provider, device=dev, dtype=dt, max_context=ctx, attn=backend,
                        observer=observer)
    tok = Tokenizer.from_dir(layout.path) if layout.tokenizer_path else None
    engine = Engine(model, tok, layout_path=layout.path, cuda_graphs=cuda_graphs and dev.type == "cuda")
    depth = int((budget or {}).get("prefetch_depth") or 0)
    predicted = (budget or {}).get("policy") == "predicted"
    if (depth > 0 or predicted) and not isinstance(provider, ResidentExperts):
        attach_predictor(engine, layout, depth=depth, budget=(budget or {}).get("prefetch_budget"),
                         eviction=provider.vram.table.policy if predicted else None)
    return engine


def attach_predictor(engine: "Engine", layout: Any, *, depth: int, budget: int | None, eviction: Any = None) -> None:
    """Prefetch for --prefetch-depth: the fitted combined predictor when the layout has its parameters
    (`tiered tune --fit-trace` writes them), else next-gate (needs only the model's routers). With
    --policy predicted, `eviction` (the cache's PredictedEviction) is fed each layer's router output."""
    from tiered.predict.predictors import PARAMS_FILE, GateWeights, PredictorParams, make_predictor
    from tiered.predict.prefetch import attach

    cfg = layout.config
    params_path = Path(layout.path) / PARAMS_FILE
    params = PredictorParams.load(params_path) if params_path.is_file() else None
    name = "combined" if params is not None and params.mix_w.numel() else "next-gate"
    if depth <= 0:  # only feeding --policy predicted: a predictor that reads nothing (no hidden-state copies)
        name = "none"
    pred = make_predictor(name, num_layers=cfg.num_layers, num_experts=cfg.num_experts,
                          gates=GateWeights.from_layout(layout), params=params)
    c = int(budget) if budget else (3 * cfg.top_k) // 2  # C = 1.5 K candidates per layer by default
    attach(engine, pred, depth=depth, budget=c, eviction=eviction)
    if depth:
        print(f"tiered: prefetch with the {name} predictor, depth {depth}, {c} candidates per layer", file=sys.stderr)


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


class Engine:
    """A loaded model: `generate` for text, `logits` for teacher-forced scoring."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer | None, *, layout_path: Path | None = None,
                 cuda_graphs: bool = False) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config: ModelConfig = model.config
        self.layout_path = layout_path
        self.device = model.device
        self.dtype = model.dtype
        cuda_graphs = cuda_graphs and self.device.type == "cuda"
        resident = isinstance(model.provider, ResidentExperts)
        # Resident experts: the whole step in one graph per span (steps run eagerly while an observer is set).
        self.graphed = GraphedDecode(model) if cuda_graphs and resident else None
        # A provider whose get() needs the routing on the host: L+1 graphs per span, host routing between.
        self.pieces: PiecewiseDecode | None = None
        if cuda_graphs and not resident:
            try:
                self.pieces = PiecewiseDecode(model, graphs=True)
            except RuntimeError as e:  # e.g. the page-locked host buffer was refused
                print(f"tiered: piecewise CUDA graphs unavailable ({e}); decoding eagerly", file=sys.stderr)
        self.decode_mode = "eager"  # what the last generate's one-token steps ran: full, piecewise or eager
        self.stats: dict[str, Any] = {}

    @property
    def max_context(self) -> int:
        return self.model.max_context

    # --- prompts ---
    def encode(self, text: str, *, chat: bool = False) -> list[int]:
        """Token ids of a prompt; with chat=True the text is one user message under the chat template."""
        if self.tokenizer is None:
            raise EngineError(f"{self.layout_path} has no tokenizer.json: pass token ids instead of text")
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
        outs = [self.model.forward(ids[a:a + PREFILL_CHUNK], a, all_logits=True).float()
                for a in range(0, ids.numel(), PREFILL_CHUNK)]
        return torch.cat(outs)

    def _prefill(self, ids: Tensor) -> Tensor:
        out = None
        for a in range(0, ids.numel(), PREFILL_CHUNK):
            out = self.model.forward(ids[a:a + PREFILL_CHUNK], a)
        return out  # [1, V]

    def _whole_step_graphs(self) -> bool:
        """Whole-step graphs route on the device: a replay would skip an observer or a replayed routing."""
        return self.graphed is not None and self.model.observer is None and self.model.routing is None

    def _planned_mode(self) -> str:
        if self._whole_step_graphs():
            return "full"
        return "piecewise" if self.pieces is not None else "eager"

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
                 on_token: Callable[[int], None] | None = None) -> Generation:
        """Generate a continuation of `prompt` (text or token ids).

        Args:
            max_new_tokens: stop after this many tokens (fewer if EOS comes first or the context fills).
            temperature: 0 = greedy; otherwise sample from softmax(logits / temperature).
            top_k / top_p: filters applied before sampling (0 / 1.0 = off).
            seed: seeds the sampler, so that a run can be repeated.
            on_text: called with each new piece of decoded text (EOS text is never emitted).
            on_token: called with each new token id.
        Returns:
            Generation(text, token_ids, stop_reason, stats); stats are also kept in `self.stats`.
        """
        if max_new_tokens < 0:
            raise EngineError("max_new_tokens must be >= 0")
        params = Sampling(temperature, top_k, top_p, seed)
        check_sampling(params)
        gen = torch.Generator(device="cpu")
        if seed is None:
            gen.seed()
        else:
            gen.manual_seed(seed)
        ids = self._ids(prompt)
        eos = set(self.config.eos_token_ids) if stop_at_eos else set()
        stream = StreamDecoder(self.tokenizer) if self.tokenizer is not None and on_text else None
        out: list[int] = []
        pieces: list[str] = []
        stop = "length"
        self._sync()
        self.decode_mode = self._planned_mode()
        if self.pieces is not None:
            self.pieces.reset_stats()
        t0 = time.perf_counter()
        self._phase("prefill")
        logits = self._prefill(ids) if max_new_tokens else None
        self._phase("decode")
        pos = ids.numel()
        t1 = t_first = time.perf_counter()
        while len(out) < max_new_tokens:
            tok_t = sample(logits[0], params, gen)  # [1] int64 on the logits' device (greedy) or CPU
            tok = int(tok_t)
            if len(out) == 0:
                t_first = time.perf_counter()
            if tok in eos:
                stop = "eos"
                break
            out.append(tok)
            if on_token is not None:
                on_token(tok)
            if stream is not None:
                piece = stream.feed(tok)
                if piece:
                    pieces.append(piece)
                    on_text(piece)
            if len(out) == max_new_tokens:
                break
            if pos >= self.max_context:
                stop = "context"
                break
            logits = self._step(tok_t, tok, pos)
            pos += 1
        self._sync()
        t2 = time.perf_counter()
        if stream is not None:
            tail = stream.flush()
            if tail:
                pieces.append(tail)
                on_text(tail)
        text = "".join(pieces) if stream is not None else (self.tokenizer.decode(out) if self.tokenizer else "")
        self.stats = self._stats(ids.numel(), len(out), t1 - t0, t2 - t_first, max(0, len(out) - 1))
        self.stats["stop_reason"] = stop
        return Generation(text=text, token_ids=out, stop_reason=stop, stats=dict(self.stats))

    def _phase(self, phase: str) -> None:
        """Tell a provider that counts per phase (the expert cache) whether prefill or decode runs."""
        f = getattr(self.model.provider, "set_phase", None)
        if f is not None:
            f(phase)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _stats(self, n_prompt: int, n_gen: int, prefill_s: float, decode_s: float, decode_steps: int) -> dict:
        """CONTRACTS stats. decode_tok_s counts the one-token steps (n_gen - 1: the first token comes from prefill)."""
        s: dict[str, Any] = {
            "tokens_prompt": n_prompt, "tokens_generated": n_gen,
            "prefill_s": prefill_s, "decode_s": decode_s, "decode_steps": decode_steps,
            "prefill_tok_s": n_prompt / prefill_s if prefill_s > 0 else None,
            "decode_tok_s": decode_steps / decode_s if decode_s > 0 and decode_steps else None,
            "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
            "attention": self.model.attn, "linear_attention": self.model.linear_attn,
            "cuda_graphs": self.decode_mode != "eager",
            "decode_graphs": self.decode_mode,
            "max_context": self.max_context, "family": self.config.family,
            "model": str(self.layout_path) if self.layout_path else None,
        }
        ps = self.model.provider.stats()
        s.update(ps)
        if self.decode_mode == "piecewise" and self.pieces is not None:
            s["piecewise"] = self.pieces.stats()  # host time between segments: wait_s (GPU busy), route_s
        if s.get("stall_s") is not None and decode_s > 0:  # the provider's stall time is over decode
            s["stall_share"] = s["stall_s"] / decode_s
        return s


def check_sampling(p: Sampling) -> None:
    if p.temperature < 0 or not math.isfinite(p.temperature):
        raise EngineError(f"temperature must be >= 0 (0 = greedy), got {p.temperature}")
    if p.top_k < 0:
        raise EngineError(f"top_k must be >= 0 (0 = off), got {p.top_k}")
    if not 0 < p.top_p <= 1:
        raise EngineError(f"top_p must be in (0, 1], got {p.top_p}")


def sample(logits: Tensor, p: Sampling, gen: torch.Generator) -> Tensor:
    """logits [V] -> next token id [1] int64. Greedy stays on the logits' device; sampling runs on CPU in fp32."""
    if p.temperature == 0:
        return torch.argmax(logits).view(1)
    x = logits.float().cpu() / p.temperature  # [V]
    if p.top_k > 0 and p.top_k < x.numel():
        kth = torch.topk(x, p.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if p.top_p < 1.0:
        sx, order = torch.sort(x, descending=True)
        probs = torch.softmax(sx, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the tokens ranked above each one
        drop = before >= p.top_p  # keep the smallest prefix whose mass reaches top_p (always >= 1 token)
        x = x.scatter(0, order[drop], float("-inf"))
    return torch.multinomial(torch.softmax(x, dim=-1), 1, generator=gen)
