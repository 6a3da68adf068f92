"""Batches: one split served as model input on the device, with what the teacher said about it.

A split is a tensor (uint8 images from the data cache, or cached features); each batch is a slice
of it, viewed (augment.py), mixed and paired with the teacher's signal (stored rows or an online
teacher) on the device. With several processes, each takes its share of every batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch

from .compute import autocast
from .data import batch_indices
from .distillers import Outputs

# extras key prefix of stored teacher features: TEACHER_FEATURES + module path (float16 or float32, or
# teacher_signal.CompactRows in 8 bits: indexed and moved alike, .float() serves them)
TEACHER_FEATURES = "teacher_features:"


class Batch(NamedTuple):
    x: torch.Tensor  # model input
    labels: torch.Tensor
    teacher: Outputs | None  # what the teacher said about x, where the objective needs it
    index: torch.Tensor  # the samples' positions in the split


@dataclass
class Batches:
    """One split served as batches: slices of a tensor, turned into model input on the device."""

    inputs: torch.Tensor  # uint8 images (N,3,S,S) or cached float features (N,F)
    labels: torch.Tensor
    to_model_input: Callable[[torch.Tensor], torch.Tensor]  # device batch -> model input
    # Per-sample tensors aligned with inputs, e.g. cached teacher logits: (N, C), or (N, K, C)
    # with stored views, and teacher features by module path (see TEACHER_FEATURES).
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    # Augmentation as view parameters (see augment.py), applied to model input by apply_view:
    # either K stored views per sample, (N, K, parameters), one picked at random each time a sample is
    # served (FKD), or fresh views from draw_views(count, generator) for every batch.
    views: torch.Tensor | None = None
    draw_views: Callable[[int, torch.Generator], torch.Tensor] | None = None
    apply_view: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    # Mixing after the view (augment.BatchMixer): (x, labels, generator) -> (mixed x, (B, classes)
    # label probabilities). Mixed images have no stored teacher logits: only an online teacher.
    mix: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
    # The online teacher: model input -> logits or Outputs (logits and features, see
    # features.OnlineTeacher), run on exactly the (mixed) view the student sees.
    teacher: Callable[[torch.Tensor], torch.Tensor | Outputs] | None = None
    # Called after each batch is copied out of memory-mapped inputs (see data.SplitData).
    release_pages: Callable[[], None] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def iterate(self, batch_size: int, device: torch.device, shuffle: bool = False,
                generator: torch.Generator | None = None, view_generator: torch.Generator | None = None,
                precision: str = "fp32", shard: tuple[int, int] = (0, 1)):
        """Yields a Batch: model input, labels (class indices (B,), -1 for an unlabelled image, or
        class probabilities (B, classes) when mixed), the teacher's Outputs or None, sample indices.

        generator orders the samples, view_generator picks or draws their views and mixes: two
        streams, so the order never depends on how many views were drawn, and two trainings given
        the same seeds see the same inputs batch by batch.

        shard: (rank, processes): this process's share of every batch of batch_size (see share).
        Views are drawn for the whole batch, so a sample's view does not depend on the processes.
        """
        for whole in batch_indices(len(self), batch_size, shuffle, generator):
            mine = share(len(whole), shard)
            index = whole[mine]
            x = self.inputs[index.to(self.inputs.device)]
            if self.release_pages is not None:
                self.release_pages()
            if device.type == "cuda" and x.device.type == "cpu":
                x = x.pin_memory()  # so the copy below runs asynchronously
            x = self.to_model_input(x.to(device, non_blocking=True))
            pick = None
            if self.views is not None:
                count = self.views.shape[1]
                # A single view needs no draw (and leaves the random state alone).
                pick = (torch.randint(count, (len(whole),), generator=view_generator) if count > 1
                        else torch.zeros(len(whole), dtype=torch.int64))[mine]
                x = self.apply_view(x, self.views[index, pick].to(device, non_blocking=True))
            elif self.draw_views is not None:
                x = self.apply_view(x, self.draw_views(len(whole), view_generator)[mine].to(device, non_blocking=True))
            y = self.labels[index].to(device, non_blocking=True)
            if self.mix is not None:
                x, y = self.mix(x, y, view_generator)
            teacher = None
            if self.teacher is not None:
                with torch.no_grad(), autocast(device, precision):
                    said = self.teacher(x)
                teacher = (Outputs(said.logits.float(), said.features) if isinstance(said, Outputs)
                           else Outputs(said.float()))
            elif "teacher_logits" in self.extras:
                teacher = Outputs(_stored_rows(self.extras["teacher_logits"], index, pick, device), {
                    key.removeprefix(TEACHER_FEATURES): _stored_rows(value, index, pick, device).float()
                    for key, value in self.extras.items() if key.startswith(TEACHER_FEATURES)})
            yield Batch(x, y, teacher, index.to(device, non_blocking=True))


def _stored_rows(stored: torch.Tensor, index: torch.Tensor, pick: torch.Tensor | None,
                 device: torch.device) -> torch.Tensor:
    """Each sample's stored row, or with stored views the row of the view it was served in."""
    rows = stored[index]
    return (rows if pick is None else rows[torch.arange(len(index)), pick]).to(device, non_blocking=True)


def share(count: int, shard: tuple[int, int]) -> slice:
    """Process rank's contiguous part of a batch of count samples split among processes, as evenly
    as whole samples allow: (rank, processes) = (0, 1) is the whole batch."""
    rank, processes = shard
    return slice(rank * count // processes, (rank + 1) * count // processes)


def shard_size(count: int, batch_size: int, shard: tuple[int, int]) -> int:
    """How many of count samples, served in batches of batch_size, fall in this process's shares."""
    full, last = divmod(count, batch_size)
    whole, rest = share(batch_size, shard), share(last, shard)
    return (whole.stop - whole.start) * full + rest.stop - rest.start


def hard_labels(labels: torch.Tensor) -> torch.Tensor:
    """Class indices; for mixed (probability) labels, the most probable class."""
    return labels.argmax(1) if labels.dim() == 2 else labels
