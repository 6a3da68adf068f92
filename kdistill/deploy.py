"""Deployment: the student as static int8 ONNX, and what each way of running it costs on the CPU.

- student-int8.onnx: ONNX Runtime's post-training static quantization of student.onnx (after its
  quant_pre_process), QDQ format, int8 weights per output channel, uint8 activations whose ranges
  are calibrated (min/max) on CALIBRATION_IMAGES training images, fed exactly as in evaluation
  (unaugmented, scaled to [0, 1]; the model standardizes them itself). Same input, output and
  metadata as student.onnx.
- The deployment table (metrics.json "deployment", report.md): per way of running a model, its
  size on disk, val accuracy, and CPU latency at batch 1 and 32 (median of timed runs after
  warm-up; PyTorch through torch.utils.benchmark.Timer, ONNX Runtime through time.perf_counter),
  with the threads used (torch's, and as many intra-op threads for ONNX Runtime).

`kdistill run` calls deployment_check at its end (setting deploy_check); `kdistill export --run`
(export_run) rewrites both ONNX files of a finished run and measures again, on the run's data
decoded in the user's cache (never the cache_dir that the run's config.yaml names).
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import json
import logging
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
import torch

from .config import Config
from .data import PreparedData, list_images, prepare, scan_dataset
from .data_key import same_data
from .compare import read_metrics
from .errors import KdistillError
from .export import ONNX_PROBE_IMAGES, export_onnx, load_bundle, load_onnx_student
from .fileio import atomic_write, atomic_write_text
from .given_teacher import load_given_teacher
from .models import Standardized, is_trusted_arch
from .report import markdown
from .run_folder import RunFolder

CALIBRATION_IMAGES = 256  # training images the int8 activation ranges are calibrated on
CALIBRATION_SEED = 0
BATCH_SIZES = (1, 32)
ACCURACY_BATCH = 64
# The rows of the table: model, engine and precision.
ROWS = ("student_torch_fp32", "student_onnx_fp32", "student_onnx_int8", "teacher_torch_fp32")


@dataclass(frozen=True)
class Timing:
    """How latency is measured: per round and batch size, `warmup` untimed runs, then `repeats`
    timed runs at batch 1 and a fifth of them (at least 3) at batch 32. With several rounds the
    engines take turns, so a busy moment of the machine does not fall on one of them alone;
    medians pool the rounds."""
    repeats: int
    rounds: int = 1
    warmup: int = 2

    def runs(self, batch: int) -> int:
        return self.repeats if batch == 1 else max(3, self.repeats // 5)


RUN_TIMING = Timing(repeats=10)  # the end of `kdistill run`: cheap
EXPORT_TIMING = Timing(repeats=30, rounds=2)  # `kdistill export --run`


def _to_unit_range(images: torch.Tensor) -> np.ndarray:
    return (images.float() / 255.0).numpy()


def quantize_int8(fp32_path: str, int8_path: str, train_images: torch.Tensor, quant_format: str = "QDQ",
                  activation_type: str = "QUInt8") -> None:
    """Write int8_path: static int8 quantization of the ONNX model at fp32_path, calibrated on up to
    CALIBRATION_IMAGES of train_images (uint8, N x 3 x S x S), with fp32_path's metadata.
    quant_format (QDQ or QOperator) and activation_type (QUInt8 or QInt8): onnxruntime's names;
    the defaults are the fastest here (benchmarks/bench_int8.py --variants)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    count = min(CALIBRATION_IMAGES, len(train_images))
    chosen = np.sort(np.random.default_rng(CALIBRATION_SEED).choice(len(train_images), count, replace=False))

    class Calibration(CalibrationDataReader):
        def __init__(self):
            self.batches = (
                {"images": _to_unit_range(train_images[chosen[start:start + 32]])} for start in range(0, count, 32))

        def get_next(self):
            return next(self.batches, None)

    def write(tmp: str) -> None:
        with tempfile.TemporaryDirectory() as work:
            # Shape inference and graph optimization first: folded batch-norm biases become
            # initializers, which the quantizer needs, and fewer nodes get quantized.
            prepared = os.path.join(work, "prepared.onnx")
            quantized = os.path.join(work, "int8.onnx")
            quant_pre_process(fp32_path, prepared)
            # uint8 activations with int8 weights: the fast path of x86 CPUs (VNNI); int8 activations
            # ran 10 to 50 times slower here. QDQ and QOperator ran alike; QDQ is what ONNX Runtime
            # recommends and other runtimes read.
            quantize_static(prepared, quantized, Calibration(), quant_format=QuantFormat[quant_format],
                            per_channel=True, activation_type=QuantType[activation_type], weight_type=QuantType.QInt8)
            model = onnx.load(quantized)
            copy_metadata(onnx.load(fp32_path), model)
            onnx.save(model, tmp)
    atomic_write(int8_path, write, "int8 ONNX model")


