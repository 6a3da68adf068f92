"""What users do and rely on beyond a plain run: resuming augmented runs, the demo, --no-baseline,
Ctrl-C, and decoding with several worker processes."""
import csv
import glob
import json
import multiprocessing
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from conftest import ENVIRONMENT, start_and_signal_after_first_student_epoch, tiny_settings, write_digits_dataset
from fault.kill_resume import comparable
from kdistill import data as data_module
from kdistill.cli import main
from kdistill.data import prepare

def run_command(data: str, out: str, config_file: str, *flags: str) -> list[str]:
    return [sys.executable, "-m", "kdistill", "run", "--data", data, "--out", out, "--config", config_file, *flags]


def write_config(settings: dict, path: str) -> str:
    """The settings as a --config file (data and out go on the command line)."""
    with open(path, "w") as f:
        yaml.safe_dump({k: v for k, v in settings.items() if k not in ("data", "out")}, f)
    return path


@pytest.mark.parametrize("augment_settings, signal_name", [
    ({"augment": "crop_flip", "distill": {"teacher_signal": "views", "views": 3}}, "views"),
    ({"augment": "crop_flip", "distill": {"teacher_signal": "online"}}, "online"),
    ({"augment": "rrc_flip", "mix": "mixup"}, "online (mixed batches)"),
    # Methods with trainable parts: a regressor, and embedding heads with memory banks and negatives.
    ({"augment": "flip", "distill": {"method": "fitnets", "teacher_signal": "online"}}, "online"),
    ({"augment": "flip", "distill": {"method": "crd"}}, "views"),
    # A peer network trained beside the student; generations of the student, killed in the last one.
    ({"augment": "flip", "distill": {"method": "dml"}}, "views"),
    ({"augment": "flip", "distill": {"method": "born_again", "born_again": {"generations": 2}}}, "views"),
], ids=["stored-views", "online-teacher", "resized-crop-mixup", "fitnets", "crd", "dml", "born-again"])
def test_an_augmented_run_killed_mid_training_resumes_to_identical_metrics(digits_dataset, tmp_path,
                                                                          augment_settings, signal_name):
    settings = tiny_settings(digits_dataset, "", "", teacher={"arch": "tiny_nets:tiny_teacher", "epochs": 1},
                             student={"arch": "tiny_nets:tiny_student", "epochs": 3}, baseline=False,
                             **augment_settings)
    config_file = write_config(settings, str(tmp_path / "settings.yaml"))

    def command(name: str) -> list[str]:  # a cache per run, so each computes its own teacher signal
        return run_command(digits_dataset, str(tmp_path / name), config_file,
                           "--set", f"cache_dir={tmp_path / ('cache-' + name)}")
    subprocess.run(command("reference"), check=True, env=ENVIRONMENT, capture_output=True)

    interrupted = str(tmp_path / "interrupted")
    process = start_and_signal_after_first_student_epoch(command("interrupted"), interrupted, signal.SIGKILL,
                                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    process.wait()
    assert not os.path.exists(os.path.join(interrupted, "metrics.json")), "the run finished before the kill"
    resumed = subprocess.run(command("interrupted"), env=ENVIRONMENT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "student: resuming after epoch" in resumed.stdout
    reference = comparable(str(tmp_path / "reference"))
    assert reference["metrics"]["teacher_signal"] == signal_name
    assert comparable(interrupted) == reference


def test_demo_command_writes_report_metrics_predictions_and_onnx(tmp_path, capsys):
    out = str(tmp_path / "demo")
    code = main(["demo", "--out", out, "--set", "image_size=16", "--set", "teacher.steps=1", "--set",
                 "student.steps=1", "--set", f"cache_dir={tmp_path / 'cache'}", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    assert set(metrics["models"]) == {"teacher", "student", "baseline"}
    assert metrics["class_names"] == [str(digit) for digit in range(10)]
    assert (metrics["models"]["teacher"]["arch"], metrics["models"]["student"]["arch"]) == (
        "resnet18", "regnet_x_400mf")  # the demo preset, not the defaults
    demo_test_images = sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, "data", "test", "*.png")))
    assert len(demo_test_images) == 1238  # the digits neither labelled for training nor in val
    assert metrics["images"]["train"] == 200 and metrics["transfer_set"] == {"source": "test", "images": 1238}
    with open(os.path.join(out, "predictions.csv")) as f:
        predictions = list(csv.DictReader(f))
    assert sorted(row["filename"] for row in predictions) == demo_test_images
    assert all(row["label"] in metrics["class_names"] for row in predictions)
    assert "Distilled student" in open(os.path.join(out, "report.md")).read()
    assert os.path.getsize(os.path.join(out, "student.onnx")) > 0


def test_no_baseline_trains_and_reports_no_baseline(digits_dataset, tmp_path, capsys):
    settings = tiny_settings(digits_dataset, "", "", teacher={"epochs": 1}, student={"epochs": 1})
    config_file = write_config(settings, str(tmp_path / "settings.yaml"))
    out = str(tmp_path / "run")
    code = main(["run", "--data", digits_dataset, "--out", out, "--config", config_file,
                 "--set", f"cache_dir={tmp_path / 'cache'}", "--no-baseline"])
    assert code == 0, capsys.readouterr().err
    with open(os.path.join(out, "metrics.json")) as f:
        assert set(json.load(f)["models"]) == {"teacher", "student"}
    assert os.path.exists(os.path.join(out, "history", "student.csv"))
    assert not os.path.exists(os.path.join(out, "history", "baseline.csv"))
    assert os.path.exists(os.path.join(out, "models", "student.pt"))
    assert not os.path.exists(os.path.join(out, "models", "baseline.pt"))
    report = open(os.path.join(out, "report.md")).read()
    assert "Distilled student" in report
    assert "without a teacher" not in report and "Distillation changed" not in report


def test_ctrl_c_stops_cleanly_and_the_same_command_resumes(digits_dataset, tmp_path):
    settings = tiny_settings(digits_dataset, "", str(tmp_path / "cache"),
                             teacher={"arch": "tiny_nets:tiny_teacher", "epochs": 1},
                             student={"arch": "tiny_nets:tiny_student", "epochs": 3}, baseline=False)
    out = str(tmp_path / "run")
    command = run_command(digits_dataset, out, write_config(settings, str(tmp_path / "settings.yaml")))
    process = start_and_signal_after_first_student_epoch(command, out, signal.SIGINT, stdout=subprocess.PIPE,
                                                         stderr=subprocess.PIPE, text=True)
    _, stderr = process.communicate(timeout=120)
    assert not os.path.exists(os.path.join(out, "metrics.json")), "the run finished before Ctrl-C"
    assert process.returncode == 130, stderr
    assert "kdistill: interrupted" in stderr and "Run the same command again to resume" in stderr
    assert "Traceback" not in stderr, stderr
    resumed = subprocess.run(command, env=ENVIRONMENT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "student: resuming after epoch" in resumed.stdout
    with open(os.path.join(out, "history", "student.csv")) as f:
        assert [int(row["epoch"]) for row in csv.DictReader(f)] == [1, 2, 3]  # none twice


def test_decoding_with_two_worker_processes_gives_the_same_cache_as_one(tmp_path, monkeypatch):
    # More than 64 images in every split, so each is decoded by a process pool (data._decode_split),
    # whose results arrive out of order; one unreadable image makes the kept images shift.
    data_dir = write_digits_dataset(str(tmp_path / "data"), ["zero", "one", "two"], {"train": 30, "val": 25},
                                    test=70, pixels=24)
    with open(os.path.join(data_dir, "train", "one", "broken.png"), "wb") as f:
        f.write(b"not a png")
    pools = []
    real_context = multiprocessing.get_context

    def recording_context(method=None):
        context = real_context(method)
        pools.append(method)
        return context
    monkeypatch.setattr(data_module.multiprocessing, "get_context", recording_context)

    serial = prepare(data_dir, 16, str(tmp_path / "cache-1"), workers=1, skip_bad=True, log=lambda m: None)
    assert pools == []
    parallel = prepare(data_dir, 16, str(tmp_path / "cache-2"), workers=2, skip_bad=True, log=lambda m: None)
    assert len(pools) == 3  # one pool per split
    assert serial.classes == parallel.classes and serial.skipped == parallel.skipped
    assert [os.path.basename(path) for path, _ in parallel.skipped] == ["broken.png"]
    assert serial.mean == parallel.mean and serial.std == parallel.std
    for name in ("train", "val", "test"):
        one, two = serial.splits[name], parallel.splits[name]
        assert one.files == two.files and len(one.files) > 64
        assert torch.equal(one.images, two.images)
        assert (one.labels is None and two.labels is None) or torch.equal(one.labels, two.labels)
    assert len(parallel.splits["train"].files) == 90
    assert not np.array_equal(parallel.splits["train"].images[0].numpy(), parallel.splits["train"].images[1].numpy())


def test_the_recommended_preset_runs_from_the_command_line(digits_dataset, tmp_path, capsys):
    """The preset as a user runs it, with tiny models and two epochs so that it takes seconds: the
    hint's teacher module is resolved from the map sizes, and as many views as epochs are stored."""
    sets = {"cache_dir": tmp_path / "cache", "image_size": 16, "device": "cpu", "precision": "fp32",
            "deploy_check": "false", "teacher.arch": "tiny_nets:tiny_teacher", "teacher.weights": "none",
            "teacher.epochs": 1, "teacher.warmup_epochs": 0, "student.arch": "tiny_nets:tiny_student",
            "student.epochs": 2, "student.warmup_epochs": 0, "distill.views": 2,
            # The preset's 128 px floor would leave the tiny teacher no map of the student's size.
            "teacher.input_size": 0, "student.input_size": 0}
    out = tmp_path / "run"
    code = main(["run", "--data", digits_dataset, "--out", str(out), "--preset", "recommended", "--no-baseline",
                 *[arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]])
    printed = capsys.readouterr().out
    assert code == 0
    assert "distill.fitnets.teacher_layer: auto is the teacher's layer2" in printed
    # weights none on a module:callable keeps what the callable returns (the zoo's teachers are pretrained).
    assert "teacher: tiny_nets:tiny_teacher with the weights its callable returns, fully fine-tuned" in printed
    assert "student: tiny_nets:tiny_student with the weights its callable returns, input standardized" in printed
    with open(out / "metrics.json") as f:
        assert json.load(f)["teacher_signal"] == "views"
    with open(out / "config.yaml") as f:
        saved = yaml.safe_load(f)["distill"]
    assert (saved["method"], saved["fitnets"]["kd"], saved["fitnets"]["teacher_layer"]) == ("fitnets", True, "auto")
