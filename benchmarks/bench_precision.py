"""CPU speed of a model by precision and memory format, side by side in one run.

One training step (forward, backward, SGD step) of --arch (default resnet18; any kdistill arch,
e.g. kdistill.zoo:efficientnet_lite0) at --size px, batch --batch, on the CPU's threads, or with
--forward a forward pass alone in eval mode (what a teacher's stored signal and every evaluation
cost): float32, float32 + channels_last, bfloat16 autocast, bfloat16 + channels_last. Timed with
torch.utils.benchmark.Timer (blocked_autorange, median), variants interleaved over --rounds rounds;
reports images/s and each variant's speed-up over float32.

    python benchmarks/bench_precision.py --size 112 --batch 64
    python benchmarks/bench_precision.py --arch kdistill.zoo:efficientnet_lite0 --size 128 --forward
"""
from __future__ import annotations

import argparse
import platform
import statistics

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

from kdistill.models import build_model

VARIANTS = {"fp32": (False, False), "fp32 + channels_last": (False, True), "bf16": (True, False),
            "bf16 + channels_last": (True, True)}


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return {flag for line in f if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    except OSError:
        return set()


def step_function(arch: str, bf16: bool, channels_last: bool, size: int, batch: int, forward_only: bool):
    torch.manual_seed(0)
    model = build_model(arch, 10)[0].train(not forward_only)
    images = torch.randn(batch, 3, size, size)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (batch,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        with torch.set_grad_enabled(not forward_only), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(images)
        if forward_only:
            return
        loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    step()  # first-call allocations and kernel choices
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--forward", action="store_true", help="a forward pass alone, in eval mode")
    parser.add_argument("--min-time", type=float, default=4.0, help="seconds per variant and round")
    args = parser.parse_args()
    flags = cpu_flags()
    print(f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"avx512_bf16: {'avx512_bf16' in flags}, amx_bf16: {'amx_bf16' in flags}")
    steps = {name: step_function(args.arch, *options, args.size, args.batch, args.forward)
             for name, options in VARIANTS.items()}
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            # Timer runs on one thread unless told: a run uses all of its threads.
            timer = Timer("step()", globals={"step": step}, num_threads=torch.get_num_threads())
            seconds[name].append(timer.blocked_autorange(min_run_time=args.min_time).median)
    base = statistics.median(seconds["fp32"])
    what = "forward pass" if args.forward else "training step"
    print(f"\n{args.arch} {what}, {args.size} px, batch {args.batch}, median of {args.rounds} rounds:")
    for name, times in seconds.items():
        median = statistics.median(times)
        print(f"  {name:22s} {args.batch / median:6.1f} img/s   {base / median:4.2f}x float32")


if __name__ == "__main__":
    main()
