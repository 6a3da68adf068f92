"""The data cache is sized before it is written: too little free space, or an absurd image_size, is
refused in one line before any array file exists (issue 25, item 10)."""
import errno
import os
import re
import shutil

import pytest

import kdistill.data
from conftest import write_digits_dataset
from kdistill.data import prepare
from kdistill.errors import KdistillError


def arrays_under(folder) -> list[str]:
    return [name for _, _, names in os.walk(folder) for name in names if name.endswith(".npy")]


def test_too_little_free_space_is_refused_in_one_line_before_any_array_is_written(tmp_path, monkeypatch):
    data_dir = write_digits_dataset(str(tmp_path / "data"), ["zero", "one"], {"train": 4, "val": 2}, test=0)
    cache = str(tmp_path / "cache")
    real_usage = shutil.disk_usage
    seen = []

    def little_free(path):
        seen.append(os.fspath(path))
        return real_usage(path)._replace(free=3_000_000)  # 3 MB: less than the data (0.01 MB) and its margin
    monkeypatch.setattr(shutil, "disk_usage", little_free)  # the module kdistill.data asks
    with pytest.raises(KdistillError) as caught:
        prepare(data_dir, 16, cache, workers=1, log=lambda m: None)
    message = str(caught.value)
    assert "\n" not in message and cache in message and "cache_dir" in message and "image_size" in message
    assert re.search(r"needs \d+ MB .*, 3 MB free", message), message
    assert seen and arrays_under(cache) == []
    # Nothing is lost: with space again, the same call builds the cache.
    monkeypatch.setattr(shutil, "disk_usage", real_usage)
    built = prepare(data_dir, 16, cache, workers=1, log=lambda m: None)
    assert len(built.splits["train"].files) == 8 and sorted(arrays_under(cache)) == ["train.npy", "val.npy"]


def test_an_absurd_image_size_is_refused_in_one_line_before_decoding(tmp_path, monkeypatch):
    data_dir = write_digits_dataset(str(tmp_path / "data"), ["zero", "one"], {"train": 2, "val": 1}, test=0)
    cache = str(tmp_path / "cache")

    def never(*args):
        raise AssertionError("decoding started")
    monkeypatch.setattr(kdistill.data, "_decode_split", never)
    with pytest.raises(KdistillError) as caught:
        prepare(data_dir, 100_000, cache, workers=1, log=lambda m: None)
    message = str(caught.value)
    assert "\n" not in message and "image_size" in message and "100000" in message
    assert arrays_under(cache) == []


@pytest.mark.skipif(not hasattr(os, "posix_fallocate"), reason="the arrays' blocks are allocated where the OS can")
def test_a_disk_that_fills_while_decoding_gives_one_line_and_its_space_back(tmp_path, monkeypatch):
    # The free-space check passed, then another writer filled the disk: allocating the second
    # split's array fails. Written through a sparse memory map instead, the process died of SIGBUS.
    data_dir = write_digits_dataset(str(tmp_path / "data"), ["zero", "one"], {"train": 4, "val": 2}, test=0)
    cache = str(tmp_path / "cache")
    real_allocate, calls = os.posix_fallocate, []

    def fill_up(fd, offset, length):
        calls.append(length)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_allocate(fd, offset, length)
    monkeypatch.setattr(os, "posix_fallocate", fill_up)
    with pytest.raises(KdistillError) as caught:
        prepare(data_dir, 16, cache, workers=1, log=lambda m: None)
    message = str(caught.value)
    assert "\n" not in message and "not enough free space" in message and cache in message
    assert len(calls) == 2
    left = [name for _, _, names in os.walk(cache) for name in names if not name.endswith((".json", ".lock"))]
    assert left == []  # neither the temporary nor the finished train.npy of the incomplete entry
