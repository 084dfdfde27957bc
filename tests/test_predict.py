"""Traces, predictors and prefetch: format round trip, engine vs transformers routing, the lead-time rule
(a predictor that peeks ahead must fail it), online observe/rank == batched score_trace, metrics, and
prefetch never changing the model's output."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tiered.predict.predictors import (PREDICTORS, GateWeights, Predictor, fit_params, make_predictor,
                                       recall_precision)
from tiered.predict.trace import Trace, concat, load, save, split_ids

L, E, K, D = 4, 8, 2, 16


def synthetic_trace(seed: int = 0, lengths=(23, 17)) -> Trace:
    """Random routing with some structure (layer l+1 often reuses layer l's first expert)."""
    g = np.random.default_rng(seed)
    N = sum(lengths)
    logits = g.normal(size=(N, L, E)).astype(np.float32)
    logits[:, 1:] += 2.0 * np.eye(E)[np.argmax(logits[:, :-1], -1)]
    ids = np.argsort(-logits, -1)[..., :K]
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    w = np.take_along_axis(probs, ids, -1).astype(np.float32)
    offs = np.cumsum([0, *lengths]).astype(np.int64)
    meta = {"num_layers": L, "num_experts": E, "top_k": K, "hidden_size": D}
    return Trace(g.integers(0, 50, N).astype(np.int32), offs, ids.astype(np.int16), w, logits.astype(np.float16),
                 g.normal(size=(N, L, D)).astype(np.float16), meta)


def synthetic_gates(seed: int = 0) -> GateWeights:
    g = torch.Generator().manual_seed(seed)
    return GateWeights(1 + 0.1 * torch.randn(L, D, generator=g), torch.randn(L, E, D, generator=g), 1e-5)


@pytest.fixture(scope="module")
def synth():
    tr = synthetic_trace()
    gates = synthetic_gates()
    params = fit_params(synthetic_trace(seed=1), gates, steps=20)
    preds = {n: make_predictor(n, num_layers=L, num_experts=E, gates=gates, params=params) for n in PREDICTORS}
    return tr, preds


def test_trace_roundtrip(tmp_path):
    """save/load keeps every array and the metadata; doc() and concat() keep documents apart."""
    tr = synthetic_trace()
    back = load(save(tr, tmp_path / "t.npz"))
    for k in ("tokens", "doc_offsets", "topk_ids", "topk_weights", "router_logits", "hidden"):
        np.testing.assert_array_equal(getattr(tr, k), getattr(back, k))
    assert back.meta == tr.meta
    d1 = tr.doc(1)
    assert d1.num_tokens == 17 and d1.num_docs == 1
    np.testing.assert_array_equal(d1.topk_ids, tr.topk_ids[23:])
    both = concat([tr.doc(0), tr.doc(1)])
    np.testing.assert_array_equal(both.doc_offsets, tr.doc_offsets)
    assert split_ids("x", list(range(5)), 2) == [("x", [0, 1]), ("x#1", [2, 3]), ("x#2", [4])]


def test_load_rejects_other_files(tmp_path):
    """A file that is not a trace gives an error that says how to make one."""
    np.savez(tmp_path / "x.npz", a=np.zeros(3))
    from tiered.predict.trace import TraceError
    with pytest.raises(TraceError, match="tiered trace"):
        load(tmp_path / "x.npz")


def lead_time_violations(predictor: Predictor, trace: Trace, points) -> list[tuple[int, int]]:
    """Points (n, l) whose score for layer l of token n changes when everything the rule forbids changes:
    layer l and later of token n (router output and hidden), and every later token."""
    base = predictor.score_trace(trace)
    g = np.random.default_rng(123)
    bad = []
    for n, l in points:
        arrays = {k: getattr(trace, k).copy() for k in ("topk_ids", "topk_weights", "router_logits", "hidden")}
        for k, a in arrays.items():
            noise = g.permutation(E)[:K] if k == "topk_ids" else None
            for m in range(n, trace.num_tokens):
                sl = slice(l, None) if m == n else slice(None)
                if k == "topk_ids":
                    a[m, sl] = g.permutation(E)[:K]
                else:
                    a[m, sl] = g.normal(size=a[m, sl].shape).astype(a.dtype)
            del noise
        t2 = Trace(trace.tokens, trace.doc_offsets, meta=trace.meta, **arrays)
        if not torch.equal(predictor.score_trace(t2)[n, l], base[n, l]):
            bad.append((n, l))
    return bad


POINTS = [(0, 0), (0, 1), (5, 0), (5, 2), (22, 3), (23, 0), (23, 1), (30, 3)]


@pytest.mark.parametrize("name", PREDICTORS)
def test_predictors_obey_lead_time_rule(synth, name):
    """No predictor's score for layer l of token n depends on layer l or later of token n, or later tokens."""
    tr, preds = synth
    assert lead_time_violations(preds[name], tr, POINTS) == []


class PeekAhead(Predictor):
    """Cheats: scores layer l with the routing of layer l itself (a later trace entry)."""

    name = "cheat"

    def score_trace(self, trace: Trace) -> torch.Tensor:
        return torch.from_numpy(trace.multi_hot()).float()


class PeekNextToken(Predictor):
    """Cheats subtly: layer 0 of token n from token n+1's layer 0."""

    name = "cheat-next-token"

    def score_trace(self, trace: Trace) -> torch.Tensor:
        hot = torch.from_numpy(trace.multi_hot()).float()
        out = torch.zeros_like(hot)
        out[:-1, 0] = hot[1:, 0]
        return out


@pytest.mark.parametrize("cls", [PeekAhead, PeekNextToken])
def test_cheating_predictor_fails_the_check(cls):
    """The lead-time check catches predictors that read a later trace entry (the check can fail)."""
    tr = synthetic_trace()
    assert lead_time_violations(cls(L, E), tr, POINTS) != []
    hot = recall_precision(cls(L, E).score_trace(tr), tr, K)
    assert hot["recall"] > 0  # it does look good on the metric: only the rule check exposes it


@pytest.mark.parametrize("name", PREDICTORS)
def test_online_matches_batched(synth, name):
    """observe/rank one token at a time (the engine's path) gives exactly score_trace's numbers."""
    tr, preds = synth
    p = preds[name]
    batched = p.score_trace(tr)
    hidden = torch.from_numpy(tr.hidden)
    ids = torch.from_numpy(tr.topk_ids.astype(np.int64))
    lg = torch.from_numpy(tr.router_logits.astype(np.float32))
    w = torch.from_numpy(tr.topk_weights)
    for d in range(tr.num_docs):
        p.reset()
        for n in range(int(tr.doc_offsets[d]), int(tr.doc_offsets[d + 1])):
            if n > tr.doc_offsets[d] and name != "none":  # layer 0 of this token, ranked before it is routed
                torch.testing.assert_close(p.rank(0), batched[n, 0], rtol=1e-5, atol=1e-5)
            for l in range(L):
                p.observe(l, hidden[n, l:l + 1], ids[n, l:l + 1], lg[n, l:l + 1], w[n, l:l + 1])
                if l + 1 < L and name != "none":
                    torch.testing.assert_close(p.rank(l + 1), batched[n, l + 1], rtol=1e-4, atol=1e-4,
                                               msg=lambda m: f"{name}: token {n} layer {l + 1}: {m}")


def test_recall_precision_by_hand():
    """recall = correct / K used, precision = correct / C, on a hand-made example."""
    tr = synthetic_trace(lengths=(3,))
    hot = torch.from_numpy(tr.multi_hot()).float()
    s = hot.clone()
    s[0, 1] = 0  # token 0, layer 1: predict nothing right -> its top-2 are two wrong experts
    s[0, 1, [e for e in range(E) if not hot[0, 1, e]][:2]] = 1
    r = recall_precision(s, tr, 2, layers=range(1, 2))
    assert r["recall"] == pytest.approx(4 / 6) and r["precision"] == pytest.approx(4 / 6)
    r4 = recall_precision(hot, tr, 4, layers=range(1, 2))
    assert r4["recall"] == 1.0 and r4["precision"] == pytest.approx(6 / 12)


def test_fitted_params_roundtrip(tmp_path, synth):
    """Predictor parameters survive save/load."""
    from tiered.predict.predictors import PredictorParams
    p = fit_params(synthetic_trace(seed=2), synthetic_gates(), steps=3)
    q = PredictorParams.load(p.save(tmp_path / "p.safetensors"))
    assert torch.equal(p.mix_w, q.mix_w) and torch.equal(p.paths, q.paths) and q.meta == json.loads(json.dumps(p.meta))


# --- the reference model ---------------------------------------------------------------------------------
def _short_ids(engine, n: int = 96) -> list[int]:
    from conftest import eval_texts  # noqa: PLC0415
    texts = eval_texts()
    text = next(iter(texts.values())) if texts else "def main():\n    return 0\n" * 20
    return engine.encode(text)[:n]


def test_engine_trace_matches_transformers(reference_model):
    """`tiered trace` (our engine) and transformers' forward hooks give identical top-k ids."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    from trace_with_transformers import trace_texts

    from tiered.engine import load as load_engine
    from tiered.predict.trace import TraceRecorder, record

    rec = TraceRecorder()
    eng = load_engine(reference_model, device="cpu", dtype="float32", observer=rec)
    ids = _short_ids(eng)
    ours = record(eng, rec, [("t", ids)])
    ref = trace_texts(reference_model, [("t", ids)])
    np.testing.assert_array_equal(ours.topk_ids, ref.topk_ids)
    np.testing.assert_allclose(ours.topk_weights, ref.topk_weights, atol=1e-5)
    np.testing.assert_allclose(ours.hidden.astype(np.float32), ref.hidden.astype(np.float32), atol=5e-3, rtol=5e-3)


def test_trace_cli(reference_model, tmp_path):
    """`tiered trace` writes a loadable trace whose routing equals record()'s."""
    from click.testing import CliRunner

    from tiered.cli.main import main
    f = tmp_path / "p.txt"
    f.write_text("import os\nprint(os.getcwd())\n")
    res = CliRunner().invoke(main, ["trace", "-m", str(reference_model), "--prompt-file", str(f), "-o",
                                    str(tmp_path / "t.npz")])
    assert res.exit_code == 0, res.output
    tr = load(tmp_path / "t.npz")
    assert tr.num_layers == 8 and tr.top_k == 8 and tr.hidden is not None and tr.num_docs == 1
    assert "moe_layers" not in tr.meta and tr.moe_layers == list(range(8))  # every layer routes: format unchanged


@pytest.mark.parametrize("piecewise", [False, True])
@pytest.mark.parametrize("name", ["next-gate", "prev-token"])
def test_prefetch_never_changes_output(reference_model, name, piecewise):
    """Greedy tokens with a small expert cache and prefetching equal those with every expert resident; on the
    piecewise step too, where a prefetcher that reads no hidden state (prev-token) is deferred past the next
    segment and one that does (next-gate) is not."""
    from tiered.engine import load as load_engine
    from tiered.store.disk import Layout

    ref = load_engine(reference_model, device="cpu", dtype="float32")
    ids = _short_ids(ref, 40)
    want = ref.generate(ids, max_new_tokens=24, temperature=0).token_ids
    lay = Layout.open(ref.layout_path)
    cfg = lay.config
    pred = make_predictor(name, num_layers=cfg.num_layers, num_experts=cfg.num_experts,
                          gates=GateWeights.from_layout(lay))
    eng = load_engine(reference_model, device="cpu", dtype="float32", predictor=pred,
                      budget={"expert_slots": 24, "prefetch_depth": 2, "prefetch_budget": 8})
    pf = eng.prefetcher
    assert pf.predictor is pred and eng.model.observer is pf
    assert pf.deferrable == (name == "prev-token")
    if piecewise:
        eng.use_piecewise(graphs=False)
    got = eng.generate(ids, max_new_tokens=24, temperature=0)
    assert got.token_ids == want
    if piecewise:
        assert eng.decode_mode == "piecewise" and (eng.pieces.late_s > 0) == pf.deferrable
    st = got.stats
    assert pf.issued > 0 and st["prefetch_issued"] > 0
    # CPU: every prefetch is a device-tier copy, and bytes_h2d counts them with the demand misses
    block = eng.model.provider.block_size
    assert st["decode"]["bytes_prefetch"] > 0 and st["decode"]["bytes_prefetch"] % block == 0
    assert st["decode"]["bytes_h2d"] == st["decode"]["misses"] * block + st["decode"]["bytes_prefetch"]


def test_tune_cli_json(reference_model, tmp_path):
    """`tiered tune --json` fits on one trace, reports on another, and ends stdout with one JSON object holding
    the CONTRACTS keys; its recommended policy is one that `tiered run --policy` accepts."""
    import json

    from click.testing import CliRunner

    from tiered.cli.main import main
    from tiered.store.policy import DEVICE_POLICIES

    texts = {"fit": "import json\n\ndef dump(obj):\n    return json.dumps(obj, indent=2)\n" * 6,
             "eval": "import os\nfor root, dirs, files in os.walk('.'):\n    print(root, len(files))\n" * 6}
    for name, text in texts.items():
        (tmp_path / f"{name}.txt").write_text(text)
        res = CliRunner().invoke(main, ["trace", "-m", str(reference_model), "--prompt-file",
                                        str(tmp_path / f"{name}.txt"), "-o", str(tmp_path / f"{name}.npz")])
        assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["tune", "-m", str(reference_model), "--trace", str(tmp_path / "eval.npz"),
                                    "--fit-trace", str(tmp_path / "fit.npz"), "--params", str(tmp_path / "p.safetensors"),
                                    "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert {"name", "candidates_per_layer", "recall", "precision"} <= set(out["predictor"])
    assert out["predictor"]["candidates_per_layer"] <= 1.8 * 8
    assert "belady" in out["policies"] and out["cache_fraction"] == 0.25
    for p in ("lru", "lfu", "flru"):
        assert out["policies"][p]["hit_rate"] <= out["policies"]["belady"]["hit_rate"] + 1e-9
    assert out["recommended"]["policy"] in DEVICE_POLICIES


def test_trace_plot(reference_model, tmp_path):
    """`tiered trace --plot` writes a PNG (expert use per layer and co-occurrence between layers)."""
    pytest.importorskip("matplotlib")
    from click.testing import CliRunner

    from tiered.cli.main import main
    f = tmp_path / "p.txt"
    f.write_text("def f(x):\n    return x + 1\n" * 10)
    res = CliRunner().invoke(main, ["trace", "-m", str(reference_model), "--prompt-file", str(f), "-o",
                                    str(tmp_path / "t.npz"), "--plot", str(tmp_path / "t.png")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("piecewise", [False, True])
def test_cache_policy_predicted(reference_model, piecewise):
    """--policy predicted: the cache evicts by scores (store's ScoredEviction) that the prefetcher computes from
    the routers; greedy tokens are unchanged.
    On the piecewise step the feeder is deferred (it runs after the next segment is enqueued)."""
    import numpy as np

    from tiered.engine import load as load_engine
    from tiered.store.policy import ScoredEviction

    ref = load_engine(reference_model, device="cpu", dtype="float32")
    ids = _short_ids(ref, 40)
    want = ref.generate(ids, max_new_tokens=24, temperature=0).token_ids
    eng = load_engine(reference_model, device="cpu", dtype="float32", budget={"expert_slots": 24, "policy": "predicted"})
    pol = eng.model.provider.vram.table.policy
    assert isinstance(pol, ScoredEviction) and eng.prefetcher.eviction is pol
    assert eng.model.observer.deferrable and not eng.model.observer.needs_hidden
    if piecewise:
        eng.use_piecewise(graphs=False)
    got = eng.generate(ids, max_new_tokens=24, temperature=0)
    assert got.token_ids == want
    assert got.stats["policy"] == "predicted" and np.any(pol.score != 0)
    if piecewise:
        assert eng.decode_mode == "piecewise" and eng.pieces.late_s > 0
