"""The fused decode-glue kernels (kernels/fused_norm.py, fused_rope.py, fused_route.py) against the torch ops they
replace (model/layers.py rms_norm / project_qkv / _write_kv, model/routing.py softmax_topk).

On CPU through Triton's interpreter (TRITON_INTERPRET=1, set before the kernels are imported): tiny shapes with
T = 1, odd D, hd 64 / 128, partial rotary, every q/k norm kind, clipping, bf16 (bit for bit: the kernels keep the
reference's roundings) and fp32 (to the last bits of rstd); the whole model with glue on against glue off, tiny
checkpoints of every norm kind and the reference model's greedy tokens; the kernels compiled for sm_90 to cubin
in a subprocess. On CUDA (marked `cuda`): the graphed decode of the reference model in bf16, glue on vs off.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # the kernels are decorated at import: the interpreter must be on first
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from conftest import make_checkpoint  # noqa: E402
from tiered.kernels.fused_norm import add_rms_norm  # noqa: E402
from tiered.kernels.fused_rope import qk_rope  # noqa: E402
from tiered.kernels.fused_route import softmax_topk as fused_softmax_topk  # noqa: E402
from tiered.model.layers import apply_rope, rms_norm  # noqa: E402
from tiered.model.routing import softmax_topk  # noqa: E402

interp = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter tests run on CPU")
DTYPES = (torch.float32, torch.bfloat16)


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    """bf16: bit for bit; fp32: to a few ulps (rstd's sum of squares runs in another order)."""
    assert a.shape == b.shape and a.dtype == b.dtype
    if a.dtype == torch.bfloat16:
        assert torch.equal(a, b), (a.float() - b.float()).abs().max()
    else:
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)


# --- residual add + RMSNorm ---

@interp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,D", [(1, 7), (3, 64), (2, 129)])
@pytest.mark.parametrize("w32", [False, True])
def test_add_rms_norm(dtype, T, D, w32):
    g = torch.Generator().manual_seed(T * 1000 + D)
    h = torch.randn(T, D, generator=g).to(dtype)
    delta = (torch.randn(T, D, generator=g) * 3).to(dtype)
    w = (torch.randn(D, generator=g) * 0.4 + 1).to(torch.float32 if w32 else dtype)
    h2, x = add_rms_norm(h, delta, w, 1e-6)
    assert torch.equal(h2, h + delta)  # torch's add: one rounding
    _same(x, rms_norm(h + delta, w, 1e-6))
    h3, x3 = add_rms_norm(h, None, w, 1e-5)  # plain norm: h passed through
    assert h3 is h
    _same(x3, rms_norm(h, w, 1e-5))


@interp
def test_add_rms_norm_strided_rows():
    """Rows of a wider buffer (the last row of a prefill, a view) are read with their stride."""
    h = torch.randn(4, 40).to(torch.bfloat16)
    d = torch.randn(4, 40).to(torch.bfloat16)
    w = torch.randn(33).to(torch.bfloat16)
    h2, x = add_rms_norm(h[1:3, :33], d[1:3, 5:38], w, 1e-6)
    ref = h[1:3, :33] + d[1:3, 5:38]
    assert torch.equal(h2, ref) and torch.equal(x, rms_norm(ref, w, 1e-6))


# --- q/k norm + rotary + K/V store ---

def _reference_qkv(qkv, H, KV, hd, norm, w_q, w_k, cos, sin, eps, clip):
    """layers.project_qkv after its GEMV, written out with the same torch calls."""
    T = qkv.shape[0]
    nq, nk = H * hd, KV * hd
    if norm == "proj":
        qk = torch.cat([rms_norm(qkv[:, :nq], w_q, eps), rms_norm(qkv[:, nq:nq + nk], w_k, eps)], -1)
        qk = qk.view(T, H + KV, hd)
    else:
        qk = qkv[:, :nq + nk].view(T, H + KV, hd)
        if norm == "head":
            qk = rms_norm(qk, w_q, eps)
    v = qkv[:, nq + nk:nq + 2 * nk].view(T, KV, hd)
    if clip is not None:
        qk, v = qk.clamp(-clip, clip), v.clamp(-clip, clip)
    qk = apply_rope(qk, cos, sin)
    return qk[:, :H], qk[:, H:], v


