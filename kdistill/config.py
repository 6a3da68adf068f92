"""One typed config: defaults here, presets as YAML, then --config files, then --set overrides.

Every value is checked before any work starts; a bad one fails with one line naming the setting.
Each setting carries its one-line description (printed by `kdistill config`) and, where only a
fixed set of values makes sense, those values (see settings.py).
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import os
import re
from dataclasses import dataclass
from typing import Any

from .augment import MIXES
from .augmentations import CHOICES as AUGMENT_CHOICES
from .augmentations.rrc_flip import RRC_RATIO, RRC_SCALE
from .distillers import DISTILLERS, Distiller, build_distiller
from .errors import KdistillError
from .images import DEFAULT_MAX_PIXELS, MAX_IMAGE_SIZE
from .loggers import LOGGERS
# The model sections' types, where the rest of the package has always imported them from.
from .model_settings import StudentConfig, TeacherConfig, TrainConfig, input_side, upsampled_side

from .sources import CALLABLE, source_of
from .signal_plan import SignalPlan, plan_signal
from .student_plan import (BORN_AGAIN, METHODS, BornAgainSettings, StudentPlan, born_again_problems,
                           plan_students)
from .preset_names import preset_names
from .settings import (apply_settings, bound_problem, convert, leaves, parse_set, parse_yaml, read_yaml,
                       render_config, section, setting)


# Seeds offset by a few constants still fit torch's 64-bit generators.
MAX_SEED = 2**32 - 1
MIN_TEMPERATURE = 0.01  # distill.temperature's floor (below it logits / T overflow: the loss would be NaN)


@dataclass
class _DistillSettings:
    method: str = setting("kd", "distillation method (kd: alpha*T^2*KL + (1-alpha)*CE; the others: see "
                                "docs/methods.md)",
                          choices=METHODS)
    temperature: float = setting(4.0, "softmax temperature T of both teacher and student", ge=MIN_TEMPERATURE)
    alpha: float = setting(0.5, "weight of the teacher's term; 1 - alpha goes to the labels", ge=0, le=1)
    teacher_signal: str = setting(
        "auto", "cached: teacher logits (and the features a method reads) computed once per image (exact "
                "without augmentation); views: those of `views` stored augmented views per image; online: "
                "teacher runs on every batch; auto: cached, views for flip, and for crop_flip or rrc_flip "
                "when views >= student.epochs (else online), online for any mix and teacher features above "
                "max_signal_memory_gb",
        choices=("auto", "cached", "views", "online"))
    views: int = setting(8, "stored augmented views per image when teacher_signal is views (or auto picks them)", ge=1)
    max_signal_memory_gb: float = setting(4.0, "most memory (GB) the stored teacher features of a method reading "
                                               "them may take (cached or views); above it auto runs the teacher "
                                               "online and cached or views is refused", gt=0)
    feature_storage: str = setting(
        "auto", "stored teacher features in float16, or in int8 (8-bit codes and a scale per image and view: half "
                "of float16's memory, each value within half a step, 1/254 of its row's largest magnitude); auto: "
                "float16 where it fits in max_signal_memory_gb, else int8",
        choices=("auto", "float16", "int8"))
    ensemble_weights: list = setting([], "weight of each teacher (teacher, then the ensemble's in order) in the "
                                         "average of their softened probabilities; empty: equal",
                                     item_kind=float, ge=0)
    unlabeled: str = setting("", "transfer set: test (the run's DATA/test images) or a folder of images, "
                                 "labelled by the teacher and learned through the teacher's terms only; "
                                 "empty: none")


# Each method's own hyperparameters, as the section distill.<method> (for example distill.dkd.beta);
# born-again's generations, last.
DistillConfig = dataclasses.make_dataclass(
    "DistillConfig",
    [*((name, method.Settings, section(method.Settings, f"settings of distill.method {name}"))
       for name, method in DISTILLERS.items() if dataclasses.fields(method.Settings)),
     (BORN_AGAIN, BornAgainSettings, section(BornAgainSettings, f"settings of distill.method {BORN_AGAIN}"))],
    bases=(_DistillSettings,))


@dataclass
class Config:
    data: str = setting("", "image folder: train/<class>/, val/<class>/ (optional), test/ (optional)")
    out: str = setting("", "run folder; the same folder resumes a run")
    image_size: int = setting(224, "side in pixels that images are resized to", ge=8, le=MAX_IMAGE_SIZE)
    val_fraction: float = setting(0.2, "share of train/ held out for validation when DATA/val is absent", gt=0, lt=1)
    seed: int = setting(0, "random seed; the same seed repeats a run on the same machine", ge=0, le=MAX_SEED)
    seeds: list = setting([], "train the student and the baseline once per seed (e.g. [0, 1, 2]), one teacher "
                              "trained with seed; reports mean ± std and a paired test; empty: once, with seed",
                          ge=0, le=MAX_SEED)
    device: str = setting("auto", "auto (cuda when present, else cpu), cpu, mps, cuda or cuda:N")
    precision: str = setting("auto", "auto: on the CPU, each model in the fastest of fp32 and bf16 autocast (where "
                                     "the CPU has bfloat16 units), contiguous or channels_last, timed on its batch "
                                     "shape and cached per machine; on CUDA bf16; fp32 or bf16 for every model",
                             choices=("auto", "fp32", "bf16"))
    threads: int = setting(0, "CPU threads; 0 (auto): OMP_NUM_THREADS where set, else one per core this process may "
                              "use that other processes leave free, chosen when the run starts and followed while it "
                              "trains; N: fixed", ge=0)
    baseline: bool = setting(True, "also train the student without a teacher, for comparison")
    skip_bad: bool = setting(False, "skip unreadable images with a warning instead of stopping")
    keep_checkpoints: bool = setting(False, "keep each model's whole training state (optimizer, weight average, an "
                                            "older copy) after it finished, so a run can later train on; false: "
                                            "last.pt keeps the history only, a fraction of the size")
    loggers: list = setting([], "where each epoch's numbers also go: tensorboard (event files in "
                                "OUT/tensorboard/<model>/), mlflow ($MLFLOW_TRACKING_URI, else OUT/mlruns); log.txt "
                                "and history/ always", item_kind=str)
    augment: str = setting("none", "none, flip (random horizontal flip), crop_flip (random crop of the image "
                                   "reflect-padded by image_size/8, then flip) or rrc_flip (random-resized crop, "
                                   "then flip); done on the device", choices=AUGMENT_CHOICES)
    rrc_scale: list = setting(list(RRC_SCALE), "rrc_flip: [low, high] range of the crop's share of the image area")
    rrc_ratio: list = setting(list(RRC_RATIO), "rrc_flip: [low, high] range of the crop's width/height")
    mix: str = setting("none", "mixup, cutmix, or both (one of the two at random per batch) of the student's and "
                               "baseline's training batches, after augment; needs an online teacher", choices=MIXES)
    mixup_alpha: float = setting(0.2, "mixup: the mixing weight is drawn from Beta(alpha, alpha)", gt=0)
    cutmix_alpha: float = setting(1.0, "cutmix: the pasted box's share is drawn from Beta(alpha, alpha)", gt=0)
    cache_dir: str = setting("", "decoded-image cache; empty: $KDISTILL_CACHE or ~/.cache/kdistill")
    workers: int = setting(0, "decode processes; 0 = all cores", ge=0)
    max_image_pixels: int = setting(DEFAULT_MAX_PIXELS, "larger images are refused as decompression bombs", gt=0)
    compile: bool = setting(False, "torch.compile the student (CUDA only)")
    ensemble: list = setting([], "more teachers (teacher-2, teacher-3, ...), each a mapping of teacher settings; "
                                 "unset ones are the teacher section's; the student learns from the weighted "
                                 "average of all teachers' softened probabilities", item_kind=dict)
    deploy_check: bool = setting(True, "at the end, write student-int8.onnx (static int8) and measure size, val "
                                       "accuracy and CPU latency of the student (PyTorch, ONNX Runtime fp32 and int8) "
                                       "and the teacher")
    sync_bn: bool = setting(True, "with several processes (torchrun, --nproc): BatchNorm statistics over the global "
                                  "batch (SyncBatchNorm), as one process computes them; false: each process's share")
    ddp_timeout_s: int = setting(600, "with several processes: seconds one waits for the others in a training step "
                                      "before stopping with an error (a process that died or hangs)", ge=1)
    teacher: TeacherConfig = section(TeacherConfig, "the large model, trained first")
    student: StudentConfig = section(StudentConfig, "the small model, distilled from the teacher")
    distill: DistillConfig = section(DistillConfig, "how the teacher's knowledge reaches the student")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolved_cache_dir(self) -> str:
        return self.cache_dir or os.environ.get("KDISTILL_CACHE") or os.path.join(
            os.path.expanduser("~"), ".cache", "kdistill")

    def distilling_method(self) -> str:
        """The method whose loss trains the student: distill.method, or for born_again its base."""
        return self.distill.born_again.base if self.distill.method == BORN_AGAIN else self.distill.method

    def distiller(self, method: str = "") -> Distiller:
        """A new objective of `method` (default: the distilling method, for born_again the one that
        distills each generation) with its settings."""
        method = method or self.distilling_method()
        return build_distiller(method, temperature=self.distill.temperature, alpha=self.distill.alpha,
                               label_smoothing=self.student.label_smoothing,
                               settings=getattr(self.distill, method, None))

    def student_plan(self) -> StudentPlan:
        """The students trained for each seed, in order, and what teaches each (see student_plan.py)."""
        return plan_students(self)

    def teachers(self) -> dict[str, TeacherConfig]:
        """Every teacher by run name: teacher, then the ensemble's as teacher-2, teacher-3, ..."""
        found = {"teacher": self.teacher}
        for position, changes in enumerate(self.ensemble):
            member = dataclasses.replace(self.teacher)
            apply_settings(member, changes, prefix=f"ensemble[{position}].")
            found[f"teacher-{position + 2}"] = member
        return found

    def teacher_weights(self) -> list[float]:
        """Each teacher's weight in the ensemble's average, summing to 1."""
        weights = self.distill.ensemble_weights or [1.0] * (1 + len(self.ensemble))
        return [weight / sum(weights) for weight in weights]

    def signal_plan(self) -> SignalPlan:
        """How the student gets the teacher's output, and why: decided here once (see signal_plan.py)."""
        return plan_signal(self)

    def signal_mode(self) -> str:
        return self.signal_plan().kind


