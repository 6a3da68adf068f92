"""A sweep's summary: sweep.json (every point's val accuracies, deployed size and latency, the best
point, the Pareto front), sweep.md (the same as a table), sweep.png (a heatmap of the distilled
student's val accuracy over the grid) and sweep-pareto.png (accuracy against size and latency)."""
from __future__ import annotations

import itertools
import json
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .fileio import atomic_write, atomic_write_text  # noqa: E402
from .report import plot_label  # noqa: E402
from .sweep_pareto import deployed, mark_front  # noqa: E402
from .sweep_pareto import plot as plot_pareto  # noqa: E402

PANEL_COLUMNS = 3  # heatmap panels per figure row, for grids of three or more axes


def accuracy(metrics: dict, kind: str) -> dict | None:
    """A model's best val accuracy in a point's metrics and its epoch; with seeds, the mean and sample
    std over seeds, and each seed's (the teacher is trained once)."""
    if kind not in metrics["models"]:
        return None
    if kind in metrics.get("seeds", {}):
        stats = metrics["summary"][kind]["best_val_acc"]
        return {"best_val_acc": stats["mean"], "std": stats["std"],
                "per_seed": [{key: row[key] for key in ("seed", "best_val_acc", "best_epoch")}
                             for row in metrics["seeds"][kind]]}
    model = metrics["models"][kind]
    return {"best_val_acc": model["best_val_acc"], "best_epoch": model["best_epoch"]}


def _row(point, metrics: dict, out: str) -> dict:
    row = {"point": point.name, "folder": os.path.relpath(point.folder, out), "settings": point.values,
           "shared": {kind: os.path.relpath(folder, out) for kind, folder in point.shared.items()}}
    if "error" in metrics:
        return {**row, "error": metrics["error"]}
    row.update({kind: accuracy(metrics, kind) for kind in ("student", "baseline", "teacher")})
    row["deployed"] = deployed(metrics)
    if row["baseline"]:
        row["gain"] = row["student"]["best_val_acc"] - row["baseline"]["best_val_acc"]
    return row


def _percent(result: dict | None) -> str:
    if result is None:
        return "-"
    if "per_seed" in result:
        epochs = ", ".join(str(seed["best_epoch"]) for seed in result["per_seed"])
        return f"{result['best_val_acc'] * 100:.1f} ± {result['std'] * 100:.1f}% (epochs {epochs})"
    return f"{result['best_val_acc']:.2%} ({result['best_epoch']})"


def markdown(summary: dict, texts: dict[str, dict[str, str]]) -> str:
    keys = [axis["key"] for axis in summary["grid"]]
    seeds = summary["seeds"]
    over = (f"mean ± sample std over seeds {', '.join(map(str, seeds))}, with each seed's best epoch"
            if seeds else "with its epoch")
    lines = ["# kdistill sweep", "",
             (f"{len(summary['points'])} points over {' × '.join(f'`{key}`' for key in keys)}; each is a run "
              "folder in `points/` with its own report. Accuracies are the best epoch's val accuracy "
              f"({over}); the baseline is the same student trained without a teacher, the gain the "
              "distilled student's over it in points."), "",
             "| " + " | ".join([*keys, "Distilled student", "Without teacher", "Gain", "Teacher",
                                 "Deployed MiB", "Latency ms", "Pareto", "Run"]) + " |",
             "|---" * (len(keys) + 8) + "|"]
    best = summary["best"] and summary["best"]["point"]
    for row in summary["points"]:
        cells = [texts[row["point"]][key] for key in keys]
        if "error" in row:
            cells += [f"failed: {row['error']}", "", "", "", "", "", "", f"`{row['folder']}`"]
        else:
            student = _percent(row["student"])
            cells += [f"**{student}**" if row["point"] == best else student, _percent(row["baseline"]),
                      f"{row['gain'] * 100:+.1f}" if "gain" in row else "-",
                      f"{_percent(row['teacher'])} `{os.path.basename(row['shared']['teacher'])}`",
                      f"{row['deployed']['size_mb']:.2f}", f"{row['deployed']['latency_ms']:.2f}",
                      "yes" if row["pareto"] else "", f"`{row['folder']}`"]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    forms = sorted({row["deployed"]["form"] for row in summary["points"] if "deployed" in row})
    lines += ["", (f"Deployed: the distilled student as a user would run it ({'; '.join(forms)}): its size on disk "
                   "and its median latency at batch 1 (the run's deployment table). Pareto: no other point is at "
                   "least as accurate, as small and as fast, and better in one; see `sweep-pareto.png`.")]
    if best:
        lines += ["", (f"Best by val: **{best}** (in bold). It was picked on the val images it is scored on, "
                       "so its accuracy flatters it; confirm it on other images or over seeds (`--seeds`).")]
    shared = {kind: sorted({row["shared"][kind] for row in summary["points"] if kind in row["shared"]})
              for kind in ("teacher", "baseline")}
    lines += ["", "Trained once and shared: " + "; ".join(
        f"{len(folders)} {kind}{'s' if len(folders) > 1 else ''} ({', '.join(f'`{f}`' for f in folders)})"
        for kind, folders in shared.items() if folders)
        + ". Points whose teacher (or baseline) reads the same settings and data share one; each folder's "
          "`settings.json` says which.", "", "![val accuracy over the grid](sweep.png)", ""]
    return "\n".join(lines)


