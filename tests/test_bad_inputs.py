"""Bad and odd input images: each is decoded like a careful hand conversion, or refused in one line naming it.

Every test builds its own files under tmp_path with Pillow/NumPy; nothing is downloaded.
"""
from __future__ import annotations

import csv
import os
import resource
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps, features
from torchvision.transforms.v2 import functional as TF

from kdistill import cli
from kdistill.data import list_images, prepare, scan_dataset
from kdistill.errors import KdistillError
from kdistill.images import ImageError, load_image

SIZE = 16


# ---------------------------------------------------------------- helpers


def noise(width: int, height: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    shape = (height, width, channels) if channels > 1 else (height, width)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def save_rgb(path, width: int = 20, height: int = 20, seed: int = 0) -> None:
    Image.fromarray(noise(width, height, seed)).save(path)


def make_dataset(root, train_per_class: int = 3, val_per_class: int = 2) -> str:
    """root/train/{cat,dog}/ and root/val/{cat,dog}/ with small valid PNGs; returns str(root)."""
    seed = 0
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for name in ("cat", "dog"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                seed += 1
                save_rgb(folder / f"{name}{i}.png", seed=seed)
    return str(root)


def quiet_prepare(data_dir, tmp_path, **kwargs):
    return prepare(str(data_dir), image_size=SIZE, cache_dir=str(tmp_path / "cache"), workers=1,
                   log=lambda message: None, **kwargs)


def by_hand(path, size: int = SIZE) -> np.ndarray:
    """The documented decoding, done independently: Pillow -> EXIF upright -> RGB -> torchvision
    Resize(size) + CenterCrop(size) on the PIL image -> CHW uint8."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Pillow's "Corrupt EXIF data" note
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened)
    if image.mode in ("I;16", "I;16L", "I;16B", "I"):
        gray = np.clip(np.round(np.asarray(image, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)
        image = Image.fromarray(gray).convert("RGB")
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA").convert("RGB")
    else:
        image = image.convert("RGB")
    image = TF.center_crop(TF.resize(image, size), size)
    assert image.size == (size, size)
    return np.asarray(image).transpose(2, 0, 1)


def assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.dtype == np.uint8 and actual.shape == expected.shape == (3, SIZE, SIZE)
    difference = np.abs(actual.astype(int) - expected.astype(int)).max()
    assert difference <= 1, f"max abs difference {difference}"


def png_declaring(width: int, height: int) -> bytes:
    """A tiny, well-formed PNG header that declares a width x height RGB image (no real pixels)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + chunk(b"IEND", b""))


# ---------------------------------------------------------------- valid but odd images


def write_cmyk_jpeg(path):
    Image.fromarray(noise(24, 18, 1, channels=4), mode="CMYK").save(path, quality=95)


def write_gray16_png(path):
    values = np.linspace(0, 65535, 30 * 20).reshape(20, 30).astype(np.uint16)
    Image.fromarray(values).save(path)
    with Image.open(path) as check:
        assert check.mode.startswith("I"), check.mode  # really a 16-bit file


def write_palette_transparent_png(path):
    indices = noise(22, 14, 2, channels=1) % 8
    image = Image.frombytes("P", (22, 14), indices.tobytes())
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 0, 9, 99, 199, 200, 100, 50,
                      255, 255, 255])
    image.save(path, transparency=1)
    with Image.open(path) as check:
        assert check.mode == "P" and "transparency" in check.info


def write_rgba_png(path):
    Image.fromarray(noise(20, 26, 3, channels=4), mode="RGBA").save(path)


def write_1x1_png(path):
    Image.new("RGB", (1, 1), (200, 30, 90)).save(path)


def write_wide_png(path):
    Image.fromarray(noise(4000, 8, 4)).save(path)


def write_tall_png(path):
    Image.fromarray(noise(8, 4000, 5)).save(path)


FRAME_COLORS = [(250, 0, 0), (0, 250, 0), (0, 0, 250)]


def write_animated_gif(path):
    frames = [Image.new("RGB", (20, 14), color) for color in FRAME_COLORS]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(path) as check:
        assert check.n_frames == 3


def write_multipage_tiff(path):
    pages = [Image.new("RGB", (20 + 10 * i, 14 + 10 * i), color) for i, color in enumerate(FRAME_COLORS)]
    pages[0].save(path, save_all=True, append_images=pages[1:])
    with Image.open(path) as check:
        assert check.n_frames == 3


def write_webp(path):
    if not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    Image.fromarray(noise(24, 20, 6)).save(path, lossless=True)


def write_grayscale_alpha_png(path):
    Image.fromarray(noise(18, 18, 7, channels=2), mode="LA").save(path)


def write_bilevel_png(path):
    Image.fromarray(noise(18, 18, 8, channels=1)).convert("1").save(path)


def write_exif_rotated_landscape(path):
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(noise(32, 20, 9)).save(path, quality=95, exif=exif)


