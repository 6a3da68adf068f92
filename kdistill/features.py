"""Intermediate features by forward hooks on module paths (as torchdistill does), for any
torchvision or module:callable model, without rewriting it.

Paths name modules of the network itself (`layer3`, `layer4.1.conv2`, `avgpool`), inside the
input standardization that kdistill wraps every model in. A teacher path may be `auto`: the
teacher's module whose map is nearest in height and width to the paired student module's (see
matching_teacher_module), so a method runs on any convolutional teacher without reading its code.
"""
from __future__ import annotations

import dataclasses
from contextlib import AbstractContextManager, nullcontext
from fractions import Fraction
from typing import Callable, Sequence

import torch
from torch import nn

from .config import input_side, upsampled_side
from .distillers.base import BuildContext, Distiller, Outputs
from .errors import KdistillError
from .models import Standardized, build_model

AUTO = "auto"
# A method's settings that name module paths: the student's, and the teacher's paired with them.
LAYER_SETTINGS = (("student_layer", "teacher_layer"), ("student_layers", "teacher_layers"))


class FeatureTaps:
    """Keeps the output of the modules at `paths` from each forward pass until take()."""

    def __init__(self, model: nn.Module, paths: Sequence[str], what: str):
        network = model.model if isinstance(model, Standardized) else model
        modules = dict(network.named_modules())
        self.captured: dict[str, torch.Tensor] = {}
        self.handles = []
        for path in paths:
            if not path or path not in modules:
                top = ", ".join(name for name, _ in network.named_children())
                hint = f" (or {AUTO}, the one with the student's map size)" if what == "the teacher" else ""
                raise KdistillError(f"{what} has no module {path!r} to take features from; its top-level "
                                    f"modules are: {top}{hint}")
            self.handles.append(modules[path].register_forward_hook(self._keeper(path)))

    def _keeper(self, path: str):
        def keep(module, inputs, output):
            self.captured[path] = output
        return keep

    def take(self) -> dict[str, torch.Tensor]:
        """The features of the last forward pass, as float32 (under autocast they are bf16)."""
        captured, self.captured = self.captured, {}
        return {path: value.float() for path, value in captured.items()}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class OnlineTeacher:
    """The teacher run on every batch, with the features a method reads: input -> Outputs."""

    def __init__(self, model: nn.Module, paths: Sequence[str] = ()):
        self.model = model
        self.taps = FeatureTaps(model, paths, "the teacher") if paths else None

    def __call__(self, x: torch.Tensor) -> Outputs:
        logits = self.model(x)
        return Outputs(logits, self.taps.take() if self.taps is not None else {})


def build_objective(objective: Distiller, model: nn.Module, student_taps: FeatureTaps, batches,
                    device: torch.device, make_model: Callable[[str], nn.Module] | None = None,
                    autocast: Callable[[], AbstractContextManager] = nullcontext) -> None:
    """Builds the method's trainable parts (adapters, memory banks, a peer) from the features of one
    forward pass of two training images, in eval mode and without gradients, so no weight or
    statistic moves; make_model and autocast reach it through the BuildContext."""
    student_probe: dict[str, torch.Tensor] = {}
    teacher_probe: dict[str, torch.Tensor] = {}
    if objective.student_features() or objective.teacher_features():
        # Unshuffled, with a generator of its own: the training's random streams are left alone.
        probe = next(iter(batches.iterate(2, device, view_generator=torch.Generator().manual_seed(0))))
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(probe.x)
        model.train(was_training)
        student_probe = student_taps.take()
        teacher_probe = probe.teacher.features
    objective.build(BuildContext(student_probe, teacher_probe, len(batches), make_model, autocast))
    objective.to(device)


def output_shapes(arch: str, image_size: int) -> list[tuple[str, tuple[int, ...]]]:
    """(module path, output shape of one image) of every module of a throwaway `arch` (random
    weights), in the order their forward passes end on one image_size image; a module called twice
    appears twice."""
    model, _ = build_model(arch, 3)
    shapes: list[tuple[str, tuple[int, ...]]] = []

    def keeper(path: str):
        def keep(module, inputs, output):
            if isinstance(output, torch.Tensor):
                shapes.append((path, tuple(output.shape[1:])))
        return keep
    for path, module in model.named_modules():
        if path:
            module.register_forward_hook(keeper(path))
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, image_size, image_size))
    return shapes


