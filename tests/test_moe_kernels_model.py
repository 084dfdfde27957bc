"""The MoE kernels inside the model (CUDA): greedy tokens and logits against the plain torch expert path."""
from __future__ import annotations

import pytest

import tiered
from tiered.model import moe, moe_gpu

PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n"


def _engine(layout, monkeypatch, kernels: bool, **kw):
    """An engine whose expert paths are the Triton kernels (kernels=True) or the torch paths."""
    if kernels:
        from tiered.store.disk import Layout

        E = Layout.open(layout).config.num_experts
        monkeypatch.setattr(moe, "experts_from_slots", lambda x, s, w, W: moe_gpu.experts_decode(x, s, w, W))
        monkeypatch.setattr(moe, "experts_grouped",
                            lambda x, ids, w, p, l: moe_gpu.experts_tokens(x, ids, w, p, l, E))
    return tiered.load(layout, device="cuda", max_context=300, **kw)


@pytest.mark.cuda
@pytest.mark.parametrize("budget", [None, {"expert_slots": 64, "ram_gb": 0.05}], ids=["resident", "cache"])
def test_kernels_greedy_tokens_fp32(reference_layout, monkeypatch, budget):
    """fp32: greedy tokens with the kernels (whole-step graphs when resident, piecewise graphs with the
    cache) equal the torch path's eager tokens, across the 128 -> 256 span boundary."""
    ref = _engine(reference_layout, monkeypatch, False, dtype="float32", budget=budget, cuda_graphs=False)
    b = ref.generate(PROMPT, max_new_tokens=150, stop_at_eos=False)
    k = _engine(reference_layout, monkeypatch, True, dtype="float32", budget=budget)
    a = k.generate(PROMPT, max_new_tokens=150, stop_at_eos=False)
    assert a.stats["decode_graphs"] == ("full" if budget is None else "piecewise")
    assert a.token_ids == b.token_ids


@pytest.mark.cuda
def test_kernels_logits_bf16(reference_layout, monkeypatch):
    """bf16: teacher-forced logits (prefill through the grouped kernel) within 2e-2 of the torch path,
    top-1 agreement >= 99%; greedy tokens printed with their agreement."""
    ref = _engine(reference_layout, monkeypatch, False, dtype="bfloat16")
    text = (PROMPT + "    parser = argparse.ArgumentParser()\n") * 8
    ids = ref.encode(text)[:256]
    lr = ref.logits(ids)
    tr = ref.generate(PROMPT, max_new_tokens=64, stop_at_eos=False).token_ids
    k = _engine(reference_layout, monkeypatch, True, dtype="bfloat16")
    lk = k.logits(ids)
    tk = k.generate(PROMPT, max_new_tokens=64, stop_at_eos=False).token_ids
    err = float((lk - lr).norm() / lr.norm())
    top1 = float((lk.argmax(-1) == lr.argmax(-1)).float().mean())
    same = sum(a == b for a, b in zip(tk, tr)) / len(tr)
    print(f"bf16 kernels vs torch: logits rel err {err:.2e}, top-1 {top1:.3f}, greedy tokens equal {same:.2f}")
    assert err < 2e-2 and top1 >= 0.99
