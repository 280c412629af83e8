"""RunMonitor: each online-RL failure pattern warns once with its numbers and re-arms after clearing; healthy noise
and offline metrics stay quiet; ``action: stop`` ends training; a real tiny GRPO run trips it."""

from __future__ import annotations

import logging
import math
import random
from types import SimpleNamespace

import lightning as L
import pandas as pd
import pytest
import torch

from rlft.callbacks import RunMonitor
from rlft.callbacks.monitors import clip_saturated, entropy_collapsed, kl_growing, length_hacking, trend
from rlft.data import PreferenceDataModule
from rlft.methods import GRPO

LOGGER = "rlft.callbacks.monitors"
PROMPTS = "rlft/assets/sample_prompts.jsonl"
PHRASES = {
    "kl_growth": "KL to the reference is running away",
    "entropy_collapse": "policy entropy collapsed",
    "length_hacking": "reward is rising while responses hit the length cap",
    "clip_saturation": "clip fraction saturated",
}


class FakeModule:
    def __init__(self) -> None:
        self.logged: list[tuple[str, float, int]] = []


def feed(monitor: RunMonitor, rows: list[dict], step_size: int = 3):
    """Run the callback over metric rows as Lightning would; ``step_size`` optimiser steps per rollout."""
    trainer = SimpleNamespace(callback_metrics={}, global_step=0, should_stop=False)
    module = FakeModule()
    module.log = lambda name, value, **kw: module.logged.append((name, value, trainer.global_step))
    for row in rows:
        trainer.global_step += step_size
        trainer.callback_metrics = {k: torch.tensor(float(v)) for k, v in row.items()}
        monitor.on_train_batch_end(trainer, module, None, None, 0)
    return trainer, module


def messages(caplog, level: int = logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == level]


def healthy(rng: random.Random, step: int) -> dict:
    """A run that learns: KL drifts up slowly, entropy falls 40% over 200 rollouts, noisy reward, mostly finished
    responses, clip fraction around 0.1 with single-rollout spikes."""
    return {
        "train/kl": max(0.0, 0.02 + 1e-4 * step + rng.gauss(0, 0.005)),
        "train/entropy": 1.0 - 0.002 * step + rng.gauss(0, 0.05),
        "train/reward": 0.3 + 0.002 * step + rng.gauss(0, 0.1),
        "train/stop_rate": min(1.0, 0.9 + rng.gauss(0, 0.05)),
        "train/clipfrac": 0.45 if step % 17 == 0 else max(0.0, 0.1 + rng.gauss(0, 0.05)),
        "train/response_length": 50 + rng.gauss(0, 5),
    }


def broken(condition: str, rng: random.Random, step: int, k: int) -> dict:
    """A healthy row with one failure pattern, ``k`` rollouts into it."""
    row = healthy(rng, step)
    if condition == "kl_growth":
        row["train/kl"] = 0.03 * 1.15**k * (1 + rng.gauss(0, 0.05))
    elif condition == "entropy_collapse":
        row["train/entropy"] = 0.05 + abs(rng.gauss(0, 0.01))
    elif condition == "length_hacking":
        row["train/reward"] = 0.3 + 0.05 * k + rng.gauss(0, 0.02)
        row["train/stop_rate"], row["train/response_length"] = 0.2, 128
    else:
        row["train/clipfrac"] = 0.5
    return row


