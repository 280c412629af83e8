"""No silent hangs in a 2-process run: a rank that skips a collective fails the run in bounded time with a line
naming the rank and the step; SIGTERM ends every rank (with a checkpoint when the ranks can still agree, at once
when one is blocked in a collective); a killed rank ends the run non-zero in well under a minute."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONPATH": str(REPO / "tests" / "distributed"),
}

pytestmark = pytest.mark.slow


def _start(root: Path, steps: int, **env: str) -> subprocess.Popen:
    text = (REPO / "configs" / "sft" / "tiny.yaml").read_text().replace("runs/sft-tiny", str(root))
    config = root.parent / f"{root.name}.yaml"
    config.write_text(text.replace("rlft/assets/", f"{REPO}/rlft/assets/"))
    cmd = [
        sys.executable,
        "-m",
        "rlft",
        "fit",
        "-c",
        str(config),
        "-c",
        str(REPO / "configs/trainer/ddp.yaml"),
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.precision",
        "32-true",
        "--model",
        "stall_pkg.StallingSFT",
        "--trainer.max_steps",
        str(steps),
        "--trainer.limit_val_batches",
        "0",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.callbacks.every_n_train_steps",
        "1",
    ]
    log = open(root.parent / f"{root.name}.log", "w")
    return subprocess.Popen(cmd, cwd=REPO, env={**ENV, **env}, stdout=subprocess.DEVNULL, stderr=log)


def _wait_for(process: subprocess.Popen, log: Path, text: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert process.poll() is None, f"exited {process.returncode} before {text!r}: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {text!r} in {timeout} s: {log.read_text()[-3000:]}"
        time.sleep(0.5)


def _ends_within(process: subprocess.Popen, seconds: float, linger: float = 30) -> tuple[int, float]:
    """Wait for the launcher, then give the other ranks ``linger`` seconds to follow it; any rank still alive after
    that outlived the run (a leak). Everything is SIGKILLed afterwards, whatever was found."""
    family = [psutil.Process(process.pid)] + psutil.Process(process.pid).children(recursive=True)
    started = time.monotonic()
    try:
        code = process.wait(timeout=seconds)
        elapsed = time.monotonic() - started
        _, alive = psutil.wait_procs(family[1:], timeout=linger)
        leftovers = [p.pid for p in alive if _running(p)]
    finally:
        for member in family:
            try:
                member.kill()
            except psutil.NoSuchProcess:
                pass
    assert not leftovers, f"ranks still running {linger:.0f} s after the launcher exited: {leftovers}"
    return code, elapsed


def _running(member: psutil.Process) -> bool:
    try:
        return member.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_rank_that_skips_a_collective_fails_the_run_with_rank_and_step(tmp_path):
    # 45 s: long enough for the second rank to join on a loaded machine (the rendezvous has the same timeout)
    process = _start(
        tmp_path / "run", 6, RLFT_TEST_STALL_AT="2", RLFT_COLLECTIVE_TIMEOUT_S="45", RLFT_SHUTDOWN_GRACE_S="5"
    )
    _wait_for(process, tmp_path / "run.log", "rank 1 pid")
    code, elapsed = _ends_within(process, 150)
    log = (tmp_path / "run.log").read_text()
    assert code != 0 and "rlft: rank 0 of 2: a collective failed at step 2" in log, log[-3000:]


def test_sigterm_ends_every_rank_even_when_one_is_blocked_in_a_collective(tmp_path):
    process = _start(
        tmp_path / "run", 6, RLFT_TEST_STALL_AT="2", RLFT_COLLECTIVE_TIMEOUT_S="600", RLFT_SHUTDOWN_GRACE_S="5"
    )
    _wait_for(process, tmp_path / "run.log", "rank 0 pid")
    _wait_for(process, tmp_path / "run.log", "step 2")
    time.sleep(3)  # rank 0 is now waiting for rank 1 in the next collective
    process.send_signal(signal.SIGTERM)
    code, elapsed = _ends_within(process, 60)
    assert code != 0 and elapsed < 60


def test_sigterm_stops_every_rank_with_a_checkpoint(tmp_path):
    process = _start(tmp_path / "run", 400, RLFT_SHUTDOWN_GRACE_S="60")
    _wait_for(process, tmp_path / "run.log", "step 3")
    process.send_signal(signal.SIGTERM)
    code, _ = _ends_within(process, 120)
    log = (tmp_path / "run.log").read_text()
    assert code == 128 + signal.SIGTERM, log[-3000:]
    assert "stopped by SIGTERM at step" in log and (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


def test_a_killed_rank_ends_the_run_non_zero_in_under_a_minute(tmp_path):
    process = _start(tmp_path / "run", 400, RLFT_SHUTDOWN_GRACE_S="10")
    _wait_for(process, tmp_path / "run.log", "rank 1 pid")
    _wait_for(process, tmp_path / "run.log", "step 2")
    rank1 = [c for c in psutil.Process(process.pid).children(recursive=True) if "rlft" in " ".join(c.cmdline())]
    assert rank1, "rank 1 is a child process of rank 0"
    rank1[0].kill()
    code, elapsed = _ends_within(process, 60)
    assert code != 0 and elapsed < 60
