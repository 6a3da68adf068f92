"""A schedule counted in optimizer steps: each model's epochs follow from the data's size."""
from __future__ import annotations

import dataclasses
import math

from .errors import KdistillError


def resolve_steps(cfg, train_images: int, transfer_images: int):
    """cfg (a Config) with each model's epochs set from its steps, where > 0: the fewest whole epochs reaching them
    on its training images (the distilled student's include the transfer set; the baseline's are
    set apart, by baseline_part). Refuses, naming the setting, a warmup_epochs that the resolved epochs don't exceed."""
    def resolved(name: str, part, images: int):
        if not part.steps or part.epochs == 0:
            return part
        epochs = math.ceil(part.steps / math.ceil(images / part.batch_size))
        if part.warmup_epochs >= epochs:
            raise KdistillError(f"setting {name}.warmup_epochs must be below the {epochs} epochs that {name}.steps="
                                f"{part.steps} makes on {images} training images, got {part.warmup_epochs}")
        return dataclasses.replace(part, epochs=epochs)

    ensemble = [dict(changes) for changes in cfg.ensemble]
    for position, (changes, member) in enumerate(zip(ensemble, list(cfg.teachers().values())[1:])):
        if {"steps", "batch_size", "epochs"} & set(changes):  # else it inherits the teacher's resolved epochs
            changes["epochs"] = resolved(f"ensemble[{position}]", member, train_images).epochs
    return dataclasses.replace(cfg, teacher=resolved("teacher", cfg.teacher, train_images), ensemble=ensemble,
                               student=resolved("student", cfg.student, train_images + transfer_images))


def baseline_part(student, labelled_images: int):
    """The baseline's training settings: the student's, and where steps are set, at least as many
    optimizer steps on its own training batches (of its labelled_images; without the transfer set
    the teacher labels for the student, so more epochs): it gets the student's training budget, not
    the fraction of it that the student's epoch count would give it."""
    if not student.steps or student.epochs == 0:
        return student
    return dataclasses.replace(student, epochs=math.ceil(student.steps / math.ceil(labelled_images /
                                                                                   student.batch_size)))
