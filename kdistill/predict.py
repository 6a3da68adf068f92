"""`kdistill predict`: label a folder of new images with a run's saved student."""
from __future__ import annotations

import multiprocessing
import os
import sys

import numpy as np
import torch

from .data import list_images, to_unit_range
from .errors import KdistillError
from .evaluate import write_predictions
from .export import load_bundle
from .images import DEFAULT_MAX_PIXELS, decode_task


def predict_folder(run_dir: str, images_dir: str, output: str, batch_size: int = 64, workers: int = 0,
                   skip_bad: bool = False, log=print, trust_arch: bool = False) -> int:
    """Write filename,label,confidence for every image under images_dir; return how many."""
    bundle_path = os.path.join(run_dir, "student.pt")
    if not os.path.exists(bundle_path):
        raise KdistillError(f"{bundle_path} not found: is {run_dir} a finished kdistill run?")
    if not os.path.isdir(images_dir):
        raise KdistillError(f"image folder {images_dir} does not exist")
    model, bundle = load_bundle(bundle_path, trust_arch)
    files, rejected = list_images(images_dir)
    size = bundle["image_size"]
    tasks = [(i, os.path.join(images_dir, f), size, DEFAULT_MAX_PIXELS) for i, f in enumerate(files)]
    kept, logits = [], []
    workers = workers or os.cpu_count() or 1
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    with multiprocessing.get_context(method).Pool(workers) as pool:
        for start in range(0, len(tasks), batch_size):
            results = pool.map(decode_task, tasks[start:start + batch_size])
            rejected += [(tasks[i][1], reason) for i, array, reason in results if array is None]
            good = [(i, array) for i, array, _ in results if array is not None]
            if rejected and not skip_bad:
                raise KdistillError(f"bad input file {rejected[0][0]}: {rejected[0][1]}; fix or remove it, "
                                    f"or pass --skip-bad")
            if good:
                batch = torch.from_numpy(np.stack([array for _, array in good]))
                with torch.no_grad():
                    logits.append(model(to_unit_range(batch)))
                kept += [files[i] for i, _ in good]
    if not kept:
        raise KdistillError(f"no usable image in {images_dir}")
    write_predictions(output, kept, torch.cat(logits), bundle["classes"])
    if rejected:
        log(f"predict: skipped {len(rejected)} bad files (--skip-bad), for example {rejected[0][0]}")
    return len(kept)
