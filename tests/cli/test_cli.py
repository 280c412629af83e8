"""The ``rlft`` command as a user drives it."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlft.cli import main
from rlft.cli.fit import run_lightning_cli

REPO = Path(__file__).resolve().parents[2]
# overlays, search spaces and pipeline files are not fit configs alone: trainer/ here, logger/ and tune/ in
# tests/tune, pipelines/ in tests/pipeline (which parses every stage config they generate)
CONFIGS = sorted(
    p for p in (REPO / "configs").rglob("*.yaml") if p.parent.name not in ("trainer", "logger", "tune", "pipelines")
)
OVERLAYS = sorted(p for p in (REPO / "configs" / "trainer").glob("*.yaml") if p.name != "default.yaml")


def _rlft(*args: str, cwd: Path = REPO, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "rlft", *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_lightning_cli(["fit", "--print_config", "-c", str(config)])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].startswith("rlft.methods.")
    assert printed["data"]["class_path"] == "rlft.data.PreferenceDataModule"


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_trainer_overlays_parse_on_top_of_a_method_config(overlay, capsys):
    with pytest.raises(SystemExit):
        run_lightning_cli(["fit", "--print_config", "-c", "configs/sft/tiny.yaml", "-c", str(overlay)])
    printed = yaml.safe_load(capsys.readouterr().out)
    expected = yaml.safe_load(overlay.read_text())["trainer"]
    for key, value in expected.items():
        if isinstance(value, dict):  # a strategy object: its class and the arguments the overlay sets
            assert printed["trainer"][key]["class_path"] == value["class_path"]
            assert value["init_args"].items() <= printed["trainer"][key]["init_args"].items()
        else:
            assert printed["trainer"][key] == value


def test_every_run_starts_from_the_trainer_defaults(capsys):
    with pytest.raises(SystemExit):
        run_lightning_cli(["fit", "--print_config", "-c", "configs/sft/tiny.yaml"])
    printed = yaml.safe_load(capsys.readouterr().out)["trainer"]
    defaults = yaml.safe_load((REPO / "configs" / "trainer" / "default.yaml").read_text())["trainer"]
    assert printed["log_every_n_steps"] == defaults["log_every_n_steps"] == 1
    assert printed["check_val_every_n_epoch"] is None
    [checkpoint] = printed["callbacks"]
    assert checkpoint["class_path"].endswith("ModelCheckpoint")
    assert defaults["callbacks"][0]["init_args"].items() <= checkpoint["init_args"].items()
    # the package reads the same file (linked), so an installed rlft starts from it too
    assert (REPO / "rlft" / "assets" / "trainer_default.yaml").resolve() == (REPO / "configs/trainer/default.yaml")


def test_overrides_reach_the_instantiated_objects(tmp_path):
    cli_args = [
        "--config",
        "configs/sft/tiny.yaml",
        "--data.path",
        "rlft/assets/sample_pairs.jsonl",
        "--model.lora.r",
        "32",
        "--trainer.max_steps",
        "7",
        "--trainer.default_root_dir",
        str(tmp_path),
    ]
    from rlft.cli.fit import RLFTCLI
    from rlft.data import PreferenceDataModule
    from rlft.methods.base import RLFTModule

    # run=False instantiates model, data and trainer without fitting
    cli = RLFTCLI(
        RLFTModule,
        PreferenceDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=cli_args,
        run=False,
        auto_configure_optimizers=False,
    )
    assert cli.model.lora_settings.r == 32
    assert cli.model.model.peft_config["default"].r == 32
    assert cli.datamodule.hparams.path == "rlft/assets/sample_pairs.jsonl"
    assert cli.trainer.max_steps == 7


def test_user_subclass_runs_through_the_cli_and_resumes_with_last(tmp_path):
    (tmp_path / "my_research.py").write_text(
        "from rlft.methods import SFT\n\n"
        "class MySFT(SFT):\n"
        "    '''SFT with a label-smoothing-like bonus, logged so the test can see it ran.'''\n\n"
        "    def compute_loss(self, batch):\n"
        "        loss, metrics = super().compute_loss(batch)\n"
        "        metrics['my_metric'] = loss.detach() * 0 + 42.0\n"
        "        return loss, metrics\n"
    )
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    root = tmp_path / "run"
    config = (REPO / "configs" / "sft" / "tiny.yaml").read_text().replace("runs/sft-tiny", str(root))
    config = config.replace("rlft/assets/", f"{REPO}/rlft/assets/")
    (tmp_path / "config.yaml").write_text(config)
    common = [
        "-c",
        str(tmp_path / "config.yaml"),
        "--model",
        "my_research.MySFT",
        "--trainer.enable_progress_bar",
        "false",
    ]
    first = _rlft("fit", *common, "--trainer.max_steps", "4", env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (root / "checkpoints" / "last.ckpt").exists() and (root / "hf_model" / "adapter_config.json").exists()
    metrics = (root / "csv" / "version_0" / "metrics.csv").read_text()
    assert "train/my_metric" in metrics.splitlines()[0] and "42.0" in metrics

    resumed = _rlft("fit", *common, "--trainer.max_steps", "6", "--ckpt_path", "last", env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    with open(root / "csv" / "version_1" / "metrics.csv") as f:
        steps = [row["step"] for row in csv.DictReader(f)]
    assert steps and min(int(s) for s in steps) >= 4  # continued at step 4, did not start over


def test_router_help_and_unknown_command(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    for command in ("fit", "models", "generate", "eval", "label"):
        assert command in out
    with pytest.raises(SystemExit) as exit_info:
        main(["frobnicate"])
    assert exit_info.value.code == 2


def test_models_list_and_pull_tiny(capsys):
    main(["models", "pull", "tiny-opt"])
    path = Path(capsys.readouterr().out.strip())
    assert (path / "config.json").exists()
    main(["models", "list"])
    assert "smollm2-135m-instruct" in capsys.readouterr().out


def test_generate_streams_from_an_alias():
    result = _rlft("generate", "tiny-llama", "--prompt", "hello", "--max_new_tokens", "3")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(">>> hello")
