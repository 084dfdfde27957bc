"""The layout on disk: manifest schema, version, alignment, checksums and bounds checks.

Owns: the description of a layout directory (see layouts/FORMAT.md) and every check that a
manifest is consistent with the files beside it, plus a strict reader of safetensors headers.
Does not own: writing layouts (repack.py) or mapping them into memory (store/disk.py).
Both the offline repacker and the runtime reader go through this module.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import xxhash

from tiered.layout.config import ModelConfig

FORMAT_NAME = "tiered-layout"
FORMAT_VERSION = 1
ALIGN = 4096  # O_DIRECT and page-granular cudaHostRegister need 4 KiB-aligned offsets and sizes
TENSOR_ALIGN = 256  # each tensor inside a block starts 256-byte aligned (GPU-friendly loads)
MANIFEST = "manifest.json"
DENSE_FILE = "dense.safetensors"
EXPERTS_FILE = "experts.bin"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja", "tokenizer.model")

DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
    "int8": torch.int8, "uint8": torch.uint8, "int32": torch.int32, "float8_e4m3fn": torch.float8_e4m3fn,
}
ST_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "I8": "int8", "U8": "uint8",
             "I32": "int32", "F8_E4M3": "float8_e4m3fn", "F64": "float64", "I64": "int64", "BOOL": "bool"}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
ST_ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4, "I8": 1, "U8": 1, "I32": 4, "F8_E4M3": 1, "F64": 8, "I64": 8, "BOOL": 1}


class LayoutError(RuntimeError):
    """A layout or checkpoint file that is missing, truncated, corrupted or inconsistent."""


def align_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def xxh3_hex(data: Any) -> str:
    return xxhash.xxh3_64(data).hexdigest()


@dataclass(frozen=True)
class TensorSpec:
    """One tensor inside an expert block. The same specs hold for every block of a layout.

    `role` is what the model uses it for (gate/up/down); `name` is unique within the block. A
    quantized format keeps role "gate" for the packed ints and adds e.g. name "gate.scales" with
    role "gate.scales" and `quant` describing the scheme, so no format version change is needed.
    """

    name: str
    role: str
    dtype: str  # key of DTYPES
    shape: tuple[int, ...]
    offset: int  # bytes from the block start
    nbytes: int
    quant: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        d = {"name": self.name, "role": self.role, "dtype": self.dtype, "shape": list(self.shape),
             "offset": self.offset, "nbytes": self.nbytes}
        if self.quant:
            d["quant"] = self.quant
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TensorSpec":
        return cls(d["name"], d["role"], d["dtype"], tuple(d["shape"]), int(d["offset"]), int(d["nbytes"]), d.get("quant"))


def plan_block(tensors: dict[str, tuple[tuple[int, ...], str]]) -> tuple[list[TensorSpec], int]:
    """Place the tensors of one expert (role -> (shape, dtype)) back to back.

    Returns their specs and the block size, rounded up to 4 KiB.
    """
    specs, off = [], 0
    for role, (shape, dtype) in tensors.items():
        n = torch.empty((), dtype=DTYPES[dtype]).element_size()
        for s in shape:
            n *= s
        specs.append(TensorSpec(role, role, dtype, tuple(shape), off, n))
        off = align_up(off + n, TENSOR_ALIGN)
    return specs, align_up(off, ALIGN)


@dataclass(frozen=True)
class Manifest:
    """The parsed manifest.json of a layout directory."""

    config: ModelConfig
    block_size: int  # bytes per (layer, expert) block
    tensors: tuple[TensorSpec, ...]  # layout of every block
    offsets: tuple[int, ...]  # [L*E] block offsets in experts.bin, row = layer*E + expert
    checksums: tuple[str, ...]  # [L*E] xxh3_64 hex of each whole block (padding included)
    experts_size: int  # bytes of experts.bin
    dense_size: int  # bytes of dense.safetensors
    dense_xxh3: str
    raw: dict[str, Any]

    def row(self, layer: int, expert: int) -> int:
        c = self.config
        if not (0 <= layer < c.num_layers and 0 <= expert < c.num_experts):
            raise IndexError(f"expert (layer {layer}, expert {expert}) outside {c.num_layers} layers × {c.num_experts} experts")
        return layer * c.num_experts + expert

    @property
    def uniform_stride(self) -> bool:
        """Blocks sit back to back from offset 0, so experts.bin is one [L*E, block_size] array."""
        return all(o == i * self.block_size for i, o in enumerate(self.offsets))


def build_manifest(cfg: ModelConfig, specs: list[TensorSpec], block_size: int, checksums: list[str],
                   dense_size: int, dense_xxh3: str, source: dict[str, Any]) -> dict[str, Any]:
    c = cfg
    blocks = [{"layer": l, "expert": e, "offset": (l * c.num_experts + e) * block_size, "size": block_size,
               "xxh3_64": checksums[l * c.num_experts + e]}
              for l in range(c.num_layers) for e in range(c.num_experts)]
    return {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "alignment": ALIGN,
        "config": cfg.to_json(), "source": source,
        "dense": {"file": DENSE_FILE, "size": dense_size, "xxh3_64": dense_xxh3},
        "experts": {"file": EXPERTS_FILE, "size": block_size * len(blocks), "block_size": block_size,
                    "tensors": [s.to_json() for s in specs], "blocks": blocks},
    }


def read_manifest(layout_dir: Path) -> Manifest:
    """Parse and check a manifest against the files beside it (sizes, offsets, alignment).

    Raises LayoutError naming the file and what to do; checksums are checked by `verify`, not here.
    """
    d = Path(layout_dir)
    mpath = d / MANIFEST
    if not mpath.is_file():
        if (d / "config.json").is_file():
            raise LayoutError(f"{d} is a Hugging Face checkpoint, not a tiered layout: run it directly "
                              f"(`tiered run -m {d}` repacks it into the cache), or repack it into a new "
                              f"directory with `tiered repack {d} NEW_DIR`")
        raise LayoutError(f"{d} has no {MANIFEST}: it is not a tiered layout (make one from a Hugging Face "
                          f"checkpoint with `tiered repack CHECKPOINT NEW_DIR`)")
    try:
        raw = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LayoutError(f"{mpath} is corrupted ({e}): re-run `tiered repack SRC {d} --force`") from None
    if raw.get("format") != FORMAT_NAME:
        raise LayoutError(f"{mpath} is not a tiered manifest (format={raw.get('format')!r})")
    if raw.get("version") != FORMAT_VERSION:
        raise LayoutError(f"{mpath} has layout version {raw.get('version')}, this tiered reads version "
                          f"{FORMAT_VERSION}: re-run `tiered repack` with this version")
    try:
        cfg = ModelConfig.from_json(raw["config"])
        ex = raw["experts"]
        bs = int(ex["block_size"])
        specs = tuple(TensorSpec.from_json(t) for t in ex["tensors"])
        blocks = ex["blocks"]
        order = {(b["layer"], b["expert"]): b for b in blocks}
        rows = [order[(l, e)] for l in range(cfg.num_layers) for e in range(cfg.num_experts)]
        man = Manifest(cfg, bs, specs, tuple(int(b["offset"]) for b in rows), tuple(str(b["xxh3_64"]) for b in rows),
                       int(ex["size"]), int(raw["dense"]["size"]), str(raw["dense"]["xxh3_64"]), raw)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise LayoutError(f"{mpath} is malformed ({type(e).__name__}: {e}): the layout is corrupt; "
                          f"re-run `tiered repack SRC {d} --force`") from None
    _check_specs(mpath, man)
    _check_bounds(d, man)
    return man


def _check_specs(mpath: Path, man: Manifest) -> None:
    """Each block tensor's shape and dtype must account for exactly its byte count (else views would not fit)."""
    for s in man.tensors:
        if s.dtype not in DTYPES:
            raise LayoutError(f"{mpath}: tensor {s.name} has dtype {s.dtype!r}, which this tiered cannot read "
                              f"(known: {', '.join(DTYPES)}): the manifest is corrupt or from a newer tiered")
        if not all(isinstance(n, int) and n >= 0 for n in s.shape):
            raise LayoutError(f"{mpath}: tensor {s.name} has shape {list(s.shape)}: the manifest is corrupt; "
                              f"re-run `tiered repack SRC {mpath.parent} --force`")
        want = math.prod(s.shape) * DTYPES[s.dtype].itemsize
        if want != s.nbytes:
            raise LayoutError(f"{mpath}: tensor {s.name} has shape {list(s.shape)} of {s.dtype} ({want} bytes) but "
                              f"nbytes {s.nbytes}: the manifest is corrupt; re-run `tiered repack SRC "
                              f"{mpath.parent} --force`")


