"""The disk tier's base: a layout directory mapped into memory, with zero-copy expert views.

Owns: `Layout` (open + check a layout, mmap of experts.bin and dense.safetensors, views of any
expert's tensors with no copy) and `expert_views` (the same strided views over any pool of
blocks: the mmap, a device copy, or a slot pool). Does not own: caching, O_DIRECT reads,
pinning or device copies (store/io.py, ram.py, vram.py, cache.py).

Views over the mmap are read-only memory: torch warns that the tensor is not writable, which
is expected here. Never write through them.
"""
from __future__ import annotations

import json
import math
import mmap
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from tiered.layout.config import ModelConfig
from tiered.layout.format import DENSE_FILE, DTYPES, EXPERTS_FILE, ST_DTYPES, LayoutError, Manifest, TensorSpec, \
    assemble, check_quant, read_manifest, read_safetensors_header
from tiered.layout.quant import QuantWeight


@dataclass(frozen=True)
class ExpertWeights:
    """Routed-expert weights as [S, ...] views over a pool of S blocks (S = slots or L*E rows).

    Each is a tensor in the stored dtype, or for a quantized layout a QuantWeight over views of its packed
    codes and scales (same indexing; `.dequantize(dtype)` gives the dense [..., F, D] tensor).
    """

    gate: torch.Tensor | QuantWeight  # [S, F, D]
    up: torch.Tensor | QuantWeight  # [S, F, D]
    down: torch.Tensor | QuantWeight  # [S, D, F]
    gate_bias: torch.Tensor | None = None  # [S, F] (gpt-oss; biases are never quantized)
    up_bias: torch.Tensor | None = None  # [S, F]
    down_bias: torch.Tensor | None = None  # [S, D]


def expert_views(pool: torch.Tensor, specs: tuple[TensorSpec, ...] | list[TensorSpec]) -> ExpertWeights:
    """Strided views of the gate/up/down weights of every block in `pool` (uint8 [S, block_size]); no copy."""
    if pool.dtype != torch.uint8 or pool.dim() != 2:
        raise ValueError(f"pool must be uint8 [S, block_size], got {pool.dtype} {list(pool.shape)}")
    views = {}
    for s in specs:
        dt = DTYPES[s.dtype]
        raw = pool[:, s.offset:s.offset + s.nbytes]  # [S, nbytes], row stride = block_size
        views[s.name] = raw.view(dt).view(pool.shape[0], *s.shape)
    w = {s.role: assemble(s.name, s.quant, views) for s in specs if s.role in ("gate", "up", "down")}
    b = {s.role: views[s.name] for s in specs if s.role in ("gate_bias", "up_bias", "down_bias")}
    return ExpertWeights(w["gate"], w["up"], w["down"], b.get("gate_bias"), b.get("up_bias"), b.get("down_bias"))


def _readonly_frombuffer(buf, dtype: torch.dtype) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.frombuffer(buf, dtype=dtype)


