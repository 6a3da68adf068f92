"""The built-in presets' names, read without importing torch (the command line's --help needs them)."""
from __future__ import annotations

import importlib.resources


def preset_names() -> list[str]:
    files = importlib.resources.files("kdistill") / "presets"
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".yaml"))
