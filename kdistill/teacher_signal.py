"""Teacher signal as data: pay for the teacher once and store what it says.

- Head-only teacher training: a frozen backbone in eval mode is a pure function of the image, so
  its features (the head's input, caught with a forward pre-hook) are computed once per split.
- Distillation without augmentation: the trained teacher's logits for every training image are
  computed once; a student epoch then costs a plain student epoch.
- Distillation with augmentation, "views" mode (FKD): the logits for K stored augmented views per
  image are computed once, and each epoch replays one of them (see augment.py).
- A method that reads teacher features at module paths gets them stored the same way, in float16
  (half the memory of float32; the loss terms it changes by are measured in docs/how-it-works.md),
  or where float16 would not fit in distill.max_signal_memory_gb, in 8 bits (CompactRows: a
  quarter of float32), so the teacher need not run online.

Each cache file is keyed by a hash of the weights that produced it and by the data cache key (and
for views by the augmentation, K and the seed that draws them), and
is checked when read; anything stale or damaged is recomputed.
"""
from __future__ import annotations

import hashlib
import os
import math
from typing import Callable, Sequence

import torch
from torch import nn
from tqdm import tqdm

from .cache import entry_lock
from .compute import autocast
from .errors import KdistillError
from .features import FeatureTaps
from .fileio import load_torch, save_torch, tensors_sha256
from .progress import counted, progress_bar
from .batches import Batches
from .inference import predict_logits

FEATURE_DTYPE = torch.float16
COMPACT_DTYPE = torch.int8  # distill.feature_storage int8: CompactRows
SCALES = "#scales"  # a cache file's key of a CompactRows' scales: module path + SCALES


class CompactRows:
    """Teacher features in 8 bits: each row (one image, or one view of it, at one module) as int8 codes
    and one float32 scale, the row's largest magnitude / 127, served as codes x scale: off by at most
    half a step (scale / 2). Indexed, moved and squeezed like the tensor it stands for; a row with a
    non-finite value is served non-finite (its scale is), so a broken teacher is still caught."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor):
        self.codes, self.scales = codes, scales  # int8 (N, [K,] *shape), float32 (N, [K])

    @classmethod
    def of(cls, value: torch.Tensor) -> CompactRows:
        """value's rows (along dim 0) in 8 bits."""
        value = value.float()
        scales = value.flatten(1).abs().amax(1) / 127
        scales = torch.where(scales == 0, torch.ones_like(scales), scales)
        codes = torch.round(value / scales.view(-1, *(1,) * (value.dim() - 1))).clamp(-127, 127)
        return cls(torch.nan_to_num(codes).to(COMPACT_DTYPE), scales)

    def __len__(self) -> int:
        return len(self.codes)

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def cpu(self) -> CompactRows:
        return self.to(torch.device("cpu"))

    def __getitem__(self, index) -> CompactRows:
        return CompactRows(self.codes[index], self.scales[index])

    def __setitem__(self, index, rows: CompactRows) -> None:
        self.codes[index], self.scales[index] = rows.codes, rows.scales

    def to(self, device: torch.device, non_blocking: bool = False) -> CompactRows:
        return CompactRows(self.codes.to(device, non_blocking=non_blocking),
                           self.scales.to(device, non_blocking=non_blocking))

    def squeeze(self, dim: int) -> CompactRows:
        return CompactRows(self.codes.squeeze(dim), self.scales.squeeze(dim))

    def float(self) -> torch.Tensor:
        return self.codes.float() * self.scales.view(*self.scales.shape, *(1,) * (self.codes.dim() - self.scales.dim()))


def as_tensors(features: dict[str, torch.Tensor | CompactRows]) -> dict[str, torch.Tensor]:
    """Stored features as a cache file holds them: a CompactRows as its codes and its scales."""
    tensors = {}
    for path, value in features.items():
        if isinstance(value, CompactRows):
            tensors[path], tensors[path + SCALES] = value.codes, value.scales
        else:
            tensors[path] = value
    return tensors


