"""The simulator's host and RAM-tier terms: the pipelined step against an event-by-event reference over a grid, a
scripted trace whose modelled time is worked out by hand, and bench_397b's calibration recovering a known per-layer
cost from a run the simulator itself produced (the answer is known)."""
from __future__ import annotations

import itertools
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tiered.predict.simulate import TierModel, simulate, step_terms
from tiered.predict.trace import Trace

REPO = Path(__file__).resolve().parent.parent


def scripted(steps: list[list[list[int]]], E: int) -> Trace:
    ids = np.array(steps, dtype=np.int16)  # [N, L, K]
    N, L, K = ids.shape
    return Trace(np.zeros(N, np.int32), np.array([0, N]), ids, np.full(ids.shape, 1 / K, np.float32),
                 meta={"num_experts": E, "num_layers": L, "top_k": K})


def pipeline_reference(demand: int, disk: int, hv: float, hr: float, p: float, r: float) -> float:
    """Event by event: reads of the RAM-tier misses (the last `disk` misses) queue on the disk from t = 0; the host
    takes the misses in order, waits for a block's read, works, and queues its copy; the link copies in order."""
    read_done = {}
    t_disk = 0.0
    for i in range(demand - disk, demand):
        t_disk += r
        read_done[i] = t_disk
    t_host, copies_end = 0.0, 0.0
    for i in range(demand):
        if i in read_done:
            t_host = max(t_host, read_done[i]) + hr
        t_host += hv
        copies_end = max(copies_end, t_host) + p
    return copies_end


@pytest.mark.parametrize("demand,disk", [(0, 0), (1, 0), (1, 1), (3, 1), (7, 3), (10, 10), (10, 0)])
def test_step_terms_pipeline_matches_reference(demand, disk):
    for hv, hr, gb_link, gb_disk in itertools.product((0.0, 1e-4, 3e-4), (0.0, 2e-3), (25.0, 3.0), (7.0, 1e3)):
        tm = TierModel(slots=16, block_bytes=7_077_888, h2d_gbps=gb_link, disk_gbps=gb_disk, host_s_per_miss=hv,
                       host_s_per_ram_miss=hr, compute_s_per_layer=5e-4, overlap=True)
        p, r = 7_077_888 / (gb_link * 1e9), 7_077_888 / (gb_disk * 1e9)
        got = step_terms(tm, demand, disk)
        assert got["stall"] == pytest.approx(pipeline_reference(demand, disk, hv, hr, p, r), rel=1e-12, abs=1e-15)
        assert got["total"] == pytest.approx(5e-4 + got["stall"])
        serial = step_terms(TierModel(**{**tm.__dict__, "overlap": False}), demand, disk)
        assert serial["stall"] == pytest.approx(demand * (p + hv) + disk * (r + hr))
        assert got["stall"] <= serial["stall"] + 1e-15  # overlapping never costs more than the sum
        assert got["stall"] >= max(demand * p, demand * hv + disk * hr) - 1e-15  # nor less than a resource's busy time


def test_prefetch_overlaps_compute_in_both_models():
    for overlap in (False, True):
        tm = TierModel(slots=16, block_bytes=10**9, h2d_gbps=1.0, compute_s_per_layer=0.5, overlap=overlap)
        assert step_terms(tm, 0, 0, prefetch=1)["total"] == pytest.approx(1.0)
        assert step_terms(tm, 0, 0, prefetch=0)["total"] == pytest.approx(0.5)


def test_scripted_trace_hand_computed():
    """One layer, 4 experts, K = 2, 2 device slots (every step misses both), 4 RAM slots (steps 1-2 read from disk,
    steps 3-4 hit the RAM tier). 1 GB blocks, link 1 GB/s (1 s a copy), disk 2 GB/s (0.5 s a read), 0.1 s host per
    miss, 0.2 s more per RAM-tier miss, 0.05 s compute.
      pipelined, from disk: host 0.5+0.2+0.1 = 0.8, copy to 1.8; host max(0.8, 1.0)+0.3 = 1.3, copy to 2.8 -> 2.85
      pipelined, from RAM: host 0.1, copy to 1.1; host 0.2, copy to 2.1 -> 2.15;  total 2 x 2.85 + 2 x 2.15 = 10.0
      serial: from disk 2 x (1 + 0.5 + 0.1 + 0.2) + 0.05 = 3.65; from RAM 2 x 1.1 + 0.05 = 2.25; total 11.8"""
    tr = scripted([[[0, 1]], [[2, 3]], [[0, 1]], [[2, 3]]], E=4)
    kw = dict(slots=2, partition="global", ram_slots=4, block_bytes=10**9, h2d_gbps=1.0, disk_gbps=2.0,
              host_s_per_miss=0.1, host_s_per_ram_miss=0.2, compute_s_per_layer=0.05)
    res = simulate(tr, TierModel(**kw, overlap=True), with_belady=False)
    assert (res.hits, res.disk_reads, res.ram_hits) == (0, 4, 4)
    assert res.seconds == pytest.approx(10.0)
    t = res.extra["terms_s"]
    assert t == pytest.approx({"compute": 0.2, "pcie": 8.0, "host_miss": 0.8, "host_ram_miss": 0.8, "disk_read": 2.0,
                                   "cpu_experts": 0.0})
    assert simulate(tr, TierModel(**kw), with_belady=False).seconds == pytest.approx(11.8)
    # no host terms, serial: the model as it was (demand bytes / h2d + disk bytes / disk + compute)
    old = TierModel(**{**kw, "host_s_per_miss": 0.0, "host_s_per_ram_miss": 0.0})
    assert simulate(tr, old, with_belady=False).seconds == pytest.approx(8 * 1.0 + 4 * 0.5 + 4 * 0.05)


