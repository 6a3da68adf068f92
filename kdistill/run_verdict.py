"""The one sentence a report opens with: what the distilled student reached, against its teacher
and against the same student without a teacher (with the paired test's word on it), and what the
model a user would deploy costs."""
from __future__ import annotations

from .significance import verdict


def _accuracy(metrics: dict, kind: str) -> tuple[float, str]:
    """(best val accuracy, its description): with seeds the mean over them, else the one epoch."""
    summary = metrics.get("summary")
    if summary and kind in summary:
        mean = summary[kind]["best_val_acc"]
        return mean["mean"], f"{mean['mean']:.2%} ± {mean['std']:.2%} over {len(summary['seeds'])} seeds"
    model = metrics["models"][kind]
    return model["best_val_acc"], f"{model['best_val_acc']:.2%} (epoch {model['best_epoch']})"


# The deployment table's rows of the student a user would deploy, the first one present.
DEPLOYED_ROWS = ("student_onnx_int8", "student_onnx_fp32")


def deployed_row(metrics: dict) -> tuple[str, dict] | None:
    """(name, row) of the deployed student in metrics.json's deployment table; None without one."""
    rows = metrics.get("deployment") or {}
    return next(((name, rows[name]) for name in DEPLOYED_ROWS if name in rows), None)


def _deployed(metrics: dict) -> str:
    found = deployed_row(metrics)
    if found:
        name, row = found
        what = {"student_onnx_int8": "as int8 ONNX", "student_onnx_fp32": "as ONNX"}[name]
        return (f"; deployed {what} it is {row['size_mb']:.1f} MiB and takes {row['latency_ms_b1']:.2f} ms per "
                f"image on this CPU ({row['threads']} threads)")
    student = metrics["models"]["student"]
    return f"; it is {student['size_mb']:.1f} MiB with {student['params'] / 1e6:.1f}M parameters"


def run_verdict(metrics: dict) -> str:
    models = metrics["models"]
    student, student_text = _accuracy(metrics, "student")
    parts = [f"The distilled student ({models['student']['arch']}) reaches {student_text} val accuracy"]
    if "teacher" in models:
        teacher, _ = _accuracy(metrics, "teacher")
        gap = (teacher - student) * 100
        parts.append(f", {abs(gap):.1f} points {'under' if gap > 0 else 'over'} its teacher ({teacher:.2%})")
    if "baseline" in models:
        baseline, _ = _accuracy(metrics, "baseline")
        test = metrics.get("mcnemar") or (metrics.get("summary") or {}).get("mcnemar", {}).get("pooled")
        word = f" (McNemar p = {test['p_value']:.2g}: {verdict(test)})" if test else ""
        parts.append(f" and {(student - baseline) * 100:+.1f} points against the same student without a teacher"
                     f"{word}")
    return "".join(parts) + _deployed(metrics) + "."
