"""tools/kernel_regs.py and tools/count_sass.py: the q4 decode kernels compiled for sm_90 without a GPU (Triton's own
ptxas and cuobjdump), their registers and occupancy read from the cubin."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))


def test_occupancy_follows_the_register_file():
    """Programs an SM holds: registers (in units of 256 a warp), warps (64) and programs (32), the least of them."""
    from kernel_regs import occupancy

    assert occupancy(128, 8, 256)["programs_per_sm"] == 2  # 128 x 32 x 8 = 32K registers a program
    assert occupancy(64, 8, 256)["programs_per_sm"] == 4
    assert occupancy(32, 2, 10_000)["programs_per_sm"] == 32  # the program limit
    assert occupancy(24, 8, 100)["warps_per_sm"] == 64  # the warp limit
    assert occupancy(255, 8, 132)["programs_per_sm"] == 1 and occupancy(255, 8, 132)["waves"] == 1.0


def test_kernel_regs_compiles_each_kernel_offline():
    """One small tile of each kernel compiles for sm_90 here; the report gives positive registers and SASS counts,
    and a register cap below the kernel's need lowers its registers (maxnreg reaches ptxas)."""
    import json

    out = subprocess.run([sys.executable, str(REPO / "tools/kernel_regs.py"), "--d", "256", "--f", "64", "--k", "2",
                          "--n", "64", "--tiles", "2:8:4:4,2:8:4:4:32"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert [r["kernel"] for r in rows] == ["gate_up", "gate_up", "down", "down", "gemv", "gemv"]
    assert all(r["reg"] > 0 and r["sass"] > 0 and r["programs_per_sm"] >= 1 for r in rows)
    assert all(rows[i + 1]["reg"] <= 32 for i in (0, 2, 4))


def test_count_sass_runs():
    """tools/count_sass.py (the word tile's instruction count) compiles _qgemv as a launch would."""
    out = subprocess.run([sys.executable, str(REPO / "tools/count_sass.py"), "--k", "256", "--n", "64", "--tiles",
                          "2:8:4:4"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "per input" in out.stdout


def test_count_sass_word_pairs_cut_instructions():
    """The lm_head's word tile (bn 32, bg 32, 4 warps) with its nibbles in pairs (QConfig.conv 2) compiles to fewer
    SASS instructions than with one shift a nibble: about 0.4 fewer per input (Triton 3.6: 4.22 -> 3.83; 3.9: 4.09
    -> 3.66), the shifts halved; the LOP3s and FFMAs stay one per input."""
    out = subprocess.run([sys.executable, str(REPO / "tools/count_sass.py"), "--k", "2048", "--n", "64", "--tiles",
                          "2:32:32:4,2:32:32:4:2"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    per = [float(line.split(" per input")[0].rsplit(",", 1)[1]) for line in out.stdout.splitlines()
           if "per input" in line]
    assert len(per) == 2 and per[1] < per[0] - 0.25, out.stdout


def test_compiling_restores_the_environment(monkeypatch):
    """kernel_regs.compiling sets TRITON_INTERPRET=0 only while kernels are decorated and compiled: the suite's
    interpreted kernels (decorated later in the same process) keep the interpreter."""
    import os

    from kernel_regs import compiling

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("TRITON_DEFAULT_FP_FUSION", raising=False)
    with compiling():
        assert os.environ["TRITON_INTERPRET"] == "0" and os.environ["TRITON_DEFAULT_FP_FUSION"] == "1"
    assert os.environ["TRITON_INTERPRET"] == "1" and "TRITON_DEFAULT_FP_FUSION" not in os.environ


def test_gluon_q4_probe_offline():
    """tools/gluon_q4_probe.py offline: its index math (emulated in torch) matches quant_matvec_ref, and the Gluon
    kernel compiles for sm_90 with every layout conversion trivial and the bf16 operand never in shared memory (a
    few stores for the group sums only), at well under the word tile's 3.7 SASS an input (1.57 at BN 128 under
    Triton 3.6 and 3.9)."""
    import json

    pytest.importorskip("triton.experimental.gluon")
    out = subprocess.run([sys.executable, str(REPO / "tools/gluon_q4_probe.py")], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert all(err < 1e-6 for err in res["cpu_check"].values()), res["cpu_check"]
    by_bn = {r["bn"]: r for r in res["sass"]}
    assert by_bn[128]["per_input"] < 2.0 and by_bn[128]["shared_stores"] <= 8, by_bn[128]


def test_gluon_q4_experts_probe_offline():
    """tools/gluon_q4_experts_probe.py offline: gate_up and down with K split across warps (batched mma operands)
    compile for sm_90 at 1, 2 and 4 groups a step with every layout conversion trivial (gate_up 1.98 SASS an input
    with its epilogue and silu, down 2.67 with h's bf16 conversion), their weights in 8- and 16-byte loads, and
    their emulated index math (each warp's K slice, the 8-group epilogue, the warps' sum; silu(gate) * up; the
    routing weights) matches the dequantized references."""
    import json

    pytest.importorskip("triton.experimental.gluon")
    out = subprocess.run([sys.executable, str(REPO / "tools/gluon_q4_experts_probe.py")], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert all(err < 1e-6 for err in res["cpu_check"].values()), res["cpu_check"]
    assert res["sass"]["gate_up"]["per_input"] < 2.5 and res["sass"]["down"]["per_input"] < 3.2, res["sass"]
    assert all(c["shared_stores"] <= 8 for c in res["sass"].values()), res["sass"]
    assert {"down 10x40x768", "down 9x24x128", "down 10x40x768 G4", "4x24x2048 G2"} <= set(res["cpu_check"])
    # the weights' words arrive 8 bytes a load at one group a step, 16 from two: no 4-byte loads in gate_up (a select
    # between the gate and up row pointers once hid their alignment from the compiler)
    assert "LDG.E" not in res["sass"]["gate_up"]["loads"] and res["sass"]["gate_up"]["loads"]["LDG.E.64"] >= 32
    assert res["sass"]["gate_up G2 D1"]["loads"]["LDG.E.128"] >= 34, res["sass"]["gate_up G2 D1"]["loads"]
    assert res["sass"]["down G2"]["loads"].get("LDG.E.64", 0) <= 1, res["sass"]["down G2"]["loads"]


def test_profile_timeline_arithmetic():
    """tools/profile_kernels.py step_advances on two synthetic steps of three kernels (us): B starts 2 us before A
    ends (PDL) and adds 5, C starts 1 us after B and adds 5; the span is 20 a token, 2 between steps; a count of
    kernels that is not whole steps is reported, not averaged."""
    sys.path.insert(0, str(REPO / "tools"))
    from profile_kernels import step_advances

    ks = [(0.0, 10.0, "A"), (8.0, 15.0, "B"), (16.0, 20.0, "C"),
          (22.0, 32.0, "A"), (30.0, 37.0, "B"), (38.0, 42.0, "C")]
    r = step_advances(ks, 2)
    assert r["kernels_per_step"] == 3 and r["span_us_per_token"] == 20.0 and r["gap_us"] == 2.0
    assert {x["kernel"]: x["advance_us_per_token"] for x in r["rows"]} == {"A": 10.0, "B": 5.0, "C": 5.0}
    assert [(s["kernel"], s["us"], s["start_after_us"]) for s in r["steps"]] == [("A", 10.0, 0.0), ("B", 7.0, -2.0),
                                                                                   ("C", 4.0, 1.0)]
    assert "error" in step_advances(ks[:5], 2) and "error" in step_advances([], 2)


def test_share_dense_points_every_layer_at_layer_zero(tmp_path):
    """tools/profile_kernels.py --share-dense (a diagnostic): "o" makes every layer's o_proj layer 0's tensor and
    leaves qkv its own; "both" shares both. The model's other weights are untouched."""
    import torch
    from conftest import make_checkpoint
    from profile_kernels import share_dense

    import tiered
    from tiered.layout.repack import repack

    ck = make_checkpoint(tmp_path / "q", "qwen3_moe", seed=1, norm_topk_prob=True)
    repack(ck, tmp_path / "l", progress=False)
    for which, o_shared, qkv_shared in (("o", True, False), ("qkv", False, True), ("both", True, True)):
        m = tiered.load(tmp_path / "l", device="cpu", dtype="float32", cuda_graphs=False).model
        before = [(lw.attn.o, lw.attn.qkv, lw.moe) for lw in m.layers]
        share_dense(m, which)
        first = m.layers[0].attn
        for (o, qkv, moe), lw in zip(before[1:], m.layers[1:]):
            assert (lw.attn.o is first.o) == o_shared and (lw.attn.o is o) != o_shared
            assert (lw.attn.qkv is first.qkv) == qkv_shared and (lw.attn.qkv is qkv) != qkv_shared
            assert lw.moe is moe
        out = m.forward(torch.arange(3, 7), 0)
        assert torch.isfinite(out).all()
