"""Programmatic dependent launch (kernels/pdl.py): when the decode kernels ask for it, and that a graphed decode with
it gives the same tokens as without (CUDA). The kernels' PDL variants compile for sm_90 in the compile tests of
test_fused_glue.py, test_quant_kernels.py and test_devtable.py."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from tiered.kernels import pdl  # noqa: E402


def test_off_on_cpu_and_by_switch(monkeypatch):
    """No PDL for CPU tensors (the interpreter), nor on any device with TIERED_PDL=0; launch_args is then empty, so
    the kernels keep their GDC=False default and an ordinary launch."""
    assert pdl.launch_args(torch.device("cpu")) == {}
    for off in ("0", "off", "false"):
        monkeypatch.setenv(pdl.ENV, off)
        assert not pdl.pdl_enabled(torch.device("cuda", 0)) and pdl.launch_args(torch.device("cuda", 0)) == {}
        monkeypatch.setenv(pdl.PREFETCH_ENV, off)
        assert not pdl.l2_prefetch_enabled()
    monkeypatch.delenv(pdl.PREFETCH_ENV)
    assert not pdl.l2_prefetch_enabled()  # off by default (measured slower)
    monkeypatch.setenv(pdl.PREFETCH_ENV, "1")
    assert pdl.l2_prefetch_enabled()


@pytest.mark.cuda
@pytest.mark.parametrize("budget", [{}, {"expert_slots": 24, "ram_gb": 0.05, "slot_table": "device"}])
def test_cuda_pdl_decode_identical(reference_layout, monkeypatch, budget):
    """The graphed decode (every expert resident; the offloaded device step) with PDL on and off: the same greedy
    tokens. A kernel that read its predecessor's output before griddepcontrol.wait would differ."""
    from tiered.engine import load

    dev = torch.device("cuda", torch.cuda.current_device())
    if not pdl._device_ok(dev.index):
        pytest.skip("PDL needs sm_90+ and Triton's griddepcontrol intrinsics")
    toks = []
    for mode in ("1", "0"):
        monkeypatch.setenv(pdl.ENV, mode)
        assert pdl.pdl_enabled(dev) == (mode == "1")
        eng = load(reference_layout, device="cuda", budget=budget or None)
        toks.append(eng.generate("def fibonacci(n):\n", max_new_tokens=24).token_ids)
        if budget:
            assert eng.stats["decode_graphs"] == "device"
        del eng
    assert toks[0] == toks[1]
