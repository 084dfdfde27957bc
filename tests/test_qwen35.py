"""Qwen3.5-MoE and Qwen3-Next (hybrid Gated DeltaNet + gated attention) against transformers, CPU fp32: prefill,
incremental decode, chunked prefill longer than the conv kernel and the DeltaNet chunk, the graph-capturable step,
the multimodal checkpoint (vision tower skipped), fused 3-D experts, the per-sequence state, every budget path."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import make_checkpoint
from tiered.model.deltanet import CHUNK
from tiered.store.resident import ResidentExperts
from tiered.model.transformer import Transformer
from tiered.layout.repack import repack
from tiered.store.disk import Layout, expert_views

TOL = 1e-4  # CONTRACTS: ||a-b|| / ||b|| on fp32 logits
VOCAB = 8192  # the reference tokenizer's, so that trace and tune can run on these checkpoints
CTX = 256


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def prompt(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


class Pair:
    """One tiny checkpoint as transformers' model and as ours (layout + ResidentExperts), fp32 CPU."""

    def __init__(self, root: Path, family: str, reference_model: Path) -> None:
        import transformers as tf

        self.ck = make_checkpoint(root / family, family, seed=3, vocab_size=VOCAB, max_position_embeddings=CTX)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(reference_model / name, self.ck / name)
        self.skipped = repack(self.ck, root / f"{family}.layout", progress=False)["skipped"]
        self.layout = Layout.open(root / f"{family}.layout")
        self.provider = ResidentExperts.from_layout(self.layout)
        cls = tf.Qwen3_5MoeForConditionalGeneration if family == "qwen3_5_moe_vl" else tf.AutoModelForCausalLM
        self.ref = cls.from_pretrained(self.ck, dtype=torch.float32).eval()

    def ours(self, provider=None) -> Transformer:
        return Transformer(self.layout.config, self.layout.dense(), provider or self.provider, device="cpu",
                           dtype=torch.float32, max_context=CTX)

    def theirs(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.ref(input_ids=ids[None]).logits[0]


FAMS = ["qwen3_5_moe", "qwen3_next", "qwen3_5_moe_vl"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, reference_model) -> dict[str, Pair]:
    root = tmp_path_factory.mktemp("q35")
    return {f: Pair(root, f, reference_model) for f in FAMS}


def test_layer_kinds_and_state_sizes(pairs):
    """The config reads the 3:1 DeltaNet/attention pattern, partial rotary and the DeltaNet shape; the state holds
    KV rows for the attention layer only and a fixed conv + recurrent state per DeltaNet layer."""
    cfg = pairs["qwen3_5_moe"].layout.config
    assert cfg.layer_types == ("linear", "linear", "linear", "attention")
    assert cfg.rotary_dim == 4 and cfg.attn_output_gate and cfg.norm_offset == 1.0 and cfg.norm_topk_prob
    m = pairs["qwen3_5_moe"].ours()
    assert m.cache.k.shape == (1, cfg.num_kv_heads, CTX, cfg.head_dim)
    C = 2 * 2 * 8 + 4 * 6
    assert m.state.linear.conv.shape == (3, C, 3) and m.state.linear.recurrent.shape == (3, 4, 8, 6)
    assert cfg.kv_bytes_per_token(4) == 2 * 1 * 2 * 16 * 4
    assert cfg.state_bytes_per_sequence(4) == 3 * (C * 3 * 4 + 4 * 8 * 6 * 4)
    assert [m.state.row(l) for l in range(4)] == [0, 1, 2, 0]


@pytest.mark.parametrize("family", FAMS)
@pytest.mark.parametrize("T", [1, 7, 3 * CHUNK + 5])
def test_logits_match_transformers(pairs, family, T):
    """Full-sequence logits of a T-token prompt (1 token, odd, longer than the conv kernel and three DeltaNet
    chunks) are within 1e-4 (relative L2) of transformers'."""
    p = pairs[family]
    ids = prompt(T, seed=T)
    a = p.ours().forward(ids, 0, all_logits=True)
    b = p.theirs(ids)
    r = rel(a, b)
    print(f"{family} T={T}: rel {r:.2e}")
    assert r <= TOL, f"{family} T={T}: rel err {r:.2e}"


@pytest.mark.parametrize("family", FAMS)
def test_chunked_prefill_then_decode_matches(pairs, family):
    """A prompt prefilled in uneven chunks (5 + 3 + 70 + 81, across DeltaNet chunk borders) then 12 one-token steps
    gives transformers' full-sequence logits: the conv and recurrent state carry between calls."""
    p = pairs[family]
    ids = prompt(171, seed=5)
    m = p.ours()
    cuts = [0, 5, 8, 78, 159]
    got = [m.forward(ids[a:b], a, all_logits=True) for a, b in zip(cuts, cuts[1:])]
    got += [m.forward(ids[i:i + 1], i) for i in range(159, 171)]
    r = rel(torch.cat(got), p.theirs(ids))
    print(f"{family} chunked+decode: rel {r:.2e}")
    assert r <= TOL, f"{family}: rel err {r:.2e}"


def test_new_sequence_resets_the_state(pairs):
    """A second prompt from position 0 gives the same logits as on a fresh model (the DeltaNet state is reset)."""
    p = pairs["qwen3_5_moe"]
    m = p.ours()
    m.forward(prompt(40, seed=1), 0)
    ids = prompt(23, seed=2)
    assert torch.equal(m.forward(ids, 0, all_logits=True), p.ours().forward(ids, 0, all_logits=True))


def test_static_step_matches_eager_and_preserve_state(pairs):
    """The graph-capturable step (device positions, fixed span) gives the eager step's logits, updating the DeltaNet
    state in place at fixed addresses; preserve_state() undoes a step run for warm-up."""
    p = pairs["qwen3_5_moe"]
    ids = prompt(30, seed=11)
    eager, static = p.ours(), p.ours()
    eager.forward(ids[:20], 0)
    static.forward(ids[:20], 0)
    ptrs = (static.state.linear.conv.data_ptr(), static.state.linear.recurrent.data_ptr())
    for i in range(20, 30):
        a = eager.forward(ids[i:i + 1], i)
        with torch.inference_mode():
            with static.preserve_state():  # a warm-up run, as CUDA-graph capture does
                static.decode_static(ids[i:i + 1], torch.tensor([i]), 64)
            b = static.decode_static(ids[i:i + 1], torch.tensor([i]), 64)
        assert rel(b, a) < 1e-6, f"pos {i}"
    assert ptrs == (static.state.linear.conv.data_ptr(), static.state.linear.recurrent.data_ptr())


def test_vision_tower_skipped_and_reported(pairs):
    """The multimodal checkpoint's vision tower is skipped and listed; its text model is what runs (logits tests)."""
    p = pairs["qwen3_5_moe_vl"]
    assert p.skipped and all(n.startswith("model.visual.") for n in p.skipped)
    assert p.layout.config.family == "qwen3_5_moe"


def _fuse_experts(src: Path, dst: Path) -> None:
    """Rewrite a per-expert checkpoint with fused 3-D experts: gate_up_proj [E, 2F, D], down_proj [E, D, F]."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors*"):
        f.unlink()
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(f))
    out, per = {}, {}
    for name, t in tensors.items():
        if ".mlp.experts." in name:
            head, rest = name.split(".mlp.experts.")
            e, role = rest.split(".")[0], rest.split(".")[1]
            per.setdefault(head, {}).setdefault(role, {})[int(e)] = t
        else:
            out[name] = t
    for head, roles in per.items():
        E = len(roles["gate_proj"])
        out[f"{head}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([roles["gate_proj"][e], roles["up_proj"][e]]) for e in range(E)])
        out[f"{head}.mlp.experts.down_proj"] = torch.stack([roles["down_proj"][e] for e in range(E)])
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})


def test_fused_experts_repack_round_trip(pairs, tmp_path):
    """A checkpoint with fused 3-D expert tensors repacks into the same expert blocks and dense tensors as the same
    weights stored per expert, and every expert reads back equal to its slice of the fused tensor."""
    from safetensors.torch import load_file

    p = pairs["qwen3_5_moe"]
    fused = tmp_path / "fused"
    _fuse_experts(p.ck, fused)
    repack(fused, tmp_path / "lay", progress=False)
    a, b = Layout.open(tmp_path / "lay"), p.layout
    src = load_file(fused / "model.safetensors")
    cfg = a.config
    F_, E = cfg.expert_ffn, cfg.num_experts
    x, y = (expert_views(lay.expert_file_pool(), lay.tensor_specs) for lay in (a, b))  # rows l*E + e
    for l in range(cfg.num_layers):
        gu = src[f"model.layers.{l}.mlp.experts.gate_up_proj"]
        dn = src[f"model.layers.{l}.mlp.experts.down_proj"]
        for e in range(E):
            s = l * E + e
            assert torch.equal(x.gate[s], gu[e, :F_]) and torch.equal(x.up[s], gu[e, F_:])
            assert torch.equal(x.down[s], dn[e])
            assert all(torch.equal(getattr(x, r)[s], getattr(y, r)[s]) for r in ("gate", "up", "down"))
    da, db = a.dense(), b.dense()
    assert da.keys() == db.keys() and all(torch.equal(da[k], db[k]) for k in da)


def test_inspect_reports_cache_and_state_bytes(pairs):
    """inspect: total/active parameters match transformers' count; KV bytes per token count attention layers only;
    the DeltaNet state per sequence is reported."""
    from tiered.cli.inspect import summarize

    p = pairs["qwen3_5_moe"]
    cfg = p.layout.config
    for path in (p.ck, p.layout.path):
        s = summarize(path)
        total = sum(t.numel() for t in p.ref.parameters())
        assert s["total_params"] == total
        per_expert = 3 * cfg.hidden_size * cfg.expert_ffn
        assert s["active_params"] == total - cfg.num_layers * (cfg.num_experts - cfg.top_k) * per_expert
        assert s["kv_cache_bytes_per_token"] == cfg.kv_bytes_per_token(2)
        assert s["linear_state_bytes_per_sequence"] == cfg.state_bytes_per_sequence(2)
        assert s["layer_kinds"] == {"attention": 1, "linear": 3}
    from click.testing import CliRunner

    from tiered.cli.main import main
    res = CliRunner().invoke(main, ["inspect", str(p.layout.path)])
    assert res.exit_code == 0 and f"{cfg.state_bytes_per_sequence(2):,}" in res.output and "1 / 3" in res.output


def test_bf16_within_tolerance(tmp_path):
    """bf16 storage and compute on CPU: prefill within the CONTRACTS bf16 tolerance (2e-2) of transformers bf16, and
    one-token steps follow transformers' own bf16 decode steps (within 1e-3)."""
    import transformers as tf

    ck = make_checkpoint(tmp_path / "bf", "qwen3_5_moe", seed=4, dtype=torch.bfloat16, vocab_size=VOCAB)
    repack(ck, tmp_path / "lay", progress=False)
    lay = Layout.open(tmp_path / "lay")
    m = Transformer(lay.config, lay.dense(), ResidentExperts.from_layout(lay), device="cpu", dtype=torch.bfloat16,
                    max_context=128)
    ref = tf.AutoModelForCausalLM.from_pretrained(ck, dtype=torch.bfloat16).eval()
    ids = prompt(90, seed=17)
    with torch.no_grad():
        b = ref(ids[None]).logits[0]
        out = ref(ids[None, :80], use_cache=True)
        cache, theirs = out.past_key_values, []
        for i in range(80, 90):  # transformers' own one-token steps (conv update + recurrent rule)
            out = ref(ids[None, i:i + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            theirs.append(out.logits[0])
    r = rel(m.forward(ids, 0, all_logits=True), b)
    m.forward(ids[:80], 0)
    ours = torch.cat([m.forward(ids[i:i + 1], i) for i in range(80, 90)])
    r_steps = rel(ours, torch.cat(theirs))
    print(f"bf16 prefill rel {r:.2e}, one-token steps vs transformers' steps rel {r_steps:.2e}")
    assert r <= 2e-2
    assert r_steps <= 1e-3  # same roundings as transformers' decode step (fp32-accumulating conv, fp32 state)


# --- every budget path ---

@pytest.fixture(scope="module")
def budget_layout(tmp_path_factory, reference_model) -> Path:
    """32 experts, top-4: tune's prefetch sweep needs more slots than the 6-expert checkpoints give."""
    root = tmp_path_factory.mktemp("q35b")
    ck = make_checkpoint(root / "ck", "qwen3_5_moe", seed=5, vocab_size=VOCAB, max_position_embeddings=CTX,
                         num_experts=32, num_experts_per_tok=4)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(reference_model / name, ck / name)
    repack(ck, root / "lay", progress=False)
    return root / "lay"


TEXT = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n" * 3


@pytest.mark.parametrize("slots,extra", [(4, {}), (5, {"policy": "lfu"}), (4, {"io": "direct"}),
                                         (8, {"ram_blocks": 6})])
def test_greedy_at_minimum_slots_equals_unlimited(budget_layout, slots, extra):
    """Greedy tokens through the expert cache at top-k slots (and a few other budgets: LFU, O_DIRECT, a RAM tier
    smaller than the model) equal the resident run, with a prompt longer than a DeltaNet chunk."""
    from tiered.engine import load

    extra = dict(extra)
    if "ram_blocks" in extra:
        extra["ram_gb"] = extra.pop("ram_blocks") * Layout.open(budget_layout).block_size / 2**30
    want = load(budget_layout, device="cpu", max_context=CTX).generate(TEXT, max_new_tokens=16).token_ids
    eng = load(budget_layout, device="cpu", max_context=CTX, budget={"expert_slots": slots, **extra})
    got = eng.generate(TEXT, max_new_tokens=16)
    assert len(eng.encode(TEXT)) > CHUNK
    assert got.token_ids == want, f"slots={slots} {extra}"
    assert got.stats["expert_slots"] == slots


def test_piecewise_step_equals_eager(budget_layout):
    """The piecewise decode step (segments with host routing, run eagerly on CPU) gives the eager greedy tokens."""
    from tiered.engine import load

    want = load(budget_layout, device="cpu", max_context=CTX, budget={"expert_slots": 4}).generate(
        TEXT, max_new_tokens=12).token_ids
    eng = load(budget_layout, device="cpu", max_context=CTX, budget={"expert_slots": 4})
    eng.use_piecewise(graphs=False)
    got = eng.generate(TEXT, max_new_tokens=12)
    assert eng.decode_mode == "piecewise" and got.token_ids == want


def test_trace_and_tune_run(budget_layout, tmp_path):
    """`tiered trace` records every layer's routing (DeltaNet layers too) and `tiered tune` runs on the trace."""
    from click.testing import CliRunner

    from tiered.cli.main import main
    from tiered.predict.trace import load as load_trace

    f = tmp_path / "p.txt"
    f.write_text(TEXT)
    res = CliRunner().invoke(main, ["trace", "-m", str(budget_layout), "--prompt-file", str(f), "-o",
                                    str(tmp_path / "t.npz")])
    assert res.exit_code == 0, res.output
    tr = load_trace(tmp_path / "t.npz")
    assert tr.num_layers == 4 and tr.top_k == 4
    res = CliRunner().invoke(main, ["tune", "-m", str(budget_layout), "--trace", str(tmp_path / "t.npz"), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert "belady" in out["policies"]


def test_config_without_layer_types_uses_the_interval(pairs):
    """A config.json without layer_types gets every full_attention_interval-th layer as attention; partial rotary
    is read from rope_parameters or the top level; an unknown layer type is an error that names the family file."""
    from tiered.layout.families import FamilyError, family_for

    hf = json.loads((pairs["qwen3_next"].ck / "config.json").read_text())
    hf.pop("layer_types")
    hf["full_attention_interval"] = 2
    hf["rope_parameters"].pop("partial_rotary_factor", None)
    hf["partial_rotary_factor"] = 0.5
    cfg = family_for(hf).normalise(hf)
    assert cfg.layer_types == ("linear", "attention", "linear", "attention") and cfg.rotary_dim == 8
    hf["layer_types"] = ["linear_attention", "sliding_attention", "linear_attention", "full_attention"]
    with pytest.raises(FamilyError, match="qwen3_next.toml"):
        family_for(hf).normalise(hf)


@pytest.mark.parametrize("fmt", ["q8", "q4"])
def test_quantized_layout_runs_and_splits_the_output_gate(pairs, tmp_path, fmt):
    """--experts/--dense quantized on Qwen3.5 (fused gate_up experts, gated attention): the quantized q_proj is split
    into query and output-gate rows part by part, which equals splitting its dequantization; prefill + decode logits stay near transformers."""
    from tiered.layout.quant import QuantWeight

    p = pairs["qwen3_5_moe"]
    repack(p.ck, tmp_path / "q", experts=fmt, dense=fmt, progress=False)
    lay = Layout.open(tmp_path / "q")
    dense = lay.dense()
    cfg = lay.config
    l = cfg.layer_types.index("attention")
    qp = dense[f"layers.{l}.q_proj"]
    assert isinstance(qp, QuantWeight) and isinstance(ResidentExperts.from_layout(lay).weights.gate, QuantWeight)
    m = Transformer(cfg, dense, ResidentExperts.from_layout(lay), device="cpu", dtype=torch.float32, max_context=CTX)
    H, hd = cfg.num_heads, cfg.head_dim
    deq = qp.dequantize(torch.float32).view(H, 2, hd, -1)
    k, v = (dense[f"layers.{l}.{n}"].dequantize(torch.float32) for n in ("k_proj", "v_proj"))
    want = torch.cat([deq[:, 0].reshape(H * hd, -1), k, v, deq[:, 1].reshape(H * hd, -1)])
    qkv = m.layers[l].attn.qkv
    assert isinstance(qkv, QuantWeight) and torch.equal(qkv.dequantize(torch.float32), want)
    ids = prompt(10, seed=2)
    rows = torch.cat([m.forward(ids[:7], 0, all_logits=True)] + [m.forward(ids[i:i + 1], i) for i in range(7, 10)])
    r = rel(rows, p.theirs(ids))
    print(f"qwen3_5_moe --dense {fmt}: rel {r:.2e}")
    assert r < (0.5 if fmt == "q4" else 0.05)
