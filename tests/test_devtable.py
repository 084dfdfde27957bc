"""The device-resident slot table (store/devtable.py, kernels/slot_table.py, decode/devstep.py).

On CPU: the resolve and gather kernels under the Triton interpreter against the torch reference, the reference's
invariants over random traces, and the whole device-step algorithm run eagerly through the model (the table's
reference path and a copy loop), token for token against every expert resident, across the hand-overs between
host-routed prefill and device-routed decode. On CUDA: the captured one-graph step against the host step.
"""
from __future__ import annotations

import random

import pytest
import torch

from tiered.decode.devstep import DeviceStep
from tiered.engine import EngineError, load
from tiered.kernels import slot_table as st
from tiered.predict.replay import ReplayRouting
from tiered.store.devtable import DeviceSlotTable, refusal
from tiered.store.options import BudgetError

PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
NEW = 20
CUDA = torch.cuda.is_available()


def _tables(N: int, S: int, device: str = "cpu", seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = {"slot_of": torch.full((N,), -1, dtype=torch.int32), "key_of": torch.full((S,), -1, dtype=torch.int32),
         "last": torch.zeros(S, dtype=torch.int64), "uses": torch.zeros(S, dtype=torch.int64),
         "clock": torch.zeros(1, dtype=torch.int64), "counts": torch.zeros(5, dtype=torch.int64),
         "host_row": torch.randperm(N, generator=g).to(torch.int64)}
    return {k: v.to(device) for k, v in t.items()}


def _kernel_resolve(ids, layer, E, t, w, out_slot, out_src, pin=None, prefetch=False, nt=None, margin=0, topk=None):
    """The Triton kernel: on CUDA through resolve(), on CPU straight into the interpreter."""
    if CUDA:
        return st.resolve(ids, layer, E, t, w, out_slot, out_src, pin=pin, prefetch=prefetch, nt=nt, margin=margin,
                          topk=topk)
    K, S = ids.shape[0], t["key_of"].shape[0]
    P = 0 if pin is None else pin.shape[0]
    st._resolve_kernel[(1,)](ids, layer * E, t["slot_of"], t["key_of"], t["last"], t["uses"], t["clock"],
                             t["counts"], t["host_row"], out_slot, out_src, pin if P else out_slot,
                             nt if nt is not None else out_slot, K, S, P, w, margin,
                             K_P=st._p2(K), S_P=st._p2(S), P_P=st._p2(P) if P else 1, PREFETCH=prefetch,
                             SCORED=nt is not None, **st._topk_args(topk, K))


@pytest.mark.parametrize("L,E,K,S,w", [(3, 6, 4, 10, 0), (3, 6, 4, 10, 5), (2, 9, 3, 5, 0), (2, 10, 8, 17, 2),
                                       (2, 5, 1, 2, 0)])
def test_resolve_kernel_matches_reference(L, E, K, S, w):
    """Slots, miss rows, tables, clock and counters of the kernel equal the reference after every call of a random
    trace with reuse (hits, free slots, evictions, ties)."""
    dev = "cuda" if CUDA else "cpu"
    a, b = _tables(L * E, S), _tables(L * E, S, dev)
    rng = random.Random(L * 100 + S)
    hits = 0
    for step in range(50):
        layer = step % L
        ids = torch.tensor(rng.sample(range(E), K), dtype=torch.int64)
        o1, s1 = torch.empty(K, dtype=torch.int64), torch.empty(K, dtype=torch.int64)
        o2, s2 = o1.to(dev), s1.to(dev)
        st.resolve_reference(ids, layer, E, a, w, o1, s1)
        _kernel_resolve(ids.to(dev), layer, E, b, w, o2, s2)
        assert torch.equal(o1, o2.cpu()) and torch.equal(s1, s2.cpu()), f"call {step}: {o1} {o2} / {s1} {s2}"
        for k in a:
            assert torch.equal(a[k], b[k].cpu()), f"call {step}: table {k} differs"
        hits = int(a["counts"][0])
    assert hits > 0 and int(a["counts"][1]) > 0  # the trace exercised both paths


@pytest.mark.parametrize("E,K,norm,override", [(6, 4, False, False), (6, 4, True, True), (9, 3, True, False),
                                               (128, 8, True, True), (5, 1, False, False)])
def test_topk_resolve_kernel_matches_two_launches(E, K, norm, override):
    """resolve(topk=...) (the router's softmax-top-k inside resolve's launch) stores the same ids and weights as
    fused_route.softmax_topk and resolves the same slots as the plain kernel, tables included; with an override
    (a replayed routing) it stores the router's choice and resolves the override's ids."""
    from tiered.kernels import fused_route

    L, S, w = 3, max(K + 2, 2 * E), 0
    dev = "cuda" if CUDA else "cpu"
    a, b = _tables(L * E, S, dev), _tables(L * E, S, dev)
    g = torch.Generator().manual_seed(E * 10 + K)
    rng = random.Random(E + K)
    for step in range(24):
        layer = step % L
        lg = torch.randn(E, generator=g).to(torch.bfloat16)
        if step % 3 == 0:  # ties among bf16 logits: the lowest id first in both
            lg[1::2] = lg[0]
        lg = lg.to(dev)
        ref_ids, ref_w = fused_route.softmax_topk(lg[None], K, norm)
        ids_a = torch.tensor(rng.sample(range(E), K), dtype=torch.int64, device=dev) if override else ref_ids[0]
        o1, s1 = torch.empty(K, dtype=torch.int64, device=dev), torch.empty(K, dtype=torch.int64, device=dev)
        _kernel_resolve(ids_a, layer, E, a, w, o1, s1)
        tid, tw = torch.full((K,), -7, dtype=torch.int64, device=dev), torch.zeros(K, dtype=torch.float32, device=dev)
        o2, s2 = torch.empty_like(o1), torch.empty_like(s1)
        _kernel_resolve(ids_a if override else tid, layer, E, b, w, o2, s2, topk=(lg, tid, tw, norm))
        assert torch.equal(tid, ref_ids[0]) and torch.equal(tw, ref_w[0]), f"call {step}: top-k {tid} {ref_ids}"
        assert torch.equal(o1, o2) and torch.equal(s1, s2), f"call {step}: {o1} {o2} / {s1} {s2}"
        for k in a:
            assert torch.equal(a[k], b[k]), f"call {step}: table {k} differs"
    assert int(a["counts"][0]) > 0 and int(a["counts"][1]) > 0


def test_topk_resolve_refuses_what_it_cannot_do():
    """resolve(topk=...) names the shapes it wants and refuses a prefetch; the knob takes 0 or 1 only."""
    t = _tables(12, 6)
    o, s_ = torch.empty(4, dtype=torch.int64), torch.empty(4, dtype=torch.int64)
    ids = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="logits \\[E\\] contiguous"):
        st.resolve(ids, 0, 6, t, 0, o, s_, topk=(torch.zeros(1, 6), ids, torch.zeros(4), False))
    with pytest.raises(ValueError, match="prefetch"):
        st.resolve(ids, 0, 6, t, 0, o, s_, prefetch=True, topk=(torch.zeros(6), ids, torch.zeros(4), False))


def test_topk_resolve_knob(monkeypatch):
    monkeypatch.delenv(st.TOPK_RESOLVE_ENV, raising=False)
    assert not st.topk_resolve_enabled()
    monkeypatch.setenv(st.TOPK_RESOLVE_ENV, "1")
    assert st.topk_resolve_enabled()
    monkeypatch.setenv(st.TOPK_RESOLVE_ENV, "yes")
    with pytest.raises(ValueError, match="TIERED_TOPK_RESOLVE"):
        st.topk_resolve_enabled()


@pytest.mark.parametrize("w", [0, 3])
def test_prefetch_resolve_matches_reference_and_respects_pins(w):
    """Prefetch calls interleaved with demand calls: kernel == reference; a prefetch never evicts a pinned slot nor
    a slot of its own resident candidates, does not touch residents nor move the clock, and leaves a candidate
    without a slot (-1) when every slot is pinned."""
    dev = "cuda" if CUDA else "cpu"
    L, E, K, C, S = 3, 12, 4, 6, 26
    a, b = _tables(L * E, S), _tables(L * E, S, dev)
    rng = random.Random(w)
    for step in range(40):
        layer = step % L
        ids = torch.tensor(rng.sample(range(E), K))
        o, sr = torch.empty(K, dtype=torch.int64), torch.empty(K, dtype=torch.int64)
        st.resolve_reference(ids, layer, E, a, w, o, sr)
        o2, s2 = o.to(dev), sr.to(dev)
        _kernel_resolve(ids.to(dev), layer, E, b, w, o2, s2)
        cand = torch.tensor(rng.sample(range(E), C))
        nxt = (layer + 1) % L
        before = {k: (int(a["last"][s]), int(a["uses"][s])) for s, k in enumerate(a["key_of"].tolist()) if k >= 0}
        clock = int(a["clock"][0])
        po, ps = torch.empty(C, dtype=torch.int64), torch.empty(C, dtype=torch.int64)
        st.resolve_reference(cand, nxt, E, a, w, po, ps, pin=o, prefetch=True)
        po2, ps2 = po.to(dev), ps.to(dev)
        _kernel_resolve(cand.to(dev), nxt, E, b, w, po2, ps2, pin=o.to(dev), prefetch=True)
        assert torch.equal(po, po2.cpu()) and torch.equal(ps, ps2.cpu()), f"call {step}"
        for k in a:
            assert torch.equal(a[k], b[k].cpu()), f"call {step}: table {k} differs"
        assert int(a["clock"][0]) == clock
        for j, k in enumerate(layer * E + int(e) for e in ids):  # the pinned layer's experts stay
            assert int(a["slot_of"][k]) == int(o[j])
        for j, e in enumerate(cand.tolist()):
            k = nxt * E + e
            if k in before:  # resident candidates are not touched
                s_ = int(a["slot_of"][k])
                assert (int(a["last"][s_]), int(a["uses"][s_])) == before[k] and int(ps[j]) == -1
    assert int(a["counts"][3]) > 0 and int(a["counts"][2]) > 0
    # every slot pinned: nothing loads
    t = _tables(L * E, 4)
    out, src = torch.empty(4, dtype=torch.int64), torch.empty(4, dtype=torch.int64)
    st.resolve_reference(torch.tensor([0, 1, 2, 3]), 0, E, t, w, out, src)
    po, ps = torch.empty(2, dtype=torch.int64), torch.empty(2, dtype=torch.int64)
    st.resolve_reference(torch.tensor([5, 6]), 1, E, t, w, po, ps, pin=out, prefetch=True)
    assert po.tolist() == [-1, -1] and ps.tolist() == [-1, -1]


def _kernel_fill(order, cursor, t, n_fill, keep_free, ok, os_, osrc, picked=None, install=False):
    """The fill kernels: on CUDA through fill_pick / fill_install, on CPU straight into the interpreter."""
    if not install:
        n_fill = torch.tensor([n_fill], dtype=torch.int64, device=order.device)
    if CUDA:
        return st.fill_install(ok, os_, t) if install else st.fill_pick(order, cursor, t, n_fill, keep_free, ok, os_,
                                                                          osrc, picked)
    if install:
        return st._fill_install_kernel[(1,)](ok, os_, t["slot_of"], t["key_of"], t["last"], t["uses"], t["counts"],
                                             ok.shape[0], C_P=st._p2(ok.shape[0]))
    n, S = order.shape[0], t["key_of"].shape[0]
    C = ok.shape[0]
    st._fill_pick_kernel[(1,)](order, cursor, t["slot_of"], t["key_of"], t["host_row"], ok, os_, osrc, picked, n, S, C,
                               n_fill,
                               keep_free, C_P=st._p2(C), S_P=st._p2(S), W_P=min(st.FILL_WINDOW, st._p2(n)))


