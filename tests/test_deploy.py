"""Deployment: `kdistill export` (student.onnx with metadata and a dynamic batch axis, static int8
student-int8.onnx), the deployment table in metrics.json and report.md, and `kdistill predict`
with an ONNX student. One tiny run (16 px digits) serves every test."""
from __future__ import annotations

import csv
import json
import os
import shutil

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

import kdistill
from conftest import tiny_settings
from kdistill.cli import main
from kdistill.deploy import ROWS, export_run
from kdistill.export import ONNX_METADATA_KEYS, load_bundle
from kdistill.images import load_image

ROW_KEYS = {"size_mb", "val_acc", "latency_ms_b1", "latency_ms_b32", "threads"}


@pytest.fixture(scope="module")
def finished_run(digits_dataset, tmp_path_factory):
    """A tiny finished run with the deploy check on (the default; tiny_settings turns it off), then
    `kdistill export --run` on it."""
    base = tmp_path_factory.mktemp("deploy")
    out = str(base / "run")
    metrics = kdistill.run(tiny_settings(digits_dataset, out, str(base / "cache"), baseline=False, deploy_check=True,
                                         teacher={"epochs": 1}, student={"epochs": 1, "lr_step": 0}))
    with open(os.path.join(out, "student.onnx"), "rb") as f:
        exported_by_run = f.read()
    assert main(["export", "--run", out, "--repeats", "3"]) == 0
    return out, metrics, exported_by_run


def val_images(data: str) -> np.ndarray:
    """The digits' val images as the run decodes them (16 px), in [0, 1]."""
    folder = os.path.join(data, "val")
    paths = sorted(os.path.join(folder, name, f) for name in os.listdir(folder)
                   for f in os.listdir(os.path.join(folder, name)))
    return np.stack([load_image(path, 16) for path in paths]).astype(np.float32) / 255.0


def session(path: str) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])


def test_the_run_writes_the_deployment_rows(finished_run):
    out, metrics, _ = finished_run
    assert os.path.getsize(os.path.join(out, "student-int8.onnx")) > 0
    assert set(metrics["deployment"]) == set(ROWS)
    for name, row in metrics["deployment"].items():
        assert set(row) == ROW_KEYS, name
        assert 0 <= row["val_acc"] <= 1 and row["latency_ms_b1"] > 0 and row["latency_ms_b32"] > 0, name
        assert row["threads"] == torch.get_num_threads()
    rows = metrics["deployment"]
    for name, file in (("student_torch_fp32", "student.pt"), ("student_onnx_int8", "student-int8.onnx"),
                       ("teacher_torch_fp32", os.path.join("models", "teacher.pt"))):
        assert rows[name]["size_mb"] == pytest.approx(os.path.getsize(os.path.join(out, file)) / 2**20)
    # fp32 in PyTorch and in ONNX Runtime are the same function: the same val accuracy.
    assert rows["student_onnx_fp32"]["val_acc"] == rows["student_torch_fp32"]["val_acc"]
    # The student's val accuracy measured anew equals what training reported for its best weights.
    assert rows["student_torch_fp32"]["val_acc"] == pytest.approx(metrics["models"]["student"]["best_val_acc"])


def test_export_writes_both_onnx_files_with_a_dynamic_batch_and_metadata(finished_run, digits_dataset):
    out, _, exported_by_run = finished_run
    model, bundle = load_bundle(os.path.join(out, "student.pt"))
    images = val_images(digits_dataset)
    with torch.no_grad():
        expected = model(torch.from_numpy(images)).numpy()
    for name in ("student.onnx", "student-int8.onnx"):
        path = os.path.join(out, name)
        stored = {prop.key: json.loads(prop.value) for prop in onnx.load(path).metadata_props
                  if prop.key.startswith("kdistill.")}
        assert stored["kdistill.classes"] == ["one", "two", "zero"] and stored["kdistill.image_size"] == 16, name
        assert stored["kdistill.normalize"] == "dataset" and stored["kdistill.arch"] == "resnet18", name
        assert stored["kdistill.mean"] == pytest.approx(bundle["mean"]) and stored["kdistill.std"] == pytest.approx(
            bundle["std"]), name
        run_session = session(path)
        assert run_session.get_inputs()[0].shape[0] == "batch", name
        for batch in (1, 3):
            logits = run_session.run(None, {"images": images[:batch]})[0]
            assert logits.shape == (batch, 3), name
        if name == "student.onnx":
            np.testing.assert_allclose(run_session.run(None, {"images": images})[0], expected, atol=1e-4)
    # the run already wrote the metadata; export rewrote the same file (the same model and metadata)
    with open(os.path.join(out, "student.onnx"), "rb") as f:
        assert {p.key: p.value for p in onnx.load_from_string(f.read()).metadata_props} == {
            p.key: p.value for p in onnx.load_from_string(exported_by_run).metadata_props}
    assert all(f"kdistill.{key}" in {p.key for p in onnx.load_from_string(exported_by_run).metadata_props}
               for key in ONNX_METADATA_KEYS)


