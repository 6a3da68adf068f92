"""precision: auto on the CPU, chosen by measurement for each model.

Which precision and memory format trains fastest depends on the model and the CPU: on an Intel
Xeon with AMX, bf16 + channels_last trains a ResNet18 about twice as fast as float32, while the
depthwise convolutions of an EfficientNet train fastest in float32 + channels_last (issue 29's
table). So each model gets a few timed steps in each candidate on its real batch shape (random
images; the speed of a step does not depend on the pixels) and the fastest one whose loss and
gradients stay finite trains it. The choice is

- kept for the run: written to OUT/compute.json and read back on a rerun, so a resumed model is
  computed as it started (its checkpoint records it too, and train.fit refuses any other);
- cached per machine and model (KDISTILL_CACHE/precision/), so the next run on this machine skips
  the measurement; a run started on a loaded machine measures what that machine gives.

A teacher's outputs that are kept (its stored logits and features, the report's val logits) come
from forward passes alone, which can be fastest in another precision than its training step: each
trained teacher's forward pass is timed in fp32 and bf16 in the memory format it trains in, and the
clearly faster one computes them and its val evaluation every epoch (on the Xeon, EfficientNet-Lite0
trains fastest in fp32 + channels_last and runs forward 2.1x faster in bf16 + channels_last).

The baseline is the student's architecture and gets the student's choice: it differs from the
student only by the teacher. On CUDA, auto stays bf16 autocast + channels_last (not measured).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import time
from typing import Callable

import torch
import torch.nn.functional as F

from .compute import Compute, cpu_has_bf16, first_line, resolve_precision
from .threads import choose_threads
from .config import Config, upsampled_side
from .errors import KdistillError
from .fileio import atomic_write_text, load_torch
from .models import standardized_model

TIMED_STEPS = 3  # per candidate, after one warm-up step; the median counts


def candidates(device: torch.device) -> list[Compute]:
    """The CPU's candidates: float32 and, where the CPU has bfloat16 units, bf16 autocast, each in
    the contiguous and the channels_last memory format."""
    precisions = ["fp32", "bf16"] if cpu_has_bf16() else ["fp32"]
    return [Compute.of(device, precision, channels_last) for precision in precisions for channels_last in (False, True)]


def step_images_per_second(model: torch.nn.Module, compute: Compute, images: torch.Tensor, labels: torch.Tensor,
                           trains: bool, steps: int = TIMED_STEPS) -> float | None:
    """Images per second of one step of model in compute (forward, backward and an SGD step where it
    trains, else the forward alone): the median of `steps` steps after a warm-up; None where the loss
    or a gradient is not finite."""
    model = compute.place(copy.deepcopy(model)).train(trains)
    x = images.contiguous(memory_format=torch.channels_last) if compute.channels_last else images
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3) if trains else None
    seconds = []
    for step in range(steps + 1):
        start = time.perf_counter()
        with torch.set_grad_enabled(trains), torch.autocast("cpu", torch.bfloat16, enabled=compute.precision == "bf16"):
            loss = F.cross_entropy(model(x).float(), labels)
        if trains:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if not all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None):
                return None
            optimizer.step()
        if not torch.isfinite(loss):
            return None
        if step:
            seconds.append(time.perf_counter() - start)
    return len(images) / sorted(seconds)[len(seconds) // 2]


def _machine() -> dict:
    """What a measured choice holds for: this CPU, this torch, this many threads."""
    model_name = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model_name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                              model_name)
    except OSError:
        pass
    return {"cpu": model_name, "torch": torch.__version__, "threads": torch.get_num_threads()}


def _what_is_timed(part, image_size: int, classes: int) -> dict:
    """What a model's speed depends on: the architecture, its batch shape, whether it trains whole."""
    trains = getattr(part, "mode", "full") == "full"  # a frozen backbone runs forward only
    return {"arch": part.arch, "side": upsampled_side(part, image_size) or image_size, "image_size": image_size,
            "batch": part.batch_size, "classes": classes, "trains": trains, "dropout": part.dropout}


