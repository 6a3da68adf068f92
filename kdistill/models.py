"""Models: a torchvision architecture (or module:callable) with its classifier swapped for our head.

The head is found by module path (the model's last nn.Linear), never by rewriting the model, so
any torchvision classifier and most third-party ones work unchanged.
"""
from __future__ import annotations

import importlib
import os
import socket
import urllib.error

import torch
import torchvision
from torch import nn

from .errors import KdistillError
from .fileio import load_torch

# torchvision models that return (logits, aux logits) in train mode: built without the auxiliary
# heads (one plain logits tensor, like every other model), so the weights' aux tensors are dropped.
# transform_input is on whatever the weights: ImageNet weights need it, and a saved student (rebuilt
# with weights=none) must see its inputs exactly as in training.
AUX_HEAD_ARCHS = {"googlenet": ("aux1.", "aux2."), "inception_v3": ("AuxLogits.",)}
# Smallest image_size each torchvision architecture can take (smaller ones fail in its pooling).
MIN_IMAGE_SIZE = {"googlenet": 15, "inception_v3": 75}


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


def imagenet_state_dict(arch: str) -> dict:
    """torchvision's IMAGENET1K_V1 weights, from torch's hub cache or downloaded once into it."""
    weights = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(15)  # offline machines should fail in seconds, not minutes
    try:
        return torch.hub.load_state_dict_from_url(weights.url, progress=False, weights_only=True)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise KdistillError(
            f"could not download ImageNet weights for {arch} ({getattr(e, 'reason', e)}); this machine "
            f"looks offline. Download {weights.url} elsewhere and either put it at {cached} or pass "
            f"weights=/path/to/{os.path.basename(weights.url)}") from None
    finally:
        socket.setdefaulttimeout(previous_timeout)


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


def _without_aux(arch: str, state: dict) -> dict:
    """The state dict less the auxiliary heads this arch is built without (see AUX_HEAD_ARCHS)."""
    prefixes = AUX_HEAD_ARCHS.get(arch, ())
    return {k: v for k, v in state.items() if not k.startswith(prefixes)} if prefixes else state


def weights_source(arch: str, weights: str) -> str:
    """Where a model's starting weights come from, in words for the log."""
    if weights != "none":
        return f"with weights {weights}"
    return "with the weights its callable returns" if ":" in arch else "from scratch"


def build_model(arch: str, num_classes: int, dropout: float = 0.0,
                weights: str = "none") -> tuple[nn.Module, str]:
    """The architecture with `weights` loaded into its backbone and a fresh head for num_classes.

    Returns the model and the module path of its new head.
    """
    if ":" in arch:
        module_name, _, attr = arch.partition(":")
        model = getattr(importlib.import_module(module_name), attr)()
        if not isinstance(model, nn.Module):
            raise KdistillError(f"{arch} returned {type(model).__name__}, not a torch.nn.Module")
    elif arch in AUX_HEAD_ARCHS:
        # torchvision's own initialization (slow) only where no weights will overwrite it, as torchvision does.
        model = torchvision.models.get_model(arch, weights=None, aux_logits=False, transform_input=True,
                                             init_weights=weights == "none")
    else:
        model = torchvision.models.get_model(arch, weights=None)
    path = head_path(model)
    if weights == "imagenet":
        _load_weights(model, _without_aux(arch, imagenet_state_dict(arch)), f"imagenet ({arch})", path)
    elif weights != "none":
        _load_weights(model, _without_aux(arch, read_state_dict(weights)), weights, path)
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
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.input_size = input_size
        self.register_buffer("resized_to", torch.tensor(input_size) if input_size else None)

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        if self.input_size and images01.shape[-2:] != (self.input_size, self.input_size):
            images01 = nn.functional.interpolate(images01, size=(self.input_size, self.input_size), mode="bilinear",
                                                 antialias=self.input_size < images01.shape[-1])
        return self.model((images01 - self.mean) / self.std)


MIN_STD = 1 / 255  # one grey level, on the [0, 1] scale


def input_statistics(normalize: str, weights: str, model: nn.Module, dataset_mean: list[float],
                     dataset_std: list[float]) -> tuple[str, list[float], list[float]]:
    """(name, mean, std) of the input standardization a model gets.

    auto: the statistics pretrained weights were trained with (ImageNet's, or what a
    module:callable model declares in its `input_normalization` attribute), the training set's
    for a model trained from scratch.
    """
    if normalize == "auto":
        declared = getattr(model, "input_normalization", None)
        normalize = declared or ("imagenet" if weights != "none" else "dataset")
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
