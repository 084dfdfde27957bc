"""gpt-oss against transformers (the oracle): a tiny random checkpoint with random biases and sinks, fp32 CPU.

Covers: prefill and incremental decode logits, a prompt longer than the sliding window in several prefill chunks,
the graph-capturable static step (mixed sliding/full masks), the repack of fused 3-D experts and of MXFP4
experts with synthetic scales, the routing rule, and greedy decoding at the minimum slot count.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_config
from tiered.layout.fused import mxfp4_dequant, mxfp4_quant
from tiered.layout.repack import repack
from tiered.model.routing import topk_softmax
from tiered.model.transformer import Transformer
from tiered.store.disk import Layout
from tiered.store.resident import ResidentExperts

TOL = 1e-4  # CONTRACTS: ||a-b|| / ||b|| on fp32 logits
WINDOW = 6  # tiny_config's sliding window


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def make_gpt_oss(path: Path, *, seed: int = 1, **overrides):
    """A tiny gpt-oss saved with save_pretrained; biases and sinks random (transformers inits them to zero or
    near it, which would test nothing), swiglu_limit small enough that the clamp bites."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tiny_config("gpt_oss", **{"swiglu_limit": 0.15, **overrides})
    model = tf.AutoModelForCausalLM.from_config(cfg).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or name.endswith("sinks"):
                p.normal_(0.0, 0.5 if name.endswith("sinks") else 0.05)
    model.save_pretrained(path)
    return model.eval()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt_oss")
    ref = make_gpt_oss(root / "ck")
    repack(root / "ck", root / "layout", progress=False)
    layout = Layout.open(root / "layout")
    return ref, layout, ResidentExperts.from_layout(layout), root


def ours(layout, provider, max_context: int = 64) -> Transformer:
    return Transformer(layout.config, layout.dense(), provider, device="cpu", dtype=torch.float32,
                       max_context=max_context, attn="sdpa")


def prompt(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def theirs(ref, ids):
    with torch.no_grad():
        return ref(ids[None]).logits[0]


def test_config_normalised(pair):
    _, layout, _, _ = pair
    c = layout.config
    assert c.family == "gpt_oss" and c.sliding_window == WINDOW and c.attn_bias
    assert c.extra["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]
    assert c.extra["router"] == "topk_softmax" and c.extra["swiglu_limit"] == 0.15
    assert c.rope_scaling["rope_type"] == "yarn"


@pytest.mark.parametrize("T", [1, 7, 20])
def test_logits_match_transformers(pair, T):
    """Prefill logits within 1e-4; T = 20 is past the sliding window of 6."""
    ref, layout, prov, _ = pair
    ids = prompt(T, layout.config.vocab_size, seed=T)
    a = ours(layout, prov).forward(ids, 0, all_logits=True)
    r = rel(a, theirs(ref, ids))
    print(f"gpt_oss prefill T={T}: rel {r:.2e}")
    assert r <= TOL, f"T={T}: rel err {r:.2e}"


def test_incremental_decode_and_chunks(pair):
    """Prefill in chunks (5 + 3 + 4), then one-token steps to position 29: every logit row within 1e-4."""
    ref, layout, prov, _ = pair
    ids = prompt(30, layout.config.vocab_size, seed=3)
    full = theirs(ref, ids)
    m = ours(layout, prov)
    rows = [m.forward(ids[0:5], 0, all_logits=True), m.forward(ids[5:8], 5, all_logits=True),
            m.forward(ids[8:12], 8, all_logits=True)]
    rows += [m.forward(ids[i:i + 1], i) for i in range(12, 30)]
    r = rel(torch.cat(rows), full)
    print(f"gpt_oss chunks + decode: rel {r:.2e}")
    assert r <= TOL, f"rel err {r:.2e}"


def test_window_and_sinks_are_exercised(pair):
    """The same weights with no sinks, or with every layer full, give different logits past the window."""
    ref, layout, prov, _ = pair
    ids = prompt(20, layout.config.vocab_size, seed=4)
    base = ours(layout, prov).forward(ids, 0, all_logits=True)
    dense = dict(layout.dense())
    no_sinks = {k: (torch.full_like(v, -1e4) if k.endswith("sinks") else v) for k, v in dense.items()}
    m = Transformer(layout.config, no_sinks, prov, device="cpu", dtype=torch.float32, max_context=64)
    assert rel(m.forward(ids, 0, all_logits=True), base) > 1e-3
    import dataclasses
    cfg = dataclasses.replace(layout.config, extra={**layout.config.extra,
                                                     "layer_types": ["full_attention"] * 3})
    m = Transformer(cfg, dense, prov, device="cpu", dtype=torch.float32, max_context=64)
    got = m.forward(ids, 0, all_logits=True)
    assert rel(got[:WINDOW], base[:WINDOW]) < 1e-6 and rel(got[WINDOW:], base[WINDOW:]) > 1e-4


def test_static_decode_step_matches_eager(pair):
    """The graph-capturable step (device position, fixed span, sliding and full masks) equals the eager step."""
    _, layout, prov, _ = pair
    ids = prompt(24, layout.config.vocab_size, seed=11)
    eager, static = ours(layout, prov), ours(layout, prov)
    eager.forward(ids[:12], 0)
    static.forward(ids[:12], 0)
    for i in range(12, 24):
        a = eager.forward(ids[i:i + 1], i)
        with torch.inference_mode():
            b = static.decode_static(ids[i:i + 1], torch.tensor([i]), 32)
        assert rel(b, a) < 1e-6, f"pos {i}"


def test_topk_softmax_rule():
    """Top-k on the logits, then softmax over those k only."""
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.5], [3.0, 0.0, 0.0, -2.0]])
    ids, w = topk_softmax(logits, 2, True)
    assert ids.tolist() == [[1, 3], [0, 1]] or ids.tolist() == [[1, 3], [0, 2]]
    assert torch.allclose(w[0], torch.softmax(torch.tensor([2.0, 1.5]), 0))