def copy_metadata(source, target) -> None:
    """The kdistill metadata_props of one onnx.ModelProto into another."""
    kept = [prop for prop in target.metadata_props if not prop.key.startswith("kdistill.")]
    del target.metadata_props[:]
    target.metadata_props.extend(kept + [prop for prop in source.metadata_props if prop.key.startswith("kdistill.")])


Predict = Callable[[np.ndarray], np.ndarray]  # float32 images in [0, 1] -> logits


class Engine(NamedTuple):
    """One row of the table: how to run the model, the file whose size is reported, and whether
    it is timed with torch's Timer (PyTorch) or a perf_counter loop (ONNX Runtime)."""
    predict: Predict
    file: str
    is_torch: bool


def torch_engine(model: Standardized) -> Predict:
    """A float32, eval-mode CPU copy of model (in the default memory format), as a Predict."""
    model = copy.deepcopy(model).cpu().float().to(memory_format=torch.contiguous_format).eval()

    def predict(images01: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(images01)).numpy()
    return predict


def onnx_engine(path: str, threads: int) -> Predict:
    session, _ = load_onnx_student(path, threads)
    name = session.get_inputs()[0].name
    return lambda images01: session.run(None, {name: images01})[0]


def val_accuracy(predict: Predict, images: torch.Tensor, labels: torch.Tensor) -> float:
    correct = 0
    for start in range(0, len(images), ACCURACY_BATCH):
        logits = predict(_to_unit_range(images[start:start + ACCURACY_BATCH]))
        correct += int((torch.from_numpy(logits).argmax(1) == labels[start:start + ACCURACY_BATCH]).sum())
    return correct / len(images)


def _timed_runs(predict: Predict, images01: np.ndarray, runs: int, warmup: int, is_torch: bool,
                threads: int) -> list[float]:
    """Seconds of each timed run."""
    if is_torch:
        # torch.utils.benchmark imports cpp_extension, which logs a warning where CUDA is absent.
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        from torch.utils.benchmark import Timer

        timer = Timer("predict(images01)", globals={"predict": predict, "images01": images01}, num_threads=threads)
        timer.timeit(warmup)
        return [timer.timeit(1).raw_times[0] for _ in range(runs)]
    for _ in range(warmup):
        predict(images01)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        predict(images01)
        times.append(time.perf_counter() - start)
    return times


def measure(engines: dict[str, Engine], val_images: torch.Tensor, val_labels: torch.Tensor, timing: Timing,
            threads: int) -> dict[str, dict]:
    """The table's rows, one per engine. Latency inputs are the first val images (repeated to fill
    a batch of 32 where val has fewer)."""
    inputs = {batch: _to_unit_range(val_images[np.resize(np.arange(len(val_images)), batch)])
              for batch in BATCH_SIZES}
    times: dict[tuple[str, int], list[float]] = {(name, batch): [] for name in engines for batch in BATCH_SIZES}
    for _ in range(timing.rounds):
        for name, engine in engines.items():
            for batch in BATCH_SIZES:
                times[name, batch] += _timed_runs(engine.predict, inputs[batch], timing.runs(batch), timing.warmup,
                                                  engine.is_torch, threads)
    return {name: {"size_mb": os.path.getsize(engine.file) / 2**20,
                   "val_acc": val_accuracy(engine.predict, val_images, val_labels),
                   **{f"latency_ms_b{batch}": statistics.median(times[name, batch]) * 1000 for batch in BATCH_SIZES},
                   "threads": threads}
            for name, engine in engines.items()}


