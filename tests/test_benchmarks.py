"""The benchmark scripts keep running against today's kdistill (they are not imported by anything
else, so an interface change would break them unnoticed): each on the tiny digits data, one repeat."""
import json
import os
import re
import subprocess
import sys

from conftest import ROOT
from kdistill.distillers import DISTILLERS


def run_benchmark(script: str, *args: str) -> str:
    result = subprocess.run([sys.executable, script, *args], cwd=os.path.join(ROOT, "benchmarks"),
                            env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_the_methods_benchmark_times_every_registered_method_against_a_plain_epoch(digits_dataset):
    printed = run_benchmark("bench_methods.py", "--data", digits_dataset, "--size", "16", "--limit", "8",
                            "--val-per-class", "2", "--repeats", "1")
    rows = [line.strip("|").split("|") for line in printed.splitlines() if line.startswith("| ")][1:]
    table = {cells[0].strip(): [cell.strip() for cell in cells[1:]] for cells in rows}
    assert set(table) == {"plain", *DISTILLERS}
    assert table["plain"][0] == "none" and float(table["plain"][3]) == 1.0
    assert table["kd"][0] == "cached" and table["crd"][0] == "cached"  # a frozen teacher's features are stored
    assert all(float(seconds) > 0 and float(ratio) > 0 for _, seconds, _, ratio in table.values())


def test_the_signal_benchmark_compares_stored_views_and_an_online_teacher_with_a_plain_epoch(digits_dataset):
    printed = run_benchmark("bench_signal.py", "--data", digits_dataset, "--size", "16", "--limit", "8",
                            "--val-per-class", "2", "--repeats", "1", "--feature-storage", "int8")
    assert "stored views (features: int8) computed once" in printed
    ratios = {line.split(":")[0].strip(): float(line.split(":")[1].split()[0])
              for line in printed.splitlines() if "/ plain" in line}
    assert set(ratios) == {"stored views / plain", "teacher online / plain", "online + mix / plain + mix"}
    assert all(ratio > 0 for ratio in ratios.values())


def test_the_epoch_benchmark_compares_kdistill_with_the_naive_loop(digits_dataset):
    printed = run_benchmark("bench_epoch.py", "--data", digits_dataset, "--sizes", "16", "--limit", "8",
                            "--val-per-class", "2", "--repeats", "1", "--only", "kd_plain", "kd_distill",
                            "naive_plain", "kd_plain_bf16")
    assert "kdistill distill / kdistill plain (loops)" in printed
    assert "kdistill distill (loop) / naive plain" in printed
    # The bf16 epoch beside the float32 one, where the CPU has the units (and said so where not).
    from kdistill.compute import cpu_has_bf16

    if cpu_has_bf16():
        speed_up = re.search(r"bf16 speed-up: float32 plain / bf16 plain \(loops\)\s+([\d.]+)\s+target >= 1\.5",
                             printed)
        assert speed_up and float(speed_up.group(1)) > 0
    else:
        assert "kd_plain_bf16 skipped: this CPU has no bf16 units" in printed


def test_the_time_to_accuracy_benchmark_runs_each_variant_once_and_compares_it_with_the_first(digits_dataset,
                                                                                             tmp_path):
    tiny = ("--set image_size=16 --set teacher.arch=resnet18 --set teacher.weights=none --set teacher.epochs=1 "
            "--set teacher.input_size=0 --set student.input_size=0 --set student.epochs=2 --set distill.views=2 "
            "--set teacher.warmup_epochs=0 --set student.warmup_epochs=1 "
            "--set teacher.batch_size=16 --set student.batch_size=16 --set deploy_check=false --set precision=fp32 "
            "--set workers=1")
    args = ("--root", str(tmp_path / "tta"), "--data", digits_dataset, "--seeds", "0",
            "--variant", f"plain={tiny}", "--variant", f"progressive@HEAD={tiny} --set student.progressive_from=0.5",
            "--sampled", f"sampled={tiny} --set teacher.epochs=4 --set student.epochs=6 --set distill.views=6")
    printed = run_benchmark("bench_time_to_accuracy.py", *args)
    lines = {line.split(":")[0]: line for line in printed.splitlines()
             if line.startswith(("plain:", "progressive:", "sampled:"))}
    assert set(lines) == {"plain", "progressive", "sampled"}
    # A variant of a commit runs that commit's files, not this checkout's (python -m would prefer the
    # working directory's package to PYTHONPATH's).
    assert f"code: {tmp_path / 'tta' / 'code-HEAD' / 'kdistill' / '__init__.py'}" in printed
    assert f"code: {os.path.join(ROOT, 'kdistill', '__init__.py')}" in printed
    assert re.search(r"student \d+\.\d\d ± 0\.00% \(epochs \d\)", lines["plain"])  # one seed: no spread
    assert re.search(r"\d\.\d\dx the reference's wall time, student [+-]\d+\.\d\d points", lines["progressive"])
    assert re.search(r"about \d+ s in all, extrapolated from a sample run of \d+ s", lines["sampled"])
    assert re.search(r"\d\.\d\dx the reference's wall time$", lines["sampled"])  # no accuracy to compare
    # Each variant is timed as a first run, with a cache of its own (a same-seed teacher's stored signal
    # would otherwise be reused by the next variant).
    assert all((tmp_path / "tta" / f"{name}.cache").is_dir() for name in ("plain", "progressive", "sampled"))
    with open(tmp_path / "tta" / "sampled" / "history" / "student.csv") as f:
        assert len(f.readlines()) == 1 + 3  # the sample's 3 epochs, not the variant's 6
    again = run_benchmark("bench_time_to_accuracy.py", *args)  # finished: read, not retrained
    assert "kdistill run" not in again and "1 invocation(s)" in again


def time_to_accuracy_benchmark():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import bench_time_to_accuracy
    finally:
        sys.path.pop(0)
    return bench_time_to_accuracy


def test_a_sampled_run_is_extrapolated_per_model_epoch_and_per_stored_view(tmp_path):
    extrapolated = time_to_accuracy_benchmark().extrapolated
    (tmp_path / "history").mkdir()
    for model, seconds in (("teacher", [10, 12]), ("student", [4, 5, 6]), ("baseline", [3, 3, 3])):
        (tmp_path / "history" / f"{model}.csv").write_text(
            "epoch,seconds\n" + "".join(f"{i},{s}\n" for i, s in enumerate(seconds, 1)))
    stages = {"prepare": 7.0, "teacher": 25.0, "teacher_signal": 8.0, "student": 16.0, "baseline": 9.0, "deploy": 2.0}
    full = {"teacher": {"epochs": 15}, "student": {"epochs": 30}, "distill": {"views": 30}}
    assert extrapolated(tmp_path, full, stages, wall=70.0) == {
        "prepare": 7.0, "teacher": 3.0 + 11.0 * 15, "teacher_signal": 8.0 * 15, "student": 1.0 + 5.0 * 30,
        "baseline": 0.0 + 3.0 * 30, "deploy": 2.0, "outside stages": 70.0 - 67.0}


def test_a_sampled_run_costs_head_epochs_and_progressive_sides_as_the_full_schedule_has_them(tmp_path):
    benchmark = time_to_accuracy_benchmark()
    settings = {"image_size": 64, "distill": {"views": 20},
                "teacher": {"epochs": 8, "head_epochs": 2, "input_size": 128, "progressive_from": 1.0},
                "student": {"epochs": 4, "input_size": 128, "progressive_from": 0.5, "progressive_until": 0.75,
                            "patience": 3}}
    flags = benchmark.sample_settings(settings)
    sample = dict(flag.split("=") for flag in flags[1::2])
    # One head epoch and one whole-model epoch of the teacher; the student's three epochs span its sides.
    assert sample == {"teacher.epochs": "2", "teacher.head_epochs": "1", "student.epochs": "3",
                      "student.progressive_until": "1.0", "student.patience": "0", "distill.views": "2",
                      "distill.teacher_signal": "views"}
    (tmp_path / "history").mkdir()
    rows = {"teacher": "epoch,seconds\n1,5\n2,12\n",  # a head epoch, then a whole-model one
            # a + b·side² with a = 1, b = 0.001 at the sides 64, 96, 128
            "student": "epoch,seconds,view_side\n1,5.096,64\n2,10.216,96\n3,17.384,128\n",
            "baseline": "epoch,seconds,view_side\n1,5.096,64\n2,10.216,96\n3,17.384,128\n"}
    for model, text in rows.items():
        (tmp_path / "history" / f"{model}.csv").write_text(text)
    stages = {"teacher": 20.0, "teacher_signal": 4.0, "student": 33.696, "baseline": 32.696}
    whole = benchmark.extrapolated(tmp_path, settings, stages, wall=90.0)
    assert whole["teacher"] == 3.0 + 5 * 2 + 12 * 6
    # The full schedule's sides: 64, 96, then 128 from epoch round(0.75 * 4) = 3 on.
    assert abs(whole["student"] - (1.0 + 5.096 + 10.216 + 17.384 * 2)) < 1e-9
    assert abs(whole["baseline"] - (0.0 + 5.096 + 10.216 + 17.384 * 2)) < 1e-9
    assert whole["teacher_signal"] == 4.0 * 20 / 2


def write_sweep_point(folder, accuracies: dict[str, list[bool]], seeds=(0, 1)):
    """A finished sweep point: metrics.json and val_predictions.csv with the given per-image correctness
    of the student and the baseline (the same on every seed)."""
    folder.mkdir(parents=True)
    rows = {kind: [{"seed": seed, "best_val_acc": sum(right) / len(right), "best_epoch": 8} for seed in seeds]
            for kind, right in accuracies.items()}
    (folder / "metrics.json").write_text(json.dumps({"seeds": rows}))
    lines = ["filename,label," + ",".join(f"{kind}-seed{seed}" for seed in seeds for kind in accuracies)]
    for i in range(len(accuracies["student"])):
        lines.append(f"{i}.png,cat," + ",".join("cat" if accuracies[kind][i] else "dog" for seed in seeds
                                                for kind in accuracies))
    (folder / "val_predictions.csv").write_text("\n".join(lines) + "\n")


def test_the_pairwise_methods_table_ranks_the_methods_and_the_baseline_and_marks_only_real_differences(tmp_path):
    baseline = [i < 50 for i in range(200)]
    write_sweep_point(tmp_path / "points" / "distill.method=kd", {"student": [i < 120 for i in range(200)],
                                                                  "baseline": baseline})
    write_sweep_point(tmp_path / "points" / "distill.method=rkd", {"student": [i < 52 for i in range(200)],
                                                                   "baseline": baseline})
    (tmp_path / "points" / "distill.method=crd").mkdir()  # not finished: left out
    printed = run_benchmark("methods_pairwise.py", str(tmp_path))
    table = [line for line in printed.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[0] for row in table] == ["| kd", "| rkd", "| baseline"]
    assert printed.startswith("3 pairs")
    kd, rkd = table[0].split(" | "), table[1].split(" | ")
    assert kd[1] == "60.00 ± 0.00%"
    # kd is right on 68 images per seed that rkd gets wrong, and never the reverse: 136/0 pooled.
    assert kd[4].startswith("136/0, Holm p") and kd[4].endswith("* (rkd)")
    assert rkd[4].startswith("4/0, Holm p") and "*" not in rkd[4] and rkd[5].startswith("4/0")


def test_the_precision_benchmark_times_a_zoo_teachers_forward_pass_in_each_variant():
    printed = run_benchmark("bench_precision.py", "--arch", "kdistill.zoo:efficientnet_lite0", "--size", "32",
                            "--batch", "4", "--rounds", "1", "--forward", "--min-time", "0.05")
    assert "kdistill.zoo:efficientnet_lite0 forward pass, 32 px, batch 4, median of 1 rounds:" in printed
    speeds = re.findall(r"^  (.+?) +(\d+\.\d) img/s +(\d\.\d\d)x float32$", printed, re.M)
    assert [name for name, _, _ in speeds] == ["fp32", "fp32 + channels_last", "bf16", "bf16 + channels_last"]
    assert float(speeds[0][2]) == 1.0 and all(float(rate) > 0 for _, rate, _ in speeds)
