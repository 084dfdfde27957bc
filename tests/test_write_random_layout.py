"""tools/write_random_layout.py: a random layout written directly is what `tiered repack` writes for the same shape
(block specs, dense names/shapes/dtypes, quant descriptions), verifies, and runs."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

from write_random_layout import PRESETS, hf_config, plan, write_layout  # noqa: E402

from tiered.engine import load  # noqa: E402
from tiered.layout.format import read_safetensors_header  # noqa: E402
from tiered.layout.repack import repack, verify  # noqa: E402
from tiered.store.disk import Layout  # noqa: E402


def test_397b_block_sizes_are_the_real_formats():
    p = plan("qwen35-397b", 60, "q4", "q4")
    cfg = p["cfg"]
    assert (cfg.num_layers, cfg.num_experts, cfg.top_k, cfg.hidden_size, cfg.expert_ffn) == (60, 512, 10, 4096, 1024)
    assert (cfg.num_linear_layers, cfg.num_attention_layers) == (45, 15)
    assert cfg.shared_expert_ffn == 1024 and cfg.attn_output_gate and cfg.partial_rotary_factor == 0.25
    assert p["block_size"] == 7_077_888  # 6.75 MiB: 3 x (2 MiB of nibbles + 2 x 128 KiB of bf16 scale/min)
    assert plan("qwen35-397b", 4, "bf16", "bf16")["block_size"] == 3 * 4096 * 1024 * 2
    assert plan("qwen35-397b", 4, "q8", "bf16")["block_size"] == 3 * (4096 * 1024 + 4096 * 1024 // 128 * 2)
    n_params = 60 * 512 * 3 * 4096 * 1024 + plan("qwen35-397b", 60, "bf16", "bf16")["dense_bytes"] // 2
    assert 394e9 < n_params < 400e9  # 397B


@pytest.fixture(scope="module")
def repacked(tmp_path_factory):
    """transformers' model of the tiny preset (4 layers), saved and repacked with q4 experts and q4 dense."""
    import transformers as tf

    root = tmp_path_factory.mktemp("wrl")
    hf = hf_config("qwen35-397b-tiny", 4)
    cfg = tf.Qwen3_5MoeTextConfig(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type")})
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(root / "ckpt")
    repack(root / "ckpt", root / "layout", experts="q4", dense="q4", progress=False)
    return root / "layout"


def test_matches_what_repack_writes(repacked, tmp_path):
    ours = tmp_path / "ours"
    write_layout(ours, preset="qwen35-397b-tiny", layers=4, experts="q4", dense="q4", progress=False)
    a, b = (json.loads((p / "manifest.json").read_text()) for p in (ours, repacked))
    assert a["experts"]["tensors"] == b["experts"]["tensors"]
    assert a["experts"]["block_size"] == b["experts"]["block_size"]
    assert a["dense"]["quant"] == b["dense"]["quant"]
    ca, cb = dict(a["config"]), dict(b["config"])
    assert ca == cb
    ha, _ = read_safetensors_header(ours / "dense.safetensors")
    hb, _ = read_safetensors_header(repacked / "dense.safetensors")
    assert {n: (e.dtype, e.shape) for n, e in ha.items()} == {n: (e.dtype, e.shape) for n, e in hb.items()}


@pytest.mark.parametrize("fmt", ["bf16", "q8", "q4", "fp8", "mxfp4"])
def test_each_format_verifies_and_runs(tmp_path, fmt):
    out = tmp_path / fmt
    s = write_layout(out, preset="qwen35-397b-tiny", layers=4, experts=fmt, dense="q4" if fmt == "q4" else "bf16",
                     progress=False, seed=3)
    on_disk = (out / "experts.bin").stat().st_size + (out / "dense.safetensors").stat().st_size
    assert 0 <= on_disk - s["bytes"] < 1 << 16  # the safetensors header
    lay = Layout.open(out)
    assert verify(out, progress=False) == []
    assert lay.manifest.expert_format == (fmt if fmt != "bf16" else "bfloat16")
    w = lay.expert_tensors(3, 7)["down"]
    dense = w.float() if isinstance(w, torch.Tensor) else w.dequantize(torch.float32)
    assert torch.isfinite(dense).all() and 0.01 < float(dense.std()) < 0.04  # weights of a sensible scale
    eng = load(out, device="cpu", budget={"expert_slots": 8})
    g = eng.generate("def f(x):", max_new_tokens=4, stop_at_eos=False)
    assert len(g.token_ids) == 4 and g.stats["family"] == "qwen3_5_moe"
    assert torch.isfinite(eng.logits(torch.arange(2, 12))).all()


def test_refuses_what_does_not_fit_and_non_layouts(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not a tiered layout"):
        write_layout(tmp_path / "x", preset="qwen35-397b-tiny", layers=2, force=True, progress=False)
    with pytest.raises(SystemExit, match="free"):
        write_layout(tmp_path / "big", preset="qwen35-397b", layers=60, progress=False)
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine" and not (tmp_path / "big").exists()
    assert PRESETS["qwen35-397b"]["num_hidden_layers"] == 60


def test_deltanet_projections_are_quantized_and_computed_through_qlinear(repacked):
    """--dense q4 stores the Gated DeltaNet's qkv, z and out quantized (the 397B's dense would not fit 8 GB in bf16);
    the model computes them through qlinear, which equals the model built on their dequantized weights."""
    from tiered.layout.quant import QuantWeight
    from tiered.model.transformer import Transformer
    from tiered.store.resident import ResidentExperts

    lay = Layout.open(repacked)
    dense = lay.dense()
    cfg = lay.config
    l = cfg.layer_types.index("linear")
    for n in ("lin_qkv", "lin_z", "lin_out"):
        assert isinstance(dense[f"layers.{l}.{n}"], QuantWeight), n
    for n in ("lin_a", "lin_b", "lin_conv"):
        assert not isinstance(dense[f"layers.{l}.{n}"], QuantWeight), n
    plain = {k: v.dequantize(torch.float32) if isinstance(v, QuantWeight) else v for k, v in dense.items()}
    ids = torch.arange(3, 12)
    outs = []
    for d in (dense, plain):
        m = Transformer(cfg, d, ResidentExperts.from_layout(lay), device="cpu", dtype=torch.float32, max_context=64)
        outs.append(torch.cat([m.forward(ids[:6], 0, all_logits=True)] + [m.forward(ids[i:i + 1], i) for i in range(6, 9)]))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["q4", "bf16"])
def test_drawn_on_cuda_verifies_and_decodes_with_the_cache(tmp_path, fmt):
    """The GPU path of the tool (weights drawn on the device, copied back, hashed) and a cached, replayed-routing
    decode at a cut K on it, as bench_397b runs them."""
    from tiered.predict.replay import ReplayRouting, uniform_routing

    out = tmp_path / fmt
    write_layout(out, preset="qwen35-397b-tiny", layers=4, experts=fmt, dense="q4", device="cuda", progress=False)
    assert verify(out, progress=False) == []
    tr = uniform_routing(64, num_layers=4, num_experts=128, top_k=2, seed=0)
    eng = load(out, device="cuda", experts_per_token=2, budget={"expert_slots": 16, "ram_gb": 0.01},
               routing=ReplayRouting(tr.topk_ids, tr.topk_weights, device="cuda"), max_context=64)
    g = eng.generate(list(range(10, 20)), max_new_tokens=8, stop_at_eos=False)
    assert len(g.token_ids) == 8 and g.stats["experts_per_token"] == 2 and g.stats["decode"]["misses"] > 0
