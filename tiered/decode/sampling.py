"""Sampling: logits -> the next token id, greedy or with temperature / top-k / top-p, keyed by a seeded stream.

Owns: `Sampling` (the parameters), `check_sampling`, `RowNoise` / `row_noise` (a sequence's random stream: a
seed and a draw count, one 63-bit key a draw), `sample` (one row), `sample_rows` (a step's rows at once, on the
logits' device: no copy to the host, no sync), its torch path (`kept_mask`, the nucleus rule) and `argmax_into`
(the greedy pick written into a device buffer, which the one-token graph captures). Does not own: the generation
loops (engine.py, decode/ahead.py, decode/scheduler.py) nor the CUDA kernels (kernels/nucleus.py). `graph_ok` and
`draw_step` serve the batch graphs (decode/batchgraph.py), which draw their rows inside the graph.
"""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import torch
from torch import Tensor


class SamplingError(ValueError):
    """Sampling parameters out of range; the message says which and what is allowed."""


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1 = no nucleus filter
    seed: int | None = None  # None = nondeterministic


def check_sampling(p: Sampling) -> None:
    if p.temperature < 0 or not math.isfinite(p.temperature):
        raise SamplingError(f"temperature must be >= 0 (0 = greedy), got {p.temperature}")
    if p.top_k < 0:
        raise SamplingError(f"top_k must be >= 0 (0 = off), got {p.top_k}")
    if not 0 < p.top_p <= 1:
        raise SamplingError(f"top_p must be in (0, 1], got {p.top_p}")


MASK63 = (1 << 63) - 1
MASK64 = (1 << 64) - 1
# splitmix64: the stream's base (seed * golden + offset) and its finaliser's shifts and multipliers
GOLDEN, OFFSET = 0x9E3779B97F4A7C15, 0x632BE59BD9B4E019
MIX = ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB))


def _base(seed: int) -> int:
    return (int(seed) * GOLDEN + OFFSET) & MASK64


def _mix(seed: int, draw: int) -> int:
    """A 63-bit key from (seed, draw): splitmix64's finaliser over seed * golden + draw (any seed, any draw)."""
    z = (_base(seed) + int(draw)) & MASK64
    for shift, mul in MIX:
        z = ((z ^ (z >> shift)) * mul) & MASK64
    return (z ^ (z >> 31)) & MASK63


@dataclass
class RowNoise:
    """One sequence's random stream: its seed and how many draws it has made. Draw d is keyed by _mix(seed, d), so
    a seeded sequence draws the same tokens whatever runs beside it and wherever it sits in a step."""
    seed: int
    draws: int = 0

    def take(self) -> int:
        """The key of the next draw (and count it)."""
        k = _mix(self.seed, self.draws)
        self.draws += 1
        return k

    def take_many(self, n: int) -> Tensor:
        """The keys of the next n draws as int64 [n] (and count them): take() n times, in numpy's wrapping uint64."""
        import numpy as np

        z = np.arange(self.draws, self.draws + n, dtype=np.uint64) + np.uint64(_base(self.seed))
        for shift, mul in MIX:
            z = (z ^ (z >> np.uint64(shift))) * np.uint64(mul)
        z = (z ^ (z >> np.uint64(31))) & np.uint64(MASK63)
        self.draws += n
        return torch.from_numpy(z.astype(np.int64))


def row_noise(seed: int | None) -> RowNoise:
    """A row's stream: seeded, or from the OS's entropy when seed is None."""
    return RowNoise(secrets.randbits(63) if seed is None else int(seed))


def sample(logits: Tensor, p: Sampling, noise: RowNoise | None) -> Tensor:
    """logits [V] -> next token id [1] int64 on the logits' device (sample_rows over one row; greedy is argmax)."""
    if p.temperature == 0:
        return torch.argmax(logits).view(1)  # argmax_into picks the same token (the same op on the same logits)
    return sample_rows(logits[None], [p], [noise])


