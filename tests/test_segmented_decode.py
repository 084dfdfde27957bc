"""The piecewise decode step (tiered/decode/piecewise.py): the one-token step cut at the routers, with the routing
read on the host between segments. On CPU the segments run eagerly and must equal the unsplit step bit for
bit; CUDA-marked tests check the captured segments against eager decoding with the expert cache."""
from __future__ import annotations

import pytest
import torch

import tiered
from tiered.decode.piecewise import PiecewiseDecode, span_for
from tiered.engine import load
from tiered.model.moe import Observer
from tiered.store.provider import HostSlotProvider

PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"


def _prefill(engine, ids: list[int]) -> torch.Tensor:
    return engine.model.forward(torch.tensor(ids, device=engine.device), 0)


def _decode_pair(ref, seg_step, first_logits: torch.Tensor, pos: int, steps: int, ref_step=None) -> list[int]:
    """Greedy-decode `steps` tokens with `ref` (unsplit) and `seg_step` (segmented) side by side, both already
    prefilled up to `pos`; assert the logits are bit-identical at every step. Returns the tokens."""
    ref_step = ref_step or (lambda tok, p: ref.model.forward(torch.tensor([tok], device=ref.device), p))
    la = first_logits
    toks = []
    for i in range(steps):
        tok = int(la[0].argmax())
        toks.append(tok)
        a = ref_step(tok, pos)
        b = seg_step(tok, pos)
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b), f"step {i} (pos {pos}): max |diff| {(a.float() - b.float()).abs().max()}"
        la = a
        pos += 1
    return toks


def _prefill_both(ref, seg, ids: list[int]) -> torch.Tensor:
    la = _prefill(ref, ids)
    lb = _prefill(seg, ids)
    assert torch.equal(la, lb)
    return la


@pytest.fixture(scope="module")
def ids(reference_layout) -> list[int]:
    return load(reference_layout, device="cpu").encode(PROMPT)


@pytest.mark.parametrize("budget", [None, {"expert_slots": 8}, {"expert_slots": 16, "policy": "lfu"},
                                    {"expert_slots": 64, "ram_gb": 20 * 49152 / 2**30}])
def test_segments_equal_unsplit_step(reference_layout, ids, budget):
    """CPU: the L+1 segments with host routing between them (eager positions) give exactly the logits of
    model.forward for every decode step, with every expert resident and with the expert cache."""
    ref = load(reference_layout, device="cpu", max_context=256)
    seg = load(reference_layout, device="cpu", max_context=256, budget=budget)
    pw = PiecewiseDecode(seg.model, graphs=False)
    assert not pw.static_positions and pw.chains == {}
    _decode_pair(ref, pw.step, _prefill_both(ref, seg, ids), len(ids), 20)
    assert pw.steps == 20


def test_segments_equal_static_step(reference_layout, ids):
    """CPU: with positions on the device (what graphs capture) the segments equal decode_static bit for bit,
    across a span boundary (128 -> 256)."""
    ref = load(reference_layout, device="cpu", max_context=300)
    seg = load(reference_layout, device="cpu", max_context=300, budget={"expert_slots": 16})
    pw = PiecewiseDecode(seg.model, graphs=False, static_positions=True)

    def ref_step(tok, pos):
        return ref.model.decode_static(torch.tensor([tok]), torch.tensor([pos]), span_for(pos, 300))

    long_ids = (ids * 8)[:120]
    _decode_pair(ref, pw.step, _prefill_both(ref, seg, long_ids), 120, 12, ref_step=ref_step)  # pos 120..131


class _Recorder(Observer):
    """A routing observer that keeps copies of everything it is handed."""

    def __init__(self) -> None:
        self.calls = []

    def on_route(self, layer, hidden, topk_ids, topk_weights, router_logits):
        self.calls.append((layer, hidden.clone(), topk_ids.clone(), topk_weights.clone(), router_logits.clone()))