class Layout:
    """An opened layout directory. Cheap to open: nothing is read but the manifest and headers."""

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.path = path
        self.manifest = manifest
        self.config: ModelConfig = manifest.config
        self.block_size: int = manifest.block_size
        self.tensor_specs: tuple[TensorSpec, ...] = manifest.tensors

    @classmethod
    def open(cls, path: str | Path) -> "Layout":
        """Open and check a layout (manifest, file sizes, offsets). Raises LayoutError."""
        p = Path(path)
        return cls(p, read_manifest(p))

    @property
    def experts_path(self) -> Path:
        return self.path / EXPERTS_FILE

    @cached_property
    def _experts_map(self) -> mmap.mmap:
        with open(self.experts_path, "rb") as f:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def expert_file_pool(self) -> torch.Tensor:
        """uint8 [L*E, block_size] over the mmap of experts.bin (row = layer*E + expert); no copy."""
        if not self.manifest.uniform_stride:
            raise LayoutError(f"{self.experts_path}: blocks are not back to back; this reader needs a "
                              f"layout written by `tiered repack`")
        c = self.config
        flat = _readonly_frombuffer(self._experts_map, torch.uint8)
        return flat.view(c.num_layers * c.num_experts, self.block_size)

    def block_offset(self, layer: int, expert: int) -> tuple[Path, int, int, str]:
        """(file, offset, size, xxh3_64 hex) of one expert block."""
        row = self.manifest.row(layer, expert)
        return self.experts_path, self.manifest.offsets[row], self.block_size, self.manifest.checksums[row]

    def block_bytes(self, layer: int, expert: int) -> memoryview:
        """The whole block of one expert, zero-copy over the mmap."""
        _, off, size, _ = self.block_offset(layer, expert)
        return memoryview(self._experts_map)[off:off + size]

    def expert_tensors(self, layer: int, expert: int) -> dict[str, torch.Tensor | QuantWeight]:
        """{"gate", "up", "down"} of one expert as views into the mmap (QuantWeights when quantized); no copy."""
        block = _readonly_frombuffer(self.block_bytes(layer, expert), torch.uint8)
        views = {s.name: block[s.offset:s.offset + s.nbytes].view(DTYPES[s.dtype]).view(s.shape)
                 for s in self.tensor_specs}
        return {s.role: assemble(s.name, s.quant, views) for s in self.tensor_specs
                if s.role in ("gate", "up", "down")}

    def dense(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor | QuantWeight]:
        """Dense weights by canonical name, in their stored dtype (QuantWeights for quantized matrices, their
        parts under the weight's name); zero-copy views when device is CPU."""
        path = self.path / DENSE_FILE
        entries, _ = read_safetensors_header(path)
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        flat = _readonly_frombuffer(mm, torch.uint8)
        out = {}
        for name, ent in entries.items():
            t = flat[ent.start:ent.start + ent.nbytes].view(DTYPES[ST_DTYPES[ent.dtype]]).view(ent.shape)
            out[name] = t if torch.device(device).type == "cpu" else t.to(device)
        quant = self.manifest.dense_quant or {}
        stored = {n: (tuple(e.shape), ST_DTYPES[e.dtype]) for n, e in entries.items()}
        for name, q in quant.items():
            if name not in stored:
                raise LayoutError(f"{path}: quantized weight {name} named in the manifest is missing: "
                                  f"re-run `tiered repack`")
            check_quant(q, stored[name], stored, f"{path}: dense weight {name}")
            out[name] = assemble(name, q, out)
        for q in quant.values():
            for part in ("scale", "min"):
                out.pop(q.get(part, ""), None)
        return out

    @property
    def tokenizer_path(self) -> Path | None:
        p = self.path / "tokenizer.json"
        return p if p.is_file() else None

    @cached_property
    def tokenizer_config(self) -> dict:
        p = self.path / "tokenizer_config.json"
        return json.loads(p.read_text()) if p.is_file() else {}

    def summary(self) -> dict:
        """Sizes for `tiered inspect`."""
        entries, _ = read_safetensors_header(self.path / DENSE_FILE)
        quant = self.manifest.dense_quant or {}
        parts = {q[p] for q in quant.values() for p in ("scale", "min") if p in q}
        params = sum(math.prod(quant[n]["shape"]) if n in quant else math.prod(e.shape)
                     for n, e in entries.items() if n not in parts)
        out = size_summary(self.config, self.block_size, params, sum(e.nbytes for e in entries.values()),
                           sum(s.nbytes for s in self.tensor_specs))
        schemes = sorted({q["scheme"] for q in quant.values()})
        out.update({"expert_format": self.manifest.expert_format,
                    "dense_format": "+".join(schemes) if schemes else "unquantized",
                    "dense_quantized": sorted(quant),
                    "block_bytes_per_token": self.config.num_layers * self.config.top_k * self.block_size})
        return out


def size_summary(cfg: ModelConfig, block_size: int | None, dense_params: int, dense_bytes: int,
                 expert_bytes: int) -> dict:
    """Parameter and byte counts shared by `inspect` on layouts and checkpoints.

    "active" parameters count everything a token touches: all dense weights (embeddings, lm_head,
    attention or DeltaNet, norms, routers, shared experts) plus top_k routed experts in every layer.
    The KV cache grows by `kv_cache_bytes_per_token` per token (K and V of attention layers, the latent of MLA
    layers); dense first layers (DeepSeek-V3) count their MLP as dense and no experts; DeltaNet layers
    keep `linear_state_bytes_per_sequence`, whatever the context length.
    """
    c = cfg
    moe_layers = c.num_layers - c.first_moe_layer  # dense first layers (DeepSeek-V3) have no experts
    expert_total = moe_layers * c.num_experts * c.expert_params
    return {
        "family": c.family, "layers": c.num_layers, "experts": c.num_experts, "top_k": c.top_k,
        "moe_layers": moe_layers,
        "total_params": dense_params + expert_total,
        "active_params": dense_params + moe_layers * c.top_k * c.expert_params,
        "bytes_per_expert": expert_bytes, "block_size": block_size,
        "active_expert_bytes_per_token": moe_layers * c.top_k * expert_bytes,
        "expert_bytes": moe_layers * c.num_experts * expert_bytes,
        "dense_bytes": dense_bytes,
        # per-sequence state, at 2-byte (bf16) KV and conv entries; the DeltaNet recurrent state is fp32
        "layer_kinds": {k: sum(c.layer_kind(l) == k for l in range(c.num_layers))
                        for k in ("attention", "linear", "mla") if k != "mla" or c.num_mla_layers},
        "kv_cache_bytes_per_token": c.kv_bytes_per_token(2),
        "linear_state_bytes_per_sequence": c.state_bytes_per_sequence(2),
    }
