"""One typed config: defaults here, presets as YAML, then --config files, then --set overrides.

Every value is checked before any work starts; a bad one fails with one line naming the setting.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.resources
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from .augment import AUGMENTATIONS
from .errors import KdistillError
from .images import DEFAULT_MAX_PIXELS


@dataclass
class TrainConfig:
    arch: str = "resnet18"
    # "imagenet" (torchvision's IMAGENET1K_V1), "none" (random init, or whatever a
    # module:callable returns), or a local .pth/.safetensors state_dict.
    weights: str = "none"
    dropout: float = 0.0  # > 0: the head is Dropout(p) + Linear, else a plain Linear
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    lr_step: int = 0  # StepLR step size in epochs; 0 keeps the learning rate constant
    lr_gamma: float = 0.1
    weight_decay: float = 0.0
    normalize: str = "auto"


@dataclass
class TeacherConfig(TrainConfig):
    arch: str = "resnet34"
    weights: str = "imagenet"
    mode: str = "head"  # "head": backbone frozen, only the new head trains; "full": fine-tune all


@dataclass
class StudentConfig(TrainConfig):
    epochs: int = 40


@dataclass
class DistillConfig:
    method: str = "kd"
    temperature: float = 4.0
    alpha: float = 0.5
    # "cached": teacher logits computed once per training image (exact without augmentation);
    # "views": with augmentation, logits for `views` stored augmented views per image, computed
    # once; every epoch shows each image in one of them (FKD);
    # "online": teacher runs on every (augmented) batch;
    # "auto": cached without augmentation, views for flip, online for crop_flip.
    teacher_signal: str = "auto"
    views: int = 8


@dataclass
class Config:
    data: str = ""
    out: str = ""
    image_size: int = 224
    val_fraction: float = 0.2  # used only when DATA/val is absent
    seed: int = 0
    device: str = "auto"  # auto: cuda when present, else cpu
    baseline: bool = True  # also train the student without a teacher, for comparison
    skip_bad: bool = False  # skip unreadable images with a warning instead of stopping
    # "none", "flip" (random horizontal flip) or "crop_flip" (random crop of the image reflect-padded
    # by image_size/8, then flip); done on the device, see augment.py
    augment: str = "none"
    cache_dir: str = ""  # default: $KDISTILL_CACHE or ~/.cache/kdistill
    workers: int = 0  # decode processes; 0 = all cores
    max_image_pixels: int = DEFAULT_MAX_PIXELS  # larger images are refused as decompression bombs
    compile: bool = False  # torch.compile the student (CUDA only)
    precision: str = "auto"
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolved_cache_dir(self) -> str:
        return self.cache_dir or os.environ.get("KDISTILL_CACHE") or os.path.join(
            os.path.expanduser("~"), ".cache", "kdistill")

    def signal_mode(self) -> str:
        if self.distill.teacher_signal != "auto":
            return self.distill.teacher_signal
        # The exact choice: flip has just two views per image, so both are stored; random crops
        # are too many to store, so the teacher runs online on each one.
        return {"none": "cached", "flip": "views"}.get(self.augment, "online")


# Settings that change where or how fast a run goes, never its numbers.
NON_RESULT_KEYS = {"out", "device", "workers", "cache_dir", "skip_bad", "baseline", "compile"}


def preset_names() -> list[str]:
    files = importlib.resources.files("kdistill") / "presets"
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".yaml"))


def read_yaml(path_or_text: str, what: str) -> dict:
    try:
        if os.path.exists(path_or_text):
            with open(path_or_text, encoding="utf-8") as f:
                loaded = yaml.safe_load(f)
        else:
            loaded = yaml.safe_load(path_or_text)
    except yaml.YAMLError as e:
        raise KdistillError(f"{what} is not valid YAML: {str(e).splitlines()[0]}") from None
    except OSError as e:
        raise KdistillError(f"cannot read {what}: {e.strerror}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise KdistillError(f"{what} must be a mapping of settings, got {type(loaded).__name__}")
    return loaded


def load_preset(name: str) -> dict:
    if name not in preset_names():
        raise KdistillError(f"unknown preset {name!r}; choose from {', '.join(preset_names())}")
    text = (importlib.resources.files("kdistill") / "presets" / f"{name}.yaml").read_text()
    return read_yaml(text, f"preset {name}")


def _coerce(key: str, value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise KdistillError(f"setting {key} must be {kind.__name__}, got {value!r}")


def _apply(target: Any, updates: dict, prefix: str = "") -> None:
    fields = {f.name: f for f in dataclasses.fields(target)}
    for key, value in updates.items():
        name = f"{prefix}{key}"
        if key not in fields:
            raise KdistillError(f"unknown setting {name!r}")
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise KdistillError(f"setting {name} must be a mapping of settings")
            _apply(current, value, prefix=f"{name}.")
        else:
            setattr(target, key, _coerce(name, value, type(current)))


def parse_set(assignments: list[str]) -> dict:
    """--set a.b=value pairs as one nested dict; values are parsed as YAML scalars."""
    nested: dict = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise KdistillError(f"--set expects key=value, got {item!r}")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return nested


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
        _apply(cfg, layer)
    validate(cfg)
    return cfg


def config_from_dict(values: dict) -> Config:
    cfg = Config()
    _apply(cfg, values)
    validate(cfg)
    return cfg


def _check_arch(key: str, arch: str, image_size: int) -> None:
    import torchvision

    from .models import MIN_IMAGE_SIZE

    if ":" in arch:
        module_name, _, attr = arch.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise KdistillError(f"setting {key}: cannot import module {module_name!r} ({e})") from None
        if not callable(getattr(module, attr, None)):
            raise KdistillError(f"setting {key}: {module_name} has no callable {attr!r}")
    elif arch not in torchvision.models.list_models(module=torchvision.models):
        raise KdistillError(
            f"setting {key}: unknown architecture {arch!r} (a torchvision classification model "
            f"name such as resnet18, or module:callable)")
    elif image_size < MIN_IMAGE_SIZE.get(arch, 0):
        raise KdistillError(f"setting image_size must be >= {MIN_IMAGE_SIZE[arch]} for {key} {arch}, "
                            f"got {image_size}")


def validate(cfg: Config) -> None:
    from .distillers import DISTILLERS

    def require(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise KdistillError(f"setting {key} {message}")

    require(cfg.image_size >= 8, "image_size", f"must be >= 8, got {cfg.image_size}")
    require(0 < cfg.val_fraction < 1, "val_fraction", f"must be in (0, 1), got {cfg.val_fraction}")
    require(cfg.device == "auto" or cfg.device.split(":")[0] in ("cpu", "cuda", "mps"), "device",
            f"must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    require(cfg.augment in AUGMENTATIONS, "augment",
            f"must be one of {', '.join(AUGMENTATIONS)}, got {cfg.augment!r}")
    require(cfg.workers >= 0, "workers", f"must be >= 0, got {cfg.workers}")
    require(cfg.max_image_pixels > 0, "max_image_pixels", "must be > 0")
    for name, part in (("teacher", cfg.teacher), ("student", cfg.student)):
        _check_arch(f"{name}.arch", part.arch, cfg.image_size)
        require(part.epochs >= 1, f"{name}.epochs", f"must be >= 1, got {part.epochs}")
        require(part.batch_size >= 1, f"{name}.batch_size", f"must be >= 1, got {part.batch_size}")
        require(part.lr > 0, f"{name}.lr", f"must be > 0, got {part.lr}")
        require(part.lr_step >= 0, f"{name}.lr_step", f"must be >= 0, got {part.lr_step}")
        require(0 < part.lr_gamma <= 1, f"{name}.lr_gamma", f"must be in (0, 1], got {part.lr_gamma}")
        require(0 <= part.dropout < 1, f"{name}.dropout", f"must be in [0, 1), got {part.dropout}")
        require(part.weight_decay >= 0, f"{name}.weight_decay", "must be >= 0")
        if part.weights not in ("imagenet", "none"):
            require(os.path.isfile(part.weights), f"{name}.weights",
                    f"must be imagenet, none or an existing file, got {part.weights!r}")
        if part.weights == "imagenet":
            require(":" not in part.arch, f"{name}.weights",
                    "imagenet applies to torchvision architectures; a module:callable loads its own "
                    "weights (use none) or takes a local file")
    require(cfg.teacher.mode in ("head", "full"), "teacher.mode",
            f"must be head or full, got {cfg.teacher.mode!r}")
    require(cfg.distill.method in DISTILLERS, "distill.method",
            f"must be one of {', '.join(sorted(DISTILLERS))}, got {cfg.distill.method!r}")
    require(cfg.distill.temperature > 0, "distill.temperature", f"must be > 0, got {cfg.distill.temperature}")
    require(0 <= cfg.distill.alpha <= 1, "distill.alpha", f"must be in [0, 1], got {cfg.distill.alpha}")
    require(cfg.distill.teacher_signal in ("auto", "cached", "views", "online"), "distill.teacher_signal",
            f"must be auto, cached, views or online, got {cfg.distill.teacher_signal!r}")
    require(not (cfg.distill.teacher_signal == "cached" and cfg.augment != "none"),
            "distill.teacher_signal", "cannot be cached with augmentation: the teacher must see the "
            "student's augmented view (use views or online)")
    require(not (cfg.distill.teacher_signal == "views" and cfg.augment == "none"), "distill.teacher_signal",
            "views needs augmentation (set augment); without it, cached is exact")
    require(cfg.distill.views >= 1, "distill.views", f"must be >= 1, got {cfg.distill.views}")


def save_config(cfg: Config, path: str) -> None:
    from .fileio import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def result_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Keys whose values differ between two resolved configs, ignoring settings that don't change results."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        name = f"{prefix}{key}"
        if not prefix and key in NON_RESULT_KEYS:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += result_differences(a, b, prefix=f"{name}.")
        elif a != b:
            diffs.append(f"{name} ({a!r} -> {b!r})")
    return diffs
