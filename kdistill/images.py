"""Decode one image file into a (3, size, size) uint8 array, or say in one line why it can't be.

Pure Pillow + NumPy (no torch) so decode worker processes start light.
"""
from __future__ import annotations

import warnings

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
# Files that file managers and OSes drop into folders; never data.
IGNORED_NAMES = {"thumbs.db", "desktop.ini", "ehthumbs.db"}


class ImageError(Exception):
    """An image that can't be used; the message is the reason, without the path."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB: 16/32-bit grayscale scaled to 8 bits, alpha dropped."""
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        # 16-bit images (mode I;16 or I) use the range 0..65535; scale so 65535 maps to 255.
        scaled = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(scaled, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        return image.convert("RGBA").convert("RGB")
    if image.mode != "RGB":
        return image.convert("RGB")
    return image


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Exactly torchvision's Resize(size) then CenterCrop(size) on a PIL image, in one resample.

    Resampling only the source box that survives the crop gives the same pixels (Pillow filters
    from the full image around the box) without first building a huge intermediate for extreme
    aspect ratios such as 4000x8.
    """
    width, height = image.size
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    left = int(round((new_w - size) / 2.0))
    top = int(round((new_h - size) / 2.0))
    sx, sy = width / new_w, height / new_h
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    return image.resize((size, size), Image.BILINEAR, box=box)


def load_image(path: str, size: int, max_pixels: int = Image.MAX_IMAGE_PIXELS) -> np.ndarray:
    """The image at path, upright (EXIF orientation applied), RGB, resized and center-cropped."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x the limit; a declared-huge image is refused.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                upright = ImageOps.exif_transpose(opened)
                upright.load()
                rgb = to_rgb(upright)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"declares an image larger than max_image_pixels={max_pixels} "
                         f"(possible decompression bomb)") from None
    except Image.UnidentifiedImageError:
        raise ImageError("not a readable image (unknown or corrupt format)") from None
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError... for broken files
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ImageError(f"cannot decode ({message[:120]})") from None
    return np.asarray(resize_center_crop(rgb, size), dtype=np.uint8).transpose(2, 0, 1).copy()


def decode_task(task: tuple[int, str, int, int]) -> tuple[int, np.ndarray | None, str]:
    """Worker entry: (index, path, size, max_pixels) -> (index, array or None, reason)."""
    index, path, size, max_pixels = task
    try:
        return index, load_image(path, size, max_pixels), ""
    except ImageError as e:
        return index, None, str(e)
