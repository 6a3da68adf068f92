"""`kdistill export --run` on a received run folder (issue 25, item 5): it uses the user's data
cache ($KDISTILL_CACHE), never the cache_dir in the run's config.yaml, and it refuses a data folder
whose classes or file counts are not the run's (its data.json) before hashing any file."""
from __future__ import annotations

import os
import shutil

import pytest
import yaml

import kdistill
from conftest import tiny_settings, write_digits_dataset
from kdistill.cli import main
from kdistill.data_key import INDEX_FOLDER


@pytest.fixture(scope="module")
def finished_run(digits_dataset, tmp_path_factory):
    """A tiny finished run whose cache is the folder A."""
    base = tmp_path_factory.mktemp("received")
    out = str(base / "run")
    kdistill.run(tiny_settings(digits_dataset, out, str(base / "cache-a"), baseline=False,
                               teacher={"epochs": 1}, student={"epochs": 1, "lr_step": 0}))
    return out


def received(finished_run: str, folder, **changes) -> str:
    """A copy of the run whose config.yaml has changes (e.g. cache_dir, data)."""
    run = str(folder / "received")
    shutil.copytree(finished_run, run)
    path = os.path.join(run, "config.yaml")
    with open(path, encoding="utf-8") as f:
        settings = yaml.safe_load(f)
    settings.update(changes)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(settings, f)
    return run


def test_export_uses_the_users_cache_not_the_runs(finished_run, tmp_path, monkeypatch, capsys):
    elsewhere, user_cache = tmp_path / "cache-b", tmp_path / "cache-c"
    run = received(finished_run, tmp_path, cache_dir=str(elsewhere))
    monkeypatch.setenv("KDISTILL_CACHE", str(user_cache))
    assert main(["export", "--run", run, "--repeats", "1"]) == 0, capsys.readouterr().err
    assert not elsewhere.exists()
    assert os.listdir(user_cache / INDEX_FOLDER) and any(len(name) == 24 for name in os.listdir(user_cache))
    assert os.path.exists(os.path.join(run, "student-int8.onnx"))


@pytest.mark.parametrize("change", ["other classes", "a file less"])
def test_export_refuses_other_data_before_hashing_it(finished_run, digits_dataset, tmp_path, monkeypatch, capsys,
                                                     change):
    if change == "other classes":
        data = write_digits_dataset(str(tmp_path / "other"), ["three", "four", "five"], {"train": 24, "val": 8}, 10)
    else:
        data = str(tmp_path / "other")
        shutil.copytree(digits_dataset, data)
        os.remove(os.path.join(data, "train", "two", sorted(os.listdir(os.path.join(data, "train", "two")))[0]))
    elsewhere, user_cache = tmp_path / "cache-b", tmp_path / "cache-c"
    run = received(finished_run, tmp_path, cache_dir=str(elsewhere), data=data)
    monkeypatch.setenv("KDISTILL_CACHE", str(user_cache))

    def no_hashing(*args, **kwargs):
        raise AssertionError("a file of the data folder was hashed")
    monkeypatch.setattr("kdistill.data_key._digest", no_hashing)
    assert main(["export", "--run", run]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and data in lines[0] and "changed since the run" in lines[0], lines
    assert ("3 classes: 'five', 'four', 'three' now" if change == "other classes" else "images per split") in lines[0]
    assert not elsewhere.exists() and not user_cache.exists()
