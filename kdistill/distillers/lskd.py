"""Logit-standardized KD (Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024).

Each image's logits are z-scored, the student's and the teacher's separately, before KD's
temperature-softened KL, so the student matches the teacher's logit relations rather than their
range:

    Z(z) = (z - mean(z)) / (1e-7 + std(z))           per image, over the classes
    kd   = T^2 * KL(softmax(Z(z_t) / T) || softmax(Z(z_s) / T))     (mean over images)
    loss = ce_weight * CE + kd_weight * kd

as the reference implementation (sunshangquan/logit-standardization-KD, mdistiller/distillers/KD.py),
whose std is torch.std's unbiased one (divides by classes - 1) and whose 1e-7 is added to it.

The weights and T are LSKD's own settings, not distill.alpha / distill.temperature: the weights do
not sum to 1 (the labels get weight 0.1 beside 9 for the teacher), and T acts on z-scores, whose
spread is 1 whatever the logits' range, so a temperature tuned for raw logits does not carry over
(the paper calls it the base temperature).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..settings import setting
from .base import LogitDistiller

STD_EPS = 1e-7  # the reference's, added to the standard deviation


def standardize(logits: torch.Tensor) -> torch.Tensor:
    """Each row z-scored (a row of equal logits becomes zeros)."""
    return (logits - logits.mean(1, keepdim=True)) / (STD_EPS + logits.std(1, keepdim=True))


class LSKD(LogitDistiller):
    @dataclass
    class Settings:
        # Defaults: the reference's ImageNet ResNet34 -> ResNet18 command (README: --logit-stand
        # --base-temp 2 --kd-weight 9 on configs/imagenet/r34_r18/kd.yaml), but CE weight 0.1, that of
        # its CIFAR-100 command (the same flags on configs/cifar100/kd/*.yaml; ImageNet's is 1):
        # kdistill's runs (few classes, tens of epochs) are nearer CIFAR's.
        ce_weight: float = setting(0.1, "weight of the labels' cross-entropy", ge=0)
        kd_weight: float = setting(9.0, "weight of the KL between the standardized logits", ge=0)
        base_temperature: float = setting(2.0, "softmax temperature applied to the z-scored logits", gt=0)

    def logit_terms(self, student_logits, labels, teacher_logits=None):
        t = self.settings.base_temperature
        kd = F.kl_div(F.log_softmax(standardize(student_logits) / t, 1),
                      F.log_softmax(standardize(teacher_logits) / t, 1),
                      reduction="batchmean", log_target=True) * (t * t)
        ce = self.cross_entropy(student_logits, labels)
        loss = self.settings.ce_weight * ce + self.settings.kd_weight * kd
        return {"loss": loss, "ce": ce, "kd": kd}
