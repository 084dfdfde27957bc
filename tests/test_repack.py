"""Repack, verify, inspect and the zero-copy reader, on tiny checkpoints of every family and the reference model."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import FAMILIES, REPO, make_checkpoint
from tiered.layout.families import FamilyError, read_checkpoint_config
from tiered.layout.format import ALIGN, EXPERTS_FILE, MANIFEST, LayoutError
from conftest import source_tensors
from tiered.layout.repack import PAUSE_ENV, RepackError, is_layout, repack, verify
from tiered.store.disk import Layout, expert_views



def cli(*args, env=None, check=False):
    return subprocess.run([sys.executable, "-m", "tiered", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})}, check=check)


def assert_bit_identical(src: Path, dst: Path) -> int:
    """Every expert tensor read back through the zero-copy views equals the source tensor bit for bit."""
    fam, cfg, _ = read_checkpoint_config(src)
    lay = Layout.open(dst)
    views = expert_views(lay.expert_file_pool(), lay.tensor_specs)
    n = 0
    for name, t in source_tensors(src).items():
        kind, role, layer, expert = fam.classify(name)
        if kind != "expert":
            continue
        pooled = getattr(views, role)[layer * cfg.num_experts + expert]
        assert torch.equal(pooled.view(torch.uint8), t.view(torch.uint8)), f"{name} differs"
        n += 1
    assert n == cfg.num_layers * cfg.num_experts * 3
    return n


@pytest.mark.parametrize("family", FAMILIES)
def test_repack_is_bit_identical(family, tiny_checkpoints, tmp_path):
    """Every expert tensor of every family reads back bit-identical through the zero-copy path; dense too."""
    src = tiny_checkpoints[family]
    dst = tmp_path / "lay"
    repack(src, dst, progress=False)
    assert_bit_identical(src, dst)
    fam, cfg, _ = read_checkpoint_config(src)
    dense = Layout.open(dst).dense()
    srcs = source_tensors(src)
    for name, t in srcs.items():
        kind, canon, *_ = fam.classify(name)
        if kind == "dense":
            assert torch.equal(dense[canon], t), canon
    assert verify(dst, progress=False) == []


def test_reference_model_bit_identical(reference_model, reference_layout):
    """The trained reference model (bf16, 3 shards) repacks bit-identically and verifies clean."""
    assert_bit_identical(reference_model, reference_layout)
    assert verify(reference_layout, progress=False) == []


def test_block_alignment(reference_layout):
    """Every block starts 4 KiB-aligned and its size is a multiple of 4 KiB; tensors fit inside."""
    man = json.loads((reference_layout / MANIFEST).read_text())
    ex = man["experts"]
    assert ex["block_size"] % ALIGN == 0
    for b in ex["blocks"]:
        assert b["offset"] % ALIGN == 0 and b["size"] % ALIGN == 0
    for t in ex["tensors"]:
        assert t["offset"] + t["nbytes"] <= ex["block_size"]
    assert (reference_layout / "tokenizer.json").is_file()


@pytest.mark.parametrize("dtype,want", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_repack_dtype_conversion(dtype, want, tiny_checkpoints, tmp_path):
    """--dtype converts stored weights exactly as torch's .to() does."""
    src = tiny_checkpoints["qwen3_moe"]
    repack(src, tmp_path / "lay", dtype=dtype, progress=False)
    lay = Layout.open(tmp_path / "lay")
    assert lay.config.source_dtype == str(want).removeprefix("torch.")
    ref = source_tensors(src)["model.layers.1.mlp.experts.3.down_proj.weight"].to(want)
    down = expert_views(lay.expert_file_pool(), lay.tensor_specs).down[1 * lay.config.num_experts + 3]
    assert torch.equal(down, ref)
    assert lay.dense()["embed"].dtype == want


