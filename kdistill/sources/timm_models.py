"""timm's models: `timm:NAME` is timm.create_model(NAME), `hf-hub:ORG/NAME` included; `imagenet`
weights are the name's pretrained weights (timm's default tag), downloaded by timm from the
Hugging Face hub. timm is an optional extra: pip install 'kdistill[timm]'."""
from __future__ import annotations

from torch import nn

from ..errors import KdistillError, printable

HF_HUB = "hf-hub:"
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _timm():
    try:
        import timm
    except ImportError:
        raise KdistillError("timm: architectures need the timm package: pip install 'kdistill[timm]'") from None
    return timm


def problem(name: str, image_size: int) -> str | None:
    timm = _timm()
    if name.startswith(HF_HUB) or timm.is_model(name):
        return None
    close = timm.list_models(f"*{name[:6]}*")[:3] if name else []
    return f"timm has no model {name!r}" + (f" (did you mean {', '.join(close)}?)" if close else "")


def _offline_error(name: str, error: Exception) -> KdistillError:
    timm = _timm()
    repository = name.removeprefix(HF_HUB) if name.startswith(HF_HUB) else None
    if repository is None:
        try:
            repository = timm.models.get_pretrained_cfg(name).hf_hub_id or None
        except Exception:  # a name without a pretrained config: say what we can
            repository = None
    where = (f"https://huggingface.co/{repository} (its model.safetensors)" if repository else
             "timm's pretrained weights for it")
    reason = printable(str(error).strip().splitlines()[0][:160]) if str(error).strip() else type(error).__name__
    return KdistillError(f"could not get timm's weights for {name} ({reason}); this machine looks offline. "
                         f"Download {where} elsewhere and pass weights=/path/to/model.safetensors, or set "
                         f"HF_HOME to a folder holding the Hugging Face cache")


def build(name: str, pretrained: bool) -> nn.Module:
    timm = _timm()
    try:
        model = timm.create_model(name, pretrained=pretrained)
    except (OSError, ValueError, RuntimeError) as e:
        # huggingface_hub's offline and HTTP errors are OSErrors or ValueErrors; a missing file a RuntimeError.
        if pretrained or name.startswith(HF_HUB):
            raise _offline_error(name, e) from None
        raise
    if pretrained:
        config = getattr(model, "pretrained_cfg", {}) or {}
        mean_std = (tuple(config.get("mean", ())), tuple(config.get("std", ())))
        # The statistics the weights were trained with (models.input_statistics reads this).
        model.input_normalization = "imagenet" if mean_std == IMAGENET_MEAN_STD or not all(mean_std) else mean_std
    return model
