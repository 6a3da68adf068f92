"""The whole run's training time left, for the progress bar: the model in training at its own pace,
the models after it at the pace already measured for them or for a model that computes like them.

A student, the baseline and born-again's generations share the student's architecture and
computation, so one of them that has trained an epoch stands in for the others, per image of an
epoch (the student's epochs include the transfer set, the baseline's do not). A teacher stands in
for nothing; before anything after the current model has a stand-in, the bar shows the model's own
time left alone. Times between trainings (the teacher's signal, the report) are not counted.
"""
from __future__ import annotations

from dataclasses import dataclass

from .callbacks import Callback, FitState
from .config import Config
from .finish import run_name
from .progress import seconds_text
from .steps import baseline_part


@dataclass(frozen=True)
class Stage:
    name: str  # the run name: teacher, student, baseline-seed1, ...
    epochs: int
    images: int  # per epoch
    like: str  # models that compute alike share this (teacher-2's own name; "student" for the student plan)


class RunClock(Callback):
    """Hung on every model's fit (Session.clock): records the seconds of each epoch trained, resumed ones included."""

    def __init__(self, stages: list[Stage]):
        self.stages = stages
        self.seconds_per_image: dict[str, list[float]] = {}  # Stage.like -> one figure per epoch trained

    def _stage(self, name: str) -> Stage | None:
        return next((stage for stage in self.stages if stage.name == name), None)

    def _record(self, name: str, rows: list[dict]) -> None:
        stage = self._stage(name)
        if stage is not None:
            self.seconds_per_image.setdefault(stage.like, []).extend(
                row["seconds"] / stage.images for row in rows if row.get("seconds"))

    def on_fit_start(self, state: FitState) -> None:
        self._record(state.session.name, state.history)

    def on_epoch_end(self, state: FitState, row: dict) -> None:
        self._record(state.session.name, [row])

    def after(self, name: str) -> float | None:
        """Seconds the models after `name` will take; None where one has no measured stand-in yet, or
        none come after it."""
        names = [stage.name for stage in self.stages]
        later = self.stages[names.index(name) + 1:] if name in names else []
        total = 0.0
        for stage in later:
            measured = self.seconds_per_image.get(stage.like)
            if not measured:
                return None
            total += sum(measured) / len(measured) * stage.images * stage.epochs
        return total if later else None

    def bar_text(self, name: str, model_seconds_left: float | None) -> str:
        """', run about N min left' for the bar, or '' where the run's time left is not known."""
        later = self.after(name)
        if later is None or model_seconds_left is None:
            return ""
        return f", run about {seconds_text(model_seconds_left + later)} left"


def plan_clock(cfg: Config, train_images: int, transfer_images: int) -> RunClock:
    """The clock of a run training cfg's models in the pipeline's order: the teachers (a given one,
    epochs 0, trains nothing), then for each seed the student plan (student and baseline, or
    born-again's generations)."""
    stages = [Stage(name, part.epochs, train_images, name) for name, part in cfg.teachers().items() if part.epochs]
    baseline_epochs = baseline_part(cfg.student, train_images).epochs
    for seed in cfg.seeds or [cfg.seed]:
        for planned in cfg.student_plan().students:
            stages.append(Stage(run_name(planned.kind, seed, cfg), baseline_epochs, train_images, "student")
                          if planned.kind == "baseline" else
                          Stage(run_name(planned.kind, seed, cfg), cfg.student.epochs, train_images + transfer_images,
                                "student"))
    return RunClock(stages)
