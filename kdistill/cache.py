"""The data cache as a whole: locking an entry, and `kdistill cache --list / --clear`.

An entry is CACHE/<key>/ (the decoded .npy splits, meta.json, and signal/ with the teacher-signal
caches) plus CACHE/<key>.lock, which makes concurrent runs build it once. A cache may be shared
between users: reusing a complete entry needs read access only; building one needs write access.
Beside the entries, CACHE/file-hashes/ indexes the data's file hashes (data_key.py).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import time
from dataclasses import dataclass

from filelock import FileLock, Timeout

from .data_key import INDEX_FOLDER
from .errors import KdistillError
from .fileio import new_file_mode, remove_stale_temporaries
from .images import IGNORED_NAMES

KEY = re.compile(r"[0-9a-f]{24}")  # data.cache_key
LITTER = IGNORED_NAMES | {".ds_store"}  # left by file browsers; neither an entry nor foreign


def _lock(folder: str, timeout: float = -1) -> FileLock:
    # An explicit mode: some filelock versions create lock files 0o644 whatever the umask.
    return FileLock(folder + ".lock", timeout=timeout, mode=new_file_mode())


def unwritable_entry(folder: str) -> KdistillError:
    return KdistillError(f"the data cache {folder} has to be built but you cannot write there; set "
                         f"cache_dir (--set cache_dir=DIR or $KDISTILL_CACHE) to a folder of your own")


def _not_writable(error: OSError) -> bool:
    return isinstance(error, PermissionError) or error.errno == errno.EROFS


@contextlib.contextmanager
def entry_lock(folder: str, log):
    """Hold the entry's lock and yield True; yield False (no lock) where the lock file cannot be
    opened for writing, as in another user's cache or on a read-only disk: the caller may then
    only read the entry."""
    lock = _lock(folder)
    try:
        lock.acquire()
    except OSError as e:
        if not _not_writable(e):
            raise
        lock = None
    if lock is None:
        yield False
        return
    try:
        remove_stale_temporaries(folder, log)  # holding the lock: no build is under way
        yield True
    except OSError as e:
        if _not_writable(e):
            raise unwritable_entry(folder) from None
        raise
    finally:
        lock.release()


def mark_used(folder: str) -> None:
    """meta.json's mtime records the entry's last use, for `kdistill cache --list`."""
    with contextlib.suppress(OSError):  # another user's entry keeps its own date
        os.utime(os.path.join(folder, "meta.json"))


@dataclass
class CacheEntry:
    key: str
    folder: str
    size: int  # bytes under the folder, signal/ included
    meta: dict | None  # None while incomplete or damaged
    last_used: float


def _size(folder: str) -> int:
    total = 0
    for parent, _, names in os.walk(folder):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(parent, name)).st_size
    return total


def _entry(cache_dir: str, key: str) -> CacheEntry:
    folder = os.path.join(cache_dir, key)
    meta_path = os.path.join(folder, "meta.json")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        last_used = os.path.getmtime(meta_path)
    except (OSError, ValueError):
        meta = None
        last_used = os.path.getmtime(folder) if os.path.isdir(folder) else 0.0
    return CacheEntry(key, folder, _size(folder), meta if isinstance(meta, dict) else None, last_used)


def scan_cache(cache_dir: str) -> tuple[list[str], list[str]]:
    """The keys of the entries (a folder, a lock or both) and the names of anything else."""
    try:
        names = sorted(os.listdir(cache_dir)) if os.path.isdir(cache_dir) else []
    except OSError as e:
        raise KdistillError(f"cannot read the cache folder {cache_dir} ({e.strerror or e})") from None
    keys, foreign = set(), []
    for name in names:
        path = os.path.join(cache_dir, name)
        is_lock = name.endswith(".lock")
        stem = name[:-len(".lock")] if is_lock else name
        kind_ok = os.path.isfile(path) if is_lock else os.path.isdir(path)
        if KEY.fullmatch(stem) and kind_ok and not os.path.islink(path):
            keys.add(stem)
        elif name.lower() not in LITTER and not (name == INDEX_FOLDER and os.path.isdir(path)):
            foreign.append(name)
    return sorted(keys), foreign


def list_cache(cache_dir: str) -> list[str]:
    keys, foreign = scan_cache(cache_dir)
    entries = [_entry(cache_dir, key) for key in keys if os.path.isdir(os.path.join(cache_dir, key))]
    lines = [f"{'KEY':24s}  {'MB':>9s}  {'PX':>4s}  {'CLASSES':>7s}  {'IMAGES':>7s}  {'LAST USE':16s}  SOURCE"]
    for entry in sorted(entries, key=lambda e: e.last_used, reverse=True):
        meta = entry.meta or {}
        splits = meta.get("splits") or {}
        images = sum(len(split.get("files", [])) for split in splits.values()) if splits else "?"
        classes = len(meta["classes"]) if isinstance(meta.get("classes"), list) else "?"
        source = meta.get("source", "?") if entry.meta else "? (incomplete)"
        lines.append(f"{entry.key:24s}  {entry.size / 1e6:9.1f}  {meta.get('image_size', '?'):>4}  {classes:>7}  "
                     f"{images:>7}  {time.strftime('%Y-%m-%d %H:%M', time.localtime(entry.last_used)):16s}  "
                     f"{source}")
    total = sum(entry.size for entry in entries)
    lines.append(f"total: {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, {total / 1e6:.1f} MB "
                 f"in {cache_dir}")
    if foreign:
        lines.append(f"note: {cache_dir} also holds {len(foreign)} other item(s), e.g. {foreign[0]!r}, "
                     f"which kdistill did not write")
    return lines


def clear_cache(cache_dir: str, keys: list[str]) -> list[str]:
    """Remove the given entries (all when keys is empty) with their locks; skip those in use."""
    found, foreign = scan_cache(cache_dir)
    if foreign:
        raise KdistillError(f"refusing to clear {cache_dir}: it holds {foreign[0]!r} (and {len(foreign) - 1} "
                            f"more), which is not a kdistill cache entry; check --cache-dir or $KDISTILL_CACHE")
    unknown = [key for key in keys if key not in found]
    if unknown:
        raise KdistillError(f"no cache entry {unknown[0]!r} in {cache_dir}; `kdistill cache --list` shows "
                            f"the keys")
    lines, reclaimed, removed = [], 0, 0
    for key in list(dict.fromkeys(keys)) or found:
        folder = os.path.join(cache_dir, key)
        lock = _lock(folder, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            lines.append(f"skipped {key}: a running kdistill holds its lock")
            continue
        except OSError as e:
            lines.append(f"skipped {key}: cannot open its lock file {folder}.lock ({e.strerror or e})")
            continue
        size = _size(folder)
        try:  # the lock file goes last, while held: a waiter on it then retries on a new one
            if os.path.isdir(folder):
                shutil.rmtree(folder)
            os.remove(folder + ".lock")
        except OSError as e:
            lines.append(f"could not remove all of {key}: {e.strerror or e} ({e.filename})")
            continue
        finally:
            lock.release()
        removed += 1
        reclaimed += size
        lines.append(f"removed {key} ({size / 1e6:.1f} MB)")
    index = os.path.join(cache_dir, INDEX_FOLDER)
    if not keys and os.path.isdir(index):  # clearing everything: the next run hashes the files again
        lines.append(f"removed the index of file hashes ({_size(index) / 1e6:.1f} MB)")
        shutil.rmtree(index, ignore_errors=True)
    lines.append(f"reclaimed {reclaimed / 1e6:.1f} MB from {removed} entr{'y' if removed == 1 else 'ies'} "
                 f"in {cache_dir}")
    return lines
