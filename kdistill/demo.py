"""The built-in demo dataset: scikit-learn's bundled 8x8 digits written out in the seed layout.

1,797 real handwritten digits (no download), upscaled to 32x32 grayscale PNGs:
DEMO/train/<digit>/, DEMO/val/<digit>/ and an unlabelled, flat DEMO/test/.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from .fileio import atomic_write


def write_digits(folder: str, seed: int = 0) -> str:
    from sklearn.datasets import load_digits

    if os.path.exists(os.path.join(folder, "complete")):
        return folder
    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.target))
    for position, index in enumerate(order):
        split = ("train", "train", "train", "val", "test")[position % 5]  # 60/20/20
        label = str(digits.target[index])
        pixels = (digits.images[index] * (255.0 / 16.0)).round().astype(np.uint8)
        image = Image.fromarray(pixels, mode="L").resize((32, 32), Image.BILINEAR)
        name = f"digit-{index:04d}.png"
        path = os.path.join(folder, split, name) if split == "test" else os.path.join(folder, split, label, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        image.save(path)
    atomic_write(os.path.join(folder, "complete"), lambda tmp: open(tmp, "w").close(), "marker")
    return folder
