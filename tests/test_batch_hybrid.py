"""The batch step and scheduler on the families with per-sequence state other than K/V: Qwen3.5-MoE (Gated DeltaNet
recurrent slots, gated attention), Qwen3-Next (the same hybrid) and DeepSeek-V3 (paged MLA latents, dense first layers, grouped sigmoid routing).
Batched greedy tokens equal the single-sequence engine's (engine.generate, fp32 CPU), prompts of different lengths
(one longer than the DeltaNet chunk and the conv kernel), rows joining as others finish, prompt chunks riding
decode steps, preemption; slots and pages come back; the pool's byte accounting."""
from __future__ import annotations

import shutil

import pytest
import torch

from conftest import make_checkpoint
from tiered.decode.options import BatchConfig
from tiered.decode.scheduler import Request, SamplingParams, Scheduler
from tiered.decode.state import (StateBudgetError, StatePool, page_bytes, pages_for_budget, pool_bytes, pool_pages,
                                 slot_bytes)
from tiered.engine import load
from tiered.layout.repack import repack
from tiered.model.deltanet import CHUNK, deltanet, deltanet_rows

VOCAB = 8192
CTX = 160
# lengths: one token, shorter than the conv kernel (4), between, and longer than the DeltaNet chunk (64)
LENGTHS = [1, 3, 9, 2 * CHUNK + 5, 17, 40]
NEW = [6, 3, 9, 5, 1, 7]  # rows finish at different steps


def _layout(root, family, reference_model, quant: str | None = None):
    if family == "deepseek_v3":
        from test_deepseek_v3 import ds_config  # the DeepSeek-V3 test's tiny config (MLA, dense layer 0, groups)
        import transformers as tf

        torch.manual_seed(4)
        hf = tf.AutoModelForCausalLM.from_config(ds_config()).float().eval()
        with torch.no_grad():
            for layer in hf.model.layers[1:]:
                layer.mlp.gate.weight.normal_(0, 0.3)
                layer.mlp.gate.e_score_correction_bias.normal_(0, 0.2)
        ck = root / "ck"
        hf.save_pretrained(ck)
    else:
        ck = make_checkpoint(root / "ck", family, seed=3, vocab_size=VOCAB, max_position_embeddings=CTX)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(reference_model / name, ck / name)
    kw = {} if quant is None else dict(experts=quant, dense=quant, q4_refine="none")
    repack(ck, root / "lay", progress=False, **kw)
    return root / "lay"


@pytest.fixture(scope="module", params=["qwen3_5_moe", "qwen3_next", "deepseek_v3"])
def fam(request, tmp_path_factory, reference_model):
    """(family, engine, prompts, batch-1 greedy tokens of each prompt)."""
    family = request.param
    lay = _layout(tmp_path_factory.mktemp(family), family, reference_model)
    eng = load(lay, device="cpu", dtype="float32", max_context=160)  # DeepSeek-V3's tiny config: 160 positions
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in LENGTHS]
    ref = [eng.generate(p, max_new_tokens=n, stop_at_eos=False).token_ids for p, n in zip(prompts, NEW)]
    return family, eng, prompts, ref


def _run(sch: Scheduler, prompts, news) -> list[Request]:
    reqs = [sch.submit(Request(str(i), p, SamplingParams(max_tokens=n, stop_at_eos=False)))
            for i, (p, n) in enumerate(zip(prompts, news))]
    for _ in range(3000):
        if sch.idle():
            break
        sch.step()
    assert sch.idle()
    return reqs


@pytest.mark.parametrize("max_batch,page_size,prefill_tokens,attn", [
    (6, 16, 512, "rows"),  # every row at once, each prompt in one chunk (as the engine prefills it)
    (3, 5, 512, "paged"),  # rows join as others finish (slots reused); decode rows' attention in one paged call
    (4, 4, 7, "rows"),  # prompts in chunks of 7 riding the decode steps
])
def test_batched_greedy_equals_single_sequence(fam, max_batch, page_size, prefill_tokens, attn):
    family, eng, prompts, ref = fam
    sch = Scheduler(eng, max_batch=max_batch, page_size=page_size, prefill_tokens=prefill_tokens,
                    decode_attention=attn)
    st = sch.state
    if family != "deepseek_v3":
        assert {ls.kind for ls in st.layers} == {"recurrent", "kv"} and st.num_slots == max_batch
    else:
        assert {ls.kind for ls in st.layers} == {"latent"} and st.num_slots == 0
    reqs = _run(sch, prompts, NEW)
    for r, want, p in zip(reqs, ref, prompts):
        assert r.out_ids == want, f"{family}: row {r.id} ({len(p)}-token prompt) differs from the single-sequence run"
        assert r.finish_reason == "length"
    s = sch.stats()
    assert s["rows_per_step"] > 1 and s["tokens_generated"] == sum(NEW)
    assert st.free_pages == st.num_pages and st.free_slots == st.num_slots  # every page and slot came back