def test_fused_experts_repack_round_trip(pair):
    """Every expert block holds gate/up de-interleaved from gate_up_proj [E, D, 2F], down = down_proj[e].T and
    the split biases, bit for bit."""
    _, layout, prov, root = pair
    sd = load_file(str(root / "ck" / "model.safetensors"))
    W, E = prov.weights, layout.config.num_experts
    for l in range(layout.config.num_layers):
        p = f"model.layers.{l}.mlp.experts."
        gu, gub, dn, dnb = sd[p + "gate_up_proj"], sd[p + "gate_up_proj_bias"], sd[p + "down_proj"], sd[p + "down_proj_bias"]
        for e in range(E):
            s = l * E + e
            assert torch.equal(W.gate[s], gu[e][:, 0::2].t()) and torch.equal(W.up[s], gu[e][:, 1::2].t())
            assert torch.equal(W.down[s], dn[e].t())
            assert torch.equal(W.gate_bias[s], gub[e][0::2]) and torch.equal(W.up_bias[s], gub[e][1::2])
            assert torch.equal(W.down_bias[s], dnb[e])


def test_mxfp4_dequant_matches_reference():
    """mxfp4_dequant against a plain per-value loop over codes and scales (synthetic, every code and a range of
    scales), and quant -> dequant is exact on values that are representable."""
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 2, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(120, 135, (3, 2), dtype=torch.uint8, generator=g)
    vals = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
    want = torch.empty(3, 64)
    for r in range(3):
        for gi in range(2):
            for b in range(16):
                byte = int(blocks[r, gi, b])
                for j, code in enumerate((byte & 15, byte >> 4)):
                    want[r, gi * 32 + 2 * b + j] = vals[code] * 2.0 ** (int(scales[r, gi]) - 127)
    got = mxfp4_dequant(blocks, scales)
    assert torch.equal(got, want)
    b2, s2 = mxfp4_quant(got)
    assert torch.equal(mxfp4_dequant(b2, s2), got)


