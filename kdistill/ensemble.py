"""Several teachers as one: the weighted average of their temperature-softened probabilities,

    p = sum_k w_k softmax(z_k / T),

served as the logits T * log(p). Then softmax(logits / T) == p exactly (log p sums to 0 under
logsumexp), so every method that reads teacher logits learns from the average unchanged, and the
argmax of the logits is that of p.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .batches import Batches
from .inference import predict_logits


def combined_logits(logits: Sequence[torch.Tensor], weights: Sequence[float], temperature: float) -> torch.Tensor:
    """T * log(sum_k w_k softmax(z_k / T)) over the last dimension, computed in log space (logsumexp)
    so that no probability underflows; weights sum to 1, a teacher of weight 0 drops out."""
    terms = [torch.log_softmax(z.float() / temperature, dim=-1) + math.log(weight)
             for z, weight in zip(logits, weights) if weight > 0]
    return temperature * torch.logsumexp(torch.stack(terms), dim=0)


class EnsembleTeacher:
    """The teachers run on every batch: input -> their combined logits."""

    def __init__(self, models: Sequence[nn.Module], weights: Sequence[float], temperature: float):
        self.models, self.weights, self.temperature = list(models), list(weights), temperature

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return combined_logits([model(x) for model in self.models], self.weights, self.temperature)


def ensemble_val_acc(models: Sequence[tuple[nn.Module, tuple[torch.device, str]]], weights: Sequence[float],
                     temperature: float, val: Batches, batch_size: int) -> float:
    """Accuracy of the argmax of the combined probabilities on the val images; models: each with the
    (device, precision) it computes in."""
    logits = combined_logits([predict_logits(model, val, batch_size, *where) for model, where in models], weights,
                             temperature)
    return (logits.argmax(1) == val.labels.cpu()).float().mean().item()
