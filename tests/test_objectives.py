"""What reaches each model's loss: the label smoothing set for it, whichever model it is."""
import types

import pytest

import kdistill
from kdistill.distillers import base

from conftest import tiny_settings


def test_each_model_trains_with_its_own_label_smoothing(digits_dataset, tmp_path, monkeypatch):
    """The teacher's smoothing reaches the teacher's loss and the student's reaches both the student's
    and the baseline's: the baseline differs from the student by the teacher alone."""
    phase = {"model": None}
    seen: dict[str, set] = {}

    def log(message: str) -> None:
        for model in ("teacher", "student", "baseline"):
            if message.startswith(f"{model}: "):
                phase["model"] = model

    real_cross_entropy = base.F.cross_entropy

    def recording_cross_entropy(*args, **kwargs):  # the training losses' own cross-entropy
        seen.setdefault(phase["model"], set()).add(kwargs.get("label_smoothing", 0.0))
        return real_cross_entropy(*args, **kwargs)

    # Patched in the methods' module only: evaluation's plain val loss is not a training loss.
    monkeypatch.setattr(base, "F", types.SimpleNamespace(cross_entropy=recording_cross_entropy))
    settings = tiny_settings(digits_dataset, str(tmp_path / "run"), str(tmp_path / "cache"),
                             teacher={"arch": "tiny_nets:tiny_teacher", "epochs": 1, "label_smoothing": 0.2},
                             student={"arch": "tiny_nets:tiny_student", "epochs": 1, "label_smoothing": 0.1})
    kdistill.run(settings, log=log)
    assert seen == {"teacher": {0.2}, "student": {0.1}, "baseline": {0.1}}


def test_a_distillers_settings_cannot_be_passed_by_position():
    """CrossEntropy(0.1) once meant temperature 0.1: every setting is keyword-only now."""
    with pytest.raises(TypeError):
        base.CrossEntropy(0.1)
    assert base.CrossEntropy(label_smoothing=0.1).label_smoothing == 0.1
