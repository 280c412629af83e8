"""Optuna studies for rlft: samplers and pruners by name, shared RDB storage with heartbeats, and the run loop.

Storage is SQLite (``DIR/study.db``) by default or any SQLAlchemy URL (``postgresql+psycopg://...``), so several
``rlft tune`` processes can work on one study. Every process sends heartbeats; a trial whose process died (no
heartbeat for ``grace_period`` seconds) is marked FAIL by the next process that starts a trial and re-queued with
the same parameters (Optuna's ``RetryHeartbeatStaleTrialCallback``), which is what makes a killed study resume.
"""

from __future__ import annotations

import importlib
import logging
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState

log = logging.getLogger(__name__)

__all__ = ["SAMPLERS", "PRUNERS", "make_sampler", "make_pruner", "open_study", "optimize", "storage_url"]

SAMPLERS: dict[str, str] = {
    "tpe": "optuna.samplers:TPESampler",
    "random": "optuna.samplers:RandomSampler",
    "cmaes": "optuna.samplers:CmaEsSampler",
    "qmc": "optuna.samplers:QMCSampler",
    "gp": "optuna.samplers:GPSampler",
    "nsga2": "optuna.samplers:NSGAIISampler",
}
PRUNERS: dict[str, str] = {
    "median": "optuna.pruners:MedianPruner",
    "percentile": "optuna.pruners:PercentilePruner",
    "hyperband": "optuna.pruners:HyperbandPruner",
    "successive_halving": "optuna.pruners:SuccessiveHalvingPruner",
    "threshold": "optuna.pruners:ThresholdPruner",
    "wilcoxon": "optuna.pruners:WilcoxonPruner",
    "none": "optuna.pruners:NopPruner",
}
# trials that count towards --trials: a FAIL is retried (killed process) or reported, never counted as done
DONE_STATES = (TrialState.COMPLETE, TrialState.PRUNED)


def _build(registry: dict[str, str], what: str, settings: dict[str, Any]) -> Any:
    settings = dict(settings)
    name = settings.pop("name", None)
    if name is None:
        raise ValueError(f"{what}: give a name ({', '.join(registry)} or module:Class)")
    target = registry.get(name, name)
    if ":" not in target:
        raise ValueError(f"unknown {what} {name!r}; use one of {', '.join(registry)} or module:Class")
    module, attr = target.split(":")
    cls = getattr(importlib.import_module(module), attr)
    try:
        return cls(**settings)
    except TypeError as error:
        raise ValueError(f"{what} {name!r}: {error}") from error


def make_sampler(settings: dict[str, Any], seed: int | None = None) -> optuna.samplers.BaseSampler:
    """``{name: tpe, n_startup_trials: 5, ...}`` -> a sampler (TPE by default), seeded when it takes a seed."""
    settings = {"name": "tpe", **settings}
    if seed is not None and "seed" not in settings and settings["name"] in ("tpe", "random", "cmaes", "qmc", "gp"):
        settings["seed"] = seed
    return _build(SAMPLERS, "sampler", settings)


def make_pruner(settings: dict[str, Any]) -> optuna.pruners.BasePruner:
    """``{name: median, n_warmup_steps: 5, ...}`` -> a pruner (median by default, ``none`` to disable)."""
    return _build(PRUNERS, "pruner", {"name": "median", **settings})


def storage_url(storage: str | None, out_dir: Path) -> str:
    """SQLite in the output folder by default; a bare file path means SQLite; URLs pass through."""
    if not storage:
        return f"sqlite:///{(out_dir / 'study.db').resolve()}"
    if "://" not in storage:
        return f"sqlite:///{Path(storage).resolve()}"
    if storage.startswith("postgresql://"):  # SQLAlchemy's default driver is psycopg2; rlft ships psycopg 3
        storage = "postgresql+psycopg://" + storage[len("postgresql://") :]
    return storage


def open_study(
    *,
    name: str,
    storage: str,
    direction: str,
    sampler: optuna.samplers.BaseSampler,
    pruner: optuna.pruners.BasePruner,
    heartbeat_interval: int = 60,
    grace_period: int | None = None,
    max_retry: int = 2,
) -> optuna.Study:
    """Create the study or join an existing one of the same name (several processes, or a resumed run)."""
    for attempt in range(3):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" since optuna 2.9
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                rdb = RDBStorage(
                    storage,
                    heartbeat_interval=heartbeat_interval,
                    grace_period=grace_period or 2 * heartbeat_interval,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=max_retry),
                    engine_kwargs={"pool_pre_ping": True} if not storage.startswith("sqlite") else None,
                )
            study = optuna.create_study(
                study_name=name, storage=rdb, direction=direction, sampler=sampler, pruner=pruner, load_if_exists=True
            )
            break
        except (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError) as error:  # not a URL to retry
            raise ValueError(f"--storage {_shown(storage)}: not a database URL SQLAlchemy can open ({error})") from None
        except sqlalchemy.exc.SQLAlchemyError as error:
            # processes started together race to create the schema and the study; the loser finds them made
            if attempt == 2:
                reason = getattr(error, "orig", None) or error
                where = _shown(storage)
                raise ConnectionError(f"--storage {where}: cannot open the study database ({reason})") from None
            log.warning("opening study %s failed (%s); retrying", name, type(error).__name__)
            time.sleep(1.0 + attempt)
    if study.direction.name.lower() != direction:
        raise ValueError(
            f"study {name!r} in {storage} already exists with direction {study.direction.name.lower()}, "
            f"not {direction}; use another --study-name"
        )
    return study


def _shown(url: str) -> str:
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return url


def count_done(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=DONE_STATES))


def optimize(study: optuna.Study, objective: Callable[[optuna.Trial], float], trials: int) -> None:
    """Run trials until the *study* (all processes together) has ``trials`` complete or pruned ones.

    A failing trial is recorded as FAIL (its error is in the trial's ``error`` user attribute) and the study goes on.
    """
    remaining = trials - count_done(study)
    if remaining <= 0:
        log.info("study %s already has %d finished trials (>= %d)", study.study_name, count_done(study), trials)
        return
    # MaxTrialsCallback counts the whole study, so processes sharing it stop together at the total
    study.optimize(
        objective,
        callbacks=[MaxTrialsCallback(trials, states=DONE_STATES), _stop_after_failures(max(trials, 3))],
        catch=(Exception,),
        gc_after_trial=True,
    )


def _stop_after_failures(limit: int) -> Callable:
    """Stop this process after ``limit`` failures in a row: a study whose every trial fails should not spin."""
    streak = {"n": 0}

    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        streak["n"] = streak["n"] + 1 if trial.state == TrialState.FAIL else 0
        if streak["n"] >= limit:
            log.error("%d trials in a row failed; stopping (see the trials table for their errors)", limit)
            study.stop()

    return callback
