"""A student file whose fields are damaged or odd is refused in one line naming it, not a traceback."""
import json

import pytest
import torch

from kdistill.cli import main
from kdistill.export import load_bundle, save_bundle
from kdistill.fileio import load_torch, save_torch
from kdistill.models import Standardized, build_model

CLASSES = ["cat", "dog", "fox"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    path = tmp_path_factory.mktemp("bundle") / "student.pt"
    torch.manual_seed(0)
    model, _ = build_model("resnet18", len(CLASSES))
    save_bundle(str(path), Standardized(model, [0.5] * 3, [0.25] * 3).eval(), "resnet18", 0.0, CLASSES, 16, "dataset")
    return load_torch(str(path))


@pytest.mark.parametrize("field, value", [
    ("classes", "cat,dog,fox"), ("classes", []), ("classes", ["cat", 1, "fox"]), ("classes", ["cat", "cat", "fox"]),
    ("image_size", True), ("image_size", 10**9), ("image_size", "16"), ("mean", [0.5, 0.5]),
    ("std", [0.25, 0.0, 0.25]), ("std", [float("nan")] * 3), ("dropout", 2.0), ("input_size", -3),
    ("arch", 17), ("state_dict", [1, 2]),
])
def test_a_bundle_with_a_damaged_field_is_one_line(bundle, tmp_path, capsys, field, value):
    damaged = dict(bundle, **{field: value})
    path = tmp_path / "student.pt"
    save_torch(damaged, str(path))
    images = tmp_path / "images"
    images.mkdir()
    assert main(["predict", "--run", str(path), "--images", str(images)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "student.pt" in error and field in error, error


def test_a_sound_bundle_still_loads(bundle, tmp_path):
    path = tmp_path / "student.pt"
    save_torch(bundle, str(path))
    model, description = load_bundle(str(path))
    assert description["classes"] == CLASSES and model(torch.rand(1, 3, 16, 16)).shape == (1, 3)
    assert json.dumps(description["mean"])