def test_config_spellings_4x_and_5x(tiny_checkpoints, tmp_path):
    """transformers 4.x keys (rope_theta, num_experts for Qwen3) and 5.x keys give the same ModelConfig."""
    src = tiny_checkpoints["qwen3_moe"]
    _, cfg5, hf = read_checkpoint_config(src)
    old = dict(hf)
    old["rope_theta"] = old.pop("rope_parameters")["rope_theta"]
    old["num_experts"] = old.pop("num_local_experts")
    d = tmp_path / "v4"
    shutil.copytree(src, d)
    (d / "config.json").write_text(json.dumps(old))
    _, cfg4, _ = read_checkpoint_config(d)
    assert cfg4 == cfg5
    assert cfg5.num_experts == 6 and cfg5.qk_norm == "head" and cfg5.head_dim == 16


def test_cli_repack_verify_inspect(tiny_checkpoints, tmp_path):
    """The CLI repacks, refuses an existing DST without --force, verifies and inspects."""
    src, dst = tiny_checkpoints["mixtral"], tmp_path / "lay"
    r = cli("repack", src, dst)
    assert r.returncode == 0, r.stderr
    assert "MB/s" in r.stderr
    r = cli("repack", src, dst)
    assert r.returncode == 2 and "--force" in r.stderr
    r = cli("repack", src, dst, "--force")
    assert r.returncode == 0 and "MB/s)" in r.stderr and "quantized on" not in r.stderr  # nothing to quantize
    r = cli("repack", src, tmp_path / "q8", "--experts", "q8", "--quant-device", "cpu")
    assert r.returncode == 0 and "MB/s, quantized on cpu)" in r.stderr, r.stderr
    r = cli("verify", dst)
    assert r.returncode == 0 and "ok" in r.stdout
    for p in (src, dst):
        r = cli("inspect", p, "--json")
        info = json.loads(r.stdout)
        assert info["family"] == "mixtral" and info["experts"] == 6 and info["top_k"] == 2
        assert info["bytes_per_expert"] == 3 * 32 * 48 * 4
        assert info["active_expert_bytes_per_token"] == 2 * 2 * info["bytes_per_expert"]
        assert info["active_params"] < info["total_params"]


def test_verify_flipped_byte(tiny_checkpoints, tmp_path):
    """A single flipped byte in an expert block fails verify, naming layer, expert, file and offset."""
    dst = tmp_path / "lay"
    repack(tiny_checkpoints["olmoe"], dst, progress=False)
    lay = Layout.open(dst)
    _, off, size, _ = lay.block_offset(1, 4)
    del lay
    with open(dst / EXPERTS_FILE, "r+b") as f:
        f.seek(off + 100)
        b = f.read(1)
        f.seek(off + 100)
        f.write(bytes([b[0] ^ 0x01]))
    problems = verify(dst, progress=False)
    assert len(problems) == 1
    r = cli("verify", dst)
    assert r.returncode == 1
    assert "layer 1, expert 4" in r.stderr and str(off) in r.stderr and EXPERTS_FILE in r.stderr


# --- bad input: clear errors, nothing half-written ---

def _expect_clean_failure(src, dst, match):
    with pytest.raises((RepackError, FamilyError, LayoutError), match=match):
        repack(src, dst, progress=False)
    assert not dst.exists()
    assert not (dst.parent / f".{dst.name}.tiered-partial").exists(), "refused input must not start a write"


def test_unknown_architecture(tiny_checkpoints, tmp_path):
    """An unknown architecture is refused with the list of supported families."""
    src = tmp_path / "src"
    shutil.copytree(tiny_checkpoints["olmoe"], src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["LlamaForCausalLM"], "llama"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FamilyError) as e:
        repack(src, tmp_path / "dst", progress=False)
    for fam in FAMILIES:
        assert fam in str(e.value)
    assert not (tmp_path / "dst").exists()


def test_config_without_moe_fields(tiny_checkpoints, tmp_path):
    """A config of a known family with its MoE fields removed is refused, naming the missing fields."""
    src = tmp_path / "src"
    shutil.copytree(tiny_checkpoints["olmoe"], src)
    cfg = json.loads((src / "config.json").read_text())
    del cfg["num_experts"], cfg["num_experts_per_tok"]
    (src / "config.json").write_text(json.dumps(cfg))
    _expect_clean_failure(src, tmp_path / "dst", "MoE fields")


