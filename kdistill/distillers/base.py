from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Distiller(nn.Module):
    """Interface: forward(student_logits, labels, teacher_logits) -> {"loss": ..., term: ...}.

    label_smoothing applies to the cross-entropy against the labels (see cross_entropy), never to
    the teacher's term.
    """

    needs_teacher = True

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)

    def forward(self, student_logits: torch.Tensor, labels: torch.Tensor,
                teacher_logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class CrossEntropy(Distiller):
    """No teacher: the plain supervised objective, used for the teacher and the baseline student."""

    needs_teacher = False

    def forward(self, student_logits, labels, teacher_logits=None):
        ce = self.cross_entropy(student_logits, labels)
        return {"loss": ce, "ce": ce}
