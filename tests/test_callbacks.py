"""The training loop's seam: callbacks observe training, early stopping hangs on it, and the
TensorBoard logger writes every model's epochs end to end."""
import os

import pytest
import torch
from torch import nn

import kdistill
from kdistill.batches import Batches
from kdistill.callbacks import Callback, Session
from kdistill.config import TrainConfig
from kdistill.distillers import CrossEntropy
from kdistill.errors import KdistillError
from kdistill.train import fit

from conftest import tiny_settings

CPU = torch.device("cpu")


class Recorder(Callback):
    def __init__(self):
        self.events = []

    def on_fit_start(self, state):
        self.events.append(("start", state.start_epoch))

    def on_epoch_end(self, state, row):
        self.events.append(("epoch", row["epoch"], row is state.history[-1]))

    def on_fit_end(self, state):
        self.events.append(("end", len(state.history)))

    def close(self, state):
        self.events.append(("close",))


def tiny_fit(folder, cfg, callbacks=(), log=lambda message: None, val_labels=None):
    torch.manual_seed(0)
    images, labels = torch.randn(24, 3, 4, 4, generator=torch.Generator().manual_seed(1)), torch.arange(24) % 3
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 3))
    val = Batches(images, labels if val_labels is None else val_labels, lambda x: x)
    return fit("model", model, model, Batches(images, labels, lambda x: x), val, CrossEntropy(), cfg,
               Session(str(folder), CPU, seed=0, log=log, callbacks=list(callbacks)))


def test_a_callback_sees_every_event_in_order_and_a_resume_starts_after_the_saved_epoch(tmp_path):
    recorder = Recorder()
    tiny_fit(tmp_path, TrainConfig(epochs=2, batch_size=8, lr=0.01), [recorder])
    assert recorder.events == [("start", 1), ("epoch", 1, True), ("epoch", 2, True), ("end", 2), ("close",)]
    resumed = Recorder()
    tiny_fit(tmp_path, TrainConfig(epochs=3, batch_size=8, lr=0.01), [resumed])
    assert resumed.events == [("start", 3), ("epoch", 3, True), ("end", 3), ("close",)]


def test_close_runs_when_training_fails(tmp_path):
    recorder = Recorder()
    with pytest.raises(KdistillError, match="is nan at epoch 1; stopped"):
        tiny_fit(tmp_path, TrainConfig(epochs=2, batch_size=24, lr=1e308), [recorder])
    assert recorder.events[-1] == ("close",) and ("end", 1) not in recorder.events


def test_patience_stops_after_epochs_without_a_better_val_accuracy_also_when_resumed(tmp_path):
    # Val labels no model can learn from these images: val accuracy stays at its first value.
    unlearnable = torch.zeros(24, dtype=torch.long)
    lines = []
    history = tiny_fit(tmp_path / "a", TrainConfig(epochs=10, batch_size=8, lr=0.01, patience=2), log=lines.append,
                       val_labels=unlearnable)
    best = max(range(len(history)), key=lambda i: history[i]["val_acc"])
    assert len(history) == best + 3 < 10  # two epochs past the (first) best, then stopped
    assert any("stopping early" in line and "patience 2" in line for line in lines)
    # Rerun with the same settings: the history says it stopped; nothing trains again.
    rerun = tiny_fit(tmp_path / "a", TrainConfig(epochs=10, batch_size=8, lr=0.01, patience=2),
                     val_labels=unlearnable)
    assert rerun == history
    assert len(tiny_fit(tmp_path / "b", TrainConfig(epochs=4, batch_size=8, lr=0.01), val_labels=unlearnable)) == 4


def test_tensorboard_logger_writes_each_models_epochs(digits_dataset, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    metrics = kdistill.run(tiny_settings(digits_dataset, str(out), str(tmp_path / "cache"), loggers=["tensorboard"],
                                         teacher={"arch": "tiny_nets:tiny_teacher", "epochs": 1},
                                         student={"arch": "tiny_nets:tiny_student", "epochs": 2}))
    assert sorted(os.listdir(out / "tensorboard")) == ["baseline", "student", "teacher"]
    events = EventAccumulator(str(out / "tensorboard" / "student"))
    events.Reload()
    accuracy = events.Scalars("val_acc")
    assert [event.step for event in accuracy] == [1, 2]
    assert max(event.value for event in accuracy) == pytest.approx(metrics["models"]["student"]["best_val_acc"])
    assert {"train_loss", "train_kd", "lr"} <= set(events.Tags()["scalars"])


def test_an_unknown_logger_is_a_setting_error():
    with pytest.raises(KdistillError, match=r"setting loggers must list distinct loggers of tensorboard, mlflow"):
        kdistill.build_config(overrides={"loggers": ["wandb"]})


def test_mlflow_logger_records_each_models_epochs_and_settings(digits_dataset, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    metrics = kdistill.run(tiny_settings(digits_dataset, str(out), str(tmp_path / "cache"), loggers=["mlflow"],
                                         baseline=False, teacher={"arch": "tiny_nets:tiny_teacher", "epochs": 1},
                                         student={"arch": "tiny_nets:tiny_student", "epochs": 2}))
    client = MlflowClient(f"file://{out / 'mlruns'}")
    runs = {run.info.run_name: run for run in client.search_runs(
        [client.get_experiment_by_name("kdistill").experiment_id])}
    assert sorted(runs) == ["run/student", "run/teacher"]
    student = runs["run/student"]
    history = client.get_metric_history(student.info.run_id, "val_acc")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2]
    assert max(m.value for m in history) == pytest.approx(metrics["models"]["student"]["best_val_acc"])
    assert student.data.params["epochs"] == "2" and student.info.status == "FINISHED"
