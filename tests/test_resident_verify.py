"""`--verify first-use` (the default) means the same with every expert resident: a flipped byte is found.

CPU: each block is hashed when first touched (the mmap reads it then). CUDA: every block is hashed while it is
copied to the device at load. Before, a resident model ran on corrupt weights without a word.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

import tiered
from tiered.cli.main import main
from tiered.layout.format import EXPERTS_FILE
from tiered.store.resident import ResidentExperts
from tiered.store.disk import Layout
from tiered.store.io import ExpertReadError


def corrupt_copy(reference_layout, tmp_path, blocks) -> tuple:
    """A copy of the reference layout with one byte flipped in each (layer, expert) of `blocks`."""
    lay = tmp_path / "bad"
    shutil.copytree(reference_layout, lay)
    src = Layout.open(lay)
    offs = [src.block_offset(l, e)[1] for l, e in blocks]
    with open(lay / EXPERTS_FILE, "r+b") as f:
        for off in offs:
            f.seek(off + 777)
            b = f.read(1)
            f.seek(off + 777)
            f.write(bytes([b[0] ^ 0x10]))
    return lay, offs


def test_provider_checks_each_block_on_first_touch(reference_layout, tmp_path):
    lay, (off,) = corrupt_copy(reference_layout, tmp_path, [(1, 5)])
    p = ResidentExperts.from_layout(Layout.open(lay), device="cpu")
    assert p.get(1, torch.tensor([4, 6])).tolist() == [1 * 64 + 4, 1 * 64 + 6]
    with pytest.raises(ExpertReadError, match=f"layer 1 expert 5 .*offset {off} .*checksum mismatch"):
        p.get(1, torch.tensor([3, 5]))
    with pytest.raises(ExpertReadError, match="layer 1 expert 5"):
        p.get_slots(1, [5])
    s = p.stats()
    assert s["verify"] == "first-use" and s["verified_blocks"] == 3  # experts 3, 4, 6 of layer 1
    quiet = ResidentExperts.from_layout(Layout.open(lay), device="cpu", verify="none")
    assert quiet.get(1, torch.tensor([5])).tolist() == [69] and quiet.stats()["verify"] == "none"


def test_generate_on_a_corrupt_resident_layout_fails(reference_layout, tmp_path):
    """A flipped byte in every layer-0 block: any prompt touches one, so generation stops with the expert named."""
    lay, _ = corrupt_copy(reference_layout, tmp_path, [(0, e) for e in range(64)])
    engine = tiered.load(lay, device="cpu")
    with pytest.raises(ExpertReadError, match="layer 0 expert"):
        engine.generate("def add(a, b):", max_new_tokens=4)


def test_cli_run_exits_1_and_verify_none_runs_resident(reference_layout, tmp_path):
    lay, _ = corrupt_copy(reference_layout, tmp_path, [(0, e) for e in range(64)])
    r = CliRunner().invoke(main, ["run", "-m", str(lay), "--device", "cpu", "--max-new-tokens", "3", "x = 1"])
    assert r.exit_code == 1 and "checksum mismatch" in r.stderr and "tiered verify" in r.stderr
    r = CliRunner().invoke(main, ["run", "-m", str(lay), "--device", "cpu", "--max-new-tokens", "3", "--verify",
                                  "none", "--json", "x = 1"])
    assert r.exit_code == 0, r.stderr
    stats = json.loads(r.stderr.strip().splitlines()[-1])
    assert stats["policy"] == "resident" and stats["verify"] == "none"  # --verify alone keeps experts resident


def test_clean_layout_counts_what_it_checked(reference_layout):
    engine = tiered.load(reference_layout, device="cpu")
    out = engine.generate("import os\n", max_new_tokens=8)
    s = out.stats
    assert s["verify"] == "first-use" and 8 * 8 <= s["verified_blocks"] <= 8 * 64 and s["verify_s"] > 0


@pytest.mark.cuda
def test_cuda_load_hashes_every_block(reference_layout, tmp_path):
    lay, _ = corrupt_copy(reference_layout, tmp_path, [(7, 63)])
    with pytest.raises(ExpertReadError, match="layer 7 expert 63"):
        tiered.load(lay, device="cuda")
    engine = tiered.load(reference_layout, device="cuda")
    assert engine.model.provider.stats()["verified_blocks"] == 8 * 64
