"""DeepSeek-V3 end to end against transformers (fp32 CPU): MLA over the latent cache (prefill through the expanded
path, one-token steps through the absorbed one), dense first layers, the sigmoid + correction bias + group-limited
router with routed_scaling_factor, shared experts, YaRN rope with interleaved pairs; the MTP layer skipped at repack;
the per-layer state holds latents, not K/V; the minimum slot count decodes like the unlimited run."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tiered.layout.repack import repack
from tiered.model.routing import layer_rule
from tiered.model.transformer import Transformer
from tiered.store.disk import Layout
from tiered.store.resident import ResidentExperts

TOL = 1e-4
VOCAB = 8192  # the reference tokenizer's, so that trace and tune can run
CTX = 160
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 10000.0}


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def ds_config():
    import transformers as tf

    cfg = tf.DeepseekV3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=24,
                              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
                              num_experts_per_tok=3, n_group=4, topk_group=2, n_shared_experts=2,
                              first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8,
                              qk_nope_head_dim=8, v_head_dim=12, max_position_embeddings=CTX, routed_scaling_factor=2.5,
                              rope_parameters=YARN, rms_norm_eps=1e-6)
    cfg.eos_token_id, cfg.bos_token_id, cfg.pad_token_id = 1, 0, 0
    return cfg


@pytest.fixture(scope="module")
def ds(tmp_path_factory, reference_model):
    import transformers as tf

    root = tmp_path_factory.mktemp("dsv3")
    torch.manual_seed(4)
    hf = tf.AutoModelForCausalLM.from_config(ds_config()).float().eval()
    with torch.no_grad():  # unit norms and a zero correction bias would leave those paths untested
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
        for layer in hf.model.layers[1:]:
            layer.mlp.gate.weight.normal_(0, 0.3)
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.2)
    ck = root / "ck"
    hf.save_pretrained(ck)
    # an MTP layer as DeepSeek-V3 checkpoints carry it (model.layers.{num_hidden_layers}.*): repack skips it
    save_file({"model.layers.3.eh_proj.weight": torch.zeros(64, 128), "model.layers.3.enorm.weight": torch.ones(64)},
              str(ck / "mtp.safetensors"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(reference_model / name, ck / name)
    skipped = repack(ck, root / "lay", progress=False)["skipped"]
    lay = Layout.open(root / "lay")
    return hf, lay, ResidentExperts.from_layout(lay), skipped, root


def ours(lay, provider):
    return Transformer(lay.config, lay.dense(), provider, device="cpu", dtype=torch.float32, max_context=CTX)


def theirs(hf, ids):
    with torch.no_grad():
        return hf(input_ids=ids[None]).logits[0]


def prompt(n, seed=0):
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def test_config_state_and_mtp(ds):
    hf, lay, prov, skipped, _ = ds
    cfg = lay.config
    assert cfg.layer_types == ("mla",) * 3 and cfg.first_moe_layer == 1 and cfg.shared_expert_ffn == 48
    assert cfg.extra["mla"] == {"q_lora_rank": 24, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8,
                                "v_head_dim": 12}
    assert skipped == ["model.layers.3.eh_proj.weight", "model.layers.3.enorm.weight"]
    m = ours(lay, prov)
    assert m.state.latent.latent.shape == (3, CTX, 16) and m.state.latent.k_rope.shape == (3, CTX, 8)
    assert m.state.kv.k.numel() == 0 and m.state.linear is None
    assert cfg.kv_bytes_per_token(2) == 3 * (16 + 8) * 2  # the latent, not 2 * H * hd per layer
    assert cfg.state_bytes_per_sequence(2) == 0
    # dense layer 0's expert blocks are zeros (nothing reads them), MoE layers' are the checkpoint's
    assert not lay.block_bytes(0, 0).tobytes().strip(b"\0") and lay.block_bytes(1, 0).tobytes().strip(b"\0")


def test_prefill_and_decode_match_transformers(ds):
    hf, lay, prov, _, _ = ds
    ids = prompt(40)
    ref = theirs(hf, ids)
    m = ours(lay, prov)
    full = m.forward(ids, 0, all_logits=True)
    print(f"deepseek_v3 prefill rel {rel(full, ref):.2e}")
    assert rel(full, ref) <= TOL
    # the correction bias changes the choice (the test would see a model that ignored it)
    m.layer_rules[1] = layer_rule(lay.config, torch.zeros_like(m.layers[1].moe.score_bias))
    m.layer_rules[2] = layer_rule(lay.config, torch.zeros_like(m.layers[2].moe.score_bias))
    assert rel(m.forward(ids, 0, all_logits=True), ref) > 1e-3
    m = ours(lay, prov)
    steps = [m.forward(ids[:30], 0, all_logits=True)] + [m.forward(ids[i:i + 1], i, all_logits=True)
                                                         for i in range(30, 40)]
    assert rel(torch.cat(steps), ref) <= TOL


def test_long_prompt_in_chunks(ds):
    """A prompt past YaRN's original 32 positions, prefilled in chunks of 23 (several chunks), then decoded."""
    hf, lay, prov, _, _ = ds
    ids = prompt(150, seed=1)
    ref = theirs(hf, ids)
    m = ours(lay, prov)
    outs = [m.forward(ids[a:min(a + 23, 140)], a, all_logits=True) for a in range(0, 140, 23)]
    outs += [m.forward(ids[i:i + 1], i, all_logits=True) for i in range(140, 150)]
    assert rel(torch.cat(outs), ref) <= TOL


