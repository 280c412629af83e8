"""``precision: auto`` (trainer) and ``decoder.decode_dtype: auto``: bf16 where the hardware runs it natively, fp32
elsewhere, printed; the shipped real-model configs use them, so they run at the benchmarked settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rlft.cli import main
from rlft.cli.trainer import Trainer
from rlft.models import hardware

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16-mixed"), (False, "32-true")])
def test_precision_auto_follows_the_hardware_and_says_so(monkeypatch, tmp_path, capsys, native, expected):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"amx_bf16"} if native else {"avx2"}))
    trainer = Trainer(precision="auto", accelerator="cpu", logger=False, default_root_dir=tmp_path)
    assert trainer.precision == expected
    assert f"rlft: precision auto -> {expected} (this cpu " in capsys.readouterr().err
    assert Trainer(precision="32-true", accelerator="cpu", logger=False).precision == "32-true"  # set: kept


def test_rlft_fit_takes_precision_auto(tmp_path, capsys):
    main(
        [
            "fit",
            "-c",
            str(REPO / "configs/sft/tiny.yaml"),
            "--trainer.precision",
            "auto",
            "--trainer.max_steps",
            "2",
            "--trainer.limit_val_batches",
            "0",
            "--trainer.logger",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path),
        ]
    )
    expected = hardware.auto_precision("cpu")
    assert f"precision auto -> {expected}" in capsys.readouterr().err
    assert (tmp_path / "hf_model" / "adapter_config.json").is_file()


@pytest.mark.parametrize("method", ["grpo", "ppo", "trpo", "dpo"])
def test_shipped_real_model_configs_run_at_the_benchmarked_settings(method):
    config = yaml.safe_load((REPO / "configs" / method / "smollm2_lora.yaml").read_text())
    # TRPO keeps fp32: its natural-gradient step was never measured in bf16
    assert config["trainer"]["precision"] == ("32-true" if method == "trpo" else "auto")
    init = config["model"]["init_args"]
    if "sampling" in init:  # the online methods: a bf16 decoding twin where bf16 is native
        assert init["decoder"]["decode_dtype"] == "auto" and "decode_dtype" not in init["sampling"]
