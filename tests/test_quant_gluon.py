"""The Gluon q4 GEMV on tensor cores (tiered/kernels/quant_gluon.py, QConfig.algo 3).

Gluon has no interpreter, so on CPU: the kernel's index math (`emulate`) against the dequantized reference, where
the kernel serves and where quant_matvec falls back to the word tile (under Triton's interpreter), and the kernel
compiled for sm_90 with PDL (the first step's weights loaded before griddepcontrol.wait). On CUDA (marked `cuda`):
the kernel itself against the reference, rows of x, a partial last block, programs looping over blocks, PDL, and
inside a CUDA graph.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from tiered.kernels import quant_gluon as qg  # noqa: E402
from tiered.kernels.quant_moe import QConfig, quant_matvec, quant_matvec_ref  # noqa: E402
from tiered.layout.quant import quantize  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
REPO = Path(__file__).resolve().parent.parent


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12))


@pytest.mark.parametrize("N,K,G", [(1, 64, 1), (48, 64, 1), (33, 512, 1), (70, 704, 1), (5, 1024, 1), (48, 128, 2),
                                   (33, 1024, 2), (70, 1408, 2), (5, 2048, 2), (9, 256, 4), (7, 1280, 4)])
def test_emulated_index_math_matches_reference(N, K, G):
    """emulate (the kernel's word, nibble and x indices, its 8-group accumulator with the 128 offset and the
    epilogue) equals the dequantized product: one group, 8 groups (one epilogue), 11 (a partial one), 16 (two);
    two groups a step (16 words, a column each): one step, 8 steps, 11 (a partial epilogue), 16; four: one step,
    five (a partial epilogue)."""
    g = torch.Generator().manual_seed(N + K)
    w = quantize(torch.randn(N, K, generator=g) * K ** -0.5, "q4")
    x = torch.randn(K, generator=g).to(torch.bfloat16)
    assert rel(qg.emulate(x, w, groups=G), quant_matvec_ref(x.float()[None], w)[0]) < 1e-6


def test_emulate_catches_a_wrong_nibble_order():
    """The check above can fail: the same math with a pair's nibbles taken in plain order misses the reference."""
    g = torch.Generator().manual_seed(3)
    w = quantize(torch.randn(16, 128, generator=g) * 0.1, "q4")
    x = torch.randn(128, generator=g).to(torch.bfloat16)
    words = w.q.view(torch.int32)
    swapped = dataclasses.replace(w, q=(((words & 0x0F0F0F0F) << 4) | ((words >> 4) & 0x0F0F0F0F)).view(torch.uint8))
    assert rel(qg.emulate(x, swapped), quant_matvec_ref(x.float()[None], w)[0]) > 0.1


def test_where_it_serves():
    """One q4 matrix in groups of 64 with bf16 x on CUDA; a stack, another group, another format or CPU x are
    refused (quant_matvec then takes the word tile), and matvec says so."""
    w = quantize(torch.randn(8, 128) * 0.1, "q4")
    assert qg.weight_ok(w)
    assert not qg.weight_ok(quantize(torch.randn(2, 8, 128) * 0.1, "q4"))
    assert not qg.weight_ok(quantize(torch.randn(8, 32) * 0.1, "q4"))  # a row narrower than 64: one group of 32
    assert not qg.weight_ok(quantize(torch.randn(8, 128) * 0.1, "q8"))
    x = torch.randn(1, 128).bfloat16()
    assert not qg.gemv_ok(x, w)  # CPU
    with pytest.raises(ValueError, match="does not serve"):
        qg.matvec(x, w)
    with pytest.raises(ValueError, match="algo 3"):
        QConfig(bn=32, algo=3)
    with pytest.raises(ValueError, match="algo 3"):
        QConfig(bn=128, algo=3, act=1)
    with pytest.raises(ValueError, match="algo 3"):
        QConfig(bn=128, algo=3, ahead=3)
    assert qg.constexprs(704, 64, ahead=4)["D"] == 1 and qg.constexprs(768, 64, ahead=4)["D"] == 4  # 11, 12 steps


@pytest.mark.skipif(DEV == "cuda", reason="the fallback is the CPU path")
def test_algo3_falls_back_to_the_word_tile_off_cuda():
    """Under Triton's interpreter an algo 3 config runs the word tile of min(bn, 32) rows: the same values."""
    g = torch.Generator().manual_seed(5)
    w = quantize(torch.randn(40, 192, generator=g) * 0.1, "q4")
    x = torch.randn(2, 192, generator=g)
    cfg = QConfig(bn=128, bg=2, warps=2, algo=3, ahead=4)
    got = quant_matvec(x, w, config=cfg)
    assert torch.equal(got, quant_matvec(x, w, config=dataclasses.replace(cfg, algo=2, bn=32, ahead=0)))
    assert rel(got, quant_matvec_ref(x, w)) < 1e-5


