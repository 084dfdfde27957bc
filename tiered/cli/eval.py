"""`tiered eval`: teacher-forced perplexity over text files, and KL / top-1 / expert overlap against a reference.

Owns: the `eval` click command (flags, usage errors with exit code 2, the table, the --json line); the
device, dtype, storage and budget flags are those of `run`.
Does not own: the measurement (serve/evaluate.py) or loading (engine.py).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from tiered.cli.options import (apply_cpu_act, budget_from, budget_options, cpu_act_note, cpu_act_option,
                                experts_per_token_option, storage_options)


def _load(model, *, device, dtype, max_context, attn, budget, observer, experts="source", dense="source",
          experts_per_token=None):
    from tiered.engine import load

    return load(model, device=device, dtype=dtype, max_context=max_context, attn=attn, budget=budget,
                cuda_graphs=False, experts=experts, dense=dense, observer=observer,
                experts_per_token=experts_per_token)


@click.command("eval", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-m", "--model", "model", metavar="PATH", default=None,
              help="Layout or Hugging Face checkpoint directory (default: the embedded model).")
@click.option("--text-file", "text_files", multiple=True, required=True,
              type=click.Path(path_type=Path, dir_okay=False), help="A text file to score (repeat for more).")
@click.option("--reference", metavar="PATH", default=None,
              help="A second model scored on the same tokens: adds KL, top-1 agreement and expert overlap.")
@click.option("--max-tokens", type=click.IntRange(min=2), default=None, help="Cap on each file's tokens.")
@click.option("--max-context", type=click.IntRange(min=2), default=None,
              help="Window length in tokens [default: min(2048, the model's limit)].")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Compute dtype [default: float32 on CPU, bfloat16 on CUDA].")
@click.option("--attn", type=click.Choice(["auto", "flash", "sdpa"]), default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object, the last line of stdout.")
@experts_per_token_option
@cpu_act_option
@storage_options
@budget_options
def eval_cmd(model, text_files, reference, max_tokens, max_context, device, dtype, attn, as_json, experts, dense,
             experts_per_token, cpu_act, **flags) -> None:
    """Score MODEL on text files: perplexity over non-overlapping windows (each scored from position 0).

    With --reference, the same tokens also go through a second model: mean and 99th-percentile
    KL(reference || model), top-1 agreement, and per layer the Jaccard overlap of the chosen experts.
    --experts/--dense repack a checkpoint given to -m in that storage (the reference as stored), so
    one checkpoint measures what a format costs; --experts-per-token K applies to -m only (the reference
    routes as trained), so `--reference` the same model measures what cutting the expert count costs.

    \b
    Examples:
      tiered eval -m ~/layouts/qwen3-30b-q4 --text-file notes.txt --reference ~/layouts/qwen3-30b --json
      tiered eval --text-file a.py --text-file b.md --max-tokens 4096
      tiered eval -m ~/models/Qwen3-30B-A3B --experts q4 --reference ~/models/Qwen3-30B-A3B --text-file a.py
      tiered eval -m ~/layouts/qwen3-30b-q4 --device cpu --cpu-act q8 --reference ~/layouts/qwen3-30b --text-file a.py
    """
    texts = {}
    for f in text_files:
        try:
            texts[str(f)] = f.read_bytes().decode("utf-8")
        except OSError as e:
            raise click.UsageError(f"cannot read --text-file {f}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise click.UsageError(f"--text-file {f} is not UTF-8 text") from None
    for p in (model, reference):
        if p is not None and not Path(p).is_dir():
            raise click.UsageError(f"{p}: no such directory; pass a tiered layout or a Hugging Face checkpoint")
    budget = budget_from(flags)
    apply_cpu_act(cpu_act)  # both models' q4 products on the CPU, when --reference is q4 too

    from tiered.engine import EngineError
    from tiered.serve.evaluate import RouteRecorder, default_window, evaluate
    from tiered.layout.families import FamilyError
    from tiered.layout.format import LayoutError
    from tiered.layout.tokenizer import TokenizerError

    try:
        routes = (RouteRecorder(), RouteRecorder())
        eng = _load(model, device=device, dtype=dtype, max_context=max_context, attn=attn, budget=budget,
                    experts=experts, dense=dense, observer=routes[0], experts_per_token=experts_per_token)
        cpu_act_note(cpu_act, eng.layout_path)
        window = max_context or default_window(eng.config.max_position_embeddings)  # <= the engine's context
        ref = None
        if reference is not None:
            ref = _load(reference, device=device, dtype=dtype, max_context=window, attn=attn, budget=budget,
                        observer=routes[1])
        out = evaluate(eng, texts, reference=ref, window=window, max_tokens=max_tokens, routes=routes)
    except (EngineError, FamilyError, TokenizerError, ValueError) as e:
        raise click.UsageError(str(e)) from None
    except LayoutError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    out.update({"model": str(eng.layout_path), "reference": str(ref.layout_path) if ref else None,
                "device": str(eng.device), "dtype": str(eng.dtype).removeprefix("torch."),
                "experts_per_token": eng.config.top_k,
                "native_top_k": int(eng.config.extra.get("native_top_k", eng.config.top_k))})
    _print_table(out)
    if as_json:
        click.echo(json.dumps(out))


def _print_table(out: dict) -> None:
    ref = "reference_perplexity" in out
    head = f"{'file':<40} {'tokens':>8} {'ppl':>9}"
    if ref:
        head += f" {'ref ppl':>9} {'ratio':>7} {'KL mean':>8} {'KL p99':>8} {'top-1':>7}"
    click.echo(head)
    for r in out["files"] + [{"file": "all", **{k: v for k, v in out.items() if k != "files"}}]:
        line = f"{Path(r['file']).name[:40]:<40} {r['tokens']:>8} {r['perplexity']:>9.3f}"
        if ref:
            line += (f" {r['reference_perplexity']:>9.3f} {r['perplexity_ratio']:>7.4f} {r['kl_mean']:>8.4f}"
                     f" {r['kl_p99']:>8.4f} {r['top1_agreement']:>7.2%}")
        click.echo(line)
    if ref and out.get("expert_jaccard"):
        click.echo("expert Jaccard per layer: " + " ".join(f"{j:.3f}" for j in out["expert_jaccard"]))
