"""`tiered eval` (tiered/serve/evaluate.py, tiered/cli/eval.py): perplexity, KL, top-1 and expert overlap."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from tiered.serve.evaluate import RouteRecorder, evaluate, windows


def test_windows_are_non_overlapping_and_capped():
    """Windows tile ids[:max_tokens] without overlap; a trailing one-token window (nothing to score) is dropped."""
    ids = list(range(11))
    assert windows(ids, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    assert windows(ids, 5) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert windows(ids, 4, max_tokens=6) == [[0, 1, 2, 3], [4, 5]]


class FakeEngine:
    """An engine stand-in: fixed logits per window and a routing it reports to its observer."""

    def __init__(self, logits: torch.Tensor, routes: torch.Tensor, E: int) -> None:
        self._logits, self._routes = logits, routes  # [N, V], [L, N, K]
        self.max_context = 64
        self.config = SimpleNamespace(vocab_size=logits.shape[1], num_layers=routes.shape[0], num_experts=E)
        self.model = SimpleNamespace(observer=RouteRecorder())

    def encode(self, text):
        return list(range(len(text)))

    def logits(self, ids):
        a, b = ids[0], ids[-1] + 1
        if self.model.observer is not None:
            for l in range(self._routes.shape[0]):
                self.model.observer.on_route(l, None, self._routes[l, a:b], None, None)
        return self._logits[a:b]


def test_metrics_against_a_hand_computation():
    """Perplexity, KL(ref || model) mean and p99, top-1 agreement and per-layer Jaccard equal a direct
    computation over the same scored positions (two windows, the first position of each not scored)."""
    g = torch.Generator().manual_seed(0)
    N, V, L, K, E = 10, 12, 2, 2, 5
    a, b = torch.randn(N, V, generator=g), torch.randn(N, V, generator=g)
    ra = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(L * N)]).view(L, N, K)
    rb = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(L * N)]).view(L, N, K)
    ea, eb = FakeEngine(a, ra, E), FakeEngine(b, rb, E)
    out = evaluate(ea, {"f": "x" * N}, reference=eb, window=6, routes=(ea.model.observer, eb.model.observer))
    scored = [0, 1, 2, 3, 4, 6, 7, 8]  # logits rows that predict ids 1..5 and 7..9
    target = torch.tensor([1, 2, 3, 4, 5, 7, 8, 9])
    lp, rlp = torch.log_softmax(a[scored], -1), torch.log_softmax(b[scored], -1)
    assert out["tokens"] == 8
    assert math.isclose(out["perplexity"], math.exp(-lp.gather(1, target[:, None]).mean().item()), rel_tol=1e-6)
    assert math.isclose(out["reference_perplexity"], math.exp(-rlp.gather(1, target[:, None]).mean().item()),
                        rel_tol=1e-6)
    kl = torch.nn.functional.kl_div(lp, rlp, log_target=True, reduction="none").sum(-1)
    assert math.isclose(out["kl_mean"], kl.mean().item(), rel_tol=1e-5)
    assert math.isclose(out["kl_p99"], torch.quantile(kl.double(), 0.99).item(), rel_tol=1e-5)
    assert out["top1_agreement"] == (lp.argmax(-1) == rlp.argmax(-1)).float().mean().item()
    for l in range(L):  # every position is routed, the scored ones and the first of each window alike
        want = sum(len(set(ra[l, i].tolist()) & set(rb[l, i].tolist())) /
                   len(set(ra[l, i].tolist()) | set(rb[l, i].tolist())) for i in range(N)) / N
        assert math.isclose(out["expert_jaccard"][l], want, rel_tol=1e-9)


def test_perplexity_matches_transformers(reference_model, reference_layout):
    """On the reference model, the perplexity of one window is exp of transformers' mean loss on it."""
    transformers = pytest.importorskip("transformers")
    from tiered.engine import load

    text = "import csv\n\n\ndef read_rows(path):\n    with open(path) as f:\n        return list(csv.reader(f))\n" * 8
    eng = load(reference_layout, device="cpu", dtype="float32", max_context=128)
    out = evaluate(eng, {"f": text}, window=128, max_tokens=128)
    ids = eng.encode(text)[:128]
    hf = transformers.AutoModelForCausalLM.from_pretrained(reference_model, dtype=torch.float32)
    with torch.no_grad():
        loss = hf(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert out["tokens"] == 127
    assert math.isclose(out["perplexity"], math.exp(loss), rel_tol=1e-4), (out["perplexity"], math.exp(loss))


def test_cli_json_last_line(reference_layout, tmp_path):
    """`tiered eval --json` prints one object on the last line of stdout with the issue's keys; a model
    against itself has ratio 1, KL 0, full top-1 agreement and Jaccard 1 in every layer."""
    from tiered.cli.main import main

    f = tmp_path / "t.txt"
    f.write_text("def fibonacci(n):\n    if n < 2:\n        return n\n" * 4)
    r = CliRunner().invoke(main, ["eval", "-m", str(reference_layout), "--text-file", str(f), "--reference",
                                  str(reference_layout), "--max-context", "32", "--device", "cpu", "--json"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for k in ("perplexity", "tokens", "reference_perplexity", "perplexity_ratio", "kl_mean", "kl_p99",
              "top1_agreement", "expert_jaccard"):
        assert k in out
    assert out["perplexity_ratio"] == 1.0 and out["kl_mean"] < 1e-6 and out["top1_agreement"] == 1.0
    assert out["expert_jaccard"] == [1.0] * 8


def test_cli_usage_errors(tmp_path):
    """A missing text file or model directory exits 2 with a message."""
    from tiered.cli.main import main

    r = CliRunner().invoke(main, ["eval", "--text-file", str(tmp_path / "nope.txt")])
    assert r.exit_code == 2
    f = tmp_path / "t.txt"
    f.write_text("hello")
    r = CliRunner().invoke(main, ["eval", "-m", str(tmp_path / "nomodel"), "--text-file", str(f)])
    assert r.exit_code == 2 and "no such directory" in r.output