ROPE_CASES = [  # T, H, KV, hd, r, norm, fp32 norm weight, clip
    (1, 4, 2, 64, 64, "head", False, None),
    (1, 2, 1, 128, 128, "head", False, None),
    (3, 4, 2, 32, 16, "head", True, None),  # partial rotary, zero-centred fp32 weight (Qwen3.5)
    (2, 3, 3, 8, 8, "proj", False, 0.5),  # OLMoE: whole-projection norms, clip
    (1, 2, 2, 64, 64, None, False, None),
    (2, 4, 2, 16, 8, None, False, 2.0),
]


@interp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ROPE_CASES)
@pytest.mark.parametrize("dev_pos", [False, True])
def test_qk_rope_into_cache(dtype, case, dev_pos):
    T, H, KV, hd, r, norm, w32, clip = case
    g = torch.Generator().manual_seed(T + H * 10 + hd)
    qkv = torch.randn(T, (H + 2 * KV) * hd + 3, generator=g).to(dtype)  # + 3 columns: a gate / padding
    cos, sin = torch.randn(T, r, generator=g).to(dtype), torch.randn(T, r, generator=g).to(dtype)
    w_q = w_k = flat = None
    if norm == "head":
        w_q = flat = (torch.randn(H + KV, hd, generator=g) * 0.3 + 1).to(torch.float32 if w32 else dtype)
    elif norm == "proj":
        w_q = (torch.randn(H * hd, generator=g) * 0.3 + 1).to(dtype)
        w_k = (torch.randn(KV * hd, generator=g) * 0.3 + 1).to(dtype)
        flat = torch.cat([w_q, w_k])
    rq, rk, rv = _reference_qkv(qkv, H, KV, hd, norm, w_q, w_k, cos, sin, 1e-6, clip)
    S = 9
    kc = torch.full((KV, S, hd), 7.0, dtype=dtype)  # the sdpa layout [KV, S, hd], seen as rows [S, KV, hd]
    vc = torch.full((KV, S, hd), 7.0, dtype=dtype)
    pos = torch.tensor([5, 0, 8][:T]) if dev_pos else 4
    rows = pos if dev_pos else torch.arange(4, 4 + T)
    q, _, _ = qk_rope(qkv, cos, sin, heads=H, kv_heads=KV, head_dim=hd, norm=norm, norm_weight=flat, eps=1e-6,
                      clip=clip, k_out=kc.transpose(0, 1), v_out=vc.transpose(0, 1), positions=pos)
    _same(q, rq)
    _same(kc[:, rows].transpose(0, 1), rk)
    assert torch.equal(vc[:, rows].transpose(0, 1), rv)
    other = torch.ones(S, dtype=torch.bool)
    other[rows] = False
    assert (kc[:, other] == 7).all() and (vc[:, other] == 7).all()  # no other row touched
    q2, k2, v2 = qk_rope(qkv, cos, sin, heads=H, kv_heads=KV, head_dim=hd, norm=norm, norm_weight=flat, eps=1e-6,
                         clip=clip)  # fresh [T, KV, hd] outputs
    assert torch.equal(q2, q)
    _same(k2, rk)
    assert torch.equal(v2, rv)


@interp
def test_qk_rope_paged_rows():
    """The batch step's page pool seen as [N*P, KV, hd], rows from a device tensor (scattered pages)."""
    T, H, KV, hd = 3, 4, 2, 16
    dt = torch.bfloat16
    qkv = torch.randn(T, (H + 2 * KV) * hd).to(dt)
    cos, sin = torch.randn(T, hd).to(dt), torch.randn(T, hd).to(dt)
    w = torch.randn(H + KV, hd).to(dt)
    pool_k = torch.zeros(5, 4, KV, hd, dtype=dt)
    pool_v = torch.zeros(5, 4, KV, hd, dtype=dt)
    flat = torch.tensor([13, 2, 7])
    qk_rope(qkv, cos, sin, heads=H, kv_heads=KV, head_dim=hd, norm="head", norm_weight=w, eps=1e-6,
            k_out=pool_k.view(20, KV, hd), v_out=pool_v.view(20, KV, hd), positions=flat)
    _, rk, rv = _reference_qkv(qkv, H, KV, hd, "head", w, None, cos, sin, 1e-6, None)
    assert torch.equal(pool_k.view(20, KV, hd)[flat], rk) and torch.equal(pool_v.view(20, KV, hd)[flat], rv)