# ---------------------------------------------------------------------------------------------- detection math
def test_trend_slope_and_t_statistic():
    assert trend([1.0, 2.0, 3.0, 4.0]) == (pytest.approx(1.0), math.inf)
    assert trend([3.0, 2.0, 1.0]) == (pytest.approx(-1.0), -math.inf)
    assert trend([2.0, 2.0, 2.0]) == (0.0, 0.0)
    assert trend([1.0, 5.0]) == (0.0, 0.0)  # two points: no trend
    slope, t = trend([1.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    assert slope < 0 and abs(t) < 1
    slope, t = trend([0.0, 1.1, 1.9, 3.2, 3.9, 5.1])  # noisy line, slope ~1
    assert slope == pytest.approx(1.0, abs=0.05) and t > 20


def test_kl_growing_is_relative_to_level_with_a_floor():
    assert kl_growing([0.01 * 1.3**k for k in range(20)], 1.0, 0.1)  # 0.01 -> 1.5: runaway
    assert not kl_growing([0.0, 0.001, 0.002, 0.004, 0.005], 1.0, 0.1)  # climbing from 0: floor holds
    assert not kl_growing([5.0 + 0.01 * k for k in range(20)], 1.0, 0.1)  # steady drift on a high level
    assert not kl_growing([0.05, 0.2, 0.04, 0.06, 0.05, 0.05], 1.0, 0.1)  # one spike
    assert not kl_growing([2.0 * 1.3**k for k in range(10)][::-1], 1.0, 0.1)  # falling
    assert not kl_growing([0.1, 5.0], 1.0, 0.1)  # two points: no trend


def test_entropy_collapsed_ratio_floor_and_median():
    assert entropy_collapsed([0.08, 0.07, 0.09], baseline=1.0, min_ratio=0.1, floor=0.02)
    assert not entropy_collapsed([0.5, 0.45, 0.6], baseline=1.0, min_ratio=0.1, floor=0.02)  # healthy decline
    assert entropy_collapsed([0.01, 0.015, 0.012], baseline=0.05, min_ratio=0.1, floor=0.02)  # absolute floor
    assert not entropy_collapsed([0.5, 0.01, 0.6], baseline=1.0, min_ratio=0.1, floor=0.02)  # one low rollout
    assert not entropy_collapsed([], baseline=1.0, min_ratio=0.1, floor=0.02)


def test_length_hacking_needs_rising_reward_and_truncation():
    rising, flat = [0.1 * k + 0.01 * (-1) ** k for k in range(10)], [0.5 + 0.1 * (-1) ** k for k in range(10)]
    assert length_hacking(rising, [0.2] * 10, min_t=3.0, max_truncated=0.5)
    assert not length_hacking(rising, [0.9] * 10, min_t=3.0, max_truncated=0.5)  # finishing: honest learning
    assert not length_hacking(flat, [0.1] * 10, min_t=3.0, max_truncated=0.5)  # truncated but not rising
    assert not length_hacking(rising[::-1], [0.1] * 10, min_t=3.0, max_truncated=0.5)
    assert not length_hacking(rising, [], min_t=3.0, max_truncated=0.5)


def test_clip_saturated_needs_consecutive_steps():
    assert clip_saturated([0.1, 0.4, 0.5, 0.35], threshold=0.3, steps=3)
    assert not clip_saturated([0.4, 0.5, 0.2, 0.35], threshold=0.3, steps=3)
    assert not clip_saturated([0.5, 0.5], threshold=0.3, steps=3)


# ---------------------------------------------------------------------------------------------- the callback
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_healthy_noisy_run_never_warns(caplog, seed):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    rng = random.Random(seed)
    trainer, module = feed(RunMonitor(), [healthy(rng, s) for s in range(300)])
    assert messages(caplog) == [] and not trainer.should_stop
    logged = {name for name, _, _ in module.logged}
    assert logged == {f"monitor/{c}" for c in PHRASES}
    assert all(value == 0.0 for _, value, _ in module.logged)


@pytest.mark.parametrize("condition", list(PHRASES))
def test_each_condition_warns_once_per_episode_and_rearms(caplog, condition):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    rng = random.Random(0)
    rows = [healthy(rng, s) for s in range(40)]
    rows += [broken(condition, rng, 40 + k, k) for k in range(30)]
    first = len(rows)
    rows += [healthy(rng, len(rows)) for _ in range(40)]  # clears, then stays clear well past rearm_steps
    rows += [broken(condition, rng, len(rows), k) for k in range(30)]
    trainer, module = feed(RunMonitor(), rows)
    warned = messages(caplog)
    assert len(warned) == 2, warned
    assert all(PHRASES[condition] in m for m in warned), warned  # no other condition fired
    flags = [(value, step) for name, value, step in module.logged if name == f"monitor/{condition}"]
    onsets = [step for i, (value, step) in enumerate(flags) if value == 1.0 and (i == 0 or flags[i - 1][0] == 0.0)]
    assert len(onsets) == 2 and 40 * 3 < onsets[0] <= first * 3 < onsets[1]
    assert [f"at step {s}:" in m for m, s in zip(warned, onsets)] == [True, True]
    assert "try " in warned[0] and not trainer.should_stop


def test_messages_carry_the_numbers(caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    rng = random.Random(0)
    rows = [healthy(rng, s) for s in range(40)]
    rows += [{**broken("length_hacking", rng, 40 + k, k), "train/clipfrac": 0.5} for k in range(30)]
    feed(RunMonitor(clip_steps=4), rows)
    clip, length = messages(caplog)  # clip saturates after 4 rollouts, truncation needs most of a window
    assert "above clip_threshold=0.3 for 4 consecutive rollouts (last 0.5)" in clip and "epochs" in clip
    assert "at step 132:" in clip  # rollout 44
    assert "% of responses were cut at sampling.max_new_tokens" in length and "missing_eos_penalty" in length
    assert "mean length" in length and "reward_min_t=3.0" in length


def test_a_condition_hovering_at_its_threshold_warns_once(caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    rows = [{"train/clipfrac": c} for c in [0.5] * 4 + [0.1, 0.1] + [0.5] * 4 + [0.1] * 5 + [0.5] * 3]
    _, module = feed(RunMonitor(clip_steps=3, rearm_steps=5), rows)
    flags = [value for _, value, _ in module.logged]
    assert flags == [0, 0, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1]  # three episodes ...
    assert len(messages(caplog)) == 2  # ... but the second came back before 5 clear rollouts: not re-warned


def test_offline_method_metrics_are_ignored_silently(caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    dpo = {"train/loss": 0.7, "train/rewards/chosen": 0.1, "train/rewards/margins": 0.0, "train/logps/chosen": -5}
    trainer, module = feed(RunMonitor(action="stop"), [dpo] * 50 + [{}] * 5)
    assert module.logged == [] and caplog.records == [] and not trainer.should_stop


def test_non_finite_values_are_skipped(caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    rows = [{"train/clipfrac": c} for c in [0.5, float("nan"), 0.5, float("inf"), 0.5]]
    _, module = feed(RunMonitor(clip_steps=3), rows)
    assert [v for _, v, _ in module.logged] == [0.0, 0.0, 1.0]
    assert len(messages(caplog)) == 1


def test_stop_action_sets_should_stop_and_logs_an_error(caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    trainer, _ = feed(RunMonitor(clip_steps=2, action="stop"), [{"train/clipfrac": 0.6}] * 2)
    assert trainer.should_stop
    assert messages(caplog, logging.ERROR) == ["RunMonitor stopped training at step 6 (action='stop'): clip_saturation"]
    trainer, _ = feed(RunMonitor(clip_steps=2, action="stop"), [{"train/clipfrac": 0.6}])
    assert not trainer.should_stop


def test_resume_keeps_the_early_entropy():
    monitor = RunMonitor(window=5)
    feed(monitor, [{"train/entropy": 1.0}] * 8)
    restored = RunMonitor(window=5)
    restored.load_state_dict(monitor.state_dict())
    assert restored.entropy_baseline == 1.0 and list(restored.history["train/entropy"]) == [1.0] * 5
    _, module = feed(restored, [{"train/entropy": 0.05}] * 3)  # compared with 1.0, not re-measured at 0.05
    assert [v for _, v, _ in module.logged] == [0.0, 0.0, 1.0]


def test_bad_settings_and_config_instantiation():
    with pytest.raises(ValueError, match="window >= 3"):
        RunMonitor(window=2)
    with pytest.raises(ValueError, match="'warn' or 'stop'"):
        RunMonitor(action="halt")
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--callbacks", type=list[L.Callback])
    spec = {"class_path": "rlft.callbacks.RunMonitor", "init_args": {"clip_threshold": 0.4, "action": "stop"}}
    config = parser.instantiate_classes(parser.parse_object({"callbacks": [spec]}))
    (monitor,) = config.callbacks
    assert isinstance(monitor, RunMonitor) and monitor.clip_threshold == 0.4 and monitor.action == "stop"
    assert monitor.window == 20 and monitor.clip_steps == 5
    with pytest.raises(Exception, match="action"):
        parser.parse_object({"callbacks": [{**spec, "init_args": {"action": "halt"}}]})


# ---------------------------------------------------------------------------------------------- a real run
class LengthGRPO(GRPO):
    """A reward a policy can hack by length: characters of the completion."""

    def reward(self, prompts, completions, **fields):
        return [float(len(c)) for c in completions]


def reckless_grpo_fit(tmp_path, monitor: RunMonitor, rollouts: int) -> tuple[L.Trainer, pd.DataFrame]:
    """lr 0.1 with 3 updates per rollout: the ratio leaves the clip range at once, and 4 new tokens are always
    cut, so the length reward rises on truncated responses."""
    L.seed_everything(0)
    module = LengthGRPO(
        model="tiny-llama",
        lora=None,
        optim={"lr": 0.1},
        sampling={"max_new_tokens": 4, "temperature": 1.0},
        group_size=4,
        kl={"coef": 0.1},
        epochs=3,
        minibatch_size=4,
    )
    data = PreferenceDataModule(path=PROMPTS, batch_size=2, val_fraction=0.0, seed=0)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=rollouts * 6,
        logger=L.pytorch.loggers.CSVLogger(tmp_path),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[monitor],
    )
    trainer.fit(module, data)
    return trainer, pd.read_csv(f"{trainer.logger.log_dir}/metrics.csv")


@pytest.mark.usefixtures("single_thread")
def test_real_grpo_run_trips_clip_saturation_and_length_hacking(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    _, metrics = reckless_grpo_fit(tmp_path, RunMonitor(window=4, clip_steps=2), rollouts=8)
    warned = messages(caplog)
    assert sum(PHRASES["clip_saturation"] in m for m in warned) == 1, warned
    assert sum(PHRASES["length_hacking"] in m for m in warned) == 1, warned
    clip = metrics["monitor/clip_saturation"].dropna()
    assert len(clip) == 8 and clip.iloc[0] == 0.0 and clip.max() == 1.0  # the flag reached the logger
    assert (metrics["train/stop_rate"].dropna() < 0.5).all()  # what the length warning is about


@pytest.mark.usefixtures("single_thread")
def test_real_grpo_run_stops_before_max_steps(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    trainer, _ = reckless_grpo_fit(tmp_path, RunMonitor(window=4, clip_steps=2, action="stop"), rollouts=100)
    assert trainer.global_step < 100 * 6
    (error,) = messages(caplog, logging.ERROR)
    assert error == f"RunMonitor stopped training at step {trainer.global_step} (action='stop'): clip_saturation"


def test_rlft_fit_monitors_every_run_and_a_configured_monitor_replaces_the_default(tmp_path, monkeypatch):
    from rlft.cli.fit import run_lightning_cli

    monkeypatch.setattr("sys.argv", ["rlft"])
    common = [
        "fit",
        "-c",
        "configs/grpo/tiny.yaml",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.logger",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.limit_val_batches",
        "0",
        "--trainer.max_steps",
        "1",
        "--model.output_dir",
        str(tmp_path / "hf"),
    ]
    cli = run_lightning_cli(common)
    monitors = [c for c in cli.trainer.callbacks if isinstance(c, RunMonitor)]
    assert len(monitors) == 1 and monitors[0].action == "warn"
    # the README's command line: the user's monitor is the only one, with the user's settings
    cli = run_lightning_cli(
        [*common, "--trainer.callbacks+=rlft.callbacks.RunMonitor", "--trainer.callbacks.action", "stop"]
    )
    monitors = [c for c in cli.trainer.callbacks if isinstance(c, RunMonitor)]
    assert len(monitors) == 1 and monitors[0].action == "stop"
