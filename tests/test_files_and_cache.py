"""Written files get the umask's mode, a cache can be shared between users, leftovers of
interrupted writes are removed, and `kdistill cache` lists and clears entries."""
import contextlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

import kdistill.data
from conftest import ROOT, tiny_settings
from kdistill.cli import main
from kdistill.config import build_config
from kdistill.data import prepare
from kdistill.data_key import INDEX_FOLDER
from kdistill.errors import KdistillError
from kdistill.fileio import RUN_MARKER, atomic_write, atomic_write_text, remove_stale_temporaries, save_torch
from kdistill.pipeline import run

DAY = 24 * 3600


def make_images(root: str, classes=("cat", "dog"), train: int = 3, val: int = 2, seed: int = 0) -> str:
    """A tiny dataset of random 20 px PNGs: `train` + `val` images per class."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        for name in classes:
            os.makedirs(os.path.join(root, split, name))
            for index in range(count):
                pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(root, split, name, f"{index}.png"))
    return root


@contextlib.contextmanager
def umask(mask: int):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def dead_pid() -> int:
    """The pid of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def write_bytes(path: str, count: int, age: float = 0.0) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"\0" * count)
    if age:
        then = time.time() - age
        os.utime(path, (then, then))


def cache_command(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["cache", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o002, 0o664)])
def test_written_files_and_a_whole_data_cache_get_the_mode_of_the_umask(tmp_path, mask, expected):
    data_dir = make_images(str(tmp_path / "data"))
    with umask(mask):
        atomic_write_text(str(tmp_path / "run" / "report.md"), "# report\n")
        save_torch({"weight": torch.zeros(3)}, str(tmp_path / "run" / "student.pt"))
        data = prepare(data_dir, 16, str(tmp_path / "cache"), workers=1, log=lambda m: None)
    written = [tmp_path / "run" / "report.md", tmp_path / "run" / "student.pt", data.folder + ".lock",
               *(os.path.join(data.folder, name) for name in ("meta.json", "train.npy", "val.npy"))]
    assert {str(path): oct(mode(path)) for path in written} == {str(path): oct(expected) for path in written}


