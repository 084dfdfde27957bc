"""The fused one-token Gated DeltaNet step (kernels/deltanet_step.py) against the torch path of model/deltanet.py,
and the shared expert's fused path (kernels/shared_expert.py) against model/moe.shared_expert.

On CPU the kernels run under Triton's interpreter (conftest sets TRITON_INTERPRET without CUDA) on tiny shapes,
including grouped value heads, head dims that are not powers of two (masked tiles), several rows (the batch step)
and a run of steps (the states carry over); a fresh process compiles both kernels for sm_90 down to the cubin.
On CUDA: a Qwen3.5-MoE layout decodes the same greedy tokens with the fused step as with the torch step, and
fla's one-token kernel where it imports.
"""
from __future__ import annotations

import pytest
import torch

from tiered.model.deltanet import DeltaShape, DeltaWeights, deltanet, deltanet_rows, pick_delta_step

triton = pytest.importorskip("triton")


def _layer(D: int, Hk: int, Hv: int, dk: int, dv: int, W: int, dtype: torch.dtype, seed: int = 0,
           stacked: bool = False):
    g = torch.Generator().manual_seed(seed)
    C = 2 * Hk * dk + Hv * dv

    def r(*shape, s=0.3, dt=dtype):
        return (torch.randn(*shape, generator=g) * s).to(dt)

    make = DeltaWeights.stacked if stacked else DeltaWeights
    w = make(qkv=r(C, D), z=r(Hv * dv, D), b=r(Hv, D), a=r(Hv, D), conv=r(C, W, s=0.5),
             A_log=r(Hv, s=0.5, dt=torch.float32), dt_bias=r(Hv, s=0.5), norm=1 + r(dv, s=0.1), out=r(D, Hv * dv))
    assert (w.proj is not None) == stacked
    return w, DeltaShape(Hk, Hv, dk, dv, W, 1e-6), C


