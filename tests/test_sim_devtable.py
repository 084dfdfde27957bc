"""benchmarks/sim_devtable.py: the device step's body over replayed routing, on tiny shapes (fast)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def _sim():
    sys.path.insert(0, str(REPO / "tools"))
    spec = importlib.util.spec_from_file_location("sim_devtable", REPO / "benchmarks" / "sim_devtable.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _routing(T: int, L: int, E: int, K: int, seed: int = 0) -> np.ndarray:
    """Routing with reuse: each layer draws its K experts from a slowly changing hot set."""
    g = np.random.default_rng(seed)
    ids = np.empty((T, L, K), np.int64)
    for l in range(L):
        hot = g.permutation(E)[:2 * K]
        for t in range(T):
            if t % 7 == 0:
                hot[g.integers(2 * K)] = g.integers(E)
            pool = np.unique(np.concatenate([hot, g.permutation(E)[:K]]))
            ids[t, l] = g.permutation(pool)[:K]
    return ids


def test_sim_lru_counts_match_a_plain_replay_and_bounds_hold():
    """The simulated LRU device step misses exactly what a plain replay of resolve_reference misses; Belady misses
    no more than any run; the oracle prefetch is the best prefetch; the time model adds up for a demand run."""
    sim = _sim()
    from tiered.kernels import slot_table as st

    L, E, K, S, P = 3, 16, 3, 14, 6
    ids = _routing(40, L, E, K)
    tt = torch.softmax(torch.randn(L, E, E), -1)
    lt = torch.softmax(torch.randn(L - 1, E, E), -1)
    kw = dict(slots=S, num_experts=E, transitions=(lt, tt), params=sim.DEFAULT_PARAMS, block=4096, pcie=1e-3,
              compute=1e-3)
    runs = {r: sim.simulate_doc(ids, P, sim.parse_run(r), **kw) for r in ("lru", "nextuse", "nextuse+pf2",
                                                                         "nextuse+oracle2")}
    t = {"slot_of": torch.full((L * E,), -1, dtype=torch.int32), "key_of": torch.full((S,), -1, dtype=torch.int32),
         "last": torch.zeros(S, dtype=torch.int64), "uses": torch.zeros(S, dtype=torch.int64),
         "clock": torch.zeros(1, dtype=torch.int64), "counts": torch.zeros(4, dtype=torch.int64),
         "host_row": torch.arange(L * E, dtype=torch.int64)}
    out, src = torch.empty(E, dtype=torch.int64), torch.empty(E, dtype=torch.int64)
    for l in range(L):
        u = torch.from_numpy(np.unique(ids[:P, l]))
        st.resolve_reference(u, l, E, t, 0, out[:len(u)], src[:len(u)])
    t["counts"].zero_()
    for p in range(P, len(ids)):
        for l in range(L):
            st.resolve_reference(torch.from_numpy(ids[p, l]), l, E, t, 0, out[:K], src[:K])
    lru = runs["lru"]
    assert lru["demand_misses"] == int(t["counts"][1]) > 0
    c = 4096 / 1e6  # seconds per block at 1e-3 GB/s
    n = len(ids) - P
    assert abs(lru["time_ms_per_token"] - (1e-3 + lru["demand_misses"] * c / n) * 1e3) < 1e-6
    for r in runs.values():
        assert r["belady_misses"] <= r["demand_misses"] + r["prefetch_used"]
        assert 0 <= r["prefetch_used"] <= r["prefetch_issued"]
    o = runs["nextuse+oracle2"]
    assert o["prefetch_used"] == o["prefetch_issued"] > 0  # the oracle only loads what is then used
    assert o["demand_misses"] < runs["nextuse"]["demand_misses"]
    # CPU experts: take[m] = m (every miss to the CPU): nothing is copied, every miss costs the CPU's time instead
    cpu = sim.simulate_doc(ids, P, sim.parse_run("lru+cpu"), **kw, cpu_take=list(range(K + 1)), cpu_gbps=2e-3,
                           cpu_overhead=1e-4)
    assert cpu["demand_misses"] == 0 and cpu["cpu_misses"] > 0
    assert cpu["hit_rate"] == 1 - cpu["cpu_misses"] / (n * L * K)


def test_sim_gate_prefetch_replays_given_candidates():
    """A '+gate' run prefetches the given candidates of the next layer that are not resident, in their order: with
    the true routing as its candidates it is the oracle, to the count; with candidates that are never routed, its
    prefetches go unused; without candidates it refuses to run."""
    sim = _sim()
    L, E, K, S, P = 3, 16, 3, 14, 6
    ids = _routing(40, L, E, K, seed=1)
    torch.manual_seed(0)  # (the transitions' popularity order: the same every run)
    tt = torch.softmax(torch.randn(L, E, E), -1)
    lt = torch.softmax(torch.randn(L - 1, E, E), -1)
    kw = dict(slots=S, num_experts=E, transitions=(lt, tt), params=sim.DEFAULT_PARAMS, block=4096, pcie=1e-3,
              compute=1e-3)
    assert sim.parse_run("nextuse+gate2+cpu") == {"evict": "nextuse", "w": 0, "prefetch": 2, "oracle": False,
                                                   "gate": True, "cpu": True, "fill": 0}
    oracle = sim.simulate_doc(ids, P, sim.parse_run("nextuse+oracle2"), **kw)
    gate = sim.simulate_doc(ids, P, sim.parse_run("nextuse+gate2"), **kw, pred=ids)
    for k in ("demand_misses", "prefetch_issued", "prefetch_used", "time_ms_per_token"):
        assert gate[k] == oracle[k], k
    never = np.empty_like(ids)
    for t in range(len(ids)):
        for l in range(L):
            never[t, l] = [e for e in range(E) if e not in ids[t, l]][:K]
    bad = sim.simulate_doc(ids, P, sim.parse_run("nextuse+gate2"), **kw, pred=never)
    assert bad["prefetch_issued"] > 0 and bad["prefetch_used"] <= bad["prefetch_issued"] // 2
    try:
        sim.simulate_doc(ids, P, sim.parse_run("nextuse+gate2"), **kw)
    except SystemExit as e:
        assert "predictions" in str(e)
    else:
        raise AssertionError("a +gate run without candidates ran")


def test_sim_fill_loads_free_slots_ahead_and_times_its_copies():
    """'+fillN' runs the device step's background fill (the reference pick and install): with room for every expert
    it takes first uses off demand paging (never more misses than lru), picks no more blocks than the free slots,
    and an id-order or late-starting fill misses at least as often as the popularity order from the first step
    here; a step with fill copies takes at least their link time. Bad specs are refused."""
    sim = _sim()
    L, E, K, P = 3, 16, 3, 6
    ids = _routing(40, L, E, K, seed=1)
    tt = torch.softmax(torch.randn(L, E, E), -1)
    lt = torch.softmax(torch.randn(L - 1, E, E), -1)
    kw = dict(slots=L * E, num_experts=E, transitions=(lt, tt), params=sim.DEFAULT_PARAMS, block=4096, pcie=1e-3,
              compute=1e-3)
    assert sim.parse_run("lru+fill4id@3") == {**sim.parse_run("lru"), "fill": 4, "fill_order": "id",
                                              "fill_start": 3}
    lru = sim.simulate_doc(ids, P, sim.parse_run("lru"), **kw)
    runs = {r: sim.simulate_doc(ids, P, sim.parse_run(r), **kw) for r in ("lru+fill4", "lru+fill4id",
                                                                         "lru+fill4@20", "lru+fill1")}
    resident = len({(l, int(e)) for l in range(L) for e in ids[:P, l].ravel()})
    for r, v in runs.items():
        assert v["demand_misses"] <= lru["demand_misses"], r
        assert 0 < v["fill_picked"] <= L * E - resident, r
        assert v["fill_steps"] * 1 <= v["fill_picked"], r
    assert runs["lru+fill4"]["demand_misses"] < lru["demand_misses"]
    assert runs["lru+fill4@20"]["demand_misses"] >= runs["lru+fill4"]["demand_misses"]
    big = sim.simulate_doc(ids, P, sim.parse_run("lru+fill8"), **{**kw, "block": 40960})  # copies longer than a step
    n = len(ids) - P
    assert big["time_ms_per_token"] * n >= big["fill_picked"] * 40960 / 1e6 * 1e3 * 0.999
    for bad in ("nextuse+fill2", "lru+fill0", "lru+fillx", "lru+fill2@x"):
        with pytest.raises(SystemExit, match="fill runs"):
            sim.parse_run(bad)


def test_lookahead_time_by_hand_and_its_bounds():
    """lookahead_time on steps worked out by hand, and lookahead_bounds' limits: depth 0 is the serial bound
    itself, more depth never hurts, and no depth beats max(compute, copies) on one link."""
    sim = _sim()
    comp, c = 1.0, 2.0
    # misses [2, 0, 1]: serial = (4 + 1) + (0 + 1) + (2 + 1) = 9
    assert sim.lookahead_time([2, 0, 1], comp, c, 0) == pytest.approx(9.0)
    # depth 1: step 0's copies from 0 (arrive 4, compute 4-5); step 1 none (5-6); step 2's copies may start at
    # step 1's start (5), the link free since 4: arrive 7, compute 7-8
    assert sim.lookahead_time([2, 0, 1], comp, c, 1) == pytest.approx(8.0)
    # depth 2: step 2's copies may start at step 0's start (4, when its copies landed): arrive 6, compute 6-7
    assert sim.lookahead_time([2, 0, 1], comp, c, 2) == pytest.approx(7.0)
    assert sim.lookahead_time([], comp, c, 1) == 0.0
    ids = _routing(40, 4, 16, 4, seed=3)
    b = sim.lookahead_bounds(ids, 8, slots=24, num_experts=16, block=1 << 20, pcie=1.0, compute=4e-3,
                             depths=[0, 1, 2, 4, 8])
    r = [b[k] for k in ("0", "1", "2", "4", "8")]
    assert r[0] == pytest.approx(1.0) and all(x <= y + 1e-12 for x, y in zip(r, r[1:]))
    steps = [sorted(set((l * 16 + ids[:8, l]).ravel().tolist())) for l in range(4)]
    steps += [(l * 16 + ids[t, l]).tolist() for t in range(8, 40) for l in range(4)]
    m = sim.belady_misses(steps, 24)[4:]
    serial = len(m) * 1e-3 + sum(m) * (1 << 20) / 1e9
    assert r[-1] <= serial / max(len(m) * 1e-3, sum(m) * (1 << 20) / 1e9) + 1e-9


def test_demand_gather_shape_reaches_the_table(monkeypatch):
    """TIERED_GATHER (the demand gather's warps:block:chunks) reaches every demand gather of the device step (its
    own body, run by the simulator); unset, the gathers take the kernel's defaults (no shape passed)."""
    sim = _sim()
    L, E, K, S, P = 3, 16, 3, 14, 6
    ids = _routing(24, L, E, K, seed=2)
    kw = dict(slots=S, num_experts=E, transitions=None, params=sim.DEFAULT_PARAMS, block=4096, pcie=1e-3,
              compute=1e-3)
    for env, want in (("8:2048:2", {"warps": 8, "block": 2048, "chunks": 2}), ("", {})):
        seen = []

        def rec(self, src, slot, *, ctas=None, layer=None, landed=None, **shape):
            if layer is not None:  # the demand calls (the fill and prefetch pass no layer)
                seen.append(shape)

        monkeypatch.setattr(sim.SimTable, "gather", rec)
        monkeypatch.setenv("TIERED_GATHER", env)
        sim.simulate_doc(ids, P, sim.parse_run("lru"), **kw)
        assert len(seen) == (len(ids) - P) * L and all(s == want for s in seen)


