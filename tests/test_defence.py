"""Defence in depth against a received run folder (issue 25, item 14): kdistill does not write
through symbolic links planted in a run folder, a run's config.yaml cannot raise predict's
decompression-bomb limit, and an ONNX student referencing external data is refused before
ONNX Runtime reads it."""
from __future__ import annotations

import os
import re

import pytest
import torch
import yaml
from onnx import TensorProto, helper

from kdistill.errors import KdistillError
from kdistill.export import load_onnx_student
from kdistill.fileio import atomic_write_text
from kdistill.images import DEFAULT_MAX_PIXELS
from kdistill.pipeline import make_logger
from kdistill.predict import run_max_pixels
from kdistill.report import write_history

HISTORY = [{"epoch": 1, "train_loss": 1.0, "val_loss": 1.0, "train_acc": 0.5, "val_acc": 0.5, "seconds": 1.0}]


@pytest.fixture
def victim(tmp_path):
    """A file outside the run folder that a planted link points to."""
    path = tmp_path / "victim.txt"
    path.write_text("precious\n")
    return path


def test_the_log_does_not_follow_a_planted_link(tmp_path, victim, capsys):
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(victim, run / "log.txt")
    log = make_logger(str(run))
    with pytest.raises(KdistillError, match="symbolic link") as caught:
        log("prepare: something")
    assert str(run / "log.txt") in str(caught.value) and "\n" not in str(caught.value)
    assert victim.read_text() == "precious\n"


def test_the_log_appends_to_its_own_file(tmp_path, capsys):
    log = make_logger(str(tmp_path))
    log("one")
    log("two")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d one\n\d{4}-\d\d-\d\d \d\d:\d\d:\d\d two\n",
                        (tmp_path / "log.txt").read_text())


def test_atomic_writes_replace_a_planted_link_instead_of_following_it(tmp_path, victim):
    link = tmp_path / "metrics.json"
    os.symlink(victim, link)
    atomic_write_text(str(link), "{}")
    assert not os.path.islink(link) and link.read_text() == "{}"
    assert victim.read_text() == "precious\n"


def test_history_does_not_write_into_a_linked_folder(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(elsewhere, run / "history")
    with pytest.raises(KdistillError, match="symbolic link") as caught:
        write_history(str(run / "history" / "student.csv"), HISTORY)
    assert str(run / "history") in str(caught.value)
    assert os.listdir(elsewhere) == []


def test_history_replaces_a_linked_file(tmp_path, victim):
    (tmp_path / "history").mkdir()
    path = tmp_path / "history" / "student.csv"
    os.symlink(victim, path)
    write_history(str(path), HISTORY)
    assert not os.path.islink(path) and path.read_text().startswith("epoch,")
    assert victim.read_text() == "precious\n"


def run_with_limit(folder, limit) -> str:
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump({"max_image_pixels": limit}))
    return str(folder)


@pytest.mark.parametrize("limit", [DEFAULT_MAX_PIXELS * 100, 10**30])
def test_a_run_cannot_raise_the_pixel_limit(tmp_path, limit):
    assert run_max_pixels(run_with_limit(tmp_path / "run", limit)) == DEFAULT_MAX_PIXELS


@pytest.mark.parametrize("limit", [0, -1, None, "off", 1.5, True, [1]])
def test_a_run_cannot_switch_the_pixel_limit_off(tmp_path, limit):
    assert run_max_pixels(run_with_limit(tmp_path / "run", limit)) == DEFAULT_MAX_PIXELS


def test_a_run_may_lower_the_pixel_limit(tmp_path):
    assert run_max_pixels(run_with_limit(tmp_path / "run", 500)) == 500


def external_tensor(name: str):
    """A float tensor whose bytes live in an external file (../secret.bin)."""
    tensor = helper.make_tensor(name, TensorProto.FLOAT, [1], [0.0])
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "../secret.bin"), ("offset", "0"), ("length", "4")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def external_data_model(folder, where: str) -> str:
    """A kdistill-looking ONNX model adding a tensor from external data to its input; where: the
    tensor is an initializer, or a Constant node's value."""
    images = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 4, 4])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3, 4, 4])
    add = helper.make_node("Add", ["images", "w"], ["logits"])
    if where == "initializer":
        graph = helper.make_graph([add], "g", [images], [logits], [external_tensor("w")])
    else:
        constant = helper.make_node("Constant", [], ["w"], value=external_tensor("value"))
        graph = helper.make_graph([constant, add], "g", [images], [logits])
    model = helper.make_model(graph)
    for key, value in (("arch", '"resnet18"'), ("classes", '["a", "b"]'), ("image_size", "4"),
                       ("normalize", '"dataset"'), ("mean", "[0, 0, 0]"), ("std", "[1, 1, 1]")):
        prop = model.metadata_props.add()
        prop.key, prop.value = f"kdistill.{key}", value
    path = os.path.join(folder, "student.onnx")
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    return path


@pytest.mark.parametrize("where", ["initializer", "constant"])
def test_an_onnx_model_with_external_data_is_refused_before_onnx_runtime(tmp_path, monkeypatch, where):
    (tmp_path / "secret.bin").write_bytes(torch.zeros(1).numpy().tobytes())
    (tmp_path / "run").mkdir()
    path = external_data_model(str(tmp_path / "run"), where)
    import onnxruntime

    opened = []
    monkeypatch.setattr(onnxruntime, "InferenceSession", lambda *args, **kwargs: opened.append(args) or 1 / 0)
    with pytest.raises(KdistillError, match="references external data") as caught:
        load_onnx_student(path)
    assert opened == [] and path in str(caught.value) and "\n" not in str(caught.value)