def test_preemption_recomputes_state(fam):
    """A page pool too small for every row: rows are preempted (their slot freed) and recompute from zero."""
    family, eng, prompts, _ = fam
    short = [p for p in prompts if len(p) < CHUNK]  # 21 pages of 4 at admission, 40 at the end
    ref = [eng.generate(p, max_new_tokens=16, stop_at_eos=False).token_ids for p in short]
    sch = Scheduler(eng, max_batch=6, page_size=4, kv_pages=26)
    reqs = _run(sch, short, [16] * len(short))
    assert sch.preemptions > 0
    for r, want in zip(reqs, ref):
        assert r.out_ids == want
    assert sch.state.free_slots == sch.state.num_slots and sch.state.free_pages == sch.state.num_pages


def test_slots_follow_rows(fam):
    """A row holds a slot from admission to its end; rows that finish early give theirs to waiting requests."""
    family, eng, prompts, _ = fam
    if family == "deepseek_v3":
        pytest.skip("only DeltaNet models hold slots")
    sch = Scheduler(eng, max_batch=2, page_size=8)
    reqs = [sch.submit(Request(str(i), prompts[i], SamplingParams(max_tokens=n, stop_at_eos=False)))
            for i, n in enumerate([1, 4, 2, 3])]
    seen = []
    while not sch.idle():
        sch.step()
        held = sorted(r.slot for r in sch.running)
        assert len(set(held)) == len(held) and all(0 <= s < 2 for s in held)
        assert sch.state.free_slots == 2 - len(held)
        seen.append(held)
    assert all(r.slot == -1 and r.done for r in reqs)
    assert sch.state.free_slots == 2 and max(len(h) for h in seen) == 2  # both slots held, then handed on


def test_pool_accounting(fam):
    """Bytes per page (K/V of attention layers, latents of MLA layers) and per slot (DeltaNet state) match the
    config; a --kv-gb budget pays max_batch slots first, and is refused when it cannot."""
    family, eng, _, _ = fam
    cfg = eng.config
    opts = BatchConfig(max_batch=4, kv_gb=0.001, page_size=8)
    dt = torch.float32
    st = StatePool(cfg, num_pages=pool_pages(opts, cfg, CTX, dt), page_size=8, device="cpu", dtype=dt,
                   num_slots=4 if cfg.num_linear_layers else 0)
    assert st.page_bytes == page_bytes(cfg, 8, dt) == 8 * cfg.kv_bytes_per_token(4)
    assert st.slot_bytes == slot_bytes(cfg, dt) == cfg.state_bytes_per_sequence(4)
    assert st.nbytes == pool_bytes(opts, cfg, CTX, dt) <= 0.001 * (1 << 30)
    assert st.bytes_for(20) == 3 * st.page_bytes + st.slot_bytes
    if family == "deepseek_v3":
        m = cfg.extra["mla"]
        assert st.page_bytes == 8 * 3 * (m["kv_lora_rank"] + m["qk_rope_head_dim"]) * 4 and st.slot_bytes == 0
        return
    Ll, C, W = cfg.num_linear_layers, cfg.linear_conv_dim, cfg.linear_conv_kernel
    assert st.slot_bytes == Ll * (C * (W - 1) * 4 + cfg.linear_num_value_heads * cfg.linear_key_head_dim
                                  * cfg.linear_value_head_dim * 4)
    assert st.page_bytes == 8 * 2 * cfg.num_attention_layers * cfg.num_kv_heads * cfg.head_dim * 4
    assert st.num_pages == (int(0.001 * (1 << 30)) - 4 * st.slot_bytes) // st.page_bytes
    with pytest.raises(StateBudgetError, match="recurrent state of 4 rows"):
        pages_for_budget(cfg, st.slot_bytes * 3 / (1 << 30), 8, dt, slots=4)
    # a slot is zeroed when handed out; all in use -> refused; a double free is caught
    st.recurrent[1].fill_(1.0)
    s = [st.alloc_slot() for _ in range(4)]
    assert sorted(s) == [0, 1, 2, 3] and float(st.recurrent[1].abs().sum()) == 0.0
    with pytest.raises(StateBudgetError):
        st.alloc_slot()
    st.free_slot(s[0])
    with pytest.raises(AssertionError):
        st.free_slot(s[0])


