"""How many CPU threads a run trains with: the cores it may use, less those other processes keep busy.

When another process competes for the cores, each of torch's OpenMP parallel regions waits for its
slowest thread, and a thread whose core is taken waits a whole scheduler slice: bf16 steps, short
and many, collapse (a ResNet18 step 5.9x slower beside another bf16 training, against 2.5x for
float32; benchmarks/RESULTS.md, "Threads under a competing load"). With one thread per free core
the same step slows 1.8x instead. The count is chosen when a run starts (a resumed model starts
with its first count), and under auto follows the load while a model trains (load_follow.py).
"""
from __future__ import annotations

import math
import os
import time

SAMPLE_SECONDS = 0.5  # how long the start of a run watches the machine


def _affinity() -> set[int]:
    """The CPUs this process may run on."""
    return set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def quota_cores() -> int | None:
    """The cores a cgroup (v2) CPU quota allows this process, None without a quota."""
    try:
        with open("/sys/fs/cgroup/cpu.max", encoding="ascii") as f:
            quota, period = f.read().split()
        return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        return None


def _busy_seconds(cpus: set[int]) -> float | None:
    """CPU seconds the given CPUs have been busy since boot (/proc/stat's cpuN lines), None where
    unreadable."""
    busy = 0
    try:
        with open("/proc/stat", encoding="ascii") as f:
            for line in f:
                name, *values = line.split()
                if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                    fields = [int(value) for value in values]
                    busy += sum(fields[:8]) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # less idle, iowait
    except (OSError, ValueError, IndexError):
        return None
    return busy / os.sysconf("SC_CLK_TCK")


class LoadWindow:
    """The CPUs of this process that other processes keep busy, over the time since the window opened
    or was last read: their busy time (/proc/stat) less this process's own."""

    def __init__(self):
        self.cpus = _affinity()
        self._open()

    def _open(self) -> None:
        self.busy, self.own, self.opened = _busy_seconds(self.cpus), sum(os.times()[:2]), time.monotonic()

    def seconds(self) -> float:
        return time.monotonic() - self.opened

    def others(self) -> float | None:
        """Cores others kept busy since the window opened (None where /proc/stat is unreadable); it
        opens again from now."""
        busy, own, opened = self.busy, self.own, self.opened
        self._open()
        elapsed = self.opened - opened
        if busy is None or self.busy is None or elapsed <= 0:
            return None
        return max(0.0, (self.busy - busy - (self.own - own)) / elapsed)


def others_busy_cores(seconds: float = SAMPLE_SECONDS) -> float:
    """How many of this process's CPUs other processes keep busy, watched for `seconds`; 0 where
    /proc/stat is not available."""
    window = LoadWindow()
    time.sleep(seconds)
    return window.others() or 0.0


def auto_threads(cpus: int, others: float, quota: int | None = None) -> int:
    """One thread per CPU that others leave free (at least one), at most the quota's cores; a CPU
    counts as taken where others keep it busy half the time or more. On a shared host whose other
    CPUs are busy, a quota of 2 still gets 2 threads where enough CPUs are free."""
    free = max(1, cpus - math.floor(others + 0.5))
    return min(free, quota) if quota else free


def choose_threads(setting: int, recorded: int | None) -> tuple[int, str]:
    """(threads, why) for a run: the setting where set (N > 0), OMP_NUM_THREADS where set, the count
    the run started with where it resumes, else one per core that other processes leave free."""
    import torch
    if setting:
        return setting, "setting threads"
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), "OMP_NUM_THREADS"
    if recorded:
        return recorded, "as this run started"
    cpus, quota, others = len(_affinity()), quota_cores(), others_busy_cores()
    threads = auto_threads(cpus, others, quota)
    if threads == min(cpus, quota or cpus):
        return threads, "one per core this process may use"
    return threads, (f"other processes keep {others:.1f} of the {cpus} cores this process may use busy; threads that "
                     f"share cores slow training several-fold in bf16 (set threads to override)")
