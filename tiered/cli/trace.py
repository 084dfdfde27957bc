"""`tiered trace`: record a routing trace of prompts with our engine (never transformers).

Owns: the click command (parse, record, save, optional plot) and the plots (matplotlib, an optional
extra: without it --plot says so and the trace is still written).
Only MoE layers are traced: a model with dense layers (DeepSeek-V3) gets a trace of its MoE layers, their
model indices in the trace's meta "moe_layers".
Does not own: the trace format or recorder (predict/trace.py). The budget flags are `run`'s (cli/options.py);
the trace does not depend on them.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from tiered.cli.options import BudgetCommand, budget_from, budget_options, experts_per_token_option, usage as _usage


def read_inputs(prompt_files: tuple[Path, ...], jsonl: Path | None) -> list[tuple[str, str]]:
    """(name, text) pairs: each prompt file verbatim, each JSON line's "prompt" or "text"."""
    docs = [(p.name, p.read_text()) for p in prompt_files]
    if jsonl is not None:
        for i, line in enumerate(jsonl.read_text().splitlines()):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise _usage(f"{jsonl} line {i + 1}: not JSON ({e}); write one object per line") from None
            text = obj.get("prompt", obj.get("text")) if isinstance(obj, dict) else obj if isinstance(obj, str) else None
            if not isinstance(text, str):
                raise _usage(f"{jsonl} line {i + 1}: needs a \"prompt\" (or \"text\") string")
            docs.append((str(obj.get("name", f"{jsonl.name}:{i + 1}")) if isinstance(obj, dict) else f"{jsonl.name}:{i + 1}",
                         text))
    return docs


def plot_trace(trace, path: Path) -> bool:
    """Expert use per layer over tokens, and co-occurrence between consecutive layers. False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    import numpy as np

    hot = trace.multi_hot()  # [N, L, E]
    N, L, E = hot.shape
    ml = trace.moe_layers  # model layer of each traced layer (dense layers are not traced)
    fig, axes = plt.subplots(2, L, figsize=(2.2 * L, 6), squeeze=False)
    for l in range(L):
        axes[0, l].imshow(hot[:512, l].T, aspect="auto", interpolation="nearest", cmap="Greys")
        axes[0, l].set_title(f"layer {ml[l]}", fontsize=8)
        axes[0, l].set_xlabel("token", fontsize=7)
        if l + 1 < L:
            co = np.einsum("ne,nf->ef", hot[:, l].astype(np.float32), hot[:, l + 1].astype(np.float32))
            axes[1, l].imshow(co / max(co.max(), 1), cmap="viridis")
            axes[1, l].set_title(f"{ml[l]} -> {ml[l + 1]}", fontsize=8)
        else:
            axes[1, l].axis("off")
        for ax in axes[:, l]:
            ax.tick_params(labelsize=6)
    axes[0, 0].set_ylabel("expert (first 512 tokens)", fontsize=7)
    axes[1, 0].set_ylabel("co-occurrence l -> l+1", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


@click.command("trace", cls=BudgetCommand, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-m", "--model", "model", metavar="PATH", default=None,
              help="Layout or Hugging Face checkpoint directory (default: the embedded model).")
@click.option("--revision", default=None, help="Branch, tag or commit of a Hugging Face model id.")
@click.option("--prompt-file", "prompt_files", multiple=True, type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="A text file, read verbatim; may repeat.")
@click.option("--input", "jsonl", type=click.Path(path_type=Path, dir_okay=False, exists=True), default=None,
              help="prompts.jsonl: one {\"prompt\": ...} (or {\"text\": ...}, optional \"name\") per line.")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="Trace file to write (.npz).")
@click.option("--plot", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Also write a PNG: expert use per layer, co-occurrence of consecutive layers (needs matplotlib).")
@click.option("--max-len", type=click.IntRange(min=1), default=None,
              help="Split texts into documents of at most this many tokens [default: the context].")
@click.option("--no-hidden", is_flag=True, help="Do not keep hidden states (next-gate and combined need them).")
@click.option("--no-logits", is_flag=True, help="Do not keep router logits.")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Compute dtype [default: float32 on CPU, bfloat16 on CUDA].")
@experts_per_token_option
@budget_options
def trace(model, revision, prompt_files, jsonl, out, plot, max_len, no_hidden, no_logits, device, dtype, experts_per_token,
          **flags) -> None:
    """Record which experts each token routes to, per layer, teacher-forced over the given texts.

    \b
    Examples:
      tiered trace --prompt-file my_code.py -o fit.npz
      tiered trace -m ~/layouts/qwen3-30b --input prompts.jsonl -o t.npz --plot t.png
    """
    if not prompt_files and jsonl is None:
        raise _usage("give --prompt-file F (repeatable) or --input prompts.jsonl")
    docs_text = read_inputs(prompt_files, jsonl)
    from tiered.layout.tokenizer import missing_tokenizer

    if model is not None and (why := missing_tokenizer(model)):  # before a checkpoint is repacked, not after
        raise _usage(f"-m {model}: {why}")
    from tiered.engine import EngineError, load
    from tiered.layout.format import LayoutError
    from tiered.predict.trace import TraceRecorder, record, save, split_ids

    rec = TraceRecorder(logits=not no_logits, hidden=not no_hidden)
    try:
        engine = load(model, device=device, dtype=dtype, budget=budget_from(flags), observer=rec, cuda_graphs=False,
                      revision=revision, experts_per_token=experts_per_token)
    except (EngineError, ValueError) as e:
        raise _usage(str(e)) from None
    except LayoutError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    n = max_len or engine.max_context
    docs = []
    for name, text in docs_text:
        ids = engine.encode(text)
        if not ids:
            raise _usage(f"{name}: encodes to zero tokens")
        docs += split_ids(name, ids, n)
    tr = record(engine, rec, docs)
    save(tr, out)
    dense = engine.config.num_layers - tr.num_layers
    which = f" (MoE layers {tr.moe_layers[0]}..{tr.moe_layers[-1]}; {dense} dense not traced)" if dense else ""
    click.echo(f"[tiered] traced {tr.num_tokens} tokens in {tr.num_docs} documents "
               f"({tr.num_layers} layers{which}, top-{tr.top_k} of {tr.num_experts}) -> {out}", err=True)
    if plot is not None:
        if plot_trace(tr, plot):
            click.echo(f"[tiered] plot -> {plot}", err=True)
        else:
            click.echo("[tiered] --plot skipped: matplotlib is not installed (pip install 'tiered[plot]')", err=True)
