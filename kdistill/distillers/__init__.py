"""Distillation objectives: one small module per method, one interface.

A distiller maps one training Step (student and teacher Outputs, labels, sample indices, the
batch, the epoch) to a dict of named loss terms (see base.Distiller); "loss" is the one optimized,
every term is logged. A new method is one new file registered here. (Born-again networks are no
loss: a plan of several students, see kdistill/student_plan.py.)
"""
from .at import AT
from .base import BuildContext, CrossEntropy, Distiller, LogitDistiller, Outputs, Step
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
}


def build_distiller(method: str, *, temperature: float, alpha: float, label_smoothing: float = 0.0,
                    settings=None) -> Distiller:
    """settings: the method's Settings (its defaults when None)."""
    return DISTILLERS[method](temperature=temperature, alpha=alpha, label_smoothing=label_smoothing,
                              settings=settings)


__all__ = ["AT", "CRD", "DIST", "DISTILLERS", "DKD", "DML", "KD", "LSKD", "PEFD", "PKT", "RKD", "SP", "BuildContext",
           "CrossEntropy", "Distiller", "FitNets", "LogitDistiller", "Outputs", "Step", "build_distiller"]