@pytest.mark.parametrize("B", [1, 3, 8])
def test_deltanet_rows_equals_each_row(fam, B):
    """One token of B sequences in one deltanet_rows call == deltanet on each row's own state."""
    family, eng, _, _ = fam
    if family == "deepseek_v3":
        pytest.skip("no DeltaNet layers")
    m = eng.model
    w, shape = m.layers[0].linear, m.delta_shape
    g = torch.Generator().manual_seed(B)
    x = torch.randn(B, m.config.hidden_size, generator=g)
    conv = torch.randn(B, shape.conv_dim, shape.conv_kernel - 1, generator=g)
    rec = torch.randn(B, shape.num_v_heads, shape.k_head_dim, shape.v_head_dim, generator=g) * 0.1
    want_c, want_r = conv.clone(), rec.clone()
    want = torch.cat([deltanet(x[b:b + 1], w, shape, want_c[b], want_r[b]) for b in range(B)])
    got = deltanet_rows(x, w, shape, conv, rec)
    # the same math; projections over B rows round like any GEMM over more rows (fp32: ~1e-7)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(conv, want_c, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rec, want_r, rtol=1e-5, atol=1e-6)
    # a state that is not each row's own would be far off: the rows really are independent
    assert B == 1 or not torch.allclose(deltanet_rows(x, w, shape, want_c.flip(0).contiguous(), want_r.flip(0).contiguous()),
                              deltanet_rows(x, w, shape, want_c.clone(), want_r.clone()), atol=1e-3)


def test_quant_entries_match_expert_loop():
    """The batch step's quantized-expert path (fused kernels, one expert per row; Triton's interpreter on CPU)
    equals the per-expert dequantize-then-SwiGLU loop it falls back to."""
    pytest.importorskip("triton")
    from test_quant_kernels import INTERP, DEV, _pool
    from tiered.decode.batchstep import quant_entries
    from tiered.model.moe import _expert

    W = _pool("q4", 7, 24, 40)
    slots, counts = [3, 0, 6, 5], [2, 1, 4, 1]
    xs = torch.randn(sum(counts), 40, generator=torch.Generator().manual_seed(2)).to(DEV)
    got = quant_entries(xs, slots, counts, W, interpret=INTERP)
    assert got is not None and got.shape == xs.shape
    want, a = [], 0
    for s, c in zip(slots, counts):
        want.append(_expert(xs[a:a + c], W, s, xs.dtype, None))
        a += c
    want = torch.cat(want)
    assert float((got - want).norm() / want.norm()) < 1e-5
    assert quant_entries(xs.cpu(), slots, counts, W) is None or DEV == "cuda"  # off CUDA without the flag: loop


def test_quantized_layout_batched_equals_single_sequence(tmp_path, reference_model):
    """--experts q4 --dense q4 (the 397B slices' formats): batched greedy equals the single-sequence engine."""
    ck = make_checkpoint(tmp_path / "ck", "qwen3_5_moe", seed=5, vocab_size=VOCAB, max_position_embeddings=CTX)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(reference_model / name, ck / name)
    repack(ck, tmp_path / "lay", progress=False, experts="q4", dense="q4", q4_refine="none")
    eng = load(tmp_path / "lay", device="cpu", dtype="float32", max_context=CTX)
    from tiered.layout.quant import QuantWeight

    assert isinstance(eng.model.provider.weights.gate, QuantWeight)
    assert isinstance(eng.model.layers[0].linear.qkv, QuantWeight) and isinstance(eng.model.layers[3].attn.o, QuantWeight)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in (5, 70, 2)]
    ref = [eng.generate(p, max_new_tokens=5, stop_at_eos=False).token_ids for p in prompts]
    reqs = _run(Scheduler(eng, max_batch=3, page_size=8), prompts, [5, 5, 5])  # CPU: the native expert rows
    assert [r.out_ids for r in reqs] == ref
    # the CUDA choice: experts with <= QUANT_ROWS rows of a step through quant_entries (the fused kernels, tested
    # against the loop above; here a torch stand-in, so the row bookkeeping is what is tested), busier experts
    # (the 70-token prompt's) dequantized and multiplied
    import tiered.decode.batchstep as bs
    from tiered.model.moe import _expert

    calls = []

    def fake(xs, slots, counts, W, interpret=False):
        calls.append(max(counts))
        out, a = [], 0
        for sl, c in zip(slots, counts):
            out.append(_expert(xs[a:a + c], W, sl, xs.dtype, None))
            a += c
        return torch.cat(out)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bs, "quant_entries", fake)
        mp.setenv("TIERED_CPU_KERNEL", "torch")  # the native CPU kernel would serve every expert first
        reqs = _run(Scheduler(eng, max_batch=3, page_size=8), prompts, [5, 5, 5])
    assert calls and max(calls) <= bs.QUANT_ROWS and [r.out_ids for r in reqs] == ref


