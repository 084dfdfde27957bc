"""A damaged manifest is a corrupt layout: `verify` and `Layout.open` both refuse it (exit 1), never a traceback."""
from __future__ import annotations

import json
import math
import shutil

import pytest
from click.testing import CliRunner

from tiered.cli.main import main
from tiered.layout.families import default_model_path
from tiered.layout.format import MANIFEST, LayoutError
from tiered.layout.repack import repack, verify
from tiered.store.disk import Layout


def invoke(*args):
    return CliRunner().invoke(main, list(map(str, args)))


@pytest.fixture(scope="module")
def clean_layout(tiny_checkpoints, tmp_path_factory):
    dst = tmp_path_factory.mktemp("checks") / "lay"
    repack(tiny_checkpoints["olmoe"], dst, progress=False)
    shutil.copy(default_model_path() / "tokenizer.json", dst)  # `run` wants one before it opens the layout
    return dst


def damaged(clean_layout, tmp_path, edit):
    lay = tmp_path / "lay"
    shutil.copytree(clean_layout, lay)
    man = json.loads((lay / MANIFEST).read_text())
    edit(man)
    (lay / MANIFEST).write_text(json.dumps(man))
    return lay


def test_shape_that_does_not_match_the_byte_count(clean_layout, tmp_path):
    """verify used to say ok and run then failed with a reshape error; both now name the tensor (exit 1)."""
    def edit(man):
        t = man["experts"]["tensors"][0]
        t["shape"] = [t["shape"][0] + 1, t["shape"][1]]
    lay = damaged(clean_layout, tmp_path, edit)
    with pytest.raises(LayoutError, match=r"tensor gate has shape \[\d+, \d+\] of float32 .* but nbytes"):
        Layout.open(lay)
    with pytest.raises(LayoutError, match="tensor gate"):
        verify(lay, progress=False)
    r = invoke("verify", lay)
    assert r.exit_code == 1 and "tensor gate" in r.stderr and "ok" not in r.stdout
    r = invoke("run", "-m", lay, "--device", "cpu", "hello")
    assert r.exit_code == 1 and "tensor gate" in r.stderr
    assert isinstance(r.exception, SystemExit), r.exception  # a clean exit, not a reshape traceback


def test_unknown_tensor_dtype(clean_layout, tmp_path):
    lay = damaged(clean_layout, tmp_path, lambda man: man["experts"]["tensors"][1].update(dtype="float7"))
    with pytest.raises(LayoutError, match="float7"):
        Layout.open(lay)


@pytest.mark.parametrize("value", ["abc", None, [1], -4096])
def test_bad_block_offset_is_a_corrupt_layout(clean_layout, tmp_path, value):
    """An offset of "abc" used to exit 2 (a usage error) from run and raise from verify: it is a corrupt layout."""
    lay = damaged(clean_layout, tmp_path, lambda man: man["experts"]["blocks"][3].update(offset=value))
    with pytest.raises(LayoutError):
        Layout.open(lay)
    for args in (("verify", lay), ("run", "-m", lay, "--device", "cpu", "hello")):
        r = invoke(*args)
        assert r.exit_code == 1, (args, r.exit_code, r.output, r.exception)
        assert isinstance(r.exception, SystemExit), r.exception
        assert "corrupt" in r.stderr or "outside the file" in r.stderr


def test_clean_layout_passes_the_new_checks(clean_layout):
    lay = Layout.open(clean_layout)
    for s in lay.tensor_specs:
        assert math.prod(s.shape) * 4 == s.nbytes
    assert verify(clean_layout, progress=False) == []
