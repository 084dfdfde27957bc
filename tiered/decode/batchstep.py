"""The expert-major step: one forward over every row of a batch, each row on its own pages.

Owns: `Segment` (one row's tokens in a step: a one-token decode or a chunk of its prompt), `BatchStep`
(the forward: per layer, attention for all rows over the paged state, the router, every (token, k) entry
grouped by expert, each distinct expert resolved ONCE per step through the provider, one grouped
computation per projection, rows scattered back), the decode-attention seam (`paged_decode_attention`,
plain torch; a Triton kernel with the same signature replaces it on CUDA) and the step's counters.
Does not own: which rows run (scheduler.py), page allocation (state.py), the dense math (model/).

Legend: T tokens in the step (all rows), B rows, D hidden, H query heads, KV kv heads, G = H // KV,
hd head dim, P tokens per page, N pages, E experts, K top-k, U distinct experts of a layer, S slots.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from tiered.decode.state import LayerState, StatePool
from tiered.kernels.grouped import _grouped_mm
from tiered.model.layers import attn_mask, project_qkv, rms_norm
from tiered.model.moe import route, shared_expert
from tiered.store.provider import HostSlotProvider

MAX_GROUPS = 1024  # torch's grouped_mm refuses more groups per call
RowRouting = Callable[[int, int, int], tuple[Tensor, Tensor]]  # (layer, start, T) -> ids [T, K], weights [T, K]


@dataclass
class Segment:
    """One row's share of a step."""
    tokens: list[int]  # token ids, positions start..start+len-1
    start: int  # tokens already in the row's state
    pages: list[int]  # the row's page table; covers start + len(tokens) tokens
    want_logits: bool  # return the logits of the last token (decode, or the last chunk of a prompt)
    routing: RowRouting | None = None  # benchmark mode: replayed routing for this row (predict/replay.py)


@dataclass
class StepCounts:
    """What one step did (the scheduler sums them into stats)."""
    rows: int = 0
    tokens: int = 0
    distinct_experts: int = 0  # sum over layers of the distinct experts the step used
    provider_calls: int = 0  # get() calls (> L only when a layer's experts exceed the provider's slots)
    keys: list[list[int]] = field(default_factory=list)  # per layer: the keys layer*E + e used (when recorded)


def paged_decode_attention(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_table: Tensor, seqlens: Tensor,
                           *, window: int | None = None) -> Tensor:
    """One query token per row over its pages (torch reference; kattn's Triton kernel has this signature).

    q [B, H, hd], k_pool / v_pool [N, P, KV, hd], block_table [B, maxp] int32 (page ids; unused entries any
    valid id), seqlens [B] int32 (tokens in each row's state, this token included) -> [B, H, hd].
    """
    B, H, hd = q.shape
    N, P, KV, _ = k_pool.shape
    G = H // KV
    S = block_table.shape[1] * P
    bt = block_table.long()
    k = k_pool[bt].view(B, S, KV, hd).transpose(1, 2)  # [B, KV, S, hd]
    v = v_pool[bt].view(B, S, KV, hd).transpose(1, 2)
    s = torch.arange(S, device=q.device)
    ok = s[None, :] < seqlens[:, None].long()  # [B, S]
    if window is not None:
        ok &= s[None, :] > seqlens[:, None].long() - 1 - window
    qg = q.view(B, KV, G, hd)  # query head h uses kv head h // G
    o = F.scaled_dot_product_attention(qg, k, v, attn_mask=ok[:, None, None, :], scale=hd ** -0.5)  # [B, KV, G, hd]
    return o.reshape(B, H, hd)


def find_decode_kernel(device: torch.device) -> Callable[..., Tensor]:
    """kattn's Triton kernel on CUDA when this build has it, else the torch reference above."""
    if device.type == "cuda":
        try:
            from tiered.kernels.paged_attention import paged_decode_attention as kernel  # type: ignore
            return kernel
        except ImportError:
            pass
    return paged_decode_attention


