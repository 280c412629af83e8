"""``rlft tune`` as separate processes, the way studies are really run: a process killed mid-trial leaves its trial
RUNNING; the next process marks it failed (no heartbeat) and re-runs its parameters, finishing the study. Two
processes on one PostgreSQL study split its trials between them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

pytestmark = pytest.mark.slow
LR = "model.init_args.optim.lr"


def _command(out: Path, search: str, tiny: list[str], *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "rlft",
        "tune",
        "-c",
        "configs/sft/tiny.yaml",
        "--search",
        search,
        "--out",
        str(out),
        *tiny,
        *extra,
    ]


def _env(repo_root: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(repo_root), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"rlft tune exited early with {proc.returncode}"
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout}s"
        time.sleep(0.2)


def test_killed_study_resumes_and_reruns_the_killed_trial(tmp_path, write_search, tiny, repo_root):
    out = tmp_path / "resume"
    search = write_search({"params": {LR: {"log_uniform": [1.0e-4, 1.0e-2]}}, "pruner": "none"})
    flags = ("--trials", "3", "--heartbeat", "1", "--grace-period", "2", "--seed", "0")
    # the first process's trial cannot finish before the kill, however fast the machine (a race otherwise)
    endless = _command(out, search, [*tiny, "--trainer.max_steps", "100000"], *flags)
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(endless, cwd=repo_root, env=_env(repo_root), stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_for(out / "trial_0" / "csv", first)  # the trial is training
            time.sleep(1.0)
        finally:
            first.kill()
            first.wait()
    storage = f"sqlite:///{out / 'study.db'}"
    killed = optuna.load_study(study_name="resume", storage=storage).trials[0]
    assert killed.state == TrialState.RUNNING  # what a killed process leaves behind

    cmd = _command(out, search, tiny, *flags)

    time.sleep(2.5)  # past the grace period, so the trial's missing heartbeat is noticed
    second = subprocess.run(cmd, cwd=repo_root, env=_env(repo_root), capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]

    trials = optuna.load_study(study_name="resume", storage=storage).trials
    assert trials[0].state == TrialState.FAIL
    retries = [t for t in trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == 0]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == killed.params  # the killed trial's parameters ran again
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 3
    assert (out / "best.yaml").is_file() and "trial 0 failed: process died" in second.stdout


def test_two_processes_share_one_postgres_study(tmp_path, write_search, tiny, repo_root, postgres_url):
    out = tmp_path / "shared"
    search = write_search({"params": {LR: {"log_uniform": [1.0e-4, 1.0e-2]}}, "pruner": "none"})
    cmd = _command(out, search, tiny, "--trials", "3", "--storage", postgres_url, "--study-name", "shared-study")
    logs = [open(tmp_path / f"p{i}.log", "w+") for i in range(2)]  # noqa: SIM115 - closed below
    env = _env(repo_root)
    procs = [subprocess.Popen(cmd, cwd=repo_root, env=env, stdout=f, stderr=subprocess.STDOUT) for f in logs]
    try:
        codes = [p.wait(timeout=900) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    outputs = []
    for f in logs:
        f.seek(0)
        outputs.append(f.read())
        f.close()
    assert codes == [0, 0], "\n".join(o[-3000:] for o in outputs)

    trials = optuna.load_study(study_name="shared-study", storage=postgres_url).trials
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert 3 <= len(done) <= 4  # the total is shared; one process may finish a trial it started meanwhile
    pids = {p.pid for p in procs}
    assert {t.user_attrs["pid"] for t in done} == pids  # both processes ran trials of the one study
    assert len({t.number for t in trials}) == len(trials)
    for t in done:  # each trial in its own folder, scored from its own run
        assert (out / f"trial_{t.number}" / "config.yaml").is_file()
    for output in outputs:
        assert "study 'shared-study'" in output and "best config:" in output


def test_sigterm_stops_the_study_with_a_nonzero_exit_and_requeues_the_trial(tmp_path, write_search, tiny, repo_root):
    out = tmp_path / "term"
    search = write_search({"params": {LR: {"log_uniform": [1.0e-4, 1.0e-2]}}, "pruner": "none"})
    endless = _command(out, search, [*tiny, "--trainer.max_steps", "100000"], "--trials", "1", "--seed", "0")
    with open(tmp_path / "first.log", "w+") as log:
        first = subprocess.Popen(endless, cwd=repo_root, env=_env(repo_root), stdout=log, stderr=subprocess.STDOUT)
        _wait_for(out / "trial_0" / "csv", first)  # the trainer is set up: Lightning's SIGTERM handler is in place
        time.sleep(2.0)
        first.terminate()
        code = first.wait(timeout=300)
        log.seek(0)
        output = log.read()
    assert code != 0 and "interrupted; run the same command again to resume" in output, output[-2000:]
    storage = f"sqlite:///{out / 'study.db'}"
    interrupted, queued = optuna.load_study(study_name="term", storage=storage).trials
    assert interrupted.state == TrialState.FAIL and "interrupted" in interrupted.user_attrs["error"]
    assert queued.state == TrialState.WAITING and queued.user_attrs["requeued_from"] == 0

    cmd = _command(out, search, tiny, "--trials", "1", "--seed", "0")
    again = subprocess.run(cmd, cwd=repo_root, env=_env(repo_root), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    resumed = optuna.load_study(study_name="term", storage=storage).trials[1]
    assert resumed.state == TrialState.COMPLETE and resumed.params == interrupted.params
