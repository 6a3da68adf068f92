"""Time to accuracy: the `recommended` preset end to end (teacher, its signal, the student and the
baseline per seed), as it is and with speed levers, side by side on one machine.

Each variant is one `kdistill run --preset recommended --seeds ...` on cifar10-seedlike at 64 px with
the offline EfficientNet-Lite0 teacher (the figures of docs/results.md), in ROOT/<variant>. A
variant may run another commit's code (`--variant today@e5a909a=`): the benchmark writes that commit's
files into ROOT/code-<commit> (git archive) and runs it with the same interpreter, so "today's code
against the new" is one command. Each variant has a cache of its own (ROOT/<variant>.cache), so it is
timed as a first run: nothing another variant computed shortens it (an identical teacher's stored
signal, a precision measured before, the decoded images). Resumable: rerun the same command; a
finished variant is read, not retrained, and the wall time of every invocation is kept in
ROOT/<variant>.wall.json (a variant that was interrupted says so: its wall time sums its invocations).

Prints per variant: wall time per stage and in all, the teacher's best val accuracy (epoch), the
student's and the baseline's mean ± std over the seeds (best epochs), and each variant's wall time
and student accuracy against the first variant's.

A variant given with --sampled instead of --variant is timed, not trained to the end: it runs a few
epochs of each model and two stored views (sample_settings), and its whole run's wall time is
extrapolated per stage: each epoch of the full schedule costs what the sample's epochs of its kind
cost (a head warm-up epoch, or a whole-model epoch at its progressive view side: a + b·side² fitted
through the sampled sides), plus what the stage spent outside epochs; the views pass per view;
prepare, the report and the time outside stages as they were. Early stopping (patience) is not
sampled: every epoch is counted. Its accuracy is the full run's, measured elsewhere. So today's
code, whose accuracy is known, is timed in minutes beside a new variant run in full:

    python benchmarks/bench_time_to_accuracy.py --root /work/runs/tta --seeds 0 \\
        --sampled "today@e5a909a=" \\
        --variant "progressive=--set student.progressive_from=0.5"
"""
from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kdistill.models import scaled_side  # noqa: E402
from kdistill.progressive import scale_at  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA = REPO_ROOT.parent / "shared" / "data" / "cifar10-seedlike"
PRESET_SETS = ["image_size=64", "teacher.arch=kdistill.zoo:efficientnet_lite0", "teacher.weights=none"]
# A sampled variant's two stored views (stored even though fewer than the epochs, to time the views pass).
SAMPLE_VIEWS = 2


def set_flags(settings: list[str]) -> list[str]:
    """["key=value", ...] -> ["--set", "key=value", ...]"""
    return [part for setting in settings for part in ("--set", setting)]


def parse_variant(text: str) -> tuple[str, str | None, list[str]]:
    """name[@commit]=kdistill run arguments -> (name, commit or None, arguments)."""
    label, _, arguments = text.partition("=")
    name, _, commit = label.partition("@")
    return name, commit or None, shlex.split(arguments)


def code_path(root: Path, commit: str | None) -> Path:
    """The source tree a variant runs: this checkout, or the commit's files (`git archive`: nothing
    is written into the repository)."""
    if commit is None:
        return REPO_ROOT
    tree = root / f"code-{commit}"
    if not tree.exists():
        partial = root / f".code-{commit}-partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", commit], capture_output=True, check=True)
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as files:
            files.extractall(partial, filter="data")
        partial.rename(tree)
    return tree


@functools.cache
def kdistill_process(root: Path, commit: str | None) -> dict:
    """subprocess.run's cwd and env for running the variant's code. In its tree: `python -m` puts the
    working directory first on sys.path, ahead of PYTHONPATH, so from this checkout another commit's
    code would silently not run. Checked once per tree, since a wrong tree would compare the code
    with itself."""
    code = code_path(root, commit).resolve()
    where = {"cwd": str(code), "env": {**os.environ, "PYTHONPATH": str(code)}}
    imported = subprocess.run([sys.executable, "-c", "import kdistill; print(kdistill.__file__)"], capture_output=True,
                              text=True, check=True, **where).stdout.strip()
    if not imported.startswith(str(code) + os.sep):
        sys.exit(f"the code of {commit or 'this checkout'} should run from {code}, but kdistill came from {imported}")
    print(f"code: {imported}", flush=True)
    return where


