"""`tiered inspect`: sizes of a checkpoint (from its headers, no weights read) or of a layout."""
from __future__ import annotations

import math
from pathlib import Path

from tiered.families import FamilyError, read_checkpoint_config
from tiered.format import MANIFEST, read_safetensors_header
from tiered.store.disk import Layout, size_summary


def summarize(path: str | Path) -> dict:
    """Family, shape and parameter/byte counts of a layout or a Hugging Face checkpoint directory."""
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
            kind, _, layer, expert = fam.classify(name)
            if kind == "dense":
                dense_params += math.prod(ent.shape)
                dense_bytes += ent.nbytes
            elif kind == "expert" and layer == 0 and expert in (0, None):
                expert_bytes += ent.nbytes if expert == 0 else ent.nbytes // cfg.num_experts
    return {"kind": "checkpoint", **size_summary(cfg, None, dense_params, dense_bytes, expert_bytes)}
