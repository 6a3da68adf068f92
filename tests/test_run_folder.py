"""The run folder as a unit of work: one kdistill process at a time, and named by the settings
themselves, so a saved OUT/config.yaml reruns the run with no other flag."""
import os
import subprocess
import sys

import yaml

from conftest import ROOT, tiny_settings
from kdistill.cli import main
from kdistill.fileio import FOLDER_LOCK, folder_in_use

HOLD = ("import sys; from kdistill.fileio import folder_in_use\n"
        "with folder_in_use(sys.argv[1]):\n"
        "    print('held', flush=True); sys.stdin.read()")


def hold_in_another_process(folder: str) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, folder], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    assert holder.stdout.readline().strip() == "held"
    return holder


def write_settings(settings: dict, path) -> str:
    with open(path, "w") as f:
        yaml.safe_dump(settings, f)
    return str(path)


def test_a_second_process_on_a_run_folder_in_use_is_refused_in_one_line_and_changes_nothing(
        digits_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    config_file = write_settings(tiny_settings(digits_dataset, str(out), str(tmp_path / "cache")), tmp_path / "s.yaml")
    holder = hold_in_another_process(str(out))
    try:
        assert main(["run", "--config", config_file]) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and f"{out} is in use by another kdistill process" in error
        assert os.listdir(out) == [FOLDER_LOCK]  # no config, data identity or log was written
        sweep = ["sweep", "--config", config_file, "--out", str(out), "--grid", "distill.alpha=0.5,0.9"]
        assert main(sweep) == 2 and "is in use by another kdistill process" in capsys.readouterr().err
        assert os.listdir(out) == [FOLDER_LOCK]
    finally:
        holder.communicate("")  # the holder ends, and the kernel drops its lock with it
    with folder_in_use(str(out)):  # free again: nothing stale is left to remove by hand
        pass


def test_a_killed_holder_leaves_the_folder_free(tmp_path):
    holder = hold_in_another_process(str(tmp_path / "run"))
    holder.kill()
    holder.wait()
    with folder_in_use(str(tmp_path / "run")):
        pass


def test_the_saved_config_reruns_the_run_without_data_and_out_flags(digits_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    settings = tiny_settings(digits_dataset, str(out), str(tmp_path / "cache"), baseline=False,
                             teacher={"epochs": 1}, student={"epochs": 1})
    assert main(["run", "--config", write_settings(settings, tmp_path / "s.yaml")]) == 0
    capsys.readouterr()
    assert main(["run", "--config", str(out / "config.yaml")]) == 0  # finished: read back, nothing retrained
    assert " epoch 1/1" not in capsys.readouterr().out
    settings.pop("data")
    assert main(["run", "--config", write_settings(settings, tmp_path / "no-data.yaml")]) == 2
    assert "setting data is required (--data DATA" in capsys.readouterr().err


def test_the_run_folder_type_names_what_a_run_wrote_and_reads_its_settings_back(digits_dataset, tmp_path):
    import kdistill
    from kdistill.run_folder import RunFolder

    settings = tiny_settings(digits_dataset, str(tmp_path / "run"), str(tmp_path / "cache"), baseline=False,
                             teacher={"arch": "tiny_nets:tiny_teacher", "epochs": 1},
                             student={"arch": "tiny_nets:tiny_student", "epochs": 2})
    kdistill.run(settings)
    run = RunFolder(str(tmp_path / "run"))
    for path in (run.config, run.data_identity, run.metrics, run.report, run.html_report, run.predictions,
                 run.val_predictions, run.student_bundle, run.student_onnx, run.model_weights("student"),
                 run.history("teacher")):
        assert os.path.isfile(path), path
    assert run.has_started_training() and not RunFolder(str(tmp_path)).has_started_training()
    cfg = run.settings()
    assert (cfg.student.arch, cfg.student.epochs, cfg.baseline) == ("tiny_nets:tiny_student", 2, False)
    assert run.saved_settings()["student"]["epochs"] == 2
