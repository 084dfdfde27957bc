"""Steps ahead (decode/scheduler.py): a graphed greedy decode step launched from the previous step's picks before
the host reads them must give every request the same tokens, text and finish reason as reading each step first,
through EOS and stop strings (a pick that ends its row ran one step too many), admissions, cancels, preemption and
sampled rows. On CPU the bucketed body runs eagerly (BatchGraphs(graphs=False)): the same buffers and chain."""
from __future__ import annotations

import pytest
import torch

from tiered.decode.batchgraph import BatchGraphs
from tiered.decode.scheduler import Request, SamplingParams, Scheduler
from tiered.engine import load

PROMPTS = ["def fib(n):", "import os\n", "class Foo:\n    def", "# sort a list of numbers\nxs = ",
           "x = [1, 2, 3]\nfor", "def add(a, b):\n    return", "print(", "while True:\n"]
LENGTHS = [14, 3, 9, 12, 2, 11, 7, 13]


@pytest.fixture(scope="module")
def engine():
    return load(None, device="cpu", dtype="float32", max_context=256)


def _sched(engine, ahead: bool, **kw) -> tuple[Scheduler, list]:
    """A scheduler whose decode-only steps run the bucketed body; the list gets one entry per chained launch."""
    kw.setdefault("max_batch", 8)
    sch = Scheduler(engine, page_size=8, decode_attention="paged", experts="model", ahead=ahead, **kw)
    sch.graphs = BatchGraphs(sch.step_fn, graphs=False)
    chained: list = []
    chain = sch._chain

    def counted(a):
        out = chain(a)
        if out is not None:
            chained.append(len(out.rows))
        return out
    sch._chain = counted
    return sch, chained


def _requests(engine, params: list[SamplingParams], stream: bool = True) -> list[Request]:
    return [Request(str(i), engine.encode(PROMPTS[i % len(PROMPTS)]), p, stream=stream) for i, p in enumerate(params)]


def _drive(sch: Scheduler, reqs: list[Request], *, between=None) -> list[tuple]:
    pieces: dict[str, list[str]] = {r.id: [] for r in reqs}
    for r in reqs:
        r.sink = lambda q, piece, done: pieces[q.id].append(piece)
        sch.submit(r)
    n = 0
    while not sch.idle():
        sch.step()
        n += 1
        if between is not None:
            between(n)
    assert sch._ahead is None
    return [(r.out_ids, r.text, r.finish_reason, "".join(pieces[r.id])) for r in reqs]


def _greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, **kw)


def test_ahead_same_tokens_and_stats(engine):
    """More requests than rows (admissions mid-run), lengths that shrink the step through its buckets: the same
    tokens, text and sink pieces; the chain ran; every step's expert keys and the token counts agree."""
    params = [_greedy(n, stop_at_eos=False) for n in LENGTHS + [5, 9, 4]]
    runs = {}
    for ahead in (False, True):
        sch, chained = _sched(engine, ahead, max_batch=6, record_keys=True)
        runs[ahead] = (_drive(sch, _requests(engine, params)), sch, chained)
    (ref, s0, c0), (got, s1, c1) = runs[False], runs[True]
    assert got == ref
    decode_steps = sum(not p for p in s1.step_prefill)
    assert not c0 and len(c1) >= decode_steps // 2, (c1, decode_steps)  # serial never chains; ahead chains half
    assert s1.tokens_generated == s0.tokens_generated == sum(p.max_tokens for p in params)
    assert s1.decode_tokens == s0.decode_tokens
    assert s1.step_keys == s0.step_keys and s1.step_rows == s0.step_rows  # no EOS: the very same steps
    assert s1.steps == s0.steps and s1.stats()["distinct_experts_per_step"] == s0.stats()["distinct_experts_per_step"]


