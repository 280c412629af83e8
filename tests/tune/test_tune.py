"""``rlft tune`` end to end on the tiny models: a real Optuna study beats a bad default, its ``best.yaml`` re-runs
to the same metric under ``rlft fit``, a diverging trial is pruned mid-training, a failing trial is recorded with
its error while the study goes on, and a typo in the search space is named before any trial runs."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from rlft.cli import main as rlft_main
from rlft.cli.tune import main as tune

LR = "model.init_args.optim.lr"


def _study(out: Path) -> optuna.Study:
    return optuna.load_study(study_name=out.name, storage=f"sqlite:///{out / 'study.db'}")


@pytest.mark.slow
def test_study_beats_a_bad_default_and_best_config_reruns_to_the_same_metric(
    tmp_path, write_search, capsys, tiny, last_logged
):
    out = tmp_path / "sft-lr"
    search = write_search({"params": {LR: {"log_uniform": [1.0e-6, 3.0e-2]}}, "pruner": "none"})
    argv = ["-c", "configs/sft/tiny.yaml", "--search", search, "--trials", "3", "--out", str(out), "--seed", "1"]
    tune([*argv, "--baseline", *tiny, f"--{LR}", "1.0e-6"])  # the config's (bad) lr runs first

    study = _study(out)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    baseline = trials[0]
    assert baseline.user_attrs["baseline"] and baseline.params[LR] == pytest.approx(1e-6)
    assert study.best_trial.number != 0
    assert study.best_value < baseline.value - 0.05, [(t.params, t.value) for t in trials]
    for t in trials:  # each trial ran from its own folder and config, and logged the metric it was scored on
        run_dir = out / f"trial_{t.number}"
        assert Path(t.user_attrs["run_dir"]) == run_dir.resolve()
        assert (run_dir / "config.yaml").is_file() and (run_dir / "hf_model" / "adapter_config.json").is_file()
        assert last_logged(run_dir / "csv" / "version_0" / "metrics.csv", "val/loss") == pytest.approx(t.value)

    printed = capsys.readouterr().out
    assert "trial  state     val/loss  lr" in printed and f"best: trial {study.best_trial.number}" in printed
    for plot in ("history.png", "importances.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best"]["value"] == study.best_value

    rlft_main(["fit", "-c", str(out / "best.yaml")])  # best.yaml runs as is and reproduces the trial
    rerun = last_logged(out / "best" / "csv" / "version_0" / "metrics.csv", "val/loss")
    assert rerun == pytest.approx(study.best_value, rel=1e-4)
    assert (out / "best" / "hf_model" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_pruning_stops_a_diverging_trial(tmp_path, write_search, tiny):
    out = tmp_path / "prune"
    search = write_search(
        {
            "params": {LR: {"log_uniform": [1.0e-4, 100.0]}},
            "pruner": {"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0},
        }
    )
    study = optuna.create_study(study_name=out.name, storage=f"sqlite:///{out.mkdir() or out / 'study.db'}")
    study.enqueue_trial({LR: 3.0e-3})
    study.enqueue_trial({LR: 100.0})  # diverges: its first validation is far above the median
    tune(["-c", "configs/sft/tiny.yaml", "--search", search, "--trials", "2", "--out", str(out), *tiny])

    good, bad = _study(out).get_trials()
    assert good.state == TrialState.COMPLETE and sorted(good.intermediate_values) == [4, 8]
    assert bad.state == TrialState.PRUNED
    assert sorted(bad.intermediate_values) == [4]  # stopped at the first validation, not at max_steps=8
    assert not (out / "trial_1" / "hf_model").exists()  # training never reached its end


@pytest.mark.slow
def test_failing_trial_is_recorded_with_its_error_and_the_study_goes_on(tmp_path, write_search, capsys, tiny):
    out = tmp_path / "fail"
    search = write_search({"params": {"model.init_args.model": {"choices": ["tiny-llama", "/nowhere/no-model"]}}})
    study = optuna.create_study(study_name=out.name, storage=f"sqlite:///{out.mkdir() or out / 'study.db'}")
    study.enqueue_trial({"model.init_args.model": "/nowhere/no-model"})
    study.enqueue_trial({"model.init_args.model": "tiny-llama"})
    tune(["-c", "configs/sft/tiny.yaml", "--search", search, "--trials", "1", "--out", str(out), *tiny])

    failed, done = _study(out).get_trials()
    assert failed.state == TrialState.FAIL and "/nowhere/no-model" in failed.user_attrs["error"]
    assert done.state == TrialState.COMPLETE
    printed = capsys.readouterr().out
    assert "trial 0 failed:" in printed and "/nowhere/no-model" in printed


def test_every_trial_failing_exits_with_an_error(tmp_path, write_search, tiny):
    out = tmp_path / "allfail"
    search = write_search({"params": {"model.init_args.model": {"choices": ["/nowhere/a", "/nowhere/b"]}}})
    with pytest.raises(SystemExit, match="no trial completed"):
        tune(["-c", "configs/sft/tiny.yaml", "--search", search, "--trials", "2", "--out", str(out), *tiny])
    assert {t.state for t in _study(out).get_trials()} == {TrialState.FAIL}


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"model.init_args.optim.lrr": {"log_uniform": [1.0e-5, 1.0e-3]}}, "params.model.init_args.optim.lrr"),
        ({"model.init_args.bet": {"choices": [0.1, 0.3]}}, "params.model.init_args.bet"),
        ({"data.init_args.batch_size": {"choices": [2, "many"]}}, "data.init_args.batch_size='many'"),
    ],
)
def test_a_typo_or_bad_value_is_named_before_any_trial(tmp_path, write_search, params, named):
    out = tmp_path / "typo"
    search = write_search({"params": params})
    with pytest.raises(SystemExit) as error:
        tune(["-c", "configs/dpo/tiny.yaml", "--search", search, "--trials", "1", "--out", str(out)])
    assert named in str(error.value) and search in str(error.value)
    assert not (out / "study.db").exists() and not list(out.glob("trial_*"))
