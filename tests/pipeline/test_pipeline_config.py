"""Pipeline config parsing, the data split and the wiring of stage configs (no processes started)."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from rlft.pipeline import PipelineRunner, load_pipeline
from rlft.pipeline.config import METHODS, POLICY_METHODS, method_of, set_dotted
from rlft.pipeline.split import split_pairs

PAIRS = "rlft/assets/sample_pairs.jsonl"


def _write(tmp_path, config: dict):
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _base(tmp_path) -> dict:
    return {
        "run_dir": str(tmp_path / "run"),
        "data": {"paths": [PAIRS], "heldout_fraction": 0.25},
        "stages": {
            "sft": {"config": "configs/sft/tiny.yaml"},
            "rm": {"config": "configs/rm/tiny.yaml", "args": {"model.lora": {"r": 4, "alpha": 8}}},
            "dpo": {"config": "configs/dpo/tiny.yaml", "init": "sft", "args": {"model.beta": 0.3}},
            "grpo": {"config": "configs/grpo/tiny.yaml", "init": "sft", "reward": "rm"},
        },
    }


def test_shipped_pipelines_load(repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    for path in sorted((repo_root / "configs" / "pipelines").glob("*.yaml")):
        config = load_pipeline(path)
        assert "rm" in config.stages and config.evaluation is not None, path


def test_stage_configs_are_wired_to_the_run_folder_and_upstream_outputs(tmp_path, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    runner = PipelineRunner(load_pipeline(_write(tmp_path, _base(tmp_path))))
    run = tmp_path / "run"
    dpo = runner.fit_config("dpo", runner.config.stages["dpo"], run / "dpo", data_path="train.jsonl")
    assert dpo["model"]["init_args"]["model"] == str(run / "sft" / "hf_model")
    assert dpo["model"]["init_args"]["output_dir"] == str(run / "dpo" / "hf_model")
    assert dpo["model"]["init_args"]["beta"] == 0.3
    assert dpo["data"]["init_args"]["path"] == "train.jsonl"
    assert dpo["trainer"]["default_root_dir"] == str(run / "dpo")
    assert "logger" not in dpo["trainer"]  # `rlft fit` then logs CSV + TensorBoard under default_root_dir
    grpo = runner.fit_config("grpo", runner.config.stages["grpo"], run / "grpo", data_path="train.jsonl")
    assert grpo["model"]["init_args"]["rewards"] == [
        {"source": "reward_model", "name": "rm", "options": {"path": str(run / "rm" / "hf_model")}}
    ]
    rm = runner.fit_config("rm", runner.config.stages["rm"], run / "rm", data_path="train.jsonl")
    assert rm["model"]["init_args"]["lora"] == {"r": 4, "alpha": 8}
    assert rm["model"]["init_args"]["model"] == "tiny-llama"  # no init: the config's own model
    assert runner.start_policy() == str(run / "sft" / "hf_model")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda c: c["stages"].update(kto={"config": "configs/kto/tiny.yaml"}),
            "stages.kto: 'kto' is not a method, so set `method:`; methods are ['sft', 'rm', 'dpo', 'orpo', 'simpo', "
            "'grpo', 'ppo', 'trpo', 'online_dpo']",
        ),
        (
            lambda c: c["stages"]["dpo"].update(method="dpop"),
            "stages.dpo: unknown method 'dpop'; methods are ['sft', 'rm', 'dpo',",
        ),
        # stages run in file order: dpo (third) cannot start from grpo (fourth)
        (
            lambda c: c["stages"]["dpo"].update(init="grpo"),
            "stages.dpo.init: 'grpo' must be an earlier stage of this pipeline (it comes later; stages run in file",
        ),
        (lambda c: c["stages"]["dpo"].update(init="spt"), "stages.dpo.init: 'spt' must be an earlier stage of this"),
        (lambda c: c["stages"]["dpo"].update(init="rm"), "stages.dpo.init: 'rm' trains a reward model"),
        (lambda c: c["stages"]["grpo"].pop("reward"), "stages.grpo.reward: name the reward-model stage"),
        (
            lambda c: c["stages"].update(ppo={"config": "configs/ppo/tiny.yaml", "init": "sft"}),
            "stages.ppo.reward: name the reward-model stage (e.g. rm) that scores its ppo samples",
        ),
        (lambda c: c["stages"]["grpo"].update(reward="sft"), "stages.grpo.reward: 'sft' is not a reward-model stage"),
        (lambda c: c["stages"]["dpo"].update(reward="rm"), "stages.dpo.reward: dpo scores no samples"),
        (lambda c: c["stages"]["dpo"].update(relabel="sft"), "stages.dpo.relabel: 'sft' is not a reward-model stage"),
        (
            lambda c: c["stages"]["grpo"].update(relabel="rm"),
            "stages.grpo.relabel: grpo does not train on the preference pairs; relabel is for ['dpo', 'orpo', 'simpo']",
        ),
        (lambda c: c["stages"].update(data={"config": "configs/sft/tiny.yaml"}), "stages.data: a stage name is its"),
        (lambda c: c["stages"].update({"a/b": {"config": "configs/sft/tiny.yaml"}}), "stages.a/b: a stage name is"),
        (lambda c: c["stages"]["rm"].update(config="nope.yaml"), "stages.rm.config: nope.yaml does not exist"),
        (lambda c: c["stages"]["rm"].update(epochs=3), "stages.rm: unknown key(s) ['epochs']"),
        (lambda c: c.pop("data"), "missing required key 'data'"),
    ],
)
def test_bad_pipeline_files_name_the_key(tmp_path, repo_root, monkeypatch, edit, message):
    monkeypatch.chdir(repo_root)
    config = _base(tmp_path)
    edit(config)
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        load_pipeline(_write(tmp_path, config))
    assert "pipe.yaml" in str(error.value)


def test_stage_names_are_free_and_run_in_file_order(tmp_path, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    config = _base(tmp_path)
    config["stages"]["dpo_rm_labels"] = {
        "method": "dpo",
        "config": "configs/dpo/tiny.yaml",
        "init": "sft",
        "relabel": "rm",
    }
    config["stages"]["ppo_small"] = {"method": "ppo", "config": "configs/ppo/tiny.yaml", "init": "dpo", "reward": "rm"}
    config["stages"]["orpo"] = {"config": "configs/orpo/tiny.yaml", "init": "sft"}
    runner = PipelineRunner(load_pipeline(_write(tmp_path, config)))
    assert list(runner.config.stages) == ["sft", "rm", "dpo", "grpo", "dpo_rm_labels", "ppo_small", "orpo"]
    assert runner.policy_stages() == ["dpo", "grpo", "dpo_rm_labels", "ppo_small", "orpo"]
    assert [method_of(n, s) for n, s in runner.config.stages.items()][-3:] == ["dpo", "ppo", "orpo"]
    run = tmp_path / "run"
    ppo = runner.fit_config("ppo_small", runner.config.stages["ppo_small"], run / "ppo_small", data_path="t.jsonl")
    assert ppo["model"]["init_args"]["model"] == str(run / "dpo" / "hf_model")
    assert ppo["model"]["init_args"]["rewards"][0]["options"]["path"] == str(run / "rm" / "hf_model")
    assert runner.model_of("dpo_rm_labels") == run / "dpo_rm_labels" / "hf_model"
    assert runner.start_policy() == str(run / "sft" / "hf_model")


def test_the_method_registry_says_what_each_method_needs():
    assert POLICY_METHODS == ("dpo", "orpo", "simpo", "grpo", "ppo", "trpo", "online_dpo")
    assert [m for m, k in METHODS.items() if k.scored] == ["grpo", "ppo", "trpo", "online_dpo"]
    assert [m for m, k in METHODS.items() if k.pairs] == ["dpo", "orpo", "simpo"]
    assert not METHODS["sft"].policy and not METHODS["rm"].policy


def test_an_online_dpo_stage_under_another_name_exports_its_last_round(tmp_path, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    config = _base(tmp_path)
    config["stages"]["iterative"] = {
        "method": "online_dpo",
        "config": "configs/dpo/tiny.yaml",
        "init": "sft",
        "reward": "rm",
        "rounds": 3,
    }
    runner = PipelineRunner(load_pipeline(_write(tmp_path, config)))
    assert runner.model_of("iterative") == tmp_path / "run" / "iterative" / "round_3" / "hf_model"
    fit = runner.fit_config("iterative", runner.config.stages["iterative"], tmp_path / "r1", data_path="p.jsonl")
    assert "rewards" not in fit["model"]["init_args"]  # its rounds are plain DPO on pairs the loop scored


def test_set_dotted_reaches_init_args():
    config = {"model": {"class_path": "rlft.methods.DPO", "init_args": {"beta": 0.1}}, "trainer": {}}
    set_dotted(config, "model.beta", 0.5)
    set_dotted(config, "model.sampling.max_new_tokens", 8)
    set_dotted(config, "trainer.max_steps", 3)
    assert config["model"]["init_args"] == {"beta": 0.5, "sampling": {"max_new_tokens": 8}}
    assert config["trainer"]["max_steps"] == 3


def test_split_is_deterministic_disjoint_by_prompt_and_counts_drops(tmp_path, repo_root):
    rows = [json.loads(line) for line in (repo_root / PAIRS).read_text().splitlines()]
    data = tmp_path / "pairs.jsonl"
    bad = {"prompt": "q", "chosen": "same", "rejected": "same"}
    data.write_text("\n".join(json.dumps(r) for r in [*rows, bad]) + "\n")
    first = split_pairs([str(data)], tmp_path / "a", heldout_fraction=0.3, seed=1)
    second = split_pairs([str(data)], tmp_path / "b", heldout_fraction=0.3, seed=1)
    assert (tmp_path / "a" / "heldout_pairs.jsonl").read_text() == (tmp_path / "b" / "heldout_pairs.jsonl").read_text()
    assert first["train"] + first["heldout"] == len(rows) and first["dropped"] == {"identical chosen/rejected": 1}
    assert 0.1 < first["heldout"] / len(rows) < 0.5
    train = {json.dumps(json.loads(x)["prompt"]) for x in (tmp_path / "a" / "train_pairs.jsonl").open()}
    held = {json.dumps(json.loads(x)["prompt"]) for x in (tmp_path / "a" / "heldout_pairs.jsonl").open()}
    assert not train & held
    other = split_pairs([str(data)], tmp_path / "c", heldout_fraction=0.3, seed=2)
    assert (tmp_path / "c" / "heldout_pairs.jsonl").read_text() != (tmp_path / "a" / "heldout_pairs.jsonl").read_text()
    assert second == {**first, "files": second["files"]} and other["train"] + other["heldout"] == len(rows)


@pytest.mark.parametrize("name", ["tiny", "hh_harmless_smollm2", "hh_harmless_smollm2_quick"])
def test_every_generated_stage_config_parses_as_an_rlft_fit_config(name, repo_root, monkeypatch, tmp_path, capsys):
    from rlft.cli.fit import run_lightning_cli

    monkeypatch.chdir(repo_root)
    runner = PipelineRunner(load_pipeline(f"configs/pipelines/{name}.yaml"))
    runner.run_dir = tmp_path / "run"
    for stage_name, stage in runner.config.stages.items():
        config = runner.fit_config(stage_name, stage, tmp_path / stage_name, data_path=PAIRS)
        path = tmp_path / f"{stage_name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        with pytest.raises(SystemExit) as exit_info:
            run_lightning_cli(["fit", "--print_config", "-c", str(path)])
        assert exit_info.value.code in (0, None), stage_name
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["model"]["init_args"]["output_dir"] == str(tmp_path / stage_name / "hf_model")
