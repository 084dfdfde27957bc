"""decode/sampling.py sample_rows: a step's rows sampled at once on the logits' device (Gumbel noise keyed by each
row's stream), against the distribution the parameters define: softmax(logits / temperature) over the top_k
largest, cut to the smallest prefix reaching top_p. The CUDA kernels (kernels/nucleus.py) run under Triton's
interpreter on CPU: their picks equal the reference rule applied to the same noise."""
from __future__ import annotations

import math
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton's first import (conftest sets it too)

from tiered.decode.sampling import RowNoise, Sampling, kept_mask, sample, sample_rows  # noqa: E402
from tiered.kernels import nucleus  # noqa: E402

needs_kernel = pytest.mark.skipif(
    nucleus.triton is None or not (CUDA or nucleus.interpreted()),
    reason="needs triton (CUDA, or imported under TRITON_INTERPRET=1 before any other test imported it)")


def _expected(logits: torch.Tensor, p: Sampling) -> torch.Tensor:
    """The reference distribution, written plainly (float64, one row)."""
    x = logits.double() / p.temperature
    order = torch.argsort(x, descending=True)
    keep = order[:p.top_k] if p.top_k else order
    probs = torch.softmax(x[keep], 0)
    n, mass = 0, 0.0
    while n < len(keep) and mass < p.top_p:  # the smallest prefix whose mass reaches top_p
        mass += float(probs[n])
        n += 1
    keep = keep[:max(1, n)]
    out = torch.zeros_like(x)
    out[keep] = torch.softmax(x[keep], 0)
    return out


@pytest.mark.parametrize("p", [Sampling(1.0), Sampling(0.6), Sampling(1.3, top_k=4), Sampling(0.9, top_p=0.8),
                               Sampling(1.0, top_k=5, top_p=0.7)])
def test_sample_rows_distribution(p):
    """20,000 draws of a 10-token row (in a step with a greedy row and another sampled row): every drawn token is
    allowed, and each token's frequency is within 5 standard errors of its probability."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 10, generator=g) * 2
    want = _expected(logits[1], p)
    gens = [None, RowNoise(5), RowNoise(6)]
    params = [Sampling(0.0), p, Sampling(0.7, top_k=3)]
    n = 20_000
    counts = torch.zeros(10, dtype=torch.float64)
    for _ in range(n // 200):  # 200 draws a call: the rows repeated
        picks = sample_rows(logits.repeat(200, 1), params * 200, gens * 200).view(200, 3)
        assert (picks[:, 0] == torch.argmax(logits[0])).all()  # the greedy row
        counts += torch.bincount(picks[:, 1], minlength=10).double()
    freq = counts / n
    assert (counts[want == 0] == 0).all(), (freq, want)
    se = torch.sqrt(want * (1 - want) / n)
    assert ((freq - want).abs() <= 5 * se + 1e-12).all(), (freq, want)


def test_sample_rows_seeded_and_batch_independent():
    """A seeded row draws the same tokens alone or beside other rows (its noise is keyed by its own stream), and
    sample() over one row is sample_rows of that row."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 1000, generator=g)
    p = Sampling(0.8, top_p=0.95, seed=3)
    alone_gen = RowNoise(3)
    alone = [int(sample(logits[2], p, alone_gen)) for _ in range(20)]
    gens = [RowNoise(s) for s in (10, 11, 3, 12)]
    params = [Sampling(1.0), Sampling(0.0), p, Sampling(0.5, top_k=7)]
    beside = [int(sample_rows(logits, params, gens)[2]) for _ in range(20)]
    assert alone == beside
    assert len(set(alone)) > 1  # it samples


def test_sample_rows_greedy_only_and_top_k_1():
    """All-greedy rows need no generator; top_k 1 is the argmax at any temperature."""
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(4))
    assert torch.equal(sample_rows(logits, [Sampling()] * 5, [None] * 5), torch.argmax(logits, -1))
    gens = [RowNoise(i) for i in range(5)]
    got = sample_rows(logits, [Sampling(2.0, top_k=1)] * 5, gens)
    assert torch.equal(got, torch.argmax(logits, -1))
    assert not math.isnan(float(got.float().sum()))


