"""How many CPU threads a run trains with: the cores it may use, less those other processes keep busy.

When another process competes for the cores, each of torch's OpenMP parallel regions waits for its
slowest thread, and a thread whose core is taken waits a whole scheduler slice: bf16 steps, short
and many, collapse (a ResNet18 step 5.9x slower beside another bf16 training, against 2.5x for
float32; benchmarks/RESULTS.md, "Threads under a competing load"). With one thread per free core
the same step slows 1.8x instead. The count is chosen when a run starts and kept for the run
(thread counts change the last bits of every sum, so a resumed model keeps its count).
"""
from __future__ import annotations

import math
import os
import time

SAMPLE_SECONDS = 0.5  # how long the start of a run watches the machine


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup (v2) CPU quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/sys/fs/cgroup/cpu.max", encoding="ascii") as f:
            quota, period = f.read().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def _busy_seconds() -> float | None:
    """CPU seconds all processes have been busy since boot (/proc/stat), None where unreadable."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(value) for value in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle and iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def others_busy_cores(seconds: float = SAMPLE_SECONDS) -> float:
    """How many cores other processes keep busy, watched for `seconds`: the machine's busy time less
    this process's own; 0 where /proc/stat is not available."""
    before, own_before, start = _busy_seconds(), sum(os.times()[:2]), time.monotonic()
    time.sleep(seconds)
    after, own_after, elapsed = _busy_seconds(), sum(os.times()[:2]), time.monotonic() - start
    if before is None or after is None:
        return 0.0
    return max(0.0, (after - before - (own_after - own_before)) / elapsed)


def auto_threads(cores: int, others: float) -> int:
    """One thread per core that others leave free (at least one); a core counts as taken where others
    keep it busy half the time or more."""
    return max(1, cores - math.floor(others + 0.5))


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
    cores, others = usable_cores(), others_busy_cores()
    threads = auto_threads(cores, others)
    if threads == cores:
        return threads, "one per core this process may use"
    return threads, (f"other processes keep {others:.1f} of the {cores} cores this process may use busy; threads that "
                     f"share cores slow training several-fold in bf16 (set threads to override)")
