"""Tool-using, multi-turn RL through `rlft fit` with GRPO, REINFORCE++, PPO and TRPO: one core, one `agent:` block.

The sampler is scripted (``my_pkg.agent_script:scripted``: a calculator call, then the tool's result as the answer)
so the outcome is known exactly; the tiny model still scores every token and takes the updates."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest
import torch

from rlft.data import PreferenceDataModule
from rlft.methods import GRPO

REPO = Path(__file__).resolve().parents[2]
TASKS = str(REPO / "rlft" / "assets" / "tool_arithmetic.jsonl")
AGENT = [
    "--data.init_args.path",
    TASKS,
    "--model.init_args.rewards",
    "[{source: exact_match, options: {field: answer, extract: last_number}}]",
    "--model.init_args.agent",
    "{tools: [calculator], max_turns: 3, max_tokens: 400}",
    "--model.init_args.decoder.backend",
    "my_pkg.agent_script:scripted",
    "--model.init_args.sampling.max_new_tokens",
    "120",
]

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("method", ["grpo", "reinforce_pp", "ppo", "trpo"])
def test_every_online_method_trains_on_tool_using_trajectories(cli_fit, method):
    # max_steps counts optimiser steps (PPO's tiny config takes 2 per rollout), validation counts rollouts
    rows = cli_fit(method, *AGENT, "--trainer.val_check_interval", "1", steps=2)
    assert rows.column("train/agent/turns") and set(rows.column("train/agent/turns")) == {2.0}
    assert set(rows.column("train/agent/tool_calls")) == {1.0}
    assert set(rows.column("train/agent/tool_call_validity")) == {1.0}
    assert set(rows.column("train/reward")) == {1.0}  # the tool's result, answered: correct
    assert rows.column("val/reward") and set(rows.column("val/reward")) == {1.0}
    assert set(rows.column("val/agent/turns")) == {2.0}


def test_the_reward_grades_the_final_answer_not_the_tool_result(cli_fit):
    env = {**os.environ, **_env(), "SCRIPT_MODE": "wrong"}
    rows = cli_fit("grpo", *AGENT, steps=1, validate=False, env=env)
    assert rows.column("train/reward") == [0.0] and rows.column("train/agent/tool_calls") == [1.0]


def _env() -> dict:
    return {"PYTHONPATH": str(REPO / "tests" / "methods"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_the_loss_reaches_the_models_tokens_only(tmp_path):
    """Gradient of the whole minibatch loss (policy, KL-in-loss) with respect to the update's log-probs: nonzero on
    the model's tokens, exactly zero on the tool results and turn headers the environment inserted."""
    L.seed_everything(0)
    module = GRPO(
        model="tiny-llama",
        rewards=[{"source": "length", "options": {"target": 30, "unit": "chars"}}],
        agent={"tools": ["calculator"], "max_turns": 3, "max_tokens": 400},
        sampling={"max_new_tokens": 120},
        decoder={"backend": "my_pkg.agent_script:scripted"},
        group_size=2,
        kl={"coef": 0.1, "placement": "loss"},
        output_dir=str(tmp_path / "out"),
    )
    data = PreferenceDataModule(path=TASKS, batch_size=2, max_length=256, val_fraction=0.0)
    trainer = L.Trainer(accelerator="cpu", max_steps=0, logger=False, enable_checkpointing=False)
    trainer.fit(module, datamodule=data)  # builds the model and tokenizer
    batch = next(iter(data.train_dataloader()))
    rollout = module.prepare(batch, "train")
    rollout.scores = rollout.rewards = torch.tensor([0.0, 1.0, 1.0, 0.0])  # a spread, so advantages are not 0
    rollout.advantages = module.advantages(rollout, rollout.scores)[:, None] * rollout.response_mask
    scored = module.score_tokens(rollout)
    leaf = scored.logps.detach().requires_grad_(True)
    module.score_tokens = lambda batch: type(scored)(leaf, scored.entropy, scored.hidden)
    module.minibatch_loss(rollout).loss.backward()
    env, model = rollout.env_mask.bool(), rollout.response_mask.bool()
    assert env.any() and (leaf.grad[env] == 0).all()
    assert (leaf.grad[model] != 0).float().mean() > 0.9
    assert (leaf.grad[~(env | model)] == 0).all()  # padding


def test_a_research_environment_from_yaml_is_the_reward(cli_fit):
    """my_pkg.envs:GuessTheNumber (quoted in docs/agents.md): no tools, no `rewards`; the environment's own reward
    trains the policy, and its per-episode turns are logged."""
    rows = cli_fit(
        "grpo",
        "--model.init_args.rewards",
        "null",
        "--model.init_args.agent",
        "{environment: my_pkg.envs:GuessTheNumber, environment_args: {low: 1, high: 3}, max_turns: 4, max_tokens: 200}",
        "--model.init_args.sampling.max_new_tokens",
        "6",
        steps=2,
        validate=False,
    )
    turns, rewards = rows.column("train/agent/turns"), rows.column("train/reward")
    assert len(turns) == 2 and all(1.0 <= t <= 4.0 for t in turns)
    assert rows.column("train/agent/env_reward") == rewards  # the environment is the whole reward
