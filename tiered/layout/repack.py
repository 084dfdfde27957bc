"""Checkpoint → layout: stream a Hugging Face checkpoint into tiered's expert-contiguous layout.

Owns: `repack(src, dst)` (streaming, atomic, resumable by restart), `ensure_layout(path)` (the
per-checkpoint layout cache, docs/cli.md) and `verify(layout)`. Nothing here runs at inference time;
`run` imports it lazily only when handed a checkpoint instead of a layout.

Memory: tensors are read with `os.preadv` straight into reusable block buffers (no whole-model
load, no per-tensor allocation unless the dtype changes), and dense tensors are streamed in
chunks, so peak anonymous memory stays at a few block sizes plus one 64 MiB chunk.
"""
from __future__ import annotations

import errno
import json
import os
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import xxhash

from tiered import __version__
from tiered.layout.config import EXPERT_ROLES, FUSED_EXPERT_ROLES, ModelConfig
from tiered.layout.families import Family, FamilyError, read_checkpoint_config
from tiered.layout.format import (ALIGN, DENSE_FILE, DTYPES, EXPERTS_FILE, FORMAT_NAME, MANIFEST, ST_DTYPES,
                                  ST_ITEMSIZE, ST_NAMES, TOKENIZER_FILES, LayoutError, StEntry, build_manifest,
                                  fsync_dir, plan_block, read_manifest, read_safetensors_header, xxh3_hex)

CHUNK = 64 * 2**20  # dense tensors are copied in pieces of at most this many bytes
PAUSE_ENV = "TIERED_REPACK_PAUSE_AFTER_BLOCKS"  # test hook: stop (sleep) after N expert blocks


class RepackError(RuntimeError):
    """The repack cannot proceed; the message says why and what to do."""


@dataclass(frozen=True)
class SourceTensor:
    path: Path  # the shard
    entry: StEntry  # where its bytes are
    expert: int | None  # for a fused [E, ...] expert tensor: None (slice per expert)