def _timed_inputs(timed: dict) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The model described by timed (random weights), a batch of random images and labels."""
    torch.manual_seed(0)
    model = standardized_model(timed["arch"], timed["classes"], timed["dropout"], "none", "dataset",
                               [0.5] * 3, [0.25] * 3, timed["side"] if timed["side"] > timed["image_size"] else 0)[0]
    images = torch.rand(timed["batch"], 3, timed["image_size"], timed["image_size"])
    return model, images, torch.arange(timed["batch"]) % timed["classes"]


def measure(timed: dict, device: torch.device) -> dict[str, float | None]:
    """{candidate label: images per second, None where not finite} for the model described by timed."""
    model, images, labels = _timed_inputs(timed)
    return {candidate.label(): step_images_per_second(model, candidate, images, labels, timed["trains"])
            for candidate in candidates(device)}


def measure_outputs(timed: dict, device: torch.device, channels_last: bool) -> dict[str, float | None]:
    """{precision: images per second of a forward pass} for the model described by timed, in the
    memory format it trains in (its weights stay in it)."""
    model, images, labels = _timed_inputs(timed)
    precisions = ["fp32", "bf16"] if cpu_has_bf16() else ["fp32"]
    return {precision: step_images_per_second(model, Compute.of(device, precision, channels_last), images, labels,
                                              False) for precision in precisions}


LABELS = ("fp32", "fp32+cl", "bf16", "bf16+cl")


def _from_label(device: torch.device, label: str) -> Compute:
    """The Compute a label names (Compute.label)."""
    label, _, outputs = label.partition(", outputs ")
    if label not in LABELS or outputs not in ("", "fp32", "bf16") or outputs == label.removesuffix("+cl"):
        raise ValueError(f"not a precision: {label!r}")
    return Compute.of(device, label.removesuffix("+cl"), label.endswith("+cl"))._replace(outputs=outputs)


# Plain fp32 is kept unless another candidate is at least this much faster: a near tie is within the
# noise of a few timed steps (a competing process shifts it either way), and fp32 gives the same
# numbers on every CPU kind, so a noisy measurement cannot flip a run's numerics.
PLAIN_MARGIN = 1.1


def _fastest(table: dict[str, float | None], plain_label: str = "fp32") -> str:
    """The fastest finite candidate, or plain_label unless another is PLAIN_MARGIN faster."""
    finite = {label: speed for label, speed in table.items() if speed is not None}
    if not finite:
        return plain_label
    fastest, plain = max(finite, key=finite.get), finite.get(plain_label)
    return plain_label if plain is not None and finite[fastest] < plain * PLAIN_MARGIN else fastest


def _cached_table(path: str) -> dict[str, float | None] | None:
    """A table measured before, None where there is none or it is not one (a damaged file)."""
    try:
        with open(path, encoding="utf-8") as f:
            table = json.load(f)["images_per_second"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    valid = isinstance(table, dict) and table and all(
        label in LABELS and (speed is None or isinstance(speed, (int, float)) and speed > 0)
        for label, speed in table.items())
    return table if valid else None


def _cached_or_measured(timed: dict, cache_dir: str, measure_it: Callable[[], dict]) -> tuple[dict, str]:
    """(the table of images per second for what timed describes, how it was had): cached per machine."""
    key = hashlib.sha256(json.dumps({**_machine(), **timed}, sort_keys=True).encode()).hexdigest()[:24]
    path = os.path.join(cache_dir, "precision", f"{key}.json")
    table = _cached_table(path)
    if table is not None:
        return table, "measured on this machine before"
    start = time.perf_counter()
    table = measure_it()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_text(path, json.dumps({"machine": _machine(), "model": timed, "images_per_second": table}))
    return table, f"measured in {time.perf_counter() - start:.1f} s"


def _speeds(table: dict[str, float | None]) -> str:
    return ", ".join(f"{label} {'not finite' if speed is None else f'{speed:.1f}'}" for label, speed in table.items())


def _measured_choice(name: str, part, image_size: int, classes: int, device: torch.device, cache_dir: str,
                     log: Callable[[str], None]) -> Compute:
    timed = _what_is_timed(part, image_size, classes)
    where = f"{part.arch} at {timed['side']} px, batch {timed['batch']}, {'training' if timed['trains'] else 'forward'}"
    try:
        table, how = _cached_or_measured(timed, cache_dir, lambda: measure(timed, device))
    except Exception as e:  # a model that cannot be built without its weights: the default rule
        fallback = Compute(device, resolve_precision("auto", device))
        log(f"precision: {name} {where} could not be timed ({first_line(e)[:120]}); {fallback.label()}")
        return fallback
    choice = _fastest(table)
    log(f"precision: {name} {where}, images/s: {_speeds(table)}; {choice} ({how})")
    return _from_label(device, choice)


def _measured_outputs(name: str, part, image_size: int, classes: int, cache_dir: str, log: Callable[[str], None],
                      training: Compute) -> Compute:
    """training, with the precision of the teacher's kept outputs (its stored signal) where a forward
    pass is clearly faster in another: on an Intel Xeon with AMX, EfficientNet-Lite0 trains fastest in
    fp32 + channels_last and runs forward 2.1x faster in bf16 (benchmarks/RESULTS.md)."""
    timed = {**_what_is_timed(part, image_size, classes), "trains": False, "layout": training.label()}
    try:
        table, how = _cached_or_measured(timed, cache_dir,
                                         lambda: measure_outputs(timed, training.device, training.channels_last))
    except Exception as e:
        log(f"precision: {name}'s outputs could not be timed ({first_line(e)[:120]}); {training.precision}")
        return training
    choice = _fastest(table, training.precision)
    log(f"precision: {name}'s outputs (forward, {training.label()}), images/s: {_speeds(table)}; {choice} ({how})")
    return training if choice == training.precision else training._replace(outputs=choice)


def _auto_choice(name: str, part, cfg: Config, classes: int, device: torch.device, started: list[str],
                 log: Callable[[str], None]) -> Compute:
    """precision: auto for one model on the CPU, where its run recorded none (see choose_computation)."""
    if part.epochs == 0:  # a given teacher only predicts, and its architecture is the file's: the default rule
        return Compute(device, resolve_precision("auto", device))
    training = _started_in(started, device) or _measured_choice(name, part, cfg.image_size, classes, device,
                                                                cfg.resolved_cache_dir(), log)
    if name == "student":  # its outputs are the evaluation's, in the precision it trains in
        return training
    return _measured_outputs(name, part, cfg.image_size, classes, cfg.resolved_cache_dir(), log, training)


def _recorded(path: str, device: torch.device) -> tuple[int | None, dict[str, Compute]]:
    """(threads, {model: Compute}) as recorded in path when the run started; (None, {}) if unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        threads = saved.get("threads")
        return (threads if isinstance(threads, int) and threads > 0 else None,
                {name: _from_label(device, label) for name, label in saved.get("models", {}).items()})
    except (OSError, ValueError, AttributeError, TypeError):
        return None, {}


