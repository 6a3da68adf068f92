"""Every registered distillation method runs end to end with its defaults, served the signal it
declares: logits and teacher features from the cache (no augmentation: exact)."""
import json
import os

import pytest
from conftest import tiny_settings

import kdistill
from kdistill.config import build_config
from kdistill.distillers import DISTILLERS
from kdistill.errors import KdistillError


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> str:
    """One data cache for every method's run: the images are decoded once."""
    return str(tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize("method", sorted(DISTILLERS))
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
