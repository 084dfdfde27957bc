"""A step's sampled rows drawn on the GPU in three launches, whatever the number of rows: temperature, top-p (the
nucleus) and Gumbel-max with counter-based noise, no sort of the vocabulary.

Owns: `draw_rows` (the launcher), the per-row parameter block (`pack_params`, `fill_params`, `read_params`: what
a batch graph's buffer carries too), `uniforms` (the noise the kernels draw, written out: tests), `kernel_ok`
(whether the kernels can run on a device) and the three kernels. Rows of temperature 0 are skipped: the caller's
argmax stays (decode/batchgraph.py runs every row of a step through them inside its graph).
Does not own: top-k (the caller passes each row's top-k candidates, from torch.topk, with their vocabulary ids),
greedy rows, the per-row keys (decode/sampling.py `RowNoise`), nor the plain torch path these must match in
distribution (decode/sampling.py).

The math, for one row with n candidates x_i = logit_i / temperature (fp32), vocabulary ids id_i, key k:
    g_i = -log(-log(u_i)), u_i = Philox(k, id_i) in [0, 1) (triton's tl.rand: the noise of a token depends on the
    row's key and the token's id only, not on the row's place in the step nor on the candidate order);
    the kept set (the nucleus): {i : mass_above(x_i) < top_p * Z}, mass_above(v) = sum of exp(x_j - m) over x_j > v,
    Z the sum over all, m the max: the smallest prefix by descending probability whose mass reaches top_p, with
    tokens tied at the boundary kept together (a sort would keep an arbitrary part of them);
    the pick: argmax over the kept set of x_i + g_i, a draw from softmax(x) restricted to the kept set.
How, without a sort (rejection on a rising pivot): j = argmax over every token of x + g; if mass_above(x_j) <
top_p * Z, j is in the nucleus: take it; else nothing at or below x_j is (mass only grows downwards), so the pivot
rises to x_j and j is drawn again, argmax of x + g over x > pivot with the same noise. That is still a draw from
the remaining set, since a Gumbel-max's argmax over a subset is independent of its maximum, the only thing the
rejection looked at. The nucleus holds at least top_p of the remaining mass, so a round accepts with probability
at least top_p: about 1 / top_p rounds; the token of largest x always satisfies the test, so it ends.
Launches: `_chunk_kernel` (row, chunk) -> the chunk's max, sum of exp, best x + g, its id and x; `_above_kernel`
(row, chunk; top-p only) -> the global winner from those, then the chunk's mass above its x; `_pick_kernel` (row)
-> accept or run the remaining rounds over the whole row in one program, then write the id.

Legend: S sampled rows, n candidates of a row (the vocabulary V, or its top-k), C chunks of CHUNK candidates.
"""
from __future__ import annotations

import torch
from torch import Tensor

try:  # the CPU torch wheel does not bring triton; the runtime must import without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

CHUNK = 8192  # candidates a program of the first two launches reads
BLOCK = 2048  # candidates a loop iteration reads
MAX_ROUNDS = 256  # rejection rounds before the pick falls back to the row's largest x (only NaN logits get there)
PARAMS = 7  # rows of the int64 parameter block: X row, n, out row, key, temperature bits, top_p bits, ids row


def kernel_ok(device: torch.device) -> bool:
    """True when the kernels run on `device`: CUDA with triton, or any device under Triton's interpreter (tests)."""
    return triton is not None and (torch.device(device).type == "cuda" or interpreted())


def interpreted() -> bool:
    """True when the kernels were built for Triton's interpreter (they then run on CPU tensors)."""
    return _INTERPRETED


def pack_params(x_rows: list[int], n: list[int], out_rows: list[int], keys: list[int], temps: list[float],
                top_ps: list[float], ids_rows: list[int] | None = None, *, pin: bool = False) -> Tensor:
    """The launch's per-row parameters as one int64 [PARAMS, S] host tensor (one copy to the device; pin: in
    pinned memory, so that a non-blocking copy does not wait for the stream)."""
    t = torch.empty((PARAMS, len(x_rows)), dtype=torch.int64, pin_memory=pin)
    fill_params(t.numpy(), x_rows, n, out_rows, keys, temps, top_ps, x_rows if ids_rows is None else ids_rows)
    return t


