"""Relational Knowledge Distillation (Park, Kim, Lu and Cho, CVPR 2019): the student keeps the
teacher's relations between the samples of a batch, not their features.

    distance = smooth_l1(d_s / mean(d_s), d_t / mean(d_t))     d: pairwise Euclidean distances
    angle    = smooth_l1(a_s, a_t)                             a[i,j,k] = cos of the angle at e_i
                                                               between e_j and e_k
    loss = CE + distance_weight * distance + angle_weight * angle

on penultimate features flattened to (B, C). As in the reference implementations (mdistiller,
RepDistiller): the mean distance is over the pairs of distinct samples, the smooth L1 is averaged
over all B^2 pairs and all B^3 triplets, and degenerate triplets (j = i or k = i) count with a
cosine of 0 on both sides.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..settings import setting
from .base import LayerPairDistiller

SQUARED_DISTANCE_FLOOR = 1e-12  # the references' eps: sqrt stays differentiable for equal samples


def pairwise_distances(features: torch.Tensor) -> torch.Tensor:
    """(B, B) Euclidean distances, 0 on the diagonal."""
    squares = features.pow(2).sum(1)
    squared = (squares[:, None] + squares[None, :] - 2 * features @ features.t()).clamp(min=SQUARED_DISTANCE_FLOOR)
    off_diagonal = ~torch.eye(len(features), dtype=torch.bool, device=features.device)
    return squared.sqrt() * off_diagonal


def triplet_cosines(features: torch.Tensor) -> torch.Tensor:
    """(B, B, B): [i, j, k] is the cosine of the angle at sample i between samples j and k."""
    directions = F.normalize(features[None, :, :] - features[:, None, :], dim=2)  # [i, j]: from i to j
    return directions @ directions.transpose(1, 2)


class RKD(LayerPairDistiller):
    @dataclass
    class Settings:
        student_layer: str = setting("avgpool", "student module whose output (flattened) holds the relations")
        teacher_layer: str = setting("avgpool", "teacher module whose output (flattened) holds the relations")
        distance_weight: float = setting(25.0, "weight of the distance-wise term (paper: 25)", ge=0)
        angle_weight: float = setting(50.0, "weight of the angle-wise term (paper: 50)", ge=0)

    @staticmethod
    def problems(settings) -> list[tuple[str, str]]:
        return LayerPairDistiller.layer_problems(settings)

    def forward(self, step):
        student, labels, teacher = step.student, step.labels, step.teacher
        ce = self.cross_entropy(student.logits, labels)
        student_features = student.features[self.settings.student_layer].flatten(1)
        teacher_features = teacher.features[self.settings.teacher_layer].flatten(1)
        if len(student_features) < 2:  # one sample (a last, partial batch) has no relations
            distance = angle = student_features.sum() * 0.0
        else:
            pairs = len(student_features) * (len(student_features) - 1)
            student_distances = pairwise_distances(student_features)
            teacher_distances = pairwise_distances(teacher_features)
            distance = F.smooth_l1_loss(student_distances / (student_distances.sum() / pairs),
                                        teacher_distances / (teacher_distances.sum() / pairs))
            angle = F.smooth_l1_loss(triplet_cosines(student_features), triplet_cosines(teacher_features))
        loss = ce + self.settings.distance_weight * distance + self.settings.angle_weight * angle
        return {"loss": loss, "ce": ce, "distance": distance, "angle": angle}
