"""Teacher-forced quality of a loaded model on text files, alone or against a reference model.

Owns: cutting each file's tokens into non-overlapping windows, perplexity over them, and against a
reference engine on the same tokens: KL divergence (mean and 99th percentile), top-1 agreement and the
per-layer Jaccard overlap of the chosen top-k experts (read with a routing observer, SEAMS.md); the
result dict that `tiered eval --json` prints.
Does not own: loading models (engine.load), flags and printing (the `eval` command in the cli).

Windows: a file's tokens (capped at `max_tokens`) are cut into windows of `window` tokens, each scored
from position 0 with no context carried over; a window of n tokens scores its n - 1 next-token
predictions, so `tokens` counts predictions, not input tokens.
KL is KL(reference || model) = sum_v p_ref(v) (log p_ref(v) - log p_model(v)), per scored position.

Legend: T tokens in a window, V vocab, L layers, K top-k, E experts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

ROW_CHUNK = 256  # positions per log-softmax pass: bounds the [rows, V] temporaries for large vocabularies


class RouteRecorder:
    """A routing observer (give it to engine.load(observer=...)) that keeps each layer's top-k ids of the
    forward passes since the last take(), as host copies."""

    needs_hidden = False
    needs_logits = False
    deferrable = False

    def __init__(self) -> None:
        self.ids: dict[int, list[Tensor]] = {}

    def on_route(self, layer: int, hidden: Tensor, topk_ids: Tensor, topk_weights: Tensor,
                 router_logits: Tensor | None) -> None:
        self.ids.setdefault(layer, []).append(topk_ids.detach().to("cpu"))

    def take(self) -> list[Tensor]:
        """Per layer (in order), int64 [T, K] for every position run since the last take(); clears the record."""
        out = [torch.cat(self.ids[l]) for l in sorted(self.ids)]
        self.ids = {}
        return out


@dataclass
class _Totals:
    """Running sums over scored positions (one file, or all of them)."""
    tokens: int = 0
    nll: float = 0.0
    ref_nll: float = 0.0
    top1_same: int = 0
    kl: list[Tensor] = field(default_factory=list)  # fp32 [T-1] per window
    jac_sum: Tensor | None = None  # fp64 [L]: summed per-token Jaccard
    jac_tokens: int = 0

    def add(self, other: "_Totals") -> None:
        self.tokens += other.tokens
        self.nll += other.nll
        self.ref_nll += other.ref_nll
        self.top1_same += other.top1_same
        self.kl += other.kl
        if other.jac_sum is not None:
            self.jac_sum = other.jac_sum.clone() if self.jac_sum is None else self.jac_sum + other.jac_sum
        self.jac_tokens += other.jac_tokens

    def result(self, with_ref: bool) -> dict[str, Any]:
        n = max(self.tokens, 1)
        out: dict[str, Any] = {"tokens": self.tokens, "perplexity": math.exp(self.nll / n)}
        if with_ref:
            kl = torch.cat(self.kl) if self.kl else torch.zeros(1)
            ref_ppl = math.exp(self.ref_nll / n)
            out.update({
                "reference_perplexity": ref_ppl,
                "perplexity_ratio": out["perplexity"] / ref_ppl,
                "kl_mean": float(kl.double().mean()),
                "kl_p99": float(torch.quantile(kl.double(), 0.99)) if kl.numel() else 0.0,
                "top1_agreement": self.top1_same / n,
                "expert_jaccard": [] if self.jac_sum is None else
                (self.jac_sum / max(self.jac_tokens, 1)).tolist(),
            })
        return out


def windows(ids: list[int], size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Non-overlapping windows of at most `size` tokens over ids[:max_tokens]; windows of one token
    (nothing to predict) are dropped."""
    if size < 2:
        raise ValueError(f"the window must hold at least 2 tokens, got {size}")
    ids = ids[:max_tokens] if max_tokens is not None else ids
    return [ids[a:a + size] for a in range(0, len(ids), size) if len(ids[a:a + size]) > 1]


def default_window(model_limit: int) -> int:
    """The default --max-context of `tiered eval`: min(2048, the model's limit)."""
    return min(2048, int(model_limit))


