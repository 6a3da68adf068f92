"""`kdistill sweep`: one run per point of a grid of settings, sharing what the points train alike.

Each point is a normal run folder, OUT/points/<its grid values>. The data is decoded once (the
data cache), the teacher trained once per distinct teacher and the baseline once per distinct
baseline: points whose teacher (or baseline) reads the same settings and data get one checkpoint
folder, OUT/shared/teacher-<id> (or baseline-<id>), which pipeline.run reloads instead of training
again. Identical teachers then share their signal caches too (keyed by the teacher's weights).
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass
from typing import Any

from .augmentations import AUGMENTATIONS, VIEW_SETTINGS, view_params
from .config import Config, build_config
from .config_diff import LATER_MODEL_SETTINGS, saved_differences
from .data import scan_dataset
from .data_key import cache_key, dated_key
from .errors import KdistillError, printable
from .fileio import (append_text, atomic_write_text, claim_folder, folder_in_use, mark_as_ours,
                     refuse_foreign_folder)
from .run_folder import RunFolder
from .settings import convert, leaves, parse_set

# Settings a point may not vary, and why.
NOT_GRIDDED = {"out": "the sweep names each point's folder", "seeds": "--seeds applies to every point",
               "cache_dir": "the points share one data cache"}
# Settings train_teacher never reads (its own settings are teacher.*; it reads data, image_size,
# val_fraction and seed through the data, augment for its batches, device and precision for its
# numbers). Every other setting counts, so a setting added later splits teachers rather than
# sharing one wrongly. threads does not count: under auto the load picks the count, and a model that
# started keeps its own (precision_choice).
NOT_TEACHER = {"out", "threads", "workers", "loggers", "keep_checkpoints", "cache_dir", "skip_bad", "baseline",
               "compile", "seeds", "mix", "mixup_alpha", "cutmix_alpha", "student", "distill"}
# Settings the baseline never reads; of distill.*, it reads only what shapes the batches it shares
# with the distilled student (see baseline_settings).
NOT_BASELINE = {"out", "threads", "workers", "loggers", "keep_checkpoints", "cache_dir", "skip_bad", "baseline",
                "teacher", "distill"}
POINT_NAME_CHARACTERS = r"[^\w.=,+-]"  # anything else in a value becomes _ in the folder name
MAX_POINT_NAME = 120


@dataclass
class Point:
    name: str  # key=value,key=value as typed, made fit for a folder name (see point_name)
    folder: str  # OUT/points/<name>
    position: tuple[int, ...]  # index of its value on each grid axis
    values: dict[str, Any]  # grid key -> this point's value
    cfg: Config
    data_keys: tuple[str, str]  # the data it trains on, as its data.json says: by content, or by date (before)
    shared: dict[str, str]  # teacher (and baseline, if trained) -> its shared checkpoint folder
    described: dict[str, dict]  # the same kinds -> the settings and data that name that folder


def _split_values(text: str) -> list[str]:
    """v1,v2,... split at the commas outside brackets: a list setting's values are written [a, b]."""
    values, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += char
    return values + [current.strip()] if text.strip() else values


def parse_grid(specs: list[str], fixed: set[str]) -> list[tuple[str, list[str], list[Any]]]:
    """Each --grid KEY=V1,V2,... as (key, values as typed, values converted), checked: a known setting,
    not fixed elsewhere (fixed: the keys of --set and the flags), given once, values valid and distinct."""
    fields = {name: f for name, f, _ in leaves(Config())}
    axes = []
    for spec in specs:
        key, sep, text = spec.partition("=")
        key = key.strip()
        if not sep or not key:
            raise KdistillError(f"--grid expects KEY=V1,V2,..., got {spec!r}")
        if key not in fields:
            raise KdistillError(f"--grid {key}: unknown setting (`kdistill config` lists them)")
        if key in NOT_GRIDDED:
            raise KdistillError(f"--grid {key}: not a sweep axis ({NOT_GRIDDED[key]})")
        if key in fixed:
            raise KdistillError(f"--grid {key}: also set by --set or a flag; give its values in --grid only")
        if any(axis[0] == key for axis in axes):
            raise KdistillError(f"--grid {key} is given twice; list all its values in one --grid")
        texts = _split_values(text)
        if not texts:
            raise KdistillError(f"--grid {key} has no values")
        if "" in texts:
            raise KdistillError(f"--grid {key} has an empty value in {text!r}")
        values = [convert(key, value, fields[key]) for value in texts]
        for position, value in enumerate(values):
            if value in values[:position]:
                raise KdistillError(f"--grid {key} lists the value {texts[position]} twice")
        axes.append((key, texts, values))
    if not axes:
        raise KdistillError("sweep needs at least one --grid KEY=V1,V2,...")
    return axes


