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

from .cache import entry_lock
from .errors import KdistillError
from .fileio import load_torch, save_torch, tensors_sha256
from .train import Batches, predict_logits


@torch.no_grad()
def head_inputs(model: nn.Module, head: str, batches: Batches, batch_size: int,
                device: torch.device, precision: str = "fp32") -> torch.Tensor:
    """What the head module receives for every sample: the frozen backbone's features."""
    captured = []
    hook = model.get_submodule(head).register_forward_pre_hook(
        lambda module, args: captured.append(args[0].detach().float().cpu()))
    try:
        predict_logits(model, batches, batch_size, device, precision)
    finally:
        hook.remove()
    return torch.cat(captured)


def signal_key(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def cached_tensors(path: str, expected_rows: dict[str, int], compute: Callable[[], dict[str, torch.Tensor]],
                   what: str, log) -> dict[str, torch.Tensor]:
    """Load {split: tensor} from path if complete and unchanged since it was written, else compute
    and store it. The file holds a sha256 of its tensors, checked on every read. Under its lock:
    runs (or the nodes of one run) sharing the cache compute it once."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with entry_lock(path, log):
        return _load_or_compute(path, expected_rows, compute, what, log)


def _load_or_compute(path: str, expected_rows: dict[str, int], compute: Callable[[], dict[str, torch.Tensor]],
                     what: str, log) -> dict[str, torch.Tensor]:
    if os.path.exists(path):
        problem = "unreadable or not a kdistill signal cache"
        try:
            stored = load_torch(path, what=what)
            tensors = stored.get("tensors") if isinstance(stored, dict) else None
            if isinstance(tensors, dict) and all(isinstance(tensors.get(k), torch.Tensor) and len(tensors[k]) == n
                                                 for k, n in expected_rows.items()):
                if stored.get("sha256") == tensors_sha256(tensors):
                    log(f"{what}: reusing {path}")
                    return tensors
                problem = "its content does not match its hash (damaged or edited)"
            else:
                problem = "incomplete"
        except KdistillError:
            pass
        log(f"{what}: {path} is {problem}; recomputing it")
    tensors = compute()
    save_torch({"tensors": tensors, "sha256": tensors_sha256(tensors)}, path, what=what)
    log(f"{what}: computed once and stored in {path}")
    return tensors
