"""Routing traces: what the router chose, per token and layer, recorded once and replayed offline.

Owns: `Trace` (the arrays of one or more documents), its `.npz` file format (`save` / `load`),
`TraceRecorder` (a routing observer, SEAMS.md, that the engine calls before each layer's experts),
and `record` (run texts teacher-forced through an engine and return their trace).
Does not own: predictors or caches (predictors.py, simulate.py), nor the engine (it only listens).

File format (`numpy.savez_compressed`, version 1). N = tokens of all documents, concatenated:
    format          str  "tiered-trace"
    version         int  1
    meta            str  JSON: {"num_layers", "num_experts", "top_k", "hidden_size", "family", "model",
                          "dtype", "docs": [names], "norm_topk_prob"}, and "moe_layers": [L model layer
                          indices] when the model has dense (expert-free) layers: the arrays' layer axis
                          holds its MoE layers only, in order; "num_layers" stays the model's layer count
    tokens          int32   [N]        token ids
    doc_offsets     int64   [ND+1]     document d is rows doc_offsets[d]:doc_offsets[d+1]; each document
                                       is one sequence from position 0 (prefill-equivalent, teacher-forced)
    topk_ids        int16   [N, L, K]  the router's top-k experts, in router order (highest first)
    topk_weights    float32 [N, L, K]  their routing weights (softmax probs; renormalised when the family does)
    router_logits   float16 [N, L, E]  optional: the router's logits
    hidden          float16 [N, L, D]  optional: residual stream after layer l's attention, before the
                                       post-attention norm (what the next-gate predictor reads)
Legend: N tokens, ND documents, L routed (MoE) layers, K top-k, E experts per layer, D hidden.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from tiered.model.moe import Observer

FORMAT = "tiered-trace"
VERSION = 1


class TraceError(ValueError):
    """A trace file that cannot be read or does not fit the model; the message says what to do."""


@dataclass(frozen=True)
class Trace:
    """Routing of ND documents. Arrays are numpy, shapes as in the module docstring."""

    tokens: np.ndarray  # int32 [N]
    doc_offsets: np.ndarray  # int64 [ND+1]
    topk_ids: np.ndarray  # int16 [N, L, K]
    topk_weights: np.ndarray  # float32 [N, L, K]
    router_logits: np.ndarray | None = None  # float16 [N, L, E]
    hidden: np.ndarray | None = None  # float16 [N, L, D]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        N = self.tokens.shape[0]
        if self.topk_ids.ndim != 3 or self.topk_ids.shape[0] != N:
            raise TraceError(f"topk_ids must be [N={N}, L, K], got {list(self.topk_ids.shape)}")
        if self.topk_weights.shape != self.topk_ids.shape:
            raise TraceError(f"topk_weights {list(self.topk_weights.shape)} != topk_ids {list(self.topk_ids.shape)}")
        if self.doc_offsets[0] != 0 or self.doc_offsets[-1] != N or np.any(np.diff(self.doc_offsets) < 0):
            raise TraceError(f"doc_offsets must rise from 0 to N={N}, got {self.doc_offsets.tolist()}")
        ml = self.meta.get("moe_layers")
        if ml is not None and (len(ml) != self.topk_ids.shape[1] or list(ml) != sorted(set(ml))):
            raise TraceError(f"meta moe_layers {ml} must list the {self.topk_ids.shape[1]} routed model layers in order")
        for name in ("router_logits", "hidden"):
            a = getattr(self, name)
            if a is not None and a.shape[:2] != self.topk_ids.shape[:2]:
                raise TraceError(f"{name} {list(a.shape)} does not match topk_ids {list(self.topk_ids.shape)}")

    # --- shape ---
    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.topk_ids.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.topk_ids.shape[2])

    @property
    def moe_layers(self) -> list[int]:
        """The model layer of each of the trace's L layers (meta "moe_layers"; absent = 0..L-1, every layer routes)."""
        return [int(l) for l in self.meta.get("moe_layers") or range(self.num_layers)]

    @property
    def num_experts(self) -> int:
        return int(self.meta.get("num_experts") or (self.router_logits.shape[2] if self.router_logits is not None
                                                    else int(self.topk_ids.max()) + 1))

    @property
    def num_docs(self) -> int:
        return len(self.doc_offsets) - 1

    @property
    def doc_names(self) -> list[str]:
        return list(self.meta.get("docs") or [f"doc{d}" for d in range(self.num_docs)])

    def doc(self, d: int, max_tokens: int | None = None) -> "Trace":
        """Document d alone (its first max_tokens tokens if given)."""
        a, b = int(self.doc_offsets[d]), int(self.doc_offsets[d + 1])
        if max_tokens is not None:
            b = min(b, a + max_tokens)
        sl = slice(a, b)
        meta = dict(self.meta, docs=[self.doc_names[d]])
        return Trace(self.tokens[sl], np.array([0, b - a], dtype=np.int64), self.topk_ids[sl], self.topk_weights[sl],
                     None if self.router_logits is None else self.router_logits[sl],
                     None if self.hidden is None else self.hidden[sl], meta)

    def docs(self) -> Iterable["Trace"]:
        for d in range(self.num_docs):
            yield self.doc(d)

    def multi_hot(self) -> np.ndarray:
        """bool [N, L, E]: expert e of layer l is used by token n."""
        N, L, K = self.topk_ids.shape
        out = np.zeros((N, L, self.num_experts), dtype=bool)
        np.put_along_axis(out, self.topk_ids.astype(np.int64), True, axis=2)
        return out


