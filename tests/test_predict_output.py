"""`kdistill predict`'s output file (issue 25, items 11 and 12): with --run naming a student file
(student.pt, student.onnx) the default CSV goes beside it, and an --output that cannot be written
is refused in one line before any image is predicted."""
from __future__ import annotations

import csv
import os
import shutil

import pytest
import torch

import kdistill
from conftest import tiny_settings
from kdistill import predict
from kdistill.cli import main

SMALL = "shufflenet_v2_x0_5"  # a few seconds per run


@pytest.fixture(scope="module")
def finished_run(digits_dataset, tmp_path_factory):
    """A tiny finished run: its folder holds student.pt and student.onnx."""
    base = tmp_path_factory.mktemp("predict-output")
    out = str(base / "run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # models this small gain nothing from more threads
    try:
        kdistill.run(tiny_settings(digits_dataset, out, str(base / "cache"), baseline=False,
                                   teacher={"arch": SMALL, "epochs": 1}, student={"arch": SMALL, "epochs": 1}),
                     log=lambda message: None)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture
def photos(digits_dataset, tmp_path):
    """A folder of new images: the digits' 10 unlabelled test images."""
    folder = tmp_path / "photos"
    shutil.copytree(os.path.join(digits_dataset, "test"), folder)
    return folder


def predicted_files(path) -> list[str]:
    with open(path, encoding="utf-8", newline="") as f:
        return [row["filename"] for row in csv.DictReader(f)]


@pytest.mark.parametrize("student", ["student.pt", "student.onnx"])
def test_the_default_output_goes_beside_the_student_file(finished_run, photos, capsys, student):
    written = os.path.join(finished_run, "predictions-photos.csv")
    if os.path.exists(written):  # from the other student's test
        os.remove(written)
    assert main(["predict", "--run", os.path.join(finished_run, student), "--images", str(photos)]) == 0
    assert sorted(predicted_files(written)) == sorted(os.listdir(photos))
    assert f"wrote 10 predictions to {written}" in capsys.readouterr().out


def test_a_student_file_moved_elsewhere_gets_its_predictions_beside_it(finished_run, photos, tmp_path):
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    shutil.copy(os.path.join(finished_run, "student.onnx"), shipped)
    assert main(["predict", "--run", str(shipped / "student.onnx"), "--images", str(photos)]) == 0
    assert len(predicted_files(shipped / "predictions-photos.csv")) == 10


@pytest.fixture
def loads(monkeypatch):
    """The student files predict loads: none, when the output is refused before any work."""
    loaded = []
    real = predict.load_student

    def recording(path, *args, **kwargs):
        loaded.append(path)
        return real(path, *args, **kwargs)
    monkeypatch.setattr(predict, "load_student", recording)
    return loaded


@pytest.mark.parametrize("case", ["missing folder", "name too long"])
def test_an_unwritable_output_is_refused_before_predicting(finished_run, photos, tmp_path, capsys, loads, case):
    output = (tmp_path / "no-such-folder" / "out.csv" if case == "missing folder"
              else tmp_path / ("p" * 236 + ".csv"))  # 240 characters
    assert main(["predict", "--run", finished_run, "--images", str(photos), "--output", str(output)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdistill: error: ") and str(output) in lines[0], lines
    assert ("does not exist" if case == "missing folder" else "too long") in lines[0]
    assert loads == [] and not os.path.exists(output)