def test_min_slots_greedy_equals_unlimited(ds):
    import tiered

    _, lay, _, _, _ = ds
    text = "def main():\n    x = 1\n"
    full = tiered.load(lay.path, device="cpu", dtype="float32", max_context=CTX)
    want = full.generate(text, max_new_tokens=12, temperature=0.0, stop_at_eos=False).token_ids
    small = tiered.load(lay.path, device="cpu", dtype="float32", max_context=CTX,
                        budget={"expert_slots": lay.config.top_k})
    got = small.generate(text, max_new_tokens=12, temperature=0.0, stop_at_eos=False).token_ids
    assert got == want


def test_piecewise_min_slots_equals_unlimited(ds):
    """The piecewise one-token step (host routing between segments; dense layers have none) at the minimum slot
    count gives the unlimited run's greedy tokens."""
    import tiered

    _, lay, _, _, _ = ds
    text = "def main():\n    x = 1\n"
    want = tiered.load(lay.path, device="cpu", dtype="float32", max_context=CTX).generate(
        text, max_new_tokens=12, temperature=0.0, stop_at_eos=False).token_ids
    eng = tiered.load(lay.path, device="cpu", dtype="float32", max_context=CTX, budget={"expert_slots": 3})
    eng.use_piecewise(graphs=False)
    got = eng.generate(text, max_new_tokens=12, temperature=0.0, stop_at_eos=False)
    assert eng.decode_mode == "piecewise" and got.token_ids == want