@pytest.fixture(scope="module")
def mxfp4_ck(pair):
    """A gpt-oss checkpoint whose experts are MXFP4 (*_blocks, *_scales, written here from the fp32 model with
    synthetic power-of-two scales), and the dequantized expert tensors it stands for (transformers' layout)."""
    _, _, _, root = pair
    src = root / "ck"
    ck = root / "mx"
    ck.mkdir()
    sd = load_file(str(src / "model.safetensors"))
    out, deq = {}, {}
    for k, v in sd.items():
        if k.endswith("experts.gate_up_proj") or k.endswith("experts.down_proj"):
            E = v.shape[0]
            rows = v.transpose(1, 2)  # [E, out, in] as the published checkpoints store them
            bl, sc = zip(*(mxfp4_quant(rows[e]) for e in range(E)))
            out[k + "_blocks"] = torch.stack(bl).reshape(E, rows.shape[1], -1, 16)
            out[k + "_scales"] = torch.stack(sc)
            deq[k] = torch.stack([mxfp4_dequant(b.reshape(b.shape[0], -1, 16), s) for b, s in zip(bl, sc)]).transpose(1, 2)
        else:
            out[k] = v
    save_file(out, str(ck / "model.safetensors"), metadata={"format": "pt"})
    for name in ("config.json", "generation_config.json"):
        if (src / name).is_file():
            (ck / name).write_text((src / name).read_text())
    return ck, out, deq


def test_mxfp4_checkpoint_repacks_dequantized(pair, mxfp4_ck, tmp_path):
    """--experts bf16 on an MXFP4 checkpoint dequantizes it: blocks equal the reference dequantization (exact in
    bf16), and the model built from it stays near transformers run on the same dequantized weights (the expert
    biases are stored in bf16 too, hence not 1e-4)."""
    ref, _, _, _ = pair
    ck, _, deq = mxfp4_ck
    repack(ck, tmp_path / "layout", experts="bf16", progress=False)
    lay = Layout.open(tmp_path / "layout")
    prov = ResidentExperts.from_layout(lay)
    E = lay.config.num_experts
    gu = deq["model.layers.1.mlp.experts.gate_up_proj"]
    assert lay.tensor_specs[0].dtype == "bfloat16"
    assert torch.equal(prov.weights.gate[E + 2].float(), gu[2][:, 0::2].t())
    import copy
    ref2 = copy.deepcopy(ref)  # transformers on the dequantized weights
    ref2.load_state_dict({k: deq.get(k, v) for k, v in ref.state_dict().items()})
    ids = prompt(12, lay.config.vocab_size, seed=5)
    m = Transformer(lay.config, lay.dense(), prov, device="cpu", dtype=torch.float32, max_context=64, attn="sdpa")
    r = rel(m.forward(ids, 0, all_logits=True), theirs(ref2, ids))
    print(f"gpt_oss mxfp4 -> bf16 repack: rel {r:.2e}")
    assert r <= 5e-3


@pytest.mark.parametrize("experts", ["source", "mxfp4"])
def test_mxfp4_checkpoint_passes_through(pair, mxfp4_ck, tmp_path, experts):
    """--experts source (the default) and --experts mxfp4 keep an MXFP4 checkpoint's experts as stored: each
    expert's codes and scales in the layout are the checkpoint's bytes (gate = even rows of gate_up, up = odd
    rows, down as is), biases exact, and the model over them matches transformers on the dequantized weights."""
    import copy

    ref, layout, _, _ = pair
    ck, sd, deq = mxfp4_ck
    repack(ck, tmp_path / "layout", experts=experts, progress=False)
    lay = Layout.open(tmp_path / "layout")
    prov = ResidentExperts.from_layout(lay)
    w, E = prov.weights, lay.config.num_experts
    assert w.gate.fmt == w.up.fmt == w.down.fmt == "mxfp4" and lay.block_size < layout.block_size
    assert lay.manifest.raw["source"]["experts_option"] == experts
    for l in range(lay.config.num_layers):
        p = f"model.layers.{l}.mlp.experts."
        gub, gus = sd[p + "gate_up_proj_blocks"], sd[p + "gate_up_proj_scales"]  # [E, 2F, G, 16], [E, 2F, G]
        for e in range(E):
            for role, i in (("gate", 0), ("up", 1)):
                got = getattr(w, role)[l * E + e]
                assert torch.equal(got.q, gub[e, i::2].flatten(-2)) and torch.equal(got.scale, gus[e, i::2]), (l, e, role)
            assert torch.equal(w.down[l * E + e].q, sd[p + "down_proj_blocks"][e].flatten(-2))
            assert torch.equal(w.down[l * E + e].scale, sd[p + "down_proj_scales"][e])
            bias = sd[p + "gate_up_proj_bias"][e]
            assert torch.equal(w.gate_bias[l * E + e].float(), bias[0::2].float())
    ref2 = copy.deepcopy(ref)
    ref2.load_state_dict({k: deq.get(k, v) for k, v in ref.state_dict().items()})
    ids = prompt(12, lay.config.vocab_size, seed=5)
    m = Transformer(lay.config, lay.dense(), prov, device="cpu", dtype=torch.float32, max_context=64, attn="sdpa")
    got = torch.cat([m.forward(ids[:9], 0, all_logits=True)] + [m.forward(ids[i:i + 1], i, all_logits=True)
                                                                for i in range(9, 12)])
    r = rel(got, theirs(ref2, ids))
    print(f"gpt_oss mxfp4 pass-through ({experts}): rel {r:.2e}")
    assert r <= TOL


