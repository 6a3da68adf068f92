"""Export: the distilled student as a self-describing bundle and as ONNX, ready to deploy.

- OUT/student.pt: architecture, head, classes, image size, input statistics, the side it resizes
  its input to (student.input_size) and weights; loads with weights_only=True and builds only
  trusted architectures (see load_bundle); it is what `kdistill predict` uses.
- OUT/student.onnx: takes float32 images scaled to [0, 1], shape (N, 3, S, S), and returns logits;
  the student's standardization is built in, so a deployment only resizes, crops and scales.
  It is written only if ONNX Runtime reproduces PyTorch's logits within ONNX_TOLERANCE. Its
  metadata_props describe it (ONNX_METADATA_KEYS, as JSON text under "kdistill.<key>"), so
  `kdistill predict` can use it alone; student-int8.onnx (see deploy.py) carries the same.
"""
from __future__ import annotations

import itertools
import json
import math
import warnings

import numpy as np
import torch

from .errors import KdistillError
from .fileio import atomic_write, load_torch, save_torch
from .images import MAX_IMAGE_SIZE
from .models import Standardized, build_model, is_trusted_arch

BUNDLE_KEYS = {"arch", "dropout", "classes", "image_size", "normalize", "mean", "std", "state_dict"}
# ONNX Runtime and PyTorch must agree within atol + rtol * (largest |logit|) on every logit.
ONNX_PROBE_IMAGES = 8  # val images an ONNX export is checked on against PyTorch
ONNX_TOLERANCE = {"atol": 1e-4, "rtol": 1e-3}
# What an ONNX student says about itself: enough to prepare its input and name its outputs.
ONNX_METADATA_KEYS = ("arch", "classes", "image_size", "normalize", "mean", "std")
ONNX_INPUT = "float32 RGB images scaled to [0, 1], N x 3 x S x S (short side resized to S, centre-cropped)"


def save_bundle(path: str, model: Standardized, arch: str, dropout: float, classes: list[str],
                image_size: int, normalize: str) -> dict:
    """Write the bundle; return its description (everything but the weights), as load_bundle does."""
    description = {"arch": arch, "dropout": dropout, "classes": classes, "image_size": image_size,
                   "normalize": normalize, "mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist(),
                   "input_size": model.input_size}
    save_torch({**description, "state_dict": model.state_dict()}, path, what="student bundle")
    return description


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def description_problem(description: dict) -> str | None:
    """What is wrong with a student's description (a bundle's fields or an ONNX file's metadata), as
    a field and a reason; None if it describes an image classifier kdistill can run."""
    classes, size = description.get("classes"), description.get("image_size")
    checks = [
        ("classes", isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)
         and len(set(classes)) == len(classes), "a list of distinct class names"),
        ("image_size", isinstance(size, int) and not isinstance(size, bool) and 8 <= size <= MAX_IMAGE_SIZE,
         f"a whole number of pixels in [8, {MAX_IMAGE_SIZE}]"),
        ("arch", isinstance(description.get("arch"), str), "an architecture name"),
        ("mean", isinstance(description.get("mean"), list) and len(description["mean"]) == 3
         and all(_is_number(v) for v in description["mean"]), "three numbers"),
        ("std", isinstance(description.get("std"), list) and len(description["std"]) == 3
         and all(_is_number(v) and v > 0 for v in description["std"]), "three positive numbers"),
        ("dropout", "dropout" not in description or (_is_number(description["dropout"])
                                                      and 0 <= description["dropout"] < 1), "a number in [0, 1)"),
        ("input_size", not description.get("input_size") or (isinstance(description["input_size"], int)
                                                               and not isinstance(description["input_size"], bool)
                                                               and 8 <= description["input_size"] <= MAX_IMAGE_SIZE),
         f"0 or a whole number of pixels in [8, {MAX_IMAGE_SIZE}]"),
    ]
    for field, ok, expected in checks:
        if not ok:
            return f"its {field} must be {expected}, got {str(description.get(field))[:60]!r}"
    return None


def load_bundle(path: str, trust_arch: bool = False) -> tuple[Standardized, dict]:
    """The bundle's model (eval mode, takes images in [0, 1]) and its metadata."""
    bundle = load_torch(path, what="student bundle")
    if not isinstance(bundle, dict) or not BUNDLE_KEYS <= set(bundle):
        raise KdistillError(f"{path} is not a kdistill student bundle (or one from an older kdistill)")
    problem = description_problem(bundle)
    if problem or not isinstance(bundle["state_dict"], dict):
        raise KdistillError(f"{path} is a damaged student bundle: {problem or 'its state_dict is not a dict'}")
    arch = bundle["arch"]
    if not (trust_arch or is_trusted_arch(arch)):
        raise KdistillError(f"{path} names the architecture {arch!r}, which would run that module's code; "
                            f"only torchvision, timm and kdistill.zoo architectures load by default. If you trust "
                            f"who made this file, pass --trust-arch")
    model, _ = build_model(arch, len(bundle["classes"]), bundle["dropout"])
    # input_size: the side the model resizes its input to (student.input_size); absent before it existed.
    model = Standardized(model, bundle["mean"], bundle["std"], bundle.get("input_size", 0))
    try:
        model.load_state_dict(bundle["state_dict"])
    except RuntimeError as e:
        raise KdistillError(f"{path}: weights do not fit {arch} ({str(e).splitlines()[0]})") from None
    return model.eval(), bundle