def run_variant(root: Path, name: str, commit: str | None, arguments: list[str], seeds: str, data: Path) -> dict:
    folder = root / name
    metrics_path, wall_path = folder / "metrics.json", root / f"{name}.wall.json"
    if not metrics_path.exists():
        # One seed is a plain run with that seed; several, kdistill's --seeds.
        seeding = ["--seeds", seeds] if "," in seeds else ["--set", f"seed={seeds}"]
        own_cache = set_flags([f"cache_dir={root / (name + '.cache')}"])  # a variant's arguments may name another
        command = [sys.executable, "-m", "kdistill", "run", "--data", str(data), "--out", str(folder),
                   "--preset", "recommended", *seeding, *set_flags(PRESET_SETS), *own_cache, *arguments]
        print(f"{name}: {' '.join(shlex.quote(part) for part in command)}", flush=True)
        walls = json.loads(wall_path.read_text()) if wall_path.exists() else []
        started = time.perf_counter()
        result = subprocess.run(command, **kdistill_process(root, commit))
        walls.append(round(time.perf_counter() - started, 1))
        wall_path.write_text(json.dumps(walls))
        if result.returncode:
            sys.exit(f"{name}: kdistill run failed ({result.returncode}); rerun to resume")
    metrics = json.loads(metrics_path.read_text())
    walls = json.loads(wall_path.read_text()) if wall_path.exists() else []
    return {"metrics": metrics, "wall": sum(walls), "invocations": len(walls)}


def full_settings(root: Path, commit: str | None, arguments: list[str]) -> dict:
    """The variant's resolved settings at full length (`kdistill config` of its code)."""
    printed = subprocess.run([sys.executable, "-m", "kdistill", "config", "--preset", "recommended",
                              *set_flags(PRESET_SETS), *arguments], **kdistill_process(root, commit),
                             capture_output=True, text=True, check=True).stdout
    return yaml.safe_load(printed)


def progressive(part: dict) -> bool:
    return part.get("progressive_from", 1.0) < 1


def sampled_head_epochs(part: dict) -> int:
    """How many head warm-up epochs a model's sample runs: one where its schedule has any."""
    return min(part.get("head_epochs", 0), 1)


def sample_settings(settings: dict) -> list[str]:
    """`--set` flags for a variant's sample run, from its resolved settings: the teacher's first head
    warm-up epoch (if it has them) and its whole-model epochs, three student (and baseline) epochs; a
    progressive model's sampled epochs span its sides (progressive_until 1: the first at
    progressive_from, the last whole), so the cost of every side of the full schedule is known."""
    teacher, student = settings["teacher"], settings["student"]
    head = sampled_head_epochs(teacher)
    sample = {"teacher.epochs": head + (3 if progressive(teacher) else 2 - head), "student.epochs": 3,
              "distill.views": SAMPLE_VIEWS, "distill.teacher_signal": "views"}
    # Settings an older commit may not have are only set where the variant uses them.
    sample.update({"teacher.head_epochs": head} if head else {})
    sample.update({f"{name}.patience": 0 for name in ("teacher", "student") if settings[name].get("patience")})
    sample.update({f"{name}.progressive_until": 1.0 for name in ("teacher", "student")
                   if progressive(settings[name])})
    return set_flags([f"{key}={value}" for key, value in sample.items()])


def sampled_epochs(folder: Path, model: str) -> list[tuple[float, float | None]]:
    """(seconds, view side or None) of each epoch of the sample's model."""
    with open(folder / "history" / f"{model}.csv") as f:
        return [(float(row["seconds"]), float(row["view_side"]) if row.get("view_side") else None)
                for row in csv.DictReader(f)]


