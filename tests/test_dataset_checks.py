"""A dataset that cannot make a classifier is refused up front, in one line naming the folder
(issue 25, item 13): fewer than two classes, or a class with no usable training image."""
import os

import pytest

from conftest import tiny_settings, write_digits_dataset
from kdistill import cli
from kdistill.data import prepare, scan_dataset
from kdistill.errors import KdistillError


def refusal(data_dir: str) -> str:
    with pytest.raises(KdistillError) as caught:
        scan_dataset(data_dir)
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("with_val", [True, False])
def test_a_single_class_is_refused_naming_the_training_folder_and_the_class(tmp_path, with_val):
    data_dir = write_digits_dataset(str(tmp_path / "data"), ["zero"], {"train": 6, "val": 2} if with_val
                                    else {"train": 8}, test=0)
    message = refusal(data_dir)
    assert os.path.join(data_dir, "train") in message and "'zero'" in message and "two" in message


def test_a_single_class_run_stops_with_one_line_before_training(tmp_path, capsys):
    import yaml

    data_dir = write_digits_dataset(str(tmp_path / "data"), ["zero"], {"train": 6, "val": 2}, test=0)
    out = tmp_path / "run"
    config = tmp_path / "settings.yaml"
    config.write_text(yaml.safe_dump(tiny_settings(data_dir, str(out), str(tmp_path / "cache"))))
    assert cli.main(["run", "--config", str(config)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdistill: error:") and "'zero'" in lines[0], lines
    assert not (out / "checkpoints").exists() and not (out / "models").exists()


def test_a_val_class_whose_training_folder_holds_no_usable_image_is_named(tmp_path):
    data_dir = write_digits_dataset(str(tmp_path / "data"), ["zero", "one", "two"], {"train": 3, "val": 2}, test=0)
    train_two = os.path.join(data_dir, "train", "two")
    for name in os.listdir(train_two):
        os.remove(os.path.join(train_two, name))
    with open(os.path.join(train_two, "notes.txt"), "w") as f:
        f.write("not an image\n")
    message = refusal(data_dir)
    assert train_two in message and "notes.txt" in message
    # --skip-bad cannot help either, and nothing is decoded before the refusal.
    cache = str(tmp_path / "cache")
    with pytest.raises(KdistillError, match="no usable images"):
        prepare(data_dir, 16, cache, workers=1, skip_bad=True, log=lambda m: None)
    assert not any(name.endswith(".npy") for _, _, names in os.walk(cache) for name in names)


def test_an_empty_training_class_folder_is_still_named(tmp_path):
    data_dir = write_digits_dataset(str(tmp_path / "data"), ["zero", "one"], {"train": 3}, test=0)
    os.makedirs(os.path.join(data_dir, "train", "two"))
    message = refusal(data_dir)
    assert os.path.join(data_dir, "train", "two") in message and "no images" in message


def test_folders_nested_1100_deep_are_one_line_not_a_recursion_error(digits_dataset, tmp_path, capsys):
    import shutil

    from kdistill.cli import main

    data = tmp_path / "data"
    shutil.copytree(digits_dataset, data)
    chain = [data / "test"]
    for _ in range(1100):
        chain.append(chain[-1] / "d")
        chain[-1].mkdir()
    try:
        code = main(["run", "--data", str(data), "--out", str(tmp_path / "run"), "--set", "image_size=16",
                     "--set", f"cache_dir={tmp_path / 'cache'}", "--set", "teacher.epochs=1",
                     "--set", "student.epochs=1", "--set", "teacher.weights=none"])
        error = capsys.readouterr().err.strip()
        assert code == 2 and len(error.splitlines()) == 1 and "nested more than 64 folders deep" in error, error
    finally:  # shutil.rmtree (pytest's clean-up included) recurses once per level too
        for folder in reversed(chain[1:]):
            folder.rmdir()