def set_onnx_metadata(onnx_model, description: dict) -> None:
    """The student's description into a freshly exported onnx.ModelProto's metadata_props."""
    for key, value in [*((key, description[key]) for key in ONNX_METADATA_KEYS), ("input", ONNX_INPUT)]:
        prop = onnx_model.metadata_props.add()
        prop.key, prop.value = f"kdistill.{key}", json.dumps(value)


def export_onnx(path: str, model: Standardized, probe: torch.Tensor, description: dict | None = None) -> float:
    """Write the ONNX file and return the largest |difference| from PyTorch on the probe images
    (float, [0, 1], N x 3 x S x S). Raises, leaving no file, if that exceeds ONNX_TOLERANCE.

    description: the bundle's (save_bundle, load_bundle), written into the file's metadata_props."""
    import onnx
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
        if description is not None:
            onnx_model = onnx.load(tmp)
            set_onnx_metadata(onnx_model, description)
            onnx.save(onnx_model, tmp)
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


def _sparse_parts(sparse_tensors) -> list:
    return [part for sparse in sparse_tensors for part in (sparse.values, sparse.indices)]


def _node_tensors(nodes):
    """Every tensor in the nodes' attributes, their subgraphs' included."""
    for node in nodes:
        for attribute in node.attribute:
            yield attribute.t
            yield from attribute.tensors
            yield from _sparse_parts([attribute.sparse_tensor, *attribute.sparse_tensors])
            for graph in (attribute.g, *attribute.graphs):
                yield from _graph_tensors(graph)


def _graph_tensors(graph):
    yield from graph.initializer
    yield from _sparse_parts(graph.sparse_initializer)
    yield from _node_tensors(graph.node)


def _external_tensors(model) -> list[str]:
    """The names of the tensors of an onnx.ModelProto whose bytes it says are in other files."""
    from onnx import TensorProto

    tensors = itertools.chain(_graph_tensors(model.graph), *(_node_tensors(f.node) for f in model.functions))
    return [t.name for t in tensors if t.data_location == TensorProto.EXTERNAL or len(t.external_data)]


def _unusable(path: str, error: Exception) -> KdistillError:
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return KdistillError(f"{path} is not a usable ONNX model ({message[:160]})")


def load_onnx_student(path: str, threads: int = 0):
    """An ONNX Runtime session (CPU; threads: intra-op threads, 0 = ONNX Runtime's default) for a
    kdistill ONNX student, and its description (ONNX_METADATA_KEYS). A file that is not an ONNX
    model, or one kdistill did not write, is refused in one line naming it."""
    import onnx
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # ONNX Runtime's own warnings would break the one-line error
    try:
        with open(path, "rb") as f:
            blob = f.read()
        model = onnx.load_model_from_string(blob)  # without external data: no other file is read
    except Exception as e:  # protobuf's DecodeError, onnx's own errors, OSError
        raise _unusable(path, e) from None
    # A received model naming other files (../../.ssh/id_rsa) is refused here, whatever the
    # installed ONNX Runtime checks; given bytes, it has no folder to resolve such names in either.
    external = _external_tensors(model)
    if external:
        raise KdistillError(f"{path} references external data (tensor {external[0][:80]!r} is stored in another file); "
                            f"kdistill writes self-contained ONNX students and reads no others")
    try:
        session = onnxruntime.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own classes (InvalidProtobuf, Fail, ...)
        raise _unusable(path, e) from None
    stored = session.get_modelmeta().custom_metadata_map
    missing = [f"kdistill.{key}" for key in ONNX_METADATA_KEYS if f"kdistill.{key}" not in stored]
    if missing:
        raise KdistillError(f"{path} is an ONNX model but not a kdistill student: its metadata has no "
                            f"{missing[0]} (`kdistill export --run RUN` writes a run's students with it)")
    try:
        description = {key: json.loads(stored[f"kdistill.{key}"]) for key in ONNX_METADATA_KEYS}
    except ValueError as e:
        raise KdistillError(f"{path}: unreadable kdistill metadata ({e})") from None
    problem, inputs = description_problem(description), session.get_inputs()
    if problem or not (len(inputs) == 1 and len(inputs[0].shape) == 4):
        raise KdistillError(f"{path}: its kdistill metadata or its input does not describe an image classifier"
                            f"{f' ({problem})' if problem else ''}")
    return session, description