def _reference_picks(logits, params, keys):
    """What the kernels must pick: the nucleus rule (kept_mask) over each row's candidates, then argmax of x + Gumbel
    noise, with the kernels' own uniforms (nucleus.uniforms) for the row's key and the candidates' ids."""
    R, V = logits.shape
    out = []
    for i, (p, key) in enumerate(zip(params, keys)):
        x = logits[i].float() / p.temperature
        ids = torch.arange(V, device=logits.device)
        if 0 < p.top_k < V:
            x, ids = torch.topk(x, p.top_k)
        u = nucleus.uniforms(torch.tensor([key], device=logits.device), ids[None])[0]
        y = torch.where(kept_mask(x, p.top_p), x - torch.log(-torch.log(u)), float("-inf"))
        out.append(int(ids[torch.argmax(y)]))
    return out


def _case(R, V, seed):
    """Logits with ties (bf16 values rounded to quarters: ties at the nucleus boundary) and varied parameters."""
    g = torch.Generator().manual_seed(seed)
    logits = ((torch.randn(R, V, generator=g) * 2 * 4).round() / 4).to(torch.bfloat16)
    ps = [0.05, 0.3, 0.5, 0.8, 0.95, 1.0]
    params = [Sampling(0.5 + (i % 4) * 0.3, top_k=(0, 0, 3, 17)[i % 4] if i % 3 else 0, top_p=ps[i % len(ps)])
              for i in range(R)]
    return logits, params


@needs_kernel
@pytest.mark.parametrize("chunk,block", [(16, 8), (8192, 2048)])
def test_kernel_picks_equal_reference_with_the_same_noise(chunk, block):
    """The kernels' pick for every row equals the reference rule applied to the same uniforms: rows keeping all
    tokens and rows keeping their top-k, top_p from 0.05 (most first draws rejected: the pivot rounds) to 1, ties
    at the boundary, and (16, 8) tiles so a row spans several chunks."""
    dev = torch.device("cuda" if CUDA else "cpu")
    logits, params = _case(12, 40, 0)
    logits = logits.to(dev)
    keys = [RowNoise(100 + i).take() for i in range(12)]
    want = _reference_picks(logits, params, keys)
    full = [i for i, p in enumerate(params) if p.top_k == 0]
    out = torch.full((12,), -1, dtype=torch.int64, device=dev)
    pk = nucleus.pack_params(full, [40] * len(full), full, [keys[i] for i in full],
                             [params[i].temperature for i in full], [params[i].top_p for i in full]).to(dev)
    nucleus.draw_rows(logits, pk, out, chunk=chunk, block=block)
    cut = [i for i, p in enumerate(params) if p.top_k]
    kmax = max(params[i].top_k for i in cut)
    vals, ids = torch.topk(logits[cut], kmax, dim=-1)
    own = list(range(len(cut)))
    pk = nucleus.pack_params(own, [params[i].top_k for i in cut], cut, [keys[i] for i in cut],
                             [params[i].temperature for i in cut], [params[i].top_p for i in cut], own).to(dev)
    nucleus.draw_rows(vals, pk, out, ids=ids, chunk=chunk, block=block)
    assert out.tolist() == want


@needs_kernel
def test_sample_rows_kernel_path():
    """sample_rows(kernel=True): greedy rows take the argmax, sampled rows the reference's picks for the keys their
    streams give (one draw a row), and a row's pick does not depend on its neighbours or its place."""
    logits, params = _case(9, 40, 1)
    params[4] = Sampling(0.0)
    got = sample_rows(logits, params, [RowNoise(7 + i) for i in range(9)], kernel=True)
    sampled = [i for i, p in enumerate(params) if p.temperature]
    want = _reference_picks(logits[sampled], [params[i] for i in sampled], [RowNoise(7 + i).take() for i in sampled])
    assert [int(got[i]) for i in sampled] == want
    assert int(got[4]) == int(torch.argmax(logits[4]))
    alone = sample_rows(logits[6:7], params[6:7], [RowNoise(13)], kernel=True)
    assert int(alone[0]) == int(got[6])


