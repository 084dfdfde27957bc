"""Gated DeltaNet math against transformers' own torch forms, and our chunked form against our recurrent one.

CPU, fp32. The grid includes 1 token, odd lengths, lengths across several chunks, grouped value heads."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tiered.model.deltanet import (CHUNK, causal_conv, chunk_gated_delta_rule, delta_rule, pick_delta_backend,
                                   recurrent_gated_delta_rule)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def inputs(T, Hk, Hv, dk, dv, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, Hk, dk, generator=g)
    k = torch.randn(T, Hk, dk, generator=g)
    v = torch.randn(T, Hv, dv, generator=g)
    gate = -torch.rand(T, Hv, generator=g) * 2  # log decay <= 0
    beta = torch.rand(T, Hv, generator=g)
    s0 = torch.randn(Hv, dk, dv, generator=g) * 0.1
    return q, k, v, gate, beta, s0


GRID = [(1, 2, 2, 8, 8), (7, 2, 4, 8, 6), (CHUNK + 5, 1, 3, 16, 8), (3 * CHUNK, 2, 2, 4, 4), (130, 2, 4, 8, 16)]


@pytest.mark.parametrize("T,Hk,Hv,dk,dv", GRID)
def test_forms_match_transformers(T, Hk, Hv, dk, dv):
    """Our chunked and recurrent forms (from a nonzero state) equal transformers' torch_chunk/torch_recurrent
    gated delta rule, outputs and final states, within 1e-5 relative."""
    from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as m

    q, k, v, g, beta, s0 = inputs(T, Hk, Hv, dk, dv, seed=T)
    ref_o, ref_s = m.torch_recurrent_gated_delta_rule(q[None], k[None], v[None], g[None], beta[None],
                                                      initial_state=s0[None].clone(), output_final_state=True,
                                                      use_qk_l2norm_in_kernel=True)
    s1, s2 = s0.clone(), s0.clone()
    o1 = chunk_gated_delta_rule(q, k, v, g, beta, s1)
    o2 = recurrent_gated_delta_rule(q, k, v, g, beta, s2)
    for o, s, name in ((o1, s1, "chunk"), (o2, s2, "recurrent")):
        assert rel(o, ref_o[0]) < 1e-5, f"{name} output rel {rel(o, ref_o[0]):.2e}"
        assert rel(s, ref_s[0]) < 1e-5, f"{name} state rel {rel(s, ref_s[0]):.2e}"
    cho, chs = m.torch_chunk_gated_delta_rule(q[None], k[None], v[None], g[None], beta[None],
                                              initial_state=s0[None].clone(), output_final_state=True,
                                              use_qk_l2norm_in_kernel=True)
    assert rel(o1, cho[0]) < 1e-5 and rel(s1, chs[0]) < 1e-5


def test_chunked_prefill_then_steps_equals_one_pass():
    """Prefill in two uneven chunked calls then one-token recurrent steps gives the one-pass output (state carries)."""
    q, k, v, g, beta, _ = inputs(150, 2, 4, 8, 8, seed=9)
    s_all = torch.zeros(4, 8, 8)
    ref = chunk_gated_delta_rule(q, k, v, g, beta, s_all)
    s = torch.zeros(4, 8, 8)
    parts = [delta_rule(q[:70], k[:70], v[:70], g[:70], beta[:70], s, backend="torch"),
             delta_rule(q[70:141], k[70:141], v[70:141], g[70:141], beta[70:141], s, backend="torch")]
    parts += [delta_rule(q[t:t + 1], k[t:t + 1], v[t:t + 1], g[t:t + 1], beta[t:t + 1], s, backend="torch")
              for t in range(141, 150)]
    assert rel(torch.cat(parts), ref) < 1e-5
    assert rel(s, s_all) < 1e-5


@pytest.mark.parametrize("T", [1, 2, 3, 9])
def test_causal_conv_matches_padded_conv(T):
    """The rolling-state conv over successive calls equals one zero-padded causal conv1d + SiLU over the whole input."""
    C, W = 6, 4
    g = torch.Generator().manual_seed(T)
    x = torch.randn(3 * T + 1, C, generator=g)
    w = torch.randn(C, W, generator=g)
    ref = F.silu(F.conv1d(x.t()[None], w[:, None, :], padding=W - 1, groups=C)[0, :, :x.shape[0]]).t()
    state = torch.zeros(C, W - 1)
    got = torch.cat([causal_conv(x[0:T], w, state), causal_conv(x[T:2 * T], w, state),
                     causal_conv(x[2 * T:3 * T], w, state), causal_conv(x[3 * T:], w, state)])
    assert rel(got, ref) < 1e-6
    assert torch.equal(state, x[-(W - 1):].t())


def test_backend_choice_on_cpu():
    """On CPU "auto" is the torch path and asking for fla fails with a message naming the fix."""
    assert pick_delta_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="flash-linear-attention"):
        pick_delta_backend("fla", torch.device("cpu"))
