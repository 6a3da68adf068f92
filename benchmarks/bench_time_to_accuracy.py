"""Time to accuracy: the `recommended` preset end to end (teacher, its signal, the student and the
baseline per seed), as it is and with speed levers, side by side on one machine.

Each variant is one `kdistill run --preset recommended --seeds ...` on cifar10-seedlike at 64 px with
the offline EfficientNet-Lite0 teacher (the figures of docs/results.md), in ROOT/<variant>. A
variant may run another commit's code (`--variant today@e5a909a=`): the benchmark checks that commit
out into ROOT/code-<commit> (git worktree) and runs it with the same interpreter, so "today's code
against the new" is one command. Resumable: rerun the same command; a finished variant is read, not
retrained, and the wall time of every invocation is kept in ROOT/<variant>/wall.json (a variant that
was interrupted says so: its wall time sums its invocations).

Prints per variant: wall time per stage and in all, the teacher's best val accuracy (epoch), the
student's and the baseline's mean ± std over the seeds (best epochs), and each variant's wall time
and student accuracy against the first variant's.

    python benchmarks/bench_time_to_accuracy.py --root /work/runs/tta --seeds 0,1,2 \\
        --variant "today@e5a909a=" \\
        --variant "progressive=--set student.progressive_from=0.5"
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA = REPO_ROOT.parent / "shared" / "data" / "cifar10-seedlike"
PRESET_SETS = ["image_size=64", "teacher.arch=kdistill.zoo:efficientnet_lite0", "teacher.weights=none"]


def parse_variant(text: str) -> tuple[str, str | None, list[str]]:
    """name[@commit]=kdistill run arguments -> (name, commit or None, arguments)."""
    label, _, arguments = text.partition("=")
    name, _, commit = label.partition("@")
    return name, commit or None, shlex.split(arguments)


def code_path(root: Path, commit: str | None) -> Path:
    """The source tree a variant runs: this checkout, or a worktree of the commit."""
    if commit is None:
        return REPO_ROOT
    tree = root / f"code-{commit}"
    if not tree.exists():
        subprocess.run(["git", "-C", str(REPO_ROOT), "worktree", "add", "--detach", str(tree), commit], check=True)
    return tree


def run_variant(root: Path, name: str, commit: str | None, arguments: list[str], seeds: str, data: Path) -> dict:
    folder = root / name
    metrics_path, wall_path = folder / "metrics.json", root / f"{name}.wall.json"
    if not metrics_path.exists():
        sets = [part for setting in PRESET_SETS for part in ("--set", setting)]
        # One seed is a plain run with that seed; several, kdistill's --seeds.
        seeding = ["--seeds", seeds] if "," in seeds else ["--set", f"seed={seeds}"]
        command = [sys.executable, "-m", "kdistill", "run", "--data", str(data), "--out", str(folder),
                   "--preset", "recommended", *seeding, *sets, *arguments]
        print(f"{name}: {' '.join(shlex.quote(part) for part in command)}", flush=True)
        walls = json.loads(wall_path.read_text()) if wall_path.exists() else []
        started = time.perf_counter()
        env = {**os.environ, "PYTHONPATH": str(code_path(root, commit))}
        result = subprocess.run(command, env=env)
        walls.append(round(time.perf_counter() - started, 1))
        wall_path.write_text(json.dumps(walls))
        if result.returncode:
            sys.exit(f"{name}: kdistill run failed ({result.returncode}); rerun to resume")
    metrics = json.loads(metrics_path.read_text())
    walls = json.loads(wall_path.read_text()) if wall_path.exists() else []
    return {"metrics": metrics, "wall": sum(walls), "invocations": len(walls)}


def described(name: str, result: dict) -> tuple[str, float]:
    metrics = result["metrics"]
    stages = ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in metrics["stage_seconds"].items())
    teacher = metrics["models"]["teacher"]
    parts = [f"{name}: {result['wall']:.0f} s in all ({result['invocations']} invocation(s); last: {stages})",
             f"teacher {teacher['best_val_acc']:.2%} (epoch {teacher['best_epoch']})"]
    student_mean = 0.0
    for kind in ("student", "baseline"):
        rows = metrics["seeds"][kind] if "seeds" in metrics else [metrics["models"][kind]]
        accs = [row["best_val_acc"] * 100 for row in rows]
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        parts.append(f"{kind} {statistics.mean(accs):.2f} ± {spread:.2f}% "
                     f"(epochs {', '.join(str(row['best_epoch']) for row in rows)})")
        student_mean = statistics.mean(accs) if kind == "student" else student_mean
    return " | ".join(parts), student_mean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variant", action="append", required=True,
                        help="name[@commit]=more kdistill run arguments (the first variant is the reference)")
    args = parser.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    print(f"machine: {cpu}, {len(os.sched_getaffinity(0))} cores; {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", flush=True)
    reference = None
    for text in args.variant:
        name, commit, arguments = parse_variant(text)
        line, student = described(name, run_variant(args.root, name, commit, arguments, args.seeds, args.data))
        wall = json.loads((args.root / f"{name}.wall.json").read_text())
        if reference is None:
            reference = (sum(wall), student)
        else:
            line += (f" | {sum(wall) / reference[0]:.2f}x the reference's wall time, student "
                     f"{student - reference[1]:+.2f} points")
        print(line, flush=True)


if __name__ == "__main__":
    main()
