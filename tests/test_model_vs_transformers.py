"""The decoder against transformers (the oracle): tiny random checkpoints of all four families, and the trained
reference model's greedy tokens. CPU, fp32."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import SHARED, eval_texts, make_checkpoint
from tiered.model.moe import experts_grouped, experts_one_token
from tiered.store.resident import ResidentExperts
from tiered.model.transformer import Transformer
from tiered.layout.repack import repack
from tiered.store.disk import Layout

TOL = 1e-4  # CONTRACTS: ||a-b|| / ||b|| on fp32 logits

VARIANTS = {  # name -> (family, config overrides)
    "mixtral": ("mixtral", {}),
    "mixtral-window": ("mixtral", {"sliding_window": 5}),
    "qwen2_moe-shared": ("qwen2_moe", {}),
    "qwen2_moe-shared-norm": ("qwen2_moe", {"norm_topk_prob": True}),
    "qwen3_moe": ("qwen3_moe", {}),
    "qwen3_moe-norm": ("qwen3_moe", {"norm_topk_prob": True}),
    "olmoe": ("olmoe", {}),
    "olmoe-norm-clip": ("olmoe", {"norm_topk_prob": True, "clip_qkv": 0.05}),
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


class Pair:
    """A tiny checkpoint loaded twice: transformers' model and ours (layout + ResidentExperts), fp32 CPU."""

    def __init__(self, root: Path, name: str) -> None:
        import transformers as tf

        family, overrides = VARIANTS[name]
        ck = make_checkpoint(root / name, family, seed=1, **overrides)
        repack(ck, root / f"{name}.layout", progress=False)
        self.layout = Layout.open(root / f"{name}.layout")
        self.provider = ResidentExperts.from_layout(self.layout)
        self.ref = tf.AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32, attn_implementation="sdpa").eval()
        self.vocab = self.layout.config.vocab_size

    def ours(self, provider=None, max_context: int = 64) -> Transformer:
        return Transformer(self.layout.config, self.layout.dense(), provider or self.provider, device="cpu",
                           dtype=torch.float32, max_context=max_context)

    def theirs(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.ref(ids[None]).logits[0]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict[str, Pair]:
    root = tmp_path_factory.mktemp("vs_tf")
    return {name: Pair(root, name) for name in VARIANTS}


def prompt(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("T", [20, 1, 7])
def test_logits_match_transformers(pairs, name, T):
    """Full-sequence logits of a T-token prompt are within 1e-4 (relative L2) of transformers'."""
    p = pairs[name]
    ids = prompt(T, p.vocab, seed=T)
    a = p.ours().forward(ids, 0, all_logits=True)
    b = p.theirs(ids)
    assert a.shape == b.shape
    r = rel(a, b)
    assert r <= TOL, f"{name} T={T}: rel err {r:.2e}, max abs {(a - b).abs().max():.2e}"


@pytest.mark.parametrize("name", list(VARIANTS))
def test_incremental_decode_matches_full_forward(pairs, name):
    """Prefill of 9 tokens then 11 one-token steps through the KV cache gives the full forward's logits."""
    p = pairs[name]
    ids = prompt(20, p.vocab, seed=3)
    full = p.theirs(ids)
    m = p.ours()
    steps = [m.forward(ids[:9], 0)]
    steps += [m.forward(ids[i:i + 1], i) for i in range(9, 20)]
    got = torch.cat(steps)  # logits at positions 8..19
    r = rel(got, full[8:])
    assert r <= TOL, f"{name}: incremental rel err {r:.2e}"


def test_chunked_prefill_matches(pairs):
    """A prompt prefilled in odd-sized chunks (5 + 3 + 12) through the cache equals one forward."""
    p = pairs["mixtral-window"]
    ids = prompt(20, p.vocab, seed=5)
    m = p.ours()
    got = torch.cat([m.forward(ids[0:5], 0, all_logits=True), m.forward(ids[5:8], 5, all_logits=True),
                     m.forward(ids[8:], 8, all_logits=True)])
    r = rel(got, p.theirs(ids))
    assert r <= TOL, f"chunked rel err {r:.2e}"


def test_sliding_window_is_exercised(tmp_path, pairs):
    """The windowed Mixtral differs from the same weights without a window (so the window test means something)."""
    import transformers as tf

    ck = make_checkpoint(tmp_path / "nowin", "mixtral", seed=1)
    full = tf.AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32).eval()
    ids = prompt(20, pairs["mixtral-window"].vocab, seed=20)
    with torch.no_grad():
        b_full = full(ids[None]).logits[0]
    b_win = pairs["mixtral-window"].theirs(ids)
    assert rel(b_win[:5], b_full[:5]) < 1e-6  # positions inside the window see the same keys
    assert rel(b_win[6:], b_full[6:]) > 1e-3


class Waves:
    """ResidentExperts that hands out at most `n` distinct experts per get(), as a small cache would."""

    def __init__(self, inner: ResidentExperts, n: int) -> None:
        self.inner, self.weights, self.max_experts_per_call = inner, inner.weights, n
        self.calls: list[int] = []

    def get(self, layer, ids):
        assert ids.numel() <= self.max_experts_per_call
        assert ids.unique().numel() == ids.numel(), "get() must receive distinct ids"
        self.calls.append(ids.numel())
        return self.inner.get(layer, ids)

    def prefetch(self, layer, ids):
        pass

    def stats(self):
        return {}


@pytest.mark.parametrize("name", ["qwen2_moe-shared", "olmoe"])
def test_prefill_waves_do_not_change_results(pairs, name):
    """Streaming experts in waves of top-k distinct experts gives the same logits as all experts at once."""
    p = pairs[name]
    ids = prompt(20, p.vocab, seed=7)
    K = p.layout.config.top_k
    waves = Waves(p.provider, K)
    a = p.ours(waves).forward(ids, 0, all_logits=True)
    b = p.ours().forward(ids, 0, all_logits=True)
    assert max(waves.calls) <= K and len(waves.calls) > p.layout.config.num_layers
    assert torch.equal(a, b)


@pytest.mark.parametrize("T", [1, 3, 16])
def test_expert_paths_match_a_plain_loop(pairs, T):
    """Gathered (T=1) and grouped expert compute equal a plain loop over tokens and their K experts."""
    import torch.nn.functional as F

    p = pairs["olmoe"]
    cfg = p.layout.config
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, cfg.hidden_size, generator=g)
    ids = torch.stack([torch.randperm(cfg.num_experts, generator=g)[:cfg.top_k] for _ in range(T)])
    w = torch.rand(T, cfg.top_k, generator=g)
    W = p.provider.weights
    layer = 1
    ref = torch.zeros_like(x)
    for t in range(T):
        for k in range(cfg.top_k):
            s = layer * cfg.num_experts + int(ids[t, k])
            h = F.silu(x[t] @ W.gate[s].float().T) * (x[t] @ W.up[s].float().T)
            ref[t] += w[t, k] * (h @ W.down[s].float().T)
    got = experts_grouped(x, ids, w, p.provider, layer)
    assert rel(got, ref) < 1e-6
    if T == 1:
        assert rel(experts_one_token(x, ids, w, p.provider, layer), ref) < 1e-6


