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
import re
import math
import os
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
import xxhash
from torch import Tensor

from tiered import __version__
from tiered.layout.config import EXPERT_ROLES, FUSED_EXPERT_ROLES, ModelConfig
from tiered.layout.fused import canonical_expert
from tiered.layout.families import Family, FamilyError, read_checkpoint_config
from tiered.layout.format import (ALIGN, DENSE_FILE, DTYPES, EXPERTS_FILE, FORMAT_NAME, MANIFEST, ST_DTYPES, ST_ITEMSIZE, ST_NAMES,
                           TOKENIZER_FILES, LayoutError, StEntry, build_manifest, fsync_dir, plan_block,
                           quant_entries, read_manifest, read_safetensors_header, xxh3_hex)
from tiered.layout.quant import (DENSE_STORAGE, EXPERT_STORAGE, GROUP, Q4_REFINES, QUANT_FORMATS, QuantWeight,
                                 quantize)

CHUNK = 64 * 2**20  # dense tensors are copied in pieces of at most this many bytes
EXPERT_FORMATS = EXPERT_STORAGE  # --experts
DENSE_FORMATS = DENSE_STORAGE  # --dense
FLOAT_CODES = ("BF16", "F16", "F32")
FP8_CODE = "F8_E4M3"  # DeepSeek-V3's weights, each with a `weight_scale_inv` (fp32, one per 128 x 128 block)
PAUSE_ENV = "TIERED_REPACK_PAUSE_AFTER_BLOCKS"  # test hook: stop (sleep) after N expert blocks


class RepackError(RuntimeError):
    """The repack cannot proceed; the message says why and what to do."""


@dataclass(frozen=True)
class SourceTensor:
    path: Path  # the shard
    entry: StEntry  # where its bytes are
    expert: int | None  # for a fused [E, ...] expert tensor: None (slice per expert)
    scale: "SourceTensor | None" = None  # an fp8 weight's block scales (`NAME_scale_inv`), stored beside it


_LAYER_INDEX = re.compile(r"(?:model\.(?:language_model\.)?)?layers\.(\d+)\.")


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
    scales: dict[str, SourceTensor] = {}  # fp8 weight name -> its block scales
    for shard in shards:
        path = src / shard
        if not path.is_file():
            raise RepackError(f"shard {path} is listed in {idx.name} but missing: the checkpoint is incomplete; "
                              f"re-download it")
        entries, _ = read_safetensors_header(path)
        for name, ent in entries.items():
            m = _LAYER_INDEX.match(name)
            if m and int(m[1]) >= cfg.num_layers:  # multi-token-prediction layers (DeepSeek-V3's MTP): not run
                skipped.append(name)
                continue
            if name.endswith(".weight_scale_inv"):  # paired with its fp8 weight below
                scales[name[:-len("_scale_inv")]] = SourceTensor(path, ent, None)
                continue
            kind, role, layer, expert = fam.classify(name)
            if kind == "dense":
                dense[role] = SourceTensor(path, ent, None)
            elif kind == "expert":
                experts[(layer, expert, role)] = SourceTensor(path, ent, expert)
            else:
                skipped.append(name)
    _pair_fp8_scales(dense, experts, scales)
    missing = [n for n in fam.expected_dense(cfg) if n not in dense]
    if missing:
        raise RepackError(f"{src}: dense tensors missing for {missing[:5]}{' ...' if len(missing) > 5 else ''}: "
                          f"the checkpoint is incomplete or does not match {fam.path.name}")
    return dense, experts, sorted(skipped)


