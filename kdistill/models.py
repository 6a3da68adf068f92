"""Models: an architecture from one of the sources (kdistill/sources) with its classifier swapped for our head.

The head is found by module path (the model's last nn.Linear), never by rewriting the model, so
any torchvision or timm classifier and most third-party ones work unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

from .errors import KdistillError
from .fileio import load_torch
from .sources import CALLABLE, PREFIXED, TORCHVISION, source_of

def head_path(model: nn.Module) -> str:
    """Module path of the classifier: the last nn.Linear in registration order."""
    linear_paths = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linear_paths:
        raise KdistillError(f"{type(model).__name__} has no nn.Linear classifier to replace")
    return linear_paths[-1]


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, name, module)


def make_head(in_features: int, num_classes: int, dropout: float) -> nn.Module:
    linear = nn.Linear(in_features, num_classes)
    return nn.Sequential(nn.Dropout(dropout), linear) if dropout > 0 else linear


def read_state_dict(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise KdistillError(f"weights file {path} is unreadable or corrupt ({e})") from None
    state = load_torch(path, what="weights file")
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise KdistillError(f"weights file {path} is not a state_dict (a mapping of names to tensors)")
    return state


def _load_weights(model: nn.Module, state: dict, source: str, head: str) -> None:
    """Load every backbone tensor; the classifier's tensors may be absent or of another class count."""
    own = model.state_dict()
    head_keys = {k for k in own if k == head or k.startswith(head + ".")}
    usable = {k: v for k, v in state.items() if k not in head_keys and not k.startswith(head + ".")}
    missing = [k for k in own if k not in usable and k not in head_keys]
    if missing:
        raise KdistillError(f"weights {source} do not fit this architecture: {len(missing)} tensors "
                            f"missing, for example {missing[0]!r}")
    unexpected = [k for k in usable if k not in own]
    if unexpected:
        raise KdistillError(f"weights {source} do not fit this architecture: {len(unexpected)} tensors "
                            f"it does not have, for example {unexpected[0]!r}")
    for key, value in usable.items():
        if own[key].shape != value.shape:
            raise KdistillError(f"weights {source} do not fit this architecture: {key} has shape "
                                f"{tuple(value.shape)}, the model expects {tuple(own[key].shape)}")
    model.load_state_dict(usable, strict=False)


def weights_source(arch: str, weights: str) -> str:
    """Where a model's starting weights come from, in words for the log."""
    if weights != "none":
        return f"with weights {weights}"
    return "from scratch" if source_of(arch)[0] is not CALLABLE else "with the weights its callable returns"


def arch_problem(arch: str, image_size: int) -> str | None:
    """Why `arch` names no model kdistill can build at image_size (nothing is built), or None."""
    source, name = source_of(arch)
    problem = source.problem(name, image_size)
    if problem is not None and source is TORCHVISION and problem.startswith("unknown"):
        problem += f" (an architecture is {_KINDS})"
    return problem


_KINDS = "; or ".join(source.describe for source in (TORCHVISION, *PREFIXED.values(), CALLABLE))


def is_trusted_arch(arch: str) -> bool:
    """Whether building `arch` runs only a library's code (torchvision, timm, kdistill.zoo)."""
    source, name = source_of(arch)
    return source.trusted(name)


def fetch_pretrained(arch: str) -> None:
    """Build `arch` with its library's pretrained weights once: offline, fail now, in one line."""
    source, name = source_of(arch)
    source.build(name, True)


def build_model(arch: str, num_classes: int, dropout: float = 0.0,
                weights: str = "none") -> tuple[nn.Module, str]:
    """The architecture with `weights` loaded into its backbone and a fresh head for num_classes.

    weights: none, imagenet (the source's pretrained weights) or a weights file. Returns the model
    and the module path of its new head.
    """
    source, name = source_of(arch)
    model = source.build(name, weights == "imagenet")
    path = head_path(model)
    if weights not in ("none", "imagenet"):
        _load_weights(model, source.adapt_state(name, read_state_dict(weights)), weights, path)
    old_head = model.get_submodule(path)
    set_module(model, path, make_head(old_head.in_features, num_classes, dropout))
    return model, path


IMAGENET_STATS = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])  # what torchvision's weights expect


