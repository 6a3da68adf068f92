"""report.html: one self-contained page (images inlined as base64 PNG, no scripts, nothing fetched)
that shows what the numbers of report.md hide: where each model errs (confusion matrices, per-class
accuracy), how closely the distilled student follows its teacher, how well each model's confidence
matches its accuracy, and the student's most confident mistakes."""
from __future__ import annotations

import base64
import html
import io
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from .errors import printable  # noqa: E402
from .fileio import atomic_write_text  # noqa: E402
from .html_confusion import confusion_section  # noqa: E402
from .report import LABELS, seen_size  # noqa: E402
from .config import Config  # noqa: E402
from .run_folder import RunFolder  # noqa: E402
from .run_verdict import run_verdict  # noqa: E402
from .significance import verdict  # noqa: E402

CALIBRATION_BINS = 15
MISTAKES_SHOWN = 16
THUMBNAIL_PIXELS = 96
STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px auto; padding: 0 12px; max-width: 1220px; color: #222;
       overflow-wrap: break-word; }
h1 { margin-bottom: 4px; } h2 { margin-top: 32px; border-bottom: 1px solid #ddd; }
ul.warnings li { color: #8a4b00; margin: 4px 0; }
p.verdict { font-size: 17px; font-weight: 600; margin: 10px 0 14px; }
.wide { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; margin: 8px 0; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f0f3f7; }
table.confusion th { font-size: 12px; white-space: nowrap; }
table.confusion tr:first-child th:nth-child(n+3) { white-space: normal; overflow-wrap: anywhere; }
table.confusion td { line-height: 1.15; min-width: 32px; }
table.confusion td small { display: block; font-size: 10px; opacity: 0.75; }
table.confusion td.hit { font-weight: 700; outline: 2px solid #1f77b4; outline-offset: -2px; }
details { margin: 6px 0; } summary { cursor: pointer; font-size: 14px; }
img { max-width: 100%; height: auto; }
.figures { display: flex; flex-wrap: wrap; gap: 12px; }
.mistakes { display: grid; grid-template-columns: repeat(8, minmax(0, 1fr)); gap: 10px; }
.mistakes figure { margin: 0; font-size: 12px; overflow-wrap: anywhere; }
.mistakes img { width: 96px; height: 96px; image-rendering: pixelated; border: 2px solid #c33; }
.note { color: #555; font-size: 14px; }
.settings { columns: 3; font: 12px monospace; }
.settings div { overflow-wrap: anywhere; }
"""


def reliability(probabilities: np.ndarray, labels: np.ndarray, bins: int = CALIBRATION_BINS):
    """Per equal-width confidence bin ((k/bins, (k+1)/bins]): image count, accuracy, mean confidence
    (accuracy and confidence are 0 for an empty bin)."""
    confidence = probabilities.max(1)
    correct = probabilities.argmax(1) == labels
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    filled = np.maximum(counts, 1)
    return (counts, np.bincount(index, correct, minlength=bins) / filled,
            np.bincount(index, confidence, minlength=bins) / filled)


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = CALIBRATION_BINS) -> float:
    """ECE (Guo et al. 2017): sum over bins of |bin|/N * |accuracy(bin) - mean confidence(bin)|."""
    counts, accuracy, confidence = reliability(probabilities, labels, bins)
    return float((counts * np.abs(accuracy - confidence)).sum() / len(labels))


def agreement(labels: np.ndarray, teacher: np.ndarray, student: np.ndarray, classes: int) -> dict:
    """How often the student predicts the teacher's class, overall and per true class (None for a
    class without images), and how the two are right or wrong together."""
    same = teacher == student
    teacher_right, student_right = teacher == labels, student == labels
    per_class = [float(same[labels == c].mean()) if (labels == c).any() else None for c in range(classes)]
    return {"overall": float(same.mean()), "per_class": per_class,
            "both_right": int((teacher_right & student_right).sum()),
            "student_right_teacher_wrong": int((student_right & ~teacher_right).sum()),
            "teacher_right_student_wrong": int((teacher_right & ~student_right).sum()),
            "both_wrong": int((~teacher_right & ~student_right).sum())}


def _text(value) -> str:
    """A value as page text: escaped, and undecodable file-name bytes (a class folder named in
    Latin-1) and control characters as backslash escapes, readable as the log shows them."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(printable(str(value)))


def _table(header: list[str], rows: list[list], table_id: str = "") -> str:
    """Cells are escaped unless given as ("html", markup)."""
    def cell(value) -> str:
        return value[1] if isinstance(value, tuple) else _text(value)
    head = "".join(f"<th>{html.escape(name)}</th>" for name in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(value)}</td>" for value in row) + "</tr>" for row in rows)
    return f"<div class='wide'><table{f' id={table_id!r}' if table_id else ''}><tr>{head}</tr>{body}</table></div>"


def _img(png: bytes, alt: str, width: int | None = None) -> str:
    size = f' width="{width}"' if width else ""
    return f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}" alt="{_text(alt)}"{size}>'


def _figure_png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return buffer.getvalue()


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def _reliability_png(probabilities: dict[str, np.ndarray], labels: np.ndarray) -> bytes:
    figure, axes = plt.subplots(1, len(probabilities), figsize=(4.2 * len(probabilities), 4), squeeze=False)
    edges = np.linspace(0, 1, CALIBRATION_BINS + 1)
    for axis, (kind, model_probabilities) in zip(axes[0], probabilities.items()):
        counts, accuracy, confidence = reliability(model_probabilities, labels)
        filled = counts > 0
        axis.bar(edges[:-1][filled], accuracy[filled], width=1 / CALIBRATION_BINS, align="edge",
                 color="tab:blue", edgecolor="white", label="accuracy")
        # Hatched: from the bin's accuracy to its mean confidence (above the bar: overconfident).
        axis.bar(edges[:-1][filled], np.abs(confidence - accuracy)[filled],
                 bottom=np.minimum(accuracy, confidence)[filled], width=1 / CALIBRATION_BINS, align="edge",
                 fill=False, hatch="///", edgecolor="tab:red", linewidth=0.5, label="gap to mean confidence")
        axis.plot([0, 1], [0, 1], "k--", linewidth=1)
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 1)
        axis.set_xlabel("confidence")
        axis.set_ylabel("accuracy")
        ece = expected_calibration_error(model_probabilities, labels)
        axis.set_title(f"{LABELS.get(kind, kind)} (ECE {ece:.3f})", fontsize=10)
        axis.legend(fontsize=7, loc="upper left")
    figure.tight_layout()
    return _figure_png(figure)


def _thumbnail_png(image: np.ndarray) -> bytes:
    """A cached (3, S, S) uint8 image as a THUMBNAIL_PIXELS PNG."""
    picture = Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)))
    smaller = picture.width < THUMBNAIL_PIXELS
    picture = picture.resize((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS), Image.NEAREST if smaller else Image.BILINEAR)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def _comparison(metrics: dict, ece: dict[str, float], image_size: int) -> str:
    summary = metrics.get("summary")
    header = ["Model", "Architecture", "Best val acc (epoch)", "Final val acc"]
    if summary:
        header += [f"Best val acc over {len(summary['seeds'])} seeds", "Final val acc over seeds"]
    header += ["ECE", "Parameters (M)", "GFLOPs", "Latency (ms)", "Size (MiB)", "Train time (s)"]
    rows = []
    for kind, m in metrics["models"].items():
        row = [LABELS.get(kind, kind) + (f" (seed {m['seed']})" if summary and kind != "teacher" else ""),
               m["arch"] + seen_size(m, image_size), f"{m['best_val_acc']:.2%} ({m['best_epoch']})",
               f"{m['final_val_acc']:.2%}"]
        if summary:
            over_seeds = summary.get(kind)
            row += ["trained once", ""] if over_seeds is None else [
                f"{s['mean']:.2%}" + ("" if s["std"] is None else f" ± {s['std']:.2%}")
                for s in (over_seeds["best_val_acc"], over_seeds["final_val_acc"])]
        rows.append(row + [f"{ece[kind]:.3f}", f"{m['params'] / 1e6:.2f}", f"{m['gflops']:.2f}",
                           f"{m['latency_ms']:.1f}", f"{m['size_mb']:.1f}", f"{m['train_seconds']:.0f}"])
    test = metrics.get("mcnemar") or (summary or {}).get("mcnemar", {}).get("pooled")
    paired = "" if not test else (
        f"<p>Distilled student against the student without a teacher{' (pooled over seeds)' if summary else ''}: "
        f"right where the baseline is wrong {test['b']} times, the reverse {test['c']} times "
        f"(McNemar, {html.escape(test['test'])}, p = {test['p_value']:.2g}): {html.escape(verdict(test))}.</p>")
    return _table(header, rows, "comparison") + paired


