"""The end of a study: the trials table, ``best.yaml`` and the plots (optimisation history, parameter importances)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import optuna
import yaml
from optuna.trial import TrialState

log = logging.getLogger(__name__)

__all__ = ["trials_table", "write_best_config", "write_plots"]


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def trials_table(study: optuna.Study, metric: str) -> str:
    """One row per trial: number, state, objective, parameters, and the error of failed trials."""
    trials = study.get_trials(deepcopy=False)
    keys = sorted({k for t in trials for k in t.params})
    header = ["trial", "state", metric, *[k.rsplit(".", 1)[-1] if _unique_tail(k, keys) else k for k in keys]]
    rows = []
    for t in trials:
        value = t.value if t.value is not None else _last_intermediate(t)
        rows.append(
            [str(t.number), t.state.name, _format(value) if value is not None else "-"]
            + [_format(t.params[k]) if k in t.params else "-" for k in keys]
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for t in trials:
        if t.state == TrialState.FAIL:
            lines.append(f"trial {t.number} failed: {t.user_attrs.get('error', 'process died (no heartbeat)')}")
    return "\n".join(lines)


def _unique_tail(key: str, keys: list[str]) -> bool:
    tail = key.rsplit(".", 1)[-1]
    return sum(k.rsplit(".", 1)[-1] == tail for k in keys) == 1


def _last_intermediate(trial: optuna.trial.FrozenTrial) -> float | None:
    if not trial.intermediate_values:
        return None
    return trial.intermediate_values[max(trial.intermediate_values)]


def write_best_config(study: optuna.Study, out_dir: Path) -> Path:
    """``DIR/best.yaml``: the best trial's full resolved config, writing its own run into ``DIR/best``.

    The trial ran from exactly this config (``DIR/trial_<n>/config.yaml``); only the run folders are moved so that
    ``rlft fit -c DIR/best.yaml`` does not overwrite the trial's outputs.
    """
    best = study.best_trial
    config = yaml.safe_load(best.user_attrs["config"])
    old_root = best.user_attrs["run_dir"]
    new_root = str(out_dir / "best")
    config = _replace_prefix(config, old_root, new_root)
    path = out_dir / "best.yaml"
    header = (
        f"# rlft tune: best of study {study.study_name!r}, trial {best.number}, "
        f"{best.user_attrs.get('metric', 'objective')}={best.value:.6g}\n"
        f"# params: {best.params}\n# rlft fit -c {path}\n"
    )
    path.write_text(header + yaml.safe_dump(config, sort_keys=False))
    return path


def _replace_prefix(value, old: str, new: str):
    if isinstance(value, dict):
        return {k: _replace_prefix(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_prefix(v, old, new) for v in value]
    if isinstance(value, str) and (value == old or value.startswith(old + "/")):
        return new + value[len(old) :]
    return value


def write_plots(study: optuna.Study, out_dir: Path, metric: str = "Objective Value") -> list[Path]:
    """Optimisation history and (with two or more finished trials and parameters that vary) importances as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    written = []
    plots = {"history.png": vis.plot_optimization_history, "importances.png": vis.plot_param_importances}
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    for name, plot in plots.items():
        if name == "importances.png" and (len(completed) < 2 or not _varied(completed)):
            log.info("parameter importances need >= 2 completed trials with differing parameters; not plotted")
            continue
        with warnings.catch_warnings():  # the matplotlib backend is "experimental" since optuna 2.2
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            axes = plot(study, target_name=metric)
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
        figure.set_size_inches(8, 5)
        figure.tight_layout()
        figure.savefig(out_dir / name, dpi=100)
        plt.close(figure)
        written.append(out_dir / name)
    return written


def _varied(trials: list[optuna.trial.FrozenTrial]) -> bool:
    return any(len({repr(t.params.get(k)) for t in trials}) > 1 for k in trials[0].params)