def _score_window(engine: Any, ids: list[int], reference: Any | None, rec: RouteRecorder | None,
                  ref_rec: RouteRecorder | None) -> _Totals:
    t = _Totals()
    target = torch.tensor(ids[1:], dtype=torch.int64)  # [T-1]
    logits = engine.logits(ids)  # [T, V] fp32
    ref_logits = reference.logits(ids) if reference is not None else None
    kls = []
    for a in range(0, len(ids) - 1, ROW_CHUNK):
        b = min(a + ROW_CHUNK, len(ids) - 1)
        tg = target[a:b].to(logits.device)
        lp = torch.log_softmax(logits[a:b].float(), dim=-1)  # [rows, V]
        t.nll -= float(lp.gather(1, tg[:, None]).sum())
        if ref_logits is not None:
            rlp = torch.log_softmax(ref_logits[a:b].float().to(lp.device), dim=-1)
            t.ref_nll -= float(rlp.gather(1, tg[:, None]).sum())
            kls.append((rlp.exp() * (rlp - lp)).sum(-1).clamp_min(0).cpu())  # [rows]
            t.top1_same += int((lp.argmax(-1) == rlp.argmax(-1)).sum())
    t.tokens = len(ids) - 1
    t.kl = [torch.cat(kls)] if kls else []
    if rec is not None and ref_rec is not None:
        mine, theirs = rec.take(), ref_rec.take()
        E = engine.config.num_experts
        jac = []
        for a_ids, b_ids in zip(mine, theirs):  # per layer, [T, K] each
            oa = torch.zeros(a_ids.shape[0], E, dtype=torch.bool).scatter_(1, a_ids, True)
            ob = torch.zeros(b_ids.shape[0], E, dtype=torch.bool).scatter_(1, b_ids, True)
            jac.append(((oa & ob).sum(-1).double() / (oa | ob).sum(-1).double()).sum())
        t.jac_sum = torch.stack(jac)
        t.jac_tokens = len(ids)
    return t


def evaluate(engine: Any, texts: dict[str, str], *, reference: Any | None = None, window: int | None = None,
             max_tokens: int | None = None, routes: tuple[RouteRecorder, RouteRecorder] | None = None) -> dict[str, Any]:
    """Perplexity of `engine` over `texts` (name -> text), and against `reference` when given.

    Args:
        engine, reference: loaded Engines (engine.load); their max_context must hold `window` tokens. The
            reference scores the same token ids (tokenised by `engine`), so the vocabularies must agree.
        window: tokens per window; default min(2048, engine.max_context).
        max_tokens: cap on each file's tokens (default: all).
        routes: the RouteRecorders the two engines were loaded with (observer=...): adds expert_jaccard.
    Returns:
        {"tokens", "perplexity", "window", "files": [{"file", "tokens", "perplexity", ...}], and with a
        reference "reference_perplexity", "perplexity_ratio", "kl_mean", "kl_p99", "top1_agreement",
        "expert_jaccard" (one mean per layer)}; totals are over all scored positions of all files.
    """
    size = int(window or default_window(engine.max_context))
    for e in (engine, reference):
        if e is not None and e.max_context < size:
            raise ValueError(f"the window is {size} tokens but a model was loaded with max_context "
                             f"{e.max_context}: load it with max_context >= {size}")
    if reference is not None and reference.config.vocab_size != engine.config.vocab_size:
        raise ValueError(f"the reference has a vocabulary of {reference.config.vocab_size} tokens, the model "
                         f"{engine.config.vocab_size}: KL and top-1 need the same tokenizer")
    same_shape = reference is not None and reference.config.num_layers == engine.config.num_layers \
        and reference.config.num_experts == engine.config.num_experts
    rec, ref_rec = routes if routes is not None and same_shape else (None, None)
    for r in (rec, ref_rec):
        if r is not None:
            r.take()  # drop anything recorded before this evaluation
    total, files = _Totals(), []
    for name, text in texts.items():
        ft = _Totals()
        for w in windows(engine.encode(text), size, max_tokens):
            ft.add(_score_window(engine, w, reference, rec, ref_rec))
        files.append({"file": name, **ft.result(reference is not None)})
        total.add(ft)
    return {**total.result(reference is not None), "window": size, "files": files}