def test_greedy_at_minimum_slots_equals_unlimited(pair):
    """Greedy tokens through the expert cache with expert_slots = top-k equal the all-resident run."""
    from tiered.engine import load

    _, layout, _, root = pair
    ids = prompt(10, layout.config.vocab_size, seed=9).tolist()
    full = load(root / "layout", device="cpu", max_context=64).generate(ids, max_new_tokens=12, stop_at_eos=False)
    eng = load(root / "layout", device="cpu", max_context=64, budget={"expert_slots": layout.config.top_k})
    got = eng.generate(ids, max_new_tokens=12, stop_at_eos=False)
    assert got.token_ids == full.token_ids
    assert eng.stats["expert_slots"] == layout.config.top_k


@pytest.mark.parametrize("fmt", ["q8", "q4"])
def test_quantized_experts_keep_biases(pair, tmp_path, fmt):
    """--experts q8/q4 on gpt-oss's fused experts: gate/up/down are stored quantized (their dequantization
    within the format's error of the canonical tensors), the biases unquantized and exact, and the model
    (clamped SwiGLU with biases over QuantWeight pools, prefill and one-token decode) stays near transformers."""
    from tiered.layout.quant import QuantWeight

    ref, layout, prov, root = pair
    repack(root / "ck", tmp_path / "q", experts=fmt, dense=fmt, progress=False)
    lay = Layout.open(tmp_path / "q")
    qp = ResidentExperts.from_layout(lay)
    W, B = qp.weights, prov.weights
    assert isinstance(W.gate, QuantWeight) and isinstance(W.down, QuantWeight)
    for n in ("gate_bias", "up_bias", "down_bias"):
        assert torch.equal(getattr(W, n).float(), getattr(B, n).float()), n
    for n in ("gate", "up", "down"):
        r = rel(getattr(W, n).dequantize(torch.float32), getattr(B, n).float())
        assert r < (0.02 if fmt == "q8" else 0.2), f"{n}: rel {r:.2e}"
    ids = prompt(9, lay.config.vocab_size, seed=4)
    m = ours(lay, qp)
    rows = torch.cat([m.forward(ids[:6], 0, all_logits=True)] + [m.forward(ids[i:i + 1], i) for i in range(6, 9)])
    r = rel(rows, theirs(ref, ids))
    print(f"gpt_oss --experts {fmt}: rel {r:.2e}")
    assert r < (0.05 if fmt == "q8" else 0.5)


def test_expert_mix_decode_kernel_matches_torch_path(pair):
    """gpt-oss's experts through the kernels (biases, clamped activation; Triton's interpreter on CPU) equal the
    torch path within fp32 rounding: one token (moe_decode, experts_from_slots' place), a few tokens (experts_tokens
    over T*K pairs, up to decode_max_t tokens) and more (experts_tokens' grouped kernels: a prefill chunk)."""
    pytest.importorskip("triton")
    import os

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs Triton's interpreter (CPU) or CUDA")
    from tiered.model.moe import expert_mix

    _, layout, prov, _ = pair
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    m = Transformer(layout.config, layout.dense(), prov, device="cpu", dtype=torch.float32, max_context=32,
                    attn="sdpa")
    moe = m.layers[0].moe
    g = torch.Generator().manual_seed(5)
    from tiered.model import moe_gpu

    calls = []
    real = moe_gpu.experts_tokens
    moe_gpu.experts_tokens = lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k)
    try:
        for T in (1, 1, 3, 4, 7, 12):  # several tokens: the kernels over T*K pairs up to decode_max_t, then grouped
            x = torch.randn(T, layout.config.hidden_size, generator=g)
            ids = torch.stack([torch.randperm(layout.config.num_experts, generator=g)[:layout.config.top_k]
                               for _ in range(T)])
            wts = torch.softmax(torch.randn(ids.shape, generator=g), -1)
            a = expert_mix(x.to(dev), ids.to(dev), wts.to(dev), moe, prov, 0, kernels=True)
            b = expert_mix(x, ids, wts, moe, prov, 0, kernels=False)
            assert rel(a.cpu(), b) < 1e-5, (T, rel(a.cpu(), b))
    finally:
        moe_gpu.experts_tokens = real
    assert calls == [3, 4, 7, 12]


