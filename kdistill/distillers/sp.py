"""Similarity-Preserving Knowledge Distillation (Tung and Mori, ICCV 2019): inputs that the teacher
finds alike (or unlike) should be alike (or unlike) for the student too. From each network's
activation map A (B, ...) flattened to Q (B, n):

    G = row-normalized Q Q^T  (each row divided by its L2 norm)
    sp = ||G_t - G_s||_F^2 / B^2
    loss = CE + weight * sp

Only (B, B) matrices are compared, so student and teacher maps may differ in channels and
spatial size. The paper takes the last convolutional stage's output; so do RepDistiller and
mdistiller for ResNets (torchvision: layer4).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..settings import setting
from .base import LayerPairDistiller


def similarity_matrix(features: torch.Tensor) -> torch.Tensor:
    flat = features.flatten(1)
    return F.normalize(flat @ flat.t(), dim=1)


class SP(LayerPairDistiller):
    @dataclass
    class Settings:
        student_layer: str = setting("layer4", "student module whose activations' similarities are kept")
        teacher_layer: str = setting("layer4", "teacher module whose activations' similarities are kept")
        weight: float = setting(3000.0, "weight of the similarity term (paper's gamma and mdistiller: 3000)", ge=0)

    @staticmethod
    def problems(settings) -> list[tuple[str, str]]:
        return LayerPairDistiller.layer_problems(settings)

    def forward(self, step):
        student, labels, teacher = step.student, step.labels, step.teacher
        ce = self.cross_entropy(student.logits, labels)
        student_similarity = similarity_matrix(student.features[self.settings.student_layer])
        teacher_similarity = similarity_matrix(teacher.features[self.settings.teacher_layer])
        sp = (teacher_similarity - student_similarity).pow(2).sum() / len(student_similarity) ** 2
        return {"loss": ce + self.settings.weight * sp, "ce": ce, "sp": sp}