@pytest.mark.parametrize("path", ["eager", "graph"])
def test_observer_sees_the_same_routing(reference_layout, ids, path):
    """The observer gets the same (layer, hidden, ids, weights, logits) per layer from the segmented step as
    from the eager step, in the same order, with the same shapes and dtypes; on the graph path too, where what
    it is handed stays valid after later steps (it keeps references, no copies)."""
    ra, rb = _Keeper(), _Keeper()
    ref = load(reference_layout, device="cpu", max_context=256, observer=ra)
    seg = load(reference_layout, device="cpu", max_context=256, budget={"expert_slots": 16}, observer=rb)
    if path == "eager":
        pw = PiecewiseDecode(seg.model, graphs=False)
        ref_step = None
    else:
        pw = FakeCudaPiecewise(seg.model)

        def ref_step(tok, pos):
            return ref.model.decode_static(torch.tensor([tok]), torch.tensor([pos]), span_for(pos, 256))
    first = _prefill_both(ref, seg, ids)
    ra.calls.clear(), rb.calls.clear()
    _decode_pair(ref, pw.step, first, len(ids), 4, ref_step=ref_step)
    L = ref.config.num_layers
    assert len(ra.calls) == len(rb.calls) == 4 * L
    for a, b in zip(ra.calls, rb.calls):
        assert a[0] == b[0]
        for x, y in zip(a[1:], b[1:]):
            assert x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y)
    assert [c[0] for c in rb.calls[:L]] == list(range(L))


@pytest.mark.parametrize("path", ["eager", "graph"])
def test_observer_declares_what_it_needs(reference_layout, ids, path):
    """An observer with needs_hidden/needs_logits False gets an empty hidden and no logits from the segmented
    step (no device->host copies for them), and the same ids and weights as one that takes everything."""
    switch = _Switch()
    seg = load(reference_layout, device="cpu", max_context=256, budget={"expert_slots": 16}, observer=switch)
    pw = PiecewiseDecode(seg.model, graphs=False) if path == "eager" else FakeCudaPiecewise(seg.model)
    full, lean = _Keeper(), _Keeper()
    lean.needs_hidden = lean.needs_logits = False

    class Both(Observer):
        def on_route(self, *a):
            full.on_route(*a)
            lean.on_route(*a)

    pos = len(ids)
    seg.model.forward(torch.tensor(ids), 0)
    switch.to = Both()
    pw.step(ids[-1], pos)
    switch.to = lean
    pw.step(ids[-1], pos)
    L = seg.config.num_layers
    assert len(lean.calls) == 2 * L
    for a, b in zip(full.calls[-L:], lean.calls[-L:]):
        assert b[1].shape == (1, 0) and b[4] is None
        assert torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])


@pytest.mark.parametrize("mode", ["eager", "graph", "host"])
def test_deferrable_observer_runs_after_the_next_segment(reference_layout, ids, mode):
    """An observer with deferrable=True is called for layer l after get(l) and after segment l+1 is enqueued
    (its host work overlaps that segment), with the same ids, weights and logits an ordinary observer gets
    before get(l); on the eager step and on the graph path with either copy mode."""
    log = []
    switch = _Switch()
    seg = load(reference_layout, device="cpu", max_context=256, budget={"expert_slots": 16}, observer=switch,
               prefetch_hook=lambda l, expert_ids: log.append(("hook", l, expert_ids.tolist())))
    L = seg.config.num_layers
    seg.model.provider = _LoggingHostProvider(seg.model.provider, log)
    pw = PiecewiseDecode(seg.model, graphs=False) if mode == "eager" else FakeCudaPiecewise(seg.model, copies=mode)
    mid, last = seg.model.segment_mid, seg.model.segment_last
    seg.model.segment_mid = lambda l, *a, **k: (log.append(("seg", l)), mid(l, *a, **k))[1]
    seg.model.segment_last = lambda *a, **k: (log.append(("seg", L)), last(*a, **k))[1]

    class Logged(_Keeper):
        def on_route(self, layer, *a):
            log.append(("obs", layer))
            super().on_route(layer, *a)

    early, late = Logged(), Logged()
    late.deferrable, late.needs_hidden = True, False
    pos = len(ids)
    seg.model.forward(torch.tensor(ids), 0)
    switch.to = early
    pw.step(ids[-1], pos)
    early_order = [x[:2] for x in log if x[0] in ("obs", "get", "seg", "hook")]
    del log[:]
    switch.to = late
    pw.step(ids[-1], pos)
    order = [x[:2] for x in log if x[0] in ("obs", "get", "seg", "hook")]
    want, want_early = [], []
    for l in range(L):
        want += [("get", l), ("seg", l + 1), ("obs", l), ("hook", l)]  # the hook follows a deferred observer
        want_early += [("obs", l), ("get", l), ("hook", l), ("seg", l + 1)]
    assert order == want
    assert early_order[-len(want_early):] == want_early
    assert [x[2] for x in log if x[0] == "hook"] == [x[2] for x in log if x[0] == "get"]
    for a, b in zip(early.calls[-L:], late.calls):
        assert a[0] == b[0] and b[1].shape == (1, 0)
        for x, y in zip(a[2:], b[2:]):
            assert x.dtype == y.dtype and torch.equal(x, y)


