"""crop_flip: a random crop of the image reflect-padded by image_size // 8 on each side, then a
random horizontal flip. View (flip, dy, dx): the crop's top-left corner in the padded image."""
from __future__ import annotations

import torch

from .base import Augmentation
from .flip import apply_views


def crop_padding(image_size: int) -> int:
    return image_size // 8


class CropFlip(Augmentation):
    def draw(self, n, image_size, generator, params):
        flip = torch.randint(0, 2, (n, 1), generator=generator)
        return torch.cat([flip, torch.randint(0, 2 * crop_padding(image_size) + 1, (n, 2), generator=generator)], 1)

    def apply(self, x, views, image_size):
        return apply_views(x, views, crop_padding(image_size))