def test_inspect(ds):
    """`inspect` counts experts of MoE layers only and the MLA latent as the cache per token."""
    from click.testing import CliRunner

    from tiered.cli.main import main

    _, lay, _, _, _ = ds
    res = CliRunner().invoke(main, ["inspect", str(lay.path), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout.strip().splitlines()[-1])
    cfg = lay.config
    assert info["moe_layers"] == 2 and info["layer_kinds"]["mla"] == 3
    assert info["total_params"] - info["active_params"] == 2 * (8 - 3) * cfg.expert_params
    assert info["kv_cache_bytes_per_token"] == 3 * 24 * 2 and info["linear_state_bytes_per_sequence"] == 0


FIT_TEXT = "import os\n\ndef walk(root):\n    for d, _, fs in os.walk(root):\n        yield from fs\n" * 3
TUNE_TEXT = "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n" * 3


@pytest.fixture(scope="module")
def ds_traces(ds, tmp_path_factory):
    """`tiered trace` of a fit text and a tune text on the DeepSeek-V3 layout, and `tiered tune --fit-trace`'s
    JSON and parameters file (written next to the traces, not into the shared layout)."""
    from click.testing import CliRunner

    from tiered.cli.main import main

    _, lay, _, _, _ = ds
    d = tmp_path_factory.mktemp("dstrace")
    for name, text in (("fit", FIT_TEXT), ("tune", TUNE_TEXT)):
        (d / f"{name}.txt").write_text(text)
        res = CliRunner().invoke(main, ["trace", "-m", str(lay.path), "--prompt-file", str(d / f"{name}.txt"),
                                        "-o", str(d / f"{name}.npz")])
        assert res.exit_code == 0, res.output + repr(res.exception)
        assert "MoE layers 1..2; 1 dense not traced" in res.output
    res = CliRunner().invoke(main, ["tune", "-m", str(lay.path), "--trace", str(d / "tune.npz"), "--fit-trace",
                                    str(d / "fit.npz"), "--params", str(d / "params.safetensors"), "--json"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return d, json.loads(res.stdout.strip().splitlines()[-1])


def test_trace_records_moe_layers_only(ds, ds_traces):
    """The trace of a model with a dense first layer holds its two MoE layers (meta moe_layers [1, 2]), and each
    traced layer's experts are those transformers' router of that model layer picks, token by token."""
    from tiered.predict.trace import load

    hf, lay, _, _, _ = ds
    d, _ = ds_traces
    tr = load(d / "tune.npz")
    N = tr.num_tokens
    assert tr.meta["moe_layers"] == tr.moe_layers == lay.config.moe_layers == [1, 2]
    assert tr.meta["num_layers"] == 3 and tr.topk_ids.shape == (N, 2, 3)
    assert tr.hidden.shape == (N, 2, 64) and tr.router_logits.shape == (N, 2, 8)
    picked = {}
    hooks = [hf.model.layers[l].mlp.gate.register_forward_hook(
        lambda mod, inp, out, l=l: picked.__setitem__(l, out[2].reshape(N, -1))) for l in (1, 2)]
    try:
        theirs(hf, torch.from_numpy(tr.tokens.astype(np.int64)))
    finally:
        for h in hooks:
            h.remove()
    for i, l in enumerate(tr.moe_layers):
        want = picked[l].sort(-1).values.numpy()
        got = np.sort(tr.topk_ids[:, i].astype(np.int64), -1)
        np.testing.assert_array_equal(got, want, err_msg=f"model layer {l}")


def test_tune_on_moe_layer_trace(ds_traces):
    """`tiered tune --trace --fit-trace --json` runs on a trace of MoE layers only and prints its JSON: the fitted
    predictors are swept and a setting is recommended."""
    d, out = ds_traces
    assert {"next-gate", "history", "combined"} <= set(out["predictors"])
    assert 0 < out["predictor"]["recall"] <= 1 and out["tokens"] > 0
    assert out["recommended"]["policy"] in ("lru", "lfu", "flru", "predicted")
    assert (d / "params.safetensors").is_file()


@pytest.mark.parametrize("name,piecewise,slots", [("next-gate", False, 3), ("next-gate", True, 6),
                                                  ("history", False, 6), ("history", True, 6)])
def test_prefetch_depth_one_equals_unlimited(ds, ds_traces, name, piecewise, slots):
    """A budgeted run with --prefetch-depth 1 (next-gate from the routers; history from the fitted parameters)
    gives the unlimited run's greedy tokens; prefetches go to the next MoE layer only (model layer 2, predicted
    while layer 1 routes), never to the dense layer 0."""
    import tiered
    from tiered.predict.predictors import GateWeights, PredictorParams, make_predictor

    _, lay, _, _, _ = ds
    d, _ = ds_traces
    text = "def main():\n    x = 1\n"
    want = tiered.load(lay.path, device="cpu", dtype="float32", max_context=CTX).generate(
        text, max_new_tokens=12, temperature=0.0, stop_at_eos=False).token_ids
    cfg = lay.config
    pred = make_predictor(name, num_layers=len(cfg.moe_layers), num_experts=cfg.num_experts,
                          gates=GateWeights.from_layout(lay), params=PredictorParams.load(d / "params.safetensors"))
    eng = tiered.load(lay.path, device="cpu", dtype="float32", max_context=CTX, predictor=pred,
                      budget={"expert_slots": slots, "prefetch_depth": 1, "prefetch_budget": 3})
    pf, targets = eng.prefetcher, []  # (routed model layer, prefetched model layer) of the prefetcher's hook
    take = pf.take
    pf.take = lambda layer: [targets.append((layer, t)) or (t, ids) for t, ids in take(layer)]
    if piecewise:
        eng.use_piecewise(graphs=False)
    got = eng.generate(text, max_new_tokens=12, temperature=0.0, stop_at_eos=False)
    assert got.token_ids == want
    assert pf.predictor is pred and pf.issued > 0
    assert targets and set(targets) == {(1, 2)}
    if piecewise:  # history reads no hidden state: its observer and hook run deferred, past the next segment
        assert eng.decode_mode == "piecewise" and (eng.pieces.late_s > 0) == (name == "history")


def test_default_prefetcher_maps_moe_layers(ds):
    """load()'s own prefetcher on a model with a dense layer: its predictor covers the MoE layers, its eviction
    scores every model layer (the cache's keys), and --policy predicted with prefetch decodes like unlimited."""
    import tiered

    _, lay, _, _, _ = ds
    text = "x = [i * i for i in range(9)]\n"
    want = tiered.load(lay.path, device="cpu", dtype="float32", max_context=CTX).generate(
        text, max_new_tokens=10, temperature=0.0, stop_at_eos=False).token_ids
    eng = tiered.load(lay.path, device="cpu", dtype="float32", max_context=CTX,
                      budget={"expert_slots": 4, "prefetch_depth": 2, "policy": "predicted"})
    pf = eng.prefetcher
    assert pf.predictor.L == 2 and pf.moe_layers == [1, 2] and pf.scorer.avg_u.shape[1] == 3 * 8
    got = eng.generate(text, max_new_tokens=10, temperature=0.0, stop_at_eos=False).token_ids
    assert got == want


def test_replay_moe_layer_trace(ds, ds_traces):
    """ReplayRouting(..., moe_layers=trace.moe_layers) replays a trace of the MoE layers by model layer: the
    teacher-forced logits with the recorded routing, from the minimum slot count, equal the model's own."""
    import tiered
    from tiered.predict.replay import ReplayRouting
    from tiered.predict.trace import load

    _, lay, _, _, _ = ds
    d, _ = ds_traces
    tr = load(d / "tune.npz")
    ids = tr.tokens.tolist()
    want = tiered.load(lay.path, device="cpu", dtype="float32", max_context=CTX).logits(ids)
    replay = ReplayRouting(tr.topk_ids, tr.topk_weights, device="cpu", moe_layers=tr.moe_layers)
    eng = tiered.load(lay.path, device="cpu", dtype="float32", max_context=CTX, routing=replay,
                      budget={"expert_slots": 3})
    assert rel(eng.logits(ids), want) <= TOL
    with pytest.raises(IndexError, match="model layer 0"):
        replay(0, 0, 1)


@pytest.mark.parametrize("fmt", ["q8", "q4"])
def test_dense_quantized(ds, tmp_path, fmt):
    """--dense q8/q4 quantizes MLA's projections, the dense layers' MLP and the shared experts (not the router,
    norms or embeddings); the model runs them through qlinear, prefill and absorbed one-token steps, near
    transformers."""
    from tiered.layout.quant import QuantWeight

    hf, _, _, _, root = ds
    repack(root / "ck", tmp_path / "lay", dense=fmt, progress=False)
    lay = Layout.open(tmp_path / "lay")
    d = lay.dense()
    for name in ("layers.0.mla_q_a", "layers.0.mla_q_b", "layers.1.mla_kv_a", "layers.1.mla_kv_b", "layers.2.o_proj",
                 "layers.0.dense_gate", "layers.0.dense_down", "layers.1.shared_gate_proj", "lm_head"):
        assert isinstance(d[name], QuantWeight) and d[name].fmt == fmt, name
    assert not isinstance(d["layers.1.router"], QuantWeight) and not isinstance(d["embed"], QuantWeight)
    ids = prompt(20, seed=2)
    m = ours(lay, ResidentExperts.from_layout(lay))
    got = torch.cat([m.forward(ids[:16], 0, all_logits=True)] + [m.forward(ids[i:i + 1], i, all_logits=True)
                                                                 for i in range(16, 20)])
    r = rel(got, theirs(hf, ids))
    print(f"deepseek_v3 --dense {fmt}: rel {r:.2e}")
    assert 0 < r < (2e-2 if fmt == "q8" else 0.3)


def fp8_blockwise(w):
    """The test's own DeepSeek-style quantizer: e4m3 codes and one fp32 scale per 128 x 128 block (the edge blocks
    partial: ceil(N/128) x ceil(K/128) scales), w ~ q * s. Returns (q, s, q * s in fp32)."""
    n, k = w.shape
    s = torch.ones(-(-n // 128), -(-k // 128))
    q = torch.empty(n, k, dtype=torch.float8_e4m3fn)
    deq = torch.empty(n, k)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].float()
            s[i, j] = blk.abs().max() / 448.0 * (1.0 + 0.5 * torch.rand(()))  # synthetic, not a power of two
            q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = (blk / s[i, j]).to(torch.float8_e4m3fn)
            deq[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = q[i * 128:(i + 1) * 128,
                                                                  j * 128:(j + 1) * 128].float() * s[i, j]
    return q, s, deq


def is_fp8_name(name):
    """The tensors DeepSeek-V3 checkpoints store in fp8: every projection of the decoder layers (not the router,
    embeddings, norms or lm_head)."""
    return ".layers." in name and name.endswith(("_proj.weight", "_proj_with_mqa.weight"))


@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
    """A DeepSeek-V3 checkpoint in fp8 (dims of 136 and 200 make blocks partial and several per matrix), the
    fp32 checkpoint of its dequantized weights, and transformers' model loaded from the latter."""
    import transformers as tf
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("dsv3_fp8")
    torch.manual_seed(7)
    cfg = ds_config()
    cfg.intermediate_size, cfg.moe_intermediate_size = 200, 136
    tf.AutoModelForCausalLM.from_config(cfg).float().save_pretrained(root / "deq")
    sd = load_file(str(root / "deq" / "model.safetensors"))
    fp8_sd, deq_sd = {}, {}
    for k, v in sd.items():
        if is_fp8_name(k):
            q, s, deq = fp8_blockwise(v)
            fp8_sd[k], fp8_sd[k + "_scale_inv"], deq_sd[k] = q, s, deq
        else:
            fp8_sd[k] = deq_sd[k] = v
    (root / "ck").mkdir()
    save_file(fp8_sd, str(root / "ck" / "model.safetensors"), metadata={"format": "pt"})
    save_file(deq_sd, str(root / "deq" / "model.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(root / "deq" / "config.json", root / "ck" / "config.json")
    ref = tf.AutoModelForCausalLM.from_pretrained(root / "deq", dtype=torch.float32).eval()
    return root, fp8_sd, ref


def test_fp8_checkpoint_passes_through(fp8):
    """An fp8 checkpoint (e4m3 weights + weight_scale_inv) repacks with every fp8 weight's bytes and scales copied
    as stored, experts and dense alike, and the model matches transformers run on the dequantized weights."""
    from tiered.layout.quant import QuantWeight

    root, sd, ref = fp8
    repack(root / "ck", root / "lay", progress=False)
    lay = Layout.open(root / "lay")
    prov = ResidentExperts.from_layout(lay)
    E, w = lay.config.num_experts, prov.weights
    assert w.gate.fmt == "fp8" and lay.config.source_dtype == "float32"
    for l in (1, 2):
        for e in (0, E - 1):
            for role, hf in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
                name = f"model.layers.{l}.mlp.experts.{e}.{hf}.weight"
                got = getattr(w, role)[l * E + e]
                assert torch.equal(got.q.view(torch.uint8), sd[name].view(torch.uint8)), name
                assert torch.equal(got.scale, sd[name + "_scale_inv"]), name
    dense = lay.dense()
    for canon, hf in (("layers.0.mla_q_a", "self_attn.q_a_proj"), ("layers.2.mla_kv_b", "self_attn.kv_b_proj"),
                      ("layers.0.dense_down", "mlp.down_proj"), ("layers.1.shared_up_proj", "mlp.shared_experts.up_proj"),
                      ("layers.1.o_proj", "self_attn.o_proj")):
        name = f"model.layers.{canon.split('.')[1]}.{hf}.weight"
        t = dense[canon]
        assert isinstance(t, QuantWeight) and t.fmt == "fp8", canon
        assert torch.equal(t.q.view(torch.uint8), sd[name].view(torch.uint8)) and torch.equal(t.scale, sd[name + "_scale_inv"])
    assert dense["lm_head"].dtype == torch.float32 and dense["layers.1.router"].dtype == torch.float32
    from tiered.cli.inspect import summarize  # the checkpoint's headers (scales counted as bytes) agree with it

    ck_info, lay_info = summarize(root / "ck"), summarize(root / "lay")
    for key in ("total_params", "active_params", "bytes_per_expert", "expert_bytes", "dense_bytes"):
        assert ck_info[key] == lay_info[key], key
    ids = prompt(24, seed=3)
    want = theirs(ref, ids)
    m = ours(lay, prov)
    got = torch.cat([m.forward(ids[:20], 0, all_logits=True)] + [m.forward(ids[i:i + 1], i, all_logits=True)
                                                                 for i in range(20, 24)])
    print(f"deepseek_v3 fp8 pass-through rel {rel(got, want):.2e}")
    assert rel(got, want) <= TOL


def test_fp8_checkpoint_to_other_formats(fp8, tmp_path):
    """--experts bf16 --dense bf16 dequantizes fp8 blockwise (the dequantized weights rounded once to bf16);
    --experts q8 requantizes the dequantized experts (within q8's step of them) and the model runs near bf16."""
    from tiered.layout.quant import QuantWeight, error_bound, quantize

    root, sd, ref = fp8
    repack(root / "ck", tmp_path / "bf", experts="bf16", dense="bf16", progress=False)
    lay = Layout.open(tmp_path / "bf")
    E, w = lay.config.num_experts, ResidentExperts.from_layout(lay).weights
    name = "model.layers.2.mlp.experts.5.down_proj.weight"
    deq = fp8_blockwise_deq(sd[name], sd[name + "_scale_inv"])
    assert w.down.dtype == torch.bfloat16 and torch.equal(w.down[2 * E + 5], deq.to(torch.bfloat16))
    d = lay.dense()["layers.0.dense_gate"]
    assert torch.equal(d, fp8_blockwise_deq(sd["model.layers.0.mlp.gate_proj.weight"],
                                            sd["model.layers.0.mlp.gate_proj.weight_scale_inv"]).to(torch.bfloat16))
    repack(root / "ck", tmp_path / "q8", experts="q8", progress=False)
    lay8 = Layout.open(tmp_path / "q8")
    w8 = ResidentExperts.from_layout(lay8).weights
    assert isinstance(w8.down, QuantWeight) and w8.down.fmt == "q8"
    assert torch.equal(w8.down[2 * E + 5].q, quantize(deq, "q8").q)
    assert ((w8.down[2 * E + 5].dequantize(torch.float32) - deq).abs() <= error_bound(quantize(deq, "q8"), deq)).all()
    ids = prompt(16, seed=5)
    r = rel(ours(lay8, ResidentExperts.from_layout(lay8)).forward(ids, 0, all_logits=True), theirs(ref, ids))
    assert r < 2e-2, r


def test_fp8_dense_in_small_chunks(fp8, tmp_path, monkeypatch):
    """Copied and dequantized fp8 dense tensors are streamed in pieces: with a tiny chunk the files are the same."""
    import tiered.layout.repack as rp

    root, _, _ = fp8
    for dense in ("source", "bf16"):
        repack(root / "ck", tmp_path / f"big_{dense}", dense=dense, progress=False)
        with monkeypatch.context() as m:
            m.setattr(rp, "CHUNK", 1000)
            repack(root / "ck", tmp_path / f"small_{dense}", dense=dense, progress=False)
        for f in ("dense.safetensors", "experts.bin"):
            assert (tmp_path / f"big_{dense}" / f).read_bytes() == (tmp_path / f"small_{dense}" / f).read_bytes()


def test_fp8_checkpoint_errors(fp8, tmp_path):
    """An fp8 weight without its scales, and scales of the wrong shape, are refused by name before anything is
    written."""
    from tiered.layout.repack import RepackError

    root, sd, _ = fp8
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    for what, bad, match in (("missing", {k: v for k, v in sd.items() if k != name + "_scale_inv"},
                              "experts.3.up_proj.weight is float8_e4m3fn without"),
                             ("shape", {**sd, name + "_scale_inv": torch.ones(1, 1)}, "expected one float scale")):
        ck = tmp_path / what
        ck.mkdir()
        save_file(bad, str(ck / "model.safetensors"), metadata={"format": "pt"})
        shutil.copyfile(root / "ck" / "config.json", ck / "config.json")
        with pytest.raises(RepackError, match=match):
            repack(ck, tmp_path / f"lay_{what}", progress=False)
        assert not (tmp_path / f"lay_{what}").exists()


def fp8_blockwise_deq(q, s):
    n, k = q.shape
    return q.float() * s.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]


@pytest.mark.cuda
def test_cuda_graph_decode_matches_eager(ds):
    """On CUDA (fp32): the captured one-token step (MLA latent cache read through device positions, dense layer
    0 without routing) gives the eager run's greedy tokens and logits close to transformers'."""
    import tiered

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    hf, lay, _, _, _ = ds
    text = "def main():\n    x = 1\n"
    want = tiered.load(lay.path, device="cpu", dtype="float32", max_context=CTX).generate(
        text, max_new_tokens=12, temperature=0.0, stop_at_eos=False).token_ids
    eng = tiered.load(lay.path, device="cuda", dtype="float32", max_context=CTX)
    got = eng.generate(text, max_new_tokens=12, temperature=0.0, stop_at_eos=False)
    assert got.token_ids == want
    ids = prompt(40)
    assert rel(eng.logits(ids).cpu(), theirs(hf, ids)) <= 1e-3  # TF32 / kernel order on the GPU


@pytest.mark.cuda
def test_cuda_fp8_layout_matches_transformers(fp8):
    """On CUDA (fp32): the fp8 pass-through layout (fp8 experts and dense weights, fused kernels where they serve)
    gives logits close to transformers on the dequantized weights, through the engine (graphs on)."""
    import tiered

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    root, _, ref = fp8
    if not (root / "lay").is_dir():
        repack(root / "ck", root / "lay", progress=False)
    eng = tiered.load(root / "lay", device="cuda", dtype="float32", max_context=CTX)
    ids = prompt(40, seed=8)
    assert rel(eng.logits(ids).cpu(), theirs(ref, ids)) <= 1e-3  # TF32 / kernel order on the GPU
    out = eng.generate(ids.tolist(), max_new_tokens=8, temperature=0.0, stop_at_eos=False)
    assert len(out.token_ids) == 8
