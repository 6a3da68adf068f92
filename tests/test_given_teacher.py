"""A finished teacher used as it is (teacher.epochs: 0): loaded whole, measured, never trained."""
import os

import pytest
import torch

import kdistill
from kdistill.errors import KdistillError

from conftest import tiny_settings, write_digits_dataset


@pytest.fixture(scope="module")
def finished_run(digits_dataset, tmp_path_factory):
    """A tiny run whose student (tiny_teacher's architecture) becomes the next runs' teacher."""
    folder = tmp_path_factory.mktemp("finished")
    settings = tiny_settings(digits_dataset, str(folder / "run"), str(folder / "cache"), baseline=False,
                             teacher={"arch": "tiny_nets:tiny_student", "epochs": 1},
                             student={"arch": "tiny_nets:tiny_teacher", "epochs": 3})
    return str(folder / "run"), kdistill.run(settings)


def given_settings(data, tmp_path, weights, **teacher):
    return tiny_settings(data, str(tmp_path / "run"), str(tmp_path / "cache"),
                         teacher={"arch": "tiny_nets:tiny_teacher", "epochs": 0, "weights": weights, **teacher},
                         student={"arch": "tiny_nets:tiny_student", "epochs": 1})


def test_a_finished_runs_student_teaches_as_it_is(finished_run, digits_dataset, tmp_path):
    """The acceptance command: teacher.weights=OTHER_RUN/student.pt, teacher.epochs=0."""
    first, first_metrics = finished_run
    bundle = os.path.join(first, "student.pt")
    before = os.path.getmtime(bundle)
    lines = []
    metrics = kdistill.run(given_settings(digits_dataset, tmp_path, bundle), log=lines.append)
    teacher = metrics["models"]["teacher"]
    # The same weights on the same val images: the accuracy its own run measured for them.
    assert teacher["best_val_acc"] == pytest.approx(first_metrics["models"]["student"]["best_val_acc"], abs=1e-6)
    assert teacher["epochs"] == 0 and teacher["arch"] == "tiny_nets:tiny_teacher"
    assert any("teacher: given, not trained" in line for line in lines)
    assert not any(line.startswith("teacher epoch") for line in lines)
    assert not os.path.exists(tmp_path / "run" / "checkpoints" / "teacher")
    assert os.path.getmtime(bundle) == before  # read, never written
    assert metrics["models"]["student"]["epochs"] == 1
    assert (tmp_path / "run" / "report.md").is_file()


def test_a_runs_weights_and_a_plain_state_dict_load_whole(finished_run, digits_dataset, tmp_path):
    first, first_metrics = finished_run
    # models/teacher.pt: a kdistill run's weights, input statistics inside; the arch is teacher.arch.
    metrics = kdistill.run(given_settings(digits_dataset, tmp_path / "a", os.path.join(first, "models", "teacher.pt"),
                                          arch="tiny_nets:tiny_student"))
    assert metrics["models"]["teacher"]["best_val_acc"] == pytest.approx(
        first_metrics["models"]["teacher"]["best_val_acc"], abs=1e-6)
    # A plain state_dict with its head and class names, as a trainer saves it; the data's statistics.
    bundle = torch.load(os.path.join(first, "student.pt"), weights_only=True)
    plain = {k.removeprefix("model."): v for k, v in bundle["state_dict"].items() if k.startswith("model.")}
    torch.save({"state_dict": plain, "classes": bundle["classes"]}, tmp_path / "plain.pth")
    lines = []
    metrics = kdistill.run(given_settings(digits_dataset, tmp_path / "b", str(tmp_path / "plain.pth"),
                                          normalize="dataset"), log=lines.append)
    assert metrics["models"]["teacher"]["best_val_acc"] == pytest.approx(
        first_metrics["models"]["student"]["best_val_acc"], abs=1e-6)
    assert any("a state_dict, input standardized with dataset statistics" in line for line in lines)


def test_a_teacher_of_other_classes_is_refused_in_one_line_naming_both(finished_run, tmp_path):
    first, _ = finished_run
    other = write_digits_dataset(str(tmp_path / "other"), ["zero", "one", "three"], {"train": 6, "val": 2}, test=0)
    with pytest.raises(KdistillError) as error:
        kdistill.run(given_settings(other, tmp_path, os.path.join(first, "student.pt")))
    message = str(error.value)
    assert "\n" not in message and "[one, two, zero] (3)" in message and "[one, three, zero] (3)" in message
    two = write_digits_dataset(str(tmp_path / "two"), ["zero", "one"], {"train": 6, "val": 2}, test=0)
    bundle = torch.load(os.path.join(first, "student.pt"), weights_only=True)
    torch.save({k.removeprefix("model."): v for k, v in bundle["state_dict"].items() if k.startswith("model.")},
               tmp_path / "plain.pth")
    with pytest.raises(KdistillError, match=r"has a head of 3 classes, the data has 2"):
        kdistill.run(given_settings(two, tmp_path / "b", str(tmp_path / "plain.pth")))


def test_a_bundle_naming_other_code_needs_teacher_arch_to_name_it(finished_run, digits_dataset, tmp_path):
    first, _ = finished_run
    with pytest.raises(KdistillError, match=r"would run that module's code; set teacher.arch=tiny_nets:tiny_teacher"):
        kdistill.run(given_settings(digits_dataset, tmp_path, os.path.join(first, "student.pt"), arch="resnet18"))


def test_epochs_zero_needs_a_weights_file():
    with pytest.raises(KdistillError, match=r"setting teacher.epochs may be 0 .* only with teacher.weights a file"):
        kdistill.build_config(overrides={"teacher": {"epochs": 0, "weights": "none"}})
    with pytest.raises(KdistillError, match=r"setting student.epochs must be >= 1"):
        kdistill.build_config(overrides={"student": {"epochs": 0}})
