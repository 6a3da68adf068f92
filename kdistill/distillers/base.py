from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Distiller(nn.Module):
    """Interface: forward(student_logits, labels, teacher_logits) -> {"loss": ..., term: ...}."""

    needs_teacher = True

    def forward(self, student_logits: torch.Tensor, labels: torch.Tensor,
                teacher_logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class CrossEntropy(Distiller):
    """No teacher: the plain supervised objective, used for the baseline student."""

    needs_teacher = False

    def forward(self, student_logits, labels, teacher_logits=None):
        ce = F.cross_entropy(student_logits, labels)
        return {"loss": ce, "ce": ce}