class _Keeper(Observer):
    """A routing observer that keeps what it is handed, without copying."""

    def __init__(self) -> None:
        self.calls = []

    def on_route(self, layer, hidden, topk_ids, topk_weights, router_logits):
        self.calls.append((layer, hidden, topk_ids, topk_weights, router_logits))


class _Switch(Observer):
    """The observer a test's engine is built with: forwards to `to` (None = nobody), declaring what `to` declares,
    so that one engine can be observed by different observers step by step."""

    def __init__(self) -> None:
        self.to = None

    deferrable = property(lambda self: self.to is not None and self.to.deferrable)
    needs_hidden = property(lambda self: self.to is None or self.to.needs_hidden)
    needs_logits = property(lambda self: self.to is None or self.to.needs_logits)

    def on_route(self, *a):
        if self.to is not None:
            self.to.on_route(*a)


class _LoggingProvider:
    """Wraps a provider; logs get/prefetch calls in order. Without get_slots: served through get()."""

    def __init__(self, inner, log):
        self.inner, self.log = inner, log
        self.weights = inner.weights
        self.max_experts_per_call = inner.max_experts_per_call

    def get(self, layer, ids):
        self.log.append(("get", layer, [int(i) for i in ids.tolist()]))
        return self.inner.get(layer, ids)

    def prefetch(self, layer, ids):
        self.log.append(("prefetch", layer))
        self.inner.prefetch(layer, ids)

    def stats(self):
        return self.inner.stats()


class _LoggingHostProvider(_LoggingProvider, HostSlotProvider):
    """_LoggingProvider that declares the host slot API (logs get_slots calls as gets)."""

    def get_slots(self, layer, ids):
        self.log.append(("get", layer, [int(i) for i in (ids.tolist() if torch.is_tensor(ids) else ids)]))
        return self.inner.get_slots(layer, ids)