def test_bad_host_terms_are_refused():
    with pytest.raises(ValueError):
        TierModel(slots=4, host_s_per_miss=-1.0)
    with pytest.raises(ValueError):
        TierModel(slots=4, disk_gbps=0.0)


def _bench():
    sys.path.insert(0, str(REPO / "benchmarks"))
    sys.path.insert(0, str(REPO / "tools"))
    import bench_397b

    return bench_397b


def _run_from_sim(b, tr: Trace, slots: int, ram_slots: int, block: int, hv: float, hr: float, c: float, a) -> dict:
    """A "measured" run made by the simulator with known per-miss host costs and per-layer cost: its stats keys."""
    tm = TierModel(slots=slots, partition="global", ram_slots=ram_slots, block_bytes=block, h2d_gbps=25.0,
                   disk_gbps=1e9, host_s_per_miss=hv, host_s_per_ram_miss=hr, compute_s_per_layer=c, overlap=True)
    s, n, d = b.sim_decode(tr, tm, a.prompt_tokens, a.warmup + 8, 0.0)
    vm, rm = d["decode_misses"], d["decode_ram_misses"]
    return {"decode_tok_s": n / s, "layers": tr.num_layers, "expert_slots": slots, "ram_slots": ram_slots,
            "h2d_gbps_target": 25.0, "head_s": 0.0, "decode_tokens": n, "experts_per_token": tr.top_k,
            "host": {"vram_misses": vm, "ram_misses": rm, "miss_s": vm * hv + rm * hr, "ram_s": rm * hr,
                     "s_per_vram_miss": hv, "s_per_ram_miss": hr, "register_s": 0.0}}


