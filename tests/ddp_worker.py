"""One process of a several-process kdistill run, for tests/test_ddp.py.

    python tests/ddp_worker.py WRITES_JSON ARGS...

runs `kdistill ARGS` on one thread (its place among the processes comes from the environment,
as torchrun gives it) and, at exit, writes to WRITES_JSON every path under the run folder (--out)
that this process created, opened for writing, renamed, or removed.

Also the small network the tests train (arch ddp_worker:small_cnn).
"""
from __future__ import annotations

import atexit
import json
import os
import sys

from torch import nn

from tiny_nets import hold_while_asked

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


class HoldWhileAsked(nn.Module):
    """Passes its input on; waits first while tiny_nets.hold_while_asked says so (a test's signal is on its way)."""

    def forward(self, x):
        hold_while_asked()
        return x


def small_cnn() -> nn.Module:
    """Two conv-BatchNorm-ReLU layers and a linear head: BatchNorm for sync_bn to synchronize, and
    shallow enough that training does not amplify rounding differences into different results
    (a ResNet18 does, from one process to the next as from one thread count to another)."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10), HoldWhileAsked())


def record_writes(out: str, report: str) -> None:
    """Audit every write under out, in Python or in C code that opens files through Python."""
    out = os.path.realpath(out)
    writes: list[str] = []

    def inside(path) -> bool:
        if not isinstance(path, (str, bytes, os.PathLike)):
            return False  # a file descriptor
        real = os.path.realpath(os.fsdecode(path))
        return real == out or real.startswith(out + os.sep)

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            if inside(path) and ((isinstance(mode, str) and set(mode) & set("wax+")) or (flags or 0) & WRITE_FLAGS):
                writes.append(f"open {os.fsdecode(path)}")
        elif event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree"):
            if any(inside(path) for path in args[:2]):
                writes.append(f"{event} {os.fsdecode(args[0])}")

    def save() -> None:
        with open(report, "w") as f:
            json.dump(writes, f)
    sys.addaudithook(hook)
    atexit.register(save)


def main() -> int:
    import torch

    torch.set_num_threads(1)
    report, argv = sys.argv[1], sys.argv[2:]
    record_writes(argv[argv.index("--out") + 1], report)
    from kdistill.cli import main as kdistill

    return kdistill(argv)


if __name__ == "__main__":
    raise SystemExit(main())