def deployment_check(out: str, data: PreparedData, student: Standardized, teacher: Standardized | None,
                     metrics: dict, log, timing: Timing = RUN_TIMING) -> None:
    """Write OUT/student-int8.onnx from OUT/student.onnx and add the deployment table to metrics
    ("deployment": row -> size_mb (MiB), val_acc, latency_ms_b1, latency_ms_b32, threads; and
    "deployment_setup": how it was measured), on torch's number of threads."""
    threads, folder = torch.get_num_threads(), RunFolder(out)
    fp32_path, int8_path = folder.student_onnx, folder.student_int8
    try:
        quantize_int8(fp32_path, int8_path, data.splits["train"].images)
    except (AssertionError, ValueError, RuntimeError) as e:
        # ONNX Runtime's quantizer refuses some models (e.g. "scale issue" on a degenerate activation
        # range); the run's results stand without an int8 row.
        log(f"deploy: int8 quantization failed ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
            "the deployment table has no int8 row")
        int8_path = None
    engines = {"student_torch_fp32": Engine(torch_engine(student), folder.student_bundle, True),
               "student_onnx_fp32": Engine(onnx_engine(fp32_path, threads), fp32_path, False)}
    if int8_path:
        engines["student_onnx_int8"] = Engine(onnx_engine(int8_path, threads), int8_path, False)
    if teacher is not None:
        engines["teacher_torch_fp32"] = Engine(torch_engine(teacher), folder.model_weights("teacher"), True)
    val = data.splits["val"]
    rows = measure(engines, val.images, val.labels, timing, threads)
    metrics["deployment"] = rows
    metrics["deployment_setup"] = {
        **{f"timed_runs_b{batch}": timing.runs(batch) * timing.rounds for batch in BATCH_SIZES},
        "warmup_runs": timing.warmup, "rounds": timing.rounds, "threads": threads,
        "int8": f"static, QDQ, per-channel int8 weights, uint8 activations calibrated (min/max) on "
                f"{min(CALIBRATION_IMAGES, len(data.splits['train'].files))} training images"}
    if not int8_path:
        return
    fp32, int8 = rows["student_onnx_fp32"], rows["student_onnx_int8"]
    log(f"deploy: student-int8.onnx {int8['size_mb']:.1f} MiB ({fp32['size_mb'] / int8['size_mb']:.1f}x smaller "
        f"than student.onnx), val acc {int8['val_acc']:.2%} (fp32 {fp32['val_acc']:.2%}), CPU latency at batch 1 "
        f"{int8['latency_ms_b1']:.2f} ms (fp32 {fp32['latency_ms_b1']:.2f} ms), {threads} threads")


def _run_file(run_dir: str, name: str) -> str:
    path = os.path.join(run_dir, name)
    if not os.path.exists(path):
        raise KdistillError(f"{path} not found: is {run_dir} a finished kdistill run?")
    return path


def _listed_data(cfg: Config) -> tuple[list[str], dict[str, int]]:
    """The classes and images per split that scan_dataset finds in cfg.data (as data.json records
    them), from listing its folders alone: no file is opened, none hashed."""
    def per_class(split_dir: str) -> collections.Counter:
        return collections.Counter(name.split(os.sep)[0] for name in list_images(split_dir)[0] if os.sep in name)

    train = per_class(os.path.join(cfg.data, "train"))
    classes = sorted(train)
    if os.path.isdir(os.path.join(cfg.data, "val")):
        images = {"train": sum(train.values()),
                  "val": sum(per_class(os.path.join(cfg.data, "val"))[name] for name in classes)}
    else:  # scan_dataset holds out this share of each class with more than one image
        held = sum(int(round(cfg.val_fraction * count)) if count > 1 else 0 for count in train.values())
        images = {"train": sum(train.values()) - held, "val": held}
    if os.path.isdir(os.path.join(cfg.data, "test")):
        images["test"] = len(list_images(os.path.join(cfg.data, "test"))[0])
    if cfg.distill.unlabeled not in ("", "test"):
        images["unlabeled"] = len(list_images(cfg.distill.unlabeled)[0])
    return classes, images


def _class_names(classes: list) -> str:
    """For example 3 classes: 'cat', 'dog', 'owl' (one line, whatever the names hold)."""
    shown = ", ".join(repr(str(name)[:40]) for name in classes[:5])
    return f"{len(classes)} classes: {shown}{f' and {len(classes) - 5} more' if len(classes) > 5 else ''}"


def _read_identity(run_dir: str) -> dict:
    """The run's data.json: the key of its data, its classes and images per split."""
    path = _run_file(run_dir, "data.json")
    try:
        with open(path, encoding="utf-8") as f:
            identity = json.load(f)
        if not (isinstance(identity["key"], str) and isinstance(identity["classes"], list)
                and isinstance(identity["images"], dict)):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise KdistillError(f"{path} is unreadable ({type(e).__name__})") from None
    return identity


