"""The layout cache: checkpoints repacked for `run -m CHECKPOINT`, under $XDG_CACHE_HOME/tiered.

Owns: where the cache is (`cache_root`), the key of a checkpoint's cached layout (`cache_key`: the source path,
its files' sizes and mtimes, the repack dtype and the tiered version), what the cache holds (`list_cached`:
each entry's source, size and whether it is current, stale, orphaned or an interrupted repack), older copies of
one source (`stale_copies`) and removal (`remove`). Removal only ever deletes directories that this module lists
as entries of the cache, never anything outside it.
Does not own: repacking (repack.py) or deciding when to repack (repack.ensure_layout).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from tiered import __version__

MANIFEST = "manifest.json"
PARTIAL = ".tiered-partial"


def cache_root() -> Path:
    """$XDG_CACHE_HOME/tiered, or ~/.cache/tiered."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tiered"


def cache_key(source: Path, dtype: str, *, experts: str = "source", dense: str = "source") -> str:
    """The cache directory name of `source` repacked with `dtype` (and --experts/--dense storage): NAME-HASH (a
    changed checkpoint or other repack options get a new key)."""
    src = Path(source).resolve()
    h = hashlib.sha256(str(src).encode())
    for p in sorted(src.iterdir()):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    h.update(f"dtype={dtype};v={__version__}".encode())
    if (experts, dense) != ("source", "source"):  # keeps the keys of layouts cached before these options
        h.update(f"experts={experts};dense={dense};".encode())
    method = _quant_method(src)
    if method and "source" in (experts, dense):
        # quantized checkpoints (gpt-oss MXFP4, DeepSeek FP8) now keep their format under `source`, where earlier
        # versions dequantized them: their copies from before get a new key instead of being reused
        h.update(f"source-quant={method};pass-through;".encode())
    return f"{display_name(src)}-{h.hexdigest()[:16]}"


def _quant_method(src: Path) -> str | None:
    """config.json's quantization_config.quant_method (e.g. mxfp4, fp8), or None (also when unreadable)."""
    try:
        cfg = json.loads((src / "config.json").read_text())
    except (OSError, ValueError):
        return None
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    return str(qc.get("quant_method") or "unknown") if isinstance(qc, dict) else None


def display_name(src: Path) -> str:
    """The checkpoint's name: the directory name, or OWNER--NAME for a Hugging Face hub snapshot."""
    parts = src.parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3].removeprefix("models--")
    return src.name


@dataclass(frozen=True)
class CachedLayout:
    key: str  # directory name under the cache root
    path: Path
    source: str | None  # the checkpoint it was repacked from (manifest), None when unreadable
    dtype: str | None  # the repack --dtype option
    bytes: int  # disk use of the directory
    state: str  # "current", "stale" (the source changed since), "orphaned" (source gone), "partial", "damaged"

    def to_json(self) -> dict:
        return {"key": self.key, "path": str(self.path), "source": self.source, "dtype": self.dtype,
                "bytes": self.bytes, "state": self.state}


def _du(path: Path) -> int:
    total = 0
    for p in path.rglob("*"):
        try:
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
        except OSError:
            pass
    return total


def _entry(d: Path) -> CachedLayout:
    if d.name.startswith(".") and d.name.endswith(PARTIAL):
        return CachedLayout(d.name, d, None, None, _du(d), "partial")
    try:
        man = json.loads((d / MANIFEST).read_text())
        src = man["source"]["path"]
        dtype = man["source"].get("dtype_option", "source")
    except (OSError, ValueError, KeyError, TypeError):
        return CachedLayout(d.name, d, None, None, _du(d), "damaged")
    if not Path(src).is_dir():
        state = "orphaned"
    else:
        try:
            state = "current" if cache_key(Path(src), dtype) == d.name else "stale"
        except OSError:
            state = "orphaned"
    return CachedLayout(d.name, d, src, dtype, _du(d), state)


def list_cached(root: Path | None = None) -> list[CachedLayout]:
    """Every layout directory in the cache (and interrupted repacks), by key."""
    root = root or cache_root()
    if not root.is_dir():
        return []
    return [_entry(d) for d in sorted(root.iterdir(), key=lambda p: p.name.lstrip(".")) if d.is_dir()]


def stale_copies(source: Path, dtype: str, key: str, root: Path | None = None) -> list[CachedLayout]:
    """Cached layouts of the same source and dtype under another key (made before the checkpoint changed)."""
    src = str(Path(source).resolve())
    return [e for e in list_cached(root) if e.source == src and e.dtype == dtype and e.key != key]


def remove(keys: list[str] | None = None, *, everything: bool = False, root: Path | None = None) -> list[CachedLayout]:
    """Delete the named cache entries (or all of them); returns what was removed. Unknown keys raise KeyError."""
    entries = {e.key: e for e in list_cached(root)}
    if everything:
        chosen = list(entries.values())
    else:
        unknown = [k for k in keys or [] if k not in entries]
        if unknown:
            raise KeyError(", ".join(unknown))
        chosen = [entries[k] for k in keys or []]
    for e in chosen:
        shutil.rmtree(e.path)
    return chosen