def test_a_cache_built_by_one_user_is_reused_by_another_who_cannot_write_it(tmp_path):
    shared = tempfile.mkdtemp(prefix="kdistill-shared-")  # pytest's tmp_path is private to its owner
    try:
        os.chmod(shared, 0o755)
        with umask(0o022):
            data_dir = make_images(os.path.join(shared, "data"))
            cache = os.path.join(shared, "cache")
            built = prepare(data_dir, 16, cache, workers=1, log=lambda m: None)
        assert mode(os.path.join(built.folder, "meta.json")) == 0o644
        if os.geteuid() != 0:
            return  # only root can act as a second user; the modes above are what sharing needs
        # The interpreter may sit in a folder only root can read (here /root/.pyenv), so the child
        # starts as root, imports, then becomes nobody (uid/gid 65534) before touching the cache.
        second_user = (
            "import os, sys\n"
            "from kdistill.data import prepare\n"
            "from kdistill.errors import KdistillError\n"
            "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
            "data = prepare(sys.argv[1], 16, sys.argv[2], workers=1)\n"
            "print('images', len(data.splits['train'].files), data.key, os.geteuid())\n"
            "try:\n"
            "    prepare(sys.argv[1], 24, sys.argv[2], workers=1)\n"
            "except KdistillError as e:\n"
            "    print('error:', e)\n")
        env = dict(os.environ, PYTHONPATH=ROOT, HOME=shared, PYTHONDONTWRITEBYTECODE="1")
        result = subprocess.run([sys.executable, "-c", second_user, data_dir, cache], cwd=shared, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        assert "reusing the data cache" in result.stdout
        assert f"images 6 {built.key} 65534" in result.stdout
        # Another image size would need a new entry, which this user cannot write: one clear line.
        error = [line for line in result.stdout.splitlines() if line.startswith("error:")]
        assert len(error) == 1 and cache in error[0] and "cache_dir" in error[0], result.stdout
    finally:
        shutil.rmtree(shared)


def test_temporaries_carry_the_writers_pid(tmp_path, monkeypatch):
    names = []

    def write(tmp: str) -> None:
        names.append(os.path.basename(tmp))
        open(tmp, "w").close()
    atomic_write(str(tmp_path / "metrics.json"), write, "metrics")
    decode = kdistill.data._decode_split

    def recording_decode(*args):
        names.append(os.path.basename(args[4]))
        return decode(*args)
    monkeypatch.setattr(kdistill.data, "_decode_split", recording_decode)
    prepare(make_images(str(tmp_path / "data")), 16, str(tmp_path / "cache"), workers=1, log=lambda m: None)
    assert len(names) == 3 and all(name.startswith(f".tmp-{os.getpid()}-") for name in names), names


def test_stale_temporaries_of_dead_writers_are_removed_and_others_kept(tmp_path):
    run_dir = str(tmp_path / "run")
    dead, alive = dead_pid(), os.getppid()
    stale = [f".tmp-{dead}-ab_cd123-student.pt", f"checkpoints/student/.tmp-{dead}-0123abcd-last.pt",
             ".tmp-k3j_x9q2-report.md", ".train.tmp.npy.compact.npy"]
    kept = [f".tmp-{alive}-ab_cd123-student.pt", f".tmp-{os.getpid()}-ab_cd123-teacher.pt",
            ".tmp-z8y7x6w5-metrics.json", "report.md", ".hidden", f"checkpoints/student/tmp-{dead}-x-last.pt"]
    for index, name in enumerate(stale):
        write_bytes(os.path.join(run_dir, name), 1_000_000, age=2 * DAY if index >= 2 else 0)
    for name in kept:
        write_bytes(os.path.join(run_dir, name), 10, age=60)  # pid-less ones younger than a day stay
    messages = []
    remove_stale_temporaries(run_dir, messages.append)
    assert [os.path.exists(os.path.join(run_dir, name)) for name in stale] == [False] * len(stale)
    assert [os.path.exists(os.path.join(run_dir, name)) for name in kept] == [True] * len(kept)
    assert len(messages) == 1 and "removed 4 temporary files" in messages[0] and "4.0 MB" in messages[0]
    remove_stale_temporaries(run_dir, messages.append)
    assert len(messages) == 1  # nothing to remove: nothing said


def test_prepare_and_run_remove_leftovers_in_the_cache_entry_and_the_run_folder(tmp_path, monkeypatch):
    data_dir = make_images(str(tmp_path / "data"))
    cache = str(tmp_path / "cache")
    data = prepare(data_dir, 16, cache, workers=1, log=lambda m: None)
    dead = dead_pid()
    leftovers = [os.path.join(data.folder, f".tmp-{dead}-0a1b2c3d-train.npy"),
                 os.path.join(data.folder, "signal", f".tmp-{dead}-q1w2e3r4-logits-x.pt")]
    for path in leftovers:
        write_bytes(path, 2_000_000)
    messages = []
    prepare(data_dir, 16, cache, workers=1, log=messages.append)
    assert not any(os.path.exists(path) for path in leftovers)
    assert any("removed 2 temporary files" in m and "4.0 MB" in m for m in messages), messages
    assert any("reusing the data cache" in m for m in messages)

    out = str(tmp_path / "run")
    leftover = os.path.join(out, "checkpoints", "teacher", f".tmp-{dead}-a1b2c3d4-last.pt")
    write_bytes(leftover, 1000)
    write_bytes(os.path.join(out, RUN_MARKER), 0)  # a folder an interrupted run had made its own
    cfg = build_config(overrides=tiny_settings(data_dir, out, cache, teacher={"weights": "imagenet"}))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(KdistillError, match="offline"):
        run(cfg, log=messages.append)  # stops at the offline teacher weights, after the cleanup
    assert not os.path.exists(leftover)


def test_cache_list_shows_each_entry_and_clear_removes_one_or_all(tmp_path, capsys):
    cache = str(tmp_path / "cache")
    cats = prepare(make_images(str(tmp_path / "cats")), 16, cache, workers=1, log=lambda m: None)
    birds_dir = make_images(str(tmp_path / "birds"), classes=("crow", "owl", "wren"), train=4, val=1)
    birds = prepare(birds_dir, 24, cache, workers=1, log=lambda m: None)
    write_bytes(os.path.join(birds.folder, "signal", "logits-abc.pt"), 3_000_000)  # counts in its size
    # An entry of an earlier version has no source; last use is meta.json's mtime, renewed on reuse.
    meta_path = os.path.join(cats.folder, "meta.json")
    with open(meta_path) as f:
        meta = json.load(f)
    del meta["source"]
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    os.utime(meta_path, (1e9, 1e9))
    code, out, _ = cache_command(capsys, "--list", "--cache-dir", cache)
    assert code == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[0] in (cats.key, birds.key)}
    birds_size = sum(os.path.getsize(os.path.join(parent, name))
                     for parent, _, names in os.walk(birds.folder) for name in names)
    assert rows[birds.key][1:5] == [f"{birds_size / 1e6:.1f}", "24", "3", "15"]
    assert rows[birds.key][-1] == birds_dir and birds_size > 3_000_000
    assert rows[cats.key][2:5] == ["16", "2", "10"] and rows[cats.key][-1] == "?"
    assert rows[cats.key][5].startswith("2001-")  # last use: 1e9 s is September 2001
    assert re.search(r"^total: 2 entries, [\d.]+ MB in " + re.escape(cache), out, re.M)
    prepare(str(tmp_path / "cats"), 16, cache, workers=1, log=lambda m: None)
    assert os.path.getmtime(meta_path) > time.time() - 600

    code, out, _ = cache_command(capsys, "--clear", cats.key, "--cache-dir", cache)
    assert code == 0 and f"removed {cats.key}" in out
    assert sorted(os.listdir(cache)) == [birds.key, birds.key + ".lock", INDEX_FOLDER]  # the index stays
    code, out, err = cache_command(capsys, "--clear", "0123456789abcdef01234567", "--cache-dir", cache)
    assert code == 2 and "no cache entry '0123456789abcdef01234567'" in err and "kdistill cache --list" in err
    code, out, _ = cache_command(capsys, "--clear", "--cache-dir", cache)
    assert code == 0 and f"removed {birds.key}" in out and f"reclaimed {birds_size / 1e6:.1f} MB" in out
    assert "removed the index of file hashes" in out and os.listdir(cache) == []
    code, out, _ = cache_command(capsys, "--cache-dir", cache)
    assert code == 0 and out.splitlines()[-1] == f"total: 0 entries, 0.0 MB in {cache}"