def concat(traces: Sequence[Trace]) -> Trace:
    """One trace holding every document of `traces`, in order (same model)."""
    if not traces:
        raise TraceError("concat of no traces")
    offs = [0]
    for t in traces:
        offs.extend((t.doc_offsets[1:] + offs[-1]).tolist())

    def cat(name: str) -> np.ndarray | None:
        arrs = [getattr(t, name) for t in traces]
        return None if any(a is None for a in arrs) else np.concatenate(arrs)

    meta = dict(traces[0].meta, docs=[n for t in traces for n in t.doc_names])
    return Trace(cat("tokens"), np.array(offs, dtype=np.int64), cat("topk_ids"), cat("topk_weights"),
                 cat("router_logits"), cat("hidden"), meta)


def save(trace: Trace, path: str | Path) -> Path:
    """Write `trace` as a compressed .npz (format in the module docstring)."""
    path = Path(path)
    arrays: dict[str, Any] = dict(format=np.array(FORMAT), version=np.array(VERSION),
                                  meta=np.array(json.dumps(trace.meta)), tokens=trace.tokens.astype(np.int32),
                                  doc_offsets=trace.doc_offsets.astype(np.int64),
                                  topk_ids=trace.topk_ids.astype(np.int16),
                                  topk_weights=trace.topk_weights.astype(np.float32))
    if trace.router_logits is not None:
        arrays["router_logits"] = trace.router_logits.astype(np.float16)
    if trace.hidden is not None:
        arrays["hidden"] = trace.hidden.astype(np.float16)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)
    return path


def load(path: str | Path) -> Trace:
    """Read a trace written by `save`; raises TraceError naming the file and what is wrong."""
    path = Path(path)
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise TraceError(f"{path}: not a readable .npz trace ({e}); record one with `tiered trace`") from None
    with z:
        if "format" not in z or str(z["format"]) != FORMAT:
            raise TraceError(f"{path}: not a tiered trace (no format={FORMAT!r}); record one with `tiered trace`")
        if int(z["version"]) != VERSION:
            raise TraceError(f"{path}: trace version {int(z['version'])}, this tiered reads {VERSION}: re-record it")
        opt = lambda k: z[k] if k in z else None  # noqa: E731
        return Trace(z["tokens"], z["doc_offsets"], z["topk_ids"], z["topk_weights"], opt("router_logits"),
                     opt("hidden"), json.loads(str(z["meta"])))


