"""Progressive resizing: early epochs train on smaller views, evaluation always sees the whole side,
the student and the baseline share the schedule, and a resumed run trains as an unbroken one."""
import csv
import os

import pytest
import torch
from torch import nn

import kdistill
from conftest import tiny_settings
from kdistill.batches import Batches
from kdistill.callbacks import Session
from kdistill.config import TrainConfig, build_config
from kdistill.distillers import CrossEntropy
from kdistill.errors import KdistillError
from kdistill.fileio import load_torch
from kdistill.models import Standardized, scaled_side
from kdistill.progressive import scale_at
from kdistill.train import fit

CPU = torch.device("cpu")


def test_the_share_of_the_side_grows_linearly_and_is_whole_from_the_set_share_of_the_epochs():
    assert [scale_at(epoch, 10, 0.5, 0.5) for epoch in range(1, 11)] == pytest.approx(
        [0.5, 0.625, 0.75, 0.875] + [1.0] * 6)
    assert [scale_at(epoch, 3, 0.25, 1.0) for epoch in (1, 2, 3)] == pytest.approx([0.25, 0.625, 1.0])
    assert scale_at(1, 1, 0.5, 0.75) == 1.0  # a one-epoch run trains whole
    assert [scaled_side(128, share) for share in (0.5, 0.6, 0.75, 1.0)] == [64, 80, 96, 128]
    assert scaled_side(16, 0.1) == 8 and scaled_side(16, 1.0) == 16


def test_a_model_resizes_its_training_views_and_evaluates_them_whole():
    seen = []
    conv = nn.Conv2d(3, 4, 3)
    conv.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[-1]))
    model = Standardized(nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten()), [0.5] * 3, [0.25] * 3,
                         input_size=32)
    model.train_scale = 0.5
    model.train()(torch.rand(2, 3, 16, 16))
    model.eval()(torch.rand(2, 3, 16, 16))
    plain = Standardized(nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten()), [0.5] * 3, [0.25] * 3)
    plain.train_scale = 0.5
    plain.train()(torch.rand(2, 3, 16, 16))
    assert seen == [16, 32, 8]  # 0.5 of 32; eval whole; 0.5 of the view's own 16
    assert "train_scale" not in dict(model.state_dict())  # not state: exports and hashes unchanged


def test_settings_out_of_range_are_refused():
    with pytest.raises(KdistillError, match="student.progressive_from"):
        build_config(sets=["student.progressive_from=0"])
    with pytest.raises(KdistillError, match="teacher.progressive_until"):
        build_config(sets=["teacher.progressive_until=1.5"])


def _history_sides(out: str, name: str) -> list[int]:
    with open(os.path.join(out, "history", f"{name}.csv"), newline="") as f:
        return [int(float(row["view_side"])) for row in csv.DictReader(f)]


def test_the_student_and_the_baseline_train_on_the_same_growing_views(digits_dataset, tmp_path):
    messages = []
    out = str(tmp_path / "run")
    settings = tiny_settings(digits_dataset, out, str(tmp_path / "cache"),
                             teacher={"arch": "tiny_nets:tiny_teacher", "epochs": 1},
                             student={"arch": "tiny_nets:tiny_student", "epochs": 4, "progressive_from": 0.5,
                                      "progressive_until": 1.0})
    kdistill.run(settings, log=messages.append)
    # 16 px views: 8 px at epoch 1 (0.5), 0.667 and 0.833 round to 8 and 16, whole from epoch 4.
    assert _history_sides(out, "student") == _history_sides(out, "baseline") == [8, 8, 16, 16]
    assert any(message.startswith("student epoch 1/4") and "| views 8 px |" in message for message in messages)
    with open(os.path.join(out, "history", "teacher.csv"), newline="") as f:
        assert "view_side" not in next(csv.DictReader(f))  # the teacher's own schedule is off


def _fit(folder, cfg, log=lambda message: None, callbacks=()):
    torch.manual_seed(0)
    images = torch.rand(24, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(24) % 3
    model = Standardized(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                       nn.Flatten(), nn.Linear(8, 3)), [0.5] * 3, [0.25] * 3, input_size=32)
    history = fit("model", model, model, Batches(images, labels, lambda x: x), Batches(images, labels, lambda x: x),
                  CrossEntropy(), cfg, Session(str(folder), CPU, seed=0, log=log, callbacks=[
                      callback(model) for callback in callbacks]))
    return model, history


def test_a_head_warm_up_epoch_logs_the_whole_views_its_frozen_model_sees(tmp_path):
    """The warm-up keeps the model in eval mode, where it does not resize: its epoch sees whole views."""
    from kdistill.head_warmup import HeadWarmup

    cfg = TrainConfig(epochs=3, batch_size=8, lr=0.05, progressive_from=0.5, progressive_until=1.0)
    _, history = _fit(tmp_path, cfg, callbacks=[lambda model: HeadWarmup(model, "model.5", 1)])
    assert [row["view_side"] for row in history] == [32, 24, 32]


class Killed(Exception):
    pass


def test_a_run_killed_mid_ramp_resumes_to_the_same_end(tmp_path):
    cfg = TrainConfig(epochs=4, batch_size=8, lr=0.05, progressive_from=0.25, progressive_until=1.0)
    straight, straight_history = _fit(tmp_path / "straight", cfg)

    def kill_after_epoch_2(message: str) -> None:
        if message.startswith("model epoch 2/"):
            raise Killed
    with pytest.raises(Killed):
        _fit(tmp_path / "resumed", cfg, kill_after_epoch_2)
    assert load_torch(str(tmp_path / "resumed" / "last.pt"))["epoch"] == 2
    resumed, resumed_history = _fit(tmp_path / "resumed", cfg)
    assert [row["view_side"] for row in straight_history] == [8, 16, 24, 32]
    assert [{k: v for k, v in row.items() if k != "seconds"} for row in resumed_history] == [
        {k: v for k, v in row.items() if k != "seconds"} for row in straight_history]
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), straight.state_dict().values()))
    assert straight.train_scale == 1.0  # left whole for whatever uses the model next


def test_a_feature_method_distills_through_the_smaller_views(digits_dataset, tmp_path):
    # FitNets' hint: the student's map shrinks with its views; the stored teacher map is pooled to it.
    out = str(tmp_path / "run")
    metrics = kdistill.run(tiny_settings(digits_dataset, out, str(tmp_path / "cache"), baseline=False,
                                         image_size=32, teacher={"arch": "tiny_nets:tiny_teacher", "epochs": 1},
                                         student={"arch": "tiny_nets:tiny_student", "epochs": 2,
                                                  "progressive_from": 0.5, "progressive_until": 1.0},
                                         distill={"method": "fitnets"}), log=lambda message: None)
    assert _history_sides(out, "student") == [16, 32]
    assert metrics["models"]["student"]["epochs"] == 2
