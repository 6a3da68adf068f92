"""Where models come from: one ModelSource per library, picked by the architecture's prefix.

An architecture is `NAME` (torchvision), `timm:NAME` (timm, `hf-hub:` names included) or
`module:callable` (any importable function returning an nn.Module, with optional literal keyword
arguments: `mymodels:net(width=2)`). A new source is one file defining a ModelSource plus one line
in PREFIXED below.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from . import callables, timm_models, torchvision_models


@dataclass(frozen=True)
class ModelSource:
    describe: str  # what a name of this source looks like, for error messages
    problem: Callable[[str, int], str | None]  # (name, image size) -> why it can't be built, or None; builds nothing
    build: Callable[[str, bool], nn.Module]  # (name, pretrained) -> the classifier with its own head
    trusted: Callable[[str], bool]  # building it runs only the library's code (a received bundle may name it)
    adapt_state: Callable[[str, dict], dict] = lambda name, state: state  # a weights file's tensors, for build's model


TORCHVISION = ModelSource("a torchvision classification model name such as resnet18", torchvision_models.problem,
                          torchvision_models.build, lambda name: True, torchvision_models.adapt_state)
CALLABLE = ModelSource("module:callable, optionally with keyword arguments (mymodels:net(width=2))",
                       callables.problem, callables.build, callables.trusted)
# prefix -> source; an architecture with any other prefix is a module:callable.
PREFIXED = {
    "timm": ModelSource("timm:NAME, any timm.create_model name (hf-hub:ORG/NAME included)", timm_models.problem,
                        timm_models.build, lambda name: True),
}


def source_of(arch: str) -> tuple[ModelSource, str]:
    """The source of an architecture and the name it knows it by."""
    prefix, sep, name = arch.partition(":")
    if not sep:
        return TORCHVISION, arch
    if prefix in PREFIXED:
        return PREFIXED[prefix], name
    return CALLABLE, arch
