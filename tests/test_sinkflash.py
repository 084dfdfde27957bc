"""Prompt attention with sinks on flash attention (model/sinkflash.py) against the plain-matmul path
(layers.sinks_attend): the correction's identity on CPU; the flash calls, gpt-oss's prefill and the batch step's
fresh prompts on CUDA."""
from __future__ import annotations

import pytest
import torch

from tiered.model import sinkflash
from tiered.model.layers import attn_mask, sinks_attend


def _reference(q, k, v, sinks, *, window=None, start=None):
    """sinks_attend over q [Tq, H, hd], k/v [Tk, KV, hd] (queries bottom-right aligned), in fp32 -> [Tq, H, hd]."""
    Tq, H, hd = q.shape
    Tk, KV, _ = k.shape
    G = H // KV
    start = Tk - Tq if start is None else start
    mask = attn_mask(torch.arange(start, start + Tq, device=q.device), 0, Tk, window=window, groups=1)  # [Tq, Tk]
    kk = k.float().repeat_interleave(G, 1).transpose(0, 1)  # [H, Tk, hd]
    vv = v.float().repeat_interleave(G, 1).transpose(0, 1)
    o = sinks_attend(q.float().transpose(0, 1), kk, vv, mask, sinks.float().view(H, 1, 1), hd ** -0.5)
    return o.transpose(0, 1)


def test_sink_scale_is_exact():
    """o * sigmoid(lse - sink), from a sink-free softmax and its log-sum-exp, is the sink softmax's output (fp64);
    dropping the correction or flipping its sign is far off."""
    g = torch.Generator().manual_seed(0)
    H, T, S, hd = 4, 7, 11, 8
    q, k, v = (torch.randn(H, n, hd, generator=g, dtype=torch.float64) for n in (T, S, S))
    sinks = torch.randn(H, generator=g, dtype=torch.float64) + 1.0
    mask = attn_mask(torch.arange(S - T, S), 0, S, window=5, groups=1)
    s = (q @ k.transpose(-1, -2)) * hd ** -0.5
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [H, T]
    o = torch.softmax(s, dim=-1) @ v  # [H, T, hd]
    want = sinks_attend(q, k, v, mask, sinks.view(H, 1, 1), hd ** -0.5)  # [H, T, hd]
    got = o * sinkflash.sink_scale(lse, sinks).transpose(0, 1)[..., None].double()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # sink_scale works in fp32
    assert (o - want).abs().max() > 1e-2
    flipped = o * torch.sigmoid(sinks[:, None] - lse)[..., None]
    assert (flipped - want).abs().max() > 1e-2


def test_usable_only_on_cuda_half_precision(monkeypatch):
    """The CPU, fp32, or TIERED_SINK_ATTN=naive keep the plain path; an unknown mode is refused by name."""
    assert not sinkflash.usable(torch.empty(0, 2, 64))
    assert not sinkflash.usable(torch.empty(0, 2, 64, dtype=torch.bfloat16))  # CPU
    monkeypatch.setenv(sinkflash.ENV, "fast")
    with pytest.raises(ValueError, match="TIERED_SINK_ATTN"):
        sinkflash.mode()
    monkeypatch.setenv(sinkflash.ENV, "naive")
    assert sinkflash.mode() == "naive"


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")