@pytest.mark.cuda
@pytest.mark.parametrize("experts", ["source", "mxfp4", "q4"])
def test_cuda_decode_kernels_match_torch_path(pair, tmp_path, experts):
    """On CUDA (fp32): gpt-oss's prefill (the grouped kernels: moe_grouped / quant_grouped, past decode_max_t tokens)
    and one-token steps through the fused expert kernels (bf16 pool: moe_decode; mxfp4 / q4: quant_moe's GEMVs), no
    dequantized copy of an expert, give the greedy tokens of the torch expert path (kernels=False) and logits within
    1e-4 of it."""
    from tiered.engine import load

    *_, root = pair
    lay = root / "layout"
    if experts != "source":
        lay = tmp_path / experts
        repack(root / "ck", lay, experts=experts, progress=False)
    kw = dict(device="cuda", dtype="float32", max_context=64)
    a = load(lay, **kw)
    b = load(lay, kernels=False, cuda_graphs=False, **kw)
    for n in (9, 33):
        ids = prompt(n, 96, seed=3).tolist()
        ga = a.generate(ids, max_new_tokens=20, stop_at_eos=False)
        gb = b.generate(ids, max_new_tokens=20, stop_at_eos=False)
        assert ga.token_ids == gb.token_ids, n
        toks = torch.tensor(ids + ga.token_ids[:10], device="cuda")
        ra = torch.cat([a.model.forward(toks[:n], 0, all_logits=True)]
                       + [a.model.forward(toks[i:i + 1], i) for i in range(n, n + 10)])
        rb = torch.cat([b.model.forward(toks[:n], 0, all_logits=True)]
                       + [b.model.forward(toks[i:i + 1], i) for i in range(n, n + 10)])
        assert rel(ra, rb) < 1e-4, (n, rel(ra, rb))


def test_default_attention_picks_sdpa_for_sinks(pair, monkeypatch, capsys):
    """gpt-oss with --attn left to auto: load() sees the sinks and resolves auto to SDPA, also on CUDA, where auto
    would otherwise pick the Triton kernel that the model refuses (the selection is checked for a CUDA device
    directly: it needs none); only an explicit triton or flash fails, naming the fix. The default load decodes
    as the explicit SDPA model does."""
    import tiered.engine as engine
    from tiered.model.layers import pick_backend

    _, layout, prov, root = pair
    cuda = torch.device("cuda")
    assert pick_backend("auto", cuda, torch.bfloat16, sinks=True) == "sdpa"
    assert "picks sdpa" in capsys.readouterr().err
    assert pick_backend("sdpa", cuda, sinks=True) == "sdpa"
    for attn in ("triton", "flash"):
        with pytest.raises(ValueError, match="attention sinks"):
            pick_backend(attn, cuda, sinks=True)
        with pytest.raises(ValueError, match=r"use --attn sdpa"):
            engine.load(root / "layout", device="cpu", max_context=64, attn=attn)
    seen = []
    real = engine.pick_backend

    def spy(*a, **k):
        seen.append(k.get("sinks"))
        return real(*a, **k)

    monkeypatch.setattr(engine, "pick_backend", spy)
    eng = engine.load(root / "layout", device="cpu", max_context=64)  # default options
    assert seen == [True] and eng.model.attn == "sdpa"
    ids = prompt(8, layout.config.vocab_size, seed=5)
    m = ours(layout, prov)
    want = torch.cat([m.forward(ids[:5], 0, all_logits=True)] + [m.forward(ids[i:i + 1], i) for i in range(5, 8)])
    got = torch.cat([eng.model.forward(ids[:5], 0, all_logits=True)]
                    + [eng.model.forward(ids[i:i + 1], i) for i in range(5, 8)])
    assert torch.equal(got, want)


