"""kdistill sweep: a grid of runs sharing one prepared dataset, one teacher and one baseline where
their settings allow, a summary of every point, resumable, and grid specs checked up front."""
import csv
import glob
import io
import json
import os
import re
import sys

import pytest
from PIL import Image

import kdistill
from conftest import tiny_settings
from kdistill.cli import main
from kdistill.errors import KdistillError
from kdistill.fileio import load_torch
from kdistill.settings import read_yaml
from kdistill.data import scan_dataset
from kdistill.data_key import dated_key
from kdistill.sweep import _finished, _shared_folder, parse_grid, plan, point_name, teacher_settings
from kdistill.sweep_pareto import pareto_front

# A network that trains in well under a second per epoch on a busy CPU: the sweep's logic is
# under test here, not the models (those are tested in test_end_to_end).
TINY_NETS = '''
from torch import nn


def tiny_net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 10))
'''
ARCH = "sweep_nets:tiny_net"
EPOCH_LINE = re.compile(r"^(?:[\d-]+ [\d:]+ )?(teacher|student|baseline)(?:-seed\d+)? epoch \d+/\d+:", re.MULTILINE)
GRID = ["--grid", "distill.temperature=1,4", "--grid", "distill.alpha=0.25,0.9"]


def as_sets(settings: dict, prefix: str = "") -> list[str]:
    sets = []
    for key, value in settings.items():
        sets += as_sets(value, f"{prefix}{key}.") if isinstance(value, dict) else ["--set", f"{prefix}{key}={value}"]
    return sets


def base_settings(data: str, cache: str, **extra) -> dict:
    """tiny_settings on the tiny network, one epoch each, without the settings the grids vary."""
    settings = tiny_settings(data, "", cache, teacher={"arch": ARCH, "epochs": 1},
                             student={"arch": ARCH, "epochs": 1, "lr_step": 0}, **extra)
    del settings["data"], settings["out"], settings["distill"]["temperature"], settings["distill"]["alpha"]
    return settings


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def epoch_lines(out: str) -> dict[str, int]:
    """How many epochs each kind of model trained, over every point's log."""
    counts = {"teacher": 0, "student": 0, "baseline": 0}
    for path in glob.glob(os.path.join(out, "points", "*", "log.txt")):
        for kind in EPOCH_LINE.findall(read(path)):
            counts[kind] += 1
    return counts


