"""Which students a run trains for each seed, in order, and what teaches each: decided here once
from the settings (Config.student_plan) and followed by pipeline.train_students.

The usual plan: the student, distilled with distill.method from the teacher (a method that reads
no teacher, DML, trains on the baseline's batches), then, unless baseline is off, the baseline on
the labels alone.

Born-again networks (Furlanello, Lipton, Tschannen, Itti & Anandkumar, "Born-Again Neural
Networks", ICML 2018), distill.method born_again, are no loss but a plan of several students:
self-distillation over generations of one architecture. Generation 0 is the student's architecture
trained on the labels alone: the baseline that kdistill trains for every seed anyway (same
initialization, same inputs). Generation g is a new student, from the same initialization,
distilled from generation g - 1 with the logit method distill.born_again.base (kd: alpha * T^2 * KL
+ (1 - alpha) * CE, its settings distill.temperature and distill.alpha; another method: its own
distill.<base> settings); the last generation is the reported student. Each generation's signal is
served as a teacher's would be (cached logits, stored views or online). The pretrained teacher,
trained for the report, teaches no generation.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .distillers import DISTILLERS, LogitDistiller
from .settings import setting

BORN_AGAIN = "born_again"
METHODS = (*DISTILLERS, BORN_AGAIN)  # distill.method's choices: the registered losses, and born-again's plan
TEACHER = "teacher"  # taught by the trained teacher (or the ensemble)
LABELS = "labels"  # taught by no model: the baseline's batches, without the teacher's signal


@dataclass
class BornAgainSettings:
    # The paper trains sequences of up to three generations (BAN-1 to BAN-3); two keep the cost at
    # three trainings of the student per seed (the baseline is generation 0).
    generations: int = setting(2, "distilled generations after generation 0 (the baseline); the last is the "
                                  "reported student", ge=1)
    base: str = setting("kd", "the logit method each generation is distilled with (kd, dkd, dist, lskd, ...; "
                              "its settings are its own section distill.<base>)")


def born_again_problems(settings: BornAgainSettings) -> list[tuple[str, str]]:
    """(setting name, what is wrong) of distill.born_again beyond its declared bounds: the base must
    read the teacher's logits only, which a generation before it gives."""
    logit_methods = [name for name, method in DISTILLERS.items()
                     if issubclass(method, LogitDistiller) and method.needs_teacher]
    if settings.base in logit_methods:
        return []
    return [("base", f"must be a method that reads the teacher's logits only ({', '.join(logit_methods)}), "
                     f"got {settings.base!r}")]


@dataclass(frozen=True)
class PlannedStudent:
    kind: str  # student, baseline, generation1, ...: its run names, checkpoint folders, rows
    method: str  # the distillation method of its loss; "": the labels alone (cross-entropy)
    taught_by: str  # TEACHER, LABELS, or the kind of the student trained before it that teaches it
    generation: int | None = None  # born again: its generation (metrics.json's generations); else None


@dataclass(frozen=True)
class StudentPlan:
    students: tuple[PlannedStudent, ...]  # in training order: a student's teacher is trained before it

    def teaches(self, kind: str) -> bool:
        """Whether the student of this kind teaches a later one (born again: every generation but the last)."""
        return any(student.taught_by == kind for student in self.students)


def plan_students(cfg) -> StudentPlan:
    """The students a run (a Config) trains for each seed."""
    baseline = PlannedStudent("baseline", "", LABELS)
    method = cfg.distilling_method()
    if cfg.distill.method != BORN_AGAIN:
        taught_by = TEACHER if DISTILLERS[method].needs_teacher else LABELS
        return StudentPlan((PlannedStudent("student", method, taught_by), *((baseline,) if cfg.baseline else ())))
    last = cfg.distill.born_again.generations
    kinds = ["baseline", *(f"generation{g}" for g in range(1, last)), "student"]
    # Generation 0 is the baseline, trained even with baseline off.
    return StudentPlan((dataclasses.replace(baseline, generation=0),
                        *(PlannedStudent(kinds[g], method, kinds[g - 1], g) for g in range(1, last + 1))))
