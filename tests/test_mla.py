"""DeepSeek-V3 pieces against transformers' own modules (fp32 CPU): MLA over the latent cache (expanded and
absorbed paths, prefill then decode), YaRN rope tables with mscale, and the sigmoid + bias + group routing rule.
The full DeepSeek-V3 decoder is not wired yet (see tiered/model/mla.py)."""
from __future__ import annotations

import pytest
import torch

from tiered.model.layers import StepPlan, attn_mask
from tiered.model.mla import MLACache, MLADims, MLAWeights, mla_attention, mla_softmax_scale
from tiered.model.rope import inv_freq_and_scale
from tiered.model.routing import sigmoid_groups

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 10000.0}


def ds_config(**kw):
    import transformers as tf

    base = dict(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=3, n_group=4,
                topk_group=2, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=16,
                qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12, max_position_embeddings=128)
    return tf.DeepseekV3Config(**{**base, **kw})


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("rope", [None, YARN])
@pytest.mark.parametrize("q_lora", [24, None])
def test_mla_matches_transformers(rope, q_lora):
    """Prefill of 9 tokens then 5 one-token steps through the latent cache, expanded and absorbed paths, against
    transformers' DeepseekV3Attention over the whole sequence."""
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as m

    cfg = ds_config(q_lora_rank=q_lora, **({"rope_parameters": rope} if rope else {}))
    torch.manual_seed(0)
    attn = m.DeepseekV3Attention(cfg, 0).float().eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.2)
    rot = m.DeepseekV3RotaryEmbedding(cfg)
    T = 14
    x = torch.randn(1, T, 32)
    pos = torch.arange(T)[None]
    cos, sin = rot(x, pos)
    mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        want = attn(x, (cos, sin), mask)[0][0]
    # our tables from model/rope.py (checked against transformers' here too)
    inv, sc = inv_freq_and_scale(cfg.rope_parameters["rope_theta"], 8, rope, 128, torch.device("cpu"))
    emb = torch.cat([torch.arange(T)[:, None] * inv[None]] * 2, dim=-1)
    c, s = emb.cos() * sc, emb.sin() * sc
    assert torch.allclose(c, cos[0], atol=1e-6) and torch.allclose(s, sin[0], atol=1e-6)
    s = s.clone()
    s[:, :4].neg_()
    a = attn
    w = MLAWeights(q_a=a.q_a_proj.weight if q_lora else None, q_a_norm=a.q_a_layernorm.weight if q_lora else None,
                   q_b=a.q_b_proj.weight if q_lora else a.q_proj.weight, kv_a=a.kv_a_proj_with_mqa.weight,
                   kv_a_norm=a.kv_a_layernorm.weight, kv_b=a.kv_b_proj.weight, o=a.o_proj.weight)
    dims = MLADims(heads=4, q_lora_rank=q_lora, kv_lora_rank=16, nope=8, rope=8, v=12, interleave=cfg.rope_interleave,
                   eps=cfg.rms_norm_eps)
    scale = mla_softmax_scale(dims, rope)
    assert scale == pytest.approx(a.scaling)
    for absorbed in (False, True):
        cache = MLACache.allocate(1, 32, dims, device=torch.device("cpu"), dtype=torch.float32)
        rows = []
        with torch.no_grad():
            P = 9
            plan = StepPlan(c[:P], s[:P], 0, 0, P, attn_mask(torch.arange(P), 0, P, window=None, groups=1))
            rows.append(mla_attention(x[0, :P], w, cache, 0, plan, dims, scale, absorbed=absorbed))
            for i in range(P, T):
                plan = StepPlan(c[i:i + 1], s[i:i + 1], i, 0, i + 1, None)
                rows.append(mla_attention(x[0, i:i + 1], w, cache, 0, plan, dims, scale, absorbed=absorbed))
        r = rel(torch.cat(rows), want)
        print(f"mla absorbed={absorbed} rope={'yarn' if rope else 'default'} q_lora={q_lora}: rel {r:.2e}")
        assert r <= 1e-5, f"absorbed={absorbed}: rel {r:.2e}"


def test_sigmoid_group_routing_matches_transformers():
    """Ids (as sets) and weights of the DeepSeek-V3 router, over random logits with a random correction bias."""
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as m

    cfg = ds_config(norm_topk_prob=True, routed_scaling_factor=2.5)
    torch.manual_seed(1)
    router = m.DeepseekV3TopkRouter(cfg)
    with torch.no_grad():
        router.weight.normal_(0, 0.5)
        router.e_score_correction_bias.normal_(0, 0.3)
    x = torch.randn(33, 32)
    with torch.no_grad():
        logits, w_ref, ids_ref = router(x)
    ids, w = sigmoid_groups(logits, 3, True, score_bias=router.e_score_correction_bias, n_group=4, topk_group=2,
                            scale=2.5)
    o1, o2 = ids.sort(-1), ids_ref.sort(-1)
    assert torch.equal(o1.values, o2.values)
    assert torch.allclose(w.gather(1, o1.indices), w_ref.gather(1, o2.indices), atol=1e-6)
    # the group limit binds: without it, some token would pick an expert outside its top-2 groups
    free, _ = sigmoid_groups(logits, 3, True, score_bias=router.e_score_correction_bias, n_group=1, topk_group=1,
                             scale=2.5)
    assert not torch.equal(free.sort(-1).values, o1.values)
