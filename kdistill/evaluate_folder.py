"""`kdistill evaluate`: a finished run's student (and its teacher, where the run folder has it) on
another labelled folder, FOLDER/<class>/...: accuracy, top-k accuracy, per-class precision, recall
and F1 (scikit-learn), and the confusion matrix, printed and written as JSON."""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from .data import list_images, to_unit_range
from .errors import KdistillError, printable
from .fileio import atomic_write_text
from .run_folder import RunFolder
from .predict import Reading, check_output, folder_logits, load_student, run_max_pixels, student_path


def labelled_files(data_dir: str, classes: list[str]) -> tuple[list[str], np.ndarray, list]:
    """(files relative to data_dir, their labels as the student's class indices, rejected entries)."""
    if not os.path.isdir(data_dir):
        raise KdistillError(f"labelled folder {data_dir} does not exist")
    folders = sorted(name for name in os.listdir(data_dir)
                     if not name.startswith(".") and os.path.isdir(os.path.join(data_dir, name)))
    if not folders:
        raise KdistillError(f"{data_dir} has no class folders: expected {data_dir}/<class>/<images>")
    unknown = [name for name in folders if name not in classes]
    if unknown:
        raise KdistillError(f"{data_dir} has class folders the student does not know: "
                            f"{', '.join(map(printable, unknown[:5]))} (the student's classes: "
                            f"{', '.join(map(printable, classes))})")
    files, labels, rejected = [], [], []
    for name in folders:
        found, bad = list_images(os.path.join(data_dir, name))
        files += [os.path.join(name, f) for f in found]
        labels += [classes.index(name)] * len(found)
        rejected += bad
    return files, np.array(labels), rejected


def scores(logits: torch.Tensor, labels: np.ndarray, classes: list[str], top_k: int) -> dict:
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    predicted = logits.argmax(1).numpy()
    in_top_k = (logits.topk(top_k, dim=1).indices == torch.from_numpy(labels)[:, None]).any(1)
    present = sorted(set(labels.tolist()))
    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted, labels=present,
                                                                     zero_division=0)
    return {"images": len(labels), "accuracy": float((predicted == labels).mean()),
            f"top{top_k}_accuracy": float(in_top_k.float().mean()),
            "per_class": [{"class": classes[c], "images": int(n), "precision": float(p), "recall": float(r),
                           "f1": float(f)} for c, p, r, f, n in zip(present, precision, recall, f1, support)],
            "confusion": {"classes": [classes[c] for c in present],
                          "matrix": confusion_matrix(labels, predicted, labels=present).tolist()}}


def _teacher_forward(run_dir: str, classes: list[str], trust_arch: bool, device, log):
    """The run's teacher as a forward on uint8 images, or None (no teacher file, or untrusted)."""
    from .deploy import run_teacher

    folder = RunFolder(run_dir)
    if not os.path.exists(folder.config):
        return None
    cfg = folder.settings()
    teacher = run_teacher(run_dir, cfg, classes, trust_arch, log)
    if teacher is None:
        return None

    def forward(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return teacher(to_unit_range(images)).float()
    return forward


def evaluate_folder(run: str, data_dir: str, output: str, top_k: int = 5, batch_size: int = 64,
                    device: str = "auto", trust_arch: bool = False, log=print) -> dict:
    """The scores of the student (and the run's teacher) on data_dir; written to output as JSON."""
    run_dir, model_path = student_path(run)
    check_output(output)
    forward, description = load_student(model_path, device, trust_arch)
    classes = description["classes"]
    top_k = max(1, min(top_k, len(classes)))
    files, labels, rejected = labelled_files(data_dir, classes)
    max_pixels = run_max_pixels(run_dir)
    models = {"student": forward}
    if os.path.isdir(run):
        teacher = _teacher_forward(run_dir, classes, trust_arch, device, log)
        if teacher is not None:
            models["teacher"] = teacher
    results = {"data": os.path.abspath(data_dir), "run": os.path.abspath(run), "top_k": top_k, "models": {}}
    for name, model_forward in models.items():
        kept, logits = folder_logits(data_dir, files, model_forward, description["image_size"], max_pixels,
                                     Reading(batch_size, log=log), list(rejected) if name == "student" else [])
        position = {f: i for i, f in enumerate(files)}
        kept_labels = labels[[position[f] for f in kept]]
        results["models"][name] = scores(logits, kept_labels, classes, top_k)
    atomic_write_text(output, json.dumps(results, indent=2))
    return results


def summary_lines(results: dict) -> list[str]:
    top = f"top{results['top_k']}_accuracy"
    lines = []
    for name, result in results["models"].items():
        lines.append(f"{name}: accuracy {result['accuracy']:.2%}, top-{results['top_k']} {result[top]:.2%} on "
                     f"{result['images']} images")
        worst = sorted(result["per_class"], key=lambda row: row["f1"])[:3]
        lines.append("  lowest F1: " + ", ".join(
            f"{printable(row['class'])} {row['f1']:.2f} (precision {row['precision']:.2f}, recall {row['recall']:.2f})"
            for row in worst))
    return lines
