"""The continuous-batching scheduler and its expert-major step, against batch-1 decoding (engine.generate)."""
from __future__ import annotations

import pytest
import torch

from tiered.decode.batchstep import paged_decode_attention
from tiered.decode.scheduler import QueueFull, Request, RequestError, SamplingParams, Scheduler
from tiered.engine import load

PROMPTS = ["def fib(n):", "import os\n", "class Foo:\n    def", "# sort a list of numbers\nxs = ",
           "x = [1, 2, 3]\nfor", "def add(a, b):\n    return", "print(", "while True:\n",
           "from collections import defaultdict\n\n\ndef count_words(text):\n    "]


@pytest.fixture(scope="module")
def engine():
    return load(None, device="cpu", dtype="float32", max_context=256)


@pytest.fixture(scope="module")
def reference(engine):
    """Batch-1 greedy tokens of every prompt (the engine's own decode loop), 20 new tokens each."""
    return [engine.generate(p, max_new_tokens=20).token_ids for p in PROMPTS]


def _run(sch: Scheduler, engine, prompts, max_tokens=20, **kw) -> list[Request]:
    reqs = [sch.submit(Request(str(i), engine.encode(p), SamplingParams(max_tokens=max_tokens, **kw)))
            for i, p in enumerate(prompts)]
    for _ in range(2000):
        if sch.idle():
            break
        sch.step()
    assert sch.idle()
    return reqs


@pytest.mark.parametrize("max_batch,page_size,prefill_tokens,attn,prefill_attn",
                         [(9, 16, 256, "rows", "rows"), (4, 4, 7, "rows", "rows"), (3, 5, 3, "rows", "rows"),
                          (9, 4, 256, "paged", "rows"), (9, 4, 256, "paged", "batched"),
                          (5, 4, 13, "paged", "batched")])
def test_batched_greedy_equals_batch1(engine, reference, max_batch, page_size, prefill_tokens, attn, prefill_attn):
    """fp32 reference model: each of 9 rows of different lengths gets exactly the batch-1 greedy tokens,
    whether all rows run together or join as others finish, with prompts prefilled in odd chunks, with the
    decode rows' attention in one paged call (the CUDA default) instead of row by row, and with the fresh
    prompts' chunks attended together under one block-diagonal mask (the CUDA default)."""
    sch = Scheduler(engine, max_batch=max_batch, page_size=page_size, prefill_tokens=prefill_tokens,
                    decode_attention=attn, prefill_attention=prefill_attn)
    assert sch.step_fn.prefill_attention == prefill_attn
    reqs = _run(sch, engine, PROMPTS)
    for r, ref in zip(reqs, reference):
        assert r.out_ids == ref, f"row {r.id} ({PROMPTS[int(r.id)]!r}) differs from batch-1 greedy"
        assert r.finish_reason == "length"
        assert r.text == engine.tokenizer.decode(ref)
    st = sch.stats()
    assert st["rows_per_step"] > 1 and st["tokens_generated"] == 20 * len(PROMPTS)
    assert sch.state.free_pages == sch.state.num_pages  # every page came back


def test_model_expert_path_matches_major(engine, reference):
    """experts='model' (the model's own expert path, the step's distinct experts marked on the device and read
    once after the lm_head; the CUDA default when every expert is resident) gives the batch-1 greedy tokens and
    the same per-step expert keys and counts as the expert-major path."""
    runs = {}
    for path in ("major", "model"):
        sch = Scheduler(engine, max_batch=9, page_size=8, prefill_tokens=40, record_keys=True, experts=path)
        assert sch.step_fn.experts == path
        reqs = _run(sch, engine, PROMPTS)
        for r, ref in zip(reqs, reference):
            assert r.out_ids == ref, f"{path}: row {r.id} differs from batch-1 greedy"
        runs[path] = sch
    major, model = runs["major"], runs["model"]
    assert model.step_keys == major.step_keys and len(model.step_keys) > 5
    assert all(len(k) == engine.config.num_layers for k in model.step_keys)
    assert model.distinct_sum == major.distinct_sum == sum(len(k) for s in model.step_keys for k in s)
    with pytest.raises(ValueError, match="auto, major or model"):
        Scheduler(engine, max_batch=2, experts="rows")


