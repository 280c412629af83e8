"""``rlft tune``: hyperparameter search with Optuna over any key of an ``rlft fit`` config.

    rlft tune -c configs/dpo/tiny.yaml --search configs/tune/dpo_lr_beta.yaml --trials 8 --out runs/tune-dpo
    rlft tune -c configs/sft/tiny.yaml --search configs/tune/sft_lr.yaml --trials 6 --out runs/tune-sft \\
        --metric val/loss --direction minimize --trainer.max_steps 10

Every trial runs in this process through the same LightningCLI parser as ``rlft fit``, from its own resolved config
``DIR/trial_<n>/config.yaml`` (run folder, checkpoints, logs and final model all under ``DIR/trial_<n>``). The
objective is the last value of ``--metric`` the trial logged (``trainer.callback_metrics``). Unknown arguments
(``--trainer.max_steps 10``) are config overrides applied to every trial. At the end: a table of trials,
``DIR/best.yaml`` (``rlft fit -c DIR/best.yaml`` re-runs the best trial), ``DIR/history.png``,
``DIR/importances.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import optuna
from jsonargparse import ArgumentError

from rlft.cli import _user_error_types
from rlft.cli.config_logging import TrackedConfigCallback
from rlft.cli.fit import RLFTCLI
from rlft.cli.options import prepare_out_dir
from rlft.data import PreferenceDataModule
from rlft.methods.base import RLFTModule
from rlft.tune import SearchSpace, SearchSpaceError, StepPruningCallback, load_search_space
from rlft.tune.report import trials_table, write_best_config, write_plots
from rlft.tune.study import make_pruner, make_sampler, open_study, optimize, storage_url

log = logging.getLogger("rlft.tune")

CLI_KWARGS = dict(
    subclass_mode_model=True,
    subclass_mode_data=True,
    save_config_kwargs={"overwrite": True},
    save_config_callback=TrackedConfigCallback,
    auto_configure_optimizers=False,
)


class _ParseOnlyCLI(RLFTCLI):
    """The ``rlft fit`` parser without building anything: used to validate and resolve trial configs."""

    def instantiate_classes(self) -> None:
        pass


@contextlib.contextmanager
def _explicit_args():
    """The fit parser gets its arguments explicitly; Lightning warns when ``sys.argv`` (here ``tune ...``) holds
    others too, once per trial, so it is hidden while the CLI is built."""
    argv = sys.argv
    sys.argv = argv[:1]
    try:
        yield
    finally:
        sys.argv = argv


def parse_fit_config(args: list[str]):
    """``rlft fit``'s resolved config of ``-c FILE ... --key value``, nothing built (raises ArgumentError)."""
    with _explicit_args():
        cli = _ParseOnlyCLI(
            RLFTModule,
            PreferenceDataModule,
            args=args,
            run=False,
            parser_kwargs={"exit_on_error": False},
            **CLI_KWARGS,
        )
    return cli.config


def _cli_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _loggers(trainer_cfg) -> list:
    logger = trainer_cfg.get("logger")
    if logger is None or isinstance(logger, bool):
        return []
    return list(logger) if isinstance(logger, list) else [logger]