def sample_rows(logits: Tensor, params: list[Sampling], noises: list[RowNoise | None], *,
                kernel: bool | None = None) -> Tensor:
    """logits [R, V] -> one token id a row, [R] int64 on the logits' device, with no host sync.

    A greedy row (temperature 0) takes the argmax. A sampled row scales its logits by 1 / temperature (fp32), keeps
    its top_k largest (0: all; torch.topk's choice among ties) and, of those, every token whose probability mass
    strictly above it is below top_p (the smallest prefix by descending probability whose mass reaches top_p,
    tokens tied at its boundary kept together), and picks argmax(x + Gumbel noise) over what it kept: a draw from
    the softmax of the kept logits. The noise of a draw depends on the row's key (`RowNoise.take`) and each token's
    id only.

    kernel: None = the Triton kernels (kernels/nucleus.py: three launches for every row of the step, no sort of
    the vocabulary) on CUDA, the torch path (a sort per row, torch's generator keyed by the same key) elsewhere;
    True / False force one (tests run the kernels under Triton's interpreter). The two draw the same distribution
    from different random streams.
    """
    R, V = logits.shape
    rows = [i for i, p in enumerate(params) if p.temperature != 0]
    if len(rows) < R:
        out = torch.argmax(logits, dim=-1)  # [R]: the greedy rows' picks (and a placeholder for the others)
    else:
        out = torch.empty(R, dtype=torch.int64, device=logits.device)
    if not rows:
        return out
    from tiered.kernels import nucleus

    keys = [noises[i].take() for i in rows]
    if kernel is None:
        kernel = logits.device.type == "cuda" and nucleus.kernel_ok(logits.device)
    if not kernel:
        for i, key in zip(rows, keys):
            out[i] = _draw_torch(logits[i], params[i], key)
        return out
    dev = logits.device
    ks = [params[i].top_k if 0 < params[i].top_k < V else 0 for i in rows]
    for cut in (False, True):  # rows keeping every token, then rows keeping their top-k
        sel = [j for j, k in enumerate(ks) if (k > 0) == cut]
        if not sel:
            continue
        r = [rows[j] for j in sel]
        temps = [params[i].temperature for i in r]
        tps = [params[i].top_p for i in r]
        top_p = min(tps) < 1.0
        pin = dev.type == "cuda"
        if not cut:
            pk = nucleus.pack_params(r, [V] * len(r), r, [keys[j] for j in sel], temps, tps, pin=pin)
            nucleus.draw_rows(logits, pk.to(dev, non_blocking=True), out, top_p=top_p)
        else:
            kk = [ks[j] for j in sel]
            x = logits if len(r) == R else logits.index_select(0, _on(dev, torch.tensor(r)))
            vals, ids = torch.topk(x, max(kk), dim=-1)
            own = list(range(len(r)))
            pk = nucleus.pack_params(own, kk, r, [keys[j] for j in sel], temps, tps, own, pin=pin)
            nucleus.draw_rows(vals, pk.to(dev, non_blocking=True), out, ids=ids, top_p=top_p)
    return out


def graph_ok(params: list[Sampling], vocab: int) -> bool:
    """Whether a graphed batch step can draw these rows inside its graph (decode/batchgraph.py): top-k needs a
    torch.topk of its own, so such rows are drawn after it by sample_rows."""
    return all(p.temperature == 0 or not 0 < p.top_k < vocab for p in params)


def draw_step(logits: Tensor, params: Tensor, picks: Tensor, *, kernel: bool, top_k: int = 0) -> None:
    """The sampled rows of a dense step (row b of logits [Bb, V] is row b of the step; params int64 [PARAMS, Bb]
    as kernels/nucleus.py's fill_params writes them, temperature 0 for greedy and padding rows) drawn into picks
    [Bb] int64, which holds the argmax: the kernels (kernel=True: capturable in a CUDA graph), else the torch path
    row by row (the same rule and keys; reads params on the host). top_k > 0: every row draws among its top_k
    logits (a torch.topk, then the kernels over the candidates; params' n must be top_k), as sample_rows does."""
    from tiered.kernels import nucleus

    if kernel:
        if top_k:
            vals, ids = torch.topk(logits, top_k, dim=-1)
            nucleus.draw_rows(vals, params, picks, ids=ids, top_p=True)
        else:
            nucleus.draw_rows(logits, params, picks, top_p=True)
        return
    for x_row, _, out_row, key, temp, top_p, _ in nucleus.read_params(params.cpu()):
        if temp > 0:
            picks[out_row] = _draw_torch(logits[x_row], Sampling(temp, top_k, top_p), key)


def kept_mask(x: Tensor, top_p: float) -> Tensor:
    """x [n] fp32 (scaled logits) -> bool [n]: the nucleus sample_rows keeps, every token whose mass strictly above
    it is below top_p (ties at the boundary kept together)."""
    if top_p >= 1.0:
        return torch.ones_like(x, dtype=torch.bool)
    sx = torch.sort(x, descending=True).values
    probs = torch.softmax(sx, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # mass ranked above each sorted position
    n_keep = max(1, int((before < top_p).sum()))
    return x >= sx[n_keep - 1]


def _draw_torch(logits: Tensor, p: Sampling, key: int) -> Tensor:
    """One row on the torch path: the same rule as the kernels, noise from torch's generator seeded by key."""
    V = logits.shape[0]
    x = logits.float() / p.temperature
    gen = torch.Generator(device=logits.device)
    gen.manual_seed(key)
    u = torch.rand(V, generator=gen, device=logits.device)
    gumbel = -torch.log(-torch.log(u.clamp_(min=torch.finfo(torch.float32).tiny)))
    if 0 < p.top_k < V:
        vals, ids = torch.topk(x, p.top_k)
        keep = kept_mask(vals, p.top_p)
        y = torch.where(keep, vals + gumbel[ids], float("-inf"))
        return ids[torch.argmax(y)]
    keep = kept_mask(x, p.top_p)
    return torch.argmax(torch.where(keep, x + gumbel, float("-inf")))


def _on(dev: torch.device, t: Tensor) -> Tensor:
    """A small host tensor on dev without waiting for the stream (a pageable copy to CUDA synchronises: the batch
    scheduler samples right after launching a step): through pinned memory, non-blocking."""
    return t.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else t


def argmax_into(logits: Tensor, token: Tensor) -> None:
    """The greedy next token of logits [1, V] written into token [1] int64 on the same device: no host sync and no
    shape that depends on the values, so a CUDA graph can capture it. The same pick as sample(logits[0], greedy)."""
    token.copy_(torch.argmax(logits[0]).view(1))