# --- routing ---

@interp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,E,K,norm", [(1, 8, 2, True), (3, 60, 4, False), (2, 128, 8, True), (1, 7, 7, True),
                                        (4, 33, 3, False)])
def test_softmax_topk(dtype, T, E, K, norm):
    g = torch.Generator().manual_seed(E + K)
    logits = (torch.randn(T, E, generator=g) * 2).to(dtype)
    ids, w = fused_softmax_topk(logits, K, norm)
    assert ids.dtype == torch.int64 and w.dtype == torch.float32 and ids.shape == w.shape == (T, K)
    probs = torch.softmax(logits, -1, dtype=torch.float32)
    order = torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, :K]  # ties: lowest id first
    assert torch.equal(ids, order)
    rids, rw = softmax_topk(logits, K, norm)
    assert torch.equal(ids.sort(-1).values, rids.sort(-1).values)  # the chosen set
    ref = probs.gather(1, ids)
    if norm:
        ref = ref / ref.sum(-1, keepdim=True)
    torch.testing.assert_close(w, ref, rtol=1e-6, atol=1e-7)
    if dtype == torch.float32:  # no ties: the same order and weights as the torch rule
        assert torch.equal(ids, rids)
        torch.testing.assert_close(w, rw, rtol=1e-6, atol=1e-7)


@interp
def test_softmax_topk_ties_take_lowest_ids():
    """Equal logits at the K-th place: the lowest expert ids (torch.topk's CUDA selection rule)."""
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, 2.0], [0.5] * 6])
    ids, w = fused_softmax_topk(logits, 2, True)
    assert ids.tolist() == [[1, 2], [0, 1]]
    torch.testing.assert_close(w, torch.full((2, 2), 0.5))


# --- the router GEMV with softmax-top-k (one token) ---

ROUTER_CASES = [(8, 7, 2, None), (64, 96, 8, None), (60, 130, 4, (4, 64, 4)), (128, 300, 8, (8, 128, 4)),
                (512, 40, 10, (2, 16, 2))]


@interp
@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E,D,K,tile", ROUTER_CASES)
def test_router_topk(E, D, K, tile, dtype, fuse):
    """Logits = x @ router.T rounded once from fp32 (compared with the float64 product rounded: exact in bf16, to
    fp32's last bits in fp32), then the softmax_topk kernel's ids and weights on those logits; the counter is back
    at 0 after every launch, so a second launch (a graph replay) works alike. Tiles with E % BLOCK_R != 0 and
    D > BLOCK_D (the column loop)."""
    from tiered.kernels.fused_route import router_topk

    g = torch.Generator().manual_seed(E * D + K)
    counter = torch.zeros(1, dtype=torch.int32)
    for rep in range(2):
        x = torch.randn(1, D, generator=g).to(dtype)
        r = (torch.randn(E, D, generator=g) / D ** 0.5 * 3).to(dtype)
        logits, ids, w = router_topk(x, r, K, rep == 0, counter, fuse=fuse, tile=tile)
        exact = x.double() @ r.double().T
        assert logits.dtype == dtype and logits.shape == (1, E) and counter.item() == 0
        if dtype == torch.bfloat16:
            assert torch.equal(logits, exact.to(dtype))
        else:
            torch.testing.assert_close(logits, exact.float(), rtol=1e-5, atol=1e-5)
        rids, rw = fused_softmax_topk(logits, K, rep == 0)
        assert torch.equal(ids, rids) and torch.equal(w, rw)