class TraceRecorder(Observer):
    """Routing observer (SEAMS.md) that keeps every routed layer's routing of the current document.

    Give it to the engine when it is built (`load(..., observer=rec)`), then `record(engine, rec, docs)`.
    The model calls it for its MoE layers only: a dense layer (DeepSeek-V3's first_k_dense_replace) routes
    nothing, so the trace's layer axis is the MoE layers in model order and `moe_layers` says which model
    layers they are.

    Args:
        num_layers: L, routed layers expected (None = learned from the first document: the recorder can exist
            before the model).
        logits / hidden: also keep router logits [T, E] and post-attention hidden [T, D] (float16).
    Call `end_doc(tokens)` after each document's forward passes; `trace(meta)` returns everything.
    """

    def __init__(self, num_layers: int | None = None, *, logits: bool = True, hidden: bool = True) -> None:
        self.num_layers = num_layers
        self.moe_layers: list[int] | None = None  # model layers routed by the first document
        self.keep_logits = logits
        self.keep_hidden = hidden
        self._cur: dict[int, dict[str, list[np.ndarray]]] = {}  # model layer -> what it routed so far
        self._docs: list[dict[str, np.ndarray]] = []

    def clear(self) -> None:
        """Forget every recorded document (and a document in progress)."""
        self._cur = {}
        self._docs = []

    @property
    def needs_hidden(self) -> bool:
        return self.keep_hidden

    @property
    def needs_logits(self) -> bool:
        return self.keep_logits

    def on_route(self, layer: int, hidden: Tensor, topk_ids: Tensor, topk_weights: Tensor,
                 router_logits: Tensor | None) -> None:
        c = self._cur.setdefault(layer, {"ids": [], "w": [], "logits": [], "hidden": []})
        c["ids"].append(topk_ids.to("cpu", torch.int16).numpy())
        c["w"].append(topk_weights.to("cpu", torch.float32).numpy())
        if self.keep_logits:
            c["logits"].append(router_logits.to("cpu", torch.float16).numpy())
        if self.keep_hidden:
            c["hidden"].append(hidden.to("cpu", torch.float16).numpy())

    def end_doc(self, tokens: Sequence[int]) -> None:
        """Close the current document: every routed layer must have seen exactly len(tokens) tokens, and the
        routed layers must be those of the first document."""
        T = len(tokens)
        layers = sorted(self._cur)
        if not layers:
            raise TraceError("end_doc with no routing recorded: run a forward with this observer attached first")
        if self.moe_layers is None:
            self.moe_layers = layers
        if layers != self.moe_layers:
            raise TraceError(f"this document routed layers {layers}, the first one {self.moe_layers}: the observer "
                             "saw only part of a document's forward passes (a forward was skipped or run without it)")
        if self.num_layers is None:
            self.num_layers = len(layers)
        if len(layers) != self.num_layers:
            raise TraceError(f"the model routed {len(layers)} layers ({layers}), the recorder expects "
                             f"{self.num_layers}: build TraceRecorder(num_layers=None) to learn them")
        doc: dict[str, np.ndarray] = {"tokens": np.asarray(tokens, dtype=np.int32)}
        for key in ("ids", "w", "logits", "hidden"):
            if not all(self._cur[l][key] for l in layers):
                continue
            per_layer = []
            for l in layers:
                a = np.concatenate(self._cur[l][key])
                if a.shape[0] != T:
                    raise TraceError(f"layer {l} routed {a.shape[0]} tokens for a document of {T}: the observer "
                                     "saw only part of the forward passes (a forward was skipped or run without it)")
                per_layer.append(a)
            doc[key] = np.stack(per_layer, axis=1)  # [T, L, ...]
        self._docs.append(doc)
        self._cur = {}

    def trace(self, meta: dict[str, Any]) -> Trace:
        """The recorded documents as one Trace; meta gains "moe_layers" when a model layer routed nothing."""
        docs = self._docs
        if not docs:
            raise TraceError("no documents recorded")
        offs = np.cumsum([0] + [len(d["tokens"]) for d in docs]).astype(np.int64)
        cat = lambda k: np.concatenate([d[k] for d in docs]) if all(k in d for d in docs) else None  # noqa: E731
        if self.moe_layers != list(range(len(self.moe_layers))):
            meta = dict(meta, moe_layers=list(self.moe_layers))
        return Trace(cat("tokens"), offs, cat("ids"), cat("w"), cat("logits"), cat("hidden"), meta)


def record(engine: Any, recorder: TraceRecorder, docs: Sequence[tuple[str, Sequence[int]]]) -> Trace:
    """Run each (name, token ids) document teacher-forced through `engine` and return the trace.

    `engine` must have been built with `recorder` as its routing observer (or chained into it, e.g. behind a
    prefetcher). The trace holds these documents only (the recorder is cleared first). Documents longer than the engine's context should be split by the caller (see `split_ids`).
    """
    cfg = engine.config
    recorder.clear()
    for _, ids in docs:
        engine.logits(list(ids))
        recorder.end_doc(ids)
    meta = {"num_layers": cfg.num_layers, "num_experts": cfg.num_experts, "top_k": cfg.top_k,
            "hidden_size": cfg.hidden_size, "family": cfg.family, "norm_topk_prob": cfg.norm_topk_prob,
            "model": str(engine.layout_path), "dtype": str(engine.dtype).removeprefix("torch."),
            "docs": [name for name, _ in docs]}
    return recorder.trace(meta)


def split_ids(name: str, ids: Sequence[int], max_len: int) -> list[tuple[str, list[int]]]:
    """A long token list as documents of at most max_len tokens: name, name#1, name#2, ..."""
    ids = list(ids)
    out = []
    for i, a in enumerate(range(0, len(ids), max_len)):
        out.append((name if i == 0 else f"{name}#{i}", ids[a:a + max_len]))
    return out
