"""`tiered inspect`: sizes of a checkpoint (from its headers, no weights read) or of a layout.

Owns: `summarize` and the click command that prints it.
"""
from __future__ import annotations

import json
import re
import math
from pathlib import Path

import click

from tiered.cli.options import fail

from tiered.layout.families import FamilyError, read_checkpoint_config


def summarize(path: str | Path) -> dict:
    """Family, shape and parameter/byte counts of a layout or a Hugging Face checkpoint directory."""
    from tiered.layout.format import MANIFEST, read_safetensors_header  # torch: imported on use, so --help stays fast
    from tiered.store.disk import Layout, size_summary

    p = Path(path)
    if (p / MANIFEST).is_file():
        return {"kind": "layout", **Layout.open(p).summary()}
    if not (p / "config.json").is_file():
        raise FamilyError(f"{p} is neither a tiered layout (no {MANIFEST}) nor a Hugging Face checkpoint (no config.json)")
    fam, cfg, _ = read_checkpoint_config(p)
    dense_params = dense_bytes = expert_bytes = 0
    for shard in sorted(p.glob("*.safetensors")):
        entries, _ = read_safetensors_header(shard)
        for name, ent in entries.items():
            m = re.match(r"(?:model\.(?:language_model\.)?)?layers\.(\d+)\.", name)
            if m and int(m[1]) >= cfg.num_layers:  # multi-token prediction layers: not run, not counted
                continue
            scale = name.endswith(".weight_scale_inv")  # an fp8 weight's block scales: bytes, not parameters
            kind, _, layer, expert = fam.classify(name[:-len("_scale_inv")] if scale else name)
            if kind == "dense":
                dense_params += 0 if scale else math.prod(ent.shape)
                dense_bytes += ent.nbytes
            elif kind == "expert" and layer == cfg.first_moe_layer and expert in (0, None):
                expert_bytes += ent.nbytes if expert == 0 else ent.nbytes // cfg.num_experts
    return {"kind": "checkpoint", **size_summary(cfg, None, dense_params, dense_bytes, expert_bytes)}


@click.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def inspect(path: Path, as_json: bool) -> None:
    """Show family, shape, parameter counts and bytes of a checkpoint or layout at PATH.

    "active" parameters are those one token uses: every dense weight (embeddings, lm_head,
    attention, norms, routers, shared experts) plus top-k routed experts per layer. The KV cache grows
    by its bytes per token (attention layers); DeltaNet layers keep a fixed state per sequence.

    \b
    Example:
      tiered inspect ~/models/Qwen3-30B-A3B
    """
    from tiered.layout.format import LayoutError

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
        ("layers: attention / linear (DeltaNet)", "{attention} / {linear}".format(**info["layer_kinds"])),
        ("KV cache bytes per token (bf16)", f"{info['kv_cache_bytes_per_token']:,}"),
        ("DeltaNet state bytes per sequence", f"{info['linear_state_bytes_per_sequence']:,}"),
    ]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{w}}  {v}")
