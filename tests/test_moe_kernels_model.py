"""The MoE kernels inside the model (CUDA): greedy tokens and logits against the plain torch expert path."""
from __future__ import annotations

import pytest
import torch

import tiered

PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n"


def test_cpu_keeps_the_torch_path(reference_layout):
    """On CPU the model never routes experts through the kernels, and asking for them is an error."""
    e = tiered.load(reference_layout, device="cpu")
    assert e.model.kernels is False
    assert e.generate("def f", max_new_tokens=2).stats["expert_kernels"] == "torch"
    with pytest.raises(ValueError, match="CUDA"):
        tiered.load(reference_layout, device="cpu", kernels=True)


@pytest.mark.cuda
@pytest.mark.parametrize("budget", [None, {"expert_slots": 64, "ram_gb": 0.05, "slot_table": "host"},
                                    {"expert_slots": 64, "ram_gb": 0.05, "slot_table": "device"}],
                         ids=["resident", "cache", "device_table"])
def test_kernels_greedy_tokens_fp32(reference_layout, budget):
    """fp32: greedy tokens with the kernels (whole-step graphs when resident, piecewise graphs with the
    cache) equal the torch path's eager tokens, across the 128 -> 256 span boundary."""
    ref = tiered.load(reference_layout, device="cuda", dtype="float32", max_context=300, budget=budget,
                      cuda_graphs=False, kernels=False)
    b = ref.generate(PROMPT, max_new_tokens=150, stop_at_eos=False)
    k = tiered.load(reference_layout, device="cuda", dtype="float32", max_context=300, budget=budget)
    a = k.generate(PROMPT, max_new_tokens=150, stop_at_eos=False)
    assert a.stats["expert_kernels"] == "triton" and b.stats["expert_kernels"] == "torch"
    assert a.stats["decode_graphs"] == ("full" if budget is None else
                                        "device" if budget["slot_table"] == "device" else "piecewise")
    assert a.token_ids == b.token_ids


@pytest.mark.cuda
def test_kernels_logits_bf16(reference_layout):
    """bf16: teacher-forced logits (prefill through the grouped kernel) within 2e-2 of the torch path,
    top-1 agreement >= 99%; greedy tokens printed with their agreement."""
    ref = tiered.load(reference_layout, device="cuda", dtype="bfloat16", max_context=300, kernels=False)
    text = (PROMPT + "    parser = argparse.ArgumentParser()\n") * 8
    ids = ref.encode(text)[:256]
    lr = ref.logits(ids)
    tr = ref.generate(PROMPT, max_new_tokens=64, stop_at_eos=False).token_ids
    k = tiered.load(reference_layout, device="cuda", dtype="bfloat16", max_context=300)
    lk = k.logits(ids)
    tk = k.generate(PROMPT, max_new_tokens=64, stop_at_eos=False).token_ids
    err = float((lk - lr).norm() / lr.norm())
    top1 = float((lk.argmax(-1) == lr.argmax(-1)).float().mean())
    same = sum(a == b for a, b in zip(tk, tr)) / len(tr)
    print(f"bf16 kernels vs torch: logits rel err {err:.2e}, top-1 {top1:.3f}, greedy tokens equal {same:.2f}")
    assert err < 2e-2 and top1 >= 0.99
    assert torch.isfinite(lk).all()
