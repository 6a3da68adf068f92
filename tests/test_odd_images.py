"""Odd but valid input images: each is decoded like a careful hand conversion; a decompression bomb
is refused without allocating it.

Every test builds its own files under tmp_path with Pillow/NumPy; nothing is downloaded.
"""
from __future__ import annotations

import os
import resource
import warnings

import numpy as np
import pytest
from PIL import Image, ImageOps, features
from torchvision.transforms.v2 import functional as TF

from image_files import SIZE, make_dataset, noise, png_declaring, quiet_prepare, save_rgb
from kdistill.images import ImageError, load_image


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

