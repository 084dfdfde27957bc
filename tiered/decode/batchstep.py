"""The expert-major step: one forward over every row of a batch, each row on its own pages and slot.

Owns: `Segment` (one row's tokens in a step: a one-token decode or a chunk of its prompt), `BankRows` and
`replay_gather` (a graphed step's replayed routing, gathered from a replay bank on the device), `BatchStep`
(the forward: per layer, the token mixer of every row over its per-layer state, the router, then the experts by
one of two paths: "major", every (token, k) entry grouped by expert, each distinct expert resolved ONCE per
step through the provider, one grouped computation per projection, rows scattered back (an expert cache must
read the routing on the host); or "model", when every expert is resident, the model's own several-token path
with no host read until the step's end), `model_path_ok`, the decode-attention seam (`paged_decode_attention`,
plain torch; on CUDA `paged_decode_kernel`, kernels/attention.py's Triton kernel behind the same signature) and
the step's counters.
Does not own: which rows run (scheduler.py), page and slot allocation (state.py), the per-layer math (model/:
project_qkv, mla_project / mla_attend, deltanet / deltanet_rows, the family's router and dense layers).

Token mixers by the layer's state kind (decode/state.py):
  "kv"         attention: q/k/v for every token, K/V written into the pages, attention per row (CPU: the same
               SDPA call as batch-1 decode; CUDA: the decode rows in one paged call), the output gate
               (Qwen3.5's gated attention: times sigmoid(gate) before o_proj).
  "latent"     MLA (DeepSeek-V3): queries, latents and rope keys for every token, latents written into the
               pages, then per row its gathered latents through mla_attend (expanded for a prompt chunk,
               kv_b absorbed for one token: the single-sequence choice); in paged mode (CUDA) the one-token
               rows together through mla_attend_rows over their gathered pages.
  "recurrent"  Gated DeltaNet: a prompt chunk runs `deltanet` on its row's slot (the single-sequence path:
               the chunked form, or fla's kernels on CUDA); the one-token rows of the step run together in one
               `deltanet_rows` call over their slots' states (gathered, updated, scattered back).
Dense layers (DeepSeek-V3's first layers) run the model's MLP; routing is the model's own rule (softmax,
top-k-then-softmax, sigmoid + groups).
Attention windows per layer (gpt-oss alternates sliding and full layers) and per-head sinks (gpt-oss: the
paged kernel's sinks; the fresh prompts' flash call corrected by its log-sum-exp, model/sinkflash.py, which also
serves models without sinks on CUDA in bf16/fp16; layers.sinks_attend elsewhere). Not here: CUDA graphs of this
step (batchgraph.py).

Legend: T tokens in the step (all rows), B rows, D hidden, H query heads, KV kv heads, G = H // KV,
hd head dim, P tokens per page, N pages, E experts, K top-k, U distinct experts of a layer, S slots,
R kv_lora_rank, dr rope dims.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from tiered.decode.state import LayerState, StatePool
from tiered.kernels.grouped import _grouped_mm
from tiered.kernels.quant_moe import qlinear as linear
from tiered.layout.quant import QuantWeight
from tiered.model import sinkflash
from tiered.model.deltanet import deltanet, deltanet_rows
from tiered.model.layers import attn_mask, project_qkv, project_qkv_fused, sink_rows, sinks_attend
from tiered.model.mla import mla_attend, mla_attend_rows, mla_project
from tiered.model.moe import _expert, add_shared_expert, native_rows, native_rows_ok
from tiered.model.transformer import Routed
from tiered.store.provider import HostSlotProvider

MAX_GROUPS = 1024  # torch's grouped_mm refuses more groups per call
QUANT_ROWS = 16  # quantized experts with at most this many rows in a step take the fused kernels (each row reads
#                 its expert: decode); experts with more (prefill) are dequantized once and multiplied
FRESH_TOKENS = 2048  # fresh prompt rows (start 0) share one masked attention call up to this many tokens in all
RowRouting = Callable[[int, int, int], tuple[Tensor, Tensor]]  # (layer, start, T) -> ids [T, K], weights [T, K]


@dataclass
class Segment:
    """One row's share of a step."""
    tokens: list[int]  # token ids, positions start..start+len-1
    start: int  # tokens already in the row's state
    pages: list[int]  # the row's page table; covers start + len(tokens) tokens
    want_logits: bool  # return the logits of the last token (decode, or the last chunk of a prompt)
    routing: RowRouting | None = None  # benchmark mode: replayed routing for this row (predict/replay.py)
    slot: int = -1  # the row's recurrent-state slot (models with DeltaNet layers; StatePool.alloc_slot)


@dataclass(frozen=True)
class BankRows:
    """A graphed step's replayed routing (decode/batchgraph.py): the rows' routing gathered from one
    predict/replay.py ReplayBank on the device, instead of a host call per row and layer."""
    idx: Tensor  # [T] int64: each row's bank row (its routing's base + its position); -1: own routing, padding
    ids: Tensor  # [N, L', K] int64: the bank's ids (N bank rows, L' bank layers)
    weights: Tensor  # [N, L', K] fp32: the bank's weights
    layers: dict[int, int]  # model layer -> bank layer, for every MoE layer of the model


