"""Replayed routing inside the bucketed (CUDA-graph) batch decode step: rows whose routing comes from one ReplayBank
are gathered on the device (batchstep.replay_gather) and must route exactly as the eager step's host callbacks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tiered.decode.batchgraph import BatchGraphs, bank_layers, shared_bank
from tiered.decode.batchstep import BankRows, Segment, replay_gather
from tiered.decode.scheduler import Request, SamplingParams, Scheduler
from tiered.engine import load
from tiered.predict.replay import ReplayBank, ReplayRouting

PROMPTS = ["def fib(n):", "import os\n", "class Foo:\n    def", "# sort a list of numbers\nxs = ",
           "x = [1, 2, 3]\nfor", "def add(a, b):\n    return", "print(", "while True:\n",
           "from collections import defaultdict\n\n\ndef count_words(text):\n    "]
LENGTHS = [14, 3, 5, 9, 12, 2, 11, 7, 13]  # new tokens per request: the step shrinks through buckets 16..1


@pytest.fixture(scope="module")
def engine():
    return load(None, device="cpu", dtype="float32", max_context=256)


def _arrays(n: int, L: int, E: int, K: int, g: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random routing of n positions: K distinct experts per (position, layer), weights summing to 1."""
    ids = torch.rand(n, L, E, generator=g).topk(K, dim=-1).indices.numpy().astype(np.int16)
    w = torch.rand(n, L, K, generator=g) + 0.1
    return ids, (w / w.sum(-1, keepdim=True)).numpy()


def _bank(engine, seed: int, *, moe_layers: list[int] | None = None) -> ReplayBank:
    """One member per prompt, each covering its prompt and new tokens plus 0-3 spare positions (irregular
    bases), different at every position and layer."""
    cfg = engine.config
    g = torch.Generator().manual_seed(seed)
    ids, w = [], []
    for i, (p, n) in enumerate(zip(PROMPTS, LENGTHS)):
        a, b = _arrays(len(engine.encode(p)) + n + i % 4, cfg.num_layers, cfg.num_experts, cfg.top_k, g)
        ids.append(a)
        w.append(b)
    return ReplayBank(ids, w, device="cpu", moe_layers=moe_layers)


def _run(engine, bucketed: bool, jobs: list[list]) -> tuple[Scheduler, list, int]:
    """Run each job (one routing or None per prompt) to completion on one scheduler; the out_ids of every job and
    how many steps the bucketed body ran."""
    sch = Scheduler(engine, max_batch=9, page_size=8, decode_attention="paged", experts="model", record_keys=True)
    ran = [0]
    if bucketed:
        g = sch.graphs = BatchGraphs(sch.step_fn, graphs=False)
        run = g.run

        def counted(segs, **kw):
            out = run(segs, **kw)
            ran[0] += out is not None
            return out
        g.run = counted
    outs = []
    for routings in jobs:
        reqs = [sch.submit(Request(str(i), engine.encode(p), SamplingParams(max_tokens=n, stop_at_eos=False),
                                   routing=r)) for i, (p, n, r) in enumerate(zip(PROMPTS, LENGTHS, routings))]
        while not sch.idle():
            sch.step()
        outs.append([r.out_ids for r in reqs])
    return sch, outs, ran[0]


def test_bucketed_replay_matches_eager(engine):
    """A batch job whose rows replay routing from one bank (rows of different prompt lengths, so different
    positions and bank rows; the step shrinking through buckets 16, 8, 4, 2, 1), then a job mixing replayed and
    own-routing rows, then a job of a second bank whose layers are stored in reverse (moe_layers): every
    decode-only step runs the bucketed body, and its per-step expert keys and greedy tokens equal the eager
    step's with the same routing (host callbacks per row and layer). The routing differs at every position and
    layer, so a gather at the wrong bank row or layer changes the keys."""
    L = engine.config.num_layers
    bank, rev = _bank(engine, 1), _bank(engine, 2, moe_layers=list(range(L))[::-1])
    jobs = [[bank.routing(i) for i in range(len(PROMPTS))],
            [bank.routing(i) if i % 2 else None for i in range(len(PROMPTS))],
            [rev.routing(i) for i in range(len(PROMPTS))]]
    eager, out_e, _ = _run(engine, False, jobs)
    graphed, out_g, ran = _run(engine, True, jobs)
    decode_steps = sum(not p for p in eager.step_prefill)
    assert ran == decode_steps > 3 * 10, (ran, decode_steps)
    assert graphed.step_prefill == eager.step_prefill
    for s, (ke, kg) in enumerate(zip(eager.step_keys, graphed.step_keys)):
        assert kg == ke, f"step {s}: bucketed keys differ from the eager step's"
    assert out_g == out_e
    g = graphed.graphs
    assert sorted(g.buckets) == [1, 2, 4, 8, 16] and not g.failed
    assert all(b.bank is rev for b in g.buckets.values())  # the third job bound every bucket to its bank
    own, _, _ = _run(engine, False, [[None] * len(PROMPTS)])  # the first job's schedule, own routing
    assert own.step_keys != eager.step_keys[:len(own.step_keys)]  # the replayed routing took effect


