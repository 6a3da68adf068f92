"""Files written whole or not at all, and read without trusting them.

Every write goes to a temporary file in the same folder, is flushed to disk, then renamed over
the target, so a crash or a full disk leaves the previous version intact. Temporary names carry
the writer's pid, so the leftovers of a killed writer can be told from a write in progress.
Written files get the mode the user's umask gives, like any file a program creates.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import re
import shutil
import stat
import tempfile
import time
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import torch
from filelock import FileLock, Timeout

from .errors import KdistillError


def _umask_from_proc() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _umask_at_import() -> int:
    found = _umask_from_proc()
    if found is not None:
        return found
    # Without /proc, os.umask is the only reader and it also sets: swap it once, here, before
    # any background writer thread exists, never at each write.
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


_UMASK_AT_IMPORT = _umask_at_import()


def new_file_mode() -> int:
    """The mode a newly created file gets from the current umask (read from /proc on Linux, without
    changing it; elsewhere the umask at import)."""
    umask = _umask_from_proc()
    return 0o666 & ~(_UMASK_AT_IMPORT if umask is None else umask)


FOLDER_LOCK = ".kdistill.lock"


@contextlib.contextmanager
def folder_in_use(folder: str, hold: bool = True):
    """Create folder and hold its lock file for the block: a second kdistill process given the same
    run or sweep folder is refused at once, instead of training beside the first and overwriting
    its files. The lock is the kernel's (flock): it goes with the process, even a killed one.
    hold False: no lock (another process of the same run holds it)."""
    if not hold:
        yield
        return
    try:
        os.makedirs(folder, exist_ok=True)
        lock = FileLock(os.path.join(folder, FOLDER_LOCK), timeout=0, mode=new_file_mode())
        lock.acquire()
    except Timeout:
        raise KdistillError(f"{folder} is in use by another kdistill process (it holds {FOLDER_LOCK} there); wait "
                            f"for it to finish or stop it, or use another --out") from None
    except OSError as e:
        raise KdistillError(f"cannot write in {folder} ({e.strerror or e}); use another --out") from None
    try:
        yield
    finally:
        lock.release()


# Written in every run and sweep folder kdistill creates: it writes only into folders that hold it
# (or, from earlier versions, its lock file), or are empty, so a user's folder is never overwritten.
RUN_MARKER = ".kdistill-run"


def refuse_foreign_folder(folder: str, force: bool = False, flag: str = "--out") -> None:
    """Refuse, before anything is written, a non-empty folder that kdistill did not create (it holds
    neither the marker nor, from earlier versions, the lock file), unless force."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise KdistillError(f"{flag} {folder} is a file, not a folder; choose a new folder")
    try:
        names = os.listdir(folder) if os.path.isdir(folder) else []
    except OSError as e:
        raise KdistillError(f"cannot read {flag} {folder} ({e.strerror or e})") from None
    if names and RUN_MARKER not in names and FOLDER_LOCK not in names and not force:
        raise KdistillError(f"{flag} {folder} already holds files kdistill did not write (e.g. {sorted(names)[0]!r}): "
                            f"it would overwrite them; choose a new or empty folder, or pass --force to write into "
                            f"it anyway")


def mark_as_ours(folder: str) -> None:
    """Write the marker in a folder kdistill now writes into (see refuse_foreign_folder)."""
    if not os.path.exists(os.path.join(folder, RUN_MARKER)):
        os.makedirs(folder, exist_ok=True)
        atomic_write_text(os.path.join(folder, RUN_MARKER), "A folder kdistill writes into (its run or sweep).\n")


def claim_folder(folder: str, force: bool = False, flag: str = "--out") -> None:
    """refuse_foreign_folder, then mark_as_ours: for a folder no lock guards."""
    refuse_foreign_folder(folder, force, flag)
    mark_as_ours(folder)


TEMPORARY_PREFIX = ".tmp-"
# .tmp-<pid>-<random>-<name>, random from tempfile (atomic writes) or temporary_name (hex).
_PID_TEMPORARY = re.compile(r"\.tmp-(\d+)-[a-z0-9_]+-.")
# Names of earlier versions, without a pid: atomic writes' and data.py's decode temporaries.
_OLD_TEMPORARY = re.compile(r"\.tmp-[a-z0-9_]{8}-.|\..+\.tmp\.npy(\.compact\.npy)?$")
OLD_TEMPORARY_AGE_SECONDS = 24 * 3600


def temporary_name(name: str) -> str:
    """A hidden, unique name for a temporary file this process writes on the way to `name`."""
    return f"{TEMPORARY_PREFIX}{os.getpid()}-{os.urandom(4).hex()}-{name}"


def _process_is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process, or a number no process has: keep the file
    return True


def _is_stale(name: str, modified: float, now: float) -> bool:
    pid_match = _PID_TEMPORARY.match(name)
    if pid_match:
        pid = int(pid_match.group(1))
        return pid != os.getpid() and not _process_is_running(pid)
    return bool(_OLD_TEMPORARY.match(name)) and now - modified > OLD_TEMPORARY_AGE_SECONDS


def _folders_to_clean(folder: str, subfolders: tuple[str, ...] | None):
    """(parent, file names) of folder's files: all of them below it, or where subfolders is given,
    those directly in folder and anywhere below those subfolders only."""
    if subfolders is None:
        yield from ((parent, names) for parent, _, names in os.walk(folder))
        return
    with contextlib.suppress(OSError):
        yield folder, [entry.name for entry in os.scandir(folder) if entry.is_file(follow_symlinks=False)]
    for sub in subfolders:
        yield from ((parent, names) for parent, _, names in os.walk(os.path.join(folder, sub)))


