"""`tiered run` and `tiered trace` fail early and clearly on a model they cannot serve."""
from __future__ import annotations

from click.testing import CliRunner

from tiered.cli.main import main
from tiered.layout.repack import repack


def invoke(*args, env=None):
    return CliRunner().invoke(main, list(map(str, args)), env=env)


def test_checkpoint_without_tokenizer_fails_before_it_is_repacked(tiny_checkpoints, tmp_path):
    """A checkpoint with no tokenizer.json used to be repacked into the cache in full, then fail telling a CLI
    user to "pass token ids". Now: exit 2 at once, nothing in the cache, and advice a CLI user can follow."""
    ckpt = tiny_checkpoints["qwen3_moe"]
    assert not (ckpt / "tokenizer.json").exists()
    cache = tmp_path / "xdg"
    prompt = tmp_path / "p.txt"
    prompt.write_text("hello")
    for args in (("run", "-m", ckpt, "hello"), ("trace", "-m", ckpt, "--prompt-file", prompt, "-o", tmp_path / "t.npz")):
        r = invoke(*args, env={"XDG_CACHE_HOME": str(cache)})
        assert r.exit_code == 2, (args, r.output)
        assert "no tokenizer.json" in r.stderr and "copy tokenizer.json" in r.stderr
        assert "token ids" not in r.stderr
        assert not (cache / "tiered").exists() or not any((cache / "tiered").iterdir()), "nothing may be repacked"
        assert "repacking" not in r.stderr


def test_layout_without_tokenizer(tiny_checkpoints, tmp_path):
    lay = tmp_path / "lay"
    repack(tiny_checkpoints["olmoe"], lay, progress=False)
    r = invoke("run", "-m", lay, "hello")
    assert r.exit_code == 2 and "no tokenizer.json" in r.stderr and "token ids" not in r.stderr
