"""The commands people expect: evaluate on another labelled folder, predict --top-k, --version, the
student's flags, and the same flag names for the same roles in every command."""
import csv
import json
import os
import shutil

import pytest
import yaml

import kdistill
from kdistill import cli

from conftest import tiny_settings


@pytest.fixture(scope="module")
def finished(digits_dataset, tmp_path_factory):
    folder = tmp_path_factory.mktemp("workflow")
    settings = tiny_settings(digits_dataset, str(folder / "run"), str(folder / "cache"), baseline=False,
                             teacher={"arch": "tiny_nets:tiny_teacher", "epochs": 2},
                             student={"arch": "tiny_nets:tiny_student", "epochs": 2})
    return str(folder / "run"), kdistill.run(settings)


def test_evaluate_scores_student_and_teacher_as_the_run_measured_them(finished, digits_dataset, tmp_path, capsys):
    run, metrics = finished
    out = tmp_path / "scores.json"
    assert cli.main(["evaluate", "--run", run, "--data", os.path.join(digits_dataset, "val"), "--output", str(out),
                     "--top-k", "2", "--trust-arch"]) == 0
    results = json.loads(out.read_text())
    for name in ("student", "teacher"):
        scored = results["models"][name]
        # The run's val images, decoded as predict decodes them: the accuracy the run measured.
        assert scored["images"] == 24
        assert scored["accuracy"] == pytest.approx(metrics["models"][name]["best_val_acc"], abs=1e-6)
        assert scored["accuracy"] <= scored["top2_accuracy"] <= 1
        assert sum(map(sum, scored["confusion"]["matrix"])) == 24
        assert [row["class"] for row in scored["per_class"]] == ["one", "two", "zero"]
    printed = capsys.readouterr().out
    assert "student: accuracy" in printed and "lowest F1" in printed


def test_evaluate_refuses_a_class_the_student_does_not_know_in_one_line(finished, digits_dataset, tmp_path, capsys):
    run, _ = finished
    data = tmp_path / "labelled"
    shutil.copytree(os.path.join(digits_dataset, "val", "one"), data / "one")
    shutil.copytree(os.path.join(digits_dataset, "val", "two"), data / "seven")
    assert cli.main(["evaluate", "--run", run, "--data", str(data), "--output", str(tmp_path / "x.json"),
                     "--trust-arch"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "class folders the student does not know: seven" in error


def test_predict_top_k_writes_the_next_classes_in_order(finished, digits_dataset, tmp_path):
    run, _ = finished
    out = tmp_path / "top.csv"
    assert cli.main(["predict", "--run", run, "--images", os.path.join(digits_dataset, "test"), "--output", str(out),
                     "--top-k", "3", "--trust-arch"]) == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["filename", "label", "confidence", "label_2", "confidence_2", "label_3", "confidence_3"]
    for row in rows:
        assert {row["label"], row["label_2"], row["label_3"]} == {"zero", "one", "two"}
        probabilities = [float(row[k]) for k in ("confidence", "confidence_2", "confidence_3")]
        assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) == pytest.approx(1, abs=2e-4)
    assert cli.main(["predict", "--run", run, "--images", os.path.join(digits_dataset, "test"), "--output",
                     str(out), "--top-k", "4", "--trust-arch"]) == 2


def test_version_and_the_students_flags(capsys):
    with pytest.raises(SystemExit) as exit_code:
        cli.main(["--version"])
    assert exit_code.value.code == 0 and capsys.readouterr().out.startswith("kdistill 0.")
    assert cli.main(["config", "--preset", "recommended", "--epochs", "7", "--image-size", "48",
                     "--batch-size", "32"]) == 0
    settings = yaml.safe_load(capsys.readouterr().out)
    assert settings["image_size"] == 48
    assert (settings["student"]["epochs"], settings["student"]["batch_size"]) == (7, 32)
    assert settings["teacher"]["epochs"] == 15 and settings["teacher"]["batch_size"] == 64  # the preset's


def test_a_run_without_out_writes_to_the_next_free_runs_folder(digits_dataset, tmp_path, monkeypatch, capsys):
    settings = tiny_settings(digits_dataset, "", str(tmp_path / "cache"), baseline=False,
                             teacher={"arch": "tiny_nets:tiny_teacher", "epochs": 1},
                             student={"arch": "tiny_nets:tiny_student", "epochs": 1})
    del settings["out"]
    config = tmp_path / "settings.yaml"
    config.write_text(yaml.safe_dump(settings))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "run1").mkdir(parents=True)  # taken
    assert cli.main(["run", "--config", str(config)]) == 0
    assert "this run writes to runs/run2" in capsys.readouterr().out
    assert (tmp_path / "runs" / "run2" / "metrics.json").is_file()
    assert os.listdir(tmp_path / "runs" / "run1") == []


