"""Fault script: SIGKILL `kdistill run` at random moments in every stage, resume, compare.

    python tests/fault/kill_resume.py --kills 10

Runs once uninterrupted (the reference), then runs the same experiment in another folder, killing
it with SIGKILL at a random moment inside a target stage (prepare, teacher, student, baseline,
report; see TARGETS) and starting it again, until it has been killed --kills times and then
finishes.
Checks that no finished epoch is ever lost and that the final metrics and per-epoch histories
equal the reference's (all but wall-clock times). Prints
`N kills, N resumes, 0 lost, metrics identical` or what differed; exits non-zero on failure.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STAGES = ("prepare", "teacher", "student", "baseline", "report")
# Which stage each kill aims at, in order. Every resume redoes less, so the report stage, which
# is short and runs at every start, comes last: earlier kills there could let the run finish.
TARGETS = ("prepare", "teacher", "teacher", "student", "student", "student", "baseline", "baseline",
           "baseline", "report")
MAX_KILL_DELAY = 1.5  # seconds after the target stage starts; each resume gains at most this much


def comparable(out: str) -> dict:
    """Everything a run reports except wall-clock times."""
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    metrics.pop("stage_seconds")
    for model in metrics["models"].values():
        for timing in ("train_seconds", "latency_ms"):
            model.pop(timing)
    histories = {}
    for name in metrics["models"]:
        with open(os.path.join(out, "history", f"{name}.csv")) as f:
            histories[name] = [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]
    return {"metrics": metrics, "histories": histories}


def finished_epochs(out: str) -> int:
    """Epochs saved in the run's checkpoints, summed over models."""
    from kdistill.train import load_checkpoint

    total = 0
    for name in ("teacher", "student", "baseline"):
        state = load_checkpoint(os.path.join(out, "checkpoints", name, "last.pt"), log=lambda m: None)
        total += state["epoch"] if state else 0
    return total


TIME_STAMP = re.compile(r"^\d\d:\d\d:\d\d ")


class Run:
    """`kdistill run` in a subprocess, with each output line's arrival time."""

    def __init__(self, data: str, out: str, config_file: str):
        command = [sys.executable, "-m", "kdistill", "run", "--data", data, "--out", out, "--config", config_file]
        environment = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=ROOT)
        self.started = time.perf_counter()
        self.process = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            # Without the time kdistill stamps on each line, so lines read as the stages name them.
            self.lines.append((time.perf_counter(), TIME_STAMP.sub("", line.rstrip("\n"), count=1)))

    def stage_started(self, stage: str) -> float | None:
        return next((t for t, line in self.lines if line.startswith(f"{stage}:")), None)

    def current_stage(self) -> str:
        starts = [line.split(":")[0] for _, line in self.lines if line.split(":")[0] in STAGES]
        return starts[-1] if starts else "startup"

    def wait(self) -> int:
        code = self.process.wait()
        self.reader.join()
        return code


def stage_durations(run: Run) -> dict[str, float]:
    starts = [(run.stage_started(stage), stage) for stage in STAGES]
    ends = [t for t, _ in starts[1:]] + [run.lines[-1][0]]
    return {stage: end - start for (start, stage), end in zip(starts, ends)}


def run_faults(workdir: str, kills: int = 10, seed: int = 0, log=print) -> dict:
    from kdistill.demo import write_digits

    data = write_digits(os.path.join(workdir, "data"))
    settings = {  # the demo's data at a size that trains in seconds
        # No deploy check: its latencies are wall-clock times, which no two runs share. float32: under
        # precision auto each run (separate caches) would time the candidates itself, and on a loaded
        # machine two timings can choose differently.
        "image_size": 16, "seed": 0, "device": "cpu", "workers": 2, "deploy_check": False, "precision": "fp32",
        "teacher": {"arch": "resnet18", "weights": "none", "mode": "full", "epochs": 3, "batch_size": 64},
        "student": {"arch": "resnet18", "weights": "none", "epochs": 4, "batch_size": 64, "lr_step": 3},
        "distill": {"method": "kd", "temperature": 4.0, "alpha": 0.7},
    }
    config_files = {}
    for name in ("reference", "interrupted"):  # separate caches, so prepare itself gets killed too
        config_files[name] = os.path.join(workdir, f"{name}.yaml")
        with open(config_files[name], "w") as f:
            yaml.safe_dump({**settings, "cache_dir": os.path.join(workdir, f"cache-{name}")}, f)

    reference_out = os.path.join(workdir, "reference")
    reference = Run(data, reference_out, config_files["reference"])
    if reference.wait() != 0:
        raise SystemExit("the reference run failed:\n" + "\n".join(line for _, line in reference.lines[-20:]))
    durations = stage_durations(reference)

    rng = random.Random(seed)
    out = os.path.join(workdir, "interrupted")
    killed_in, lost, resumes = [], 0, 0
    saved = 0
    while True:
        run = Run(data, out, config_files["interrupted"])
        if len(killed_in) < kills:
            target = TARGETS[len(killed_in) % len(TARGETS)]
            while run.stage_started(target) is None and run.process.poll() is None:
                time.sleep(0.01)
            time.sleep(rng.uniform(0, min(0.9 * durations[target], MAX_KILL_DELAY)))
            if run.process.poll() is None:
                run.process.send_signal(signal.SIGKILL)
                run.wait()
                killed_in.append(run.current_stage())
                now_saved = finished_epochs(out)
                lost += max(0, saved - now_saved)
                saved = max(saved, now_saved)
                resumes += 1
                continue
        code = run.wait()
        if code != 0:
            raise SystemExit(f"the resumed run failed ({code}):\n" + "\n".join(line for _, line in run.lines[-20:]))
        break
    identical = comparable(out) == comparable(reference_out)
    summary = (f"{len(killed_in)} kills, {resumes} resumes, {lost} lost, "
               f"{'metrics identical' if identical else 'metrics DIFFER'}")
    log(f"killed during: {', '.join(killed_in)}")
    if not identical:
        a, b = comparable(out), comparable(reference_out)
        log("reference:   " + json.dumps(b["metrics"]["models"], sort_keys=True))
        log("interrupted: " + json.dumps(a["metrics"]["models"], sort_keys=True))
    log(summary)
    return {"kills": len(killed_in), "resumes": resumes, "lost": lost, "identical": identical,
            "stages": killed_in}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    parser.add_argument("--workdir", help="folder for data and runs (default: a temporary one)")
    args = parser.parse_args()
    sys.path.insert(0, ROOT)
    with tempfile.TemporaryDirectory() as temporary:
        result = run_faults(args.workdir or temporary, args.kills, args.seed)
    return 0 if result["identical"] and result["lost"] == 0 and result["kills"] == args.kills else 1


if __name__ == "__main__":
    raise SystemExit(main())