def _index_source(src: Path, fam: Family, cfg: ModelConfig):
    """Map every tensor of the checkpoint to its role; check shards and completeness before writing."""
    idx = src / "model.safetensors.index.json"
    if idx.is_file():
        weight_map = json.loads(idx.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    else:
        shards = sorted(p.name for p in src.glob("*.safetensors"))
        if not shards:
            raise RepackError(f"{src} has no *.safetensors files and no model.safetensors.index.json: "
                              f"tiered repacks safetensors checkpoints only")
    dense: dict[str, SourceTensor] = {}
    experts: dict[tuple[int, int | None, str], SourceTensor] = {}
    skipped: list[str] = []
    for shard in shards:
        path = src / shard
        if not path.is_file():
            raise RepackError(f"shard {path} is listed in {idx.name} but missing: the checkpoint is incomplete; "
                              f"re-download it")
        entries, _ = read_safetensors_header(path)
        for name, ent in entries.items():
            kind, role, layer, expert = fam.classify(name)
            if kind == "dense":
                dense[role] = SourceTensor(path, ent, None)
            elif kind == "expert":
                experts[(layer, expert, role)] = SourceTensor(path, ent, expert)
            else:
                skipped.append(name)
    missing = [n for n in fam.expected_dense(cfg) if n not in dense]
    if missing:
        raise RepackError(f"{src}: dense tensors missing for {missing[:5]}{' ...' if len(missing) > 5 else ''}: "
                          f"the checkpoint is incomplete or does not match {fam.path.name}")
    return dense, experts, sorted(skipped)


def _expert_source(experts, layer: int, expert: int, role: str) -> tuple[SourceTensor, int, tuple[int, ...]]:
    """(tensor, byte offset in its file, per-expert shape) of one expert's role, fused or not."""
    st = experts.get((layer, expert, role))
    if st is not None:
        return st, st.entry.start, st.entry.shape
    st = experts.get((layer, None, role))
    if st is None:
        fused = _fused_source(experts, layer, expert, role)
        if fused is not None:
            return fused
        raise RepackError(f"expert tensor missing: layer {layer}, expert {expert}, role {role}: "
                          f"the checkpoint is incomplete")
    per = st.entry.nbytes // st.entry.shape[0]
    return st, st.entry.start + expert * per, st.entry.shape[1:]


def _fused_source(experts, layer: int, expert: int, role: str) -> tuple[SourceTensor, int, tuple[int, ...]] | None:
    """Role `role` of one expert inside a fused tensor holding several roles along its first per-expert dim
    (gate_up_proj [E, 2F, D]: gate rows, then up rows): the part is contiguous, so it is a byte range."""
    for fused, roles in FUSED_EXPERT_ROLES.items():
        if role not in roles:
            continue
        st = experts.get((layer, expert, fused)) or experts.get((layer, None, fused))
        if st is None:
            continue
        whole = st.entry.shape if st.expert is not None else st.entry.shape[1:]  # this expert's [n*F, ...]
        if whole[0] % len(roles):
            raise RepackError(f"{st.path}: fused {fused} of layer {layer} has {whole[0]} rows, not a multiple of "
                              f"{len(roles)}: cannot split it into {roles}")
        per_expert = st.entry.nbytes // (1 if st.expert is not None else st.entry.shape[0])
        part = per_expert // len(roles)
        start = st.entry.start + (0 if st.expert is not None else expert * per_expert) + roles.index(role) * part
        return st, start, (whole[0] // len(roles), *whole[1:])
    return None


class _Reader:
    """Open shard files once; read byte ranges into caller buffers."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def read_into(self, path: Path, offset: int, out: memoryview) -> None:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        got = 0
        while got < len(out):
            n = os.preadv(fd, [out[got:]], offset + got)
            if n <= 0:
                raise RepackError(f"{path}: short read at offset {offset + got} (file changed or truncated during repack)")
            got += n

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _convert(raw: memoryview, src_dt: str, dst_dt: str) -> bytes | memoryview:
    """Bytes of src dtype → bytes of dst dtype (identity when equal, which keeps the bytes bit-identical)."""
    if src_dt == dst_dt or not len(raw):
        return raw
    t = torch.frombuffer(raw, dtype=DTYPES[ST_DTYPES[src_dt]])
    return t.to(DTYPES[ST_DTYPES[dst_dt]]).view(torch.uint8).numpy().tobytes()


def _target(src_dt: str, dtype: str) -> str:
    """safetensors dtype code written for a source code under --dtype (floats only are converted)."""
    if dtype == "source" or src_dt not in ("BF16", "F16", "F32"):
        return src_dt
    return {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}[dtype]


def _write_dense(path: Path, dense: dict[str, SourceTensor], dtype: str, rd: _Reader, tick: Callable[[int], None]) -> str:
    """Stream dense tensors into one safetensors file (header first, then data in chunks)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "writer": f"tiered {__version__}"}}
    plan, off = [], 0
    # widest dtypes first: every tensor then starts aligned to its item size (safetensors allows no gaps)
    for name in sorted(dense, key=lambda n: (-ST_ITEMSIZE[_target(dense[n].entry.dtype, dtype)], n)):
        ent = dense[name].entry
        dt = _target(ent.dtype, dtype)
        n = ent.nbytes // ST_ITEMSIZE[ent.dtype] * ST_ITEMSIZE[dt]
        header[name] = {"dtype": dt, "shape": list(ent.shape), "data_offsets": [off, off + n]}
        plan.append((dense[name], dt))
        off += n
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    hbytes += b" " * (-(8 + len(hbytes)) % ALIGN)  # data starts 4 KiB-aligned
    h = xxhash.xxh3_64()
    with open(path, "wb") as f:
        for piece in (len(hbytes).to_bytes(8, "little"), hbytes):
            f.write(piece)
            h.update(piece)
        buf = bytearray(CHUNK)
        for st, dt in plan:
            ent, item = st.entry, ST_ITEMSIZE[st.entry.dtype]
            step = CHUNK // item * item
            for pos in range(0, ent.nbytes, step):
                n = min(step, ent.nbytes - pos)
                view = memoryview(buf)[:n]
                rd.read_into(st.path, ent.start + pos, view)
                out = _convert(view, ent.dtype, dt)
                f.write(out)
                h.update(out)
                tick(len(out))
        f.flush()
        os.fsync(f.fileno())
    return h.hexdigest()


