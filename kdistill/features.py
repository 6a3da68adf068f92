"""Intermediate features by forward hooks on module paths (as torchdistill does), for any
torchvision or module:callable model, without rewriting it.

Paths name modules of the network itself (`layer3`, `layer4.1.conv2`, `avgpool`), inside the
input standardization that kdistill wraps every model in.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .distillers.base import Distiller, Outputs
from .errors import KdistillError
from .models import Standardized


class FeatureTaps:
    """Keeps the output of the modules at `paths` from each forward pass until take()."""

    def __init__(self, model: nn.Module, paths: Sequence[str], what: str):
        network = model.model if isinstance(model, Standardized) else model
        modules = dict(network.named_modules())
        self.captured: dict[str, torch.Tensor] = {}
        self.handles = []
        for path in paths:
            if not path or path not in modules:
                top = ", ".join(name for name, _ in network.named_children())
                raise KdistillError(f"{what} has no module {path!r} to take features from; its top-level "
                                    f"modules are: {top}")
            self.handles.append(modules[path].register_forward_hook(self._keeper(path)))

    def _keeper(self, path: str):
        def keep(module, inputs, output):
            self.captured[path] = output
        return keep

    def take(self) -> dict[str, torch.Tensor]:
        """The features of the last forward pass, as float32 (under autocast they are bf16)."""
        captured, self.captured = self.captured, {}
        return {path: value.float() for path, value in captured.items()}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class OnlineTeacher:
    """The teacher run on every batch, with the features a method reads: input -> Outputs."""

    def __init__(self, model: nn.Module, paths: Sequence[str] = ()):
        self.model = model
        self.taps = FeatureTaps(model, paths, "the teacher") if paths else None

    def __call__(self, x: torch.Tensor) -> Outputs:
        logits = self.model(x)
        return Outputs(logits, self.taps.take() if self.taps is not None else {})


def build_objective(objective: Distiller, model: nn.Module, student_taps: FeatureTaps, batches,
                    device: torch.device) -> None:
    """Sizes the method's trainable parts (adapters, memory banks) from one forward pass of two
    training images, in eval mode and without gradients, so no weight or statistic moves."""
    student_shapes: dict[str, torch.Size] = {}
    teacher_shapes: dict[str, torch.Size] = {}
    if objective.student_features() or objective.teacher_features():
        # Unshuffled, with a generator of its own: the training's random streams are left alone.
        probe = next(iter(batches.iterate(2, device, view_generator=torch.Generator().manual_seed(0))))
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(probe.x)
        model.train(was_training)
        student_shapes = {path: value.shape for path, value in student_taps.take().items()}
        teacher_shapes = {path: value.shape for path, value in probe.teacher.features.items()}
    objective.build(student_shapes, teacher_shapes, len(batches))
    objective.to(device)
