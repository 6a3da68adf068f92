"""Born-again networks (Furlanello, Lipton, Tschannen, Itti & Anandkumar, "Born-Again Neural
Networks", ICML 2018): self-distillation over generations of one architecture.

Generation 0 is the student's architecture trained on the labels alone: the baseline that kdistill
trains for every seed anyway (same initialization, same inputs). Generation k is a new student,
from the same initialization, distilled from generation k - 1 with the logit method `base` (kd:
alpha * T^2 * KL + (1 - alpha) * CE, its settings distill.temperature and distill.alpha; another
method: its own distill.<base> settings); the last generation is the reported student. Each
generation's signal is served as a teacher's would be (cached logits, stored views or online).

Not a loss of its own: Config.distiller() gives the base method's objective, and the pipeline
(pipeline.train_students) runs the generations. The pretrained teacher, trained for the report,
teaches no generation.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..settings import setting
from .base import Distiller, LogitDistiller


class BornAgain(Distiller):
    @dataclass
    class Settings:
        # The paper trains sequences of up to three generations (BAN-1 to BAN-3); two keep the cost at
        # three trainings of the student per seed (the baseline is generation 0).
        generations: int = setting(2, "distilled generations after generation 0 (the baseline); the last is the "
                                      "reported student", ge=1)
        base: str = setting("kd", "the logit method each generation is distilled with (kd, dkd, dist, lskd, ...; "
                                  "its settings are its own section distill.<base>)")

    methods: dict = {}  # the registry (distillers.DISTILLERS), handed over once it is complete

    @classmethod
    def problems(cls, settings) -> list[tuple[str, str]]:
        found = []
        method = cls.methods.get(settings.base)
        if not (method is not None and issubclass(method, LogitDistiller) and method.needs_teacher):
            logit_methods = [name for name, m in cls.methods.items()
                             if issubclass(m, LogitDistiller) and m.needs_teacher]
            found.append(("base", f"must be a method that reads the teacher's logits only "
                                  f"({', '.join(logit_methods)}), got {settings.base!r}"))
        return found