class Trials:
    """Builds, validates and runs trial configs from the base ``-c`` files plus config overrides."""

    def __init__(self, configs: list[str], overrides: list[str], out_dir: Path, metric: str, study_name: str) -> None:
        self.base_args = [arg for config in configs for arg in ("-c", config)] + overrides
        self.out_dir, self.metric, self.study_name = out_dir, metric, study_name
        try:
            with _explicit_args():
                cli = _ParseOnlyCLI(
                    RLFTModule,
                    PreferenceDataModule,
                    args=self.base_args,
                    run=False,
                    parser_kwargs={"exit_on_error": False},
                    **CLI_KWARGS,
                )
        except ArgumentError as error:
            raise SystemExit(f"rlft tune: the base config does not parse: {error}") from None
        self.parser = cli.parser

    def parse(self, params: dict[str, Any]):
        args = [a for key, value in params.items() for a in (f"--{key}", _cli_value(value))]
        return self.parser.parse_args(self.base_args + args)

    def validate(self, space: SearchSpace) -> None:
        """Parse the config with each parameter at each of its bounds/choices: a typo or a bad type names the key."""
        for param in space.params:
            for value in param.examples():
                try:
                    self.parse({param.key: value})
                except ArgumentError as error:
                    raise SearchSpaceError(
                        f"{space.source}: params.{param.key}: the config does not accept {param.key}={value!r}:\n"
                        f"{error}"
                    ) from None
        config = self.parse({})
        model = config.model.class_path
        log.info("search space of %d parameters validated against %s", len(space.params), model)

    def write_config(self, trial: optuna.Trial, params: dict[str, Any]) -> Path:
        """The trial's resolved config, its run folders moved to ``DIR/trial_<n>``; W&B runs grouped by study."""
        run_dir = (self.out_dir / f"trial_{trial.number}").resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg = self.parse(params)
        cfg.trainer.default_root_dir = str(run_dir)
        cfg.model.init_args.output_dir = str(run_dir / "hf_model")
        for logger in _loggers(cfg.trainer):
            if "save_dir" in logger.init_args:
                logger.init_args.save_dir = str(run_dir)
            if logger.class_path.endswith("WandbLogger"):
                logger.init_args.group = self.study_name
                logger.init_args.name = f"{self.study_name}-trial_{trial.number}"
                logger.init_args.job_type = "tune"
                tune = {"study": self.study_name, "trial": trial.number, **params}
                logger.init_args.config = {**(logger.init_args.get("config") or {}), "tune": tune}
        for callback in cfg.trainer.get("callbacks") or []:
            if "dirpath" in callback.get("init_args", {}) and callback.init_args.dirpath:
                callback.init_args.dirpath = str(run_dir / "checkpoints")
        text = self.parser.dump(cfg, skip_none=False)
        path = run_dir / "config.yaml"
        path.write_text(text)
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("config", text)
        trial.set_user_attr("metric", self.metric)
        trial.set_user_attr("pid", os.getpid())
        return path

    def baseline(self, space: SearchSpace) -> dict[str, Any]:
        """The base config's own values of the searched keys that lie inside the search space."""
        config = self.parse({})
        values = {param.key: config.get(param.key) for param in space.params}
        return {p.key: values[p.key] for p in space.params if p.contains(values[p.key]) and p.active(values)}
        return values

    def objective(self, trial: optuna.Trial, space: SearchSpace, prune: bool) -> float:
        try:
            params = space.sample(trial)
            log.info("trial %d: %s", trial.number, params)
            config = self.write_config(trial, params)
            return self.run(config, trial if prune else None)
        except optuna.TrialPruned:
            raise
        except (KeyboardInterrupt, SystemExit) as error:
            # Ctrl-C and SIGTERM reach here as SystemExit (Lightning's graceful shutdown): stop the whole study, with
            # this trial failed and its parameters queued again, so re-running the command resumes with them
            trial.set_user_attr("error", f"interrupted ({type(error).__name__}); re-queued")
            trial.study.enqueue_trial(trial.params, user_attrs={"requeued_from": trial.number})
            raise KeyboardInterrupt from error
        except Exception as error:  # noqa: BLE001 - recorded on the trial, then Optuna marks it FAIL and goes on
            trial.set_user_attr("error", f"{type(error).__name__}: {error}"[:4000])
            if isinstance(error, _user_error_types()) and not os.environ.get("RLFT_DEBUG"):  # a setting to fix
                log.error("trial %d failed: %s", trial.number, " ".join(str(error).split()))
            else:
                log.error("trial %d failed:\n%s", trial.number, traceback.format_exc())
            raise

    def run(self, config: Path, trial: optuna.Trial | None) -> float:
        _finish_wandb_run()  # WandbLogger would otherwise log this trial into a run still open in this process
        callbacks = [StepPruningCallback(trial, self.metric)] if trial is not None else []
        with _explicit_args():
            cli = RLFTCLI(
                RLFTModule,
                PreferenceDataModule,
                args=["-c", str(config)],
                run=False,
                trainer_defaults={"callbacks": callbacks},
                **CLI_KWARGS,
            )
        try:
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        finally:
            _finish_wandb_run()
        metrics = cli.trainer.callback_metrics
        if self.metric not in metrics:
            raise ValueError(f"metric {self.metric!r} was never logged; logged: {', '.join(sorted(metrics))}")
        return float(metrics[self.metric])


