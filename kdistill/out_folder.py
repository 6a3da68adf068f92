"""The run folder given as --out: what may be written there, and whether it holds this experiment.

A run resumes in its folder only with the same result settings and the same data; kdistill never
writes into a folder of the user's (fileio.refuse_foreign_folder) or into the data itself.
"""
from __future__ import annotations

import json
import os

from .config import Config
from .config_diff import saved_differences
from .data_key import same_data
from .errors import KdistillError
from .scan import DatasetFiles
from .run_folder import RunFolder


def describe_data(dataset: DatasetFiles, key: str) -> dict:
    return {"key": key, "classes": dataset.classes,
            "images": {name: len(split.files) for name, split in dataset.splits.items()}}


def check_out_folder(cfg: Config, dataset: DatasetFiles, data_identity: dict) -> None:
    """An --out holding a different experiment, or the same one on other data, is refused rather
    than mixed or overwritten."""
    folder = RunFolder(cfg.out)
    if not folder.has_started_training():  # only then does it hold results to protect
        return
    differences = saved_differences(folder.saved_settings("saved config"), cfg, f"{cfg.out} holds")
    if differences:
        raise KdistillError(f"{cfg.out} holds a run with other settings ({'; '.join(differences[:3])}); "
                            f"use another --out, or the same settings to resume it")
    data_path = os.path.join(cfg.out, "data.json")
    if not os.path.exists(data_path):
        return
    try:
        with open(data_path, encoding="utf-8") as f:
            previous = json.load(f)
    except (OSError, ValueError) as e:
        raise KdistillError(f"{data_path} is unreadable ({e}); use another --out") from None
    if same_data(previous.get("key"), dataset, cfg.image_size, cfg.max_image_pixels):
        return
    if previous.get("classes") != data_identity["classes"]:
        what = (f"{len(previous.get('classes') or [])} classes then, {len(data_identity['classes'])} now"
                if len(previous.get("classes") or []) != len(data_identity["classes"]) else "other class names")
    elif previous.get("images") != data_identity["images"]:
        what = f"images per split {previous.get('images')} then, {data_identity['images']} now"
    else:
        what = "the same file counts, but files were added, removed, renamed or their content changed"
    raise KdistillError(f"{cfg.out} holds a run on other data at {cfg.data} ({what}); use another --out")


# The subfolders a run writes (and cleans of its interrupted writes); a forced --out may hold others.
RUN_SUBFOLDERS = ("checkpoints", "history", "models")


def check_out_outside_data(cfg: Config) -> None:
    out, data = os.path.realpath(cfg.out), os.path.realpath(cfg.data)
    if out == data or out.startswith(data.rstrip(os.sep) + os.sep):
        raise KdistillError(f"--out {cfg.out} is inside the data folder {cfg.data}: the run's images (plots) would "
                            f"become data; choose a folder outside it")
