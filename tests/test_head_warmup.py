"""Head warm-up: the first epochs train the head alone (backbone and its BatchNorm statistics frozen),
the rest the whole model; exact on resume; refused where it cannot apply."""
import pytest
import torch
from torch import nn

import kdistill
from conftest import tiny_settings
from kdistill.batches import Batches
from kdistill.callbacks import Session
from kdistill.config import TeacherConfig, build_config
from kdistill.distillers import CrossEntropy
from kdistill.errors import KdistillError
from kdistill.fileio import load_torch
from kdistill.head_warmup import HeadWarmup, head_warmup
from kdistill.train import fit

CPU = torch.device("cpu")
IMAGES = torch.rand(24, 3, 8, 8, generator=torch.Generator().manual_seed(1))
LABELS = torch.arange(24) % 3


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3))


def warm_fit(folder, epochs=3, head_epochs=1, log=lambda message: None, snapshots=None):
    model = tiny_net()
    cfg = TeacherConfig(epochs=epochs, batch_size=8, lr=0.05, optimizer="sgd", mode="full", head_epochs=head_epochs)
    callbacks = [HeadWarmup(model, "5", head_epochs)]
    if snapshots is not None:
        callbacks.append(Snapshots(model, snapshots))
    history = fit("teacher", model, model, Batches(IMAGES, LABELS, lambda x: x), Batches(IMAGES, LABELS, lambda x: x),
                  CrossEntropy(), cfg, Session(str(folder), CPU, seed=0, log=log, callbacks=callbacks))
    return model, history


class Snapshots(kdistill.callbacks.Callback):
    def __init__(self, model, into):
        self.model, self.into = model, into

    def on_epoch_end(self, state, row):
        self.into.append({k: v.clone() for k, v in self.model.state_dict().items()})


def test_warm_up_epochs_change_the_head_alone_and_later_ones_the_whole_model(tmp_path):
    start = tiny_net().state_dict()
    snapshots, lines = [], []
    model, _ = warm_fit(tmp_path, snapshots=snapshots, log=lines.append)
    after_warmup, after_all = snapshots[0], snapshots[-1]
    backbone = [k for k in start if not k.startswith("5.")]
    assert all(torch.equal(after_warmup[k], start[k]) for k in backbone)  # weights and BatchNorm statistics
    assert not torch.equal(after_warmup["5.weight"], start["5.weight"])
    assert not torch.equal(after_all["0.weight"], start["0.weight"])
    assert not torch.equal(after_all["1.running_mean"], start["1.running_mean"])
    assert "teacher: epoch 1 trains the head alone (head warm-up)" in lines
    assert "teacher: epoch 2 trains the whole model" in lines
    assert all(p.requires_grad for p in model.parameters())  # left trainable for whatever comes next


class Killed(Exception):
    pass


def test_a_run_killed_after_the_warm_up_resumes_to_the_same_end(tmp_path):
    straight, straight_history = warm_fit(tmp_path / "straight", head_epochs=2)

    def kill_after_epoch_2(message):
        if message.startswith("teacher epoch 2/"):
            raise Killed
    with pytest.raises(Killed):
        warm_fit(tmp_path / "resumed", head_epochs=2, log=kill_after_epoch_2)
    assert load_torch(str(tmp_path / "resumed" / "last.pt"))["epoch"] == 2
    resumed, resumed_history = warm_fit(tmp_path / "resumed", head_epochs=2)
    assert [{k: v for k, v in row.items() if k != "seconds"} for row in resumed_history] == [
        {k: v for k, v in row.items() if k != "seconds"} for row in straight_history]
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), straight.state_dict().values()))


def test_head_epochs_is_refused_where_it_cannot_apply():
    with pytest.raises(KdistillError, match="setting teacher.head_epochs applies to mode full"):
        build_config(sets=["teacher.mode=head", "teacher.head_epochs=2"])
    with pytest.raises(KdistillError, match=r"setting teacher.head_epochs must be below teacher.epochs \(3\)"):
        build_config(sets=["teacher.mode=full", "teacher.epochs=3", "teacher.head_epochs=3"])
    with pytest.raises(KdistillError, match="needs one process"):
        head_warmup(tiny_net(), "5", 1, several_processes=True)
    assert head_warmup(tiny_net(), "5", 0, several_processes=True) == []


def test_a_run_warms_its_teachers_head_up(digits_dataset, tmp_path):
    lines = []
    kdistill.run(tiny_settings(digits_dataset, str(tmp_path / "run"), str(tmp_path / "cache"), baseline=False,
                               teacher={"arch": "tiny_nets:tiny_teacher", "mode": "full", "epochs": 2,
                                        "head_epochs": 1},
                               student={"arch": "tiny_nets:tiny_student", "epochs": 1}),
                 log=lines.append)
    assert "teacher: epoch 1 trains the head alone (head warm-up)" in lines
    assert "teacher: epoch 2 trains the whole model" in lines