def write_corrupt_exif_jpeg(path):
    # An EXIF block Pillow can't parse: the pixels are fine, so the image is used as stored.
    Image.fromarray(noise(20, 20, 10)).save(path, quality=95, exif=b"Exif\x00\x00II*\x00\x08\x00\x00\x00\xff\xff")


ODD_VALID = {
    "cmyk.jpg": write_cmyk_jpeg,
    "gray16.png": write_gray16_png,
    "palette_transparent.png": write_palette_transparent_png,
    "rgba.png": write_rgba_png,
    "one_by_one.png": write_1x1_png,
    "wide_4000x8.png": write_wide_png,
    "tall_8x4000.png": write_tall_png,
    "animated.gif": write_animated_gif,
    "multipage.tiff": write_multipage_tiff,
    "image.webp": write_webp,
    "gray_alpha.png": write_grayscale_alpha_png,
    "bilevel.png": write_bilevel_png,
    "exif6_landscape.jpg": write_exif_rotated_landscape,
    "corrupt_exif.jpg": write_corrupt_exif_jpeg,
}


@pytest.mark.parametrize("name", sorted(ODD_VALID))
def test_odd_valid_image_matches_hand_conversion(tmp_path, name):
    path = tmp_path / name
    ODD_VALID[name](path)
    assert_close(load_image(str(path), SIZE), by_hand(path))


def test_one_pixel_image_fills_the_crop(tmp_path):
    write_1x1_png(tmp_path / "one.png")
    decoded = load_image(str(tmp_path / "one.png"), SIZE)
    assert (decoded == np.array([200, 30, 90], np.uint8).reshape(3, 1, 1)).all()


@pytest.mark.parametrize("name", ["animated.gif", "multipage.tiff"])
def test_multi_frame_files_give_their_first_frame(tmp_path, name):
    path = tmp_path / name
    ODD_VALID[name](path)
    decoded = load_image(str(path), SIZE)
    assert (decoded == np.array(FRAME_COLORS[0], np.uint8).reshape(3, 1, 1)).all()


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_rotated_jpeg_comes_out_upright(tmp_path, orientation):
    # Stored pixels: left half white, right half black. Orientation 6 means "rotate 90 degrees
    # clockwise to display": white ends up on top. Orientation 8 (counter-clockwise): at the bottom.
    stored = np.zeros((SIZE, SIZE, 3), np.uint8)
    stored[:, : SIZE // 2] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"rotated{orientation}.jpg"
    Image.fromarray(stored).save(path, quality=95, exif=exif)
    with Image.open(path) as raw:  # the file really stores the unrotated layout
        assert np.asarray(raw.convert("L"))[:, :4].min() > 200

    decoded = load_image(str(path), SIZE).astype(int)
    top, bottom = decoded[:, :6, :], decoded[:, -6:, :]
    if orientation == 6:
        assert top.min() > 200 and bottom.max() < 55
    else:
        assert top.max() < 55 and bottom.min() > 200
    assert_close(decoded.astype(np.uint8), by_hand(path))


def test_odd_valid_images_prepare_without_skips(tmp_path):
    data = make_dataset(tmp_path / "data")
    odd_dir = tmp_path / "data" / "train" / "cat"
    for name, write in ODD_VALID.items():
        if name == "image.webp" and not features.check("webp"):
            continue
        write(odd_dir / f"odd_{name}")
    prepared = quiet_prepare(data, tmp_path)
    assert prepared.skipped == []
    train = prepared.splits["train"]
    odd = [i for i, f in enumerate(train.files) if os.path.basename(f).startswith("odd_")]
    assert len(odd) == len(os.listdir(odd_dir)) - 3
    for i in odd:
        expected = load_image(os.path.join(data, "train", train.files[i]), SIZE)
        assert np.array_equal(train.images[i].numpy(), expected)


# ---------------------------------------------------------------- decompression bombs


def test_decompression_bomb_refused_without_allocating(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_declaring(60000, 60000))
    assert path.stat().st_size < 200
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with pytest.raises(ImageError, match="max_image_pixels"):
        load_image(str(path), SIZE)
    # 60000 x 60000 RGB would be 10 GiB; the process's peak memory must not have moved much.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 100 * 1024


def test_image_over_a_lowered_pixel_limit_is_refused_and_the_limit_restored(tmp_path):
    # 100 x 100 = 10000 pixels: between 1x and 2x the limit, where Pillow itself only warns.
    save_rgb(tmp_path / "big.png", 100, 100)
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageError, match="max_image_pixels=6000"):
        load_image(str(tmp_path / "big.png"), SIZE, max_pixels=6000)
    assert Image.MAX_IMAGE_PIXELS == before
    assert load_image(str(tmp_path / "big.png"), SIZE, max_pixels=10000).shape == (3, SIZE, SIZE)


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
