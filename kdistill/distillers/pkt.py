"""Probabilistic Knowledge Transfer (Passalis and Tefas, ECCV 2018): the student matches the
teacher's conditional probabilities of one sample given another, from a cosine-similarity kernel
over the batch:

    K[i, j] = (cos(f_i, f_j) + 1) / 2          p[i, j] = K[i, j] / sum_j K[i, j]
    pkt = mean over i, j of p_t[i, j] * log((p_t[i, j] + eps) / (p_s[i, j] + eps)),  eps = 1e-7
    loss = CE + weight * pkt

on penultimate features flattened to (B, C), as in the authors' code (passalis/probabilistic_kt),
which RepDistiller and mdistiller copy: a KL averaged over all B^2 entries, hence the large weight.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..settings import setting
from .base import LayerPairDistiller

EPS = 1e-7  # the reference's: in the norm's denominator and on both sides of the log's ratio


def conditional_probabilities(features: torch.Tensor) -> torch.Tensor:
    """(B, B): row i holds p(j | i) from the cosine kernel mapped to [0, 1]."""
    unit = features / (features.norm(dim=1, keepdim=True) + EPS)
    kernel = (unit @ unit.t() + 1.0) / 2.0
    return kernel / kernel.sum(1, keepdim=True)


class PKT(LayerPairDistiller):
    @dataclass
    class Settings:
        student_layer: str = setting("avgpool", "student module whose output (flattened) is transferred")
        teacher_layer: str = setting("avgpool", "teacher module whose output (flattened) is transferred")
        weight: float = setting(30000.0, "weight of the PKT term (RepDistiller and mdistiller: 30000)", ge=0)

    @staticmethod
    def problems(settings) -> list[tuple[str, str]]:
        return LayerPairDistiller.layer_problems(settings)

    def forward(self, step):
        student, labels, teacher = step.student, step.labels, step.teacher
        ce = self.cross_entropy(student.logits, labels)
        student_p = conditional_probabilities(student.features[self.settings.student_layer].flatten(1))
        teacher_p = conditional_probabilities(teacher.features[self.settings.teacher_layer].flatten(1))
        pkt = (teacher_p * torch.log((teacher_p + EPS) / (student_p + EPS))).mean()
        return {"loss": ce + self.settings.weight * pkt, "ce": ce, "pkt": pkt}
