"""Decoupled Knowledge Distillation (Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022).

KD's KL splits into a target-class term and a non-target term, weighted separately:

    TCKD = T^2 * KL(b_teacher || b_student),  b = (p_target, 1 - p_target) of softmax(z / T)
    NCKD = T^2 * KL(q_teacher || q_student),  q = softmax(z / T) over the non-target classes only
    loss = CE + min(epoch / warmup, 1) * (tckd_weight * TCKD + nckd_weight * NCKD)
    warmup = max(1, round(warmup_fraction * epochs))

(KD's KL = TCKD + (1 - p_target of the teacher) * NCKD per image.) The KD terms ramp up linearly,
once per epoch (1-based), as in the reference implementation (megvii-research/mdistiller,
mdistiller/distillers/DKD.py). The reference counts the warmup in epochs (20 of its CIFAR-100
recipe's 240); here it is that share of the run: 20 epochs warm up over 2, where a fixed 20 would
leave an 8-epoch run at 8/20 of the weight. A warmup that rounds to 1 epoch or less is none: epoch 1
already has full weight, as with the reference's 1-epoch ImageNet warmup (with the default share:
every run under 18 epochs).

The temperature is distill.temperature: it is exactly KD's softmax temperature (both sides softened
by T, terms scaled by T^2), and its default, 4, is DKD's own default. A second temperature setting
would leave distill.temperature silently unused.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..settings import setting
from .base import LogitDistiller


def _target_and_rest(log_probs: torch.Tensor, is_target: torch.Tensor) -> torch.Tensor:
    """(B, 2) log-probabilities of the target class and of all other classes together, in log space
    so that 1 - p_target stays exact when p_target is close to 1."""
    target = log_probs.masked_fill(~is_target, float("-inf")).logsumexp(1)
    rest = log_probs.masked_fill(is_target, float("-inf")).logsumexp(1)
    return torch.stack([target, rest], dim=1)


class DKD(LogitDistiller):
    @dataclass
    class Settings:
        # Defaults: mdistiller's CIFAR-100 setting (configs/cifar100/dkd: warmup 20 of 240 epochs).
        # Its ImageNet ResNet34 -> ResNet18 config uses nckd_weight 0.5, a 1-epoch warmup and T 1.
        tckd_weight: float = setting(1.0, "weight of TCKD, the target-class term (the paper's alpha)", ge=0)
        nckd_weight: float = setting(8.0, "weight of NCKD, the non-target-class term (the paper's beta)", ge=0)
        warmup_fraction: float = setting(20 / 240, "share of the run's epochs over which the KD terms ramp up "
                                                   "linearly, rounded to whole epochs (0: none)", ge=0, le=1)

    def ramp(self, epoch: int, epochs: int) -> float:
        """The KD terms' weight in epoch (1-based) of epochs: linear up to 1 over the warmup's epochs."""
        warmup = max(1, round(self.settings.warmup_fraction * epochs))
        return min(epoch / warmup, 1.0)

    def forward(self, step):
        return self.logit_terms(step.student.logits, step.labels, step.teacher.logits,
                                self.ramp(step.epoch, step.epochs))

    def logit_terms(self, student_logits, labels, teacher_logits=None, ramp: float = 1.0):
        """ramp: the KD terms' weight (1: after the warmup)."""
        t = self.temperature
        # One-hot mask of the true class; for an unlabelled image, the teacher's top class.
        target = self.hard_targets(labels, teacher_logits)
        is_target = F.one_hot(target, student_logits.shape[1]).bool()
        student_scaled, teacher_scaled = student_logits / t, teacher_logits / t
        tckd = F.kl_div(_target_and_rest(F.log_softmax(student_scaled, 1), is_target),
                        _target_and_rest(F.log_softmax(teacher_scaled, 1), is_target),
                        reduction="batchmean", log_target=True) * (t * t)

        def non_target(logits: torch.Tensor) -> torch.Tensor:  # (B, classes - 1)
            return F.log_softmax(logits[~is_target].view(len(logits), -1), dim=1)

        nckd = F.kl_div(non_target(student_scaled), non_target(teacher_scaled), reduction="batchmean",
                        log_target=True) * (t * t)
        ce = self.cross_entropy(student_logits, labels)
        loss = ce + ramp * (self.settings.tckd_weight * tckd + self.settings.nckd_weight * nckd)
        return {"loss": loss, "ce": ce, "tckd": tckd, "nckd": nckd}