def _flat_names(nested: dict, prefix: str = "") -> set[str]:
    names = set()
    for key, value in nested.items():
        names |= _flat_names(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key}
    return names


def point_name(assignments: list[tuple[str, str]]) -> str:
    """key=value,... as a folder name. Where other characters became _ or a long name was cut, a short
    hash of the full text keeps names apart."""
    text = ",".join(f"{key}={value}" for key, value in assignments)
    name = re.sub(POINT_NAME_CHARACTERS, "_", text)
    if name == text and len(name) <= MAX_POINT_NAME:
        return name
    return f"{name[:MAX_POINT_NAME]}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def _unread_view_settings(cfg: Config) -> set[str]:
    """The settings of other augmentations' views (rrc_scale without rrc_flip): they change nothing here."""
    return VIEW_SETTINGS - set(view_params(cfg))


def teacher_settings(cfg: Config) -> dict:
    """The settings the teacher's training reads; of the views' settings, its augmentation's only."""
    ignored = NOT_TEACHER | _unread_view_settings(cfg)
    return {key: value for key, value in cfg.to_dict().items() if key not in ignored}


def baseline_settings(cfg: Config) -> dict:
    """The settings the baseline's training reads. It trains on the distilled student's batches without
    the teacher (pipeline.without_teacher): with augmentation, the teacher signal's kind picks stored
    views (distill.views of them; flip always stores its two) or fresh ones; without, every kind serves
    the same batches."""
    ignored = NOT_BASELINE | _unread_view_settings(cfg)
    settings = {key: value for key, value in cfg.to_dict().items() if key not in ignored}
    signal = cfg.signal_mode() if cfg.augment != "none" else "unaugmented"
    every_view_stored = signal == "views" and AUGMENTATIONS[cfg.augment].distinct_views  # views does not matter
    settings["distill"] = {"batches": signal, "unlabeled": cfg.distill.unlabeled,
                           **({"views": cfg.distill.views} if signal == "views" and not every_view_stored else {})}
    if cfg.distill.unlabeled and cfg.student.steps:  # since the baseline gets the student's steps (steps.baseline_part)
        settings["budget"] = "the student's steps"  # a baseline shared before (its epochs) is not reused
    return settings


class _DataKeys:
    """The data cache key of each (data, split, image size, transfer set), scanned once: a shared
    folder is keyed by the data too, so changed images never meet an old teacher."""

    def __init__(self):
        self.keys: dict[tuple, tuple[str, str]] = {}

    def __call__(self, cfg: Config, unlabeled: str = "") -> tuple[str, str]:
        """(the key by content, the key by file dates that kdistill gave the same data before)"""
        args = (cfg.data, cfg.val_fraction, cfg.seed, unlabeled, cfg.image_size, cfg.max_image_pixels)
        if args not in self.keys:
            dataset = scan_dataset(cfg.data, cfg.val_fraction, cfg.seed, unlabeled, cfg.resolved_cache_dir())
            self.keys[args] = tuple(key(dataset, cfg.image_size, cfg.max_image_pixels)
                                    for key in (cache_key, dated_key))
        return self.keys[args]


