"""Loggers: where each epoch's numbers go besides log.txt and history/ (setting `loggers`).

A logger is a callbacks.Callback built from the run folder; it writes from the main process only.
A new one is one file here plus one line in LOGGERS.
"""
from __future__ import annotations

from ..callbacks import Callback
from .mlflow import MlflowLogger
from .tensorboard import TensorBoardLogger

LOGGERS = {
    "tensorboard": TensorBoardLogger,  # OUT/tensorboard/<model>/ event files
    "mlflow": MlflowLogger,  # $MLFLOW_TRACKING_URI, else OUT/mlruns
}


def make_loggers(names: list[str], out: str) -> list[Callback]:
    return [LOGGERS[name](out) for name in names]