def _pair_fp8_scales(dense: dict, experts: dict, scales: dict[str, SourceTensor]) -> None:
    """Attach each fp8 weight's `weight_scale_inv` [ceil(N/128), ceil(K/128)] to it (in place); refuse an fp8
    weight without scales, scales without their weight, and fused fp8 experts."""
    for table in (dense, experts):
        for key, st in table.items():
            ent = st.entry
            sc = scales.pop(ent.name, None)
            if ent.dtype != FP8_CODE:
                if sc is not None:
                    raise RepackError(f"{st.path}: {ent.name} is {ent.dtype} but has a weight_scale_inv: only "
                                      f"float8_e4m3fn weights carry block scales; the checkpoint is inconsistent")
                continue
            if sc is None:
                raise RepackError(f"{st.path}: {ent.name} is float8_e4m3fn without a {ent.name}_scale_inv: tiered "
                                  f"reads fp8 checkpoints with 128 x 128 block scales (DeepSeek-V3's) only")
            if len(ent.shape) != 2 or st.expert is None and table is experts:
                raise RepackError(f"{st.path}: fp8 tensor {ent.name} has shape {list(ent.shape)}: tiered passes "
                                  f"through 2-D fp8 weights with one scale per 128 x 128 block (per-expert tensors, "
                                  f"not fused [E, ...] ones); convert this checkpoint to bf16 first")
            want = tuple(math.ceil(n / GROUP["fp8"]) for n in ent.shape)
            if tuple(sc.entry.shape) != want or sc.entry.dtype not in FLOAT_CODES:
                raise RepackError(f"{sc.path}: {sc.entry.name} is {sc.entry.dtype} {list(sc.entry.shape)}, expected "
                                  f"one float scale per 128 x 128 block of {ent.name} {list(ent.shape)}: "
                                  f"{list(want)}")
            table[key] = replace(st, scale=sc)
    if scales:
        names = sorted(scales)
        raise RepackError(f"{scales[names[0]].path}: block scales without their weight: {names[:3]}: the checkpoint "
                          f"is incomplete or its family file does not name those weights")


def _read_tensor(rd: "_Reader", st: SourceTensor, offset: int, shape: tuple[int, ...]) -> torch.Tensor:
    """A source tensor's bytes at `offset` as a tensor of its stored dtype and `shape`."""
    buf = bytearray(math.prod(shape) * ST_ITEMSIZE[st.entry.dtype])
    rd.read_into(st.path, offset, memoryview(buf))
    return torch.frombuffer(buf, dtype=DTYPES[ST_DTYPES[st.entry.dtype]]).view(*shape)


def _fp8_scale_bytes(rd: "_Reader", st: SourceTensor) -> bytes:
    """An fp8 weight's block scales as stored in the layout (fp32; bit-identical when the source is fp32)."""
    sc = st.scale
    return _read_tensor(rd, sc, sc.entry.start, sc.entry.shape).float().contiguous().view(torch.uint8).numpy().tobytes()


def _fp8_weight(rd: "_Reader", st: SourceTensor, offset: int, shape: tuple[int, ...]) -> QuantWeight:
    """An fp8 source weight with its scales, as stored (no dequantization)."""
    sc = st.scale
    return QuantWeight("fp8", tuple(shape), GROUP["fp8"], _read_tensor(rd, st, offset, shape),
                       _read_tensor(rd, sc, sc.entry.start, sc.entry.shape).float())


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


def is_dense_matrix(name: str, ent: StEntry) -> bool:
    """The dense weights --dense quantizes: 2-D float or fp8 projections (attention, MLA's, the Gated DeltaNet's qkv,
    z and out, shared expert, DeepSeek-V3's dense-layer MLP) and an untied lm_head. Embeddings, norms, routers, gates,
    the DeltaNet's small b/a projections and Qwen3-Next's interleaved lin_qkvz/lin_ba (the model reshapes them per
    head) stay as they are."""
    leaf = name.rsplit(".", 1)[-1]
    return len(ent.shape) == 2 and ent.dtype in FLOAT_CODES + (FP8_CODE,) and (
        name.endswith("_proj") or name == "lm_head" or leaf in DENSE_LEAVES)


DENSE_LEAVES = ("lin_qkv", "lin_z", "lin_out", "mla_q_a", "mla_q_b", "mla_q", "mla_kv_a", "mla_kv_b", "dense_gate",
                "dense_up", "dense_down")


@dataclass(frozen=True)
class _DenseOut:
    """One tensor of dense.safetensors: a source tensor converted, or one part of a quantized one."""
    name: str
    code: str  # safetensors dtype code written
    shape: tuple[int, ...]
    src: SourceTensor
    fmt: str | None = None  # quantization scheme when this is a part of a quantized weight
    part: str | None = None  # "q", "scale" or "min"

    @property
    def nbytes(self) -> int:
        n = ST_ITEMSIZE[self.code]
        for x in self.shape:
            n *= x
        return n


