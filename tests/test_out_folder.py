"""kdistill writes only into folders it created (or empty ones), never into a user's folder or data."""
import os
import subprocess

import pytest

import kdistill
from kdistill.cli import main
from kdistill.errors import KdistillError
from kdistill.fileio import FOLDER_LOCK, RUN_MARKER

from conftest import tiny_settings
from test_user_paths import write_config


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def _user_folder(path) -> dict:
    """A project folder with files whose names a run also writes."""
    files = {"config.yaml": "my: settings\n", "report.md": "my notes\n", "src/.tmp-1-abcdef12-x.py": "keep\n",
             "metrics.json": "{}\n"}
    for name, text in files.items():
        os.makedirs(os.path.dirname(path / name), exist_ok=True)
        (path / name).write_text(text)
    return files


def _run_cli(digits_dataset, tmp_path, out, *flags):
    settings = tiny_settings(digits_dataset, "", "", teacher={"arch": "tiny_nets:tiny_teacher", "epochs": 1},
                             student={"arch": "tiny_nets:tiny_student", "epochs": 1})
    config_file = write_config(settings, str(tmp_path / "settings.yaml"))
    return main(["run", "--data", digits_dataset, "--out", str(out), "--config", config_file,
                 "--set", f"cache_dir={tmp_path / 'cache'}", "--no-baseline", *flags])


def test_a_folder_kdistill_did_not_create_is_refused_and_left_untouched(digits_dataset, tmp_path, capsys):
    project = tmp_path / "project"
    files = _user_folder(project)
    assert _run_cli(digits_dataset, tmp_path, project) == 2
    error = capsys.readouterr().err
    assert "kdistill did not write" in error and "--force" in error and len(error.strip().splitlines()) == 1
    for name, text in files.items():
        assert (project / name).read_text() == text
    assert sorted(os.listdir(project)) == sorted({name.split("/")[0] for name in files})


def test_out_dot_in_a_project_is_refused(digits_dataset, tmp_path, monkeypatch, capsys):
    project = tmp_path / "project"
    files = _user_folder(project)
    monkeypatch.chdir(project)
    assert _run_cli(digits_dataset, tmp_path, ".") == 2
    assert (project / "config.yaml").read_text() == files["config.yaml"]


def test_force_writes_into_it_but_cleans_temporaries_only_in_kdistills_own_folders(digits_dataset, tmp_path):
    project = tmp_path / "project"
    _user_folder(project)
    dead = _dead_pid()
    theirs = project / "src" / f".tmp-{dead}-abcdef12-notes.txt"  # looks like an interrupted write of ours
    ours = project / f".tmp-{dead}-abcdef12-report.md"  # top level: a run writes there
    for path in (theirs, ours):
        os.makedirs(path.parent, exist_ok=True)
        path.write_text("x")
    assert _run_cli(digits_dataset, tmp_path, project, "--force") == 0
    assert (project / "student.pt").exists() and (project / RUN_MARKER).exists()
    assert theirs.exists() and not ours.exists()
    assert (project / "src" / ".tmp-1-abcdef12-x.py").read_text() == "keep\n"


def test_an_empty_folder_a_new_one_and_an_older_kdistill_run_are_accepted(digits_dataset, tmp_path):
    empty, older = tmp_path / "empty", tmp_path / "older"
    empty.mkdir()
    older.mkdir()
    (older / FOLDER_LOCK).write_text("")  # earlier versions left their lock file, not the marker
    (older / "report.md").write_text("an older run's report")
    for out in (empty, older, tmp_path / "new" / "run"):
        assert _run_cli(digits_dataset, tmp_path, out) == 0
        assert (out / RUN_MARKER).exists()
    assert _run_cli(digits_dataset, tmp_path, empty) == 0  # and again: a finished run is read back


def test_out_inside_the_data_folder_is_refused(digits_dataset, tmp_path):
    settings = tiny_settings(digits_dataset, os.path.join(digits_dataset, "runs", "exp"), str(tmp_path / "cache"))
    with pytest.raises(KdistillError, match="inside the data folder"):
        kdistill.run(settings, log=lambda m: None)
    assert not os.path.exists(os.path.join(digits_dataset, "runs"))


def test_a_run_folder_saved_before_steps_and_patience_existed_resumes(digits_dataset, tmp_path):
    """Settings added later (steps, patience) at the values that reproduce the old behaviour do not
    make an older run folder "another experiment"; other values do."""
    import yaml

    import kdistill
    from kdistill.errors import KdistillError

    settings = tiny_settings(digits_dataset, str(tmp_path / "run"), str(tmp_path / "cache"),
                             teacher={"arch": "tiny_nets:tiny_teacher", "epochs": 1},
                             student={"arch": "tiny_nets:tiny_student", "epochs": 1})
    kdistill.run(settings)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    for part in ("teacher", "student"):
        del saved[part]["steps"], saved[part]["patience"]
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(saved))
    kdistill.run(settings)  # the same experiment: resumes (finds everything finished)
    with pytest.raises(KdistillError, match="holds a run with other settings"):
        kdistill.run({**settings, "student": {**settings["student"], "patience": 3}})


def test_a_born_again_run_folder_resumes_and_its_base_methods_settings_count(digits_dataset, tmp_path):
    """A run folder saved with distill.method born_again (and its section distill.born_again) resumes
    as the plan of students it now is; the generations are distilled with the base method, so that
    method's own settings make another experiment."""
    import yaml

    settings = tiny_settings(digits_dataset, str(tmp_path / "run"), str(tmp_path / "cache"), baseline=False,
                             teacher={"arch": "tiny_nets:tiny_teacher", "epochs": 1},
                             student={"arch": "tiny_nets:tiny_student", "epochs": 1},
                             distill={"method": "born_again", "born_again": {"generations": 1, "base": "dkd"}})
    kdistill.run(settings, log=lambda message: None)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["distill"]
    assert saved["method"] == "born_again" and saved["born_again"] == {"generations": 1, "base": "dkd"}
    rerun = []
    metrics = kdistill.run(settings, log=rerun.append)
    assert not [message for message in rerun if " epoch 1/1" in message]  # finished: nothing trains again
    assert [(row["generation"], row["run"]) for row in metrics["generations"]] == [(0, "baseline"), (1, "student")]
    with pytest.raises(KdistillError, match="distill.dkd.nckd_weight"):
        kdistill.run({**settings, "distill": {**settings["distill"], "dkd": {"nckd_weight": 2.0}}})
