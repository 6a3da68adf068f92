"""The teachers: each trained once (its head on cached features, or fully fine-tuned), then served
to the student as a signal: cached logits, logits for stored views, or the models themselves
online; with the teacher features a method reads, stored alike where that is exact. Several
teachers (an ensemble) are served as one, see ensemble.py."""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from .augmentations import stored_views, view_params
from .batcher import ImageBatcher
from .callbacks import Session
from .compute import ONE_PROCESS, Compute, Ranks
from .config import Config, upsampled_side
from .signal_plan import SignalPlan
from .data import PreparedData
from .distillers import CrossEntropy
from .features import OnlineTeacher
from .ensemble import EnsembleTeacher, combined_logits, ensemble_val_acc
from .errors import KdistillError
from .fileio import save_weights, tensors_sha256
from .given_teacher import load_given_teacher
from .head_warmup import head_warmup
from .load_follow import threads_following_load
from .loggers import make_loggers
from .models import Standardized, standardized_model, trainable_part, weights_source
from .progress import progress_bar
from .run_clock import RunClock
from .run_folder import RunFolder
from .teacher_signal import (COMPACT_DTYPE, FEATURE_DTYPE, CompactRows, as_tensors, cached_tensors, feature_megabytes,
                             feature_shapes, from_tensors, head_inputs, hooked_outputs, signal_key)
from .batches import TEACHER_FEATURES, Batches
from .inference import evaluate, predict_logits
from .train import fit


class TrainedTeacher(NamedTuple):
    model: Standardized  # eval mode, frozen
    head: str  # module path of the head
    normalize: str  # the input statistics it was trained with
    history: list[dict]
    features: dict[str, torch.Tensor] | None  # cached backbone features per split (head-only mode)
    compute: Compute  # where and how its outputs are computed (precision_choice)
    arch: str = ""
    seed: int = 0

    @property
    def where(self) -> tuple[torch.device, str]:
        """(device, precision) of its outputs, as predict_logits takes them."""
        return self.compute.device, self.compute.output_precision

    def train_logits(self, batcher: ImageBatcher, batch_size: int, transfer: str | None = None) -> torch.Tensor:
        """The teacher's logits for every training image (unaugmented view), then for every image
        of the transfer split, if any."""
        where = self.where
        train = len(self.features["train"]) if self.features is not None else len(batcher.splits["train"].files)
        total = train + (len(batcher.splits[transfer].files) if transfer else 0)
        with progress_bar(total, "teacher logits") as bar:
            if self.features is not None:
                # The head on the cached backbone features: the same logits, without a second backbone pass.
                features = self.features["train"]
                logits = predict_logits(self.model.get_submodule(self.head),
                                        Batches(features, torch.zeros(len(features)), lambda x: x), batch_size,
                                        *where, bar=bar)
            else:
                logits = predict_logits(self.model, batcher("train"), batch_size, *where, bar=bar)
            if transfer is None:
                return logits
            return torch.cat([logits, predict_logits(self.model, batcher(transfer), batch_size, *where, bar=bar)])


@dataclass(frozen=True)
class TeacherScope:
    """What a teacher's training shares with the rest of its run: the log, the processes, the clock."""
    log: Callable[[str], None]
    ranks: Ranks = ONE_PROCESS
    clock: RunClock | None = None  # the run's, for the bar's time left


def train_teachers(cfg: Config, data: PreparedData, batcher: ImageBatcher, computes: dict[str, Compute],
                   log, checkpoints_root: str, ranks: Ranks = ONE_PROCESS,
                   clock: RunClock | None = None) -> dict[str, TrainedTeacher]:
    """Every teacher by run name (teacher, teacher-2, ...), each trained once into
    checkpoints_root/<name> (a finished one is loaded, not retrained) in computes[name], seeded with
    seed + its position, and saved to OUT/models/<name>.pt (by rank 0 alone)."""
    teachers = {}
    for name in cfg.teachers():
        teachers[name] = train_teacher(cfg, data, batcher, computes[name], TeacherScope(log, ranks, clock), name,
                                       os.path.join(checkpoints_root, name))
        if ranks.main:
            save_weights(teachers[name].model.state_dict(), os.path.join(RunFolder(cfg.out).models, f"{name}.pt"),
                         os.path.join(checkpoints_root, name, "best.pt"), f"{name} weights")
    return teachers


