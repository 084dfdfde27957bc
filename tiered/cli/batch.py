"""`tiered batch`: a JSONL file of requests through the scheduler, one output line per request as it finishes.

Owns: the command's flags and summary line. Does not own: the job runner (serve/batch.py), the shared model
and scheduler flags (rows.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from tiered.cli.options import usage
from tiered.cli.rows import model_name, model_options, open_scheduler

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
        raise usage(f"--output {output_path} exists: pass --resume to continue it, or remove it")
    engine, sch = open_scheduler(**opts)
    name = model_name(engine)
    summary = run_batch(sch, input_path, output_path, resume=resume, model=name, progress=not no_progress)
    stats = {**summary, **{k: v for k, v in sch.stats().items() if not isinstance(v, dict)}}
    click.echo(f"[tiered batch] {summary['requests']} requests ({summary['errors']} errors, {summary['skipped']} "
               f"already done) in {summary['seconds']:.1f} s; {summary['tokens_generated']} tokens, "
               f"{summary['tok_s'] or 0:.1f} tok/s; {stats['rows_per_step']:.1f} rows/step", err=True)
    if as_json:
        click.echo(json.dumps(stats), err=True)
