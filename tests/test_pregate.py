"""model/pregate.py and its programs in kernels/fused_rope.py: the guess rows, the experts and byte ranges each pregate
program asks L2 for (the interpreter's dry run), and that nothing the model computes changes."""
from __future__ import annotations

import os

import pytest
import torch

from tiered.kernels.fused_rope import PREGATE_PIECES, pregate_pieces, qk_rope
from tiered.model.pregate import PregateTarget, enabled, guess_rows, mode

interp = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter tests run on CPU")


def test_guess_rows_give_the_routers_order_on_the_pre_attention_state():
    """guess_rows applied to n(h) * attn_norm ranks the experts as the router ranks n(h) * mlp_norm (the positive rms
    scale aside); an attn_norm of 0 leaves that input out."""
    g = torch.Generator().manual_seed(0)
    E, D = 16, 32
    router = torch.randn(E, D, generator=g)
    attn_w, mlp_w = torch.rand(D, generator=g) + 0.5, torch.rand(D, generator=g) + 0.5
    h = torch.randn(5, D, generator=g)
    n = h / h.pow(2).mean(-1, keepdim=True).sqrt()
    want = (n * mlp_w) @ router.T
    got = (n * attn_w) @ guess_rows(router, attn_w, mlp_w).T
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    attn_w[3] = 0.0
    assert torch.all(guess_rows(router, attn_w, mlp_w)[:, 3] == 0)


def test_enabled_reads_the_switch(monkeypatch):
    monkeypatch.delenv("TIERED_PREGATE", raising=False)
    assert not enabled() and mode() == "off"
    for v, want in (("1", "bulk"), ("bulk", "bulk"), ("lines", "lines"), ("0", "off")):
        monkeypatch.setenv("TIERED_PREGATE", v)
        assert mode() == want and enabled() == (want != "off")
    monkeypatch.setenv("TIERED_PREGATE", "maybe")
    with pytest.raises(ValueError, match="TIERED_PREGATE"):
        enabled()


def test_pieces_cover_a_block_in_16_byte_units():
    for block, chunks in ((4096 * 650, 8), (16384, 8), (4096, 3)):
        chunk, piece = pregate_pieces(PREGATE_PIECES, chunks, block)
        assert chunk % 16 == 0 and piece % 16 == 0 and chunk * chunks >= block and piece * PREGATE_PIECES >= chunk


@interp
@pytest.mark.parametrize("lines", [False, True])
@pytest.mark.parametrize("ties", [False, True])
def test_pregate_programs_ask_for_the_guess_best_experts_blocks(ties, lines):
    """qk_rope with a pregate target (the dry run): q, k and v are what they are without it; program p names the
    guess's (p mod G)-th best expert (ties to the lower index) and its pieces tile that expert's block exactly once
    over the C programs, each a multiple of 16 bytes."""
    g = torch.Generator().manual_seed(1)
    H, KV, hd, E, G, C = 2, 1, 16, 12, 3, 2
    nq, nk = H * hd, KV * hd
    qkv = torch.randn(1, nq + 2 * nk + E, generator=g)
    if ties:
        qkv[0, nq + 2 * nk:] = torch.tensor([1.0, 3.0, 3.0, 0.5, 3.0, 2.0, 2.0, -1.0, 0.0, 3.0, 1.0, 2.0])
    cos, sin = torch.randn(1, hd, generator=g), torch.randn(1, hd, generator=g)
    w = torch.rand(H + KV, hd, generator=g) + 0.5
    block = 4096 + 64
    pool = torch.zeros(3 * E, block, dtype=torch.uint8)
    target = PregateTarget(col=nq + 2 * nk, experts=E, top=G, chunks=C, pool=pool, row0=E, lines=lines)
    dry = torch.full((G * C * PREGATE_PIECES, 3), -1, dtype=torch.int64)
    kw = dict(heads=H, kv_heads=KV, head_dim=hd, norm="head", norm_weight=w, eps=1e-6)
    q0, k0, v0 = qk_rope(qkv.clone(), cos, sin, **kw)
    q1, k1, v1 = qk_rope(qkv.clone(), cos, sin, **kw, pregate=target, pregate_dry=dry)
    assert torch.equal(q0, q1) and torch.equal(k0, k1) and torch.equal(v0, v1)
    logits = qkv[0, nq + 2 * nk:]
    order = sorted(range(E), key=lambda e: (-float(logits[e]), e))[:G]
    rows = dry.view(G * C, PREGATE_PIECES, 3)
    for r in range(G):
        progs = [p for p in range(G * C) if p % G == r]
        assert all(int(x) == order[r] for p in progs for x in rows[p, :, 0]), (r, order, rows[progs, :, 0])
        covered = torch.zeros(block, dtype=torch.int32)
        for p in progs:
            for off, n in rows[p, :, 1:].tolist():
                assert n % 16 == 0 and n >= 0
                covered[off:off + n] += 1
        assert torch.all(covered == 1), covered.unique(return_counts=True)


@interp
def test_pregate_refuses_guess_columns_past_qkv():
    H, KV, hd, E = 2, 1, 16, 8
    qkv = torch.randn(1, (H + 2 * KV) * hd + E - 1)
    cos = sin = torch.zeros(1, hd)
    target = PregateTarget(col=(H + 2 * KV) * hd, experts=E, top=2, chunks=2,
                           pool=torch.zeros(E, 64, dtype=torch.uint8), row0=0)
    with pytest.raises(ValueError, match="guess columns"):
        qk_rope(qkv, cos, sin, heads=H, kv_heads=KV, head_dim=hd, pregate=target)


@pytest.mark.cuda
@pytest.mark.parametrize("fmt,how", [("source", "1"), ("q4", "1"), ("q4", "lines")])
def test_cuda_pregate_keeps_the_graphed_decode(monkeypatch, fmt, how):
    """The reference model on CUDA, resident, the step replayed from graphs: with TIERED_PREGATE on (bulk or line
    prefetches) every layer gets the guess rows and its qk_rope asks L2 for the guessed experts, and the greedy tokens
    are those without it (the guess changes no value the model computes)."""
    import tiered

    prompt = list(range(100, 140))
    runs = {}
    for on in ("0", how):
        monkeypatch.setenv("TIERED_PREGATE", on)
        eng = tiered.load(None, device="cuda", dtype="bfloat16", max_context=256, attn="triton", experts=fmt,
                          dense=fmt)
        L = eng.model.config.num_layers
        assert eng.model.pregate_layers == (L if on != "0" else 0)
        g = eng.generate(prompt, max_new_tokens=48, stop_at_eos=False)
        assert g.stats["decode_graphs"] == "full"
        runs[on] = g.token_ids
        del eng
        torch.cuda.empty_cache()
    assert runs["0"] == runs[how]


def test_pregate_attaches_nowhere_on_the_cpu(monkeypatch):
    """TIERED_PREGATE=1 on the CPU (no device pool, no L2 to fill): no layer changes, the tokens are the same."""
    import tiered

    runs = {}
    for on in ("0", "1"):
        monkeypatch.setenv("TIERED_PREGATE", on)
        eng = tiered.load(None, device="cpu", dtype="float32", max_context=64)
        assert eng.model.pregate_layers == 0
        assert all(lw.attn is None or lw.attn.pregate is None for lw in eng.model.layers)
        runs[on] = eng.generate(list(range(100, 108)), max_new_tokens=4, stop_at_eos=False).token_ids
    assert runs["0"] == runs["1"]