@pytest.mark.parametrize("host_api", [True, False])
def test_prefetch_hook_runs_after_get_before_experts(reference_layout, ids, host_api):
    """The prefetch hook runs once per layer, right after that layer's get, with the host top-k; in the eager
    step and the segmented one alike. A hook that prefetches the next layer changes nothing in the results,
    and the cache counts (hits, misses, the keys of every get) are the same on both paths. A provider without
    get_slots is served through get()."""
    logs = {"eager": [], "seg": []}
    engines = {}
    recorded = {}
    for name in logs:
        box = {}

        def hook(layer, expert_ids, box=box, log=logs[name]):
            assert expert_ids.device.type == "cpu" and expert_ids.dtype == torch.int64
            log.append(("hook", layer, expert_ids.tolist()))
            if layer + 1 < box["e"].config.num_layers:
                box["e"].model.provider.prefetch(layer + 1, expert_ids)  # a (poor) next-layer guess

        e = box["e"] = load(reference_layout, device="cpu", max_context=256, budget={"expert_slots": 16},
                            prefetch_hook=hook)
        cache = e.model.provider
        recorded[name] = cache.record_gets()
        e.model.provider = (_LoggingHostProvider if host_api else _LoggingProvider)(cache, logs[name])
        engines[name] = (e, cache)
    ref, ref_cache = engines["eager"]
    seg, seg_cache = engines["seg"]
    pw = PiecewiseDecode(seg.model, graphs=False)
    for c in (ref_cache, seg_cache):
        c.set_phase("prefill")
    first = _prefill_both(ref, seg, ids)
    for c in (ref_cache, seg_cache):
        c.set_phase("decode")
    del logs["eager"][:], logs["seg"][:]
    _decode_pair(ref, pw.step, first, len(ids), 6)
    L = ref.config.num_layers
    assert logs["eager"] == logs["seg"]
    kinds = [x[0] for x in logs["seg"] if x[0] != "prefetch"]
    assert kinds == ["get", "hook"] * (6 * L)
    gets = [x for x in logs["seg"] if x[0] == "get"]
    hooks = [x for x in logs["seg"] if x[0] == "hook"]
    assert [g[1:] for g in gets] == [h[1:] for h in hooks]
    a, b = ref_cache.stats(), seg_cache.stats()
    counts = ("hits", "misses", "tokens", "bytes_h2d")  # stall_s is wall time
    assert [a["decode"][k] for k in counts] == [b["decode"][k] for k in counts]
    assert a["prefetch_issued"] == b["prefetch_issued"] > 0
    assert a["prefetch_used"] == b["prefetch_used"]
    assert recorded["eager"] == recorded["seg"] and recorded["seg"]
    seg_cache.vram.table.check()


def test_get_slots_is_get_on_the_host(layout_cache_pair):
    """ExpertCache.get_slots returns what get() returns, with the same bookkeeping."""
    a, b = layout_cache_pair
    g = torch.Generator().manual_seed(0)
    for step in range(60):
        layer = step % 2  # 2 layers x 16 candidate experts over 24 slots: hits and misses
        ids = torch.randperm(16, generator=g)[:8]
        sa = a.get(layer, ids).tolist()
        sb = b.get_slots(layer, ids)
        assert sa == sb
    da, db = a.stats()["decode"], b.stats()["decode"]
    assert [da[k] for k in ("hits", "misses", "tokens", "bytes_h2d")] == [db[k] for k in ("hits", "misses", "tokens",
                                                                                       "bytes_h2d")]
    assert da["misses"] > 0 and da["hits"] > 0
    with pytest.raises(ValueError, match="repeated"):
        b.get_slots(0, [1, 1, 2])
    b.vram.table.check()


@pytest.fixture
def layout_cache_pair(reference_layout):
    from tiered.store.cache import make_provider
    from tiered.store.disk import Layout

    lay = Layout.open(reference_layout)
    return (make_provider(lay, device="cpu", quiet=True, expert_slots=24),
            make_provider(lay, device="cpu", quiet=True, expert_slots=24))


def test_engine_on_cpu_decodes_eagerly(reference_layout):
    """On CPU there are no graphs: the engine keeps the eager step and says so in the stats."""
    e = load(reference_layout, device="cpu", budget={"expert_slots": 16})
    assert e.graphed is None and e.pieces is None
    g = e.generate(PROMPT, max_new_tokens=3)
    assert g.stats["decode_graphs"] == "eager" and g.stats["cuda_graphs"] is False


# --- CUDA: captured segments vs eager ---

CUDA_PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n"


