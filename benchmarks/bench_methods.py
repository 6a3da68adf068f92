"""What each distillation method costs per student epoch, against a plain epoch, side by side.

Every registered method (kdistill.distillers.DISTILLERS) trains one student epoch through kdistill's
own pipeline.train_student (student.epochs=1), with the teacher's signal served the way a run serves
it for that method (cfg.signal_plan(): cached logits without augmentation; a method that reads
teacher features gets what the run gives it, cached or online, and the table says which). The
reference is a plain epoch (cross-entropy only, no teacher) on the same batches. Each epoch is timed
as fit's pass over the training batches; the variants are interleaved and rotated over --repeats,
and the median is reported with its ratio to the plain epoch (target <= 1.3 with cached signals).

The teacher is a ResNet34 and the student a ResNet18 (the methods' default module paths are theirs),
with random weights: timings don't depend on the weights, and nothing can be downloaded here.

    python benchmarks/bench_methods.py --limit 100 --repeats 3      # 640 s on 2 CPU cores
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from bench_epoch import cpu_model, make_subset, quiet
from bench_signal import interleaved_medians, student_epoch

from kdistill.batcher import ImageBatcher
from kdistill.compute import Compute, resolve_precision
from kdistill.config import build_config
from kdistill.data import prepare
from kdistill.distillers import DISTILLERS, CrossEntropy
from kdistill.models import standardized_model
from kdistill.teacher import TrainedTeacher, distillation_batches

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "cifar10-seedlike"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--limit", type=int, help="use only the first N training images per class")
    parser.add_argument("--val-per-class", type=int, default=5)
    parser.add_argument("--methods", nargs="*", default=sorted(DISTILLERS), help="default: every registered one")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs; torch {torch.__version__}, torchvision "
          f"{torchvision.__version__}, {torch.get_num_threads()} threads; {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    work = Path(tempfile.mkdtemp(prefix="kdistill-bench-methods-", dir="/tmp"))
    try:
        subset = make_subset(args.data.resolve(), work / "data", args.limit, args.val_per_class)
        base = build_config(overrides={
            "data": str(subset), "image_size": args.size, "cache_dir": str(work / "cache"), "device": "cpu",
            "augment": "none", "teacher": {"arch": "resnet34", "weights": "none"},
            "student": {"arch": "resnet18", "weights": "none", "epochs": 1}})
        compute = Compute(torch.device("cpu"), resolve_precision(base.precision, torch.device("cpu")))
        data = prepare(base.data, args.size, base.cache_dir, log=quiet)
        batcher = ImageBatcher(data, base, compute.device, channels_last=compute.channels_last)
        torch.manual_seed(0)
        teacher, head, normalize = standardized_model("resnet34", len(data.classes), 0.0, "none", "auto",
                                                      data.mean, data.std)
        trained = TrainedTeacher(compute.place(teacher).eval().requires_grad_(False), head, normalize, [], None,
                                 compute)
        runs = {"plain": (base, batcher("train"), lambda: CrossEntropy(), "none")}
        for method in args.methods:
            cfg = dataclasses.replace(base, distill=dataclasses.replace(base.distill, method=method))
            batches, served = distillation_batches(cfg.signal_plan(), cfg, data, {"teacher": trained}, batcher,
                                                   quiet)
            runs[method] = (cfg, batches, cfg.distiller, served.kind)
        n = len(data.splits["train"].files)
        print(f"{n} training images at {args.size} px, teacher resnet34, student resnet18, batch "
              f"{base.student.batch_size}, precision {compute.precision}, augment none")
        student_epoch(base, data, batcher, runs["plain"][1], CrossEntropy(), compute, work)  # warm-up
        # make_objective() per epoch: a method's trainable parts (adapters, a peer) start afresh each time.
        median = interleaved_medians({
            name: lambda cfg=cfg, batches=batches, make_objective=make_objective: student_epoch(
                cfg, data, batcher, batches, make_objective(), compute, work)
            for name, (cfg, batches, make_objective, _) in runs.items()}, args.repeats)
        print(f"\n=== median of {args.repeats} repeats: seconds per epoch, images/s, ratio to plain ===")
        print("| method | teacher signal | s/epoch | img/s | x plain |\n|---|---|---|---|---|")
        for name, (_, _, _, signal) in runs.items():
            print(f"| {name} | {signal} | {median[name]:.2f} | {n / median[name]:.1f} | "
                  f"{median[name] / median['plain']:.2f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