def _settings_and_seed(cfg: Config, name: str):
    """A teacher's settings (teacher, or an ensemble member's) and seed: the run's seed + its position."""
    teachers = cfg.teachers()
    return teachers[name], cfg.seed + list(teachers).index(name)


def train_teacher(cfg: Config, data: PreparedData, batcher: ImageBatcher, compute: Compute, scope: TeacherScope,
                  name: str = "teacher", checkpoint_dir: str | None = None) -> TrainedTeacher:
    """The teacher `name` (teacher, teacher-2, ...), checkpointed in checkpoint_dir (default:
    OUT/checkpoints/<name>); trained by every process (see fit), its frozen backbone features
    computed once per node, by its first process."""
    log, ranks = scope.log, scope.ranks
    t, seed = _settings_and_seed(cfg, name)
    if t.epochs == 0:
        return _given_teacher(cfg, data, batcher, compute, log, name, ranks)
    torch.manual_seed(seed)
    teacher, head, normalize = standardized_model(t.arch, len(data.classes), t.dropout, t.weights, t.normalize,
                                                  data.mean, data.std, upsampled_side(t, cfg.image_size))
    trained_part = "frozen backbone, head only" if t.mode == "head" else "fully fine-tuned"
    resized = f", sees each view resized to {teacher.input_size} px" if teacher.input_size else ""
    log(f"{name}: {t.arch} {weights_source(t.arch, t.weights)}, {trained_part}, input standardized with {normalize} "
        f"statistics{resized}, {t.epochs} epochs")
    teacher = compute.place(teacher)
    head_only = t.mode == "head"
    trainable = trainable_part(teacher, head, head_only)
    checkpoint_dir = checkpoint_dir or os.path.join(RunFolder(cfg.out).checkpoints, name)
    train, val = data.splits["train"], data.splits["val"]
    session = Session(checkpoint_dir, compute.device, seed, log, compute.precision, ranks,
                      [*(make_loggers(cfg.loggers, cfg.out) if ranks.main else []),
                       *head_warmup(teacher, head, t.head_epochs if not head_only else 0, ranks.joined),
                       *threads_following_load(cfg.threads, compute.device, ranks)],
                      cfg.keep_checkpoints, layout=compute.layout, clock=scope.clock, eval_precision=compute.outputs)
    features = None
    if head_only and cfg.augment == "none":
        # The frozen backbone is a fixed function of the image: compute its features once and
        # train the head on them. Exact, and ten epochs cost one forward pass.
        backbone = {k: v for k, v in teacher.state_dict().items() if not k.startswith(head + ".")}
        key = signal_key("features", t.arch, tensors_sha256(backbone), data.key, compute.key())

        def compute_features() -> dict[str, torch.Tensor]:
            return {name: head_inputs(teacher, head, batcher(name), t.batch_size, compute.device, compute.precision)
                    for name in ("train", "val")}
        features = ranks.main_first(lambda: cached_tensors(
            os.path.join(data.folder, "signal", f"features-{key}.pt"),
            {"train": len(train.files), "val": len(val.files)}, compute_features, "teacher features", log))
        history = fit(name, trainable, trainable,
                      Batches(features["train"], train.labels, lambda x: x),
                      Batches(features["val"], val.labels, lambda x: x),
                      CrossEntropy(label_smoothing=t.label_smoothing), t, session)
    else:
        history = fit(name, teacher, trainable, batcher("train", augment=True), batcher("val"),
                      CrossEntropy(label_smoothing=t.label_smoothing), t, session)
    return TrainedTeacher(teacher.eval().requires_grad_(False), head, normalize, history, features, compute, t.arch,
                          seed)