def test_bucketed_decode_steps_match_batch1(engine, reference):
    """The body of the CUDA graphs of decode-only steps (decode/batchgraph.py), run eagerly on CPU: rows
    padded to their bucket (token 0 at position 0, length 0, K/V into a free page, marks not counted), every
    buffer shaped by the bucket. As requests finish the step shrinks through buckets 16, 8, 4, 2 and 1; every
    row still gets its batch-1 greedy tokens, and the marks count what the eager step counts."""
    from tiered.decode.batchgraph import BatchGraphs, bucket_for

    assert [bucket_for(n) for n in (1, 2, 3, 5, 9, 16, 17, 33, 48, 100, 128)] == \
        [1, 2, 4, 8, 16, 16, 32, 48, 48, 112, 128]
    lengths = [20, 3, 5, 9, 12, 2, 16, 7, 18]  # new tokens per request
    runs = {}
    for graphed in (False, True):
        sch = Scheduler(engine, max_batch=9, page_size=8, decode_attention="paged", experts="model",
                        record_keys=True)
        assert sch.graphs is None  # CPU: no CUDA graphs by default
        if graphed:
            sch.graphs = BatchGraphs(sch.step_fn, graphs=False)
        reqs = [sch.submit(Request(str(i), engine.encode(p), SamplingParams(max_tokens=n)))
                for i, (p, n) in enumerate(zip(PROMPTS, lengths))]
        while not sch.idle():
            sch.step()
        for r, ref, n in zip(reqs, reference, lengths):
            assert r.out_ids == ref[:n], f"graphed={graphed}: row {r.id} differs from batch-1 greedy"
        runs[graphed] = sch
    g = runs[True].graphs
    assert sorted(g.buckets) == [1, 2, 4, 8, 16] and not g.failed
    assert runs[True].step_keys == runs[False].step_keys
    assert runs[True].distinct_sum == runs[False].distinct_sum
    with pytest.raises(ValueError, match="graphs=False"):
        BatchGraphs(runs[True].step_fn)


def test_preemption_keeps_greedy_tokens(engine, reference):
    """A pool too small for every row at once: rows are preempted and recomputed, tokens unchanged."""
    sch = Scheduler(engine, max_batch=9, page_size=4, kv_pages=24)
    reqs = _run(sch, engine, PROMPTS)
    assert sch.preemptions > 0
    for r, ref in zip(reqs, reference):
        assert r.out_ids == ref


def test_each_expert_loaded_once_per_step(reference):
    """With the expert cache: every (layer, expert) appears in at most one get() of a step (counted by the
    cache's trace), even when a layer's experts exceed the slots and come in waves; tokens stay exact."""
    for slots in (64, 12):
        eng = load(None, device="cpu", dtype="float32", max_context=256, budget={"expert_slots": slots})
        cache = eng.model.provider
        sch = Scheduler(eng, max_batch=9)
        reqs = [sch.submit(Request(str(i), eng.encode(p), SamplingParams(max_tokens=20))) for i, p in enumerate(PROMPTS)]
        waves = 0
        while not sch.idle():
            gets = cache.record_gets()
            sch.step()
            keys = [k for _, ks in gets for k in ks]
            assert len(keys) == len(set(keys)), "an expert was resolved twice in one step"
            assert len(keys) == sch.step_fn.last.distinct_experts
            waves = max(waves, sch.step_fn.last.provider_calls)
        assert (waves > eng.config.num_layers) == (slots < eng.config.num_experts)
        for r, ref in zip(reqs, reference):
            assert r.out_ids == ref
        st = sch.stats()
        assert st["bytes_per_generated_token"] > 0 and st["distinct_experts_per_step"] > 0


def test_stop_strings_seed_and_limits(engine):
    """Stop strings cut the text (never emitted past them); a seed repeats a sampled run whatever the batch;
    max_tokens 0 returns nothing; the queue bound raises QueueFull."""
    sch = Scheduler(engine, max_batch=4)
    full = engine.generate("def fib(n):", max_new_tokens=20)
    stop = full.text[5:9]
    seen: list[str] = []
    r = sch.submit(Request("s", engine.encode("def fib(n):"), SamplingParams(max_tokens=20, stop=(stop,)),
                           sink=lambda r, piece, done: seen.append(piece)))
    sch.run_until_idle()
    assert r.finish_reason == "stop" and r.text == full.text[:full.text.find(stop)]
    assert "".join(seen) == r.text
    sampled = []
    for others in (0, 3):
        for i in range(others):
            sch.submit(Request(f"o{i}", engine.encode(PROMPTS[i]), SamplingParams(max_tokens=12)))
        r = sch.submit(Request("t", engine.encode("import"), SamplingParams(max_tokens=12, temperature=0.9, seed=7)))
        sch.run_until_idle()
        sampled.append(r.out_ids)
    assert sampled[0] == sampled[1]
    r = sch.submit(Request("z", engine.encode("x"), SamplingParams(max_tokens=0)))
    sch.run_until_idle()
    assert r.out_ids == [] and r.finish_reason == "length"
    small = Scheduler(engine, max_batch=1, max_queue=2)
    for i in range(2):
        small.submit(Request(str(i), [1, 2], SamplingParams(max_tokens=1)))
    with pytest.raises(QueueFull):
        small.submit(Request("x", [1, 2], SamplingParams(max_tokens=1)))
    with pytest.raises(RequestError):
        small.submit(Request("e", [], SamplingParams()))
    with pytest.raises(RequestError):
        small.submit(Request("e", [1], SamplingParams(max_tokens=-1)))