@needs_kernel
def test_kernels_skip_greedy_rows():
    """A row of temperature 0 in the parameter block (a batch graph's greedy and padding rows) is left as the caller
    wrote it; the others are drawn."""
    dev = torch.device("cuda" if CUDA else "cpu")
    logits, _ = _case(3, 40, 2)
    logits = logits.to(dev)
    out = torch.full((3,), 77, dtype=torch.int64, device=dev)
    keys = [RowNoise(9).take(), 0, RowNoise(10).take()]
    pk = nucleus.pack_params([0, 1, 2], [40] * 3, [0, 1, 2], keys, [0.9, 0.0, 1.1], [0.7, 1.0, 1.0]).to(dev)
    nucleus.draw_rows(logits, pk, out, chunk=16, block=8)
    want = _reference_picks(logits[[0, 2]], [Sampling(0.9, top_p=0.7), Sampling(1.1)], [keys[0], keys[2]])
    assert out.tolist() == [want[0], 77, want[1]]


def test_row_noise_keys():
    """Keys depend on (seed, draw) only: take_many equals take() repeated, streams of other seeds differ, and keys
    are 63-bit non-negative (the kernels' int64 seed)."""
    a, b = RowNoise(12345, 3), RowNoise(12345, 3)
    one = [a.take() for _ in range(50)]
    assert b.take_many(50).tolist() == one and a.draws == b.draws == 53
    assert len(set(one)) == 50 and all(0 <= k < 2 ** 63 for k in one)
    assert RowNoise(12346, 3).take() != one[0] and RowNoise(2 ** 70 + 5).take_many(2).tolist() == \
        [RowNoise(2 ** 70 + 5).take(), RowNoise(2 ** 70 + 5, 1).take()]


@needs_kernel
def test_kernels_end_on_nan_logits():
    """NaN logits never pass the nucleus test: after MAX_ROUNDS the pick falls back to a valid id instead of
    looping for ever."""
    dev = torch.device("cuda" if CUDA else "cpu")
    logits = torch.randn(1, 40, generator=torch.Generator().manual_seed(3)).to(dev)
    logits[0, 5] = float("nan")
    out = torch.full((1,), -1, dtype=torch.int64, device=dev)
    pk = nucleus.pack_params([0], [40], [0], [RowNoise(1).take()], [1.0], [0.5]).to(dev)
    nucleus.draw_rows(logits, pk, out, chunk=64, block=64)
    assert 0 <= int(out[0]) < 40


def test_kept_mask_rule():
    """The nucleus: every token whose mass strictly above it is below top_p; ties at the boundary kept together;
    at least one token; top_p 1 keeps all."""
    x = torch.log(torch.tensor([0.4, 0.2, 0.2, 0.1, 0.1]))
    assert kept_mask(x, 0.3).tolist() == [True, False, False, False, False]
    assert kept_mask(x, 0.5).tolist() == [True, True, True, False, False]  # 0.4 < 0.5: both 0.2 tokens, tied
    assert kept_mask(x, 0.85).tolist() == [True, True, True, True, True]  # 0.8 < 0.85: both 0.1 tokens
    assert kept_mask(x, 0.01).tolist() == [True, False, False, False, False]
    assert kept_mask(x, 1.0).all()


