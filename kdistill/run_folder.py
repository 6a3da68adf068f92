"""A run folder and its files, named by what they hold: the one place their names are written, and
the one reader of a run's saved settings (a received folder is data: it is read with the safe YAML
loader and checked like any settings file)."""
from __future__ import annotations

import os
from dataclasses import dataclass

from .config import Config
from .errors import KdistillError
from .settings import apply_settings, read_yaml


@dataclass(frozen=True)
class RunFolder:
    root: str

    def file(self, name: str) -> str:
        return os.path.join(self.root, name)

    @property
    def config(self) -> str:
        return self.file("config.yaml")

    @property
    def data_identity(self) -> str:
        return self.file("data.json")

    @property
    def metrics(self) -> str:
        return self.file("metrics.json")

    @property
    def report(self) -> str:
        return self.file("report.md")

    @property
    def html_report(self) -> str:
        return self.file("report.html")

    @property
    def predictions(self) -> str:
        return self.file("predictions.csv")

    @property
    def val_predictions(self) -> str:
        return self.file("val_predictions.csv")

    @property
    def student_bundle(self) -> str:
        return self.file("student.pt")

    @property
    def student_onnx(self) -> str:
        return self.file("student.onnx")

    @property
    def student_int8(self) -> str:
        return self.file("student-int8.onnx")

    @property
    def checkpoints(self) -> str:
        return self.file("checkpoints")

    @property
    def compute_choice(self) -> str:
        """The CPU threads and each model's precision and memory format, as chosen when the run started
        (precision_choice); beside config.yaml, so that it marks no training as started."""
        return self.file("compute.json")

    @property
    def models(self) -> str:
        return self.file("models")

    def model_weights(self, name: str) -> str:
        """models/<name>.pt: a model's best weights (teacher, student, baseline, student-seed1, ...)."""
        return os.path.join(self.models, f"{name}.pt")

    def history(self, name: str) -> str:
        return os.path.join(self.root, "history", f"{name}.csv")

    def has_started_training(self) -> bool:
        """Whether training began here: only then does the folder hold results to protect."""
        return os.path.exists(self.config) and os.path.isdir(self.checkpoints)

    def saved_settings(self, what: str = "the run's settings") -> dict:
        """config.yaml as saved: nested settings."""
        return read_yaml(self.config, f"{what} {self.config}")

    def settings(self) -> Config:
        """The saved settings as a Config, not validated again (a weights file or a transfer folder it
        named may have moved since); one line naming the file where they do not read."""
        if not os.path.exists(self.config):
            raise KdistillError(f"{self.config} not found: is {self.root} a finished kdistill run?")
        cfg = Config()
        try:
            apply_settings(cfg, self.saved_settings())
        except KdistillError as e:
            raise KdistillError(f"{self.config}: {e}") from None
        return cfg