def test_models_without_sinks_keep_auto(reference_layout, monkeypatch):
    """The sinks check does not touch other models: load() passes sinks=False for the reference model."""
    import tiered.engine as engine

    seen = []
    real = engine.pick_backend
    monkeypatch.setattr(engine, "pick_backend", lambda *a, **k: seen.append(k.get("sinks")) or real(*a, **k))
    engine.load(reference_layout, device="cpu", max_context=64)
    assert seen == [False]


@pytest.mark.parametrize("attn,prefill,page,chunk", [
    ("rows", "rows", 4, 512),  # each row's SDPA-with-sinks call over its gathered pages (the single-sequence call)
    ("paged", "batched", 5, 512),  # decode rows in one paged call (the torch reference), fresh prompts under one mask
    ("rows", "rows", 4, 5),  # prompts in chunks of 5 riding the decode steps: chunks cross the 6-token window
])
def test_batched_greedy_equals_single_sequence(pair, attn, prefill, page, chunk):
    """`tiered batch` / `serve`'s scheduler runs gpt-oss (attention sinks, sliding and full layers alternating):
    batched greedy tokens equal the single-sequence engine's, prompts shorter and longer than the window, rows
    joining as others finish; every page comes back."""
    from tiered.decode.scheduler import Request, SamplingParams, Scheduler
    from tiered.engine import load

    *_, root = pair
    eng = load(root / "layout", device="cpu", dtype="float32", max_context=64)
    lengths, news = [1, 4, 9, 17, 3], [8, 5, 11, 6, 9]  # windows of 6: prompts and generations cross them
    prompts = [prompt(n, 96, seed=i).tolist() for i, n in enumerate(lengths)]
    want = [eng.generate(p, max_new_tokens=n, stop_at_eos=False).token_ids for p, n in zip(prompts, news)]
    sch = Scheduler(eng, max_batch=3, page_size=page, prefill_tokens=chunk, decode_attention=attn,
                    prefill_attention=prefill)
    reqs = [sch.submit(Request(str(i), p, SamplingParams(max_tokens=n, stop_at_eos=False)))
            for i, (p, n) in enumerate(zip(prompts, news))]
    sch.run_until_idle()
    assert [r.out_ids for r in reqs] == want
    assert sch.stats()["rows_per_step"] > 1 and sch.state.free_pages == sch.state.num_pages
    assert sch.step_fn._windows == [None, WINDOW]  # both kinds of layer ran


def test_padded_prefill_matches_eager(pair):
    """The graph-capturable prefill (`prefill_static`, padded to its bucket; GraphedPrefill without graphs on CPU)
    with gpt-oss's mixed windows and sinks: the last token's logits equal the unpadded eager prefill's, for prompts
    shorter and longer than the sliding window, and the greedy tokens after it are the eager engine's."""
    from tiered.decode.graphedprefill import GraphedPrefill
    from tiered.engine import load

    *_, root = pair
    eng = load(root / "layout", device="cpu", dtype="float32", max_context=96)
    assert eng.model.mixed_windows and eng.model.prefill_graphable
    for n in (4, 17, 40):  # the window is 6: every sliding layer's mask cuts the longer prompts
        ids = prompt(n, 96, seed=n)
        want = eng.generate(ids.tolist(), max_new_tokens=8, stop_at_eos=False).token_ids
        eager = eng.model.forward(ids, 0).float()
        eng.prefill_graphs = GraphedPrefill(eng.model, max_tokens=64, graphs=False, capture_on=1)
        padded = eng.prefill_graphs.run(ids).float()
        torch.testing.assert_close(padded, eager, rtol=1e-5, atol=1e-5)
        assert eng.generate(ids.tolist(), max_new_tokens=8, stop_at_eos=False).token_ids == want
        eng.prefill_graphs = None


def test_batch_model_path_takes_gpt_oss_with_kernels(pair):
    """The batch step's "model" expert path (expert_mix's kernels, no host read of the routing) serves gpt-oss when
    the model runs the kernels (both kernel families compute its biases and clamped SwiGLU); the torch path, which
    reads the routing per expert, does not."""
    from tiered.decode.batchstep import model_path_ok

    _, layout, prov, _ = pair
    m = ours(layout, prov, max_context=32)
    assert hasattr(prov, "slot_map") and not model_path_ok(m)
    m.kernels = True
    assert model_path_ok(m)


