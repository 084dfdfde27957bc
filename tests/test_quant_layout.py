"""Quantized layouts: repack --experts/--dense, the manifest's descriptions, zero-copy views, the model's
dequantize-on-use path against a dense reference, the expert cache, verify and inspect."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import source_tensors
from tiered.layout.format import ALIGN, MANIFEST, LayoutError
from tiered.layout.quant import QUANT_FORMATS, QuantWeight, quantize
from tiered.layout.repack import ensure_layout, repack, verify
from tiered.store.disk import ExpertWeights, Layout, expert_views


@pytest.fixture(scope="module")
def qwen_src(tmp_path_factory) -> Path:
    """A tiny bf16 Qwen3-MoE checkpoint with an untied lm_head; expert FFN 24 (below q4's 64: one group per
    row on down) and hidden 32."""
    from conftest import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("q") / "qwen3", "qwen3_moe", dtype=torch.bfloat16)



@pytest.mark.parametrize("fmt", QUANT_FORMATS)
def test_repack_experts_stores_the_reference_quantization(fmt, qwen_src, tmp_path):
    """Every expert read back through the zero-copy views (mmap and pool alike) holds exactly the parts that
    quantize() gives for the source weight (q4 with repack's default least-squares refinement); blocks stay
    4 KiB-aligned and verify is clean."""
    dst = tmp_path / fmt
    repack(qwen_src, dst, experts=fmt, progress=False)
    lay = Layout.open(dst)
    man = json.loads((dst / MANIFEST).read_text())
    assert man["experts"]["block_size"] % ALIGN == 0
    gate = next(t for t in man["experts"]["tensors"] if t["name"] == "gate")
    assert gate["quant"]["scheme"] == fmt and gate["quant"]["scale"] == "gate.scale"
    src = source_tensors(qwen_src)
    pool = expert_views(lay.expert_file_pool(), lay.tensor_specs)
    E = lay.config.num_experts
    for l, e in [(0, 0), (1, 5), (0, 3)]:
        got = lay.expert_tensors(l, e)
        for role in ("gate", "up", "down"):
            want = quantize(src[f"model.layers.{l}.mlp.experts.{e}.{role}_proj.weight"], fmt,
                            refine="lsq" if fmt == "q4" else None)  # repack's default q4 rounding
            for name, t in want.parts().items():
                assert torch.equal(got[role].parts()[name].view(torch.uint8), t.view(torch.uint8)), (role, name)
            pooled = getattr(pool, role)[l * E + e]
            assert pooled.q.data_ptr() == got[role].q.data_ptr()
    assert verify(dst, progress=False) == []


def test_repack_q4_refine_search_recorded(qwen_src, tmp_path):
    """--q4-refine search stores the parts quantize(refine="search") gives and records the choice in the manifest's
    source; an unknown refinement is refused naming the choices."""
    from tiered.layout.repack import RepackError

    dst = tmp_path / "search"
    repack(qwen_src, dst, experts="q4", q4_refine="search", progress=False)
    lay = Layout.open(dst)
    assert lay.manifest.raw["source"]["q4_refine"] == "search"
    w = source_tensors(qwen_src)["model.layers.1.mlp.experts.2.up_proj.weight"]
    want = quantize(w, "q4", refine="search").parts()
    assert not torch.equal(want["scale"], quantize(w, "q4", refine="lsq").scale), "search = lsq here: pick another"
    for name, t in want.items():
        assert torch.equal(lay.expert_tensors(1, 2)["up"].parts()[name].view(torch.uint8), t.view(torch.uint8)), name
    with pytest.raises(RepackError, match="auto, lsq, search, none"):
        repack(qwen_src, tmp_path / "bad", experts="q4", q4_refine="hqq", progress=False)


def test_repack_q4_refine_auto_follows_the_quantizing_device(qwen_src, tmp_path):
    """auto, the default, rounds q4 with lsq where quantization computes on the CPU (search costs about 5x there),
    and the manifest records the choice made, not "auto"."""
    repack(qwen_src, tmp_path / "auto", experts="q4", progress=False, quant_device="cpu")
    assert Layout.open(tmp_path / "auto").manifest.raw["source"]["q4_refine"] == "lsq"


@pytest.mark.cuda
def test_cuda_repack_q4_refine_auto_takes_search(qwen_src, tmp_path):
    """On CUDA, auto takes search (1.55x lsq's repack time on the H200, session 38)."""
    repack(qwen_src, tmp_path / "auto", experts="q4", progress=False, quant_device="cuda")
    assert Layout.open(tmp_path / "auto").manifest.raw["source"]["q4_refine"] == "search"


def _dequantized(weights: ExpertWeights, dtype) -> ExpertWeights:
    return ExpertWeights(*(w.dequantize(dtype) if isinstance(w, QuantWeight) else w.to(dtype)
                           for w in (weights.gate, weights.up, weights.down)))


@pytest.mark.parametrize("experts,dense", [("q4", "source"), ("q8", "q8"), ("fp8", "q4"), ("mxfp4", "source")])
def test_model_matches_dequantized_reference(experts, dense, qwen_src, tmp_path):
    """Logits of a quantized layout (experts dequantized per expert on use, dense matrices per matrix) equal
    those of the same model given the whole dequantized weights up front (the plain reference), over a
    prompt of odd length (prefill groups) and one-token decode steps."""
    from tiered.store.resident import ResidentExperts
    from tiered.model.transformer import Transformer

    dst = tmp_path / "lay"
    repack(qwen_src, dst, experts=experts, dense=dense, progress=False)
    lay = Layout.open(dst)
    cfg = lay.config
    dense_w = lay.dense()
    if dense != "source":
        assert isinstance(dense_w["layers.0.q_proj"], QuantWeight) and isinstance(dense_w["lm_head"], QuantWeight)
        assert not isinstance(dense_w["embed"], QuantWeight) and not isinstance(dense_w["layers.0.router"], QuantWeight)
    prov = ResidentExperts.from_layout(lay, device="cpu")
    ref_prov = ResidentExperts(_dequantized(prov.weights, torch.float32), num_layers=cfg.num_layers,
                               num_experts=cfg.num_experts)
    ref_dense = {k: v.dequantize(torch.float32) if isinstance(v, QuantWeight) else v for k, v in dense_w.items()}
    kw = dict(device="cpu", dtype=torch.float32, max_context=32)
    a, b = Transformer(cfg, dense_w, prov, **kw), Transformer(cfg, ref_dense, ref_prov, **kw)
    toks = torch.tensor([3, 17, 5, 60, 2, 9, 33], dtype=torch.int64)
    la, lb = a.forward(toks, 0, all_logits=True), b.forward(toks, 0, all_logits=True)
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)
    for i, t in enumerate([4, 71, 8]):
        x = torch.tensor([t])
        torch.testing.assert_close(a.forward(x, 7 + i), b.forward(x, 7 + i), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def ref_q4(reference_model, tmp_path_factory) -> Path:
    """The reference model with q4 experts and q4 dense matrices."""
    dst = tmp_path_factory.mktemp("refq4") / "q4"
    repack(reference_model, dst, experts="q4", dense="q4", progress=False)
    return dst


@pytest.mark.cuda
@pytest.mark.parametrize("refine", ["lsq", "search"])
def test_cuda_repack_quantizes_on_the_gpu_like_the_cpu(reference_model, tmp_path, refine):
    """--quant-device cuda (auto's choice on a GPU box) writes the layout the CPU writes: the expert file and the
    dense file within a few codes of it (q4's lsq search compares fp32 errors whose sums may round differently on
    the two devices) and the same greedy tokens from both; with either refinement."""
    import numpy as np

    from tiered.engine import load

    lay = {}
    for dev in ("cpu", "cuda"):
        lay[dev] = tmp_path / dev
        repack(reference_model, lay[dev], experts="q4", dense="q4", q4_refine=refine, progress=False,
               quant_device=dev)
    for name in ("experts.bin", "dense.safetensors"):
        a, b = (np.fromfile(lay[d] / name, dtype=np.uint8) for d in ("cpu", "cuda"))
        assert a.shape == b.shape, name
        # session 33's call A: 0.53% of the q4 bytes differ on random weights of the 10.6B shape (a group whose lsq
        # search picks another scale rewrites its 32 code bytes)
        assert (a != b).mean() < 0.02, f"{name}: {(a != b).mean():.2%} of the bytes differ"
    toks = [load(lay[d], device="cpu").generate("def fib(n):", max_new_tokens=16).token_ids for d in ("cpu", "cuda")]
    assert toks[0] == toks[1]


def test_expert_cache_serves_quantized_blocks(ref_q4):
    """The expert cache (blocks copied into slots) gives the resident path's greedy tokens on a q4 layout."""
    from tiered.engine import load

    dst = ref_q4
    want = load(dst, device="cpu").generate("def fib(n):", max_new_tokens=8).token_ids
    got = load(dst, device="cpu", budget={"expert_slots": 12}).generate("def fib(n):", max_new_tokens=8).token_ids
    assert got == want


def test_dense_tied_lm_head_stays(reference_model, ref_q4):
    """--dense q4 on a model with tied embeddings quantizes the projections and keeps the embedding in bf16
    (it is the lm_head too); inspect reports the formats and the bytes."""
    from tiered.cli.inspect import summarize

    dst = ref_q4
    d = Layout.open(dst).dense()
    assert d["embed"].dtype == torch.bfloat16 and "lm_head" not in d
    assert isinstance(d["layers.3.o_proj"], QuantWeight) and d["layers.3.o_proj"].fmt == "q4"
    info = summarize(dst)
    assert info["expert_format"] == "q4" and info["dense_format"] == "q4"
    assert info["bytes_per_expert"] < info["block_size"] == 16384
    assert info["block_bytes_per_token"] == 8 * 8 * 16384
    ref = summarize(reference_model)
    assert info["total_params"] == ref["total_params"], "parameters count logical weights, not packed bytes"


def test_unknown_scheme_refused(qwen_src, tmp_path):
    """A manifest naming a quantization scheme this reader does not know is refused by name."""
    dst = tmp_path / "lay"
    repack(qwen_src, dst, experts="q4", progress=False)
    man = json.loads((dst / MANIFEST).read_text())
    for t in man["experts"]["tensors"]:
        if t.get("quant"):
            t["quant"]["scheme"] = "q3_k"
    (dst / MANIFEST).write_text(json.dumps(man))
    with pytest.raises(LayoutError, match="q3_k"):
        Layout.open(dst)


def test_cache_key_includes_formats(qwen_src, tmp_path, monkeypatch):
    """ensure_layout keys the cache by --experts/--dense: three option sets, three layouts."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    a = ensure_layout(qwen_src, progress=False)
    b = ensure_layout(qwen_src, experts="q4", progress=False)
    c = ensure_layout(qwen_src, experts="q4", dense="q8", progress=False)
    assert len({a, b, c}) == 3
    assert Layout.open(b).manifest.expert_format == "q4" and Layout.open(a).manifest.expert_format == "bfloat16"


def test_q4_bytes_on_the_10b_shape():
    """On the 10.6B shape (D 2048, F 768) a q4 expert block is 0.281x the bf16 one (goal <= 0.29x)."""
    from tiered.layout.format import plan_block

    D, Fe = 2048, 768
    shapes = {"gate": (Fe, D), "up": (Fe, D), "down": (D, Fe)}
    _, bf16 = plan_block({r: (s, "bfloat16") for r, s in shapes.items()})
    _, q4 = plan_block({r: (s, "q4") for r, s in shapes.items()})
    assert math.isclose(q4 / bf16, 0.28125, rel_tol=1e-3) and q4 / bf16 <= 0.29


def test_dense_description_checked_on_open(qwen_src, tmp_path):
    """A dense quant description whose shape disagrees with the stored parts is refused when the layout is
    opened, naming the weight."""
    dst = tmp_path / "lay"
    repack(qwen_src, dst, dense="q8", progress=False)
    man = json.loads((dst / MANIFEST).read_text())
    man["dense"]["quant"]["layers.1.o_proj"]["shape"] = [32, 60]
    (dst / MANIFEST).write_text(json.dumps(man))
    with pytest.raises(LayoutError, match="layers.1.o_proj"):
        Layout.open(dst)