def matching_teacher_module(student_path: str, student_shapes, teacher_shapes, setting: str) -> str:
    """The teacher module for `auto`: of those whose output map is nearest in height and width to
    the student's module at student_path (the same size where one has it; nearness by ratio, and
    of a larger and a smaller map equally near, the larger), the shallowest (fewest dots: a stage or
    block rather than a layer inside it), and of those the last to run (the stage's output). A
    ResNet teacher gets the student's own names (layer2 for layer2, avgpool for avgpool);
    EfficientNet-Lite0 at 64 px gets _blocks.4 for ResNet18's layer2 and _avg_pooling for its
    avgpool. Maps of different sizes are average-pooled to the smaller in training."""
    student, teacher_maps = _last_outputs(student_shapes), _last_outputs(teacher_shapes)
    shape = student[student_path]
    if len(shape) != 3:
        raise KdistillError(f"setting {setting} is {AUTO}, which matches map sizes, but the student's "
                            f"{student_path} gives features of shape {shape}, not (channels, height, width); "
                            f"name the teacher's module")
    maps = {path: teacher for path, teacher in teacher_maps.items() if len(teacher) == 3}
    if not maps:
        raise KdistillError(f"setting {setting} is {AUTO}, but no module of the teacher gives a map "
                            f"(channels, height, width) like the student's {student_path}; name the teacher's module")

    def distance(teacher: tuple[int, ...]) -> tuple[Fraction, int]:
        ratios = [Fraction(max(a, b), min(a, b)) for a, b in zip(teacher[1:], shape[1:])]
        return ratios[0] * ratios[1], -teacher[1] * teacher[2]
    nearest = min(distance(teacher) for teacher in maps.values())
    same_size = [path for path, teacher in maps.items() if distance(teacher) == nearest]
    depth = min(path.count(".") for path in same_size)
    return [path for path in same_size if path.count(".") == depth][-1]


def resolve_auto_layers(cfg, log):
    """cfg with every `auto` teacher path of its method replaced by the matching teacher module,
    each logged with both shapes. The saved config keeps `auto`: the choice repeats for the same
    architectures and sizes.

    The teacher's maps are those at the size it sees, the student's those at image_size: a student
    that sees its views upsampled (student.input_size) has maps larger by that factor, and in
    training the larger of two maps is pooled to the smaller (at.pool_to_common_size), so the stored
    teacher features stay about the size the data has, not the upsampling's."""
    method = cfg.distilling_method()
    section = getattr(cfg.distill, method, None)
    pairs = [(student, teacher) for student, teacher in LAYER_SETTINGS if hasattr(section, teacher)]
    if not any(AUTO in _as_list(getattr(section, teacher)) for _, teacher in pairs):
        return cfg
    student_shapes = output_shapes(cfg.student.arch, cfg.image_size)
    teacher_shapes = output_shapes(cfg.teacher.arch, input_side(cfg.teacher, cfg.image_size))
    student_modules = dict(student_shapes)
    upsampled = upsampled_side(cfg.student, cfg.image_size)
    # The maps the student gives in training, where they are not those at image_size.
    trained_maps = _last_outputs(output_shapes(cfg.student.arch, upsampled)) if upsampled else {}
    changes = {}
    for student_name, teacher_name in pairs:
        resolved = []
        for student_path, teacher_path in zip(_as_list(getattr(section, student_name)),
                                              _as_list(getattr(section, teacher_name))):
            if teacher_path == AUTO:
                if student_path not in student_modules:
                    top = ", ".join(path for path in student_modules if "." not in path)
                    raise KdistillError(f"setting distill.{method}.{student_name}: the student {cfg.student.arch} "
                                        f"has no module {student_path!r}; its top-level modules are: {top}")
                setting = f"distill.{method}.{teacher_name}"
                teacher_path = matching_teacher_module(student_path, student_shapes, teacher_shapes, setting)
                log(_choice(setting, teacher_path, dict(teacher_shapes)[teacher_path], student_path,
                            student_modules[student_path], cfg.image_size, upsampled, trained_maps.get(student_path)))
            resolved.append(teacher_path)
        changes[teacher_name] = resolved if isinstance(getattr(section, teacher_name), list) else resolved[0]
    return dataclasses.replace(cfg, distill=dataclasses.replace(
        cfg.distill, **{method: dataclasses.replace(section, **changes)}))


def _choice(setting: str, teacher_path: str, teacher_map, student_path: str, student_map, image_size: int,
            upsampled: int, trained_map) -> str:
    """The log line of an `auto` choice: both maps, the one the student gives in training where it
    sees its views upsampled, and the pooling where the maps it meets in training differ in size."""
    line = f"{setting}: {AUTO} is the teacher's {teacher_path} {teacher_map}, for the student's {student_path} "
    if not upsampled:
        line += f"{student_map}"
    else:
        line += f"{student_map} at {image_size} px; it sees {upsampled} px, where that map is {trained_map}"
        student_map = trained_map
    if tuple(teacher_map[1:]) != tuple(student_map[1:]):
        common = "x".join(str(min(a, b)) for a, b in zip(teacher_map[1:], student_map[1:]))
        line += f"; in training the larger is average-pooled to {common}"
    return line


def _last_outputs(shapes) -> dict[str, tuple[int, ...]]:
    """Each path's last output (what FeatureTaps keeps of a module called twice), in the order of
    those last outputs."""
    last: dict[str, tuple[int, ...]] = {}
    for path, shape in shapes:
        last.pop(path, None)
        last[path] = shape
    return last


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]
