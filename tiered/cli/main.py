"""The `tiered` command line: a thin click group that parses, calls and prints.

Commands that read a model take -m/--model (a layout or a Hugging Face checkpoint; default: the
embedded model). Usage errors exit 2 with a message that says what to do; data errors exit 1.
Each command lives in its own module of tiered/cli/; this one only groups them.
"""
from __future__ import annotations

import click

from tiered import __version__
from tiered.cli.batch import batch
from tiered.cli.cache import cache
from tiered.cli.inspect import inspect
from tiered.cli.repack import repack, verify
from tiered.cli.run import run
from tiered.cli.serve import serve
from tiered.cli.trace import trace
from tiered.cli.tune import tune


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="tiered")
def main() -> None:
    """Run Mixture-of-Experts models larger than GPU memory by streaming only the routed experts.

    \b
    Quick start:
      tiered run "def fibonacci(n):"           # the embedded model, on the CPU
      tiered repack ~/models/Qwen3-30B-A3B ~/layouts/qwen3-30b
      tiered inspect ~/layouts/qwen3-30b
      tiered run -m ~/layouts/qwen3-30b --device cuda --vram-gb 8 "Hello"
      tiered run -m Qwen/Qwen3-30B-A3B --chat "Hello"   # a Hugging Face id: cached, or downloaded
      tiered cache list                        # checkpoints repacked for -m, and their sizes
    """


for _command in (repack, verify, inspect, run, batch, serve, trace, tune, cache):
    main.add_command(_command)


if __name__ == "__main__":
    main()
