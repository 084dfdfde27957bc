"""The Triton decode-attention kernel against its plain torch reference (and the reference against SDPA).

On CPU the kernel runs under Triton's interpreter (tiny shapes; fp32, and bf16 loads/stores with fp32 dots,
since the interpreter's dots mis-read bf16); on CUDA in bf16 and fp32, plus one CUDA graph replayed at
many lengths.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
if not CUDA:
    # Triton picks its interpreter when it is imported (and reads the variable again later, e.g. when it
    # imports gluon lazily), so it stays set for this process. The runtime never keys on it: --attn auto
    # picks the kernel on CUDA only.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tiered.kernels import attention as ka  # noqa: E402

needs_kernel = pytest.mark.skipif(
    ka.triton is None or not (CUDA or ka.interpreted()),
    reason="needs triton (CUDA, or imported under TRITON_INTERPRET=1 before any other test imported it)")


def _paged_case(B, T, H, KV, hd, PS, seqlens, *, dtype=torch.float32, device="cpu", seed=0):
    """Random q and page pools, each row's pages scattered through the pool in random order."""
    g = torch.Generator().manual_seed(seed)
    mp = max(1, -(-max(seqlens) // PS))
    P = B * mp + 3  # a few pages no row uses
    q = torch.randn(B, T, H, hd, generator=g).to(device, dtype)
    kp = torch.randn(P, PS, KV, hd, generator=g).to(device, dtype)
    vp = torch.randn(P, PS, KV, hd, generator=g).to(device, dtype)
    bt = torch.randperm(P, generator=g)[:B * mp].view(B, mp).to(device, torch.int32)
    sl = torch.tensor(seqlens, dtype=torch.int32, device=device)
    return q, kp, vp, bt, sl


def _check(o, r, tol):
    err = (o.float() - r.float()).abs().max().item()
    assert err <= tol, f"max |kernel - reference| = {err:.3g} > {tol} (mean {(o.float() - r.float()).abs().mean():.3g})"


# --- the reference itself ---

@pytest.mark.parametrize("window", [None, 5])
def test_reference_matches_sdpa_on_a_contiguous_cache(window):
    """The torch reference over one-page-per-cache views equals SDPA with an explicit causal (window) mask,
    for T = 1 and T = 3 query tokens with GQA."""
    torch.manual_seed(0)
    KV, S, hd, H = 2, 24, 8, 6
    G = H // KV
    k, v = torch.randn(KV, S, hd), torch.randn(KV, S, hd)
    kp, bt = ka.paged_view(k, heads_first=True, page_size=8)
    vp, _ = ka.paged_view(v, heads_first=True, page_size=8)
    for T, n in [(1, 1), (1, 17), (3, 20)]:
        q = torch.randn(1, T, H, hd)
        r = ka.decode_attention_ref(q, kp, vp, bt, torch.tensor([n], dtype=torch.int32), scale=hd ** -0.5,
                                    window=window)
        qpos = torch.arange(n - T, n)[:, None]
        s = torch.arange(n)[None]
        ok = s <= qpos
        if window is not None:
            ok &= s > qpos - window
        qg = q[0].transpose(0, 1).reshape(KV, G * T, hd)  # rows (g, t) per KV head
        o = F.scaled_dot_product_attention(qg, k[:, :n], v[:, :n], attn_mask=ok.repeat(G, 1), scale=hd ** -0.5)
        o = o.reshape(H, T, hd).transpose(0, 1)
        _check(r[0], o, 1e-5)


def test_reference_sinks_add_to_the_denominator():
    """A sink of -inf changes nothing; a finite sink scales every output row by 1 - its softmax share."""
    q, kp, vp, bt, sl = _paged_case(2, 1, 4, 2, 8, 4, [5, 9])
    base = ka.decode_attention_ref(q, kp, vp, bt, sl, scale=0.3)
    same = ka.decode_attention_ref(q, kp, vp, bt, sl, scale=0.3, sinks=torch.full((4,), float("-inf")))
    _check(same, base, 0.0)
    sunk = ka.decode_attention_ref(q, kp, vp, bt, sl, scale=0.3, sinks=torch.zeros(4))
    assert (sunk.norm() < base.norm()).item()


# --- the kernel against the reference ---

CASES = [  # B, T, H, KV, hd, PS, seqlens, window, splits
    (1, 1, 4, 4, 16, 16, [1], None, 1),  # one token, MHA
    (3, 1, 4, 2, 8, 8, [0, 7, 45], None, 3),  # ragged rows incl. an empty one, GQA 2, hd padded to 16
    (2, 1, 8, 1, 16, 4, [33, 12], 6, 4),  # sliding window, MQA (G = 8), pages of 4
    (2, 3, 4, 2, 24, 16, [3, 40], None, 2),  # 3 query tokens per row (causal among them), hd 24
    (2, 2, 6, 2, 8, 8, [2, 30], 4, 1),  # T = 2 with a window, G = 3 (rows padded to 16)
]


@needs_kernel
@pytest.mark.parametrize("case", CASES, ids=[f"B{c[0]}T{c[1]}H{c[2]}KV{c[3]}hd{c[4]}w{c[7]}s{c[8]}" for c in CASES])
def test_kernel_matches_reference(case):
    """Ragged rows, GQA/MQA, windows, several query tokens, one or several splits: fp32 within 1e-5."""
    B, T, H, KV, hd, PS, seqlens, window, splits = case
    dev = "cuda" if CUDA else "cpu"
    q, kp, vp, bt, sl = _paged_case(B, T, H, KV, hd, PS, seqlens, device=dev)
    o = ka.decode_attention(q, kp, vp, bt, sl, scale=hd ** -0.5, window=window, num_splits=splits)
    r = ka.decode_attention_ref(q, kp, vp, bt, sl, scale=hd ** -0.5, window=window)
    _check(o, r, 1e-5)
    assert (o[torch.as_tensor(seqlens) == 0] == 0).all()


@needs_kernel
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[3]], ids=["ragged", "window", "T3"])
def test_preload_before_the_wait_computes_the_same(monkeypatch, case):
    """PRE (with PDL: the length, block table and first tile's older keys and values loaded before the wait, this
    call's T rows after it), forced on under the interpreter: the same output bit for bit, over ragged rows with
    several splits, a window and three query tokens. (Which load sees the new rows on the GPU, the interpreter
    cannot show: the CUDA engine tests run the chain with PDL.)"""
    B, T, H, KV, hd, PS, seqlens, window, splits = case
    dev = "cuda" if CUDA else "cpu"
    q, kp, vp, bt, sl = _paged_case(B, T, H, KV, hd, PS, seqlens, device=dev)
    plain = ka.decode_attention(q, kp, vp, bt, sl, scale=hd ** -0.5, window=window, num_splits=splits)
    seen = []
    monkeypatch.setattr(ka, "_preload_ok", lambda opts: seen.append(1) or True)
    pre = ka.decode_attention(q, kp, vp, bt, sl, scale=hd ** -0.5, window=window, num_splits=splits)
    assert seen and torch.equal(pre, plain)
    r = ka.decode_attention_ref(q, kp, vp, bt, sl, scale=hd ** -0.5, window=window)
    _check(pre, r, 1e-5)


