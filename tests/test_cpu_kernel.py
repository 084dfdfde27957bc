"""The native CPU expert kernel (kernels/cpu_kernel.c, cpu_kernel.py) against the torch reference (cpu_partial
without a kernel): every stored format it reads, fp32 and bf16 compute, odd sizes, 1 and several experts, rows
of the block layout's strided views, thread counts; its AVX2 and portable builds; what it refuses; the
fallback without a compiler. Native-only checks skip when this machine cannot build the kernel."""
from __future__ import annotations

import platform

import pytest
import torch

from tiered.layout.format import plan_block
from tiered.layout.quant import QuantWeight, quantize
from tiered.kernels import cpu_kernel
from tiered.model.cpu_experts import cpu_partial
from tiered.kernels.cpu_kernel import CpuKernel
from tiered.model.moe import ClampedSwiGLU
from tiered.store.disk import expert_views

STORED = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "q8": "q8", "q4": "q4", "fp8": "fp8"}
# (D, F): odd sizes, not multiples of 8/16/64; q4 groups the whole row below 64 inputs, q8 has a short last group
SHAPES = [(64, 48), (257, 33), (130, 200), (384, 96)]


@pytest.fixture(scope="module")
def kern() -> CpuKernel:
    k = CpuKernel.load(warn=False)
    if k is None:
        pytest.skip("no native CPU expert kernel on this machine (no C compiler or the build failed)")
    return k


def _pool(fmt: str, D: int, F: int, n: int, seed: int = 0):
    """n random experts in the expert block layout (views over a uint8 pool, as the RAM tier and the file
    mapping give them): quantized formats hold quantize() of random weights."""
    dt = STORED[fmt]
    specs, bs = plan_block({"gate": ((F, D), dt), "up": ((F, D), dt), "down": ((D, F), dt)})
    pool = torch.zeros(n, bs, dtype=torch.uint8)
    W = expert_views(pool, specs)
    g = torch.Generator().manual_seed(seed)
    for m, shape in ((W.gate, (n, F, D)), (W.up, (n, F, D)), (W.down, (n, D, F))):
        w = torch.randn(shape, generator=g) * 0.1
        if fmt in ("q8", "q4", "fp8"):
            q = quantize(w, fmt)
            for name, part in q.parts().items():
                getattr(m, name).copy_(part)
        else:
            m.copy_(w)
    return W


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _jobs(W, rows: list[int]) -> list:
    return [(k, W, r) for k, r in enumerate(rows)]


@pytest.mark.parametrize("D,F", SHAPES)
@pytest.mark.parametrize("fmt", ["fp32", "bf16", "fp16", "q8", "q4"])
def test_matches_the_torch_reference(kern, fmt, D, F):
    """fp32 compute: within 1e-5 relative of the torch reference (the summation order differs); bf16 compute:
    within bf16 tolerance of it, and as close to the fp32 result as torch's bf16 path (within bf16 rounding); 1 and 5 experts,
    rows in any order, routing weights rounded or not."""
    if fmt == "fp16" and not kern.caps >> 2 & 1:
        pytest.skip("this compiler has no _Float16")
    W = _pool(fmt, D, F, 6)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, D, generator=g)
    w = torch.softmax(torch.randn(8, generator=g), 0)
    for rows in ([3], [5, 0, 2, 4, 1]):
        jobs = _jobs(W, rows)
        ref32 = cpu_partial(x, w, jobs, None)
        got32 = kern.partial(x, w, jobs, threads=2)
        assert got32 is not None and got32.dtype == torch.float32 and got32.shape == (1, D)
        assert _rel(got32, ref32) <= 1e-5
        xb = x.bfloat16()
        for fp32_weights in (False, True):
            ref = cpu_partial(xb, w, jobs, None, fp32_weights)
            got = kern.partial(xb, w, jobs, threads=2, fp32_weights=fp32_weights)
            assert got.dtype == torch.bfloat16
            assert _rel(got, ref) <= 2e-2
            assert _rel(got, ref32) <= 2 * max(_rel(ref, ref32), 2 ** -8)  # bf16's rounding, as torch


