"""Progress bars: drawn on a terminal only, one log line per epoch either way, closed on Ctrl-C."""
import io

import pytest
import torch
from torch import nn
from tqdm import tqdm

import kdistill.progress
from kdistill.config import TrainConfig
from kdistill.distillers import CrossEntropy
from kdistill.fileio import load_torch
from kdistill.progress import progress_bar, show_progress
from kdistill.batches import Batches
from kdistill.inference import predict_logits
from kdistill.train import fit
from kdistill.callbacks import Session

CPU = torch.device("cpu")
IMAGES = torch.randn(24, 3, 4, 4, generator=torch.Generator().manual_seed(1))
LABELS = torch.arange(24) % 3


def tiny_fit(folder, model=None, epochs=2):
    """Returns the log lines."""
    torch.manual_seed(0)
    model = model or nn.Sequential(nn.Flatten(), nn.Linear(48, 3))
    lines = []
    fit("model", model, model, Batches(IMAGES, LABELS, lambda x: x), Batches(IMAGES, LABELS, lambda x: x),
        CrossEntropy(), TrainConfig(epochs=epochs, batch_size=8, lr=0.01),
        Session(str(folder), CPU, seed=0, log=lines.append))
    return lines


class FakeStderr(io.StringIO):
    def __init__(self, terminal: bool):
        super().__init__()
        self.terminal = terminal

    def isatty(self):
        return self.terminal


@pytest.mark.parametrize("terminal, ci, shown", [(True, False, True), (True, True, False), (False, False, False)])
def test_bars_are_shown_on_a_terminal_outside_ci_only(monkeypatch, terminal, ci, shown):
    monkeypatch.setattr("sys.stderr", FakeStderr(terminal))
    monkeypatch.delenv("RANK", raising=False)
    if ci:
        monkeypatch.setenv("CI", "true")
    else:
        monkeypatch.delenv("CI", raising=False)
    assert show_progress() is shown


@pytest.mark.parametrize("rank, shown", [("0", True), ("1", False)])
def test_under_torchrun_rank_0_alone_draws_bars(monkeypatch, rank, shown):
    monkeypatch.setattr("sys.stderr", FakeStderr(True))
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("RANK", rank)
    assert show_progress() is shown


def test_off_a_terminal_an_epoch_writes_its_log_line_and_nothing_else(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CI", raising=False)  # off because captured stderr is no terminal
    lines = tiny_fit(tmp_path)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""
    assert [line.split(":")[0] for line in lines] == ["model epoch 1/2", "model epoch 2/2"]


def test_a_forced_bar_counts_images_per_second_and_the_log_lines_stay(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(kdistill.progress, "show_progress", lambda: True)
    lines = tiny_fit(tmp_path)
    err = capsys.readouterr().err
    assert "model epoch 1/2" in err and "model epoch 2/2" in err and "img/s" in err
    assert len(lines) == 2 and not any("img/s" in line for line in lines)
    assert not tqdm._instances  # every epoch's bar was closed


def test_ctrl_c_mid_epoch_keeps_the_finished_epoch_and_closes_the_bar(tmp_path, monkeypatch):
    monkeypatch.setattr(kdistill.progress, "show_progress", lambda: True)
    calls = {"count": 0}

    class InterruptedInEpoch2(nn.Sequential):
        def forward(self, x):
            calls["count"] += 1
            if calls["count"] == 3 + 3 + 2:  # 3 train and 3 val batches per epoch, then 2 of epoch 2
                raise KeyboardInterrupt
            return super().forward(x)

    with pytest.raises(KeyboardInterrupt):
        tiny_fit(tmp_path, InterruptedInEpoch2(nn.Flatten(), nn.Linear(48, 3)))
    assert not tqdm._instances  # closed as the loop unwound: the interrupt message gets a clean line
    assert load_torch(str(tmp_path / "last.pt"))["epoch"] == 1


def test_one_bar_counts_every_image_of_several_passes(monkeypatch):
    monkeypatch.setattr(kdistill.progress, "show_progress", lambda: True)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 3))
    with progress_bar(2 * len(LABELS), "teacher logits") as bar:
        for _ in range(2):  # as the stored views are: one pass per view
            predict_logits(model, Batches(IMAGES, LABELS, lambda x: x), 10, CPU, bar=bar)
        assert bar.n == 2 * len(LABELS)


def test_a_training_bar_shows_the_running_loss_and_the_models_time_left(tmp_path, capsys, monkeypatch):
    import re

    from kdistill.progress import seconds_left, time_left

    monkeypatch.setattr(kdistill.progress, "show_progress", lambda: True)
    monkeypatch.setattr(kdistill.progress, "POSTFIX_EVERY", 2)  # 3 batches an epoch: after the second
    lines = tiny_fit(tmp_path, epochs=3)
    err = capsys.readouterr().err
    assert re.search(r"model epoch 1/3:.*loss \d+\.\d{3}", err)
    assert "model epoch 1/3, about" not in err  # no epoch timed yet
    assert re.search(r"model epoch 2/3, about \d+ s left", err) and re.search(r"model epoch 3/3, about \d+ s left", err)
    assert not any("loss 0" in line and "left" in line for line in lines)  # the log lines stay as they were
    assert seconds_left([100.0, 140.0], 3) == 360 and seconds_left([10.0], 2) == 20
    assert seconds_left([], 5) is None and seconds_left([10.0], 0) is None
    assert time_left(360) == ", about 6 min left" and time_left(20) == ", about 20 s left" and time_left(None) == ""
    assert time_left(7200) == ", about 2.0 h left"
