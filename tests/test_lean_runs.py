"""Lean run folders: a finished model keeps its history, not its training state, unless
keep_checkpoints; `kdistill clean` does the same for older runs; a rerun still finds all finished."""
import glob
import os

import pytest

import kdistill
from kdistill import cli
from kdistill.fileio import load_torch

from conftest import tiny_settings


def settings(data, folder, **extra):
    return tiny_settings(data, str(folder / "run"), str(folder / "cache"),
                         teacher={"arch": "tiny_nets:tiny_teacher", "epochs": 2},
                         student={"arch": "tiny_nets:tiny_student", "epochs": 2}, **extra)


def checkpoints(run):
    return sorted(glob.glob(os.path.join(run, "checkpoints", "*", "last.pt*")))


def test_a_finished_run_keeps_histories_not_training_state_and_reruns_nothing(digits_dataset, tmp_path):
    first = kdistill.run(settings(digits_dataset, tmp_path))
    run = str(tmp_path / "run")
    names = [os.path.relpath(path, run) for path in checkpoints(run)]
    assert names == [f"checkpoints/{model}/last.pt" for model in ("baseline", "student", "teacher")]
    for path in checkpoints(run):
        state = load_torch(path)
        assert state["finished"] and "optimizer" not in state and "model" not in state
        assert [row["epoch"] for row in state["history"]] == [1, 2]
    for model in ("teacher", "student", "baseline"):  # each model's best weights once on disk
        assert os.path.samefile(os.path.join(run, "models", f"{model}.pt"),
                                os.path.join(run, "checkpoints", model, "best.pt"))
    lines = []
    again = kdistill.run(settings(digits_dataset, tmp_path), log=lines.append)
    assert not any(" epoch " in line and "/2:" in line for line in lines)  # nothing trained again
    for model in ("teacher", "student", "baseline"):
        assert again["models"][model]["best_val_acc"] == first["models"][model]["best_val_acc"]


def test_keep_checkpoints_keeps_the_training_state_and_clean_drops_it(digits_dataset, tmp_path, capsys):
    kdistill.run(settings(digits_dataset, tmp_path, keep_checkpoints=True))
    run = str(tmp_path / "run")
    assert len(checkpoints(run)) == 6 and "optimizer" in load_torch(checkpoints(run)[0])
    before = sum(os.path.getsize(path) for path in checkpoints(run))
    assert cli.main(["clean", run]) == 0
    assert "MiB freed" in capsys.readouterr().out
    assert all(path.endswith("last.pt") for path in checkpoints(run)) and len(checkpoints(run)) == 3
    assert sum(os.path.getsize(path) for path in checkpoints(run)) < before / 4
    assert all(load_torch(path)["finished"] for path in checkpoints(run))
    lines = []
    kdistill.run(settings(digits_dataset, tmp_path, keep_checkpoints=True), log=lines.append)
    assert not any(" epoch " in line and "/2:" in line for line in lines)


def test_clean_refuses_a_folder_kdistill_did_not_make_and_an_unfinished_run(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "last.pt").write_bytes(b"not ours")
    assert cli.main(["clean", str(tmp_path / "mine")]) == 2
    assert "is not a kdistill run or sweep folder" in capsys.readouterr().err
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / ".kdistill-run").write_text("")
    assert cli.main(["clean", str(unfinished)]) == 2
    assert "has not finished" in capsys.readouterr().err
    assert (tmp_path / "mine" / "last.pt").read_bytes() == b"not ours"


def test_a_finished_model_cannot_train_on_without_its_state(tmp_path):
    import torch
    from torch import nn

    from kdistill.batches import Batches
    from kdistill.callbacks import Session
    from kdistill.config import TrainConfig
    from kdistill.distillers import CrossEntropy
    from kdistill.errors import KdistillError
    from kdistill.train import fit

    images, labels = torch.randn(12, 3, 2, 2), torch.arange(12) % 3
    batches = Batches(images, labels, lambda x: x)

    def train(epochs):
        model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
        return fit("model", model, model, batches, batches, CrossEntropy(), TrainConfig(epochs=epochs, batch_size=4),
                   Session(str(tmp_path), torch.device("cpu"), seed=0, log=lambda m: None, keep_checkpoints=False))
    history = train(2)
    assert train(2) == history
    with pytest.raises(KdistillError, match="finished at epoch 2 and its training state was dropped"):
        train(3)
