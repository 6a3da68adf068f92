"""flip: a random horizontal flip. View (flip, dy, dx) with dy = dx = 0; its two views are stored whole."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Augmentation


def apply_views(x: torch.Tensor, views: torch.Tensor, pad: int) -> torch.Tensor:
    """x (B,C,H,W) float, views (B,3) integer (flip, dy, dx) on x's device -> the crop at (dy, dx) of x
    reflect-padded by pad, then flipped where flip is 1; same shape."""
    if pad:
        batch, channels, height, width = x.shape
        padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        rows = views[:, 1:2] + torch.arange(height, device=x.device)  # (B, H)
        cols = views[:, 2:3] + torch.arange(width, device=x.device)  # (B, W)
        x = padded[torch.arange(batch, device=x.device).view(-1, 1, 1, 1),
                   torch.arange(channels, device=x.device).view(1, -1, 1, 1),
                   rows.view(batch, 1, height, 1), cols.view(batch, 1, 1, width)]
    return torch.where(views[:, 0].view(-1, 1, 1, 1).bool(), x.flip(3), x)


class Flip(Augmentation):
    distinct_views = 2

    def draw(self, n, image_size, generator, params):
        return torch.cat([torch.randint(0, 2, (n, 1), generator=generator), torch.zeros(n, 2, dtype=torch.int64)], 1)

    def apply(self, x, views, image_size):
        return apply_views(x, views, 0)

    def all_views(self, n):
        flips = torch.arange(2).view(1, 2, 1).expand(n, 2, 1)
        return torch.cat([flips, torch.zeros(n, 2, 2, dtype=torch.int64)], 2)