def test_cache_clear_skips_an_entry_in_use_and_refuses_a_folder_that_is_not_a_cache(tmp_path, capsys):
    cache = str(tmp_path / "cache")
    data = prepare(make_images(str(tmp_path / "data")), 16, cache, workers=1, log=lambda m: None)
    hold_the_lock = ("import sys, time\nfrom filelock import FileLock\nlock = FileLock(sys.argv[1])\n"
                     "lock.acquire()\nprint('held', flush=True)\ntime.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", hold_the_lock, data.folder + ".lock"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, out, _ = cache_command(capsys, "--clear", "--cache-dir", cache)
    finally:
        holder.kill()
        holder.wait()
    assert code == 0 and f"skipped {data.key}: a running kdistill holds its lock" in out
    assert "reclaimed 0.0 MB from 0 entries" in out and os.path.isfile(os.path.join(data.folder, "meta.json"))

    with open(os.path.join(cache, "notes.txt"), "w") as f:
        f.write("mine")
    code, _, err = cache_command(capsys, "--clear", "--cache-dir", cache)
    assert code == 2 and "refusing to clear" in err and "notes.txt" in err
    assert sorted(os.listdir(cache)) == sorted([data.key, data.key + ".lock", "notes.txt"])


def test_a_checkpoint_that_does_not_fit_on_the_disk_is_one_line_and_the_previous_one_stays(tmp_path):
    # A file size limit makes every write past 1 MB fail as a full disk would.
    path = tmp_path / "last.pt"
    script = f"""
import resource, signal, sys, torch
from kdistill.errors import KdistillError
from kdistill.fileio import save_torch
save_torch({{"epoch": 1}}, {str(path)!r})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
try:
    save_torch({{"epoch": 2, "weights": torch.zeros(1 << 20)}}, {str(path)!r})
except KdistillError as e:
    sys.exit(str(e))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    message = result.stderr.strip()
    assert result.returncode == 1 and "\n" not in message, result.stderr
    assert message.startswith(f"could not write checkpoint {path}: the write failed (") and "MB free" in message
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary left behind
