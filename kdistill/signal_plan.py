"""How the student gets the teacher's output, and why, decided once for a run, its baseline and
sweep: cached logits, stored views or an online teacher. teacher.distillation_batches may only turn
a stored signal online, under auto, where the teacher features a method reads would not fit in
memory; everything else is decided here."""
from __future__ import annotations

from typing import NamedTuple

from .augmentations import AUGMENTATIONS


class SignalPlan(NamedTuple):
    kind: str  # cached, views or online
    reason: str  # why, for the log and the report


def plan_signal(cfg) -> SignalPlan:
    """How the student of a run (a Config) gets the teacher's output, and why."""
    chosen = cfg.distill.teacher_signal
    if chosen != "auto":
        return SignalPlan(chosen, f"distill.teacher_signal={chosen}")
    # Mixed images pair images anew in every batch: only an online teacher sees them.
    if cfg.mix != "none":
        return SignalPlan("online", f"mix={cfg.mix}: mixed images are paired anew in every batch")
    if cfg.augment == "none":
        return SignalPlan("cached", "no augmentation: one exact output per image")
    # Flip has just two views per image, so both are stored (exact). Random crops are stored as
    # FKD does when there are at least as many views per image as student epochs; with fewer,
    # views repeat, and a teacher that sees fewer views than the student teaches worse (Beyer et
    # al. 2022, "patient and consistent"), so it runs online on each fresh crop.
    if AUGMENTATIONS[cfg.augment].distinct_views:
        return SignalPlan("views", f"augment={cfg.augment}: all {AUGMENTATIONS[cfg.augment].distinct_views} "
                                   f"views of every image stored")
    if cfg.distill.views >= cfg.student.epochs:
        return SignalPlan("views", f"augment={cfg.augment} with distill.views={cfg.distill.views} stored views "
                                   f"per image, at least student.epochs={cfg.student.epochs}")
    return SignalPlan("online", f"augment={cfg.augment} with distill.views={cfg.distill.views} stored views "
                                f"per image, fewer than student.epochs={cfg.student.epochs}")
