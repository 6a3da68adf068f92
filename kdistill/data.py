"""Data: decode the scanned image folder (scan.py) once into a uint8 cache, serve epochs as tensor
slices.

The cache lives in cache_dir/<key>/ where the key hashes every file's path and content plus the
image size (data_key.py), so changed data can never be served from an old cache.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import mmap
import multiprocessing
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .cache import entry_lock, mark_used, unwritable_entry
from .data_key import cache_key
from .errors import KdistillError
from .fileio import atomic_write_text, file_sha256, temporary_name
from .images import DEFAULT_MAX_PIXELS, MAX_IMAGE_SIZE, decode_task
from .progress import progress_bar
# list_images is not used here: callers import it, with the rest of the data API, from this module.
from .scan import DatasetFiles, SplitFiles, list_images, scan_dataset  # noqa: F401

CACHE_VERSION = 2  # 2: content hashes in meta.json
# Kept free beyond the arrays: meta.json, the file-hash index, and room for whatever else shares
# the disk, which a cache filling it to the last byte would make fail.
FREE_MARGIN = 64 << 20


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


def _array_bytes(dataset: DatasetFiles, size: int) -> int:
    """What a cache entry's arrays take on disk: a (3, size, size) uint8 image per file, and headers."""
    return sum(len(split.files) * 3 * size * size + 4096 for split in dataset.splits.values())


def _no_space(folder: str, needed: int, size: int) -> KdistillError:
    free = shutil.disk_usage(folder).free
    return KdistillError(f"not enough free space for the data cache in {os.path.dirname(folder)}: decoding at "
                         f"image_size={size} needs {(needed + FREE_MARGIN) / 1e6:.0f} MB (with a "
                         f"{FREE_MARGIN >> 20} MB margin), {free / 1e6:.0f} MB free; set cache_dir to a folder "
                         f"with more space, or use a smaller image_size")


def _allocate(path: str) -> None:
    """Give the array file its disk blocks now. open_memmap makes a sparse file, and a page written
    through the map to a full disk kills the process (SIGBUS, no message); allocated, a full disk
    is an OSError (ENOSPC) here instead."""
    if not hasattr(os, "posix_fallocate"):  # macOS, Windows: the free-space check stands alone
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # a file system without it
            raise
    finally:
        os.close(fd)


def _decode_split(split: SplitFiles, size: int, max_pixels: int, workers: int, out_path: str,
                  name: str) -> tuple[list[int], list[tuple[str, str]]]:
    """Decode every file of a split straight into a memory-mapped file; return the kept indices."""
    n = len(split.files)
    images = np.lib.format.open_memmap(out_path, mode="w+", dtype=np.uint8, shape=(n, 3, size, size))
    _allocate(out_path)
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
    needed = _array_bytes(dataset, size)
    if shutil.disk_usage(folder).free < needed + FREE_MARGIN:  # refused before any work is done
        raise _no_space(folder, needed, size)
    meta = {"version": CACHE_VERSION, "image_size": size, "classes": dataset.classes,
            "source": os.path.dirname(os.path.abspath(dataset.splits["train"].root)),
            "splits": {}, "skipped": list(dataset.rejected)}
    start = time.perf_counter()
    total = 0
    for name, split in dataset.splits.items():
        tmp_path = os.path.join(folder, temporary_name(f"{name}.npy"))
        try:
            kept, failures = _decode_split(split, size, max_pixels, workers, tmp_path, name)
        except OSError as e:  # the disk filled up meanwhile (another writer): give its space back
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            written = [os.path.join(folder, f"{other}.npy") for other in meta["splits"]]  # useless without meta.json
            for path in (tmp_path, tmp_path + ".compact.npy", *written):
                with contextlib.suppress(OSError):
                    os.remove(path)
            raise _no_space(folder, needed, size) from None
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


def prepare(data_dir: str, image_size: int, cache_dir: str, *, workers: int = 0,
            max_pixels: int = DEFAULT_MAX_PIXELS, skip_bad: bool = False, log=print,
            scanned: DatasetFiles | None = None) -> PreparedData:
    """Decode the dataset once into the cache (or reuse it) and map it as tensors.

    scanned: scan_dataset's result for data_dir (its split, transfer set and file index); default:
    scanned here with a seed-0 20% val split where DATA/val is absent, and no transfer set."""
    if image_size > MAX_IMAGE_SIZE:  # as the settings check it, for callers of prepare itself; before any hashing
        raise KdistillError(f"setting image_size must be <= {MAX_IMAGE_SIZE}, got {image_size} (each image would "
                            f"take {3 * image_size ** 2 / 1e6:,.0f} MB in the data cache)")
    dataset = scanned or scan_dataset(data_dir, cache_dir=cache_dir)
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
