"""FitNets: Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015.

A regressor maps the student's hint layer onto the teacher's guided layer and the two are matched
by mean squared error. Trained jointly with the labels' cross-entropy in one stage, as mdistiller's
FitNet does (the paper's first stage trains only up to the hint layer; its second stage is KD):

    loss = CE(z_s, y) + hint,   hint = hint_weight * mean((regressor(f_s) - f_t)^2)

The regressor is mdistiller's ConvReg (convolution, BatchNorm, ReLU: the guided layer of a ResNet is
a ReLU output), with a 1x1 convolution from the student's to the teacher's channels. The ReLU is
left out where the guided layer's output is signed (a negative value in the probe batch), as the
linear bottleneck of an EfficientNet block is: a ReLU there would floor the hint at the mean square
of the teacher's negative values, which on EfficientNet-Lite0's _blocks.4 is most of the loss. Where the
two maps differ in height or width, the larger is average-pooled to the smaller first (pooling
commutes with the 1x1 convolution; mdistiller uses a strided convolution for a 2x size instead).
No KD term by default, as in mdistiller (distill.temperature and distill.alpha are then unused).
With distill.fitnets.kd true the labels' term becomes KD's, as in the FitNet+KD rows of later
comparisons (CRD, Tian et al. 2020):

    loss = alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE(z_s, y) + hint
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from ..errors import KdistillError
from ..settings import setting
from .at import pool_to_common_size
from .base import LayerPairDistiller
from .kd import kd_term


def conv_map_channels(probe: dict, path: str, setting_name: str) -> int:
    """The channels of the (B, C, H, W) map at path; a one-line error naming the setting otherwise."""
    shape = probe[path].shape
    if len(shape) != 4:
        raise KdistillError(f"setting {setting_name}: module {path!r} gives features of shape "
                            f"{tuple(shape)}, not a (batch, channels, height, width) map")
    return shape[1]


class FitNets(LayerPairDistiller):
    @dataclass
    class Settings:
        student_layer: str = setting("layer2", "student module whose output is the hint (mdistiller: the "
                                               "second stage of a ResNet)")
        teacher_layer: str = setting("layer2", "teacher module whose output guides the hint (auto: the "
                                               "shallowest one whose map is nearest in size to the hint's)")
        hint_weight: float = setting(100.0, "weight of the hint's mean squared error (mdistiller: 100)", ge=0)
        kd: bool = setting(False, "also distill the logits: KD's alpha*T^2*KL + (1-alpha)*CE (distill.alpha and "
                                  "distill.temperature) in place of the plain CE")

    @staticmethod
    def problems(settings) -> list[tuple[str, str]]:
        return LayerPairDistiller.layer_problems(settings)

    def build(self, context):
        student_probe, teacher_probe = context.student_probe, context.teacher_probe
        student_channels = conv_map_channels(student_probe, self.settings.student_layer,
                                             "distill.fitnets.student_layer")
        teacher_channels = conv_map_channels(teacher_probe, self.settings.teacher_layer,
                                             "distill.fitnets.teacher_layer")
        layers = [nn.Conv2d(student_channels, teacher_channels, kernel_size=1), nn.BatchNorm2d(teacher_channels)]
        if teacher_probe[self.settings.teacher_layer].min() >= 0:
            layers.append(nn.ReLU())
        self.regressor = nn.Sequential(*layers)

    def forward(self, step):
        student, labels, teacher = step.student, step.labels, step.teacher
        hint_map, guide = pool_to_common_size(student.features[self.settings.student_layer],
                                              teacher.features[self.settings.teacher_layer])
        hint = self.settings.hint_weight * F.mse_loss(self.regressor(hint_map), guide)
        ce = self.cross_entropy(student.logits, labels)
        if not self.settings.kd:
            return {"loss": ce + hint, "ce": ce, "hint": hint}
        kd = kd_term(student.logits, teacher.logits, self.temperature)
        return {"loss": self.alpha * kd + (1 - self.alpha) * ce + hint, "kd": kd, "ce": ce, "hint": hint}