def test_missing_shard(tiny_checkpoints, tmp_path):
    """A shard named in the index but absent is refused before anything is written."""
    src = tmp_path / "src"
    shutil.copytree(tiny_checkpoints["qwen2_moe"], src)
    shard = sorted(src.glob("*.safetensors"))[1]
    shard.unlink()
    _expect_clean_failure(src, tmp_path / "dst", f"{shard.name}.*missing")


def test_truncated_safetensors(tiny_checkpoints, tmp_path):
    """A truncated shard is refused with a message naming it."""
    src = tmp_path / "src"
    shutil.copytree(tiny_checkpoints["qwen2_moe"], src)
    shard = sorted(src.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    _expect_clean_failure(src, tmp_path / "dst", "truncated")


def test_header_offsets_outside_file(tiny_checkpoints, tmp_path):
    """A header whose data_offsets point past the end of the file is refused."""
    src = tmp_path / "src"
    shutil.copytree(tiny_checkpoints["mixtral"], src)
    shard = sorted(src.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    hlen = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + hlen])
    name = next(k for k in header if k != "__metadata__")
    b, e = header[name]["data_offsets"]
    header[name]["data_offsets"] = [b + 10**9, e + 10**9]
    hb = json.dumps(header).encode()
    shard.write_bytes(len(hb).to_bytes(8, "little") + hb + bytes(data[8 + hlen:]))
    _expect_clean_failure(src, tmp_path / "dst", "past the end of the file")


def test_truncated_or_corrupted_layout(tiny_checkpoints, tmp_path):
    """A truncated experts file or a corrupted manifest is refused on open with a clear message."""
    dst = tmp_path / "lay"
    repack(tiny_checkpoints["olmoe"], dst, progress=False)
    with open(dst / EXPERTS_FILE, "r+b") as f:
        f.truncate(ALIGN * 3)
    with pytest.raises(LayoutError, match="truncated"):
        Layout.open(dst)
    dst2 = tmp_path / "lay2"
    repack(tiny_checkpoints["olmoe"], dst2, progress=False)
    (dst2 / MANIFEST).write_text((dst2 / MANIFEST).read_text()[:-50])
    with pytest.raises(LayoutError, match="corrupted"):
        Layout.open(dst2)
    r = cli("verify", dst2)
    assert r.returncode == 1 and "corrupted" in r.stderr


def test_unwritable_dst(tiny_checkpoints, tmp_path):
    """A DST under a regular file (unwritable even as root) fails cleanly."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RepackError, match="cannot write"):
        repack(tiny_checkpoints["olmoe"], blocker / "dst", progress=False)
    r = cli("repack", tiny_checkpoints["olmoe"], blocker / "dst")
    assert r.returncode == 1 and "cannot write" in r.stderr


def test_sigkill_mid_write_then_rerun(tmp_path):
    """SIGKILL after N blocks leaves nothing that looks complete at DST; a re-run restarts and succeeds."""
    src = make_checkpoint(tmp_path / "src", "olmoe", num_hidden_layers=3)
    dst = tmp_path / "dst"
    p = subprocess.Popen([sys.executable, "-m", "tiered", "repack", str(src), str(dst)], cwd=REPO,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, PAUSE_ENV: "7"})
    deadline = time.time() + 60
    line = ""
    while time.time() < deadline and "paused after 7 blocks" not in line:
        line = p.stderr.readline()
        assert line or p.poll() is None, "repack exited before the hook fired"
    partial = tmp_path / ".dst.tiered-partial"
    assert (partial / EXPERTS_FILE).stat().st_size == 7 * block_size_of(src)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not dst.exists() and not is_layout(dst)
    with pytest.raises(LayoutError):
        Layout.open(dst)
    r = cli("repack", src, dst)
    assert r.returncode == 0, r.stderr
    assert "interrupted repack" in r.stderr
    assert not partial.exists()
    assert verify(dst, progress=False) == []
    assert_bit_identical(src, dst)


def block_size_of(src: Path) -> int:
    from tiered.layout.format import plan_block

    _, cfg, _ = read_checkpoint_config(src)
    D, F = cfg.hidden_size, cfg.expert_ffn
    return plan_block({"gate": ((F, D), "float32"), "up": ((F, D), "float32"), "down": ((D, F), "float32")})[1]