def test_bf16_weights_in_bf16_match_torch_closely(kern):
    """bf16 blocks computed in bf16 (the GPU runs' case): the same roundings as the reference, so only the
    fp32 accumulation order differs (bit for bit on the machine this was written on)."""
    W = _pool("bf16", 2048, 768, 8)
    x = torch.randn(1, 2048, generator=torch.Generator().manual_seed(2)).bfloat16()
    w = torch.rand(8, generator=torch.Generator().manual_seed(3))
    jobs = _jobs(W, list(range(8)))
    assert _rel(kern.partial(x, w, jobs, threads=2), cpu_partial(x, w, jobs, None)) <= 4e-3


@pytest.mark.parametrize("fmt", ["bf16", "q4"])
def test_thread_count_does_not_change_the_result(kern, fmt):
    """Each output row is computed by one thread in a fixed order: 1, 2 and 3 threads agree bit for bit."""
    W = _pool(fmt, 257, 130, 4)
    x = torch.randn(1, 257, generator=torch.Generator().manual_seed(4))
    jobs = _jobs(W, [2, 0, 3])
    w = torch.rand(3)
    outs = [kern.partial(x, w, jobs, threads=t) for t in (1, 2, 3)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_jobs_from_two_pools(kern):
    """A layer's jobs may come from the RAM tier's rows and from the file mapping (two views, one format)."""
    A, B = _pool("q8", 130, 70, 3, seed=5), _pool("q8", 130, 70, 4, seed=6)
    x = torch.randn(1, 130)
    w = torch.rand(4)
    jobs = [(0, A, 2), (1, B, 3), (2, A, 0), (3, B, 1)]
    assert _rel(kern.partial(x, w, jobs, threads=2), cpu_partial(x, w, jobs, None)) <= 1e-5


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 instruction-set variants")
@pytest.mark.parametrize("march", ["skylake-avx512", "haswell", "x86-64"])
def test_other_instruction_sets(kern, march):
    """The AVX-512 path without AVX512-BF16 (q4 in bf16 in fp32 FMAs), the AVX2+FMA and the plain-C paths of the
    same source agree with the reference too (built here, run only where this CPU has the instructions)."""
    if march == "skylake-avx512" and kern.simd != 512:
        pytest.skip("this CPU has no AVX-512")
    try:
        k = CpuKernel(cpu_kernel.build(march))
    except cpu_kernel.KernelUnavailable as e:
        pytest.skip(str(e))
    assert k.simd == {"skylake-avx512": 512, "haswell": 256, "x86-64": 0}[march] and not k.caps >> 9 & 1
    x = torch.randn(1, 257, generator=torch.Generator().manual_seed(7))
    w = torch.rand(3)
    for fmt in ("fp32", "bf16", "q8", "q4"):
        W = _pool(fmt, 257, 130, 3)
        jobs = _jobs(W, [1, 2, 0])
        assert _rel(k.partial(x, w, jobs, threads=2), cpu_partial(x, w, jobs, None)) <= 1e-5, fmt
        xb = x.bfloat16()
        assert _rel(k.partial(xb, w, jobs, threads=2), cpu_partial(xb, w, jobs, None)) <= 2e-2, fmt


def test_dense_row_prefetch_changes_no_result(kern):
    """PFD (dense rows asked into L2 some rows ahead) only moves loads earlier: builds with it off and at another
    distance give the default's experts and GEMV bit for bit, for every dense format."""
    try:
        others = [CpuKernel(cpu_kernel.build(defines=(d,))) for d in ("PFD=0", "PFD=3")]
    except cpu_kernel.KernelUnavailable as e:
        pytest.skip(str(e))
    x = torch.randn(1, 257, generator=torch.Generator().manual_seed(8))
    w = torch.rand(3)
    for fmt in ("fp32", "bf16", "fp16", "q8"):
        W = _pool(fmt, 257, 130, 3)
        jobs = _jobs(W, [1, 2, 0])
        m = _plain_or_quant(fmt, 130, 257)
        for xx in (x, x.bfloat16()):
            want = kern.partial(xx, w, jobs, threads=2)
            want_gemv = kern.gemv(x, m, threads=2)
            for k in others:
                assert torch.equal(k.partial(xx, w, jobs, threads=2), want), fmt
                assert torch.equal(k.gemv(x, m, threads=2), want_gemv), fmt


def test_unsupported_work_takes_torch(kern):
    """fp8 blocks, gpt-oss's clamped activation and expert biases: the kernel declines (None) and cpu_partial
    computes the torch reference instead."""
    x = torch.randn(1, 64)
    w = torch.rand(2)
    fp8 = _pool("fp8", 64, 48, 2)
    jobs = _jobs(fp8, [0, 1])
    assert kern.partial(x, w, jobs, threads=1) is None
    assert torch.equal(cpu_partial(x, w, jobs, None, kernel=kern), cpu_partial(x, w, jobs, None))
    bf = _pool("bf16", 64, 48, 2)
    act = ClampedSwiGLU()
    jobs = _jobs(bf, [0, 1])
    assert kern.partial(x, w, jobs, threads=1, act=act) is None
    assert not kern.supports(bf, act, torch.float32) and kern.supports(bf, None, torch.float32)
    assert torch.equal(cpu_partial(x, w, jobs, act, kernel=kern), cpu_partial(x, w, jobs, act))


def test_no_compiler_falls_back_with_a_warning(monkeypatch, capsys, tmp_path):
    """Without a C compiler (and no cached build) the loader returns None and says why on one line."""
    monkeypatch.setattr(cpu_kernel, "_compiler", lambda: None)
    assert CpuKernel.load() is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "torch" in err[0] and "no C compiler" in err[0]


def test_a_failing_build_falls_back(monkeypatch, capsys, tmp_path):
    """A compiler that fails (here: a flag it rejects) gives the same one-line fallback, nothing cached."""
    if cpu_kernel._compiler() is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(cpu_kernel, "CFLAGS", cpu_kernel.CFLAGS + ("-fno-such-flag-tiered",))
    assert CpuKernel.load() is None
    assert "failed" in capsys.readouterr().err
    assert not any(p.suffix == ".so" for p in tmp_path.rglob("*"))


def test_bench_tool_runs_and_reports(tmp_path):
    """tools/bench_cpu_experts.py at a tiny size: every path, the probe and the cost model's placements, one
    JSON line last (also written under $OUT)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, str(root / "tools" / "bench_cpu_experts.py"), "--hidden", "96", "--ffn", "40",
                        "--k", "3", "--threads", "1", "--repeats", "2", "--pool-gb", "0.001",
                        "--paths", "torch-bf16,bf16,q8,q4", "--links", "55,12"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OUT": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert (tmp_path / "bench_cpu_experts_96x40x3.json").exists()
    native = CpuKernel.load(warn=False) is not None
    paths = [row["path"] for row in res["runs"]]
    assert paths == (["torch-bf16", "bf16", "q8", "q4"] if native else ["torch-bf16"])
    for row in res["runs"]:
        assert row["gbps"] > 0 and row["probe"]["cpu_gbps"] > 0
        assert set(row["probe"]["to_cpu_of_misses"]) == {"55.0", "12.0"}
        assert row["probe"]["kernel"] == ("torch" if row["path"].startswith("torch") else "native-" + row["simd"])
    if not native:
        return
    r = subprocess.run([sys.executable, str(root / "tools" / "bench_cpu_experts.py"), "--hidden", "96", "--ffn", "40",
                        "--k", "3", "--threads", "1", "--repeats", "2", "--rounds", "2", "--pool-gb", "0.001",
                        "--paths", "bf16,q4@q8", "--variant", "a=", "--variant", "b=PFD=0,PFQ=0"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OUT": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert [(row["path"], row["variant"], row["calls"]) for row in res["runs"]] == [
        ("bf16", "a", 4), ("bf16", "b", 4), ("q4@q8", "a", 4), ("q4@q8", "b", 4)]
    assert all(row["gbps"] > 0 for row in res["runs"])


# --- tokens through one stored matrix (tiered_cpu_gemv for a few, tiered_cpu_gemm's tiles for more: qlinear's and
# the prefill experts' CPU path) ---

GEMV_SHAPES = [(4, 64), (7, 100), (33, 65), (130, 257), (256, 2048)]  # (N, K): N not a multiple of 4, short groups


def _matrix(fmt: str, n: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return quantize((torch.randn(n, k, generator=g) * 0.1).to(torch.bfloat16), fmt)


def _dense(w) -> torch.Tensor:
    return w.dequantize(torch.float32) if isinstance(w, QuantWeight) else w.float()


def _plain_or_quant(fmt: str, n: int, k: int):
    if fmt in ("q8", "q4"):
        return _matrix(fmt, n, k)
    return (torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.1).to(getattr(torch, STORED[fmt]))


@pytest.mark.parametrize("n,k", GEMV_SHAPES)
@pytest.mark.parametrize("fmt", ["q8", "q4", "bf16", "fp16", "fp32"])
@pytest.mark.parametrize("tiled", [False, True])
def test_gemv_matches_the_dequantized_reference(kern, fmt, n, k, tiled):
    """q8 / q4 parts and plain float matrices read as stored, through either path (the GEMV's dots, or the GEMM's
    dequantized row blocks and register tiles) at 1, 3, 5 and 37 tokens (short, full and several token tiles,
    past one 32-token pass): in fp32 compute within 1e-5 relative of x @ W.T over W in fp32 (the same products,
    summed in another order); in bf16 compute within bf16 rounding of it; on 1 and 2 threads alike."""
    if fmt == "fp16" and not kern.caps >> 2 & 1:
        pytest.skip("this compiler has no _Float16")
    w = _plain_or_quant(fmt, n, k)
    for T in (1, 3, 5, 37):
        x = torch.randn(T, k, generator=torch.Generator().manual_seed(1))
        ref = x @ _dense(w).T
        for threads in (1, 2):
            got = kern.gemv(x, w, threads=threads, tiled=tiled)
            assert got is not None and got.dtype == torch.float32 and got.shape == (T, n)
            assert _rel(got, ref) <= 1e-5, (T, threads)
        got = kern.gemv(x.bfloat16(), w, threads=2, tiled=tiled)
        assert got.dtype == torch.bfloat16 and _rel(got, x.bfloat16().float() @ _dense(w).T) <= 8e-3


@pytest.mark.parametrize("n,k", [(7, 100), (5, 40), (6, 257)])
@pytest.mark.parametrize("fmt", ["q8", "q4", "bf16"])
def test_gemm_dequantizes_every_weight_exactly(kern, fmt, n, k):
    """The GEMM's row blocks hold the reference's fp32 weights bit for bit (q4: q * s + m, one rounding; q8: q * s):
    one-hot tokens pick single weights (0 * w and 1 * w are exact), so out[t] = W[:, t] for every input t, across
    q4's per-32 reordering, its short blocks and groups, and a short last row block."""
    w = _plain_or_quant(fmt, n, k)
    got = kern.gemv(torch.eye(k), w, threads=2, tiled=True)
    assert torch.equal(got, _dense(w).T.contiguous())


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 instruction-set variants")
@pytest.mark.parametrize("march", ["haswell", "x86-64"])
def test_gemv_other_instruction_sets(kern, march):
    """The AVX2 and plain-C builds of the GEMV agree with the reference too."""
    try:
        k = CpuKernel(cpu_kernel.build(march))
    except cpu_kernel.KernelUnavailable as e:
        pytest.skip(str(e))
    x = torch.randn(6, 257, generator=torch.Generator().manual_seed(2))
    for fmt in ("q8", "q4", "bf16"):
        w = _matrix(fmt, 130, 257, seed=3) if fmt != "bf16" else torch.randn(130, 257).bfloat16()
        for tiled in (False, True):
            assert _rel(k.gemv(x, w, threads=2, tiled=tiled), x @ _dense(w).T) <= 1e-5, (fmt, tiled)
        assert torch.equal(k.gemv(torch.eye(257), w, threads=2, tiled=True), _dense(w).T.contiguous()), fmt
    from tiered.model.moe import _expert

    W = _pool("q4", 130, 200, 2)
    xs = torch.randn(6, 130, generator=torch.Generator().manual_seed(5))
    ref = torch.cat([_expert(xs[:1], W, 1, torch.float32, None), _expert(xs[1:], W, 0, torch.float32, None)])
    assert _rel(k.expert_rows(xs, W, [1, 0], [1, 5], threads=2), ref) <= 1e-5


def test_gemv_declines_what_it_does_not_read(kern):
    """fp8 and mxfp4 matrices, a stack of matrices (quantized or plain) and parts that are not one contiguous matrix:
    None (qlinear then takes the torch reference)."""
    x = torch.randn(1, 128)
    for fmt in ("fp8", "mxfp4"):
        assert kern.gemv(x, _matrix(fmt, 8, 128), threads=1) is None, fmt
    stack = quantize(torch.randn(2, 8, 128), "q4")
    assert kern.gemv(x, stack, threads=1) is None
    assert kern.gemv(x, torch.randn(2, 8, 128), threads=1) is None
    assert kern.gemv(x, torch.randn(128, 8).bfloat16().T, threads=1) is None  # a transposed view
    wide = _matrix("q4", 8, 256)
    half = type(wide)(wide.fmt, (8, 128), wide.group, wide.q[:, :64], wide.scale[:, :2], wide.min[:, :2])
    assert not half.q.is_contiguous() and kern.gemv(x, half, threads=1) is None


# --- several experts over their own rows (tiered_cpu_expert_rows: a CPU prompt's and a batch step's experts) ---

@pytest.mark.parametrize("D,F", SHAPES)
@pytest.mark.parametrize("fmt", ["q4", "q8", "bf16", "fp32"])
def test_expert_rows_match_the_per_expert_reference(kern, fmt, D, F):
    """Experts of a block pool in a shuffled slot order over their own rows (none; one row: the token's dots; 2-3 rows:
    dots_multi, each weight vector dequantized once in registers; 4 and more: dequantized blocks and tiles; over 32:
    several passes) against moe._expert per expert in fp32:
    within 1e-5 relative in fp32 compute; quantized experts in bf16 compute within bf16 rounding; 1 and 2 threads."""
    from tiered.model.moe import _expert

    W = _pool(fmt, D, F, 6)
    slots = [5, 0, 2, 1, 3, 4]
    g = torch.Generator().manual_seed(4)
    for counts in ([1, 3, 5, 0, 40, 2], [1] * 6, [70, 4, 1, 33, 2, 9]):
        x = torch.randn(sum(counts), D, generator=g)
        for dt in (torch.float32, torch.bfloat16) if fmt in ("q4", "q8") else (torch.float32,):
            xd = x.to(dt)
            ref, a = [], 0
            for s, c in zip(slots, counts):
                ref.append(_expert(xd[a:a + c].float(), W, s, torch.float32, None))
                a += c
            ref = torch.cat(ref)
            for threads in (1, 2):
                got = kern.expert_rows(xd, W, slots, counts, threads=threads)
                assert got is not None and got.dtype == dt and got.shape == x.shape
                assert _rel(got, ref) <= (1e-5 if dt == torch.float32 else 8e-3), (counts, dt, threads)


def test_expert_rows_decline_and_check(kern):
    """fp8 pools and gpt-oss's biased experts: None (the caller takes torch); rows that do not add up: an error."""
    W = _pool("fp8", 64, 48, 2)
    assert kern.expert_rows(torch.randn(3, 64), W, [0, 1], [1, 2]) is None
    Wq = _pool("q4", 64, 48, 2)
    with pytest.raises(ValueError, match="rows"):
        kern.expert_rows(torch.randn(4, 64), Wq, [0, 1], [1, 2])
