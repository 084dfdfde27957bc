"""--experts-per-token K: the model routes K experts per token instead of its top-k, exactly as transformers does
with num_experts_per_tok = K (the oracle), through load(), the expert cache and the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import make_checkpoint
from tiered.engine import EngineError, load
from tiered.layout.repack import repack

REPO = Path(__file__).resolve().parent.parent


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """(checkpoint, layout) of a renormalising family (qwen3_moe) and one that does not renormalise (olmoe)."""
    root = tmp_path_factory.mktemp("ept")
    out = {}
    for fam, kw in (("qwen3_moe", {"num_experts_per_tok": 4}), ("olmoe", {"num_experts_per_tok": 4})):
        ck = make_checkpoint(root / f"{fam}-ckpt", fam, **kw)
        repack(ck, root / f"{fam}-layout", progress=False)
        out[fam] = (ck, root / f"{fam}-layout")
    return out


@pytest.mark.parametrize("fam", ["qwen3_moe", "olmoe"])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_logits_match_transformers_with_k(pairs, fam, k):
    import transformers as tf

    ck, lay = pairs[fam]
    hf = tf.AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32, num_experts_per_tok=k).eval()
    ids = torch.randint(2, 96, (7,), generator=torch.Generator().manual_seed(k))
    with torch.no_grad():
        want = hf(ids[None]).logits[0]
    eng = load(lay, device="cpu", experts_per_token=k)
    assert eng.config.top_k == k and eng.config.extra["native_top_k"] == 4
    assert rel(eng.logits(ids), want) <= 1e-4
    one = load(lay, device="cpu", experts_per_token=k)
    one.model.forward(ids[:6], 0)
    assert rel(one.model.forward(ids[6:], 6)[-1], want[-1]) <= 1e-4  # one-token decode step


def test_default_is_native_and_k_changes_logits(pairs):
    _, lay = pairs["qwen3_moe"]
    ids = torch.arange(2, 10)
    native = load(lay, device="cpu").logits(ids)
    assert torch.equal(load(lay, device="cpu", experts_per_token=4).logits(ids), native)
    assert rel(load(lay, device="cpu", experts_per_token=2).logits(ids), native) > 1e-3


def test_expert_cache_at_k_slots(pairs):
    """The cache's minimum (one layer's top-k) follows K: K slots are enough, and results match resident."""
    _, lay = pairs["olmoe"]
    ids = torch.arange(2, 12)
    want = load(lay, device="cpu", experts_per_token=2).logits(ids)
    eng = load(lay, device="cpu", experts_per_token=2, budget={"expert_slots": 2})
    assert eng.model.provider.max_experts_per_call == 2
    torch.testing.assert_close(eng.logits(ids), want, rtol=0, atol=0)
    g = eng.generate(ids.tolist(), max_new_tokens=3, stop_at_eos=False)
    assert g.stats["experts_per_token"] == 2 and g.stats["native_top_k"] == 4


@pytest.mark.parametrize("k", [0, 7, -1])
def test_bad_k_is_an_engine_error(pairs, k):
    _, lay = pairs["olmoe"]
    with pytest.raises(EngineError, match="experts-per-token"):
        load(lay, device="cpu", experts_per_token=k)


def cli(*args, check=True):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "tiered", *args], capture_output=True, text=True, env=env, cwd=REPO)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def test_cli_run(reference_layout, tmp_path):
    lay = reference_layout
    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 4)
    r = cli("run", "-m", str(lay), "--device", "cpu", "--experts-per-token", "2", "--max-new-tokens", "3", "--json",
            "--prompt-file", str(text))
    assert json.loads(r.stderr.strip().splitlines()[-1])["experts_per_token"] == 2
    bad = cli("run", "-m", str(lay), "--device", "cpu", "--experts-per-token", "65", "hello", check=False)
    assert bad.returncode == 2 and "experts-per-token" in bad.stderr
    for cmd in ("eval", "trace", "tune", "batch", "serve"):
        assert "--experts-per-token" in cli(cmd, "--help").stdout, cmd


def test_cli_eval_measures_the_cut_against_the_native_model(reference_layout):
    text = Path(__file__).resolve().parent.parent / "tiered" / "engine.py"
    out = {}
    for k in (8, 4):
        r = cli("eval", "-m", str(reference_layout), "--reference", str(reference_layout), "--device", "cpu",
                "--text-file", str(text), "--max-tokens", "200", "--experts-per-token", str(k), "--json")
        out[k] = json.loads(r.stdout.strip().splitlines()[-1])
    assert out[8]["experts_per_token"] == 8 and out[4]["experts_per_token"] == 4
    f8, f4 = out[8], out[4]
    assert f8["kl_mean"] < 1e-6  # the same model at its native K
    assert f4["kl_mean"] > 1e-3 and f4["perplexity"] > f8["perplexity"]
