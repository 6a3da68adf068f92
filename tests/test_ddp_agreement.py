"""Processes that would train together on different experiments stop at once, all alike, in one line."""
import os
import shutil

import pytest

import kdistill
from kdistill.errors import KdistillError

from conftest import tiny_settings
from test_ddp import TwoProcesses, ddp_data, error_line  # noqa: F401 (ddp_data is a fixture)


def _both_refuse(processes: TwoProcesses, expected: str) -> None:
    for rank in (0, 1):
        assert processes.wait(rank) == 2, processes.output(rank)
        line = error_line(processes.output(rank))
        assert expected in line and "process 1 of 2" in line, line


def test_processes_given_other_epochs_stop_naming_the_setting(ddp_data, tmp_path):
    data, config, _ = ddp_data
    processes = TwoProcesses(data, config, str(tmp_path / "run"), {1: ["--set", "student.epochs=2"]})
    _both_refuse(processes, "student.epochs (3 -> 2)")
    assert not os.path.exists(tmp_path / "run" / "checkpoints")  # nothing trained


def test_processes_given_other_data_stop_naming_the_data(ddp_data, tmp_path):
    data, config, _ = ddp_data
    swapped = str(tmp_path / "swapped")
    shutil.copytree(data, swapped)
    for split in ("train", "val"):  # the same files, two classes' folders swapped
        os.rename(os.path.join(swapped, split, "zero"), os.path.join(swapped, split, "tmp"))
        os.rename(os.path.join(swapped, split, "one"), os.path.join(swapped, split, "zero"))
        os.rename(os.path.join(swapped, split, "tmp"), os.path.join(swapped, split, "one"))
    processes = TwoProcesses(data, config, str(tmp_path / "run"), {1: ["--data", swapped]})
    _both_refuse(processes, "the data (content key")


def test_several_processes_without_a_master_address_are_one_line(digits_dataset, tmp_path, monkeypatch):
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(KdistillError, match="MASTER_ADDR is not set"):
        kdistill.run(tiny_settings(digits_dataset, str(tmp_path / "run"), str(tmp_path / "cache")), log=lambda m: None)