def test_help_does_not_wait_for_torch():
    """`kdistill --help` builds the whole parser without importing torch (it took 4 s when it did)."""
    import subprocess
    import sys

    code = "import sys; from kdistill import cli; cli.parser(); sys.exit(3 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


# Each command that reads an input folder or writes its results: the attributes --data and --out fill.
INPUT_AND_OUTPUT = {"run": ("data", "out"), "sweep": ("data", "out"), "config": ("data", "out"),
                    "predict": ("images", "output"), "evaluate": ("data", "output")}
REQUIRED = {"sweep": ["--grid", "seed=0,1"], "predict": ["--run", "runs/exp1"], "evaluate": ["--run", "runs/exp1"]}


@pytest.mark.parametrize("command, data_flag, out_flag", [
    *((command, "--data", "--out") for command in INPUT_AND_OUTPUT),
    ("predict", "--images", "--output"), ("evaluate", "--data", "--output"),  # the older names, where they were
])
def test_data_and_out_name_the_input_and_the_results_of_every_command(command, data_flag, out_flag):
    """--data is the input folder and --out where results go, in every command; predict's and
    evaluate's older --images and --output still work there."""
    args = cli.parser().parse_args([command, data_flag, "photos", out_flag, "results", *REQUIRED.get(command, [])])
    data, out = INPUT_AND_OUTPUT[command]
    assert (getattr(args, data), getattr(args, out)) == ("photos", "results")


def test_help_shows_the_common_names_first():
    """Where an option has several names, --help lists --data, --out or --run first."""
    commands = next(action for action in cli.parser()._actions if action.choices and "run" in action.choices)
    several = {}
    for name, command in commands.choices.items():
        for action in command._actions:
            if len(action.option_strings) > 1 and action.option_strings != ["-h", "--help"]:
                several[name, action.option_strings[0]] = action.option_strings[1:]
    assert several == {("predict", "--data"): ["--images"], ("predict", "--out"): ["--output"],
                       ("evaluate", "--out"): ["--output"]}
    assert "--data FOLDER, --images FOLDER" in commands.choices["predict"].format_help()


def test_clean_and_compare_take_run_as_predict_evaluate_and_export_do(monkeypatch, capsys):
    import kdistill.clean
    import kdistill.compare

    seen = []
    monkeypatch.setattr(kdistill.clean, "clean", lambda folder, log: seen.append(("clean", folder)))
    monkeypatch.setattr(kdistill.compare, "compare_runs", lambda folders, html: seen.append(("compare", folders)) or "")
    for argv in (["clean", "--run", "runs/a"], ["clean", "runs/a"], ["compare", "--run", "runs/a", "--run", "runs/b"],
                 ["compare", "runs/a", "runs/b"], ["compare", "--run", "runs/a", "runs/b"]):
        assert cli.main(argv) == 0
    assert seen == [("clean", "runs/a")] * 2 + [("compare", ["runs/a", "runs/b"])] * 3
    for argv in (["clean"], ["clean", "--run", "runs/a", "runs/b"], ["compare"]):
        assert cli.main(argv) == 2
    error = capsys.readouterr().err
    assert "kdistill clean --run RUN" in error and "kdistill compare --run RUN" in error
