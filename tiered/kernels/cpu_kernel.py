"""The native CPU kernel: cpu_kernel.c compiled for this machine on first use, loaded with ctypes.

Owns: building the shared library (`cc -O3 -march=native -fopenmp -shared -fPIC`, into
$XDG_CACHE_HOME/tiered-kernels/cpu/, keyed by the source's hash, the compiler, the flags and the CPU's feature
flags; written under a temporary name and renamed, so concurrent first uses are safe), `CpuKernel.load` (None
with a one-line warning saying why when there is no compiler or the build fails: the caller falls back to
torch), `CpuKernel.partial` (one token's CPU experts of a layer, read in place from the block views),
`CpuKernel.gemv` (tokens through one stored matrix, q8/q4 or float: qlinear's CPU path; from GEMM_MIN_ROWS the
tiled GEMM), `CpuKernel.expert_rows` (a wave of experts, each over its own rows: a CPU prompt's or batch step's),
and `shared` (the kernel a CPU step uses, loaded once a process; None under TIERED_CPU_KERNEL=torch).
Does not own: the torch reference and the choice between the two paths (cpu_experts.py), the worker thread and
the thread count (store/offload.py), which experts go to the CPU (store/cache.py), the device step's mailbox
(model/cpu_mailbox.py, which runs the library's `tiered_cpu_serve` loop through `serve_fn`).

The kernel takes, per job, the base address of each stored part (gate, up, down: codes, and the q8/q4 scales
and q4 mins) of that expert's row in its pool view (`ExpertWeights` over the file mapping or the RAM tier's
rows): row r of a [S, ...] view starts at data_ptr() + r * stride(0) * itemsize. Nothing is copied.
Supported: weights fp32, bf16, fp16, q8, q4 with the plain SwiGLU and no biases; compute dtype fp32, bf16,
fp16. Anything else (fp8, mxfp4, gpt-oss's clamped activation or biases) takes the torch path.

Legend: D hidden, F expert FFN, n jobs, S rows of a pool view.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tiered.layout.cachedir import cache_root
from tiered.layout.quant import QuantWeight

SOURCE = Path(__file__).with_name("cpu_kernel.c")
FMT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, "q8": 3, "q4": 4}  # cpu_kernel.c's FMT_*
ROUND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # compute dtype -> RND_*
ACT_Q8 = 4  # cpu_kernel.c's ACT_Q8 bit of the rounding argument
ACTS = ("float", "q8")  # CpuKernel's activation modes (TIERED_CPU_ACT)
CFLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")
GEMM_MIN_ROWS = 4  # from this many rows `gemv` takes tiered_cpu_gemm (rows dequantized once a block)


@dataclass(frozen=True, eq=False)
class _Plan:
    """A pool view as the kernel reads it: format code, D, F, the groups along D and F, and per part (gate, up,
    down x codes, scales, mins) the address of row 0 and the row stride in bytes (0 and 0 for an absent part)."""

    fmt: int
    D: int
    F: int
    gi: int
    gf: int
    base: Any  # c_uint64 * 9
    stride: Any  # c_int64 * 9

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return self.fmt, self.D, self.F, self.gi, self.gf


class KernelUnavailable(RuntimeError):
    """The native kernel cannot be built or loaded here; the message says why."""


def kernel_dir() -> Path:
    """Where built kernels are kept: beside the layout cache (not in it: `tiered cache` lists layouts only)."""
    return cache_root().parent / "tiered-kernels" / "cpu"


def _cpu_signature() -> str:
    """The machine and its CPU feature flags (a library built with -march=native runs only where they match)."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = " ".join(sorted(line.split(":", 1)[1].split()))
                    break
    except OSError:
        flags = platform.processor()
    return f"{platform.machine()} {flags}"


def _compiler() -> str | None:
    cc = os.environ.get("CC") or "cc"
    return shutil.which(cc) or shutil.which("gcc") or shutil.which("clang")


