"""Nothing lost, nothing trusted blindly: checkpoints, weights and crashes."""
import errno
import multiprocessing
import os
import pickle
import threading

import pytest
import torch

from kdistill.config import TrainConfig
from kdistill.data import prepare
from kdistill.distillers import CrossEntropy
from kdistill.errors import KdistillError
from kdistill.fileio import BackgroundSaver, load_torch, save_torch
from kdistill.models import build_model
from kdistill.batches import Batches
from kdistill.train import fit, load_checkpoint
from kdistill.callbacks import Session

CPU = torch.device("cpu")


class RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused_and_the_code_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": RunsCode(marker)}, path)
    with pytest.raises(KdistillError, match="refusing"):
        load_torch(str(path))
    with pytest.raises(KdistillError, match="refusing"):
        build_model("resnet18", 3, weights=str(path))
    assert not marker.exists()
    with open(tmp_path / "plain.pkl", "wb") as f:  # a bare pickle, not even a torch file
        pickle.dump(RunsCode(marker), f)
    with pytest.raises(KdistillError):
        load_torch(str(tmp_path / "plain.pkl"))
    assert not marker.exists()


def test_safetensors_weights_load(tmp_path):
    from safetensors.torch import save_file

    source, _ = build_model("resnet18", 1000)
    path = str(tmp_path / "weights.safetensors")
    save_file(source.state_dict(), path)
    model, _ = build_model("resnet18", 2, weights=path)
    assert torch.equal(model.layer1[0].conv1.weight, source.layer1[0].conv1.weight)
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(KdistillError, match="broken.safetensors"):
        build_model("resnet18", 2, weights=str(tmp_path / "broken.safetensors"))


def tiny_fit(tmp_path, epochs, lr=1e-3, images=None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    images = torch.randn(30, 3, 2, 2) if images is None else images
    batches = Batches(images, torch.arange(30) % 3, lambda x: x)
    return model, fit("model", model, model, batches, batches, CrossEntropy(),
                      TrainConfig(epochs=epochs, batch_size=10, lr=lr),
                      Session(str(tmp_path), CPU, seed=0, log=lambda m: None))


def test_a_corrupt_last_checkpoint_falls_back_to_the_previous_good_one(tmp_path):
    _, reference = tiny_fit(tmp_path / "reference", epochs=3)
    tiny_fit(tmp_path / "run", epochs=2)
    last = tmp_path / "run" / "last.pt"
    assert (tmp_path / "run" / "last.pt.prev").exists()
    last.write_bytes(last.read_bytes()[:100])  # half-written
    messages = []
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    torch.manual_seed(0)
    history = fit("model", model, model, Batches(torch.randn(30, 3, 2, 2), torch.arange(30) % 3, lambda x: x),
                  Batches(torch.randn(30, 3, 2, 2), torch.arange(30) % 3, lambda x: x), CrossEntropy(),
                  TrainConfig(epochs=3, batch_size=10), Session(str(tmp_path / "run"), CPU, seed=0, log=messages.append))
    assert any("corrupt" in m for m in messages) and any("resuming after epoch 1" in m for m in messages)
    assert [row["epoch"] for row in history] == [1, 2, 3]


def test_a_nan_loss_stops_naming_epoch_and_batch_and_keeps_the_last_good_checkpoint(tmp_path):
    tiny_fit(tmp_path, epochs=1)
    good = load_torch(str(tmp_path / "last.pt"))
    images = torch.randn(30, 3, 2, 2)
    images[12] = float("nan")  # second batch of every epoch
    with pytest.raises(KdistillError, match=r"epoch 2, batch 2") as error:
        tiny_fit(tmp_path, epochs=2, images=images)
    assert "last good checkpoint (epoch 1)" in str(error.value)
    kept = load_torch(str(tmp_path / "last.pt"))
    assert kept["epoch"] == 1 and torch.equal(kept["model"]["1.weight"], good["model"]["1.weight"])


def test_disk_full_while_saving_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    save_torch({"epoch": 1}, path)

    def full_disk(obj, target):
        target.write(b"partial")  # save_torch hands torch.save an open temporary file
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(KdistillError, match="No space left on device") as error:
        save_torch({"epoch": 2}, path)
    assert "intact" in str(error.value)
    monkeypatch.undo()
    assert load_torch(path) == {"epoch": 1}
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary file left behind


def test_a_checkpoint_write_failing_in_the_background_stops_training_and_keeps_the_last_good_one(
        tmp_path, monkeypatch):
    """fit writes checkpoints on a background thread; an error there must still reach the caller."""
    real_save, targets = torch.save, []

    def full_disk_after_epoch_1(obj, target):
        targets.append(os.path.basename(target.name))
        if len(targets) > 2:  # epoch 1 writes best.pt and last.pt
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, target)
    monkeypatch.setattr(torch, "save", full_disk_after_epoch_1)
    with pytest.raises(KdistillError, match="No space left on device"):
        tiny_fit(tmp_path, epochs=4)
    monkeypatch.undo()
    assert load_checkpoint(str(tmp_path / "last.pt"), log=lambda m: None)["epoch"] == 1  # what a resume reads


def test_background_saver_writes_what_the_tensors_held_when_submitted(tmp_path):
    weights, stepped = torch.zeros(1000), threading.Event()

    def save_after_the_step(obj, path):
        stepped.wait(10)
        save_torch(obj, path)
    saver = BackgroundSaver()
    saver.submit(save_after_the_step, {"w": weights, "history": [{"epoch": 1}]}, str(tmp_path / "a.pt"))
    weights += 1  # an optimizer step while the write is still pending
    stepped.set()
    saver.close()
    assert torch.equal(load_torch(str(tmp_path / "a.pt"))["w"], torch.zeros(1000))


def _prepare_in_process(args):
    data_dir, cache = args
    data = prepare(data_dir, 16, cache, workers=1, log=lambda m: None)
    return data.key, data.splits["train"].images.sum().item()


def test_two_runs_sharing_a_cache_at_once_do_not_corrupt_it(digits_dataset, tmp_path):
    cache = str(tmp_path / "cache")
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.map(_prepare_in_process, [(digits_dataset, cache)] * 2)
    assert results[0] == results[1]
    messages = []
    again = prepare(digits_dataset, 16, cache, workers=1, log=messages.append)
    assert any("reusing" in m for m in messages)
    assert (again.key, again.splits["train"].images.sum().item()) == results[0]


def test_the_same_content_saved_twice_gives_identical_files(tmp_path):
    """Model sizes in metrics.json, and a resumed run's, must not depend on the temporary file's
    name (it carries the writer's pid)."""
    state = {"weight": torch.arange(10.0)}
    save_torch(state, str(tmp_path / "a.pt"))
    save_torch(state, str(tmp_path / "much-longer-name-b.pt"))
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "much-longer-name-b.pt").read_bytes()
