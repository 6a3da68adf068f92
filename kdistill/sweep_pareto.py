"""Which student to deploy: each sweep point's distilled student by val accuracy against its deployed
size and CPU latency, with the Pareto front (no other point is at least as accurate, as small and as
fast, and better in one) marked; sweep-pareto.png and the sweep table's "Pareto" column.

The deployed form is the int8 ONNX student where the run measured it (deploy_check), else the fp32
ONNX one, else the PyTorch student on the run's device (no deployment table: deploy_check=false).
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .fileio import atomic_write  # noqa: E402
from .report import plot_label  # noqa: E402
from .run_verdict import deployed_row  # noqa: E402

FORMS = {"student_onnx_int8": "int8 ONNX Runtime, CPU", "student_onnx_fp32": "fp32 ONNX Runtime, CPU"}


def deployed(metrics: dict) -> dict:
    """size_mb, latency_ms (batch 1) and how: of the form of the distilled student a user deploys."""
    found = deployed_row(metrics)
    if found:
        name, row = found
        return {"size_mb": row["size_mb"], "latency_ms": row["latency_ms_b1"], "form": FORMS[name]}
    student = metrics["models"]["student"]
    return {"size_mb": student["size_mb"], "latency_ms": student["latency_ms"],
            "form": f"PyTorch on {metrics.get('device', 'its device')}"}


def pareto_front(points: list[tuple[float, float, float]]) -> list[bool]:
    """For (accuracy, size, latency) triples: whether each is on the front (higher accuracy, lower
    size and latency are better; equal triples are both on it)."""
    def dominates(a, b) -> bool:
        at_least = a[0] >= b[0] and a[1] <= b[1] and a[2] <= b[2]
        return at_least and (a[0] > b[0] or a[1] < b[1] or a[2] < b[2])
    return [not any(dominates(other, point) for other in points) for point in points]


def mark_front(rows: list[dict]) -> None:
    """Set row["pareto"] on every finished row (rows with "deployed")."""
    finished = [row for row in rows if "deployed" in row]
    front = pareto_front([(row["student"]["best_val_acc"], row["deployed"]["size_mb"],
                           row["deployed"]["latency_ms"]) for row in finished])
    for row, on_front in zip(finished, front):
        row["pareto"] = on_front


def plot(path: str, rows: list[dict]) -> None:
    finished = [row for row in rows if "deployed" in row]
    forms = sorted({row["deployed"]["form"] for row in finished})
    figure, panels = plt.subplots(1, 2, figsize=(11, 4.4), layout="constrained")
    for panel, (key, label) in zip(panels, (("size_mb", "deployed size (MiB)"),
                                            ("latency_ms", "CPU latency at batch 1 (ms)"))):
        front = sorted((row for row in finished if row["pareto"]), key=lambda row: row["deployed"][key])
        panel.plot([row["deployed"][key] for row in front], [row["student"]["best_val_acc"] * 100 for row in front],
                   "-", color="tab:red", alpha=0.5, zorder=1)
        for row in finished:
            x, y = row["deployed"][key], row["student"]["best_val_acc"] * 100
            panel.scatter(x, y, s=40, zorder=2, color="tab:red" if row["pareto"] else "tab:gray")
            panel.annotate(plot_label(row["point"]), (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
        panel.set_xscale("log")
        panel.set_xlabel(label)
        panel.set_ylabel("distilled student's best val acc (%)")
        panel.grid(alpha=0.3, which="both")
    figure.suptitle(f"Which student to deploy (red: the Pareto front; {'; '.join(forms)})", fontsize=10)
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110), "plot")
    plt.close(figure)