def _described(settings: dict, data_key: str) -> dict:
    """What names a shared folder. A model setting added later, at the value that does what kdistill
    did before it (config_diff.LATER_MODEL_SETTINGS), is left out: a sweep begun before it existed
    keeps its shared teacher and baseline."""
    settings = {key: ({name: value for name, value in section.items()
                       if LATER_MODEL_SETTINGS.get(name, object()) != value}
                      if key in ("teacher", "student") and isinstance(section, dict) else section)
                for key, section in settings.items()}
    return {"settings": settings, "data": data_key}


def _shared_folder(out: str, kind: str, settings: dict, data_keys: tuple[str, str]) -> tuple[str, dict]:
    """The folder of the kind's model trained with these settings on this data, and what names it.
    A sweep started before kdistill keyed data by content named it by the data's dated key: its
    folder is taken over rather than trained again."""
    named = []
    for data_key in data_keys:
        described = _described(settings, data_key)
        digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:10]
        named.append((os.path.join(out, "shared", f"{kind}-{digest}"), described))
    (folder, _), (earlier, _) = named
    return named[1] if os.path.isdir(earlier) and not os.path.isdir(folder) else named[0]


def _check_point_folder(point: Point) -> None:
    """A point folder holding a run with other settings (the sweep's --set or preset changed since)
    is refused now, before anything trains, rather than when its turn comes. As for a run, only a
    folder where training started holds results to protect: a point that failed before (a wrong
    setting) runs again with the corrected one."""
    folder = RunFolder(point.folder)
    if not folder.has_started_training():
        return
    differences = saved_differences(folder.saved_settings("saved config"), point.cfg, f"{point.folder} holds")
    if differences:
        raise KdistillError(f"{point.folder} holds a run with other settings ({'; '.join(differences[:3])}); "
                            f"use another --out, or the same settings to resume the sweep")


def plan(out: str, grid: list[str], preset: str | None = None, config_files: tuple[str, ...] = (),
         overrides: dict | None = None, sets: list[str] | None = None) -> tuple[list, list[Point]]:
    """Every point's validated Config and shared folders, before anything trains: (axes, points)."""
    overrides, sets = dict(overrides or {}), list(sets or [])
    axes = parse_grid(grid, _flat_names(parse_set(sets)) | _flat_names(overrides))
    out = os.path.abspath(out)
    data_keys = _DataKeys()
    points = []
    for combination in itertools.product(*(range(len(texts)) for _, texts, _ in axes)):
        assignments = [(key, texts[i]) for (key, texts, _), i in zip(axes, combination)]
        name = point_name(assignments)
        folder = os.path.join(out, "points", name)
        try:
            cfg = build_config(preset, config_files, {**overrides, "out": folder},
                               sets + [f"{key}={value}" for key, value in assignments])
        except KdistillError as e:
            raise KdistillError(f"grid point {name}: {e}") from None
        if not cfg.data:
            raise KdistillError("setting data is required (--data DATA)")
        cfg = dataclasses.replace(cfg, data=os.path.abspath(cfg.data))  # as the run saves it
        settings = {"teacher": teacher_settings(cfg), **({"baseline": baseline_settings(cfg)} if cfg.baseline else {})}
        found = {kind: _shared_folder(out, kind, settings[kind], data_keys(cfg)) for kind in settings}
        shared = {kind: folder for kind, (folder, _) in found.items()}
        described = {kind: named_by for kind, (_, named_by) in found.items()}
        values = {key: values[i] for (key, _, values), i in zip(axes, combination)}
        points.append(Point(name, folder, combination, values, cfg, data_keys(cfg, cfg.distill.unlabeled), shared,
                            described))
    for point in points:
        _check_point_folder(point)
    return axes, points


def _finished(point: Point) -> dict | None:
    """The metrics of the point's run if an earlier sweep finished it on the same data, else None."""
    paths = {name: os.path.join(point.folder, name) for name in ("metrics.json", "report.md", "data.json")}
    if not all(os.path.exists(path) for path in paths.values()):  # report.md is the run's last file
        return None
    try:
        with open(paths["metrics.json"], encoding="utf-8") as f:
            metrics = json.load(f)
        with open(paths["data.json"], encoding="utf-8") as f:
            data_key = json.load(f).get("key")
    except (OSError, ValueError):
        return None  # run again: the run says what is wrong
    if data_key not in point.data_keys or point.cfg.baseline != ("baseline" in metrics.get("models", {})):
        return None
    return metrics