def test_bench_calibration_recovers_a_known_per_layer_cost():
    """Slice A and B "measured" by the simulator with host terms and a per-layer cost of 0.4 ms: the calibration
    from A's stats finds 0.4 ms and predicts B exactly (calibration error 0)."""
    b = _bench()
    a = SimpleNamespace(prompt_tokens=4, warmup=2)
    rng = np.random.default_rng(0)
    E, K, N = 64, 4, 24

    def trace(L):
        ids = np.stack([np.stack([rng.choice(E // 2 if t % 3 else E, K, replace=False) for _ in range(L)])
                        for t in range(N)])
        return scripted(ids.tolist(), E)

    tra, trb = trace(8), trace(4)
    block = 7_077_888
    ra = _run_from_sim(b, tra, 24, 160, block, 2e-4, 1.5e-3, 4e-4, a)
    rb = _run_from_sim(b, trb, 12, 80, block, 2e-4, 1.5e-3, 4e-4, a)
    ht = b.host_terms(ra, block)
    assert ht["source"] == "stats.host" and ht["s_per_vram_miss"] == 2e-4 and ht["s_per_ram_miss"] == 1.5e-3
    c = b.fit_c(ra, tra, block, a)
    assert c == pytest.approx(4e-4, rel=1e-9)
    sb, nb, d = b.sim_decode(trb, b.calibrated_model(rb, block, 4, c), a.prompt_tokens, a.warmup + 8, 0.0)
    assert nb / sb == pytest.approx(rb["decode_tok_s"], rel=1e-9)
    assert d["terms_ms_per_token"]["host_ram_miss"] > 0 and d["terms_ms_per_token"]["compute"] == pytest.approx(
        4 * 0.4)


def test_bench_calibration_with_prefetch_recovers_the_per_layer_cost():
    """With history prefetch a layer's compute hides its prefetch copies, so the modelled time is not linear in the
    per-layer cost: fit_c bisects. A run "measured" by the simulator with prefetch (2 candidates, a history predictor
    of the same routing) and 0.4 ms per layer is fitted back to 0.4 ms."""
    from tiered.predict.predictors import History, transition_params

    b = _bench()
    a = SimpleNamespace(prompt_tokens=4, warmup=2)
    rng = np.random.default_rng(1)
    E, K, N, L = 64, 4, 24, 8
    ids = np.stack([np.stack([rng.choice(E // 2 if t % 3 else E, K, replace=False) for _ in range(L)])
                    for t in range(N)])
    tr = scripted(ids.tolist(), E)
    pred = History(L, E, transition_params(tr))
    block = 7_077_888
    tm = TierModel(slots=24, partition="global", ram_slots=160, block_bytes=block, h2d_gbps=25.0, disk_gbps=1e9,
                   host_s_per_miss=2e-4, host_s_per_ram_miss=1.5e-3, compute_s_per_layer=4e-4, overlap=True,
                   prefetch_depth=1, prefetch_budget=2)
    s, n, d = b.sim_decode(tr, tm, a.prompt_tokens, a.warmup + 8, 0.0, pred)
    assert d["prefetch_issued"] > 0
    vm, rm = d["decode_misses"], d["decode_ram_misses"]
    ra = {"decode_tok_s": n / s, "layers": L, "expert_slots": 24, "ram_slots": 160, "h2d_gbps_target": 25.0,
          "head_s": 0.0, "decode_tokens": n, "experts_per_token": K,
          "budget": {"prefetch_depth": 1, "prefetch_budget": 2},
          "host": {"vram_misses": vm, "ram_misses": rm, "miss_s": vm * 2e-4 + rm * 1.5e-3, "ram_s": rm * 1.5e-3,
                   "s_per_vram_miss": 2e-4, "s_per_ram_miss": 1.5e-3, "register_s": 0.0}}
    assert b.calibrated_model(ra, block, L, 0.0).prefetch_budget == 2
    assert b.fit_c(ra, tr, block, a, pred) == pytest.approx(4e-4, rel=1e-4)
    assert b.pf_budget("replay-pf4") == 4 and b.pf_budget("replay") == 0 and b.pf_budget("replay-staged") == 0


def test_bench_host_terms_fallback_uses_only_stats_keys():
    """A result without `host` stats: a RAM-tier miss costs a block at the disk tier's measured rate, and the rest
    of host_s_per_layer is spread over the decode's device misses."""
    b = _bench()
    r = {"layers": 8, "decode_tokens": 10, "experts_per_token": 10, "hit_rate": 0.0, "host_s_per_layer": 4e-3,
         "disk": {"gbps": 3.5}, "vram": {"misses": 1000}, "ram": {"misses": 100}}
    ht = b.host_terms(r, 7_000_000)
    assert ht["s_per_ram_miss"] == pytest.approx(2e-3)
    vm, rm = 800, 80
    assert ht["s_per_vram_miss"] == pytest.approx((4e-3 * 80 - rm * 2e-3) / vm)


def test_balloon_locks_or_touches_a_small_region(tmp_path):
    """The balloon phase's helper process (Linux): it holds the asked bytes, locked with mlock when permitted,
    else touched page by page, and says which; killing it frees them."""
    import signal

    if not Path("/proc/self/status").is_file():
        pytest.skip("the balloon is Linux-only")
    b = _bench()
    proc, how = b.start_balloon(32 << 20, tmp_path)
    try:
        assert proc is not None and how in ("locked", "touched"), how
        status = Path(f"/proc/{proc.pid}/status").read_text()
        rss_kib = int(next(ln for ln in status.splitlines() if ln.startswith("VmRSS:")).split()[1])
        assert rss_kib >= 32 << 10  # the bytes are resident
        if how == "locked":
            lck = int(next(ln for ln in status.splitlines() if ln.startswith("VmLck:")).split()[1])
            assert lck >= 32 << 10
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert b.start_balloon(0, tmp_path) == (None, "none")


def test_bench_host_terms_target_uses_the_measured_host_work_per_ram_miss():
    """The target's host seconds per RAM-tier miss come from the run's stats: the RAM tier's work not blocked on
    reads (work_s_per_ram_miss) when present, else the registration time per RAM-tier miss (older results)."""
    b = _bench()
    h = {"vram_misses": 100, "ram_misses": 40, "miss_s": 0.2, "ram_s": 0.12, "s_per_vram_miss": 8e-4,
         "s_per_ram_miss": 3e-3, "register_s": 0.02, "verify_s": 0.01, "verified_blocks": 20}
    ht = b.host_terms({"host": {**h, "work_s_per_ram_miss": 1e-4}}, 7_000_000)
    assert ht["target_s_per_ram_miss"] == 1e-4 and ht["register_s_per_ram_miss"] == pytest.approx(0.02 / 40)
    assert ht["verify_s_per_block"] == pytest.approx(0.01 / 20)
    ht = b.host_terms({"host": h}, 7_000_000)
    assert ht["target_s_per_ram_miss"] == pytest.approx(0.02 / 40)


def test_cpu_experts_step_terms():
    """The CPU works beside the link: the stall is the later of the two (pipelined), their sum (serial)."""
    B = 10**9
    tm = TierModel(slots=16, block_bytes=B, h2d_gbps=1.0, compute_s_per_layer=0.05, overlap=True, cpu_gbps=2.0,
                   cpu_overhead_s=0.1)
    got = step_terms(tm, demand=2, disk=0, cpu=3)  # link 2 x 1 s; CPU 0.1 + 3 x 0.5 s
    assert got["cpu_experts"] == pytest.approx(1.6)
    assert got["stall"] == pytest.approx(2.0) and got["total"] == pytest.approx(2.05)
    got = step_terms(tm, demand=1, disk=0, cpu=4)  # link 1 s; CPU 2.1 s
    assert got["stall"] == pytest.approx(2.1)
    serial = step_terms(TierModel(**{**tm.__dict__, "overlap": False}), demand=1, disk=0, cpu=4)
    assert serial["stall"] == pytest.approx(1.0 + 2.1)
    assert step_terms(tm, demand=2, disk=0)["cpu_experts"] == 0.0


def test_cpu_experts_scripted_trace_hand_computed():
    """One layer, 6 experts, K = 3, 3 device slots, 4 RAM slots, LRU. 1 GB blocks: link 1 s a copy, CPU 0.5 s an
    expert (+0.25 s a step with CPU work), disk 2 s a read.
      step 1 [0 1 2]: none in RAM (no CPU candidates): three disk reads, loaded to the device; RAM {0 1 2}.
      step 2 [3 0 4]: 0 hits; 3 and 4 are read from disk (RAM: 3 fills the 4th slot, 4 evicts 0, the least recently
        read: a device hit does not touch the RAM tier) and loaded, evicting 1 and 2; RAM {1 2 3 4}, device {0 3 4}.
      step 3 [1 2 5]: all miss; 1 and 2 are in RAM (candidates), 5 is on disk (the link's queue starts at its 1 s
        copy): CPU 0.25 + 0.5 = 0.75 < link 2 -> CPU; CPU 1.25 < 2 -> CPU; 5 is read and loaded.
    So: uses 9, hits 1, CPU 2, 6 device loads, all 6 from disk."""
    tr = scripted([[[0, 1, 2]], [[3, 0, 4]], [[1, 2, 5]]], E=6)
    tm = TierModel(slots=3, partition="global", ram_slots=4, block_bytes=10**9, h2d_gbps=1.0, disk_gbps=0.5,
                   compute_s_per_layer=0.05, cpu_gbps=2.0, cpu_overhead_s=0.25, overlap=True)
    r = simulate(tr, tm, with_belady=False)
    d = r.to_dict()
    assert (r.uses, r.hits, r.cpu_experts, r.disk_reads) == (9, 1, 2, 6)
    assert d["bytes_h2d_per_token"] == pytest.approx(6 * 10**9 / 3)
    # step 3: the link's pipeline (one disk read of 2 s, then its 1 s copy) against the CPU's 0.25 + 2 x 0.5 s
    assert r.extra["terms_s"]["cpu_experts"] == pytest.approx(1.25)
    off = simulate(tr, TierModel(**{**tm.__dict__, "cpu_gbps": 0.0}), with_belady=False)
    assert off.cpu_experts == 0 and off.hits + off.misses == 9
    slow = simulate(tr, TierModel(**{**tm.__dict__, "cpu_gbps": 1e-3}), with_belady=False)  # never worth it
    assert slow.cpu_experts == 0
    assert (slow.hits, slow.disk_reads, slow.seconds) == (off.hits, off.disk_reads, pytest.approx(off.seconds))


def test_cpu_experts_without_ram_tier_every_miss_is_a_candidate():
    tr = scripted([[[0, 1]], [[2, 3]], [[0, 1]]], E=4)
    tm = TierModel(slots=2, partition="global", block_bytes=10**9, h2d_gbps=1.0, compute_s_per_layer=0.0,
                   cpu_gbps=1e3, overlap=True)  # a CPU far faster than the link takes every miss
    r = simulate(tr, tm, with_belady=False)
    assert r.cpu_experts == 6 and r.hits == 0 and r.to_dict()["bytes_h2d_per_token"] == 0.0
