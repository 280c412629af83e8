"""Weights & Biases with ``WANDB_MODE=offline``: the overlay configs/logger/wandb.yaml turns a fit into a W&B run
whose offline folder holds the metrics, the full resolved config, the rlft version and (``log_model``) the final
adapter; ``rlft tune`` makes every trial one run of a group named after the study.

The offline run file (``run-<id>.wandb``) is read back with W&B's own protobuf records; the container is W&B's
LevelDB-style log (7-byte file header, 32 KiB blocks, 7-byte chunk headers: crc32, length, type)."""

from __future__ import annotations

import importlib.util
import json
import struct
import time
from collections import defaultdict
from pathlib import Path

import pytest

from tests.isolation import run_isolated

# found, not imported: W&B (its service process, protobuf records, atexit hooks) runs only in isolated children
if importlib.util.find_spec("wandb") is None:
    pytest.skip("wandb is not installed (pip install 'rlft[wandb]')", allow_module_level=True)

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _chunks(data: bytes):
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # block tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if pos + HEADER + length > len(data):  # the service is still writing this chunk
            return
        chunk, pos = data[pos + HEADER : pos + HEADER + length], pos + HEADER + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk


def _records(folder: Path, timeout: float = 60.0) -> list:
    """The run file's records once W&B's service has written its final ``exit`` record (it writes asynchronously)."""
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2

    (path,) = folder.glob("run-*.wandb")
    deadline = time.monotonic() + timeout
    while True:
        records = []
        try:
            for raw in _chunks(path.read_bytes()):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(raw)
                records.append(record)
        except DecodeError:  # a record caught mid-write; the next read sees it whole
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        assert time.monotonic() < deadline, f"{path}: no exit record after {timeout}s (run not finished)"
        time.sleep(0.5)


def read_offline_run(folder: Path) -> dict:
    """run (project, name, group), config {key: value}, history {metric: [values]}, artifacts {name: [files]}."""
    run, config, history, artifacts = {}, {}, defaultdict(list), defaultdict(list)
    for record in _records(folder):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = {"project": record.run.project, "name": record.run.display_name, "group": record.run.run_group}
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            for item in record.history.item:
                history[item.key or "/".join(item.nested_key)].append(json.loads(item.value_json))
        elif kind == "artifact":
            artifact = record.artifact
            artifacts[artifact.name] += [(artifact.type, entry.path) for entry in artifact.manifest.contents]
    return {"run": run, "config": config, "history": dict(history), "artifacts": dict(artifacts)}


def _runs(save_dir: Path) -> list[dict]:
    return [read_offline_run(f) for f in sorted((save_dir / "wandb").glob("offline-run-*"))]


def fit_and_read_runs(args: list[str], save_dir: Path) -> list[dict]:
    """In an isolated child (tests/isolation.py): ``rlft fit`` with ``args``, then the offline runs in ``save_dir``."""
    import wandb

    from rlft.cli import main as rlft_main

    try:
        rlft_main(args)
    finally:
        wandb.finish()  # flushes the run file, as the end of an `rlft fit` process does
    return _runs(save_dir)


def tune_and_read_runs(args: list[str], out: Path) -> list[dict]:
    """In an isolated child: ``rlft tune`` with ``args``, then the offline runs of every trial folder in ``out``."""
    import wandb

    from rlft.cli.tune import main as tune

    try:
        tune(args)
        return [run for trial in sorted(out.glob("trial_*")) for run in _runs(trial)]
    finally:
        wandb.finish()  # an in-process run stays open until finished (a CLI process finishes it at exit)


FAST = [
    "--trainer.max_steps",
    "4",
    "--trainer.val_check_interval",
    "2",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # the isolated children inherit the environment and the cwd
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.mark.slow
def test_offline_fit_run_holds_metrics_config_version_and_adapter(tmp_path):
    wb = "--trainer.logger.init_args."
    (run,) = run_isolated(
        fit_and_read_runs,
        [
            "fit",
            "-c",
            "configs/dpo/tiny.yaml",
            "-c",
            "configs/logger/wandb.yaml",
            *FAST,
            f"{wb}project",
            "rlft-test",
            f"{wb}name",
            "dpo-tiny-offline",
            f"{wb}save_dir",
            str(tmp_path),
            f"{wb}log_model",
            "true",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--model.init_args.output_dir",
            str(tmp_path / "hf_model"),
            "--model.init_args.beta",
            "0.3",
        ],
        tmp_path,
        timeout=600,
    )
    assert run["run"]["project"] == "rlft-test" and run["run"]["name"] == "dpo-tiny-offline"
    assert run["config"]["rlft_version"]
    resolved = run["config"]["config"]
    assert resolved["model"]["class_path"] == "rlft.methods.DPO"
    assert resolved["model"]["init_args"]["beta"] == 0.3 and resolved["trainer"]["max_steps"] == 4
    history = run["history"]
    assert len(history["train/loss"]) == 4 and len(history["val/loss"]) == 2
    assert len(history["val/rewards/accuracy"]) == 2
    adapters = [files for name, files in run["artifacts"].items() if name.startswith("hf-model-")]
    assert adapters and ("model", "adapter_model.safetensors") in adapters[0]


@pytest.mark.slow
def test_tune_logs_each_trial_as_a_run_of_one_group(tmp_path, write_search):
    out = tmp_path / "wandb-study"
    search = write_search({"params": {"model.init_args.optim.lr": {"choices": [1.0e-3, 3.0e-3]}}, "pruner": "none"})
    runs = run_isolated(
        tune_and_read_runs,
        [
            "-c",
            "configs/sft/tiny.yaml",
            "-c",
            "configs/logger/wandb.yaml",
            "--search",
            search,
            "--trials",
            "2",
            "--out",
            str(out),
            *FAST,
        ],
        out,
        timeout=600,
    )
    assert len(runs) == 2
    assert {r["run"]["group"] for r in runs} == {"wandb-study"}
    assert sorted(r["run"]["name"] for r in runs) == ["wandb-study-trial_0", "wandb-study-trial_1"]
    for r in runs:
        assert r["config"]["tune"]["study"] == "wandb-study" and "model.init_args.optim.lr" in r["config"]["tune"]
        assert len(r["history"]["val/loss"]) == 2
    assert (out / "best.yaml").is_file()