@pytest.mark.cuda
@pytest.mark.parametrize("slots", [16, 64])
@pytest.mark.parametrize("copies", ["graph", "host"])
def test_cuda_piecewise_graphs_match_eager_cache(reference_layout, slots, copies):
    """On CUDA with the expert cache, decode replayed from piecewise graphs gives the greedy tokens of the eager
    step (fp32, as the whole-step graph test), across the 128 -> 256 span boundary; both copy modes."""
    budget = {"expert_slots": slots, "ram_gb": 0.05, "slot_table": "host"}
    g = tiered.load(reference_layout, device="cuda", dtype="float32", max_context=300, budget=budget)
    e = tiered.load(reference_layout, device="cuda", dtype="float32", max_context=300, budget=budget,
                    cuda_graphs=False)
    assert g.pieces is not None and e.pieces is None and g.graphed is None
    g.use_piecewise(graphs=True, copies=copies)
    a = g.generate(CUDA_PROMPT, max_new_tokens=150, stop_at_eos=False)
    b = e.generate(CUDA_PROMPT, max_new_tokens=150, stop_at_eos=False)
    assert a.stats["decode_graphs"] == "piecewise" and b.stats["decode_graphs"] == "eager"
    assert g.pieces.chains and set(g.pieces.chains) <= set(g.model.graph_spans()) and g.pieces.copies == copies
    assert a.token_ids == b.token_ids


def _segments_engine(layout, dtype, budget, graphs, copies="graph", **wiring):
    """An engine whose one-token steps run PiecewiseDecode: captured (graphs) or the same segments eagerly; its
    cache records every get() (provider.gets). wiring: observer / prefetch_hook for load()."""
    e = tiered.load(layout, device="cuda", dtype=dtype, max_context=300, budget=budget, cuda_graphs=False, **wiring)
    e.use_piecewise(graphs=graphs, static_positions=True, copies=copies)
    e.model.provider.record_gets()
    return e


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_piecewise_graphs_bit_identical_to_eager_segments(reference_layout, dtype):
    """The captured segments compute exactly what the same segments compute eagerly (same kernels, static
    positions): logits bit-identical at every step, bf16 included, and so the cache sees the same get()s."""
    budget = {"expert_slots": 16, "ram_gb": 0.05, "slot_table": "host"}
    ref = _segments_engine(reference_layout, dtype, budget, graphs=False)
    seg = _segments_engine(reference_layout, dtype, budget, graphs=True)
    ids = ref.encode(CUDA_PROMPT)
    first = _prefill_both(ref, seg, ids)
    _decode_pair(ref, lambda t, p: seg.pieces.step(t, p).clone(), first, len(ids), 140, ref_step=ref.pieces.step)
    assert seg.pieces.chains and set(seg.pieces.chains) <= set(seg.model.graph_spans())  # one span with triton
    assert ref.model.provider.gets == seg.model.provider.gets
    a, b = ref.model.provider.stats()["decode"], seg.model.provider.stats()["decode"]
    assert (a["hits"], a["misses"]) == (b["hits"], b["misses"])


@pytest.mark.cuda
def test_cuda_piecewise_observer_and_hook(reference_layout):
    """With an observer and a prefetching hook set, piecewise graphs keep running, the observer sees every layer
    of every step exactly as on the same segments run eagerly, and the prefetches are the same."""
    budget = {"expert_slots": 16, "ram_gb": 0.05, "slot_table": "host"}
    outs = []
    for graphs in (True, False):
        rec, box = _Recorder(), {}
        e = box["e"] = _segments_engine(
            reference_layout, "float32", budget, graphs, observer=rec,
            prefetch_hook=lambda l, ids, box=box: (box["e"].model.provider.prefetch(l + 1, ids)
                                                   if l + 1 < box["e"].config.num_layers else None))
        out = e.generate(CUDA_PROMPT, max_new_tokens=40, stop_at_eos=False)
        assert out.stats["decode_graphs"] == "piecewise"
        assert out.stats["prefetch_issued"] > 0
        outs.append((out.token_ids, [c[2].cpu() for c in rec.calls], out.stats["prefetch_issued"]))
    assert outs[0][0] == outs[1][0] and outs[0][2] == outs[1][2]
    assert len(outs[0][1]) == len(outs[1][1]) == 40 * 8  # prefill routes 1 call per layer, then 39 steps
    assert all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1]))


@pytest.mark.cuda
@pytest.mark.parametrize("copies", ["graph", "host"])
def test_cuda_deferred_observer_sees_the_same_routing(reference_layout, copies):
    """A deferrable observer on CUDA piecewise graphs (called after the next segment is enqueued, from host rows
    copied with the ids) sees the ids, weights and logits that an ordinary observer sees on the eager segments."""
    budget = {"expert_slots": 16, "ram_gb": 0.05, "slot_table": "host"}
    calls = []
    for graphs in (True, False):
        rec = _Recorder()
        if graphs:
            rec.deferrable, rec.needs_hidden = True, False
        e = _segments_engine(reference_layout, "float32", budget, graphs, copies=copies if graphs else "graph",
                             observer=rec)
        e.generate(CUDA_PROMPT, max_new_tokens=24, stop_at_eos=False)
        calls.append([c for c in rec.calls if c[2].shape[0] == 1])  # decode steps
        if graphs:
            assert e.pieces.late_s > 0 and e.pieces.chains  # the deferred path ran on captured graphs
    a, b = calls
    assert len(a) == len(b) == 23 * 8
    for x, y in zip(a, b):
        assert x[0] == y[0] and x[1].shape[-1] == 0
        for u, v in zip(x[2:], y[2:]):
            assert torch.equal(u.cpu(), v.cpu().to(u.dtype))


@pytest.mark.cuda
def test_cuda_policy_predicted_keeps_greedy_tokens(reference_layout):
    """--policy predicted on CUDA piecewise graphs (its feeder deferred past the next segment): the greedy tokens of
    a run with every expert resident, fewer misses than LRU at the same slot count on this prompt."""
    want = tiered.load(reference_layout, device="cuda", dtype="float32", max_context=300)
    want = want.generate(CUDA_PROMPT, max_new_tokens=120, stop_at_eos=False).token_ids
    misses = {}
    for pol in ("lru", "predicted"):
        e = tiered.load(reference_layout, device="cuda", dtype="float32", max_context=300,
                        budget={"expert_slots": 128, "ram_gb": 0.05, "slot_table": "host", "policy": pol})
        out = e.generate(CUDA_PROMPT, max_new_tokens=120, stop_at_eos=False)
        assert out.token_ids == want and out.stats["decode_graphs"] == "piecewise"
        misses[pol] = out.stats["decode"]["misses"]
        if pol == "predicted":
            assert e.pieces.late_s > 0
    assert misses["predicted"] < misses["lru"]


@pytest.mark.cuda
@pytest.mark.parametrize("slots", [24, 64])
def test_cuda_deferred_prefetch_keeps_greedy_tokens(reference_layout, slots):
    """A prefetcher that reads no hidden state (previous-token reuse, with --policy predicted) runs after the
    next segment is enqueued; its copies wait only for compute before the current get(): greedy tokens stay
    those of a run with every expert resident, with many prefetches in flight over 120 steps."""
    from tiered.predict.predictors import PreviousToken

    want = tiered.load(reference_layout, device="cuda", dtype="float32", max_context=300)
    cfg = want.config
    want = want.generate(CUDA_PROMPT, max_new_tokens=120, stop_at_eos=False).token_ids
    e = tiered.load(reference_layout, device="cuda", dtype="float32", max_context=300,
                    predictor=PreviousToken(cfg.num_layers, cfg.num_experts),
                    budget={"expert_slots": slots, "ram_gb": 0.05, "slot_table": "host", "policy": "predicted",
                            "prefetch_depth": 1,
                            "prefetch_budget": 8})
    pf = e.prefetcher
    assert pf.deferrable and pf.eviction is e.model.provider.vram.table.policy
    out = e.generate(CUDA_PROMPT, max_new_tokens=120, stop_at_eos=False)
    assert out.token_ids == want and out.stats["decode_graphs"] == "piecewise"
    assert out.stats["prefetch_issued"] > 100 and e.pieces.late_s > 0


# --- the CUDA code path on CPU: explicit host/device copies, captured segments replayed from their outputs ---

