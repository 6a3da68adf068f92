import os
import shutil

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")
CIFAR = os.path.join(SHARED_DATA, "cifar10-seedlike")
HYMENOPTERA = os.path.join(SHARED_DATA, "hymenoptera")


def copy_slice(source: str, target: str, classes: list[str], per_class: dict[str, int], test: int) -> str:
    """A small dataset in the seed layout made of the first files of each class of a shared dataset."""
    for split, count in per_class.items():
        for name in classes:
            os.makedirs(os.path.join(target, split, name))
            for file in sorted(os.listdir(os.path.join(source, split, name)))[:count]:
                shutil.copy(os.path.join(source, split, name, file), os.path.join(target, split, name, file))
    if test:
        os.makedirs(os.path.join(target, "test"))
        for file in sorted(os.listdir(os.path.join(source, "test")))[:test]:
            shutil.copy(os.path.join(source, "test", file), os.path.join(target, "test", file))
    return target


@pytest.fixture(scope="session")
def cifar_slice(tmp_path_factory):
    """3 CIFAR-10 classes, 24 train + 8 val images each, 10 unlabelled test images."""
    return copy_slice(CIFAR, str(tmp_path_factory.mktemp("cifar") / "data"), ["airplane", "cat", "ship"],
                      {"train": 24, "val": 8}, test=10)


def tiny_settings(data: str, out: str, cache: str, **extra) -> dict:
    """Settings for a run that takes seconds: 16 px, few epochs, small batches."""
    settings = {
        "data": data, "out": out, "cache_dir": cache, "image_size": 16, "seed": 0, "device": "cpu",
        "workers": 1,
        "teacher": {"arch": "resnet18", "weights": "none", "mode": "full", "epochs": 2, "batch_size": 16},
        "student": {"arch": "resnet18", "weights": "none", "epochs": 3, "batch_size": 16, "lr_step": 2},
        "distill": {"method": "kd", "temperature": 4.0, "alpha": 0.7},
    }
    for key, value in extra.items():
        if isinstance(value, dict):
            settings[key].update(value)
        else:
            settings[key] = value
    return settings