class Standardized(nn.Module):
    """A model that takes images scaled to [0, 1] and standardizes them with its own statistics.

    Each model owns its input statistics: a pretrained backbone expects the ones it was trained
    with, a model trained from scratch the training set's. The statistics are buffers, so they
    are part of the state dict, of its hash (the teacher-signal cache keys) and of the export.

    input_size > 0: images are first resized (bilinearly) to that side, so a model can see the one
    exact view of a batch larger (teacher.input_size, student.input_size). The size is then a buffer
    too, so it keys the teacher signal; at 0 the state dict is what it always was.
    """

    def __init__(self, model: nn.Module, mean: list[float], std: list[float], input_size: int = 0):
        super().__init__()
        self.model = model
        # Progressive resizing (progressive.py): in training, views at this share of the side; not
        # state (a function of the epoch), and never in eval mode, so evaluation and exports see it whole.
        self.train_scale = 1.0
        self.trained_side = 0  # the side of the last batch it saw in training
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.input_size = input_size
        self.register_buffer("resized_to", torch.tensor(input_size) if input_size else None)

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        side = self.input_size
        if self.training and self.train_scale < 1:
            side = scaled_side(self.input_size or images01.shape[-1], self.train_scale)
        if side and images01.shape[-2:] != (side, side):
            images01 = nn.functional.interpolate(images01, size=(side, side), mode="bilinear",
                                                 antialias=side < images01.shape[-1])
        if torch.is_grad_enabled():  # a training step: a head warm-up's frozen wrapper is in eval mode
            self.trained_side = images01.shape[-1]
        return self.model((images01 - self.mean) / self.std)


SIDE_STEP = 8  # progressive sides are multiples of this: few distinct shapes, each a kernel choice


def scaled_side(side: int, scale: float) -> int:
    """scale of side, rounded to a multiple of SIDE_STEP (at least SIDE_STEP, at most side)."""
    return min(side, max(SIDE_STEP, round(side * scale / SIDE_STEP) * SIDE_STEP))


MIN_STD = 1 / 255  # one grey level, on the [0, 1] scale


def input_statistics(normalize: str, weights: str, model: nn.Module, dataset_mean: list[float],
                     dataset_std: list[float]) -> tuple[str, list[float], list[float]]:
    """(name, mean, std) of the input standardization a model gets.

    auto: the statistics pretrained weights were trained with (ImageNet's, or what the model
    declares in its `input_normalization` attribute: a name, or (mean, std) as timm's pretrained
    models do), the training set's for a model trained from scratch.
    """
    if normalize == "auto":
        declared = getattr(model, "input_normalization", None)
        normalize = declared or ("imagenet" if weights != "none" else "dataset")
    if isinstance(normalize, tuple):
        return "pretrained", [float(v) for v in normalize[0]], [float(v) for v in normalize[1]]
    if normalize == "imagenet":
        return "imagenet", *IMAGENET_STATS
    # A channel of one constant value (std 0) would be divided by zero: floor its std at one
    # grey level, which standardizes the constant to 0 and keeps any other value finite.
    return "dataset", list(dataset_mean), [max(std, MIN_STD) for std in dataset_std]


def standardized_model(arch: str, num_classes: int, dropout: float, weights: str, normalize: str,
                       dataset_mean: list[float], dataset_std: list[float],
                       input_size: int = 0) -> tuple[Standardized, str, str]:
    """build_model with its input standardization (and resize) in front: (model, head path, statistics name)."""
    model, head = build_model(arch, num_classes, dropout, weights)
    name, mean, std = input_statistics(normalize, weights, model, dataset_mean, dataset_std)
    return Standardized(model, mean, std, input_size), f"model.{head}", name


def trainable_part(model: nn.Module, head: str, head_only: bool) -> nn.Module:
    """The module whose parameters train: the head alone (backbone frozen) or the whole model."""
    if not head_only:
        return model
    model.requires_grad_(False)
    return model.get_submodule(head).requires_grad_(True)


def check_train_output(arch: str, image_size: int, key: str = "arch", num_classes: int = 3) -> None:
    """Refuse, in one line naming `key`, an architecture whose train-mode forward on a batch of two
    image_size images is not one (2, num_classes) logits tensor (a tuple of aux logits, a dict...).

    Builds a throwaway instance (weights=none), so call it once, before any work, for module:callable
    architectures; the torchvision ones that need it are handled in build_model.
    """
    model, _ = build_model(arch, num_classes)
    images = torch.rand(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            output = model.train()(images)
    except Exception as e:  # whatever the third-party model raises, say which setting caused it
        message = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise KdistillError(f"setting {key}: {arch} fails on a batch of 2 images of image_size={image_size} "
                            f"in train mode ({message})") from None
    if not isinstance(output, torch.Tensor) or tuple(output.shape) != (2, num_classes):
        got = f"shape {tuple(output.shape)}" if isinstance(output, torch.Tensor) else type(output).__name__
        raise KdistillError(f"setting {key}: {arch} must return one logits tensor of shape (batch, classes) "
                            f"in train mode, got {got} for a batch of 2 with {num_classes} classes")
