import csv
import glob
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
import yaml

import kdistill
from conftest import ENVIRONMENT, start_and_signal_after_first_student_epoch, tiny_settings
from fault.kill_resume import comparable
from kdistill.cli import main
from kdistill.errors import KdistillError
from kdistill.export import load_bundle
from kdistill.fileio import load_torch
from kdistill.images import load_image


@pytest.fixture(scope="module")
def finished_run(digits_dataset, tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e")
    out = str(base / "run")
    metrics = kdistill.run(tiny_settings(digits_dataset, out, str(base / "cache")))
    return out, metrics


def test_a_run_writes_every_output(finished_run, digits_dataset):
    out, metrics = finished_run
    for name in ("config.yaml", "metrics.json", "report.md", "loss.png", "accuracy.png", "predictions.csv",
                 "student.pt", "student.onnx", "log.txt", "models/teacher.pt", "models/student.pt",
                 "models/baseline.pt", "history/teacher.csv", "history/student.csv", "history/baseline.csv"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    assert set(metrics["models"]) == {"teacher", "student", "baseline"}
    for name, model in metrics["models"].items():
        for key in ("best_val_acc", "final_val_acc", "params", "size_mb", "gflops", "epochs", "train_seconds",
                    "best_epoch", "latency_ms"):
            assert key in model, (name, key)
        with open(os.path.join(out, "history", f"{name}.csv")) as f:
            history = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
        best = max(history, key=lambda row: row["val_acc"])  # the first epoch reaching the best
        assert (model["best_val_acc"], model["best_epoch"]) == (best["val_acc"], best["epoch"])
        assert model["final_val_acc"] == history[-1]["val_acc"]
        assert model["size_mb"] == pytest.approx(os.path.getsize(os.path.join(out, "models", f"{name}.pt")) / 2**20)
    assert metrics["models"]["student"]["epochs"] == 3 and metrics["models"]["teacher"]["epochs"] == 2
    assert metrics["models"]["student"]["params"] == metrics["models"]["baseline"]["params"]
    assert metrics["teacher_signal"] == "cached" and metrics["onnx_max_abs_diff"] < 1e-3
    saved = yaml.safe_load(open(os.path.join(out, "config.yaml")))
    assert saved["student"]["epochs"] == 3 and saved["distill"]["alpha"] == 0.7
    report = open(os.path.join(out, "report.md")).read()
    assert "Distilled student" in report and "Best epoch" in report and "![loss](loss.png)" in report
    with open(os.path.join(out, "history", "student.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert {"train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "train_kd", "train_ce"} <= set(rows[0])
    assert float(rows[2]["lr"]) == pytest.approx(1e-4)  # StepLR(step 2) has cut the rate for epoch 3
    with open(os.path.join(out, "predictions.csv")) as f:
        predictions = list(csv.DictReader(f))
    assert len(predictions) == 10 and set(predictions[0]) == {"filename", "label", "confidence"}
    assert sorted(p["filename"] for p in predictions) == sorted(os.listdir(os.path.join(digits_dataset, "test")))
    # The saved best weights are the ones reported, and the ones that predicted: evaluated again
    # from the files alone, they give the best val accuracy and every prediction's label and confidence.
    student, bundle = load_bundle(os.path.join(out, "student.pt"))
    assert torch.equal(student.state_dict()["model.fc.weight"],
                       load_torch(os.path.join(out, "models", "student.pt"))["model.fc.weight"])

    def logits(folder, files):
        images = torch.stack([torch.from_numpy(load_image(os.path.join(folder, f), bundle["image_size"]))
                              for f in files])
        with torch.no_grad():
            return student(images.float() / 255)
    val_files = sorted(glob.glob("*/*.png", root_dir=os.path.join(digits_dataset, "val")))
    val_labels = torch.tensor([bundle["classes"].index(os.path.dirname(f)) for f in val_files])
    val_acc = (logits(os.path.join(digits_dataset, "val"), val_files).argmax(1) == val_labels).float().mean()
    assert val_acc.item() == pytest.approx(metrics["models"]["student"]["best_val_acc"], abs=1e-6)
    probabilities = logits(os.path.join(digits_dataset, "test"), [p["filename"] for p in predictions]).softmax(1)
    assert [p["label"] for p in predictions] == [bundle["classes"][i] for i in probabilities.argmax(1).tolist()]
    assert [float(p["confidence"]) for p in predictions] == pytest.approx(probabilities.max(1).values.tolist(),
                                                                          abs=1e-3)


def test_predict_command_reproduces_the_run_predictions(finished_run, digits_dataset, tmp_path, capsys):
    out, _ = finished_run
    output = str(tmp_path / "more.csv")
    assert main(["predict", "--run", out, "--images", os.path.join(digits_dataset, "test"), "--output", output]) == 0
    with open(output) as f:
        again = {row["filename"]: row for row in csv.DictReader(f)}
    with open(os.path.join(out, "predictions.csv")) as f:
        for row in csv.DictReader(f):
            assert again[row["filename"]]["label"] == row["label"]
            assert float(again[row["filename"]]["confidence"]) == pytest.approx(float(row["confidence"]), abs=2e-3)


def test_onnx_student_matches_pytorch(finished_run):
    import numpy as np
    import onnxruntime
    import torch

    from kdistill.export import load_bundle

    out, _ = finished_run
    model, bundle = load_bundle(os.path.join(out, "student.pt"))
    images = torch.rand(3, 3, 16, 16)
    session = onnxruntime.InferenceSession(os.path.join(out, "student.onnx"), providers=["CPUExecutionProvider"])
    onnx_logits = session.run(None, {"images": images.numpy()})[0]
    with torch.no_grad():  # the bundle's model standardizes its input itself, as the ONNX file does
        expected = model(images).numpy()
    np.testing.assert_allclose(onnx_logits, expected, atol=1e-4)


def test_rerun_reuses_finished_stages_and_other_settings_are_refused(finished_run, digits_dataset):
    out, metrics = finished_run
    settings = yaml.safe_load(open(os.path.join(out, "config.yaml")))
    messages = []
    again = kdistill.run(settings, log=messages.append)
    assert not any(re.match(r"\w+ epoch \d+/\d+:", m) for m in messages)  # no epoch was trained again
    assert any("reusing the data cache" in m for m in messages)
    assert again["models"]["student"]["best_val_acc"] == metrics["models"]["student"]["best_val_acc"]
    settings["student"]["epochs"] = 5
    with pytest.raises(KdistillError, match="student.epochs"):
        kdistill.run(settings)


def test_a_run_killed_mid_training_resumes_to_identical_metrics(digits_dataset, tmp_path):
    settings = tiny_settings(digits_dataset, "", str(tmp_path / "cache"),
                             teacher={"arch": "resnet18", "mode": "head", "dropout": 0.5, "epochs": 2},
                             student={"arch": "tiny_nets:tiny_student", "epochs": 4})
    config_file = str(tmp_path / "settings.yaml")
    yaml.safe_dump({k: v for k, v in settings.items() if k not in ("data", "out")}, open(config_file, "w"))

    def command(out):
        return [sys.executable, "-m", "kdistill", "run", "--data", digits_dataset, "--out", out,
                "--config", config_file]
    reference = str(tmp_path / "reference")
    subprocess.run(command(reference), check=True, env=ENVIRONMENT, capture_output=True)

    interrupted = str(tmp_path / "interrupted")
    process = start_and_signal_after_first_student_epoch(command(interrupted), interrupted, signal.SIGKILL,
                                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    process.wait()
    assert not os.path.exists(os.path.join(interrupted, "metrics.json")), "the run finished before the kill"
    resumed = subprocess.run(command(interrupted), env=ENVIRONMENT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "student: resuming after epoch" in resumed.stdout
    assert comparable(interrupted) == comparable(reference)


def test_with_random_crops_the_teacher_runs_online_on_the_augmented_view(digits_dataset, tmp_path, monkeypatch):
    from kdistill import pipeline

    served = []  # (student input, teacher logits) of the student's first batches
    real_fit = pipeline.fit

    def recording_fit(name, model, trainable, train, *args, **kwargs):
        if name == "student":
            real_iterate = train.iterate

            def iterate(*iterate_args, **iterate_kwargs):
                for batch in real_iterate(*iterate_args, **iterate_kwargs):
                    if len(served) < 2:
                        served.append((batch.x.clone(), batch.teacher.logits.clone()))
                    yield batch
            train.iterate = iterate
        return real_fit(name, model, trainable, train, *args, **kwargs)
    monkeypatch.setattr(pipeline, "fit", recording_fit)
    # Fewer stored views than student epochs: auto runs the teacher online.
    settings = tiny_settings(digits_dataset, str(tmp_path / "run"), str(tmp_path / "cache"), augment="crop_flip",
                             baseline=False, teacher={"mode": "head", "epochs": 1}, student={"epochs": 2},
                             distill={"views": 1})
    messages = []
    metrics = kdistill.run(settings, log=messages.append)
    assert metrics["teacher_signal"] == "online" and len(served) == 2
    assert ("teacher signal: online, the teacher runs on every training batch (augment=crop_flip with "
            "distill.views=1 stored views per image, fewer than student.epochs=2)") in messages
    # Nothing was precomputed: with augmentation, cached teacher outputs would not match the view.
    assert glob.glob(str(tmp_path / "cache" / "*" / "signal" / "*")) == []
    # The logits the student learned from are the saved teacher's on exactly the augmented batch it saw.
    from kdistill.models import standardized_model

    teacher_state = load_torch(str(tmp_path / "run" / "models" / "teacher.pt"))
    teacher, _, _ = standardized_model("resnet18", 3, 0.0, "none", "dataset", [0.0] * 3, [1.0] * 3)
    teacher.load_state_dict(teacher_state)
    teacher.eval()
    for x, teacher_logits in served:
        with torch.no_grad():
            torch.testing.assert_close(teacher_logits, teacher(x), rtol=1e-4, atol=1e-4)


def test_a_teacher_with_an_input_size_sees_every_view_larger_and_is_measured_and_reloaded_so(digits_dataset,
                                                                                             tmp_path):
    settings = tiny_settings(digits_dataset, str(tmp_path / "run"), str(tmp_path / "cache"), augment="crop_flip",
                             baseline=False, deploy_check=True, teacher={"epochs": 1, "input_size": 32},
                             student={"epochs": 1, "lr_step": 0}, distill={"views": 1})
    messages = []
    metrics = kdistill.run(settings, log=messages.append)
    teacher, student = metrics["models"]["teacher"], metrics["models"]["student"]
    assert (teacher["input_size"], student["input_size"]) == (32, 16)
    assert any("sees each view resized to 32 px" in message for message in messages)
    # Its FLOPs are the network's at 32 px, though the run measures it on 16 px views like the student's.
    from kdistill.evaluate import gflops
    from kdistill.models import build_model

    network = build_model("resnet18", 3)[0]
    assert teacher["gflops"] == pytest.approx(gflops(network, 32, torch.device("cpu")))
    assert teacher["gflops"] > 2 * gflops(network, 16, torch.device("cpu"))
    # The deployment table reloads models/teacher.pt with its resize: the same val accuracy.
    assert metrics["deployment"]["teacher_torch_fp32"]["val_acc"] == pytest.approx(teacher["best_val_acc"])
    report = open(tmp_path / "run" / "report.md").read()
    assert "| resnet18 (32 px) |" in report
    assert ("GFLOPs count a multiply-add as two FLOPs, for one 16 px image (a model marked with a size resizes "
            "the image to it first; its count is at that size).") in report


def test_a_student_with_an_input_size_trains_deploys_and_predicts_at_that_size(digits_dataset, tmp_path):
    """student.input_size: the student and the baseline see every 16 px view at 32 px, in training,
    in student.pt, in ONNX (the resize is in the graph) and in its int8 copy. An input_size no larger
    than image_size (the teacher's here) changes nothing: the rule a preset can state for any data."""
    out = str(tmp_path / "run")
    settings = tiny_settings(digits_dataset, out, str(tmp_path / "cache"), deploy_check=True,
                             student={"epochs": 1, "lr_step": 0, "input_size": 32},
                             teacher={"epochs": 1, "input_size": 12},
                             distill={"method": "fitnets", "fitnets": {"kd": True, "teacher_layer": "auto"}})
    messages = []
    metrics = kdistill.run(settings, log=messages.append)
    student, baseline, teacher = (metrics["models"][name] for name in ("student", "baseline", "teacher"))
    assert (student["input_size"], baseline["input_size"], teacher["input_size"]) == (32, 32, 16)
    assert sum("sees each view resized to 32 px" in message for message in messages) == 2  # student, baseline
    assert not any("resized to 12" in message for message in messages)
    # The hint's teacher layer is matched at the data's 16 px; the student's 4x4 layer2 is pooled to it.
    assert ("distill.fitnets.teacher_layer: auto is the teacher's layer2 (128, 2, 2), for the student's layer2 "
            "(128, 2, 2) at 16 px; it sees 32 px, where that map is (128, 4, 4); in training the larger is "
            "average-pooled to 2x2") in messages
    assert set(load_torch(os.path.join(out, "models", "teacher.pt"))) & {"mean", "resized_to"} == {"mean"}
    from kdistill.evaluate import gflops
    from kdistill.models import build_model

    assert student["gflops"] == pytest.approx(gflops(build_model("resnet18", 3)[0], 32, torch.device("cpu")))
    bundled, description = load_bundle(os.path.join(out, "student.pt"))
    assert description["input_size"] == 32 and bundled.input_size == 32
    views = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        by_hand = bundled.model((torch.nn.functional.interpolate(views, size=(32, 32), mode="bilinear")
                                 - bundled.mean) / bundled.std)
        torch.testing.assert_close(bundled(views), by_hand)
    deployment = metrics["deployment"]
    assert deployment["student_torch_fp32"]["val_acc"] == pytest.approx(student["best_val_acc"])
    assert deployment["student_onnx_fp32"]["val_acc"] == deployment["student_torch_fp32"]["val_acc"]
    assert "| resnet18 (32 px) |" in open(os.path.join(out, "report.md")).read()