def _plan_dense(dense: dict[str, SourceTensor], dtype: str, fmt: str) -> tuple[list[_DenseOut], dict[str, dict]]:
    """The tensors of dense.safetensors (widest dtype first: each starts aligned to its item size, as
    safetensors allows no gaps) and the manifest's descriptions of the quantized ones."""
    outs, quant = [], {}
    for name, st in dense.items():
        ent = st.entry
        # an fp8 source weight stays fp8 (bytes copied) unless --dense asks for bf16 or another quantization
        scheme = fmt if fmt in QUANT_FORMATS and is_dense_matrix(name, ent) else None
        if scheme is None and st.scale is not None and fmt != "bf16":
            scheme = "fp8"
        if scheme is not None:
            entries = quant_entries(name, scheme, tuple(ent.shape))
            quant[name] = entries[0][3]
            for (pname, pshape, dt, _), part in zip(entries, ("q", "scale", "min")):
                outs.append(_DenseOut(pname, ST_NAMES[dt], tuple(pshape), st, scheme, part))
        elif st.scale is not None:  # --dense bf16: dequantized blockwise
            outs.append(_DenseOut(name, "BF16", tuple(ent.shape), st))
        else:
            code = "BF16" if fmt == "bf16" and is_dense_matrix(name, ent) else _target(ent.dtype, dtype)
            outs.append(_DenseOut(name, code, tuple(ent.shape), st))
    outs.sort(key=lambda o: (-ST_ITEMSIZE[o.code], o.name))
    return outs, quant


def _source_rows(rd: "_Reader", st: SourceTensor, r0: int, r1: int) -> torch.Tensor:
    """Rows r0..r1 of a 2-D float source tensor as a float32 [r1 - r0, K] tensor (an fp8 one dequantized with its
    block scales: r0 must then be a multiple of 128)."""
    ent = st.entry
    k, item = ent.shape[1], ST_ITEMSIZE[ent.dtype]
    rows = _read_tensor(rd, st, ent.start + r0 * k * item, (r1 - r0, k))
    if st.scale is None:
        return rows.float()
    g = GROUP["fp8"]
    scale = _read_tensor(rd, st.scale, st.scale.entry.start, st.scale.entry.shape)[r0 // g:math.ceil(r1 / g)]
    return QuantWeight("fp8", (r1 - r0, k), g, rows, scale.float().contiguous()).dequantize(torch.float32)


QUANT_KEEP_BYTES = 2 * 2**30  # a quantized dense weight's other parts kept for their turn in the file (else redone)


class _PartsKept:
    """The parts of quantized dense weights that are still to be written, kept from the one quantization pass that
    made them (the file orders tensors by item size, so a weight's scale and min come long before its codes), up to
    `limit` bytes in all; a weight whose parts would pass it is quantized again for each later part instead."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit, self.held = QUANT_KEEP_BYTES if limit is None else limit, 0
        self.parts: dict[tuple[str, str], list[bytes]] = {}
        self.written: set[tuple[str, str]] = set()  # parts whose turn has come (never kept after it)

    def take(self, src: str, part: str) -> list[bytes] | None:
        """The kept bytes of this part (None: quantize it), which is written now either way."""
        self.written.add((src, part))
        got = self.parts.pop((src, part), None)
        if got is not None:
            self.held -= sum(len(b) for b in got)
        return got

    def room(self) -> int:
        return self.limit - self.held

    def keep(self, src: str, parts: dict[str, list[bytes]]) -> None:
        parts = {p: c for p, c in parts.items() if (src, p) not in self.written}
        n = sum(len(b) for chunks in parts.values() for b in chunks)
        if n > self.room():
            return
        self.held += n
        for part, chunks in parts.items():
            self.parts[(src, part)] = chunks


def _quant_chunks(o: _DenseOut, rd: "_Reader", refine: str | None, device: str = "cpu",
                  kept: _PartsKept | None = None):
    """The bytes of one part of a quantized dense weight, quantized in row chunks on `device` (groups never span
    rows; fp8's 128-row blocks stay whole), so memory stays near CHUNK however large the matrix. With `kept`, the
    weight's other parts from the same pass are kept for their turn (the first part written quantizes; the others
    read what it kept), so each weight is quantized once while the kept bytes fit."""
    if o.fmt == "fp8" and o.src.scale is not None:  # an fp8 source kept fp8: its bytes, copied in CHUNK pieces
        if o.part == "scale":
            yield _fp8_scale_bytes(rd, o.src)
            return
        ent = o.src.entry
        for pos in range(0, ent.nbytes, CHUNK):
            buf = bytearray(min(CHUNK, ent.nbytes - pos))
            rd.read_into(o.src.path, ent.start + pos, memoryview(buf))
            yield buf
        return
    if kept is not None:
        got = kept.take(f"{o.src.path}:{o.src.entry.name}", o.part)
        if got is not None:
            yield from got
            return
    n, k = o.src.entry.shape
    rows = max(128, CHUNK // (4 * k) // 128 * 128)
    others: dict[str, list[bytes]] | None = {} if kept is not None else None
    held = 0
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        qw = quantize(_source_rows(rd, o.src, r0, r1).to(device), o.fmt, refine=refine if o.fmt == "q4" else None)
        for part, t in qw.parts().items():
            b = t.cpu().contiguous().view(torch.uint8).numpy().tobytes()
            if part == o.part:
                yield b
            elif others is not None:
                others.setdefault(part, []).append(b)
                held += len(b)
        if others is not None and held > kept.room():
            others = None  # past what may be kept: the later parts quantize again
    if others is not None:
        kept.keep(f"{o.src.path}:{o.src.entry.name}", others)


def _write_dense(path: Path, outs: list[_DenseOut], dtype: str, rd: "_Reader", tick: Callable[[int], None],
                 refine: str | None = None, device: str = "cpu") -> str:
    """Stream dense tensors into one safetensors file (header first, then data in chunks)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "writer": f"tiered {__version__}"}}
    off = 0
    for o in outs:
        header[o.name] = {"dtype": o.code, "shape": list(o.shape), "data_offsets": [off, off + o.nbytes]}
        off += o.nbytes
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    hbytes += b" " * (-(8 + len(hbytes)) % ALIGN)  # data starts 4 KiB-aligned
    h = xxhash.xxh3_64()
    with open(path, "wb") as f:
        for piece in (len(hbytes).to_bytes(8, "little"), hbytes):
            f.write(piece)
            h.update(piece)
        buf = bytearray(CHUNK)
        kept = _PartsKept()
        for o in outs:
            if o.fmt is not None:
                pieces = _quant_chunks(o, rd, refine, device, kept)
            elif o.src.scale is not None:  # an fp8 source dequantized into o.code
                pieces = _dequant_chunks(o, rd)
            else:
                pieces = _converted_chunks(o, rd, buf)
            for out in pieces:
                f.write(out)
                h.update(out)
                tick(len(out))
        f.flush()
        os.fsync(f.fileno())
    return h.hexdigest()


