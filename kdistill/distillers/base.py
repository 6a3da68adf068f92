from __future__ import annotations

import dataclasses
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, fields
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..settings import bound_problem


@dataclass
class Outputs:
    """What a model said about a batch: its logits and the features a method asked for, by module
    path (the output of that module, taken by a forward hook; see kdistill/features.py)."""

    logits: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)


def detached(outputs: Outputs) -> Outputs:
    """outputs cut from the graph that produced them."""
    return Outputs(outputs.logits.detach(), {path: value.detach() for path, value in outputs.features.items()})


@dataclass
class Step:
    """One training batch, as a method sees it. Tests build one from tensors:
    Step(Outputs(student_logits), labels, Outputs(teacher_logits))."""

    student: Outputs
    # Class indices (B,), -1 for an unlabelled image (a transfer-set image: only the teacher's terms
    # apply to it), or class probabilities (B, classes) for mixed images.
    labels: torch.Tensor
    teacher: Outputs | None = None  # None where the method reads no teacher
    index: torch.Tensor | None = None  # the batch's sample indices in the training set (memory banks)
    inputs: torch.Tensor | None = None  # the batch the student saw, for a model the method runs itself
    epoch: int = 1  # the epoch being trained, 1-based
    epochs: int = 1  # the run's number of epochs


@dataclass
class BuildContext:
    """What a method's build() reads, once before training."""

    # Features (module path -> tensor, batch dimension first) of a forward pass on two training images.
    student_probe: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_probe: dict[str, torch.Tensor] = field(default_factory=dict)
    num_samples: int = 0  # training samples
    # arch -> a new model for this task from scratch, placed like the student and standardizing its
    # input alike ("student": the student's architecture); None where the caller has none to give.
    make_model: Callable[[str], nn.Module] | None = None
    # The student's precision (bf16 autocast where it trains in bf16), for a model the method runs itself.
    autocast: Callable[[], AbstractContextManager] = nullcontext


@dataclass
class NoSettings:
    """A method without hyperparameters of its own."""


class Distiller(nn.Module):
    """Interface: forward(step: Step) -> {"loss": ..., term: ...}: the batch's loss terms, "loss" the
    one optimized.

    A method declares what it reads, and that decides how the signal is served:
      needs_teacher             the teacher's Outputs (else step.teacher is None)
      student_features()        module paths of the student whose outputs it reads
      teacher_features()        module paths of the teacher whose outputs it reads (served online)
      needs_index               the batch's sample indices (step.index)
    Every step also holds the batch the student saw (step.inputs, for a model the method runs
    itself, e.g. DML's peer) and the epoch. Trainable parts (regressors, projectors, memory banks,
    a peer) are created in build(context), called once before training; they train and are
    checkpointed with the student, and are not part of the exported student.

    Hyperparameters of a method live in its `Settings` dataclass (fields declared with
    kdistill.settings.setting, defaults from its paper); they appear in config.yaml as
    distill.<method>.<name> and are checked by problems().
    """

    needs_teacher = True
    needs_index = False
    Settings: type = NoSettings

    def __init__(self, *, temperature: float = 4.0, alpha: float = 0.5, label_smoothing: float = 0.0,
                 settings=None):
        # Keyword-only: a positional CrossEntropy(0.1) once set the temperature, not the smoothing.
        super().__init__()
        self.settings = settings if settings is not None else self.Settings()
        self.temperature = temperature
        self.alpha = alpha
        self.label_smoothing = label_smoothing

    def __call__(self, step: Step) -> dict[str, torch.Tensor]:
        # The teacher is fixed: no method's loss sends it gradients, whatever produced its outputs.
        if step.teacher is not None:
            step = dataclasses.replace(step, teacher=detached(step.teacher))
        return super().__call__(step)

    @staticmethod
    def problems(settings) -> list[tuple[str, str]]:
        """(setting name, what is wrong) for each invalid value that the settings' declared bounds
        (setting(..., ge=0)) cannot say: module paths, values that depend on each other."""
        return []

    @classmethod
    def settings_problems(cls, settings) -> list[tuple[str, str]]:
        """Every problem of this method's settings: their declared bounds, then problems()."""
        found = [(f.name, bound_problem(getattr(settings, f.name), f)) for f in fields(settings)]
        return [(name, problem) for name, problem in found if problem] + cls.problems(settings)

    def student_features(self) -> tuple[str, ...]:
        return ()

    def teacher_features(self) -> tuple[str, ...]:
        return ()

    def build(self, context: BuildContext) -> None:
        """Create trainable parts from what the context says (the probe's features, the number of
        training samples, a model factory)."""

    def cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy against the labels, with label smoothing where set, over the labelled
        images of the batch only (zero when it has none)."""
        if labels.dim() == 2:  # mixed: class probabilities
            return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        labelled = labels >= 0
        if not labelled.any():
            return logits.sum() * 0.0  # keeps the graph, so a backward pass still works
        return F.cross_entropy(logits[labelled], labels[labelled], label_smoothing=self.label_smoothing)

    @staticmethod
    def hard_targets(labels: torch.Tensor, teacher_logits: torch.Tensor | None = None) -> torch.Tensor:
        """Class indices for methods that split by the true class: the label, the most probable
        class of a mixed label, or, for an unlabelled image, the teacher's top class."""
        if labels.dim() == 2:
            return labels.argmax(1)
        if teacher_logits is None:
            return labels
        return torch.where(labels >= 0, labels, teacher_logits.argmax(1))

    def forward(self, step: Step) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def path_problems(name: str, paths: list[str]) -> list[tuple[str, str]]:
    """A module path is a non-empty dotted name without spaces, e.g. layer3 or layer4.1.conv2."""
    if not paths:
        return [(name, "must name at least one module, e.g. layer3")]
    bad = [path for path in paths if not path or path != "".join(path.split())]
    return [(name, f"must be module paths without spaces, e.g. layer3, got {bad[0]!r}")] if bad else []


class LayerPairDistiller(Distiller):
    """A method that reads one student module and one teacher module, named by its settings
    student_layer and teacher_layer."""

    @staticmethod
    def layer_problems(settings) -> list[tuple[str, str]]:
        return (path_problems("student_layer", [settings.student_layer])
                + path_problems("teacher_layer", [settings.teacher_layer]))

    def student_features(self) -> tuple[str, ...]:
        return (self.settings.student_layer,)

    def teacher_features(self) -> tuple[str, ...]:
        return (self.settings.teacher_layer,)


class LogitDistiller(Distiller):
    """A method that reads logits only: it writes logit_terms(student_logits, labels, teacher_logits)."""

    def forward(self, step: Step) -> dict[str, torch.Tensor]:
        return self.logit_terms(step.student.logits, step.labels, None if step.teacher is None else step.teacher.logits)

    def logit_terms(self, student_logits: torch.Tensor, labels: torch.Tensor,
                    teacher_logits: torch.Tensor | None) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class CrossEntropy(LogitDistiller):
    """No teacher: the plain supervised objective, used for the teacher and the baseline student."""

    needs_teacher = False

    def logit_terms(self, student_logits, labels, teacher_logits=None):
        ce = self.cross_entropy(student_logits, labels)
        return {"loss": ce, "ce": ce}
