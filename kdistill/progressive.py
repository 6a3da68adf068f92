"""Progressive resizing, as FFCV and airbench train: early epochs see smaller views (a quarter of the
pixels at half the side), later ones the whole side, so the many early steps cost less while the
last ones train at the size the model is evaluated and deployed at.

The views themselves do not change (the stored views, and the teacher's signal computed on them,
stay valid): the model resizes each training batch inside (models.Standardized.train_scale). The
share is a function of the epoch alone, so a resumed run trains exactly as an unbroken one. The
baseline gets the student's schedule: it differs from the student only by the teacher.
"""
from __future__ import annotations

from torch import nn

from .callbacks import Callback, FitState
from .config import TrainConfig


def scale_at(epoch: int, epochs: int, start: float, until: float) -> float:
    """The share of the side at epoch (1-based): start at epoch 1, growing linearly to 1 at the epoch
    that ends `until` of the run, 1 from there on."""
    whole_from = max(1, round(until * epochs))
    if epoch >= whole_from:
        return 1.0
    return start + (1.0 - start) * (epoch - 1) / (whole_from - 1)


class ProgressiveResize(Callback):
    def __init__(self, model: nn.Module, start: float, until: float):
        self.model, self.start, self.until = model, start, until

    def on_epoch_start(self, state: FitState, epoch: int) -> None:
        self.model.train_scale = scale_at(epoch, state.cfg.epochs, self.start, self.until)

    def on_epoch_end(self, state: FitState, row: dict) -> None:
        row["view_side"] = self.model.trained_side

    def close(self, state: FitState) -> None:
        self.model.train_scale = 1.0


def progressive_resizing(model: nn.Module, cfg: TrainConfig) -> list[Callback]:
    """The callback where cfg asks for progressive resizing and the model resizes its own input (a
    head trained on stored features does not)."""
    if getattr(cfg, "progressive_from", 1.0) >= 1 or not hasattr(model, "train_scale"):
        return []
    return [ProgressiveResize(model, cfg.progressive_from, cfg.progressive_until)]
