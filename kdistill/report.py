"""Report: metrics.json, per-model history CSVs, val predictions, learning curves and a Markdown comparison."""
from __future__ import annotations

import csv
import io
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .errors import printable  # noqa: E402
from .fileio import atomic_write, atomic_write_text, refuse_link  # noqa: E402
from .run_folder import RunFolder  # noqa: E402
from .run_verdict import run_verdict  # noqa: E402
from .significance import EXACT_BELOW, SIGNIFICANCE_LEVEL, verdict  # noqa: E402

LABELS = {"teacher": "Teacher", "student": "Distilled student", "baseline": "Student without teacher"}
COLORS = {"teacher": "tab:blue", "student": "tab:orange", "baseline": "tab:green"}


def kind_of(run_name: str) -> str:
    """student-seed1 -> student"""
    return run_name.partition("-seed")[0]


def plot_label(text) -> str:
    """Any text (a class name, a setting's value) as a matplotlib label drawn as is: each `$` escaped,
    since two would start mathtext, which fails on most names (US$_and_$EUR); undecodable file-name
    bytes as backslash escapes, since FreeType cannot draw a lone surrogate."""
    return printable(str(text)).replace("$", r"\$")


def write_history(path: str, history: list[dict]) -> None:
    refuse_link(os.path.dirname(path))  # RUN/history, in a run folder that may have been received
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(path, buffer.getvalue())


def write_val_predictions(path: str, files: list[str], labels, predicted: dict, classes: list[str]) -> None:
    """One row per val image: its label and each trained student's prediction (best weights)."""
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8", errors="backslashreplace") as f:
            writer = csv.writer(f)
            writer.writerow(["filename", "label", *predicted])
            columns = [labels.tolist(), *(indices.tolist() for indices in predicted.values())]
            for name, *indices in zip(files, *columns):
                writer.writerow([name, *(classes[i] for i in indices)])
    atomic_write(path, write, "val predictions")


def plot_curves(path: str, histories: dict[str, list[dict]], metric: str, ylabel: str) -> None:
    """One colour per model; a model's first run (the reported seed) drawn full, other seeds faint."""
    figure, axes = plt.subplots(figsize=(7, 4.2))
    drawn = set()
    for name, history in histories.items():
        kind = kind_of(name)
        label = None if kind in drawn else LABELS.get(kind, kind)
        # Markers, so that a one-epoch history still shows as points.
        style = {"color": COLORS.get(kind), "alpha": 1.0 if label else 0.3, "marker": ".", "markersize": 4}
        drawn.add(kind)
        epochs = [row["epoch"] for row in history]
        if f"train_{metric}" in history[-1]:  # a given teacher was measured (epoch 0), not trained
            axes.plot(epochs, [row[f"train_{metric}"] for row in history], "--",
                      label=label and f"{label} (train)", **style)
        axes.plot(epochs, [row[f"val_{metric}"] for row in history], "-", label=label and f"{label} (val)", **style)
    axes.set_xlabel("epoch")
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110), "plot")
    plt.close(figure)


def _p(p_value: float) -> str:
    return f"{p_value:.2g}" if p_value >= 1e-4 else f"{p_value:.1e}"


def _points(stats: dict) -> str:
    """mean ± std of accuracies (fractions) in percent, or of differences in points."""
    return f"{stats['mean'] * 100:.1f} ± {stats['std'] * 100:.1f}"


def _paired(test: dict, images: str) -> str:
    return (f"on {images} the distilled student is right where the baseline is wrong {test['b']} times and the "
            f"reverse {test['c']} times (McNemar's test, {test['test']}, p = {_p(test['p_value'])}): "
            f"{verdict(test)}")


def seen_size(model: dict, image_size: int) -> str:
    """' (128 px)' for a model that sees its views resized from image_size, else ''."""
    size = model.get("input_size", image_size)  # absent from metrics written before teacher.input_size
    return f" ({size} px)" if size != image_size else ""


def _resized_text(models: dict, image_size: int) -> str:
    """For the FLOPs note: the count of a model marked (N px) includes its resize, so it is at N px."""
    return (" (a model marked with a size resizes the image to it first; its count is at that size)"
            if any(seen_size(m, image_size) for m in models.values()) else "")


