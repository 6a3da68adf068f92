"""The distilled student in deployment: fp32 PyTorch, fp32 ONNX Runtime and static int8 ONNX Runtime,
on a finished run (after `kdistill export --run RUN`, which writes student-int8.onnx; so does
`kdistill run` with deploy_check on).

Prints, per way of running the student: size on disk, val accuracy (every val image), CPU latency
at batch 1 and 32 (median of --repeats timed runs per round after warm-up, the rows taking turns
over --rounds rounds; PyTorch timed with torch.utils.benchmark.Timer, ONNX Runtime with
time.perf_counter) and the threads used; then checks the targets of int8 against fp32 ONNX
Runtime: at most 1 point of val accuracy lost, at least 3.5x smaller, at least 1.5x faster at
batch 1. Exits 1 if a target is missed.

--variants also quantizes the student in the other formats (QDQ / QOperator, uint8 / int8
activations) into a temporary folder and times them alike: how deploy.py's choice was made.

    python benchmarks/bench_int8.py --run runs/exp1 --repeats 200 --rounds 5
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

from kdistill.deploy import Engine, Timing, measure, onnx_engine, quantize_int8, run_data, run_settings, torch_engine
from kdistill.errors import KdistillError
from kdistill.export import load_bundle, load_onnx_student

TARGETS = {"max_accuracy_loss_points": 1.0, "min_size_ratio": 3.5, "min_speedup_b1": 1.5}
VARIANTS = [("QDQ", "QUInt8"), ("QDQ", "QInt8"), ("QOperator", "QUInt8"), ("QOperator", "QInt8")]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a finished run folder holding student-int8.onnx")
    parser.add_argument("--repeats", type=int, default=100, help="timed runs at batch 1 per round (a fifth at 32)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch and ONNX Runtime threads (default: torch's)")
    parser.add_argument("--variants", action="store_true", help="also time the other int8 formats")
    args = parser.parse_args()
    threads = args.threads or torch.get_num_threads()
    paths = {name: os.path.join(args.run, name) for name in ("student.pt", "student.onnx", "student-int8.onnx")}
    for path in paths.values():
        if not os.path.exists(path):
            raise KdistillError(f"{path} not found: run `kdistill export --run {args.run}` first")
    load_onnx_student(paths["student-int8.onnx"])  # a kdistill ONNX student, with its metadata
    cfg, _ = run_settings(args.run)
    data = run_data(args.run, cfg, log=lambda message: None)
    student, _ = load_bundle(paths["student.pt"])
    engines = {"fp32 PyTorch": Engine(torch_engine(student), paths["student.pt"], True),
               "fp32 ONNX Runtime": Engine(onnx_engine(paths["student.onnx"], threads), paths["student.onnx"], False),
               "int8 ONNX Runtime": Engine(onnx_engine(paths["student-int8.onnx"], threads),
                                           paths["student-int8.onnx"], False)}
    with tempfile.TemporaryDirectory() as work:
        if args.variants:
            for quant_format, activations in VARIANTS:
                path = os.path.join(work, f"{quant_format}-{activations}.onnx")
                quantize_int8(paths["student.onnx"], path, data.splits["train"].images, quant_format, activations)
                engines[f"int8 {quant_format}, {activations} activations"] = Engine(onnx_engine(path, threads), path,
                                                                                    False)
        val = data.splits["val"]
        timing = Timing(args.repeats, args.rounds, args.warmup)
        rows = measure(engines, val.images, val.labels, timing, threads)
    print(f"{args.run}: {cfg.student.arch} at {cfg.image_size} px, {len(val.files)} val images; {cpu_name()}, "
          f"{threads} threads, load average {os.getloadavg()[0]:.1f} at the end; median of "
          f"{timing.runs(1) * timing.rounds} runs at batch 1, {timing.runs(32) * timing.rounds} at batch 32")
    print(f"{'':44s} {'size MiB':>9s} {'val acc':>8s} {'b1 ms':>8s} {'b32 ms':>8s} {'threads':>7s}")
    for name, row in rows.items():
        print(f"{name:44s} {row['size_mb']:9.2f} {row['val_acc']:8.2%} {row['latency_ms_b1']:8.2f} "
              f"{row['latency_ms_b32']:8.1f} {row['threads']:7d}")
    fp32, int8 = rows["fp32 ONNX Runtime"], rows["int8 ONNX Runtime"]
    checks = [("val accuracy lost (points)", (fp32["val_acc"] - int8["val_acc"]) * 100,
               lambda v: v <= TARGETS["max_accuracy_loss_points"], f"<= {TARGETS['max_accuracy_loss_points']}"),
              ("size ratio fp32 / int8", fp32["size_mb"] / int8["size_mb"],
               lambda v: v >= TARGETS["min_size_ratio"], f">= {TARGETS['min_size_ratio']}"),
              ("speed-up at batch 1", fp32["latency_ms_b1"] / int8["latency_ms_b1"],
               lambda v: v >= TARGETS["min_speedup_b1"], f">= {TARGETS['min_speedup_b1']}")]
    missed = 0
    for label, value, ok, target in checks:
        missed += not ok(value)
        print(f"int8 vs fp32 ONNX Runtime: {label} {value:.2f} (target {target}): {'met' if ok(value) else 'MISSED'}")
    return 1 if missed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KdistillError as e:
        print(f"bench_int8: error: {e}", file=sys.stderr)
        sys.exit(2)
