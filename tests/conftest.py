"""Shared fixtures: tiny random checkpoints of every family (made with transformers) and the reference model."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Triton decides between compiled and interpreted kernels when it is first imported: without CUDA, the kernel
# tests need its interpreter, whichever test module happens to import triton first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tiered.layout.families import default_model_path  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "qwen3_5_moe", "qwen3_next")
HYBRID = dict(num_hidden_layers=4, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
              linear_value_head_dim=6, linear_conv_kernel_dim=4, num_experts=6, num_experts_per_tok=2,
              moe_intermediate_size=24, shared_expert_intermediate_size=40)  # layers 0-2 DeltaNet, 3 attention


def compile_sm90(script: str, timeout: float = 300) -> None:
    """Run `script` (it compiles Triton kernels for sm_90 down to cubins and prints "ok" last) in a fresh process
    without TRITON_INTERPRET, with this checkout first on the path: the real compiler, stricter than the
    interpreter, on a machine without a GPU. Skips when this Triton has no NVIDIA backend."""
    import subprocess
    import sys

    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("Triton's CUDA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-3000:]


def tiny_config(family: str, **overrides):
    """A transformers config of `family`, small enough to build in milliseconds."""
    import transformers as tf

    common = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6)
    if family == "mixtral":
        cfg = tf.MixtralConfig(**common, num_local_experts=6, num_experts_per_tok=2)
    elif family == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(**common, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24,
                                shared_expert_intermediate_size=40)
    elif family == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**common, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24, head_dim=16)
    elif family == "olmoe":
        cfg = tf.OlmoeConfig(**common, num_experts=6, num_experts_per_tok=2)
    elif family == "gpt_oss":  # YaRN rope by default; sliding and full layers alternate
        cfg = tf.GptOssConfig(**{**common, "num_hidden_layers": 3, "intermediate_size": 64},
                              num_local_experts=6, num_experts_per_tok=2,
                              head_dim=16, sliding_window=6)
    elif family == "qwen3_5_moe":
        cfg = tf.Qwen3_5MoeTextConfig(**{**common, **HYBRID})
    elif family == "qwen3_5_moe_vl":  # the multimodal checkpoint: text model under model.language_model + a vision tower
        text = tf.Qwen3_5MoeTextConfig(**{**common, **HYBRID})
        cfg = tf.Qwen3_5MoeConfig(text_config=text.to_dict(), vision_config=dict(depth=1, hidden_size=16, num_heads=2,
                                  intermediate_size=16, out_hidden_size=32, patch_size=4, spatial_merge_size=1,
                                  temporal_patch_size=1))
    elif family == "qwen3_next":
        cfg = tf.Qwen3NextConfig(**{**common, **HYBRID}, norm_topk_prob=False)
    else:
        raise ValueError(family)
    cfg.eos_token_id = 1
    cfg.bos_token_id = 0
    cfg.pad_token_id = 0
    for k, v in overrides.items():
        setattr(cfg.text_config if family == "qwen3_5_moe_vl" else cfg, k, v)
    return cfg


def make_checkpoint(path: Path, family: str, *, seed: int = 0, dtype=torch.float32, shard_size: str | None = None,
                    **overrides) -> Path:
    """Save a randomly initialised `family` model with `save_pretrained`; returns `path`."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tiny_config(family, **overrides)
    if family == "qwen3_5_moe_vl":
        model = tf.Qwen3_5MoeForConditionalGeneration(cfg).to(dtype)
    else:
        model = tf.AutoModelForCausalLM.from_config(cfg).to(dtype)
    if family.startswith("qwen3_5") or family == "qwen3_next":
        with torch.no_grad():  # zero-initialised (1 + w) norms and unit dt_bias would leave those paths untested
            for name, p in model.named_parameters():
                if "norm" in name or "dt_bias" in name:
                    p.add_(torch.randn_like(p) * 0.1)
    kw = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(path, **kw)
    return Path(path)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One tiny fp32 checkpoint per family (sharded, so the index path is exercised)."""
    root = tmp_path_factory.mktemp("tiny")
    return {f: make_checkpoint(root / f, f, shard_size="20KB") for f in FAMILIES}


@pytest.fixture(scope="session")
def reference_model() -> Path:
    """The trained olmoe-code-17m checkpoint (the embedded copy; ../shared is the same files)."""
    return default_model_path()


@pytest.fixture(scope="session")
def reference_layout(reference_model, tmp_path_factory) -> Path:
    from tiered.layout.repack import repack

    dst = tmp_path_factory.mktemp("ref") / "layout"
    repack(reference_model, dst, progress=False)
    return dst


def eval_texts() -> dict[str, str]:
    """The held-out texts (../shared/text/eval); report numbers here, never fit on them."""
    d = SHARED / "text" / "eval"
    return {p.name: p.read_text() for p in sorted(d.glob("*"))} if d.is_dir() else {}


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def source_tensors(src: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint's safetensors shards, by name."""
    from safetensors import safe_open

    out = {}
    for shard in sorted(src.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    return out


def step_logits(e, ids: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decode with an engine's one-token path (piecewise when set, else eager) after prefilling `ids`:
    the tokens and each step's logits (fp32 copies)."""
    logits = e.model.forward(torch.tensor(ids), 0)
    toks, outs = [], []
    pos = len(ids)
    for _ in range(steps):
        tok = int(logits[0].argmax())
        toks.append(tok)
        logits = e._step(torch.tensor([tok]), tok, pos)
        outs.append(logits.float().clone())
        pos += 1
    return toks, outs
