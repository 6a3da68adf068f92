"""What a finished run tells its user is going wrong: each check a rule on the run's numbers, each
warning one sentence with what to do. They go to the log, metrics.json ("warnings") and the reports.
"""
from __future__ import annotations

import math

import numpy as np

from .models import weights_source

# A rule of thumb: below this many training images in a class, a network trained from scratch
# rarely gets near a pretrained teacher (hymenoptera has about 120 per class, a few hundred in all).
SMALL_PER_CLASS = 200
# A val loss this many times above both its lowest value and chance's (ln classes) means a divergence.
DIVERGED_FACTOR = 10


def small_data(train_labels: np.ndarray, classes: list[str], student: dict) -> list[str]:
    if weights_source(student["arch"], student["weights"]) != "from scratch":
        return []
    counts = np.bincount(train_labels[train_labels >= 0], minlength=len(classes))
    fewest = int(counts.argmin())
    if counts[fewest] >= SMALL_PER_CLASS:
        return []
    return [f"the data is small for a student trained from scratch ({int(counts[fewest])} training images in class "
            f"{classes[fewest]!r}, under {SMALL_PER_CLASS}): start the student from pretrained weights "
            f"(student.weights=imagenet, or a kdistill.zoo model), add augmentation (augment=rrc_flip) and "
            f"unlabelled images for the teacher to label (distill.unlabeled)"]


def majority_class(models: dict, val_labels: np.ndarray) -> list[str]:
    """A model no better than always answering the largest val class (within one image)."""
    if not len(val_labels):
        return []
    counts = np.bincount(val_labels)
    rate = counts.max() / len(val_labels)
    return [f"{name} ends at the majority-class rate (best val acc {model['best_val_acc']:.2%}; always answering "
            f"the largest class scores {rate:.2%}): it learned nothing usable; lower its lr, train longer, or check "
            f"the labels" for name, model in models.items()
            if model["best_val_acc"] <= rate + 1 / len(val_labels)]


def diverged(histories: dict[str, list[dict]], num_classes: int) -> list[str]:
    warnings = []
    for name, history in histories.items():
        losses = [row["val_loss"] for row in history if math.isfinite(row.get("val_loss", math.nan))]
        if len(losses) < 2:
            continue
        highest, lowest = max(losses), min(losses)
        if highest > DIVERGED_FACTOR * max(lowest, math.log(num_classes)):
            epoch = history[losses.index(highest)]["epoch"]
            warnings.append(f"{name}'s val loss diverged: {highest:,.4g} at epoch {epoch}, against {lowest:.3g} at "
                            f"its lowest; lower its lr or raise its warmup_epochs")
    return warnings


def teacher_against_student(models: dict) -> list[str]:
    teacher, student = models.get("teacher"), models.get("student")
    if not teacher or not student:
        return []
    warnings = []
    if teacher["params"] <= student["params"] and teacher["gflops"] <= student["gflops"]:
        warnings.append(f"the teacher ({teacher['params'] / 1e6:.1f}M parameters, {teacher['gflops']:.2f} GFLOPs) "
                        f"is no larger than its student ({student['params'] / 1e6:.1f}M, {student['gflops']:.2f} "
                        f"GFLOPs): distillation exists to make a model smaller; deploy the teacher, or pick a smaller "
                        f"student (student.arch)")
    if teacher["best_val_acc"] < student["best_val_acc"]:
        warnings.append(f"the teacher ({teacher['best_val_acc']:.2%} val) is less accurate than its student "
                        f"({student['best_val_acc']:.2%}): a stronger teacher (pretrained, trained longer) is "
                        f"likely to teach more")
    return warnings


def run_warnings(metrics: dict, histories: dict[str, list[dict]], train_labels: np.ndarray, val_labels: np.ndarray,
                 classes: list[str], student: dict) -> list[str]:
    """Every warning of a finished run, in the order a user should read them."""
    return [*small_data(train_labels, classes, student), *majority_class(metrics["models"], val_labels),
            *diverged(histories, len(classes)), *teacher_against_student(metrics["models"])]
