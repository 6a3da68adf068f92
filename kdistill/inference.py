"""A model's outputs over a split, in eval mode: its logits, or its loss and accuracy. Used by training
(each epoch's validation), the teacher's stored signal, ensembles and the reports."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .batches import Batches, share
from .compute import ONE_PROCESS, Ranks, autocast
from .progress import counted


@torch.no_grad()
def predict_logits(model: nn.Module, batches: Batches, batch_size: int, device: torch.device,
                   precision: str = "fp32", bar: tqdm | None = None, shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """The logits of every sample in order (of this process's share of each batch, see share).

    bar: a progress bar (progress.progress_bar) to count the images on."""
    model.eval()
    outputs = []
    for x, *_ in counted(batches.iterate(batch_size, device, precision=precision, shard=shard), bar):
        with autocast(device, precision):
            outputs.append(model(x).float().cpu())
    return torch.cat(outputs) if outputs else torch.empty(0)


def evaluate(model: nn.Module, batches: Batches, batch_size: int, device: torch.device,
             precision: str = "fp32", ranks: Ranks = ONE_PROCESS) -> tuple[float, float]:
    """(cross-entropy loss, accuracy) over a labelled split, in eval mode. With several processes,
    each evaluates its share of every batch and their sums are added: every image counts once."""
    logits = predict_logits(model, batches, batch_size, device, precision, shard=ranks.shard)
    labels = torch.cat([part[share(len(part), ranks.shard)] for part in batches.labels.cpu().split(batch_size)])
    if not ranks.joined:
        return F.cross_entropy(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item()
    totals = torch.zeros(3, dtype=torch.float64)  # loss, correct, images
    if len(labels):
        totals += torch.stack([F.cross_entropy(logits, labels, reduction="none").double().sum(),
                               (logits.argmax(1) == labels).sum().double(), torch.tensor(len(labels)).double()])
    totals = ranks.sum(totals.to(device)).cpu()
    return (totals[0] / totals[2]).item(), (totals[1] / totals[2]).item()
