"""``rlft eval report``: results and training logs -> a Markdown report with PNG plots.

Sections: metric table of every result, learning curves (loss / reward / KL / accuracy) from Lightning CSV logs,
win-rate bars with confidence intervals from policy comparisons and judges, and side-by-side example generations.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path

from rlft.eval.checkpoints import checkpoint_table
from rlft.eval.results import _cell, flatten_metrics, read_results

# plot panel -> substrings of logged metric names that belong in it
CURVE_PANELS: dict[str, tuple[str, ...]] = {
    "loss": ("loss",),
    "reward": ("reward", "margin"),
    "kl": ("kl",),
    "accuracy / perplexity": ("accuracy", "perplexity", "auroc"),
}


def read_metrics_csv(path: str | Path) -> dict[str, list[tuple[float, float]]]:
    """``{metric: [(step, value), ...]}`` from a Lightning ``metrics.csv`` (empty cells skipped)."""
    series: dict[str, list[tuple[float, float]]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            if step in (None, ""):
                continue
            for key, value in row.items():
                if key in ("step", "epoch") or value in (None, ""):
                    continue
                try:
                    number = float(value)
                except ValueError:
                    continue
                if math.isfinite(number):
                    series.setdefault(key, []).append((float(step), number))
    return series


def _find_logs(paths: Sequence[str | Path]) -> list[Path]:
    found = []
    for path in map(Path, paths):
        files = sorted(path.rglob("metrics.csv")) if path.is_dir() else [path]
        if not files or not all(f.exists() for f in files):
            raise FileNotFoundError(f"no metrics.csv found at {path} (expected a Lightning CSV log or its folder)")
        found += files
    return found


def plot_learning_curves(series: dict[str, list[tuple[float, float]]], out_png: Path, title: str) -> bool:
    """One panel per :data:`CURVE_PANELS` group that has data; returns False if nothing matched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {
        p: [k for k in sorted(series) if any(s in k.lower() for s in keys) and "per_sec" not in k]
        for p, keys in CURVE_PANELS.items()
    }
    panels = {p: keys for p, keys in panels.items() if keys}
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    for ax, (panel, keys) in zip(axes[0], panels.items()):
        for key in keys[:6]:
            steps, values = zip(*series[key])
            ax.plot(steps, values, label=key, marker="." if len(steps) < 30 else None)
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return True


def _win_rates(results: list[dict]) -> list[tuple[str, dict]]:
    """(label, win-rate dict) from comparison results (reward-based) and pairwise judge results."""
    bars = []
    for r in results:
        metrics = r.get("metrics", {})
        for name, entry in metrics.get("policies", {}).items():
            if isinstance(entry, dict) and entry.get("win_rate"):
                bars.append((f"{name} vs {metrics.get('baseline', 'baseline')}", entry["win_rate"]))
        if r.get("kind") == "judge" and isinstance(metrics.get("win_rate"), dict):
            bars.append((f"judge: {r.get('model')}", metrics["win_rate"]))
    return bars


