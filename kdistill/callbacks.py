"""What training does besides the step, hung on fit's named events, so that checkpoints, the log
line, early stopping, loggers and tests observe training instead of patching it.

Events, in order: on_fit_start(state) once (after a resume: with the resumed history), then for
every epoch on_epoch_start(state, epoch) before it trains, on_batch_end(state, batch) after each of
its steps, and on_epoch_end(state, row) after it (row: that epoch's numbers, already in state.history),
on_fit_end(state) when the loop ends normally, and close(state) always, last (also on an error or an
interrupt). Every process runs the callbacks (a collective call such as a gather needs them all);
state.session.ranks.main tells the one that writes.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from .compute import ONE_PROCESS, Ranks
from .fileio import BackgroundSaver, save_torch

if TYPE_CHECKING:  # run_clock builds on this module's Callback
    from .run_clock import RunClock


@dataclass
class Session:
    """Where and how one model trains: fit's settings that are not the recipe's (TrainConfig)."""
    checkpoint_dir: str
    device: torch.device
    seed: int
    log: Callable[[str], None] = print
    precision: str = "fp32"
    ranks: Ranks = ONE_PROCESS
    callbacks: list = field(default_factory=list)  # more Callbacks (loggers), after fit's own
    # False: once training ends, last.pt keeps the history alone (no optimizer state, no older copy).
    keep_checkpoints: bool = True
    name: str = ""  # the run name (teacher, student, baseline, student-seed1, ...), set by fit
    layout: str = ""  # the memory format where not the default of device and precision (Compute.layout)
    # The precision of its val evaluation where not its training's: a teacher's, that of its kept
    # outputs (Compute.outputs), so that its best epoch is picked on the numbers it then gives.
    eval_precision: str = ""
    # arch -> a new model placed like the trained one, for a method that trains a model of its own
    # (DML's peer; see distillers.BuildContext); None: none to give.
    make_model: Callable[[str], nn.Module] | None = None
    # The run's clock, for the whole run's time left in the bar; None: the model's alone.
    clock: RunClock | None = None


@dataclass
class FitState:
    """What the loop holds, for the callbacks to read (and `stop` to set)."""
    session: Session
    cfg: Any  # the model's TrainConfig
    parts: dict[str, nn.Module | Any]  # model (the trainable part), objective, optimizer, scheduler, ema
    generators: tuple[torch.Generator, torch.Generator]  # batch order, augmented views
    computed_on: dict
    history: list[dict] = field(default_factory=list)
    start_epoch: int = 1
    best_val_acc: float = -1.0
    best_weights: dict | None = None  # set in the epoch that improved on best_val_acc, else None
    stop: bool = False  # a callback's request: no further epoch
    finished_before: bool = False  # loaded from a finished model's record: nothing trained, nothing to write


class Callback:
    def on_fit_start(self, state: FitState) -> None:
        pass

    def on_epoch_start(self, state: FitState, epoch: int) -> None:
        pass

    def on_batch_end(self, state: FitState, batch: int) -> None:
        pass

    def on_epoch_end(self, state: FitState, row: dict) -> None:
        pass

    def on_fit_end(self, state: FitState) -> None:
        pass

    def close(self, state: FitState) -> None:
        pass


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _save_epoch(checkpoint_dir: str, best_weights: dict | None, state: dict) -> None:
    if best_weights is not None:
        save_torch(best_weights, os.path.join(checkpoint_dir, "best.pt"), what="best checkpoint")
    last_path = os.path.join(checkpoint_dir, "last.pt")
    if os.path.exists(last_path):  # keep one older good copy in case the new one is damaged
        os.replace(last_path, last_path + ".prev")
    save_torch(state, last_path)


class Checkpointer(Callback):
    """last.pt (the whole state, so a killed run resumes exactly) and best.pt after every epoch,
    written in the background while the next epoch trains, by the main process."""

    def __init__(self):
        self.saver = BackgroundSaver()

    def on_epoch_end(self, state: FitState, row: dict) -> None:
        shuffle, views = state.generators
        random_streams = {"shuffle_rng": shuffle.get_state(), "view_rng": views.get_state(), "rng": _rng_state()}
        ranks = state.session.ranks
        rank_rngs = ranks.gather(random_streams)  # collective: every process calls it
        if not ranks.main:
            return
        parts = {key: part.state_dict() if part is not None else {} for key, part in state.parts.items()}
        self.saver.submit(_save_epoch, state.session.checkpoint_dir, state.best_weights, {
            **parts, **random_streams, **({"rank_rngs": rank_rngs} if ranks.joined else {}),
            "computed_on": state.computed_on, "history": state.history, "epoch": row["epoch"],
            "best_val_acc": state.best_val_acc})

    def on_fit_end(self, state: FitState) -> None:
        self.saver.wait()  # a failed write is an error of this run
        dropping = not (state.session.keep_checkpoints or state.finished_before)
        if state.session.ranks.main and state.history and dropping:
            slim(state.session.checkpoint_dir, finished_record(state.history, state.best_val_acc, state.computed_on))

    def close(self, state: FitState) -> None:
        self.saver.close()  # an interrupted run keeps the epoch in flight


def finished_record(history: list[dict], best_val_acc: float, computed_on: dict) -> dict:
    """What a finished model's last.pt keeps without its training state: enough to report and to
    know, on a rerun, that nothing is left to train (train._finished)."""
    return {"finished": True, "history": history, "epoch": history[-1]["epoch"], "best_val_acc": best_val_acc,
            "computed_on": computed_on}


def slim(checkpoint_dir: str, record: dict) -> int:
    """Replace checkpoint_dir/last.pt by record and remove its older copy; the bytes freed."""
    last = os.path.join(checkpoint_dir, "last.pt")
    before = sum(os.path.getsize(p) for p in (last, last + ".prev") if os.path.exists(p))
    save_torch(record, last)
    if os.path.exists(last + ".prev"):
        os.remove(last + ".prev")
    return before - os.path.getsize(last)


class EpochLog(Callback):
    """One line per epoch in the log: the training terms, val numbers (and the weight average's)."""

    def on_epoch_end(self, state: FitState, row: dict) -> None:
        terms = "".join(f" {k[6:]} {v:.3f}" for k, v in row.items()
                        if k.startswith("train_") and k not in ("train_loss", "train_acc"))
        ema = f" | ema val loss {row['val_loss_ema']:.3f} acc {row['val_acc_ema']:.3f}" if "val_acc_ema" in row else ""
        side = f" | views {row['view_side']} px" if "view_side" in row else ""
        state.session.log(
            f"{state.session.name} epoch {row['epoch']}/{state.cfg.epochs}: train loss {row['train_loss']:.3f} acc "
            f"{row['train_acc']:.3f}{terms} | val loss {row['val_loss']:.3f} acc {row['val_acc']:.3f}{ema} | "
            f"lr {row['lr']:.2g}{side} | {row['seconds']:.1f}s")


def offered_val_acc(row: dict) -> float:
    """The val accuracy of the weights an epoch offers as the best: the weight average's where it
    scored higher than the trained weights (see best_source), else the trained weights'."""
    return row["val_acc_ema"] if row.get("best_source") == "ema" else row["val_acc"]


def scalars(row: dict) -> dict[str, float]:
    """An epoch's history row as a logger records it: its finite numbers, the epoch itself aside."""
    return {key: value for key, value in row.items() if key != "epoch" and isinstance(value, (int, float))
            and not isinstance(value, bool) and math.isfinite(value)}


class EarlyStopping(Callback):
    """Stop when `patience` epochs (cfg.patience; 0: never) brought no better val accuracy than the
    best one. Decided from the history alone, so a resumed run stops where an unbroken one did."""

    def _check(self, state: FitState, announce: bool) -> None:
        patience = getattr(state.cfg, "patience", 0)
        if not patience or not state.history:
            return
        best = max(range(len(state.history)), key=lambda i: offered_val_acc(state.history[i]))  # the first best
        waited = len(state.history) - 1 - best
        if waited >= patience:
            state.stop = True
            if announce:
                state.session.log(f"{state.session.name}: stopping early after epoch {state.history[-1]['epoch']}: "
                                  f"no better val accuracy in {waited} epochs (patience {patience}); the best is "
                                  f"epoch {state.history[best]['epoch']}")

    def on_fit_start(self, state: FitState) -> None:
        self._check(state, announce=False)

    def on_epoch_end(self, state: FitState, row: dict) -> None:
        self._check(state, announce=True)