def test_ahead_eos_and_stop_strings(engine):
    """A pick that ends its row (EOS, a stop string) is known only after the next step has run: that step's pick
    for the row is dropped, and the row's result equals the serial run's."""
    free = [_greedy(n, stop_at_eos=False) for n in LENGTHS]
    sch, _ = _sched(engine, False)
    base = _drive(sch, _requests(engine, free))
    long = max(range(len(base)), key=lambda i: len(base[i][0]))
    eos = base[long][0][len(base[long][0]) // 2]  # a token some row picks mid-way: it becomes an EOS
    text = base[3][1]
    stop = text[len(text) // 2:len(text) // 2 + 2]  # a string row 3 produces mid-way
    assert stop.strip(), text
    params = [_greedy(n, stop=(stop,) if i % 2 else ()) for i, n in enumerate(LENGTHS)]
    runs = []
    for ahead in (False, True):
        for stream in (True, False):
            sch, chained = _sched(engine, ahead)
            sch.eos = {eos}
            runs.append(_drive(sch, _requests(engine, params, stream=stream)))
            if ahead:
                assert chained
    assert runs[1] == runs[0] and runs[2] == runs[0] and runs[3] == runs[0]
    reasons = [r[2] for r in runs[0]]
    assert "stop" in reasons and "length" in reasons, reasons
    assert any(len(r[0]) < p.max_tokens for r, p in zip(runs[0], params))  # something ended early


def test_ahead_cancel_and_sampled_rows(engine):
    """A cancel ends the chain (the row ends 'cancelled' with a prefix of its serial tokens; the others as serial);
    sampled rows go ahead too (their picks drawn on the device) and draw the serial run's seeded tokens."""
    params = [_greedy(n, stop_at_eos=False) for n in LENGTHS]
    sch, _ = _sched(engine, False)
    ref = _drive(sch, _requests(engine, params))
    sch, chained = _sched(engine, True)
    reqs = _requests(engine, params)
    got = _drive(sch, reqs, between=lambda n: sch.cancel(reqs[2]) if n == 6 else None)
    assert chained
    assert got[2][2] == "cancelled" and ref[2][0][:len(got[2][0])] == got[2][0] and len(got[2][0]) < LENGTHS[2]
    assert [g for i, g in enumerate(got) if i != 2] == [r for i, r in enumerate(ref) if i != 2]

    mixed = list(params)
    mixed[4] = SamplingParams(max_tokens=9, temperature=0.8, top_k=20, seed=7, stop_at_eos=False)
    mixed[6] = SamplingParams(max_tokens=12, temperature=1.1, top_p=0.9, seed=11, stop_at_eos=False)
    outs = []
    for ahead in (False, True):
        sch, chained = _sched(engine, ahead)
        outs.append(_drive(sch, _requests(engine, mixed)))
        assert bool(chained) == ahead
    assert outs[0] == outs[1]
    sch, _ = _sched(engine, True, max_batch=1)  # alone in its batch: the same seeded draws
    assert _drive(sch, _requests(engine, mixed)[6:7])[0] == outs[0][6]


def test_ahead_short_of_pages(engine):
    """A pool too small for every row: the chain ends where a row would need a page the pool lacks, preemption
    runs as serial, and the results agree."""
    params = [_greedy(n, stop_at_eos=False) for n in LENGTHS]
    outs, pre = [], []
    for ahead in (False, True):
        sch, chained = _sched(engine, ahead, kv_pages=8)
        outs.append(_drive(sch, _requests(engine, params)))
        pre.append(sch.preemptions)
        assert bool(chained) == ahead
    assert outs[0] == outs[1]
    assert pre[0] > 0 and pre[1] > 0


def test_ahead_off_without_graphs(engine):
    """No graphed body (the eager step): nothing is launched ahead."""
    sch = Scheduler(engine, max_batch=4, page_size=8, ahead=True)
    assert sch.graphs is None
    reqs = _requests(engine, [_greedy(4, stop_at_eos=False)] * 3)
    for r in reqs:
        sch.submit(r)
    while not sch.idle():
        sch.step()
        assert sch._ahead is None
    assert all(len(r.out_ids) == 4 for r in reqs)


def test_graph_run_prev_tokens(engine):
    """BatchGraphs.run(prev=, src=) takes row i's token from prev[src[i]] on the device: the same logits as
    passing the tokens themselves."""
    sch = Scheduler(engine, max_batch=4, page_size=8, decode_attention="paged", experts="model")
    g = BatchGraphs(sch.step_fn, graphs=False)
    from tiered.decode.batchstep import Segment
    pages = sch.state.alloc(2)
    segs = [Segment([t], 3, pages, True) for t in (11, 12, 13)]
    want = g.run(segs).clone()
    prev = torch.tensor([13, 99, 11, 12])
    got = g.run([Segment([0], 3, pages, True)] * 3, prev=prev, src=[2, 3, 0], count=False)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="prev and src"):
        g.run(segs, prev=prev)


def _graph_draws(g, sch, V):
    """One bucketed step of four rows (greedy, two top-p draws, full-distribution draw) with the draws in its body,
    against sample_rows over the same logits with streams at the same seeds and draw counts."""
    from tiered.decode.batchstep import Segment
    from tiered.decode.sampling import RowNoise, Sampling, sample_rows

    segs = [Segment([t], 3, sch.state.alloc(1), True) for t in (11, 12, 13, 14)]  # each row its own page
    params = [Sampling(0.0), Sampling(0.8, top_p=0.9), Sampling(1.2, top_p=0.5), Sampling(0.7)]
    noises = [None, RowNoise(3), RowNoise(4), RowNoise(5)]
    for n in noises[1:]:
        n.take()  # a stream part way through
    logits = g.run(segs, sampling=list(zip(params, noises))).clone()
    got = g.picks.tolist()
    assert [n.draws for n in noises[1:]] == [2, 2, 2]
    again = [None] + [RowNoise(s, 1) for s in (3, 4, 5)]
    want = sample_rows(logits, params, again).tolist()
    assert got == want and got[0] == int(torch.argmax(logits[0]))
    again = g.run(segs)  # no sampling given: every row's argmax
    assert g.picks.tolist() == torch.argmax(again, -1).tolist()
    return got


def test_graph_draws_in_body(engine):
    """The bucketed body draws the sampled rows itself (the torch path on CPU): the tokens sample_rows draws from
    the same logits and keys; greedy rows keep the argmax."""
    sch = Scheduler(engine, max_batch=4, page_size=8, decode_attention="paged", experts="model")
    _graph_draws(BatchGraphs(sch.step_fn, graphs=False), sch, engine.config.vocab_size)


@pytest.mark.cuda
def test_cuda_graph_draws_and_sampled_ahead():
    """On CUDA: the captured graph's draws (the nucleus kernels inside it) equal sample_rows' over its logits, and
    a batch of sampled rows (top-p, no top-k) with greedy ones gives the same tokens ahead as serial."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    eng = load(None, device="cuda", dtype="bfloat16", max_context=256)
    sch = Scheduler(eng, max_batch=4, page_size=16)
    assert sch.graphs is not None and sch.graphs.graphed
    _graph_draws(sch.graphs, sch, eng.config.vocab_size)
    params = [SamplingParams(max_tokens=n, temperature=0.8 if i % 2 else 0.0, top_p=0.9, seed=i, stop_at_eos=False)
              for i, n in enumerate(LENGTHS)]
    outs = []
    for ahead in (False, True):
        sch = Scheduler(eng, max_batch=6, page_size=16, ahead=ahead)
        outs.append(_drive(sch, _requests(eng, params)))
        assert sch.graphs.replays >= 10
    assert outs[0] == outs[1]


@pytest.mark.cuda
def test_cuda_ahead_matches_serial():
    """On CUDA, with captured graphs: steps ahead (pinned copies, an event per step, the tokens gathered on the
    device) give the serial graphed run's tokens, text, finish reasons and per-step expert keys, EOS included."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    eng = load(None, device="cuda", dtype="bfloat16", max_context=256)
    params = [_greedy(n, stop_at_eos=False) for n in LENGTHS + [6, 10]]
    sch = Scheduler(eng, max_batch=6, page_size=16, ahead=False)
    base = _drive(sch, _requests(eng, params))
    long = max(range(len(base)), key=lambda i: len(base[i][0]))
    eos = base[long][0][len(base[long][0]) // 2]
    runs = {}
    for ahead in (False, True):
        sch = Scheduler(eng, max_batch=6, page_size=16, ahead=ahead, record_keys=True)
        assert sch.graphs is not None
        sch.eos = {eos}
        launched = []
        chain = sch._chain
        sch._chain = lambda a, launched=launched, chain=chain: launched.append(a) or chain(a)
        runs[ahead] = (_drive(sch, _requests(eng, [_greedy(p.max_tokens) for p in params])), sch, launched)
    (ref, s0, _), (got, s1, launched) = runs[False], runs[True]
    assert got == ref
    assert len(launched) >= 10 and s1.graphs.replays >= 10
    assert "stop" in [g[2] for g in got]
    print(s0.stats()["cuda_graphs"], s1.stats()["cuda_graphs"])
