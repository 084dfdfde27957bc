"""Dev-only: record a routing trace with transformers' OlmoeForCausalLM (forward hooks), as an oracle for ours.

Records, per token and layer, the top-k ids and weights, the router logits and the hidden state after
attention (the input of post_attention_layernorm), in the tiered trace format (tiered/predict/trace.py).
The runtime never imports this; `tiered trace` uses our engine, and tests/test_predict.py checks that
both give identical top-k ids.

    python3 tools/trace_with_transformers.py tiered/data/olmoe-code-17m text.txt -o trace.npz [--max-len 2048]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch


def trace_texts(model_dir: str | Path, docs: list[tuple[str, list[int]]], *, dtype: torch.dtype = torch.float32):
    """Teacher-forced forward of each (name, ids) document through transformers -> tiered Trace."""
    import transformers as tf

    from tiered.predict.trace import Trace

    model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    cfg = model.config
    L = cfg.num_hidden_layers
    cur: dict[str, list] = {}
    handles = []
    for l, layer in enumerate(model.model.layers):
        def pre(_mod, args, l=l):  # residual after attention = the norm's input
            cur["hidden"][l] = args[0].reshape(-1, args[0].shape[-1]).to(torch.float16).numpy()

        def gate(_mod, _args, out, l=l):
            logits, scores, idx = out
            cur["logits"][l] = logits.to(torch.float16).numpy()
            cur["w"][l] = scores.float().numpy()
            cur["ids"][l] = idx.to(torch.int16).numpy()

        handles.append(layer.post_attention_layernorm.register_forward_pre_hook(pre))
        handles.append(layer.mlp.gate.register_forward_hook(gate))
    out = {k: [] for k in ("tokens", "ids", "w", "logits", "hidden")}
    try:
        with torch.inference_mode():
            for _, ids in docs:
                cur.update({k: [None] * L for k in ("ids", "w", "logits", "hidden")})
                model(torch.tensor([ids]), use_cache=False)
                out["tokens"].append(np.asarray(ids, dtype=np.int32))
                for k in ("ids", "w", "logits", "hidden"):
                    out[k].append(np.stack(cur[k], axis=1))  # [T, L, ...]
    finally:
        for h in handles:
            h.remove()
    offs = np.cumsum([0] + [len(ids) for _, ids in docs]).astype(np.int64)
    meta = {"num_layers": L, "num_experts": cfg.num_experts, "top_k": cfg.num_experts_per_tok,
            "hidden_size": cfg.hidden_size, "family": "olmoe", "norm_topk_prob": cfg.norm_topk_prob,
            "model": str(model_dir), "dtype": str(dtype).removeprefix("torch."), "docs": [n for n, _ in docs],
            "recorder": "transformers"}
    cat = lambda k: np.concatenate(out[k])  # noqa: E731
    return Trace(cat("tokens"), offs, cat("ids"), cat("w"), cat("logits"), cat("hidden"), meta)


def main() -> None:
    from tiered.predict.trace import save, split_ids
    from tiered.layout.tokenizer import Tokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("texts", nargs="+")
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--max-len", type=int, default=2048)
    a = ap.parse_args()
    tok = Tokenizer.from_dir(Path(a.model))
    docs = []
    for f in a.texts:
        docs += split_ids(Path(f).name, tok.encode(Path(f).read_text()), a.max_len)
    tr = trace_texts(a.model, docs)
    save(tr, a.out)
    print(f"{tr.num_tokens} tokens in {tr.num_docs} documents -> {a.out}")


if __name__ == "__main__":
    main()