def _note(folder: str, message: str) -> None:
    """A line in a point's own log.txt, where its run logs too."""
    claim_folder(folder)  # the point's run folder, made kdistill's before its first file
    append_text(os.path.join(folder, "log.txt"), printable(message) + "\n")


def run_sweep(out: str, grid: list[str], preset: str | None = None, config_files: tuple[str, ...] = (),
              overrides: dict | None = None, sets: list[str] | None = None, log=None, force: bool = False) -> dict:
    """Plan every point, run each (a finished one is read back, not rerun), then write sweep.md,
    sweep.json and sweep.png in out (force: even if kdistill did not create out); return sweep.json's
    content. A point whose run fails is
    recorded and the others go on; the error is raised at the end."""
    from .pipeline import make_logger, silent

    axes, points = plan(out, grid, preset, config_files, overrides, sets)
    out = os.path.abspath(out)
    # Under torchrun every process runs every point (see pipeline.run); rank 0 alone writes and logs.
    main = os.environ.get("RANK", "0") == "0"
    if main:
        refuse_foreign_folder(out, force)
    with folder_in_use(out, hold=main):
        if main:
            mark_as_ours(out)
        return _run_points(out, axes, points, main, (log or make_logger(out)) if main else silent)


def _run_points(out: str, axes: list, points: list[Point], main: bool, log) -> dict:
    from .pipeline import run
    from .sweep_report import write_sweep

    sharing: dict[str, list[str]] = {}  # shared folder -> its points
    for point in points:
        for folder in point.shared.values():
            sharing.setdefault(folder, []).append(point.name)
    counts = {kind: len({point.shared[kind] for point in points if kind in point.shared})
              for kind in ("teacher", "baseline")}
    log(f"sweep: {len(points)} points over {' x '.join(key for key, *_ in axes)}, sharing "
        f"{' and '.join(f'{count} {kind}(s)' for kind, count in counts.items() if count)} in "
        f"{os.path.join(out, 'shared')}")
    results: dict[str, dict] = {}
    for number, point in enumerate(points, 1):
        for kind, folder in point.shared.items():
            if main:
                os.makedirs(folder, exist_ok=True)
                # What the folder's model is trained with, for a reader (its name's digest is what matches).
                atomic_write_text(os.path.join(folder, "settings.json"),
                                  json.dumps(point.described[kind], indent=2))
        uses = ", ".join(f"{kind} {os.path.relpath(folder, out)} "
                         f"(used by {len(sharing[folder])} of {len(points)} points)"
                         for kind, folder in point.shared.items())
        metrics = _finished(point)
        log(f"sweep point {number}/{len(points)} {point.name}: "
            f"{'finished earlier, not rerun; ' if metrics else ''}{uses}")
        if metrics is None:
            if main:
                _note(point.folder, f"sweep point {point.name}: {uses}")
            try:
                metrics = run(point.cfg, shared_checkpoints=point.shared)
            except KdistillError as e:
                log(f"sweep point {point.name} failed: {e}")
                metrics = {"error": str(e)}
        results[point.name] = metrics
    if not main:
        return {}
    summary = write_sweep(out, axes, points, results)
    failed = [point.name for point in points if "error" in results[point.name]]
    if failed:
        raise KdistillError(f"{len(failed)} of {len(points)} sweep points failed ({failed[0]}: "
                            f"{results[failed[0]]['error']}); the others are in {os.path.join(out, 'sweep.md')}")
    best = summary["best"]
    log(f"sweep: done; best by val: {best['point']} ({best['student']['best_val_acc']:.2%}); "
        f"{os.path.join(out, 'sweep.md')}")
    return summary
