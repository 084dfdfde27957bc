"""repack never destroys what it was not asked to replace, and leaves nothing half-written behind.

`--force` replaces only a tiered layout or an empty directory; SRC and DST may not overlap; no message
suggests a command that would overwrite a checkpoint; Ctrl-C, SIGTERM and a full disk remove the partial copy.
"""
from __future__ import annotations

import errno
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

import tiered.layout.repack as rp
from conftest import REPO, make_checkpoint
from tiered.layout.format import EXPERTS_FILE, MANIFEST, LayoutError, read_manifest
from tiered.layout.repack import PAUSE_ENV, RepackError, repack, verify


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "tiered", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})})


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture
def ckpt(tiny_checkpoints, tmp_path) -> Path:
    src = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoints["olmoe"], src)
    return src


def partial_of(dst: Path) -> Path:
    return dst.parent / f".{dst.name}.tiered-partial"


def test_src_equal_dst_is_refused_even_with_force(ckpt):
    """SRC = DST with --force used to replace the checkpoint with a layout: now refused, checkpoint untouched."""
    before = snapshot(ckpt)
    with pytest.raises(RepackError, match="same directory"):
        repack(ckpt, ckpt, force=True, progress=False)
    r = cli("repack", ckpt, ckpt, "--force")
    assert r.returncode == 2 and "same directory" in r.stderr
    r = cli("repack", ckpt, ckpt.parent / ".." / ckpt.parent.name / ckpt.name, "--force")  # same dir, other spelling
    assert r.returncode == 2 and "same directory" in r.stderr
    assert snapshot(ckpt) == before


def test_nested_src_and_dst_are_refused(ckpt, tmp_path):
    """DST inside SRC, and SRC inside DST, are refused whatever the flags."""
    before = snapshot(ckpt)
    with pytest.raises(RepackError, match="inside SRC"):
        repack(ckpt, ckpt / "layout", force=True, progress=False)
    with pytest.raises(RepackError, match="inside DST"):
        repack(ckpt, tmp_path, force=True, progress=False)
    assert snapshot(ckpt) == before and not (ckpt / "layout").exists()