def test_compiles_for_sm90_with_pdl():
    """The kernel compiles for sm_90 with no GPU, 1, 2 and 4 steps a load, 1, 2 and 4 groups a step: a program a
    block with PDL loads its first steps of weights before griddepcontrol.wait (and x only after it); looping
    programs wait first; without GDC there is no wait; a row's words come 8 bytes a load, 16 at two or four groups
    a step. In a subprocess with the interpreter off (Gluon compiles only there)."""
    pytest.importorskip("triton.experimental.gluon")
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("this Triton build has no NVIDIA backend")
    code = f"""
import sys; sys.path.insert(0, {str(REPO)!r})
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from tiered.kernels import quant_gluon as qg
variants = ((False, True, True, 4, 1), (True, True, True, 2, 1), (False, False, False, 1, 1), (False, True, True, 2, 2),
            (False, True, True, 1, 4))
for persist, gdc, pre, ahead, groups in variants:
    cst = qg.constexprs(512, 64, ahead=ahead, groups=groups, persist=persist, gdc=gdc, pre=pre)
    sig = dict(x_ptr="*bf16", q_ptr="*i32", s_ptr="*bf16", m_ptr="*bf16", out_ptr="*bf16", N="i32", stride_xt="i32",
               stride_qn="i32", stride_sn="i32", stride_mn="i32", stride_ot="i32", **{{c: "constexpr" for c in cst}})
    attrs = {{(i,): [["tt.divisibility", 16]] for i in range(11) if i != 5}}  # 16-byte aligned pointers and strides
    ptx = triton.compile(GluonASTSource(qg.KERNEL, sig, cst, attrs), target=GPUTarget("cuda", 90, 32),
                         options={{"num_warps": 4}}).asm["ptx"]
    wait = ptx.find("griddepcontrol.wait")
    first = ptx.find("ld.global")
    assert (wait >= 0) == gdc, (persist, gdc)
    assert (0 <= first < wait) == (gdc and not persist), (persist, gdc, first, wait)
    assert ptx.count("mma.sync") > 0 and "st.shared" not in ptx.split("mma.sync")[0], "an operand via shared memory"
    assert ("ld.global.v2.b32" in ptx) == (groups == 1), "a row's words: 8 bytes a load, 16 at two groups a step"
print("ok")
"""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


@pytest.mark.cuda
@pytest.mark.parametrize("N,K,T", [(151936, 2048, 1), (5120, 2048, 2), (2048, 4096, 1), (70, 704, 2)])
def test_cuda_kernel_matches_reference(N, K, T):
    """The kernel at the 10.6B shape's lm_head, qkv and o_proj and at a small odd one (a partial block, a partial
    epilogue, 11 groups: one a step and a load where 2 and 4 do not divide them): 1, 2 and 4 steps a load, 1 and 2
    groups a step, a program a block
    and looping programs, with and without PDL, fp32 and bf16 out, against the
    dequantized reference; then inside a CUDA graph through quant_matvec's algo 3."""
    from tiered.kernels.pdl import launch_args

    g = torch.Generator(device=DEV).manual_seed(N)
    w = quantize(torch.randn(N, K, generator=g, device=DEV) * K ** -0.5, "q4")
    x = torch.randn(T, K, generator=g, device=DEV).to(torch.bfloat16)
    ref = quant_matvec_ref(x.float(), w)
    assert qg.gemv_ok(x, w)
    for bn, ahead, groups in ((64, 1, 1), (64, 4, 1), (128, 2, 1), (64, 2, 2), (128, 4, 2), (64, 2, 4)):
        for persist in (0, 2):
            for launch in (None, launch_args(x.device)):
                got = qg.matvec(x, w, out_dtype=torch.float32, bn=bn, ahead=ahead, groups=groups, persist=persist,
                                launch=launch)
                assert rel(got, ref) < 1e-5, (bn, ahead, groups, persist, launch)
    cfg = QConfig(bn=64, algo=3, ahead=4)
    quant_matvec(x, w, config=cfg)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = quant_matvec(x, w, config=cfg)
    x.copy_(torch.randn(T, K, generator=g, device=DEV).to(torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    assert out.dtype == torch.bfloat16 and rel(out.float(), quant_matvec_ref(x.float(), w)) < 1e-2