class _BlockWriter:
    """Writes filled block buffers on a second thread, so reading/hashing overlaps the disk write."""

    def __init__(self, path: Path, block_size: int, depth: int = 4) -> None:
        self.f = open(path, "wb")
        self.free: queue.Queue[bytearray] = queue.Queue()
        for _ in range(depth):
            self.free.put(bytearray(block_size))
        self.todo: queue.Queue[bytearray | None] = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while (buf := self.todo.get()) is not None:
            try:
                if self.error is None:
                    self.f.write(buf)
            except BaseException as e:  # surfaced on the main thread by put()/close()
                self.error = e
            self.free.put(buf)

    def buffer(self) -> bytearray:
        if self.error:
            raise self.error
        return self.free.get()

    def put(self, buf: bytearray) -> None:
        self.todo.put(buf)

    def close(self) -> None:
        self.todo.put(None)
        self.thread.join()
        if self.error:
            raise self.error
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


def _plan_experts(experts, dtype: str):
    """Block layout from expert 0 of layer 0 (every expert must match it)."""
    shapes = {}
    for role in EXPERT_ROLES:
        st, _, shape = _expert_source(experts, 0, 0, role)
        shapes[role] = (shape, ST_DTYPES[_target(st.entry.dtype, dtype)])
    return plan_block(shapes)


def _write_experts(path: Path, cfg: ModelConfig, experts, specs, bs: int, rd: _Reader, tick: Callable[[int], None]):
    """Write every (layer, expert) block; return the checksums in (layer, expert) order."""
    pause_after = int(os.environ.get(PAUSE_ENV, "0") or 0)
    writer = _BlockWriter(path, bs)
    sums: list[str] = []
    try:
        for layer in range(cfg.num_layers):
            for e in range(cfg.num_experts):
                buf = writer.buffer()
                mv = memoryview(buf)
                for spec in specs:
                    st, off, shape = _expert_source(experts, layer, e, spec.role)
                    if tuple(shape) != spec.shape:
                        raise RepackError(f"{st.path}: layer {layer}, expert {e}, {spec.role} has shape {list(shape)}, "
                                          f"expert 0 of layer 0 has {list(spec.shape)}: experts must share one shape")
                    src_dt = st.entry.dtype
                    n_src = spec.nbytes // ST_ITEMSIZE[ST_NAMES[spec.dtype]] * ST_ITEMSIZE[src_dt]
                    if src_dt == ST_NAMES[spec.dtype]:
                        rd.read_into(st.path, off, mv[spec.offset:spec.offset + spec.nbytes])
                    else:
                        tmp = bytearray(n_src)
                        rd.read_into(st.path, off, memoryview(tmp))
                        mv[spec.offset:spec.offset + spec.nbytes] = _convert(memoryview(tmp), src_dt, ST_NAMES[spec.dtype])
                sums.append(xxh3_hex(buf))
                writer.put(buf)
                tick(bs)
                if pause_after and len(sums) == pause_after:
                    writer.close()  # make the partial file real on disk, then wait to be killed
                    print(f"tiered-test-hook: paused after {pause_after} blocks", file=sys.stderr, flush=True)
                    time.sleep(3600)
    finally:
        if not writer.f.closed:
            writer.close()
    return sums


LAYOUT_FILES = frozenset({MANIFEST, DENSE_FILE, EXPERTS_FILE, "source_config.json", "predictor.safetensors",
                          *TOKENIZER_FILES})


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _dense_bytes_written(dense: dict[str, SourceTensor], dtype: str) -> int:
    """Bytes of dense tensor data after --dtype conversion (what _write_dense writes, header aside)."""
    return sum(st.entry.nbytes // ST_ITEMSIZE[st.entry.dtype] * ST_ITEMSIZE[_target(st.entry.dtype, dtype)]
               for st in dense.values())


def _already_a_layout(path: Path) -> str:
    try:
        origin = json.loads((path / MANIFEST).read_text()).get("source", {}).get("path")
    except (OSError, ValueError, AttributeError):
        origin = None
    hint = f" (it was repacked from {origin})" if origin else ""
    return (f"{path} is already a tiered layout{hint}: use it as it is (`tiered run -m {path}`); to store it "
            f"in another dtype, repack the original Hugging Face checkpoint")