class _FakeGraph:
    """Stands in for a CUDA graph: replay re-runs the captured function and writes into the same output tensors,
    so the next segment (captured over those tensors) reads them, as on the GPU."""

    def __init__(self, pw, fn, out, broken: bool):
        self.pw, self.fn, self.out, self.broken = pw, fn, out, broken

    def replay(self):
        if self.pw.replay_fails:
            raise RuntimeError("CUDA error: operation not supported (fake)")
        saved = self.pw.copies
        if self.broken:  # copies captured inside the graph that move nothing
            self.pw.copies = "host"
        try:
            _copy_into(self.out, self.fn())
        finally:
            self.pw.copies = saved


def _copy_into(dst, src):
    import dataclasses

    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
    elif isinstance(dst, (tuple, list)):
        for a, b in zip(dst, src):
            _copy_into(a, b)
    elif dataclasses.is_dataclass(dst):
        for f in dataclasses.fields(dst):
            _copy_into(getattr(dst, f.name), getattr(src, f.name))


def _no_cuda_streams():
    """torch.cuda.current_stream -> None for the duration (CPU-only torch has no CUDA streams)."""
    from unittest import mock

    return mock.patch.object(torch.cuda, "current_stream", lambda *a, **k: None)


class FakeCudaPiecewise(PiecewiseDecode):
    """PiecewiseDecode's CUDA path on CPU: 'device' buffers distinct from the host ones (so every copy must
    happen), graphs faked by _FakeGraph; `broken` copies inside graphs, or a capture that `fails`."""

    def __init__(self, model, copies="graph", broken=False, fails=0):
        super().__init__(model, graphs=False, static_positions=True, copies=copies)
        self.cuda = self.graphs = True
        self.step_dev = torch.zeros(2, dtype=torch.int64)
        self.slot_dev = torch.zeros(self.K, dtype=torch.int64)
        self.broken, self.fails, self.recorded = broken, fails, 0
        self.replay_fails = False

    def _warmup_stream(self):
        import contextlib

        return contextlib.nullcontext()

    def _synchronize(self):
        pass

    def _wait_stream(self):
        pass

    def _replay(self, chain):
        with _no_cuda_streams():
            return super()._replay(chain)

    def _record(self, fn):
        if self.fails:
            self.fails -= 1
            raise RuntimeError("operation not permitted when stream is capturing (fake)")
        self.recorded += 1
        out = fn()
        return _FakeGraph(self, fn, out, self.broken and self.copies == "graph"), out


@pytest.mark.parametrize("copies,broken,fails", [("graph", False, 0), ("host", False, 0), ("graph", True, 0),
                                                 ("graph", False, 1)])
def test_graph_path_on_cpu_equals_static_step(reference_layout, ids, capsys, copies, broken, fails):
    """The graph path (static buffers, the chain of captured segments per span, host routing between replays,
    the probe and the fallback from copies inside the graphs to host copies) gives exactly decode_static's
    logits, across the 128 -> 256 span boundary."""
    ref = load(reference_layout, device="cpu", max_context=300)
    seg = load(reference_layout, device="cpu", max_context=300, budget={"expert_slots": 16})
    pw = FakeCudaPiecewise(seg.model, copies=copies, broken=broken, fails=fails)

    def ref_step(tok, pos):
        return ref.model.decode_static(torch.tensor([tok]), torch.tensor([pos]), span_for(pos, 300))

    long_ids = (ids * 8)[:122]
    _decode_pair(ref, lambda t, p: pw.step(t, p).clone(), _prefill_both(ref, seg, long_ids), 122, 10,
                 ref_step=ref_step)
    L = seg.config.num_layers
    assert pw.chains and set(pw.chains) <= set(seg.model.graph_spans()) and all(len(c.graphs) == L + 1 for c in pw.chains.values())
    fell_back = broken or fails
    assert pw.copies == ("host" if fell_back else copies)
    assert pw.recorded == 2 * (L + 1) + (L + 1 if broken else 0)
    err = capsys.readouterr().err
    assert ("issuing the copies from the host" in err) == bool(fell_back)
    assert pw.stats()["steps"] == 10 and pw.stats()["spans"] == [128, 256]


