"""What the teacher's signal costs per student epoch under the recommended recipe, side by side.

Five student epochs, each through kdistill's own pipeline.train_student (student.epochs=1), timed as
fit's pass over the training batches, interleaved and rotated over --repeats (median reported):

  plain        rrc_flip drawn fresh, cross-entropy only (no teacher): the reference
  views        rrc_flip replayed from K stored views, the preset's distillation (KD plus FitNets' hint)
               on their stored teacher logits and features (FKD)
  online       rrc_flip drawn fresh, the teacher run on every batch for its logits and features
  plain_mix    rrc_flip + mixup/cutmix (mix both), no teacher
  online_mix   rrc_flip + mixup/cutmix, the teacher on every mixed batch (mixed images can't be stored)

The one-off cost of the stored views (K teacher passes over the training set) is reported in plain
epochs. Settings come from the recommended preset at --size px, with the teacher --teacher (default
EfficientNet-Lite0 with its real ImageNet weights), on this machine's precision (auto).

    python benchmarks/bench_signal.py --limit 200 --repeats 3     # ~15 min on 2 CPU cores
    python benchmarks/bench_signal.py --teacher resnet34 --size 128 --feature-storage int8 --limit 50
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torchvision
from bench_epoch import TimedBatches, cpu_model, make_subset, quiet

from kdistill.batcher import ImageBatcher
from kdistill.config import build_config
from kdistill.signal_plan import SignalPlan
from kdistill.data import prepare
from kdistill.distillers import CrossEntropy
from kdistill.features import resolve_auto_layers
from kdistill.models import standardized_model
from kdistill.compute import Compute, resolve_precision
from kdistill.pipeline import StudentTraining, train_student
from kdistill.teacher import TrainedTeacher, distillation_batches

VIEWS, ONLINE = SignalPlan("views", "benchmark"), SignalPlan("online", "benchmark")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "cifar10-seedlike"
LABELS = {"plain": "plain epoch (rrc_flip, no teacher)", "views": "distill, stored views",
          "online": "distill, teacher online", "plain_mix": "plain epoch + mixup/cutmix",
          "online_mix": "distill + mixup/cutmix, teacher online"}


def student_epoch(cfg, data, batcher, train_batches, objective, compute, work: Path) -> float:
    """Seconds of fit's pass over the training batches in a one-epoch train_student."""
    timed = TimedBatches(**{f.name: getattr(train_batches, f.name) for f in dataclasses.fields(train_batches)})
    out = Path(tempfile.mkdtemp(dir=work, prefix="run-"))
    train_student(StudentTraining(dataclasses.replace(cfg, out=str(out)), data, batcher("val"), compute, quiet),
                  "student", 0, timed, objective)
    shutil.rmtree(out)
    return timed.seconds


def interleaved_medians(variants: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Each variant's median seconds over repeats. The variants take turns within a repeat and the order
    rotates from one repeat to the next, so a slow spell of the machine falls on all of them alike."""
    times = {name: [] for name in variants}
    order = list(variants)
    for repeat in range(repeats):
        for name in order[repeat % len(order):] + order[:repeat % len(order)]:
            times[name].append(variants[name]())
            print(f"  repeat {repeat + 1}/{repeats}  {name:42s} {times[name][-1]:7.2f} s", flush=True)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--limit", type=int, help="use only the first N training images per class")
    parser.add_argument("--val-per-class", type=int, default=5)
    parser.add_argument("--teacher", default="kdistill.zoo:efficientnet_lite0")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--feature-storage", default="auto", choices=("auto", "float16", "int8"),
                        help="how the stored views keep the teacher's features (distill.feature_storage)")
    args = parser.parse_args()
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs; torch {torch.__version__}, torchvision "
          f"{torchvision.__version__}, {torch.get_num_threads()} threads; {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    work = Path(tempfile.mkdtemp(prefix="kdistill-bench-signal-", dir="/tmp"))
    try:
        subset = make_subset(args.data.resolve(), work / "data", args.limit, args.val_per_class)
        # Both models at --size px (input_size 0): the ratios of the signals' costs, as first measured.
        base = build_config(preset="recommended", overrides={
            "data": str(subset), "image_size": args.size, "cache_dir": str(work / "cache"), "device": "cpu",
            "teacher": {"arch": args.teacher, "weights": "none", "input_size": 0},
            "student": {"epochs": 1, "warmup_epochs": 0, "input_size": 0},
            "distill": {"feature_storage": args.feature_storage}})
        base = resolve_auto_layers(base, print)
        compute = Compute(torch.device("cpu"), resolve_precision(base.precision, torch.device("cpu")))
        data = prepare(base.data, args.size, base.cache_dir, log=print)
        torch.manual_seed(0)
        teacher, head, normalize = standardized_model(args.teacher, len(data.classes), 0.0, "none", "auto",
                                                      data.mean, data.std)
        trained = TrainedTeacher(compute.place(teacher).eval().requires_grad_(False), head, normalize, [], None,
                                 compute)
        mixed = dataclasses.replace(base, mix="both")
        plain_batcher, mixed_batcher = ImageBatcher(data, base, compute.device), ImageBatcher(data, mixed,
                                                                                                compute.device)
        started = time.perf_counter()
        views, _ = distillation_batches(VIEWS, base, data, {"teacher": trained}, plain_batcher, quiet)
        views_seconds = time.perf_counter() - started
        kd = base.distiller
        runs = {
            "plain": (base, plain_batcher, plain_batcher("train", augment=True), CrossEntropy),
            "views": (base, plain_batcher, views, kd),
            "online": (base, plain_batcher, distillation_batches(ONLINE, base, data, {"teacher": trained},
                                                                 plain_batcher, quiet)[0], kd),
            "plain_mix": (mixed, mixed_batcher, mixed_batcher("train", augment=True, mix=True), CrossEntropy),
            "online_mix": (mixed, mixed_batcher, distillation_batches(ONLINE, mixed, data, {"teacher": trained},
                                                                      mixed_batcher, quiet)[0], kd),
        }
        n = len(data.splits["train"].files)
        print(f"{n} training images at {args.size} px, teacher {args.teacher}, student {base.student.arch}, "
              f"batch {base.student.batch_size}, precision {compute.precision}; {base.distill.views} stored views "
              f"(features: {args.feature_storage}) computed once in {views_seconds:.1f} s")
        student_epoch(base, data, plain_batcher, runs["plain"][2], CrossEntropy(), compute, work)  # warm-up
        median = interleaved_medians({
            LABELS[name]: lambda cfg=cfg, batcher=batcher, batches=batches, make_objective=make_objective:
                student_epoch(cfg, data, batcher, batches, make_objective(), compute, work)
            for name, (cfg, batcher, batches, make_objective) in runs.items()}, args.repeats)
        median = {name: median[LABELS[name]] for name in runs}
        print(f"\n=== median of {args.repeats} (seconds per epoch, images/s, ratio) ===")
        for name, label in LABELS.items():
            print(f"  {label:42s} {median[name]:7.2f} s {n / median[name]:7.1f} img/s")
        print(f"  stored views / plain:           {median['views'] / median['plain']:.3f}  (target <= 1.1)")
        print(f"  teacher online / plain:         {median['online'] / median['plain']:.3f}")
        print(f"  online + mix / plain + mix:     {median['online_mix'] / median['plain_mix']:.3f}")
        print(f"  one-off stored views:           {views_seconds / median['plain']:.2f} plain epochs "
              f"({base.distill.views} views)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