def describe_existing(path: Path) -> str | None:
    """None when `path` may be replaced by --force (a tiered layout or an empty directory), else what is there."""
    if not path.is_dir():
        return "a file, not a directory" if path.exists() else None
    try:
        names = sorted(p.name for p in path.iterdir())
    except OSError as e:
        return f"a directory that cannot be listed ({e.strerror})"
    if not names:
        return None
    if MANIFEST in names:
        try:
            if json.loads((path / MANIFEST).read_text()).get("format") == FORMAT_NAME:
                return None
        except (OSError, ValueError, AttributeError):
            pass
        if set(names) <= LAYOUT_FILES:  # a layout whose manifest is damaged: only tiered's own files
            return None
    if "config.json" in names and any(n.endswith((".safetensors", ".bin", ".safetensors.index.json")) for n in names):
        return "a Hugging Face checkpoint"
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return f"a directory that is not a tiered layout ({len(names)} entries: {shown})"


def check_destination(src: Path, dst: Path, force: bool) -> None:
    """Refuse a DST that overlaps SRC, and a DST that exists unless --force may replace it (a layout or empty dir)."""
    s, d = src.resolve(), dst.resolve()
    if s == d:
        raise RepackError(f"SRC and DST are the same directory ({s}): the layout must go to a new directory")
    if s in d.parents:
        raise RepackError(f"DST {dst} is inside SRC {src}: write the layout outside the checkpoint")
    if d in s.parents:
        raise RepackError(f"SRC {src} is inside DST {dst}: replacing DST would delete the checkpoint; "
                          f"choose another DST")
    if not dst.exists():
        return
    what = describe_existing(dst)
    if what is not None:
        raise RepackError(f"{dst} already exists and is {what}: tiered replaces only a tiered layout or an empty "
                          f"directory, even with --force; choose a new DST")
    if not force:
        raise RepackError(f"{dst} already exists: pass --force to replace it")


class _Terminated(BaseException):
    """SIGTERM during a repack, raised in the main thread so that the partial layout is removed."""


class _sigterm_as_interrupt:
    """Within the block, SIGTERM raises _Terminated so that `finally` clauses run; on the way out the
    previous handler is restored and given the signal (the default one ends the process as SIGTERM would)."""

    def __enter__(self) -> None:
        self.old = None
        if threading.current_thread() is threading.main_thread():
            old = signal.getsignal(signal.SIGTERM)
            if old is not signal.SIG_IGN:
                self.old = signal.signal(signal.SIGTERM, self._raise)

    @staticmethod
    def _raise(signum, frame) -> None:
        raise _Terminated()

    def __exit__(self, kind, value, tb) -> bool:
        if self.old is None:
            return False
        signal.signal(signal.SIGTERM, self.old)
        if kind is _Terminated:
            if self.old in (signal.SIG_DFL, None):
                os.kill(os.getpid(), signal.SIGTERM)
            elif callable(self.old):
                self.old(signal.SIGTERM, None)
            raise RepackError("the repack was interrupted by SIGTERM; the partial copy was removed") from None
        return False

