"""Teacher signal as data: pay for the teacher once and store what it says.

- Head-only teacher training: a frozen backbone in eval mode is a pure function of the image, so
  its features (the head's input, caught with a forward pre-hook) are computed once per split.
- Distillation without augmentation: the trained teacher's logits for every training image are
  computed once; a student epoch then costs a plain student epoch.
- Distillation with augmentation, "views" mode (FKD): the logits for K stored augmented views per
  image are computed once, and each epoch replays one of them (see augment.py).

Each cache file is keyed by a hash of the weights that produced it and by the data cache key (and
for views by the augmentation, K and the seed that draws them), and
is checked when read; anything stale or damaged is recomputed.
"""
from __future__ import annotations

import hashlib
import os
from typing import Callable

import torch
from torch import nn

from .errors import KdistillError
from .fileio import load_torch, save_torch
from .train import Batches, predict_logits


@torch.no_grad()
def head_inputs(model: nn.Module, head: str, batches: Batches, batch_size: int,
                device: torch.device) -> torch.Tensor:
    """What the head module receives for every sample: the frozen backbone's features."""
    captured = []
    hook = model.get_submodule(head).register_forward_pre_hook(
        lambda module, args: captured.append(args[0].detach().float().cpu()))
    try:
        predict_logits(model, batches, batch_size, device)
    finally:
        hook.remove()
    return torch.cat(captured)


def signal_key(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def cached_tensors(path: str, expected_rows: dict[str, int], compute: Callable[[], dict[str, torch.Tensor]],
                   what: str, log) -> dict[str, torch.Tensor]:
    """Load {split: tensor} from path if complete and well-formed, else compute and store it."""
    if os.path.exists(path):
        try:
            stored = load_torch(path, what=what)
            if isinstance(stored, dict) and all(
                    isinstance(stored.get(k), torch.Tensor) and len(stored[k]) == n
                    for k, n in expected_rows.items()):
                log(f"{what}: reusing {path}")
                return stored
        except KdistillError:
            pass
        log(f"{what}: {path} is incomplete or corrupt; recomputing it")
    tensors = compute()
    save_torch(tensors, path, what=what)
    log(f"{what}: computed once and stored in {path}")
    return tensors