def _check_bounds(d: Path, man: Manifest) -> None:
    if man.block_size % ALIGN:
        raise LayoutError(f"{d / MANIFEST}: block_size {man.block_size} is not a multiple of {ALIGN}")
    for s in man.tensors:
        if s.offset + s.nbytes > man.block_size or s.offset % 64:
            raise LayoutError(f"{d / MANIFEST}: tensor {s.name} at {s.offset}+{s.nbytes} does not fit block size {man.block_size}")
    for path, want in ((d / EXPERTS_FILE, man.experts_size), (d / DENSE_FILE, man.dense_size)):
        if not path.is_file():
            raise LayoutError(f"{path} is missing: the layout is incomplete; re-run `tiered repack SRC {d} --force`")
        got = path.stat().st_size
        if got != want:
            raise LayoutError(f"{path} is {got} bytes, the manifest says {want}: the file is truncated or "
                              f"was replaced; re-run `tiered repack SRC {d} --force`")
    for i, off in enumerate(man.offsets):
        if off < 0 or off % ALIGN or off + man.block_size > man.experts_size:
            l, e = divmod(i, man.config.num_experts)
            raise LayoutError(f"{d / EXPERTS_FILE}: block of layer {l}, expert {e} at offset {off} is misaligned or "
                              f"outside the file ({man.experts_size} bytes)")