@pytest.mark.cuda
@pytest.mark.parametrize("family,quant", [("qwen3_5_moe", None), ("qwen3_5_moe", "q4"), ("deepseek_v3", None)])
def test_cuda_batched_agrees_with_single_sequence(tmp_path, reference_model, family, quant):
    """fp32 on CUDA (decode rows' attention in one paged call, the DeltaNet one-token rows batched, q4 experts
    through the fused kernels): batched greedy agrees with the single-sequence engine on >= 90% of tokens (GEMMs
    over different row counts round differently, so exact equality is not required here)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    lay = _layout(tmp_path, family, reference_model, quant)
    eng = load(lay, device="cuda", dtype="float32", max_context=160, cuda_graphs=False)
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in LENGTHS]
    ref = [eng.generate(p, max_new_tokens=n, stop_at_eos=False).token_ids for p, n in zip(prompts, NEW)]
    sch = Scheduler(eng, max_batch=4, page_size=8, prefill_tokens=64)
    reqs = _run(sch, prompts, NEW)
    same = sum(a == b for r, w in zip(reqs, ref) for a, b in zip(r.out_ids, w))
    print(f"{family} {quant}: top-1 agreement {same / sum(NEW):.3f}")
    assert same >= 0.9 * sum(NEW) and sch.step_fn.decode_attention == "paged"
    assert sch.state.free_slots == sch.state.num_slots


def test_mla_attend_rows_equals_each_row(fam):
    """The decode rows' MLA in one call (rows of different lengths, padded) == mla_attend's absorbed path per row."""
    family, eng, _, _ = fam
    if family != "deepseek_v3":
        pytest.skip("no MLA layers")
    from tiered.model.mla import mla_attend, mla_attend_rows

    m = eng.model
    d = m.mla_dims
    g = torch.Generator().manual_seed(5)
    lens = [1, 7, 20]
    B, S = len(lens), 24
    qn, qr = torch.randn(B, d.heads, d.nope, generator=g), torch.randn(B, d.heads, d.rope, generator=g)
    cs, ks = torch.randn(B, S, d.kv_lora_rank, generator=g), torch.randn(B, S, d.rope, generator=g)
    cs[0, 1:] = 1e4  # padding past a row's length must not count
    got = mla_attend_rows(qn, qr, cs, ks, torch.tensor(lens), m.layers[1].mla.kv_b, d, m.mla_scale)
    for b, n in enumerate(lens):
        want = mla_attend(qn[b:b + 1], qr[b:b + 1], cs[b, :n], ks[b, :n], m.layers[1].mla.kv_b, None, d, m.mla_scale,
                          absorbed=True)
        torch.testing.assert_close(got[b:b + 1], want, rtol=1e-5, atol=1e-5)


def test_admission_waits_for_a_slot(fam):
    """A request is admitted only with a free slot (here one of the two is held elsewhere): the second waits for
    the first to finish, then runs with the slot it gave back."""
    family, eng, prompts, ref = fam
    if family == "deepseek_v3":
        pytest.skip("only DeltaNet models hold slots")
    sch = Scheduler(eng, max_batch=2, page_size=8)
    held = sch.state.alloc_slot()
    a, b = (sch.submit(Request(str(i), prompts[i], SamplingParams(max_tokens=NEW[i], stop_at_eos=False)))
            for i in (0, 2))
    sch.step()
    assert sch.running == [a] and list(sch.waiting) == [b]
    while not a.done:
        sch.step()
        assert b.slot == -1 or a.done
    sch.run_until_idle()
    assert a.out_ids == ref[0] and b.out_ids == ref[2]
    sch.state.free_slot(held)
    assert sch.state.free_slots == 2