def load_preset(name: str) -> dict:
    if name not in preset_names():
        raise KdistillError(f"unknown preset {name!r}; choose from {', '.join(preset_names())}")
    text = (importlib.resources.files("kdistill") / "presets" / f"{name}.yaml").read_text()
    return parse_yaml(text, f"preset {name}")


def build_config(preset: str | None = None, config_files: tuple[str, ...] = (),
                 overrides: dict | None = None, sets: list[str] | None = None) -> Config:
    """Defaults <- preset <- config files (in order) <- overrides <- --set, then validated."""
    cfg = Config()
    layers = []
    if preset:
        layers.append(load_preset(preset))
    layers += [read_yaml(path, f"config file {path}") for path in config_files]
    layers.append(overrides or {})
    layers.append(parse_set(sets or []))
    for layer in layers:
        apply_settings(cfg, layer)
    validate(cfg)
    return cfg


def config_from_dict(values: dict) -> Config:
    cfg = Config()
    apply_settings(cfg, values)
    validate(cfg)
    return cfg


def _arch_problem(arch: str, image_size: int, size_key: str) -> str | None:
    from .models import arch_problem

    problem = arch_problem(arch, image_size)
    return None if problem is None else problem + (f" (raise {size_key})" if problem.endswith(" px") else "")


