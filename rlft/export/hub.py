"""``rlft export ... --push_to_hub REPO``: upload an exported folder (or .gguf file) with ``huggingface_hub``.

Offline (``HF_HUB_OFFLINE=1``) the push is refused up front, before any export work, with one line that says what
to change: a push that cannot happen should not look like one that did.
"""

from __future__ import annotations

import os
from pathlib import Path


class HubOffline(RuntimeError):
    """Uploading was asked for while the hub is switched off."""


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    return env or bool(constants.HF_HUB_OFFLINE)


def check_can_push(repo_id: str) -> None:
    """Raise :class:`HubOffline` (one line) when the hub is off; run it before exporting."""
    if _offline():
        raise HubOffline(
            f"offline: HF_HUB_OFFLINE=1 forbids pushing to {repo_id}; set HF_HUB_OFFLINE=0 and log in "
            "(`hf auth login` or HF_TOKEN)"
        )
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"--push_to_hub takes a repo id `owner/name`, got {repo_id!r}")


def push_to_hub(path: str | Path, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Create ``repo_id`` (if new) and upload ``path`` (a folder, or one file such as a ``.gguf``) to it.

    Returns:
        The URL of the commit.
    """
    check_can_push(repo_id)
    from huggingface_hub import HfApi

    path = Path(path)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    message = f"Upload {path.name} with rlft export"
    if path.is_dir():
        commit = api.upload_folder(folder_path=str(path), repo_id=repo_id, commit_message=message)
    else:
        commit = api.upload_file(
            path_or_fileobj=str(path), path_in_repo=path.name, repo_id=repo_id, commit_message=message
        )
    return str(getattr(commit, "commit_url", commit))