def plot_win_rates(bars: list[tuple[str, dict]], out_png: Path) -> None:
    """Horizontal bars with bootstrap CIs; the 50% line marks parity with the baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 0.6 * len(bars) + 1.2))
    labels = [b[0] for b in bars]
    rates = [b[1]["rate"] for b in bars]
    errors = [[r - b[1]["ci_low"] for r, b in zip(rates, bars)], [b[1]["ci_high"] - r for r, b in zip(rates, bars)]]
    ax.barh(labels, rates, xerr=errors, capsize=4, color="#4C72B0")
    ax.axvline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_xlabel("win rate (95% bootstrap CI)")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def _escape(text: str, limit: int = 400) -> str:
    text = text if len(text) <= limit else text[:limit] + " ..."
    return text.replace("|", "\\|").replace("\n", "<br>")


def build_report(
    results: Sequence[str | Path] = (),
    logs: Sequence[str | Path] = (),
    *,
    out_dir: str | Path,
    title: str = "rlft evaluation report",
    max_examples: int = 5,
) -> Path:
    """Write ``<out_dir>/report.md`` and its PNG plots; returns the report path.

    Args:
        results: Result JSON files (from ``rlft eval ...``) or folders of them.
        logs: Lightning ``metrics.csv`` files or run folders containing them.
        out_dir: Output folder.
        title: Report heading.
        max_examples: Example generations shown per comparison.
    """
    if not results and not logs:
        raise ValueError("nothing to report: pass result JSON files (results=...) and/or training logs (logs=...)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = read_results(list(results)) if results else []
    lines = [f"# {title}", ""]
    if records:
        lines += ["## Metrics", "", "| evaluation | model | metric | value |", "|---|---|---|---|"]
        for r in records:
            model = r["model"] if isinstance(r["model"], str) else ", ".join(map(str, r["model"]))
            for key, value in flatten_metrics(r["metrics"]).items():
                lines.append(f"| {r['kind']} | {_escape(model, 80)} | {key} | {_cell(value)} |")
        lines.append("")
    if logs:
        lines += ["## Learning curves", ""]
        for i, csv_path in enumerate(_find_logs(list(logs))):
            png = out / f"curves_{i}.png"
            if plot_learning_curves(read_metrics_csv(csv_path), png, str(csv_path)):
                lines += [f"`{csv_path}`", "", f"![learning curves]({png.name})", ""]
            else:
                lines += [f"`{csv_path}`: no loss/reward/KL/accuracy columns to plot.", ""]
    bars = _win_rates(records)
    if bars:
        plot_win_rates(bars, out / "win_rates.png")
        lines += [
            "## Win rates",
            "",
            "![win rates](win_rates.png)",
            "",
            "| comparison | win rate | 95% CI | W/T/L |",
            "|---|---|---|---|",
        ]
        for label, wr in bars:
            lines.append(
                f"| {label} | {wr['rate']:.3f} | [{wr['ci_low']:.3f}, {wr['ci_high']:.3f}] | "
                f"{wr['wins']}/{wr['ties']}/{wr['losses']} |"
            )
        lines.append("")
    for r in records:
        examples = r.get("details", {}).get("examples")
        if not isinstance(examples, list) or not examples:
            continue
        names = [k for k in examples[0] if k not in ("prompt", "rewards")]
        lines += [
            f"## Example generations ({r['kind']})",
            "",
            "| prompt | " + " | ".join(names) + " |",
            "|---" * (len(names) + 1) + "|",
        ]
        for ex in examples[:max_examples]:
            cells = [_escape(str(ex.get(n, ""))) for n in names]
            lines.append(f"| {_escape(ex['prompt'], 200)} | " + " | ".join(cells) + " |")
        lines.append("")
    report = out / "report.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    return report


# ------------------------------------------------------------------------------------------------ pipeline report
def _ci(values) -> str:
    return f"[{values[0]:.3f}, {values[1]:.3f}]" if values else ""


def _merged_series(folder: Path) -> dict[str, list[tuple[float, float]]]:
    """Every ``metrics.csv`` under a stage folder (one per attempt when a stage was resumed), merged by step."""
    merged: dict[str, dict[float, float]] = {}
    for csv_path in sorted(folder.rglob("metrics.csv")):
        for key, points in read_metrics_csv(csv_path).items():
            merged.setdefault(key, {}).update(dict(points))
    return {k: sorted(v.items()) for k, v in merged.items()}


def _plot_rounds(rounds: list[dict], out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.plot([r["round"] for r in rounds], [r["mean_sample_reward"] for r in rounds], marker="o")
    ax.set_xlabel("round (policy that sampled)")
    ax.set_ylabel("mean RM reward of samples")
    ax.set_title("online DPO: reward of each round's samples", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def build_pipeline_report(
    results_path: str | Path, run_dir: str | Path, *, out_dir: str | Path, title: str = "rlft pipeline"
) -> Path:
    """``report.md`` for an ``rlft pipeline`` run: held-out reward-model quality, every policy against the start
    (reward, win rate, both length-controlled, KL, refusal, toxicity, with CIs), learning curves of each stage with
    the guide's checkpoints (:mod:`rlft.eval.checkpoints`), example answers."""
    results = json.loads(Path(results_path).read_text())
    run_dir, out = Path(run_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rm = results["reward_model"]
    start = results["start"]
    lines = [
        f"# {title}",
        "",
        f"Run folder: `{run_dir}`. Every number below is on held-out data no stage trained on.",
        "",
        "## Reward model (held-out pairs)",
        "",
        "| pairs | accuracy | 95% CI | AUROC | 95% CI | mean margin |",
        "|---|---|---|---|---|---|",
        f"| {rm['n']} | {rm['accuracy']:.3f} | {_ci(rm.get('accuracy_ci'))} | {rm['auroc']:.3f} | "
        f"{_ci(rm.get('auroc_ci'))} | {rm['mean_margin']:.3f} |",
        "",
    ]
    if not results["policies"]:
        lines += ["No policy stage in this pipeline: the reward model alone was evaluated.", ""]
    else:
        lines += [
            f"## Policies on {results['n_prompts']} held-out prompts (vs `{start}`)",
            "",
            "| policy | mean RM reward [95% CI] | gain vs start | gain / start std | win rate vs start "
            "[95% CI] | length-controlled gain [95% CI] | length-controlled win rate [95% CI] | KL to start [95% CI] "
            "| refusal rate | toxicity | words |",
            "|---" * 11 + "|",
        ]
        for name, p in results["policies"].items():
            wr, lc_wr = p.get("win_rate"), p.get("length_controlled_win_rate")
            gain, lc_gain = p.get("reward_gain"), p.get("length_controlled_gain")
            rel = p.get("reward_gain_relative")
            tox = p.get("toxicity")
            cells = [
                name,
                f"{p['mean_reward']:.3f} {_ci(p.get('mean_reward_ci'))}",
                "—" if gain is None else f"{gain:+.3f}" + (f" ({rel:+.0%})" if math.isfinite(rel) else ""),
                "—" if gain is None else f"{p['reward_gain_std']:+.2f}",
                "—" if wr is None else f"{wr['rate']:.3f} {_ci([wr['ci_low'], wr['ci_high']])}",
                "—" if lc_gain is None else f"{lc_gain:+.3f} {_ci(p.get('length_controlled_gain_ci'))}",
                "—" if lc_wr is None else f"{lc_wr['rate']:.3f} {_ci([lc_wr['ci_low'], lc_wr['ci_high']])}",
                "—" if "kl_to_start" not in p else f"{p['kl_to_start']:.2f} {_ci(p.get('kl_to_start_ci'))}",
                f"{p['refusal_rate']:.3f}",
                "not measured" if tox is None else f"{tox:.3f}",
                f"{p['mean_words']:.1f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        settings = results.get("settings", {})
        lines += [
            "",
            f"Refusal classifier: {results['refusal_classifier']}. Toxicity classifier: "
            f"{results['toxicity_classifier']}. Sampling: temperature {settings.get('temperature')}, "
            f"{settings.get('max_new_tokens')} new tokens, seed {settings.get('seed')}; KL is the mean summed "
            "log-ratio log pi(y|x) - log pi_start(y|x) on each policy's own samples. Gain % is relative to "
            "|mean start reward| (reward models have an arbitrary offset: the win rate and the gain in start-std "
            "units are the offset-free measures). Length-controlled: each answer's reward minus "
            f"{results.get('length_slope', float('nan')):+.4f} per word (the reward per word within each policy's "
            "own answers), compared paired with the start.",
            "",
        ]
    bars = [(f"{n} vs {start}", p["win_rate"]) for n, p in results["policies"].items() if p.get("win_rate")]
    if bars:
        plot_win_rates(bars, out / "win_rates.png")
        lines += ["![win rates](win_rates.png)", ""]
    lines += ["## Learning curves", ""]
    stage_dirs = [d for d in sorted(run_dir.iterdir()) if d.is_dir() and d.name not in ("data", "evaluation", "report")]
    for stage in stage_dirs:
        folders = sorted(stage.glob("round_*")) or [stage]
        for folder in folders:
            label = folder.relative_to(run_dir).as_posix()
            series = _merged_series(folder)
            png = out / f"curves_{label.replace('/', '_')}.png"
            if series and plot_learning_curves(series, png, label):
                lines += [f"**{label}**", "", f"![{label} learning curves]({png.name})", ""]
                lines += checkpoint_table(series)
        rounds = [
            json.loads(f.read_text()) | {"round": int(f.parent.name.split("_")[1])}
            for f in sorted(stage.glob("round_*/sampling.json"))
        ]
        if len(rounds) > 1:
            _plot_rounds(rounds, out / "online_rounds.png")
            lines += ["**online DPO rounds**", "", "![online DPO rounds](online_rounds.png)", ""]
    examples = results.get("examples") or []
    if examples:
        names = list(results["policies"])
        lines += [
            "## Example answers (held-out prompts, RM reward in brackets)",
            "",
            "| prompt | " + " | ".join(names) + " |",
            "|---" * (len(names) + 1) + "|",
        ]
        for ex in examples:
            cells = [f"{_escape(str(ex.get(n, '')), 300)} [{ex['rewards'][n]:.2f}]" for n in names]
            lines.append(f"| {_escape(ex['prompt'], 200)} | " + " | ".join(cells) + " |")
        lines.append("")
    timings = run_dir / "timings.json"
    if timings.exists():
        lines += ["## Stage wall-clock (this invocation)", ""]
        lines += [f"- {k}: {v / 60:.1f} min" for k, v in json.loads(timings.read_text()).items()] + [""]
    report = out / "report.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    return report
