"""`kdistill clean RUN`: a finished run or sweep folder made lean, as runs are now by default
(keep_checkpoints false): every model's last.pt keeps its history alone, its older copy goes.
Best weights, exports, reports and histories stay; a rerun of the same command still finds every
model finished."""
from __future__ import annotations

import os

from .callbacks import finished_record, slim
from .errors import KdistillError
from .fileio import RUN_MARKER, folder_in_use, load_torch

FINISHED_FILES = ("metrics.json", "sweep.json")  # a run's, a sweep's


def clean(folder: str, log=print) -> int:
    """Slim every checkpoint under folder; the bytes freed. Refuses a folder kdistill did not
    create, one still running, and an unfinished run (its training state is what resumes it)."""
    if not os.path.isdir(folder) or not os.path.exists(os.path.join(folder, RUN_MARKER)):
        raise KdistillError(f"{folder} is not a kdistill run or sweep folder (no {RUN_MARKER}); nothing removed")
    if not any(os.path.exists(os.path.join(folder, name)) for name in FINISHED_FILES):
        raise KdistillError(f"{folder} has not finished (no metrics.json or sweep.json): its checkpoints resume it; "
                            f"nothing removed")
    freed = 0
    with folder_in_use(folder):
        for root, _, files in os.walk(folder):
            if "last.pt" not in files:
                continue
            state = load_torch(os.path.join(root, "last.pt"))
            if not isinstance(state, dict) or "history" not in state:
                log(f"clean: {root}/last.pt is not a kdistill checkpoint; left as it is")
                continue
            if not state.get("finished"):
                computed_on = state.get("computed_on", {"device": "cpu", "precision": "fp32"})  # before it was saved
                state = finished_record(state["history"], state["best_val_acc"], computed_on)
            freed += slim(root, state)
    log(f"clean: {folder}: {freed / 2**20:.1f} MiB freed")
    return freed
