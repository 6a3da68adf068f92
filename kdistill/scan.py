"""The dataset's files: scan the image folder into labelled splits, each file fingerprinted.

Layout: DATA/train/<class>/*, DATA/val/<class>/* (optional), DATA/test/** (optional, unlabelled).
A dataset that cannot make a classifier (fewer than two classes, a class with no usable training
image) is refused here, before anything is decoded.
"""
from __future__ import annotations

import os
import time

import numpy as np

from .data_key import DatasetFiles, SplitFiles, fingerprint  # noqa: F401  (the listing's types)
from .errors import KdistillError
from .images import IGNORED_NAMES, entry_problem

SPLITS = ("train", "val", "test")


def _is_ignored(name: str) -> bool:
    return name.startswith(".") or name.lower() in IGNORED_NAMES


# Deeper than any photo collection; os.walk recurses once per level and fails near 1,000.
MAX_FOLDER_DEPTH = 64


def list_images(root: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Image paths under root (relative, sorted) and the entries that are not usable images.

    Hidden files and OS litter (.DS_Store, Thumbs.db, ...) are ignored. Folder symlinks are
    followed, except one pointing to a folder it is inside (a loop: it holds nothing new), and
    each real folder is visited once, so the scan always ends. Unreadable folders are reported.
    """
    images, rejected, seen = [], [], set()

    def unreadable_folder(error: OSError) -> None:
        rejected.append((error.filename or root, f"unreadable folder ({error.strerror or error})"))

    for folder, subfolders, names in os.walk(root, followlinks=True, onerror=unreadable_folder):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        if os.path.relpath(folder, root).count(os.sep) + 1 > MAX_FOLDER_DEPTH and folder != root:
            rejected.append((folder, f"nested more than {MAX_FOLDER_DEPTH} folders deep (not searched further)"))
            subfolders[:] = []
            continue
        kept = []
        for name in sorted(subfolders):
            sub = os.path.join(folder, name)
            if _is_ignored(name):
                continue
            if os.path.islink(sub):
                target = os.path.realpath(sub)
                if real == target or real.startswith(target.rstrip(os.sep) + os.sep):
                    continue  # links back to an ancestor: a loop
            kept.append(name)
        subfolders[:] = kept
        for name in sorted(names):
            if _is_ignored(name):
                continue
            path = os.path.join(folder, name)
            problem = entry_problem(path)
            if problem:
                rejected.append((path, problem))
            else:
                images.append(os.path.relpath(path, root))
    return sorted(images), sorted(rejected)


def _class_folders(split_dir: str) -> list[str]:
    return sorted(d for d in os.listdir(split_dir)
                  if not _is_ignored(d) and os.path.isdir(os.path.join(split_dir, d)))


def _labelled_split(split_dir: str, classes: list[str], rejected: list, training: bool) -> SplitFiles:
    files, labels = [], []
    for name in sorted(os.listdir(split_dir)):  # images must sit inside a class folder
        path = os.path.join(split_dir, name)
        if not _is_ignored(name) and not os.path.isdir(path):
            rejected.append((path, "not inside a class folder"))
    for label, name in enumerate(classes):
        class_dir = os.path.join(split_dir, name)
        if not os.path.isdir(class_dir):
            continue
        found, bad = list_images(class_dir)
        rejected += bad
        if not found and not bad:
            raise KdistillError(f"class folder {class_dir} has no images")
        if not found and training:  # even with --skip-bad the class would have nothing to learn from
            more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
            raise KdistillError(f"class folder {class_dir} has no usable images ({bad[0][0]}: {bad[0][1]}{more}); "
                                f"every class needs training images")
        files += [os.path.join(name, f) for f in found]
        labels += [label] * len(found)
    return SplitFiles(split_dir, files, labels)


def _stratified_split(train: SplitFiles, fraction: float, seed: int) -> tuple[SplitFiles, SplitFiles]:
    rng = np.random.default_rng(seed)
    labels = np.array(train.labels)
    val_index = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        n_val = int(round(fraction * len(members))) if len(members) > 1 else 0
        val_index += rng.permutation(members)[:n_val].tolist()
    is_val = np.zeros(len(labels), bool)
    is_val[val_index] = True

    def pick(mask: np.ndarray) -> SplitFiles:
        keep = np.flatnonzero(mask)
        return SplitFiles(train.root, [train.files[i] for i in keep], [train.labels[i] for i in keep])
    return pick(~is_val), pick(is_val)


def scan_dataset(data_dir: str, val_fraction: float = 0.2, seed: int = 0, unlabeled: str = "",
                 cache_dir: str = "") -> DatasetFiles:
    """unlabeled: a folder of unlabelled images for the transfer set, scanned as the split
    "unlabeled" ("test" or empty: none beyond DATA/test). cache_dir: where the index of file
    hashes lives ("" for none)."""
    if not os.path.isdir(data_dir):
        raise KdistillError(f"data folder {data_dir} does not exist")
    train_dir, val_dir, test_dir = (os.path.join(data_dir, s) for s in SPLITS)
    if not os.path.isdir(train_dir):
        raise KdistillError(f"{train_dir} is missing: expected DATA/train/<class>/ folders of images")
    classes = _class_folders(train_dir)
    if not classes:
        raise KdistillError(f"{train_dir} has no class folders: expected DATA/train/<class>/ folders")
    if len(classes) == 1:  # a one-class model is always right: it would train and report 100%
        raise KdistillError(f"{train_dir} holds one class, {classes[0]!r}: a classifier needs two or more "
                            f"classes, one folder of images each (DATA/train/<class>/)")
    rejected: list[tuple[str, str]] = []
    notices = []
    train = _labelled_split(train_dir, classes, rejected, training=True)
    if os.path.isdir(val_dir):
        unknown = [c for c in _class_folders(val_dir) if c not in classes]
        if unknown:
            raise KdistillError(f"class {unknown[0]!r} in {val_dir} is not a class in {train_dir}")
        val = _labelled_split(val_dir, classes, rejected, training=False)
        if not val.files:
            raise KdistillError(f"{val_dir} has no images")
    else:
        train, val = _stratified_split(train, val_fraction, seed)
        notices.append(f"{val_dir} not found: holding out {val_fraction:.0%} of each training class "
                       f"as validation (seeded with seed={seed})")
    splits = {"train": train, "val": val}
    if os.path.isdir(test_dir):
        test_files, bad = list_images(test_dir)
        rejected += bad
        splits["test"] = SplitFiles(test_dir, test_files, None)
    if unlabeled == "test" and not (os.path.isdir(test_dir) and splits["test"].files):
        raise KdistillError(f"setting distill.unlabeled is test but {test_dir} has no images")
    if unlabeled not in ("", "test"):
        transfer_files, bad = list_images(unlabeled)
        if not transfer_files:
            raise KdistillError(f"setting distill.unlabeled: {unlabeled} has no images")
        rejected += bad
        splits["unlabeled"] = SplitFiles(os.path.abspath(unlabeled), transfer_files, None)
    started = time.perf_counter()
    hashed = fingerprint(splits.values(), cache_dir)
    if hashed:
        notices.append(f"prepare: hashed {hashed} new or changed files in {time.perf_counter() - started:.1f} s "
                       f"(the data is keyed by content)")
    return DatasetFiles(classes, splits, rejected, notices)
