"""The built-in demo dataset: scikit-learn's bundled 8x8 digits written out in the seed layout.

1,797 real handwritten digits (no download), upscaled to 32x32 grayscale PNGs, as a user with few
labels has them: DEMO/train/<digit>/ holds 20 labelled images per digit, DEMO/val/<digit>/ a fifth
of all, and the other 1,238 go unlabelled into a flat DEMO/test/, which the demo's teacher labels
for its student (distill.unlabeled: test) and its student predicts.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from .fileio import atomic_write


LABELLED_PER_DIGIT = 20


def write_digits(folder: str, seed: int = 0) -> str:
    from sklearn.datasets import load_digits

    if os.path.exists(os.path.join(folder, "complete")):
        return folder
    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.target))
    labelled: dict[str, int] = {}
    for position, index in enumerate(order):
        label = str(digits.target[index])
        if position % 5 == 3:
            split = "val"
        elif labelled.get(label, 0) < LABELLED_PER_DIGIT:
            split, labelled[label] = "train", labelled.get(label, 0) + 1
        else:
            split = "test"
        pixels = (digits.images[index] * (255.0 / 16.0)).round().astype(np.uint8)
        image = Image.fromarray(pixels, mode="L").resize((32, 32), Image.BILINEAR)
        name = f"digit-{index:04d}.png"
        path = os.path.join(folder, split, name) if split == "test" else os.path.join(folder, split, label, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        image.save(path)
    atomic_write(os.path.join(folder, "complete"), lambda tmp: open(tmp, "w").close(), "marker")
    return folder
