"""The layout cache of `run -m CHECKPOINT`: an unwritable cache is a clear error, stale copies are named, and
`tiered cache list|rm` show and prune it (removing only what it lists)."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from tiered.layout.cachedir import cache_key, list_cached, remove, stale_copies
from tiered.layout.repack import RepackError, ensure_layout


@pytest.fixture
def ckpt(tiny_checkpoints, tmp_path):
    src = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoints["mixtral"], src)
    return src


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "tiered"


def test_unwritable_cache_names_the_cache_and_xdg_cache_home(ckpt, tmp_path, monkeypatch):
    """Tests run as root, where chmod blocks nothing: the cache is put under a regular file instead."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker / "cache"))
    with pytest.raises(RepackError) as e:
        ensure_layout(ckpt, progress=False)
    msg = str(e.value)
    assert f"layout cache {blocker / 'cache' / 'tiered'} cannot be written" in msg
    assert "XDG_CACHE_HOME" in msg and "DST" not in msg and f"tiered repack {ckpt}" in msg


def test_full_cache_disk_advice_names_the_cache(ckpt, cache, monkeypatch):
    """No room for the layout: the advice is about the cache (XDG_CACHE_HOME), not about a DST."""
    import tiered.layout.repack as rp

    usage = shutil.disk_usage(ckpt)
    monkeypatch.setattr(rp.shutil, "disk_usage", lambda p: usage._replace(free=10))
    with pytest.raises(RepackError, match="not enough disk space") as e:
        ensure_layout(ckpt, progress=False)
    assert "XDG_CACHE_HOME" in str(e.value) and "DST" not in str(e.value)


def test_a_changed_checkpoint_names_its_stale_copy(ckpt, cache, capsys):
    first = ensure_layout(ckpt, progress=False)
    assert first.parent == cache and first.name == cache_key(ckpt, "source")
    assert ensure_layout(ckpt, progress=False) == first  # unchanged: reused
    capsys.readouterr()
    st = (ckpt / "config.json").stat()
    os.utime(ckpt / "config.json", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # `touch config.json`
    second = ensure_layout(ckpt, progress=False)
    assert second != first
    err = capsys.readouterr().err
    assert f"older copy of {ckpt} at {first}" in err and f"tiered cache rm {first.name}" in err
    states = {e.key: e.state for e in list_cached()}
    assert states == {first.name: "stale", second.name: "current"}
    assert [e.key for e in stale_copies(ckpt, "source", second.name)] == [first.name]


def test_list_shows_partial_damaged_and_orphaned_entries(ckpt, cache, tmp_path):
    lay = ensure_layout(ckpt, progress=False)
    (cache / ".x-0123.tiered-partial").mkdir()
    (cache / "broken").mkdir()
    (cache / "broken" / "manifest.json").write_text("{")
    moved = tmp_path / "moved"
    ckpt.rename(moved)
    got = {e.key: e for e in list_cached()}
    assert got[lay.name].state == "orphaned" and got[lay.name].bytes > 0
    assert got[".x-0123.tiered-partial"].state == "partial" and got["broken"].state == "damaged"
    assert json.loads(json.dumps(got[lay.name].to_json()))["source"] == str(ckpt.resolve())


def test_remove_only_what_the_cache_lists(ckpt, cache, tmp_path):
    lay = ensure_layout(ckpt, progress=False)
    outside = tmp_path / "keep"
    outside.mkdir()
    for bad in ("../keep", str(outside), "nope"):
        with pytest.raises(KeyError):
            remove([bad])
    assert outside.is_dir() and lay.is_dir()
    assert [e.key for e in remove([lay.name])] == [lay.name] and not lay.exists()
    ensure_layout(ckpt, progress=False)
    (cache / ".y.tiered-partial").mkdir()
    assert len(remove(everything=True)) == 2 and list_cached() == []
    assert ckpt.is_dir() and outside.is_dir()


def test_quantized_checkpoints_get_a_pass_through_key(tmp_path):
    """A checkpoint whose config.json declares a quantization gets a key of its own under `source` (its layout keeps
    that format now, where older versions dequantized it); plain checkpoints keep the key they always had."""
    import hashlib

    from tiered import __version__
    from tiered.layout.cachedir import _quant_method

    def old_key(src):  # the key before the pass-through salt
        h = hashlib.sha256(str(src.resolve()).encode())
        for p in sorted(src.iterdir()):
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
        h.update(f"dtype=source;v={__version__}".encode())
        return f"{src.name}-{h.hexdigest()[:16]}"

    plain, quant = tmp_path / "plain", tmp_path / "quant"
    for d, cfg in ((plain, {"model_type": "gpt_oss"}),
                   (quant, {"model_type": "gpt_oss", "quantization_config": {"quant_method": "mxfp4"}})):
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg))
    assert _quant_method(plain) is None and _quant_method(quant) == "mxfp4"
    assert cache_key(plain, "source") == old_key(plain)
    assert cache_key(quant, "source") != old_key(quant)