def validate(cfg: Config) -> None:
    """Refuse a config with any invalid setting: one line listing every problem, each naming its setting."""
    problems: list[str] = []

    def require(ok: bool, key: str, message: str) -> None:
        if not ok:
            problems.append(f"setting {key} {message}")

    # Types and fixed sets of values first (the checks below compare numbers), also for a Config built in Python.
    for name, f, owner in leaves(cfg):
        try:
            setattr(owner, f.name, convert(name, getattr(owner, f.name), f))
        except KdistillError as e:
            problems.append(str(e))
    _raise_all(problems)
    members = list(cfg.teachers().values())[1:]  # an unknown or ill-typed member setting fails here, named
    cfg.ensemble = [{key: getattr(member, key) for key in changes} for changes, member in zip(cfg.ensemble, members)]
    method_sections = {id(getattr(cfg.distill, name)) for name in DISTILLERS if hasattr(cfg.distill, name)}
    for name, f, owner in [*leaves(cfg), *(leaf for i, member in enumerate(members)
                                           for leaf in leaves(member, f"ensemble[{i}]."))]:
        if id(owner) in method_sections:  # checked with the method's own problems, below
            continue
        problem = bound_problem(getattr(owner, f.name), f)
        require(problem is None, name, problem or "")
    _check_top(cfg, require)
    for name, part in [("teacher", cfg.teacher), *((f"ensemble[{i}]", m) for i, m in enumerate(members)),
                       ("student", cfg.student)]:
        _check_model(cfg, name, part, require)
    _check_distill(cfg, require)
    _raise_all(problems)