def plot(path: str, summary: dict, positions: dict[str, tuple[int, ...]]) -> None:
    """The distilled student's val accuracy as a heatmap, the gain over the baseline written in each cell.

    Rows are the first axis' values and columns the second's; one axis is one row. A third axis and
    beyond each get a panel per combination of their values, all on one colour scale."""
    axes = summary["grid"]
    row_axis, column_axis, rest = (None, axes[0], []) if len(axes) == 1 else (axes[0], axes[1], axes[2:])
    shape = (len(row_axis["values"]) if row_axis else 1, len(column_axis["values"]))
    panels = list(itertools.product(*(range(len(axis["values"])) for axis in rest)))
    grids = {panel: np.full(shape, np.nan) for panel in panels}
    gains = {panel: np.full(shape, np.nan) for panel in panels}
    by_name = {row["point"]: row for row in summary["points"]}
    best = None
    for name, position in positions.items():
        row = by_name[name]
        cell = (position[0], position[1]) if row_axis else (0, position[0])
        panel = tuple(position[2:])
        if "error" not in row:
            grids[panel][cell] = row["student"]["best_val_acc"]
            gains[panel][cell] = row.get("gain", np.nan)
        if summary["best"] and name == summary["best"]["point"]:
            best = (panel, cell)
    finite = np.concatenate([grid[np.isfinite(grid)] for grid in grids.values()])
    low, high = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    if high - low < 1e-9:
        low, high = low - 0.005, high + 0.005
    columns = min(len(panels), PANEL_COLUMNS)
    figure_rows = math.ceil(len(panels) / columns)
    figure, subplots = plt.subplots(figure_rows, columns, squeeze=False, layout="constrained", figsize=(
        columns * (1.1 * shape[1] + 2.2) + 1.2, figure_rows * (0.7 * shape[0] + 2.0)))
    colours = plt.get_cmap("viridis").with_extremes(bad="lightgray")  # a failed point
    image = None
    for panel, axes_plot in itertools.zip_longest(panels, subplots.flat):
        if panel is None:
            axes_plot.axis("off")
            continue
        image = axes_plot.imshow(np.ma.masked_invalid(grids[panel]), cmap=colours, vmin=low, vmax=high,
                                 aspect="auto")
        for (i, j), value in np.ndenumerate(grids[panel]):
            gain = gains[panel][i, j]
            text = "failed" if np.isnan(value) else f"{value:.1%}" + ("" if np.isnan(gain) else f"\n{gain * 100:+.1f}")
            shade = (value - low) / (high - low) if np.isfinite(value) else 1.0
            axes_plot.text(j, i, text, ha="center", va="center", fontsize=8,
                           color="black" if shade > 0.6 else "white")
        if best and best[0] == panel:
            i, j = best[1]
            axes_plot.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
        axes_plot.set_xticks(range(shape[1]), [plot_label(text) for text in column_axis["texts"]],
                             rotation=30 if shape[1] > 4 else 0)
        axes_plot.set_xlabel(column_axis["key"])
        if row_axis:
            axes_plot.set_yticks(range(shape[0]), [plot_label(text) for text in row_axis["texts"]])
            axes_plot.set_ylabel(row_axis["key"])
        else:
            axes_plot.set_yticks([])
        if rest:
            axes_plot.set_title(", ".join(f"{axis['key']}={plot_label(axis['texts'][index])}"
                                          for axis, index in zip(rest, panel)),
                                fontsize=9)
    figure.colorbar(image, ax=subplots.ravel().tolist(), label="best val acc, distilled student")
    below = "below: gain over the baseline, points; " if any("gain" in row for row in summary["points"]) else ""
    figure.suptitle(f"Distilled student's best val accuracy ({below}red: best)", fontsize=10)
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110), "plot")
    plt.close(figure)


def write_sweep(out: str, axes: list, points: list, results: dict[str, dict]) -> dict:
    """sweep.json, sweep.md and sweep.png in out; returns sweep.json's content."""
    rows = [_row(point, results[point.name], out) for point in points]
    finished = [row for row in rows if "error" not in row]
    best = max(finished, key=lambda row: row["student"]["best_val_acc"], default=None)  # the first on a tie
    summary = {"grid": [{"key": key, "values": values, "texts": texts} for key, texts, values in axes],
               "seeds": points[0].cfg.seeds, "points": rows, "best": best,
               "best_by": "the distilled student's best val accuracy (with seeds, its mean over seeds)"}
    mark_front(rows)
    texts = {point.name: {key: typed[i] for (key, typed, _), i in zip(axes, point.position)} for point in points}
    atomic_write_text(os.path.join(out, "sweep.json"), json.dumps(summary, indent=2))
    atomic_write_text(os.path.join(out, "sweep.md"), markdown(summary, texts))
    plot(os.path.join(out, "sweep.png"), summary, {point.name: point.position for point in points})
    if finished:
        plot_pareto(os.path.join(out, "sweep-pareto.png"), rows)
    return summary