def fill_params(a, x_rows, n, out_rows, keys, temps, top_ps, ids_rows) -> None:
    """Write rows' parameters into a [PARAMS, S] int64 numpy array (or a view of one): floats as their fp32 bit
    patterns, keys as 63-bit integers. A row of temperature 0 is left alone by the kernels (greedy: the caller's
    argmax stays)."""
    import numpy as np

    a[0], a[1], a[2], a[3] = x_rows, n, out_rows, keys
    a[4] = np.asarray(temps, dtype=np.float32).view(np.int32)
    a[5] = np.asarray(top_ps, dtype=np.float32).view(np.int32)
    a[6] = ids_rows


def read_params(a) -> list[tuple[int, int, int, int, float, float, int]]:
    """fill_params backwards: per row (x row, n, out row, key, temperature, top_p, ids row) (the torch path of
    an in-graph step on CPU reads its buffer with it)."""
    import numpy as np

    a = np.asarray(a, dtype=np.int64)
    t = a[4].astype(np.int32).view(np.float32)
    p = a[5].astype(np.int32).view(np.float32)
    return [(int(a[0, i]), int(a[1, i]), int(a[2, i]), int(a[3, i]), float(t[i]), float(p[i]), int(a[6, i]))
            for i in range(a.shape[1])]


