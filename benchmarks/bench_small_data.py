"""The `small-data` preset on few labelled images: does the distilled student reach its teacher, and
does the teacher help (against the same recipe without it)? Over seeds, mean ± std, best epochs.

Each dataset is one `kdistill run --preset small-data --seeds ...` (the teacher trained once, the
student and its baseline once per seed, both from the same pretrained weights); resumable: rerun
the same command and finished runs are read, not retrained. Datasets:
- hymenoptera: all of it (about 120 training photos per class, 2 classes);
- cifar10-30: the first 30 training images per class of cifar10-seedlike, its full val split.

    python benchmarks/bench_small_data.py --out /work/runs/small --seeds 0,1,2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_epoch import cpu_model, make_subset

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED = REPO_ROOT.parent / "shared" / "data"


def datasets(out: Path) -> dict[str, Path]:
    subset = out / "data-cifar10-30"
    if not subset.exists():
        make_subset(SHARED / "cifar10-seedlike", subset, 30, 260)
    return {"hymenoptera": SHARED / "hymenoptera", "cifar10-30": subset}


def summary(metrics: dict) -> str:
    rows = metrics["seeds"]
    teacher = metrics["models"]["teacher"]
    parts = [f"teacher {teacher['best_val_acc']:.2%} (epoch {teacher['best_epoch']} of {teacher['epochs']})"]
    for kind in ("student", "baseline"):
        accs = [row["best_val_acc"] * 100 for row in rows[kind]]
        epochs = ", ".join(str(row["best_epoch"]) for row in rows[kind])
        parts.append(f"{kind} {statistics.mean(accs):.2f} ± {statistics.stdev(accs):.2f}% "
                     f"({', '.join(f'{a:.2f}' for a in accs)}; best epochs {epochs})")
    gap = teacher["best_val_acc"] * 100 - statistics.mean(row["best_val_acc"] * 100 for row in rows["student"])
    pooled = metrics["summary"]["mcnemar"]["pooled"]
    return (" | ".join(parts) + f" | student {gap:.2f} points under the teacher | McNemar pooled student vs "
            f"baseline: b {pooled['b']}, c {pooled['c']}, p = {pooled['p_value']:.2g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--only", nargs="*", help="dataset names (default: all)")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="a setting, as kdistill run --set")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", flush=True)
    for name, data in datasets(args.out).items():
        if args.only and name not in args.only:
            continue
        run = args.out / name
        command = [os.path.join(os.path.dirname(sys.executable), "kdistill"), "run", "--data", str(data),
                   "--out", str(run), "--preset", "small-data", "--seeds", args.seeds, "--set", "deploy_check=false",
                   *(item for setting in args.sets for item in ("--set", setting))]
        print(" ".join(command), flush=True)
        started = time.perf_counter()
        if subprocess.run(command).returncode != 0:
            print(f"{name}: the run failed (see {run}/log.txt)", flush=True)
            continue
        metrics = json.loads((run / "metrics.json").read_text())
        print(f"{name}: {summary(metrics)}; {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
