"""What precision: auto chooses for the recommended preset's models on this machine, what the choice
costs at the start of a run, and how its speed compares with the rule auto followed before (bf16 +
channels_last wherever the CPU has bfloat16 units), side by side in one process.

For each model: the table auto measures (precision_choice.measure: images/s of a step on its real
batch shape in each candidate), its wall time, then the chosen candidate and the old rule's timed
again, interleaved over --rounds rounds (median), so the comparison is not the choice's own noise.

    python benchmarks/bench_precision_choice.py --image-size 64 --batch 64
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

from kdistill.compute import Compute, cpu_has_bf16
from kdistill.models import standardized_model
from kdistill.precision_choice import _fastest, _from_label, measure, step_images_per_second

# (name, arch, side it sees, whether it trains whole): the recommended preset's teacher and student.
MODELS = (("teacher", "kdistill.zoo:efficientnet_lite0", 128, True), ("student", "resnet18", 128, True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=64, help="the stored images' side (the models resize up)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cpu = torch.device("cpu")
    print(f"{torch.get_num_threads()} threads, {len(os.sched_getaffinity(0))} cores, bf16 units: {cpu_has_bf16()}, "
          f"torch {torch.__version__}")
    old_rule = Compute(cpu, "bf16" if cpu_has_bf16() else "fp32")
    for name, arch, side, trains in MODELS:
        timed = {"arch": arch, "side": side, "image_size": args.image_size, "batch": args.batch, "classes": 10,
                 "trains": trains, "dropout": 0.0}
        start = time.perf_counter()
        table = measure(timed, cpu)
        cost = time.perf_counter() - start
        choice = _from_label(cpu, _fastest(table))
        print(f"\n{name} {arch} at {side} px, batch {args.batch}: measured in {cost:.1f} s: " +
              ", ".join(f"{label} {speed:.1f}" if speed else f"{label} not finite" for label, speed in table.items()) +
              f" img/s; chosen {choice.label()}")
        model = standardized_model(arch, 10, 0.0, "none", "dataset", [0.5] * 3, [0.25] * 3,
                                   side if side > args.image_size else 0)[0]
        images, labels = torch.rand(args.batch, 3, args.image_size, args.image_size), torch.arange(args.batch) % 10
        speeds = {"chosen": [], "old auto": []}
        for _ in range(args.rounds):
            for which, compute in (("chosen", choice), ("old auto", old_rule)):
                speeds[which].append(step_images_per_second(copy.deepcopy(model), compute, images, labels, trains, 5))
        chosen, old = (statistics.median(speeds[which]) for which in ("chosen", "old auto"))
        print(f"  chosen {choice.label()} {chosen:.1f} img/s against the old auto ({old_rule.label()}) {old:.1f} "
              f"img/s: {chosen / old:.2f}x (per round: {', '.join(f'{a / b:.2f}' for a, b in zip(*speeds.values()))})")


if __name__ == "__main__":
    main()
