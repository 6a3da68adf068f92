"""Typed settings in dataclasses: each field carries its one-line description and, where only a
fixed set of values makes sense, those values. Read from YAML (safe, YAML 1.2 booleans) or
--set text, converted to each field's type with one-line errors, and written back as commented YAML.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
from dataclasses import field
from typing import Any

import yaml

from .errors import KdistillError

_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def setting(default: Any, help: str, choices: Any = None, item_kind: type | None = None, *, ge: float | None = None,
            gt: float | None = None, le: float | None = None, lt: float | None = None) -> Any:
    """A field with its description and, for a fixed set of values, the allowed ones (any container).
    A list default is copied per instance; its items' type is item_kind, else that of the default's
    items (whole numbers for an empty default); dict items are mappings of settings that their owner
    checks. ge, gt, le, lt: the bounds of a number (of each item of a list), checked by bound_problem."""
    metadata = {"help": help, "choices": choices, "item_kind": item_kind,
                "bounds": {key: value for key, value in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt))
                           if value is not None}}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _kind(f: dataclasses.Field) -> type:
    """The type of a setting's values: its default's."""
    return type(f.default_factory() if f.default is dataclasses.MISSING else f.default)


def _item_kind(f: dataclasses.Field) -> type:
    """The type of a list setting's items: declared, else its default's, whole numbers for an empty default."""
    if f.metadata.get("item_kind") is not None:
        return f.metadata["item_kind"]
    items = f.default_factory()
    return type(items[0]) if items else int


def _number_text(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _bounds_text(bounds: dict) -> str:
    low = ("[", bounds["ge"]) if "ge" in bounds else ("(", bounds["gt"]) if "gt" in bounds else None
    high = ("]", bounds["le"]) if "le" in bounds else (")", bounds["lt"]) if "lt" in bounds else None
    if low and high:
        return f"in {low[0]}{_number_text(low[1])}, {_number_text(high[1])}{high[0]}"
    if low:
        return f"{'>=' if low[0] == '[' else '>'} {_number_text(low[1])}"
    return f"{'<=' if high[0] == ']' else '<'} {_number_text(high[1])}"


def bound_problem(value: Any, f: dataclasses.Field) -> str | None:
    """'must be ...' where value (a converted number, or list of numbers) is outside f's declared bounds."""
    bounds = f.metadata.get("bounds") or {}
    if not bounds:
        return None
    checks = {"ge": lambda v, b: v >= b, "gt": lambda v, b: v > b, "le": lambda v, b: v <= b, "lt": lambda v, b: v < b}
    values = value if isinstance(value, list) else [value]
    if all(check(v, bounds[key]) for v in values for key, check in checks.items() if key in bounds):
        return None
    return f"must be {_bounds_text(bounds)}{' (each)' if isinstance(value, list) else ''}, got {excerpt(value)}"


def redefault(base: type, name: str, default: Any) -> Any:
    """The field `name` of dataclass `base` with another default; description and choices kept."""
    metadata = dict(base.__dataclass_fields__[name].metadata)
    return setting(default, metadata["help"], metadata["choices"], metadata["item_kind"], **metadata["bounds"])


def section(factory: type, help: str) -> Any:
    return field(default_factory=factory, metadata={"help": help})


def leaves(target: Any, prefix: str = "") -> list[tuple[str, dataclasses.Field, Any]]:
    """Every setting of target (a Config) as (dotted name, field, the object holding it), in order."""
    found = []
    for f in dataclasses.fields(target):
        value = getattr(target, f.name)
        if dataclasses.is_dataclass(value):
            found += leaves(value, f"{prefix}{f.name}.")
        else:
            found.append((f"{prefix}{f.name}", f, target))
    return found


# A settings file is a few KB and a few levels deep. Past these bounds a file is refused in one line
# rather than read: anchors and aliases let a 300-byte file expand to gigabytes (or to itself).
MAX_SETTINGS_BYTES = 1 << 20
MAX_SETTINGS_DEPTH = 32
EXCERPT_CHARS = 80


