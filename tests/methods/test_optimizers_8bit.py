"""bitsandbytes' 8-bit optimisers through the injectable ``optimizer``: a real fit whose optimiser is the bnb class
with 8-bit state and whose loss falls, a resume that continues that state exactly, and the settings that cannot
work refused before training with one line (package missing, FSDP2's sharded parameters)."""

from __future__ import annotations

import csv
import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
import torch

from rlft.cli import main
from rlft.cli.fit import run_lightning_cli
from rlft.methods import SFT
from rlft.methods.optim import optimizer_factory

REPO = Path(__file__).resolve().parents[2]
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed (pip install 'rlft[qlora]')")


def _fit(root: Path, *extra: str, steps: int = 6):
    """Full fine-tuning of tiny-llama (its embedding and MLP weights are large enough for 8-bit state) on one
    repeated batch, so the loss must fall; a checkpoint every 3 steps, all kept."""
    return run_lightning_cli(
        [
            "fit",
            "-c",
            str(REPO / "configs/sft/tiny.yaml"),
            "--data.path",
            str(REPO / "rlft/assets/sample_sft.jsonl"),
            "--model.lora",
            "null",
            "--model.optim",
            '{"lr": null, "scheduler": "constant"}',
            "--model.optimizer",
            "AdamW8bit",  # the short class name resolves on the command line
            "--model.optimizer.lr",
            "1e-3",
            "--model.optimizer.weight_decay",
            "0.0",
            "--trainer.max_steps",
            str(steps),
            "--trainer.overfit_batches",
            "1",
            "--trainer.limit_val_batches",
            "0",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.callbacks.every_n_train_steps",  # the default ModelCheckpoint (<root>/checkpoints)
            "3",
            "--trainer.callbacks.save_top_k",
            "-1",
            "--trainer.default_root_dir",
            str(root),
            "--model.output_dir",
            str(root / "hf"),
            *extra,
        ]
    )


def _losses(root: Path) -> dict[int, float]:
    rows = []
    for path in sorted((root / "csv").glob("version_*/metrics.csv")):
        with open(path) as f:
            rows += [r for r in csv.DictReader(f) if r.get("train/loss")]
    return {int(r["step"]): float(r["train/loss"]) for r in rows}


@needs_bnb
def test_adamw8bit_trains_with_8bit_state_and_resumes_onto_the_same_run(tmp_path, monkeypatch):
    import bitsandbytes as bnb

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("sys.argv", ["rlft"])
    whole = tmp_path / "whole"
    cli = _fit(whole)
    optimizer = cli.trainer.optimizers[0]
    assert type(optimizer) is bnb.optim.AdamW8bit
    states = list(optimizer.state.values())
    assert any(s["state1"].dtype == torch.uint8 and s["state2"].dtype == torch.uint8 for s in states), "8-bit state"
    losses = _losses(whole)
    assert len(losses) == 6 and losses[5] < losses[0] - 0.5, losses

    # resume from the step-3 checkpoint: the 8-bit state comes back, and steps 3-5 repeat the uninterrupted run
    step3 = next((whole / "checkpoints").glob("*step=3.ckpt"))
    saved = torch.load(step3, weights_only=True)
    # bitsandbytes keeps its quantisation state under one key of its own (hidden from FSDP's gathering)
    saved_states = [s.get("__bnb_optimizer_quant_state__", s) for s in saved["optimizer_states"][0]["state"].values()]
    assert any(s["state1"].dtype == torch.uint8 and "absmax1" in s for s in saved_states)
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(step3, resumed / "checkpoints" / "last.ckpt")
    cli = _fit(resumed, "--ckpt_path", "last")
    assert type(cli.trainer.optimizers[0]) is bnb.optim.AdamW8bit
    again = _losses(resumed)
    for step in (3, 4, 5):
        assert again[step] == pytest.approx(losses[step], rel=1e-5), (step, again, losses)
    end_whole = torch.load(next((whole / "checkpoints").glob("*step=6.ckpt")), weights_only=True)
    end_resumed = torch.load(next((resumed / "checkpoints").glob("*step=6.ckpt")), weights_only=True)
    for name, weight in end_whole["state_dict"].items():
        torch.testing.assert_close(end_resumed["state_dict"][name], weight, rtol=1e-5, atol=1e-6, msg=name)


@needs_bnb
def test_paged_and_8bit_optimisers_step_plain_cpu_tensors():
    """Measured with bitsandbytes 0.50: 8-bit state on CPU, and paged optimisers fall back to unpaged ones."""
    import bitsandbytes as bnb

    for cls in (bnb.optim.AdamW8bit, bnb.optim.PagedAdamW8bit, bnb.optim.PagedAdamW, bnb.optim.Lion8bit):
        weight = torch.nn.Parameter(torch.randn(128, 64))
        before = weight.detach().clone()
        optimizer = optimizer_factory({"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": {}})(
            [{"params": [weight]}]
        )
        assert type(optimizer) is cls
        weight.square().sum().backward()
        with pytest.warns(UserWarning, match="Paged") if "Paged" in cls.__name__ else _nothing():
            optimizer.step()
        assert not torch.equal(weight, before)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_a_missing_package_is_refused_with_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", None)
    spec = {"class_path": "bitsandbytes.optim.AdamW8bit", "init_args": {"lr": 2e-4}}
    with pytest.raises(ValueError, match=r"optimizer bitsandbytes.optim.AdamW8bit needs bitsandbytes.*rlft\[qlora\]"):
        SFT(model="tiny-llama", optimizer=spec)


def test_a_missing_package_stops_rlft_fit_with_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["fit", "-c", str(REPO / "configs/sft/tiny.yaml"), "--trainer.default_root_dir", str(tmp_path)]
    argv += ["--model.optimizer", "bitsandbytes.optim.AdamW8bit", "--model.optim", '{"lr": null}']
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code not in (0, None)
    err = capsys.readouterr().err
    assert "Traceback" not in err and not (tmp_path / "checkpoints").exists()
    error = [line for line in err.splitlines() if "error:" in line]
    assert len(error) == 1 and "optimizer" in error[0] and "bitsandbytes" in error[0], err


@needs_bnb
def test_fsdp2_sharded_parameters_are_refused_before_the_first_step(tmp_path):
    """bitsandbytes' kernels take plain tensors; FSDP2's DTensors fail at the first step ("got mixed torch.Tensor
    and DTensor"), so the optimiser is refused where it is built."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        weight = torch.nn.Parameter(distribute_tensor(torch.randn(128, 64), mesh, [Shard(0)]))
        build = optimizer_factory({"class_path": "bitsandbytes.optim.AdamW8bit", "init_args": {"lr": 1e-3}})
        with pytest.raises(ValueError, match=r"AdamW8bit cannot step FSDP2's sharded \(DTensor\) parameters.*ZeRO"):
            build([{"params": [weight]}])
    finally:
        if started:
            dist.destroy_process_group()
