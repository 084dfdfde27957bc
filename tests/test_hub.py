"""Models by name through huggingface_hub, tested against a hub cache laid out by the test, never the network.

The hub endpoint is pointed at a closed local port (unreachable) or HF_HUB_OFFLINE is set; the download path is
tested with huggingface_hub's model_info and snapshot_download replaced by fakes that record what was asked.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
from huggingface_hub import constants as hf_constants
import pytest

from tiered.layout.families import default_model_path
from tiered.layout import hub
from tiered.layout.hub import HubError, resolve_model, wanted

SHA = "0123456789abcdef0123456789abcdef01234567"
UNREACHABLE = "http://127.0.0.1:9"  # the discard port: connection refused at once


def lay_out_hub_cache(root: Path, repo_id: str, src: Path, ref: str = "main") -> Path:
    """The hub cache's own layout: models--OWNER--NAME/{refs/REF, snapshots/SHA/<files>}."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / SHA
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / ref).write_text(SHA)
    for f in src.iterdir():
        (snap / f.name).symlink_to(f)
    return snap


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    root = tmp_path / "hub"
    snap = lay_out_hub_cache(root, "tiered-test/olmoe-code-17m", default_model_path())
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE)
    monkeypatch.setattr(hf_constants, "ENDPOINT", UNREACHABLE)
    return snap


def test_cached_model_resolves_offline(hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("tiered-test/olmoe-code-17m") == hub_cache


def test_cached_model_resolves_when_the_hub_is_unreachable(hub_cache):
    assert resolve_model("tiered-test/olmoe-code-17m") == hub_cache


def test_local_path_of_the_same_name_wins(hub_cache, tmp_path, monkeypatch):
    local = tmp_path / "tiered-test" / "olmoe-code-17m"
    local.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model("tiered-test/olmoe-code-17m") == Path("tiered-test/olmoe-code-17m")


@pytest.mark.parametrize("offline, needle", [(True, "HF_HUB_OFFLINE is set"), (False, "unreachable")])
def test_unknown_id_neither_cached_nor_reachable(hub_cache, monkeypatch, offline, needle):
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match=f"not in the Hugging Face cache .*{needle}"):
        resolve_model("tiered-test/not-there")
    with pytest.raises(HubError, match="revision v9"):
        resolve_model("tiered-test/olmoe-code-17m", revision="v9")


def test_paths_are_not_ids():
    for name in ("./a/b", "/a/b", "~/a", "a/b/c", "a", "../x/y"):
        assert not hub.looks_like_repo_id(name)
    assert hub.looks_like_repo_id("Qwen/Qwen3-30B-A3B") and hub.looks_like_repo_id("mistralai/Mixtral-8x7B-v0.1")


def test_only_what_tiered_reads_is_wanted():
    keep = ["model-00001-of-00002.safetensors", "model.safetensors.index.json", "config.json", "tokenizer.json",
            "tokenizer_config.json", "generation_config.json", "tokenizer.model", "chat_template.jinja"]
    drop = ["pytorch_model.bin", "model.gguf", "consolidated.00.pth", "original/model.safetensors",
            "metal/model.bin", "original/config.json", "README.md", "LICENSE"]
    assert all(wanted(f) for f in keep) and not any(wanted(f) for f in drop)


def fake_hub(monkeypatch, files: dict[str, int], calls: list):
    info = SimpleNamespace(sha=SHA, siblings=[SimpleNamespace(rfilename=f, size=n) for f, n in files.items()])

    def model_info(self, repo_id, **kw):
        calls.append(("model_info", repo_id, kw))
        return info

    def snapshot_download(repo_id, **kw):
        calls.append(("snapshot_download", repo_id, kw))
        return str(Path(kw["cache_dir"]) / "snap")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)


def test_download_asks_only_for_safetensors_json_and_tokenizer_files(hub_cache, monkeypatch):
    calls = []
    fake_hub(monkeypatch, {"model.safetensors": 10**6, "config.json": 10, "tokenizer.json": 10,
                           "pytorch_model.bin": 10**6, "model.gguf": 10**6, "original/model.safetensors": 10**6}, calls)
    resolve_model("someone/new-model", revision="v1.0")
    (_, _, info_kw), (_, repo, dl_kw) = calls
    assert info_kw["revision"] == "v1.0" and info_kw["files_metadata"]
    assert repo == "someone/new-model" and dl_kw["revision"] == "v1.0"
    assert sorted(dl_kw["allow_patterns"]) == ["config.json", "model.safetensors", "tokenizer.json"]


def test_free_disk_is_checked_before_downloading(hub_cache, monkeypatch):
    calls = []
    fake_hub(monkeypatch, {"model-00001-of-00002.safetensors": 6 * 10**9, "model-00002-of-00002.safetensors":
                           5 * 10**9, "config.json": 100}, calls)
    monkeypatch.setattr(hub, "free_bytes", lambda p: 2 * 10**9)
    with pytest.raises(HubError, match=r"needs 11.00 GB \(3 files\) but .* has 2.00 GB free"):
        resolve_model("someone/big-model")
    assert [c[0] for c in calls] == ["model_info"], "nothing may be downloaded"


def test_a_model_without_safetensors_is_refused(hub_cache, monkeypatch):
    fake_hub(monkeypatch, {"pytorch_model.bin": 10**6, "config.json": 10}, [])
    with pytest.raises(HubError, match="safetensors"):
        resolve_model("someone/old-model")


@pytest.mark.parametrize("command", ["trace", "tune"])
def test_trace_and_tune_pass_revision_to_the_hub(hub_cache, monkeypatch, tmp_path, command):
    """--revision reaches the resolver: the cached main ref resolves, an uncached revision is named in the error."""
    from click.testing import CliRunner

    from tiered.cli.main import main as cli

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    prompt = tmp_path / "p.txt"
    prompt.write_text("def fib(n):\n    return n")
    trace = tmp_path / "t.npz"
    args = {"trace": ["trace", "--prompt-file", str(prompt), "-o", str(trace)],
            "tune": ["tune", "--trace", str(trace)]}[command]
    if command == "tune":  # a trace of the embedded model to tune on
        r = CliRunner().invoke(cli, ["trace", "--prompt-file", str(prompt), "-o", str(trace)])
        assert r.exit_code == 0, r.output
    bad = CliRunner().invoke(cli, [*args, "-m", "tiered-test/olmoe-code-17m", "--revision", "v9"])
    assert bad.exit_code != 0 and "revision v9" in bad.output
    good = CliRunner().invoke(cli, [*args, "-m", "tiered-test/olmoe-code-17m", "--revision", "main"])
    assert good.exit_code == 0, good.output
