"""One pipeline per run folder, stages that die with their pipeline, and data edits that re-run what they reach.

The lock and fingerprint tests stub the stage processes (``run_fit``): they test the runner's decisions, not training.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rlft.pipeline import PipelineRunner, StageFailed, load_pipeline
from rlft.pipeline.lock import LOCK_NAME, RunFolderLock


def _config(tmp_path: Path, repo_root: Path, **sft_args) -> Path:
    data = tmp_path / "pairs.jsonl"
    if not data.exists():
        shutil.copy(repo_root / "rlft/assets/sample_pairs.jsonl", data)
    config = {
        "run_dir": str(tmp_path / "run"),
        "data": {"paths": [str(data)], "heldout_fraction": 0.25},
        "stages": {"sft": {"config": str(repo_root / "configs/sft/tiny.yaml"), "args": sft_args}},
        "evaluation": None,
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture
def stub_stages(monkeypatch):
    """``run_fit`` records the stage and writes its export and DONE, as a successful ``rlft fit`` would."""
    ran: list[str] = []

    def run_fit(self, name, config, folder, expected, *, settings=None):
        ran.append(name)
        expected.mkdir(parents=True)
        self.mark_done(folder, {"output": str(expected), "settings": settings})

    monkeypatch.setattr(PipelineRunner, "run_fit", run_fit)
    return ran


def test_a_second_pipeline_on_a_held_run_folder_refuses_naming_the_holder(tmp_path, repo_root, stub_stages):
    config = load_pipeline(_config(tmp_path, repo_root))
    with RunFolderLock(config.run_dir):
        with pytest.raises(StageFailed, match=rf"in use by another rlft pipeline \(pid {os.getpid()}\)"):
            PipelineRunner(config).run()
    assert stub_stages == []  # refused before the split and every stage
    PipelineRunner(config).run()  # released: the folder is free again
    assert stub_stages == ["sft"]


def test_a_lock_left_by_a_dead_pipeline_is_taken_over(tmp_path, repo_root, stub_stages):
    config = load_pipeline(_config(tmp_path, repo_root))
    lock = Path(config.run_dir) / LOCK_NAME
    lock.parent.mkdir(parents=True)
    lock.write_text("999999999\n")  # a pid file with no live flock behind it: what a kill -9 leaves
    PipelineRunner(config).run()
    assert stub_stages == ["sft"] and lock.read_text().strip() == str(os.getpid())


def test_the_cli_refuses_in_one_line_while_another_process_holds_the_run(tmp_path, repo_root):
    path = _config(tmp_path, repo_root)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder_code = (
        f"import fcntl, os, sys, time; f = open({str(run_dir / LOCK_NAME)!r}, 'a+'); "
        "fcntl.flock(f, fcntl.LOCK_EX); f.write(f'{os.getpid()}\\n'); f.flush(); print('held', flush=True); "
        "time.sleep(120)"
    )
    holder = subprocess.Popen([sys.executable, "-c", holder_code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        env = {**os.environ, "PYTHONPATH": str(repo_root), "HF_HUB_OFFLINE": "1"}
        result = subprocess.run(
            [sys.executable, "-m", "rlft", "pipeline", "-c", str(path)],
            cwd=repo_root,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"rlft pipeline: run folder {run_dir} is in use by another rlft pipeline (pid {holder.pid}); wait for it to "
        f"finish or stop it (the lock is {run_dir / LOCK_NAME})"
    ]
    assert not (run_dir / "data").exists()
    fcntl.flock(open(run_dir / LOCK_NAME), fcntl.LOCK_EX | fcntl.LOCK_NB)  # the holder's death freed it


def test_an_edited_data_file_re_runs_the_stages_it_reaches(tmp_path, repo_root, stub_stages, capsys):
    path = _config(tmp_path, repo_root)
    PipelineRunner(load_pipeline(path)).run()
    PipelineRunner(load_pipeline(path)).run()
    assert stub_stages == ["sft"]  # unchanged data: skipped
    first = json.loads((tmp_path / "run" / "sft" / "DONE").read_text())["settings"]

    data = tmp_path / "pairs.jsonl"
    rows = data.read_text().splitlines()
    edited = json.loads(rows[0])
    edited["chosen"] += " Indeed."  # same prompts, same settings: only the content differs
    data.write_text("\n".join([json.dumps(edited), *rows[1:]]) + "\n")
    capsys.readouterr()
    PipelineRunner(load_pipeline(path)).run()
    out = capsys.readouterr().out
    assert f"data file(s) ['{data}'] changed since the split: splitting again" in out
    assert stub_stages == ["sft", "sft"] and "stage sft re-runs from scratch (its settings changed)" in out
    assert json.loads((tmp_path / "run" / "sft" / "DONE").read_text())["settings"] != first
    train = (tmp_path / "run" / "data" / "train_pairs.jsonl").read_text() + (
        tmp_path / "run" / "data" / "heldout_pairs.jsonl"
    ).read_text()
    assert "Indeed." in train


FIT = ["-m", "rlft", "fit"]


def _processes() -> dict[int, tuple[int, int, str, str]]:
    """pid -> (ppid, process group, state, command line) of every live process (Linux /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        found[int(entry.name)] = (int(fields[1]), int(fields[2]), fields[0], cmdline)
    return found


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_9_of_the_pipeline_takes_its_running_stage_down(tmp_path, repo_root):
    path = _config(tmp_path, repo_root, **{"trainer.max_steps": 100000})  # a stage that would run for a long time
    env = {**os.environ, "PYTHONPATH": str(repo_root), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    pipeline = subprocess.Popen(
        [sys.executable, "-m", "rlft", "pipeline", "-c", str(path)],
        cwd=repo_root,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    group, deadline = None, time.time() + 240
    try:
        while time.time() < deadline:  # the stage's group: its own, started by the pipeline, holding `rlft fit`
            procs = _processes()
            groups = {pid for pid, (ppid, pgid, _, _) in procs.items() if ppid == pipeline.pid and pgid == pid}
            fits = [pgid for (_, pgid, _, cmd) in procs.values() if pgid in groups and cmd.split()[1:4] == FIT]
            if fits:
                group = fits[0]
                break
            assert pipeline.poll() is None, "the pipeline ended before its stage started"
            time.sleep(0.5)
        assert group is not None, "the sft stage did not start"
        time.sleep(2)  # the stage is importing or training
        pipeline.send_signal(signal.SIGKILL)
        pipeline.wait()
        gone_by = time.time() + 10
        while time.time() < gone_by:
            alive = [pid for pid, (_, pgid, state, _) in _processes().items() if pgid == group and state != "Z"]
            if not alive:
                break
            time.sleep(0.2)
        assert not alive, f"stage processes {alive} outlived the pipeline"
    finally:
        if pipeline.poll() is None:
            pipeline.kill()
        if group is not None:
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass
