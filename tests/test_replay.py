"""Replayed routing: the trace mapping onto a larger model and the router override's token counting."""
from __future__ import annotations

import numpy as np
import torch
import pytest

from tiered.model.moe import Observer
from tiered.predict.replay import ReplayRouting, map_trace
from tiered.predict.trace import Trace


def _trace(n_docs=3, n=12, L=2, E=4, K=2, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.stack([np.stack([rng.permutation(E)[:K] for _ in range(L)]) for _ in range(n_docs * n)]).astype(np.int16)
    w = rng.random(ids.shape).astype(np.float32)
    return Trace(np.arange(n_docs * n, dtype=np.int32), np.arange(0, n_docs * n + 1, n, dtype=np.int64), ids, w,
                 meta={"num_experts": E})


def test_mapping_layout():
    """Layer h*L+l, expert H*e+h comes from source layer l of stream h (document d+h); ids stay distinct."""
    t = _trace()
    m = map_trace(t, num_layers=4, num_experts=8)
    assert m.topk_ids.shape == (36, 4, 2)
    d0, d1 = t.doc(0), t.doc(1)
    np.testing.assert_array_equal(m.topk_ids[:12, :2], d0.topk_ids * 2)
    np.testing.assert_array_equal(m.topk_ids[:12, 2:], d1.topk_ids * 2 + 1)
    np.testing.assert_array_equal(m.topk_weights[:12, 2:], d1.topk_weights)
    for row in m.topk_ids.reshape(-1, 2):
        assert len(set(row.tolist())) == 2


def test_mapping_has_no_lookahead():
    """Changing source tokens after t never changes mapped rows up to t."""
    t = _trace()
    ids = t.topk_ids.copy()
    for d in range(3):
        ids[d * 12 + 6:(d + 1) * 12] = (ids[d * 12 + 6:(d + 1) * 12] + 1) % 4
    t2 = Trace(t.tokens, t.doc_offsets, ids, t.topk_weights, meta=t.meta)
    a, b = map_trace(t, num_layers=4, num_experts=8), map_trace(t2, num_layers=4, num_experts=8)
    for d in range(3):
        np.testing.assert_array_equal(a.topk_ids[d * 12:d * 12 + 6], b.topk_ids[d * 12:d * 12 + 6])


def test_mapping_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="same multiple"):
        map_trace(_trace(), num_layers=4, num_experts=12)


def test_replay_rows_by_position():
    """routing(layer, start, T) returns rows start..start+T-1 of the trace, the same on every call."""
    t = _trace(n_docs=1)
    d = t.doc(0)
    r = ReplayRouting(d.topk_ids, d.topk_weights, device="cpu")
    for layer in range(2):
        ids, w = r(layer, 0, 5)
        np.testing.assert_array_equal(ids.numpy(), t.topk_ids[:5, layer])
        np.testing.assert_array_equal(w.numpy(), t.topk_weights[:5, layer])
    for _ in range(2):
        ids, _ = r(1, 7, 1)
        np.testing.assert_array_equal(ids.numpy(), t.topk_ids[7:8, 1])
    with pytest.raises(IndexError, match="longer trace"):
        r(0, 10, 100)


class _Spy(Observer):
    def __init__(self):
        self.seen = []
        self.probs = []

    def on_route(self, layer, hidden, ids, weights, logits):
        self.seen.append((layer, ids.cpu().numpy().copy()))
        self.probs.append((ids.cpu().clone(), weights.cpu().clone(), logits.float().softmax(-1).cpu()))