@pytest.mark.parametrize("L,E,K,S,C,keep", [(3, 12, 4, 40, 3, 4), (2, 10, 3, 12, 5, 3), (4, 8, 2, 40, 6, 0)])
def test_fill_kernels_match_reference(L, E, K, S, C, keep):
    """Fill picks and installs interleaved with demand resolves (which may load a key whose fill is in flight):
    kernel == reference in every table, slot, row and cursor; resolve never takes or evicts a reserved slot; a
    fill leaves `keep` slots free and never evicts; each key sits in one slot at most; once the table has no free
    slot beyond `keep`, nothing is picked."""
    dev = "cuda" if CUDA else "cpu"
    a, b = _tables(L * E, S), _tables(L * E, S, dev)
    order = torch.tensor([l * E + e for e in range(E) for l in range(L)], dtype=torch.int64)
    ca, cb = torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64, device=dev)
    pa, pb = torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64, device=dev)
    rng = random.Random(S * 10 + C)
    picked = 0
    for step in range(30):
        ka, sa, ra = (torch.empty(C, dtype=torch.int64) for _ in range(3))
        kb, sb, rb = (x.to(dev) for x in (ka, sa, ra))
        free_before = int((a["key_of"] == -1).sum())
        resident_before = set(k for k in a["key_of"].tolist() if k >= 0)
        nf = C - step % 2  # the device scalar may ask for fewer than the rows
        st.fill_pick_reference(order, ca, a, torch.tensor([nf]), keep, ka, sa, ra, pa)
        _kernel_fill(order.to(dev), cb, b, nf, keep, kb, sb, rb, pb)
        assert torch.equal(ka, kb.cpu()) and torch.equal(sa, sb.cpu()) and torch.equal(ra, rb.cpu()), f"pick {step}"
        assert torch.equal(ca, cb.cpu()) and torch.equal(pa, pb.cpu()), f"cursor {step}"
        n = int((ka >= 0).sum())
        picked += n
        assert n <= max(0, free_before - keep) and set(k for k in a["key_of"].tolist() if k >= 0) == resident_before
        reserved = {int(s) for s in sa.tolist() if s >= 0}
        assert all(int(a["key_of"][s]) < -1 for s in reserved)
        for _ in range(2):  # demand resolves meanwhile (the step's layers)
            layer = rng.randrange(L)
            ids = torch.tensor(rng.sample(range(E), K), dtype=torch.int64)
            o1, s1 = torch.empty(K, dtype=torch.int64), torch.empty(K, dtype=torch.int64)
            o2, s2 = o1.to(dev), s1.to(dev)
            st.resolve_reference(ids, layer, E, a, 0, o1, s1)
            _kernel_resolve(ids.to(dev), layer, E, b, 0, o2, s2)
            assert torch.equal(o1, o2.cpu()) and torch.equal(s1, s2.cpu())
            assert not reserved & set(o1.tolist())
        st.fill_install_reference(ka, sa, a)
        _kernel_fill(None, None, b, C, keep, kb, sb, None, install=True)
        for k in a:
            assert torch.equal(a[k], b[k].cpu()), f"step {step}: table {k} differs"
        kof = a["key_of"].tolist()
        assert min(kof) >= -1 and len([k for k in kof if k >= 0]) == len({k for k in kof if k >= 0})
        for s_, k in enumerate(kof):
            if k >= 0:
                assert int(a["slot_of"][k]) == s_
    assert picked > 0 and int(a["counts"][3]) == picked and int(pa[0]) == picked
    assert int((a["key_of"] == -1).sum()) <= keep or int((a["slot_of"] < 0).sum()) == 0


def _kernel_land(plan_key, plan_slot, landed, installed, t):
    """The copy fill's install: on CUDA through fill_land, on CPU straight into the interpreter."""
    if CUDA:
        return st.fill_land(plan_key, plan_slot, landed, installed, t)
    st._fill_land_kernel[(1,)](plan_key, plan_slot, landed, installed, t["slot_of"], t["key_of"], t["last"],
                               t["uses"], plan_key.shape[0], C_P=4)


@pytest.mark.parametrize("L,E,K,S,keep,seed", [(3, 12, 4, 40, 4, 0), (2, 10, 3, 14, 3, 1), (4, 8, 2, 40, 0, 2)])
def test_copy_fill_kernels_match_reference(L, E, K, S, keep, seed):
    """The copy-engine fill's reservations (slot_of = -2 - slot, key_of = -2 - key), demand resolves that hit planned
    keys, and installs of what has landed, in random steps: kernel == reference in every table, slot and row; a
    demand miss on a planned key is loaded into its reserved slot and evicts nothing; no call takes or evicts a
    reserved slot; an install enters a key cold, or keeps the one a demand miss loaded; entries never copied are
    released by fill_cancel; each key sits in one slot at most, and every resident slot's key points back to it."""
    dev = "cuda" if CUDA else "cpu"
    a, b = _tables(L * E, S), _tables(L * E, S, dev)
    rng = random.Random(seed)
    for step in range(2):  # two demand calls first: some keys resident, some slots free
        layer, ids = rng.randrange(L), torch.tensor(rng.sample(range(E), K), dtype=torch.int64)
        o, r = torch.empty(K, dtype=torch.int64), torch.empty(K, dtype=torch.int64)
        st.resolve_reference(ids, layer, E, a, 0, o, r)
        _kernel_resolve(ids.to(dev), layer, E, b, 0, o.to(dev), r.to(dev))
    resident = {int(k) for k in a["key_of"].tolist() if k >= 0}
    free = [s_ for s_ in range(S - 1, -1, -1) if int(a["key_of"][s_]) == -1]
    order = [l * E + e for e in range(E) for l in range(L)]
    keys = [k for k in order if k not in resident][: max(0, len(free) - keep)]
    slots = free[: len(keys)]
    assert keys, "the test needs a plan"
    pk, ps = torch.tensor(keys, dtype=torch.int64), torch.tensor(slots, dtype=torch.int64)
    for t in (a, b):  # what DeviceSlotTable.plan_fill writes
        t["slot_of"][pk.to(t["slot_of"].device)] = (-2 - ps).to(torch.int32).to(t["slot_of"].device)
        t["key_of"][ps.to(t["key_of"].device)] = (-2 - pk).to(torch.int32).to(t["key_of"].device)
    la, ia = torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
    lb, ib = la.clone().to(dev), ia.clone().to(dev)  # (not views of the reference's: .to on CPU is a no-op)
    landed, planned_hits = 0, 0
    half = len(keys) // 2 + 1  # the rest is never copied: cancelled at the end
    for step in range(24):
        for _ in range(2):
            layer = rng.randrange(L)
            ids = torch.tensor(rng.sample(range(E), K), dtype=torch.int64)
            before = {int(k) for k in a["key_of"].tolist() if k >= 0}
            plan_slot = {layer * E + int(e): -2 - int(a["slot_of"][layer * E + int(e)]) for e in ids.tolist()
                         if int(a["slot_of"][layer * E + int(e)]) < -1}
            o1, s1 = torch.empty(K, dtype=torch.int64), torch.empty(K, dtype=torch.int64)
            o2, s2 = o1.to(dev), s1.to(dev)
            st.resolve_reference(ids, layer, E, a, 0, o1, s1)
            _kernel_resolve(ids.to(dev), layer, E, b, 0, o2, s2)
            assert torch.equal(o1, o2.cpu()) and torch.equal(s1, s2.cpu()), f"step {step}"
            for j, e in enumerate(ids.tolist()):
                k = layer * E + e
                if k in plan_slot:  # loaded into its reserved slot, which stays reserved until it lands
                    planned_hits += 1
                    assert int(o1[j]) == plan_slot[k] and int(s1[j]) == int(a["host_row"][k])
                    assert int(a["slot_of"][k]) == plan_slot[k] and int(a["key_of"][plan_slot[k]]) == -2 - k
            after = {int(k) for k in a["key_of"].tolist() if k >= 0}
            n_plain = sum(1 for e in ids.tolist() if int(a["slot_of"][layer * E + e]) >= 0) - len(plan_slot)
            assert len(before - after) <= max(0, n_plain)  # only plain misses may evict
            for k in a:
                assert torch.equal(a[k], b[k].cpu()), f"step {step}: table {k} differs after a resolve"
        if landed < half and step % 2:
            landed = min(half, landed + rng.randrange(1, 4))
            la[0], lb[0] = landed, landed
            st.fill_land_reference(pk, ps, la, ia, a)
            _kernel_land(pk.to(dev), ps.to(dev), lb, ib, b)
            assert int(ia[0]) == int(ib[0]) == landed
        for k in a:
            assert torch.equal(a[k], b[k].cpu()), f"step {step}: table {k} differs"
    assert planned_hits > 0
    for t, d in ((a, "cpu"), (b, dev)):
        st.fill_cancel(pk[landed:].to(d), ps[landed:].to(d), t)
    for k in a:
        assert torch.equal(a[k], b[k].cpu()), f"after the cancel: table {k} differs"
    kof, sof = a["key_of"].tolist(), a["slot_of"].tolist()
    assert min(kof) >= -1 and min(sof) >= -1
    assert len([k for k in kof if k >= 0]) == len({k for k in kof if k >= 0})
    for s_, k in enumerate(kof):
        if k >= 0:
            assert sof[k] == s_
    for k, s_ in enumerate(sof):
        if s_ >= 0:
            assert kof[s_] == k


@pytest.mark.parametrize("S,margin", [(10, 0), (26, 0), (26, 40), (7, 5)])
def test_scored_resolve_matches_reference(S, margin):
    """Eviction by predicted next use (nt), demand and prefetch calls, prefetch candidates skipped by the caller
    (id -1): kernel == reference in slots, rows, tables and counters; a demand miss evicts the resident key of
    largest nt; a prefetch takes a free slot or a victim whose nt >= the candidate's + margin, else leaves it (-1)."""
    dev = "cuda" if CUDA else "cpu"
    L, E, K, C = 3, 12, 4, 5
    a, b = _tables(L * E, S), _tables(L * E, S, dev)
    rng = random.Random(S * 7 + margin)
    g = torch.Generator().manual_seed(S + margin)
    skipped = loaded = 0
    for step in range(40):
        layer = step % L
        nt = torch.randint(0, 60, (L * E,), generator=g)  # ties included
        ids = torch.tensor(rng.sample(range(E), K))
        resident = {int(k) for k in a["key_of"].tolist() if k >= 0}
        o, sr = torch.empty(K, dtype=torch.int64), torch.empty(K, dtype=torch.int64)
        st.resolve_reference(ids, layer, E, a, 0, o, sr, nt=nt)
        o2, s2 = o.to(dev), sr.to(dev)
        _kernel_resolve(ids.to(dev), layer, E, b, 0, o2, s2, nt=nt.to(dev))
        assert torch.equal(o, o2.cpu()) and torch.equal(sr, s2.cpu()), f"call {step}"
        keys = {layer * E + int(e) for e in ids}
        gone = resident - {int(k) for k in a["key_of"].tolist() if k >= 0}
        kept = (resident - keys) - gone
        if gone and kept:  # the evicted keys were predicted to be needed no sooner than any kept one
            assert min(int(nt[k]) for k in gone) >= max(int(nt[k]) for k in kept)
        cand = torch.tensor(rng.sample(range(E), C))
        cand[rng.randrange(C)] = -1
        nxt = (layer + 1) % L
        po, ps = torch.empty(C, dtype=torch.int64), torch.empty(C, dtype=torch.int64)
        n3 = int(a["counts"][3])
        st.resolve_reference(cand, nxt, E, a, 0, po, ps, pin=o, prefetch=True, nt=nt, margin=margin)
        po2, ps2 = po.to(dev), ps.to(dev)
        _kernel_resolve(cand.to(dev), nxt, E, b, 0, po2, ps2, pin=o.to(dev), prefetch=True, nt=nt.to(dev),
                        margin=margin)
        assert torch.equal(po, po2.cpu()) and torch.equal(ps, ps2.cpu()), f"prefetch call {step}"
        for k in a:
            assert torch.equal(a[k], b[k].cpu()), f"call {step}: table {k} differs"
        for j, e in enumerate(cand.tolist()):
            if e < 0:
                assert int(po[j]) == -1 and int(ps[j]) == -1
            elif int(a["slot_of"][nxt * E + e]) < 0:
                skipped += 1
        loaded += int(a["counts"][3]) - n3
    assert loaded > 0 and (skipped > 0 or S >= L * E)