def _given_teacher(cfg: Config, data: PreparedData, batcher: ImageBatcher, compute: Compute, log, name: str,
                   ranks: Ranks) -> TrainedTeacher:
    """A finished teacher (its epochs 0), loaded whole and measured on the val images like a trained one."""
    t, seed = _settings_and_seed(cfg, name)
    started = time.perf_counter()
    model, head, normalize, arch = load_given_teacher(t, data.classes, data.mean, data.std,
                                                      upsampled_side(t, cfg.image_size), log)
    model = compute.place(model).eval().requires_grad_(False)
    val_loss, val_acc = evaluate(model, batcher("val"), t.batch_size, compute.device, compute.output_precision, ranks)
    if not math.isfinite(val_loss):
        raise KdistillError(f"{name}: the weights {t.weights} give non-finite logits on the val images")
    log(f"{name}: given, not trained: val loss {val_loss:.3f} acc {val_acc:.3f}")
    history = [{"epoch": 0, "val_loss": val_loss, "val_acc": val_acc, "seconds": time.perf_counter() - started}]
    return TrainedTeacher(model, head, normalize, history, None, compute, arch, seed)


def ensemble_summary(cfg: Config, teachers: dict[str, TrainedTeacher], val: Batches, log) -> dict | None:
    """With several teachers: their names, weights and the val accuracy of their combined
    probabilities (argmax of p, at distill.temperature); None for one teacher."""
    if len(teachers) == 1:
        return None
    weights = cfg.teacher_weights()
    accuracy = ensemble_val_acc([(teacher.model, teacher.where) for teacher in teachers.values()], weights,
                                cfg.distill.temperature, val, cfg.teacher.batch_size)
    log(f"ensemble: {', '.join(f'{name} (weight {weight:.3g})' for name, weight in zip(teachers, weights))}; "
        f"val acc of the averaged probabilities {accuracy:.2%}")
    return {"teachers": list(teachers), "weights": weights, "temperature": cfg.distill.temperature,
            "val_acc": accuracy}


def distillation_batches(plan: SignalPlan, cfg: Config, data: PreparedData, teachers: dict[str, TrainedTeacher],
                         batcher: ImageBatcher, log, transfer: str | None = None,
                         ranks: Ranks = ONE_PROCESS) -> tuple[Batches, SignalPlan]:
    """The student's training batches with the teachers' signal as planned (Config.signal_plan:
    cached, stored views, or online), and the plan served: under auto, a stored signal turns online
    where the teacher features a method reads would not fit in distill.max_signal_memory_gb. Each
    teacher's outputs are computed as it computes (TrainedTeacher.compute).

    transfer: the split of unlabelled images the teacher labels, served after the training images
    (labels -1: they reach the student through the teacher's terms only). A stored signal is
    computed once per node, by its first process; the others read it."""
    signal = plan.kind
    served = batcher.join("train", transfer) if transfer else "train"
    count = len(batcher.splits[served].files)
    paths = cfg.distiller().teacher_features()
    members = list(teachers.values())
    views = None
    if signal == "views":  # FKD: K stored augmented views per image
        views = stored_views(cfg.augment, count, cfg.distill.views, cfg.image_size, cfg.seed, view_params(cfg))
        if views.shape[1] != cfg.distill.views:
            log(f"teacher signal: augment={cfg.augment} has {views.shape[1]} distinct views per image; storing those")
    storage = FEATURE_DTYPE
    if paths and signal != "online":
        storage = _feature_storage(cfg, members[0], paths, batcher(served), signal,
                                   count * (1 if views is None else views.shape[1]), log)
    if storage is None:
        plan = SignalPlan("online", f"its features would not fit in distill.max_signal_memory_gb="
                                    f"{cfg.distill.max_signal_memory_gb}")
        signal = plan.kind
    if signal == "online":  # the teachers see each freshly drawn (and mixed) view
        log(f"teacher signal: online, the teacher{'s run' if len(members) > 1 else ' runs'} on every training "
            f"batch ({plan.reason})")
        teacher = (OnlineTeacher(members[0].model, paths) if len(members) == 1 else
                   EnsembleTeacher([member.model for member in members], cfg.teacher_weights(),
                                   cfg.distill.temperature))
        return batcher(served, augment=True, mix=True, teacher=teacher), plan
    stored = StoredSignal(cfg, data, batcher, served, transfer, views, log, ranks, storage)
    # A method reading features gets them and its first teacher's logits from one pass of that teacher.
    first_pass = stored.first_pass(members[0], paths) if paths else None
    logits = [stored.logits(member, first_pass if i == 0 else None) for i, member in enumerate(members)]
    extras = {"teacher_logits": logits[0] if len(logits) == 1 else
              combined_logits(logits, cfg.teacher_weights(), cfg.distill.temperature)}
    if paths:
        extras.update({TEACHER_FEATURES + path: value
                       for path, value in stored.features(members[0], paths, first_pass).items()})
    return batcher(served, views=views, extras=extras), plan