def replay_gather(rows: BankRows, layer: int, ids: Tensor, wts: Tensor) -> tuple[Tensor, Tensor]:
    """ids [T, K] int64 and wts [T, K] of model layer `layer`, the rows with a bank row replaced by that row's
    routing at the layer's bank layer; on the device (no host read, no loop over rows: graph-capturable)."""
    j = rows.layers[layer]
    use = (rows.idx >= 0)[:, None]  # [T, 1]
    at = rows.idx.clamp(min=0)  # own-routing and padding rows read bank row 0, then keep their own
    ri = rows.ids.select(1, j).index_select(0, at)  # [T, K]
    rw = rows.weights.select(1, j).index_select(0, at)
    return torch.where(use, ri, ids), torch.where(use, rw.to(wts.dtype), wts)


@dataclass
class StepCounts:
    """What one step did (the scheduler sums them into stats)."""
    rows: int = 0
    tokens: int = 0
    distinct_experts: int = 0  # sum over layers of the distinct experts the step used
    provider_calls: int = 0  # get() calls (> L only when a layer's experts exceed the provider's slots)
    keys: list[list[int]] = field(default_factory=list)  # per layer: the keys layer*E + e used (when recorded)


def paged_decode_attention(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_table: Tensor, seqlens: Tensor,
                           *, window: int | None = None, sinks: Tensor | None = None) -> Tensor:
    """One query token per row over its pages (torch reference; `paged_decode_kernel` has this signature).

    q [B, H, hd], k_pool / v_pool [N, P, KV, hd], block_table [B, maxp] int32 (page ids; unused entries any
    valid id), seqlens [B] int32 (tokens in each row's state, this token included; 0 = a padding row, whose
    output is zeros), sinks [H] per-head sink logits (gpt-oss) or None -> [B, H, hd].
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
    if sinks is not None:
        o = sinks_attend(qg, k, v, ok[:, None, None, :], sinks.view(KV, G, 1), hd ** -0.5)  # [B, KV, G, hd]
    else:
        o = F.scaled_dot_product_attention(qg, k, v, attn_mask=ok[:, None, None, :], scale=hd ** -0.5)
    o = o.masked_fill((seqlens == 0)[:, None, None, None], 0.0)  # padding rows (no keys): zeros, as the kernel
    return o.reshape(B, H, hd)


def paged_decode_kernel(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_table: Tensor, seqlens: Tensor,
                        *, window: int | None = None, sinks: Tensor | None = None) -> Tensor:
    """`paged_decode_attention` through kernels/attention.py's Triton split-K kernel (one query token per row;
    the lengths read on the device, so a CUDA graph of the step serves every length): q [B, H, hd] -> [B, H, hd]."""
    from tiered.kernels.attention import decode_attention

    hd = q.shape[-1]
    return decode_attention(q[:, None], k_pool, v_pool, block_table, seqlens, scale=hd ** -0.5, window=window,
                            sinks=sinks)[:, 0]


def find_decode_kernel(device: torch.device) -> Callable[..., Tensor]:
    """The Triton kernel (`paged_decode_kernel`) on CUDA when Triton is installed, else the torch reference."""
    from tiered.kernels.attention import triton_available

    if device.type == "cuda" and triton_available(device):
        return paged_decode_kernel
    return paged_decode_attention


class BatchStep:
    """Runs steps of a Transformer (its dense weights and provider) over a StatePool.

    Args:
        model: the Transformer (its own single-sequence state is not used here).
        state: the per-layer state pool (pages and slots).
        decode_attention: "auto" (rows loop on CPU: the same SDPA call per row as batch-1 decode, so batched
            greedy equals batch-1 greedy; the paged kernel/reference on CUDA), "rows" or "paged".
        record_keys: keep each step's per-layer expert keys in `last.keys` (Belady over the run's steps).
        experts: "auto", "major" or "model". "major" resolves each distinct expert of a layer once through
            the provider (`_experts`: the layer's routing read on the host, which an expert cache needs to
            know what to load). "model" runs the model's own several-token expert path (model/moe.py
            expert_mix: on CUDA the Triton kernels over the provider's `slot_map`, with no host read of the
            routing); the step's distinct experts are then marked on the device and read once, after the
            lm_head. "auto": "model" when the kernels run and the provider maps every expert (all resident
            on the GPU), else "major".
        prefill_attention: "auto" (batched on CUDA, rows on CPU), "rows" (each prompt chunk its own SDPA call
            over its gathered pages: the single-sequence call, so CPU batches equal batch-1 bit for bit) or
            "batched" (the chunks of fresh prompts, start 0, in groups of up to FRESH_TOKENS tokens, one SDPA call
            per group with a block-diagonal causal mask over the step's own K/V: one call where a step of many
            short prompts made one per row and layer).
    """

    def __init__(self, model: Any, state: StatePool, *, decode_attention: str = "auto",
                 record_keys: bool = False, experts: str = "auto", prefill_attention: str = "auto") -> None:
        self.model = model
        self.state = state
        self.cfg = model.config
        self.device = model.device
        # each attention layer's window (gpt-oss alternates sliding and full layers; Mixtral slides in all)
        W = self.cfg.sliding_window
        self._window = [W if slide else None for slide in model.layer_sliding]
        self._windows = sorted({self._window[l] for l, ls in enumerate(state.layers) if ls.kind == "kv"},
                               key=lambda w: -1 if w is None else w)
        if decode_attention == "auto":
            decode_attention = "paged" if self.device.type == "cuda" else "rows"
        if decode_attention not in ("rows", "paged"):
            raise ValueError(f"decode_attention must be auto, rows or paged, got {decode_attention!r}")
        self.decode_attention = decode_attention
        if prefill_attention == "auto":
            prefill_attention = "batched" if self.device.type == "cuda" else "rows"
        if prefill_attention not in ("rows", "batched"):
            raise ValueError(f"prefill_attention must be auto, rows or batched, got {prefill_attention!r}")
        self.prefill_attention = prefill_attention
        # fresh prompts' attention by flash over cu_seqlens (CUDA, fp16/bf16; TIERED_SINK_ATTN=naive: the masked path)
        self._flash_fresh = "kv" in {ls.kind for ls in state.layers} and sinkflash.usable(
            torch.empty(0, 1, self.cfg.head_dim, dtype=model.dtype, device=self.device))
        self.decode_kernel = find_decode_kernel(self.device)
        self.record_keys = record_keys
        self.last = StepCounts()
        self.grouped_mm = _grouped_mm_fn(self.device)
        self.quant_interpret = False  # tests: the fused quantized-expert kernels through Triton's CPU interpreter
        self._kinds = {ls.kind for ls in state.layers}
        if experts == "auto":
            experts = "model" if model.kernels and model_path_ok(model) else "major"
        if experts not in ("major", "model"):
            raise ValueError(f"experts must be auto, major or model, got {experts!r}")
        if experts == "model" and not model_path_ok(model):
            raise ValueError("experts='model' needs a provider that maps every expert (slot_map: all resident), "
                             "and without the kernels experts without biases or a custom activation; use 'major'")
        self.experts = experts
        self._used: Tensor | None = None  # [L, E + 1] bool: the experts each layer used in a step (used_marks)

    @torch.inference_mode()
    def forward(self, segs: list[Segment]) -> Tensor:
        """Run one step; returns logits [R, V] (compute dtype) for the segments with want_logits, in order."""
        m, st = self.model, self.state
        P = st.page_size
        dev = self.device
        lens = [len(s.tokens) for s in segs]
        offs = [0]
        for n in lens:
            offs.append(offs[-1] + n)
        T = offs[-1]
        if st.needs_slot and any(s.slot < 0 for s in segs):
            raise ValueError("a segment has no recurrent-state slot: the model has DeltaNet layers "
                             "(StatePool.alloc_slot gives one per row)")
        pos_l: list[int] = []
        flat_l: list[int] = []  # where each token's K/V (or latent) goes in a pool viewed as [N*P, ...]
        for s in segs:
            for i in range(len(s.tokens)):
                p = s.start + i
                pos_l.append(p)
                flat_l.append(s.pages[p // P] * P + p % P)
        tokens = torch.tensor([t for s in segs for t in s.tokens], dtype=torch.int64).to(dev, non_blocking=True)
        pos = torch.tensor(pos_l, dtype=torch.int64).to(dev, non_blocking=True)
        flat = torch.tensor(flat_l, dtype=torch.int64).to(dev, non_blocking=True)
        cos, sin = m.rope.cos.index_select(0, pos), m.rope.sin.index_select(0, pos)  # [T, r]
        plan = self._plan(segs, offs)
        plan.update(flat=flat, cos=cos, sin=sin)
        self.last = StepCounts(rows=len(segs), tokens=T)
        if self.experts == "model":
            self.used_marks().zero_()
        h, delta = self.layers(m.embed_rows(tokens), plan, segs, offs)  # [T, D] each
        last = [offs[i + 1] - 1 for i, s in enumerate(segs) if s.want_logits]
        if not last:
            logits = h.new_zeros((0, m.lm_head.shape[0]))
        else:
            rows = torch.tensor(last, dtype=torch.int64, device=dev)
            hl, dl = h.index_select(0, rows), None if delta is None else delta.index_select(0, rows)
            logits = linear(m.add_norm(hl, dl, m.final_norm)[1], m.lm_head)  # [R, V]
        if self.experts == "model":
            self._count_used()
        return logits

    def used_marks(self) -> Tensor:
        """[L, E + 1] bool on the device: the experts each layer used in this step ("model" path; column E
        collects the padding rows of a graphed step, which `valid` sends there, and is never counted)."""
        if self._used is None:
            self._used = torch.zeros(len(self.model.layers), self.cfg.num_experts + 1, dtype=torch.bool,
                                     device=self.device)
        return self._used

    def layers(self, h: Tensor, plan: dict, segs: list[Segment] | None,
               offs: list[int] | None) -> tuple[Tensor, Tensor | None]:
        """Every layer over the step's tokens: h [T, D] embedded -> (h, delta), the residual stream entering the
        final norm and the last layer's MLP/MoE output (added there). segs / offs None: a graphed decode-only
        step (decode/batchgraph.py), whose plan holds device buffers only: every row decodes, plan["valid"] [T]
        bool marks the real rows, and plan["replay"] (BankRows, when the step's bucket is bound to a replay
        bank) gives the rows whose routing is replayed; with segs, each row's override is called on the host."""
        m, st, dev = self.model, self.state, self.device
        delta = None  # the previous layer's MLP/MoE output: its residual add is fused with this layer's first norm
        for l, lw in enumerate(m.layers):
            h, x = m.add_norm(h, delta, lw.attn_norm)
            ls = st.layers[l]
            if ls.kind == "kv":
                mixed = self._attention(x, lw.attn, ls, segs, offs, plan, self._window[l])
            elif ls.kind == "latent":
                mixed = self._mla(x, lw.mla, ls, segs, offs, plan)
            else:
                mixed = self._deltanet(x, lw.linear, ls, segs, offs, plan)
            h, x = m.add_norm(h, mixed, lw.mlp_norm)
            if lw.moe is None:  # a dense layer (DeepSeek-V3's first layers): the model's MLP
                delta = m.experts_out(l, Routed(h, x, None, None, None))
                continue
            _, ids, wts = m._route_own(l, x, None)  # the family's rule: [T, K] int64, [T, K] fp32
            if segs is None and "replay" in plan:  # graphed: replayed rows gathered from their bank on the device
                ids, wts = replay_gather(plan["replay"], l, ids, wts)
            for s, a in zip(segs or (), offs or ()):
                if s.routing is not None:
                    ri, rw = s.routing(l, s.start, len(s.tokens))
                    ids[a:a + len(s.tokens)] = ri.to(dev)
                    wts[a:a + len(s.tokens)] = rw.to(dev)
            if self.experts == "model":  # the model's expert path (routed + shared), no host read of ids
                valid = plan.get("valid")
                marks = ids if valid is None else ids.masked_fill(~valid[:, None], self.cfg.num_experts)
                self._used[l].index_fill_(0, marks.reshape(-1), True)
                delta = m.experts_out(l, Routed(h, x, None, ids, wts))
                continue
            wc = wts if m.fp32_route_weights else wts.to(x.dtype)
            out = self._experts(x, ids, wc, l, lw.moe.act)
            if lw.moe.shared_gate is not None:
                out = add_shared_expert(out, x, lw.moe, fused=m.kernels and lw.moe.act is None)
            delta = out
        return h, delta

    def _count_used(self) -> None:
        """The step's distinct experts (and keys) from the device marks: one host read per step."""
        self.count_marks(self.last, self._used[:, :self.cfg.num_experts].cpu().numpy())  # [L, E] bool, one copy

    def marks_to_host(self) -> Tensor:
        """The step's marks [L, E] bool copied to the host without waiting (pinned memory on CUDA): read them
        with `count_marks` once the stream has passed this point (decode/scheduler.py's steps ahead)."""
        used = self.used_marks()[:, :self.cfg.num_experts]
        if used.device.type != "cuda":
            return used.clone()
        out = torch.empty(used.shape, dtype=used.dtype, pin_memory=True)
        return out.copy_(used, non_blocking=True)

    def count_marks(self, c: StepCounts, used: np.ndarray) -> None:
        """Fill c's distinct experts, provider calls and (record_keys) keys from marks [L, E] bool."""
        E = self.cfg.num_experts
        moe = [l for l, lw in enumerate(self.model.layers) if lw.moe is not None]
        if self.record_keys:  # (layer, e) keys, ascending, per MoE layer
            c.keys = [(np.flatnonzero(used[l]) + l * E).tolist() for l in moe]
        c.distinct_experts = int(used.sum())
        c.provider_calls = len(moe)

    # --- per-step plan ---
    def _plan(self, segs: list[Segment], offs: list[int]) -> dict:
        """Index tensors shared by every layer: the decode rows' block table and lengths (paged attention),
        each other row's pages and mask (attention: G groups; MLA: 1), the one-token rows and their slots."""
        dev = self.device
        plan: dict = {"decode": [], "other": []}
        kinds = self._kinds
        if kinds & {"kv", "latent"}:
            for i, s in enumerate(segs):
                one = len(s.tokens) == 1 and self.decode_attention == "paged"
                plan["decode" if one else "other"].append(i)
            if plan["decode"]:
                P = self.state.page_size
                rows = [segs[i] for i in plan["decode"]]
                maxp = max(-(-(s.start + 1) // P) for s in rows)
                bt = [s.pages[:maxp] + [s.pages[0]] * (maxp - min(maxp, len(s.pages))) for s in rows]
                plan["bt"] = torch.tensor(bt, dtype=torch.int32).to(dev, non_blocking=True)
                plan["seqlens"] = torch.tensor([s.start + 1 for s in rows], dtype=torch.int32).to(dev, non_blocking=True)
                plan["rows"] = torch.tensor([offs[i] for i in plan["decode"]], dtype=torch.int64).to(dev, non_blocking=True)
                plan["all_decode"] = len(plan["decode"]) == len(segs)
        if "kv" in kinds:
            G = self.cfg.num_heads // self.cfg.num_kv_heads
            plan["fresh"], plan["other_kv"] = self._fresh_groups(segs, offs, plan["other"])
            plan["row"] = {w: {i: self._row_plan(segs[i], G, w) for i in plan["other_kv"]} for w in self._windows}
        if "latent" in kinds:
            plan["mla_other"] = plan["other"]
            plan["mla_row"] = {i: self._row_plan(segs[i], 1, None) for i in plan["other"]}
        if "recurrent" in kinds:
            one = [i for i, s in enumerate(segs) if len(s.tokens) == 1]
            plan["rec_one"] = one
            plan["rec_chunks"] = [i for i, s in enumerate(segs) if len(s.tokens) > 1]
            if one:
                plan["rec_rows"] = torch.tensor([offs[i] for i in one], dtype=torch.int64).to(dev, non_blocking=True)
                plan["rec_slots"] = torch.tensor([segs[i].slot for i in one], dtype=torch.int64).to(dev, non_blocking=True)
        return plan

    def _fresh_groups(self, segs: list[Segment], offs: list[int],
                      other: list[int]) -> tuple[list[tuple[Tensor, dict]], list[int]]:
        """prefill_attention "batched": the fresh prompt rows (start 0: nothing before this step) of `other` in
        groups of at most FRESH_TOKENS tokens, each (token rows [n] int64, {window: mask [n, n] bool: same row,
        causal, within that window} for each window the layers use), and the rows left to the per-row path (other
        rows, lone fresh rows)."""
        if self.prefill_attention != "batched":
            return [], other
        fresh = [i for i in other if segs[i].start == 0 and 1 < len(segs[i].tokens) <= FRESH_TOKENS]
        groups: list[list[int]] = []
        n = FRESH_TOKENS + 1
        for i in fresh:
            t = len(segs[i].tokens)
            if n + t > FRESH_TOKENS:
                groups.append([])
                n = 0
            groups[-1].append(i)
            n += t
        groups = [g for g in groups if len(g) > 1]
        batched = {i for g in groups for i in g}
        out = []
        for g in groups:
            lens = [len(segs[i].tokens) for i in g]
            idx = [r for i, t in zip(g, lens) for r in range(offs[i], offs[i] + t)]
            idx_t = torch.tensor(idx, dtype=torch.int64).to(self.device, non_blocking=True)
            if self._flash_fresh:  # flash over the rows' own tokens (cu_seqlens): no [n, n] mask
                cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
                out.append((idx_t, (cu.to(self.device, non_blocking=True), max(lens))))
                continue
            rid = [j for j, t in enumerate(lens) for _ in range(t)]
            pos = [p for t in lens for p in range(t)]
            rid_t = torch.tensor(rid).to(self.device, non_blocking=True)
            pos_t = torch.tensor(pos).to(self.device, non_blocking=True)
            ok = (rid_t[:, None] == rid_t[None, :]) & (pos_t[None, :] <= pos_t[:, None])
            oks = {w: ok if w is None else ok & (pos_t[None, :] > pos_t[:, None] - w) for w in self._windows}
            out.append((idx_t, oks))
        return out, [i for i in other if i not in batched]

    def _row_plan(self, s: Segment, groups: int, window: int | None) -> tuple[Tensor, int, int, Tensor | None]:
        """A row's page ids, the span [lo, end) it reads and its mask (None for one query): the same for
        every layer, so built once per step."""
        P = self.state.page_size
        t = len(s.tokens)
        end = s.start + t
        lo = 0 if window is None else max(0, s.start - window + 1)
        pages = torch.tensor(s.pages[:-(-end // P)], dtype=torch.int64).to(self.device, non_blocking=True)
        mask = None
        if t > 1:
            mask = attn_mask(torch.arange(s.start, end, device=self.device), lo, end, window=window, groups=groups)
        return pages, lo, end, mask

    # --- token mixers ---
    def _attention(self, x: Tensor, w: Any, ls: LayerState, segs: list[Segment], offs: list[int],
                   plan: dict, window: int | None) -> Tensor:
        """Attention of every row over its pages (this step's K/V written first), within the layer's window and
        with its sinks (gpt-oss); x [T, D] -> [T, D]."""
        cfg = self.cfg
        P = self.state.page_size
        N = ls.k.shape[0]
        k_rows, v_rows = ls.k.view(N * P, *ls.k.shape[2:]), ls.v.view(N * P, *ls.v.shape[2:])  # [N*P, KV, hd]
        if self.model.glue:  # norms, rotary and the K/V store into the pages in one launch
            q, *gate = project_qkv_fused(x, w, plan["cos"], plan["sin"], cfg, k_rows, v_rows, plan["flat"],
                                         with_gate=cfg.attn_output_gate)
        else:
            q, k, v, *gate = project_qkv(x, w, plan["cos"], plan["sin"], cfg, with_gate=cfg.attn_output_gate)
            k_rows.index_copy_(0, plan["flat"], k)
            v_rows.index_copy_(0, plan["flat"], v)
        o = self._attend(q, ls, segs, offs, plan, window, w.sinks)  # [T, H*hd]
        if gate:  # Qwen3.5's gated attention, as layers.attention applies it
            o = o * torch.sigmoid(gate[0])
        return linear(o, w.o, w.o_bias)

    def _attend(self, q: Tensor, ls: LayerState, segs: list[Segment], offs: list[int], plan: dict,
                window: int | None, sinks: Tensor | None) -> Tensor:
        """q [T, H, hd] -> attention output [T, H*hd], each row over its own pages (K/V already written), keys
        within `window` of each query (None: all before it), with per-head `sinks` [H] (None: none)."""
        T, H, hd = q.shape
        if plan.get("all_decode"):  # every row is one decoding token: the kernel's rows are the step's rows
            return self.decode_kernel(q, ls.k, ls.v, plan["bt"], plan["seqlens"], window=window,
                                      sinks=sinks).reshape(T, H * hd)
        out = q.new_empty((T, H * hd))
        if plan["decode"]:
            o = self.decode_kernel(q.index_select(0, plan["rows"]), ls.k, ls.v, plan["bt"], plan["seqlens"],
                                   window=window, sinks=sinks)  # [B, H, hd]
            out.index_copy_(0, plan["rows"], o.reshape(-1, H * hd))
        for idx, oks in plan["fresh"]:
            out.index_copy_(0, idx, self._attend_fresh(q.index_select(0, idx), ls, plan["flat"].index_select(0, idx),
                                                       oks if isinstance(oks, tuple) else oks[window], sinks, window))
        rows = plan["row"].get(window, {})
        for i in plan["other_kv"]:
            a, b = offs[i], offs[i + 1]
            out[a:b] = self._attend_row(q[a:b], ls, *rows[i], sinks)
        return out

    def _attend_fresh(self, q: Tensor, ls: LayerState, flat: Tensor, ok: Tensor | tuple[Tensor, int],
                      sinks: Tensor | None, window: int | None) -> Tensor:
        """Fresh prompt rows together: q [n, H, hd] over their own K/V (read back from the pages at `flat` [n]),
        ok [n, n] (same row, causal, window), or (cu_seqlens [rows + 1] int32, the longest row) for flash
        attention (model/sinkflash.py, with the sinks' correction) -> [n, H*hd]."""
        n, H, hd = q.shape
        N, P, KV, _ = ls.k.shape
        if isinstance(ok, tuple):
            k = ls.k.view(N * P, KV, hd).index_select(0, flat)  # [n, KV, hd]
            v = ls.v.view(N * P, KV, hd).index_select(0, flat)
            o = sinkflash.flash_sinks(q, k, v, sinks, scale=hd ** -0.5, window=window, cu_seqlens=ok[0],
                                      max_len=ok[1])
            return o.reshape(n, H * hd)
        k = ls.k.view(N * P, KV, hd).index_select(0, flat).transpose(0, 1)  # [KV, n, hd]
        v = ls.v.view(N * P, KV, hd).index_select(0, flat).transpose(0, 1)
        if H != KV:  # query head h reads KV head h // G
            k, v = k.repeat_interleave(H // KV, 0), v.repeat_interleave(H // KV, 0)
        if sinks is not None:
            o = sinks_attend(q.transpose(0, 1), k, v, ok, sinks.view(H, 1, 1), hd ** -0.5)  # [H, n, hd]
            return o.transpose(0, 1).reshape(n, H * hd)
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None], v[None], attn_mask=ok, scale=hd ** -0.5)
        return o[0].transpose(0, 1).reshape(n, H * hd)

    def _attend_row(self, q: Tensor, ls: LayerState, pages: Tensor, lo: int, end: int, mask: Tensor | None,
                    sinks: Tensor | None) -> Tensor:
        """One row's queries q [t, H, hd] at positions end-t..end-1 over its pages -> [t, H*hd].

        The same call as the contiguous-cache path (layers._sdpa, or layers.attention_with_sinks with sinks),
        over the row's gathered keys."""
        t, H, hd = q.shape
        KV = ls.k.shape[2]
        G = H // KV
        kc = ls.k.index_select(0, pages).view(-1, KV, hd)[lo:end].transpose(0, 1)  # [KV, S, hd]
        vc = ls.v.index_select(0, pages).view(-1, KV, hd)[lo:end].transpose(0, 1)
        qg = q.transpose(0, 1).reshape(1, KV, G * t, hd)  # rows (g, t)
        if sinks is not None:
            o = sinks_attend(qg[0], kc, vc, mask, sink_rows(sinks, KV, G, t), hd ** -0.5)  # [KV, G*t, hd]
        else:
            o = F.scaled_dot_product_attention(qg, kc[None], vc[None], attn_mask=mask, scale=hd ** -0.5)
        return o.reshape(H, t, hd).transpose(0, 1).reshape(t, H * hd)

    def _mla(self, x: Tensor, w: Any, ls: LayerState, segs: list[Segment], offs: list[int], plan: dict) -> Tensor:
        """MLA of every row over its latent pages (this step's latents written first); x [T, D] -> [T, D].
        Per row: its pages gathered into [S, R] and [S, dr], then mla_attend as the single-sequence path."""
        m = self.model
        dims = m.mla_dims
        P = self.state.page_size
        q_nope, q_rot, c, k_rot = mla_project(x, w, plan["cos"], plan["sin"], dims)
        N, _, R = ls.latent.shape
        dr = ls.k_rope.shape[-1]
        ls.latent.view(N * P, R).index_copy_(0, plan["flat"], c)
        ls.k_rope.view(N * P, dr).index_copy_(0, plan["flat"], k_rot)
        o = x.new_empty((x.shape[0], dims.heads * dims.v))
        if plan["decode"]:  # paged mode: the one-token rows in one call over their gathered pages
            rows, bt = plan["rows"], plan["bt"].long()
            B = bt.shape[0]
            cs = ls.latent[bt].view(B, -1, R)  # [B, maxp*P, R]
            ks = ls.k_rope[bt].view(B, -1, dr)
            o.index_copy_(0, rows, mla_attend_rows(q_nope.index_select(0, rows), q_rot.index_select(0, rows), cs, ks,
                                                   plan["seqlens"], w.kv_b, dims, m.mla_scale))
        for i in plan["mla_other"]:
            pages, lo, end, mask = plan["mla_row"][i]
            a, b = offs[i], offs[i + 1]
            cs = ls.latent.index_select(0, pages).view(-1, R)[lo:end]  # [S, R]
            ks = ls.k_rope.index_select(0, pages).view(-1, dr)[lo:end]  # [S, dr]
            o[a:b] = mla_attend(q_nope[a:b], q_rot[a:b], cs, ks, w.kv_b, mask, dims, m.mla_scale, absorbed=b - a == 1)
        return linear(o, w.o)

    def _deltanet(self, x: Tensor, w: Any, ls: LayerState, segs: list[Segment], offs: list[int],
                  plan: dict) -> Tensor:
        """Gated DeltaNet of every row on its slot's state; x [T, D] -> [T, D]. Prompt chunks one by one (the
        single-sequence call on the slot's views), the one-token rows in one deltanet_rows call."""
        m = self.model
        out = torch.empty_like(x)
        for i in plan["rec_chunks"]:
            a, b = offs[i], offs[i + 1]
            sl = segs[i].slot
            out[a:b] = deltanet(x[a:b], w, m.delta_shape, ls.conv[sl], ls.recurrent[sl], backend=m.linear_attn,
                                step=m.delta_step)
        if plan["rec_one"]:
            rows, slots = plan["rec_rows"], plan["rec_slots"]
            conv = ls.conv.index_select(0, slots)  # [B, C, W-1]
            rec = ls.recurrent.index_select(0, slots)  # [B, Hv, dk, dv]
            y = deltanet_rows(x.index_select(0, rows), w, m.delta_shape, conv, rec, backend=m.linear_attn,
                              step=m.delta_step)
            ls.conv.index_copy_(0, slots, conv)
            ls.recurrent.index_copy_(0, slots, rec)
            out.index_copy_(0, rows, y)
        return out

    # --- experts ---
    def _experts(self, x: Tensor, ids: Tensor, wts: Tensor, layer: int, act: Any = None) -> Tensor:
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
                              [counts_l[wave[i]] for i in g], tok, order, wsorted, rows, act)
        return rows.view(T, K, -1).sum(1).to(x.dtype)  # [T, D]

    def _get(self, layer: int, experts: list[int], device: torch.device) -> list[int]:
        prov = self.model.provider
        if isinstance(prov, HostSlotProvider):
            return prov.get_slots(layer, experts)
        return prov.get(layer, torch.tensor(experts, dtype=torch.int64, device=device)).tolist()

    def _compute(self, x: Tensor, slots: list[int], starts: list[int], counts: list[int], tok: Tensor,
                 order: Tensor, wsorted: Tensor, rows: Tensor, act: Any = None) -> None:
        """The rows of experts in `slots` (entries starts[j]..+counts[j] of the expert-sorted order) through
        their SwiGLU, written into `rows` [T*K, D] at their (token, k) places.

        Paths: torch's grouped GEMM (CUDA, unquantized plain SwiGLU); the fused dequantizing kernels of
        kernels/quant_moe.py with one (expert slot) per entry for quantized experts with <= QUANT_ROWS rows
        (CUDA); on the CPU, the native kernel's expert rows (moe.native_rows: one call for the wave, plain SwiGLU,
        fp32 compute or quantized experts); else a loop over the experts through moe._expert (dequantized per
        expert, biases and gpt-oss's activation included)."""
        W = self.model.provider.weights
        dev = x.device
        if all(starts[j] + counts[j] == starts[j + 1] for j in range(len(starts) - 1)):
            sel = torch.arange(starts[0], starts[-1] + counts[-1], device=dev)  # one contiguous run (usual)
        else:
            sel = torch.cat([torch.arange(a, a + c) for a, c in zip(starts, counts)]).to(dev, non_blocking=True)
        ent = order.index_select(0, sel)  # the (token, k) entries, grouped by expert
        xs = x.index_select(0, tok.index_select(0, sel))  # [n, D]
        plain = act is None and getattr(W, "gate_bias", None) is None
        quant = isinstance(W.gate, QuantWeight)
        y = None  # CPU: the wave in one native call where the kernel serves it
        if plain and self.model.cpu_native and native_rows_ok(x, W):
            y = native_rows(xs, W, slots, counts)
        if y is None and plain and not quant and self.grouped_mm is not None and W.gate.dtype == x.dtype:
            y = self._wave_grouped_mm(xs, slots, counts, W)
        elif y is None:
            y = torch.empty((xs.shape[0], x.shape[1]), dtype=x.dtype, device=dev)
            loop = set(range(len(slots)))
            if plain and quant:  # experts with few rows: the fused kernels (each row reads its expert once)
                few = [j for j in loop if counts[j] <= QUANT_ROWS]
                at = [0]
                for c in counts:
                    at.append(at[-1] + c)
                idx_l = [r for j in few for r in range(at[j], at[j + 1])]
                idx = torch.tensor(idx_l, dtype=torch.int64).to(dev, non_blocking=True)
                yq = quant_entries(xs.index_select(0, idx), [slots[j] for j in few], [counts[j] for j in few], W,
                                   interpret=self.quant_interpret) if few else None
                if yq is not None:
                    y.index_copy_(0, idx, yq)
                    loop -= set(few)
            a = 0
            for j, (s, cnt) in enumerate(zip(slots, counts)):
                b = a + cnt
                if j in loop:  # dequantized per expert when quantized (moe._expert), then GEMMs over its rows
                    y[a:b] = _expert(xs[a:b], W, s, x.dtype, act)
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


def model_path_ok(model: Any) -> bool:
    """Whether the model's own several-token expert path can serve a step without a host read of the routing:
    the provider maps every expert (`slot_map`), and with the kernels quantized pools are in a format the grouped
    kernels read (both kernel families compute gpt-oss's biases and clamped SwiGLU); without the kernels (the
    torch path) only plain SwiGLU experts without biases."""
    from tiered.model import moe_gpu

    prov = model.provider
    W = getattr(prov, "weights", None)
    if not hasattr(prov, "slot_map") or W is None:
        return False
    if model.kernels:
        return not isinstance(W.gate, QuantWeight) or moe_gpu.quant_kernels_ok(W)
    return getattr(W, "gate_bias", None) is None and all(lw.moe is None or lw.moe.act is None for lw in model.layers)


def _grouped_mm_fn(device: torch.device) -> Callable[..., Tensor] | None:
    """torch's grouped GEMM on CUDA (compute capability >= 8.0), else None (the per-expert loop)."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 0):
        return None
    return _grouped_mm()


def quant_entries(xs: Tensor, slots: list[int], counts: list[int], W: Any, *, interpret: bool = False) -> Tensor | None:
    """Quantized experts through the fused dequantizing kernels (kernels/quant_moe.py), one expert per row:
    xs [n, D] grouped by expert (counts[j] rows use slot slots[j]) -> [n, D] in xs's dtype (each row's expert
    output rounded once, as the grouped path). None when the kernels cannot serve these stacks (not CUDA, and
    not the interpreter in tests; a format without a fused kernel): the caller takes the per-expert loop."""
    from tiered.kernels.quant_moe import _strides, kernel_ok, quant_down, quant_gate_up

    if not (all(kernel_ok(xs, w, interpret=interpret) for w in (W.gate, W.up, W.down)) and W.gate.fmt == W.up.fmt
            and _strides(W.gate) == _strides(W.up)):
        return None
    dev = xs.device
    per = torch.tensor(slots, dtype=torch.int64).to(dev, non_blocking=True)
    per = per.repeat_interleave(torch.tensor(counts, dtype=torch.int64).to(dev, non_blocking=True))[:, None]  # [n, 1]
    h = quant_gate_up(xs, per, W.gate, W.up)  # [n, F] fp32
    return quant_down(h, per, torch.ones(per.shape, dtype=torch.float32, device=dev), W.down, xs.dtype)
