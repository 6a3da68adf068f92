"""Report: metrics.json, per-model history CSVs, learning curves and a Markdown comparison."""
from __future__ import annotations

import csv
import io
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .fileio import atomic_write, atomic_write_text  # noqa: E402

LABELS = {"teacher": "Teacher", "student": "Distilled student", "baseline": "Student without teacher"}


def write_history(path: str, history: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(path, buffer.getvalue())


def plot_curves(path: str, histories: dict[str, list[dict]], metric: str, ylabel: str) -> None:
    figure, axes = plt.subplots(figsize=(7, 4.2))
    for (name, history), color in zip(histories.items(), ("tab:blue", "tab:orange", "tab:green")):
        epochs = [row["epoch"] for row in history]
        axes.plot(epochs, [row[f"train_{metric}"] for row in history], "--", color=color,
                  label=f"{LABELS.get(name, name)} (train)")
        axes.plot(epochs, [row[f"val_{metric}"] for row in history], "-", color=color,
                  label=f"{LABELS.get(name, name)} (val)")
    axes.set_xlabel("epoch")
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110), "plot")
    plt.close(figure)


def markdown(metrics: dict, config: dict) -> str:
    models = metrics["models"]
    lines = [
        "# kdistill report", "",
        f"Data: `{config['data']}` ({metrics['classes']} classes; {metrics['images']['train']} train, "
        f"{metrics['images']['val']} val, {metrics['images'].get('test', 0)} test images; "
        f"{metrics['skipped_files']} skipped), image size {config['image_size']}, seed {config['seed']}, "
        f"device {metrics['device']}.", "",
        "Best val acc is the best epoch by validation accuracy (that epoch's weights are the ones saved "
        "and used for predictions); final val acc is the last epoch's.", "",
        "| Model | Architecture | Best val acc | Best epoch | Final val acc | Epochs | Size (MiB) | "
        "Parameters (M) | GFLOPs | Latency (ms, batch 1) | Train time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in models.items():
        lines.append(
            f"| {LABELS.get(name, name)} | {m['arch']} | {m['best_val_acc']:.2%} | {m['best_epoch']} | "
            f"{m['final_val_acc']:.2%} | {m['epochs']} | {m['size_mb']:.1f} | {m['params'] / 1e6:.2f} | "
            f"{m['gflops']:.2f} | {m['latency_ms']:.1f} | {m['train_seconds']:.0f} |")
    if "student" in models and "baseline" in models:
        gain = models["student"]["best_val_acc"] - models["baseline"]["best_val_acc"]
        lines += ["", f"Distillation changed the student's best val accuracy by {gain * 100:+.1f} points "
                      f"against the same student trained without a teacher."]
    d = config["distill"]
    lines += [
        "", f"Distillation: method {d['method']}, T={d['temperature']}, alpha={d['alpha']}, teacher signal "
            f"{metrics['teacher_signal']}. GFLOPs count a multiply-add as two FLOPs, at "
            f"{config['image_size']} px. Latency: median of 20 forward passes on {metrics['device']}.",
        "", "Wall time of each stage in the last invocation (s; a resumed run counts only what it redid): "
            + ", ".join(f"{stage} {seconds:.1f}" for stage, seconds in metrics["stage_seconds"].items())
            + ". The teacher's train time above counts its epochs only; one-off feature extraction for a "
              "frozen backbone is part of the teacher stage.",
        "", "![loss](loss.png)", "", "![accuracy](accuracy.png)", "",
        "The fully resolved settings are in `config.yaml`; per-epoch numbers in `history/`.", "",
    ]
    return "\n".join(lines)


def write_report(out: str, metrics: dict, histories: dict[str, list[dict]], config: dict) -> None:
    for name, history in histories.items():
        write_history(os.path.join(out, "history", f"{name}.csv"), history)
    plot_curves(os.path.join(out, "loss.png"), histories, "loss", "loss")
    plot_curves(os.path.join(out, "accuracy.png"), histories, "acc", "accuracy")
    atomic_write_text(os.path.join(out, "metrics.json"), json.dumps(metrics, indent=2))
    atomic_write_text(os.path.join(out, "report.md"), markdown(metrics, config))
