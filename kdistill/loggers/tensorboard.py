"""TensorBoard event files, one folder per trained model: OUT/tensorboard/<model>/ (teacher, student,
baseline, student-seed1, ...), every number of an epoch's history row as a scalar at that epoch.
View them with `tensorboard --logdir OUT/tensorboard`. Needs the tensorboard package
(pip install 'kdistill[tensorboard]')."""
from __future__ import annotations

import os

from ..callbacks import Callback, FitState, scalars
from ..errors import KdistillError


class TensorBoardLogger(Callback):
    def __init__(self, out: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise KdistillError("setting loggers: tensorboard needs the tensorboard package "
                                "(pip install 'kdistill[tensorboard]')") from None
        self.folder = os.path.join(out, "tensorboard")
        self.make_writer = SummaryWriter
        self.writer = None

    def on_fit_start(self, state: FitState) -> None:
        if state.session.ranks.main:
            self.writer = self.make_writer(os.path.join(self.folder, state.session.name))

    def on_epoch_end(self, state: FitState, row: dict) -> None:
        if self.writer is None:
            return
        for key, value in scalars(row).items():
            self.writer.add_scalar(key, value, row["epoch"])
        self.writer.flush()

    def close(self, state: FitState) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