def excerpt(value: Any) -> str:
    """value's repr, cut short: an error message names a value, it never quotes a whole file."""
    text = repr(value)
    return text if len(text) <= EXCERPT_CHARS else f"{text[:EXCERPT_CHARS - 3]}..."


class _Refused(yaml.YAMLError):
    """YAML that kdistill does not read: anchors and aliases, or nesting deeper than settings go."""


class _SettingsLoader(yaml.SafeLoader):
    """The safe loader with YAML 1.2's booleans: only true and false. YAML 1.1 also reads an unquoted
    yes/no/on/off as a boolean, which would turn `augment: no` into False; here it stays the text no
    (and a boolean setting still accepts yes/no/on/off, see _as_kind).

    It refuses anchors and aliases (a settings file has no use for them; expanded, they are unbounded
    or recursive) and nesting past MAX_SETTINGS_DEPTH (the composer recurses once per level)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        line = event.start_mark.line + 1
        if event.anchor is not None:
            sign = "*" if isinstance(event, yaml.AliasEvent) else "&"
            raise _Refused(f"it uses the YAML {'alias' if sign == '*' else 'anchor'} {sign}{event.anchor[:40]} "
                           f"(line {line}); kdistill settings files do not use anchors and aliases, write the "
                           f"values out")
        if self.depth >= MAX_SETTINGS_DEPTH:
            raise _Refused(f"it nests values more than {MAX_SETTINGS_DEPTH} levels deep (line {line})")
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


_BOOL_TAG = "tag:yaml.org,2002:bool"


_SettingsLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}


_SettingsLoader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                      list("tTfF"))


def parse_yaml(text: str, what: str) -> dict:
    """The settings written in YAML text (never code: the safe loader refuses python tags)."""
    try:
        loaded = yaml.load(text, Loader=_SettingsLoader)
    except _Refused as e:
        raise KdistillError(f"{what} is refused: {e}") from None
    except yaml.YAMLError as e:
        raise KdistillError(f"{what} is not valid YAML: {str(e).splitlines()[0][:200]}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise KdistillError(f"{what} must be a mapping of settings, got {type(loaded).__name__}")
    return loaded


def read_yaml(path: str, what: str) -> dict:
    """The settings in the YAML file at path: every settings file kdistill reads comes through here."""
    if not os.path.exists(path):
        raise KdistillError(f"{what} does not exist")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SETTINGS_BYTES + 1)  # never more: the path may be a huge file or a device
    except OSError as e:
        raise KdistillError(f"cannot read {what}: {e.strerror}") from None
    if len(data) > MAX_SETTINGS_BYTES:
        raise KdistillError(f"{what} is larger than {MAX_SETTINGS_BYTES >> 20} MiB: not a kdistill settings file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise KdistillError(f"{what} is not UTF-8 text") from None
    return parse_yaml(text, what)


def _number(value: Any) -> float | None:
    try:
        return float(value.strip() if isinstance(value, str) else value)  # 1e-4, 1E-3, 3., .5, 1_000
    except (ValueError, OverflowError):
        return None


def _as_kind(value: Any, kind: type, item_kind: type = int) -> Any:
    """value (typed by YAML or Python, or the text of a --set) read as kind (a list: of item_kind);
    None if it has no such reading."""
    if kind is list:  # a YAML list, or text such as 0,1,2 or [0.35, 1]
        if isinstance(value, str) and item_kind is dict:  # --set text of mappings: YAML's [{arch: resnet18}]
            try:
                value = yaml.load(value, Loader=_SettingsLoader)
            except yaml.YAMLError:
                return None
        if isinstance(value, str):
            text = value.strip().removeprefix("[").removesuffix("]")
            # Items as typed, without the spaces and quotes around them: "layer1, 'layer2'".
            value = [item.strip().strip("'\"") for item in text.split(",")] if text.strip() else []
        if not isinstance(value, (list, tuple)):
            return None
        items = [_as_kind(item, item_kind) for item in value]
        return None if None in items else items
    if kind is dict:
        return value if isinstance(value, dict) else None
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower() if isinstance(value, (str, int)) else None
        return True if text in _TRUE else False if text in _FALSE else None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None  # a boolean is neither a number nor a text here
    if kind is str:
        return value if isinstance(value, str) else str(value)
    if kind is int:
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())  # exact for big numbers; "1_000" included
            except ValueError:
                pass
        number = _number(value)
        return int(number) if number is not None and number.is_integer() else None  # 10.0 is 10
    number = _number(value)
    return number if number is not None and math.isfinite(number) else None


def _expected(f: dataclasses.Field) -> str:
    choices = f.metadata.get("choices")
    if choices is not None:
        return f"one of {', '.join(choices)}"
    kind = _kind(f)
    if kind is list and _item_kind(f) is dict:
        return "a list of mappings of settings, e.g. [{arch: resnet18, epochs: 3}]"
    if kind is list and _item_kind(f) is str:
        return "a list of names, e.g. [tensorboard]"
    if kind is list:
        return ("a list of whole numbers, e.g. [0, 1, 2] or 0,1,2" if _item_kind(f) is int
                else "a list of numbers, e.g. [0.35, 1] or 0.35,1")
    return {bool: "true or false (or yes/no, on/off, 1/0)", int: "a whole number",
            float: "a finite number", str: "text"}[kind]


def convert(key: str, value: Any, f: dataclasses.Field) -> Any:
    """value as field f's type, and one of its allowed values where it has a fixed set."""
    converted = _as_kind(value, _kind(f), _item_kind(f) if _kind(f) is list else int)
    choices = f.metadata.get("choices")
    if converted is None or (choices is not None and converted not in choices):
        raise KdistillError(f"setting {key} must be {_expected(f)}, got {excerpt(value)}")
    return converted


