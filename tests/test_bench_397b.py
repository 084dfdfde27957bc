"""benchmarks/bench_397b.py --small: every phase of the 397B emulation runs on the CPU with the tiny preset (write two
slices, replayed and uniform routing at two K, the batch scheduler at batch 8 and 32, the balloon phase's O_DIRECT comparison, the simulator's calibration
and 60-layer projection) and the result carries the keys issue 16 asks for."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_bench_397b_small_pipeline(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "OUT": str(tmp_path / "out")}
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_397b.py"), "--small", "--phases", "all",
                        "--work", str(tmp_path / "w"), "--new-tokens", "12", "--no-progress"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert json.loads((tmp_path / "out" / "397b.json").read_text()) == res
    for k in ("projected_tok_s_k10", "projected_tok_s_k4", "calibration_error", "projected_tok_s_k10_today"):
        assert isinstance(res[k], float) and math.isfinite(res[k]) and res[k] >= 0, k
    assert res["commit"] and res["date"] and res["device"] == "cpu"
    assert set(res["slice"]) == {f"{s}/k{k}/{kind}" for s in "AB" for k in (4, 2)
                                 for kind in ("replay", "uniform", "replay-pf4")} \
        | {"A/k4/replay-staged", "B/k4/replay-staged"}
    pf = res["slice"]["A/k4/replay-pf4"]  # history prefetch ran in the engine: its stats say so
    assert pf["budget"]["prefetch_depth"] == 1 and pf["budget"]["prefetch_budget"] == 4 and pf["decode_tok_s"] > 0
    a = res["slice"]["A/k4/replay"]
    assert a["layers"] == 8 and a["experts_per_token"] == 4 and a["decode_tok_s"] > 0 and a["head_s"] > 0
    assert res["slice"]["B/k2/uniform"]["layers"] == 4 and res["slice"]["B/k2/uniform"]["experts_per_token"] == 2
    assert a["routing"]["num_experts"] == 128 and a["routing"]["top_k"] == 4
    assert res["slice"]["A/k4/uniform"]["hit_rate"] < a["hit_rate"]  # replayed routing repeats, uniform does not
    bt = res["batch"]  # the batch scheduler on slice B: aggregate tok/s at B = 8 and 32, per-row state counted
    assert set(bt["replay"]) == set(bt["uniform"]) == {"8", "32"} and bt["layers"] == 4
    assert all(r_["tok_s"] > 0 and r_["tokens"] == int(B) * (bt["new_tokens"] - 1) for kind in ("replay", "uniform")
               for B, r_ in bt[kind].items())
    assert bt["slot_bytes_per_sequence"] > 0 and bt["slot_bytes_per_sequence_60"] == bt["slot_bytes_per_sequence"] * 15
    bal = res["balloon"]
    assert bal["run"]["io"] == "direct" and bal["odirect_raw"]["gbps"] > 0 and bal["disk_vs_odirect"] is not None
    assert res["project"]["balloon_check"]["predicted_tok_s"] > 0
    pr = res["project"]
    assert set(pr["runs"]) == {"k4/replay", "k4/uniform", "k2/replay", "k2/uniform", "k4/replay-staged",
                               "k4/replay-pf4", "k2/replay-pf4"}
    assert set(pr["direct"]["runs"]) == {"k4/replay", "k2/replay", "k4/replay-pf4", "k2/replay-pf4"}
    assert isinstance(res["projected_tok_s_k10_direct_pf4"], float) and res["projected_tok_s_k10_direct"] > 0
    for r_ in pr["runs"].values():  # the per-term breakdown, from the runs' own host stats
        assert r_["host_terms_A"]["source"] == "stats.host" and r_["host_terms_A"]["s_per_vram_miss"] > 0
        terms = r_["terms_A_ms_per_token"]
        # the fitted per-layer cost reproduces the measured time (closed form; bisection for the prefetch runs)
        assert terms["total"] == pytest.approx(r_["measured_A_ms_per_token"], rel=1e-5) or r_["c_s_per_layer"] == 0
        assert {"compute", "pcie", "host_miss", "host_ram_miss", "disk_read"} <= set(r_["sim_60"]["terms_ms_per_token"])
    assert res["slice"]["A/k4/replay"]["host"]["ram_misses"] > 0
    for key, r_ in pr["runs"].items():  # the target's host work per RAM-tier miss is the run's own measured figure
        h = res["slice"][f"A/{key}"]["host"]
        assert r_["host_terms_A"]["target_s_per_ram_miss"] == h["work_s_per_ram_miss"] >= 0
        assert h["work_s_per_ram_miss"] <= h["s_per_ram_miss"]
        terms = r_["sim_60"]["terms_ms_per_token"]  # per RAM-tier miss: a block from the NVMe, then the host work
        read_s = res["model_60"]["block_size"] / (pr["target"]["nvme_gbps"] * 1e9)
        assert terms["host_ram_miss"] == pytest.approx(terms["disk_read"] / read_s * h["work_s_per_ram_miss"],
                                                       rel=1e-6, abs=1e-12)
    assert isinstance(res["projected_tok_s_k10_staged"], float)
    assert all(r_["target_slots"] >= 2 and r_["projected_tok_s"] > 0 for r_ in pr["runs"].values())
    assert res["model_60"]["block_size"] == 8192


def _bench():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_397b
    return bench_397b


def test_kind_flags_and_cpu_rate():
    b = _bench()
    assert b.kind_flags("replay") == {} and b.kind_flags("replay-staged") == {}
    assert b.kind_flags("replay-direct") == {"io": "direct"}
    assert b.kind_flags("replay-direct-cpu8") == {"io": "direct", "cpu_experts": "auto", "cpu_threads": 8}
    assert b.pf_budget("replay-direct-cpu8") == 0 and b.pf_budget("replay-pf4") == 4
    assert b.cpu_rate({"cpu_experts": {"mode": "auto", "count": 10, "gbps": 17.5}}) == 17.5
    assert b.cpu_rate({"cpu_experts": {"mode": "off", "count": 0, "gbps": 0.0}}) == 0.0


def test_host_terms_per_copied_miss():
    """s_per_vram_miss is the miss path's host time per copied miss: results of a tiered that divided it by every
    device miss (CPU experts included, which spend none of it) are rescaled; new ones (cpu_misses) are kept."""
    b = _bench()
    host = {"vram_misses": 1000, "ram_misses": 10, "s_per_vram_miss": 6e-5, "s_per_ram_miss": 1e-3,
            "work_s_per_ram_miss": 1e-4}
    old = b.host_terms({"host": host, "cpu_experts": {"mode": "auto", "count": 400}}, 1 << 20)
    assert old["s_per_vram_miss"] == pytest.approx(6e-5 * 1000 / 600)
    new = b.host_terms({"host": {**host, "cpu_misses": 400}, "cpu_experts": {"mode": "auto", "count": 400}}, 1 << 20)
    assert new["s_per_vram_miss"] == 6e-5
    off = b.host_terms({"host": host, "cpu_experts": {"mode": "off", "count": 0}}, 1 << 20)
    assert off["s_per_vram_miss"] == 6e-5