def repack(src: str | Path, dst: str | Path, *, dtype: str = "source", force: bool = False,
           progress: bool = True, fix: str = "choose another DST") -> dict[str, Any]:
    """Rewrite checkpoint `src` into a layout at `dst`, atomically.

    Args:
        src: Hugging Face checkpoint directory (config.json + safetensors shards).
        dst: layout directory to create. It appears only when complete (temp dir + rename).
        dtype: "source", "bf16", "fp16" or "fp32" for the stored weights.
        force: replace an existing `dst` (only a tiered layout or an empty directory; anything else is refused).
        progress: show a progress bar on stderr.
        fix: what to tell the user when `dst` cannot be written or has no room (the cache names its own remedy).
    Returns:
        A summary: bytes written, seconds, MB/s.
    """
    src, dst = Path(src), Path(dst)
    if dtype not in ("source", "bf16", "fp16", "fp32"):
        raise RepackError(f"--dtype must be source, bf16, fp16 or fp32, not {dtype!r}")
    if not src.is_dir():
        raise RepackError(f"{src} is not a directory: pass a Hugging Face checkpoint directory")
    if is_layout(src):
        raise RepackError(_already_a_layout(src))
    check_destination(src, dst, force)
    fam, cfg, _ = read_checkpoint_config(src)
    dense, experts, skipped = _index_source(src, fam, cfg)
    if skipped:  # vision towers, MTP heads: the parts that are not the text model
        prefixes = fam.spec.get("ignore", {}).get("prefixes", [])
        groups = Counter(next((p + "*" for p in prefixes if n.startswith(p)), n) for n in skipped)
        print(f"tiered: repack skips {len(skipped)} tensors that are not part of the text model: "
              + ", ".join(f"{g} ({c})" for g, c in sorted(groups.items())), file=sys.stderr)
    specs, bs = _plan_experts(experts, dtype)
    cfg = ModelConfig.from_json({**cfg.to_json(), "source_dtype": specs[0].dtype})
    total = _dense_bytes_written(dense, dtype) + cfg.num_layers * cfg.num_experts * bs
    tmp = dst.parent / f".{dst.name}.tiered-partial"
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            print(f"tiered: removing an interrupted repack at {tmp}", file=sys.stderr)
            shutil.rmtree(tmp)
        free = shutil.disk_usage(dst.parent).free
    except OSError as e:
        raise RepackError(f"cannot write the layout next to {dst}: {e.strerror or e} ({e.filename}); "
                          f"{fix}") from None
    if free < total:
        raise RepackError(f"not enough disk space for {dst}: the layout needs {_gb(total)}, "
                          f"{_gb(free)} is free on that file system; free space or {fix}")
    try:
        tmp.mkdir()
    except OSError as e:
        raise RepackError(f"cannot write the layout next to {dst}: {e.strerror or e} ({e.filename}); "
                          f"{fix}") from None

    rd = _Reader()
    bar = _progress(total, progress)
    written = [0]

    def tick(n: int) -> None:
        written[0] += n
        bar.update(n)

    t0 = time.perf_counter()
    done = False
    try:
        with _sigterm_as_interrupt():
            try:
                blocks = _write_layout(src, dst, tmp, cfg, dense, experts, specs, bs, dtype, rd, tick)
                done = True
            finally:
                rd.close()
                bar.close()
                if not done:  # Ctrl-C, SIGTERM, a full disk or a read error: leave nothing half-written behind
                    shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise RepackError(f"the disk filled up while writing {tmp} ({_gb(written[0])} of {_gb(total)} "
                              f"written): the layout needs {_gb(total)}; free space or {fix} "
                              f"(the partial copy was removed)") from None
        raise RepackError(f"writing {tmp} failed: {e.strerror or e}; free space or {fix} "
                          f"(the partial copy was removed)") from None
    secs = time.perf_counter() - t0
    return {"bytes": written[0], "seconds": secs, "mb_s": written[0] / 1e6 / max(secs, 1e-9), "dst": str(dst),
            "block_size": bs, "blocks": blocks, "skipped": skipped}


def _write_layout(src: Path, dst: Path, tmp: Path, cfg: ModelConfig, dense, experts, specs, bs: int, dtype: str,
                  rd: _Reader, tick: Callable[[int], None]) -> int:
    """Write every file of the layout into `tmp`, then swap it into place at `dst`; returns the block count."""
    dense_sum = _write_dense(tmp / DENSE_FILE, dense, dtype, rd, tick)
    sums = _write_experts(tmp / EXPERTS_FILE, cfg, experts, specs, bs, rd, tick)
    for name in TOKENIZER_FILES + ("config.json",):
        if (src / name).is_file():
            shutil.copyfile(src / name, tmp / (name if name != "config.json" else "source_config.json"))
    source = {"path": str(src.resolve()), "dtype_option": dtype, "tiered_version": __version__}
    man = build_manifest(cfg, specs, bs, sums, (tmp / DENSE_FILE).stat().st_size, dense_sum, source)
    with open(tmp / MANIFEST, "w") as f:  # the manifest is written last: its presence marks completeness
        json.dump(man, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)
    _swap_into_place(tmp, dst)
    return len(sums)


