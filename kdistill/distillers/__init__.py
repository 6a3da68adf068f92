"""Distillation objectives: one small module per method, one interface.

A distiller maps (student Outputs, labels, teacher Outputs, sample indices) to a dict of named loss
terms (see base.Distiller); "loss" is the one optimized, every term is logged. A new method is one
new file registered here.
"""
from .at import AT
from .base import CrossEntropy, Distiller, LogitDistiller, Outputs
from .born_again import BornAgain
from .crd import CRD
from .dist import DIST
from .dkd import DKD
from .dml import DML
from .fitnets import FitNets
from .kd import KD
from .lskd import LSKD
from .pefd import PEFD
from .pkt import PKT
from .rkd import RKD
from .sp import SP

DISTILLERS: dict[str, type[Distiller]] = {
    "kd": KD,
    "dkd": DKD,
    "dist": DIST,
    "lskd": LSKD,
    "fitnets": FitNets,
    "at": AT,
    "pefd": PEFD,
    "rkd": RKD,
    "pkt": PKT,
    "sp": SP,
    "crd": CRD,
    "dml": DML,
    "born_again": BornAgain,
}
BornAgain.methods = DISTILLERS  # the methods a generation may be distilled with


def build_distiller(method: str, *, temperature: float, alpha: float, label_smoothing: float = 0.0,
                    settings=None) -> Distiller:
    """settings: the method's Settings (its defaults when None)."""
    return DISTILLERS[method](temperature=temperature, alpha=alpha, label_smoothing=label_smoothing,
                              settings=settings)


__all__ = ["AT", "BornAgain", "CRD", "DIST", "DISTILLERS", "DKD", "DML", "KD", "LSKD", "PEFD", "PKT", "RKD", "SP",
           "CrossEntropy", "Distiller", "FitNets", "LogitDistiller", "Outputs", "build_distiller"]