@pytest.mark.parametrize("w", [0, 4])
def test_reference_invariants(w):
    """After each call: the call's keys sit in the returned slots, a hit is exactly a key resident before the call,
    no slot of the call was evicted by it, slot_of and key_of are inverse, and a miss's row is the key's host row."""
    L, E, K, S = 4, 16, 6, 20
    t = _tables(L * E, S)
    rng = random.Random(w)
    hot = list(range(6))
    for step in range(200):
        layer = step % L
        ids = rng.sample(hot, 3) + rng.sample([e for e in range(E) if e not in hot], K - 3)
        before = {int(k) for k in t["key_of"].tolist() if k >= 0}
        out, src = torch.empty(K, dtype=torch.int64), torch.empty(K, dtype=torch.int64)
        h0 = int(t["counts"][0])
        st.resolve_reference(torch.tensor(ids), layer, E, t, w, out, src)
        keys = [layer * E + e for e in ids]
        assert len(set(out.tolist())) == K
        for k, s, r in zip(keys, out.tolist(), src.tolist()):
            assert int(t["key_of"][s]) == k and int(t["slot_of"][k]) == s
            assert (r == -1) == (k in before)
            if r >= 0:
                assert r == int(t["host_row"][k])
        assert int(t["counts"][0]) - h0 == sum(k in before for k in keys)
        res = {int(k): s for s, k in enumerate(t["key_of"].tolist()) if k >= 0}
        assert all(int(t["slot_of"][k]) == s for k, s in res.items())
        assert int((t["slot_of"] >= 0).sum()) == len(res)
    assert int(t["counts"][0]) > 50  # reuse of the hot experts hits


def test_reference_flru_keeps_frequent_expert():
    """w > 0 keeps a key used often over a more recent key used once; w = 0 (LRU) evicts it."""
    for w, kept in ((0, False), (100, True)):
        t = _tables(10, 2)
        out, src = torch.empty(1, dtype=torch.int64), torch.empty(1, dtype=torch.int64)
        for _ in range(5):
            st.resolve_reference(torch.tensor([0]), 0, 10, t, w, out, src)  # key 0: five uses
        st.resolve_reference(torch.tensor([1]), 0, 10, t, w, out, src)  # key 1: one use, more recent
        st.resolve_reference(torch.tensor([2]), 0, 10, t, w, out, src)  # a miss with both slots taken
        assert (int(t["slot_of"][0]) >= 0) == kept and (int(t["slot_of"][1]) >= 0) == (not kept)


def test_gather_strided_kernel_copies_only_misses():
    R, S, B = 5, 4, 4096 * 5
    host = torch.randint(0, 255, (R, B), dtype=torch.uint8)
    slots = torch.zeros(S, B, dtype=torch.uint8)
    src, dst = torch.tensor([-1, 3, 0]), torch.tensor([1, 0, 2])
    if CUDA:
        dslots = slots.cuda()
        st.gather(host.pin_memory(), src.cuda(), dst.cuda(), dslots, ctas=2, chunks=1)
        slots = dslots.cpu()
    else:
        words, n_c = B // 4, (B // 4 + 1023) // 1024
        st._gather_strided_kernel[(2,)](host.view(torch.int32), src, dst, slots.view(torch.int32), words, 3 * n_c, n_c,
                                        BLOCK=1024, CHUNKS=1)
    assert torch.equal(slots[0], host[3]) and torch.equal(slots[2], host[0])
    assert slots[1].eq(0).all() and slots[3].eq(0).all()