def test_int8_is_smaller_and_agrees_with_fp32(finished_run, digits_dataset):
    out, _, _ = finished_run
    fp32_path, int8_path = os.path.join(out, "student.onnx"), os.path.join(out, "student-int8.onnx")
    assert os.path.getsize(int8_path) < os.path.getsize(fp32_path) / 3
    graph_ops = {node.op_type for node in onnx.load(int8_path).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= graph_ops  # static QDQ quantization, not a copy
    images = val_images(digits_dataset)
    fp32 = session(fp32_path).run(None, {"images": images})[0].argmax(1)
    int8 = session(int8_path).run(None, {"images": images})[0].argmax(1)
    assert (fp32 == int8).mean() >= 0.8


def test_export_updates_metrics_and_report(finished_run):
    out, _, _ = finished_run
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    assert set(metrics["deployment"]) == set(ROWS)
    assert metrics["deployment_setup"]["timed_runs_b1"] == 3 * 2  # --repeats 3, two rounds
    report = open(os.path.join(out, "report.md")).read()
    assert "## Deployment (CPU)" in report and "`student-int8.onnx`" in report
    int8 = metrics["deployment"]["student_onnx_int8"]
    assert f"{int8['val_acc']:.2%} | {int8['latency_ms_b1']:.2f} |" in report
    assert "![loss](loss.png)" in report  # the rest of the report is kept


def read_csv(path: str) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_predict_with_onnx_matches_the_bundle(finished_run, digits_dataset, tmp_path, capsys):
    out, _, _ = finished_run
    images = os.path.join(digits_dataset, "val")
    outputs = {}
    for model in ("", "student.onnx", "student-int8.onnx"):
        outputs[model] = str(tmp_path / f"{model or 'bundle'}.csv")
        assert main(["predict", "--run", os.path.join(out, model) if model else out, "--images", images,
                     "--output", outputs[model]]) == 0
    bundle, fp32, int8 = (read_csv(outputs[m]) for m in ("", "student.onnx", "student-int8.onnx"))
    assert len(bundle) == 1 + 24 and [row[:2] for row in fp32] == [row[:2] for row in bundle]
    assert all(abs(float(a[2]) - float(b[2])) <= 2e-4 for a, b in zip(fp32[1:], bundle[1:]))
    assert np.mean([a[1] == b[1] for a, b in zip(int8[1:], bundle[1:])]) >= 0.8


@pytest.mark.parametrize("content", [b"not an onnx model at all", None])
def test_a_broken_or_foreign_onnx_file_is_one_line(finished_run, digits_dataset, tmp_path, capsys, content):
    out, _, _ = finished_run
    path = tmp_path / "model.onnx"
    if content is None:  # a valid ONNX model without kdistill's metadata
        model = onnx.load(os.path.join(out, "student.onnx"))
        del model.metadata_props[:]
        onnx.save(model, str(path))
    else:
        path.write_bytes(content)
    assert main(["predict", "--run", str(path), "--images", os.path.join(digits_dataset, "val")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0], lines
    assert ("not a usable ONNX model" if content else "not a kdistill student") in lines[0]


def test_export_of_a_folder_without_a_finished_run_is_one_line(finished_run, tmp_path, capsys):
    out, _, _ = finished_run
    unfinished = tmp_path / "unfinished"
    shutil.copytree(out, unfinished)
    os.remove(unfinished / "student.pt")  # a run stopped before its export
    for folder in (str(unfinished), str(tmp_path / "missing")):
        assert main(["export", "--run", folder]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("kdistill: error: ") and folder in lines[0], lines


def test_export_refuses_a_run_whose_data_changed(finished_run, digits_dataset, tmp_path):
    out, _, _ = finished_run
    data = tmp_path / "data"
    shutil.copytree(digits_dataset, data)
    run = tmp_path / "run"
    shutil.copytree(out, run)
    config = (run / "config.yaml").read_text().replace(f"data: {digits_dataset}", f"data: {data}")
    (run / "config.yaml").write_text(config)
    os.remove(next((data / "val" / "one").iterdir()))
    with pytest.raises(kdistill.KdistillError, match="changed since the run"):
        export_run(str(run))


@pytest.mark.parametrize("damage", ["not a models table", "odd report fields"])
def test_export_with_a_malformed_metrics_file_is_one_line_and_keeps_it(finished_run, tmp_path, capsys, damage):
    out, _, _ = finished_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    metrics_path = copy / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    if damage == "not a models table":
        metrics["models"] = ["teacher", "student"]
    else:
        metrics["models"]["student"]["best_val_acc"] = "high"
        metrics["seeds"] = 3
    metrics_path.write_text(json.dumps(metrics))
    before = metrics_path.read_text(), (copy / "report.md").read_text()
    assert main(["export", "--run", str(copy), "--repeats", "1"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "metrics.json" in lines[0], lines
    assert (metrics_path.read_text(), (copy / "report.md").read_text()) == before
