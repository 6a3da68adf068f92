"""Decode one image file into a (3, size, size) uint8 array, or say in one line why it can't be.

Pure Pillow + NumPy (no torch) so decode worker processes start light.
"""
from __future__ import annotations

import errno
import os
import stat
import warnings

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
# Files that file managers and OSes drop into folders; never data.
# Compared lower-cased; names starting with "." (.DS_Store, ._x.jpg, .git) are ignored as well.
IGNORED_NAMES = {"thumbs.db", "desktop.ini", "ehthumbs.db", "__macosx"}
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default limit
# The largest side images are decoded to: one image then takes 50 MB of cache. Beyond it a size
# is a typo, not a classifier's input, and would fill the disk before the first epoch.
MAX_IMAGE_SIZE = 4096


class ImageError(Exception):
    """An image that can't be used; the message is the reason, without the path."""


def entry_problem(path: str) -> str:
    """Why the folder entry at path can't be an image file ("" if it can), without opening it."""
    try:
        st = os.stat(path)  # follows symlinks
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "unreadable (a symlink loop)"
        if e.errno == errno.ENOENT and os.path.islink(path):
            return "unreadable (a broken symlink: its target does not exist)"
        return f"unreadable ({e.strerror or e})"
    if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
        return "not a regular file"
    if os.path.splitext(path)[1].lower() not in IMAGE_SUFFIXES:
        return "not an image file"
    return ""


def float_to_uint8(values: np.ndarray) -> np.ndarray:
    """Float pixels as 8 bits: [0, 1] data scaled by 255, any other range min-max scaled to 0..255
    (a constant image outside [0, 1] gives 0); NaN and inf pixels give 0."""
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, np.uint8)
    low, high = values[finite].min(), values[finite].max()
    if low >= 0 and high <= 1:
        scaled = values * 255.0
    else:
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    return np.where(finite, np.clip(np.round(scaled), 0, 255), 0).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB: 16/32-bit grayscale scaled to 8 bits, alpha dropped."""
    if image.mode == "F":  # float TIFFs: no fixed range, see float_to_uint8
        gray = float_to_uint8(np.asarray(image, dtype=np.float64))
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode.startswith("I"):
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


def load_image(path: str, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The image at path, upright (EXIF orientation applied), RGB, resized and center-cropped.

    Multi-frame files (animated GIF, multi-page TIFF) give their first frame. Raises ImageError,
    never anything else, for a file that can't be used.
    """
    # Pillow checks Image.MAX_IMAGE_PIXELS when it reads the header, before allocating pixels;
    # set it for this call only, so callers (and the next call) see their own limit.
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        return _load(path, size, max_pixels)
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _bomb(max_pixels: int) -> ImageError:
    return ImageError(f"declares an image larger than max_image_pixels={max_pixels} "
                      f"(possible decompression bomb)")


def _load(path: str, size: int, max_pixels: int) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            # Pillow's notes on odd but readable files (corrupt EXIF, palette transparency...) are
            # not the user's concern; a declared-huge image is refused (Pillow only warns between
            # 1x and 2x the limit, and raises above).
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                if max_pixels and opened.width * opened.height > max_pixels:
                    raise _bomb(max_pixels)
                upright = ImageOps.exif_transpose(opened)
                upright.load()
                rgb = to_rgb(upright)
            return np.asarray(resize_center_crop(rgb, size), dtype=np.uint8).transpose(2, 0, 1).copy()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _bomb(max_pixels) from None
    except Image.UnidentifiedImageError:
        raise ImageError("not a readable image (unknown or corrupt format)") from None
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError... for broken files
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ImageError(f"cannot decode ({message[:120]})") from None


def decode_task(task: tuple[int, str, int, int]) -> tuple[int, np.ndarray | None, str]:
    """Worker entry: (index, path, size, max_pixels) -> (index, array or None, reason)."""
    index, path, size, max_pixels = task
    try:
        return index, load_image(path, size, max_pixels), ""
    except ImageError as e:
        return index, None, str(e)
