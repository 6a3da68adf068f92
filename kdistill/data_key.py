"""The data's identity: a key over every file's content, so a data cache or a run folder is matched
to the images themselves and never to their dates.

Hashing reads each file once. An index per folder, CACHE/file-hashes/<folder hash>.json, remembers
each file's hash under its size, mtime, inode change time (ctime) and inode number, as git's index
does, so a later scan reads only new or changed files. The ctime is what makes this safe: any
write, chmod or rename sets it to now, and no user-level tool can set it back, so an edit that
keeps the size and restores the mtime (os.utime, touch -r, rsync --times) is still hashed again
(on POSIX systems; Windows reports the creation time as ctime). Copies, restores and chmods are
hashed once more, and keep their key.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable

from .errors import KdistillError
from .fileio import atomic_write_text, file_sha256


@dataclass
class SplitFiles:
    """One split's files as listed (scan.py), with what keys them."""
    root: str  # the folder file names are relative to
    files: list[str]
    labels: list[int] | None  # None for the unlabelled test split
    stats: list[tuple[int, int]] = field(default_factory=list)  # (size, mtime_ns) per file
    digests: list[str] = field(default_factory=list)  # sha256 of each file's bytes


@dataclass
class DatasetFiles:
    """A dataset's classes and splits as listed, before any image is decoded."""
    classes: list[str]
    splits: dict[str, SplitFiles]
    rejected: list[tuple[str, str]]  # (path, reason): non-image or unreadable entries
    notices: list[str]


INDEX_FOLDER = "file-hashes"  # in the cache folder, beside the entries
KEY_VERSION = 3  # 2: files by size and mtime; 3: by content


def _index_path(cache_dir: str, root: str) -> str:
    name = hashlib.sha256(os.path.abspath(root).encode("utf-8", "surrogateescape")).hexdigest()[:24]
    return os.path.join(cache_dir, INDEX_FOLDER, f"{name}.json")


def _read_index(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
        return index if isinstance(index, dict) else {}
    except (OSError, ValueError):  # none yet, or damaged: hash again
        return {}


def _digest(path: str) -> str:
    try:
        return file_sha256(path, chunk_bytes=1 << 20)
    except OSError as e:  # decoding reports the file; its key changes once it can be read
        return f"unreadable ({e.strerror or e})"


def fingerprint(splits: Iterable[SplitFiles], cache_dir: str = "") -> int:
    """Fill each split's stats (size, mtime_ns) and digests (sha256 of the bytes); return how many
    files were read. cache_dir: where the index lives ("" for none: every file is read)."""
    by_root: dict[str, dict[str, tuple[int, int, int, int]]] = {}
    splits = list(splits)
    for split in splits:
        split.stats = []
        for name in split.files:
            path = os.path.join(split.root, name)
            try:
                st = os.stat(path)
            except OSError as e:  # removed or changed while scanning
                raise KdistillError(f"cannot read {path} ({e.strerror or e}); is the data folder "
                                    f"changing while kdistill runs?") from None
            split.stats.append((st.st_size, st.st_mtime_ns))
            by_root.setdefault(split.root, {})[name] = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    digests, hashed = {}, 0
    for root, stats in by_root.items():
        index_path = _index_path(cache_dir, root) if cache_dir else ""
        known = _read_index(index_path) if index_path else {}
        # An entry of the former layout, [size, mtime, hash], never matches: that file is hashed again.
        found = {name: known[name][-1] for name, stat in stats.items()
                 if isinstance(known.get(name), list) and known[name][:-1] == list(stat)}
        unknown = [name for name in stats if name not in found]
        digests[root] = found
        if not unknown:
            continue
        # hashlib and file reads release the GIL: threads overlap them.
        with ThreadPoolExecutor(min(os.cpu_count() or 1, 8)) as pool:
            found.update(zip(unknown, pool.map(_digest, (os.path.join(root, n) for n in unknown))))
        hashed += len(unknown)
        if index_path:
            with contextlib.suppress(OSError):  # a read-only cache: hash again next time
                os.makedirs(os.path.dirname(index_path), exist_ok=True)
                # An unreadable file is not indexed: made readable (a chmod keeps its mtime), it is hashed.
                atomic_write_text(index_path, json.dumps({name: [*stats[name], digest] for name, digest
                                                          in found.items() if not digest.startswith("unreadable")}))
    for split in splits:
        split.digests = [digests[split.root][name] for name in split.files]
    return hashed


def _key(dataset: DatasetFiles, image_size: int, max_pixels: int, version: int, per_file: str) -> str:
    described = {
        "version": version, "image_size": image_size, "max_pixels": max_pixels, "classes": dataset.classes,
        "splits": {name: [split.files, split.labels, getattr(split, per_file)]
                   for name, split in dataset.splits.items()},
        "rejected": dataset.rejected,
    }
    blob = json.dumps(described, sort_keys=True, ensure_ascii=True).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def cache_key(dataset: DatasetFiles, image_size: int, max_pixels: int) -> str:
    """The data cache entry of these files (by content) decoded at this size."""
    return _key(dataset, image_size, max_pixels, KEY_VERSION, "digests")


def dated_key(dataset: DatasetFiles, image_size: int, max_pixels: int) -> str:
    """The key kdistill gave these files before it keyed by content (sizes and dates): a run folder
    recorded then resumes while its files are unchanged."""
    return _key(dataset, image_size, max_pixels, 2, "stats")


def same_data(recorded_key: str, dataset: DatasetFiles, image_size: int, max_pixels: int) -> bool:
    return recorded_key in (cache_key(dataset, image_size, max_pixels), dated_key(dataset, image_size, max_pixels))
