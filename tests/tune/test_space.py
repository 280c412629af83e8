"""Search-space YAML: every distribution kind maps onto Optuna's suggest API, conditionals are sampled only when
their condition holds, and malformed files are refused with the file and key."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from rlft.tune import SearchSpaceError, load_search_space, parse_search_space
from rlft.tune.study import make_pruner, make_sampler, storage_url

SPACE = {
    "metric": "val/rewards/accuracy",
    "direction": "maximize",
    "sampler": {"name": "random", "seed": 3},
    "params": {
        "model.init_args.optim.lr": {"log_uniform": [1.0e-5, 1.0e-3]},
        "model.init_args.beta": {"choices": [0.05, 0.1, 0.3]},
        "model.init_args.lora.r": {"int": [4, 32], "step": 4},
        "model.init_args.loss_type": {"choices": ["sigmoid", "ipo"]},
        "model.init_args.label_smoothing": {"uniform": [0.0, 0.2], "when": {"model.init_args.loss_type": "sigmoid"}},
    },
}


def test_sampling_covers_every_kind_and_respects_conditions():
    space = parse_search_space(SPACE)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen_conditional = {True: 0, False: 0}
    for _ in range(30):
        trial = study.ask()
        values = space.sample(trial)
        assert 1e-5 <= values["model.init_args.optim.lr"] <= 1e-3
        assert values["model.init_args.beta"] in (0.05, 0.1, 0.3)
        assert values["model.init_args.lora.r"] in range(4, 33, 4)
        has_smoothing = "model.init_args.label_smoothing" in values
        assert has_smoothing == (values["model.init_args.loss_type"] == "sigmoid")
        seen_conditional[has_smoothing] += 1
        study.tell(trial, 0.0)
    assert all(seen_conditional.values())
    dists = study.trials[0].distributions
    assert dists["model.init_args.optim.lr"].log and dists["model.init_args.lora.r"].step == 4


def test_yaml_exponents_without_a_dot_are_numbers(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("params:\n  model.init_args.optim.lr: {log_uniform: [1e-5, 1e-3]}\n")
    (param,) = load_search_space(path).params
    assert param.spec == [1e-5, 1e-3]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"a.b": {"log_uniform": [0.0, 1.0]}}, "params.a.b: log_uniform needs positive bounds"),
        ({"a.b": {"uniform": [1.0, 0.5]}}, "params.a.b: low must be below high"),
        ({"a.b": {"int": [1.5, 4]}}, "params.a.b: int bounds must be integers"),
        ({"a.b": {"choices": []}}, "params.a.b: choices must be a non-empty list"),
        ({"a.b": {"normal": [0, 1]}}, "params.a.b: give exactly one of"),
        ({"a.b": {"uniform": [0, 1], "log": True}}, "params.a.b: unknown option(s) ['log']"),
        ({"a.b": {"choices": [1], "when": {"c.d": 1}}}, "params.a.b.when: 'c.d' is not a parameter listed before"),
        ({"a.b": 0.1}, "params.a.b: expected a mapping"),
    ],
)
def test_malformed_spaces_name_the_file_and_key(params, message):
    with pytest.raises(SearchSpaceError) as error:
        parse_search_space({"params": params}, "s.yaml")
    assert str(error.value).startswith("s.yaml: ") and message in str(error.value)


def test_top_level_mistakes_are_refused():
    with pytest.raises(SearchSpaceError, match="'params:' section"):
        parse_search_space({"model.init_args.optim.lr": {"uniform": [0, 1]}}, "s.yaml")
    with pytest.raises(SearchSpaceError, match=r"unknown top-level key\(s\) \['metrics'\]"):
        parse_search_space({"params": {"a": {"choices": [1]}}, "metrics": "val/loss"}, "s.yaml")
    with pytest.raises(SearchSpaceError, match="direction: expected minimize or maximize"):
        parse_search_space({"params": {"a": {"choices": [1]}}, "direction": "down"}, "s.yaml")


def test_samplers_pruners_and_storage_by_name(tmp_path):
    assert isinstance(make_sampler({}), optuna.samplers.TPESampler)  # TPE by default
    assert isinstance(make_sampler({"name": "random"}, seed=1), optuna.samplers.RandomSampler)
    assert isinstance(make_sampler({"name": "optuna.samplers:QMCSampler"}), optuna.samplers.QMCSampler)
    assert isinstance(make_pruner({}), optuna.pruners.MedianPruner)
    assert isinstance(make_pruner({"name": "hyperband", "min_resource": 2}), optuna.pruners.HyperbandPruner)
    assert isinstance(make_pruner({"name": "none"}), optuna.pruners.NopPruner)
    with pytest.raises(ValueError, match="unknown sampler 'tpee'"):
        make_sampler({"name": "tpee"})
    with pytest.raises(ValueError, match="pruner 'median'.*n_warmup"):
        make_pruner({"name": "median", "n_warmup": 3})
    assert storage_url(None, tmp_path) == f"sqlite:///{tmp_path.resolve() / 'study.db'}"
    assert storage_url("postgresql://u:p@h/db", tmp_path) == "postgresql+psycopg://u:p@h/db"


SHIPPED = sorted((Path(__file__).resolve().parents[2] / "configs" / "tune").glob("*.yaml"))


@pytest.mark.parametrize("search", SHIPPED, ids=lambda p: p.name)
def test_shipped_search_spaces_validate_against_their_method(search, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    from rlft.cli.tune import Trials

    method = search.name.split("_")[0]  # dpo_lr_beta.yaml -> configs/dpo/tiny.yaml
    space = load_search_space(search)
    Trials([f"configs/{method}/tiny.yaml"], [], repo_root / "runs", space.metric or "val/loss", "t").validate(space)
