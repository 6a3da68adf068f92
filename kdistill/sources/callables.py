"""`module:callable`: any importable function returning an nn.Module, optionally called with literal
keyword arguments (`mymodels:net(width=2, pretrained=False)`). The working directory is importable,
as with `python -m`, so a `mymodels.py` beside the data works with the `kdistill` command too.

Importing runs that module's code: a config naming one is code you run (see docs/safety.md)."""
from __future__ import annotations

import ast
import importlib
import os
import re
import sys

from torch import nn

from ..errors import KdistillError

CALL = re.compile(r"^(?P<module>[\w.]+):(?P<attr>\w+)(?:\((?P<arguments>.*)\))?$", re.S)
TRUSTED_MODULES = ("kdistill.zoo",)  # kdistill's own callables: a received bundle may name them


def parse(arch: str) -> tuple[str, str, dict]:
    """(module, callable, keyword arguments) of `module:callable` or `module:callable(k=v, ...)`."""
    match = CALL.match(arch.strip())
    if not match:
        raise ValueError("expected module:callable or module:callable(key=value, ...)")
    keywords = {}
    if match["arguments"] and match["arguments"].strip():
        try:
            call = ast.parse(f"f({match['arguments']})", mode="eval").body
        except SyntaxError:
            raise ValueError(f"cannot read the arguments ({match['arguments']})") from None
        if not isinstance(call, ast.Call) or call.args or any(k.arg is None for k in call.keywords):
            raise ValueError("arguments must be key=value pairs")
        try:
            keywords = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
        except ValueError:
            raise ValueError("argument values must be literals (numbers, strings, lists, True/False/None)") from None
    return match["module"], match["attr"], keywords


def _import(module_name: str):
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())  # after installed packages: a local file never shadows one
    return importlib.import_module(module_name)


def problem(arch: str, image_size: int) -> str | None:
    try:
        module_name, attr, _ = parse(arch)
    except ValueError as e:
        return str(e)
    try:
        module = _import(module_name)
    except ImportError as e:
        return f"cannot import module {module_name!r} ({e})"
    if not callable(getattr(module, attr, None)):
        return f"{module_name} has no callable {attr!r}"
    return None


def build(arch: str, pretrained: bool) -> nn.Module:
    if pretrained:
        raise KdistillError(f"{arch} is a module:callable: it returns its own weights (set weights to none or "
                            f"to a weights file)")
    module_name, attr, keywords = parse(arch)
    try:
        model = getattr(_import(module_name), attr)(**keywords)
    except TypeError as e:
        raise KdistillError(f"{arch} cannot be called with {keywords or 'no arguments'} ({e})") from None
    if not isinstance(model, nn.Module):
        raise KdistillError(f"{arch} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def trusted(arch: str) -> bool:
    return arch.partition(":")[0] in TRUSTED_MODULES