def remove_stale_temporaries(folder: str, log, subfolders: tuple[str, ...] | None = None) -> None:
    """Delete the temporary files of writes that were interrupted under folder (see
    _folders_to_clean): those of a process that no longer runs, and pid-less ones (earlier
    versions) older than a day."""
    count, reclaimed, now = 0, 0, time.time()
    for parent, names in _folders_to_clean(folder, subfolders):
        for name in names:
            if not name.startswith("."):
                continue
            path = os.path.join(parent, name)
            try:
                info = os.lstat(path)
                if stat.S_ISREG(info.st_mode) and _is_stale(name, info.st_mtime, now):
                    os.remove(path)
                    count += 1
                    reclaimed += info.st_size
            except OSError:
                continue  # gone meanwhile, or not ours to remove
    if count:
        log(f"removed {count} temporary file{'s' if count > 1 else ''} of interrupted writes in {folder} "
            f"({reclaimed / 1e6:.1f} MB reclaimed)")


@contextlib.contextmanager
def _atomic_target(path: str):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f"{TEMPORARY_PREFIX}{os.getpid()}-",
                               suffix="-" + os.path.basename(path))
    os.close(fd)
    try:
        os.chmod(tmp, new_file_mode())  # mkstemp makes it private (0600); give it the umask's mode
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def atomic_write(path: str, write: Callable[[str], None], what: str) -> None:
    """Run write(tmp_path), then rename tmp over path. On failure the old file is untouched."""
    try:
        with _atomic_target(path) as tmp:
            write(tmp)
    except OSError as e:
        raise KdistillError(f"could not write {what} {path}: {e.strerror or e}; "
                            f"the previous version, if any, is intact") from None


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", errors="backslashreplace") as f:
            f.write(text)
    atomic_write(path, write, "file")


def _planted_link(path: str) -> KdistillError:
    return KdistillError(f"refusing to write through {path}: it is a symbolic link, and kdistill writes only what "
                         f"it created in a run folder; remove the link")


def refuse_link(path: str) -> None:
    """A folder a run writes into must not be a symbolic link planted in a received run folder:
    writing there would land outside it."""
    if os.path.islink(path):
        raise _planted_link(path)


# Linux and macOS; elsewhere (Windows) 0, where symbolic links need privileges to make.
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def append_text(path: str, text: str) -> None:
    """Append to a log file, never through a symbolic link at path (O_NOFOLLOW)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW, 0o666)  # the umask applies
    except OSError:
        if os.path.islink(path):
            raise _planted_link(path) from None
        raise
    with open(fd, "a", encoding="utf-8") as f:
        f.write(text)


def save_torch(obj: Any, path: str, what: str = "checkpoint") -> None:
    def write(tmp: str) -> None:
        # Through a file object, torch names the archive's inner folder "archive" rather than
        # after the (pid-stamped) temporary file: the same content always gives the same bytes.
        with open(tmp, "wb") as f:
            try:
                torch.save(obj, f)
            except RuntimeError as e:  # how torch's archive writer reports a failed write (a full disk)
                if "inline_container" not in str(e) and "PytorchStreamWriter" not in str(e):
                    raise
                free_mb = shutil.disk_usage(os.path.dirname(tmp)).free / 1e6
                raise OSError(f"the write failed ({free_mb:.0f} MB free on its disk)") from None
    atomic_write(path, write, what)


def save_weights(state: dict[str, torch.Tensor], path: str, twin: str, what: str) -> None:
    """save_torch(state, path), except where the file twin (a model's best.pt) holds the same tensors:
    then path is a hard link to it, so a run folder keeps each model's weights once on disk."""
    try:
        saved = load_torch(twin, what=what) if os.path.exists(twin) else None
    except KdistillError:
        saved = None
    if (isinstance(saved, dict) and saved.keys() == state.keys()
            and all(torch.equal(saved[key], value.detach().cpu()) for key, value in state.items())):
        temporary = os.path.join(os.path.dirname(path), temporary_name(os.path.basename(path)))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            os.link(twin, temporary)
            os.replace(temporary, path)
            return
        except OSError:  # a file system without hard links: write the copy
            if os.path.exists(temporary):
                os.remove(temporary)
    save_torch(state, path, what=what)


def snapshot(obj: Any) -> Any:
    """A copy of nested containers whose tensors are copied to the CPU: later in-place updates
    (an optimizer step) cannot change it."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {key: snapshot(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(value) for value in obj)
    return obj


class BackgroundSaver:
    """Runs file writes on one background thread, so training goes on while a checkpoint reaches
    the disk. One write is in flight at most: submit() first waits for the previous one (and
    re-raises its error, if any), then snapshots the arguments, so training may change them."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdistill-save")
        self._pending: Future | None = None

    def submit(self, write: Callable[..., None], *args: Any) -> None:
        self.wait()
        self._pending = self._executor.submit(write, *snapshot(args))

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Let the write in flight finish (an interrupted run keeps its last epoch), then stop."""
        self._executor.shutdown(wait=True)


def load_torch(path: str, what: str = "checkpoint", map_location: str = "cpu") -> Any:
    """torch.load with weights_only=True: tensors and plain containers only, never arbitrary code."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsupported content"
        raise KdistillError(f"refusing {what} {path}: it holds more than weights ({first[:160]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KdistillError(f"{what} {path} is unreadable or corrupt ({message[:160]})") from None


def file_sha256(path: str, chunk_bytes: int = 16 << 20) -> str:
    """sha256 of a file's bytes, read in chunks (memory stays flat whatever the file's size)."""
    digest = hashlib.sha256()
    buffer = bytearray(chunk_bytes)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while count := f.readinto(buffer):
            digest.update(view[:count])
    return digest.hexdigest()


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """A hash of named tensors (names, shapes, dtypes, values), independent of file format."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
