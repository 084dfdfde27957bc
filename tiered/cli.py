"""The `tiered` command line: a thin click group that parses, calls and prints.

Commands that read a model take -m/--model (a layout or a Hugging Face checkpoint; default: the
embedded model). Usage errors exit 2 with a message that says what to do; data errors exit 1.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from tiered import __version__


def fail(msg: str, code: int = 1) -> None:
    click.echo(f"error: {msg}", err=True)
    sys.exit(code)


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
    """


@main.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Replace DST if it exists.")
@click.option("--dtype", type=click.Choice(["source", "bf16", "fp16", "fp32"]), default="source", show_default=True,
              help="Stored dtype of the weights that are not quantized.")
@click.option("--experts", type=click.Choice(["source", "bf16", "q8", "q4", "fp8", "mxfp4"]), default="source",
              show_default=True, help="Storage of the routed experts: as --dtype, bf16, or quantized "
              "(q8: int8 + bf16 scale per 128; q4: uint4 + bf16 scale and min per 64; fp8: e4m3 + fp32 scale per "
              "128x128; mxfp4: e2m1 + e8m0 scale per 32).")
@click.option("--dense", type=click.Choice(["source", "bf16", "q8", "q4"]), default="source", show_default=True,
              help="Storage of the dense matrices (attention and shared-expert projections, an untied lm_head); "
              "embeddings, norms and routers keep --dtype.")
@click.option("--q4-refine", type=click.Choice(["lsq", "none"]), default="lsq", show_default=True,
              help="q4 rounding: from each group's min/max, then a least-squares fit of scale and min (lsq), or "
              "min/max only (none).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON line.")
def repack(src: Path, dst: Path, force: bool, dtype: str, experts: str, dense: str, q4_refine: str,
           as_json: bool) -> None:
    """Rewrite a Hugging Face checkpoint SRC into an expert-contiguous layout DST.

    Every (layer, expert) block is 4 KiB-aligned with an xxh3 checksum; dense weights go to
    dense.safetensors; the manifest is written last and DST appears only when complete.

    \b
    Example:
      tiered repack ~/models/Mixtral-8x7B-v0.1 ~/layouts/mixtral --dtype bf16
      tiered repack ~/models/Qwen3-30B-A3B ~/layouts/qwen3-30b-q4 --experts q4 --dense q8
    """
    from tiered.families import FamilyError
    from tiered.format import LayoutError
    from tiered.repack import RepackError, repack as do_repack

    if dst.exists() and not force:
        fail(f"{dst} already exists: pass --force to replace it", 2)
    try:
        out = do_repack(src, dst, dtype=dtype, experts=experts, dense=dense, force=force, progress=True,
                        q4_refine=q4_refine)
    except (RepackError, FamilyError, LayoutError) as e:
        fail(str(e))
    msg = (f"repacked {out['blocks']} expert blocks of {out['block_size']} bytes: {out['bytes'] / 1e9:.3f} GB "
           f"in {out['seconds']:.1f} s ({out['mb_s']:.0f} MB/s) -> {out['dst']}")
    click.echo(json.dumps(out) if as_json else msg, err=not as_json)


@main.command()
@click.argument("layout", type=click.Path(path_type=Path))
def verify(layout: Path) -> None:
    """Recompute every checksum of LAYOUT; exit 1 naming the layer, expert, file and offset of a bad block.

    \b
    Example:
      tiered verify ~/layouts/mixtral
    """
    from tiered.format import LayoutError
    from tiered.repack import verify as do_verify

    try:
        problems = do_verify(layout)
    except LayoutError as e:
        fail(str(e))
    for p in problems:
        click.echo(str(p), err=True)
    if problems:
        fail(f"{len(problems)} corrupted block(s) in {layout}")
    click.echo(f"ok: {layout} verified")


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def inspect(path: Path, as_json: bool) -> None:
    """Show family, shape, parameter counts and bytes of a checkpoint or layout at PATH.

    "active" parameters are those one token uses: every dense weight (embeddings, lm_head,
    attention, norms, routers, shared experts) plus top-k routed experts per layer.

    \b
    Example:
      tiered inspect ~/models/Qwen3-30B-A3B
    """
    from tiered.families import FamilyError
    from tiered.format import LayoutError
    from tiered.inspect import summarize

    try:
        info = summarize(path)
    except (FamilyError, LayoutError) as e:
        fail(str(e))
    if as_json:
        click.echo(json.dumps(info))
        return
    gb = lambda b: f"{b / 1e9:.3f} GB" if b >= 1e8 else f"{b / 1e6:.2f} MB"
    rows = [
        ("kind", info["kind"]), ("family", info["family"]), ("layers", info["layers"]),
        ("experts per layer", info["experts"]), ("top-k", info["top_k"]),
        ("total params", f"{info['total_params'] / 1e9:.3f} B"),
        ("active params (dense + top-k experts)", f"{info['active_params'] / 1e9:.3f} B"),
        ("expert format", info.get("expert_format", "as stored")), ("dense format", info.get("dense_format", "as stored")),
        ("bytes per expert", f"{info['bytes_per_expert']:,}" + (f" (block {info['block_size']:,})" if info["block_size"] else "")),
        ("active expert bytes per token", gb(info["active_expert_bytes_per_token"]) +
         (f" ({gb(info['block_bytes_per_token'])} in whole blocks)" if info.get("block_bytes_per_token") else "")),
        ("all expert bytes", gb(info["expert_bytes"])), ("dense bytes", gb(info["dense_bytes"])),
    ]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{w}}  {v}")


from tiered.run_cli import run  # noqa: E402  (issue 3: the engine)

main.add_command(run)

from tiered.predict.trace_cli import trace  # noqa: E402  (issue 5: traces and predictors)
from tiered.predict.tune_cli import tune  # noqa: E402

main.add_command(trace)
main.add_command(tune)

from tiered.eval_cli import eval_cmd  # noqa: E402  (quality: perplexity, KL against a reference)

main.add_command(eval_cmd)


if __name__ == "__main__":
    main()
