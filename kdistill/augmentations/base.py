from __future__ import annotations

import torch


class Augmentation:
    """One kind of augmentation: draws integer view parameters per image and applies them to a batch."""
    reads: tuple[str, ...] = ()  # the settings (Config fields) its views depend on, besides image_size
    distinct_views = 0  # > 0: every image has just this many views (all_views gives them)

    def draw(self, n: int, image_size: int, generator: torch.Generator | None, params: dict) -> torch.Tensor:
        """(n, P) int64 view parameters, on the CPU; params: the settings in `reads` (defaults if absent)."""
        raise NotImplementedError

    def apply(self, x: torch.Tensor, views: torch.Tensor, image_size: int) -> torch.Tensor:
        """x (B, C, H, W) float and views (B, P) on x's device -> the augmented batch (B, C, S, S)."""
        raise NotImplementedError

    def all_views(self, n: int) -> torch.Tensor:
        """(n, distinct_views, P): every view of every image."""
        raise NotImplementedError