def seeds_section(metrics: dict) -> list[str]:
    """The per-seed table and, in words, whether the gain is larger than the noise."""
    summary, rows, val_images = metrics["summary"], metrics["seeds"], metrics["images"]["val"]
    count, has_baseline = len(summary["seeds"]), "baseline" in rows
    columns = ["Seed", "Distilled student: best val acc (epoch)", "Final val acc"]
    if has_baseline:
        columns += ["Without teacher: best val acc (epoch)", "Final val acc", "Gain (points)", "b", "c", "McNemar p"]
    lines = ["## Over seeds", "",
             f"The teacher is trained once; the distilled student{' and the baseline' if has_baseline else ''} "
             f"are trained once per seed ({', '.join(map(str, summary['seeds']))}) on the same data and "
             f"teacher signal.", "",
             "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for position, row in enumerate(rows["student"]):
        line = f"| {row['seed']} | {row['best_val_acc']:.2%} ({row['best_epoch']}) | {row['final_val_acc']:.2%} |"
        if has_baseline:
            base, test = rows["baseline"][position], summary["mcnemar"]["per_seed"][position]
            line += (f" {base['best_val_acc']:.2%} ({base['best_epoch']}) | {base['final_val_acc']:.2%} | "
                     f"{(row['best_val_acc'] - base['best_val_acc']) * 100:+.1f} | {test['b']} | {test['c']} | "
                     f"{_p(test['p_value'])} |")
        lines.append(line)
    means = "; ".join(f"{LABELS[name].lower()} {_points(summary[name]['best_val_acc'])}% best, "
                      f"{_points(summary[name]['final_val_acc'])}% final" for name in rows)
    lines += ["", f"Mean ± sample standard deviation over the {count} seeds: {means}."]
    if has_baseline:
        gain, pooled = summary["gain_best_val_acc"], summary["mcnemar"]["pooled"]
        lines += ["", f"Over {count} seeds the distilled student is {abs(gain['mean']) * 100:.1f} ± "
                      f"{gain['std'] * 100:.1f} points {'above' if gain['mean'] >= 0 else 'below'} the baseline "
                      f"(best epochs; mean ± std of the per-seed differences); pooled over the seeds, "
                      + _paired(pooled, f"{count} × {val_images:,} val images") + ".",
                  "", "b: val images only the distilled student gets right; c: only the baseline. McNemar's test "
                      f"is exact (binomial) below {EXACT_BELOW} discordant images, else chi-square with continuity "
                      f"correction; a difference is called larger than the noise at p < {SIGNIFICANCE_LEVEL}."]
    lines += ["", f"The models table above, `student.pt`, `student.onnx` and `predictions.csv` are seed "
                  f"{summary['exported_seed']}'s (the first listed), not the best seed by val: picking that would "
                  f"be selection on the val images they are judged on. Best epochs are picked on val, alike for "
                  f"every model. Per-seed histories are `history/<model>-seed<seed>.csv` (faint in the curves below), "
                  f"each val image's predictions `val_predictions.csv`."]
    return lines


DEPLOYMENT_LABELS = {"student_torch_fp32": ("Distilled student", "PyTorch", "fp32"),
                     "student_onnx_fp32": ("Distilled student", "ONNX Runtime (`student.onnx`)", "fp32"),
                     "student_onnx_int8": ("Distilled student", "ONNX Runtime (`student-int8.onnx`)", "int8"),
                     "teacher_torch_fp32": ("Teacher", "PyTorch", "fp32")}


def deployment_section(metrics: dict) -> list[str]:
    """The deployment table (deploy.py): size, val accuracy and CPU latency per way of running a model."""
    rows, setup = metrics["deployment"], metrics["deployment_setup"]
    lines = ["## Deployment (CPU)", "",
             "| Model | Runs on | Precision | Size (MiB) | Val acc | Latency batch 1 (ms) | Latency batch 32 (ms) | "
             "Threads |", "|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        model, engine, precision = DEPLOYMENT_LABELS.get(name, (name, "", ""))
        lines.append(f"| {model} | {engine} | {precision} | {row['size_mb']:.1f} | {row['val_acc']:.2%} | "
                     f"{row['latency_ms_b1']:.2f} | {row['latency_ms_b32']:.1f} | {row['threads']} |")
    fp32, int8 = rows["student_onnx_fp32"], rows.get("student_onnx_int8")
    against = (f"int8: {setup['int8']}. Against fp32 ONNX Runtime it is {fp32['size_mb'] / int8['size_mb']:.1f}x "
               f"smaller, {fp32['latency_ms_b1'] / int8['latency_ms_b1']:.2f}x as fast at batch 1 and "
               f"{(int8['val_acc'] - fp32['val_acc']) * 100:+.1f} points of val accuracy." if int8 else
               "int8: ONNX Runtime's quantizer refused this model (see log.txt), so there is no int8 row.")
    lines += ["", f"{against} Val accuracy is "
                  f"measured anew on every val image; latency is the median of {setup['timed_runs_b1']} timed runs at "
                  f"batch 1 and {setup['timed_runs_b32']} at batch 32 on the first val images ({setup['rounds']} "
                  f"round(s) in which the rows take turns, each after {setup['warmup_runs']} untimed runs), PyTorch "
                  f"timed with torch.utils.benchmark.Timer, ONNX Runtime with time.perf_counter. Size: the file on "
                  f"disk (`student.pt`, the ONNX files, `models/teacher.pt`)."]
    return lines


def markdown(metrics: dict, config: dict) -> str:
    models = metrics["models"]
    seeds = config.get("seeds") or []
    seed_text = (f"seed {config['seed']} (data split, teacher), students over seeds {', '.join(map(str, seeds))}"
                 if seeds else f"seed {config['seed']}")
    lines = [
        "# kdistill report", "", f"**{run_verdict(metrics)}**", "",
        f"Data: `{config['data']}` ({metrics['classes']} classes; {metrics['images']['train']} train, "
        f"{metrics['images']['val']} val, {metrics['images'].get('test', 0)} test images; "
        f"{metrics['skipped_files']} skipped), image size {config['image_size']}, {seed_text}, "
        f"device {metrics['device']}.", "",
        *_warnings_section(metrics),
        "Best val acc is the best epoch by validation accuracy (that epoch's weights are the ones saved "
        "and used for predictions); final val acc is the last epoch's.", "",
        "| Model | Architecture | Best val acc | Best epoch | Final val acc | Epochs | Size (MiB) | "
        "Parameters (M) | GFLOPs | Latency (ms, batch 1) | Train time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in models.items():
        label = LABELS.get(name, name) + (f" (seed {m['seed']})" if seeds and name != "teacher" else "")
        lines.append(
            f"| {label} | {m['arch']}{seen_size(m, config['image_size'])} | {m['best_val_acc']:.2%} | "
            f"{m['best_epoch']} | {m['final_val_acc']:.2%} | {m['epochs']} | {m['size_mb']:.1f} | "
            f"{m['params'] / 1e6:.2f} | {m['gflops']:.2f} | {m['latency_ms']:.1f} | {m['train_seconds']:.0f} |")
    if "mcnemar" in metrics:  # a single run with a baseline
        gain = models["student"]["best_val_acc"] - models["baseline"]["best_val_acc"]
        lines += ["", f"Distillation changed the student's best val accuracy by {gain * 100:+.1f} points "
                      f"against the same student trained without a teacher; "
                      + _paired(metrics["mcnemar"], f"the {metrics['images']['val']:,} val images")
                      + ". That is the noise of the val sample only: seed-to-seed noise needs `seeds` "
                        "(e.g. `--seeds 0,1,2`)."]
    if seeds:
        lines += ["", *seeds_section(metrics)]
    if metrics.get("deployment"):
        lines += ["", *deployment_section(metrics)]
    d = config["distill"]
    lines += [
        "", f"Distillation: method {d['method']}, T={d['temperature']}, alpha={d['alpha']}, teacher signal "
            f"{metrics['teacher_signal']} ({SIGNALS[metrics['teacher_signal'].split()[0]]}"
            f"{'; ' + metrics['teacher_signal_reason'] if metrics.get('teacher_signal_reason') else ''})."
            f"{_ensemble_text(metrics)}{_transfer_text(metrics)} GFLOPs count a multiply-add as two FLOPs, for "
            f"one {config['image_size']} px image{_resized_text(models, config['image_size'])}. Latency: median of "
            f"20 forward passes on {metrics['device']}.",
        "", "Wall time of each stage in the last invocation (s; a resumed run counts only what it redid): "
            + ", ".join(f"{stage} {seconds:.1f}" for stage, seconds in metrics["stage_seconds"].items())
            + ". The teacher's train time above counts its epochs only; one-off feature extraction for a "
              "frozen backbone is part of the teacher stage.",
        "", "![loss](loss.png)", "", "![accuracy](accuracy.png)", "",
        "The fully resolved settings are in `config.yaml`; per-epoch numbers in `history/`.", "",
    ]
    return "\n".join(lines)


def _warnings_section(metrics: dict) -> list[str]:
    warnings = metrics.get("warnings") or []  # absent from metrics written before they existed
    return ["## Warnings", "", *(f"- {warning}" for warning in warnings), ""] if warnings else []


SIGNALS = {"cached": "the teacher's outputs computed once per training image and stored",
           "views": "the teacher's outputs for stored augmented views of each image, computed once",
           "online": "the teacher ran on every training batch"}


def _ensemble_text(metrics: dict) -> str:
    ensemble = metrics.get("ensemble")
    if not ensemble:
        return ""
    members = ", ".join(f"{name} (weight {weight:.3g})" for name, weight in zip(ensemble["teachers"],
                                                                                 ensemble["weights"]))
    return (f" Ensemble of {len(ensemble['teachers'])} teachers, {members}: the student learned from the weighted "
            f"average of their probabilities at T={ensemble['temperature']}, whose argmax scores "
            f"{ensemble['val_acc']:.2%} on the val images.")


def _transfer_text(metrics: dict) -> str:
    transfer = metrics.get("transfer_set")
    if not transfer:
        return ""
    source = "the run's DATA/test images" if transfer["source"] == "test" else transfer["source"]
    return (f" Transfer set: {transfer['images']:,} unlabelled images ({source}) joined the distilled student's "
            "training set, labelled by the teacher and learned through the teacher's terms only; the baseline "
            "trained on the labelled images alone.")


def write_report(out: str, metrics: dict, histories: dict[str, list[dict]], config: dict) -> None:
    for name, history in histories.items():
        write_history(RunFolder(out).history(name), history)
    plot_curves(os.path.join(out, "loss.png"), histories, "loss", "loss")
    plot_curves(os.path.join(out, "accuracy.png"), histories, "acc", "accuracy")
    atomic_write_text(RunFolder(out).metrics, json.dumps(metrics, indent=2))
    atomic_write_text(RunFolder(out).report, markdown(metrics, config))
