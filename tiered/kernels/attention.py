"""Decode attention over a paged KV cache: a Triton split-K (flash-decoding) kernel and its torch reference.

Owns: `decode_attention` (the launcher: a few query tokens per row, B rows, keys and values read through a
block table, the sequence lengths read from a device tensor so that one CUDA graph serves every length),
`decode_attention_ref` (the same math in plain torch, explicit fp32 softmax: the oracle for tests),
`paged_view` (a contiguous per-layer cache seen as pages, zero-copy), `write_paged` (store new K/V through a
block table), `pick_splits` (how many programs share one row's sequence) and `triton_available`.
Does not own: the cache buffers (model/layers.py `KVCache`, the batch scheduler's page pools), the q/k/v
projections, rotary embeddings, or prefill attention (SDPA over the contiguous cache).

The math, per row b with n = seqlens[b] tokens in the cache (this call's T tokens already written at
positions n-T..n-1):
    query t of row b sits at position p = n - T + t and attends keys s with s <= p (causal) and, with a
    window W, s > p - W (transformers' rule); query head h reads KV head h // G;
    o = softmax(q.k * scale, over those keys [+ one sink logit per head]) @ v
    A sink (gpt-oss) adds exp(sink_h) to the softmax denominator and nothing to the numerator.
Rows with n = 0 (padding of a batch) get zeros.

Kernel layout: program (b * KV + kv_head, split) takes the G*T query rows of one KV head (ordered
(t, g), padded to 16 rows for tl.dot) and one contiguous slice of the row's keys; the slices are
sized from the device length, so the grid is fixed for every length. With more than one split, a
second kernel merges the partial (max, sum, acc) triples; under a grid of more than COMBINE_LO splits (a long
max_context) it reads the accumulators of the first COMBINE_LO only when no later split holds keys (a short
cache). All softmax arithmetic is fp32 in base 2.
With PDL the split kernel loads the length, the block table and its first tile's older keys and values before
its wait (`_preload_ok`: what the kernel before it, which stores this call's k and v, does not write), and the
T new rows after it.

Legend: B rows, T query tokens per row, H query heads, KV key/value heads, G = H // KV, hd head dim,
P pages in a pool, PS tokens per page, MP max pages per row, NS splits.
"""
from __future__ import annotations

import torch
from torch import Tensor

from tiered.kernels.pdl import gdc_enter, launch_args, preload_enabled

try:  # the CPU torch wheel does not bring triton; the runtime must import without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

LOG2E = 1.4426950408889634
MAX_QUERY_ROWS = 128  # G*T per KV head per program: the query tile must stay in registers
BLOCK_N = 64  # keys per tile
COMBINE_LO = 16  # splits the combine merges in a short tile when no later split holds keys (grids of more splits)


def triton_available(device: torch.device | str) -> bool:
    """True when the Triton kernel can run on `device`: CUDA with triton importable (the CPU runs it only
    under the interpreter, in tests)."""
    return triton is not None and torch.device(device).type == "cuda"


# --- plain torch reference ---

def decode_attention_ref(q: Tensor, k_pages: Tensor, v_pages: Tensor, block_table: Tensor, seqlens: Tensor, *,
                         scale: float, window: int | None = None, sinks: Tensor | None = None) -> Tensor:
    """The oracle: q [B, T, H, hd], k/v_pages [P, PS, KV, hd], block_table [B, MP] int, seqlens [B] int,
    sinks [H] or None -> o [B, T, H, hd] in q's dtype (explicit softmax in fp32, one row at a time)."""
    B, T, H, hd = q.shape
    PS, KV = k_pages.shape[1], k_pages.shape[2]
    G = H // KV
    out = torch.zeros_like(q)
    for b in range(B):
        n = int(seqlens[b])
        if n == 0:
            continue
        s = torch.arange(n, device=q.device)
        pages = block_table[b].long()[s // PS]
        k = k_pages[pages, s % PS].float()  # [n, KV, hd]
        v = v_pages[pages, s % PS].float()
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)  # [n, H, hd]
        logits = torch.einsum("thd,shd->hts", q[b].float(), k) * scale  # [H, T, n]
        p = (n - T + torch.arange(T, device=q.device))[:, None]  # [T, 1] query positions
        ok = s[None, :] <= p
        if window is not None:
            ok &= s[None, :] > p - window
        logits = logits.masked_fill(~ok[None], float("-inf"))
        if sinks is not None:  # one extra logit per head, dropped after the softmax
            sink = sinks.float().view(H, 1, 1).expand(H, T, 1)
            probs = torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1)[..., :n]
        else:
            probs = torch.softmax(logits, dim=-1)
        out[b] = torch.einsum("hts,shd->thd", probs, v).to(q.dtype)
    return out