@pytest.mark.parametrize("piecewise", [False, True])
def test_engine_follows_replayed_routing(reference_layout, piecewise):
    """With a routing override given to load(), every layer of prefill and decode routes as the trace's row at its position
    (eager, and the piecewise step with static positions), and the cache is asked for exactly those experts."""
    import torch

    import tiered
    from tiered.store.disk import Layout

    cfg = Layout.open(reference_layout).config
    L, E, K = cfg.num_layers, cfg.num_experts, cfg.top_k
    rng = np.random.default_rng(1)
    ids = np.stack([np.stack([rng.permutation(E)[:K] for _ in range(L)]) for _ in range(40)]).astype(np.int16)
    w = rng.random(ids.shape).astype(np.float32)
    spy = _Spy()
    eng = tiered.load(reference_layout, device="cpu", dtype="float32", budget={"expert_slots": 16}, max_context=64,
                      observer=spy, routing=ReplayRouting(ids, w, device="cpu"))
    if piecewise:
        eng.use_piecewise(graphs=False, static_positions=True)
    gets = eng.model.provider.record_gets()
    eng.generate(list(range(100, 110)), max_new_tokens=6, stop_at_eos=False)
    prefill = [(l, a) for l, a in spy.seen if a.shape[0] > 1]
    decode = [(l, a) for l, a in spy.seen if a.shape[0] == 1]
    for l, a in prefill:
        np.testing.assert_array_equal(a, ids[:10, l])
    assert len(decode) == 5 * L
    for i, (l, a) in enumerate(decode):
        np.testing.assert_array_equal(a[0], ids[10 + i // L, l])
    asked = [sorted(keys) for ph, keys in gets if ph == "decode"]
    want = [sorted(int(l * E + e) for e in ids[10 + i // L, l]) for i, l in
            ((i, i % L) for i in range(5 * L))]
    assert asked == want
    for i_, w_, p_ in spy.probs:  # observers see logits that agree with the replayed choice, not the router's
        want_p = w_ / w_.sum(-1, keepdim=True)
        torch.testing.assert_close(p_.gather(1, i_), want_p, rtol=1e-5, atol=1e-6)
        assert float(p_.sum(-1).max()) == pytest.approx(1.0, abs=1e-5)


def test_history_on_mapped_trace():
    """Transition statistics fit on a mapped trace (no hidden states) drive the history predictor."""
    import torch

    from tiered.predict.predictors import History, recall_precision, transition_params

    m = map_trace(_trace(n_docs=4, n=40), num_layers=4, num_experts=8)
    p = transition_params(m)
    assert torch.allclose(p.layer_trans.sum(-1), torch.ones(3, 8))
    scores = History(4, 8, p).score_trace(m)
    assert scores.shape == (m.num_tokens, 4, 8)
    rp = recall_precision(scores, m, 4)
    assert 0.0 <= rp["recall"] <= 1.0


# --- map_routing: onto a finer model with another top-k (the 397B shape) ---
from tiered.predict.replay import map_routing, routing_stats, uniform_routing  # noqa: E402


def _trace_logits(n_docs=3, n=40, L=2, E=8, K=3, seed=0):
    """A trace with router logits whose top-K are the recorded ids (as TraceRecorder keeps them)."""
    rng = np.random.default_rng(seed)
    logits = (np.argsort(rng.random((n_docs * n, L, E)), -1) * 0.25).astype(np.float16)  # distinct: no ties
    p = np.exp(logits.astype(np.float64))
    p /= p.sum(-1, keepdims=True)
    ids = np.argsort(-p, axis=-1, kind="stable")[..., :K].astype(np.int16)
    w = np.take_along_axis(p, ids.astype(np.int64), -1).astype(np.float32)
    return Trace(np.arange(n_docs * n, dtype=np.int32), np.arange(0, n_docs * n + 1, n, dtype=np.int64), ids, w,
                 router_logits=logits, meta={"num_experts": E})


@pytest.mark.parametrize("K2", [1, 2, 3, 5, 8])
def test_map_routing_takes_the_source_routers_best(K2):
    """Row t of target layer l' holds the source router's K2 best of layer l' mod L (stream l' // L), each moved into
    its group of G experts; weights are their probabilities renormalised; ids distinct and in range."""
    t = _trace_logits()
    m = map_routing(t, num_layers=5, num_experts=32, top_k=K2)
    G = 4
    assert m.topk_ids.shape == (120, 5, K2) and m.num_experts == 32 and m.top_k == K2
    assert int(m.topk_ids.min()) >= 0 and int(m.topk_ids.max()) < 32
    for d in range(3):
        for lt in range(5):
            src = t.doc((d + lt // 2) % 3)
            p = torch.softmax(torch.from_numpy(src.router_logits[:, lt % 2].astype(np.float32)), -1)
            wt, it = torch.topk(p, K2, dim=-1)
            rows = m.topk_ids[d * 40:(d + 1) * 40, lt].astype(np.int64)
            np.testing.assert_array_equal(rows // G, it.numpy())
            np.testing.assert_allclose(m.topk_weights[d * 40:(d + 1) * 40, lt], (wt / wt.sum(-1, keepdim=True)).numpy(),
                                       rtol=1e-5)
    for row in m.topk_ids.reshape(-1, K2):
        assert len(set(row.tolist())) == K2


def test_map_routing_is_deterministic_causal_and_nested():
    t = _trace_logits()
    a = map_routing(t, num_layers=5, num_experts=32, top_k=5, segment=4)
    np.testing.assert_array_equal(a.topk_ids, map_routing(t, num_layers=5, num_experts=32, top_k=5, segment=4).topk_ids)
    logits = t.router_logits.copy()
    logits[20:40] = -logits[20:40]  # change the future of document 0 only (rows 20.. of 40)
    t2 = Trace(t.tokens, t.doc_offsets, t.topk_ids, t.topk_weights, router_logits=logits, meta=t.meta)
    b = map_routing(t2, num_layers=2, num_experts=32, top_k=5, segment=4)
    np.testing.assert_array_equal(b.topk_ids[:20], map_routing(t, num_layers=2, num_experts=32, top_k=5,
                                                               segment=4).topk_ids[:20])
    small = map_routing(t, num_layers=5, num_experts=32, top_k=2, segment=4)
    for x, y in zip(small.topk_ids.reshape(-1, 2).tolist(), a.topk_ids.reshape(-1, 5).tolist()):
        assert set(x) <= set(y)  # the cut to top-2 of the same mapped model


def test_map_routing_spreads_over_the_groups():
    """A fixed member per source expert would use E of E' experts per layer; segments and jitter use the groups, and
    jitter lowers the t+1 reuse; without jitter and with one segment the source's reuse is kept exactly."""
    t = _trace_logits(n=200)
    one = map_routing(t, num_layers=2, num_experts=64, top_k=3, segment=10_000, jitter=0.0)
    src = routing_stats(t)
    assert routing_stats(one)["reuse_t1"] == pytest.approx(src["reuse_t1"])
    assert routing_stats(one)["distinct_experts_per_layer"] <= 8
    seg = map_routing(t, num_layers=2, num_experts=64, top_k=3, segment=16, jitter=0.0)
    jit = map_routing(t, num_layers=2, num_experts=64, top_k=3, segment=16, jitter=0.5)
    assert routing_stats(seg)["distinct_experts_per_layer"] > 30
    assert routing_stats(jit)["reuse_t1"] < routing_stats(seg)["reuse_t1"] < src["reuse_t1"] * 1.01


def test_map_routing_needs_logits_above_the_recorded_k_and_a_multiple():
    t = _trace()
    with pytest.raises(ValueError, match="logits"):
        map_routing(t, num_layers=2, num_experts=8, top_k=3)
    with pytest.raises(ValueError, match="multiple"):
        map_routing(t, num_layers=2, num_experts=6, top_k=2)
    m = map_routing(t, num_layers=3, num_experts=8, top_k=1)  # K' <= K: the recorded ids suffice
    np.testing.assert_array_equal(m.topk_ids[:12, 0, 0] // 2, t.topk_ids[:12, 0, 0])
    np.testing.assert_allclose(m.topk_weights, 1.0)


def test_uniform_routing():
    u = uniform_routing(300, num_layers=3, num_experts=64, top_k=10, seed=1)
    assert u.topk_ids.shape == (300, 3, 10) and u.num_experts == 64
    for row in u.topk_ids.reshape(-1, 10):
        assert len(set(row.tolist())) == 10
    s = routing_stats(u)
    assert s["distinct_experts_per_layer"] == 64 and abs(s["reuse_t1"] - 10 / 64) < 0.03
    np.testing.assert_array_equal(u.topk_ids, uniform_routing(300, num_layers=3, num_experts=64, top_k=10,
                                                              seed=1).topk_ids)


def test_map_predictions_follow_map_routing():
    """Next-gate candidates mapped as the routing is: where the recorded routing of layer l is exactly the gate's
    top-K on the hidden state after layer l-1, the mapped candidates (any count <= K) are the mapped routing's first
    ids, segment switches included; layer 0 is -1; a trace without hidden states is refused."""
    from types import SimpleNamespace

    from tiered.predict.replay import map_predictions, map_routing

    rng = np.random.default_rng(3)
    n, L, E, K, D = 300, 3, 8, 3, 5
    router = torch.from_numpy(rng.standard_normal((L, E, D)).astype(np.float32))
    gates = SimpleNamespace(logits=lambda h, l: h.float() @ router[l].T)
    hidden = rng.standard_normal((n, L, D)).astype(np.float16)
    ids = np.zeros((n, L, K), dtype=np.int16)
    ids[:, 0] = np.stack([rng.permutation(E)[:K] for _ in range(n)])
    for l in range(1, L):
        ids[:, l] = gates.logits(torch.from_numpy(hidden[:, l - 1].astype(np.float32)), l).topk(K, -1).indices.numpy()
    w = np.sort(rng.random((n, L, K)).astype(np.float32), axis=-1)[..., ::-1].copy()  # best first, as recorded
    t = Trace(np.arange(n, dtype=np.int32), np.array([0, n], dtype=np.int64), ids, w, hidden=hidden,
              meta={"num_experts": E})
    m = map_routing(t, num_layers=L, num_experts=4 * E, top_k=K, jitter=0.0, segment=64)
    for count in (1, K):
        (pred,) = map_predictions(t, gates, num_experts=4 * E, count=count, segment=64)
        assert pred.shape == (n, L, count) and bool((pred[:, 0] == -1).all())
        np.testing.assert_array_equal(pred[:, 1:], m.topk_ids[:, 1:, :count])
    assert len(np.unique(m.topk_ids[:, 1, 0] % 4)) > 1  # the members do switch across segments
    with pytest.raises(ValueError, match="hidden"):
        map_predictions(Trace(t.tokens, t.doc_offsets, ids, w, meta=t.meta), gates, num_experts=4 * E, count=1)


def test_bank_routing_equals_direct():
    """A ReplayRouting taken from a ReplayBank answers exactly as one built from that member's arrays: device and
    host rows of every layer and position, the moe_layers mapping and its error, the end-of-trace error at the
    member's own length (not the bank's); its `base` is the member's first bank row."""
    from tiered.predict.replay import ReplayBank

    docs = [_trace(n_docs=1, n=n, L=3, E=6, K=2, seed=s).doc(0) for s, n in enumerate((7, 12, 4))]
    moe = [1, 3, 4]
    bank = ReplayBank([d.topk_ids for d in docs], [d.topk_weights for d in docs], device="cpu", moe_layers=moe)
    assert len(bank) == 3 and bank.bases == [0, 7, 19, 23] and tuple(bank.ids.shape) == (23, 3, 2)
    for i, d in enumerate(docs):
        r, want = bank.routing(i), ReplayRouting(d.topk_ids, d.topk_weights, device="cpu", moe_layers=moe)
        assert r.bank is bank and r.base == bank.bases[i] and want.bank is None and want.base == 0
        assert torch.equal(r.ids, want.ids) and torch.equal(r.weights, want.weights)
        for layer in moe:
            for start in range(d.num_tokens):
                for got, ref in ((r(layer, start, 1), want(layer, start, 1)), (r.host(layer, 0, start + 1),
                                                                              want.host(layer, 0, start + 1))):
                    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), (i, layer, start)
            assert r._layer(layer) == want._layer(layer) == bank.layer(layer)
        with pytest.raises(IndexError, match="longer trace"):
            r(1, d.num_tokens, 1)
        with pytest.raises(IndexError, match="replayed MoE layers"):
            r(0, 0, 1)
    with pytest.raises(ValueError, match="shape"):
        ReplayBank([docs[0].topk_ids, docs[1].topk_ids[:, :2]], [docs[0].topk_weights, docs[1].topk_weights[:, :2]],
                   device="cpu")
