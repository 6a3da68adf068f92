"""kdistill: knowledge distillation for image classification, from an image folder to a deployable student.

    import kdistill
    cfg = kdistill.build_config("seed-nguyen", overrides={"data": "DATA", "out": "runs/exp1"})
    metrics = kdistill.run(cfg)
"""
from .config import Config, build_config
from .errors import KdistillError

__version__ = "0.1.0"


def run(config: Config | dict, log=None, force: bool = False) -> dict:
    """Run an experiment from a Config or a dict of settings; returns the content of metrics.json.
    force: write into an existing out folder that kdistill did not create."""
    from .config import config_from_dict
    from .pipeline import run as run_pipeline

    return run_pipeline(config if isinstance(config, Config) else config_from_dict(config), log, force=force)


__all__ = ["Config", "KdistillError", "build_config", "run"]
