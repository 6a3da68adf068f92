"""A finished teacher used as it is (teacher.epochs: 0): its weights loaded whole, head included.

teacher.weights may be
- a kdistill bundle (RUN/student.pt): architecture, classes, input statistics and weights;
- a kdistill run's model weights (RUN/models/teacher.pt, RUN/models/student.pt): the input
  statistics and resize are in them, the architecture is teacher.arch;
- a plain state_dict (.pt/.pth, or {"state_dict": ...}) or a .safetensors file of teacher.arch,
  with its own head; its input statistics are teacher.normalize (auto: ImageNet's).

The classes must be the data's: a bundle's names in the same order, a state_dict's head as many
outputs as the data has classes (a state_dict cannot say their order, so the log says it assumes
the data's, the sorted class folder names).
"""
from __future__ import annotations

from torch import nn

from .errors import KdistillError, printable
from .export import BUNDLE_KEYS, load_bundle
from .fileio import load_torch
from .models import (Standardized, head_path, input_statistics, is_trusted_arch, make_head, read_state_dict,
                     set_module)
from .sources import source_of

STANDARDIZED_KEYS = {"mean", "std"}  # besides model.*: the state dict of a models.Standardized


def _listed(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(printable(name) for name in names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}] ({len(names)})"


def _check_classes(path: str, own: list[str], classes: list[str]) -> None:
    if own != classes:
        order = " in another order" if sorted(own) == sorted(classes) else ""
        raise KdistillError(f"teacher.weights {path} was trained on other classes{order}: it has {_listed(own)}, "
                            f"the data has {_listed(classes)}")


def _bare_model(arch: str, state: dict, path: str, num_classes: int) -> tuple[nn.Module, str]:
    """teacher.arch built without weights, its head shaped as the state dict's (Linear or Dropout + Linear)."""
    source, name = source_of(arch)
    model = source.build(name, False)
    head = head_path(model)
    weight = state.get(f"{head}.weight", state.get(f"{head}.1.weight"))
    if weight is None or weight.ndim != 2:
        raise KdistillError(f"teacher.weights {path} has no classifier at {head} (teacher.arch={arch}); is it a "
                            f"state_dict of {arch}?")
    if weight.shape[0] != num_classes:
        raise KdistillError(f"teacher.weights {path} has a head of {weight.shape[0]} classes, the data has "
                            f"{num_classes}: give a teacher trained on these classes (or set teacher.epochs >= 1 to "
                            f"fine-tune it with a new head)")
    # A Dropout + Linear head's keys sit one level deeper; its rate changes nothing in eval mode.
    set_module(model, head, make_head(weight.shape[1], num_classes, 0.5 if f"{head}.1.weight" in state else 0.0))
    return model, head


def _load_exactly(model: nn.Module, state: dict, path: str, arch: str) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        detail = printable(str(e).strip().splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e))
        raise KdistillError(f"teacher.weights {path} do not fit teacher.arch={arch} ({detail[:200]})") from None


def load_given_teacher(t, classes: list[str], dataset_mean: list[float], dataset_std: list[float],
                       input_size: int, log) -> tuple[Standardized, str, str, str]:
    """(model, head path, statistics name, architecture) of the finished teacher in t.weights."""
    path = t.weights
    state = read_state_dict(path) if path.endswith(".safetensors") else load_torch(path, what="teacher weights")
    if isinstance(state, dict) and BUNDLE_KEYS <= set(state):
        bundle_arch = state.get("arch")
        # A bundle naming module:callable would run that module: only where the config names it too.
        if isinstance(bundle_arch, str) and bundle_arch != t.arch and not is_trusted_arch(bundle_arch):
            raise KdistillError(f"teacher.weights {path} names the architecture {printable(bundle_arch)}, which "
                                f"would run that module's code; set teacher.arch={printable(bundle_arch)} if you "
                                f"trust it")
        model, bundle = load_bundle(path, trust_arch=True)
        _check_classes(path, bundle["classes"], classes)
        log(f"teacher: {bundle['arch']} from the kdistill bundle {path} (its classes, input statistics and "
            f"weights; teacher.arch is not read)")
        return model, f"model.{head_path(model.model)}", bundle["normalize"], bundle["arch"]
    if not isinstance(state, dict) or path.endswith(".safetensors"):
        state = {"state_dict": state}
    if isinstance(state.get("state_dict"), dict):  # {"state_dict": ..., "classes": [...]} as trainers save
        recorded = state.get("classes") or state.get("class_names")
        if isinstance(recorded, list) and all(isinstance(c, str) for c in recorded):
            _check_classes(path, recorded, classes)
        state = state["state_dict"]
    else:
        recorded = None
    if STANDARDIZED_KEYS <= set(state) and all(k in STANDARDIZED_KEYS | {"resized_to"} or k.startswith("model.")
                                                for k in state):
        inner = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
        model, _ = _bare_model(t.arch, inner, path, len(classes))
        resized = int(state["resized_to"]) if "resized_to" in state else 0
        teacher = Standardized(model, [0.0] * 3, [1.0] * 3, resized)
        _load_exactly(teacher, state, path, t.arch)
        normalize, what = "its own", "a kdistill run's weights (input statistics included)"
    else:
        source, name = source_of(t.arch)
        state = source.adapt_state(name, state)  # the tensors of parts the source builds without
        model, _ = _bare_model(t.arch, state, path, len(classes))
        _load_exactly(model, state, path, t.arch)
        normalize, mean, std = input_statistics(t.normalize, path, model, dataset_mean, dataset_std)
        teacher = Standardized(model, mean, std, input_size)
        what = f"a state_dict, input standardized with {normalize} statistics (teacher.normalize)"
    order = "" if recorded else "; it records no class names, so its outputs are taken in the data's class order"
    log(f"teacher: {t.arch} from {path}, {what}{order}")
    return teacher, f"model.{head_path(teacher.model)}", normalize, t.arch
