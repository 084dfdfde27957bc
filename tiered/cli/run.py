"""`tiered run`: generate a continuation, streamed to stdout; stats to stderr (docs/cli.md).

Owns: the `run` click command (flags, usage errors with exit code 2, streaming, the stats line).
Does not own: loading or generation (engine.py), the budget flags (cli/options.py, from store/options.py).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from tiered.store.options import DEFAULT_CONTEXT
from tiered.cli.options import (BudgetCommand, apply_cpu_act, budget_from, budget_options, cpu_act_note,
                                cpu_act_option, experts_per_token_option, storage_options, usage as _usage)


def _read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    if prompt is not None and prompt_file is not None:
        raise _usage("give the prompt either as an argument or with --prompt-file, not both")
    if prompt_file is not None:
        try:
            raw = sys.stdin.buffer.read() if str(prompt_file) == "-" else prompt_file.read_bytes()
            text = raw.decode("utf-8")  # verbatim: a trailing newline is part of the prompt
        except OSError as e:
            raise _usage(f"cannot read --prompt-file {prompt_file}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise _usage(f"--prompt-file {prompt_file} is not UTF-8 text") from None
    elif prompt is not None:
        text = prompt
    else:
        raise _usage('no prompt: pass one, e.g. tiered run "def fib(n):", or use --prompt-file FILE')
    if not text:
        raise _usage("the prompt is empty: give some text to continue")
    return text


def _resolve_model(model: str | None, revision: str | None) -> str | None:
    """-m as given, or the local checkpoint of a Hugging Face model id (an existing path of that name wins)."""
    if model is None or Path(model).exists():
        return model
    from tiered.layout.hub import HubError, looks_like_repo_id, resolve_model

    if not looks_like_repo_id(model):
        return model
    try:
        return str(resolve_model(model, revision))
    except HubError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)


def _check_model_path(model: str | None) -> None:
    if model is None:
        return
    p = Path(model)
    if not p.exists():
        raise _usage(f"-m {model}: no such directory; pass a tiered layout or a Hugging Face checkpoint directory")
    if not p.is_dir():
        raise _usage(f"-m {model}: not a directory; pass a tiered layout or a Hugging Face checkpoint directory")
    if not os.access(p, os.R_OK | os.X_OK):
        raise _usage(f"-m {model}: permission denied; make the directory readable")
    from tiered.layout.tokenizer import missing_tokenizer

    why = missing_tokenizer(p)  # before a checkpoint is repacked into the cache, not after
    if why:
        raise _usage(f"-m {model}: {why}")


def _summary(s: dict) -> str:
    def f(v, unit):
        return "n/a" if v is None else f"{v:.1f} {unit}" if unit != "s" else f"{v:.2f} {unit}"
    return (f"[tiered] {s['tokens_prompt']} prompt tokens, {s['tokens_generated']} generated ({s['stop_reason']}); "
            f"prefill {f(s['prefill_tok_s'], 'tok/s')}, decode {f(s['decode_tok_s'], 'tok/s')}, "
            f"first token {f(s.get('ttft_s'), 's')}; load {f(s.get('load_s'), 's')}"
            + (f", graph capture {f(s['capture_s'], 's')}" if s.get("capture_s") else "") + "; "
            f"{s['device']} {s['dtype']} attention={s['attention']} io={s.get('io')}")


@click.command("run", cls=BudgetCommand, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("prompt", required=False)
@click.option("-m", "--model", "model", metavar="PATH", default=None,
              help="Layout or Hugging Face checkpoint directory, or a Hugging Face model id such as "
                   "Qwen/Qwen3-30B-A3B (default: the embedded model).")
@click.option("--revision", default=None, help="Branch, tag or commit of a Hugging Face model id.")
@click.option("--prompt-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Read the prompt from a file, verbatim (a trailing newline is part of it); - reads stdin.")
@click.option("--max-new-tokens", type=click.IntRange(min=0), default=128, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 means greedy.")
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="0 = off.")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="1.0 = off.")
@click.option("--seed", type=int, default=None, help="Seed for sampling.")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Compute dtype [default: float32 on CPU, bfloat16 on CUDA].")
@click.option("--max-context", type=click.IntRange(min=1), default=None,
              help=f"KV cache positions, prompt + generated [default: min({DEFAULT_CONTEXT}, the model's limit)].")
@click.option("--attn", type=click.Choice(["auto", "triton", "flash", "sdpa"]), default="auto", show_default=True,
              help="Attention backend: on CUDA our Triton decode kernel when triton imports (one CUDA graph for "
                   "every length), else flash-attn when importable, else PyTorch SDPA (one graph per span); "
                   "SDPA on CPU.")
@click.option("--prefill-chunk", type=click.IntRange(min=1), default=None, metavar="N",
              help="Prompt tokens per prefill forward. Longer chunks amortise the host's per-layer work (measured "
                   "3.6-4.8x on a 4,000-token prompt at 4,096 against 512) and cost activation memory [default: "
                   "up to 4,096 with every expert resident on CUDA, else 512].")
@click.option("--chat", is_flag=True, help="Wrap the prompt as a user message in the model's chat template.")
@click.option("--json", "as_json", is_flag=True, help="Stats as one JSON line, the last line of stderr.")
@click.option("--no-cuda-graphs", is_flag=True, help="Run the decode step eagerly on CUDA.")
@experts_per_token_option
@cpu_act_option
@budget_options
@storage_options
def run(prompt, model, revision, prompt_file, max_new_tokens, temperature, top_k, top_p, seed, device, dtype, max_context,
        attn, prefill_chunk, chat, as_json, no_cuda_graphs, experts, dense, experts_per_token, cpu_act,
        **flags) -> None:
    """Continue PROMPT with a model; only the continuation goes to stdout.

    \b
    Examples:
      tiered run "def fibonacci(n):"
      tiered run -m ~/layouts/qwen3-30b --device cuda --max-new-tokens 64 "Hello"
      tiered run --prompt-file prompt.txt --temperature 0.8 --top-p 0.95 --seed 1 --json
      tiered run -m Qwen/Qwen3-30B-A3B --chat "Write a haiku about caches"
      git diff | tiered run --prompt-file - --max-new-tokens 64
      # on the CPU with q4 experts: 8-bit inputs and integer dot products (faster prompts; see --cpu-act)
      tiered run -m ~/layouts/qwen3-30b-q4 --device cpu --cpu-act q8 --prompt-file doc.txt
      # larger than the GPU: 4 GiB of VRAM, every expert in pinned RAM (the device slot table: misses split
      # between the link and the CPU by default; --cpu-experts off copies them all)
      tiered run -m ~/layouts/qwen3-30b --device cuda --vram-gb 4 --ram-gb 64 "Hello"
    """
    text = _read_prompt(prompt, prompt_file)
    model = _resolve_model(model, revision)
    _check_model_path(model)
    if temperature < 0:
        raise _usage(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise _usage(f"--top-p must be in (0, 1], got {top_p}")
    budget = budget_from(flags)
    apply_cpu_act(cpu_act)

    from tiered.engine import EngineError, load
    from tiered.layout.families import FamilyError
    from tiered.layout.format import LayoutError
    from tiered.layout.tokenizer import TokenizerError
    from tiered.layout.repack import RepackError
    from tiered.store.io import ExpertReadError

    try:
        engine = load(model, device=device, dtype=dtype, max_context=max_context, attn=attn, budget=budget,
                      cuda_graphs=not no_cuda_graphs, experts=experts, dense=dense,
                      experts_per_token=experts_per_token, prefill_chunk=prefill_chunk)
        cpu_act_note(cpu_act, engine.layout_path)
        ids = engine.encode(text, chat=chat)
    except (EngineError, FamilyError, TokenizerError) as e:
        raise _usage(str(e)) from None
    except ValueError as e:  # --attn flash without flash-attn, and other bad option combinations
        raise _usage(str(e)) from None
    except (LayoutError, ExpertReadError, RepackError) as e:  # a damaged layout; a checkpoint that cannot be cached
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    if not ids:
        raise _usage("the prompt encodes to zero tokens: give some text to continue")
    if len(ids) > engine.max_context:
        raise _usage(f"the prompt has {len(ids)} tokens but --max-context is {engine.max_context}: "
                     "raise --max-context or shorten the prompt")

    def emit(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    try:
        gen = engine.generate(ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                              top_p=top_p, seed=seed, on_text=emit)
    except ExpertReadError as e:  # a damaged layout found mid-run: stop with the expert, file and offset
        click.echo(f"\nerror: {e}", err=True)
        sys.exit(1)
    except BrokenPipeError:  # the reader went away (e.g. `| head`): stop quietly, like other Unix tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    if sys.stdout.isatty() and not gen.text.endswith("\n"):
        sys.stdout.write("\n")  # on a terminal, end the text's line so the summary starts on its own
        sys.stdout.flush()
    stats = dict(gen.stats)
    if budget.get("vram_gb") is not None:
        stats["vram_budget_gib"] = budget["vram_gb"]
    click.echo(_summary(stats), err=True)
    if as_json:
        click.echo(json.dumps(stats), err=True)