def _swap_into_place(tmp: Path, dst: Path) -> None:
    old = dst.parent / f".{dst.name}.tiered-old"
    if old.exists():
        shutil.rmtree(old)
    if dst.exists():
        os.rename(dst, old)
    os.rename(tmp, dst)
    fsync_dir(dst.parent)
    if old.exists():
        shutil.rmtree(old)


def _progress(total: int, enabled: bool, desc: str = "repack"):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=desc, disable=not enabled,
                file=sys.stderr, dynamic_ncols=True)


def is_layout(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def cache_dir() -> Path:
    from tiered.layout.cachedir import cache_root

    return cache_root()


def ensure_layout(path: str | Path, *, dtype: str = "source", progress: bool = True) -> Path:
    """A layout for `path`: itself if it is one, else a cached repack of the checkpoint.

    The cache key covers the source path, its files' sizes and mtimes, the repack options and the
    tiered version, so a changed checkpoint is repacked again; older copies of the same checkpoint are
    named (with the command that removes them) before a new one is made. The cache path is printed on stderr.
    """
    from tiered.layout.cachedir import cache_key, cache_root, stale_copies

    path = Path(path)
    if is_layout(path):
        return path
    if not (path / "config.json").is_file():
        raise FamilyError(f"{path} is neither a tiered layout (no {MANIFEST}) nor a Hugging Face checkpoint "
                          f"(no config.json)")
    root = cache_root()
    key = cache_key(path, dtype)
    dst = root / key
    if is_layout(dst):
        try:
            read_manifest(dst)
            print(f"tiered: using cached layout {dst}", file=sys.stderr)
            return dst
        except LayoutError as e:
            print(f"tiered: cached layout is damaged ({e}); repacking", file=sys.stderr)
    fix = (f"point XDG_CACHE_HOME at a writable disk with room (the layout cache is $XDG_CACHE_HOME/tiered, now "
           f"{root}), or repack it yourself with `tiered repack {path} DIR` and run with -m DIR")
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as e:
        raise RepackError(f"the layout cache {root} cannot be written ({e.strerror or e}): {fix}") from None
    for old in stale_copies(path, dtype, key, root):
        print(f"tiered: the cache holds an older copy of {path} at {old.path} ({_gb(old.bytes)}; the checkpoint "
              f"changed since): remove it with `tiered cache rm {old.key}`", file=sys.stderr)
    print(f"tiered: repacking {path} into the cache at {dst}", file=sys.stderr)
    repack(path, dst, dtype=dtype, force=True, progress=progress, fix=fix)
    return dst


@dataclass(frozen=True)
class VerifyProblem:
    where: str  # "dense" or "layer L, expert E"
    file: Path
    offset: int
    size: int
    want: str
    got: str

    def __str__(self) -> str:
        return (f"checksum mismatch in {self.where}: {self.file} bytes [{self.offset}, {self.offset + self.size}) "
                f"hash {self.got}, manifest says {self.want}; the file is corrupted: re-run `tiered repack`")


def verify(layout: str | Path, *, progress: bool = True) -> list[VerifyProblem]:
    """Recompute every checksum of a layout; return the problems (empty when clean)."""
    d = Path(layout)
    man = read_manifest(d)
    problems: list[VerifyProblem] = []
    dense = d / DENSE_FILE
    got = xxh3_hex(dense.read_bytes()) if man.dense_size < 2**31 else _hash_file(dense)
    if got != man.dense_xxh3:
        problems.append(VerifyProblem("dense", dense, 0, man.dense_size, man.dense_xxh3, got))
    bar = _progress(man.experts_size, progress, "verify")
    buf = bytearray(man.block_size)
    with open(d / EXPERTS_FILE, "rb") as f:
        for i, (off, want) in enumerate(zip(man.offsets, man.checksums)):
            n = os.preadv(f.fileno(), [buf], off)
            got = xxh3_hex(memoryview(buf)[:n])
            if n != man.block_size or got != want:
                l, e = divmod(i, man.config.num_experts)
                problems.append(VerifyProblem(f"layer {l}, expert {e}", d / EXPERTS_FILE, off, man.block_size, want, got))
            bar.update(man.block_size)
    bar.close()
    return problems


def _hash_file(path: Path) -> str:
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()
