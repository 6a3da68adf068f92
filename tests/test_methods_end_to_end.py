"""Every registered distillation method runs end to end with its defaults, served the signal it
declares: logits and teacher features from the cache (no augmentation: exact)."""
import json
import os

import pytest
from conftest import tiny_settings

import kdistill
from kdistill.config import build_config
from kdistill.student_plan import METHODS
from kdistill.errors import KdistillError


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> str:
    """One data cache for every method's run: the images are decoded once."""
    return str(tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_a_student_end_to_end(digits_dataset, tmp_path, shared_cache, method):
    settings = tiny_settings(digits_dataset, str(tmp_path / "run"), shared_cache, baseline=False,
                             teacher={"mode": "head", "epochs": 1}, student={"epochs": 1, "lr_step": 0},
                             distill={"method": method})
    metrics = kdistill.run(settings, log=lambda message: None)
    assert metrics["teacher_signal"] == "cached"
    with open(os.path.join(tmp_path, "run", "history", "student.csv")) as f:
        header = f.readline().strip().split(",")
    method_terms = [name for name in header if name.startswith("train_") and name not in
                    ("train_loss", "train_acc", "train_ce")]
    assert method_terms, f"{method} logged no term of its own: {header}"
    student = metrics["models"]["student"]
    assert 0.0 <= student["best_val_acc"] <= 1.0 and student["epochs"] == 1
    with open(os.path.join(tmp_path, "run", "config.yaml")) as f:
        assert f"method: {method}" in f.read()
    with open(os.path.join(tmp_path, "run", "metrics.json")) as f:
        assert json.load(f)["models"]["student"]["best_val_acc"] == student["best_val_acc"]


def test_a_method_reading_teacher_features_takes_a_stored_signal():
    assert build_config(sets=["distill.method=at", "distill.teacher_signal=cached"]).signal_mode() == "cached"
    assert build_config(sets=["distill.method=at", "augment=flip"]).signal_mode() == "views"
    assert build_config(sets=["distill.method=dkd", "augment=flip"]).signal_mode() == "views"


def test_a_module_path_the_model_lacks_fails_in_one_line_naming_it(digits_dataset, tmp_path):
    settings = tiny_settings(digits_dataset, str(tmp_path / "run"), str(tmp_path / "cache"), baseline=False,
                             teacher={"mode": "head", "epochs": 1}, student={"epochs": 1},
                             distill={"method": "fitnets", "fitnets": {"student_layer": "layer9"}})
    with pytest.raises(KdistillError, match="the student has no module 'layer9'.*layer1, layer2"):
        kdistill.run(settings, log=lambda message: None)



def effnet_teacher_settings(data: str, out: str, cache: str, method: str, paths: dict) -> dict:
    settings = tiny_settings(data, out, cache, baseline=False, student={"epochs": 1, "lr_step": 0},
                             distill={"method": method, method: paths})
    settings["teacher"] |= {"arch": "kdistill.zoo:efficientnet_lite0", "mode": "head", "epochs": 1}
    return settings


@pytest.mark.parametrize("method, paths, expected", [
    ("fitnets", {"teacher_layer": "auto"}, ["_blocks.4"]),
    ("at", {"teacher_layers": ["auto"] * 4}, ["_blocks.2", "_blocks.4", "_avg_pooling", "_avg_pooling"]),
])
def test_auto_finds_the_teachers_module_with_the_students_map_size(digits_dataset, tmp_path, shared_cache,
                                                                   method, paths, expected):
    """EfficientNet-Lite0 names its modules _blocks.N: auto picks, per student layer, the block with
    its map size (at 16 px: 4x4 for ResNet18's layer1, 2x2 for layer2, 1x1 for layer3 and layer4),
    and the run trains; config.yaml keeps auto."""
    lines = []
    settings = effnet_teacher_settings(digits_dataset, str(tmp_path / "run"), shared_cache, method, paths)
    metrics = kdistill.run(settings, log=lines.append)
    resolved = [line.split(" is the teacher's ")[1].split()[0] for line in lines
                if line.startswith(f"distill.{method}.teacher_layer")]
    assert resolved == expected
    assert metrics["models"]["student"]["epochs"] == 1
    with open(os.path.join(tmp_path, "run", "config.yaml")) as f:
        assert "auto" in f.read()


def test_a_teacher_path_that_is_not_auto_is_kept_and_checked(digits_dataset, tmp_path, shared_cache):
    settings = effnet_teacher_settings(digits_dataset, str(tmp_path / "run"), shared_cache, "at",
                                       {"teacher_layers": ["auto", "layer9", "auto", "auto"]})
    with pytest.raises(KdistillError, match=r"the teacher has no module 'layer9' .*_blocks.*\(or auto,"):
        kdistill.run(settings, log=lambda message: None)
