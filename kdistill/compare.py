"""`kdistill compare RUN [RUN ...]`: finished runs side by side.

One row per model (teacher, student, baseline) per run, with the settings that differ between the
runs as columns, then each model's accuracy and costs from the run's metrics.json.
"""
from __future__ import annotations

import html
import json
import math
import os
from typing import Any

from .errors import KdistillError
from .fileio import atomic_write_text
from .run_folder import RunFolder

_ABSENT = object()  # a setting a run's config.yaml does not have (an older kdistill)
# Columns from metrics.json's models entries (see finish.summarize and evaluate.profile).
COST_COLUMNS = (("params (M)", "params", lambda value: f"{value / 1e6:.2f}"),
                ("size (MiB)", "size_mb", lambda value: f"{value:.1f}"),
                ("GFLOPs", "gflops", lambda value: f"{value:.2f}"),
                ("latency (ms, batch 1)", "latency_ms", lambda value: f"{value:.1f}"))


def read_metrics(path: str) -> dict:
    """A run's metrics.json, checked to hold a models table."""
    if not os.path.exists(path):
        raise KdistillError(f"{path} does not exist: not a finished kdistill run")
    try:
        with open(path, encoding="utf-8") as f:
            metrics = json.load(f)
    except OSError as e:
        raise KdistillError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:  # bad JSON or not UTF-8
        raise KdistillError(f"{path} is not valid JSON ({str(e).splitlines()[0][:120]})") from None
    except RecursionError:  # json recurses once per level of nesting
        raise KdistillError(f"{path} nests values too deeply: not a kdistill metrics file") from None
    models = metrics.get("models") if isinstance(metrics, dict) else None
    if not isinstance(models, dict) or not all(isinstance(entry, dict) for entry in models.values()):
        raise KdistillError(f"{path} is not a kdistill metrics file (it has no models table)")
    return metrics


def read_run(folder: str) -> tuple[dict, dict]:
    """(metrics, settings) of a finished run folder."""
    if not os.path.isdir(folder):
        raise KdistillError(f"run folder {folder} does not exist")
    run = RunFolder(folder)
    return read_metrics(run.metrics), run.saved_settings("run settings")


def flatten(settings: dict, prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted names: {"distill": {"temperature": 4}} -> {"distill.temperature": 4}."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def differing_settings(flat_settings: list[dict[str, Any]]) -> list[str]:
    """The dotted names whose values are not the same in every run, in the order of the settings file;
    out is left out: it is the run column."""
    names = list(dict.fromkeys(name for flat in flat_settings for name in flat))
    first = flat_settings[0]
    return [name for name in names if name != "out"
            and any(flat.get(name, _ABSENT) != first.get(name, _ABSENT) for flat in flat_settings[1:])]


def _setting_text(value: Any) -> str:
    if value is _ABSENT:
        return "—"
    if isinstance(value, (bool, list)):
        return json.dumps(value)  # true/false and [0, 1] as written in a settings file
    return str(value)


def _is_finite_number(value: Any) -> bool:
    """A number a cell can show: not a bool, and not one float() overflows (10**400) or NaN."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def accuracy_text(metrics: dict, kind: str) -> str:
    """Best val accuracy and its epoch; for a model trained once per seed, mean ± std over the seeds."""
    summary = metrics.get("summary", {}).get(kind)
    if summary:
        best = summary["best_val_acc"]
        epochs = [row["best_epoch"] for row in metrics.get("seeds", {}).get(kind, [])]
        spread = f" ± {best['std']:.2%}" if best["std"] is not None else ""
        return (f"{best['mean']:.2%}{spread} ({len(epochs)} seed{'s' if len(epochs) != 1 else ''}, "
                f"epochs {', '.join(map(str, epochs))})")
    model = metrics["models"][kind]
    if "best_val_acc" not in model:
        return "—"
    return f"{model['best_val_acc']:.2%} (epoch {model.get('best_epoch', '?')})"


def comparison(folders: list[str]) -> tuple[list[str], list[list[str]]]:
    """(column names, rows of cell texts): one row per model per run."""
    runs = [(folder, *read_run(folder)) for folder in folders]
    flat_settings = [flatten(settings) for _, _, settings in runs]
    differing = differing_settings(flat_settings)
    # Latency depends on the machine: say where it was measured when the runs' devices differ.
    devices = [metrics.get("device", "—") for _, metrics, _ in runs]
    device_column = ["measured on"] if len(set(devices)) > 1 else []
    columns = ["run", "model", "arch", *differing, *device_column, "best val acc (epoch)",
               *(name for name, _, _ in COST_COLUMNS)]
    rows = []
    for (folder, metrics, _), flat, device in zip(runs, flat_settings, devices):
        settings = [_setting_text(flat.get(name, _ABSENT)) for name in differing]
        for kind, model in metrics["models"].items():
            costs = [show(float(model[key])) if _is_finite_number(model.get(key)) else "—"
                     for _, key, show in COST_COLUMNS]
            try:
                accuracy = accuracy_text(metrics, kind)
            except (KeyError, TypeError, AttributeError, ValueError):
                raise KdistillError(f"{os.path.join(folder, 'metrics.json')} is not a kdistill metrics file "
                                    f"(its {kind} accuracy is malformed)") from None
            rows.append([folder, kind, str(model.get("arch", "—")), *settings,
                         *([device] if device_column else []), accuracy, *costs])
    return columns, rows


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|").replace("\n", " ") for cell in cells) + " |"
    numeric = len(COST_COLUMNS)  # the cost columns are right-aligned
    rule = "|" + "---|" * (len(columns) - numeric) + "---:|" * numeric
    return "\n".join([line(columns), rule, *(line(row) for row in rows)]) + "\n"


def html_page(columns: list[str], rows: list[list[str]]) -> str:
    """The table as a page that needs no other file."""
    def cells(tag: str, texts: list[str]) -> str:
        return "".join(f"<{tag}>{html.escape(text)}</{tag}>" for text in texts)
    body = "\n".join(f"<tr>{cells('td', row)}</tr>" for row in rows)
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>kdistill compare</title>\n"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left}th{background:#f2f2f2}"
            "tr:nth-child(even) td{background:#fafafa}</style>\n</head>\n<body>\n<h1>kdistill compare</h1>\n"
            f"<table>\n<thead><tr>{cells('th', columns)}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>\n"
            "</body>\n</html>\n")


def compare_runs(folders: list[str], html_path: str | None = None) -> str:
    """The markdown table of the runs; also written as an HTML page to html_path when given."""
    columns, rows = comparison(folders)
    if html_path:
        atomic_write_text(html_path, html_page(columns, rows))
    return markdown_table(columns, rows)
