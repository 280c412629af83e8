"""`rlft export --push_to_hub REPO`: offline it fails in one line before exporting; online it creates the repo and
uploads the exported folder (checked up to the upload call, with the client recorded, not a fake hub)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlft.cli import main as rlft_main
from rlft.export import hub

REPO = Path(__file__).resolve().parents[2]


def test_offline_push_fails_in_one_line_before_exporting(tmp_path):
    out = tmp_path / "merged"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "rlft",
        "export",
        "tiny-llama",
        "--to",
        "merged",
        "--out",
        str(out),
        "--push_to_hub",
        "me/tiny",
    ]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "offline:" in line]  # the CLI may add a --debug hint
    assert len(errors) == 1 and errors[0].startswith("rlft export: "), result.stderr
    assert "set HF_HUB_OFFLINE=0 and log in" in errors[0]
    assert not out.exists()  # refused up front, no export work


class RecordingApi:
    calls: list[tuple] = []

    def __init__(self, token=None):
        self.calls.append(("init", token))

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        return "https://huggingface.co/me/tiny/commit/0"


def test_online_push_creates_the_repo_and_uploads_the_exported_folder(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(hub, "_offline", lambda: False)
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    RecordingApi.calls = []
    out = tmp_path / "merged"
    rlft_main(
        ["export", "tiny-llama", "--to", "merged", "--out", str(out), "--push_to_hub", "me/tiny", "--private", "true"]
    )
    assert RecordingApi.calls[1] == ("create_repo", "me/tiny", {"private": True, "exist_ok": True})
    upload = RecordingApi.calls[2][1]
    assert upload["folder_path"] == str(out) and upload["repo_id"] == "me/tiny"
    assert (out / "README.md").exists() and (out / "model.safetensors").exists()


def test_a_repo_id_must_be_owner_slash_name(monkeypatch):
    monkeypatch.setattr(hub, "_offline", lambda: False)
    with pytest.raises(ValueError, match="owner/name"):
        hub.check_can_push("just-a-name")