@needs_kernel
@pytest.mark.parametrize("splits", [8, 40])
def test_empty_splits_and_padded_rows_are_never_read(monkeypatch, splits):
    """The splits store only the query rows' partials, and an empty split (a grid sized for a long max_context over
    a short cache) stores no acc. The partial buffers are filled with NaN here: any read of an unstored entry would
    reach the output (NaN * 0 is NaN). Rows of 3 and 200 keys over 8 splits of 64-key tiles: four splits hold keys
    of the long row, one of the short; the rest are empty. G * T = 2 query rows, padded to 16. 40 splits: the
    combine's short tile (no split past COMBINE_LO holds keys)."""
    dev = "cuda" if CUDA else "cpu"
    q, kp, vp, bt, sl = _paged_case(2, 1, 4, 2, 16, 8, [3, 200], device=dev)
    real_empty = torch.empty

    def nan_empty(*shape, **kw):
        t = real_empty(*shape, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(ka.torch, "empty", nan_empty)
    o = ka.decode_attention(q, kp, vp, bt, sl, scale=0.25, num_splits=splits)
    monkeypatch.undo()
    assert torch.isfinite(o).all()
    _check(o, ka.decode_attention_ref(q, kp, vp, bt, sl, scale=0.25), 1e-5)


@needs_kernel
@pytest.mark.parametrize("sinks", [False, True])
def test_combine_short_and_full_tiles(sinks):
    """40 splits of 64 keys: a row of 2,100 keys fills 33 of them (the combine's full tile), one of 70 keys 2 (its
    short tile of COMBINE_LO), one of 0 none; then two query tokens under a window of 300 over 1,500 keys in 24
    splits. fp32 within 1e-5 of the reference, with and without sinks."""
    dev = "cuda" if CUDA else "cpu"
    sk = torch.tensor([0.5, -1.0, 2.0, 0.0], device=dev) if sinks else None
    q, kp, vp, bt, sl = _paged_case(3, 1, 4, 2, 16, 32, [2100, 70, 0], device=dev)
    o = ka.decode_attention(q, kp, vp, bt, sl, scale=0.25, sinks=sk, num_splits=40)
    _check(o, ka.decode_attention_ref(q, kp, vp, bt, sl, scale=0.25, sinks=sk), 1e-5)
    q, kp, vp, bt, sl = _paged_case(1, 2, 4, 2, 16, 32, [1500], device=dev)
    o = ka.decode_attention(q, kp, vp, bt, sl, scale=0.25, sinks=sk, num_splits=24, window=300)
    _check(o, ka.decode_attention_ref(q, kp, vp, bt, sl, scale=0.25, sinks=sk, window=300), 1e-5)


@needs_kernel
@pytest.mark.parametrize("splits", [1, 3])
def test_kernel_sinks(splits):
    """Per-head sink logits (gpt-oss) in the single-split and the merged path."""
    dev = "cuda" if CUDA else "cpu"
    q, kp, vp, bt, sl = _paged_case(2, 1, 4, 2, 16, 8, [9, 30], device=dev)
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0], device=dev)
    o = ka.decode_attention(q, kp, vp, bt, sl, scale=0.25, sinks=sinks, num_splits=splits)
    r = ka.decode_attention_ref(q, kp, vp, bt, sl, scale=0.25, sinks=sinks)
    _check(o, r, 1e-5)


