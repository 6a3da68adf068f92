"""Attention Transfer: Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the
Performance of Convolutional Neural Networks via Attention Transfer", ICLR 2017.

The attention map of a feature map f (B, C, H, W) is the mean over channels of |f|^p, flattened
over the H*W positions and L2-normalized per image. For each (student, teacher) layer pair the
term is the mean over images and positions of the squared difference of the two maps; the pair
terms are summed:

    loss = CE(z_s, y) + at,   at = weight * sum_layers mean((Q_s / ||Q_s|| - Q_t / ||Q_t||)^2)

as in the authors' code (github.com/szagoruyko/attention-transfer, utils.at_loss, with
beta = 1000 on the groups' outputs of ResNet-18/34) and mdistiller's AT (the outputs of layer1 to
layer4, weight 1000). The paper writes the weight as beta/2 on an unsquared norm; the code's
squared mean with beta = 1000 is what its results were trained with.

A pair whose common size is 1x1 (layer4 of a ResNet on 32-pixel images) has maps of one position,
normalized to 1 in every image: its term is identically zero, and build() warns.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..settings import setting
from .base import Distiller, path_problems


def pool_to_common_size(first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two maps (B, C, H, W) at the smaller height and the smaller width of the two: the larger is
    average-pooled down (never interpolated up: no detail is invented). mdistiller does the same
    for square maps."""
    size = (min(first.shape[2], second.shape[2]), min(first.shape[3], second.shape[3]))
    return tuple(map_ if tuple(map_.shape[2:]) == size else F.adaptive_avg_pool2d(map_, size)
                 for map_ in (first, second))


def attention_map(features: torch.Tensor, p: float) -> torch.Tensor:
    """(B, H*W): the mean over channels of |f|^p, L2-normalized over the positions of each image."""
    return F.normalize(features.abs().pow(p).mean(1).flatten(1), dim=1)


class AT(Distiller):
    @dataclass
    class Settings:
        student_layers: list = setting(["layer1", "layer2", "layer3", "layer4"],
                                       "student modules whose outputs give attention maps (mdistiller: "
                                       "layer1 to layer4 of a ResNet)")
        teacher_layers: list = setting(["layer1", "layer2", "layer3", "layer4"],
                                       "teacher modules matched to student_layers, in the same order")
        p: float = setting(2.0, "exponent of |f| in the attention map (paper: 2)", gt=0)
        weight: float = setting(1000.0, "weight of the summed attention terms (beta; paper code and "
                                        "mdistiller: 1000)", ge=0)

    @staticmethod
    def problems(settings) -> list[tuple[str, str]]:
        found = path_problems("student_layers", settings.student_layers)
        found += path_problems("teacher_layers", settings.teacher_layers)
        if len(settings.student_layers) != len(settings.teacher_layers):
            counts = f"({len(settings.student_layers)}), got {len(settings.teacher_layers)}"
            found.append(("teacher_layers", f"must list as many modules as student_layers {counts}"))
        return found

    def student_features(self):
        return tuple(self.settings.student_layers)

    def teacher_features(self):
        return tuple(self.settings.teacher_layers)

    def build(self, context):
        student_probe, teacher_probe = context.student_probe, context.teacher_probe
        flat = [f"{student_path} -> {teacher_path}" for student_path, teacher_path
                in zip(self.settings.student_layers, self.settings.teacher_layers)
                if math.prod(min(a, b) for a, b in zip(student_probe[student_path].shape[2:],
                                                       teacher_probe[teacher_path].shape[2:])) == 1]
        if flat:
            warnings.warn(f"distill.at: the attention maps of {', '.join(flat)} are 1x1 at their common size, so "
                          f"their term is always zero; pair layers with larger maps (or use larger images)",
                          stacklevel=2)

    def forward(self, step):
        student, labels, teacher = step.student, step.labels, step.teacher
        at = student.logits.new_zeros(())
        for student_path, teacher_path in zip(self.settings.student_layers, self.settings.teacher_layers):
            student_map, teacher_map = pool_to_common_size(student.features[student_path],
                                                           teacher.features[teacher_path])
            difference = attention_map(student_map, self.settings.p) - attention_map(teacher_map, self.settings.p)
            at = at + difference.pow(2).mean()
        at = self.settings.weight * at  # logged weighted: the raw terms are ~1e-4
        ce = self.cross_entropy(student.logits, labels)
        return {"loss": ce + at, "ce": ce, "at": at}
