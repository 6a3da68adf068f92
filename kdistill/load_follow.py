"""Threads that follow the load while a model trains. The count chosen at a run's start (threads.py)
meets a competitor that starts later with all its threads: a sweep's bf16 ResNet18 epoch went from
22 s to 227-266 s beside a one-thread fp32 run started after it (benchmarks/RESULTS.md, "Threads
that follow the load"). So under threads auto, on the CPU in one process, every WATCH_SECONDS of
training the cores other processes kept busy over that time set the count again: one thread per
core they leave free, back up to the start's count when they leave.

The count changes the last bits of sums, so under a changing load a run is not bit-for-bit the run
it would be on a quiet machine; a fixed `threads` (or OMP_NUM_THREADS) keeps it, and the count
with it, fixed. What follows a fit (the teacher's signal, the next model) starts on the run's count again.
"""
from __future__ import annotations

import os

import torch

from .callbacks import Callback, FitState
from .compute import Ranks
from .threads import LoadWindow, auto_threads, quota_cores

WATCH_SECONDS = 5.0  # long enough to average the scheduler's slices, short beside an epoch


class ThreadsFollowLoad(Callback):
    def __init__(self, quota: int | None):
        self.quota = quota
        self.window: LoadWindow | None = None
        self.start_threads = 0

    def on_fit_start(self, state: FitState) -> None:
        self.window, self.start_threads = LoadWindow(), torch.get_num_threads()

    def on_batch_end(self, state: FitState, batch: int) -> None:
        if self.window is None or self.window.seconds() < WATCH_SECONDS:
            return
        others = self.window.others()
        if others is None:  # no /proc/stat: nothing to follow
            self.window = None
            return
        threads, before = auto_threads(len(self.window.cpus), others, self.quota), torch.get_num_threads()
        if threads != before:
            torch.set_num_threads(threads)
            state.session.log(f"{state.session.name}: threads {before} -> {threads} (other processes kept "
                              f"{others:.1f} of the {len(self.window.cpus)} cores this process may use busy "
                              f"over the last {WATCH_SECONDS:.0f} s; threads auto follows the load)")

    def close(self, state: FitState) -> None:
        if self.start_threads:
            torch.set_num_threads(self.start_threads)


def threads_following_load(threads_setting: int, device: torch.device, ranks: Ranks) -> list[Callback]:
    """The callback under threads auto (the setting 0, OMP_NUM_THREADS unset) for a model training on
    the CPU in one process; several processes of one run would count each other as load."""
    if threads_setting or os.environ.get("OMP_NUM_THREADS") or device.type != "cpu" or ranks.joined:
        return []
    return [ThreadsFollowLoad(quota_cores())]
