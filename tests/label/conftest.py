"""Fixtures for the labeling tests: database back-ends (SQLite and a real PostgreSQL) and a real server process.

PostgreSQL tests need ``RLFT_TEST_POSTGRES_URL`` (``eval "$(bash scripts/services.sh)"`` sets it). Without it they
are skipped with the reason, except under ``CI=true``, where a missing server is a failure: CI must test PostgreSQL.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path) -> str:
    """Every test using this runs against both back-ends."""
    if request.param == "sqlite":
        return str(tmp_path / "labels.db")
    return request.getfixturevalue("postgres_url")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``rlft label serve`` in a subprocess on a random loopback port."""

    def __init__(self, db: str, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "rlft", "label", "serve", "--db", db, "--port", str(self.port)]
        cmd += ["--log-level", "warning", *extra]
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"rlft-label-{self.port}.log", "w+")  # noqa: SIM115
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def serve():
    """Factory: ``serve(db, *cli_args)`` starts a server and stops it at teardown."""
    servers: list[ServerProcess] = []

    def start(db: str, *extra: str) -> ServerProcess:
        server = ServerProcess(db, *extra)
        servers.append(server)
        server.wait_ready()
        return server

    yield start
    for server in servers:
        server.stop()


def chromium_paths() -> tuple[str | None, str | None]:
    browser = os.environ.get("RLFT_TEST_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("RLFT_TEST_CHROMEDRIVER") or shutil.which("chromedriver")
    return browser, driver
