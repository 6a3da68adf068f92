"""Augmentation on the device: one tensor operation per batch, described by per-image view parameters.

A view is three integers per image: (flip, dy, dx), a horizontal flip and the top-left corner of
the crop taken from the image reflect-padded by `pad` pixels on each side ("crop_flip": pad is
image_size // 8; "flip": pad is 0). Drawing the parameters apart from applying them is what lets
the teacher's outputs be computed once for K stored views per image and replayed exactly (FKD).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

AUGMENTATIONS = ("none", "flip", "crop_flip")


def crop_padding(kind: str, image_size: int) -> int:
    return image_size // 8 if kind == "crop_flip" else 0


def draw_views(kind: str, n: int, image_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random view parameters (n, 3) for n images, on the CPU."""
    pad = crop_padding(kind, image_size)
    flip = torch.randint(0, 2, (n, 1), generator=generator)
    if pad == 0:
        return torch.cat([flip, torch.zeros(n, 2, dtype=torch.int64)], 1)
    return torch.cat([flip, torch.randint(0, 2 * pad + 1, (n, 2), generator=generator)], 1)


def stored_views(kind: str, n: int, views_per_image: int, image_size: int, seed: int) -> torch.Tensor:
    """K views per image, (n, K, 3), reproducible from the seed.

    "flip" has only two distinct views, so it stores exactly those: picking one at random each
    epoch is then the same augmentation as drawing it online.
    """
    if kind == "flip":
        flips = torch.arange(2).view(1, 2, 1).expand(n, 2, 1)
        return torch.cat([flips, torch.zeros(n, 2, 2, dtype=torch.int64)], 2)
    generator = torch.Generator().manual_seed(seed)
    return draw_views(kind, n * views_per_image, image_size, generator).view(n, views_per_image, 3)


def apply_views(x: torch.Tensor, views: torch.Tensor, pad: int) -> torch.Tensor:
    """x (B,C,H,W) float, views (B,3) integer on x's device -> the augmented batch, same shape."""
    if pad:
        batch, channels, height, width = x.shape
        padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        rows = views[:, 1:2] + torch.arange(height, device=x.device)  # (B, H)
        cols = views[:, 2:3] + torch.arange(width, device=x.device)  # (B, W)
        x = padded[torch.arange(batch, device=x.device).view(-1, 1, 1, 1),
                   torch.arange(channels, device=x.device).view(1, -1, 1, 1),
                   rows.view(batch, 1, height, 1), cols.view(batch, 1, 1, width)]
    return torch.where(views[:, 0].view(-1, 1, 1, 1).bool(), x.flip(3), x)