@pytest.fixture(scope="module")
def tiny_nets(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nets")
    (folder / "sweep_nets.py").write_text(TINY_NETS)
    sys.path.insert(0, str(folder))
    yield
    sys.path.remove(str(folder))


@pytest.fixture(scope="module")
def finished_sweep(digits_dataset, tiny_nets, tmp_path_factory):
    base = tmp_path_factory.mktemp("sweep")
    out = str(base / "sweep")
    args = ["sweep", "--data", digits_dataset, "--out", out, *GRID,
            *as_sets(base_settings(digits_dataset, str(base / "cache")))]
    assert main(args) == 0
    return out, args


def test_a_grid_trains_one_teacher_and_one_baseline_for_all_points(finished_sweep):
    out, _ = finished_sweep
    names = sorted(os.listdir(os.path.join(out, "points")))
    assert names == sorted(f"distill.temperature={t},distill.alpha={a}" for t in (1, 4) for a in (0.25, 0.9))
    assert sorted(name.split("-")[0] for name in os.listdir(os.path.join(out, "shared"))) == ["baseline", "teacher"]
    # One teacher epoch and one baseline epoch in all, one student epoch per point.
    assert epoch_lines(out) == {"teacher": 1, "student": 4, "baseline": 1}
    teacher_folder = glob.glob(os.path.join(out, "shared", "teacher-*"))[0]
    teachers = []
    for name in names:
        point = os.path.join(out, "points", name)
        assert not os.path.exists(os.path.join(point, "checkpoints", "teacher"))
        assert os.path.basename(teacher_folder) in read(os.path.join(point, "log.txt"))
        teachers.append(load_torch(os.path.join(point, "models", "teacher.pt")))
        saved = read(os.path.join(point, "config.yaml"))
        temperature, alpha = re.findall(r"=([\d.]+)", name)
        assert f"temperature: {float(temperature)}" in saved and f"alpha: {float(alpha)}" in saved
    for teacher in teachers[1:]:  # every point reports the one shared teacher
        assert all((teacher[key] == teachers[0][key]).all() for key in teacher)
    with open(os.path.join(teacher_folder, "settings.json")) as f:
        described = json.load(f)
    assert "student" not in described["settings"] and described["settings"]["teacher"]["arch"] == ARCH


def test_a_point_that_reused_the_shared_models_equals_a_run_of_its_own(finished_sweep, tmp_path):
    out, _ = finished_sweep
    point = os.path.join(out, "points", "distill.temperature=4,distill.alpha=0.9")  # the last: it trained neither
    alone = str(tmp_path / "alone")
    settings = read_yaml(os.path.join(point, "config.yaml"), "config")
    kdistill.run({**settings, "out": alone})
    for name in ("teacher", "student", "baseline"):
        histories = [[{key: value for key, value in row.items() if key != "seconds"}
                      for row in csv.DictReader(io.StringIO(read(os.path.join(folder, "history", f"{name}.csv"))))]
                     for folder in (point, alone)]
        assert histories[0] == histories[1], name


def test_the_summary_holds_each_points_metrics_and_the_best_point(finished_sweep):
    out, _ = finished_sweep
    with open(os.path.join(out, "sweep.json")) as f:
        summary = json.load(f)
    assert [axis["key"] for axis in summary["grid"]] == ["distill.temperature", "distill.alpha"]
    assert summary["grid"][1]["values"] == [0.25, 0.9] and len(summary["points"]) == 4
    markdown = read(os.path.join(out, "sweep.md"))
    for row in summary["points"]:
        with open(os.path.join(out, row["folder"], "metrics.json")) as f:
            models = json.load(f)["models"]
        for kind in ("student", "baseline", "teacher"):
            assert row[kind] == {key: models[kind][key] for key in ("best_val_acc", "best_epoch")}
        assert row["gain"] == models["student"]["best_val_acc"] - models["baseline"]["best_val_acc"]
        assert f"{models['student']['best_val_acc']:.2%} ({models['student']['best_epoch']})" in markdown
        assert f"`{row['folder']}`" in markdown
    best = max(summary["points"], key=lambda row: row["student"]["best_val_acc"])
    assert summary["best"]["point"] == best["point"]
    assert f"Best by val: **{best['point']}**" in markdown
    png = os.path.join(out, "sweep.png")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(png) > 1000
    with Image.open(png) as image:
        assert image.width > 200 and image.height > 200


def test_rerunning_the_sweep_trains_nothing_again(finished_sweep):
    out, args = finished_sweep
    with open(os.path.join(out, "sweep.json")) as f:
        before = json.load(f)
    checkpoints = sorted(glob.glob(os.path.join(out, "**", "last.pt"), recursive=True))
    assert len(checkpoints) == 4 + 2  # a student per point, the shared teacher and baseline
    times = {path: os.stat(path).st_mtime_ns for path in checkpoints}
    # As if the sweep was killed while reporting one point: that point runs again, from its checkpoints.
    rerun = os.path.join(out, "points", "distill.temperature=4,distill.alpha=0.25")
    os.remove(os.path.join(rerun, "report.md"))
    assert main(args) == 0
    assert epoch_lines(out) == {"teacher": 1, "student": 4, "baseline": 1}
    assert {path: os.stat(path).st_mtime_ns for path in checkpoints} == times
    assert os.path.exists(os.path.join(rerun, "report.md"))
    log = read(os.path.join(out, "log.txt"))
    assert log.count("finished earlier, not rerun") == 3
    # The reported point measured its latency anew (so the Pareto front may move); all else is as before.
    timed = ("deployed", "pareto")
    with open(os.path.join(out, "sweep.json")) as f:
        assert [{k: v for k, v in row.items() if k not in timed} for row in json.load(f)["points"]] == [
            {k: v for k, v in row.items() if k not in timed} for row in before["points"]]


def test_a_point_folder_with_other_settings_is_refused_before_training(finished_sweep, capsys):
    out, args = finished_sweep
    capsys.readouterr()
    assert main([*args, "--set", "student.lr=0.01"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("kdistill: error: ") and "\n" not in error
    assert "holds a run with other settings" in error and "student.lr" in error
    assert len(os.listdir(os.path.join(out, "shared"))) == 2  # nothing new was started


@pytest.mark.parametrize("grid, expected", [
    (["distill.temprature=1,2"], "--grid distill.temprature: unknown setting"),
    (["distill.alpha=0.5,x"], "setting distill.alpha must be a finite number, got 'x'"),
    (["distill.alpha="], "--grid distill.alpha has no values"),
    (["distill.alpha=0.5,,0.9"], "--grid distill.alpha has an empty value"),
    (["distill.alpha=0.5", "distill.alpha=0.9"], "--grid distill.alpha is given twice"),
    (["distill.temperature=2,2.0"], "--grid distill.temperature lists the value 2.0 twice"),
    (["distill.alpha=0.5,2"], "grid point distill.alpha=2: setting distill.alpha must be in [0, 1], got 2.0"),
    (["distill.method=kd,nope"], "setting distill.method must be one of"),
    (["student.epochs=1", "seeds=0,1"], "--grid seeds: not a sweep axis"),
    (["image_size"], "--grid expects KEY=V1,V2,..., got 'image_size'"),
    (["student.lr=0.1,0.2"], "--grid student.lr: also set by --set"),
])
def test_bad_grid_specs_stop_before_anything_runs(digits_dataset, tmp_path, capsys, grid, expected):
    out = tmp_path / "sweep"
    args = ["sweep", "--data", digits_dataset, "--out", str(out), "--set", "student.lr=0.1",
            *[item for spec in grid for item in ("--grid", spec)]]
    assert main(args) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("kdistill: error: ") and "\n" not in error and expected in error, error
    assert not out.exists()


@pytest.mark.parametrize("extra, grid, teachers, baselines", [
    ({}, ["distill.method=kd,dkd", "distill.temperature=1,4"], 1, 1),  # distill.*: one of each
    ({}, ["teacher.lr=0.001,0.01"], 2, 1),
    ({}, ["student.lr=0.001,0.01"], 1, 2),
    ({}, ["seed=0,1"], 2, 2),
    ({}, ["augment=none,flip"], 2, 2),
    ({"augment": "flip"}, ["rrc_scale=[0.08,1],[0.35,1]"], 1, 1),  # crop ranges unused by flip
    ({"augment": "rrc_flip"}, ["rrc_scale=[0.08,1],[0.35,1]"], 2, 2),
    # With augmentation the baseline replays the student's stored views or draws fresh ones (an
    # online teacher); feature methods store views like logit methods; without, all see the same batches.
    ({"augment": "flip"}, ["distill.teacher_signal=views,online"], 1, 2),
    ({"augment": "flip"}, ["distill.method=kd,fitnets"], 1, 1),
    ({}, ["distill.method=kd,fitnets"], 1, 1),
    ({"augment": "rrc_flip", "distill": {"teacher_signal": "views"}}, ["distill.views=2,4"], 1, 2),
    ({"augment": "rrc_flip"}, ["distill.views=2,4"], 1, 2),  # auto: at least a view per epoch, stored
    ({"augment": "rrc_flip", "mix": "mixup"}, ["distill.views=2,4"], 1, 1),  # auto: an online teacher, no views
    ({"augment": "flip"}, ["distill.views=2,4"], 1, 1),  # flip stores its two views whatever the count
])
def test_points_share_teachers_and_baselines_exactly_when_they_train_alike(digits_dataset, tmp_path, extra, grid,
                                                                           teachers, baselines):
    settings = base_settings(digits_dataset, str(tmp_path / "cache"), **extra)
    settings["teacher"]["arch"] = settings["student"]["arch"] = "resnet18"  # fitnets' default layers
    settings["data"] = digits_dataset
    for key in (spec.partition("=")[0] for spec in grid):  # the grid gives these
        *sections, name = key.split(".")
        node = settings
        for section in sections:
            node = node[section]
        node.pop(name, None)
    _, points = plan(str(tmp_path / "sweep"), grid, overrides=settings)
    assert len({point.shared["teacher"] for point in points}) == teachers
    assert len({point.shared["baseline"] for point in points}) == baselines
    assert not (tmp_path / "sweep").exists()  # planning writes nothing


def test_a_sweep_begun_before_data_was_keyed_by_content_keeps_its_shared_teacher_and_finished_points(
        digits_dataset, tiny_nets, tmp_path):
    settings = {**base_settings(digits_dataset, str(tmp_path / "cache")), "data": digits_dataset}
    out = str(tmp_path / "sweep")
    _, points = plan(out, GRID[1::2], overrides=settings)
    cfg = points[0].cfg
    dated = dated_key(scan_dataset(digits_dataset), cfg.image_size, cfg.max_image_pixels)
    assert points[0].data_keys[1] == dated != points[0].data_keys[0]
    earlier, named_by = _shared_folder(out, "teacher", teacher_settings(cfg), (dated, dated))
    assert earlier != points[0].shared["teacher"]
    os.makedirs(earlier)  # the teacher an earlier kdistill's sweep trained
    _, points = plan(out, GRID[1::2], overrides=settings)
    assert {point.shared["teacher"] for point in points} == {earlier}
    assert points[0].described["teacher"] == named_by and named_by["data"] == dated
    # A point it finished, its data.json keyed by date, is read back rather than run again.
    folder = points[0].folder
    os.makedirs(folder)
    for name, content in (("metrics.json", {"models": {"student": {}, "baseline": {}}}), ("data.json", {"key": dated})):
        with open(os.path.join(folder, name), "w") as f:
            json.dump(content, f)
    open(os.path.join(folder, "report.md"), "w").close()
    assert _finished(points[0]) == {"models": {"student": {}, "baseline": {}}}
    with open(os.path.join(folder, "data.json"), "w") as f:
        json.dump({"key": "0" * 24}, f)
    assert _finished(points[0]) is None


def test_grid_values_and_point_names():
    axes = parse_grid(["rrc_scale=[0.08, 1],[0.35,1]", "distill.method=kd,dkd"], set())
    assert axes[0] == ("rrc_scale", ["[0.08, 1]", "[0.35,1]"], [[0.08, 1.0], [0.35, 1.0]])
    assert axes[1] == ("distill.method", ["kd", "dkd"], ["kd", "dkd"])
    assert point_name([("distill.temperature", "2"), ("distill.alpha", "0.5")]) == \
        "distill.temperature=2,distill.alpha=0.5"
    # A path in a value cannot make a folder elsewhere; a hash keeps such names apart.
    first, second = point_name([("teacher.weights", "/a/b.pth")]), point_name([("teacher.weights", "/a_b.pth")])
    assert "/" not in first and first.startswith("teacher.weights=_a_b.pth-") and first != second
    with pytest.raises(KdistillError, match="at least one --grid"):
        parse_grid([], set())


def test_a_method_grid_over_seeds_reports_each_points_mean_and_std(digits_dataset, tiny_nets, tmp_path):
    out = str(tmp_path / "sweep")
    settings = base_settings(digits_dataset, str(tmp_path / "cache"))
    del settings["distill"]["method"]
    args = ["sweep", "--data", digits_dataset, "--out", out, "--grid", "distill.method=kd,dist", "--seeds", "0,1",
            *as_sets(settings)]
    assert main(args) == 0
    # One teacher; a student per point and seed; the baseline once per seed, for both methods.
    assert epoch_lines(out) == {"teacher": 1, "student": 4, "baseline": 2}
    with open(os.path.join(out, "sweep.json")) as f:
        summary = json.load(f)
    assert summary["seeds"] == [0, 1] and [row["point"] for row in summary["points"]] == \
        ["distill.method=kd", "distill.method=dist"]
    markdown = read(os.path.join(out, "sweep.md"))
    for row in summary["points"]:
        with open(os.path.join(out, row["folder"], "metrics.json")) as f:
            metrics = json.load(f)
        for kind in ("student", "baseline"):
            stats = metrics["summary"][kind]["best_val_acc"]
            assert (row[kind]["best_val_acc"], row[kind]["std"]) == (stats["mean"], stats["std"])
            assert row[kind]["per_seed"] == [{key: seed[key] for key in ("seed", "best_val_acc", "best_epoch")}
                                             for seed in metrics["seeds"][kind]]
        assert f"{stats['mean'] * 100:.1f} ± {stats['std'] * 100:.1f}%" in markdown


def test_a_point_that_failed_before_training_runs_again_with_the_corrected_setting(digits_dataset, tiny_nets,
                                                                                   tmp_path, capsys):
    out = str(tmp_path / "sweep")
    settings = base_settings(digits_dataset, str(tmp_path / "cache"))
    del settings["distill"]["method"]
    args = ["sweep", "--data", digits_dataset, "--out", out, "--grid", "distill.method=kd,fitnets",
            *as_sets(settings)]
    # The tiny network has no module layer2, fitnets' default: that point fails, kd's trains.
    assert main(args) == 2
    assert "distill.method=fitnets" in capsys.readouterr().err
    fixed = ["--set", "distill.fitnets.student_layer=0", "--set", "distill.fitnets.teacher_layer=0"]
    assert main([*args, *fixed]) == 0
    with open(os.path.join(out, "sweep.json")) as f:
        assert len(json.load(f)["points"]) == 2
    assert epoch_lines(out) == {"teacher": 1, "student": 2, "baseline": 1}  # kd's point was not retrained


def test_pareto_front_keeps_the_points_no_other_beats_on_every_count():
    # (accuracy, size, latency): the third is beaten by the second on all three; equal points both stay.
    assert pareto_front([(0.9, 10, 5), (0.8, 5, 2), (0.7, 6, 3), (0.9, 10, 5), (0.95, 20, 1)]) == [
        True, True, False, True, True]


def test_a_student_arch_grid_ends_with_size_latency_and_the_pareto_front(digits_dataset, tmp_path):
    out = str(tmp_path / "sweep")
    settings = tiny_settings(digits_dataset, "", str(tmp_path / "cache"), deploy_check=True,
                             teacher={"arch": "tiny_nets:tiny_teacher", "epochs": 1}, student={"epochs": 1})
    del settings["data"], settings["out"], settings["student"]["arch"]
    assert main(["sweep", "--data", digits_dataset, "--out", out, "--grid",
                 "student.arch=tiny_nets:tiny_student,tiny_nets:TinyResNetLike(width=6)", *as_sets(settings)]) == 0
    with open(os.path.join(out, "sweep.json")) as f:
        rows = json.load(f)["points"]
    for row in rows:
        with open(os.path.join(out, row["folder"], "metrics.json")) as f:
            int8 = json.load(f)["deployment"]["student_onnx_int8"]
        assert row["deployed"] == {"size_mb": int8["size_mb"], "latency_ms": int8["latency_ms_b1"],
                                   "form": "int8 ONNX Runtime, CPU"}
    assert [row["pareto"] for row in rows] == pareto_front(
        [(row["student"]["best_val_acc"], row["deployed"]["size_mb"], row["deployed"]["latency_ms"]) for row in rows])
    assert rows[0]["deployed"]["size_mb"] < rows[1]["deployed"]["size_mb"]  # width 4 against 6
    markdown = read(os.path.join(out, "sweep.md"))
    assert "| Deployed MiB | Latency ms | Pareto |" in markdown and "int8 ONNX Runtime, CPU" in markdown
    with Image.open(os.path.join(out, "sweep-pareto.png")) as image:
        assert image.width > 500 and image.height > 300


def test_a_shared_folder_keeps_its_name_when_later_settings_hold_their_old_behaviour():
    """A sweep begun before steps and patience existed keeps its shared teacher and baseline."""
    from kdistill.sweep import _described

    before = _described({"teacher": {"epochs": 3}, "seed": 0}, "key")
    assert _described({"teacher": {"epochs": 3, "steps": 0, "patience": 0}, "seed": 0}, "key") == before
    assert _described({"teacher": {"epochs": 3, "steps": 40, "patience": 0}, "seed": 0}, "key") != before