def from_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | CompactRows]:
    """as_tensors undone."""
    return {path: CompactRows(value, tensors[path + SCALES]) if path + SCALES in tensors else value
            for path, value in tensors.items() if not path.endswith(SCALES)}


@torch.no_grad()
def head_inputs(model: nn.Module, head: str, batches: Batches, batch_size: int,
                device: torch.device, precision: str = "fp32") -> torch.Tensor:
    """What the head module receives for every sample: the frozen backbone's features."""
    captured = []
    hook = model.get_submodule(head).register_forward_pre_hook(
        lambda module, args: captured.append(args[0].detach().float().cpu()))
    try:
        with progress_bar(len(batches), "teacher features") as bar:
            predict_logits(model, batches, batch_size, device, precision, bar=bar)
    finally:
        hook.remove()
    return torch.cat(captured)


@torch.no_grad()
def feature_shapes(model: nn.Module, paths: Sequence[str], batches: Batches, device: torch.device,
                   precision: str = "fp32") -> dict[str, torch.Size]:
    """The shape of one sample's output of each module at paths (batch dimension dropped)."""
    taps = FeatureTaps(model, paths, "the teacher")
    try:
        model.eval()
        probe = next(iter(batches.iterate(1, device, precision=precision)))
        with autocast(device, precision):
            model(probe.x)
        return {path: value.shape[1:] for path, value in taps.take().items()}
    finally:
        taps.remove()


def feature_megabytes(shapes: dict[str, torch.Size], samples: int, dtype: torch.dtype = FEATURE_DTYPE) -> float:
    """The memory of `samples` rows of the features in dtype (in COMPACT_DTYPE with a float32 scale per row)."""
    per_row = sum(math.prod(shape) * dtype.itemsize + (4 if dtype == COMPACT_DTYPE else 0) for shape in shapes.values())
    return samples * per_row / 2**20


@torch.no_grad()
def hooked_outputs(model: nn.Module, paths: Sequence[str], views: Sequence[Batches], batch_size: int,
                   device: torch.device, precision: str = "fp32", dtype: torch.dtype = FEATURE_DTYPE,
                   bar: tqdm | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
    """One pass of the model over every sample of each view's batches: its logits (N, views, C) in
    float32 and the output of each module at paths, (N, views, *shape) in dtype (COMPACT_DTYPE: as
    CompactRows); None if a value exceeds the range of a float dtype narrower than float32."""
    taps = FeatureTaps(model, paths, "the teacher")
    logits: list[torch.Tensor] = []
    stored: dict[str, torch.Tensor | CompactRows] = {}
    try:
        model.eval()
        for view, batches in enumerate(views):
            start, view_logits = 0, []
            for x, *_ in counted(batches.iterate(batch_size, device, precision=precision), bar):
                with autocast(device, precision):
                    view_logits.append(model(x).float().cpu())
                for path, value in taps.take().items():
                    if dtype == COMPACT_DTYPE:
                        value = CompactRows.of(value.cpu())
                    elif torch.finfo(dtype).max < torch.finfo(value.dtype).max and \
                            value.abs().max() > torch.finfo(dtype).max:
                        return None
                    if path not in stored:  # filled in place: never two copies of the whole signal
                        stored[path] = _empty_rows((len(batches), len(views), *value.shape[1:]), dtype)
                    stored[path][start:start + len(value), view] = value.cpu()
                start += len(x)
            logits.append(torch.cat(view_logits))
    finally:
        taps.remove()
    return torch.stack(logits, 1), stored


def _empty_rows(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | CompactRows:
    if dtype == COMPACT_DTYPE:
        return CompactRows(torch.empty(shape, dtype=dtype), torch.empty(shape[:2], dtype=torch.float32))
    return torch.empty(shape, dtype=dtype)


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