@pytest.mark.cuda
def test_cuda_sample_rows_distribution_and_seeds():
    """On CUDA (the kernels): the draws follow the reference distribution (top-k and top-p rows in one step); a
    seeded row's tokens do not depend on its neighbours; at a real vocabulary (151,936, bf16 logits with ties, 19
    chunks a row) every row's pick equals the reference rule over the kernels' own noise."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    dev = torch.device("cuda")
    logits = (torch.randn(2, 12, generator=torch.Generator().manual_seed(7)) * 2).to(dev)
    params = [Sampling(0.9, top_k=6), Sampling(1.2, top_p=0.85)]
    gens = [RowNoise(1), RowNoise(2)]
    n, counts = 20_000, torch.zeros(2, 12, dtype=torch.float64)
    for _ in range(n // 500):
        picks = sample_rows(logits.repeat(500, 1), params * 500, gens * 500).view(500, 2).cpu()
        for j in range(2):
            counts[j] += torch.bincount(picks[:, j], minlength=12).double()
    for j in range(2):
        want = _expected(logits[j].cpu(), params[j])
        freq = counts[j] / n
        assert (counts[j][want == 0] == 0).all()
        assert ((freq - want).abs() <= 5 * torch.sqrt(want * (1 - want) / n) + 1e-12).all(), (freq, want)
    g1, g2 = RowNoise(9), RowNoise(9)
    alone = [int(sample(logits[1], params[1], g1)) for _ in range(10)]
    other = RowNoise(4)
    beside = [int(sample_rows(logits, params, [other, g2])[1]) for _ in range(10)]
    assert alone == beside and len(set(alone)) > 1
    big, bp = _case(24, 151_936, 3)
    big = big.to(dev)
    bp[5] = Sampling(0.0)
    got = sample_rows(big, bp, [RowNoise(50 + i) for i in range(24)])
    sampled = [i for i, p in enumerate(bp) if p.temperature]
    want = _reference_picks(big[sampled], [bp[i] for i in sampled], [RowNoise(50 + i).take() for i in sampled])
    assert [int(got[i]) for i in sampled] == want
    assert int(got[5]) == int(torch.argmax(big[5]))


_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tiered.kernels import nucleus as nu
tgt = GPUTarget("cuda", 90, 32)
for xt in ("*bf16", "*fp32"):
    for ids in (True, False):
        sig = {"X": xt, "sx": "i32", "IDS": "*i64", "sid": "i32", "P": "*i64", "PM": "*fp32", "PZ": "*fp32",
               "PY": "*fp32", "PI": "*i64", "PX": "*fp32", "S": "i32", "C": "i32", "CHUNK": "constexpr",
               "BLOCK": "constexpr", "HAS_IDS": "constexpr"}
        cx = {"CHUNK": nu.CHUNK, "BLOCK": nu.BLOCK, "HAS_IDS": ids}
        assert triton.compile(ASTSource(nu._CHUNK, sig, constexprs=cx), target=tgt).asm["cubin"]
        for top_p in (True, False):
            sig = {"X": xt, "sx": "i32", "IDS": "*i64", "sid": "i32", "P": "*i64", "PM": "*fp32", "PZ": "*fp32",
                   "PY": "*fp32", "PI": "*i64", "PX": "*fp32", "PA": "*fp32", "OUT": "*i64", "S": "i32", "C": "i32",
                   "C_PAD": "constexpr", "TOP_P": "constexpr", "MAX_ROUNDS": "constexpr", "CHUNK": "constexpr",
                   "BLOCK": "constexpr", "HAS_IDS": "constexpr"}
            cx = {"C_PAD": 32, "TOP_P": top_p, "MAX_ROUNDS": nu.MAX_ROUNDS, "CHUNK": nu.CHUNK, "BLOCK": nu.BLOCK,
                  "HAS_IDS": ids}
            assert triton.compile(ASTSource(nu._PICK, sig, constexprs=cx), target=tgt).asm["cubin"]
    sig = {"X": xt, "sx": "i32", "P": "*i64", "PM": "*fp32", "PZ": "*fp32", "PY": "*fp32", "PX": "*fp32",
           "PA": "*fp32", "S": "i32", "C": "i32", "C_PAD": "constexpr", "CHUNK": "constexpr", "BLOCK": "constexpr"}
    cx = {"C_PAD": 32, "CHUNK": nu.CHUNK, "BLOCK": nu.BLOCK}
    assert triton.compile(ASTSource(nu._ABOVE, sig, constexprs=cx), target=tgt).asm["cubin"]
sig = {"KEYS": "*i64", "IDS": "*i64", "OUT": "*fp32", "n": "i32", "BLOCK": "constexpr"}
assert triton.compile(ASTSource(nu._UNIFORM, sig, constexprs={"BLOCK": 64}), target=tgt).asm["cubin"]
print("ok")
"""


def test_kernels_compile_for_sm90():
    """The real compiler accepts the sampling kernels for an H100/H200 target (bf16 and fp32 logits, with and
    without candidate ids and top-p), in a fresh process without TRITON_INTERPRET."""
    from conftest import compile_sm90

    compile_sm90(_COMPILE)