def _mistakes(val, classes: list[str], labels: np.ndarray, teacher: np.ndarray, student: np.ndarray) -> str:
    wrong = np.flatnonzero(student.argmax(1) != labels)
    shown = wrong[np.argsort(-student.max(1)[wrong], kind="stable")][:MISTAKES_SHOWN]
    if not len(shown):
        return "<p>The distilled student gets every val image right.</p>"
    images = val.images[np.sort(shown)].numpy()  # one read of the mapped cache, in file order
    thumbnails = dict(zip(np.sort(shown).tolist(), images))
    cells = []
    for index in shown.tolist():
        student_class, teacher_class = student[index].argmax(), teacher[index].argmax()
        cells.append(
            f"<figure>{_img(_thumbnail_png(thumbnails[index]), val.files[index])}<figcaption>"
            f"true <b>{_text(classes[labels[index]])}</b><br>student {_text(classes[student_class])} "
            f"({student[index, student_class]:.1%})<br>teacher {_text(classes[teacher_class])} "
            f"({teacher[index, teacher_class]:.1%})<br><span class='note'>{_text(val.files[index])}</span>"
            f"</figcaption></figure>")
    return (f"<p class='note'>{len(shown)} of the student's {len(wrong)} wrong answers on the "
            f"{len(labels)} val images, most confident first.</p><div class='mistakes'>{''.join(cells)}</div>")