def test_bf16_storage_computed_in_fp32(tmp_path):
    """A bf16 checkpoint run in fp32 (experts converted on use) matches transformers loading it in fp32."""
    import transformers as tf

    ck = make_checkpoint(tmp_path / "bf16", "qwen3_moe", seed=2, dtype=torch.bfloat16)
    repack(ck, tmp_path / "lay", progress=False)
    lay = Layout.open(tmp_path / "lay")
    assert lay.tensor_specs[0].dtype == "bfloat16"
    m = Transformer(lay.config, lay.dense(), ResidentExperts.from_layout(lay), device="cpu", dtype=torch.float32,
                    max_context=32)
    ref = tf.AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32).eval()
    ids = prompt(13, lay.config.vocab_size, seed=13)
    with torch.no_grad():
        b = ref(ids[None]).logits[0]
    r = rel(m.forward(ids, 0, all_logits=True), b)
    assert r <= TOL, f"rel err {r:.2e}"


# --- the trained reference model: greedy tokens must be identical ---

@pytest.fixture(scope="module")
def reference(reference_layout, reference_model):
    import transformers as tf

    import tiered

    ref = tf.AutoModelForCausalLM.from_pretrained(reference_model, dtype=torch.float32,
                                                  attn_implementation="sdpa").eval()
    return tiered.load(reference_layout, device="cpu", dtype="float32", max_context=320), ref


TEXTS = eval_texts()


