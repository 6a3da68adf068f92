"""A schedule counted in optimizer steps: epochs follow from the data's size."""
import pytest
import yaml

import kdistill
from kdistill.config import build_config
from kdistill.steps import resolve_steps
from kdistill.errors import KdistillError

from conftest import tiny_settings


def test_steps_make_the_fewest_whole_epochs_that_reach_them():
    cfg = build_config(overrides={"teacher": {"steps": 100, "batch_size": 32, "warmup_epochs": 0},
                                  "student": {"steps": 600, "batch_size": 32, "epochs": 7},
                                  "ensemble": [{"batch_size": 16}, {"arch": "resnet18"}]})
    resolved = resolve_steps(cfg, train_images=244, transfer_images=0)
    # 244 images: 8 batches of 32 per epoch (the last one short), so 600 steps take 75 epochs.
    assert resolved.student.epochs == 75 and resolved.teacher.epochs == 13
    members = list(resolved.teachers().values())
    assert members[1].epochs == 7 and members[2].epochs == 13  # 16 batches of 16; the teacher's own
    assert resolve_steps(cfg, 244, 56).student.epochs == 60  # the transfer set joins the student's epochs
    assert resolve_steps(build_config(), 244, 0).student.epochs == build_config().student.epochs  # steps 0


def test_a_warmup_longer_than_the_steps_make_is_refused_naming_it():
    cfg = build_config(overrides={"student": {"steps": 10, "batch_size": 32, "warmup_epochs": 2,
                                              "schedule": "cosine"}})
    with pytest.raises(KdistillError, match=r"setting student.warmup_epochs must be below the 2 epochs that "
                                            r"student.steps=10 makes on 244 training images, got 2"):
        resolve_steps(cfg, 244, 0)


def test_a_run_trains_and_saves_the_epochs_its_steps_make(digits_dataset, tmp_path):
    lines = []
    metrics = kdistill.run(tiny_settings(digits_dataset, str(tmp_path / "run"), str(tmp_path / "cache"),
                                         teacher={"arch": "tiny_nets:tiny_teacher", "epochs": 1},
                                         student={"arch": "tiny_nets:tiny_student", "steps": 12}), log=lines.append)
    # 72 training images in batches of 16: 5 steps per epoch, so 12 steps take 3 epochs.
    assert metrics["models"]["student"]["epochs"] == 3 == metrics["models"]["baseline"]["epochs"]
    assert "student: 12 steps of batch 16 make 3 epochs on this data" in lines
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["student"]["steps"] == 12 and saved["student"]["epochs"] == 3


def test_with_a_transfer_set_the_baseline_gets_the_students_steps_on_its_own_images(digits_dataset, tmp_path):
    lines = []
    metrics = kdistill.run(tiny_settings(digits_dataset, str(tmp_path / "run"), str(tmp_path / "cache"),
                                         teacher={"arch": "tiny_nets:tiny_teacher", "epochs": 1},
                                         student={"arch": "tiny_nets:tiny_student", "steps": 12},
                                         distill={"unlabeled": "test"}), log=lines.append)
    # The student: 72 labelled + 10 teacher-labelled images, 6 batches of 16 an epoch: 2 epochs, 12 steps.
    # The baseline: the 72 labelled images alone, 5 batches an epoch: 3 epochs, 15 steps (not 2 epochs, 10).
    assert metrics["models"]["student"]["epochs"] == 2 and metrics["models"]["baseline"]["epochs"] == 3
    assert ("baseline: 12 steps of batch 16 make 3 epochs on the 72 labelled training images (the student's 2 "
            "include the images the teacher labels)") in lines