def test_force_refuses_a_directory_of_user_files(ckpt, tmp_path):
    """--force on a plain directory used to wipe it: now refused, naming what is there."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    (mine / "notes").mkdir()
    with pytest.raises(RepackError, match=r"not a tiered layout \(2 entries: notes, thesis.tex\)"):
        repack(ckpt, mine, force=True, progress=False)
    r = cli("repack", ckpt, mine, "--force")
    assert r.returncode == 2 and "thesis.tex" in r.stderr and "choose a new DST" in r.stderr
    assert (mine / "thesis.tex").read_text() == "years of work"
    assert not partial_of(mine).exists()


def test_force_refuses_another_checkpoint_and_a_file(ckpt, tiny_checkpoints, tmp_path):
    """A Hugging Face checkpoint or a regular file at DST is refused and says what it is."""
    other = tmp_path / "other"
    shutil.copytree(tiny_checkpoints["mixtral"], other)
    before = snapshot(other)
    with pytest.raises(RepackError, match="Hugging Face checkpoint"):
        repack(ckpt, other, force=True, progress=False)
    assert snapshot(other) == before
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(RepackError, match="a file, not a directory"):
        repack(ckpt, f, force=True, progress=False)
    assert f.read_text() == "x"


def test_without_force_an_existing_checkpoint_is_not_offered_force(ckpt, tiny_checkpoints, tmp_path):
    """Without --force, DST = a checkpoint is refused without suggesting --force (which would be refused too)."""
    other = tmp_path / "other"
    shutil.copytree(tiny_checkpoints["mixtral"], other)
    r = cli("repack", ckpt, other)
    assert r.returncode == 2 and "Hugging Face checkpoint" in r.stderr and "pass --force" not in r.stderr


def test_force_replaces_a_layout_an_empty_dir_and_a_damaged_layout(ckpt, tmp_path):
    """What --force may replace: a tiered layout (even one whose manifest is damaged) and an empty directory."""
    lay = tmp_path / "lay"
    repack(ckpt, lay, progress=False)
    with pytest.raises(RepackError, match="pass --force"):
        repack(ckpt, lay, progress=False)
    repack(ckpt, lay, force=True, progress=False)
    assert verify(lay, progress=False) == []
    (lay / MANIFEST).write_text("{ damaged")
    repack(ckpt, lay, force=True, progress=False)
    assert verify(lay, progress=False) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    repack(ckpt, empty, force=True, progress=False)
    assert verify(empty, progress=False) == []


def test_verify_on_a_checkpoint_suggests_nothing_destructive(ckpt):
    """`tiered verify CHECKPOINT` used to suggest `tiered repack SRC CHECKPOINT --force`."""
    r = cli("verify", ckpt)
    assert r.returncode == 1
    assert "Hugging Face checkpoint, not a tiered layout" in r.stderr
    assert "--force" not in r.stderr and f"repack SRC {ckpt}" not in r.stderr
    with pytest.raises(LayoutError) as e:
        read_manifest(ckpt)
    assert "--force" not in str(e.value)


def test_repack_of_a_layout_says_it_is_already_one(ckpt, tmp_path):
    """`repack LAYOUT X` says LAYOUT is already a layout (and where it came from), and writes nothing."""
    lay = tmp_path / "lay"
    repack(ckpt, lay, progress=False)
    r = cli("repack", lay, tmp_path / "x")
    assert r.returncode == 1 and "already a tiered layout" in r.stderr and str(ckpt.resolve()) in r.stderr
    assert not (tmp_path / "x").exists() and not partial_of(tmp_path / "x").exists()


def test_ctrl_c_removes_the_partial_copy(ckpt, tmp_path, monkeypatch):
    """KeyboardInterrupt in the middle of the expert blocks removes .DST.tiered-partial and propagates."""
    real = rp._write_experts

    def interrupted(path, *a, **kw):
        real(path, *a, **kw)  # the whole file is written, then the user presses Ctrl-C
        assert path.stat().st_size > 0
        raise KeyboardInterrupt

    monkeypatch.setattr(rp, "_write_experts", interrupted)
    dst = tmp_path / "dst"
    with pytest.raises(KeyboardInterrupt):
        repack(ckpt, dst, progress=False)
    assert not partial_of(dst).exists() and not dst.exists()


def test_full_disk_removes_the_partial_copy_and_says_how_much_is_needed(ckpt, tmp_path, monkeypatch):
    """ENOSPC while writing: the partial copy is removed and the message gives the space the layout needs."""
    real = rp._write_experts

    def full(path, *a, **kw):
        real(path, *a, **kw)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(rp, "_write_experts", full)
    dst = tmp_path / "dst"
    with pytest.raises(RepackError, match=r"disk filled up.*needs [0-9.]+ MB") as e:
        repack(ckpt, dst, progress=False)
    assert "removed" in str(e.value)
    assert not partial_of(dst).exists() and not dst.exists()


def test_too_little_free_space_is_refused_before_writing(ckpt, tmp_path, monkeypatch):
    """The free space is checked against the layout's size before anything is written."""
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(rp.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    dst = tmp_path / "dst"
    with pytest.raises(RepackError, match=r"needs [0-9.]+ MB, 0.0 MB is free"):
        repack(ckpt, dst, progress=False)
    assert not partial_of(dst).exists() and not dst.exists()


def test_sigterm_removes_the_partial_copy(tmp_path):
    """SIGTERM mid-write (the test hook pauses after 3 blocks) removes the partial copy; the process dies of it."""
    src = make_checkpoint(tmp_path / "src", "olmoe", num_hidden_layers=3)
    dst = tmp_path / "dst"
    p = subprocess.Popen([sys.executable, "-m", "tiered", "repack", str(src), str(dst)], cwd=REPO,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, PAUSE_ENV: "3"})
    deadline = time.time() + 60
    line = ""
    while time.time() < deadline and "paused after 3 blocks" not in line:
        line = p.stderr.readline()
        assert line or p.poll() is None, "repack exited before the hook fired"
    assert (partial_of(dst) / EXPERTS_FILE).stat().st_size > 0
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=30) == -signal.SIGTERM
    assert not partial_of(dst).exists() and not dst.exists()


def test_progress_total_is_the_bytes_written_after_dtype_conversion(tmp_path, monkeypatch):
    """A bf16 checkpoint repacked to fp32: the bar's total equals what is written (it counted source bytes)."""
    src = make_checkpoint(tmp_path / "src", "qwen3_moe", dtype=torch.bfloat16)
    bars = []

    class Bar:
        def __init__(self, total):
            self.total, self.n = total, 0
            bars.append(self)

        def update(self, n):
            self.n += n

        def close(self):
            pass

    monkeypatch.setattr(rp, "_progress", lambda total, enabled, desc="repack": Bar(total))
    for dtype in ("fp32", "source"):
        out = repack(src, tmp_path / dtype, dtype=dtype, progress=True)
        assert bars[-1].total == bars[-1].n == out["bytes"], dtype
    assert bars[0].total > bars[1].total