def _dequant_chunks(o: _DenseOut, rd: "_Reader"):
    n, k = o.src.entry.shape
    rows = max(128, CHUNK // (4 * k) // 128 * 128)
    for r0 in range(0, n, rows):
        t = _source_rows(rd, o.src, r0, min(n, r0 + rows)).to(DTYPES[ST_DTYPES[o.code]])
        yield t.contiguous().view(torch.uint8).numpy().tobytes()


def _converted_chunks(o: _DenseOut, rd: "_Reader", buf: bytearray):
    ent, item = o.src.entry, ST_ITEMSIZE[o.src.entry.dtype]
    step = CHUNK // item * item
    for pos in range(0, ent.nbytes, step):
        n = min(step, ent.nbytes - pos)
        view = memoryview(buf)[:n]
        rd.read_into(o.src.path, ent.start + pos, view)
        yield _convert(view, ent.dtype, o.code)


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


def _source_roles(experts) -> list[str]:
    return sorted({role for (_, _, role) in experts})


def _derived(experts) -> bool:
    """True when the checkpoint stores experts in a form other than gate/up/down that needs a transform
    (layout/fused.py); a fused gate_up (FUSED_EXPERT_ROLES) is read by byte range instead (_fused_source)."""
    return any(r not in EXPERT_ROLES and r not in FUSED_EXPERT_ROLES for r in _source_roles(experts))


def _read_source_expert(experts, layer: int, e: int, rd: "_Reader") -> dict[str, torch.Tensor]:
    """One expert's source tensors (every source role), read from their shards."""
    out = {}
    for role in _source_roles(experts):
        st, off, shape = _expert_source(experts, layer, e, role)
        n = ST_ITEMSIZE[st.entry.dtype]
        for d in shape:
            n *= d
        buf = bytearray(n)
        rd.read_into(st.path, off, memoryview(buf))
        out[role] = torch.frombuffer(buf, dtype=DTYPES[ST_DTYPES[st.entry.dtype]]).view(*shape)
    return out


def _derived_dtype(experts, dtype: str) -> str:
    """safetensors dtype code of derived expert tensors: --dtype, else the first float source's dtype
    (bf16 when every source is packed integers, e.g. MXFP4 dequantized at repack)."""
    floats = [experts[k].entry.dtype for k in sorted(experts, key=str) if experts[k].entry.dtype in ("BF16", "F16", "F32")]
    return _target(floats[0] if floats else "BF16", dtype if dtype != "source" or floats else "bf16")


def _plan_experts(experts, dtype: str, fmt: str = "source", rd: "_Reader | None" = None):
    """Block layout from expert 0 of the first MoE layer (every expert must match it)."""
    shapes = {}
    l0 = min(layer for (layer, _, _) in experts)
    if _derived(experts):  # the canonical tensors; --experts q* quantizes gate/up/down, biases stay float
        code = ST_DTYPES[_derived_dtype(experts, "bf16" if fmt == "bf16" else dtype)]
        src = _read_source_expert(experts, l0, 0, rd or _Reader())
        for role, t in canonical_expert(src, keep_mxfp4=fmt in ("source", "mxfp4")).items():
            if isinstance(t, QuantWeight):  # MXFP4 as stored
                shapes[role] = (t.matrix, "mxfp4")
            else:
                shapes[role] = (tuple(t.shape), fmt if fmt in QUANT_FORMATS and role in EXPERT_ROLES else code)
        return plan_block(shapes)
    for role in EXPERT_ROLES:
        st, _, shape = _expert_source(experts, l0, 0, role)
        code = st.entry.dtype
        if st.scale is not None:  # fp8 with block scales: kept (source, fp8), requantized, or dequantized (bf16)
            shapes[role] = (tuple(shape), "fp8" if fmt == "source" else "bfloat16" if fmt == "bf16" else fmt)
        elif fmt in QUANT_FORMATS:
            if code not in FLOAT_CODES:
                raise RepackError(f"{st.path}: experts are stored as {code}; --experts {fmt} quantizes bf16, fp16 "
                                  f"or fp32 experts only: use --experts source")
            shapes[role] = (tuple(shape), fmt)
        else:
            shapes[role] = (shape, ST_DTYPES[_target(code, "bf16" if fmt == "bf16" else dtype)])
    return plan_block(shapes)


QUANT_STACK_BYTES = 256 * 2 ** 20  # fp32 input of one quantize call over a stack: its temporaries stay near 10x this


def resolve_quant_device(device: str) -> str:
    """--quant-device: "auto" is "cuda" when a CUDA device has 4 GiB free (a stack chunk's working set is about
    3 GiB), else "cpu"; "cpu" and "cuda" are taken as given ("cuda" without a device fails by name)."""
    if device not in ("auto", "cpu", "cuda"):
        raise RepackError(f"--quant-device must be auto, cpu or cuda, not {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RepackError("--quant-device cuda: no CUDA device is visible here; use --quant-device cpu (or auto)")
    if device != "auto":
        return device
    if torch.cuda.is_available() and torch.cuda.mem_get_info()[0] >= 4 * 2 ** 30:
        return "cuda"
    return "cpu"


def quantize_stack(rows: list[Tensor], scheme: str, *, refine: str | None, device: str = "cpu",
                   chunk_bytes: int = QUANT_STACK_BYTES) -> dict[str, Tensor]:
    """Quantize E matrices [N, K] (one role of a layer's experts) on `device`, a few experts at a time, so that the
    fp32 working set stays near 10 x `chunk_bytes` whatever E, N and K (one pass over a 512-expert role of the
    397B shape would hold about 95 GB). Each matrix is quantized on its own either way (every reduction runs
    within a group of one row), so the parts are bit for bit those of one pass. Returns part -> [E, ...] on CPU."""
    n, k = rows[0].shape
    step = max(1, chunk_bytes // (4 * n * k))
    pieces: list[dict[str, Tensor]] = []
    for e0 in range(0, len(rows), step):
        chunk = torch.stack(rows[e0:e0 + step]).to(device)
        pieces.append(quantize(chunk, scheme, refine=refine).to_device("cpu").parts())
        del chunk
    return {name: torch.cat([p[name] for p in pieces]) for name in pieces[0]}


def _quantize_layer(experts, cfg: ModelConfig, layer: int, by_name: dict, rd: _Reader, refine: str | None,
                    device: str = "cpu"):
    """Quantize every expert of one layer, role by role, over a [E, N, K] stack a few experts at a time
    (`quantize_stack`: each matrix exactly as on its own). Returns role -> [(part spec, per-expert memoryviews of
    the part's bytes)]."""
    out = {}
    quant_roles = [r for r in EXPERT_ROLES if by_name[r].quant]
    derived = {}  # role -> [E] canonical tensors, for experts stored in another form (layout/fused.py)
    # fp8 into fp8 blocks, MXFP4 into MXFP4 blocks: the stored bytes, role -> part -> [E]
    copied = {r: {"q": [], "scale": []} for r in quant_roles}
    is_derived = _derived(experts)
    if quant_roles and is_derived:
        keep = any(by_name[r].quant["scheme"] == "mxfp4" for r in quant_roles)
        for e in range(cfg.num_experts):
            t = canonical_expert(_read_source_expert(experts, layer, e, rd), keep_mxfp4=keep)
            for r in quant_roles:
                if isinstance(t[r], QuantWeight):  # MXFP4 as stored: codes and scales copied
                    for part in ("q", "scale"):
                        copied[r][part].append(getattr(t[r], part).contiguous().numpy().tobytes())
                    continue
                # held as bf16: dequantized MXFP4 values are exact in it, and a layer of fp32 stacks is large
                derived.setdefault(r, []).append(t[r].to(torch.bfloat16) if t[r].dtype == torch.float32 else t[r])
    for role in quant_roles:
        spec = by_name[role]
        want = tuple(spec.quant["shape"])
        rows = derived.get(role, [])
        scheme = spec.quant["scheme"]
        kept = copied[role]
        for e in range(cfg.num_experts) if not is_derived else ():
            st, off, shape = _expert_source(experts, layer, e, role)
            if tuple(shape) != want:
                raise RepackError(f"{st.path}: layer {layer}, expert {e}, {role} has shape {list(shape)}, "
                                  f"expert 0 of layer 0 has {list(want)}: experts must share one shape")
            if st.scale is None:
                rows.append(_read_tensor(rd, st, off, tuple(shape)))
            elif scheme == "fp8":
                kept["q"].append(_read_tensor(rd, st, off, tuple(shape)).view(torch.uint8).numpy().tobytes())
                kept["scale"].append(_fp8_scale_bytes(rd, st))
            else:  # fp8 -> another format: dequantized blockwise (fp32, exact), then quantized
                rows.append(_fp8_weight(rd, st, off, tuple(shape)).dequantize(torch.float32))
        if kept["q"]:
            if rows:
                raise RepackError(f"layer {layer}, {role}: some experts are stored quantized and some are not: a "
                                  f"checkpoint stores every expert in one format")
            out[role] = [(by_name[role], kept["q"]), (by_name[spec.quant["scale"]], kept["scale"])]
            continue
        parts = quantize_stack(rows, scheme, refine=refine if scheme == "q4" else None, device=device)
        rows.clear()
        names = {"q": role, **{p: spec.quant[p] for p in ("scale", "min") if p in spec.quant}}
        out[role] = [(by_name[names[part]], memoryview(t.contiguous().view(torch.uint8).numpy()).cast("B")
                      .toreadonly()) for part, t in parts.items()]
        out[role] = [(ps, [mv[i * ps.nbytes:(i + 1) * ps.nbytes] for i in range(cfg.num_experts)])
                     for ps, mv in out[role]]
    return out


def _write_experts(path: Path, cfg: ModelConfig, experts, specs, bs: int, rd: _Reader, tick: Callable[[int], None],
                   refine: str | None = None, device: str = "cpu"):
    """Write every (layer, expert) block; return the checksums in (layer, expert) order."""
    pause_after = int(os.environ.get(PAUSE_ENV, "0") or 0)
    writer = _BlockWriter(path, bs)
    by_name = {s.name: s for s in specs}
    sums: list[str] = []
    derived = _derived(experts)
    try:
        for layer in range(cfg.num_layers):
            if not cfg.is_moe_layer(layer):  # a dense layer (DeepSeek-V3's first layers): zero blocks keep the
                for e in range(cfg.num_experts):  # store's layer*E + e indexing; nothing ever reads them
                    buf = writer.buffer()
                    buf[:] = bytes(len(buf))
                    sums.append(xxh3_hex(buf))
                    writer.put(buf)
                    tick(bs)
                continue
            quant = _quantize_layer(experts, cfg, layer, by_name, rd, refine, device)  # role -> parts [E, ...] as bytes
            for e in range(cfg.num_experts):
                buf = writer.buffer()
                mv = memoryview(buf)
                if derived:  # a transform (layout/fused.py) between the source bytes and the block
                    tensors = canonical_expert(_read_source_expert(experts, layer, e, rd),
                                               keep_mxfp4=bool(by_name["gate"].quant))
                for role in EXPERT_ROLES:
                    spec = by_name[role]
                    if spec.quant:
                        for ps, data in quant[role]:
                            mv[ps.offset:ps.offset + ps.nbytes] = data[e]
                        continue
                    if derived:
                        continue
                    st, off, shape = _expert_source(experts, layer, e, role)
                    if tuple(shape) != spec.shape:
                        raise RepackError(f"{st.path}: layer {layer}, expert {e}, {role} has shape {list(shape)}, "
                                          f"expert 0 of layer 0 has {list(spec.shape)}: experts must share one shape")
                    src_dt = st.entry.dtype
                    n_src = spec.nbytes // ST_ITEMSIZE[ST_NAMES[spec.dtype]] * ST_ITEMSIZE[src_dt]
                    if st.scale is not None:  # fp8 source, --experts bf16: dequantized blockwise
                        t = _fp8_weight(rd, st, off, tuple(shape)).dequantize(DTYPES[spec.dtype])
                        mv[spec.offset:spec.offset + spec.nbytes] = t.view(torch.uint8).numpy().tobytes()
                    elif src_dt == ST_NAMES[spec.dtype]:
                        rd.read_into(st.path, off, mv[spec.offset:spec.offset + spec.nbytes])
                    else:
                        tmp = bytearray(n_src)
                        rd.read_into(st.path, off, memoryview(tmp))
                        mv[spec.offset:spec.offset + spec.nbytes] = _convert(memoryview(tmp), src_dt, ST_NAMES[spec.dtype])
                for spec in specs if derived else ():
                    if spec.quant or spec.role not in tensors:  # quantized codes and scales: written above
                        continue
                    t = tensors[spec.role]
                    if tuple(t.shape) != spec.shape:
                        raise RepackError(f"layer {layer}, expert {e}, {spec.role} has shape {list(t.shape)}, expert 0 "
                                          f"of layer 0 has {list(spec.shape)}: experts must share one shape")
                    raw = t.to(DTYPES[spec.dtype]).contiguous().view(torch.uint8).numpy().tobytes()
                    mv[spec.offset:spec.offset + spec.nbytes] = raw
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


def repack(src: str | Path, dst: str | Path, *, dtype: str = "source", experts: str = "source",
           dense: str = "source", force: bool = False, progress: bool = True,
           q4_refine: str = "auto", quant_device: str = "auto", fix: str = "choose another DST") -> dict[str, Any]:
    """Rewrite checkpoint `src` into a layout at `dst`, atomically.

    Args:
        src: Hugging Face checkpoint directory (config.json + safetensors shards).
        dst: layout directory to create. It appears only when complete (temp dir + rename).
        dtype: "source", "bf16", "fp16" or "fp32" for the stored weights that are not quantized.
        experts: storage of the routed experts: "source" (as --dtype), "bf16", or quantized "q8", "q4",
            "fp8", "mxfp4" (tiered/layout/quant.py). Quantized sources: fp8 with 128 x 128 `weight_scale_inv`
            blocks (DeepSeek-V3) is copied byte for byte under "source" and "fp8"; gpt-oss's MXFP4
            (`*_blocks`, `*_scales`) likewise under "source" and "mxfp4". Any other choice dequantizes them
            (blockwise, in fp32) and then stores or quantizes the result.
        dense: storage of the dense matrices (projections, shared expert, untied lm_head): "source" (as
            --dtype; fp8 source weights stay fp8, bytes copied), "bf16", "q8" or "q4". Embeddings, norms and
            routers keep --dtype.
        q4_refine: "lsq" (q4 starts from each group's min/max, then refines scale and min by least squares:
            12% lower weight MSE on olmoe-code-17m, better KL and top-1 on ../shared/text/fit), "search" (lsq, then
            the best of a grid of clipped ranges refined the same way, per group the lower error: 8% below lsq's
            weight MSE there, about 5x its quantizing time on the CPU, 1.55x lsq's whole repack time on the H200:
            a q4+q4 repack of the 8-layer 10.6B checkpoint 23.1 s against 14.9), "none" (min/max rounding only) or
            "auto" (search where quantizing computes on CUDA, lsq on the CPU; the manifest records the choice).
        quant_device: where quantization computes, experts and dense matrices: "cuda", "cpu", or "auto" (CUDA when
            a device has 4 GiB free; `resolve_quant_device`). Experts are quantized a few at a time
            (`quantize_stack`), so memory stays bounded on either; the two may differ in a rare rounding.
        force: replace an existing `dst` (only a tiered layout or an empty directory; anything else is refused).
        progress: show a progress bar on stderr.
        fix: what to tell the user when `dst` cannot be written or has no room (the cache names its own remedy).
    Returns:
        A summary: bytes written, seconds, MB/s.
    """
    src, dst = Path(src), Path(dst)
    if dtype not in ("source", "bf16", "fp16", "fp32"):
        raise RepackError(f"--dtype must be source, bf16, fp16 or fp32, not {dtype!r}")
    if experts not in EXPERT_FORMATS:
        raise RepackError(f"--experts must be one of {', '.join(EXPERT_FORMATS)}, not {experts!r}")
    if dense not in DENSE_FORMATS:
        raise RepackError(f"--dense must be one of {', '.join(DENSE_FORMATS)}, not {dense!r}")
    if q4_refine not in Q4_REFINES:
        raise RepackError(f"--q4-refine must be one of {', '.join(Q4_REFINES)}, not {q4_refine!r}")
    quant_device = resolve_quant_device(quant_device)
    if q4_refine == "auto":
        q4_refine = "search" if quant_device == "cuda" else "lsq"
    refine = None if q4_refine == "none" else q4_refine
    if not src.is_dir():
        raise RepackError(f"{src} is not a directory: pass a Hugging Face checkpoint directory")
    if is_layout(src):
        raise RepackError(_already_a_layout(src))
    check_destination(src, dst, force)
    fam, cfg, _ = read_checkpoint_config(src)
    dense_src, expert_src, skipped = _index_source(src, fam, cfg)
    if skipped:  # vision towers, MTP heads, ...: what [ignore] of the family file names, layers past num_layers
        prefixes = fam.spec.get("ignore", {}).get("prefixes", [])
        mtp = sum(bool((m := _LAYER_INDEX.match(n)) and int(m[1]) >= cfg.num_layers) for n in skipped)
        groups = Counter(next((p + "*" for p in prefixes if n.startswith(p)), n) for n in skipped)
        print(f"tiered: repack skips {len(skipped)} tensors that [ignore] of {fam.path.name} names or that belong "
              f"to layers past num_hidden_layers={cfg.num_layers} (multi-token prediction: {mtp} tensors; not run): "
              + ", ".join(f"{g} ({c})" for g, c in sorted(groups.items())), file=sys.stderr)
    specs, bs = _plan_experts(expert_src, dtype, experts)
    if _derived(expert_src):  # experts in another form (layout/fused.py): the dtype they are written in
        float_dt = ST_DTYPES[_derived_dtype(expert_src, dtype)]
    else:
        code = _expert_source(expert_src, cfg.first_moe_layer, 0, "gate")[0].entry.dtype
        if code not in FLOAT_CODES:  # fp8 experts: the unquantized weights' dtype is the embedding's
            code = dense_src["embed"].entry.dtype if "embed" in dense_src else "BF16"
        float_dt = ST_DTYPES[_target(code, dtype)]
    cfg = ModelConfig.from_json({**cfg.to_json(), "source_dtype": float_dt})  # the dtype of unquantized weights
    dense_outs, dense_quant = _plan_dense(dense_src, dtype, dense)
    total = sum(o.nbytes for o in dense_outs) + cfg.num_layers * cfg.num_experts * bs
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
                blocks = _write_layout(src, dst, tmp, cfg, dense_outs, dense_quant, expert_src, specs, bs, dtype, rd,
                                       tick, refine, quant_device,
                                       {"experts_option": experts, "dense_option": dense, "q4_refine": q4_refine})
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
            "block_size": bs, "blocks": blocks, "skipped": skipped,
            "quant_device": quant_device if experts in QUANT_FORMATS or dense in QUANT_FORMATS else None}


def _write_layout(src: Path, dst: Path, tmp: Path, cfg: ModelConfig, dense_outs, dense_quant, expert_src, specs,
                  bs: int, dtype: str, rd: _Reader, tick: Callable[[int], None], refine, quant_device: str,
                  options: dict[str, Any]) -> int:
    """Write every file of the layout into `tmp`, then swap it into place at `dst`; returns the block count."""
    dense_sum = _write_dense(tmp / DENSE_FILE, dense_outs, dtype, rd, tick, refine, quant_device)
    sums = _write_experts(tmp / EXPERTS_FILE, cfg, expert_src, specs, bs, rd, tick, refine, quant_device)
    for name in TOKENIZER_FILES + ("config.json",):
        if (src / name).is_file():
            shutil.copyfile(src / name, tmp / (name if name != "config.json" else "source_config.json"))
    source = {"path": str(src.resolve()), "dtype_option": dtype, **options, "tiered_version": __version__}
    man = build_manifest(cfg, specs, bs, sums, (tmp / DENSE_FILE).stat().st_size, dense_sum, source, dense_quant)
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


def ensure_layout(path: str | Path, *, dtype: str = "source", experts: str = "source", dense: str = "source",
                  progress: bool = True) -> Path:
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
    key = cache_key(path, dtype, experts=experts, dense=dense)
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
    repack(path, dst, dtype=dtype, experts=experts, dense=dense, force=True, progress=progress, fix=fix)
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
