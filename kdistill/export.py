"""Export: the distilled student as a self-describing bundle and as ONNX, ready to deploy.

- OUT/student.pt: architecture, head, classes, image size, input statistics and weights; loads
  with weights_only=True and builds only trusted architectures (see load_bundle); it is what
  `kdistill predict` uses.
- OUT/student.onnx: takes float32 images scaled to [0, 1], shape (N, 3, S, S), and returns logits;
  the student's standardization is built in, so a deployment only resizes, crops and scales.
  It is written only if ONNX Runtime reproduces PyTorch's logits within ONNX_TOLERANCE.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from .errors import KdistillError
from .fileio import atomic_write, load_torch, save_torch
from .models import Standardized, build_model

BUNDLE_KEYS = {"arch", "dropout", "classes", "image_size", "normalize", "mean", "std", "state_dict"}
# Architectures a bundle may name without --trust-arch: building them runs only torchvision's
# and kdistill's own code. Any other module:callable is imported and called, i.e. it runs code.
TRUSTED_MODULES = ("kdistill.zoo",)
# ONNX Runtime and PyTorch must agree within atol + rtol * (largest |logit|) on every logit.
ONNX_TOLERANCE = {"atol": 1e-4, "rtol": 1e-3}


def save_bundle(path: str, model: Standardized, arch: str, dropout: float, classes: list[str],
                image_size: int, normalize: str) -> None:
    save_torch({"arch": arch, "dropout": dropout, "classes": classes, "image_size": image_size,
                "normalize": normalize, "mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist(),
                "state_dict": model.state_dict()}, path, what="student bundle")


def is_trusted_arch(arch: str) -> bool:
    module, sep, _ = arch.partition(":")
    return not sep or module in TRUSTED_MODULES


def load_bundle(path: str, trust_arch: bool = False) -> tuple[Standardized, dict]:
    """The bundle's model (eval mode, takes images in [0, 1]) and its metadata."""
    bundle = load_torch(path, what="student bundle")
    if not isinstance(bundle, dict) or not BUNDLE_KEYS <= set(bundle):
        raise KdistillError(f"{path} is not a kdistill student bundle (or one from an older kdistill)")
    arch = bundle["arch"]
    if not isinstance(arch, str) or not (trust_arch or is_trusted_arch(arch)):
        raise KdistillError(f"{path} names the architecture {arch!r}, which would run that module's code; "
                            f"only torchvision and kdistill.zoo architectures load by default. If you trust "
                            f"who made this file, pass --trust-arch")
    model, _ = build_model(arch, len(bundle["classes"]), bundle["dropout"])
    model = Standardized(model, bundle["mean"], bundle["std"])
    try:
        model.load_state_dict(bundle["state_dict"])
    except RuntimeError as e:
        raise KdistillError(f"{path}: weights do not fit {arch} ({str(e).splitlines()[0]})") from None
    return model.eval(), bundle


def export_onnx(path: str, model: Standardized, probe: torch.Tensor) -> float:
    """Write the ONNX file and return the largest |difference| from PyTorch on the probe images
    (float, [0, 1], N x 3 x S x S). Raises, leaving no file, if that exceeds ONNX_TOLERANCE."""
    import onnxruntime

    model = model.cpu().eval()
    probe = probe.cpu().float()
    with torch.no_grad():
        torch_logits = model(probe).numpy()
    difference = float("nan")

    def write_and_check(tmp: str) -> None:
        nonlocal difference
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(model, (probe,), tmp, dynamo=False, input_names=["images"],
                              output_names=["logits"], dynamic_axes={"images": {0: "batch"},
                                                                     "logits": {0: "batch"}})
        session = onnxruntime.InferenceSession(tmp, providers=["CPUExecutionProvider"])
        onnx_logits = session.run(None, {"images": probe.numpy()})[0]
        difference = float(np.abs(onnx_logits - torch_logits).max())
        allowed = ONNX_TOLERANCE["atol"] + ONNX_TOLERANCE["rtol"] * float(np.abs(torch_logits).max())
        if not difference <= allowed:  # also catches NaN
            raise KdistillError(
                f"ONNX export of the student disagrees with PyTorch: largest logit difference {difference:.3g} "
                f"> {allowed:.3g} (atol {ONNX_TOLERANCE['atol']} + rtol {ONNX_TOLERANCE['rtol']} x largest "
                f"logit) on {len(probe)} images; {path} was not written (student.pt is)")
    atomic_write(path, write_and_check, "ONNX model")
    return difference
