"""Data: scan the image folder, decode once into a uint8 cache, serve epochs as tensor slices.

Layout: DATA/train/<class>/*, DATA/val/<class>/* (optional), DATA/test/** (optional, unlabelled).
The cache lives in cache_dir/<key>/ where the key hashes every file's path and content plus the
image size (data_key.py), so changed data can never be served from an old cache.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .cache import entry_lock, mark_used, unwritable_entry
from .data_key import cache_key, fingerprint
from .errors import KdistillError
from .fileio import atomic_write_text, file_sha256, temporary_name
from .images import DEFAULT_MAX_PIXELS, IGNORED_NAMES, decode_task, entry_problem
from .progress import progress_bar

CACHE_VERSION = 2  # 2: content hashes in meta.json
SPLITS = ("train", "val", "test")


@dataclass
class SplitFiles:
    root: str  # the folder file names are relative to
    files: list[str]
    labels: list[int] | None  # None for the unlabelled test split
    stats: list[tuple[int, int]] = field(default_factory=list)  # (size, mtime_ns) per file
    digests: list[str] = field(default_factory=list)  # sha256 of each file's bytes


@dataclass
class DatasetFiles:
    classes: list[str]
    splits: dict[str, SplitFiles]
    rejected: list[tuple[str, str]]  # (path, reason): non-image or unreadable entries
    notices: list[str]


def _is_ignored(name: str) -> bool:
    return name.startswith(".") or name.lower() in IGNORED_NAMES


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


def _labelled_split(split_dir: str, classes: list[str], rejected: list) -> SplitFiles:
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
    rejected: list[tuple[str, str]] = []
    notices = []
    train = _labelled_split(train_dir, classes, rejected)
    if os.path.isdir(val_dir):
        unknown = [c for c in _class_folders(val_dir) if c not in classes]
        if unknown:
            raise KdistillError(f"class {unknown[0]!r} in {val_dir} is not a class in {train_dir}")
        val = _labelled_split(val_dir, classes, rejected)
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


@dataclass
class SplitData:
    images: torch.Tensor  # uint8 (N, 3, S, S), memory-mapped from the cache
    labels: torch.Tensor | None  # int64 (N,)
    files: list[str]  # relative to the split's folder
    release_pages: Callable[[], None] = lambda: None


def _page_releaser(array: np.memmap) -> Callable[[], None]:
    """Drops the mapped pages from this process's resident set after a batch is copied out.

    The OS page cache keeps the file warm, so the next read is a cheap minor fault, and the
    process holds one batch of images rather than the whole split (at 224 px the training split
    of the seed dataset alone is 1.2 GB).
    """
    mapping = getattr(array, "_mmap", None)
    if mapping is None or not hasattr(mmap, "MADV_DONTNEED"):
        return lambda: None
    return lambda: mapping.madvise(mmap.MADV_DONTNEED)


@dataclass
class PreparedData:
    key: str
    folder: str
    classes: list[str]
    mean: list[float]  # per channel, on the [0, 1] scale, from the training split
    std: list[float]
    splits: dict[str, SplitData]
    skipped: list[tuple[str, str]]  # (path, reason)


def _decode_split(split: SplitFiles, size: int, max_pixels: int, workers: int, out_path: str,
                  name: str) -> tuple[list[int], list[tuple[str, str]]]:
    """Decode every file of a split straight into a memory-mapped file; return the kept indices."""
    n = len(split.files)
    images = np.lib.format.open_memmap(out_path, mode="w+", dtype=np.uint8, shape=(n, 3, size, size))
    tasks = [(i, os.path.join(split.root, f), size, max_pixels) for i, f in enumerate(split.files)]
    ok = np.zeros(n, bool)
    failures = []
    progress = progress_bar(n, f"prepare {name}")
    release = _page_releaser(images)
    done = 0

    def store(result: tuple) -> None:
        nonlocal done
        index, array, reason = result
        if array is None:
            failures.append((tasks[index][1], reason))
        else:
            images[index] = array
            ok[index] = True
        progress.update(1)
        done += 1
        if done % 512 == 0:  # written pages go to disk and leave the resident set
            images.flush()
            release()

    if workers > 1 and n > 64:
        method = "fork" if sys.platform.startswith("linux") else "spawn"
        with multiprocessing.get_context(method).Pool(workers) as pool:
            for result in pool.imap_unordered(decode_task, tasks, chunksize=16):
                store(result)
    else:
        for task in tasks:
            store(decode_task(task))
    progress.close()
    kept = np.flatnonzero(ok).tolist()
    if len(kept) < n:  # compact in place so the kept images are contiguous
        for new, old in enumerate(kept):
            if new != old:
                images[new] = images[old]
    images.flush()
    if len(kept) < n:
        compacted = np.load(out_path, mmap_mode="r")[: len(kept)]
        np.save(out_path + ".compact.npy", compacted)
        os.replace(out_path + ".compact.npy", out_path)
    return kept, sorted(failures)


def _channel_stats(images: np.memmap, chunk: int = 64) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of images/255 over the whole split.

    Sums of the uint8 values and of their squares are exact integers; chunks are small and their
    pages released, so memory stays flat whatever the split's size.
    """
    total = np.zeros(3, np.int64)
    total_sq = np.zeros(3, np.int64)
    release = _page_releaser(images)
    for start in range(0, len(images), chunk):
        block = images[start:start + chunk]
        total += block.sum(axis=(0, 2, 3), dtype=np.int64)
        total_sq += np.square(block, dtype=np.uint16).sum(axis=(0, 2, 3), dtype=np.int64)
        release()
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / (255.0 * count)
    std = np.sqrt(np.maximum(total_sq / (255.0 ** 2 * count) - mean ** 2, 0.0))
    return mean.tolist(), std.tolist()