class _UserErrorsInOneLine(logging.Filter):
    """Optuna logs a failed trial's traceback; for a user error (a setting to fix) its one line is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, _user_error_types()) and not os.environ.get("RLFT_DEBUG"):
            record.exc_info, record.exc_text = None, None
        return True


def _finish_wandb_run() -> None:
    wandb = sys.modules.get("wandb")  # only if something imported it: tuning without W&B never loads it
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlft tune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-c", "--config", action="append", required=True, help="rlft fit config(s), in order")
    parser.add_argument("--search", required=True, help="search space YAML (see configs/tune/)")
    parser.add_argument("--trials", type=int, default=10, help="finished (complete or pruned) trials in the study")
    parser.add_argument("--out", required=True, help="folder for trial runs, best.yaml, plots and study.db")
    parser.add_argument("--metric", help="logged metric to optimise (default: the search file's, else val/loss)")
    parser.add_argument("--direction", choices=("minimize", "maximize"), help="default: search file's, else minimize")
    parser.add_argument("--sampler", help="tpe (default), random, cmaes, qmc, gp, nsga2 or module:Class")
    parser.add_argument("--pruner", help="median (default), percentile, hyperband, successive_halving, none, ...")
    parser.add_argument(
        "--storage", help="SQLAlchemy URL (postgresql+psycopg://...) or SQLite file; default DIR/study.db"
    )
    parser.add_argument("--study-name", help="default: the --out folder's name; processes sharing it share trials")
    parser.add_argument("--seed", type=int, default=None, help="sampler seed (default: unseeded)")
    parser.add_argument("--baseline", action="store_true", help="first trial of a new study: the config's own values")
    parser.add_argument("--heartbeat", type=int, default=60, help="seconds between trial heartbeats")
    parser.add_argument(
        "--grace-period",
        type=int,
        default=None,
        help="seconds without heartbeat before a trial counts as dead and is re-queued (default: 2 x heartbeat)",
    )
    return parser


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for handler in [*logging.getLogger("optuna").handlers, *logging.getLogger().handlers]:
        handler.addFilter(_UserErrorsInOneLine())
    args, overrides = _parser().parse_known_args(argv)
    if unknown := [a for a in overrides if a.startswith("-") and not a.startswith("--")]:
        raise SystemExit(f"rlft tune: unknown option(s) {unknown}")
    try:
        space = load_search_space(args.search)
    except SearchSpaceError as error:
        raise SystemExit(f"rlft tune: {error}") from None
    for flag, value, low in (("--trials", args.trials, 1), ("--heartbeat", args.heartbeat, 1)):
        if value < low:
            raise SystemExit(f"rlft tune: {flag} must be >= {low}, got {value}")
    if args.grace_period is not None and args.grace_period <= args.heartbeat:
        raise SystemExit(f"rlft tune: --grace-period must be > --heartbeat ({args.heartbeat}), got {args.grace_period}")
    metric = args.metric or space.metric or "val/loss"
    direction = args.direction or space.direction or "minimize"
    out_dir = prepare_out_dir(args.out)
    study_name = args.study_name or out_dir.resolve().name
    trials = Trials(args.config, overrides, out_dir, metric, study_name)
    try:
        trials.validate(space)
    except SearchSpaceError as error:
        raise SystemExit(f"rlft tune: {error}") from None
    sampler_cfg = {**space.sampler, **({"name": args.sampler} if args.sampler else {})}
    pruner_cfg = {**space.pruner, **({"name": args.pruner} if args.pruner else {})}
    pruner = make_pruner(pruner_cfg)
    study = open_study(
        name=study_name,
        storage=storage_url(args.storage, out_dir),
        direction=direction,
        sampler=make_sampler(sampler_cfg, seed=args.seed),
        pruner=pruner,
        heartbeat_interval=args.heartbeat,
        grace_period=args.grace_period,
    )
    if args.baseline and not study.get_trials(deepcopy=False):
        values = trials.baseline(space)
        log.info("baseline trial (the config's own values): %s", values or "none inside the search space")
        if values:
            study.enqueue_trial(values, user_attrs={"baseline": True})
    prune = not isinstance(pruner, optuna.pruners.NopPruner)
    try:
        optimize(study, lambda trial: trials.objective(trial, space, prune), args.trials)
    except KeyboardInterrupt:
        print(trials_table(study, metric))
        raise SystemExit("rlft tune: interrupted; run the same command again to resume the study") from None
    finish(study, out_dir, metric)


def finish(study: optuna.Study, out_dir: Path, metric: str) -> None:
    print(f"\nstudy {study.study_name!r}: {metric} ({study.direction.name.lower()})")
    print(trials_table(study, metric))
    completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not completed:
        errors = [t.user_attrs["error"] for t in study.get_trials(deepcopy=False) if t.user_attrs.get("error")]
        last = f"; the last failed with {errors[-1]}" if errors else " (see the errors above)"
        raise SystemExit(f"rlft tune: no trial completed{last}")
    best = study.best_trial
    path = write_best_config(study, out_dir)
    plots = write_plots(study, out_dir, metric)
    print(f"best: trial {best.number}, {metric}={best.value:.6g}, {best.params}")
    print(f"best config: {path}  (rlft fit -c {path})")
    print("plots: " + ", ".join(str(p) for p in plots))
    (out_dir / "summary.json").write_text(
        json.dumps(
            {
                "study": study.study_name,
                "metric": metric,
                "direction": study.direction.name.lower(),
                "best": {"number": best.number, "value": best.value, "params": best.params},
                "trials": [
                    {
                        "number": t.number,
                        "state": t.state.name,
                        "value": t.value,
                        "params": t.params,
                        "error": t.user_attrs.get("error"),
                    }
                    for t in study.get_trials(deepcopy=False)
                ],
            },
            indent=2,
        )
    )
