"""Augmentation on the device: one tensor operation per batch, described by per-image view parameters.

A view is integers per image:
- "flip", "crop_flip": (flip, dy, dx), a horizontal flip and the top-left corner of the crop taken
  from the image reflect-padded by `pad` pixels on each side ("crop_flip": pad is image_size // 8;
  "flip": pad is 0).
- "rrc_flip": (flip, top, left, height, width), a random-resized crop (torchvision's
  RandomResizedCrop box) of the cached image, resized back to image_size, then the flip. The cache
  holds the short side resized to image_size and centre-cropped, which already spans the whole short
  side: a larger cached resize would add resolution to small crops, not content.
Drawing the parameters apart from applying them is what lets the teacher's outputs be computed once
for K stored views per image and replayed exactly (FKD).

Mixing (mixup, cutmix) comes after the view, per batch: see BatchMixer.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align
from torchvision.transforms import v2

AUGMENTATIONS = ("none", "flip", "crop_flip", "rrc_flip")
MIXES = ("none", "mixup", "cutmix", "both")
RRC_SCALE = (0.35, 1.0)  # the crop's share of the image area
RRC_RATIO = (3 / 4, 4 / 3)  # the crop's width / height
RRC_ATTEMPTS = 10  # boxes tried per image before the fallback, as torchvision does


def crop_padding(kind: str, image_size: int) -> int:
    return image_size // 8 if kind == "crop_flip" else 0


def draw_boxes(n: int, image_size: int, generator: torch.Generator | None = None,
               scale=RRC_SCALE, ratio=RRC_RATIO) -> torch.Tensor:
    """torchvision's RandomResizedCrop.get_params for n square images at once: (n, 4) integer
    (top, left, height, width). Each image takes the first of RRC_ATTEMPTS boxes that fits; the
    same number of draws whatever fits, so the generator's stream never depends on the data."""
    area = image_size * image_size
    target = area * torch.empty(n, RRC_ATTEMPTS).uniform_(scale[0], scale[1], generator=generator)
    aspect = torch.exp(torch.empty(n, RRC_ATTEMPTS).uniform_(math.log(ratio[0]), math.log(ratio[1]),
                                                             generator=generator))
    width, height = torch.sqrt(target * aspect).round(), torch.sqrt(target / aspect).round()
    fits = (width >= 1) & (width <= image_size) & (height >= 1) & (height <= image_size)
    first = fits.int().argmax(1, keepdim=True)
    width, height = width.gather(1, first)[:, 0], height.gather(1, first)[:, 0]
    # None fits: torchvision's fallback, the largest centred box with the nearest allowed ratio.
    nearest = min(max(1.0, ratio[0]), ratio[1])
    fallback_w = min(image_size, round(image_size * nearest))
    fallback_h = min(image_size, round(image_size / nearest))
    none_fits = ~fits.any(1)
    width = torch.where(none_fits, fallback_w, width).long()
    height = torch.where(none_fits, fallback_h, height).long()
    corner = torch.rand(n, 2, generator=generator)
    top = (corner[:, 0] * (image_size - height + 1)).long()
    left = (corner[:, 1] * (image_size - width + 1)).long()
    top = torch.where(none_fits, (image_size - height) // 2, top)
    left = torch.where(none_fits, (image_size - width) // 2, left)
    return torch.stack([top, left, height, width], 1)


def draw_views(kind: str, n: int, image_size: int, generator: torch.Generator | None = None,
               scale=RRC_SCALE, ratio=RRC_RATIO) -> torch.Tensor:
    """Random view parameters for n images, on the CPU: (n, 3), or (n, 5) for rrc_flip."""
    flip = torch.randint(0, 2, (n, 1), generator=generator)
    if kind == "rrc_flip":
        return torch.cat([flip, draw_boxes(n, image_size, generator, scale, ratio)], 1)
    pad = crop_padding(kind, image_size)
    if pad == 0:
        return torch.cat([flip, torch.zeros(n, 2, dtype=torch.int64)], 1)
    return torch.cat([flip, torch.randint(0, 2 * pad + 1, (n, 2), generator=generator)], 1)


def stored_views(kind: str, n: int, views_per_image: int, image_size: int, seed: int,
                 scale=RRC_SCALE, ratio=RRC_RATIO) -> torch.Tensor:
    """K views per image, (n, K, 3) or (n, K, 5) for rrc_flip, reproducible from the seed.

    "flip" has only two distinct views, so it stores exactly those: picking one at random each
    epoch is then the same augmentation as drawing it online.
    """
    if kind == "flip":
        flips = torch.arange(2).view(1, 2, 1).expand(n, 2, 1)
        return torch.cat([flips, torch.zeros(n, 2, 2, dtype=torch.int64)], 2)
    generator = torch.Generator().manual_seed(seed)
    views = draw_views(kind, n * views_per_image, image_size, generator, scale, ratio)
    return views.view(n, views_per_image, views.shape[1])


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


def apply_boxes(x: torch.Tensor, views: torch.Tensor, output_size: int) -> torch.Tensor:
    """x (B,C,H,W) float, views (B,5) integer (flip, top, left, height, width) on x's device ->
    each box resized to output_size (bilinear), then flipped: one roi_align call for the batch.

    aligned=True puts pixel centres at +0.5, so a box is exactly its pixels; sampling_ratio=0
    (adaptive) takes one sample per output pixel for a box no larger than the output, which is
    torchvision's bilinear resized_crop, and averages more samples for a larger box (antialiasing).
    """
    flip, top, left, height, width = views.to(x.dtype).unbind(1)
    index = torch.arange(len(x), device=x.device, dtype=x.dtype)
    boxes = torch.stack([index, left, top, left + width, top + height], 1)
    out = roi_align(x.contiguous(), boxes, output_size, spatial_scale=1.0, sampling_ratio=0, aligned=True)
    return torch.where(flip.view(-1, 1, 1, 1).bool(), out.flip(3), out)


class BatchMixer:
    """mixup, cutmix or either at random per batch (torchvision's transforms.v2), each image mixed
    with its predecessor in the (shuffled) batch; labels become class probabilities.

    torchvision draws from the global random state, so each batch mixes under a forked state seeded
    from the caller's generator: the same generator state gives the same mix (a baseline fed the
    same generator sees the same mixed batches) and the global state is left as it was.
    """

    def __init__(self, kind: str, num_classes: int, mixup_alpha: float, cutmix_alpha: float):
        choices = []
        if kind in ("mixup", "both"):
            choices.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
        if kind in ("cutmix", "both"):
            choices.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        self.transform = choices[0] if len(choices) == 1 else v2.RandomChoice(choices)

    def __call__(self, x: torch.Tensor, labels: torch.Tensor,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B,C,H,W), labels (B,) class indices -> mixed x, labels (B, classes) probabilities."""
        seed = int(torch.randint(2**62, (), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return self.transform(x, labels)
