"""Nothing non-finite ships: weights, val losses, teacher outputs and predictions are checked."""
import os

import pytest
import torch

import kdistill
from kdistill.batches import Batches
from kdistill.config import TrainConfig
from kdistill.distillers import KD, CrossEntropy
from kdistill.errors import KdistillError
from kdistill.evaluate import write_predictions
from kdistill.models import input_statistics
from kdistill.train import fit
from kdistill.callbacks import Session

from conftest import tiny_settings

CPU = torch.device("cpu")


def test_weights_broken_by_an_epochs_last_step_stop_the_run_and_ship_nothing(digits_dataset, tmp_path):
    """One batch per epoch: the loss is finite before the only step, which breaks the weights. The
    val loss is NaN then; that epoch must not become best, and no student or predictions are written."""
    out = tmp_path / "run"
    settings = tiny_settings(digits_dataset, str(out), str(tmp_path / "cache"),
                             teacher={"arch": "tiny_nets:tiny_teacher", "epochs": 1},
                             student={"arch": "tiny_nets:tiny_student", "epochs": 2, "batch_size": 100, "lr": 1e308,
                                      "lr_step": 0})
    with pytest.raises(KdistillError, match=r"^student: .*not finite|^student: the val loss is nan"):
        kdistill.run(settings, log=lambda m: None)
    assert not (out / "checkpoints" / "student" / "best.pt").exists()
    assert not (out / "checkpoints" / "student" / "last.pt").exists()
    assert not (out / "student.pt").exists() and not (out / "predictions.csv").exists()


def _fit_with_teacher_logits(tmp_path, teacher_logits):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    train = Batches(torch.randn(30, 3, 2, 2), torch.arange(30) % 3, lambda x: x,
                    extras={"teacher_logits": teacher_logits})
    val = Batches(torch.randn(30, 3, 2, 2), torch.arange(30) % 3, lambda x: x)
    return fit("student", model, model, train, val, KD(temperature=4.0, alpha=0.5),
               TrainConfig(epochs=1, batch_size=10), Session(str(tmp_path), CPU, seed=0, log=lambda m: None))


def test_a_nan_teacher_is_named_as_the_teacher(tmp_path):
    assert _fit_with_teacher_logits(tmp_path / "good", torch.randn(30, 3))  # the same run trains with a sound teacher
    broken = torch.randn(30, 3)
    broken[5] = float("nan")
    with pytest.raises(KdistillError, match=r"the teacher's outputs are not finite \(epoch 1, batch \d\)") as error:
        _fit_with_teacher_logits(tmp_path / "bad", broken)
    assert "try a lower lr" not in str(error.value)


def test_a_weight_average_that_turns_nan_stops_the_run(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    batches = Batches(torch.randn(30, 3, 2, 2), torch.arange(30) % 3, lambda x: x)
    with pytest.raises(KdistillError, match="not finite|is nan"):
        fit("baseline", model, model, batches, batches, CrossEntropy(),
            TrainConfig(epochs=2, batch_size=30, lr=1e308, ema=0.5),
            Session(str(tmp_path), CPU, seed=0, log=lambda m: None))
    assert not (tmp_path / "best.pt").exists()


def test_predictions_refuse_non_finite_logits(tmp_path):
    logits = torch.randn(3, 2)
    logits[1, 0] = float("nan")
    path = str(tmp_path / "predictions.csv")
    with pytest.raises(KdistillError, match="non-finite"):
        write_predictions(path, ["a.png", "b.png", "c.png"], logits, ["cat", "dog"])
    assert not os.path.exists(path)


def test_a_constant_colour_channel_is_standardized_to_finite_values():
    name, mean, std = input_statistics("dataset", "none", torch.nn.Identity(), [0.5, 0.2, 0.0], [0.1, 0.2, 0.0])
    assert name == "dataset" and std[:2] == [0.1, 0.2] and std[2] > 0


def test_a_temperature_that_overflows_the_logits_is_refused(digits_dataset, tmp_path):
    settings = tiny_settings(digits_dataset, str(tmp_path / "run"), str(tmp_path / "cache"))
    settings["distill"]["temperature"] = 1e-320
    with pytest.raises(KdistillError, match="distill.temperature"):
        kdistill.run(settings, log=lambda m: None)
    assert not (tmp_path / "run").exists()  # refused before any work


@pytest.mark.parametrize("damage", ["not a dict", "no optimizer", "history of the wrong type", "odd computed_on"])
def test_a_loadable_but_malformed_checkpoint_is_one_line(tmp_path, damage):
    from kdistill.fileio import load_torch, save_torch
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    batches = Batches(torch.randn(30, 3, 2, 2), torch.arange(30) % 3, lambda x: x)

    def train(epochs):
        return fit("student", model, model, batches, batches, CrossEntropy(), TrainConfig(epochs=epochs, batch_size=10),
                   Session(str(tmp_path), CPU, seed=0, log=lambda m: None))
    train(1)
    state = load_torch(str(tmp_path / "last.pt"))
    if damage == "not a dict":
        state = [1, 2, 3]
    elif damage == "no optimizer":
        del state["optimizer"]
    elif damage == "history of the wrong type":
        state["epoch"] = "one"
    else:
        state["computed_on"] = "cpu"
    save_torch(state, str(tmp_path / "last.pt"))
    with pytest.raises(KdistillError, match=r"last\.pt|checkpoint in"):
        train(2)
