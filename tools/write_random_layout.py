"""Write a random-weight tiered layout straight to disk (no checkpoint staged): the 397B-shape slices of issue 16.

A checkpoint of a 397B slice cannot be staged beside its layout on a 64 GiB disk, so this tool writes the layout
itself: dense.safetensors, experts.bin (4 KiB-aligned blocks, each xxh3-checksummed), manifest.json (the same
`build_manifest` as `tiered repack`) and the reference model's tokenizer (its ids fit any vocab >= 8192), in a
temporary directory renamed into place when complete. `tiered verify`, `tiered inspect` and `tiered run` take it.

Presets (the Qwen3.5-MoE family, layouts/qwen3_5_moe.toml; --layers N cuts them, keeping the 3:1 pattern: layer l is
full attention when (l + 1) % 4 == 0, Gated DeltaNet otherwise):
  qwen35-397b       Qwen3.5-397B-A17B: hidden 4096, 512 experts of FFN 1024 + a shared expert of 1024, top-10,
                    32 query / 2 KV heads of 256 (partial rotary 0.25, gated output), DeltaNet 16 key / 64 value
                    heads of 128 (conv 4), vocab 248320, untied lm_head, 60 layers (45 DeltaNet + 15 attention).
                    The per-layer dims are the published config.json's; the rest are transformers'
                    Qwen3_5MoeTextConfig defaults. 396B parameters at 60 layers, 17.3B active.
  qwen35-397b-tiny  the same structure at a CPU size (hidden 64, 128 experts of 32, top-4): tests and --small runs.

Formats: --experts {bf16,q8,q4,fp8,mxfp4} and --dense {bf16,q8,q4} as `tiered repack` writes them (tiered/layout/
quant.py; --dense quantizes the matrices repack's `is_dense_matrix` picks, the others stay bf16). Block sizes are the
real format's: q4 is 6.75 MiB (7,077,888 bytes) per 397B expert. Weights are random but finite and of sensible
scale: packed codes are uniform random bytes, scales are drawn so that weights have a std near 0.02; float weights
are N(0, 0.02). Routing of random weights is near uniform: benchmarks replay real routing (predict/replay.py).

Speed: weights are drawn on --device (cuda when available) a chunk of experts at a time, hashed on the host and
written by a second thread, so the write runs at disk speed (a 16-layer q4 slice, 58 GB, takes about a minute at
1 GB/s). A progress bar goes to stderr; the last stdout line is a JSON summary.

    python3 tools/write_random_layout.py --preset qwen35-397b --layers 16 --experts q4 --dense q4 --out /root/s16
    python3 tools/write_random_layout.py --preset qwen35-397b-tiny --layers 8 --experts q4 --out /tmp/tiny
    python3 tools/write_random_layout.py --preset qwen35-397b --layers 60 --experts q4 --dense q4 --plan  # sizes only
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch
import xxhash

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tiered import __version__  # noqa: E402
from tiered.layout.config import ModelConfig  # noqa: E402
from tiered.layout.families import default_model_path, family_for  # noqa: E402
from tiered.layout.format import (ALIGN, DENSE_FILE, DTYPES, EXPERTS_FILE, MANIFEST, ST_ITEMSIZE, ST_NAMES,  # noqa: E402
                                  TensorSpec, build_manifest, fsync_dir, plan_block, quant_entries)
from tiered.layout.quant import QUANT_FORMATS  # noqa: E402
from tiered.layout.repack import is_dense_matrix  # noqa: E402

STD = 0.02  # the std of every random weight (float, or dequantized)
PRESETS: dict[str, dict[str, Any]] = {
    "qwen35-397b": dict(vocab_size=248320, hidden_size=4096, num_hidden_layers=60, num_attention_heads=32,
                        num_key_value_heads=2, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=64,
                        linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4,
                        num_experts=512, num_experts_per_tok=10, moe_intermediate_size=1024,
                        shared_expert_intermediate_size=1024, max_position_embeddings=262144,
                        tie_word_embeddings=False, rms_norm_eps=1e-6),
    "qwen35-397b-tiny": dict(vocab_size=8192, hidden_size=64, num_hidden_layers=8, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
                             linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4,
                             num_experts=128, num_experts_per_tok=4, moe_intermediate_size=32,
                             shared_expert_intermediate_size=32, max_position_embeddings=4096,
                             tie_word_embeddings=False, rms_norm_eps=1e-6),
}
EXPERT_CHOICES = ("bf16",) + QUANT_FORMATS
DENSE_CHOICES = ("bf16", "q8", "q4")
STORAGE_DTYPE = {"bf16": "bfloat16"}


def hf_config(preset: str, layers: int | None) -> dict[str, Any]:
    """config.json of the preset cut to `layers` layers (3:1 DeltaNet : attention)."""
    kw = dict(PRESETS[preset])
    n = int(layers or kw["num_hidden_layers"])
    kw["num_hidden_layers"] = n
    kw["layer_types"] = ["full_attention" if (l + 1) % 4 == 0 else "linear_attention" for l in range(n)]
    return {"architectures": ["Qwen3_5MoeForCausalLM"], "model_type": "qwen3_5_moe_text",
            "rope_parameters": {"rope_theta": 10000000.0, "partial_rotary_factor": 0.25, "rope_type": "default"},
            "full_attention_interval": 4, "dtype": "bfloat16", "bos_token_id": None, "eos_token_id": 1, **kw}


def dense_shapes(hf: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Canonical dense name -> shape, from transformers' model built on the meta device (no memory)."""
    import transformers as tf

    fam = family_for(hf)
    cfg = tf.Qwen3_5MoeTextConfig(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(cfg)
    out = {}
    for name, p in model.named_parameters():
        kind, canon, _, _ = fam.classify(name)
        if kind == "dense":
            out[canon] = tuple(p.shape)
    return out


# --- random parts -------------------------------------------------------------------------------------
def fill_(t: torch.Tensor, scheme: str | None, part: str, gen: torch.Generator) -> None:
    """Fill `t` (a view of a block pool or a fresh tensor) in place with random values of one stored part.

    part: "q" (packed codes, or the float weight itself when scheme is None), "scale" or "min"."""
    if scheme is None:  # a float weight
        t.normal_(0.0, STD, generator=gen)
    elif part == "q":
        if scheme == "fp8":
            t.copy_(torch.randn(t.shape, generator=gen, device=t.device).to(t.dtype))  # e4m3 of N(0, 1)
        elif t.dtype == torch.int8:
            t.random_(-127, 128, generator=gen)
        else:  # uint8 nibbles (q4, mxfp4): every byte is two valid codes
            t.random_(0, 256, generator=gen)
    elif scheme == "q4":  # w = q * s + m, q uniform on 0..15 (std 4.6): s ~ STD / 4.6, m ~ -7.5 s
        t.uniform_(0.8 * STD / 4.6, 1.2 * STD / 4.6, generator=gen)
        if part == "min":
            t.mul_(-7.5)
    elif scheme == "q8":  # q uniform on -127..127 (std 73)
        t.uniform_(0.8 * STD / 73, 1.2 * STD / 73, generator=gen)
    elif scheme == "fp8":
        t.uniform_(0.8 * STD, 1.2 * STD, generator=gen)
    else:  # mxfp4: e8m0 exponent byte, 2^(e - 127); fp4 values have std ~ 2.9
        t.random_(119, 121, generator=gen)


def _part_of(spec: TensorSpec, by_name: dict[str, TensorSpec]) -> tuple[str | None, str]:
    """(scheme, part) of a block tensor: the codes carry the quant dict, scales/mins are named in it."""
    if spec.quant:
        return spec.quant["scheme"], "q"
    for other in by_name.values():
        if other.quant:
            for part in ("scale", "min"):
                if other.quant.get(part) == spec.name:
                    return other.quant["scheme"], part
    return None, "q"


def fill_blocks(pool: torch.Tensor, specs: list[TensorSpec], gen: torch.Generator) -> None:
    """Random weights into every block of `pool` (uint8 [S, block_size], zeroed padding kept)."""
    by_name = {s.name: s for s in specs}
    for s in specs:
        scheme, part = _part_of(s, by_name)
        raw = pool[:, s.offset:s.offset + s.nbytes]
        fill_(raw.view(DTYPES[s.dtype]).view(pool.shape[0], *s.shape), scheme, part, gen)


# --- dense ----------------------------------------------------------------------------------------------
def _dense_init(name: str, t: torch.Tensor, gen: torch.Generator) -> None:
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "lin_norm":  # the DeltaNet's gated RMSNorm multiplies by its weight (ones at init)
        t.fill_(1.0)
    elif leaf == "lin_A_log":
        t.uniform_(0.0, 2.7, generator=gen)  # log of A in (1, 15), as transformers initialises it
    elif leaf == "lin_dt_bias":
        t.fill_(1.0)
    elif leaf.endswith("norm"):  # zero-centred norms (norm_offset 1): small offsets around a unit scale
        t.normal_(0.0, 0.1, generator=gen)
    else:
        t.normal_(0.0, STD, generator=gen)


def plan_dense(shapes: dict[str, tuple[int, ...]], fmt: str) -> tuple[list[tuple], dict[str, dict]]:
    """(name, code, shape, (weight name, scheme, part)) per stored tensor, widest first as repack orders them, and the
    manifest's quant descriptions."""
    outs, quant = [], {}
    for name, shape in shapes.items():
        class _E:  # is_dense_matrix reads .shape and .dtype
            pass
        e = _E()
        e.shape, e.dtype = shape, "BF16"
        if fmt in QUANT_FORMATS and is_dense_matrix(name, e):
            entries = quant_entries(name, fmt, shape)
            quant[name] = entries[0][3]
            for (pname, pshape, dt, _), part in zip(entries, ("q", "scale", "min")):
                outs.append((pname, ST_NAMES[dt], tuple(pshape), (name, fmt, part)))
        else:
            outs.append((name, "BF16", tuple(shape), (name, None, "q")))
    outs.sort(key=lambda o: (-ST_ITEMSIZE[o[1]], o[0]))
    return outs, quant


def nbytes_of(code: str, shape: tuple[int, ...]) -> int:
    n = ST_ITEMSIZE[code]
    for s in shape:
        n *= s
    return n


def write_dense(path: Path, outs: list[tuple], device: torch.device, gen: torch.Generator,
                tick: Callable[[int], None]) -> str:
    """dense.safetensors (header padded so the data starts 4 KiB-aligned, as repack writes it); returns its xxh3."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "writer": f"tiered {__version__} write_random_layout"}}
    off = 0
    for name, code, shape, _ in outs:
        n = nbytes_of(code, shape)
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-(8 + len(hb)) % ALIGN)
    h = xxhash.xxh3_64()
    with open(path, "wb") as f:
        for piece in (len(hb).to_bytes(8, "little"), hb):
            f.write(piece)
            h.update(piece)
        for name, code, shape, (wname, scheme, part) in outs:
            dt = DTYPES[{"BF16": "bfloat16", "F32": "float32", "I8": "int8", "U8": "uint8",
                         "F8_E4M3": "float8_e4m3fn"}[code]]
            rows = max(1, (64 << 20) // max(1, nbytes_of(code, shape[1:]) if len(shape) > 1 else 1))
            for r0 in range(0, shape[0], rows):  # row chunks keep memory near 64 MiB for the embeddings
                t = torch.empty((min(rows, shape[0] - r0), *shape[1:]), dtype=dt, device=device)
                if scheme is None:
                    _dense_init(wname, t, gen)
                else:
                    fill_(t, scheme, part, gen)
                b = t.cpu().contiguous().view(torch.uint8).numpy().tobytes()
                f.write(b)
                h.update(b)
                tick(len(b))
        f.flush()
        os.fsync(f.fileno())
    return h.hexdigest()


# --- experts --------------------------------------------------------------------------------------------
class _Writer:
    """Writes host buffers on a second thread so that drawing and hashing overlap the disk."""

    def __init__(self, path: Path) -> None:
        self.f = open(path, "wb")
        self.todo: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while (buf := self.todo.get()) is not None:
            try:
                if self.error is None:
                    self.f.write(buf)
            except BaseException as e:  # surfaced by put()/close()
                self.error = e

    def put(self, buf: memoryview) -> None:
        if self.error:
            raise self.error
        self.todo.put(buf)

    def close(self) -> None:
        self.todo.put(None)
        self.thread.join()
        if self.error:
            raise self.error
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


def write_experts(path: Path, cfg: ModelConfig, specs: list[TensorSpec], bs: int, device: torch.device,
                  gen: torch.Generator, tick: Callable[[int], None], chunk_bytes: int = 512 << 20) -> list[str]:
    """experts.bin, layer-major, chunks of experts drawn on `device`; returns the blocks' xxh3 in (layer, expert) order."""
    E = cfg.num_experts
    per = max(1, min(E, chunk_bytes // bs))
    sums: list[str] = []
    w = _Writer(path)
    try:
        for layer in range(cfg.num_layers):
            for e0 in range(0, E, per):
                n = min(per, E - e0)
                pool = torch.zeros((n, bs), dtype=torch.uint8, device=device)
                fill_blocks(pool, specs, gen)
                host = pool.cpu().numpy()
                mv = memoryview(host).cast("B")
                sums += [xxhash.xxh3_64_hexdigest(mv[i * bs:(i + 1) * bs]) for i in range(n)]
                w.put(mv)
                tick(n * bs)
    finally:
        w.close()
    return sums


# --- the layout -----------------------------------------------------------------------------------------
def plan(preset: str, layers: int | None, experts: str, dense: str) -> dict[str, Any]:
    """Everything but the bytes: config, block specs and sizes (also what --plan prints)."""
    hf = hf_config(preset, layers)
    fam = family_for(hf)
    cfg = fam.normalise(hf)
    F, D = cfg.expert_ffn, cfg.hidden_size
    store = STORAGE_DTYPE.get(experts, experts)
    specs, bs = plan_block({"gate": ((F, D), store), "up": ((F, D), store), "down": ((D, F), store)})
    shapes = dense_shapes(hf)
    outs, dquant = plan_dense(shapes, dense)
    dense_bytes = sum(nbytes_of(c, s) for _, c, s, _ in outs)
    not_scaled = sum(nbytes_of(c, s) for n, c, s, _ in outs if n.split(".")[0] in ("embed", "lm_head", "final_norm"))
    return {"hf": hf, "cfg": cfg, "specs": specs, "block_size": bs, "dense_outs": outs, "dense_quant": dquant,
            "dense_bytes": dense_bytes, "dense_bytes_not_per_layer": not_scaled,
            "embed_bytes": sum(nbytes_of(c, s) for n, c, s, _ in outs if n == "embed"),
            "expert_bytes": cfg.num_layers * cfg.num_experts * bs}


def write_layout(out: Path, *, preset: str, layers: int | None, experts: str = "q4", dense: str = "bf16",
                 seed: int = 0, device: str | None = None, progress: bool = True, force: bool = False,
                 margin_gb: float = 2.0) -> dict[str, Any]:
    """Write the layout at `out` (atomically); returns a summary (bytes, seconds, GB/s, sizes)."""
    from tqdm import tqdm

    if experts not in EXPERT_CHOICES:
        raise SystemExit(f"--experts must be one of {EXPERT_CHOICES}, not {experts!r}")
    if dense not in DENSE_CHOICES:
        raise SystemExit(f"--dense must be one of {DENSE_CHOICES}, not {dense!r}")
    out = Path(out)
    if out.exists() and not force:
        raise SystemExit(f"{out} exists: pass --force to replace it (only a tiered layout is replaced)")
    if out.exists() and not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise SystemExit(f"{out} exists and is not a tiered layout: choose another --out")
    p = plan(preset, layers, experts, dense)
    cfg: ModelConfig = p["cfg"]
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    total = p["dense_bytes"] + p["expert_bytes"]
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free + (_du(out) if out.exists() else 0)
    if total + margin_gb * 1e9 > free:
        raise SystemExit(f"the layout needs {total / 1e9:.1f} GB plus a {margin_gb} GB margin, {free / 1e9:.1f} GB is "
                         f"free on {out.parent}: pass fewer --layers")
    tmp = out.parent / f".{out.name}.tiered-partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    gen = torch.Generator(device=dev).manual_seed(seed)
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="write", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    t0 = time.perf_counter()
    ok = False
    try:
        dsum = write_dense(tmp / DENSE_FILE, p["dense_outs"], dev, gen, bar.update)
        t1 = time.perf_counter()
        sums = write_experts(tmp / EXPERTS_FILE, cfg, p["specs"], p["block_size"], dev, gen, bar.update)
        t2 = time.perf_counter()
        ref = default_model_path()
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (ref / name).is_file():
                shutil.copyfile(ref / name, tmp / name)
        (tmp / "source_config.json").write_text(json.dumps(p["hf"], indent=1))
        source = {"path": f"random:{preset}", "generator": "tools/write_random_layout.py", "preset": preset,
                  "seed": seed, "dtype_option": "bf16", "experts_option": experts, "dense_option": dense,
                  "tiered_version": __version__}
        man = build_manifest(cfg, p["specs"], p["block_size"], sums, (tmp / DENSE_FILE).stat().st_size, dsum,
                             source, p["dense_quant"])
        with open(tmp / MANIFEST, "w") as f:  # last: its presence marks a complete layout
            json.dump(man, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
        fsync_dir(out.parent)
        ok = True
    finally:
        bar.close()
        if not ok:
            shutil.rmtree(tmp, ignore_errors=True)
    secs = time.perf_counter() - t0
    return {"out": str(out), "preset": preset, "layers": cfg.num_layers, "experts": experts, "dense": dense,
            "device": str(dev), "block_size": p["block_size"], "expert_bytes": p["expert_bytes"],
            "dense_bytes": p["dense_bytes"], "dense_bytes_not_per_layer": p["dense_bytes_not_per_layer"],
            "bytes": total, "seconds": secs, "dense_s": t1 - t0, "experts_s": t2 - t1,
            "gb_s": total / 1e9 / max(secs, 1e-9)}


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="qwen35-397b")
    ap.add_argument("--layers", type=int, default=None, help="N layers of the preset [default: all]")
    ap.add_argument("--experts", choices=EXPERT_CHOICES, default="q4")
    ap.add_argument("--dense", choices=DENSE_CHOICES, default="bf16")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None, help="where weights are drawn [default: cuda when available]")
    ap.add_argument("--force", action="store_true", help="replace an existing layout at --out")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--plan", action="store_true", help="print the sizes only; write nothing")
    a = ap.parse_args()
    if a.plan:
        p = plan(a.preset, a.layers, a.experts, a.dense)
        print(json.dumps({"layers": p["cfg"].num_layers, "block_size": p["block_size"],
                          "expert_bytes": p["expert_bytes"], "dense_bytes": p["dense_bytes"],
                          "dense_bytes_not_per_layer": p["dense_bytes_not_per_layer"],
                          "total_bytes": p["expert_bytes"] + p["dense_bytes"]}))
        return
    if a.out is None:
        raise SystemExit("--out DIR is required (or --plan)")
    print(json.dumps(write_layout(a.out, preset=a.preset, layers=a.layers, experts=a.experts, dense=a.dense,
                                  seed=a.seed, device=a.device, progress=not a.no_progress, force=a.force)))


if __name__ == "__main__":
    main()
