"""Progress bars for the long loops (decoding, teacher signal, training epochs), on a terminal only.

A bar is drawn on stderr when stderr is a terminal and the CI environment variable is not set,
and, with several processes (torchrun), by rank 0 alone; otherwise nothing is written, so log.txt
and captured output hold the log lines alone.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

Item = TypeVar("Item")


def show_progress() -> bool:
    """Whether to draw bars: on an interactive terminal, not under CI (whose logs keep every redraw),
    and under torchrun in rank 0 only (its RANK: the other processes' bars would garble its lines)."""
    return sys.stderr.isatty() and "CI" not in os.environ and os.environ.get("RANK", "0") == "0"


def progress_bar(total: int, description: str) -> tqdm:
    """A bar counting images, with images per second and the time left; a silent one off a terminal.

    Transient (leave=False): when it closes, the line is cleared for the next log line."""
    return tqdm(total=total, desc=description, unit="img", leave=False, dynamic_ncols=True,
                disable=not show_progress())


def counted(batches: Iterable[Item], bar: tqdm | None) -> Iterator[Item]:
    """The batches (train.Batch records), each counted on bar (None: no bar) once it has been used;
    the caller closes the bar, which may count several loops."""
    for batch in batches:
        yield batch
        if bar is not None:
            bar.update(len(batch.labels))  # a shape: read without waiting for the device


POSTFIX_EVERY = 10  # batches between postfix updates: reading a loss makes the CPU wait for the GPU


def with_progress(batches: Iterable[Item], total: int, description: str,
                  postfix: Callable[[], str] | None = None) -> Iterator[Item]:
    """The batches with a bar of their own, and postfix() (the running loss) beside it every
    POSTFIX_EVERY batches, only where the bar is drawn. It closes when they end or the loop stops
    (an error, Ctrl-C: the generator is closed as the loop unwinds), so no half-drawn line stays behind."""
    with progress_bar(total, description) as bar:
        for count, batch in enumerate(counted(batches, bar), 1):
            yield batch
            if postfix is not None and not bar.disable and count % POSTFIX_EVERY == 0:
                bar.set_postfix_str(postfix())


def seconds_left(past_epoch_seconds: list[float], epochs_left: int) -> float | None:
    """epochs_left more epochs at the mean of the past ones (None before any)."""
    if not past_epoch_seconds or epochs_left < 1:
        return None
    return sum(past_epoch_seconds) / len(past_epoch_seconds) * epochs_left


def seconds_text(seconds: float) -> str:
    if seconds >= 5400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def time_left(seconds: float | None) -> str:
    """', about N min left' ('' where not known)."""
    return "" if seconds is None else f", about {seconds_text(seconds)} left"