def _flat(settings: dict, prefix: str = "") -> list[tuple[str, object]]:
    items = []
    for key, value in settings.items():
        items += _flat(value, f"{prefix}{key}.") if isinstance(value, dict) else [(prefix + key, value)]
    return items


def _changed(config: dict) -> list[tuple[str, object]]:
    """The settings whose value is not kdistill's default."""
    defaults = dict(_flat(Config().to_dict()))
    return [(key, value) for key, value in _flat(config) if key not in defaults or defaults[key] != value]


def _deployment(rows: dict) -> str:
    """Any dict of name -> dict of values, as a table (a value that is not a dict fills one column)."""
    rows = {name: values if isinstance(values, dict) else {"value": values} for name, values in rows.items()}
    columns = list(dict.fromkeys(key for values in rows.values() for key in values))
    return _table(["", *columns], [[name, *(values.get(key, "") for key in columns)] for name, values in rows.items()])


def page(metrics: dict, config: dict, val, classes: list[str], probabilities: dict[str, np.ndarray],
         curves: list[bytes]) -> str:
    labels = val.labels.numpy()
    predicted = {kind: p.argmax(1) for kind, p in probabilities.items()}
    ece = {kind: expected_calibration_error(p, labels) for kind, p in probabilities.items()}
    from sklearn.metrics import precision_recall_fscore_support, recall_score

    # Per-class accuracy is each class's recall; the student's precision and F1 beside it.
    per_class = {kind: recall_score(labels, answer, labels=list(range(len(classes))), average=None, zero_division=0)
                 for kind, answer in predicted.items()}
    precision, _, f1, _ = precision_recall_fscore_support(labels, predicted["student"],
                                                          labels=list(range(len(classes))), zero_division=0)
    agreed = agreement(labels, predicted["teacher"], predicted["student"], len(classes))
    counts = np.bincount(labels, minlength=len(classes))
    kinds = list(probabilities)
    worst_first = sorted(range(len(classes)), key=lambda c: (f1[c], classes[c]))  # the student's weakest classes
    class_rows = [[classes[c], int(counts[c]), *(_percent(per_class[kind][c] if counts[c] else None)
                                                 for kind in kinds),
                   f"{precision[c]:.2f}", f"{f1[c]:.2f}", _percent(agreed["per_class"][c])] for c in worst_first]
    calibration_rows = [[LABELS.get(kind, kind), f"{ece[kind]:.3f}", f"{p.max(1).mean():.1%}",
                         f"{(predicted[kind] == labels).mean():.1%}"] for kind, p in probabilities.items()]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>kdistill report</title>",
        f"<style>{STYLE}</style></head><body><h1>kdistill report</h1>",
        f"<p class='verdict'>{html.escape(run_verdict(metrics))}</p>",
        f"<p class='note'>Data {_text(config['data'])}: {len(classes)} classes, "
        + ", ".join(f"{count:,} {split}" for split, count in metrics["images"].items())
        + f" images; image size {config['image_size']} px; device {html.escape(metrics['device'])} "
        f"({html.escape(metrics['precision'])}); distillation {html.escape(config['distill']['method'])}, "
        f"T = {config['distill']['temperature']}, α = {config['distill']['alpha']}. Val-image numbers below "
        f"are each model's best epoch by val accuracy{', first seed' if metrics.get('summary') else ''}.</p>",
        *(["<h2>Warnings</h2><ul class='warnings'>"
           + "".join(f"<li>{html.escape(warning)}</li>" for warning in metrics["warnings"]) + "</ul>"]
          if metrics.get("warnings") else []),
        "<h2>Comparison</h2>", _comparison(metrics, ece, config["image_size"]),
        "<div class='figures'>" + "".join(_img(png, name, width=600) for png, name in zip(curves, ("loss", "accuracy")))
        + "</div>",
        "<h2>Confusion matrices (val)</h2>",
        confusion_section(labels, predicted, classes, lambda figure, alt: _img(_figure_png(figure), alt)),
        "<h2>Per-class accuracy (val)</h2>",
        "<p class='note'>The student's weakest classes first (by F1). Accuracy is each class's recall.</p>",
        _table(["Class", "Val images", *(LABELS.get(kind, kind) for kind in kinds), "Student precision",
                "Student F1", "Student agrees with teacher"], class_rows, "per-class"),
        "<h2>Does the student follow its teacher?</h2>",
        f"<p>The distilled student predicts the teacher's class on <b>{agreed['overall']:.1%}</b> of the "
        f"{len(labels):,} val images (per class in the last column above).</p>",
        _table(["", "Teacher right", "Teacher wrong"],
               [["Student right", agreed["both_right"], agreed["student_right_teacher_wrong"]],
                ["Student wrong", agreed["teacher_right_student_wrong"], agreed["both_wrong"]]], "agreement"),
        "<h2>Calibration</h2>",
        f"<p class='note'>Expected calibration error: the val images binned by confidence (the top softmax "
        f"probability) into {CALIBRATION_BINS} equal-width bins, the mean over images of |accuracy − confidence| "
        f"of their bin. 0 is perfectly calibrated; the dashed line in the diagrams.</p>",
        _table(["Model", "ECE", "Mean confidence", "Accuracy"], calibration_rows, "calibration"),
        _img(_reliability_png(probabilities, labels), "reliability diagrams"),
        "<h2>The distilled student's most confident mistakes (val)</h2>",
        _mistakes(val, classes, labels, probabilities["teacher"], probabilities["student"]),
    ]
    if isinstance(metrics.get("deployment"), dict) and metrics["deployment"]:
        parts += ["<h2>Deployment</h2>", _deployment(metrics["deployment"])]
    parts += [
        "<h2>Stage times (s)</h2><p class='note'>Wall time of each stage in the last invocation: a resumed "
        "run counts only what it redid.</p>",
        _table(["Stage", "Seconds"],
               [[stage, f"{seconds:.1f}"] for stage, seconds in metrics["stage_seconds"].items()]),
        "<h2>Settings</h2><p class='note'>Those that differ from kdistill's defaults; every setting is in "
        "config.yaml.</p><div class='settings'>"
        + "".join(f"<div>{html.escape(key)} = {_text(value)}</div>" for key, value in _changed(config)) + "</div>",
        "</body></html>"]
    return "\n".join(parts)


def write_html_report(out: str, metrics: dict, config: dict, val, classes: list[str], logits: dict, log) -> None:
    """OUT/report.html from metrics.json's content, the val split (SplitData) and each model's val
    logits (kind -> (N, classes) tensor, the teacher first); reads the curves report.md shows."""
    started = time.perf_counter()
    probabilities = {kind: values.float().softmax(1).numpy() for kind, values in logits.items()}
    curves = []
    for name in ("loss.png", "accuracy.png"):
        with open(os.path.join(out, name), "rb") as f:
            curves.append(f.read())
    path = RunFolder(out).html_report
    atomic_write_text(path, page(metrics, config, val, classes, probabilities, curves))
    log(f"report: {path} written in {time.perf_counter() - started:.1f} s")
