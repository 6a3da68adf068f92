"""rrc_flip: a random-resized crop (torchvision's RandomResizedCrop box) of the cached image, resized
back to image_size, then a random horizontal flip. View (flip, top, left, height, width).

The cache holds the short side resized to image_size and centre-cropped, which already spans the
whole short side: a larger cached resize would add resolution to small crops, not content.
"""
from __future__ import annotations

import math

import torch
from torchvision.ops import roi_align

from .base import Augmentation

RRC_SCALE = (0.35, 1.0)  # the crop's share of the image area
RRC_RATIO = (3 / 4, 4 / 3)  # the crop's width / height
RRC_ATTEMPTS = 10  # boxes tried per image before the fallback, as torchvision does


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


class RandomResizedCropFlip(Augmentation):
    reads = ("rrc_scale", "rrc_ratio")

    def draw(self, n, image_size, generator, params):
        flip = torch.randint(0, 2, (n, 1), generator=generator)
        boxes = draw_boxes(n, image_size, generator, params.get("rrc_scale", RRC_SCALE),
                           params.get("rrc_ratio", RRC_RATIO))
        return torch.cat([flip, boxes], 1)

    def apply(self, x, views, image_size):
        return apply_boxes(x, views, image_size)
