"""Export: the distilled student as a self-describing bundle and as ONNX, ready to deploy.

- OUT/student.pt: architecture, head, classes, image size, normalization and weights; loads with
  weights_only=True (see load_bundle) and is what `kdistill predict` uses.
- OUT/student.onnx: takes float32 images scaled to [0, 1], shape (N, 3, S, S), and returns logits;
  the training set's standardization is built in, so a deployment only resizes, crops and scales.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from .errors import KdistillError
from .fileio import atomic_write, load_torch, save_torch
from .models import build_model

BUNDLE_KEYS = {"arch", "dropout", "classes", "image_size", "mean", "std", "state_dict"}


def save_bundle(path: str, model: nn.Module, arch: str, dropout: float, classes: list[str],
                image_size: int, mean: list[float], std: list[float]) -> None:
    save_torch({"arch": arch, "dropout": dropout, "classes": classes, "image_size": image_size,
                "mean": mean, "std": std, "state_dict": model.state_dict()}, path, what="student bundle")


def load_bundle(path: str) -> tuple[nn.Module, dict]:
    bundle = load_torch(path, what="student bundle")
    if not isinstance(bundle, dict) or not BUNDLE_KEYS <= set(bundle):
        raise KdistillError(f"{path} is not a kdistill student bundle")
    model, _ = build_model(bundle["arch"], len(bundle["classes"]), bundle["dropout"])
    try:
        model.load_state_dict(bundle["state_dict"])
    except RuntimeError as e:
        raise KdistillError(f"{path}: weights do not fit {bundle['arch']} ({str(e).splitlines()[0]})") from None
    return model.eval(), bundle


class Standardized(nn.Module):
    """The model with the training set's per-channel standardization in front."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        return self.model((images01 - self.mean) / self.std)


def export_onnx(path: str, model: nn.Module, image_size: int, mean: list[float], std: list[float]) -> float:
    """Write the ONNX file and return the largest |difference| from PyTorch on a probe batch."""
    import onnxruntime

    wrapped = Standardized(model, mean, std).cpu().eval()
    probe = torch.rand(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))

    def write(tmp: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(wrapped, (probe,), tmp, dynamo=False, input_names=["images"],
                              output_names=["logits"], dynamic_axes={"images": {0: "batch"},
                                                                     "logits": {0: "batch"}})
    atomic_write(path, write, "ONNX model")
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    onnx_logits = session.run(None, {"images": probe.numpy()})[0]
    with torch.no_grad():
        torch_logits = wrapped(probe).numpy()
    return float(np.abs(onnx_logits - torch_logits).max())
