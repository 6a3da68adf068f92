"""Hinton et al. (2015) logit distillation, as in both seed reports:

    loss = alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE(z_s, y)

with label smoothing, where set, in CE only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import LogitDistiller


def kd_term(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(z_t / T) || softmax(z_s / T)), averaged over the batch."""
    t = temperature
    # KL from log-probabilities on both sides (log_target) is exact where a probability underflows.
    return F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                    reduction="batchmean", log_target=True) * (t * t)


class KD(LogitDistiller):
    def logit_terms(self, student_logits, labels, teacher_logits=None):
        kd = kd_term(student_logits, teacher_logits, self.temperature)
        ce = self.cross_entropy(student_logits, labels)
        return {"loss": self.alpha * kd + (1 - self.alpha) * ce, "kd": kd, "ce": ce}