def build(march: str = "native", *, cc: str | None = None, quiet: bool = True, defines: tuple[str, ...] = ()) -> Path:
    """Compile cpu_kernel.c for `march` (e.g. "native"; tests also build "haswell" and "x86-64" to cover the
    AVX2 and portable paths) unless a matching build is cached; returns the library's path. `defines`: -D flags
    (e.g. "PFQ=8": benchmarks/ab_cpu_builds.py compares such builds), part of the cache key."""
    cc = cc or _compiler()
    if cc is None:
        raise KernelUnavailable("no C compiler found (set CC or install gcc)")
    src = SOURCE.read_bytes()
    try:
        ver = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout.split("\n")[0]
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelUnavailable(f"compiler {cc} does not run: {e}") from e
    flags = (f"-march={march}",) + CFLAGS + tuple(f"-D{d}" for d in defines)
    key = hashlib.sha256(b"\0".join([src, ver.encode(), " ".join(flags).encode(),
                                     _cpu_signature().encode()])).hexdigest()[:20]
    out = kernel_dir() / f"cpu_kernel-{march}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cc, *flags, str(SOURCE), "-o", tmp, "-lm"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            msg = (r.stderr or r.stdout).strip().splitlines()
            raise KernelUnavailable(f"`{' '.join(cmd)}` failed: {msg[0] if msg else r.returncode}")
        os.replace(tmp, out)
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelUnavailable(f"compiling {SOURCE.name} with {cc} failed: {e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if not quiet:
        print(f"tiered: built the CPU expert kernel {out}", file=sys.stderr)
    return out


class CpuKernel:
    """The loaded library. `partial` returns None for work it does not support (the caller uses torch)."""

    def __init__(self, path: Path, act: str = "float") -> None:
        if act not in ACTS:
            raise ValueError(f"CPU kernel activation mode {act!r}: use one of {', '.join(ACTS)}")
        self.path = Path(path)
        # "q8": q4 products take their inputs rounded to 8 bits per group (integer dot products); "float": as given
        self.act = act
        lib = ctypes.CDLL(str(path))  # ctypes releases the GIL during the call
        f = lib.tiered_cpu_experts
        f.restype = ctypes.c_int
        f.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                      ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                      ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        self._fn = f
        self._lib = lib
        g = lib.tiered_cpu_serve  # the device step's mailbox loop (model/cpu_mailbox.py)
        g.restype = ctypes.c_int
        g.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 2 + [ctypes.c_void_p] * 2 + [ctypes.c_int] * 7 \
            + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
        self.serve_fn = g
        v = lib.tiered_cpu_gemv
        v.restype = ctypes.c_int
        v.argtypes = [ctypes.c_int] * 4 + [ctypes.c_void_p] * 4 + [ctypes.c_int, ctypes.c_void_p] + [ctypes.c_int] * 2
        self._gemv = v
        t = lib.tiered_cpu_gemm  # the same arguments: the tiled path for many rows
        t.restype = ctypes.c_int
        t.argtypes = v.argtypes
        self._gemm = t
        r = lib.tiered_cpu_expert_rows  # several experts over their own rows (a prompt's, a batch step's)
        r.restype = ctypes.c_int
        r.argtypes = [ctypes.c_int, ctypes.c_int] + [ctypes.c_void_p] * 4 + [ctypes.c_int] * 4 \
            + [ctypes.c_void_p] * 2 + [ctypes.c_int] * 2
        self._rows = r
        self.caps = int(lib.tiered_cpu_caps())
        self.simd = int(lib.tiered_cpu_simd())  # 512, 256 or 0
        self._plans: dict[int, tuple[Any, _Plan | None]] = {}  # id(ExpertWeights) -> (the object, its plan)
        self._joined: dict[tuple, tuple] = {}  # ids of several plans -> (the plans, their joined base, stride)

    @classmethod
    def load(cls, march: str = "native", *, warn: bool = True, act: str = "float") -> "CpuKernel | None":
        """Build (or find) and load the kernel; None, with a one-line warning on stderr, when that fails."""
        try:
            return cls(build(march, defines=env_defines()), act)
        except (KernelUnavailable, OSError, AttributeError) as e:
            if warn:
                print(f"tiered: CPU experts use torch (the native kernel is unavailable: {e})", file=sys.stderr)
            return None

    @property
    def simd_name(self) -> str:
        """avx512 (+bf16 when q4 in bf16 uses AVX512-BF16), avx2 or scalar; +q8act (and vnni where its integer
        products are VNNI's) in the q8 activation mode."""
        name = {512: "avx512", 256: "avx2"}.get(self.simd, "scalar")
        name += "-bf16" if self.caps >> 9 & 1 else ""
        if self.act == "q8":
            name += "-q8act" + ("-vnni" if self.caps >> 11 & 1 else "")
        return name

    def mode(self, dtype: torch.dtype) -> int:
        """The kernel's rounding argument for a compute dtype: RND_* plus ACT_Q8 in the q8 activation mode."""
        return ROUND[dtype] | (ACT_Q8 if self.act == "q8" else 0)

    def _plan(self, W: Any) -> "_Plan | None":
        """A pool view's format, sizes and per-part (base address, row stride in bytes); None if unsupported."""
        hit = self._plans.get(id(W))
        if hit is not None and hit[0] is W:
            return hit[1]
        plan = self._make_plan(W)
        self._plans[id(W)] = (W, plan)
        return plan

    def _make_plan(self, W: Any) -> "_Plan | None":
        if getattr(W, "gate_bias", None) is not None:
            return None
        mats = (W.gate, W.up, W.down)
        if all(isinstance(m, QuantWeight) for m in mats):
            fmt = mats[0].fmt
            if fmt not in FMT or any(m.fmt != fmt or len(m.lead) != 1 for m in mats):
                return None
            F, D = mats[0].matrix
            if mats[1].matrix != (F, D) or mats[2].matrix != (D, F):
                return None
            groups = (mats[0].group, mats[2].group)
            parts = [(m.q, m.scale, m.min) for m in mats]
        elif all(isinstance(m, Tensor) for m in mats):
            dt = mats[0].dtype
            if dt not in FMT or any(m.dtype != dt or m.dim() != 3 for m in mats):
                return None
            F, D = mats[0].shape[1:]
            if tuple(mats[1].shape[1:]) != (F, D) or tuple(mats[2].shape[1:]) != (D, F):
                return None
            fmt, groups = dt, (1, 1)
            parts = [(m, None, None) for m in mats]
        else:
            return None
        if not self.caps >> FMT[fmt] & 1:
            return None
        base, stride = [], []
        for trio in parts:
            for t in trio:
                if t is None:
                    base.append(0)
                    stride.append(0)
                    continue
                if t.device.type != "cpu" or t.stride(-1) != 1 or (t.dim() == 3 and t.stride(1) != t.shape[2]):
                    return None  # rows of a matrix must be contiguous (they are in every block layout)
                base.append(t.data_ptr())
                stride.append(t.stride(0) * t.element_size())
        return _Plan(FMT[fmt], int(D), int(F), int(groups[0]), int(groups[1]), (ctypes.c_uint64 * 9)(*base),
                     (ctypes.c_int64 * 9)(*stride))

    def gemv(self, x: Tensor, w: QuantWeight | Tensor, *, threads: int = 0,
             tiled: bool | None = None) -> Tensor | None:
        """Tokens through one stored matrix, read in place: x [T, K] host, compute dtype -> [T, N] in x's dtype, each
        output rounded once from its fp32 sum (tiered_cpu_gemv, the weights read once for the T tokens; or with
        `tiled`, by default from GEMM_MIN_ROWS tokens, tiered_cpu_gemm: each block of rows dequantized once).
        w: q8 / q4 parts, or a plain fp32 / bf16 / fp16 matrix (a bf16 one kept as stored under fp32 compute:
        widened exactly, the same sums as F.linear over its fp32 copy). None where this build, the
        format, the dtype or the layout (one contiguous matrix on the host) does not fit: the caller takes torch."""
        dt = x.dtype
        if dt not in ROUND or x.device.type != "cpu" or x.dim() != 2 or (dt == torch.float16 and not self.caps >> 8 & 1):
            return None
        if isinstance(w, QuantWeight):
            if w.fmt not in FMT or w.lead:
                return None
            fmt, (n, k), group, parts = FMT[w.fmt], w.matrix, w.group, (w.q, w.scale, w.min)
        else:
            if w.dim() != 2 or w.dtype not in FMT:
                return None
            fmt, (n, k), group, parts = FMT[w.dtype], tuple(w.shape), 1, (w, None, None)
        if not self.caps >> fmt & 1:
            return None
        if any(t.device.type != "cpu" or not t.is_contiguous() for t in parts if t is not None):
            return None
        if x.shape[1] != k:
            raise ValueError(f"CPU GEMV: x has {x.shape[1]} inputs, the matrix takes {k}")
        x = x.contiguous()
        out = torch.empty(x.shape[0], n, dtype=dt)
        q, sc, mn = (0 if t is None else t.data_ptr() for t in parts)
        if tiled is None:
            tiled = x.shape[0] >= GEMM_MIN_ROWS
        fn = self._gemm if tiled else self._gemv
        rc = fn(fmt, n, k, group, q, sc, mn, x.data_ptr(), x.shape[0], out.data_ptr(), self.mode(dt),
                int(threads))
        if rc == -1:
            return None
        if rc != 0:
            raise MemoryError(f"CPU GEMV {self.path.name}: out of memory for a [{n}, {k}] matrix and {x.shape[0]} rows")
        return out

    def expert_rows(self, x: Tensor, W: Any, slots: list[int], counts: list[int], *, threads: int = 0) -> Tensor | None:
        """Experts over their own rows, read in place: x [sum(counts), D] host, compute dtype, the rows of expert j
        (pool view W, row slots[j]) consecutive and in order -> [sum(counts), D] in x's dtype: each row's
        down(silu(gate x) * up x), unweighted, rounded as `partial` rounds one expert (tiered_cpu_expert_rows: one
        call for them all, each block of rows dequantized once a pass from 4 tokens). None where the kernel does not
        read W (format, biases) or this dtype: the caller takes torch."""
        dt = x.dtype
        if dt not in ROUND or x.device.type != "cpu" or x.dim() != 2:
            return None
        if dt == torch.float16 and not self.caps >> 8 & 1:
            return None
        plan = self._plan(W)
        if plan is None:
            return None
        fmt, D, F, gi, gf = plan.shape
        n = len(slots)
        if len(counts) != n or x.shape != (sum(counts), D):
            raise ValueError(f"CPU expert rows: x is {list(x.shape)} for {n} experts of {sum(counts)} rows and D {D}")
        x = x.contiguous()
        out = torch.empty_like(x)
        rows = (ctypes.c_int64 * n)(*slots)
        cnt = (ctypes.c_int32 * n)(*counts)
        rc = self._rows(fmt, n, plan.base, plan.stride, rows, cnt, D, F, gi, gf, x.data_ptr(), out.data_ptr(),
                        self.mode(dt), int(threads))
        if rc == -1:
            return None
        if rc != 0:
            raise MemoryError(f"CPU expert rows {self.path.name}: out of memory for {n} experts, {x.shape[0]} rows")
        return out

    def supports(self, W: Any, act: Any, dtype: torch.dtype) -> bool:
        """Whether `partial` computes experts of this pool view with this activation in this compute dtype."""
        return act is None and dtype in ROUND and (dtype != torch.float16 or self.caps >> 8 & 1) \
            and self._plan(W) is not None

    def partial(self, x: Tensor, w_route: Tensor | list[float], jobs: list[tuple[int, Any, int]], *,
                threads: int, fp32_weights: bool = False, act: Any = None) -> Tensor | None:
        """x [1, D] host (compute dtype), w_route [K] routing weights, jobs [(k, W, row)] -> [1, D] compute dtype:
        sum over the jobs of w_route[k] * expert(W, row)(x), the cpu_partial math; None if unsupported."""
        dt = x.dtype
        if act is not None or dt not in ROUND or not jobs:
            return None
        W0 = jobs[0][1]
        plan = self._plan(W0)
        if plan is None:
            return None
        n = len(jobs)
        views = None  # all jobs in one pool view (the common case): the kernel takes view 0 for every job
        bases, strides = plan.base, plan.stride
        if any(W is not W0 for _, W, _ in jobs):
            plans: list = []
            at: dict[int, int] = {}
            for _, W, _ in jobs:
                if id(W) not in at:
                    pw = self._plan(W)
                    if pw is None or pw.shape != plan.shape:
                        return None
                    at[id(W)] = len(plans)
                    plans.append(pw)
            views = (ctypes.c_int32 * n)(*[at[id(W)] for _, W, _ in jobs])
            key = tuple(map(id, plans))
            both = self._joined.get(key)
            if both is None or any(a is not b for a, b in zip(both[0], plans)):
                both = (plans, (ctypes.c_uint64 * (9 * len(plans)))(*[b for q in plans for b in q.base]),
                        (ctypes.c_int64 * (9 * len(plans)))(*[v for q in plans for v in q.stride]))
                self._joined[key] = both
            bases, strides = both[1], both[2]
        fmt, D, F, gi, gf = plan.shape
        wl = w_route.tolist() if isinstance(w_route, Tensor) else list(w_route)
        rows = (ctypes.c_int64 * n)(*[r for _, _, r in jobs])
        wts = (ctypes.c_float * n)(*[wl[k] for k, _, _ in jobs])
        x = x.contiguous()
        if x.numel() != D:
            raise ValueError(f"CPU experts: x has {x.numel()} values, the experts' hidden size is {D}")
        out = torch.empty(1, D, dtype=dt)
        # the device path rounds the routing weights to the compute dtype unless fp32_weights: the kernel does
        rc = self._fn(fmt, n, bases, strides, views, rows, wts, int(not fp32_weights), D, F, gi, gf, x.data_ptr(),
                      out.data_ptr(), self.mode(dt), int(threads))
        if rc == -1:
            return None
        if rc != 0:
            raise MemoryError(f"CPU expert kernel {self.path.name}: out of memory for {n} experts of D {D}, F {F}")
        return out


ENV = "TIERED_CPU_KERNEL"
DEFINES_ENV = "TIERED_CPU_DEFINES"


def env_defines() -> tuple[str, ...]:
    """A benchmark knob: TIERED_CPU_DEFINES, comma-separated -D defines for the native build every run loads (e.g.
    "PFD=0" to time the build without dense-row prefetch against the default in one lease). Empty by default."""
    return tuple(d.strip() for d in os.environ.get(DEFINES_ENV, "").split(",") if d.strip())


def native_enabled() -> bool:
    """Whether CPU work may take the native kernel: unless TIERED_CPU_KERNEL=torch."""
    return os.environ.get(ENV, "native").strip().lower() != "torch"


ACT_ENV = "TIERED_CPU_ACT"


def act_mode() -> str:
    """The native kernel's activation mode for q4 products, from TIERED_CPU_ACT: "float" (the default: the inputs
    as given, fp32 sums, the torch path's math) or "q8" (each input group rounded to 8 bits, integer dot products:
    faster, with its own rounding error, measured with `tiered eval` in notes/Q4_DECODE.md)."""
    v = os.environ.get(ACT_ENV, "").strip().lower() or "float"
    if v not in ACTS:
        raise ValueError(f"{ACT_ENV}={v!r}: use one of {', '.join(ACTS)}")
    return v


@functools.lru_cache(maxsize=None)
def _loaded(act: str) -> "CpuKernel | None":
    return CpuKernel.load(act=act)


def shared() -> "CpuKernel | None":
    """The kernel a CPU decode step uses for its dense GEMVs and its experts (built on first use, then the same
    library for the process); None when TIERED_CPU_KERNEL=torch or it cannot be built (a one-line warning, once)."""
    return _loaded(act_mode()) if native_enabled() else None