@interp
@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("dtype,w32", [(torch.bfloat16, False), (torch.bfloat16, True), (torch.float32, True)])
@pytest.mark.parametrize("E,D,K,tile", ROUTER_CASES[1:4])
def test_norm_router_topk(E, D, K, tile, dtype, w32, fuse):
    """The add+norm inside the router's launch: h' and x equal add_rms_norm's (bf16 bit for bit; fp32 to rstd's
    last bits), logits, ids and weights equal router_topk's on add_rms_norm's x; D > BLOCK_D takes the two
    passes over the row in chunks."""
    from tiered.kernels.fused_route import norm_router_topk, router_topk

    g = torch.Generator().manual_seed(E + D + K)
    h = torch.randn(1, D, generator=g).to(dtype)
    delta = torch.randn(1, D, generator=g).to(dtype)
    w = (torch.rand(D, generator=g) + 0.5).to(torch.float32 if w32 else dtype)
    r = (torch.randn(E, D, generator=g) / D ** 0.5 * 3).to(dtype)
    counter = torch.zeros(1, dtype=torch.int32)
    h2, x, logits, ids, wts = norm_router_topk(h, delta, w, 1e-6, r, K, True, counter, fuse=fuse, tile=tile)
    rh, rx = add_rms_norm(h, delta, w, 1e-6)
    assert torch.equal(h2, rh) and counter.item() == 0
    _same(x, rx)
    rl, ri, rw = router_topk(rx, r, K, True, counter, fuse=fuse, tile=tile)
    if dtype == torch.bfloat16:
        assert torch.equal(logits, rl) and torch.equal(ids, ri) and torch.equal(wts, rw)
    else:
        torch.testing.assert_close(logits, rl, rtol=1e-5, atol=1e-5)
        assert torch.equal(ids, ri)


@interp
def test_router_topk_refuses_what_it_does_not_serve():
    from tiered.kernels.fused_route import router_mode, router_topk

    c = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="x \\[1, D\\]"):
        router_topk(torch.zeros(2, 8), torch.zeros(4, 8), 2, True, c)
    with pytest.raises(ValueError, match="dtype"):
        router_topk(torch.zeros(1, 8), torch.zeros(4, 8, dtype=torch.bfloat16), 2, True, c)
    with pytest.raises(ValueError, match="top_k=5 with 4"):
        router_topk(torch.zeros(1, 8), torch.zeros(4, 8), 5, True, c)
    from tiered.kernels.fused_route import norm_router_topk

    with pytest.raises(ValueError, match="weight \\[D\\]"):
        norm_router_topk(torch.zeros(1, 8), torch.zeros(1, 8), torch.ones(7), 1e-6, torch.zeros(4, 8), 2, True, c)
    os.environ["TIERED_ROUTER"] = "cublas"
    try:
        with pytest.raises(ValueError, match="fused, gemv, torch"):
            router_mode()
    finally:
        del os.environ["TIERED_ROUTER"]


@interp
@pytest.mark.parametrize("mode", ["fused", "gemv", "torch"])
def test_model_router_modes(tmp_path, monkeypatch, mode):
    """TIERED_ROUTER's three paths give the glue-off model's greedy tokens (bf16, the interpreter); fused and gemv
    take the router kernel for one-token steps, with the add+norm before it in the same launch."""
    from tiered.kernels import fused_route
    from tiered.layout.repack import repack
    from tiered.store.disk import Layout

    ck = make_checkpoint(tmp_path / "q", "qwen3_moe", seed=3, norm_topk_prob=True)
    repack(ck, tmp_path / "l", progress=False)
    lay = Layout.open(tmp_path / "l")
    monkeypatch.setenv("TIERED_ROUTER", mode)
    calls = []
    real = fused_route._launch
    monkeypatch.setattr(fused_route, "_launch", lambda *a: calls.append((a[1] is not None, a[6])) or real(*a))
    toks = {}
    for glue in (False, True):
        m = _model(lay, glue, torch.bfloat16)
        prompt, out = torch.arange(3, 9), []
        logits = m.forward(prompt, 0)
        for i in range(4):
            out.append(int(logits[-1].argmax()))
            logits = m.forward(torch.tensor(out[-1:]), 6 + i)
        toks[glue] = out
    assert toks[True] == toks[False]
    assert calls == ([] if mode == "torch" else [(True, mode == "fused")] * (4 * lay.config.num_layers))


# --- the whole model, glue on vs off (CPU, interpreter) ---

MODEL_CASES = {  # name -> (family, overrides): every q/k norm kind, clip, window, shared expert, ...
    "qwen3_moe-head": ("qwen3_moe", {"norm_topk_prob": True}),
    "olmoe-proj-clip": ("olmoe", {"clip_qkv": 0.05}),
    "mixtral-none-window": ("mixtral", {"sliding_window": 5}),
    "qwen2_moe-shared": ("qwen2_moe", {}),
    "qwen3_5_moe": ("qwen3_5_moe", {}),  # partial rotary, zero-centred fp32 norms, output gate, DeltaNet layers
    "gpt_oss": ("gpt_oss", {}),  # attention sinks (K/V stored by the kernel, SDPA-style attention), qkv bias
}