def _raise_all(problems: list[str]) -> None:
    if problems:
        raise KdistillError("; ".join(problems) if len(problems) <= 3 else
                            "; ".join(problems[:3]) + f"; and {len(problems) - 3} more")


def _check_top(cfg: Config, require) -> None:
    require(len(set(cfg.seeds)) == len(cfg.seeds), "seeds", f"must not repeat a seed, got {cfg.seeds}")
    require(len(cfg.seeds) != 1, "seeds", f"must list two or more seeds, got {cfg.seeds} (for one run set seed)")
    require(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", cfg.device) is not None, "device",
            f"must be auto, cpu, mps, cuda or cuda:N, got {cfg.device!r}")
    unknown = [name for name in cfg.loggers if name not in LOGGERS]
    require(not unknown and len(set(cfg.loggers)) == len(cfg.loggers), "loggers",
            f"must list distinct loggers of {', '.join(LOGGERS)}, got {cfg.loggers}")
    for key in ("rrc_scale", "rrc_ratio"):
        require(len(getattr(cfg, key)) == 2, key, f"must be two numbers [low, high], got {getattr(cfg, key)}")
    if len(cfg.rrc_scale) == 2 and len(cfg.rrc_ratio) == 2:
        (scale_low, scale_high), (ratio_low, ratio_high) = cfg.rrc_scale, cfg.rrc_ratio
        require(0 < scale_low <= scale_high <= 1, "rrc_scale", f"must be [low, high] with 0 < low <= high <= 1, "
                f"got {cfg.rrc_scale}")
        require(0 < ratio_low <= ratio_high, "rrc_ratio",
                f"must be [low, high] with 0 < low <= high, got {cfg.rrc_ratio}")