def _states(B: int, C: int, W: int, Hv: int, dk: int, dv: int, dtype: torch.dtype, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    conv = (torch.randn(B, C, W - 1, generator=g) * 0.5).to(dtype)
    rec = torch.randn(B, Hv, dk, dv, generator=g) * 0.1
    return conv, rec


SHAPES = [  # D, Hk, Hv, dk, dv, W
    (32, 2, 4, 16, 16, 4),  # grouped value heads (G = 2), Qwen3.5's conv kernel
    (24, 1, 3, 12, 20, 3),  # G = 3, dims that are not powers of two (masked tiles), a shorter conv
    (16, 2, 2, 8, 40, 2),  # G = 1, dv over two column blocks of 32, W = 2 (no state shift)
]


@pytest.mark.parametrize("shape", SHAPES, ids=["G2", "G3-odd", "G1-dv40"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_step_matches_torch_over_several_steps(shape, dtype):
    """Five one-token steps of one sequence: outputs and both states match the torch recurrence (fp32 to 1e-5;
    bf16 within its rounding), and the conv state holds exactly the last W-1 inputs."""
    D, Hk, Hv, dk, dv, W = shape
    w, s, C = _layer(D, Hk, Hv, dk, dv, W, dtype)
    conv, rec = _states(1, C, W, Hv, dk, dv, dtype)
    conv_r, rec_r = conv[0].clone(), rec[0].clone()
    conv_k, rec_k = conv[0].clone(), rec[0].clone()
    xs = torch.randn(5, 1, D, generator=torch.Generator().manual_seed(2)).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for x in xs:
        want = deltanet(x, w, s, conv_r, rec_r, backend="torch", step="torch")
        got = deltanet(x, w, s, conv_k, rec_k, backend="torch", step="triton")
        assert got.dtype == want.dtype and got.shape == want.shape == (1, D)
        assert float((got.float() - want.float()).norm() / want.float().norm()) <= tol
    assert float((rec_k - rec_r).norm() / rec_r.norm()) <= (1e-5 if dtype == torch.float32 else 2e-2)
    assert torch.equal(conv_k, conv_r)  # the same inputs, shifted: bit-identical


@pytest.mark.parametrize("stacked", [False, True], ids=["separate", "stacked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rows_match_one_sequence_at_a_time(dtype, stacked):
    """deltanet_rows with the fused step (three sequences at once, each on its own states) equals each sequence
    through the torch step alone; with the projections stacked, the kernels read column views of one GEMV's rows."""
    D, Hk, Hv, dk, dv, W = SHAPES[0]
    w, s, C = _layer(D, Hk, Hv, dk, dv, W, dtype, seed=3, stacked=stacked)
    conv, rec = _states(3, C, W, Hv, dk, dv, dtype, seed=4)
    x = torch.randn(3, D, generator=torch.Generator().manual_seed(5)).to(dtype)
    want = []
    conv_r, rec_r = conv.clone(), rec.clone()
    for b in range(3):
        want.append(deltanet(x[b:b + 1], w, s, conv_r[b], rec_r[b], backend="torch", step="torch"))
    got = deltanet_rows(x, w, s, conv, rec, backend="torch", step="triton")
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert float((got.float() - torch.cat(want).float()).norm() / torch.cat(want).float().norm()) <= tol
    # the newest conv input is the projection of three rows at once against one row: equal up to GEMM blocking
    assert float((conv - conv_r).float().norm() / conv_r.float().norm()) <= tol
    assert float((rec - rec_r).norm() / rec_r.norm()) <= tol


def test_step_choice():
    """auto takes the fused kernels only where the model runs Triton kernels; asking for them elsewhere, or for fla's
    step without the fla backend, is an error that says what is missing."""
    assert pick_delta_step("auto", "torch", kernels=False) == "torch"
    assert pick_delta_step("auto", "fla", kernels=True) == "triton"
    assert pick_delta_step("fla", "fla", kernels=True) == "fla"
    with pytest.raises(ValueError, match="Triton kernels"):
        pick_delta_step("triton", "torch", kernels=False)
    with pytest.raises(ValueError, match="fla backend"):
        pick_delta_step("fla", "torch", kernels=True)
    with pytest.raises(ValueError, match="one of"):
        pick_delta_step("fast", "torch", kernels=True)


def test_rejects_mismatched_states():
    from tiered.kernels.deltanet_step import deltanet_step

    D, Hk, Hv, dk, dv, W = SHAPES[0]
    w, s, C = _layer(D, Hk, Hv, dk, dv, W, torch.float32)
    conv, rec = _states(1, C, W, Hv, dk, dv, torch.float32)
    qkv, z = torch.zeros(1, C), torch.zeros(1, Hv * dv)
    ab = torch.zeros(1, Hv)
    with pytest.raises(ValueError, match="contiguous"):
        deltanet_step(qkv, w.conv, conv, ab, ab, w.A_log, w.dt_bias, rec.transpose(2, 3), z, w.norm,
                      num_k_heads=Hk, eps=1e-6)
    with pytest.raises(ValueError, match="conv_state"):
        deltanet_step(qkv, w.conv, conv[:, :, :1].contiguous(), ab, ab, w.A_log, w.dt_bias, rec, z, w.norm,
                      num_k_heads=Hk, eps=1e-6)


_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tiered.kernels import deltanet_step as ds
from tiered.kernels import shared_expert as se
tgt = GPUTarget("cuda", 90, 32)
for dt in ("*bf16", "*fp32"):
    sig = {"x_ptr": dt, "w_ptr": dt, "st_ptr": dt, "out_ptr": dt, "C": "i32", "x_stride": "i32", "W": "constexpr",
           "BLOCK": "constexpr"}
    assert triton.compile(ASTSource(ds._conv_step_kernel, sig, constexprs={"W": 4, "BLOCK": ds.CONV_BLOCK}),
                          target=tgt).asm["cubin"]
    sig = {"qkv_ptr": dt, "a_ptr": dt, "b_ptr": dt, "alog_ptr": "*fp32", "dtb_ptr": dt, "s_ptr": "*fp32",
           "z_ptr": dt, "nw_ptr": dt, "out_ptr": dt, "C": "i32", "Hv": "i32", "Kd": "i32", "ab_stride": "i32",
           "z_stride": "i32", "q_scale": "fp32",
           "eps": "fp32", "G": "constexpr", "DK": "constexpr", "DV": "constexpr", "BK": "constexpr", "BV": "constexpr"}
    cx = {"G": 4, "DK": 128, "DV": 128, "BK": 128, "BV": ds.DELTA_BV}
    assert triton.compile(ASTSource(ds._delta_step_kernel, sig, constexprs=cx), target=tgt).asm["cubin"]
    sig = {"y_ptr": dt, "h_ptr": dt, "F": "i32", "y_stride": "i32", "BLOCK": "constexpr"}
    assert triton.compile(ASTSource(se._swiglu_rows_kernel, sig, constexprs={"BLOCK": se.BLOCK}), target=tgt).asm["cubin"]
    for gated in (True, False):
        sig = {"out_ptr": dt, "d_ptr": dt, "s_ptr": dt, "res_ptr": dt, "D": "i32", "s_stride": "i32",
               "GATED": "constexpr", "BLOCK": "constexpr"}
        assert triton.compile(ASTSource(se._gated_add_kernel, sig, constexprs={"GATED": gated, "BLOCK": se.BLOCK}),
                              target=tgt).asm["cubin"]
print("ok")
"""


def test_kernels_compile_for_sm90():
    """The real compiler accepts both kernels for an H100/H200 target (bf16 and fp32), in a fresh process without
    TRITON_INTERPRET: what would otherwise fail only on the GPU box fails here."""
    from conftest import compile_sm90

    compile_sm90(_COMPILE)


@pytest.mark.cuda
def test_cuda_qwen35_greedy_identical(tmp_path):
    """CUDA, fp32: a tiny Qwen3.5-MoE decodes the same greedy tokens with the fused step as with the torch step
    (and fla's where it imports), graphs on; bf16 logits of the fused and torch steps agree within 2e-2."""
    import tiered
    from conftest import make_checkpoint
    from tiered.layout.repack import repack

    ck = make_checkpoint(tmp_path / "ck", "qwen3_5_moe", seed=4, vocab_size=512)
    repack(ck, tmp_path / "lay", progress=False)
    lay = tmp_path / "lay"
    want = None
    steps = ["torch", "triton"] + (["fla"] if tiered.load(lay, device="cuda").model.linear_attn == "fla" else [])
    for st in steps:
        e = tiered.load(lay, device="cuda", dtype="float32", max_context=128, delta_step=st,
                        linear_attn="fla" if st == "fla" else "auto")
        assert e.model.delta_step == st
        toks = e.generate(list(range(3, 40)), max_new_tokens=24, stop_at_eos=False).token_ids
        assert e.decode_mode == "full"
        want = toks if want is None else want
        assert toks == want, st


# --- the shared expert's kernels (kernels/shared_expert.py) ---

@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T", [1, 3])
def test_shared_expert_fused_matches_torch(gated, dtype, T):
    """add_shared_expert's fused path (stacked input projections, SwiGLU and gated-add kernels under the
    interpreter) equals the routed output plus moe.shared_expert: bit for bit in fp32 up to GEMV blocking, and
    within one bf16 rounding in bf16."""
    from tiered.model.moe import MoEWeights, add_shared_expert, shared_expert

    g = torch.Generator().manual_seed(7)
    D, Fs = 40, 24  # not multiples of the block
    r = lambda *s: (torch.randn(*s, generator=g) * 0.3).to(dtype)  # noqa: E731
    kw = dict(router=r(8, D), shared_gate=r(Fs, D), shared_up=r(Fs, D), shared_down=r(D, Fs),
              shared_expert_gate=r(1, D) if gated else None)
    w = MoEWeights.stacked(**kw)
    assert w.shared_in is not None and w.shared_in.shape == (2 * Fs + gated, D)
    x, out = r(T, D), r(T, D)
    want = out + shared_expert(x, MoEWeights(**kw))
    got = add_shared_expert(out, x, w, fused=True)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert got.dtype == want.dtype and float((got.float() - want.float()).norm() / want.float().norm()) <= tol
    assert torch.equal(add_shared_expert(out, x, w, fused=False), want)  # the views hold the same weights
