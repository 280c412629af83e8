"""A real ``rlft serve`` process on a free loopback port, started and stopped by the tests themselves."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``rlft serve MODEL`` in a subprocess; ``base_url`` is its ``/v1`` root."""

    def __init__(self, model: str, *args: str, ready_timeout_s: float = 240.0) -> None:
        import httpx

        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"rlft-serve-{self.port}.log", "w+")  # noqa: SIM115
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "rlft",
                "serve",
                model,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--device",
                "cpu",
                *args,
            ],
            cwd=REPO_ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"rlft serve exited with {self.process.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.base_url}/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"rlft serve did not answer within {ready_timeout_s:.0f} s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-4000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.log.close()


@pytest.fixture(scope="session")
def served_adapter(tmp_path_factory):
    """``(server, adapter folder)``: ``rlft serve`` of a tiny Llama LoRA adapter SFT-trained to answer every
    question with "Score: 4" - short replies, and a judge whose verdicts parse."""
    import json

    from tests.export.conftest import train_adapter

    folder = tmp_path_factory.mktemp("served")
    data = folder / "judge.jsonl"
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Question {i}: rate this answer {'x ' * (i % 7)}"},
                {"role": "assistant", "content": "Score: 4"},
            ]
        }
        for i in range(64)
    ]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    adapter, _ = train_adapter("tiny-llama", folder, steps=40, lr=1e-2, batch_size=8, data=str(data))
    server = Server(str(adapter), "--served_model_name", "tiny-sft", "--batch_window_ms", "50")
    yield server, adapter
    server.stop()
