"""Head warm-up for a fully fine-tuned teacher (linear probing, then fine-tuning; Kumar et al.,
"Fine-Tuning can Distort Pretrained Features and Underperform Out-of-Distribution", ICLR 2022):
the first teacher.head_epochs epochs train the new head alone, the pretrained backbone frozen with
its BatchNorm statistics, so that a random head's first large gradients do not reach the features;
the epochs after train the whole model. A warm-up epoch skips the backbone's backward pass.

Which parameters train is a function of the epoch alone, so a resumed run trains exactly as an
unbroken one. The optimizer holds every parameter throughout: a frozen one has no gradient, so
SGD and Adam leave it, its momentum and its weight decay untouched until it trains.
"""
from __future__ import annotations

from torch import nn

from .callbacks import Callback, FitState
from .errors import KdistillError


class HeadWarmup(Callback):
    def __init__(self, model: nn.Module, head: str, epochs: int):
        self.model, self.head, self.epochs = model, head, epochs

    def on_epoch_start(self, state: FitState, epoch: int) -> None:
        warming = epoch <= self.epochs
        for name, parameter in self.model.named_parameters():
            if not name.startswith(self.head + "."):
                parameter.requires_grad_(not warming)
        if warming:  # the backbone's BatchNorm layers keep their statistics
            self.model.eval()
            self.model.get_submodule(self.head).train()
        if epoch in (state.start_epoch, self.epochs + 1):
            state.session.log(f"{state.session.name}: epoch {epoch} trains "
                              f"{'the head alone (head warm-up)' if warming else 'the whole model'}")

    def close(self, state: FitState) -> None:
        self.model.requires_grad_(True)


def head_warmup(model: nn.Module, head: str, epochs: int, several_processes: bool) -> list[Callback]:
    """The callback where head_epochs asks for it. With several processes DDP expects a gradient for
    every parameter it was given, so a warm-up there is refused in one line."""
    if not epochs:
        return []
    if several_processes:
        raise KdistillError("setting teacher.head_epochs needs one process: DDP expects every parameter's gradient "
                            "in every step; set it to 0 under torchrun")
    return [HeadWarmup(model, head, epochs)]
