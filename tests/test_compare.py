"""kdistill compare: finished runs side by side, the settings that differ as columns."""
import json
import os
import shutil

import pytest
import torch

import kdistill
from conftest import tiny_settings
from kdistill.cli import main

SMALL = "shufflenet_v2_x0_5"  # a few seconds per run where a ResNet takes a minute


@pytest.fixture(scope="module")
def two_runs(digits_dataset, tmp_path_factory):
    """Two finished runs that differ in distill.temperature only; one cache, so the data is decoded once."""
    base = tmp_path_factory.mktemp("compare")
    runs = []
    threads = torch.get_num_threads()
    # One thread: models this small gain nothing from more, and on a busy machine the threads'
    # waiting on each other makes a run ten times slower.
    torch.set_num_threads(1)
    try:
        for temperature in (2.0, 4.0):
            out = str(base / f"t{temperature:g}")
            kdistill.run(tiny_settings(digits_dataset, out, str(base / "cache"), teacher={"arch": SMALL, "epochs": 1},
                                       student={"arch": SMALL, "epochs": 1}, distill={"temperature": temperature}))
            runs.append(out)
    finally:
        torch.set_num_threads(threads)
    return runs


def table_rows(markdown: str) -> list[dict[str, str]]:
    """The markdown table's rows as {column: cell}."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    columns = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(columns, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]


def test_compare_shows_the_differing_setting_and_each_models_accuracy(two_runs, tmp_path, capsys):
    page = tmp_path / "compare.html"
    assert main(["compare", *two_runs, "--html", str(page)]) == 0
    markdown = capsys.readouterr().out
    rows = table_rows(markdown)
    assert "distill.temperature" in rows[0]
    assert "out" not in rows[0] and "seed" not in rows[0]  # the same in both runs, or the run column
    assert len(rows) == 6  # teacher, student, baseline per run
    for run, temperature in zip(two_runs, ("2.0", "4.0")):
        with open(os.path.join(run, "metrics.json")) as f:
            models = json.load(f)["models"]
        mine = {row["model"]: row for row in rows if row["run"] == run}
        assert set(mine) == {"teacher", "student", "baseline"}
        for kind, row in mine.items():
            assert row["distill.temperature"] == temperature
            assert row["best val acc (epoch)"] == (f"{models[kind]['best_val_acc']:.2%} "
                                                  f"(epoch {models[kind]['best_epoch']})")
            assert row["params (M)"] == f"{models[kind]['params'] / 1e6:.2f}"
            assert row["latency (ms, batch 1)"] == f"{models[kind]['latency_ms']:.1f}"
    written = page.read_text(encoding="utf-8")
    assert written.startswith("<!DOCTYPE html>") and "<table>" in written
    assert "<th>distill.temperature</th>" in written
    for row in rows:
        assert f"<td>{row['best val acc (epoch)']}</td>" in written


def test_a_missing_run_folder_is_one_line_and_exit_code_2(two_runs, tmp_path, capsys):
    missing = str(tmp_path / "no-such-run")
    assert main(["compare", two_runs[0], missing]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"kdistill: error: run folder {missing} does not exist\n"


@pytest.mark.parametrize("damage, named", [("metrics.json", "metrics.json"), ("config.yaml", "config.yaml"),
                                           ("no metrics", "metrics.json")])
def test_a_broken_or_missing_file_is_named_in_one_line(two_runs, tmp_path, capsys, damage, named):
    run = str(tmp_path / "damaged")
    shutil.copytree(two_runs[0], run, ignore=shutil.ignore_patterns("models", "checkpoints"))
    if damage == "no metrics":
        os.remove(os.path.join(run, "metrics.json"))
    else:
        with open(os.path.join(run, damage), "w") as f:
            f.write("{not: [valid")
    assert main(["compare", run, two_runs[1]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kdistill: error: ") and os.path.join(run, named) in err


def test_with_seeds_the_accuracy_is_the_mean_and_std_over_seeds(tmp_path, capsys):
    run = tmp_path / "seeded"
    run.mkdir()
    (run / "config.yaml").write_text("seeds: [0, 1]\ndistill:\n  temperature: 4.0\n")
    model = {"arch": "resnet18", "best_val_acc": 0.5, "best_epoch": 2, "params": 1_500_000, "size_mb": 5.75,
             "gflops": 0.01, "latency_ms": 1.25}
    (run / "metrics.json").write_text(json.dumps({
        "device": "cpu", "models": {"teacher": dict(model, best_val_acc=0.9), "student": model},
        "seeds": {"student": [{"seed": 0, "best_epoch": 2}, {"seed": 1, "best_epoch": 3}]},
        "summary": {"student": {"best_val_acc": {"mean": 0.625, "std": 0.125}}}}))
    assert main(["compare", str(run)]) == 0
    rows = {row["model"]: row for row in table_rows(capsys.readouterr().out)}
    assert rows["student"]["best val acc (epoch)"] == "62.50% ± 12.50% (2 seeds, epochs 2, 3)"
    assert rows["teacher"]["best val acc (epoch)"] == "90.00% (epoch 2)"
    assert (rows["student"]["params (M)"], rows["student"]["size (MiB)"]) == ("1.50", "5.8")


@pytest.mark.parametrize("odd", ["huge cost", "deep nesting", "bool cost"])
def test_metrics_with_odd_types_are_shown_or_refused_in_one_line(two_runs, tmp_path, capsys, odd):
    run = str(tmp_path / "odd")
    shutil.copytree(two_runs[0], run, ignore=shutil.ignore_patterns("models", "checkpoints"))
    path = os.path.join(run, "metrics.json")
    with open(path) as f:
        metrics = json.load(f)
    if odd == "deep nesting":
        text = '{"models": {"student": ' + "[" * 5000 + "]" * 5000 + "}}"
    else:
        metrics["models"]["student"]["size_mb"] = 10**400 if odd == "huge cost" else True
        text = json.dumps(metrics)
    with open(path, "w") as f:
        f.write(text)
    code = main(["compare", run, two_runs[1]])
    out, err = capsys.readouterr()
    if odd == "deep nesting":
        assert code == 2 and err.count("\n") == 1 and path in err
    else:
        assert code == 0 and "—" in out  # the odd cost is shown as missing, the rest as usual