def _qkv(Tq, Tk, H=8, KV=2, hd=64, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(Tq, H, hd, device="cuda", generator=g).bfloat16()
    k = torch.randn(Tk, KV, hd, device="cuda", generator=g).bfloat16()
    v = torch.randn(Tk, KV, hd, device="cuda", generator=g).bfloat16()
    sinks = torch.randn(H, device="cuda", generator=g) + 3.0  # large enough that the correction matters
    return q, k, v, sinks


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("Tq,Tk,window", [(96, 96, None), (96, 96, 16), (40, 130, None), (40, 130, 32)])
def test_cuda_flash_sinks_matches_plain_path(Tq, Tk, window):
    """Causal (a chunk after a prefix: bottom-right aligned), windowed, grouped heads, bf16; the keys a strided
    view of a heads-first cache, as attention_with_sinks passes them."""
    q, k, v, sinks = _qkv(Tq, Tk)
    kc, vc = k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous()  # [KV, Tk, hd] like the cache
    got = sinkflash.flash_sinks(q, kc.transpose(0, 1), vc.transpose(0, 1), sinks, scale=64 ** -0.5, window=window)
    want = _reference(q, k, v, sinks, window=window)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
    plain = _reference(q, k, v, sinks * 0 - 1e4, window=window)  # the same without sinks: must differ
    assert (plain - want).abs().max() > 0.06  # three times the tolerance


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("window", [None, 8])
def test_cuda_flash_sinks_varlen_attends_within_each_row(window):
    """cu_seqlens: three prompts in one call, each over its own tokens only (the batch step's fresh rows)."""
    lens = [5, 33, 17]
    q, k, v, sinks = _qkv(sum(lens), sum(lens), seed=1)
    cu = torch.tensor([0, 5, 38, 55], dtype=torch.int32, device="cuda")
    got = sinkflash.flash_sinks(q, k, v, sinks, scale=64 ** -0.5, window=window, cu_seqlens=cu, max_len=max(lens))
    a = 0
    for n in lens:
        want = _reference(q[a:a + n], k[a:a + n], v[a:a + n], sinks, window=window)
        torch.testing.assert_close(got[a:a + n].float(), want, rtol=2e-2, atol=2e-2)
        a += n
    none = sinkflash.flash_sinks(q, k, v, None, scale=64 ** -0.5, window=window, cu_seqlens=cu, max_len=max(lens))
    assert (none.float() - got.float()).abs().max() > 0.1  # sinks=None: plain attention, no correction


@pytest.mark.cuda
@cuda
def test_cuda_gpt_oss_prefill_and_batch_on_flash(tmp_path, monkeypatch):
    """A tiny gpt-oss in bf16: the eager prefill (one chunk, then a second chunk after it) and the batch step's
    first step over fresh prompts give the plain path's logits (TIERED_SINK_ATTN=naive) within bf16 rounding."""
    from test_gpt_oss import make_gpt_oss, prompt

    from tiered.decode.scheduler import Request, SamplingParams, Scheduler
    from tiered.engine import load
    from tiered.layout.repack import repack

    make_gpt_oss(tmp_path / "ck", head_dim=64)
    repack(tmp_path / "ck", tmp_path / "layout", progress=False)

    def run(mode):
        monkeypatch.setenv(sinkflash.ENV, mode)
        eng = load(tmp_path / "layout", device="cuda", dtype="bfloat16", max_context=96, cuda_graphs=False)
        ids = prompt(40, 96, seed=3).cuda()
        whole = eng.model.forward(ids, 0).float()
        eng.model.state.reset()
        eng.model.forward(ids[:24], 0)
        chunked = eng.model.forward(ids[24:], 24).float()
        sch = Scheduler(eng, max_batch=3, page_size=8)
        assert sch.step_fn._flash_fresh == (mode == "auto")
        rec = []
        fwd = sch.step_fn.forward
        sch.step_fn.forward = lambda segs: rec.append(fwd(segs)) or rec[-1]
        for i, n in enumerate((4, 9, 17)):
            sch.submit(Request(str(i), prompt(n, 96, seed=10 + i).tolist(), SamplingParams(max_tokens=1)))
        sch.step()
        return whole, chunked, rec[0].float()

    flash, naive = run("auto"), run("naive")
    for got, want in zip(flash, naive):
        rel = ((got - want).norm() / want.norm()).item()
        assert rel < 2e-2, rel


def test_batch_fresh_prompts_flash_plumbing_on_cpu(monkeypatch):
    """The batch step's flash branch for fresh prompts (CUDA only in production) with flash_sinks replaced by the
    plain path applied per cu_seqlens span: the spans, the window and the sinks reach it so that batched greedy
    tokens equal the single-sequence engine's (gpt-oss: sinks, sliding and full layers)."""
    from test_gpt_oss import make_gpt_oss, prompt

    from tiered.decode import batchstep
    from tiered.decode.scheduler import Request, SamplingParams, Scheduler
    from tiered.engine import load
    from tiered.layout.repack import repack
    import tempfile
    from pathlib import Path

    calls = []

    def spans(q, k, v, sinks, *, scale, window=None, cu_seqlens=None, max_len=0):
        cu = cu_seqlens.tolist()
        calls.append((cu, window, max_len))
        assert max_len == max(b - a for a, b in zip(cu, cu[1:]))
        s = sinks if sinks is not None else torch.full((q.shape[1],), -1e30)
        return torch.cat([_reference(q[a:b], k[a:b], v[a:b], s, window=window) for a, b in zip(cu, cu[1:])]).to(q.dtype)

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        make_gpt_oss(root / "ck")
        repack(root / "ck", root / "layout", progress=False)
        eng = load(root / "layout", device="cpu", dtype="float32", max_context=64)
        lengths, news = [4, 9, 17], [5, 4, 6]
        prompts = [prompt(n, 96, seed=20 + i).tolist() for i, n in enumerate(lengths)]
        want = [eng.generate(p, max_new_tokens=n, stop_at_eos=False).token_ids for p, n in zip(prompts, news)]
        monkeypatch.setattr(batchstep.sinkflash, "flash_sinks", spans)
        sch = Scheduler(eng, max_batch=3, page_size=4, prefill_tokens=64, prefill_attention="batched")
        sch.step_fn._flash_fresh = True
        reqs = [sch.submit(Request(str(i), p, SamplingParams(max_tokens=n, stop_at_eos=False)))
                for i, (p, n) in enumerate(zip(prompts, news))]
        sch.run_until_idle()
    assert [r.out_ids for r in reqs] == want
    assert calls and {c[0][-1] for c in calls} == {sum(lengths)} and {c[1] for c in calls} == {None, 6}


def test_unpad_lse_takes_each_token_from_its_sequence():
    """A flash build that pads the varlen log-sum-exp per sequence ([N, H, max_len]): each token's row comes back
    from its own sequence and position, in token order ([H, Tq])."""
    lens, H = [3, 1, 4], 2
    padded = torch.full((3, H, 4), float("nan"))
    want = []
    for i, n in enumerate(lens):
        vals = torch.arange(n, dtype=torch.float32)[None, :] + 10 * i + 100 * torch.arange(H)[:, None]
        padded[i, :, :n] = vals
        want.append(vals)
    cu = torch.tensor([0, 3, 4, 8], dtype=torch.int32)
    got = sinkflash.unpad_lse(padded, cu, 8)
    torch.testing.assert_close(got, torch.cat(want, dim=1))