# --- views and writes of paged caches (plain torch, graph-capturable) ---

def paged_view(kv: Tensor, *, heads_first: bool, page_size: int | None = None) -> tuple[Tensor, Tensor]:
    """One layer of a contiguous cache seen as pages, without a copy.

    Args:
        kv: [KV, S, hd] (heads_first, the SDPA layout) or [S, KV, hd] (tokens first, flash's layout).
        page_size: tokens per page; must divide S. None = one page of S tokens.
    Returns:
        pages [S // PS, PS, KV, hd] (a strided view of kv), block_table [1, S // PS] int32 = arange, on kv's device.
    """
    if heads_first:
        KV, S, hd = kv.shape
        sh, ss, sd = kv.stride()
    else:
        S, KV, hd = kv.shape
        ss, sh, sd = kv.stride()
    ps = S if page_size is None else int(page_size)
    if ps <= 0 or S % ps:
        raise ValueError(f"page_size {page_size} must be positive and divide the cache's {S} positions")
    pages = kv.as_strided((S // ps, ps, KV, hd), (ps * ss, ss, sh, sd))
    table = torch.arange(S // ps, dtype=torch.int32, device=kv.device)[None]
    return pages, table


def write_paged(k_pages: Tensor, v_pages: Tensor, block_table: Tensor, positions: Tensor, k: Tensor,
                v: Tensor) -> None:
    """Store k, v [B, T, KV, hd] at positions [B, T] (int64, on device) of each row, through the block table.

    No host sync: the page of (b, t) is block_table[b, pos // PS], its slot pos % PS.
    """
    PS = k_pages.shape[1]
    pages = torch.gather(block_table.long(), 1, positions // PS)  # [B, T]
    slots = positions % PS
    k_pages[pages, slots] = k.to(k_pages.dtype)
    v_pages[pages, slots] = v.to(v_pages.dtype)


# --- launcher ---

def pick_splits(rows: int, max_seqlen: int, *, device: torch.device | str, block_n: int = BLOCK_N) -> int:
    """Splits per (row, KV head) so that about two programs per SM run when the sequence is long, never more
    than the tiles of `max_seqlen` (an upper bound known on the host: the grid may not depend on the length)."""
    dev = torch.device(device)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 1
    tiles = max(1, -(-max_seqlen // block_n))
    return max(1, min(tiles, -(-2 * sms // max(1, rows)), 256))


def decode_attention(q: Tensor, k_pages: Tensor, v_pages: Tensor, block_table: Tensor, seqlens: Tensor, *,
                     scale: float, window: int | None = None, sinks: Tensor | None = None,
                     num_splits: int | None = None, max_seqlen: int | None = None,
                     out: Tensor | None = None) -> Tensor:
    """Attention of a few query tokens per row over a paged KV cache (the math: module docstring).

    Args:
        q: [B, T, H, hd] (any strides; any hd up to 256, padded to a power of two >= 16 inside).
        k_pages, v_pages: [P, PS, KV, hd] (any strides, e.g. `paged_view` of a contiguous cache).
        block_table: [B, MP] int32, page ids of each row's positions in order.
        seqlens: [B] int32 on the device: tokens in each row's cache, this call's T included.
        scale: softmax scale (hd ** -0.5 usually).
        window: sliding window W (keys s > p - W), None = full causal.
        sinks: [H] per-head sink logits (gpt-oss), None = no sink.
        num_splits: programs per (row, KV head) along the sequence; None = `pick_splits`.
        max_seqlen: an upper bound of seqlens for `pick_splits` (None = the block table's capacity).
        out: [B, T, H, hd] to write into (e.g. a static buffer); None = a new tensor.
    Returns:
        o [B, T, H, hd] in q's dtype.
    """
    if triton is None:
        raise RuntimeError("decode_attention needs triton: pip install triton (it ships with torch on CUDA), "
                           "or use --attn sdpa")
    B, T, H, hd = q.shape
    P, PS, KV, hdk = k_pages.shape
    if hdk != hd or v_pages.shape != k_pages.shape:
        raise ValueError(f"k/v pages {tuple(k_pages.shape)}/{tuple(v_pages.shape)} do not match q's head dim {hd}")
    if H % KV:
        raise ValueError(f"{H} query heads are not a multiple of {KV} KV heads")
    G = H // KV
    if G * T > MAX_QUERY_ROWS:
        raise ValueError(f"{T} query tokens x {G} heads per KV head exceed {MAX_QUERY_ROWS} rows: use SDPA "
                         "(prefill) for long chunks")
    if block_table.dtype != torch.int32 or seqlens.dtype != torch.int32:
        raise TypeError("block_table and seqlens must be int32")
    if tuple(seqlens.shape) != (B,) or block_table.shape[0] != B:
        raise ValueError(f"block_table {tuple(block_table.shape)} / seqlens {tuple(seqlens.shape)} need {B} rows")
    if hd > 256:
        raise ValueError(f"head dim {hd} > 256 is not supported by the decode kernel")
    if max_seqlen is None:
        max_seqlen = block_table.shape[1] * PS
    ns = int(num_splits) if num_splits else pick_splits(B * KV, max_seqlen, device=q.device)
    o = torch.empty_like(q) if out is None else out
    m_pad = max(16, triton.next_power_of_2(G * T))
    hd_pad = max(16, triton.next_power_of_2(hd))
    has_sinks = sinks is not None
    sinks_arg = sinks.float().contiguous() if has_sinks else q  # a placeholder pointer, never read
    common = dict(T=T, G=G, HD=hd, M_PAD=m_pad, HD_PAD=hd_pad, HAS_SINKS=has_sinks)
    split_fn, combine_fn = _kernels(q.device)
    common.update(launch_args(q.device))
    pre = _preload_ok(common)
    # fp32 dots (not TF32) for fp32 inputs; also under the interpreter, whose dots mis-read bf16 operands.
    common["DOT_F32"] = q.dtype == torch.float32 or interpreted()
    if ns == 1:
        part_o = part_m = part_l = o  # placeholders: the single split writes o directly
    else:
        part_o = torch.empty((B * KV, ns, m_pad, hd_pad), dtype=torch.float32, device=q.device)
        part_m = torch.empty((B * KV, ns, m_pad), dtype=torch.float32, device=q.device)
        part_l = torch.empty((B * KV, ns, m_pad), dtype=torch.float32, device=q.device)
    split_fn[(B * KV, ns)](
        q, k_pages, v_pages, block_table, seqlens, sinks_arg, o, part_o, part_m, part_l,
        scale * LOG2E, 0 if window is None else int(window), KV,
        *q.stride(), *k_pages.stride(), *v_pages.stride(), *block_table.stride(), *o.stride(),
        PAGE=PS, BLOCK_N=BLOCK_N, HAS_WINDOW=window is not None, SPLIT=ns > 1, PRE=pre, **common,
        num_warps=4)
    if ns > 1:
        combine_fn[(B * KV, G * T)](
            part_o, part_m, part_l, sinks_arg, o, KV, ns, *o.stride(),
            NS_PAD=max(2, triton.next_power_of_2(ns)), NS_LO=COMBINE_LO,
            **{k: v for k, v in common.items() if k != "DOT_F32"},
            num_warps=4)
    return o


def _preload_ok(opts: dict) -> bool:
    """Whether the split kernel loads the length, the block table and its first tile's older keys and values before
    its PDL wait (PRE): PDL on (opts carry GDC) and pdl.preload_enabled() (TIERED_PRELOAD=0 turns it off). Those are
    written two or more kernels back (pdl.py: then they are visible); the T new rows, which the kernel right before
    stores, are loaded after the wait. Tests patch this to run the PRE code under the interpreter."""
    return "GDC" in opts and preload_enabled()


def _kernels(device: torch.device) -> tuple:
    """The two kernels: compiled for CUDA tensors; CPU tensors need Triton's interpreter, which is chosen
    when triton is imported (TRITON_INTERPRET=1 before the first `import triton`, as the CPU tests do)."""
    if device.type != "cuda" and not interpreted():
        raise RuntimeError("the Triton decode-attention kernel runs on CPU tensors only under Triton's "
                           "interpreter: set TRITON_INTERPRET=1 before triton is first imported, or use --attn sdpa")
    return _SPLIT, _COMBINE


def interpreted() -> bool:
    """True when the kernels were built for Triton's interpreter (they then run on CPU tensors)."""
    return _INTERPRETED


# --- kernels (plain functions, wrapped by triton.jit below or by the interpreter) ---

def _tile(q, k, v, s, s_ok, qpos, m_i, l_i, acc, scale_log2, window,
          HAS_WINDOW: tl.constexpr, DOT_F32: tl.constexpr):
    """One tile of keys s [BLOCK_N] (k, v [BLOCK_N, HD_PAD] loaded, zero where masked) folded into the running
    (max, sum, acc) of the query rows (online softmax, base 2)."""
    if DOT_F32:
        qk = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        qk = tl.dot(q, tl.trans(k))
    qk = qk * scale_log2  # [M_PAD, BLOCK_N], base-2 logits
    ok = s_ok[None, :] & (s[None, :] <= qpos[:, None])
    if HAS_WINDOW:
        ok = ok & (s[None, :] > qpos[:, None] - window)
    qk = tl.where(ok, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet stay at zero
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(qk - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if DOT_F32:
        pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    return m_new, l_i, acc


def _split_kernel(Q, K, V, BT, SEQ, SINKS, O, PO, PM, PL,
                  scale_log2, window, KV,
                  sq_b, sq_t, sq_h, sq_d,
                  sk_p, sk_s, sk_h, sk_d,
                  sv_p, sv_s, sv_h, sv_d,
                  sbt_b, sbt_p,
                  so_b, so_t, so_h, so_d,
                  T: tl.constexpr, G: tl.constexpr, HD: tl.constexpr, M_PAD: tl.constexpr, HD_PAD: tl.constexpr,
                  PAGE: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, SPLIT: tl.constexpr,
                  HAS_SINKS: tl.constexpr, DOT_F32: tl.constexpr, GDC: tl.constexpr = False,
                  PRE: tl.constexpr = False):
    # PRE (with PDL): the length, the block table and the first tile's keys and values of positions before this
    # call's T (rows the previous kernel, which stores the new k and v, does not write) are loaded before the wait;
    # the T new rows after it. Without PRE every load follows the wait. The same sums either way.
    if not PRE:
        gdc_enter(GDC)
    pid = tl.program_id(0)  # b * KV + kv head
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    b = pid // KV
    kvh = pid % KV
    n = tl.load(SEQ + b)  # tokens in this row's cache

    lo = n * 0  # the oldest key any query sees
    if HAS_WINDOW:
        lo = tl.maximum(n - T - window + 1, 0)
    # keys per split, in whole tiles (plain integer arithmetic: tl.cdiv is a nested jit call, slow interpreted)
    per = ((tl.maximum(n - lo, 0) + num_splits - 1) // num_splits + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    start = lo + split * per
    end = tl.minimum(start + per, n)

    d = tl.arange(0, HD_PAD)
    d_ok = d < HD
    # the first tile, its keys and values loaded together (the rest: the loop below)
    s = start + tl.arange(0, BLOCK_N)
    s_ok = s < end
    page = tl.load(BT + b * sbt_b + (s // PAGE) * sbt_p, mask=s_ok, other=0).to(tl.int64)
    slot = (s % PAGE).to(tl.int64)
    k_at = K + page[:, None] * sk_p + slot[:, None] * sk_s + kvh * sk_h + d[None, :] * sk_d
    v_at = V + page[:, None] * sv_p + slot[:, None] * sv_s + kvh * sv_h + d[None, :] * sv_d
    kv_ok = s_ok[:, None] & d_ok[None, :]
    if PRE:
        fresh = (s >= n - T)[:, None]  # this call's rows: stored by the previous kernel
        k = tl.load(k_at, mask=kv_ok & ~fresh, other=0.0)
        v = tl.load(v_at, mask=kv_ok & ~fresh, other=0.0)
        gdc_enter(GDC)
        k = tl.where(fresh, tl.load(k_at, mask=kv_ok & fresh, other=0.0), k)
        v = tl.where(fresh, tl.load(v_at, mask=kv_ok & fresh, other=0.0), v)
    else:
        k = tl.load(k_at, mask=kv_ok, other=0.0)  # [BLOCK_N, HD_PAD]
        v = tl.load(v_at, mask=kv_ok, other=0.0)

    rows = tl.arange(0, M_PAD)  # query rows (t, g): t = rows // G, g = rows % G
    t = rows // G
    h = kvh * G + rows % G
    row_ok = rows < T * G
    q = tl.load(Q + b * sq_b + t[:, None] * sq_t + h[:, None] * sq_h + d[None, :] * sq_d,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [M_PAD, HD_PAD]
    qpos = n - T + t  # [M_PAD] position of each row's query

    m_i = tl.full([M_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([M_PAD], tl.float32)
    acc = tl.zeros([M_PAD, HD_PAD], tl.float32)
    m_i, l_i, acc = _tile(q, k, v, s, s_ok, qpos, m_i, l_i, acc, scale_log2, window, HAS_WINDOW, DOT_F32)
    for s0 in tl.range(start + BLOCK_N, end, BLOCK_N):
        s = s0 + tl.arange(0, BLOCK_N)
        s_ok = s < end
        page = tl.load(BT + b * sbt_b + (s // PAGE) * sbt_p, mask=s_ok, other=0).to(tl.int64)
        slot = (s % PAGE).to(tl.int64)
        kv_ok = s_ok[:, None] & d_ok[None, :]
        k = tl.load(K + page[:, None] * sk_p + slot[:, None] * sk_s + kvh * sk_h + d[None, :] * sk_d,
                    mask=kv_ok, other=0.0)  # [BLOCK_N, HD_PAD]
        v = tl.load(V + page[:, None] * sv_p + slot[:, None] * sv_s + kvh * sv_h + d[None, :] * sv_d,
                    mask=kv_ok, other=0.0)
        m_i, l_i, acc = _tile(q, k, v, s, s_ok, qpos, m_i, l_i, acc, scale_log2, window, HAS_WINDOW, DOT_F32)

    if SPLIT:
        # the query rows' partials only (not the padding to M_PAD), and an empty split (no keys: short contexts
        # under a grid sized for max_context) stores no acc: the combine reads zeros for it, as it would have stored
        base = pid * num_splits + split
        tl.store(PM + base * M_PAD + rows, m_i, mask=row_ok)
        tl.store(PL + base * M_PAD + rows, l_i, mask=row_ok)
        keep = row_ok & (rows * 0 + start < end)  # [M_PAD]
        tl.store(PO + (base * M_PAD + rows[:, None]) * HD_PAD + d[None, :], acc,
                 mask=keep[:, None] & (d < HD_PAD)[None, :])
    else:
        if HAS_SINKS:
            sink = tl.load(SINKS + h, mask=row_ok, other=0.0) * 1.4426950408889634
            m_f = tl.maximum(m_i, sink)
            corr = tl.exp2(m_i - m_f)
            l_i = l_i * corr + tl.exp2(sink - m_f)
            acc = acc * corr[:, None]
        l_i = tl.where(l_i > 0, l_i, 1.0)
        o = acc / l_i[:, None]
        tl.store(O + b * so_b + t[:, None] * so_t + h[:, None] * so_h + d[None, :] * so_d,
                 o.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def _acc_sum(PO, base, row, m, w, ok, d, M_PAD: tl.constexpr, HD_PAD: tl.constexpr):
    """sum over the splits `base` [S] (ok: within the grid) of query row `row`'s accumulators times their weights
    w [S] -> [HD_PAD]. An empty split stored no acc (its m is -inf, its weight 0): zeros, as its masked tile left
    it."""
    acc = tl.load(PO + (base[:, None] * M_PAD + row) * HD_PAD + d[None, :],
                  mask=(ok & (m > float("-inf")))[:, None] & (d < HD_PAD)[None, :], other=0.0)
    return tl.sum(acc * w[:, None], 0)


def _combine_kernel(PO, PM, PL, SINKS, O, KV, NS,
                    so_b, so_t, so_h, so_d,
                    T: tl.constexpr, G: tl.constexpr, HD: tl.constexpr, M_PAD: tl.constexpr,
                    HD_PAD: tl.constexpr, HAS_SINKS: tl.constexpr, NS_PAD: tl.constexpr, NS_LO: tl.constexpr = 16,
                    GDC: tl.constexpr = False):
    gdc_enter(GDC)
    pid = tl.program_id(0)  # b * KV + kv head
    row = tl.program_id(1)  # query row (t, g)
    b = pid // KV
    t = row // G
    h = (pid % KV) * G + row % G
    sp = tl.arange(0, NS_PAD)
    sp_ok = sp < NS
    base = pid * NS + sp  # [NS_PAD]
    m = tl.load(PM + base * M_PAD + row, mask=sp_ok, other=float("-inf"))
    l = tl.load(PL + base * M_PAD + row, mask=sp_ok, other=0.0)
    if NS_LO < NS_PAD:  # the first NS_LO splits' maxima once more (issued with the others: no wait of their own)
        sp_lo = tl.arange(0, NS_LO)
        ok_lo = sp_lo < NS
        base_lo = pid * NS + sp_lo
        m_lo = tl.load(PM + base_lo * M_PAD + row, mask=ok_lo, other=float("-inf"))
    m_max = tl.max(m, 0)
    if HAS_SINKS:
        sink = tl.load(SINKS + h) * 1.4426950408889634
        m_max = tl.maximum(m_max, sink)
    m_use = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_use)  # [NS_PAD], 0 for empty splits
    l_tot = tl.sum(l * w, 0)
    if HAS_SINKS:
        l_tot += tl.exp2(sink - m_use)
    d = tl.arange(0, HD_PAD)
    if NS_LO < NS_PAD:
        # a short cache under a grid sized for a long max_context: when no split past the first NS_LO holds keys
        # this row sees, the acc tile is [NS_LO, HD_PAD], not [NS_PAD, HD_PAD] (fewer registers, a shorter sum)
        hi = tl.max(tl.where(m > float("-inf"), sp + 1, 0), 0)
        if hi <= NS_LO:
            o = _acc_sum(PO, base_lo, row, m_lo, tl.exp2(m_lo - m_use), ok_lo, d, M_PAD, HD_PAD)
        else:
            o = _acc_sum(PO, base, row, m, w, sp_ok, d, M_PAD, HD_PAD)
    else:
        o = _acc_sum(PO, base, row, m, w, sp_ok, d, M_PAD, HD_PAD)
    o = o / tl.where(l_tot > 0, l_tot, 1.0)
    tl.store(O + b * so_b + t * so_t + h * so_h + d * so_d, o.to(O.dtype.element_ty), mask=d < HD)


_INTERPRETED = False
if triton is not None:
    _tile = triton.jit(_tile)
    _acc_sum = triton.jit(_acc_sum)
    _SPLIT = triton.jit(_split_kernel)
    _COMBINE = triton.jit(_combine_kernel)
    _INTERPRETED = type(_SPLIT).__name__ == "InterpretedFunction"  # TRITON_INTERPRET=1 at triton's import
