"""Projector Ensemble Feature Distillation: Chen et al., "Improved Feature Distillation via
Projector Ensemble", NeurIPS 2022.

The student's penultimate features go through several linear projectors, each followed by a ReLU,
whose outputs are averaged; the average is aligned with the teacher's penultimate features by
direction (cosine similarity), not magnitude:

    loss = CE(z_s, y) + pefd,   pefd = weight * mean_images(1 - cos(mean_k ReLU(W_k f_s + b_k), f_t))

as in the authors' code (github.com/chenyd7/PEFD, helper/loops.py, distill "ours": three
projectors, beta = 25 with CE weight 1 and no KD term, for CIFAR-100 and for ResNet-34 -> ResNet-18
on ImageNet). distill.temperature and distill.alpha are unused. A conv map given as the feature
layer is global-average-pooled first, as avgpool does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..settings import setting
from .base import LayerPairDistiller


def feature_vectors(features: torch.Tensor) -> torch.Tensor:
    """(B, C): avgpool's (B, C, 1, 1), a conv map's mean over positions, or (B, C) as it is."""
    return features.flatten(2).mean(2) if features.dim() > 2 else features


class PEFD(LayerPairDistiller):
    @dataclass
    class Settings:
        student_layer: str = setting("avgpool", "student module whose output is projected (the penultimate "
                                                "features)")
        teacher_layer: str = setting("avgpool", "teacher module whose output the projection is aligned with")
        projectors: int = setting(3, "linear projectors in the ensemble (paper: 3)", ge=1)
        weight: float = setting(25.0, "weight of the 1 - cosine term (paper: 25)", ge=0)

    @staticmethod
    def problems(settings) -> list[tuple[str, str]]:
        return LayerPairDistiller.layer_problems(settings)

    def build(self, context):
        student_probe, teacher_probe = context.student_probe, context.teacher_probe
        student_dim = student_probe[self.settings.student_layer].shape[1]
        teacher_dim = teacher_probe[self.settings.teacher_layer].shape[1]
        self.ensemble = nn.ModuleList(nn.Linear(student_dim, teacher_dim)
                                      for _ in range(self.settings.projectors))

    def forward(self, step):
        student, labels, teacher = step.student, step.labels, step.teacher
        features = feature_vectors(student.features[self.settings.student_layer])
        projected = torch.stack([F.relu(projector(features)) for projector in self.ensemble]).mean(0)
        target = feature_vectors(teacher.features[self.settings.teacher_layer])
        pefd = self.settings.weight * (1 - F.cosine_similarity(projected, target, dim=1)).mean()
        ce = self.cross_entropy(student.logits, labels)
        return {"loss": ce + pefd, "ce": ce, "pefd": pefd}