@dataclass(frozen=True)
class StEntry:
    """One tensor of a safetensors file, located in the file."""

    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute file offset of the first byte
    nbytes: int


def read_safetensors_header(path: Path) -> tuple[dict[str, StEntry], dict[str, str]]:
    """Parse a safetensors header and check every tensor lies inside the file.

    Returns (entries by name, __metadata__). Raises LayoutError for a truncated file or a header
    whose offsets point outside the file — before any tensor is read.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise LayoutError(f"{path} is truncated ({size} bytes): not a safetensors file; re-download it")
            (hlen,) = struct.unpack("<Q", head)
            if hlen > size - 8 or hlen > 100 * 2**20:
                raise LayoutError(f"{path}: header length {hlen} exceeds the file size {size}: the file is truncated "
                                  f"or corrupted; re-download it")
            header = json.loads(f.read(hlen))
    except FileNotFoundError:
        raise LayoutError(f"{path} is missing: the checkpoint is incomplete (a shard named in the index is "
                          f"absent); re-download it") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LayoutError(f"{path}: the safetensors header is not valid JSON ({e}): the file is corrupted") from None
    meta = header.pop("__metadata__", {}) or {}
    base = 8 + hlen
    out = {}
    for name, t in header.items():
        dt, shape, (b, e) = t["dtype"], tuple(t["shape"]), t["data_offsets"]
        n = ST_ITEMSIZE.get(dt, 1)
        for s in shape:
            n *= s
        if e - b != n or b < 0:
            raise LayoutError(f"{path}: tensor {name} has offsets [{b}, {e}) for {n} bytes of {dt}{list(shape)}: "
                              f"the header is corrupted")
        if base + e > size:
            raise LayoutError(f"{path}: tensor {name} ends at byte {base + e}, past the end of the file ({size} bytes): "
                              f"the file is truncated; re-download it")
        out[name] = StEntry(name, dt, shape, base + b, n)
    return out, meta


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
