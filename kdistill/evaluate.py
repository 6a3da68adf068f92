"""Evaluation: what a model costs (parameters, size, FLOPs, latency) and what it predicts."""
from __future__ import annotations

import csv
import os
import statistics
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .errors import KdistillError
from .fileio import atomic_write


def gflops(model: nn.Module, image_size: int, device: torch.device) -> float:
    """Forward FLOPs for one image, counting a multiply-add as 2 (as the seed reports do)."""
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, image_size, image_size, device=device))
    return counter.get_total_flops() / 1e9


@torch.no_grad()
def latency_ms(model: nn.Module, image_size: int, device: torch.device, repeats: int = 20) -> float:
    """Median wall time of one forward pass on one image."""
    model.eval()
    x = torch.randn(1, 3, image_size, image_size, device=device)
    times = []
    for i in range(repeats + 3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:  # the first calls pay for allocation and kernel selection
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def profile(model: nn.Module, weights_file: str, image_size: int, device: torch.device) -> dict:
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "size_mb": os.path.getsize(weights_file) / 2**20,
        "gflops": gflops(model, image_size, device),
        "latency_ms": latency_ms(model, image_size, device),
    }


# A cell starting with one of these is a formula to a spreadsheet (OWASP, CSV injection).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(cell: str) -> str:
    """The cell as text a spreadsheet shows and never evaluates: a leading ' where it could start a
    formula (OWASP's advice)."""
    return "'" + cell if cell.startswith(FORMULA_STARTS) else cell


def write_predictions(path: str, files: list[str], logits: torch.Tensor, classes: list[str],
                      model: str = "the student", top_k: int = 1) -> None:
    """predictions.csv: file name, predicted class, its probability (with top_k > 1, the next classes
    and theirs: label_2, confidence_2, ...). Refuses non-finite logits: a broken model would label
    every image its first class."""
    if not torch.isfinite(logits).all():
        raise KdistillError(f"{model} gives non-finite outputs (NaN or infinity): its weights are broken; {path} "
                            f"was not written")
    confidence, index = logits.softmax(dim=1).topk(top_k, dim=1)
    header = ["filename", "label", "confidence"]
    header += [f"{column}_{rank}" for rank in range(2, top_k + 1) for column in ("label", "confidence")]

    def write(tmp: str) -> None:
        # Non-UTF-8 file names are kept readable as backslash escapes rather than failing the run.
        with open(tmp, "w", newline="", encoding="utf-8", errors="backslashreplace") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            for name, ranked, probabilities in zip(files, index.tolist(), confidence.tolist()):
                writer.writerow([spreadsheet_safe(name), *(cell for i, p in zip(ranked, probabilities)
                                                           for cell in (spreadsheet_safe(classes[i]), f"{p:.4f}"))])
    atomic_write(path, write, "predictions")
