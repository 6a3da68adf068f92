"""Augmentations as view parameters: a few integers per image, drawn apart from applying them, so
the teacher's outputs can be computed once for K stored views per image and replayed exactly (FKD),
and applied on the device, one tensor operation per batch.

A new augmentation is one file defining an Augmentation plus one line in AUGMENTATIONS; `augment:
NAME` then reaches it, stored views included (their cache key hashes the views themselves).
"""
from __future__ import annotations

import torch

from .base import Augmentation
from .crop_flip import CropFlip
from .flip import Flip
from .rrc_flip import RandomResizedCropFlip

AUGMENTATIONS: dict[str, Augmentation] = {
    "flip": Flip(),
    "crop_flip": CropFlip(),
    "rrc_flip": RandomResizedCropFlip(),
}
CHOICES = ("none", *AUGMENTATIONS)  # the setting augment
# Every setting some augmentation's views read: a run reads those of its own augmentation only.
VIEW_SETTINGS = {key for augmentation in AUGMENTATIONS.values() for key in augmentation.reads}


def view_params(cfg) -> dict:
    """The settings cfg's augmentation draws its views with (empty without augmentation)."""
    augmentation = AUGMENTATIONS.get(cfg.augment)
    return {key: getattr(cfg, key) for key in augmentation.reads} if augmentation else {}


def draw_views(kind: str, n: int, image_size: int, generator: torch.Generator | None = None,
               params: dict | None = None) -> torch.Tensor:
    """Random view parameters of augmentation `kind` for n images, on the CPU: (n, P) integers."""
    return AUGMENTATIONS[kind].draw(n, image_size, generator, params or {})


def stored_views(kind: str, n: int, views_per_image: int, image_size: int, seed: int,
                 params: dict | None = None) -> torch.Tensor:
    """K views per image, (n, K, P), reproducible from the seed. An augmentation with a finite set of
    views (flip: 2) stores exactly those: picking one at random each epoch is then the same
    augmentation as drawing it online."""
    augmentation = AUGMENTATIONS[kind]
    if augmentation.distinct_views:
        return augmentation.all_views(n)
    views = augmentation.draw(n * views_per_image, image_size, torch.Generator().manual_seed(seed), params or {})
    return views.view(n, views_per_image, views.shape[1])