def test_cancel_frees_row_next_step(engine):
    """A cancelled running request leaves the batch at the next step and returns its pages."""
    sch = Scheduler(engine, max_batch=4)
    a = sch.submit(Request("a", engine.encode("def f():"), SamplingParams(max_tokens=100)))
    b = sch.submit(Request("b", engine.encode("import"), SamplingParams(max_tokens=100)))
    sch.step()
    sch.step()
    assert a in sch.running
    sch.cancel(a)
    sch.step()
    assert a not in sch.running and a.finish_reason == "cancelled" and not a.pages
    assert sch.step_fn.last.rows == 1
    sch.cancel(b)
    sch.run_until_idle()
    assert sch.state.free_pages == sch.state.num_pages


@pytest.mark.parametrize("B,page,window", [(1, 4, None), (3, 5, None), (5, 16, None), (4, 3, 6)])
def test_paged_decode_attention_matches_rows(B, page, window):
    """The paged decode-attention reference equals plain attention of each row over its contiguous K/V."""
    torch.manual_seed(0)
    H, KV, hd, N = 4, 2, 8, 40
    kp, vp = torch.randn(N, page, KV, hd), torch.randn(N, page, KV, hd)
    lens = [1 + (7 * i + 3) % 23 for i in range(B)]
    perm = torch.randperm(N).tolist()
    tables, used = [], 0
    for n in lens:
        k = -(-n // page)
        tables.append(perm[used:used + k])
        used += k
    maxp = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (maxp - len(t)) for t in tables], dtype=torch.int32)
    q = torch.randn(B, H, hd)
    out = paged_decode_attention(q, kp, vp, bt, torch.tensor(lens, dtype=torch.int32), window=window)
    for b, n in enumerate(lens):
        k = kp[tables[b]].reshape(-1, KV, hd)[:n]
        v = vp[tables[b]].reshape(-1, KV, hd)[:n]
        lo = 0 if window is None else max(0, n - window)
        k, v = k[lo:].repeat_interleave(H // KV, 1), v[lo:].repeat_interleave(H // KV, 1)  # [S, H, hd]
        att = torch.softmax(torch.einsum("hd,shd->hs", q[b], k) * hd ** -0.5, -1)
        ref = torch.einsum("hs,shd->hd", att, v)
        torch.testing.assert_close(out[b], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("budget", [None, {"expert_slots": 96, "ram_gb": 0.1}])
def test_cuda_batched_top1_agreement(budget):
    """bf16 on CUDA (paged decode attention, grouped GEMMs; with the expert cache, resident experts first and
    the rest after their copies): batched greedy agrees with batch-1 greedy on >= 90% of tokens (batch
    composition changes rounding, so exact equality is not required there)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    eng = load(None, device="cuda", dtype="bfloat16", max_context=256, budget=budget)
    ref = [eng.generate(p, max_new_tokens=20).token_ids for p in PROMPTS]
    sch = Scheduler(eng, max_batch=9)
    reqs = _run(sch, eng, PROMPTS)
    same = sum(a == b for r, g in zip(reqs, ref) for a, b in zip(r.out_ids, g))
    print(f"top-1 agreement {same / sum(len(g) for g in ref):.3f}")
    assert same >= 0.9 * sum(len(g) for g in ref)
    assert sch.step_fn.grouped_mm is not None and sch.step_fn.decode_attention == "paged"


@pytest.mark.cuda
@pytest.mark.parametrize("experts,agree", [("source", 0.9), ("q4", 0.8)])
def test_cuda_graphed_decode_steps(experts, agree):
    """On CUDA with every expert resident the decode-only steps replay CUDA graphs (one per bucket, captured on
    its first step): the tokens equal those of the same bucketed body run eagerly (same shapes, same kernels),
    every bucket the run passed through was captured, none failed, and batched greedy still agrees with
    batch-1 greedy on >= 90% of tokens (bf16), 80% with q4 experts (the grouped and GEMV kernels round apart
    more, and one flipped token changes the rest of its row: 80 of 92 in session 26)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    from tiered.decode.batchgraph import BatchGraphs

    eng = load(None, device="cuda", dtype="bfloat16", max_context=256, experts=experts)
    ref = [eng.generate(p, max_new_tokens=20).token_ids for p in PROMPTS]
    lengths = [20, 3, 5, 9, 12, 2, 16, 7, 18]
    outs = {}
    for graphed in (True, False):
        sch = Scheduler(eng, max_batch=9, page_size=16)
        assert sch.step_fn.experts == "model" and sch.graphs is not None
        if not graphed:
            sch.graphs = BatchGraphs(sch.step_fn, graphs=False)
        reqs = [sch.submit(Request(str(i), eng.encode(p), SamplingParams(max_tokens=n)))
                for i, (p, n) in enumerate(zip(PROMPTS, lengths))]
        while not sch.idle():
            sch.step()
        outs[graphed] = [r.out_ids for r in reqs]
        if graphed:
            st = sch.stats()["cuda_graphs"]
            assert st["buckets"] == [1, 2, 4, 8, 16] and not st["failed"] and st["replays"] > 15, st
    assert outs[True] == outs[False]
    same = sum(a == b for o, g in zip(outs[True], ref) for a, b in zip(o, g))
    total = sum(len(o) for o in outs[True])
    print(f"top-1 agreement {same / total:.3f}")
    assert same >= agree * total


@pytest.mark.parametrize("T,max_groups", [(1, 1024), (7, 1024), (64, 1024), (33, 5)])
def test_grouped_mm_experts_match_loop(T, max_groups, monkeypatch):
    """The grouped-GEMM expert path (one GEMM per projection, runs of <= MAX_GROUPS slots) equals the loop
    over experts, bf16 (torch's grouped_mm also runs on CPU), over 1 token, odd counts and cut runs."""
    from tiered.decode import batchstep
    from tiered.kernels.grouped import _grouped_mm

    eng = load(None, device="cpu", dtype="bfloat16", max_context=64)
    sch = Scheduler(eng, max_batch=1)
    step = sch.step_fn
    cfg = eng.config
    torch.manual_seed(T)
    x = torch.randn(T, cfg.hidden_size, dtype=torch.bfloat16)
    ids = torch.stack([torch.randperm(cfg.num_experts)[:cfg.top_k] for _ in range(T)])
    wts = torch.softmax(torch.randn(T, cfg.top_k), -1).to(torch.bfloat16)
    monkeypatch.setattr(batchstep, "MAX_GROUPS", max_groups)
    calls = []

    def spy(*a, **kw):
        calls.append(kw["offs"].numel())
        return _grouped_mm()(*a, **kw)

    outs = []
    for fn in (None, spy):
        step.grouped_mm = fn
        step.last = batchstep.StepCounts()
        outs.append(step._experts(x, ids, wts, 3).float())
    assert calls and max(calls) <= max_groups and len(calls) % 3 == 0  # three projections per run of slots
    torch.testing.assert_close(outs[1], outs[0], rtol=2e-2, atol=2e-2)


def test_batch_rows_decode_their_text_at_the_end(engine):
    """stream=False (what `tiered batch` submits): a row without stop strings is detokenised once when it ends, and
    its text equals the streamed row's; with a stop string it still streams and is cut at the stop; a sink still
    gets the whole text with done=True."""
    prompts = PROMPTS[:4]
    seen: dict[str, list] = {}

    def sink(r, piece, done):
        seen.setdefault(r.id, []).append((piece, done))

    out = {}
    for stream in (True, False):
        sch = Scheduler(engine, max_batch=4, page_size=8)
        reqs = [sch.submit(Request(f"{stream}{i}", engine.encode(p), SamplingParams(max_tokens=12), sink=sink,
                                   stream=stream)) for i, p in enumerate(prompts)]
        while not sch.idle():
            sch.step()
        out[stream] = reqs
    for a, b in zip(out[True], out[False]):
        assert a.out_ids == b.out_ids and a.text == b.text and a.text
        assert "".join(p for p, _ in seen[b.id]) == b.text and seen[b.id] == [(b.text, True)]
    stop = out[True][0].text[3:6]
    sch = Scheduler(engine, max_batch=1, page_size=8)
    r = sch.submit(Request("s", engine.encode(prompts[0]), SamplingParams(max_tokens=12, stop=(stop,)), stream=False))
    while not sch.idle():
        sch.step()
    assert r.finish_reason == "stop" and r.text == out[True][0].text[:out[True][0].text.find(stop)]
