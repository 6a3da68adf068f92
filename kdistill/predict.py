"""`kdistill predict`: label a folder of new images with a run's saved student (student.pt, or
student.onnx / student-int8.onnx through ONNX Runtime)."""
from __future__ import annotations

import multiprocessing
import os
import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .data import list_images, to_unit_range
from .errors import KdistillError
from .evaluate import write_predictions
from .export import load_bundle, load_onnx_student
from .fileio import temporary_name
from .images import DEFAULT_MAX_PIXELS, decode_task
from .run_folder import RunFolder
from .compute import resolve_device


def run_max_pixels(run_dir: str) -> int:
    """The run's own max_image_pixels (from RUN/config.yaml) where it is below the default. A run
    folder may come from someone else: its settings may lower the decompression-bomb limit, never
    raise or switch it off; without a positive integer there, the default applies."""
    folder = RunFolder(run_dir)
    if not os.path.exists(folder.config):
        return DEFAULT_MAX_PIXELS
    limit = folder.saved_settings().get("max_image_pixels", DEFAULT_MAX_PIXELS)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
        return DEFAULT_MAX_PIXELS
    return min(limit, DEFAULT_MAX_PIXELS)


def default_output(run: str, images_dir: str, kind: str = "predictions", extension: str = "csv") -> str:
    """<kind>-<image folder name>.<extension> in the run folder, or beside the student file that --run names."""
    name = os.path.basename(os.path.normpath(images_dir)) or "images"
    folder = run if os.path.isdir(run) else os.path.dirname(run)
    return os.path.join(folder, f"{kind}-{name}.{extension}")


def check_output(output: str) -> None:
    """Refuse an output that cannot be written now, before any image is predicted, not after."""
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise KdistillError(f"cannot write predictions to {output}: its folder {folder} does not exist")
    if os.path.isdir(output):
        raise KdistillError(f"cannot write predictions to {output}: it is a folder; give a file name with --out")
    try:
        name_max = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255  # the usual limit where the file system does not say
    # The file is written under a temporary name first (fileio.atomic_write), which is longer.
    if len(os.fsencode(temporary_name(os.path.basename(output)))) > name_max:
        raise KdistillError(f"cannot write predictions to {output}: its name is too long for the file system "
                            f"(at most {name_max - len(temporary_name(''))} bytes); choose a shorter --out")
    if not os.access(folder, os.W_OK):
        raise KdistillError(f"cannot write predictions to {output}: its folder {folder} is not writable")


def _refuse(path: str, reason: str) -> KdistillError:
    return KdistillError(f"bad input file {path}: {reason} (--strict; without it such files are skipped)")


def load_student(path: str, device: str, trust_arch: bool):
    """(forward: uint8 images N x 3 x S x S -> float logits on the CPU, its description) for a student
    file, by extension: .pt, the bundle (PyTorch, on device); .onnx, student.onnx or student-int8.onnx
    (ONNX Runtime on the CPU, described by its metadata)."""
    extension = os.path.splitext(path)[1].lower()
    if extension == ".onnx":
        if device not in ("auto", "cpu"):
            raise KdistillError(f"--device {device}: an .onnx student runs on ONNX Runtime's CPU provider here; "
                                f"use student.pt for {device}")
        session, description = load_onnx_student(path)
        name = session.get_inputs()[0].name

        def forward_onnx(images: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(session.run(None, {name: to_unit_range(images).numpy()})[0])
        return forward_onnx, description
    if extension != ".pt":
        raise KdistillError(f"{path}: expected a run folder, a student bundle (.pt) or an ONNX student (.onnx)")
    target = resolve_device(device, "--device")
    model, bundle = load_bundle(path, trust_arch)
    model.to(target)

    def forward_torch(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(to_unit_range(images.to(target))).float().cpu()
    return forward_torch, bundle


def student_path(run: str) -> tuple[str, str]:
    """(the run folder, the student file) that --run names: a run folder (its student.pt) or a file."""
    if os.path.isdir(run):
        model_path = os.path.join(run, "student.pt")
        if not os.path.exists(model_path):
            raise KdistillError(f"{model_path} not found: is {run} a finished kdistill run?")
        return run, model_path
    if os.path.isfile(run):
        return os.path.dirname(run) or ".", run
    raise KdistillError(f"--run {run} does not exist (a run folder or a student .pt / .onnx file)")


@dataclass(frozen=True)
class Reading:
    """How a folder of images is read: batch_size images at a time, decoded by `workers` processes
    (0: one per core); an unusable file stops everything in one line naming it (strict), or is
    skipped with one warning line in log."""
    batch_size: int = 64
    workers: int = 0
    strict: bool = False
    log: Callable[[str], None] = print


def predict_folder(run: str, images_dir: str, output: str, reading: Reading = Reading(), device: str = "auto",
                   trust_arch: bool = False, top_k: int = 1) -> int:
    """Write filename,label,confidence for every usable image under images_dir; return how many.

    run: a run folder (its student.pt) or a student file (.pt or .onnx; the run's settings, if
    any, are read from its folder). Files that are not usable images are skipped with one warning
    line, or with strict, the first one stops everything with one line naming it. top_k > 1 adds
    the next most probable classes and their probabilities (label_2, confidence_2, ...).
    """
    if reading.batch_size < 1:
        raise KdistillError(f"--batch-size must be >= 1, got {reading.batch_size}")
    if top_k < 1:
        raise KdistillError(f"--top-k must be >= 1, got {top_k}")
    run_dir, model_path = student_path(run)
    if not os.path.isdir(images_dir):
        raise KdistillError(f"image folder {images_dir} does not exist")
    check_output(output)
    max_pixels = run_max_pixels(run_dir)
    forward, description = load_student(model_path, device, trust_arch)
    if top_k > len(description["classes"]):
        raise KdistillError(f"--top-k {top_k} is more than the student's {len(description['classes'])} classes")
    files, rejected = list_images(images_dir)
    if rejected and reading.strict:
        raise _refuse(*rejected[0])
    kept, logits = folder_logits(images_dir, files, forward, description["image_size"], max_pixels, reading,
                                 rejected)
    write_predictions(output, kept, logits, description["classes"], top_k=top_k)
    return len(kept)


def folder_logits(images_dir: str, files: list[str], forward, size: int, max_pixels: int, reading: Reading,
                  rejected: list) -> tuple[list[str], torch.Tensor]:
    """(the usable files, their logits), the files decoded by a pool of workers batch by batch;
    rejected: (file, reason) found before, to which the unusable ones found here are added."""
    tasks = [(i, os.path.join(images_dir, f), size, max_pixels) for i, f in enumerate(files)]
    kept, logits = [], []
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    with multiprocessing.get_context(method).Pool(reading.workers or os.cpu_count() or 1) as pool:
        for start in range(0, len(tasks), reading.batch_size):
            results = pool.map(decode_task, tasks[start:start + reading.batch_size])
            bad = [(tasks[i][1], reason) for i, array, reason in results if array is None]
            if bad and reading.strict:
                raise _refuse(*bad[0])
            rejected += bad
            good = [(i, array) for i, array, _ in results if array is not None]
            if good:
                logits.append(forward(torch.from_numpy(np.stack([array for _, array in good]))))
                kept += [files[i] for i, _ in good]
    if rejected:
        reading.log(f"predict: skipped {len(rejected)} file(s) that are not usable images, for example "
            f"{rejected[0][0]} ({rejected[0][1]})")
    if not kept:
        raise KdistillError(f"no usable image in {images_dir}")
    return kept, torch.cat(logits)
