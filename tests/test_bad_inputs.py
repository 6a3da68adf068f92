"""Bad input files and folders: each is refused in one line naming it, or skipped where asked.

Every test builds its own files under tmp_path with Pillow/NumPy; nothing is downloaded.
"""
from __future__ import annotations

import csv
import os

import numpy as np
import pytest
import torch
from PIL import Image

from image_files import SIZE, make_dataset, noise, png_declaring, quiet_prepare, save_rgb
from kdistill import cli
from kdistill.data import list_images, scan_dataset
from kdistill.errors import KdistillError
from kdistill.images import load_image


# ---------------------------------------------------------------- bad files, through prepare()


def write_zero_bytes(path):
    path.write_bytes(b"")


def write_truncated_jpeg(path):
    full = path.with_name("full.tmp")
    Image.fromarray(noise(64, 64, 11)).save(full, format="JPEG", quality=90)
    data = full.read_bytes()
    full.unlink()
    path.write_bytes(data[: len(data) // 2])


def write_random_bytes(path):
    data = np.random.default_rng(12).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    path.write_bytes(b"\x00garbage" + data)


def write_text(path):
    path.write_text("this is not a picture\nit is a text file with a .png name\n")


def write_bomb(path):
    path.write_bytes(png_declaring(60000, 60000))


def write_self_symlink(path):
    os.symlink(path.name, path)  # the link points to itself


def write_broken_symlink(path):
    os.symlink("does-not-exist.png", path)


def write_fifo(path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    os.mkfifo(path)  # opening it would block forever


BAD = {
    "zero-byte": ("empty.jpg", write_zero_bytes, None),
    "truncated-jpeg": ("truncated.jpg", write_truncated_jpeg, "truncated"),
    "random-bytes-jpg": ("random.jpg", write_random_bytes, "not a readable image"),
    "text-as-png": ("notes.png", write_text, "not a readable image"),
    "decompression-bomb": ("bomb.png", write_bomb, "max_image_pixels"),
    "self-symlink": ("loop.jpg", write_self_symlink, "symlink loop"),
    "broken-symlink": ("dangling.png", write_broken_symlink, "broken symlink"),
    "fifo": ("pipe.png", write_fifo, "not a regular file"),
}


def dataset_with_bad_file(tmp_path, kind):
    """The small two-class dataset with one bad file of the given kind in train/dog/."""
    name, write, _ = BAD[kind]
    data = make_dataset(tmp_path / "data")
    bad = tmp_path / "data" / "train" / "dog" / name
    write(bad)
    return data, bad


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_file_refused_in_one_line_naming_it(tmp_path, kind):
    reason = BAD[kind][2]
    data, bad = dataset_with_bad_file(tmp_path, kind)
    with pytest.raises(KdistillError) as caught:
        quiet_prepare(data, tmp_path)
    message = str(caught.value)
    assert str(bad) in message
    assert "\n" not in message and "\r" not in message
    if reason:
        assert reason in message


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_file_skipped_with_skip_bad(tmp_path, kind):
    name = BAD[kind][0]
    data, bad = dataset_with_bad_file(tmp_path, kind)
    prepared = quiet_prepare(data, tmp_path, skip_bad=True)
    assert [path for path, _ in prepared.skipped] == [str(bad)]
    train = prepared.splits["train"]
    assert len(train.files) == 6 and len(train.images) == 6
    assert name not in {os.path.basename(f) for f in train.files}
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_bad_files_in_val_and_test_are_named_and_skipped(tmp_path):
    data = make_dataset(tmp_path / "data")
    (tmp_path / "data" / "test").mkdir()
    save_rgb(tmp_path / "data" / "test" / "good.png")
    bad_val = tmp_path / "data" / "val" / "cat" / "broken.jpg"
    bad_test = tmp_path / "data" / "test" / "broken.png"
    write_zero_bytes(bad_val)
    write_text(bad_test)
    with pytest.raises(KdistillError, match="and 1 more bad file"):
        quiet_prepare(data, tmp_path)
    prepared = quiet_prepare(data, tmp_path, skip_bad=True)
    assert sorted(path for path, _ in prepared.skipped) == sorted([str(bad_val), str(bad_test)])
    assert prepared.splits["test"].files == ["good.png"]
    assert len(prepared.splits["val"].files) == 4


def test_cli_refuses_a_corrupt_image_before_training(tmp_path, capsys):
    data = make_dataset(tmp_path / "data")
    bad = tmp_path / "data" / "train" / "cat" / "corrupt.jpg"
    write_truncated_jpeg(bad)
    out, cache = tmp_path / "run", tmp_path / "cache"
    code = cli.main(["run", "--data", data, "--out", str(out), "--set", "image_size=16",
                     "--set", f"cache_dir={cache}", "--set", "teacher.weights=none"])
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("kdistill: error:") and str(bad) in lines[0]
    assert not (out / "checkpoints").exists()
    assert not (out / "models").exists()


# ---------------------------------------------------------------- folder layout oddities


def test_empty_class_folder_is_named(tmp_path):
    data = make_dataset(tmp_path / "data")
    empty = tmp_path / "data" / "train" / "bird"
    empty.mkdir()
    (empty / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")  # litter doesn't count as an image
    with pytest.raises(KdistillError) as caught:
        quiet_prepare(data, tmp_path)
    assert str(empty) in str(caught.value) and "no images" in str(caught.value)


def test_empty_val_class_folder_is_named(tmp_path):
    data = make_dataset(tmp_path / "data")
    empty = tmp_path / "data" / "val" / "dog"
    for f in empty.iterdir():
        f.unlink()
    with pytest.raises(KdistillError) as caught:
        scan_dataset(data)
    assert str(empty) in str(caught.value)


def test_val_class_missing_from_train_is_named(tmp_path):
    data = make_dataset(tmp_path / "data")
    (tmp_path / "data" / "val" / "horse").mkdir()
    save_rgb(tmp_path / "data" / "val" / "horse" / "h.png")
    with pytest.raises(KdistillError) as caught:
        quiet_prepare(data, tmp_path)
    message = str(caught.value)
    assert "'horse'" in message and "\n" not in message


def test_hidden_files_and_os_litter_are_ignored(tmp_path):
    data = make_dataset(tmp_path / "data")
    (tmp_path / "data" / "test").mkdir()
    save_rgb(tmp_path / "data" / "test" / "t.png")
    litter = {
        ".DS_Store": b"\x00\x00\x00\x01Bud1\x00",
        "Thumbs.db": b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1",
        "desktop.ini": b"[.ShellClassInfo]\r\n",
        "._cat0.png": b"\x00\x05\x16\x07AppleDouble",  # macOS resource fork, named like an image
        ".hidden.jpg": b"not an image",
    }
    for folder in ("train", "train/cat", "val/dog", "test"):
        for name, content in litter.items():
            (tmp_path / "data" / folder / name).write_bytes(content)
    (tmp_path / "data" / "train" / ".git").mkdir()  # a hidden folder is not a class
    (tmp_path / "data" / "train" / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    macosx = tmp_path / "data" / "train" / "__MACOSX" / "cat"  # zip litter is not a class either
    macosx.mkdir(parents=True)
    (macosx / "._cat0.png").write_bytes(b"\x00\x05\x16\x07")
    hidden_dir = tmp_path / "data" / "test" / ".cache"
    hidden_dir.mkdir()
    write_zero_bytes(hidden_dir / "x.jpg")

    prepared = quiet_prepare(data, tmp_path)
    assert prepared.skipped == []
    assert prepared.classes == ["cat", "dog"]
    assert len(prepared.splits["train"].files) == 6
    assert len(prepared.splits["val"].files) == 4
    assert prepared.splits["test"].files == ["t.png"]


def test_symlink_loops_end_and_a_looping_file_is_bad(tmp_path):
    data = make_dataset(tmp_path / "data")
    cat = tmp_path / "data" / "train" / "cat"
    os.symlink("..", cat / "up")  # a folder link to the folder holding cat/: would list dog as cat
    os.symlink(".", cat / "here")  # a folder link to its own folder
    test = tmp_path / "data" / "test" / "nested"
    test.mkdir(parents=True)
    save_rgb(test / "t.png")
    os.symlink("..", test / "back")  # points to test/, which is being scanned
    os.symlink("self.png", test / "self.png")  # a file link to itself

    files, rejected = list_images(str(cat))
    assert files == ["cat0.png", "cat1.png", "cat2.png"] and rejected == []

    with pytest.raises(KdistillError) as caught:
        quiet_prepare(data, tmp_path)
    assert str(test / "self.png") in str(caught.value)

    prepared = quiet_prepare(data, tmp_path, skip_bad=True)
    assert [path for path, _ in prepared.skipped] == [str(test / "self.png")]
    assert prepared.splits["train"].files == ["cat/cat0.png", "cat/cat1.png", "cat/cat2.png",
                                              "dog/dog0.png", "dog/dog1.png", "dog/dog2.png"]
    assert prepared.splits["test"].files == ["nested/t.png"]


def test_folder_symlink_to_another_folder_is_followed_once(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    save_rgb(elsewhere / "e.png")
    root = tmp_path / "test"
    root.mkdir()
    os.symlink(elsewhere, root / "a")
    os.symlink(elsewhere, root / "b")  # the same real folder twice: its files are listed once
    assert list_images(str(root)) == (["a/e.png"], [])


def test_unreadable_folder_is_reported_not_silently_dropped(tmp_path, monkeypatch):
    root = tmp_path / "test"
    (root / "locked").mkdir(parents=True)
    save_rgb(root / "ok.png")
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)
    monkeypatch.setattr(os, "scandir", scandir)
    files, rejected = list_images(str(root))
    assert files == ["ok.png"]
    assert rejected == [(str(root / "locked"), "unreadable folder (Permission denied)")]


def test_nested_test_folders_and_duplicate_names_stay_apart(tmp_path):
    data = make_dataset(tmp_path / "data")
    test = tmp_path / "data" / "test"
    for folder, seed in (("a", 21), ("b", 22), ("a/deeper/still", 23)):
        (test / folder).mkdir(parents=True)
        save_rgb(test / folder / "img.png", seed=seed)
    save_rgb(test / "top.png", seed=24)
    nested = tmp_path / "data" / "train" / "cat" / "more" / "inside"
    nested.mkdir(parents=True)
    save_rgb(nested / "cat9.png", seed=25)

    prepared = quiet_prepare(data, tmp_path)
    files = prepared.splits["test"].files
    assert files == ["a/deeper/still/img.png", "a/img.png", "b/img.png", "top.png"]
    images = prepared.splits["test"].images
    assert not torch.equal(images[1], images[2])  # same name, different files, different pixels
    for i, name in enumerate(files):
        assert np.array_equal(images[i].numpy(), load_image(str(test / name), SIZE))
    assert "cat/more/inside/cat9.png" in prepared.splits["train"].files
    assert len(prepared.splits["train"].files) == 7


# ---------------------------------------------------------------- predictions


@pytest.fixture(scope="module")
def student_run(tmp_path_factory):
    """A finished-run folder holding a tiny student bundle, for `kdistill predict`."""
    from kdistill.export import save_bundle
    from kdistill.models import Standardized, build_model

    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model, _ = build_model("mobilenet_v3_small", 2)
    save_bundle(str(run / "student.pt"), Standardized(model, [0.5] * 3, [0.25] * 3).eval(), "mobilenet_v3_small",
                0.0, ["cat", "dog"], SIZE, "dataset")
    return str(run)


def read_predictions(path) -> list[str]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["filename", "label", "confidence"]
    assert all(row[1] in ("cat", "dog") for row in rows[1:])
    return [row[0] for row in rows[1:]]


def test_non_utf8_file_name_decodes_and_is_predicted(tmp_path, student_run):
    from kdistill.evaluate import write_predictions
    from kdistill.predict import Reading, predict_folder

    data = make_dataset(tmp_path / "data")
    test = tmp_path / "data" / "test"
    test.mkdir()
    raw_names = [b"caf\xe9.png", b"plain.png"]
    try:
        for i, raw in enumerate(raw_names):
            with open(os.path.join(os.fsencode(test), raw), "wb") as f:
                Image.fromarray(noise(20, 20, 30 + i)).save(f, format="PNG")
        with open(os.path.join(os.fsencode(tmp_path / "data" / "train" / "cat"), b"\xff\xfe.jpg"), "wb") as f:
            Image.fromarray(noise(20, 20, 40)).save(f, format="JPEG")
    except OSError as e:  # a file system that only takes valid UTF-8 names
        pytest.skip(f"cannot create a non-UTF-8 file name here ({e})")
    name = os.fsdecode(b"caf\xe9.png")  # 'caf\udce9.png' (surrogate escape)

    # The run's own test split: decoded, cached, and written to predictions.csv.
    prepared = quiet_prepare(data, tmp_path)
    assert prepared.skipped == []
    assert prepared.splits["test"].files == [name, "plain.png"]
    assert len(prepared.splits["train"].files) == 7
    csv_path = tmp_path / "predictions.csv"
    write_predictions(str(csv_path), prepared.splits["test"].files, torch.zeros(2, 2), prepared.classes)
    escaped = name.encode("utf-8", "backslashreplace").decode("utf-8")
    assert read_predictions(csv_path) == [escaped, "plain.png"]

    # `kdistill predict` on the same folder.
    output = tmp_path / "predicted.csv"
    assert predict_folder(student_run, str(test), str(output), Reading(workers=1, log=lambda m: None)) == 2
    assert read_predictions(output) == [escaped, "plain.png"]


def test_predict_keeps_same_named_images_in_subfolders_apart(tmp_path, student_run):
    from kdistill.predict import Reading, predict_folder

    images = tmp_path / "new"
    for folder, seed in (("a", 1), ("b", 2), ("b/c", 3)):
        (images / folder).mkdir(parents=True)
        save_rgb(images / folder / "img.png", seed=seed)
    (images / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    output = tmp_path / "out.csv"
    assert predict_folder(student_run, str(images), str(output), Reading(workers=1, log=lambda m: None)) == 3
    assert read_predictions(output) == ["a/img.png", "b/c/img.png", "b/img.png"]


def test_predict_skips_a_bad_image_or_with_strict_refuses_it_in_one_line(tmp_path, student_run):
    from kdistill.predict import Reading, predict_folder

    images = tmp_path / "new"
    images.mkdir()
    save_rgb(images / "good.png")
    write_truncated_jpeg(images / "bad.jpg")
    with pytest.raises(KdistillError) as caught:
        predict_folder(student_run, str(images), str(tmp_path / "out.csv"),
                       Reading(workers=1, strict=True, log=lambda m: None))
    assert str(images / "bad.jpg") in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "out.csv").exists()
    output = tmp_path / "skipped.csv"
    warnings_logged = []
    assert predict_folder(student_run, str(images), str(output), Reading(workers=1, log=warnings_logged.append)) == 1
    assert read_predictions(output) == ["good.png"]
    assert len(warnings_logged) == 1 and str(images / "bad.jpg") in warnings_logged[0]
