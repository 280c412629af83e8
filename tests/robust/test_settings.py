"""Settings that cannot lie: with ``--ckpt_path`` the command line wins, mismatched checkpoints are refused, no run
writes into another run's folder, ``last`` with nothing to resume says so; user errors are one readable line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlft.cli import main

REPO = Path(__file__).resolve().parents[2]
SFT = str(REPO / "configs/sft/tiny.yaml")
PPO = str(REPO / "configs/ppo/tiny.yaml")
SFT_DATA = str(REPO / "rlft/assets/sample_sft.jsonl")


def _sft(root: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "-c",
        SFT,
        "--data.path",
        SFT_DATA,
        "--trainer.default_root_dir",
        str(root),
        "--trainer.logger",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.max_steps",
        "2",
        "--trainer.val_check_interval",
        "2",
        "--trainer.limit_val_batches",
        "1",
        "--model.init_args.output_dir",
        str(root / "hf_model"),
        *extra,
    ]


def _fails(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code not in (0, None)
    err = _without_logging_noise(capsys.readouterr().err)
    assert "Traceback" not in err, err
    return err


def _without_logging_noise(text: str) -> str:
    """Drop "--- Logging error ---" reports: Lightning's handlers keep an earlier test's (closed) captured stderr."""
    kept, skipping = [], False
    for line in text.splitlines():
        if line.startswith("--- Logging error ---"):
            skipping = True
        elif skipping and line.startswith("Arguments:"):
            skipping = False
            continue
        if not skipping:
            kept.append(line)
    return "\n".join(kept)


def test_command_line_wins_over_the_checkpoint_and_exports_to_its_own_folder(tmp_path, capsys):
    first = tmp_path / "first"
    constant = ["--model.init_args.optim.scheduler", "constant_with_warmup"]
    main([*_sft(first), *constant])
    export = first / "hf_model" / "adapter_model.safetensors"
    before = export.stat().st_mtime_ns
    ckpt = first / "checkpoints" / "last.ckpt"
    second = tmp_path / "second"
    main(
        [
            *_sft(second, "--ckpt_path", str(ckpt)),
            *constant,
            "--trainer.max_steps",
            "3",
            "--model.init_args.optim.lr",
            "0.5",
        ]
    )
    assert "optim.lr 0.5" in capsys.readouterr().err
    assert (second / "hf_model" / "adapter_model.safetensors").is_file()
    assert export.stat().st_mtime_ns == before  # the first run's export is untouched
    resumed = torch.load(second / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 3 and resumed["hyper_parameters"]["optim"]["lr"] == 0.5
    # the restored optimiser really uses the new rate, not the checkpoint's 1e-3
    assert resumed["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.5)


def test_checkpoint_of_another_method_or_shape_is_refused(tmp_path, capsys):
    first = tmp_path / "sft"
    main(_sft(first))
    ckpt = torch.load(first / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["hyper_parameters"]["_class_path"] = "rlft.methods.PPO"
    torch.save(ckpt, tmp_path / "ppo.ckpt")
    err = _fails(_sft(tmp_path / "x", "--ckpt_path", str(tmp_path / "ppo.ckpt")), capsys)
    assert "written by rlft.methods.PPO, but this run trains rlft.methods.SFT" in err
    last = str(first / "checkpoints" / "last.ckpt")
    err = _fails(_sft(tmp_path / "y", "--ckpt_path", last, "--model.init_args.lora.r", "4"), capsys)
    assert "model.lora cannot change on resume" in err
    err = _fails(_sft(tmp_path / "z", "--ckpt_path", last, "--data.batch_size", "2"), capsys)
    assert "data.batch_size cannot change on resume" in err
    err = _fails(_sft(tmp_path / "w", "--ckpt_path", last, "--model.init_args.optim.scheduler", "linear"), capsys)
    assert "model.optim.scheduler cannot change on resume" in err


def test_truncated_checkpoint_is_a_clear_error(tmp_path, capsys):
    first = tmp_path / "a"
    main(_sft(first))
    data = (first / "checkpoints" / "last.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 3])
    err = _fails(_sft(tmp_path / "b", "--ckpt_path", str(tmp_path / "cut.ckpt")), capsys)
    assert "cut.ckpt: not a readable checkpoint" in err and "truncated" in err


def test_last_with_nothing_to_resume_is_an_error_and_last_or_fresh_starts(tmp_path, capsys):
    err = _fails(_sft(tmp_path / "a", "--ckpt_path", "last"), capsys)
    assert "nothing to resume" in err and "last_or_fresh" in err
    main(_sft(tmp_path / "a", "--ckpt_path", "last_or_fresh"))
    assert "starting fresh" in capsys.readouterr().err
    assert (tmp_path / "a" / "checkpoints" / "last.ckpt").is_file()
    main([*_sft(tmp_path / "a", "--ckpt_path", "last_or_fresh"), "--trainer.max_steps", "3"])
    assert torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3


def test_a_run_never_writes_into_another_runs_output_folder(tmp_path, capsys):
    main(_sft(tmp_path / "a"))
    marker = json.loads((tmp_path / "a" / "hf_model" / "rlft_run.json").read_text())
    assert marker["method"] == "rlft.methods.SFT"
    other = [*_sft(tmp_path / "b"), "--model.init_args.output_dir", str(tmp_path / "a" / "hf_model")]
    err = _fails(other, capsys)
    assert "holds the export of another run" in err
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("mine")
    err = _fails([*_sft(tmp_path / "c"), "--model.init_args.output_dir", str(tmp_path / "stuff")], capsys)
    assert "is not empty and was not written by this run" in err
    main(_sft(tmp_path / "a"))  # the same run again may overwrite its own export


def test_default_root_dir_moves_the_whole_run_export_included(tmp_path):
    # the shipped config names no output_dir: the export follows --trainer.default_root_dir (with the default
    # loggers on, whose versioned folders must not swallow it), so a second root is a second, independent run
    for root in (tmp_path / "a", tmp_path / "b"):
        argv = _sft(root)
        del argv[argv.index("--model.init_args.output_dir") : argv.index("--model.init_args.output_dir") + 2]
        del argv[argv.index("--trainer.logger") : argv.index("--trainer.logger") + 2]
        main(argv)
        assert (root / "hf_model" / "adapter_config.json").is_file()
        assert json.loads((root / "hf_model" / "rlft_run.json").read_text())["run_dir"] == str(root.resolve())
        assert (root / "checkpoints" / "last.ckpt").is_file() and list((root / "csv").glob("version_*/metrics.csv"))


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--model.init_args.lora.r", "0"], "r"),
        (["--model.init_args.model", "no-such-model-alias"], "no-such-model-alias"),
        (["--data.max_length", "1"], "data.max_length must be >= 2"),
        (["--data.max_length", "-5"], "data.max_length must be >= 2"),
        (["--data.batch_size", "0"], "data.batch_size must be >= 1"),
        (["--model.init_args.dtype", "float16"], "float16 on CPU"),
    ],
)
def test_bad_settings_are_one_line_without_traceback(tmp_path, capsys, extra, expected):
    err = _fails([*_sft(tmp_path), *extra], capsys)
    assert expected in err
    assert "Does not validate against any of the Union subtypes" not in err and "Namespace(" not in err
    lines = [line for line in err.strip().splitlines() if not line.startswith("Loading weights")]
    assert lines[-2].startswith("rlft fit: error:") and len(lines[-2]) < 400, err


def test_bad_method_settings_and_data_errors_name_the_problem(tmp_path, capsys):
    dpo = str(REPO / "configs/dpo/tiny.yaml")
    base = [
        "fit",
        "-c",
        dpo,
        "--data.path",
        str(REPO / "rlft/assets/sample_pairs.jsonl"),
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.logger",
        "false",
        "--model.init_args.output_dir",
        str(tmp_path / "dpo_out"),
    ]
    assert "beta must be > 0, got -1.0" in _fails([*base, "--model.init_args.beta", "-1"], capsys)
    assert "unknown loss_type 'nope'" in _fails([*base, "--model.init_args.loss_type", "nope"], capsys)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert f"{empty}: no rows" in _fails([*base, "--data.val_path", str(empty)], capsys)
    grpo = [
        "fit",
        "-c",
        str(REPO / "configs/grpo/tiny.yaml"),
        "--trainer.default_root_dir",
        str(tmp_path),
        "--model.init_args.output_dir",
        str(tmp_path / "grpo_out"),
    ]
    assert "group_size=1 is too small: must be >= 2" in _fails([*grpo, "--model.init_args.group_size", "1"], capsys)
    ppo = ["fit", "-c", PPO, "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false"]
    ppo += [
        "--data.path",
        str(REPO / "rlft/assets/sample_prompts.jsonl"),
        "--model.init_args.output_dir",
        str(tmp_path / "ppo_out"),
    ]
    assert "data.packing: true is not possible for prompts" in _fails([*ppo, "--data.packing", "true"], capsys)


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.delenv("RLFT_DEBUG", raising=False)
    with pytest.raises(ValueError, match="max_length"):
        main([*_sft(tmp_path), "--data.max_length", "1", "--debug"])
    monkeypatch.delenv("RLFT_DEBUG", raising=False)