def draw_rows(x: Tensor, params: Tensor, out: Tensor, *, ids: Tensor | None = None, top_p: bool = True,
              chunk: int = CHUNK, block: int = BLOCK) -> Tensor:
    """Draw one token for each of S rows into out (int64 [R]) at the rows params names, on x's device.

    Args:
        x: [*, N] logits (any float dtype, last dim contiguous): row params[0, s] holds row s's candidates in its
            first params[1, s] columns.
        params: int64 [PARAMS, S] from `pack_params`, on x's device.
        ids: [*, N] int64 or int32, the candidates' vocabulary ids (row params[6, s]); None = column c is id c.
        top_p: False when every row keeps its whole distribution (skips the second launch and the test).
        chunk, block: tile sizes (tests make them small to cross several chunks with a small vocabulary).
    """
    if not kernel_ok(x.device):
        raise RuntimeError("the sampling kernels need CUDA and triton (or Triton's interpreter in tests)")
    S = params.shape[1]
    N = x.shape[-1]
    if S == 0:
        return out
    if x.stride(-1) != 1 or (ids is not None and (ids.stride(-1) != 1 or ids.shape != x.shape)):
        raise ValueError(f"draw_rows: x {tuple(x.shape)} and ids need contiguous rows of the same shape")
    C = max(1, -(-N // chunk))
    part = torch.empty((5, S * C), dtype=torch.float32, device=x.device)  # one allocation for the fp32 partials
    pm, pz, py, px, pa = part.unbind(0)
    pi = torch.empty(S * C, dtype=torch.int64, device=x.device)
    has_ids = ids is not None
    ids_t = ids if has_ids else params  # never read without HAS_IDS
    sid = ids.stride(0) if has_ids else 0
    common = dict(CHUNK=chunk, BLOCK=block, HAS_IDS=has_ids)
    _CHUNK[(S, C)](x, x.stride(0), ids_t, sid, params, pm, pz, py, pi, px, S, C, **common, num_warps=8)
    cpad = max(2, triton.next_power_of_2(C))
    if top_p:
        _ABOVE[(S, C)](x, x.stride(0), params, pm, pz, py, px, pa, S, C, C_PAD=cpad, CHUNK=chunk, BLOCK=block,
                       num_warps=8)
    _PICK[(S,)](x, x.stride(0), ids_t, sid, params, pm, pz, py, pi, px, pa, out, S, C, C_PAD=cpad, TOP_P=top_p,
                MAX_ROUNDS=MAX_ROUNDS, **common, num_warps=8)
    return out


def uniforms(keys: Tensor, ids: Tensor) -> Tensor:
    """u [S, n] fp32: the uniforms the kernels draw for row s's key keys[s] (int64 [S]) and ids [S, n] (int64):
    Philox(key, id) as tl.rand makes them. Tests rebuild the kernels' picks from them."""
    if not kernel_ok(keys.device):
        raise RuntimeError("uniforms needs CUDA and triton (or Triton's interpreter in tests)")
    S, n = ids.shape
    ids = ids.contiguous()
    out = torch.empty((S, n), dtype=torch.float32, device=keys.device)
    _UNIFORM[(S,)](keys, ids, out, n, BLOCK=1024)
    return out


# --- kernels (plain functions, wrapped by triton.jit below: compiled, or interpreted on CPU) ---

def _f32(bits):
    """An fp32 from the low 32 bits of an int64 parameter."""
    return bits.to(tl.int32).to(tl.float32, bitcast=True)


def _gumbel(key, vid):
    """Gumbel noise of ids vid for a row's key: -log(-log(u)), u = tl.rand(key, id) (u = 0 gives -inf: never picked)."""
    u = tl.rand(key, vid)
    return -tl.log(-tl.log(u))


def _cands(X, xrow, sx, IDS, idrow, sid, col, n, temp, HAS_IDS: tl.constexpr):
    """A block of a row's candidates at columns col: x = logit / temperature (-inf past n), their ids, the mask."""
    ok = col < n
    x = tl.load(X + xrow * sx + col, mask=ok, other=-float("inf")).to(tl.float32) / temp
    if HAS_IDS:
        vid = tl.load(IDS + idrow * sid + col, mask=ok, other=0).to(tl.int64)
    else:
        vid = col.to(tl.int64)
    return x, vid, ok


def _keep_best(y, vid, x, o, by, bi, bx):
    """The running argmax of y folded with a block's: (best y, its id, its x); an earlier block wins a tie."""
    j = tl.argmax(y, 0)
    yj = tl.max(y, 0)
    better = yj > by
    return (tl.where(better, yj, by), tl.where(better, tl.sum(tl.where(o == j, vid, 0), 0), bi),
            tl.where(better, tl.sum(tl.where(o == j, x, 0.0), 0), bx))


def _uniform_kernel(KEYS, IDS, OUT, n, BLOCK: tl.constexpr):
    s = tl.program_id(0).to(tl.int64)
    key = tl.load(KEYS + s)
    for b0 in range(0, n, BLOCK):
        o = b0 + tl.arange(0, BLOCK)
        ok = o < n
        vid = tl.load(IDS + s * n + o, mask=ok, other=0)
        tl.store(OUT + s * n + o, tl.rand(key, vid), mask=ok)


def _chunk_kernel(X, sx, IDS, sid, P, PM, PZ, PY, PI, PX, S, C,
                  CHUNK: tl.constexpr, BLOCK: tl.constexpr, HAS_IDS: tl.constexpr):
    s = tl.program_id(0)
    c = tl.program_id(1)
    xrow = tl.load(P + s)
    n = tl.load(P + S + s)
    key = tl.load(P + 3 * S + s)
    temp = _f32(tl.load(P + 4 * S + s))
    if temp > 0:  # greedy rows (temperature 0: the in-graph steps) keep the argmax the caller wrote
        idrow = tl.load(P + 6 * S + s)
        o = tl.arange(0, BLOCK)
        m = -float("inf")
        z = 0.0
        by = -float("inf")
        bi = (xrow * 0).to(tl.int64)
        bx = -float("inf")
        for b0 in tl.static_range(0, CHUNK, BLOCK):
            x, vid, ok = _cands(X, xrow, sx, IDS, idrow, sid, c * CHUNK + b0 + o, n, temp, HAS_IDS)
            y = tl.where(ok, x + _gumbel(key, vid), -float("inf"))
            m_new = tl.maximum(m, tl.max(x, 0))
            m_use = tl.where(m_new == -float("inf"), 0.0, m_new)  # nothing valid yet: keep the sum at zero
            z = z * tl.exp(m - m_use) + tl.sum(tl.exp(x - m_use), 0)
            m = m_new
            by, bi, bx = _keep_best(y, vid, x, o, by, bi, bx)
        at = s * C + c
        tl.store(PM + at, m)
        tl.store(PZ + at, z)
        tl.store(PY + at, by)
        tl.store(PI + at, bi)
        tl.store(PX + at, bx)


def _row_totals(PM, PZ, PY, PX, s, C, C_PAD: tl.constexpr):
    """The row's max, sum of exp(x - max), and the first launch's winner (its chunk, its x), from the chunks."""
    cc = tl.arange(0, C_PAD)
    cok = cc < C
    pm = tl.load(PM + s * C + cc, mask=cok, other=-float("inf"))
    pz = tl.load(PZ + s * C + cc, mask=cok, other=0.0)
    py = tl.load(PY + s * C + cc, mask=cok, other=-float("inf"))
    px = tl.load(PX + s * C + cc, mask=cok, other=-float("inf"))
    m = tl.max(pm, 0)
    m_use = tl.where(m == -float("inf"), 0.0, m)
    z = tl.sum(tl.where(pm == -float("inf"), 0.0, pz * tl.exp(pm - m_use)), 0)
    w = tl.argmax(py, 0)
    xw = tl.sum(tl.where(cc == w, px, 0.0), 0)
    return m_use, z, w, xw


def _above_kernel(X, sx, P, PM, PZ, PY, PX, PA, S, C, C_PAD: tl.constexpr, CHUNK: tl.constexpr,
                  BLOCK: tl.constexpr):
    s = tl.program_id(0)
    c = tl.program_id(1)
    xrow = tl.load(P + s)
    n = tl.load(P + S + s)
    temp = _f32(tl.load(P + 4 * S + s))
    if temp > 0:
        m, z, w, xw = _row_totals(PM, PZ, PY, PX, s, C, C_PAD)
        o = tl.arange(0, BLOCK)
        a = 0.0
        for b0 in tl.static_range(0, CHUNK, BLOCK):
            x, _, _ = _cands(X, xrow, sx, X, 0, 0, c * CHUNK + b0 + o, n, temp, False)
            a += tl.sum(tl.where(x > xw, tl.exp(x - m), 0.0), 0)
        tl.store(PA + s * C + c, a)


def _pick_kernel(X, sx, IDS, sid, P, PM, PZ, PY, PI, PX, PA, OUT, S, C, C_PAD: tl.constexpr,
                 TOP_P: tl.constexpr, MAX_ROUNDS: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                 HAS_IDS: tl.constexpr):
    s = tl.program_id(0)
    xrow = tl.load(P + s)
    n = tl.load(P + S + s)
    orow = tl.load(P + 2 * S + s)
    key = tl.load(P + 3 * S + s)
    temp = _f32(tl.load(P + 4 * S + s))
    if temp > 0:
        idrow = tl.load(P + 6 * S + s)
        m, z, w, xw = _row_totals(PM, PZ, PY, PX, s, C, C_PAD)
        pick = tl.load(PI + s * C + w)
        if TOP_P:
            top_p = _f32(tl.load(P + 5 * S + s))
            cc = tl.arange(0, C_PAD)
            mass = tl.sum(tl.load(PA + s * C + cc, mask=cc < C, other=0.0), 0)
            done = ((top_p >= 1.0) | (mass < top_p * z)).to(tl.int32)  # top_p 1 keeps everything
            o = tl.arange(0, BLOCK)
            rounds = 0
            while (done == 0) & (rounds < MAX_ROUNDS):  # the winner lies outside the nucleus: raise the pivot to it
                pivot = xw
                by = -float("inf")
                bi = pick
                bx = -float("inf")
                for b0 in range(0, n, BLOCK):
                    x, vid, ok = _cands(X, xrow, sx, IDS, idrow, sid, b0 + o, n, temp, HAS_IDS)
                    y = tl.where(ok & (x > pivot), x + _gumbel(key, vid), -float("inf"))
                    by, bi, bx = _keep_best(y, vid, x, o, by, bi, bx)
                a = 0.0
                for b0 in range(0, n, BLOCK):
                    x, vid, ok = _cands(X, xrow, sx, IDS, idrow, sid, b0 + o, n, temp, HAS_IDS)
                    a += tl.sum(tl.where(x > bx, tl.exp(x - m), 0.0), 0)
                pick = bi
                xw = bx
                done = (a < top_p * z).to(tl.int32)
                rounds += 1
            if done == 0:  # MAX_ROUNDS without an accepted draw (NaN logits): the row's largest x (in any nucleus)
                bx = -float("inf")
                for b0 in range(0, n, BLOCK):
                    x, vid, ok = _cands(X, xrow, sx, IDS, idrow, sid, b0 + o, n, temp, HAS_IDS)
                    bx, pick, _ = _keep_best(x, vid, x, o, bx, pick, bx)
        tl.store(OUT + orow, pick)


_INTERPRETED = False
_CHUNK = _ABOVE = _PICK = _UNIFORM = None
if triton is not None:
    _f32 = triton.jit(_f32)
    _gumbel = triton.jit(_gumbel)
    _row_totals = triton.jit(_row_totals)
    _cands = triton.jit(_cands)
    _keep_best = triton.jit(_keep_best)
    _UNIFORM = triton.jit(_uniform_kernel)
    _CHUNK = triton.jit(_chunk_kernel)
    _ABOVE = triton.jit(_above_kernel)
    _PICK = triton.jit(_pick_kernel)
    _INTERPRETED = type(_CHUNK).__name__ == "InterpretedFunction"  # TRITON_INTERPRET=1 at triton's import
