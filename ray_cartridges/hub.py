"""Hugging Face hub: push a folder, pull a snapshot (the real ``huggingface_hub`` calls)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

logger = logging.getLogger(__name__)


class HubError(RuntimeError):
    """A push or pull that failed; the local files are untouched and the message says how to retry."""


_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*|[A-Za-z0-9][\w.-]*")


def cartridge_source(ref: str) -> str:
    """``local`` for a directory that exists or anything written as a path (``./x``, ``/x``, ``a/b/c``);
    ``huggingface`` only for what the hub could call a repo id (``org/name``) that is not a local directory."""
    if Path(ref).expanduser().exists() or ref.startswith((".", "/", "~")) or not _REPO_ID.fullmatch(ref.rstrip("/")):
        return "local"
    return "huggingface"


def push_folder(
    folder: str | Path, repo_id: str, *, repo_type: str = "model", private: bool = True, allow_patterns=None
) -> str:
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        info = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type=repo_type,
            allow_patterns=allow_patterns,
            commit_message="ray_cartridges upload",
        )
    except Exception as err:  # network, auth, quota: keep the local artifact, say how to retry
        raise HubError(
            f"upload of {folder} to {repo_type} repo {repo_id!r} failed ({type(err).__name__}: {err}). The local "
            f"files are intact; retry with `huggingface-cli upload {repo_id} {folder} --repo-type {repo_type}` "
            "after `huggingface-cli login` (or set HF_TOKEN)."
        ) from None
    return getattr(info, "commit_url", None) or f"{repo_type}:{repo_id}"


def pull_snapshot(repo_id: str, *, repo_type: str = "model", revision: str | None = None, force: bool = False) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=repo_id, repo_type=repo_type, revision=revision, force_download=force))
    except Exception as err:
        raise HubError(
            f"could not fetch {repo_type} repo {repo_id!r} (revision {revision}): {type(err).__name__}: {err}"
        ) from None