@pytest.mark.cuda
@pytest.mark.parametrize("attn", [None, "rows"])
def test_cuda_batched_greedy_equals_single_sequence(pair, attn):
    """On CUDA (fp32): the scheduler's default paths (the paged Triton kernel with sinks and each layer's window,
    the batch graphs) and the rows path give the single-sequence engine's greedy tokens."""
    from tiered.decode.scheduler import Request, SamplingParams, Scheduler
    from tiered.engine import load

    *_, root = pair
    eng = load(root / "layout", device="cuda", dtype="float32", max_context=64)
    lengths, news = [1, 4, 9, 17, 3], [8, 5, 11, 6, 9]
    prompts = [prompt(n, 96, seed=i).tolist() for i, n in enumerate(lengths)]
    want = [eng.generate(p, max_new_tokens=n, stop_at_eos=False).token_ids for p, n in zip(prompts, news)]
    kw = {} if attn is None else {"decode_attention": attn}
    sch = Scheduler(eng, max_batch=3, page_size=8, **kw)
    reqs = [sch.submit(Request(str(i), p, SamplingParams(max_tokens=n, stop_at_eos=False)))
            for i, (p, n) in enumerate(zip(prompts, news))]
    sch.run_until_idle()
    assert [r.out_ids for r in reqs] == want
    assert sch.state.free_pages == sch.state.num_pages


def test_paged_reference_with_sinks_and_window():
    """The batch step's torch paged decode (one token a row over its pages) with sinks and a window equals the
    single-sequence attention_with_sinks over each row's contiguous keys; padding rows give zeros."""
    from tiered.decode.batchstep import paged_decode_attention
    from tiered.model.layers import sink_rows, sinks_attend

    g = torch.Generator().manual_seed(5)
    B, H, KV, hd, P = 3, 4, 2, 8, 4
    lens = [7, 13, 0]
    pool_k, pool_v = torch.randn(12, P, KV, hd, generator=g), torch.randn(12, P, KV, hd, generator=g)
    bt = torch.tensor([[3, 1, 8, 0], [2, 5, 9, 11], [0, 0, 0, 0]], dtype=torch.int32)
    q = torch.randn(B, H, hd, generator=g)
    sinks = torch.randn(H, generator=g)
    got = paged_decode_attention(q, pool_k, pool_v, bt, torch.tensor(lens, dtype=torch.int32), window=WINDOW,
                                 sinks=sinks)
    for b, n in enumerate(lens[:2]):
        k = pool_k[bt[b].long()].reshape(-1, KV, hd)[max(0, n - WINDOW):n].transpose(0, 1)  # [KV, S, hd]
        v = pool_v[bt[b].long()].reshape(-1, KV, hd)[max(0, n - WINDOW):n].transpose(0, 1)
        want = sinks_attend(q[b].view(KV, H // KV, hd), k, v, None, sink_rows(sinks, KV, H // KV, 1), hd ** -0.5)
        torch.testing.assert_close(got[b], want.reshape(H, hd), rtol=1e-5, atol=1e-6)
    assert not got[2].any()


def test_bench_gpt_oss_small_runs_on_cpu(tmp_path):
    """benchmarks/bench_gpt_oss_gpu.py --small: the whole pipeline (a random gpt-oss checkpoint, bf16, mxfp4 and q4
    repacks, both expert paths timed) on a tiny shape; its JSON names every layout and both paths."""
    import json
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "OUT": str(tmp_path / "out")}
    r = subprocess.run([sys.executable, "benchmarks/bench_gpt_oss_gpu.py", "--small", "--work", str(tmp_path / "w"),
                        "--experts", "source,mxfp4,q4+q4"], cwd=repo, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res == json.loads((tmp_path / "out" / "gpt_oss_gpu.json").read_text())
    assert set(res["layouts"]) == {"source", "mxfp4", "q4+q4"}
    assert (res["layouts"]["q4+q4"]["experts"], res["layouts"]["q4+q4"]["dense"]) == ("q4", "q4")
    for row in res["layouts"].values():
        assert row["kernels"]["decode_tok_s"] > 0 and row["torch_experts"]["decode_tok_s"] > 0
        assert row["greedy_tokens_agree"] == res["new_tokens"]  # the same torch path on CPU: equal tokens
        assert row["kernels"]["long_prefill_tok_s"] > 0 and row["prefill_kernels_vs_torch_experts"] > 0
