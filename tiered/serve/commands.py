"""`tiered batch` and `tiered serve`: click commands over the scheduler (batch.py, app.py).

Owns: the two commands' flags (model, device, budgets, scheduler sizes, I/O paths, host/port/api key) and
their usage errors (exit 2). Does not own: the job runner, the HTTP app, the scheduler.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from tiered.run_cli import BUDGET_HELP, _check_model_path


def model_options(f):
    """The options every model-reading command shares (model, device, dtype, context, budgets)."""
    opts = [
        click.option("-m", "--model", "model", metavar="PATH", default=None,
                     help="Layout or Hugging Face checkpoint directory (default: the embedded model)."),
        click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="auto", show_default=True),
        click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
                     help="Compute dtype [default: float32 on CPU, bfloat16 on CUDA]."),
        click.option("--max-context", type=click.IntRange(min=1), default=None,
                     help="Positions per sequence, prompt + generated [default: min(4096, the model's limit)]."),
        click.option("--vram-gb", type=float, default=None, help=f"GiB of GPU memory for the whole model; {BUDGET_HELP}."),
        click.option("--expert-slots", type=click.IntRange(min=1), default=None,
                     help=f"Global device-tier expert slots; {BUDGET_HELP}."),
        click.option("--ram-gb", type=float, default=None, help=f"GiB of pinned RAM for experts; {BUDGET_HELP}."),
        click.option("--io", type=click.Choice(["mmap", "direct"]), default=None, help=f"Disk reads; {BUDGET_HELP}."),
        click.option("--policy", type=str, default=None, help=f"Eviction policy: lru, lfu, flru; {BUDGET_HELP}."),
        click.option("--verify", type=click.Choice(["first-use", "none"]), default=None,
                     help=f"Check each expert's xxh3 the first time it is read from disk; {BUDGET_HELP}."),
        click.option("--max-batch", type=click.IntRange(min=1), default=32, show_default=True,
                     help="Rows (requests) per step at most."),
        click.option("--kv-gb", type=float, default=None,
                     help="GiB of paged K/V state shared by the rows (part of --vram-gb on CUDA) "
                          "[default: max-batch full contexts, at most 2]."),
        click.option("--max-queue", type=click.IntRange(min=1), default=256, show_default=True,
                     help="Requests waiting for a row at most (the server answers 503 beyond it)."),
        click.option("--prefill-tokens", type=click.IntRange(min=1), default=256, show_default=True,
                     help="Prompt tokens per step at most (prompt chunks ride the decode steps)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def open_scheduler(model, device, dtype, max_context, vram_gb, expert_slots, ram_gb, io, policy, verify,
                   max_batch, kv_gb, max_queue, prefill_tokens):
    """Load the engine and build its scheduler; bad options become click usage errors."""
    _check_model_path(model)
    from tiered.decode.scheduler import Scheduler
    from tiered.decode.state import StateBudgetError
    from tiered.engine import EngineError, load
    from tiered.families import FamilyError
    from tiered.format import LayoutError
    from tiered.tokenizer import TokenizerError

    if kv_gb is not None and not kv_gb > 0:
        raise click.UsageError(f"--kv-gb must be a positive number of GiB, got {kv_gb}")
    budget = dict(vram_gb=vram_gb, expert_slots=expert_slots, ram_gb=ram_gb, io=io, policy=policy, verify=verify)
    try:
        engine = load(model, device=device, dtype=dtype, max_context=max_context, budget=budget, cuda_graphs=False)
        sch = Scheduler(engine, max_batch=max_batch, kv_gb=kv_gb, max_queue=max_queue, prefill_tokens=prefill_tokens)
    except (EngineError, FamilyError, TokenizerError, StateBudgetError) as e:
        raise click.UsageError(str(e)) from None
    except LayoutError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    return engine, sch


CTX = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.command("batch", context_settings=CTX)
@click.option("--input", "input_path", required=True, type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="JSONL: OpenAI batch lines or bare {\"prompt\", \"max_tokens\"} lines.")
@click.option("--output", "output_path", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="JSONL written as requests finish (completion order; custom_id ties lines back).")
@click.option("--resume", is_flag=True, help="Skip ids already in --output and append the rest.")
@click.option("--no-progress", is_flag=True, help="No progress bar on stderr.")
@click.option("--json", "as_json", is_flag=True, help="Summary and stats as one JSON line, the last line of stderr.")
@model_options
def batch(input_path, output_path, resume, no_progress, as_json, **opts) -> None:
    """Run a JSONL file of requests, many rows per step; one output line per request.

    \b
    Examples:
      tiered batch --input prompts.jsonl --output out.jsonl --max-batch 64
      tiered batch --input prompts.jsonl --output out.jsonl --resume     # after an interruption
    Bare lines ({"prompt": "...", "max_tokens": 32}) are greedy and take their line number as custom_id.
    """
    from tiered.serve.batch import run_batch

    if output_path.exists() and not resume and output_path.stat().st_size > 0:
        raise click.UsageError(f"--output {output_path} exists: pass --resume to continue it, or remove it")
    engine, sch = open_scheduler(**opts)
    name = Path(str(engine.layout_path)).name if engine.layout_path else "tiered"
    summary = run_batch(sch, input_path, output_path, resume=resume, model=name, progress=not no_progress)
    stats = {**summary, **{k: v for k, v in sch.stats().items() if not isinstance(v, dict)}}
    click.echo(f"[tiered batch] {summary['requests']} requests ({summary['errors']} errors, {summary['skipped']} "
               f"already done) in {summary['seconds']:.1f} s; {summary['tokens_generated']} tokens, "
               f"{summary['tok_s'] or 0:.1f} tok/s; {stats['rows_per_step']:.1f} rows/step", err=True)
    if as_json:
        click.echo(json.dumps(stats), err=True)


@click.command("serve", context_settings=CTX)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--api-key", default=None, envvar="TIERED_API_KEY",
              help="Require 'Authorization: Bearer KEY' on /v1/* (or set TIERED_API_KEY).")
@click.option("--served-model-name", default=None, help="The model id /v1/models reports [default: the layout's name].")
@click.option("--drain-s", type=float, default=30.0, show_default=True,
              help="On shutdown, seconds running requests may take to finish before they are cancelled.")
@model_options
def serve(host, port, api_key, served_model_name, drain_s, **opts) -> None:
    """Serve the OpenAI API (completions, chat, streaming, tools) on HOST:PORT.

    \b
    Example:
      tiered serve -m ~/layouts/qwen3-30b --device cuda --vram-gb 8 --max-batch 32
      curl localhost:8000/v1/completions -d '{"prompt": "def fib(n):", "max_tokens": 32}' \\
           -H 'Content-Type: application/json'
    """
    try:
        import uvicorn

        from tiered.serve.app import create_app
    except ImportError as e:
        raise click.UsageError(f"tiered serve needs the serve extra ({e.name} is missing): "
                               "pip install 'tiered[serve]'") from None
    from tiered.serve.worker import EngineWorker

    engine, sch = open_scheduler(**opts)
    name = served_model_name or (Path(str(engine.layout_path)).name if engine.layout_path else "tiered")
    worker = EngineWorker(sch).start()
    app = create_app(worker, model_name=name, api_key=api_key, drain_s=drain_s)
    click.echo(f"tiered serve: {name} on http://{host}:{port}/v1 (max batch {sch.max_batch}, "
               f"{sch.state.num_pages} KV pages of {sch.state.page_size})", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=max(1, int(drain_s)))
