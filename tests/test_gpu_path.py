"""The CUDA code path, run on the CPU: no GPU is needed to know that a dataset resident on the
device, channels_last batches and models, and bf16 autocast train, predict and export correctly."""
import functools

import torch

import kdistill
from conftest import tiny_settings
from kdistill import pipeline, train
from kdistill.config import config_from_dict
from kdistill.data import prepare

CPU = torch.device("cpu")


def test_device_resident_channels_last_batches_equal_the_memory_mapped_ones(digits_dataset, tmp_path):
    cfg = config_from_dict(tiny_settings(digits_dataset, str(tmp_path / "run"), str(tmp_path / "cache")))
    data = prepare(digits_dataset, 16, cfg.cache_dir, workers=1, log=lambda m: None)
    mapped = pipeline.ImageBatcher(data, cfg, CPU)
    resident = pipeline.ImageBatcher(data, cfg, CPU, resident=True, channels_last=True)
    assert resident.resident and not mapped.resident
    for (x, y, *_), (x_gpu_path, y_gpu_path, *_) in zip(mapped("val").iterate(5, CPU), resident("val").iterate(5, CPU)):
        assert x_gpu_path.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(x, x_gpu_path) and torch.equal(y, y_gpu_path)


def test_a_whole_run_on_the_gpu_code_path(digits_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "ImageBatcher",
                        functools.partial(pipeline.ImageBatcher, resident=True, channels_last=True))
    autocasts = []
    real_autocast = train.autocast

    def recording_autocast(device, precision):
        autocasts.append(precision)
        return real_autocast(device, precision)
    monkeypatch.setattr(train, "autocast", recording_autocast)
    settings = tiny_settings(digits_dataset, str(tmp_path / "run"), str(tmp_path / "cache"), augment="flip",
                             precision="bf16", teacher={"mode": "head", "epochs": 2}, student={"epochs": 2})
    metrics = kdistill.run(settings, log=lambda m: None)
    assert autocasts and set(autocasts) == {"bf16"} and metrics["precision"] == "bf16"
    assert metrics["teacher_signal"] == "views"
    for model in metrics["models"].values():
        assert 0 <= model["best_val_acc"] <= 1 and model["epochs"] == 2
    assert metrics["onnx_max_abs_diff"] < 1e-3  # the export is float32 whatever the training precision
