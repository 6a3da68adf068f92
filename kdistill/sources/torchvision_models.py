"""torchvision's classification models by name; `imagenet` weights are its IMAGENET1K_V1."""
from __future__ import annotations

import os
import socket
import urllib.error

import torch
import torchvision
from torch import nn

from ..errors import KdistillError

# torchvision models that return (logits, aux logits) in train mode: built without the auxiliary
# heads (one plain logits tensor, like every other model), so the weights' aux tensors are dropped.
# transform_input is on whatever the weights: ImageNet weights need it, and a saved student (rebuilt
# with weights=none) must see its inputs exactly as in training.
AUX_HEAD_ARCHS = {"googlenet": ("aux1.", "aux2."), "inception_v3": ("AuxLogits.",)}
# Smallest image_size each torchvision architecture can take (smaller ones fail in its pooling).
MIN_IMAGE_SIZE = {"googlenet": 15, "inception_v3": 75}


def problem(name: str, image_size: int) -> str | None:
    if name not in torchvision.models.list_models(module=torchvision.models):
        return f"unknown architecture {name!r}"
    if image_size < MIN_IMAGE_SIZE.get(name, 0):
        return f"{name} needs images of at least {MIN_IMAGE_SIZE[name]} px, got {image_size} px"
    return None


def imagenet_state_dict(name: str) -> dict:
    """torchvision's IMAGENET1K_V1 weights, from torch's hub cache or downloaded once into it."""
    weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(15)  # offline machines should fail in seconds, not minutes
    try:
        return torch.hub.load_state_dict_from_url(weights.url, progress=False, weights_only=True)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise KdistillError(
            f"could not download ImageNet weights for {name} ({getattr(e, 'reason', e)}); this machine "
            f"looks offline. Download {weights.url} elsewhere and either put it at {cached} or pass "
            f"weights=/path/to/{os.path.basename(weights.url)}") from None
    finally:
        socket.setdefaulttimeout(previous_timeout)


def adapt_state(name: str, state: dict) -> dict:
    """The state dict less the auxiliary heads this model is built without (see AUX_HEAD_ARCHS)."""
    prefixes = AUX_HEAD_ARCHS.get(name, ())
    return {k: v for k, v in state.items() if not k.startswith(prefixes)} if prefixes else state


def build(name: str, pretrained: bool) -> nn.Module:
    if name in AUX_HEAD_ARCHS:
        # torchvision's own initialization (slow) only where weights won't overwrite it, as torchvision does.
        model = torchvision.models.get_model(name, weights=None, aux_logits=False, transform_input=True,
                                             init_weights=not pretrained)
    else:
        model = torchvision.models.get_model(name, weights=None)
    if pretrained:
        model.load_state_dict(adapt_state(name, imagenet_state_dict(name)))
    return model