def epoch_cost(epochs: list[tuple[float, float | None]]):
    """side -> seconds of a whole-model epoch: a + b·side² through the sampled sides, or their mean
    where the sample saw one side."""
    sides = {side for _, side in epochs}
    if len(sides) < 2 or None in sides:
        mean = statistics.mean(seconds for seconds, _ in epochs)
        return lambda side: mean
    slope, intercept = np.polyfit([side ** 2 for _, side in epochs], [seconds for seconds, _ in epochs], 1)
    return lambda side: intercept + slope * side ** 2


def schedule_seconds(sample: list[tuple[float, float | None]], part: dict, side: int) -> float:
    """The seconds of a model's full schedule (part: its resolved settings; side: its view side)."""
    head_epochs, sample_head = part.get("head_epochs", 0), sampled_head_epochs(part)
    total = statistics.mean(seconds for seconds, _ in sample[:sample_head]) * head_epochs if head_epochs else 0.0
    cost = epoch_cost(sample[sample_head:])
    for epoch in range(head_epochs + 1, part["epochs"] + 1):
        scale = scale_at(epoch, part["epochs"], part["progressive_from"], part["progressive_until"]) \
            if progressive(part) else 1.0
        total += cost(scaled_side(side, scale))
    return total


def extrapolated(folder: Path, settings: dict, stage_seconds: dict[str, float], wall: float) -> dict[str, float]:
    """The whole run's seconds per stage, from a sample run in folder that took `wall` seconds (see the
    module's docstring). What the run spent outside its stages (starting, and in an older commit's
    code, the int8 export, which it did not count as a stage) is kept as it was."""
    parts = {"teacher": settings["teacher"], "student": settings["student"], "baseline": settings["student"]}
    stages = {**stage_seconds, "outside stages": wall - sum(stage_seconds.values())}
    for model, part in parts.items():
        sample = sampled_epochs(folder, model)
        side = max(part.get("input_size", 0), settings.get("image_size", 0))
        stages[model] = (stage_seconds[model] - sum(seconds for seconds, _ in sample)
                         + schedule_seconds(sample, part, side))
    stages["teacher_signal"] = stage_seconds["teacher_signal"] * settings["distill"]["views"] / SAMPLE_VIEWS
    return stages


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


def described_sample(name: str, result: dict, stages: dict[str, float]) -> str:
    listed = ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in stages.items())
    return (f"{name}: about {sum(stages.values()):.0f} s in all, extrapolated from a sample run of "
            f"{result['wall']:.0f} s ({listed}); no accuracy (not trained to the end)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variant", action="append", dest="variants", type=lambda text: (text, False),
                        help="name[@commit]=more kdistill run arguments (the first variant is the reference)")
    parser.add_argument("--sampled", action="append", dest="variants", type=lambda text: (text, True),
                        help="as --variant, timed on a sample and extrapolated (one seed)")
    args = parser.parse_args()
    args.root, args.data = args.root.resolve(), args.data.resolve()  # the runs start in their code's tree
    if not args.variants:
        parser.error("give at least one --variant or --sampled")
    args.root.mkdir(parents=True, exist_ok=True)
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    print(f"machine: {cpu}, {len(os.sched_getaffinity(0))} cores; {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", flush=True)
    reference = None  # (wall seconds, student accuracy or None)
    for text, sampled in args.variants:
        name, commit, arguments = parse_variant(text)
        if sampled:
            settings = full_settings(args.root, commit, arguments)
            result = run_variant(args.root, name, commit, arguments + sample_settings(settings),
                                 args.seeds.split(",")[0], args.data)
            stages = extrapolated(args.root / name, settings, result["metrics"]["stage_seconds"], result["wall"])
            line, wall, student = described_sample(name, result, stages), sum(stages.values()), None
        else:
            result = run_variant(args.root, name, commit, arguments, args.seeds, args.data)
            (line, student), wall = described(name, result), result["wall"]
        if reference is None:
            reference = (wall, student)
        else:
            line += f" | {wall / reference[0]:.2f}x the reference's wall time"
            if student is not None and reference[1] is not None:
                line += f", student {student - reference[1]:+.2f} points"
        print(line, flush=True)


if __name__ == "__main__":
    main()
