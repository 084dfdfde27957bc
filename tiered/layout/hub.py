"""Models by name: a Hugging Face model id (`Qwen/Qwen3-30B-A3B`) resolved to a checkpoint directory.

Owns: `resolve_model(name, revision)`: an existing local path wins; otherwise the id is looked up in the local
Hugging Face cache and on the hub through `huggingface_hub`. Only what tiered reads is downloaded (top-level
safetensors shards and their index, JSON configs, tokenizer files; never .bin, .gguf or .pth), after a check of
the free disk space against the files' sizes. A cached model runs with no network: when HF_HUB_OFFLINE is set or
the hub cannot be reached, the cached snapshot is used (local_files_only). HF_TOKEN, HF_HUB_CACHE, HF_HOME and
HF_ENDPOINT work through huggingface_hub's own handling.
Does not own: repacking the checkpoint into a layout (repack.py) or the layout cache.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

# What tiered reads from a checkpoint (top-level files only: subfolders such as gpt-oss's original/ and metal/ hold
# the same weights in other formats).
WANTED_SUFFIXES = (".safetensors", ".json")
WANTED_NAMES = ("tokenizer.model", "chat_template.jinja")
# Offline (nothing is downloaded, the snapshot folder is only located): the same files by pattern.
WANTED_PATTERNS = ["*.safetensors", "*.json", *WANTED_NAMES]
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class HubError(RuntimeError):
    """A model id that cannot be resolved (not cached and not reachable, not found, no room); says what to do."""


def looks_like_repo_id(name: str) -> bool:
    """`owner/name`, as the hub spells ids (a path such as ./x/y or /x/y is not one)."""
    return bool(REPO_ID.match(name)) and not name.startswith((".", "/", "~")) and ".." not in name


def wanted(filename: str) -> bool:
    """True for the files tiered reads: top-level safetensors, JSON and tokenizer files."""
    return "/" not in filename and (filename.endswith(WANTED_SUFFIXES) or filename in WANTED_NAMES)


def _offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)


def _from_cache(repo_id: str, revision: str | None, why: str, fix: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=_cache_dir(), local_files_only=True,
                                      allow_patterns=WANTED_PATTERNS))
    except (LocalEntryNotFoundError, FileNotFoundError):
        rev = f" at revision {revision}" if revision else ""
        raise HubError(f"-m {repo_id}: not a local directory, and the model{rev} is not in the Hugging Face cache "
                       f"({_cache_dir()}) and {why}: {fix}, or pass a local checkpoint or layout directory") from None


def free_bytes(path: Path) -> int:
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def resolve_model(name: str | os.PathLike, revision: str | None = None) -> Path:
    """A local directory for `name`: itself when the path exists, else the checkpoint of hub id `name`.

    Raises HubError with what to do when the id is not cached and cannot be downloaded.
    """
    p = Path(name).expanduser()
    if p.exists() or not looks_like_repo_id(str(name)):
        return p
    repo_id = str(name)
    if _offline_env():
        return _from_cache(repo_id, revision, "HF_HUB_OFFLINE is set", "unset HF_HUB_OFFLINE to download it")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True, timeout=10)
    except RevisionNotFoundError:
        raise HubError(f"-m {repo_id}: the hub has no revision {revision!r} of this model; check --revision") from None
    except GatedRepoError:
        raise HubError(f"-m {repo_id}: the model is gated: accept its terms on huggingface.co and set HF_TOKEN "
                       "(or log in with `hf auth login`)") from None
    except RepositoryNotFoundError:
        raise HubError(f"-m {repo_id}: no such local directory, and the hub has no model of that name (or it is "
                       "private: set HF_TOKEN)") from None
    except HfHubHTTPError as e:
        return _from_cache(repo_id, revision, f"the hub answered {e}", "check HF_TOKEN and the network")
    except Exception as e:  # noqa: BLE001 - connection refused, DNS, timeout, offline mode: use the cache
        return _from_cache(repo_id, revision, f"the hub is unreachable ({type(e).__name__}: {e})",
                           "check the network (and HF_ENDPOINT) to download it")
    return _download(repo_id, revision, info)


def _download(repo_id: str, revision: str | None, info: Any) -> Path:
    from huggingface_hub import snapshot_download, try_to_load_from_cache

    files = [s for s in info.siblings or [] if wanted(s.rfilename)]
    if not any(s.rfilename.endswith(".safetensors") for s in files):
        raise HubError(f"-m {repo_id}: the model has no top-level safetensors weights; tiered reads safetensors "
                       "checkpoints only")
    cache = _cache_dir()
    missing = [s for s in files
               if not isinstance(try_to_load_from_cache(repo_id, s.rfilename, cache_dir=cache, revision=info.sha), str)]
    need = sum(int(s.size or 0) for s in missing)
    free = free_bytes(cache)
    if need > free:
        raise HubError(f"-m {repo_id}: downloading needs {need / 1e9:.2f} GB ({len(missing)} files) but {cache} has "
                       f"{free / 1e9:.2f} GB free: free space, or set HF_HUB_CACHE to a larger disk")
    # the ref the user named (None = main), so that refs/ records it and an offline run finds the snapshot later
    return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache,
                                  allow_patterns=[s.rfilename for s in files]))