def apply_settings(target: Any, updates: dict, prefix: str = "") -> None:
    fields = {f.name: f for f in dataclasses.fields(target)}
    for key, value in updates.items():
        name = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            raise KdistillError(f"unknown setting {excerpt(name)}" + (f" (did you mean {prefix}{close[0]}?)"
                                                                        if close else ""))
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise KdistillError(f"setting {name} must be a mapping of settings")
            apply_settings(current, value, prefix=f"{name}.")
        else:
            setattr(target, key, convert(name, value, fields[key]))


def parse_set(assignments: list[str]) -> dict:
    """--set a.b=value pairs as one nested dict. Values stay text, read later as their setting's type:
    YAML would read 1e-4 as text and no as False."""
    nested: dict = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise KdistillError(f"--set expects key=value, got {item!r}")
        node = nested
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1], 1):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise KdistillError(f"setting {'.'.join(parts[:depth])} must be a mapping of settings")
        node[parts[-1]] = raw
    return nested


def render_config(cfg: Any) -> str:
    """The settings as YAML, each followed by its description as a comment: a valid --config file."""
    lines = ["# kdistill settings, fully resolved (usable as --config FILE)"]

    def add(target: Any, indent: str) -> None:
        for f in dataclasses.fields(target):
            value = getattr(target, f.name)
            comment = f"  # {f.metadata['help']}"
            if dataclasses.is_dataclass(value):
                lines.append(f"{indent}{f.name}:{comment}")
                add(value, indent + "  ")
                continue
            entry = yaml.safe_dump({f.name: value}, width=math.inf, allow_unicode=True).rstrip("\n")
            if "\n" in entry:  # a text with line breaks, or a list: JSON's one-line form is valid YAML too
                entry = f"{f.name}: {json.dumps(value)}"
            lines.append(f"{indent}{entry}{comment}")

    add(cfg, "")
    return "\n".join(lines) + "\n"