def test_sim_counts_evictions_and_their_reuse_by_hand():
    """SimTable's eviction counters (what --adapt folds into the take table): one layer, two slots, LRU; each call's
    evictions and whether the evicted expert was used again after its load, checked call by call."""
    sim = _sim()
    tab = sim.SimTable(1, 8, 2, 0)
    out, src = torch.empty(1, dtype=torch.int64), torch.empty(1, dtype=torch.int64)
    seen = []
    for e in (0, 1, 0, 2, 3, 2):  # 0,1 fill the slots; 0 hits; 2 evicts 1 (unused again); 3 evicts 0 (reused)
        tab.resolve(0, torch.tensor([e]), out, src)
        seen.append((tab.evicted, tab.evicted_reused, tab.evicted_hits))
    assert seen == [(0, 0, 0), (0, 0, 0), (0, 0, 0), (1, 0, 0), (2, 1, 1), (2, 1, 1)]


def test_sim_adapt_refits_the_take_table_from_the_runs_evictions():
    """--adapt reused: once 32 evictions are counted, the take table is rebuilt each step with the measured share as
    the penalty (reported, within [0, 1]); without CPU experts nothing changes."""
    sim = _sim()
    L, E, K, S, P = 2, 16, 3, 8, 4
    ids = _routing(80, L, E, K, seed=1)
    kw = dict(slots=S, num_experts=E, transitions=None, params=sim.DEFAULT_PARAMS, block=4096, pcie=1e-3,
              compute=1e-3, cpu_take=[0, 0, 1, 1], cpu_gbps=1e-3, cpu_overhead=1e-4)
    r = sim.simulate_doc(ids, P, sim.parse_run("lru+cpu"), **kw, adapt="reused")
    assert r["adapt_penalty_last"] is not None and 0.0 <= r["adapt_penalty_last"] <= 1.0
    assert sim.simulate_doc(ids, P, sim.parse_run("lru"), **kw, adapt="reused")["adapt_penalty_last"] is None
