"""Several teachers: the student learns from the weighted average of their softened probabilities,
served as logits T * log(p); each teacher is trained once."""
import math
import os

import pytest
import torch
from conftest import tiny_settings

import kdistill
from kdistill.config import build_config
from kdistill.ensemble import combined_logits
from kdistill.errors import KdistillError
from kdistill.fileio import load_torch
from kdistill.models import standardized_model
from kdistill.report import SIGNALS

TINY = {"teacher": {"arch": "tiny_nets:tiny_teacher", "epochs": 1},
        "student": {"arch": "tiny_nets:tiny_student", "epochs": 1, "lr_step": 0}}


def test_softmax_of_the_served_logits_at_t_is_the_weighted_average_of_the_softened_probabilities():
    temperature, weights = 3.0, [0.2, 0.0, 0.8]
    logits = [[[1.0, -2.0, 0.5], [30.0, -40.0, 5.0]], [[0.0, 9.0, 1.0], [2.0, 2.0, 2.0]],
              [[-1.0, 0.0, 4.0], [-60.0, 10.0, 0.0]]]
    served = combined_logits([torch.tensor(z) for z in logits], weights, temperature)
    for row in range(2):
        expected = [0.0, 0.0, 0.0]  # p = sum_k w_k softmax(z_k / T), by hand
        for weight, z in zip(weights, logits):
            exps = [math.exp(value / temperature) for value in z[row]]
            for c in range(3):
                expected[c] += weight * exps[c] / sum(exps)
        back = torch.softmax(served[row] / temperature, 0).tolist()
        assert back == pytest.approx(expected, rel=1e-6, abs=1e-12)
        # T * log(p) itself: its probabilities sum to 1, so no constant is lost
        assert served[row].tolist() == pytest.approx([temperature * math.log(p) for p in expected], rel=1e-5)


@pytest.mark.parametrize("weights, message", [
    ("[1, 2, 3]", "must give one weight per teacher \\(2: teacher, then the ensemble's\\), got 3"),
    ("[1, -1]", "must be >= 0 \\(each\\), got \\[1.0, -1.0\\]"),
    ("[0, 0]", "must not all be zero"),
])
def test_bad_ensemble_weights_fail_in_one_line_naming_the_setting(weights, message):
    with pytest.raises(KdistillError, match=f"^setting distill.ensemble_weights {message}") as error:
        build_config(sets=["ensemble=[{arch: resnet18}]", f"distill.ensemble_weights={weights}"])
    assert "\n" not in str(error.value)


def test_ensemble_members_are_teacher_sections_checked_up_front():
    cfg = build_config(sets=["teacher.lr=0.01", "ensemble=[{arch: resnet18, epochs: '3'}, {mode: full}]"])
    assert cfg.ensemble == [{"arch": "resnet18", "epochs": 3}, {"mode": "full"}]
    members = cfg.teachers()
    assert list(members) == ["teacher", "teacher-2", "teacher-3"]
    assert (members["teacher-2"].arch, members["teacher-2"].epochs, members["teacher-2"].lr) == ("resnet18", 3, 0.01)
    assert (members["teacher-3"].arch, members["teacher-3"].mode) == ("resnet34", "full")
    assert cfg.teacher_weights() == [1 / 3] * 3
    for sets, message in [(["ensemble=[{epochs: 0}]"], "setting ensemble\\[0\\].epochs may be 0 .* only with "
                                                        "ensemble\\[0\\].weights a file"),
                          (["ensemble=[{epochs: -1}]"], "setting ensemble\\[0\\].epochs must be >= 0"),
                          (["ensemble=[{colour: red}]"], "unknown setting 'ensemble\\[0\\].colour'"),
                          (["ensemble=[{arch: resnet18}]", "distill.method=fitnets"],
                           "setting ensemble cannot be used with distill.method fitnets: it reads one teacher's "
                           "features")]:
        with pytest.raises(KdistillError, match=message):
            build_config(sets=sets)


