"""Distillation objectives: one small module per method, one interface.

A distiller maps (student Outputs, labels, teacher Outputs, sample indices) to a dict of named loss
terms (see base.Distiller); "loss" is the one optimized, every term is logged. A new method is one
new file registered here.
"""
from .base import CrossEntropy, Distiller, LogitDistiller, Outputs
from .crd import CRD
from .kd import KD
from .pkt import PKT
from .rkd import RKD
from .sp import SP

DISTILLERS: dict[str, type[Distiller]] = {
    "kd": KD,
    "rkd": RKD,
    "pkt": PKT,
    "sp": SP,
    "crd": CRD,
}


def build_distiller(method: str, temperature: float, alpha: float, label_smoothing: float = 0.0) -> Distiller:
    return DISTILLERS[method](temperature=temperature, alpha=alpha, label_smoothing=label_smoothing)


__all__ = ["DISTILLERS", "CrossEntropy", "Distiller", "KD", "LogitDistiller", "Outputs", "build_distiller"]
