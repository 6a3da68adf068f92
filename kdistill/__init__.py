"""kdistill: knowledge distillation for image classification, from an image folder to a deployable student.

    import kdistill
    cfg = kdistill.build_config("seed-nguyen", overrides={"data": "DATA", "out": "runs/exp1"})
    metrics = kdistill.run(cfg)
"""
from typing import TYPE_CHECKING

from .errors import KdistillError

if TYPE_CHECKING:
    from .config import Config

__version__ = "0.1.0"


def __getattr__(name: str):
    """Config and build_config on first use: `kdistill --help` should not wait for torch to import."""
    if name in ("Config", "build_config"):
        from . import config
        return getattr(config, name)
    raise AttributeError(f"module 'kdistill' has no attribute {name!r}")


def run(config: "Config | dict", log=None, force: bool = False) -> dict:
    """Run an experiment from a Config or a dict of settings; returns the content of metrics.json.
    force: write into an existing out folder that kdistill did not create."""
    from .config import Config, config_from_dict
    from .pipeline import run as run_pipeline

    return run_pipeline(config if isinstance(config, Config) else config_from_dict(config), log, force=force)


__all__ = ["Config", "KdistillError", "build_config", "run"]
