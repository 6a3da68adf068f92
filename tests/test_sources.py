"""Model sources: torchvision names, timm:NAME and module:callable(keyword=value), each built here
without downloading anything (timm models without weights, as on a machine behind a firewall)."""
import csv
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import kdistill
from kdistill import cli
from kdistill.errors import KdistillError
from kdistill.models import build_model, is_trusted_arch

from conftest import tiny_settings

KDISTILL_COMMAND = os.path.join(os.path.dirname(sys.executable), "kdistill")


def test_a_timm_model_gets_a_head_for_the_data():
    model, head = build_model("timm:resnet10t", 3, dropout=0.2)
    assert head == "fc" and isinstance(model.fc, nn.Sequential) and model.fc[1].out_features == 3
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 3)
    assert is_trusted_arch("timm:resnet10t") and not is_trusted_arch("tiny_nets:tiny_student")


def test_unknown_timm_names_are_one_line_setting_errors():
    with pytest.raises(KdistillError) as error:
        kdistill.build_config(overrides={"student": {"arch": "timm:resnet10"}})
    message = str(error.value)
    assert message.startswith("setting student.arch names no model kdistill can build: timm has no model 'resnet10'")
    assert "\n" not in message


def test_timm_pretrained_weights_offline_say_which_file_to_get(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # behind a firewall: fail at once, as an offline machine does
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(KdistillError) as error:
        build_model("timm:resnet10t", 3, weights="imagenet")
    message = str(error.value)
    assert "\n" not in message
    assert "huggingface.co/timm/resnet10t.c3_in1k" in message and "weights=/path/to/model.safetensors" in message


def test_a_timm_weights_file_loads_into_the_backbone(tmp_path):
    source = build_model("timm:resnet10t", 5)[0]
    torch.save(source.state_dict(), tmp_path / "w.pth")
    model, _ = build_model("timm:resnet10t", 3, weights=str(tmp_path / "w.pth"))
    assert torch.equal(model.conv1[0].weight, source.conv1[0].weight)


def test_a_callable_takes_literal_keyword_arguments():
    model, _ = build_model("tiny_nets:TinyResNetLike(width=6)", 3)
    assert model.conv1.out_channels == 6
    for bad, reason in (("tiny_nets:TinyResNetLike(6)", "key=value"), ("tiny_nets:TinyResNetLike(width=os)", "literals"),
                        ("tiny_nets:TinyResNetLike(depth=2)", None)):
        with pytest.raises(KdistillError) as error:
            kdistill.build_config(overrides={"student": {"arch": bad}}) if reason else build_model(bad, 3)
        assert "\n" not in str(error.value) and (reason or "cannot be called") in str(error.value)


def test_the_kdistill_command_imports_a_module_from_the_working_directory(tmp_path):
    (tmp_path / "mymodels.py").write_text("import torchvision\n\ndef small(classes=10):\n"
                                          "    return torchvision.models.resnet18(num_classes=classes)\n")
    result = subprocess.run([KDISTILL_COMMAND, "config", "--set", "student.arch=mymodels:small(classes=7)"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "arch: mymodels:small(classes=7)" in result.stdout


def test_timm_teacher_and_student_run_export_and_predict_from_the_cli(digits_dataset, tmp_path, monkeypatch):
    settings = tiny_settings(digits_dataset, str(tmp_path / "run"), str(tmp_path / "cache"), baseline=False,
                             teacher={"arch": "timm:resnet10t", "epochs": 1},
                             student={"arch": "timm:mobilenetv3_small_050", "epochs": 1})
    config = tmp_path / "settings.yaml"
    kdistill.config.save_config(kdistill.config.config_from_dict(settings), str(config))
    assert cli.main(["run", "--config", str(config)]) == 0
    run = tmp_path / "run"
    metrics = (run / "metrics.json").read_text()
    assert '"arch": "timm:resnet10t"' in metrics and '"arch": "timm:mobilenetv3_small_050"' in metrics
    assert (run / "student.onnx").stat().st_size > 0
    out = tmp_path / "predicted.csv"
    assert cli.main(["predict", "--run", str(run), "--images", os.path.join(digits_dataset, "test"),
                     "--output", str(out)]) == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10 and {row["label"] for row in rows} <= {"zero", "one", "two"}


def test_a_pretrained_student_and_its_baseline_start_from_the_same_weights(digits_dataset, tmp_path, monkeypatch):
    """student.weights (here a timm state_dict file, as imagenet would give): both the distilled student
    and the baseline start from those weights with ImageNet's statistics, so only the teacher differs."""
    from kdistill import pipeline

    source = build_model("timm:resnet10t", 1000)[0]
    torch.save(source.state_dict(), tmp_path / "pretrained.pth")
    starts = {}
    real_fit = pipeline.fit

    def recording_fit(name, model, trainable, *args, **kwargs):
        starts[name] = (model.model.conv1[0].weight.detach().clone(), model.mean.flatten().tolist())
        return real_fit(name, model, trainable, *args, **kwargs)
    monkeypatch.setattr(pipeline, "fit", recording_fit)
    kdistill.run(tiny_settings(digits_dataset, str(tmp_path / "run"), str(tmp_path / "cache"),
                               teacher={"arch": "tiny_nets:tiny_teacher", "epochs": 1},
                               student={"arch": "timm:resnet10t", "weights": str(tmp_path / "pretrained.pth"),
                                        "epochs": 1}))
    for name in ("student", "baseline"):
        weights, mean = starts[name]
        assert torch.equal(weights, source.conv1[0].weight) and mean == pytest.approx([0.485, 0.456, 0.406])
