"""Mixing after the view (mixup, cutmix), per batch: see BatchMixer. The views themselves (flip,
crop_flip, rrc_flip) are in kdistill/augmentations/."""
from __future__ import annotations

import torch
from torchvision.transforms import v2

MIXES = ("none", "mixup", "cutmix", "both")


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