def _build_cache(dataset: DatasetFiles, folder: str, size: int, max_pixels: int, workers: int,
                 log) -> dict:
    os.makedirs(folder, exist_ok=True)
    meta = {"version": CACHE_VERSION, "image_size": size, "classes": dataset.classes,
            "source": os.path.dirname(os.path.abspath(dataset.splits["train"].root)),
            "splits": {}, "skipped": list(dataset.rejected)}
    start = time.perf_counter()
    total = 0
    for name, split in dataset.splits.items():
        tmp_path = os.path.join(folder, temporary_name(f"{name}.npy"))
        kept, failures = _decode_split(split, size, max_pixels, workers, tmp_path, name)
        os.replace(tmp_path, os.path.join(folder, f"{name}.npy"))
        meta["skipped"] += failures
        meta["splits"][name] = {
            "files": [split.files[i] for i in kept],
            "labels": None if split.labels is None else [split.labels[i] for i in kept],
            "bytes": os.path.getsize(os.path.join(folder, f"{name}.npy")),
            "sha256": file_sha256(os.path.join(folder, f"{name}.npy")),
        }
        total += len(split.files)
    seconds = time.perf_counter() - start
    train_images = np.load(os.path.join(folder, "train.npy"), mmap_mode="r")
    if len(train_images) == 0:
        raise KdistillError("no training image could be decoded")
    meta["mean"], meta["std"] = _channel_stats(train_images)
    meta["sha256"] = _meta_sha256(meta)
    # meta.json is written last: its presence marks a complete cache.
    atomic_write_text(os.path.join(folder, "meta.json"), json.dumps(meta))
    log(f"prepare: decoded {total} images in {seconds:.1f} s ({total / max(seconds, 1e-9):.0f} img/s, "
        f"{workers} worker{'s' if workers > 1 else ''}) into {folder}")
    return meta


