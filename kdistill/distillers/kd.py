"""Hinton et al. (2015) logit distillation, as in both seed reports:

    loss = alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE(z_s, y)

with label smoothing, where set, in CE only.
"""
from __future__ import annotations

import torch.nn.functional as F

from .base import LogitDistiller


class KD(LogitDistiller):
    def logit_terms(self, student_logits, labels, teacher_logits=None):
        t = self.temperature
        # KL from log-probabilities on both sides (log_target) is exact where a probability underflows.
        kd = F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                      reduction="batchmean", log_target=True) * (t * t)
        ce = self.cross_entropy(student_logits, labels)
        return {"loss": self.alpha * kd + (1 - self.alpha) * ce, "kd": kd, "ce": ce}
