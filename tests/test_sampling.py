"""decode/sampling.py sample_rows: a step's rows sampled at once on the logits' device (Gumbel noise from each row's
own generator), against the distribution the parameters define: softmax(logits / temperature) over the top_k
largest, cut to the smallest prefix reaching top_p."""
from __future__ import annotations

import math

import pytest
import torch

from tiered.decode.sampling import Sampling, sample, sample_rows


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
    gens = [None, torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]
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
    """A seeded row draws the same tokens alone or beside other rows (its noise is its own generator's), and
    sample() over one row is sample_rows of that row."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 1000, generator=g)
    p = Sampling(0.8, top_p=0.95, seed=3)
    alone_gen = torch.Generator().manual_seed(3)
    alone = [int(sample(logits[2], p, alone_gen)) for _ in range(20)]
    gens = [torch.Generator().manual_seed(s) for s in (10, 11, 3, 12)]
    params = [Sampling(1.0), Sampling(0.0), p, Sampling(0.5, top_k=7)]
    beside = [int(sample_rows(logits, params, gens)[2]) for _ in range(20)]
    assert alone == beside
    assert len(set(alone)) > 1  # it samples


def test_sample_rows_greedy_only_and_top_k_1():
    """All-greedy rows need no generator; top_k 1 is the argmax at any temperature."""
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(4))
    assert torch.equal(sample_rows(logits, [Sampling()] * 5, [None] * 5), torch.argmax(logits, -1))
    gens = [torch.Generator().manual_seed(i) for i in range(5)]
    got = sample_rows(logits, [Sampling(2.0, top_k=1)] * 5, gens)
    assert torch.equal(got, torch.argmax(logits, -1))
    assert not math.isnan(float(got.float().sum()))


@pytest.mark.cuda
def test_cuda_sample_rows_distribution_and_seeds():
    """On CUDA: the draws follow the reference distribution (top-k and top-p rows in one step) and a seeded row's
    tokens do not depend on its neighbours, with the generators on the device."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    dev = torch.device("cuda")
    logits = (torch.randn(2, 12, generator=torch.Generator().manual_seed(7)) * 2).to(dev)
    params = [Sampling(0.9, top_k=6), Sampling(1.2, top_p=0.85)]
    gens = [torch.Generator(device=dev).manual_seed(s) for s in (1, 2)]
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
    a = [int(sample(logits[1], params[1], torch.Generator(device=dev).manual_seed(9))) for _ in range(1)]
    g1, g2 = torch.Generator(device=dev).manual_seed(9), torch.Generator(device=dev).manual_seed(9)
    alone = [int(sample(logits[1], params[1], g1)) for _ in range(10)]
    other = torch.Generator(device=dev).manual_seed(4)
    beside = [int(sample_rows(logits, params, [other, g2])[1]) for _ in range(10)]
    assert alone == beside and a[0] == alone[0]