STORAGE = {"float16": FEATURE_DTYPE, "int8": COMPACT_DTYPE}


def _feature_storage(cfg: Config, teacher: TrainedTeacher, paths, batches: Batches, signal: str, samples: int,
                     log) -> torch.dtype | None:
    """The dtype the teacher features of `samples` images (or views) are stored in: distill.feature_storage's,
    or under its auto the first of float16 and int8 that fits in distill.max_signal_memory_gb; stated in
    the log. Where none fits: None under teacher_signal auto (the teacher runs online), else a one-line error."""
    shapes = feature_shapes(teacher.model, paths, batches, *teacher.where)
    limit, chosen = cfg.distill.max_signal_memory_gb, cfg.distill.feature_storage
    described = ", ".join(f"{path} {tuple(shape)}" for path, shape in shapes.items())
    for name, dtype in STORAGE.items():
        if chosen not in ("auto", name):
            continue
        megabytes = feature_megabytes(shapes, samples, dtype)
        log(f"teacher signal: features at {described} of {samples} images{' and views' if signal == 'views' else ''} "
            f"take {megabytes:.1f} MB in {name}")
        if megabytes <= limit * 1024:
            return dtype
    if cfg.distill.teacher_signal == "auto":
        return None
    fewer = " or fewer distill.views" if signal == "views" else ""
    raise KdistillError(f"setting distill.teacher_signal={signal}: the teacher features of {samples} images need "
                        f"{megabytes / 1024:.2f} GB in {name}, above distill.max_signal_memory_gb={limit}; set "
                        f"distill.teacher_signal=online{fewer}, or raise distill.max_signal_memory_gb")