def record_student_batches(monkeypatch):
    """Every batch the student trains on: (input, teacher logits); and the student's val batches."""
    from kdistill import pipeline

    seen = {"train": [], "val": None}
    real_fit = pipeline.fit

    def recording_fit(name, model, trainable, train, val, *args, **kwargs):
        if name == "student":
            real_iterate = train.iterate
            seen["val"] = val

            def iterate(*iterate_args, **iterate_kwargs):
                for batch in real_iterate(*iterate_args, **iterate_kwargs):
                    seen["train"].append((batch.x.clone(), batch.teacher.logits.clone()))
                    yield batch
            train.iterate = iterate
        return real_fit(name, model, trainable, train, val, *args, **kwargs)
    monkeypatch.setattr(pipeline, "fit", recording_fit)
    return seen


def saved_teacher(out: str, name: str) -> torch.nn.Module:
    model, _, _ = standardized_model("tiny_nets:tiny_teacher", 3, 0.0, "none", "dataset", [0.0] * 3, [1.0] * 3)
    model.load_state_dict(load_torch(os.path.join(out, "models", f"{name}.pt")))
    return model.eval()


def by_hand(models, weights, temperature, x) -> torch.Tensor:
    """T * log(sum_k w_k softmax(z_k / T)), written plainly (no log space)."""
    with torch.no_grad():
        p = sum(weight * torch.softmax(model(x) / temperature, 1) for model, weight in zip(models, weights))
    return temperature * torch.log(p)


@pytest.mark.parametrize("augment, signal", [("none", "cached"), ("crop_flip", "online")])
def test_the_student_learns_from_the_weighted_average_of_two_saved_teachers(digits_dataset, tmp_path, monkeypatch,
                                                                          augment, signal):
    seen = record_student_batches(monkeypatch)
    out = str(tmp_path / "run")
    settings = tiny_settings(digits_dataset, out, str(tmp_path / "cache"), baseline=False, augment=augment, **TINY,
                             ensemble=[{"mode": "full", "epochs": 2, "lr": 0.01}],
                             distill={"ensemble_weights": [1.0, 3.0], "temperature": 2.0,
                                      "teacher_signal": "auto" if signal == "cached" else signal})
    messages = []
    metrics = kdistill.run(settings, log=messages.append)
    assert metrics["teacher_signal"] == signal
    assert {"teacher", "teacher-2", "student"} == set(metrics["models"])
    assert metrics["models"]["teacher"]["epochs"] == 1 and metrics["models"]["teacher-2"]["epochs"] == 2
    teachers = [saved_teacher(out, "teacher"), saved_teacher(out, "teacher-2")]
    assert len(seen["train"]) == 5  # 72 images in batches of 16
    for x, teacher_logits in seen["train"]:
        torch.testing.assert_close(teacher_logits, by_hand(teachers, [0.25, 0.75], 2.0, x), rtol=1e-4, atol=1e-4)
    # The ensemble's val accuracy: the argmax of the combined probabilities on the val images.
    val = [(x, labels) for x, labels, *_ in seen["val"].iterate(16, torch.device("cpu"))]
    right = sum(int((by_hand(teachers, [0.25, 0.75], 2.0, x).argmax(1) == labels).sum()) for x, labels in val)
    assert metrics["ensemble"] == {"teachers": ["teacher", "teacher-2"], "weights": [0.25, 0.75],
                                   "temperature": 2.0, "val_acc": pytest.approx(right / 24)}
    with open(os.path.join(out, "report.md")) as f:
        report = f.read()
    assert (f"Ensemble of 2 teachers, teacher (weight 0.25), teacher-2 (weight 0.75): the student learned from the "
            f"weighted average of their probabilities at T=2.0, whose argmax scores {right / 24:.2%}") in report
    assert "| teacher-2 | tiny_nets:tiny_teacher |" in report
    assert os.path.exists(os.path.join(out, "checkpoints", "teacher-2", "best.pt"))
    assert f"teacher signal {signal} ({SIGNALS[signal]}; {metrics['teacher_signal_reason']})" in report
    if signal == "online":
        assert any("teacher signal: online, the teachers run on every training batch (distill.teacher_signal" in m
                   for m in messages)
        return
    # A rerun in the same folder trains no teacher again: each one's finished checkpoints are loaded.
    messages.clear()
    again = kdistill.run(settings, log=messages.append)
    assert not [m for m in messages if m.startswith(("teacher epoch", "teacher-2 epoch"))], messages
    assert any(m.startswith("teacher logits: reusing") for m in messages)
    assert again["ensemble"] == metrics["ensemble"]
