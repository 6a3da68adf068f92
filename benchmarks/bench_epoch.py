"""Epoch-time benchmark: kdistill's cached paths against a naive seed-style PyTorch loop.

One run, same data, same machine, variants interleaved within each repeat (median reported):

  (a) kdistill plain student epoch: Batches from the uint8 cache (ImageBatcher), CrossEntropy
  (b) kdistill distillation epoch: KD with the teacher logits computed once (predict_logits) and
      served as extras={"teacher_logits": ...}, exactly as pipeline.run does in cached mode
  (c) naive reference written here: ImageFolder + DataLoader + PIL transforms every epoch
      (Resize, CenterCrop, ToTensor, Normalize); a distillation epoch with a teacher forward under
      torch.no_grad() on every batch, and the same loop's plain (no teacher) epoch
  (d) teacher stage with a frozen ResNet34 backbone, 10 epochs: naive (every image through the
      backbone every epoch) against kdistill's train_teacher (features once with head_inputs,
      then 10 head epochs on the cached features; the one-off extraction is in its time)
  (e) with augmentation (crop_flip), kdistill's two distillation modes: K=8 stored views whose
      teacher logits are computed once (FKD), and the teacher run online on every batch
  (f) the plain student epoch of (a) under bfloat16 autocast with channels_last, what
      `precision: auto` runs on CPUs with bf16 units (skipped on CPUs without them)

kdistill runs through its own functions (pipeline.train_student with student.epochs=1,
teacher.train_teacher with teacher.epochs=10). A student epoch is reported twice: its training
loop (fit's pass over the training Batches, like for like with the naive loop) and the whole call,
which adds what kdistill does around an epoch and the naive loop doesn't: building the model, a
val pass over a tiny val split (--val-per-class images per class) and the crash-safe (fsync'd)
checkpoint (snapshotted, then written on a background thread; with one epoch per call the call
waits for that write at its end). The teacher stage is always the whole train_teacher call.

Models have random weights (no download is possible here); that changes no timing.
The naive DataLoader uses num_workers=0 by default: on the 2-core machine of RESULTS.md it was the
fastest of 0-3 (the 32 px source JPEGs are cheap to decode; workers only compete with the two
compute threads and cost a start-up per epoch). --workers changes it.

    python benchmarks/bench_epoch.py --sizes 64 112 --limit 64 --repeats 3   # ~12 min on 2 CPU cores
    python benchmarks/bench_epoch.py --sizes 32 --limit 20 --repeats 1      # smoke test
    python benchmarks/bench_epoch.py --sizes 64 --only kd_plain kd_distill naive_plain  # whole train split
    python benchmarks/bench_epoch.py --sizes 112 --only kd_plain kd_plain_bf16 # bf16 against float32
    python benchmarks/bench_epoch.py --memory-run                           # peak RSS of `kdistill run` at 224 px
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import ImageFolder

from kdistill.config import build_config
from kdistill.signal_plan import SignalPlan
from kdistill.data import prepare
from kdistill.distillers import CrossEntropy, build_distiller
from kdistill.models import standardized_model
from kdistill.batcher import ImageBatcher
from kdistill.compute import Compute, cpu_has_bf16
from kdistill.pipeline import StudentTraining, train_student
from kdistill.teacher import TeacherScope, TrainedTeacher, distillation_batches, train_teacher
from kdistill.batches import Batches
from kdistill.inference import predict_logits

VIEWS, ONLINE = SignalPlan("views", "benchmark"), SignalPlan("online", "benchmark")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "cifar10-seedlike"
TEACHER, STUDENT = "resnet34", "resnet18"
BATCH_SIZE = 64
LR = 1e-3
TEACHER_EPOCHS = 10
VIEWS = 8  # stored views per image in the augmented (crop_flip) distillation variant
MEMORY_TARGET_BYTES = 4 * 1024 ** 3
DEVICE = torch.device("cpu")
COMPUTE = Compute(DEVICE, "fp32")


def quiet(message: str) -> None:
    pass


def peak_rss_mib(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux reports KiB


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# --- the data every variant sees --------------------------------------------------------------

def make_subset(data_dir: Path, out: Path, train_per_class: int | None, val_per_class: int) -> Path:
    """A folder of symlinks: the first N (sorted) training images of each class and a small val.

    Both kdistill (prepare) and the naive loop (ImageFolder) read this folder, so they see exactly
    the same images.
    """
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for cls in sorted(os.listdir(data_dir / split)):
            source = data_dir / split / cls
            if not source.is_dir():
                continue
            (out / split / cls).mkdir(parents=True)
            for name in sorted(f for f in os.listdir(source) if not f.startswith("."))[:per_class]:
                os.symlink(source / name, out / split / cls / name)
    return out


# --- the naive seed-style reference, written independently of kdistill -------------------------

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def naive_loader(root: Path, size: int, workers: int) -> DataLoader:
    transform = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size),
                                    transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return DataLoader(ImageFolder(str(root / "train"), transform=transform), batch_size=BATCH_SIZE,
                      shuffle=True, num_workers=workers)


def naive_student_epoch(loader: DataLoader, num_classes: int, teacher=None,
                        temperature: float = 4.0, alpha: float = 0.5) -> float:
    """One epoch of a ResNet18 student: KD with a teacher forward per batch, or plain CE."""
    student = torchvision.models.resnet18(num_classes=num_classes)
    optimizer = torch.optim.Adam(student.parameters(), lr=LR)
    student.train()
    if teacher is not None:
        teacher.eval()
    started = time.perf_counter()
    for images, labels in loader:
        logits = student(images)
        loss = F.cross_entropy(logits, labels)
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(images)
            kd = F.kl_div(F.log_softmax(logits / temperature, dim=1),
                          F.softmax(teacher_logits / temperature, dim=1),
                          reduction="batchmean") * temperature ** 2
            loss = alpha * kd + (1 - alpha) * loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - started


def naive_teacher_stage(loader: DataLoader, num_classes: int) -> float:
    """10 epochs of a ResNet34 head on a frozen backbone, every image through the backbone each epoch."""
    teacher = torchvision.models.resnet34(num_classes=num_classes)
    teacher.requires_grad_(False)
    teacher.fc.requires_grad_(True)
    optimizer = torch.optim.Adam(teacher.fc.parameters(), lr=LR)
    teacher.eval()  # the frozen backbone keeps its BatchNorm statistics
    teacher.fc.train()
    started = time.perf_counter()
    for _ in range(TEACHER_EPOCHS):
        for images, labels in loader:
            loss = F.cross_entropy(teacher(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return time.perf_counter() - started


# --- kdistill, through its own pipeline functions ----------------------------------------------

@dataclasses.dataclass
class TimedBatches(Batches):
    """kdistill's Batches, unchanged, noting how long fit's training loop took to consume them."""
    seconds: float = 0.0

    def iterate(self, *args, **kwargs):
        started = time.perf_counter()
        yield from super().iterate(*args, **kwargs)
        self.seconds = time.perf_counter() - started


def kdistill_student_epoch(cfg, data, batcher, train_batches, objective, work: Path,
                           compute: Compute = COMPUTE) -> tuple[float, float]:
    """One student epoch as pipeline.run trains it (train_student with student.epochs=1).

    Returns (training loop, whole call): the loop is fit's pass over the training batches; the
    whole call adds the model build, the val pass and the checkpoint writes.
    """
    train_batches = TimedBatches(**{f.name: getattr(train_batches, f.name)
                                    for f in dataclasses.fields(Batches)})
    out = Path(tempfile.mkdtemp(dir=work, prefix="run-"))
    started = time.perf_counter()
    train_student(StudentTraining(dataclasses.replace(cfg, out=str(out)), data, batcher("val"), compute, quiet),
                  "student", cfg.seed, train_batches, objective)
    whole = time.perf_counter() - started
    shutil.rmtree(out)
    return train_batches.seconds, whole


def kdistill_teacher_stage(cfg, data, batcher, work: Path) -> float:
    """teacher.train_teacher, head mode, no augmentation: features once, then 10 head epochs."""
    shutil.rmtree(os.path.join(data.folder, "signal"), ignore_errors=True)  # no reuse across repeats
    out = Path(tempfile.mkdtemp(dir=work, prefix="run-"))
    started = time.perf_counter()
    train_teacher(dataclasses.replace(cfg, out=str(out)), data, batcher, COMPUTE, TeacherScope(quiet))
    elapsed = time.perf_counter() - started
    shutil.rmtree(out)
    return elapsed


def warm_up(size: int, num_classes: int, batch_sizes: set[int]) -> None:
    """Untimed steps at every batch shape the runs will meet (first-call overheads per shape)."""
    student = torchvision.models.resnet18(num_classes=num_classes)
    teacher = torchvision.models.resnet34(num_classes=num_classes).eval()
    for batch in sorted(batch_sizes):
        x = torch.randn(batch, 3, size, size)
        F.cross_entropy(student.train()(x), torch.randint(0, num_classes, (batch,))).backward()
        with torch.no_grad():
            student.eval()(x)
            teacher(x)


# --- the benchmark ---------------------------------------------------------------------------

RUNS = ("kd_plain", "kd_distill", "kd_views", "kd_online", "naive_plain", "naive_distill", "kd_teacher",
        "naive_teacher", "kd_plain_bf16")
VARIANTS = {  # key -> label; "_whole" rows are the same kdistill runs timed as a whole fit call
    "kd_plain": "kdistill plain epoch (uint8 cache, CE): train loop",
    "kd_plain_whole": "  same, whole call (+build, val pass, checkpoints)",
    "kd_plain_bf16": "kdistill plain epoch, bf16 + channels_last: loop",
    "kd_plain_bf16_whole": "  same, whole call (+build, val pass, checkpoints)",
    "kd_distill": "kdistill distill epoch (cached logits, KD): loop",
    "kd_distill_whole": "  same, whole call (+build, val pass, checkpoints)",
    "naive_plain": "naive plain epoch (DataLoader+PIL, CE)",
    "naive_distill": "naive distill epoch (+teacher fwd every batch)",
    "kd_views": "kdistill distill, crop_flip, stored views (K=8): loop",
    "kd_online": "kdistill distill, crop_flip, teacher online: loop",
    "kd_teacher": "kdistill teacher stage (features once + 10 head ep.)",
    "naive_teacher": "naive teacher stage (10 ep. through frozen backbone)",
}


def bench_size(size: int, subset: Path, work: Path, args) -> dict:
    print(f"\n=== image size {size} px ===", flush=True)
    cfg = build_config(overrides={
        "data": str(subset), "image_size": size, "cache_dir": str(work / "cache"), "device": "cpu",
        "teacher": {"arch": TEACHER, "weights": "none", "mode": "head", "epochs": TEACHER_EPOCHS,
                    "batch_size": BATCH_SIZE, "lr": LR},
        "student": {"arch": STUDENT, "weights": "none", "epochs": 1, "batch_size": BATCH_SIZE, "lr": LR},
    })
    data = prepare(cfg.data, size, cfg.cache_dir, log=print)  # decoded once, untimed (a one-off per dataset)
    batcher = ImageBatcher(data, cfg, DEVICE)
    train = data.splits["train"]
    n, num_classes = len(train.files), len(data.classes)
    loader = naive_loader(subset, size, args.workers)
    assert len(loader.dataset) == n, "kdistill and the naive loop must see the same images"

    # The distillation teacher: a ResNet34 in eval mode (random weights; same cost as trained ones).
    torch.manual_seed(0)
    teacher, head, _ = standardized_model(TEACHER, num_classes, 0.0, "none", "dataset", data.mean, data.std)
    teacher.eval()
    n_val = len(data.splits["val"].files)
    warm_up(size, num_classes, {min(n, BATCH_SIZE), n % BATCH_SIZE or BATCH_SIZE,
                                min(n_val, BATCH_SIZE), n_val % BATCH_SIZE or BATCH_SIZE})

    # Cached mode, as in pipeline.run: the teacher's logits for every training image, once per run.
    started = time.perf_counter()
    logits = predict_logits(teacher, batcher("train"), BATCH_SIZE, DEVICE)
    logits_seconds = time.perf_counter() - started
    print(f"kdistill teacher logits, once per run: {logits_seconds:.1f} s for {n} images", flush=True)

    # With augmentation (crop_flip), as pipeline.run serves it: K stored views or the teacher online.
    augmented_cfg = dataclasses.replace(cfg, augment="crop_flip", distill=dataclasses.replace(
        cfg.distill, views=VIEWS))
    augmented = ImageBatcher(data, augmented_cfg, DEVICE)
    trained_teacher = TrainedTeacher(teacher, head, "dataset", [], None, COMPUTE)
    views_batches, views_seconds = None, None
    if "kd_views" in args.only:
        started = time.perf_counter()
        views_batches = distillation_batches(VIEWS, augmented_cfg, data, {"teacher": trained_teacher}, augmented,
                                               quiet)[0]
        views_seconds = time.perf_counter() - started
        print(f"kdistill teacher logits for {VIEWS} stored views, once per run: {views_seconds:.1f} s", flush=True)
    online_batches, _ = distillation_batches(ONLINE, augmented_cfg, data, {"teacher": trained_teacher}, augmented,
                                             quiet)
    distiller = build_distiller(cfg.distill.method, temperature=cfg.distill.temperature, alpha=cfg.distill.alpha)

    runs = {
        "kd_plain": lambda: kdistill_student_epoch(cfg, data, batcher, batcher("train", augment=True),
                                                   CrossEntropy(), work),
        "kd_distill": lambda: kdistill_student_epoch(
            cfg, data, batcher, batcher("train", extras={"teacher_logits": logits}), distiller, work),
        "kd_views": lambda: kdistill_student_epoch(cfg, data, augmented, views_batches, distiller, work),
        "kd_online": lambda: kdistill_student_epoch(cfg, data, augmented, online_batches, distiller, work),
        "naive_plain": lambda: naive_student_epoch(loader, num_classes),
        "naive_distill": lambda: naive_student_epoch(loader, num_classes, teacher,
                                                     cfg.distill.temperature, cfg.distill.alpha),
        "kd_plain_bf16": lambda: kdistill_student_epoch(cfg, data, batcher, batcher("train", augment=True),
                                                        CrossEntropy(), work, Compute(DEVICE, "bf16")),
        "kd_teacher": lambda: kdistill_teacher_stage(cfg, data, batcher, work),
        "naive_teacher": lambda: naive_teacher_stage(loader, num_classes),
    }
    if "kd_plain_bf16" in args.only and not cpu_has_bf16():
        print("kd_plain_bf16 skipped: this CPU has no bf16 units (precision: auto trains in float32 here)")
    runs = {name: run for name, run in runs.items()
            if name in args.only and (name != "kd_plain_bf16" or cpu_has_bf16())}
    times = {name: [] for name in runs}
    order = list(runs)
    for repeat in range(args.repeats):
        # Interleaved, and rotated each repeat so no variant always runs first or last.
        rotated = order[repeat % len(order):] + order[:repeat % len(order)]
        for name in rotated:
            seconds, note = runs[name](), ""
            if isinstance(seconds, tuple):  # a kdistill student epoch: (training loop, whole call)
                seconds, whole = seconds
                times.setdefault(name + "_whole", []).append(whole)
                note = f"  (whole call {whole:.1f} s)"
            times[name].append(seconds)
            print(f"  repeat {repeat + 1}/{args.repeats}  {VARIANTS[name]:53s} {seconds:8.1f} s{note}", flush=True)
    return {"size": size, "n": n, "times": times, "logits_seconds": logits_seconds, "views_seconds": views_seconds}


def report(results: list[dict], args) -> None:
    print("\n=== results (median of {} repeat{}; CPU, {} torch threads, DataLoader num_workers={}) ===".format(
        args.repeats, "s" if args.repeats > 1 else "", torch.get_num_threads(), args.workers))
    for r in results:
        med = {name: statistics.median(t) for name, t in r["times"].items()}
        n = r["n"]
        print(f"\nimage size {r['size']} px, {n} training images, batch {BATCH_SIZE}, Adam")
        print(f"  {'variant':53s} {'median s':>9s} {'img/s':>8s}   min-max s")
        for name, label in VARIANTS.items():
            if name not in med:
                continue
            images = n * (TEACHER_EPOCHS if name.endswith("teacher") else 1)
            t = r["times"][name]
            print(f"  {label:53s} {med[name]:9.2f} {images / med[name]:8.1f}   {min(t):.2f}-{max(t):.2f}")
        if "kd_teacher" in med or "naive_teacher" in med:
            print(f"  (teacher-stage img/s counts image-epochs: {TEACHER_EPOCHS} x {n})")
        for what, seconds in (("teacher logits (not in the distill epoch)", r["logits_seconds"]),
                              (f"teacher logits for {VIEWS} stored views", r["views_seconds"])):
            if seconds is not None and "kd_plain" in med:
                print(f"  one-off kdistill {what}: {seconds:.2f} s = {seconds / med['kd_plain']:.2f} "
                      f"plain epochs, paid once per run")

        checks = [  # (label, numerator, denominator, target, upper bound or None for information)
            ("kdistill distill / kdistill plain (loops)", "kd_distill", "kd_plain", "<= 1.05", 1.05),
            ("  same, whole calls", "kd_distill_whole", "kd_plain_whole", "<= 1.05", 1.05),
            ("kdistill distill (loop) / naive plain", "kd_distill", "naive_plain", "<= 1.00 (no slower)", 1.0),
            ("  same, kdistill whole call", "kd_distill_whole", "naive_plain", "<= 1.00 (no slower)", 1.0),
            ("naive distill / kdistill distill (loop)", "naive_distill", "kd_distill", "(speed-up)", None),
            ("  same, kdistill whole call", "naive_distill", "kd_distill_whole", "(speed-up)", None),
            ("naive teacher stage / cached teacher stage", "kd_teacher", "naive_teacher", ">= 5", 1 / 5),
            ("crop_flip: stored views / kdistill plain (loops)", "kd_views", "kd_plain", "(info)", None),
            ("crop_flip: teacher online / stored views (loops)", "kd_online", "kd_views", "(info)", None),
            ("bf16 speed-up: float32 plain / bf16 plain (loops)", "kd_plain_bf16", "kd_plain", ">= 1.5", 1 / 1.5),
            ("  same, whole calls", "kd_plain_bf16_whole", "kd_plain_whole", ">= 1.5", 1 / 1.5),
        ]
        for label, a, b, target, bound in checks:
            if a not in med or b not in med:
                continue
            value = med[a] / med[b]
            verdict = "" if bound is None else ("met" if value <= bound else "MISSED")
            if target.startswith(">="):  # shown as a speed-up
                value = 1 / value
            print(f"  {label:53s} {value:6.3f}  target {target:20s} {verdict}")
    print(f"\npeak resident memory: this process {peak_rss_mib(resource.RUSAGE_SELF):.0f} MiB; "
          f"largest child (decode pool / DataLoader worker) {peak_rss_mib(resource.RUSAGE_CHILDREN):.0f} MiB "
          f"(ru_maxrss)")


def memory_run(args) -> None:
    """Peak RSS of a whole `kdistill run` at 224 px, in a child process (slow on CPU)."""
    work = Path(tempfile.mkdtemp(prefix="kdistill-bench-mem-", dir="/tmp"))
    command = [sys.executable, "-m", "kdistill", "run", "--data", str(args.data), "--out", str(work / "run"),
               "--set", "image_size=224", "--set", "teacher.weights=none", "--set", "teacher.epochs=1",
               "--set", "student.epochs=1", "--set", "student.batch_size=64",
               "--set", f"cache_dir={work / 'cache'}"]
    for setting in args.set:
        command += ["--set", setting]
    print("memory run (every stage of a run at 224 px, one epoch each for teacher, student and baseline; "
          "about an hour on a small CPU):\n  " + " ".join(command), flush=True)
    started = time.perf_counter()
    code = subprocess.run(command, cwd=REPO_ROOT).returncode
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(f"\nexit code {code} after {time.perf_counter() - started:.0f} s")
    verdict = "met" if peak <= MEMORY_TARGET_BYTES else "MISSED"
    if code != 0:  # a run that stopped early may not have reached its heaviest stage
        verdict = "MISSED" if peak > MEMORY_TARGET_BYTES else "unknown (the run did not finish)"
    print(f"child peak resident memory (RUSAGE_CHILDREN ru_maxrss): {peak / 1024 ** 2:.0f} MiB "
          f"= {peak / 1024 ** 3:.2f} GiB; target <= 4 GiB: {verdict}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="image folder (train/<class>/, val/<class>/)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 112])
    parser.add_argument("--limit", type=int, help="use only the first N training images per class")
    parser.add_argument("--val-per-class", type=int, default=5,
                        help="val images per class for kdistill's per-epoch val pass (default 5)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0,
                        help="naive DataLoader num_workers (default 0: fastest measured here, see RESULTS.md)")
    parser.add_argument("--only", nargs="+", choices=list(RUNS), default=list(RUNS), metavar="VARIANT",
                        help=f"time only these variants (default all: {' '.join(RUNS)})")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder under /tmp")
    parser.add_argument("--memory-run", action="store_true",
                        help="instead: run `kdistill run` at 224 px in a child process and report its peak RSS")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra kdistill setting for --memory-run (repeatable)")
    args = parser.parse_args()
    args.data = args.data.resolve()

    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs; torch {torch.__version__}, "
          f"torchvision {torchvision.__version__}, {torch.get_num_threads()} threads; "
          f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print(f"data: {args.data}")
    if args.memory_run:
        memory_run(args)
        return
    print(f"models: teacher {TEACHER}, student {STUDENT}, random weights (no download possible; timing is "
          f"unaffected), batch {BATCH_SIZE}, Adam lr {LR}")
    work = Path(tempfile.mkdtemp(prefix="kdistill-bench-", dir="/tmp"))
    try:
        subset = make_subset(args.data, work / "data", args.limit, args.val_per_class)
        results = [bench_size(size, subset, work, args) for size in args.sizes]
        report(results, args)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
