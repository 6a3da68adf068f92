"""Small image files and datasets that the input tests build under tmp_path with Pillow and NumPy."""
from __future__ import annotations

import struct
import zlib

import numpy as np
from PIL import Image

from kdistill.data import prepare

SIZE = 16


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



def png_declaring(width: int, height: int) -> bytes:
    """A tiny, well-formed PNG header that declares a width x height RGB image (no real pixels)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + chunk(b"IEND", b""))


