"""Flags shared by several commands, derived from the dataclasses that define them.

Owns: `budget_options` (a click decorator adding one flag per `TierConfig` field, so a new budget option
is written once, in store/options.py), `budget_from` (the parsed flags -> the `budget` dict of `load()`),
`usage` and `fail` (exit 2 for usage errors, 1 for data errors).
Does not own: the options' meaning, defaults or validation (store/options.py).
"""
from __future__ import annotations

import os
import sys
import typing
from dataclasses import fields
from typing import Any, Callable

import click

from tiered.layout.quant import DENSE_STORAGE, EXPERT_STORAGE
from tiered.store.options import TierConfig

EXPERTS_HELP = ("Storage of the routed experts: as --dtype, bf16, or quantized (q8: int8 + bf16 scale per 128 "
                "inputs; q4: uint4 + bf16 scale and min per 64; fp8: e4m3 + fp32 scale per 128x128; mxfp4: e2m1 + "
                "e8m0 scale per 32). source keeps an fp8 or MXFP4 checkpoint's experts as stored")
DENSE_HELP = ("Storage of the dense matrices (attention and shared-expert projections, an untied lm_head); "
              "embeddings, norms and routers keep --dtype")

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
    if isinstance(kind, tuple) and kind and kind[0] == "auto-or-min":
        return {"type": AutoOrInt(kind[1], *(kind[2:3] or ()))}
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


class AutoOrInt(click.ParamType):
    """"auto" (or another of `words`) or an integer >= lo (returned as an int)."""

    def __init__(self, lo: int, words: tuple[str, ...] = ("auto",)) -> None:
        self.lo = lo
        self.words = tuple(words)
        self.name = "|".join(self.words) + "|N"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if value in self.words or (isinstance(value, int) and value >= self.lo):
            return value
        try:
            n = int(str(value))
        except ValueError:
            n = None
        if n is None or n < self.lo:
            self.fail(f"{value!r} is neither {' nor '.join(self.words)} nor an integer >= {self.lo}", param, ctx)
        return n


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


def storage_options(command: Callable) -> Callable:
    """Add --experts and --dense (layout storage) to a command that reads a model: they apply when -m is a
    checkpoint (its cached layout is keyed by them); a layout is used as stored."""
    command = click.option("--dense", type=click.Choice(list(DENSE_STORAGE)), default="source", show_default=True,
                           help=DENSE_HELP + "; when -m is a checkpoint.")(command)
    return click.option("--experts", type=click.Choice(list(EXPERT_STORAGE)), default="source", show_default=True,
                        help=EXPERTS_HELP + "; when -m is a checkpoint.")(command)


EXPERTS_PER_TOKEN_HELP = ("Route each token to K experts per layer instead of the model's top-k: faster, at a quality "
                          "cost that `tiered eval --experts-per-token K --reference SAME_MODEL` measures; the family's "
                          "rule picks and renormalises them [default: the model as trained]")


def experts_per_token_option(command: Callable) -> Callable:
    """Add --experts-per-token K (load(experts_per_token=K)) to a command that reads a model."""
    return click.option("--experts-per-token", "experts_per_token", type=click.IntRange(min=1), default=None,
                        metavar="K", help=EXPERTS_PER_TOKEN_HELP + ".")(command)


CPU_ACT_HELP = ("Inputs of q4 products on the CPU (--device cpu, and the CPU experts): float keeps them as given "
                "(fp32 sums, the torch reference's math); q8 rounds each group of 64 to 8 bits and multiplies in "
                "integers, as llama.cpp's Q4_0 x Q8_0 does: faster (prompts about 1.5-2x on AVX512-VNNI), with "
                "its own rounding error (`tiered eval` measures it). Sets TIERED_CPU_ACT for this process "
                "[default: TIERED_CPU_ACT, else float]")


def cpu_act_option(command: Callable) -> Callable:
    """Add --cpu-act {float,q8} to a command that loads a model; `apply_cpu_act` puts it in effect."""
    return click.option("--cpu-act", "cpu_act", type=click.Choice(["float", "q8"]), default=None,
                        help=CPU_ACT_HELP + ".")(command)


def apply_cpu_act(value: str | None) -> None:
    """--cpu-act: the native CPU kernel reads its activation mode from TIERED_CPU_ACT when it is first built
    (kernels/cpu_kernel.py `act_mode`), so the flag sets it for this process before the model is loaded."""
    if value is not None:
        os.environ["TIERED_CPU_ACT"] = value


def cpu_act_note(value: str | None, layout_path: Any) -> None:
    """After load: --cpu-act q8 on a layout without q4 weights changes nothing, so say so on stderr rather than
    let the stats' `-q8act` suggest it applied."""
    if value != "q8" or layout_path is None:
        return
    from tiered.store.disk import Layout

    man = Layout.open(layout_path).manifest
    schemes = {q["scheme"] for q in (man.dense_quant or {}).values()}
    if man.expert_format != "q4" and "q4" not in schemes:
        click.echo(f"tiered: --cpu-act q8 changes only q4 products, and {layout_path} has none (experts "
                   f"{man.expert_format}, dense {'+'.join(sorted(schemes)) or 'unquantized'}): it has no effect; "
                   "repack with --experts q4 (and --dense q4) to use it", err=True)


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
