"""The whole run's time left in the training bar (run_clock.RunClock)."""
import re
from types import SimpleNamespace

import pytest

import kdistill
import kdistill.progress
from conftest import tiny_settings
from kdistill.run_clock import RunClock, Stage


def fit_state(name: str, history=()):
    return SimpleNamespace(session=SimpleNamespace(name=name), history=list(history))


def test_later_models_are_timed_per_image_by_a_model_that_computes_like_them():
    clock = RunClock([Stage("teacher", 2, 100, "teacher"), Stage("student", 3, 150, "student"),
                      Stage("baseline", 4, 100, "student")])
    clock.on_epoch_end(fit_state("teacher"), {"seconds": 10.0})
    assert clock.after("teacher") is None and clock.bar_text("teacher", 10.0) == ""  # no student epoch yet
    clock.on_epoch_end(fit_state("student"), {"seconds": 30.0})  # 0.2 s per image
    assert clock.after("student") == pytest.approx(0.2 * 100 * 4)  # the baseline: fewer images per epoch
    assert clock.after("teacher") == pytest.approx(0.2 * 150 * 3 + 0.2 * 100 * 4)
    assert clock.after("baseline") is None and clock.bar_text("baseline", 5.0) == ""  # nothing after it
    assert clock.bar_text("student", 60.0) == ", run about 2 min left"  # 60 s + 80 s
    clock.on_epoch_end(fit_state("student"), {"seconds": 60.0})  # the mean of both: 0.3 s per image
    assert clock.after("student") == pytest.approx(0.3 * 100 * 4)


def test_a_resumed_model_counts_the_epochs_it_trained_before():
    clock = RunClock([Stage("student-seed0", 3, 10, "student"), Stage("student-seed1", 3, 10, "student")])
    clock.on_fit_start(fit_state("student-seed0", [{"epoch": 1, "seconds": 4.0}, {"epoch": 2, "seconds": 6.0}]))
    assert clock.after("student-seed0") == pytest.approx(0.5 * 10 * 3)
    clock.on_fit_start(fit_state("unplanned", [{"epoch": 1, "seconds": 100.0}]))  # not in the plan: ignored
    assert clock.after("student-seed0") == pytest.approx(15.0)


def test_a_runs_bars_show_the_runs_time_left_once_the_models_after_it_have_a_stand_in(digits_dataset, tmp_path,
                                                                                        capsys, monkeypatch):
    monkeypatch.setattr(kdistill.progress, "show_progress", lambda: True)
    kdistill.run(tiny_settings(digits_dataset, str(tmp_path / "run"), str(tmp_path / "cache"),
                               teacher={"arch": "tiny_nets:tiny_teacher", "epochs": 2},
                               student={"arch": "tiny_nets:tiny_student", "epochs": 2}), log=lambda message: None)
    err = capsys.readouterr().err
    assert re.search(r"student epoch 2/2, about \d+ s left, run about \d+ s left", err)  # the baseline follows
    assert not re.search(r"teacher epoch \d/2[^\r\n]*run about", err)  # no student epoch timed yet
    assert re.search(r"baseline epoch 2/2, about \d+ s left", err) and not re.search(r"baseline[^\r\n]*run about", err)