def _meta_sha256(meta: dict) -> str:
    described = {key: value for key, value in meta.items() if key != "sha256"}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def _load_cache(folder: str) -> tuple[dict | None, str]:
    """(metadata, "") if every file is complete and has the content it was written with, else
    (None, why): the cache will be rebuilt. Hashing reads every array once (about 1.3 GB/s here)."""
    try:
        with open(os.path.join(folder, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("version") != CACHE_VERSION or meta.get("sha256") != _meta_sha256(meta):
            return None, "meta.json was edited or comes from another kdistill version"
        for name, split in meta["splits"].items():
            path = os.path.join(folder, f"{name}.npy")
            if os.path.getsize(path) != split["bytes"]:
                return None, f"{name}.npy is incomplete"
            if file_sha256(path) != split["sha256"]:
                return None, f"{name}.npy does not hold what was written (damaged or edited)"
        return meta, ""
    except FileNotFoundError:
        return None, "it is incomplete"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return None, f"it is unreadable ({type(e).__name__})"


def prepare(data_dir: str, image_size: int, cache_dir: str, *, val_fraction: float = 0.2,
            seed: int = 0, workers: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS, skip_bad: bool = False,
            log=print, scanned: DatasetFiles | None = None) -> PreparedData:
    """Decode the dataset once into the cache (or reuse it) and map it as tensors.

    scanned: scan_dataset's result for these arguments, when the caller has it already."""
    dataset = scanned or scan_dataset(data_dir, val_fraction, seed, cache_dir=cache_dir)
    for notice in dataset.notices:
        log(notice)
    key = cache_key(dataset, image_size, max_pixels)
    folder = os.path.join(cache_dir, key)
    os.makedirs(cache_dir, exist_ok=True)
    workers = workers or os.cpu_count() or 1
    with entry_lock(folder, log) as writable:  # two runs sharing the cache build it once
        checked = time.perf_counter()
        meta, problem = _load_cache(folder)
        if meta is None and not writable:
            raise unwritable_entry(folder)
        if meta is None:
            if os.path.exists(os.path.join(folder, "meta.json")):
                log(f"prepare: the data cache in {folder} is damaged ({problem}); rebuilding it")
            meta = _build_cache(dataset, folder, image_size, max_pixels, workers, log)
        else:
            log(f"prepare: reusing the data cache in {folder} (content checked in "
                f"{time.perf_counter() - checked:.2f} s)")
        mark_used(folder)
    skipped = [tuple(item) for item in meta["skipped"]]
    if skipped and not skip_bad:
        path, reason = skipped[0]
        more = f" (and {len(skipped) - 1} more bad files)" if len(skipped) > 1 else ""
        raise KdistillError(f"bad input file {path}: {reason}{more}; fix or remove it, or pass "
                            f"--skip-bad to skip bad files")
    if skipped:
        log(f"prepare: skipped {len(skipped)} bad files (--skip-bad), for example {skipped[0][0]}: "
            f"{skipped[0][1]}")
    splits = {}
    for name, split in meta["splits"].items():
        # mmap_mode "c" (copy-on-write) gives a writable view torch accepts without copying the file.
        array = np.load(os.path.join(folder, f"{name}.npy"), mmap_mode="c")
        labels = None if split["labels"] is None else torch.tensor(split["labels"], dtype=torch.int64)
        splits[name] = SplitData(torch.from_numpy(array), labels, split["files"], _page_releaser(array))
    if len(splits["val"].files) == 0:
        raise KdistillError("no validation image could be decoded")
    missing = sorted(set(range(len(meta["classes"]))) - set(meta["splits"]["train"]["labels"]))
    if missing:
        raise KdistillError(f"class {meta['classes'][missing[0]]!r} has no usable training image")
    return PreparedData(key, folder, meta["classes"], meta["mean"], meta["std"], splits, skipped)


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N,3,H,W) on the device -> float in [0, 1]; each model standardizes it itself."""
    return images.float() / 255.0


def batch_indices(n: int, batch_size: int, shuffle: bool, generator: torch.Generator | None = None):
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    return order.split(batch_size)
