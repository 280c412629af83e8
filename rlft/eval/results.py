"""Evaluation results on disk: one JSON file per run plus a human-readable Markdown table."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path


def flatten_metrics(metrics: dict, prefix: str = "") -> dict[str, float | int | str | None]:
    """Nested metrics -> ``{"a/b": value}`` keeping scalars only (lists such as per-item rows are left out)."""
    flat: dict = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, f"{name}/"))
        elif isinstance(value, (int, float, str)) or value is None:
            flat[name] = value
    return flat


def _cell(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value)


def metrics_table(metrics: dict, *, title: str | None = None) -> str:
    """A two-column Markdown table of the scalar metrics."""
    rows = [f"| {k} | {_cell(v)} |" for k, v in flatten_metrics(metrics).items()]
    head = [f"### {title}", ""] if title else []
    return "\n".join([*head, "| metric | value |", "|---|---|", *rows]) + "\n"


def make_result(
    kind: str, model: str | dict, metrics: dict, *, config: dict | None = None, details: dict | None = None
) -> dict:
    """The result record every ``rlft eval`` command writes."""
    return {
        "kind": kind,
        "model": model,
        "metrics": metrics,
        "config": config or {},
        "details": details or {},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_result(result: dict, out_dir: str | Path, *, name: str | None = None) -> tuple[Path, Path]:
    """Write ``<name>.json`` (everything) and ``<name>.md`` (the metrics table); return both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = name or result["kind"]
    json_path, table_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(result, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    title = f"{result['kind']} - {result['model']}" if isinstance(result["model"], str) else result["kind"]
    table_path.write_text(metrics_table(result["metrics"], title=title), encoding="utf-8")
    return json_path, table_path


def read_results(paths: list[str | Path]) -> list[dict]:
    """Result records from JSON files or folders of them (searched recursively)."""
    records = []
    for path in map(Path, paths):
        files = sorted(path.rglob("*.json")) if path.is_dir() else [path]
        if not files or not all(f.exists() for f in files):
            raise FileNotFoundError(f"no result JSON found at {path}")
        for file in files:
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as error:  # a torn or foreign file named by the user
                raise ValueError(f"{file}: not a result JSON file ({error})") from None
            if isinstance(data, dict) and {"kind", "metrics"} <= data.keys():
                data.setdefault("source", str(file))
                records.append(data)
            elif not path.is_dir():  # a file given by name must be a result; a folder may hold other JSON
                raise ValueError(f"{file}: not an rlft eval result (a JSON object with 'kind' and 'metrics')")
    return records