@pytest.mark.parametrize("warps,block,chunks", [(1, 256, 4), (2, 512, 2)])
def test_gather_copy_shapes_copy_the_same(warps, block, chunks):
    """The fill's copy shapes (TIERED_FILL_GATHER's warps:block:chunks) copy the same rows as the default: a row
    whose words are not a multiple of block * chunks included."""
    R, S, B = 5, 4, 4096 + 1024
    host = torch.randint(0, 255, (R, B), dtype=torch.uint8)
    slots = torch.zeros(S, B, dtype=torch.uint8)
    src, dst = torch.tensor([2, -1, 4]), torch.tensor([3, 1, 0])
    if CUDA:
        dslots = slots.cuda()
        st.gather(host.pin_memory(), src.cuda(), dst.cuda(), dslots, ctas=3, chunks=chunks, warps=warps, block=block)
        slots = dslots.cpu()
    else:
        words = B // 4
        n_c = -(-words // (block * chunks))
        st._gather_strided_kernel[(3,)](host.view(torch.int32), src, dst, slots.view(torch.int32), words, 3 * n_c, n_c,
                                        BLOCK=block, CHUNKS=chunks, num_warps=warps)
    assert torch.equal(slots[3], host[2]) and torch.equal(slots[0], host[4])
    assert slots[1].eq(0).all() and slots[2].eq(0).all()


@pytest.mark.parametrize("env,options", [("TIERED_FILL_GATHER", "fill_gather_options"),
                                         ("TIERED_GATHER", "demand_gather_options")])
def test_gather_shape_options_parse_and_refuse(monkeypatch, env, options):
    """The fill's (TIERED_FILL_GATHER) and the demand gather's (TIERED_GATHER) warps:block:chunks[:hint] knobs."""
    parse = getattr(st, options)
    monkeypatch.delenv(env, raising=False)
    assert parse() == {}
    monkeypatch.setenv(env, "1:256:4")
    assert parse() == {"warps": 1, "block": 256, "chunks": 4}
    monkeypatch.setenv(env, "4:1024:4:l2_256")
    assert parse() == {"warps": 4, "block": 1024, "chunks": 4, "hint": 1}
    monkeypatch.setenv(env, "2:512:8:nc_256")
    assert parse() == {"warps": 2, "block": 512, "chunks": 8, "hint": 2}
    for bad in ("3:256:4", "1:100:4", "1:256:0", "1:256", "a:b:c", "4:1024:4:l2", "4:1024:4:l2_256:1"):
        monkeypatch.setenv(env, bad)
        with pytest.raises(ValueError, match=env + "="):
            parse()
    with pytest.raises(ValueError, match="power of two"):
        st.gather(torch.zeros(1, 64, dtype=torch.uint8), torch.tensor([0]), torch.tensor([0]),
                  torch.zeros(1, 64, dtype=torch.uint8), block=100)
    with pytest.raises(ValueError, match="hint 3"):
        st.gather(torch.zeros(1, 64, dtype=torch.uint8), torch.tensor([0]), torch.tensor([0]),
                  torch.zeros(1, 64, dtype=torch.uint8), hint=3)


def test_demand_gather_ctas_parse_and_refuse(monkeypatch):
    monkeypatch.delenv("TIERED_GATHER_CTAS", raising=False)
    assert st.demand_gather_ctas() is None
    monkeypatch.setenv("TIERED_GATHER_CTAS", "64")
    assert st.demand_gather_ctas() == 64
    for bad in ("0", "-2", "x", "1.5"):
        monkeypatch.setenv("TIERED_GATHER_CTAS", bad)
        with pytest.raises(ValueError, match="TIERED_GATHER_CTAS"):
            st.demand_gather_ctas()


def test_device_prefetch_needs_the_device_table(reference_layout):
    with pytest.raises(EngineError, match="--device-prefetch needs the device slot table"):
        load(reference_layout, device="cpu", budget={"expert_slots": 16, "device_prefetch": 4})
    with pytest.raises(EngineError, match="--device-evict nextuse needs the device slot table"):
        load(reference_layout, device="cpu", budget={"expert_slots": 16, "device_evict": "nextuse"})
    with pytest.raises((BudgetError, EngineError), match="--device-evict must be"):
        load(reference_layout, device="cpu", budget={"expert_slots": 16, "device_evict": "belady"})


@pytest.mark.cuda
@pytest.mark.parametrize("gbps", [4.0, 12.0])
def test_cuda_paced_gather_copies_and_keeps_to_the_rate(gbps):
    """--h2d-gbps in the device step: the paced gather copies the same blocks (hits skipped) and takes at least
    the bytes / the target rate, and not much longer (within 25%, beyond a few microseconds of launch)."""
    B, R, S = 1 << 20, 12, 8
    pool = torch.randint(0, 255, (R, B), dtype=torch.uint8).pin_memory()
    slots = torch.zeros(S, B, dtype=torch.uint8, device="cuda")
    src = torch.tensor([3, -1, 7, 0, -1, 11], dtype=torch.int64, device="cuda")
    dst = torch.tensor([0, 1, 2, 3, 4, 5], dtype=torch.int64, device="cuda")
    st.gather(pool, src, dst, slots, gbps=gbps)  # warm-up: compiles
    slots.zero_()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    st.gather(pool, src, dst, slots, gbps=gbps)
    e1.record()
    e1.synchronize()
    for s_, d in zip(src.tolist(), dst.tolist()):
        want = pool[s_] if s_ >= 0 else torch.zeros(B, dtype=torch.uint8)
        assert torch.equal(slots[d].cpu(), want)
    need = 4 * B / (gbps * 1e9)  # four copied blocks
    took = e0.elapsed_time(e1) * 1e-3
    assert need <= took <= 1.25 * need + 50e-6, (took, need)


def test_gather_kernel_copies_only_misses():
    R, S, B = 6, 4, 4096 * 3
    host = torch.randint(0, 255, (R, B), dtype=torch.uint8)
    slots = torch.zeros(S, B, dtype=torch.uint8)
    src, dst = torch.tensor([4, -1, 1]), torch.tensor([2, 0, 3])
    if CUDA:  # a program per (row, chunk) (ctas 0); the default looping grid in the test above and the steps
        pinned = host.pin_memory()
        dslots = slots.cuda()
        st.gather(pinned, src.cuda(), dst.cuda(), dslots, ctas=0)
        slots = dslots.cpu()
    else:
        words = B // 4
        st._gather_kernel[(3, (words + 1023) // 1024)](host.view(torch.int32), src, dst, slots.view(torch.int32),
                                                       words, BLOCK=1024, CHUNKS=1)
    assert torch.equal(slots[2], host[4]) and torch.equal(slots[3], host[1])
    assert slots[0].eq(0).all() and slots[1].eq(0).all()


def test_refusal_says_what_to_change():
    ok = dict(cuda=True, ram_slots=512, num_keys=512, block_size=4096, policy="lru", cpu_experts="off", h2d_gbps=0.0)
    assert refusal(**ok) is None and refusal(**{**ok, "policy": "flru"}) is None
    assert "CUDA" in refusal(**{**ok, "cuda": False})
    assert "--ram-gb" in refusal(**{**ok, "ram_slots": 100})
    assert "predicted" in refusal(**{**ok, "policy": "predicted"})
    assert refusal(**{**ok, "cpu_experts": "auto"}) is None  # the device step hands misses to the CPU itself
    assert "--cpu-experts all" in refusal(**{**ok, "cpu_experts": "all"})
    assert refusal(**{**ok, "h2d_gbps": 12.0}) is None  # the device step's gather kernel paces itself
    assert "--prefetch-depth" in refusal(**{**ok, "prefetch_depth": 1})


def test_slot_table_device_refused_on_cpu_auto_stays_on_host(reference_layout):
    with pytest.raises((BudgetError, EngineError), match="CUDA"):
        load(reference_layout, device="cpu", budget={"expert_slots": 16, "slot_table": "device"})
    eng = load(reference_layout, device="cpu", budget={"expert_slots": 16, "slot_table": "auto"})
    eng.generate(PROMPT, max_new_tokens=2)
    assert eng.stats["slot_table"]["mode"] == "host" and "CUDA" in eng.stats["slot_table"]["device_refused"]


def _attach(eng, w: int = 0, fill: int | str = 0) -> DeviceStep:
    """The device table and an eager device step on a CPU engine (what --slot-table device does on CUDA)."""
    cache = eng.model.provider
    cache.ram.preload(list(range(cache.num_layers * cache.num_experts)), 0)
    cache.devtable = DeviceSlotTable(cache, w=w, kernels=st)
    eng.devstep = DeviceStep(eng.model, graphs=False, fill=fill)
    eng.pieces = None
    return eng.devstep


@pytest.fixture(scope="module")
def unlimited(reference_layout) -> list[int]:
    return load(reference_layout, device="cpu").generate(PROMPT, max_new_tokens=NEW).token_ids


@pytest.mark.parametrize("slots,w", [(8, 0), (20, 0), (20, 8)])
def test_device_step_greedy_identical(reference_layout, unlimited, slots, w):
    """The device algorithm decoding with `slots` slots (down to exactly top-k) gives every-expert-resident greedy
    tokens, over two generates (host prefill -> device decode -> host prefill -> device decode), and its
    counters add up: decode hits + misses = decode tokens x layers x top-k."""
    B = 49152
    eng = load(reference_layout, device="cpu", budget={"expert_slots": slots, "ram_gb": 600 * B / 2**30})
    step = _attach(eng, w)
    cfg = eng.config
    for i in range(2):
        got = eng.generate(PROMPT, max_new_tokens=NEW).token_ids
        assert got == unlimited
        s = eng.stats
        assert s["decode_graphs"] == "device" and s["slot_table"]["mode"] == "device"
        d = s["decode"]  # the cache's counters add up over the engine's life
        assert d["hits"] + d["misses"] == d["tokens"] * cfg.num_layers * cfg.top_k and d["tokens"] == (i + 1) * (NEW - 1)
        assert d["bytes_h2d"] == d["misses"] * eng.model.provider.block_size
        if slots == 8:
            assert d["misses"] > 0
    assert eng.model.provider.devtable.handovers == 3  # take, give back for the second prefill, take
    assert step.steps == NEW - 1  # reset per generate
    eng.model.provider.vram.table.check()  # the host table handed back is consistent


def test_device_step_fill_order_by_popularity(reference_layout):
    """With router-history transitions the fill order takes each MoE layer's experts by descending column sum of
    the time transitions (how often an expert follows any other), the layers interleaved; without them, by id."""
    B = 49152
    tr = _code_transitions(reference_layout)
    for transitions in (tr, None):
        eng = load(reference_layout, device="cpu", budget={"expert_slots": 64, "ram_gb": 600 * B / 2**30})
        cache = eng.model.provider
        cache.ram.preload(list(range(512)), 0)
        cache.devtable = DeviceSlotTable(cache, w=0, kernels=st)
        step = DeviceStep(eng.model, graphs=False, fill=4, transitions=transitions)
        order = step.fill_order.view(64, 8)  # [rank, layer]: key = layer * 64 + expert
        assert sorted(step.fill_order.tolist()) == list(range(512))
        for m in range(8):
            experts = (order[:, m] - m * 64).tolist()
            if transitions is None:
                assert experts == list(range(64))
            else:
                pop = tr[1][m].float().sum(0)
                assert pop[experts].tolist() == sorted(pop.tolist(), reverse=True)


@pytest.mark.parametrize("slots,n", [(512, 2), (512, 64), (40, 16)])
def test_device_step_fill_greedy_identical(reference_layout, unlimited, slots, n):
    """The background fill (free slots filled with experts not yet resident, beside each step) gives the every-
    expert-resident tokens; with room for every expert it takes the misses of first uses away, and the counters
    add up (filled blocks cross PCIe and count as prefetches); with a table the prefill filled, it copies and
    evicts nothing (the kernel test covers the top-k slots it leaves free). Once the fill has run dry, the steps
    stop running it (what makes the graphed step replay its graphs without the fill)."""
    B = 49152
    got = {}
    for fill in (0, n):
        eng = load(reference_layout, device="cpu", budget={"expert_slots": slots, "ram_gb": 600 * B / 2**30})
        step = _attach(eng, fill=fill)
        assert eng.generate(PROMPT, max_new_tokens=NEW).token_ids == unlimited
        s = eng.stats
        d = s["decode"]
        assert d["hits"] + d["misses"] == d["tokens"] * 8 * 8
        assert d["bytes_h2d"] == (d["misses"] + s["slot_table"]["prefetched"]) * B
        assert s["device_step"]["fill"] == fill
        got[fill] = (d["misses"], s["slot_table"]["prefetched"])
        t = eng.model.provider.devtable.t
        free = int((t["key_of"] == -1).sum())
        assert int(t["key_of"].min()) >= -1  # no reservation outlives its step
        if fill and slots == 512:
            assert got[fill][1] > 0 and got[fill][0] <= got[0][0]
        if fill and slots == 40:  # the prefill left no slot free: the fill copies and changes nothing
            assert free == 0 and got[fill] == (got[0][0], 0)
        if fill:
            ds = s["device_step"]
            assert ds["fill_picked"] == got[fill][1]
            dry = slots == 40 or n == 64  # nothing to fill, or all of it filled within a few steps (2 a step: not)
            assert ds["fill_active"] is not dry
            if dry:  # the pick count stopped growing for fill_windows reads, then the steps ran without the fill
                assert int(step.fill_cursor[0]) >= 0 and step._fill_dry >= st.fill_windows(8 * 64)
        eng.model.provider.devtable.give_back()
        eng.model.provider.vram.table.check()
        del step
    if slots == 512:
        assert got[0][0] > 0 and got[0][1] == 0
    if n == 64:
        assert got[n][0] < got[0][0]


@pytest.mark.parametrize("slots", [512, 40])
def test_device_step_copy_fill_greedy_identical(reference_layout, unlimited, slots):
    """--device-fill copy (store/copyfill.py: a plan of the keys not resident at the decode's start, reserved in free
    slots, copied outside the step and entered by each step's install) gives the every-expert-resident tokens over
    two decode phases; with room for every expert it takes first-use misses away and every block lands; every
    resident slot then holds its key's RAM block, and no reservation outlives the phase (give_back drains it);
    with a table the prefill filled, nothing is planned."""
    B = 49152
    got = {}
    for fill in (0, "copy"):
        eng = load(reference_layout, device="cpu", budget={"expert_slots": slots, "ram_gb": 600 * B / 2**30})
        step = _attach(eng, fill=fill)
        for phase in range(2):
            assert eng.generate(PROMPT, max_new_tokens=NEW).token_ids == unlimited
            s = eng.stats
            d = s["decode"]
            assert d["hits"] + d["misses"] == d["tokens"] * 8 * 8
            assert d["bytes_h2d"] == (d["misses"] + s["slot_table"]["prefetched"]) * B
            if phase == 0:
                got[fill] = (d["misses"], s["slot_table"]["prefetched"])
                if fill == "copy" and slots == 512:  # every planned block landed and was counted; the fill went idle
                    assert step.copy.done_blocks == step.copy.n == got[fill][1] > 0
                    assert not s["device_step"]["fill_active"]
            if fill == "copy":
                c = s["device_step"]["fill_copy"]
                assert s["device_step"]["fill"] == "copy" and c["mode"] == "copy"
                if slots == 40:
                    assert c["planned"] == 0 and not s["device_step"]["fill_active"]
                    assert c["left"] > 0 and s["device_step"]["complete_steps"] == 0
                else:  # the plan held every key not resident (keep_free needs none then): after it landed, the
                    # steps looked their slots up only; the next phase found the table complete at once
                    assert c["left"] == 0 and s["device_step"]["complete"]
                    cs = s["device_step"]["complete_steps"]
                    n = s["device_step"]["steps"]
                    assert 0 < cs < n if phase == 0 else cs == n
            else:
                assert s["device_step"]["complete_steps"] == 0
        table = eng.model.provider.devtable
        t = table.t
        if fill == "copy" and slots == 512:
            for slot, k in enumerate(t["key_of"].tolist()):
                if k >= 0:
                    assert torch.equal(table.slots[slot], table.host_pool[int(t["host_row"][k])]), f"slot {slot}"
        table.give_back()
        assert int(t["key_of"].min()) >= -1 and int(t["slot_of"].min()) >= -1
        eng.model.provider.vram.table.check()
        del step
    if slots == 512:
        assert got["copy"][1] > 0 and got["copy"][0] < got[0][0]
    else:
        assert got["copy"] == got[0]


@pytest.mark.parametrize("R,K,E,load", [(1, 4, 16, False), (3, 8, 12, False), (5, 2, 8, False), (1, 4, 16, True),
                                         (3, 8, 12, True)])
def test_lookup_kernel_matches_reference(R, K, E, load):
    """A complete table's lookup: each row's ids (rows picked by id_row) -> slot_of's slots at out_row; kernel ==
    reference; a key not resident reads slot 0 and raises bad to the largest such key + 1; bad only grows. With
    load (a plan of every key in flight): a planned key (slot_of = -2 - slot) takes its reserved slot, its RAM row
    goes to src (-1 elsewhere), and counts add the hits and the loads."""
    dev = "cuda" if CUDA else "cpu"
    g = torch.Generator().manual_seed(R * 100 + K)
    L = R + 1
    slot_of = torch.randperm(L * E, generator=g).to(torch.int32)
    if load:  # every third key planned: reserved in its slot
        slot_of[::3] = -2 - slot_of[::3]
    host_row = torch.randperm(L * E, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(R + 2)])
    id_row = torch.randperm(R + 2, generator=g)[:R]
    out_row = torch.randperm(L, generator=g)[:R]
    base = torch.randperm(L, generator=g)[:R] * E  # (rows of different layers: no key twice, as in a step)
    keys = ids[id_row] + base[:, None]
    for missing in (False, True):
        so = slot_of.clone()
        if missing:  # two looked-up keys not resident
            so[int(keys[0, 0])] = -1
            so[int(keys[-1, K - 1])] = -1
        want, bad_w = torch.full((L, K), 7, dtype=torch.int64), torch.tensor([2], dtype=torch.int64)
        src_w, cnt_w, so_w = torch.full((L, K), 5, dtype=torch.int64), torch.tensor([10, 20]), so.clone()
        st.lookup_reference(ids, id_row, want, out_row, base, so_w, bad_w, (host_row, src_w, cnt_w) if load else None)
        got, bad_g = want.new_full((L, K), 7).to(dev), torch.tensor([2], dtype=torch.int64, device=dev)
        src_g, cnt_g, so_g = torch.full((L, K), 5, dtype=torch.int64, device=dev), torch.tensor([10, 20]).to(dev), \
            so.clone().to(dev)
        args = [x.to(dev) for x in (ids, id_row)] + [got] + [x.to(dev) for x in (out_row, base)] + [so_g, bad_g]
        if CUDA:
            st.lookup(*args, (host_row.to(dev), src_g, cnt_g) if load else None)
        else:
            st._lookup_kernel[(1,)](args[0], args[0].stride(0), *args[1:], host_row, src_g, cnt_g, R, K=K,
                                    R_P=st._p2(R), K_P=st._p2(K), LOAD=load)
        assert torch.equal(got.cpu(), want) and torch.equal(bad_g.cpu(), bad_w) and torch.equal(so_g.cpu(), so_w)
        if load:
            assert torch.equal(src_g.cpu(), src_w) and torch.equal(cnt_g.cpu(), cnt_w)
            planned = so[keys] <= -2
            assert int(cnt_w[1]) == 20 + int(planned.sum()) and int(cnt_w[0]) == 10 + int((so[keys] >= 0).sum())
            assert torch.equal(src_w[out_row], torch.where(planned, host_row[keys], -1))
            assert torch.equal(so_w[keys[planned]].to(torch.int64), -2 - so[keys[planned]].to(torch.int64))
        if missing:
            k_bad = [int(k) for k in keys.flatten() if int(so[k]) == -1]
            assert int(bad_w[0]) == max(k_bad) + 1 and len(k_bad) == 2
        else:
            assert int(bad_w[0]) == 2
            assert torch.equal(want[out_row], torch.where(so[keys] <= -2, -2 - so[keys], so[keys]).to(torch.int64))


def test_complete_step_matches_the_resolving_step(reference_layout, unlimited, monkeypatch):
    """TIERED_COMPLETE_STEP=0 keeps resolve and gather in every step, `after` only while the copy fill's plan is in
    flight: the same tokens, hits, misses and resident keys as the default's lookups (its filling steps loading
    planned keys without resolve, its steps after the fill looking up only); a complete step that finds a key not
    resident (made here by hand) is reported at the next harvest, naming its layer and expert; with a fill too slow
    to land in the decode, the demand misses load planned keys through the lookups, with the resolving steps'
    counts and resident keys."""
    B = 49152
    got = {}
    for knob in ("0", "after", "1"):
        monkeypatch.setenv("TIERED_COMPLETE_STEP", knob)
        eng = load(reference_layout, device="cpu", budget={"expert_slots": 512, "ram_gb": 600 * B / 2**30})
        step = _attach(eng, fill="copy")
        assert step.can_complete == (knob != "0") and step.can_plan == (knob == "1")
        assert eng.generate(PROMPT, max_new_tokens=NEW).token_ids == unlimited
        s = eng.stats
        got[knob] = (s["decode"]["hits"], s["decode"]["misses"], s["slot_table"]["prefetched"])
        assert (s["device_step"]["complete_steps"] > 0) == (knob != "0")
        assert (s["device_step"]["planned_steps"] > 0) == (knob == "1")  # the filling steps without resolve
        table = eng.model.provider.devtable
        table.give_back()
        got[knob] += (sorted(k for k in table.t["key_of"].tolist() if k >= 0),)
    assert got["0"] == got["after"] == got["1"] and len(got["1"][3]) == 512
    with pytest.raises(ValueError, match="TIERED_COMPLETE_STEP"):
        monkeypatch.setenv("TIERED_COMPLETE_STEP", "yes")
        DeviceStep(eng.model, graphs=False, fill="copy")
    monkeypatch.setenv("TIERED_COMPLETE_STEP", "1")
    eng.generate(PROMPT, max_new_tokens=2)  # the table is complete at the decode's start
    assert step.complete and table.owner == "device"
    table.t["slot_of"][3 * 64:4 * 64] = -1  # (by hand: layer 3's experts are no longer resident)
    step.step(1, 10)
    with pytest.raises(RuntimeError, match="complete-table step looked up layer 3 expert [0-9]+, which was not"):
        table.harvest()
    slow = {}
    for knob in ("0", "1"):  # a fill of 2 blocks a step: the plan is in flight all decode, demand misses load planned
        monkeypatch.setenv("TIERED_COMPLETE_STEP", knob)  # keys (by the lookups' load under 1)
        eng = load(reference_layout, device="cpu", budget={"expert_slots": 512, "ram_gb": 600 * B / 2**30})
        step = _attach(eng, fill="copy")
        step.copy.batch, step.copy.depth = 2, 1
        assert eng.generate(PROMPT, max_new_tokens=NEW).token_ids == unlimited
        s = eng.stats
        ds = s["device_step"]
        assert ds["complete_steps"] == 0 and ds["planned_steps"] == (ds["steps"] if knob == "1" else 0)
        slow[knob] = (s["decode"]["hits"], s["decode"]["misses"], s["slot_table"]["prefetched"])
        table = eng.model.provider.devtable
        table.give_back()
        slow[knob] += (sorted(k for k in table.t["key_of"].tolist() if k >= 0),)
        eng.model.provider.vram.table.check()
    assert slow["0"] == slow["1"] and slow["1"][1] > 0


def test_copy_fill_drains_a_cut_phase(reference_layout, unlimited):
    """A decode phase that ends before its copies are all issued (a queue of one block): give_back waits for what
    was issued, enters it, and releases the rest (fill_cancel); the host table is consistent and the next phase
    plans again."""
    B = 49152
    eng = load(reference_layout, device="cpu", budget={"expert_slots": 512, "ram_gb": 600 * B / 2**30})
    step = _attach(eng, fill="copy")
    step.copy.batch, step.copy.depth = 1, 1
    assert eng.generate(PROMPT, max_new_tokens=4).token_ids == unlimited[:4]
    planned, issued = step.copy.n, step.copy.issued
    assert 0 < issued < planned
    table = eng.model.provider.devtable
    table.give_back()
    t = table.t
    assert int(t["key_of"].min()) >= -1 and int(t["slot_of"].min()) >= -1
    eng.model.provider.vram.table.check()
    assert eng.generate(PROMPT, max_new_tokens=NEW).token_ids == unlimited
    assert eng.stats["device_step"]["fill_copy"]["phases"] == 2


def test_copy_fill_refusals(reference_layout):
    """--device-fill copy is not paced by --h2d-gbps and does not run with --cpu-split admit; the option parses."""
    from tiered.cli.options import AutoOrInt
    from tiered.store.options import TierConfig

    B = 49152
    eng = load(reference_layout, device="cpu", budget={"expert_slots": 512, "ram_gb": 600 * B / 2**30})
    _attach(eng)
    with pytest.raises(ValueError, match="--cpu-split admit"):
        DeviceStep(eng.model, graphs=False, fill="copy", cpu=None, cpu_admit=True)
    eng.model.provider.devtable.h2d_gbps = 12.0
    with pytest.raises(ValueError, match="--h2d-gbps"):
        DeviceStep(eng.model, graphs=False, fill="copy")
    assert TierConfig(device_fill="copy").device_fill == "copy"
    with pytest.raises(BudgetError, match="auto, copy"):
        TierConfig(device_fill="dma")
    t = AutoOrInt(0, ("auto", "copy"))
    assert t.convert("copy", None, None) == "copy" and t.convert("3", None, None) == 3 and t.name == "auto|copy|N"


@pytest.mark.parametrize("gbps", [None, 1e-6])
def test_device_step_fill_auto(reference_layout, unlimited, monkeypatch, gbps):
    """--device-fill auto: the first window of steps runs the fill graph with nothing picked (and is not taken for a
    dry fill), then the pace sets N from the timed step and the link's rate and the fill loads what demand paging
    would miss; the tokens are every-expert-resident's. A link too slow for one block in a step (gbps 1e-6) turns
    the fill off: nothing is copied but the misses, and a later decode phase does not restart it. With --cpu-split
    admit, auto is off (its later copies would race a fill)."""
    import tiered.decode.devstep as ds_mod

    B = 49152
    if gbps is not None:
        monkeypatch.setattr(ds_mod, "_link_gbps", lambda table: gbps)
    eng = load(reference_layout, device="cpu", budget={"expert_slots": 512, "ram_gb": 600 * B / 2**30})
    step = _attach(eng, fill="auto")
    assert step.fill == 32 and step.pace is not None and int(step.fill_n[0]) == 0
    for i in range(2):
        assert eng.generate(PROMPT, max_new_tokens=NEW).token_ids == unlimited
        s = eng.stats
        d, ds = s["decode"], s["device_step"]
        assert ds["fill"] == "auto" and ds["fill_auto"]["step_s"] > 0
        assert d["bytes_h2d"] == (d["misses"] + s["slot_table"]["prefetched"]) * B
        if gbps is None:  # (eager on CPU the fill's copies lengthen the step: the pace may back off, not to 0 in 13
            # steps from 32; the second phase finds most keys resident)
            assert int(step.fill_n[0]) == step.pace.n
            if i == 0:
                assert step.pace.n > 0 and ds["fill_picked"] > 0
        else:
            assert step.pace.n == 0 and ds["fill_picked"] == 0 and not ds["fill_active"]
            assert int(step.fill_n[0]) == 0
    assert step.pace.step_s == ds["fill_auto"]["step_s"]  # timed once, in the first phase
    eng.model.provider.devtable.give_back()
    eng.model.provider.vram.table.check()
    cache = eng.model.provider
    assert DeviceStep(eng.model, graphs=False, fill="auto", cpu=None, cpu_admit=True).fill == 0
    with pytest.raises(ValueError, match="'auto' or >= 0"):
        DeviceStep(eng.model, graphs=False, fill="fast")
    del cache


@pytest.mark.skipif(CUDA, reason="the CPU's interpreter path (CUDA: test_cuda_device_step_matches_host_step)")
def test_device_step_topk_in_resolve_greedy_identical(reference_layout, unlimited, monkeypatch):
    """With the glue's router kernel (the interpreter), the device step leaves each layer's softmax-top-k to
    resolve (Routed.topk_pending; the reference path runs fused_route's rule there): the same greedy tokens as every
    expert resident (glue off), with misses, and a top-k at every MoE layer's resolve of every decode step."""
    B = 49152
    calls = []
    real = st.softmax_topk
    monkeypatch.setattr(st, "softmax_topk", lambda *a: calls.append(a[1]) or real(*a))
    eng = load(reference_layout, device="cpu", glue=True, budget={"expert_slots": 12, "ram_gb": 600 * B / 2**30})
    cache = eng.model.provider
    cache.ram.preload(list(range(cache.num_layers * cache.num_experts)), 0)
    cache.devtable = DeviceSlotTable(cache, w=0, kernels=st)
    eng.devstep = DeviceStep(eng.model, graphs=False, topk_resolve=True)
    assert eng.devstep.topk_resolve and eng.model.glue
    n = 6
    assert eng.generate(PROMPT, max_new_tokens=n).token_ids == unlimited[:n]
    assert calls == [eng.config.top_k] * ((n - 1) * len(eng.config.moe_layers))
    assert eng.stats["decode"]["misses"] > 0


@pytest.mark.skipif(CUDA, reason="the CPU's interpreter path (CUDA: test_cuda_device_step_fill_matches_host_step)")
def test_complete_step_router_writes_the_slots(reference_layout, unlimited, monkeypatch):
    """With the glue's router kernel (the interpreter) and room for every expert, the complete steps take their
    slots from the router's softmax-top-k launch (its lookup) and launch no lookup of their own: the same greedy
    tokens as every expert resident (glue off), over two phases, the second complete from its first step."""
    B = 49152
    launched = []
    real = st.lookup
    monkeypatch.setattr(st, "lookup", lambda *a: launched.append(1) or real(*a))
    eng = load(reference_layout, device="cpu", glue=True, budget={"expert_slots": 512, "ram_gb": 600 * B / 2**30})
    step = _attach(eng, fill="copy")
    assert eng.model.glue and step.can_complete
    n = 4  # (the interpreter is slow: the first phase's fill lands in its first step, its last step is complete)
    for phase in range(2):
        assert eng.generate(PROMPT, max_new_tokens=n).token_ids == unlimited[:n]
        ds = eng.stats["device_step"]
        assert ds["complete_steps"] > 0 and (phase == 0 or ds["complete_steps"] == ds["steps"] == n - 1)
    assert not launched
    eng.model.provider.devtable.harvest()


def test_softmax_topk_lookup_matches_reference():
    """fused_route.softmax_topk's lookup (the interpreter on CPU): the same ids and weights as without it, and the
    slots slot_table.lookup's reference gives for them, bad raised the same way for a key not resident."""
    from tiered.kernels import fused_route

    g = torch.Generator().manual_seed(3)
    dev = "cuda" if CUDA else "cpu"
    E, K, L = 16, 4, 3
    logits = torch.randn(1, E, generator=g).to(dev)
    slot_of = torch.randperm(L * E, generator=g).to(torch.int32)
    i0, w0 = fused_route.softmax_topk(logits, K, True)
    for hole in (False, True):
        so = slot_of.clone()
        if hole:
            so[2 * E + int(i0[0, 1])] = -1
        slots, bad = torch.full((K,), 9, dtype=torch.int64, device=dev), torch.zeros(1, dtype=torch.int64, device=dev)
        i1, w1 = fused_route.softmax_topk(logits, K, True, (so.to(dev), 2 * E, slots, bad))
        assert torch.equal(i1, i0) and torch.equal(w1, w0)
        want, bw = torch.empty(1, K, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
        one = torch.zeros(1, dtype=torch.int64)
        st.lookup_reference(i0.cpu(), one, want, one, torch.tensor([2 * E]), so, bw)
        assert torch.equal(slots.cpu(), want[0]) and torch.equal(bad.cpu(), bw) and (int(bw[0]) > 0) == hole
    # with the load (a plan of every key in flight): a planned key takes its reserved slot, its RAM row to src
    so = slot_of.clone()
    so[2 * E + int(i0[0, 0])] = -2 - so[2 * E + int(i0[0, 0])]
    host_row = torch.arange(L * E) + 1000
    want, bw, sw, cw, sow = (torch.empty(1, K, dtype=torch.int64), torch.zeros(1, dtype=torch.int64),
                             torch.empty(1, K, dtype=torch.int64), torch.zeros(2, dtype=torch.int64), so.clone())
    one = torch.zeros(1, dtype=torch.int64)
    st.lookup_reference(i0.cpu(), one, want, one, torch.tensor([2 * E]), sow, bw, (host_row, sw, cw))
    so_d, src, cnt = so.clone().to(dev), torch.empty(K, dtype=torch.int64, device=dev), torch.zeros(2).long().to(dev)
    bad.zero_()
    i1, w1 = fused_route.softmax_topk(logits, K, True, (so_d, 2 * E, slots, bad, host_row.to(dev), src, cnt))
    assert torch.equal(i1, i0) and torch.equal(slots.cpu(), want[0]) and torch.equal(src.cpu(), sw[0])
    assert torch.equal(cnt.cpu(), cw) and torch.equal(so_d.cpu(), sow) and cw.tolist() == [K - 1, 1]
    with pytest.raises(ValueError, match="one token"):
        fused_route.softmax_topk(logits.expand(2, E), K, True, (slot_of.to(dev), 0, slots, bad))


def test_device_step_runs_ahead(reference_layout, unlimited):
    """Greedy decoding with the host one step ahead of the device step (decode/ahead.py over DeviceStep.launch, the
    token and position left on the device by the step before): every-expert-resident tokens, and the same steps,
    hits and misses as the per-token loop; a stop string ends it with the one extra step discarded."""
    B = 49152
    runs = {}
    for ahead in (True, False):
        eng = load(reference_layout, device="cpu", budget={"expert_slots": 8, "ram_gb": 600 * B / 2**30})
        step = _attach(eng)
        eng.step_ahead = ahead
        g = eng.generate(PROMPT, max_new_tokens=NEW)
        assert g.token_ids == unlimited
        assert eng.stats["step_ahead"] is ahead and eng.stats["decode_graphs"] == "device"
        d = eng.stats["decode"]
        runs[ahead] = (d["hits"], d["misses"], step.steps)
        if ahead:
            text = eng.tokenizer.decode(unlimited)
            stop = text[len(text) // 2:len(text) // 2 + 3]
            g = eng.generate(PROMPT, max_new_tokens=NEW, stop=[stop])
            assert g.stop_reason == "stop" and len(g.token_ids) < NEW and eng.stats["ahead_extra_steps"] == 1
    assert runs[True] == runs[False] and runs[True][1] > 0


def test_device_step_with_replayed_routing_matches_host_step(reference_layout):
    """A routing override replayed inside the device step gives the same logits as the host-routed step with
    the same override, and the same expert misses with LRU on both sides."""
    ids = torch.stack([torch.randperm(64)[:8] for _ in range(64 * 8)]).view(64, 8, 8).numpy()
    w = torch.softmax(torch.randn(64, 8, 8), -1).numpy()
    outs = []
    for dev_step in (False, True):
        eng = load(reference_layout, device="cpu", budget={"expert_slots": 24, "ram_gb": 0.05},
                   routing=ReplayRouting(ids, w, device="cpu"))
        if dev_step:
            _attach(eng)
        else:
            eng.use_piecewise(graphs=False, static_positions=True)
        g = eng.generate(list(range(5, 15)), max_new_tokens=12)
        outs.append((g.token_ids, eng.stats["decode"]["misses"]))
    assert outs[0][0] == outs[1][0]
    assert abs(outs[0][1] - outs[1][1]) <= 0.1 * max(outs[0][1], 1)  # tie order among same-tick keys may differ


@pytest.mark.cuda
@pytest.mark.parametrize("policy", ["lru", "flru"])
def test_cuda_device_step_matches_host_step(reference_layout, policy):
    """--slot-table device (one CUDA graph per step) against --slot-table host on the reference model with few
    slots: greedy tokens identical, logits close, host time per layer far below the piecewise step's (each timed
    on a second call: a fresh box's first replays once took 0.36 ms a layer, session 56's call A)."""
    budget = {"expert_slots": 16, "ram_gb": 0.05, "policy": policy}
    runs = {}
    for mode in ("host", "device"):
        eng = load(reference_layout, device="cuda", budget={**budget, "slot_table": mode})
        eng.generate(PROMPT, max_new_tokens=8)  # (warm; each generate restarts the step's stats)
        g = eng.generate(PROMPT, max_new_tokens=32)
        runs[mode] = (g.token_ids, eng.stats)
    assert runs["device"][0] == runs["host"][0]
    s = runs["device"][1]
    assert s["decode_graphs"] == "device" and s["slot_table"]["mode"] == "device"
    d = s["decode"]
    assert d["misses"] > 0 and d["hits"] + d["misses"] == d["tokens"] * 8 * 8
    assert s["host_s_per_layer"] < runs["host"][1]["host_s_per_layer"]
    # the gather's own rate, timed at the hand-over for 1 and top-k (8) blocks: a real transfer rate over PCIe
    g = s["slot_table"]["gather_gbps"]
    assert set(g) == {"1", "8"} and all(0.05 < v < 1000 for v in g.values())


@pytest.mark.cuda
def test_cuda_device_step_replayed_routing(reference_layout):
    ids = torch.stack([torch.randperm(64)[:8] for _ in range(64 * 8)]).view(64, 8, 8).numpy()
    w = torch.softmax(torch.randn(64, 8, 8), -1).numpy()
    toks = []
    for mode in ("host", "device"):
        eng = load(reference_layout, device="cuda", budget={"expert_slots": 24, "ram_gb": 0.05, "slot_table": mode},
                   routing=ReplayRouting(ids, w, device="cuda"))
        toks.append(eng.generate(list(range(5, 15)), max_new_tokens=16).token_ids)
        assert eng.stats["decode_graphs"] == ("device" if mode == "device" else "piecewise")
    assert toks[0] == toks[1]
    # with room for every expert and the copy fill (the default), the steps after the fill look the replayed rows'
    # slots up all at once (lookup-only graphs): the same tokens, over two phases
    eng = load(reference_layout, device="cuda", budget={"expert_slots": 512, "ram_gb": 0.05, "slot_table": "device"},
               routing=ReplayRouting(ids, w, device="cuda"))
    want = load(reference_layout, device="cuda", routing=ReplayRouting(ids, w, device="cuda")).generate(
        list(range(5, 15)), max_new_tokens=40).token_ids
    for phase in range(2):
        assert eng.generate(list(range(5, 15)), max_new_tokens=40).token_ids == want
        ds = eng.stats["device_step"]
        assert ds["complete_steps"] > 0 and (phase == 0 or ds["complete_steps"] == ds["steps"])
    eng.model.provider.devtable.harvest()  # (raises if a lookup found a key not resident)


_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tiered.kernels import slot_table as st
tgt = GPUTarget("cuda", 90, 32)
sig = {"ids_ptr": "*i64", "base": "i64", "slot_of": "*i32", "key_of": "*i32", "last": "*i64", "uses": "*i64",
       "clock": "*i64", "counts": "*i64", "host_row": "*i64", "out_slot": "*i64", "out_src": "*i64",
       "pin_ptr": "*i64", "nt_ptr": "*i64", "n_ids": "i32", "n_slots": "i32", "n_pin": "i32", "w": "i64",
       "margin": "i64", "K_P": "constexpr", "S_P": "constexpr", "P_P": "constexpr", "PREFETCH": "constexpr",
       "SCORED": "constexpr", "GDC": "constexpr", "cpu_take": "*i32", "cpu_row": "*i64", "zero_slot": "i32",
       "CPU": "constexpr", "cpu_split": "*i32", "split_slot": "i32", "split_c": "*i64", "SPLIT": "constexpr",
       "ADMIT": "constexpr", "logits": "*bf16", "top_ids": "*i64", "top_w": "*fp32", "n_logits": "i32",
       "TOPK": "constexpr", "TK": "constexpr", "NORM_TOPK": "constexpr", "BLOCK_E": "constexpr"}
# cpu: the CPU-expert split (demand calls only); split: and a miss split by rows with the CPU (admit: into a slot)
for pf, cpu, split, admit in ((False, False, False, False), (True, False, False, False), (False, True, False, False),
                              (False, True, True, False), (False, True, True, True)):
    for scored in (False, True):
        cx = {"K_P": 8, "S_P": 256, "P_P": 8 if pf else 1, "PREFETCH": pf, "SCORED": scored, "GDC": pf, "CPU": cpu,
              "SPLIT": split, "ADMIT": admit, "TOPK": False, "TK": 1, "NORM_TOPK": False, "BLOCK_E": 2}
        assert triton.compile(ASTSource(st._resolve_kernel, sig, constexprs=cx), target=tgt).asm["cubin"]
# the router's softmax-top-k first (resolve(topk=...)), with and without the CPU split, 128 experts
for cpu in (False, True):
    cx = {"K_P": 8, "S_P": 1024, "P_P": 1, "PREFETCH": False, "SCORED": False, "GDC": True, "CPU": cpu,
          "SPLIT": False, "ADMIT": False, "TOPK": True, "TK": 8, "NORM_TOPK": True, "BLOCK_E": 128}
    k = triton.compile(ASTSource(st._resolve_kernel, sig, constexprs=cx), target=tgt)
    assert k.asm["cubin"] and "bar.sync" in k.asm["ptx"]
sig2 = {"src": "*i32", "row_src": "*i64", "row_dst": "*i64", "dst": "*i32", "row_words": "i64",
        "BLOCK": "constexpr", "CHUNKS": "constexpr", "GDC": "constexpr", "spec": "*i64", "split_c": "*i64",
        "SPLIT": "constexpr", "INVERSE": "constexpr", "landed": "*i32", "LAND": "constexpr"}
# inv: an admitted split's later copy; land: the overlapped demand gather's counts (a release after a barrier)
for split, inv, land in ((False, False, False), (True, False, False), (True, True, False), (False, False, True)):
    cx2 = {"BLOCK": 1024, "CHUNKS": 4, "GDC": True, "SPLIT": split, "INVERSE": inv, "LAND": land}
    k = triton.compile(ASTSource(st._gather_kernel, sig2, constexprs=cx2), target=tgt)
    assert k.asm["cubin"] and "griddepcontrol.wait" in k.asm["ptx"]
    assert (".gpu.release.add" in k.asm["ptx"]) == land
sig3 = {"src": "*i32", "row_src": "*i64", "row_dst": "*i64", "dst": "*i32", "row_words": "i64", "n_items": "i32",
        "n_chunks": "i32", "BLOCK": "constexpr", "CHUNKS": "constexpr", "GDC": "constexpr", "ns_per_chunk": "fp32",
        "R_P": "constexpr", "PACED": "constexpr", "spec": "*i64", "split_c": "*i64", "SPLIT": "constexpr",
        "INVERSE": "constexpr", "landed": "*i32", "LAND": "constexpr", "HINT": "constexpr"}
for paced, split, inv, land in ((False, False, False, False), (True, False, False, False), (False, True, False, False),
                                (True, True, False, False), (False, True, True, False), (False, False, False, True),
                                (True, False, False, True)):  # paced: --h2d-gbps
    cx3 = {"BLOCK": 1024, "CHUNKS": 4, "GDC": paced, "R_P": 8 if paced else 2, "PACED": paced, "SPLIT": split,
           "INVERSE": inv, "LAND": land, "HINT": 0}  # (the load hints: test_gather_overlap's compile test)
    k = triton.compile(ASTSource(st._gather_strided_kernel, sig3, constexprs=cx3), target=tgt)
    assert k.asm["cubin"] and ("%globaltimer" in k.asm["ptx"]) == paced
    assert (".gpu.release.add" in k.asm["ptx"]) == land
sig5 = {"order": "*i64", "cursor": "*i64", "slot_of": "*i32", "key_of": "*i32", "host_row": "*i64", "out_key": "*i64",
        "out_slot": "*i64", "out_src": "*i64", "picked": "*i64", "n_keys": "i32", "n_slots": "i32", "n_rows": "i32",
        "fill_n": "*i64",
        "keep_free": "i32",
        "C_P": "constexpr", "S_P": "constexpr", "W_P": "constexpr", "GDC": "constexpr"}
cx5 = {"C_P": 8, "S_P": 2048, "W_P": 1024, "GDC": True}
assert triton.compile(ASTSource(st._fill_pick_kernel, sig5, constexprs=cx5), target=tgt).asm["cubin"]
sig6 = {"fill_key": "*i64", "fill_slot": "*i64", "slot_of": "*i32", "key_of": "*i32", "last": "*i64", "uses": "*i64",
        "counts": "*i64", "n_fill": "i32", "C_P": "constexpr", "GDC": "constexpr"}
assert triton.compile(ASTSource(st._fill_install_kernel, sig6, constexprs={"C_P": 8, "GDC": True}),
                      target=tgt).asm["cubin"]
sig8 = {"plan_key": "*i64", "plan_slot": "*i64", "landed": "*i64", "installed": "*i64", "slot_of": "*i32",
        "key_of": "*i32", "last": "*i64", "uses": "*i64", "n_plan": "i32", "C_P": "constexpr", "GDC": "constexpr"}
k = triton.compile(ASTSource(st._fill_land_kernel, sig8, constexprs={"C_P": 64, "GDC": True}), target=tgt)
assert k.asm["cubin"] and "ld.volatile" in k.asm["ptx"]  # landed is written by the copy stream meanwhile
sig9 = {"ids": "*i64", "s_ids": "i32", "id_row": "*i64", "out": "*i64", "out_row": "*i64", "base": "*i64",
        "slot_of": "*i32", "bad": "*i64", "host_row": "*i64", "src": "*i64", "counts": "*i64", "n_rows": "i32",
        "K": "constexpr", "R_P": "constexpr", "K_P": "constexpr", "LOAD": "constexpr", "GDC": "constexpr"}
for R, load in ((1, False), (8, False), (1, True), (8, True)):  # one layer's lookup, a replayed routing's rows
    k = triton.compile(ASTSource(st._lookup_kernel, sig9, constexprs={"K": 8, "R_P": max(2, R), "K_P": 8,
                                                                        "LOAD": load, "GDC": True}), target=tgt)
    assert k.asm["cubin"] and "griddepcontrol.wait" in k.asm["ptx"]
sig7 = {"split_c": "*i64", "slot_of": "*i32", "key_of": "*i32", "n_rows": "i32", "R_P": "constexpr", "GDC": "constexpr"}
assert triton.compile(ASTSource(st._split_install_kernel, sig7, constexprs={"R_P": 8, "GDC": True}),
                      target=tgt).asm["cubin"]
from tiered.kernels import moe_decode as md
sig10 = {"x_ptr": "*bf16", "slot_ptr": "*i64", "gate_ptr": "*bf16", "up_ptr": "*bf16", "h_ptr": "*fp32",
         "slot_base": "i32", "stride_xt": "i32", "stride_gs": "i64", "stride_gf": "i64", "stride_us": "i64",
         "stride_uf": "i64", "gb_ptr": "*bf16", "ub_ptr": "*bf16", "stride_bs": "i32", "alpha": "fp32",
         "limit": "fp32", "D": "constexpr", "F": "constexpr", "K": "constexpr", "BLOCK_F": "constexpr",
         "BLOCK_D": "constexpr", "WFMT": "constexpr", "ACT": "constexpr", "HAS_BIAS": "constexpr", "GDC": "constexpr",
         "land_ptr": "*i32", "src_ptr": "*i64", "n_land": "i32", "done_ptr": "*i32", "WAIT": "constexpr",
         "FENCE": "constexpr", "DONE": "constexpr"}
for wait, done in ((False, False), (True, False), (True, True)):  # gate_up waiting for the gather's rows
    cx10 = {"D": 2048, "F": 768, "K": 8, "BLOCK_F": 4, "BLOCK_D": 512, "WFMT": 0, "ACT": 0, "HAS_BIAS": False,
            "GDC": True, "WAIT": wait, "FENCE": wait, "DONE": done}
    k = triton.compile(ASTSource(md._gate_up_kernel, sig10, constexprs=cx10), target=tgt, options={"num_warps": 2})
    p = k.asm["ptx"]
    assert k.asm["cubin"] and ("ld.volatile.global" in p) == wait and ("fence.acq_rel.gpu" in p) == wait
    assert (".gpu.release.add" in p) == done  # done[pair] += 1 for a down kernel that waits per pair (red or atom)
    assert ("griddepcontrol.wait" in p) != wait
sig11 = {"h_ptr": "*fp32", "slot_ptr": "*i64", "wt_ptr": "*fp32", "down_ptr": "*bf16", "y_ptr": "*bf16",
         "slot_base": "i32", "stride_ds": "i64", "stride_dd": "i64", "stride_yt": "i32", "db_ptr": "*bf16",
         "stride_bs": "i32", "D": "constexpr", "F": "constexpr", "K": "constexpr", "K_PER": "constexpr",
         "SPLIT": "constexpr", "BLOCK_D": "constexpr", "BLOCK_F": "constexpr", "WFMT": "constexpr", "WR": "constexpr",
         "HAS_BIAS": "constexpr", "KP": "constexpr", "GDC": "constexpr", "src_ptr": "*i64", "done_ptr": "*i32",
         "n_done": "i32", "ORDER": "constexpr", "WAIT": "constexpr", "FENCE": "constexpr"}
for order, wait in ((False, False), (True, False), (True, True)):  # down: resident pairs first, waiting per pair
    cx11 = {"D": 2048, "F": 768, "K": 8, "K_PER": 8, "SPLIT": 1, "BLOCK_D": 4, "BLOCK_F": 1024, "WFMT": 0, "WR": 0,
            "HAS_BIAS": False, "KP": 8, "GDC": True, "ORDER": order, "WAIT": wait, "FENCE": wait}
    k = triton.compile(ASTSource(md._down_kernel, sig11, constexprs=cx11), target=tgt, options={"num_warps": 8})
    p = k.asm["ptx"]
    assert k.asm["cubin"] and ("ld.volatile.global" in p) == wait and ("fence.acq_rel.gpu" in p) == wait
    assert ("griddepcontrol.wait" in p) != wait and "griddepcontrol.launch_dependents" in p
    assert ("nanosleep.u32 128" in p) == wait  # the spin's back-off
from tiered.kernels import next_use as nu
sig4 = {"ids_ptr": "*i64", "prev_ptr": "*i64", "tt_ptr": "*fp32", "lt_ptr": "*fp32", "fast_ptr": "*fp32",
        "slow_ptr": "*fp32", "prob_ptr": "*fp32", "pfp_ptr": "*fp32", "base_ptr": "*i64", "w_ptr": "*fp32",
        "nt_ptr": "*i64", "dist_ptr": "*i64", "n_keys": "i32", "j": "i32",
        "key_j": "i32", "key_j1": "i32", "n_ids": "i32", "E": "i32", "M": "i32", "fa": "fp32", "sa": "fp32",
        "eps": "fp32", "p_min": "fp32", "scale": "fp32", "HAS_NEXT": "constexpr", "K_P": "constexpr",
        "E_P": "constexpr", "BLOCK_N": "constexpr", "GDC": "constexpr"}
for nxt in (False, True):
    cx = {"HAS_NEXT": nxt, "K_P": 8, "E_P": 128, "BLOCK_N": 1024, "GDC": nxt}
    assert triton.compile(ASTSource(nu._next_use_kernel, sig4, constexprs=cx), target=tgt).asm["cubin"]
print("ok")
"""


def test_kernels_compile_for_sm90():
    """The real compiler (not the interpreter, which is more permissive) accepts both kernels for an H100/H200
    target, down to the cubin: a CPU machine catches what would otherwise fail only on the GPU box. In a fresh
    process, since TRITON_INTERPRET (set by conftest without CUDA) applies at import."""
    from conftest import compile_sm90

    compile_sm90(_COMPILE)


def test_device_step_prefetch_greedy_identical(reference_layout, unlimited):
    """The device step with a one-layer-ahead prefetch (transitions fitted on a reference trace) gives the
    every-expert-resident greedy tokens; it loads blocks ahead and some of them are then hits, and the counters
    add up (prefetched blocks count as bytes crossing and as prefetches, not as misses)."""
    from pathlib import Path

    from tiered.predict.predictors import transition_params
    from tiered.predict.trace import TraceRecorder, record

    B = 49152
    rec = TraceRecorder()
    eng0 = load(reference_layout, device="cpu", observer=rec)
    code = (Path(__file__).resolve().parent.parent / "tiered" / "engine.py").read_text()[:3000]  # any code, not eval/
    params = transition_params(record(eng0, rec, [("engine.py", eng0.encode(code)[:256])]))
    eng = load(reference_layout, device="cpu", budget={"expert_slots": 24, "ram_gb": 600 * B / 2**30})
    cache = eng.model.provider
    cache.ram.preload(list(range(cache.num_layers * cache.num_experts)), 0)
    cache.devtable = DeviceSlotTable(cache, w=0, kernels=st)
    eng.devstep = DeviceStep(eng.model, graphs=False, prefetch=6, transitions=(params.layer_trans, params.time_trans))
    eng.pieces = None
    got = eng.generate(PROMPT, max_new_tokens=NEW).token_ids
    assert got == unlimited
    s = eng.stats
    d = s["decode"]
    assert s["slot_table"]["prefetched"] > 0 and d["bytes_prefetch"] == s["slot_table"]["prefetched"] * cache.block_size
    assert d["hits"] + d["misses"] == d["tokens"] * 8 * 8
    assert d["bytes_h2d"] == (d["misses"] + s["slot_table"]["prefetched"]) * cache.block_size
    assert s["prefetch_issued"] == s["slot_table"]["prefetched"]


@pytest.mark.cuda
def test_cuda_device_step_prefetch_matches_host_step(reference_layout):
    """The captured step with its side-stream prefetch (a second stream inside the graph) decodes the same greedy
    tokens as the host step, and its prefetched blocks are used."""
    from pathlib import Path

    from tiered.predict.predictors import History, transition_params
    from tiered.predict.trace import TraceRecorder, record

    rec = TraceRecorder()
    eng0 = load(reference_layout, device="cpu", observer=rec)
    code = (Path(__file__).resolve().parent.parent / "tiered" / "engine.py").read_text()[:3000]
    params = transition_params(record(eng0, rec, [("engine.py", eng0.encode(code)[:256])]))
    budget = {"expert_slots": 24, "ram_gb": 0.05}
    host = load(reference_layout, device="cuda", budget={**budget, "slot_table": "host"})
    want = host.generate(PROMPT, max_new_tokens=32).token_ids
    eng = load(reference_layout, device="cuda", budget={**budget, "slot_table": "device", "device_prefetch": 6,
                                                        "device_evict": "policy"},
               predictor=History(8, 64, params))
    assert eng.generate(PROMPT, max_new_tokens=32).token_ids == want
    s = eng.stats
    assert s["decode_graphs"] == "device" and s["slot_table"]["prefetched"] > 0
    assert s["device_step"]["gather_overlap"] is True  # (the prefetch's id copies come before the gather)


@pytest.mark.cuda
def test_cuda_device_step_fill_matches_host_step(reference_layout):
    """The captured step with its background fill (a side stream across the whole graph, reserved slots installed
    at its end) decodes the host step's greedy tokens; with room for every expert it loads blocks ahead, takes
    misses away, runs dry and hands over to the graphs without the fill; auto times its first steps with CUDA
    events, then fills as much; copy (the copy engines outside the graph, entered by each step's first kernel)
    leaves every resident slot holding its key's RAM block."""
    budget = {"expert_slots": 512, "ram_gb": 0.05}
    want = load(reference_layout, device="cuda", budget={**budget, "slot_table": "host"}).generate(
        PROMPT, max_new_tokens=48).token_ids
    misses = {}
    for fill in (0, 32, "auto", "copy"):
        eng = load(reference_layout, device="cuda", budget={**budget, "slot_table": "device", "device_fill": fill})
        assert eng.generate(PROMPT, max_new_tokens=48).token_ids == want
        s = eng.stats
        assert s["decode_graphs"] == "device" and (s["slot_table"]["prefetched"] > 0) == (fill != 0)
        if fill == "copy":  # its plan holds every key: the filling steps looked their slots up (no resolve)
            assert s["device_step"]["planned_steps"] > 0
        misses[fill] = s["decode"]["misses"]
        assert int(eng.model.provider.devtable.t["key_of"].min()) >= -1
        if fill == "auto":  # the first window timed on the device, N chosen (the tiny model's step and blocks)
            a = s["device_step"]["fill_auto"]
            assert s["device_step"]["fill"] == "auto" and a["step_s"] > 0 and a["n"] > 0 and a["gbps"] > 1
        if fill != 0:  # every expert filled within a few steps: the later steps replayed the graphs without the fill
            assert s["device_step"]["fill_active"] is False and eng.devstep.idle
            assert eng.generate(PROMPT, max_new_tokens=48).token_ids == want  # a new phase fills again, dry at once
        if fill == "copy":  # the copy engines' blocks landed where the table says (CopyFill's plan and fill_land)
            table = eng.model.provider.devtable
            assert s["device_step"]["fill_copy"]["planned"] > 0
            # the plan held every key: after it landed, the steps replayed the lookup-only graphs, and the next
            # phase (above) found the table complete from its first step
            d = eng.devstep
            assert eng.devstep.whole and s["device_step"]["complete"]
            assert d.stats()["complete_steps"] == d.steps and d.steps > 0
            assert s["decode"]["hits"] + s["decode"]["misses"] == s["decode"]["tokens"] * 8 * 8
            table.give_back()
            for slot, k in enumerate(table.t["key_of"].tolist()):
                if k >= 0:
                    assert torch.equal(table.slots[slot], table.host_pool[int(table.t["host_row"][k])].cuda())
    assert misses[32] < misses[0] and misses["auto"] < misses[0] and misses["copy"] < misses[0]


def _code_transitions(reference_layout):
    """Router-history transitions fitted on a trace of project code (not eval/ text)."""
    from pathlib import Path

    from tiered.predict.predictors import transition_params
    from tiered.predict.trace import TraceRecorder, record

    rec = TraceRecorder()
    eng0 = load(reference_layout, device="cpu", observer=rec)
    code = (Path(__file__).resolve().parent.parent / "tiered" / "engine.py").read_text()[:3000]
    p = transition_params(record(eng0, rec, [("engine.py", eng0.encode(code)[:256])]))
    return p.layer_trans, p.time_trans


@pytest.mark.parametrize("slots,prefetch", [(8, 0), (20, 3)])
def test_device_step_nextuse_greedy_identical(reference_layout, unlimited, slots, prefetch):
    """Eviction by predicted next use (and its prefetch) in the device step's algorithm gives the every-expert-
    resident greedy tokens; the counters add up; the prefetch loads blocks only where the kernel's rule lets it."""
    B = 49152
    tr = _code_transitions(reference_layout)
    eng = load(reference_layout, device="cpu", budget={"expert_slots": slots, "ram_gb": 600 * B / 2**30})
    cache = eng.model.provider
    cache.ram.preload(list(range(cache.num_layers * cache.num_experts)), 0)
    cache.devtable = DeviceSlotTable(cache, w=0, kernels=st)
    eng.devstep = DeviceStep(eng.model, graphs=False, prefetch=prefetch, transitions=tr, evict="nextuse")
    eng.pieces = None
    assert eng.generate(PROMPT, max_new_tokens=NEW).token_ids == unlimited
    s = eng.stats
    d = s["decode"]
    assert d["hits"] + d["misses"] == d["tokens"] * 8 * 8 and d["misses"] > 0
    assert d["bytes_h2d"] == (d["misses"] + s["slot_table"]["prefetched"]) * cache.block_size
    assert s["device_step"]["evict"] == "nextuse"
    if prefetch:
        assert s["slot_table"]["prefetched"] > 0
    nu = eng.devstep.nu
    assert bool((nu.prob > 0).all()) and bool((nu.prob < 1).all()) and bool((nu.base > 0).all())


def test_next_use_state_matches_fit_features():
    """NextUse.update computes, token by token, the probabilities the fit's features give (next_use_features +
    the logistic weights), for both models: the fit and the device step see the same inputs."""
    import numpy as np

    from tiered.decode.devpolicy import DEFAULT_PARAMS, NextUse, next_use_features

    M, E, K, T = 3, 10, 3, 12
    g = torch.Generator().manual_seed(1)
    ids = torch.stack([torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(M)]) for _ in range(T)])
    lt = torch.softmax(torch.randn(M - 1, E, E, generator=g), -1)
    tt = torch.softmax(torch.randn(M, E, E, generator=g), -1)
    p = DEFAULT_PARAMS
    nu = NextUse(p, lt, tt, moe_layers=list(range(M)), num_layers=M, num_experts=E, top_k=K, device="cpu",
                 kernel=False)
    hot = np.zeros((T, M, E), np.float32)
    for t in range(T):
        for j in range(M):
            hot[t, j, ids[t, j].numpy()] = 1
    xt, _, xl, _ = next_use_features(hot, np.array([0]), lt.numpy(), tt.numpy(), p.fast, p.slow)
    xt, xl = xt.reshape(T - 1, M, E, 4), xl.reshape(T - 1, M - 1, E, 4)

    def prob(x, w, b):  # 1 / (1 + predicted missed visits)
        return torch.exp(-(torch.log(torch.from_numpy(x) + p.eps) @ torch.tensor(w) + b))

    for t in range(T):
        for j in range(M):
            nu.update(j, ids[t, j])
            if t + 1 < T:
                torch.testing.assert_close(nu.prob[j], prob(xt[t, j], p.w_time, p.b_time).clamp(p.p_min, 1 - 1e-6))
            if j + 1 < M and t >= 1:
                torch.testing.assert_close(nu.prob[j + 1],
                                           prob(xl[t - 1, j], p.w_layer, p.b_layer).clamp(p.p_min, 1 - 1e-6))
    # nt: visits until the key's layer runs, plus M (1 - p) / p = M x the predicted missed visits, scaled
    j = 1
    want = ((torch.arange(M) - j - 1) % M + 1).repeat_interleave(E) * p.scale
    want = want + torch.floor(M * (1 - nu.prob.reshape(-1)) / nu.prob.reshape(-1) * p.scale + 0.5).long()
    assert torch.equal(nu.demand_nt(j), want)


@pytest.mark.cuda
@pytest.mark.parametrize("prefetch", [0, 2])
def test_cuda_device_step_nextuse_matches_host_step(reference_layout, prefetch):
    """--device-evict nextuse in the captured step (its state updates and the prefetch's side stream inside the
    graph) decodes the host step's greedy tokens; the prefetch loads blocks."""
    from tiered.predict.predictors import History, PredictorParams

    lt, tt = _code_transitions(reference_layout)
    params = PredictorParams(lt, tt, torch.zeros(8, 64), torch.zeros(0, 8, 64), torch.zeros(7, 64, 320),
                             torch.zeros(7, 64), {})
    # (CPU experts off: their bf16 sums, in the worker's order, may flip a greedy token against the host step, and
    # how many misses they take follows the load-time probe; session 23 call A saw one flip at token 8 with a probe
    # of 7 GB/s. tests/test_cpu_experts.py checks them.)
    budget = {"expert_slots": 24, "ram_gb": 0.05, "cpu_experts": "off"}
    want = load(reference_layout, device="cuda", budget={**budget, "slot_table": "host"}).generate(
        PROMPT, max_new_tokens=32).token_ids
    eng = load(reference_layout, device="cuda", budget={**budget, "slot_table": "device", "device_evict": "nextuse",
                                                        "device_prefetch": prefetch},
               predictor=History(8, 64, params))
    assert eng.generate(PROMPT, max_new_tokens=32).token_ids == want
    s = eng.stats
    assert s["decode_graphs"] == "device" and s["device_step"]["evict"] == "nextuse"
    assert s["device_step"]["next_use_stream"] is True
    d = s["decode"]
    assert d["hits"] + d["misses"] == d["tokens"] * 8 * 8
    if prefetch:
        assert s["slot_table"]["prefetched"] > 0


@pytest.mark.cuda
@pytest.mark.parametrize("prefetch", [0, 2])
def test_cuda_next_use_stream_decides_as_inline(reference_layout, monkeypatch, prefetch):
    """The next-use update on its own stream (forked after resolve, joined before the next resolve and the
    prefetch) makes the same eviction and prefetch decisions as the update in the step's stream: equal tokens and
    equal hit, miss and prefetch counts, graphs replayed, at a budget that evicts."""
    from tiered.predict.predictors import History, PredictorParams

    lt, tt = _code_transitions(reference_layout)
    params = PredictorParams(lt, tt, torch.zeros(8, 64), torch.zeros(0, 8, 64), torch.zeros(7, 64, 320),
                             torch.zeros(7, 64), {})
    # (--device-evict left to its default, auto: nextuse, since the predictor carries router history)
    budget = {"expert_slots": 24, "ram_gb": 0.05, "cpu_experts": "off", "slot_table": "device",
              "device_prefetch": prefetch}
    got = {}
    for knob in ("0", "1"):
        monkeypatch.setenv("TIERED_NEXT_USE_STREAM", knob)
        eng = load(reference_layout, device="cuda", budget=budget, predictor=History(8, 64, params))
        ids = eng.generate(PROMPT, max_new_tokens=32).token_ids
        s = eng.stats
        assert s["decode_graphs"] == "device" and s["device_step"]["evict"] == "nextuse"
        assert s["device_step"]["next_use_stream"] == (knob == "1")
        got[knob] = (ids, s["decode"]["hits"], s["decode"]["misses"], s["slot_table"]["prefetched"])
        assert got[knob][2] > 0  # (the budget evicts: the policy decides something)
    assert got["1"] == got["0"]


@pytest.mark.parametrize("E,K,moe_layers,num_layers", [(10, 3, [0, 1, 2], 3), (16, 4, [1, 2, 3, 4], 5), (7, 1, [0, 1], 2)])
def test_next_use_kernel_matches_torch(E, K, moe_layers, num_layers):
    """The fused next-use update (kernels/next_use.py, the Triton interpreter on CPU) equals NextUse's torch ops over
    a random trace: EWMAs, probabilities, the prefetch probability and the ids kept to float tolerance, the scaled
    bases within one unit (a rounding edge), through dense layers and odd sizes."""
    from tiered.decode.devpolicy import DEFAULT_PARAMS, NextUse

    M = len(moe_layers)
    g = torch.Generator().manual_seed(E * 31 + K)
    lt = torch.softmax(torch.randn(M - 1, E, E, generator=g), -1)
    tt = torch.softmax(torch.randn(M, E, E, generator=g), -1)
    dev = "cuda" if CUDA else "cpu"
    kw = dict(moe_layers=moe_layers, num_layers=num_layers, num_experts=E, top_k=K)
    ref = NextUse(DEFAULT_PARAMS, lt, tt, device="cpu", kernel=False, **kw)
    ker = NextUse(DEFAULT_PARAMS, lt, tt, device=dev, kernel=True, **kw)
    for t in range(6):
        for j in range(M):
            ids = torch.randperm(E, generator=g)[:K]
            ref.update(j, ids)
            ker.update(j, ids.to(dev))
            for name in ("fast", "slow", "prob", "pf_prob"):
                torch.testing.assert_close(getattr(ker, name).cpu(), getattr(ref, name), rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"token {t} layer {j} {name}: {m}")
            assert torch.equal(ker.prev.cpu(), ref.prev)
            assert int((ker.base.cpu() - ref.base).abs().max()) <= 1
            # the next resolve's nt, written by the update itself: dist of MoE layer (j + 1) mod M + base
            nxt = (j + 1) % M
            assert torch.equal(ker.nt.cpu(), ker.dist[nxt].cpu() + ker.base.cpu())
            assert torch.equal(ker.demand_nt(nxt).cpu() - ker.base.cpu(), ref.demand_nt(nxt) - ref.base)
            assert torch.equal(ker.demand_nt(j).cpu() - ker.base.cpu(), ref.demand_nt(j) - ref.base)


def test_next_use_stream_knob(monkeypatch):
    """TIERED_NEXT_USE_STREAM: unset or 1 puts the next-use update on its own stream, 0 in the step's; anything else
    is refused with the accepted values."""
    from tiered.decode.devstep import next_use_stream_enabled

    monkeypatch.delenv("TIERED_NEXT_USE_STREAM", raising=False)
    assert next_use_stream_enabled()
    monkeypatch.setenv("TIERED_NEXT_USE_STREAM", "0")
    assert not next_use_stream_enabled()
    monkeypatch.setenv("TIERED_NEXT_USE_STREAM", "on")
    with pytest.raises(ValueError, match="expected 0"):
        next_use_stream_enabled()


def test_device_evict_auto_takes_nextuse_where_router_history_exists(reference_layout, capsys):
    """--device-evict auto (the default): nextuse with the device slot table and router-history transitions (a
    predictor's, or the layout's `tiered tune --fit-trace` file), said on stderr; policy without either; a bad value
    is refused with the choices."""
    from types import SimpleNamespace

    from tiered.engine import _auto_evict
    from tiered.predict.predictors import History, NoPrediction, PredictorParams
    from tiered.store.options import TierConfig

    lay = SimpleNamespace(path=str(reference_layout))  # (what _auto_evict reads of a layout)
    lt, tt = torch.rand(7, 64, 64), torch.rand(8, 64, 64)
    params = PredictorParams(lt, tt, torch.zeros(8, 64), torch.zeros(0, 8, 64), torch.zeros(7, 64, 320),
                             torch.zeros(7, 64), {})
    assert _auto_evict(lay, History(8, 64, params), True) == "nextuse"
    assert "--device-evict auto: nextuse" in capsys.readouterr().err
    assert _auto_evict(lay, History(8, 64, params), False) == "policy"
    assert _auto_evict(lay, NoPrediction(8, 64), True) == "policy"  # (the layout has no router history)
    assert _auto_evict(lay, None, True) == "policy"
    assert TierConfig().device_evict == "auto"
    with pytest.raises(BudgetError, match="auto, policy or nextuse"):
        TierConfig(device_evict="belady")
    # a CPU run (no device table): the default resolves to policy without a word
    eng = load(reference_layout, device="cpu", budget={"expert_slots": 24}, predictor=History(8, 64, params))
    assert eng.devstep is None and "--device-evict" not in capsys.readouterr().err