def _model(layout, glue: bool, dtype=torch.float32, max_context: int = 32):
    from tiered.model.transformer import Transformer
    from tiered.store.resident import ResidentExperts

    return Transformer(layout.config, layout.dense(), ResidentExperts.from_layout(layout), device="cpu",
                       dtype=dtype, max_context=max_context, glue=glue)


@interp
@pytest.mark.parametrize("name", sorted(MODEL_CASES))
def test_model_glue_matches_torch(tmp_path, name):
    """Prefill, eager one-token steps and the static (graph-shaped) step: glue on gives the torch path's logits."""
    from tiered.layout.repack import repack
    from tiered.store.disk import Layout

    family, over = MODEL_CASES[name]
    ck = make_checkpoint(tmp_path / name, family, seed=3, **over)
    repack(ck, tmp_path / "layout", progress=False)
    lay = Layout.open(tmp_path / "layout")
    ids = torch.randint(0, lay.config.vocab_size, (7,), generator=torch.Generator().manual_seed(0))
    cases = ((torch.float32, 1e-5), (torch.bfloat16, 2e-2))
    for dtype, tol in cases[:1] if family == "gpt_oss" else cases:  # gpt-oss's torch attention is slow on CPU
        ref, fused = _model(lay, False, dtype), _model(lay, True, dtype)
        assert fused.glue and not ref.glue
        a, b = ref.forward(ids[:5], 0, all_logits=True), fused.forward(ids[:5], 0, all_logits=True)
        assert _rel(b, a) < tol
        for p in (5, 6):
            a, b = ref.forward(ids[p:p + 1], p), fused.forward(ids[p:p + 1], p)
            assert _rel(b, a) < tol
        pos = torch.tensor([7])
        tok = ids[6:7]
        a = ref.decode_static(tok, pos, ref.graph_span(7))
        b = fused.decode_static(tok, pos, fused.graph_span(7))
        assert _rel(b, a) < tol
        if dtype == torch.float32:
            torch.testing.assert_close(fused.cache.k[:, :, :8], ref.cache.k[:, :, :8], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(fused.cache.v[:, :, :8], ref.cache.v[:, :, :8], rtol=1e-5, atol=1e-5)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@interp
def test_reference_model_greedy_glue(reference_layout):
    """The trained reference model (OLMoE: whole-projection q/k norms), fp32 CPU: glue on gives the same greedy
    tokens as the torch path."""
    from tiered.store.disk import Layout

    lay = Layout.open(reference_layout)
    toks = []
    for glue in (False, True):
        m = _model(lay, glue, max_context=48)
        ids = [5, 17, 3, 99, 42, 7, 250, 31]
        out = m.forward(torch.tensor(ids), 0)
        for p in range(len(ids), len(ids) + 12):
            nxt = int(out[-1].argmax())
            ids.append(nxt)
            out = m.forward(torch.tensor([nxt]), p)
        toks.append(ids)
    assert toks[0] == toks[1]


# --- sm_90 compile (no GPU needed) ---

_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tiered.kernels import fused_norm, fused_rope, fused_route
tgt = GPUTarget("cuda", 90, 32)

def cubin(fn, sig, cx):  # with programmatic dependent launch (kernels/pdl.py), as the launchers pass it on sm_90
    k = triton.compile(ASTSource(fn, {**sig, "GDC": "constexpr"}, constexprs={**cx, "GDC": True}), target=tgt)
    assert k.asm["cubin"] and "griddepcontrol.wait" in k.asm["ptx"]

for dt, wdt in (("bf16", "bf16"), ("bf16", "fp32"), ("fp32", "fp32"), ("fp16", "fp16")):
    for add in (False, True):
        sig = {"H": f"*{dt}", "DELTA": f"*{dt}", "W": f"*{wdt}", "HOUT": f"*{dt}", "X": f"*{dt}", "D": "i32",
               "eps": "fp32", "s_h": "i64", "s_d": "i64", "s_ho": "i64", "s_x": "i64",
               "BLOCK": "constexpr", "ADD": "constexpr", "W32": "constexpr"}
        cubin(fused_norm._ADD_NORM, sig, {"BLOCK": 2048, "ADD": add, "W32": wdt == "fp32"})
    for norm, pos, clip, r in ((True, True, False, 128), (False, False, True, 128), (True, False, True, 64)):
        sig = {"QKV": f"*{dt}", "NW": f"*{wdt}", "COS": f"*{dt}", "SIN": f"*{dt}", "Q": f"*{dt}", "KO": f"*{dt}",
               "VO": f"*{dt}", "POS": "*i64", "pos0": "i64", "eps": "fp32", "clip": "fp32",
               **{k: "i64" for k in ("s_qkv", "s_cos", "s_sin", "s_q", "s_kr", "s_kh", "s_vr", "s_vh")},
               **{k: "constexpr" for k in ("NQ", "NK", "HD", "R", "NQG", "GLEN_Q", "GLEN_K", "BLOCK", "NORM", "W32",
                                           "CLIP", "HAS_POS")}}
        cx = {"NQ": 4096, "NK": 512, "HD": 128, "R": r, "NQG": 32, "GLEN_Q": 128, "GLEN_K": 128, "BLOCK": 128,
              "NORM": norm, "W32": wdt == "fp32", "CLIP": clip, "HAS_POS": pos}
        cubin(fused_rope._QK_ROPE, sig, cx)
        cx.update(NQG=1, GLEN_Q=4096, GLEN_K=512, BLOCK=4096)  # whole-projection norms (OLMoE)
        cubin(fused_rope._QK_ROPE, sig, cx)
    sig = {"LOGITS": f"*{dt}", "IDS": "*i64", "W": "*fp32", "E": "i32", "s_l": "i64", "SLOT_OF": "*i32",
           "base": "i64", "SLOTS": "*i64", "BAD": "*i64", "HOST_ROW": "*i64", "SRC": "*i64", "COUNTS": "*i64",
           "K": "constexpr", "K_P": "constexpr", "BLOCK_E": "constexpr", "NORM": "constexpr", "LOOKUP": "constexpr",
           "LOAD": "constexpr"}
    # lookup: a complete slot table's slots; load: planned keys loaded while the copy fill's plan is in flight
    for norm, lookup, load in ((False, False, False), (True, False, False), (True, True, False), (True, True, True)):
        cubin(fused_route._SOFTMAX_TOPK, sig, {"K": 8, "K_P": 8, "BLOCK_E": 128, "NORM": norm, "LOOKUP": lookup,
                                               "LOAD": load})
    cubin(fused_route._SOFTMAX_TOPK, sig, {"K": 10, "K_P": 16, "BLOCK_E": 512, "NORM": True, "LOOKUP": False,
                                           "LOAD": False})
    sig = {"X": f"*{dt}", "R": f"*{dt}", "LOGITS": f"*{dt}", "IDS": "*i64", "W": "*fp32", "COUNTER": "*i32",
           "E": "i32", "D": "i32", "s_r": "i64", "H": f"*{dt}", "DELTA": f"*{dt}", "NW": f"*{wdt}",
           "HOUT": f"*{dt}", "eps": "fp32",
           **{k: "constexpr" for k in ("K", "K_P", "BLOCK_R", "BLOCK_D", "BLOCK_E", "NORM", "FUSE", "NORM_IN", "W32")}}
    for fuse in (False, True):
        for norm_in in (False, True):
            cubin(fused_route._ROUTER, sig, {"K": 8, "K_P": 8, "BLOCK_R": 1, "BLOCK_D": 2048, "BLOCK_E": 128,
                                             "NORM": True, "FUSE": fuse, "NORM_IN": norm_in,
                                             "W32": norm_in and wdt == "fp32"})
        cubin(fused_route._ROUTER, sig, {"K": 10, "K_P": 16, "BLOCK_R": 4, "BLOCK_D": 2048, "BLOCK_E": 512,
                                         "NORM": False, "FUSE": fuse, "NORM_IN": True, "W32": wdt == "fp32"})
print("ok")
"""


def test_glue_kernels_compile_for_sm90():
    """The real compiler (stricter than the interpreter) accepts every kernel variant for an H100/H200, down to the
    cubin, on a machine without a GPU. In a fresh process: TRITON_INTERPRET (set without CUDA) applies at import."""
    from conftest import compile_sm90

    compile_sm90(_COMPILE, timeout=600)


# --- CUDA: the graphed decode, glue on vs off ---

@pytest.mark.cuda
@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("E,D,K", [(128, 2048, 8), (64, 1024, 8), (512, 4096, 10)])
def test_router_topk_cuda(E, D, K, fuse):
    """On the GPU, with PDL where the device has it: bf16 logits equal the float64 product rounded (the fp32 sums'
    order may move a logit by one ulp where the sum sits on a rounding boundary: at most 1 in 500), the ids equal
    the softmax_topk kernel's on the launch's own logits (weights to fp32's last bits), over 200 launches replayed
    from a CUDA graph (a fused launch resets its counter), and agree with cuBLAS's route on all but ulp-near ties."""
    from tiered.kernels.fused_route import router_topk
    from tiered.model.moe import route

    g = torch.Generator(device="cuda").manual_seed(E + D)
    xs = torch.randn(200, 1, D, device="cuda", generator=g).to(torch.bfloat16)
    r = (torch.randn(E, D, device="cuda", generator=g) / D ** 0.5 * 3).to(torch.bfloat16)
    counter = torch.zeros(1, dtype=torch.int32, device="cuda")
    x = xs[0].clone()
    router_topk(x, r, K, True, counter, fuse=fuse)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = router_topk(x, r, K, True, counter, fuse=fuse)
    off, same_ids = 0, 0
    for i in range(xs.shape[0]):
        x.copy_(xs[i])
        graph.replay()
        logits, ids, w = (t.clone() for t in out)
        assert counter.item() == 0
        exact = (x.double() @ r.double().T).to(torch.bfloat16)
        off += int((logits != exact).sum())
        rids, rw = fused_softmax_topk(logits, K, True)  # its own launch: other warps, other fp32 sum order
        assert torch.equal(ids, rids)
        torch.testing.assert_close(w, rw, rtol=1e-6, atol=1e-7)
        _, cids, _ = route(x, r, K, True)
        same_ids += bool(torch.equal(ids.sort(-1).values, cids.sort(-1).values))
    assert off <= xs.shape[0] * E // 500, off
    assert same_ids >= xs.shape[0] - 2, same_ids


@pytest.mark.cuda
@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("E,D,K", [(128, 2048, 8), (512, 4096, 10)])
def test_norm_router_topk_cuda(E, D, K, fuse):
    """On the GPU, replayed from a CUDA graph: the add+norm inside the router's launch gives add_rms_norm's h' (bit
    for bit) and x (its rstd may differ in the last bit: at most 1 in 500 elements off, by one ulp), and
    router_topk's routing on that x."""
    from tiered.kernels.fused_norm import add_rms_norm
    from tiered.kernels.fused_route import norm_router_topk, router_topk

    g = torch.Generator(device="cuda").manual_seed(E * 7 + D)
    hs = torch.randn(50, 1, D, device="cuda", generator=g).to(torch.bfloat16)
    ds = torch.randn(50, 1, D, device="cuda", generator=g).to(torch.bfloat16)
    w = (torch.rand(D, device="cuda", generator=g) + 0.5).to(torch.bfloat16)
    r = (torch.randn(E, D, device="cuda", generator=g) / D ** 0.5 * 3).to(torch.bfloat16)
    counter = torch.zeros(1, dtype=torch.int32, device="cuda")
    h, d = hs[0].clone(), ds[0].clone()
    norm_router_topk(h, d, w, 1e-6, r, K, True, counter, fuse=fuse)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = norm_router_topk(h, d, w, 1e-6, r, K, True, counter, fuse=fuse)
    x_off = 0
    for i in range(hs.shape[0]):
        h.copy_(hs[i])
        d.copy_(ds[i])
        graph.replay()
        h2, x, logits, ids, wts = (t.clone() for t in out)
        rh, rx = add_rms_norm(h, d, w, 1e-6)
        assert torch.equal(h2, rh) and counter.item() == 0
        bad = x != rx
        x_off += int(bad.sum())
        assert ((x.float() - rx.float()).abs()[bad] <= rx.float().abs()[bad] * 2 ** -7).all()
        rl, ri, rw = router_topk(x, r, K, True, counter, fuse=fuse)
        assert torch.equal(ids, ri)
        torch.testing.assert_close(wts, rw, rtol=1e-6, atol=1e-7)
    assert x_off <= hs.shape[0] * D // 500, x_off


@pytest.mark.cuda
def test_graphed_decode_glue_cuda():
    """The reference model in bf16 on CUDA, every expert resident, the step replayed from a CUDA graph: glue on gives
    the torch glue's greedy tokens, and teacher-forced logits within 2e-2 relative."""
    import tiered

    prompt = list(range(100, 140))
    runs = {}
    for glue in (False, True):
        eng = tiered.load(None, device="cuda", dtype="bfloat16", max_context=256, glue=glue)
        assert eng.model.glue is glue
        g = eng.generate(prompt, max_new_tokens=48, stop_at_eos=False)
        assert g.stats["decode_graphs"] == "full"
        forced = eng.model.forward(torch.tensor(prompt + g.token_ids, device="cuda"), 0, all_logits=True)
        runs[glue] = (g.token_ids, forced.float(), g.stats)
        del eng
        torch.cuda.empty_cache()
    assert runs[True][0] == runs[False][0]
    assert _rel(runs[True][1], runs[False][1]) < 2e-2
    assert runs[True][2]["glue_kernels"] == "triton" and runs[False][2]["glue_kernels"] == "torch"


@interp
def test_batch_step_glue_matches_torch():
    """The batch scheduler's step (pages written by the fused kernel, norms fused across layers): the reference
    model's greedy rows with glue on equal those with glue off (fp32 CPU), prompts chunked and decoded together."""
    from tiered.decode.scheduler import Request, SamplingParams, Scheduler
    from tiered.engine import load

    prompts = ["def fib(n):", "class Foo:\n    def"]
    outs = []
    for glue in (False, True):
        eng = load(None, device="cpu", dtype="float32", max_context=128, glue=glue)
        assert eng.model.glue is glue
        sch = Scheduler(eng, max_batch=2, page_size=8, prefill_tokens=5)
        reqs = [sch.submit(Request(str(i), eng.encode(p), SamplingParams(max_tokens=6))) for i, p in enumerate(prompts)]
        sch.run_until_idle()
        outs.append([r.out_ids for r in reqs])
    assert outs[0] == outs[1]


@interp
def test_launch_count_per_layer(tmp_path):
    """tools/profile_kernels.py's CPU count of the graphed step's launches: with the glue on, each layer's glue is
    4 Triton launches (1 add+norm, 1 q/k rope, the router's GEMV with the add+norm before it, softmax-top-k: no
    aten:linear left for the router), and the torch glue's 20+ small ops per layer are gone."""
    import sys
    from pathlib import Path

    from tiered.layout.repack import repack
    from tiered.store.disk import Layout

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    from profile_kernels import count_cpu

    ck = make_checkpoint(tmp_path / "q", "qwen3_moe", seed=1, norm_topk_prob=True)
    repack(ck, tmp_path / "l", progress=False)
    lay = Layout.open(tmp_path / "l")
    L = lay.config.num_layers
    runs = {}
    for glue in (False, True):
        m = _model(lay, glue, torch.bfloat16)
        m.forward(torch.arange(3, 9), 0)
        runs[glue] = count_cpu(m, 2, 6)
    on, off = runs[True]["by_op"], runs[False]["by_op"]
    # the norm before the router runs in the router's launch: add+norm once a layer (+ the final norm)
    assert on["triton:add_rms_norm"] == L + 1 and on["triton:qk_rope"] == L and on["triton:router_topk"] == L
    assert on["triton:softmax_topk"] == L and on["aten:linear"] == runs[False]["by_op"]["aten:linear"] - L
    assert not any(k in on for k in ("aten:rms_norm", "aten:flip", "aten:softmax", "aten:topk", "aten:index_copy_"))
    saved = (runs[False]["launches_per_token"] - runs[True]["launches_per_token"]) / L
    assert saved >= 20, (off, on)


@interp
def test_bench_router_small(tmp_path, monkeypatch):
    """benchmarks/bench_router.py --small: every variant's routing checked against torch's on the interpreter."""
    import sys
    from pathlib import Path

    monkeypatch.setenv("OUT", str(tmp_path))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from bench_router import main

    assert main(["--small"]) == 0
    import json

    rows = json.loads((tmp_path / "router_small.json").read_text())["rows"]
    assert {r["variant"].split()[0] for r in rows} == {"torch", "gemv", "fused", "norm+gemv", "norm+fused"}
    assert len(rows) == 9
    assert all(r["sets_differ"] == 0 for r in rows)