def _started_in(checkpoints: list[str], device: torch.device) -> Compute | None:
    """The computation a model's checkpoint (last.pt) records, where one exists: a model that started
    training keeps it (also one started before kdistill chose per model: bf16 + channels_last)."""
    for path in checkpoints:
        if not os.path.exists(path):
            continue
        try:
            saved = load_torch(path)["computed_on"]
        except (KdistillError, KeyError, TypeError, IndexError):
            continue
        if (isinstance(saved, dict) and saved.get("device") == device.type
                and saved.get("precision") in ("fp32", "bf16")
                and saved.get("layout", "") in ("", "channels_last", "contiguous")):
            return Compute(device, saved["precision"], saved.get("layout", ""))
    return None


def choose_computation(cfg: Config, classes: int, device: torch.device, recorded_path: str,
                       checkpoints: dict[str, list[str]], log: Callable[[str], None]) -> tuple[int, dict[str, Compute]]:
    """(CPU threads, {teacher, teacher-2, ..., student: Compute}), recorded in recorded_path for a
    rerun, which keeps them. Threads: see threads.py (set here, for the run). Precision: the setting
    where it names one, else (auto) on the CPU for each model the one this run recorded, else the one
    its checkpoint records (checkpoints: model -> the last.pt files of its runs, read only where the run
    recorded none, e.g. a sweep's shared teacher), else the measured."""
    recorded_threads, recorded = _recorded(recorded_path, device)
    if device.type == "cpu":
        threads, why = choose_threads(cfg.threads, recorded_threads)
        log(f"threads: {threads} ({why})")
    else:
        threads = cfg.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    models = {**cfg.teachers(), "student": cfg.student}
    if cfg.precision != "auto" or device.type != "cpu":
        compute = Compute(device, resolve_precision(cfg.precision, device))
        computes = {name: compute for name in models}
    else:
        computes = {name: recorded.get(name) or _auto_choice(name, part, cfg, classes, device,
                                                             checkpoints.get(name, []), log)
                    for name, part in models.items()}
        log("precision: " + ", ".join(f"{name} {compute.label()}" for name, compute in computes.items()))
    os.makedirs(os.path.dirname(recorded_path), exist_ok=True)
    atomic_write_text(recorded_path, json.dumps({"threads": threads,
                                                 "models": {name: c.label() for name, c in computes.items()}}))
    return threads, computes