def _check_model(cfg: Config, name: str, part: TrainConfig, require) -> None:
    """One model's settings beyond their declared bounds: what depends on another setting."""
    require(part.input_size == 0 or part.input_size >= 8, f"{name}.input_size",
            f"must be 0 (image_size) or >= 8, got {part.input_size}")
    size_key = f"{name}.input_size" if upsampled_side(part, cfg.image_size) else "image_size"
    problem = _arch_problem(part.arch, input_side(part, cfg.image_size), size_key)
    require(problem is None, f"{name}.arch", f"names no model kdistill can build: {problem}")
    given = name != "student" and part.epochs == 0  # a finished teacher, used as it is
    require(name != "student" or part.epochs >= 1, f"{name}.epochs", f"must be >= 1, got {part.epochs}")
    require(not given or part.weights not in ("none", "imagenet"), f"{name}.epochs",
            f"may be 0 (a finished teacher, used as it is) only with {name}.weights a file: a state_dict with "
            f"its head, a .safetensors file or a kdistill student.pt; got {name}.weights={part.weights}")
    require(not (part.lr_step and part.schedule != "step"), f"{name}.lr_step",
            f"applies to schedule step only, got {part.lr_step} with schedule {part.schedule}")
    require(not (part.warmup_epochs and part.schedule == "step"), f"{name}.warmup_epochs",
            "applies to schedule cosine or onecycle, not step")
    require(given or part.steps or part.epochs < 1 or part.warmup_epochs < part.epochs, f"{name}.warmup_epochs",
            f"must be below {name}.epochs ({part.epochs}), got {part.warmup_epochs}")
    head_epochs = getattr(part, "head_epochs", 0)
    require(not head_epochs or part.mode == "full", f"{name}.head_epochs",
            f"applies to mode full (mode head trains the head alone throughout), got {head_epochs}")
    require(not head_epochs or given or part.steps or head_epochs < part.epochs, f"{name}.head_epochs",
            f"must be below {name}.epochs ({part.epochs}): some epochs must train the whole model, got {head_epochs}")
    if part.weights not in ("imagenet", "none"):
        require(os.path.isfile(part.weights), f"{name}.weights",
                f"must be imagenet, none or an existing file, got {part.weights!r}")
    if part.weights == "imagenet":
        require(source_of(part.arch)[0] is not CALLABLE, f"{name}.weights",
                "imagenet applies to torchvision and timm architectures; a module:callable loads its own "
                "weights (use none) or takes a local file")


def _check_distill(cfg: Config, require) -> None:
    require(cfg.mix == "none" or cfg.distill.teacher_signal in ("auto", "online"), "distill.teacher_signal",
            f"cannot be {cfg.distill.teacher_signal} with mix={cfg.mix}: the teacher's logits on mixed images "
            "cannot be stored (use online or auto)")
    require(not (cfg.distill.teacher_signal == "cached" and cfg.augment != "none"),
            "distill.teacher_signal", "cannot be cached with augmentation: the teacher must see the "
            "student's augmented view (use views or online)")
    require(not (cfg.distill.teacher_signal == "views" and cfg.augment == "none"), "distill.teacher_signal",
            "views needs augmentation (set augment); without it, cached is exact")
    for name, method in DISTILLERS.items():
        if hasattr(cfg.distill, name):
            for key, message in method.settings_problems(getattr(cfg.distill, name)):
                require(False, f"distill.{name}.{key}", message)
    for key, message in born_again_problems(cfg.distill.born_again):  # its bounds are checked with the others
        require(False, f"distill.{BORN_AGAIN}.{key}", message)
    weights, teachers = cfg.distill.ensemble_weights, 1 + len(cfg.ensemble)
    require(not weights or len(weights) == teachers, "distill.ensemble_weights",
            f"must give one weight per teacher ({teachers}: teacher, then the ensemble's), got {len(weights)}")
    require(not weights or sum(weights) > 0, "distill.ensemble_weights", f"must not all be zero, got {weights}")
    require(not (cfg.ensemble and cfg.distiller().teacher_features()), "ensemble",
            f"cannot be used with distill.method {cfg.distill.method}: it reads one teacher's features at module "
            "paths, which an ensemble does not have (use a method that reads logits, e.g. kd, dkd or dist)")
    unlabeled = cfg.distill.unlabeled
    require(unlabeled in ("", "test") or os.path.isdir(unlabeled), "distill.unlabeled",
            f"must be empty, test or an existing folder, got {unlabeled!r}")
    require(not (unlabeled and cfg.mix != "none"), "distill.unlabeled",
            f"cannot be combined with mix={cfg.mix}: a mixed image of a labelled and an unlabelled one has no label")


def save_config(cfg: Config, path: str) -> None:
    from .fileio import atomic_write_text

    atomic_write_text(path, render_config(cfg))
