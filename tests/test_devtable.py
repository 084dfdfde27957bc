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
         "clock": torch.zeros(1, dtype=torch.int64), "counts": torch.zeros(2, dtype=torch.int64),
         "host_row": torch.randperm(N, generator=g).to(torch.int64)}
    return {k: v.to(device) for k, v in t.items()}


def _kernel_resolve(ids, layer, E, t, w, out_slot, out_src):
    """The Triton kernel: on CUDA through resolve(), on CPU straight into the interpreter."""
    if CUDA:
        return st.resolve(ids, layer, E, t, w, out_slot, out_src)
    K, S = ids.shape[0], t["key_of"].shape[0]
    st._resolve_kernel[(1,)](ids, layer * E, t["slot_of"], t["key_of"], t["last"], t["uses"], t["clock"],
                             t["counts"], t["host_row"], out_slot, out_src, K, S, w, K_P=st._p2(K), S_P=st._p2(S))


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


def test_gather_kernel_copies_only_misses():
    R, S, B = 6, 4, 4096 * 3
    host = torch.randint(0, 255, (R, B), dtype=torch.uint8)
    slots = torch.zeros(S, B, dtype=torch.uint8)
    src, dst = torch.tensor([4, -1, 1]), torch.tensor([2, 0, 3])
    if CUDA:
        pinned = host.pin_memory()
        dslots = slots.cuda()
        st.gather(pinned, src.cuda(), dst.cuda(), dslots)
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
    assert "--cpu-experts" in refusal(**{**ok, "cpu_experts": "auto"})
    assert "--h2d-gbps" in refusal(**{**ok, "h2d_gbps": 12.0})


def test_slot_table_device_refused_on_cpu_auto_stays_on_host(reference_layout):
    with pytest.raises((BudgetError, EngineError), match="CUDA"):
        load(reference_layout, device="cpu", budget={"expert_slots": 16, "slot_table": "device"})
    eng = load(reference_layout, device="cpu", budget={"expert_slots": 16, "slot_table": "auto"})
    eng.generate(PROMPT, max_new_tokens=2)
    assert eng.stats["slot_table"]["mode"] == "host" and "CUDA" in eng.stats["slot_table"]["device_refused"]


def _attach(eng, w: int = 0) -> DeviceStep:
    """The device table and an eager device step on a CPU engine (what --slot-table device does on CUDA)."""
    cache = eng.model.provider
    cache.ram.preload(list(range(cache.num_layers * cache.num_experts)), 0)
    cache.devtable = DeviceSlotTable(cache, w=w)
    eng.devstep = DeviceStep(eng.model, graphs=False)
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
    slots: greedy tokens identical, logits close, host time per layer far below the piecewise step's."""
    budget = {"expert_slots": 16, "ram_gb": 0.05, "policy": policy}
    runs = {}
    for mode in ("host", "device"):
        eng = load(reference_layout, device="cuda", budget={**budget, "slot_table": mode})
        g = eng.generate(PROMPT, max_new_tokens=32)
        runs[mode] = (g.token_ids, eng.stats)
    assert runs["device"][0] == runs["host"][0]
    s = runs["device"][1]
    assert s["decode_graphs"] == "device" and s["slot_table"]["mode"] == "device"
    d = s["decode"]
    assert d["misses"] > 0 and d["hits"] + d["misses"] == d["tokens"] * 8 * 8
    assert s["host_s_per_layer"] < runs["host"][1]["host_s_per_layer"]


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
