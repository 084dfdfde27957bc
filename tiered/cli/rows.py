"""What `tiered batch` and `tiered serve` share: the model flags and opening an engine with its scheduler.

Owns: `model_options` (-m, --device, --dtype, --max-context; the budget and scheduler flags come from their
dataclasses through cli/options.py) and `open_scheduler` (the paged K/V pool counted inside --vram-gb, load,
Scheduler; bad options become usage errors, exit 2). Does not own: the commands (batch.py, serve.py).
"""
from __future__ import annotations

import sys
from typing import Any

import click

from tiered.cli.options import (apply_cpu_act, batch_options, budget_from, budget_options, cpu_act_note,
                                cpu_act_option, experts_per_token_option, usage)
from tiered.cli.run import _check_model_path
from tiered.store.options import DEFAULT_CONTEXT


def model_options(command):
    """-m, --device, --dtype, --max-context, then every budget and scheduler flag."""
    command = cpu_act_option(experts_per_token_option(batch_options(budget_options(command))))
    for opt in reversed([
        click.option("-m", "--model", "model", metavar="PATH", default=None,
                     help="Layout or Hugging Face checkpoint directory (default: the embedded model)."),
        click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="auto", show_default=True),
        click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
                     help="Compute dtype [default: float32 on CPU, bfloat16 on CUDA]."),
        click.option("--max-context", type=click.IntRange(min=1), default=None,
                     help=f"Positions per request, prompt + generated [default: min({DEFAULT_CONTEXT}, the model's "
                          "limit)]."),
    ]):
        command = opt(command)
    return command


def open_scheduler(model: str | None, device: str, dtype: str | None, max_context: int | None,
                   experts_per_token: int | None = None, cpu_act: str | None = None, **flags: Any) -> tuple[Any, Any]:
    """Load the engine (the K/V pool reserved inside --vram-gb) and build its scheduler."""
    _check_model_path(model)
    apply_cpu_act(cpu_act)
    from tiered.decode.options import BatchConfig
    from tiered.decode.scheduler import Scheduler
    from tiered.decode.state import StateBudgetError, pool_bytes
    from tiered.engine import EngineError, load, resolve_device, resolve_dtype, resolve_layout
    from tiered.layout.families import FamilyError
    from tiered.layout.format import LayoutError
    from tiered.layout.tokenizer import TokenizerError
    from tiered.store.disk import Layout
    from tiered.store.options import default_context

    try:
        opts = BatchConfig.from_flags(flags)
        dev = resolve_device(device)
        cfg = Layout.open(resolve_layout(model)).config
        state = pool_bytes(opts, cfg, default_context(cfg, max_context), resolve_dtype(dtype, dev))
        engine = load(model, device=dev, dtype=dtype, max_context=max_context, budget=budget_from(flags),
                      cuda_graphs=False, state_bytes=state, experts_per_token=experts_per_token)
        cpu_act_note(cpu_act, engine.layout_path)
        sch = Scheduler.from_config(engine, opts)
    except LayoutError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    except (EngineError, FamilyError, TokenizerError, StateBudgetError, ValueError) as e:
        raise usage(str(e)) from None
    return engine, sch


def model_name(engine: Any) -> str:
    from pathlib import Path

    return Path(str(engine.layout_path)).name if engine.layout_path else "tiered"