def run_data(run_dir: str, cfg: Config, log) -> PreparedData:
    """The run's decoded images, from the user's data cache (built from cfg.data where absent);
    refused if the data folder no longer holds what the run was trained on."""
    identity = _read_identity(run_dir)
    if not os.path.isdir(cfg.data):
        raise KdistillError(f"the run's data folder {cfg.data} (its config.yaml) does not exist: measuring the "
                            f"exported student needs its val images and calibrating int8 its training images")
    changed = f"the data at {cfg.data} changed since the run in {run_dir}"
    # A received run's config.yaml may name any folder: one that is plainly not the run's data is
    # refused from its listing, before any file of it is read.
    classes, images = _listed_data(cfg)
    if classes != identity["classes"]:
        raise KdistillError(f"{changed} ({_class_names(identity['classes'])} then; {_class_names(classes)} now)")
    if images != identity["images"]:
        raise KdistillError(f"{changed} (images per split {identity['images']} then, {images} now)")
    # The user's cache, never the cache_dir in the run's config.yaml: a run folder made elsewhere
    # must not decide where kdistill writes.
    cache_dir = Config().resolved_cache_dir()
    dataset = scan_dataset(cfg.data, cfg.val_fraction, cfg.seed, cfg.distill.unlabeled, cache_dir)
    if not same_data(identity["key"], dataset, cfg.image_size, cfg.max_image_pixels):
        raise KdistillError(f"{changed} (files added, removed or their content changed): its val accuracy would "
                            f"not be the run's")
    return prepare(cfg.data, cfg.image_size, cache_dir, workers=cfg.workers, max_pixels=cfg.max_image_pixels,
                   skip_bad=cfg.skip_bad, log=log, scanned=dataset)


def run_teacher(run_dir: str, cfg: Config, classes: list[str], trust_arch: bool, log) -> Standardized | None:
    """The run's teacher (best weights), or None where its file is gone or its architecture would
    run untrusted code."""
    path = RunFolder(run_dir).model_weights("teacher")
    if not os.path.exists(path):
        log(f"export: {path} not found; the table has no teacher row")
        return None
    # A finished teacher given as a bundle (teacher.epochs 0) has its own architecture: metrics.json says which.
    metrics_path = os.path.join(run_dir, "metrics.json")
    teacher_row = read_metrics(metrics_path).get("models", {}).get("teacher") if os.path.exists(metrics_path) else None
    arch = teacher_row.get("arch") if isinstance(teacher_row, dict) else None
    arch = arch if isinstance(arch, str) and arch else cfg.teacher.arch
    if not (trust_arch or is_trusted_arch(arch)):
        log(f"export: the teacher's architecture {arch} would run that module's code; the table has no teacher "
            f"row (pass --trust-arch if you trust the run)")
        return None
    # The weights hold the input statistics, the size it resizes to and the head's shape.
    given = dataclasses.replace(cfg.teacher, arch=arch, weights=path)
    return load_given_teacher(given, classes, [0.0] * 3, [1.0] * 3, 0, lambda message: None)[0].eval()


def export_run(run_dir: str, trust_arch: bool = False, timing: Timing = EXPORT_TIMING, log=print) -> dict:
    """`kdistill export --run`: rewrite RUN/student.onnx (with its metadata) and RUN/student-int8.onnx
    from RUN/student.pt, measure the deployment table and update metrics.json and report.md.
    Returns the table."""
    if not os.path.isdir(run_dir):
        raise KdistillError(f"run folder {run_dir} does not exist")
    folder = RunFolder(run_dir)
    metrics_path = _run_file(run_dir, "metrics.json")
    student, bundle = load_bundle(_run_file(run_dir, "student.pt"), trust_arch)
    cfg, saved = folder.settings(), folder.saved_settings()
    metrics = read_metrics(metrics_path)  # checked before any file is rewritten
    data = run_data(run_dir, cfg, log)
    if data.classes != bundle["classes"] or cfg.image_size != bundle["image_size"]:
        raise KdistillError(f"{run_dir}/student.pt was not trained on this run's data (other classes or image size)")
    probe = torch.from_numpy(_to_unit_range(data.splits["val"].images[:ONNX_PROBE_IMAGES]))
    difference = export_onnx(folder.student_onnx, student, probe, bundle)
    log(f"export: student.onnx (ONNX Runtime matches PyTorch within {difference:.1e} on {len(probe)} val images)")
    teacher = run_teacher(run_dir, cfg, data.classes, trust_arch, log)
    deployment_check(run_dir, data, student, teacher, metrics, log, timing)
    metrics["onnx_max_abs_diff"] = difference
    try:  # the report first: a metrics file whose fields it cannot render leaves both files as they were
        report = markdown(metrics, saved)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise KdistillError(f"{metrics_path} holds fields of the wrong kind ({type(e).__name__}): the new ONNX "
                            f"files are written, metrics.json and report.md were left as they were") from None
    atomic_write_text(metrics_path, json.dumps(metrics, indent=2))
    atomic_write_text(folder.report, report)
    return metrics["deployment"]
