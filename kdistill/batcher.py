"""The cached uint8 splits served as Batches: scaled to [0, 1] and augmented on the device.

Each model standardizes its own input (models.Standardized), so one batch can feed a teacher
that expects ImageNet's statistics and a student that expects the training set's.
"""
from __future__ import annotations

import torch

from .augment import BatchMixer
from .augmentations import AUGMENTATIONS, view_params
from .config import Config
from .data import PreparedData, SplitData, to_unit_range
from .batches import Batches


class JoinedImages:
    """Two image tensors indexed as one, without copying either (mapped splits stay mapped)."""

    def __init__(self, first: torch.Tensor, second: torch.Tensor):
        self.first, self.second = first, second
        self.device = first.device

    def __len__(self) -> int:
        return len(self.first) + len(self.second)

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        in_first = index < len(self.first)
        picked = torch.empty((len(index), *self.first.shape[1:]), dtype=self.first.dtype, device=self.device)
        picked[in_first] = self.first[index[in_first]]
        picked[~in_first] = self.second[index[~in_first] - len(self.first)]
        return picked


class ImageBatcher:
    """Serves the prepared splits as Batches.

    On CUDA each split is copied to the GPU once when the whole dataset fits comfortably, and
    batches are channels_last; `resident` and `channels_last` force either choice (tests use
    them to run the GPU path on the CPU).
    """

    def __init__(self, data: PreparedData, cfg: Config, device: torch.device, resident: bool | None = None,
                 channels_last: bool | None = None):
        self.splits = dict(data.splits)
        self.augmentation = AUGMENTATIONS.get(cfg.augment)  # None: no augmentation
        self.image_size = cfg.image_size
        self.view_params = view_params(cfg)
        self.mixer = (BatchMixer(cfg.mix, len(data.classes), cfg.mixup_alpha, cfg.cutmix_alpha)
                      if cfg.mix != "none" else None)
        self.channels_last = device.type == "cuda" if channels_last is None else channels_last
        self.images = {name: split.images for name, split in data.splits.items()}
        if resident is None:
            resident = device.type == "cuda" and (
                sum(images.numel() for images in self.images.values()) < 0.4 * torch.cuda.mem_get_info(device)[0])
        self.resident = resident
        if self.resident:
            self.images = {name: images.to(device) for name, images in self.images.items()}

    def join(self, first: str, second: str) -> str:
        """Serve the splits first and second as one split (second's images unlabelled, -1), named
        first+second: the labelled training images followed by a transfer set."""
        name = f"{first}+{second}"
        a, b = self.splits[first], self.splits[second]
        releases = (a.release_pages, b.release_pages)
        self.splits[name] = SplitData(
            JoinedImages(self.images[first], self.images[second]),
            torch.cat([a.labels, torch.full((len(b.files),), -1, dtype=torch.int64)]), a.files + b.files,
            lambda: [release() for release in releases])
        self.images[name] = self.splits[name].images
        return name

    def _memory_format(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _apply_view(self, x: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        return self._memory_format(self.augmentation.apply(x, views, self.image_size))

    def _draw_views(self, count: int, generator: torch.Generator) -> torch.Tensor:
        return self.augmentation.draw(count, self.image_size, generator, self.view_params)

    def _mix(self, x: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None):
        x, labels = self.mixer(x, labels, generator)
        return self._memory_format(x), labels

    def __call__(self, name: str, augment: bool = False, views: torch.Tensor | None = None, mix: bool = False,
                 **extra) -> Batches:
        """augment: a fresh random view per image and epoch; views: (N, K, 3 or 5) stored views to
        replay; mix: mixup/cutmix as set (after the view), labels served as class probabilities."""
        split = self.splits[name]
        labels = split.labels if split.labels is not None else torch.zeros(len(split.files), dtype=torch.int64)
        fresh = augment and self.augmentation is not None and views is None
        viewed = fresh or views is not None

        def to_model_input(batch: torch.Tensor) -> torch.Tensor:
            # A view is applied after this (Batches.iterate), and sets the memory format once.
            x = to_unit_range(batch)
            return x if viewed else self._memory_format(x)
        return Batches(self.images[name], labels, to_model_input,
                       release_pages=None if self.resident else split.release_pages, views=views,
                       draw_views=self._draw_views if fresh else None,
                       apply_view=self._apply_view if viewed else None,
                       mix=self._mix if mix and self.mixer is not None else None, **extra)