def test_engine_falls_back_to_eager_when_capture_fails(reference_layout, ids, capsys):
    """A capture that fails in both copy modes makes the engine say why once and decode eagerly, with the
    tokens of the eager engine."""
    budget = {"expert_slots": 16}
    want = load(reference_layout, device="cpu", budget=budget).generate(ids, max_new_tokens=6).token_ids
    e = load(reference_layout, device="cpu", budget=budget)
    e.use_piecewise(FakeCudaPiecewise(e.model, fails=2))
    g = e.generate(ids, max_new_tokens=6)
    assert g.token_ids == want and e.pieces is None and g.stats["decode_graphs"] == "eager"
    assert capsys.readouterr().err.count("capturing the decode segments for span 128 failed") == 1


def test_engine_falls_back_when_new_graphs_fail_to_replay(reference_layout, ids, capsys):
    """The first replay of newly captured graphs failing is a capture failure too: eager from that step on."""
    budget = {"expert_slots": 16}
    want = load(reference_layout, device="cpu", budget=budget).generate(ids, max_new_tokens=6).token_ids
    e = load(reference_layout, device="cpu", budget=budget)
    e.use_piecewise(FakeCudaPiecewise(e.model, copies="host")).replay_fails = True
    g = e.generate(ids, max_new_tokens=6)
    assert g.token_ids == want and e.pieces is None
    assert "replaying the decode segments for span 128 failed" in capsys.readouterr().err


def test_engine_uses_pieces_when_present(reference_layout, ids):
    """The engine steps through its PiecewiseDecode (stats say piecewise, with host timings) and gets the
    eager engine's tokens."""
    budget = {"expert_slots": 16}
    want = load(reference_layout, device="cpu", budget=budget).generate(ids, max_new_tokens=8).token_ids
    e = load(reference_layout, device="cpu", budget=budget)
    e.use_piecewise(FakeCudaPiecewise(e.model))
    g = e.generate(ids, max_new_tokens=8)
    assert g.token_ids == want
    assert g.stats["decode_graphs"] == "piecewise" and g.stats["cuda_graphs"] is True
    assert g.stats["piecewise"]["steps"] == 7 and g.stats["piecewise"]["copies"] == "graph"


@pytest.mark.parametrize("path", ["eager", "graph"])
def test_predictor_prefetching_provider_still_prefetches(reference_layout, ids, path):
    """A prefetcher built by load() (observer + prefetch hook, the provider unwrapped): the segmented step issues
    the same prefetches as the eager step, with the same cache counts and logits, through get_slots."""
    from tiered.decode.piecewise import host_slots_api
    from tiered.predict.predictors import PreviousToken
    from tiered.store.disk import Layout

    cfg = Layout.open(reference_layout).config
    L, E = cfg.num_layers, cfg.num_experts
    budget = {"expert_slots": 24, "prefetch_depth": 1, "prefetch_budget": 8}
    ref = load(reference_layout, device="cpu", max_context=256, budget=budget, predictor=PreviousToken(L, E))
    seg = load(reference_layout, device="cpu", max_context=256, budget=budget, predictor=PreviousToken(L, E))
    pa, pb = ref.prefetcher, seg.prefetcher
    assert host_slots_api(seg.model.provider) is not None  # prefetching does not wrap the provider
    if path == "eager":
        pw, ref_step = PiecewiseDecode(seg.model, graphs=False), None
    else:
        pw = FakeCudaPiecewise(seg.model)

        def ref_step(tok, pos):
            return ref.model.decode_static(torch.tensor([tok]), torch.tensor([pos]), span_for(pos, 256))
    _decode_pair(ref, pw.step, _prefill_both(ref, seg, ids), len(ids), 8, ref_step=ref_step)
    a, b = ref.model.provider.stats(), seg.model.provider.stats()
    assert a["prefetch_issued"] == b["prefetch_issued"] > 0 and pa.issued == pb.issued > 0
    assert [a["decode"][k] for k in ("hits", "misses")] == [b["decode"][k] for k in ("hits", "misses")]