class BatchStep:
    """Runs steps of a Transformer (its dense weights and provider) over a StatePool.

    Args:
        model: the Transformer (its contiguous KV cache is not used here).
        state: the paged per-layer state.
        decode_attention: "auto" (rows loop on CPU: the same SDPA call per row as batch-1 decode, so batched
            greedy equals batch-1 greedy; the paged kernel/reference on CUDA), "rows" or "paged".
        record_keys: keep each step's per-layer expert keys in `last.keys` (Belady over the run's steps).
    """

    def __init__(self, model: Any, state: StatePool, *, decode_attention: str = "auto",
                 record_keys: bool = False) -> None:
        self.model = model
        self.state = state
        self.cfg = model.config
        self.device = model.device
        if self.cfg.num_linear_layers or self.cfg.attn_output_gate or self.cfg.num_mla_layers:
            raise NotImplementedError(
                f"the batch step does not run {self.cfg.family} yet (Gated DeltaNet layers keep a per-sequence state, "
                "gated attention, MLA latent caches: notes/SEAMS.md): use `tiered run` for this model")
        if decode_attention == "auto":
            decode_attention = "paged" if self.device.type == "cuda" else "rows"
        if decode_attention not in ("rows", "paged"):
            raise ValueError(f"decode_attention must be auto, rows or paged, got {decode_attention!r}")
        self.decode_attention = decode_attention
        self.decode_kernel = find_decode_kernel(self.device)
        self.record_keys = record_keys
        self.last = StepCounts()
        self.grouped_mm = _grouped_mm_fn(self.device)

    @torch.inference_mode()
    def forward(self, segs: list[Segment]) -> Tensor:
        """Run one step; returns logits [R, V] (compute dtype) for the segments with want_logits, in order."""
        cfg, m, st = self.cfg, self.model, self.state
        P = st.page_size
        dev = self.device
        lens = [len(s.tokens) for s in segs]
        offs = [0]
        for n in lens:
            offs.append(offs[-1] + n)
        T = offs[-1]
        pos_l: list[int] = []
        flat_l: list[int] = []  # where each token's K/V goes in the pool viewed as [N*P, KV, hd]
        for s in segs:
            for i in range(len(s.tokens)):
                p = s.start + i
                pos_l.append(p)
                flat_l.append(s.pages[p // P] * P + p % P)
        tokens = torch.tensor([t for s in segs for t in s.tokens], dtype=torch.int64).to(dev, non_blocking=True)
        pos = torch.tensor(pos_l, dtype=torch.int64).to(dev, non_blocking=True)
        flat = torch.tensor(flat_l, dtype=torch.int64).to(dev, non_blocking=True)
        cos, sin = m.rope.cos.index_select(0, pos), m.rope.sin.index_select(0, pos)  # [T, hd]
        attn_plan = self._attention_plan(segs, offs)
        self.last = StepCounts(rows=len(segs), tokens=T)
        h = F.embedding(tokens, m.embed)  # [T, D]
        for l, lw in enumerate(m.layers):
            x = rms_norm(h, lw.attn_norm, cfg.rms_norm_eps)
            q, k, v = project_qkv(x, lw.attn, cos, sin, cfg)  # [T, H, hd], [T, KV, hd], [T, KV, hd]
            ls = st.layers[l]
            N = ls.k.shape[0]
            ls.k.view(N * P, *ls.k.shape[2:]).index_copy_(0, flat, k)
            ls.v.view(N * P, *ls.v.shape[2:]).index_copy_(0, flat, v)
            h = h + F.linear(self._attend(q, ls, segs, offs, attn_plan), lw.attn.o)
            x = rms_norm(h, lw.mlp_norm, cfg.rms_norm_eps)
            _, ids, wts = route(x, lw.moe.router, cfg.top_k, cfg.norm_topk_prob)  # [T, K], [T, K] fp32
            for s, a in zip(segs, offs):
                if s.routing is not None:
                    ri, rw = s.routing(l, s.start, len(s.tokens))
                    ids[a:a + len(s.tokens)] = ri.to(dev)
                    wts[a:a + len(s.tokens)] = rw.to(dev)
            wc = wts if m.fp32_route_weights else wts.to(x.dtype)
            out = self._experts(x, ids, wc, l)
            if lw.moe.shared_gate is not None:
                out = out + shared_expert(x, lw.moe)
            h = h + out
        last = [offs[i + 1] - 1 for i, s in enumerate(segs) if s.want_logits]
        if not last:
            return h.new_zeros((0, m.lm_head.shape[0]))
        hl = h.index_select(0, torch.tensor(last, dtype=torch.int64, device=dev))
        return F.linear(rms_norm(hl, m.final_norm, cfg.rms_norm_eps), m.lm_head)  # [R, V]

    # --- attention ---
    def _attention_plan(self, segs: list[Segment], offs: list[int]) -> dict:
        """Index tensors shared by every layer: the decode rows' block table and lengths (paged path)."""
        plan: dict = {"decode": [], "other": []}
        for i, s in enumerate(segs):
            one = len(s.tokens) == 1 and self.decode_attention == "paged"
            plan["decode" if one else "other"].append(i)
        if plan["decode"]:
            P = self.state.page_size
            rows = [segs[i] for i in plan["decode"]]
            maxp = max(-(-(s.start + 1) // P) for s in rows)
            bt = [s.pages[:maxp] + [s.pages[0]] * (maxp - min(maxp, len(s.pages))) for s in rows]
            dev = self.device
            plan["bt"] = torch.tensor(bt, dtype=torch.int32).to(dev, non_blocking=True)
            plan["seqlens"] = torch.tensor([s.start + 1 for s in rows], dtype=torch.int32).to(dev, non_blocking=True)
            plan["rows"] = torch.tensor([offs[i] for i in plan["decode"]], dtype=torch.int64).to(dev, non_blocking=True)
        plan["row"] = {i: self._row_plan(segs[i]) for i in plan["other"]}
        return plan

    def _row_plan(self, s: Segment) -> tuple[Tensor, int, int, Tensor | None]:
        """A row's page ids, the span [lo, end) it reads and its mask (None for one query): the same for
        every layer, so built once per step."""
        P, W = self.state.page_size, self.cfg.sliding_window
        t = len(s.tokens)
        end = s.start + t
        lo = 0 if W is None else max(0, s.start - W + 1)
        pages = torch.tensor(s.pages[:-(-end // P)], dtype=torch.int64).to(self.device, non_blocking=True)
        mask = None
        if t > 1:
            G = self.cfg.num_heads // self.cfg.num_kv_heads
            mask = attn_mask(torch.arange(s.start, end, device=self.device), lo, end, window=W, groups=G)
        return pages, lo, end, mask

    def _attend(self, q: Tensor, ls: LayerState, segs: list[Segment], offs: list[int], plan: dict) -> Tensor:
        """q [T, H, hd] -> attention output [T, H*hd], each row over its own pages (K/V already written)."""
        T, H, hd = q.shape
        out = q.new_empty((T, H * hd))
        if plan["decode"]:
            o = self.decode_kernel(q.index_select(0, plan["rows"]), ls.k, ls.v, plan["bt"], plan["seqlens"],
                                   window=self.cfg.sliding_window)  # [B, H, hd]
            out.index_copy_(0, plan["rows"], o.reshape(-1, H * hd))
        for i in plan["other"]:
            a, b = offs[i], offs[i + 1]
            out[a:b] = self._attend_row(q[a:b], ls, *plan["row"][i])
        return out

    def _attend_row(self, q: Tensor, ls: LayerState, pages: Tensor, lo: int, end: int, mask: Tensor | None) -> Tensor:
        """One row's queries q [t, H, hd] at positions end-t..end-1 over its pages -> [t, H*hd].

        The same SDPA call as the contiguous-cache path (layers._sdpa), over the row's gathered keys."""
        t, H, hd = q.shape
        KV = ls.k.shape[2]
        G = H // KV
        kc = ls.k.index_select(0, pages).view(-1, KV, hd)[lo:end].transpose(0, 1)  # [KV, S, hd]
        vc = ls.v.index_select(0, pages).view(-1, KV, hd)[lo:end].transpose(0, 1)
        qg = q.transpose(0, 1).reshape(1, KV, G * t, hd)  # rows (g, t)
        o = F.scaled_dot_product_attention(qg, kc[None], vc[None], attn_mask=mask, scale=hd ** -0.5)
        return o.reshape(H, t, hd).transpose(0, 1).reshape(t, H * hd)

    # --- experts ---
    def _experts(self, x: Tensor, ids: Tensor, wts: Tensor, layer: int) -> Tensor:
        """Routed experts of every token in the step, expert-major. x [T, D], ids [T, K], wts [T, K] -> [T, D].

        Each (token, k) entry is sorted by expert; the U distinct experts are resolved through the provider
        once (in waves of max_experts_per_call when U exceeds it, each expert in exactly one wave); each
        expert's rows go through its gate/up/down in one GEMM each; outputs land in their (token, k) row
        and the K rows of a token are summed once (transformers' grouped_mm rounding).
        """
        prov = self.model.provider
        E = self.cfg.num_experts
        n = max(1, int(prov.max_experts_per_call))
        T, K = ids.shape
        flat = ids.reshape(-1)  # [T*K]
        order = torch.argsort(flat, stable=True)  # entries sorted by expert
        used, counts = torch.unique_consecutive(flat[order], return_counts=True)
        used_l, counts_l = used.tolist(), counts.tolist()  # the one host read of the routing per layer
        c = self.last
        c.distinct_experts += len(used_l)
        if self.record_keys:
            c.keys.append([layer * E + e for e in used_l])
        tok = order // K  # [T*K] token of each sorted entry
        wsorted = wts.reshape(-1)[order]  # [T*K]
        rows = torch.empty((T * K, x.shape[1]), dtype=torch.promote_types(x.dtype, wts.dtype), device=x.device)
        starts = [0]
        for cnt in counts_l:
            starts.append(starts[-1] + cnt)
        split = hasattr(prov, "resident") and hasattr(prov, "wait_slots")
        for w0 in range(0, len(used_l), n):
            wave = list(range(w0, min(w0 + n, len(used_l))))
            experts = [used_l[j] for j in wave]
            if split:
                # One get() for the wave without waiting for its copies; the experts that were already in
                # slots compute first, while the missing ones are copied in, then the rest after their copies.
                here = prov.resident(layer, experts)
                slots = prov.get_slots(layer, experts, wait=False)
                groups = [[i for i, h in enumerate(here) if h], [i for i, h in enumerate(here) if not h]]
            else:
                slots = self._get(layer, experts, x.device)
                groups = [list(range(len(wave)))]
            c.provider_calls += 1
            for g in groups:
                if not g:
                    continue
                if split:
                    prov.wait_slots([slots[i] for i in g])
                self._compute(x, [slots[i] for i in g], [starts[wave[i]] for i in g],
                              [counts_l[wave[i]] for i in g], tok, order, wsorted, rows)
        return rows.view(T, K, -1).sum(1).to(x.dtype)  # [T, D]

    def _get(self, layer: int, experts: list[int], device: torch.device) -> list[int]:
        prov = self.model.provider
        if isinstance(prov, HostSlotProvider):
            return prov.get_slots(layer, experts)
        return prov.get(layer, torch.tensor(experts, dtype=torch.int64, device=device)).tolist()

    def _compute(self, x: Tensor, slots: list[int], starts: list[int], counts: list[int], tok: Tensor,
                 order: Tensor, wsorted: Tensor, rows: Tensor) -> None:
        """The rows of experts in `slots` (entries starts[j]..+counts[j] of the expert-sorted order) through
        their SwiGLU, written into `rows` [T*K, D] at their (token, k) places."""
        W = self.model.provider.weights
        dev = x.device
        if all(starts[j] + counts[j] == starts[j + 1] for j in range(len(starts) - 1)):
            sel = torch.arange(starts[0], starts[-1] + counts[-1], device=dev)  # one contiguous run (usual)
        else:
            sel = torch.cat([torch.arange(a, a + c) for a, c in zip(starts, counts)]).to(dev, non_blocking=True)
        ent = order.index_select(0, sel)  # the (token, k) entries, grouped by expert
        xs = x.index_select(0, tok.index_select(0, sel))  # [n, D]
        if self.grouped_mm is not None and W.gate.dtype == x.dtype:
            y = self._wave_grouped_mm(xs, slots, counts, W)
        else:
            y = torch.empty((xs.shape[0], x.shape[1]), dtype=x.dtype, device=dev)
            dt = x.dtype
            same = W.gate.dtype == dt
            a = 0
            for s, cnt in zip(slots, counts):
                b = a + cnt
                g, u, d = (W.gate[s], W.up[s], W.down[s]) if same else (W.gate[s].to(dt), W.up[s].to(dt), W.down[s].to(dt))
                y[a:b] = F.linear(F.silu(F.linear(xs[a:b], g)) * F.linear(xs[a:b], u), d)
                a = b
        rows.index_copy_(0, ent, y * wsorted.index_select(0, sel)[:, None])

    def _wave_grouped_mm(self, xs: Tensor, slots: list[int], counts: list[int], W: Any) -> Tensor:
        """One grouped GEMM per projection: xs [n, D], rows grouped in `slots` order -> [n, D].

        torch's grouped_mm takes the groups in ascending order over a stack of weights and at most
        MAX_GROUPS of them, so the groups are sorted by slot and cut into runs whose slot span fits; each run
        reads the pool rows [lo, hi) (one layer's experts for resident providers, the slot pool otherwise)."""
        dev = xs.device
        starts = [0]
        for cnt in counts:
            starts.append(starts[-1] + cnt)
        perm = sorted(range(len(slots)), key=lambda j: slots[j])
        y = torch.empty_like(xs)
        a = 0
        while a < len(perm):
            lo = slots[perm[a]]
            b = a
            while b < len(perm) and slots[perm[b]] - lo < MAX_GROUPS:
                b += 1
            run = perm[a:b]
            hi = slots[run[-1]] + 1
            idx_l = [r for j in run for r in range(starts[j], starts[j + 1])]
            per_slot = [0] * (hi - lo)
            for j in run:
                per_slot[slots[j] - lo] = counts[j]
            idx = torch.tensor(idx_l, dtype=torch.int64).to(dev, non_blocking=True)
            offs = torch.tensor(per_slot, dtype=torch.int64).cumsum(0).to(torch.int32).to(dev, non_blocking=True)
            xp = xs.index_select(0, idx)
            g = self.grouped_mm(xp, W.gate[lo:hi].transpose(1, 2), offs=offs)  # [m, F]
            u = self.grouped_mm(xp, W.up[lo:hi].transpose(1, 2), offs=offs)
            y.index_copy_(0, idx, self.grouped_mm(F.silu(g) * u, W.down[lo:hi].transpose(1, 2), offs=offs))
            a = b
        return y


def _grouped_mm_fn(device: torch.device) -> Callable[..., Tensor] | None:
    """torch's grouped GEMM on CUDA (compute capability >= 8.0), else None (the per-expert loop)."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 0):
        return None
    return _grouped_mm()