@pytest.mark.skipif(not TEXTS, reason=f"{SHARED}/text/eval not present")
@pytest.mark.parametrize("fname", sorted(TEXTS))
def test_reference_greedy_tokens_identical(reference, fname):
    """64 greedy tokens after the first 200 tokens of each eval file are identical to transformers' generate."""
    engine, ref = reference
    ids = engine.tokenizer.encode(TEXTS[fname])[:200]
    assert len(ids) == 200
    ours = engine.generate(ids, max_new_tokens=64).token_ids
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False, pad_token_id=0)[0, 200:]
    theirs = out.tolist()
    eos = set(engine.config.eos_token_ids)
    if theirs and theirs[-1] in eos:  # transformers keeps the EOS token; ours stops before it
        theirs = theirs[:-1]
    first = next((i for i, (x, y) in enumerate(zip(ours, theirs)) if x != y), None)
    assert ours == theirs, f"{fname}: first difference at generated token {first}; ours {ours}, theirs {theirs}"


def test_reference_teacher_forced_logits(reference):
    """Teacher-forced logits over 256 positions of eval text match transformers within 1e-4 and agree on top-1."""
    engine, ref = reference
    text = next(iter(TEXTS.values())) if TEXTS else "def main():\n    return 0\n" * 40
    ids = engine.tokenizer.encode(text)[:256]
    a = engine.logits(ids)
    with torch.no_grad():
        b = ref(torch.tensor([ids])).logits[0]
    assert rel(a, b) <= TOL
    assert torch.equal(a.argmax(-1), b.argmax(-1))


@pytest.mark.parametrize("family", ["mixtral", "olmoe"])
def test_bf16_matches_transformers_bf16(tmp_path, family):
    """In bf16 (CPU) the logits follow transformers' bf16 rounding (expert outputs rounded, weighted, summed over K
    once; Mixtral keeps fp32 routing weights): within the CONTRACTS bf16 tolerance, prefill and decode."""
    import transformers as tf

    ck = make_checkpoint(tmp_path / family, family, seed=4, dtype=torch.bfloat16)
    repack(ck, tmp_path / "lay", progress=False)
    lay = Layout.open(tmp_path / "lay")
    m = Transformer(lay.config, lay.dense(), ResidentExperts.from_layout(lay), device="cpu", dtype=torch.bfloat16,
                    max_context=32)
    ref = tf.AutoModelForCausalLM.from_pretrained(ck, dtype=torch.bfloat16).eval()
    ids = prompt(17, lay.config.vocab_size, seed=17)
    with torch.no_grad():
        b = ref(ids[None]).logits[0]
    assert rel(m.forward(ids, 0, all_logits=True), b) <= 2e-2
    m.forward(ids[:16], 0)
    assert rel(m.forward(ids[16:], 16), b[16:]) <= 2e-2


def test_reference_bf16_top1(reference_layout, reference_model):
    """The reference model in bf16 agrees with transformers bf16 on >= 99% of 256 teacher-forced top-1 tokens."""
    import transformers as tf

    import tiered

    e = tiered.load(reference_layout, device="cpu", dtype="bfloat16", max_context=260)
    ref = tf.AutoModelForCausalLM.from_pretrained(reference_model, dtype=torch.bfloat16).eval()
    text = next(iter(TEXTS.values())) if TEXTS else "def main():\n    return 0\n" * 40
    ids = e.tokenizer.encode(text)[:256]
    a = e.logits(ids)
    with torch.no_grad():
        b = ref(torch.tensor([ids])).logits[0]
    assert rel(a, b) <= 2e-2
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.99


@pytest.mark.parametrize("name", ["mixtral-window", "qwen3_moe", "olmoe"])
def test_static_decode_step_matches_eager(pairs, name):
    """The graph-capturable step (device positions, fixed span, mask) gives the eager step's logits."""
    p = pairs[name]
    ids = prompt(20, p.vocab, seed=11)
    eager, static = p.ours(), p.ours()
    eager.forward(ids[:12], 0)
    static.forward(ids[:12], 0)
    for i in range(12, 20):
        a = eager.forward(ids[i:i + 1], i)
        with torch.inference_mode():
            b = static.decode_static(ids[i:i + 1], torch.tensor([i]), 32)
        assert rel(b, a) < 1e-6, f"{name} pos {i}"
