"""The base arguments: declared once, per-method defaults as class attributes, typed choices, an injectable
optimiser, plain-data hparams, and the trainer defaults every run starts from."""

from __future__ import annotations

import csv
import dataclasses
import functools
import inspect
import io

import pytest
import torch

import rlft.methods
from rlft.cli.fit import CheckpointError, run_lightning_cli
from rlft.methods import GRPO, SFT, RLFTModule
from rlft.models import LoraSettings

METHODS = ["SFT", "RewardModel", "DPO", "ORPO", "SimPO", "PPO", "GRPO", "ReinforcePP"]
BASE_ARGS = [name for name in inspect.signature(RLFTModule.__init__).parameters if name not in ("self", "model")]
REWARD = [{"source": "length", "options": {"target": 4}}]


def _make(name: str, **kwargs):
    extra = {"rewards": REWARD} if name in ("PPO", "GRPO", "ReinforcePP") else {}
    return getattr(rlft.methods, name)(model="tiny-llama", **extra, **kwargs)


@pytest.mark.parametrize("name", METHODS)
def test_base_arguments_are_declared_once_and_hparams_load_weights_only(name):
    cls = getattr(rlft.methods, name)
    if cls.__init__ is not RLFTModule.__init__:  # SFT adds no arguments of its own
        own = inspect.signature(cls.__init__).parameters
        assert not set(BASE_ARGS) & set(own), "base arguments come through **kwargs"
        assert any(p.kind is p.VAR_KEYWORD for p in own.values())
    module = _make(name)
    assert module.optim_settings.lr == cls.default_lr == module.hparams.optim["lr"]
    buffer = io.BytesIO()
    torch.save({"hyper_parameters": dict(module.hparams)}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["hyper_parameters"]  # no pickled classes anywhere
    assert loaded == dict(module.hparams)
    assert dict(cls(**loaded).hparams) == loaded  # and they rebuild the same module


def test_per_method_defaults_and_explicit_values():
    assert SFT(model="tiny-llama").optim_settings.lr == 2e-4
    assert rlft.methods.DPO(model="tiny-llama").optim_settings.lr == 5e-6
    assert rlft.methods.DPO(model="tiny-llama", optim={"lr": 1e-3}).optim_settings.lr == 1e-3
    with pytest.raises(dataclasses.FrozenInstanceError):  # the default instances are shared: they cannot change
        LoraSettings().r = 4
    assert GRPO(model="tiny-llama", rewards=REWARD, lora=None).hparams.lora is None


def test_an_injected_optimiser_takes_its_own_settings():
    sgd = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9)
    module = SFT(model="tiny-llama", optimizer=sgd)
    assert module.hparams.optimizer == {"class_path": "torch.optim.sgd.SGD", "init_args": {"lr": 0.05, "momentum": 0.9}}
    assert module.optim_settings.lr == 0.05  # what the schedule and the checkpoint report
    with pytest.raises(ValueError, match=r"optim.lr, optim.weight_decay set the default AdamW.*optimizer.init_args"):
        SFT(model="tiny-llama", optim={"lr": 1e-3, "weight_decay": 0.1}, optimizer=sgd)


def test_cli_optimiser_class_path_trains_with_that_optimiser(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["rlft"])
    out = tmp_path / "run"
    cli = run_lightning_cli(
        [
            "fit",
            "-c",
            "configs/sft/tiny.yaml",
            "--trainer.max_steps",
            "4",
            "--trainer.val_check_interval",
            "2",
            "--trainer.default_root_dir",
            str(out),
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.callbacks.every_n_train_steps",
            "2",
            "--model.output_dir",
            str(out / "hf"),
            "--model.optimizer",
            "torch.optim.SGD",
            "--model.optimizer.lr",
            "0.05",
            "--model.optimizer.momentum",
            "0.9",
            "--model.optim",
            '{"lr": null, "scheduler": "constant"}',
        ]  # the config's lr is AdamW's: unset
    )
    optimizer = cli.trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["lr"] == 0.05
    assert optimizer.param_groups[0]["momentum"] == 0.9 and optimizer.param_groups[-1]["weight_decay"] == 0.0
    saved = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)  # the trainer defaults' checkpoint
    assert saved["global_step"] == 4 and saved["hyper_parameters"]["optimizer"]["init_args"]["momentum"] == 0.9
    assert all("momentum_buffer" in s for s in saved["optimizer_states"][0]["state"].values())
    # the default loggers (no logger in the config): CSV with the learning rate, and TensorBoard
    with open(next((out / "csv").glob("version_*/metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    assert [float(r["lr-SGD"]) for r in rows if r.get("lr-SGD")] == [0.05] * 4
    assert any((out / "tensorboard").rglob("events.out.tfevents.*"))
    # its SGD state cannot be resumed into the default AdamW
    with pytest.raises(
        CheckpointError, match=r"model.optimizer cannot change on resume \(checkpoint: 'SGD', this run: 'AdamW'"
    ):
        run_lightning_cli(
            [
                "fit",
                "-c",
                "configs/sft/tiny.yaml",
                "--trainer.max_steps",
                "6",
                "--trainer.default_root_dir",
                str(out),
                "--model.output_dir",
                str(out / "hf"),
                "--model.optim.scheduler",
                "constant",
                "--ckpt_path",
                "last",
            ]
        )


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [("--model.optim.scheduler", "cosin", "Got value: cosin"), ("--model.dtype", "bf16", "Got value: bf16")],
)
def test_a_typo_in_a_closed_choice_fails_at_parse_time(flag, value, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_lightning_cli(["fit", "-c", "configs/dpo/tiny.yaml", flag, value, "--print_config"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and "Literal" in err