@needs_kernel
@pytest.mark.parametrize("heads_first", [True, False])
def test_kernel_reads_a_contiguous_cache_as_pages(heads_first):
    """The model's contiguous cache (SDPA layout [KV, S, hd] or flash layout [S, KV, hd]) is read through
    `paged_view` without a copy: pages of 8 with block table arange, and one page of the whole cache."""
    dev = "cuda" if CUDA else "cpu"
    torch.manual_seed(1)
    KV, S, hd, H = 2, 32, 16, 4
    shape = (KV, S, hd) if heads_first else (S, KV, hd)
    k, v = torch.randn(shape, device=dev), torch.randn(shape, device=dev)
    q = torch.randn(1, 1, H, hd, device=dev)
    sl = torch.tensor([21], dtype=torch.int32, device=dev)
    outs = []
    for ps in (8, None):
        kp, bt = ka.paged_view(k, heads_first=heads_first, page_size=ps)
        vp, _ = ka.paged_view(v, heads_first=heads_first, page_size=ps)
        assert kp.data_ptr() == k.data_ptr() and kp.untyped_storage().nbytes() == k.untyped_storage().nbytes()
        assert bt.tolist() == [list(range(S // (ps or S)))]
        o = ka.decode_attention(q, kp, vp, bt, sl, scale=hd ** -0.5, num_splits=2)
        outs.append(o)
        _check(o, ka.decode_attention_ref(q, kp, vp, bt, sl, scale=hd ** -0.5), 1e-5)
    _check(outs[0], outs[1], 1e-6)


@needs_kernel
def test_kernel_bf16_storage():
    """bf16 q/k/v/o (on CPU the interpreter computes the dots in fp32): within bf16 rounding of the reference."""
    dev = "cuda" if CUDA else "cpu"
    q, kp, vp, bt, sl = _paged_case(2, 1, 4, 2, 16, 8, [5, 27], dtype=torch.bfloat16, device=dev)
    o = ka.decode_attention(q, kp, vp, bt, sl, scale=0.25, num_splits=2)
    assert o.dtype == torch.bfloat16
    _check(o, ka.decode_attention_ref(q, kp, vp, bt, sl, scale=0.25), 2e-2)


@needs_kernel
def test_kernel_writes_into_out_and_strided_q():
    """`out=` is written in place, and q may be a strided view (as the stacked qkv projection leaves it)."""
    dev = "cuda" if CUDA else "cpu"
    _, kp, vp, bt, sl = _paged_case(1, 1, 4, 2, 16, 8, [13], device=dev)
    qkv = torch.randn(1, 1, 8, 16, device=dev)  # q heads 0..3, then 4 more heads that must not be read
    q = qkv[:, :, :4]
    out = torch.full((1, 1, 4, 16), float("nan"), device=dev)
    o = ka.decode_attention(q, kp, vp, bt, sl, scale=0.25, out=out, num_splits=2)
    assert o is out
    _check(out, ka.decode_attention_ref(q, kp, vp, bt, sl, scale=0.25), 1e-5)


def test_write_paged_then_read():
    """write_paged stores each (row, token) at block_table[row, pos // PS], slot pos % PS."""
    q, kp, vp, bt, sl = _paged_case(2, 2, 4, 2, 8, 4, [6, 11])
    k_new, v_new = torch.randn(2, 2, 2, 8), torch.randn(2, 2, 2, 8)
    pos = torch.tensor([[4, 5], [9, 10]])
    ka.write_paged(kp, vp, bt, pos, k_new, v_new)
    for b in range(2):
        for t in range(2):
            p = int(pos[b, t])
            page = int(bt[b, p // 4])
            assert torch.equal(kp[page, p % 4], k_new[b, t]) and torch.equal(vp[page, p % 4], v_new[b, t])


def test_validation_errors():
    """Shapes the kernel cannot serve are refused with a message, before any launch."""
    q, kp, vp, bt, sl = _paged_case(1, 1, 4, 2, 8, 4, [3])
    with pytest.raises(ValueError, match="page_size"):
        ka.paged_view(torch.zeros(2, 10, 8), heads_first=True, page_size=4)
    if ka.triton is None:
        pytest.skip("triton is not installed")
    with pytest.raises(TypeError, match="int32"):
        ka.decode_attention(q, kp, vp, bt.long(), sl, scale=1.0)
    with pytest.raises(ValueError, match="rows"):
        ka.decode_attention(q.expand(1, 65, 4, 8), kp, vp, bt, sl, scale=1.0)


# --- CUDA: bf16 at model shapes, and one graph for every length ---

def _compile_sm90(kernel, ptrs: dict, consts: dict, strided: bool) -> tuple[str, dict]:
    """(PTX, resource usage) of `kernel` compiled for sm_90 (4 warps): pointers of the dtypes `ptrs` names, 16-byte
    aligned; `consts` as constexprs; scale_log2 fp32, other scalars i32 (strided: the stride arguments, named s...,
    divisible by 16, as a page pool's [P, 528, 4, 128] are). Needs a process where Triton was imported with
    TRITON_INTERPRET off."""
    import re
    import sys
    from pathlib import Path

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    from kernel_regs import _SIG, cuobjdump

    sig, attrs = {}, {}
    for i, p in enumerate(kernel.params):
        if p.name in consts:
            sig[p.name] = "constexpr"
        elif p.name in ptrs:
            sig[p.name] = _SIG[f"torch.{ptrs[p.name]}"]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[p.name] = "fp32" if p.name == "scale_log2" else "i32"
            if strided and p.name.startswith("s"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    k = triton.compile(ASTSource(kernel, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 4})
    usage = cuobjdump(k.asm["cubin"], "-res-usage")
    res = {n.lower(): int(v) for n, v in re.findall(r"\b(REG|STACK|LOCAL)\:(\d+)", usage)}
    return k.asm["ptx"], res


def compile_split_sm90(pre: bool) -> tuple[str, dict]:
    """The split kernel as the 10.6B shape's decode launches it (bf16, G 8, hd 128, strides of 1 specialised), with
    PDL: `_compile_sm90`'s (PTX, resource usage)."""
    ptrs = {"Q": "bfloat16", "K": "bfloat16", "V": "bfloat16", "BT": "int32", "SEQ": "int32", "SINKS": "bfloat16",
            "O": "bfloat16", "PO": "float32", "PM": "float32", "PL": "float32"}
    consts = {"sq_d": 1, "sk_d": 1, "sv_d": 1, "so_d": 1, "sbt_p": 1, "T": 1, "G": 8, "HD": 128, "M_PAD": 16,
              "HD_PAD": 128, "PAGE": 528, "BLOCK_N": 64, "HAS_WINDOW": False, "SPLIT": True, "HAS_SINKS": False,
              "DOT_F32": False, "GDC": True, "PRE": pre}
    return _compile_sm90(ka._SPLIT, ptrs, consts, strided=True)


def compile_combine_sm90() -> tuple[str, dict]:
    """The combine kernel at the 10.6B shape under a 64-split grid (bf16 output, G 8, hd 128), PDL."""
    ptrs = {"PO": "float32", "PM": "float32", "PL": "float32", "SINKS": "bfloat16", "O": "bfloat16"}
    consts = {"so_d": 1, "T": 1, "G": 8, "HD": 128, "M_PAD": 16, "HD_PAD": 128, "HAS_SINKS": False, "NS_PAD": 64,
              "NS_LO": 16, "GDC": True}
    return _compile_sm90(ka._COMBINE, ptrs, consts, strided=False)


def _sm90_subprocess(body: str) -> str:
    """Run `body` (which may use this module as t) in a subprocess with Triton compiled, not interpreted (this
    process may have imported it interpreted); its stdout. Skips where Triton has no NVIDIA backend."""
    import subprocess
    import sys
    from pathlib import Path

    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("this Triton build has no NVIDIA backend")
    here = Path(__file__).resolve().parent
    code = (f"import sys; sys.path[:0] = [{str(here.parent)!r}, {str(here)!r}]\n"
            "import test_attention_kernel as t\n" + body)
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=here.parent, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_combine_kernel_compiles_for_sm90():
    """The combine kernel (64 splits: a 4,096-position capacity; its short and full tiles) lowers for sm_90 without
    spilling."""
    out = _sm90_subprocess("ptx, res = t.compile_combine_sm90()\n"
                           "print(ptx.count('ld.global'), res['stack'], res['local'])\n")
    loads, stack, local = (int(v) for v in out.split())
    assert loads > 0 and stack == local == 0, out


def test_split_kernel_preload_compiles_for_sm90():
    """With PRE the sm_90 PTX loads before griddepcontrol.wait (the length, block table, first tile's older rows)
    and after it (q and the new rows), without spilling; without PRE nothing is loaded before the wait."""
    out = _sm90_subprocess("for pre in (False, True):\n"
                           "    ptx, res = t.compile_split_sm90(pre)\n"
                           "    w = ptx.find('griddepcontrol.wait')\n"
                           "    print(pre, ptx[:w].count('ld.global'), ptx[w:].count('ld.global'), res['stack'], "
                           "res['local'])\n")
    rows = {line.split()[0]: [int(v) for v in line.split()[1:]] for line in out.splitlines()}
    assert rows["False"][0] == 0 and rows["False"][1] > 0, rows
    assert rows["True"][0] > 0 and rows["True"][1] > 0, rows
    assert rows["False"][2:] == rows["True"][2:] == [0, 0], rows  # no stack, no local memory: nothing spilled


@pytest.mark.cuda
@pytest.mark.parametrize("B,H,KV,hd,PS,window", [(1, 32, 4, 128, 4096, None), (4, 32, 4, 128, 16, None),
                                                 (3, 16, 8, 64, 64, 100), (2, 8, 8, 128, 256, None)])
def test_cuda_bf16_model_shapes(B, H, KV, hd, PS, window):
    """bf16 at the 10.6B shape (32 q / 4 kv heads, hd 128) and others, ragged long rows, default splits."""
    seqlens = [4000, 1, 777, 2048][:B]
    q, kp, vp, bt, sl = _paged_case(B, 1, H, KV, hd, PS, seqlens, dtype=torch.bfloat16, device="cuda")
    o = ka.decode_attention(q, kp, vp, bt, sl, scale=hd ** -0.5, window=window)
    r = ka.decode_attention_ref(q, kp, vp, bt, sl, scale=hd ** -0.5, window=window)
    _check(o, r, 2e-2)


@pytest.mark.cuda
def test_cuda_one_graph_serves_every_length():
    """One captured graph, replayed with the length written into the device tensor, equals eager calls at
    lengths 1 .. 4096 (the grid never depends on the length)."""
    KV, S, hd, H = 4, 4096, 128, 32
    torch.manual_seed(0)
    k = torch.randn(KV, S, hd, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(KV, S, hd, device="cuda", dtype=torch.bfloat16)
    kp, bt = ka.paged_view(k, heads_first=True)
    vp, _ = ka.paged_view(v, heads_first=True)
    q = torch.randn(1, 1, H, hd, device="cuda", dtype=torch.bfloat16)
    sl = torch.ones(1, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    ka.decode_attention(q, kp, vp, bt, sl, scale=hd ** -0.5, out=out)  # compile outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        ka.decode_attention(q, kp, vp, bt, sl, scale=hd ** -0.5, out=out)
    for n in (1, 2, 63, 64, 65, 500, 2049, 4096):
        sl.fill_(n)
        g.replay()
        torch.cuda.synchronize()
        r = ka.decode_attention_ref(q, kp, vp, bt, sl, scale=hd ** -0.5)
        _check(out, r, 2e-2)


@needs_kernel
@pytest.mark.skipif(CUDA, reason="the CPU smoke mode of the benchmark; on CUDA run the script itself")
def test_bench_attention_cpu_smoke(capsys, monkeypatch, tmp_path):
    """benchmarks/bench_attention.py runs end to end (tiny shapes, interpreter), prints a table then one JSON
    line whose outputs were checked against the reference, and writes it under $OUT."""
    import json
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_attention.py"
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr("sys.argv", [str(script), "--cpu-smoke"])
    runpy.run_path(str(script), run_name="__main__")
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["all_ok"] and len(res["rows"]) == 4
    assert json.loads((tmp_path / "attention.json").read_text()) == res


@needs_kernel
@pytest.mark.parametrize("window", [None, 5])
def test_batch_step_paged_kernel_matches_reference(window):
    """The batch step's CUDA decode attention (decode/batchstep.py paged_decode_kernel: this kernel behind the
    torch reference's signature, q [B, H, hd]) equals that reference, rows of different lengths and pages."""
    from tiered.decode.batchstep import paged_decode_attention, paged_decode_kernel

    dev = "cuda" if CUDA else "cpu"
    q, kp, vp, bt, sl = _paged_case(4, 1, 4, 2, 16, 4, [1, 6, 13, 9], device=dev, seed=3)
    got = paged_decode_kernel(q[:, 0], kp, vp, bt, sl, window=window)
    want = paged_decode_attention(q[:, 0], kp, vp, bt, sl, window=window)
    assert got.shape == want.shape == (4, 4, 16)
    torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-4)
