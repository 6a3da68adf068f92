"""Distillation objectives: one small module per method, one interface.

A distiller maps (student Outputs, labels, teacher Outputs, sample indices) to a dict of named loss
terms (see base.Distiller); "loss" is the one optimized, every term is logged. A new method is one
new file registered here.
"""
from .base import CrossEntropy, Distiller, LogitDistiller, Outputs
from .kd import KD

DISTILLERS: dict[str, type[Distiller]] = {"kd": KD}


def build_distiller(method: str, temperature: float, alpha: float, label_smoothing: float = 0.0,
                    settings=None) -> Distiller:
    """settings: the method's Settings (its defaults when None)."""
    return DISTILLERS[method](temperature=temperature, alpha=alpha, label_smoothing=label_smoothing,
                              settings=settings)


__all__ = ["DISTILLERS", "CrossEntropy", "Distiller", "KD", "LogitDistiller", "Outputs", "build_distiller"]