def test_replay_gather_rows_and_layers():
    """replay_gather puts bank row base + position of each replayed row, at the model layer's bank layer, in
    place of its own routing, and leaves own-routing and padding rows (-1) alone."""
    g = torch.Generator().manual_seed(0)
    L, E, K = 3, 10, 4
    members = [_arrays(n, L, E, K, g) for n in (5, 8, 6)]
    moe = [2, 0, 1]  # bank layer i replays model layer moe[i]
    bank = ReplayBank([a for a, _ in members], [w for _, w in members], device="cpu", moe_layers=moe)
    rows = [(0, 4), None, (2, 0), (1, 7), (1, 2)]  # (member, position) per step row, None: own routing
    idx = torch.tensor([-1 if r is None else bank.bases[r[0]] + r[1] for r in rows] + [-1])  # a padding row last
    own_ids = torch.full((len(idx), K), 99, dtype=torch.int64)
    own_w = torch.full((len(idx), K), -1.0)
    br = BankRows(idx, bank.ids, bank.weights, {m: i for i, m in enumerate(moe)})
    for layer in range(L):
        ids, w = replay_gather(br, layer, own_ids, own_w)
        for t, r in enumerate(rows + [None]):
            if r is None:
                assert (ids[t] == 99).all() and (w[t] == -1.0).all()
                continue
            want_i, want_w = ReplayRouting(*members[r[0]], device="cpu", moe_layers=moe)(layer, r[1], 1)
            assert torch.equal(ids[t], want_i[0]) and torch.equal(w[t], want_w[0]), (layer, t)


def test_eligible_and_bank_checks(engine):
    """A step is graphable when its replayed rows share one bank (own-routing rows may join); a routing that is
    not a bank's or two banks run eagerly; a bank that cannot serve the model is refused with what to change; a
    position past a row's routing raises as the eager step does."""
    sch = Scheduler(engine, max_batch=4, page_size=8, decode_attention="paged", experts="model")
    gr = BatchGraphs(sch.step_fn, graphs=False)
    bank, other = _bank(engine, 3), _bank(engine, 4)
    direct = ReplayRouting(bank.ids_host[:20].numpy(), bank.weights_host[:20].numpy(), device="cpu")

    def seg(r, start=3):
        return Segment([5], start, [0, 1, 2], True, r)
    assert gr.eligible([seg(bank.routing(0)), seg(None), seg(bank.routing(2))])
    assert shared_bank([seg(None), seg(bank.routing(1))]) == (True, bank)
    assert not gr.eligible([seg(bank.routing(0)), seg(other.routing(1))])
    assert not gr.eligible([seg(direct)])
    n0 = bank.bases[1]
    with pytest.raises(IndexError, match="longer trace"):
        gr.run([seg(bank.routing(0), start=n0)])
    cfg = engine.config
    L, K = cfg.num_layers, cfg.top_k
    ids, w = _arrays(4, L, cfg.num_experts, K + 1, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="top-"):
        bank_layers(sch.step_fn, ReplayBank([ids], [w], device="cpu"))
    ids, w = _arrays(4, L - 1, cfg.num_experts, K, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="moe_layers"):
        bank_layers(sch.step_fn, ReplayBank([ids], [w], device="cpu", moe_layers=list(range(1, L))))
    with pytest.raises(ValueError, match="moe_layers"):
        bank_layers(sch.step_fn, ReplayBank([ids], [w], device="cpu"))


@pytest.mark.cuda
def test_cuda_graphed_replay():
    """On CUDA the replayed rows' decode steps replay captured graphs that gather from the bank: a job of one
    bank, a mixed job, then a job of a second bank (every bucket captured again) give the tokens and keys of the
    same bucketed body run eagerly; in the jobs where every row is replayed the keys also equal the eager step's
    (host callbacks), since the routing alone decides them."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    eng = load(None, device="cuda", dtype="bfloat16", max_context=256)
    cfg = eng.config
    g = torch.Generator().manual_seed(5)
    banks = []
    for _ in range(2):
        arrs = [_arrays(len(eng.encode(p)) + n + i % 4, cfg.num_layers, cfg.num_experts, cfg.top_k, g)
                for i, (p, n) in enumerate(zip(PROMPTS, LENGTHS))]
        banks.append(ReplayBank([a for a, _ in arrs], [w for _, w in arrs], device="cuda"))
    jobs = [[banks[0].routing(i) for i in range(len(PROMPTS))],
            [banks[0].routing(i) if i % 2 else None for i in range(len(PROMPTS))],
            [banks[1].routing(i) for i in range(len(PROMPTS))]]
    runs = {}
    for mode in ("graphs", "body", "eager"):
        sch = Scheduler(eng, max_batch=9, page_size=16, record_keys=True, cuda_graphs=mode != "eager")
        assert sch.step_fn.experts == "model"
        if mode == "body":
            sch.graphs = BatchGraphs(sch.step_fn, graphs=False)
        outs, ends = [], [0]
        for routings in jobs:
            reqs = [sch.submit(Request(str(i), eng.encode(p), SamplingParams(max_tokens=n, stop_at_eos=False),
                                       routing=r)) for i, (p, n, r) in enumerate(zip(PROMPTS, LENGTHS, routings))]
            while not sch.idle():
                sch.step()
            outs.append([r.out_ids for r in reqs])
            ends.append(len(sch.step_keys))
        runs[mode] = (sch, outs, ends)
    sch, outs, ends = runs["graphs"]
    st = sch.stats()["cuda_graphs"]
    print(st)
    assert st["buckets"] == [1, 2, 4, 8, 16] and not st["failed"] and st["replays"] > 3 * 10, st
    assert st["recaptures"] == 5, st  # the second bank's job captured every bucket again
    body, eager = runs["body"], runs["eager"]
    assert outs == body[1] and sch.step_keys == body[0].step_keys
    assert ends == eager[2]
    for j in (0, 2):
        a, b = ends[j], ends[j + 1]
        assert sch.step_keys[a:b] == eager[0].step_keys[a:b], f"job {j}: graphed keys differ from the eager step's"
