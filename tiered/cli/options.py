"""Flags shared by several commands, derived from the dataclasses that define them.

Owns: `budget_options` (a click decorator adding one flag per `TierConfig` field, so a new budget option
is written once, in store/options.py), `budget_from` (the parsed flags -> the `budget` dict of `load()`),
`usage` and `fail` (exit 2 for usage errors, 1 for data errors).
Does not own: the options' meaning, defaults or validation (store/options.py).
"""
from __future__ import annotations

import sys
import typing
from dataclasses import fields
from typing import Any, Callable

import click

from tiered.store.options import TierConfig

def usage(msg: str) -> click.UsageError:
    return click.UsageError(msg)


def fail(msg: str, code: int = 1) -> None:
    click.echo(f"error: {msg}", err=True)
    sys.exit(code)


def _click_type(f: Any, hints: dict[str, Any]) -> dict[str, Any]:
    kind = f.metadata["kind"]
    if kind == "flag":
        return {"is_flag": True, "default": None}
    if isinstance(kind, tuple) and kind and kind[0] == "min":
        return {"type": click.IntRange(min=kind[1])}
    if isinstance(kind, tuple):
        return {"type": click.Choice(list(kind))}
    hint = hints[f.name]
    return {"type": float if float in typing.get_args(hint) or hint is float else int}


def budget_options(command: Callable) -> Callable:
    """Add --vram-gb, --expert-slots, ... (every TierConfig field) to a click command; each arrives as a keyword
    named after its field, None when not given. Any of them selects the expert cache; without them every
    expert stays in memory."""
    hints = typing.get_type_hints(TierConfig)
    for f in reversed(fields(TierConfig)):
        default = f.default
        shown = "" if default is None or default is False else f" [default: {default}]"
        kw = {"default": None, **_click_type(f, hints)}
        command = click.option("--" + f.name.replace("_", "-"), f.name, cls=BudgetOption,
                               help=f"{f.metadata['help']}{shown}.", **kw)(command)
    return command


BUDGET_CLAUSE = ("Any of these selects the expert cache, which streams experts disk -> RAM -> device slots; "
                 "without them every expert stays in memory. --verify applies either way.")


class BudgetOption(click.Option):
    """A TierConfig flag: listed under the budget section of --help."""


class BudgetCommand(click.Command):
    """A command whose --help lists its budget flags in one section, with the clause they share said once."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = {False: [], True: []}
        for p in self.get_params(ctx):
            rec = p.get_help_record(ctx)
            if rec is not None:
                rows[isinstance(p, BudgetOption)].append(rec)
        with formatter.section("Options"):
            formatter.write_dl(rows[False])
        if rows[True]:
            with formatter.section("Budget options"):
                formatter.write_text(BUDGET_CLAUSE)
                formatter.write_paragraph()
                formatter.write_dl(rows[True])


def budget_from(flags: dict[str, Any]) -> dict[str, Any]:
    """The TierConfig fields among a command's parsed flags (None = not given; a False flag is not given)."""
    names = {f.name for f in fields(TierConfig)}
    return {k: (v or None) if isinstance(v, bool) else v for k, v in flags.items() if k in names}


def batch_options(command: Callable) -> Callable:
    """Add --max-batch, --kv-gb, ... (every BatchConfig field: the scheduler of `batch` and `serve`)."""
    from tiered.decode.options import BatchConfig

    hints = typing.get_type_hints(BatchConfig)
    for f in reversed(fields(BatchConfig)):
        kw = {"default": f.default, "show_default": f.default is not None, **_click_type(f, hints)}
        command = click.option("--" + f.name.replace("_", "-"), f.name, help=f.metadata["help"] + ".", **kw)(command)
    return command