@dataclass
class StoredSignal:
    """Storing the teachers' signal for the student's training set, once per node (by its first
    process): over the batches of `served` (the training split, joined by the transfer split where
    one is used), one unaugmented view per image or each of the stored `views`."""
    cfg: Config
    data: PreparedData
    batcher: ImageBatcher
    served: str
    transfer: str | None
    views: torch.Tensor | None
    log: Callable[[str], None]
    ranks: Ranks
    feature_dtype: torch.dtype = FEATURE_DTYPE  # FEATURE_DTYPE or COMPACT_DTYPE (_feature_storage)

    def key_parts(self, teacher: TrainedTeacher) -> list[str]:
        """What a stored signal depends on: the weights, the data, the views, the transfer set, the device."""
        parts = [tensors_sha256(teacher.model.state_dict()), self.data.key]
        if self.views is not None:
            # The views themselves, hashed, with the kind that applies them: whatever parameters drew
            # them (crop ranges, a seed, an augmentation added later), other views make another key.
            parts += [self.cfg.augment, "views " + tensors_sha256({"views": self.views})]
        # A transfer set joins the key only when set, so earlier signal caches stay valid.
        return parts + ([f"transfer {self.transfer}"] if self.transfer else []) + [teacher.compute.key()]

    def _cached(self, name: str, rows: dict[str, int], compute_them, what: str) -> dict[str, torch.Tensor]:
        path = os.path.join(self.data.folder, "signal", f"{name}.pt")
        return self.ranks.main_first(lambda: cached_tensors(path, rows, compute_them, what, self.log))

    def first_pass(self, teacher: TrainedTeacher, paths):
        """A function returning {"logits", "features"} of the teacher over every image, or each
        stored view, at the module paths: one pass, made on the first call. Its features are in
        feature_dtype: float16 (float32 where a value exceeds float16's range) or 8 bits (CompactRows);
        without views, both drop the view axis."""
        views, batcher = self.views, self.batcher
        view_batches = ([batcher(self.served)] if views is None else
                        [batcher(self.served, views=views[:, k:k + 1]) for k in range(views.shape[1])])
        outputs: dict[str, object] = {}

        def run() -> dict[str, object]:
            if not outputs:
                total = sum(len(batches) for batches in view_batches)
                compact = self.feature_dtype == COMPACT_DTYPE  # 8 bits never overflow: no wider retry
                for dtype in (COMPACT_DTYPE,) if compact else (FEATURE_DTYPE, torch.float32):
                    with progress_bar(total, f"teacher logits and features ({len(view_batches)} views)") as bar:
                        found = hooked_outputs(teacher.model, paths, view_batches, self.cfg.student.batch_size,
                                               *teacher.where, dtype, bar)
                    if found is not None:
                        break
                logits, features = found
                outputs["logits"] = logits.squeeze(1) if views is None else logits
                outputs["features"] = {path: value.squeeze(1) if views is None else value
                                       for path, value in features.items()}
            return outputs
        return run

    def logits(self, teacher: TrainedTeacher, first_pass=None) -> torch.Tensor:
        """One teacher's logits for every training image (N, C), or for each stored view (N, K, C)
        (by first_pass, with the features, where given)."""
        batch_size, rows = self.cfg.student.batch_size, {"train": len(self.batcher.splits[self.served].files)}
        views = self.views
        if views is None:  # no augmentation: one set of logits per training image
            key = signal_key("logits", *self.key_parts(teacher))
            compute_logits = (lambda: {"train": first_pass()["logits"]}) if first_pass else (
                lambda: {"train": teacher.train_logits(self.batcher, batch_size, self.transfer)})
            return self._cached(f"logits-{key}", rows, compute_logits, "teacher logits")["train"]
        count = views.shape[1]

        def views_logits() -> dict[str, torch.Tensor]:
            if first_pass:
                return {"train": first_pass()["logits"]}
            with progress_bar(count * rows["train"], f"teacher logits for {count} views") as bar:
                return {"train": torch.stack([
                    predict_logits(teacher.model, self.batcher(self.served, views=views[:, k:k + 1]), batch_size,
                                   *teacher.where, bar=bar) for k in range(count)], 1)}
        key = signal_key("views", *self.key_parts(teacher))
        return self._cached(f"views-{key}", rows, views_logits, f"teacher logits for {count} views per image")["train"]

    def features(self, teacher: TrainedTeacher, paths, first_pass) -> dict[str, torch.Tensor | CompactRows]:
        """The teacher's outputs at the module paths for every training image (N, ...), or for each
        stored view (N, K, ...), in feature_dtype, from first_pass (which gave the logits, if they
        were not stored)."""
        key = signal_key("teacher-features", *paths, str(self.feature_dtype), *self.key_parts(teacher))
        what = "teacher features" + ("" if self.views is None else f" for {self.views.shape[1]} views per image")
        rows = {path: len(self.batcher.splits[self.served].files) for path in paths}
        return from_tensors(self._cached(f"teacher-features-{key}", rows, lambda: as_tensors(first_pass()["features"]),
                                         what))


def without_teacher(batches: Batches, labelled: int) -> Batches:
    """The same batches, views and order, without the teacher's signal: the baseline's input.

    With a transfer set, the first `labelled` samples only (the training images): without a
    teacher, an unlabelled image teaches nothing."""
    plain = dataclasses.replace(batches, extras={}, teacher=None)
    if len(batches) == labelled:
        return plain
    return dataclasses.replace(plain, inputs=batches.inputs.first, labels=batches.labels[:labelled],
                               views=None if batches.views is None else batches.views[:labelled])
