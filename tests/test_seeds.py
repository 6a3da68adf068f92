"""Several seeds: one teacher, a student and a baseline per seed, mean ± std and McNemar's paired test."""
import csv
import math
import os
import re
import shutil
import statistics

import pytest
import torch
import yaml

import kdistill
from conftest import tiny_settings
from kdistill import cli
from kdistill.export import load_bundle
from kdistill.fileio import load_torch
from kdistill.images import load_image
from kdistill.models import standardized_model
from kdistill.report import markdown
from kdistill.significance import discordant_counts, mcnemar, mean_std, summarize_seeds

EPOCH_LINE = re.compile(r"^([\w-]+) epoch \d+/\d+:")
ARCH = "shufflenet_v2_x0_5"

# ---------------------------------------------------------------- the statistics, by hand


def test_mcnemar_exact_binomial_for_few_discordant_images():
    result = mcnemar(10, 2)
    # Two-sided: twice the probability of 2 or fewer of 12 fair coin flips landing on c's side.
    by_hand = 2 * sum(math.comb(12, k) for k in range(3)) / 2**12
    assert by_hand == pytest.approx(0.0385742, abs=1e-7)  # 158 / 4096, the textbook value
    assert result["test"] == "exact binomial" and (result["b"], result["c"]) == (10, 2)
    assert result["p_value"] == pytest.approx(by_hand, rel=1e-12)
    assert mcnemar(2, 10)["p_value"] == pytest.approx(by_hand, rel=1e-12)  # two-sided: symmetric
    assert mcnemar(12, 12)["p_value"] == 1.0 and mcnemar(0, 0)["p_value"] == 1.0  # capped at 1; no data
    assert mcnemar(20, 4)["test"] == "exact binomial"  # 24 discordant images: still exact


def test_mcnemar_chi_square_with_continuity_correction_from_25_discordant_images():
    result = mcnemar(40, 20)
    statistic = (abs(40 - 20) - 1) ** 2 / (40 + 20)  # 361 / 60
    assert result["test"] == "chi-square with continuity correction"
    assert result["statistic"] == pytest.approx(361 / 60, rel=1e-12)
    # The chi-square(1) survival function: P(|Z| > sqrt(x)) for a standard normal Z.
    assert result["p_value"] == pytest.approx(math.erfc(math.sqrt(statistic / 2)), rel=1e-9)
    assert result["p_value"] == pytest.approx(0.014171, abs=1e-6)
    assert mcnemar(15, 10)["test"] == "chi-square with continuity correction"  # 25: the boundary


def test_discordant_counts_count_images_only_one_model_gets_right():
    student = [True, True, False, False, True, False]
    baseline = [True, False, True, False, False, False]
    assert discordant_counts(student, baseline) == (2, 1)


def test_mean_and_sample_std_over_seeds():
    assert mean_std([0.5, 0.7, 0.9]) == {"mean": pytest.approx(0.7), "std": pytest.approx(0.2)}  # ddof=1
    assert mean_std([0.8]) == {"mean": 0.8, "std": None}
    rows = {"student": [{"seed": 3, "best_val_acc": 0.9, "final_val_acc": 0.8},
                        {"seed": 5, "best_val_acc": 0.8, "final_val_acc": 0.8},
                        {"seed": 7, "best_val_acc": 0.7, "final_val_acc": 0.5}],
            "baseline": [{"seed": 3, "best_val_acc": 0.6, "final_val_acc": 0.6},
                         {"seed": 5, "best_val_acc": 0.7, "final_val_acc": 0.6},
                         {"seed": 7, "best_val_acc": 0.7, "final_val_acc": 0.6}]}
    summary = summarize_seeds(rows, [(10, 2), (6, 3), (4, 4)])
    assert summary["seeds"] == [3, 5, 7] and summary["exported_seed"] == 3
    assert summary["student"]["best_val_acc"]["mean"] == pytest.approx(0.8)
    assert summary["student"]["best_val_acc"]["std"] == pytest.approx(0.1)
    assert summary["student"]["final_val_acc"]["mean"] == pytest.approx(0.7)
    assert summary["student"]["final_val_acc"]["std"] == pytest.approx(math.sqrt(0.03))  # (.01+.01+.04)/2
    assert summary["baseline"]["best_val_acc"]["std"] == pytest.approx(math.sqrt(1 / 300))  # .6,.7,.7
    # Gains per seed: +0.3, +0.1, 0.0.
    assert summary["gain_best_val_acc"]["mean"] == pytest.approx(0.4 / 3)
    assert summary["gain_best_val_acc"]["std"] == pytest.approx(math.sqrt(((0.3 - 0.4 / 3) ** 2 + (0.1 - 0.4 / 3) ** 2
                                                                           + (0.4 / 3) ** 2) / 2))
    tests = summary["mcnemar"]
    assert [(t["seed"], t["b"], t["c"]) for t in tests["per_seed"]] == [(3, 10, 2), (5, 6, 3), (7, 4, 4)]
    assert tests["per_seed"][0]["p_value"] == pytest.approx(158 / 4096)
    assert (tests["pooled"]["b"], tests["pooled"]["c"]) == (20, 9)
    assert tests["pooled"]["statistic"] == pytest.approx((11 - 1) ** 2 / 29)  # 29 discordant: chi-square
    assert "mcnemar" not in summarize_seeds({"student": rows["student"]}, [])  # no baseline, no paired test


def report_text(metrics_extra: dict, seeds: list[int]) -> str:
    model = {"arch": "resnet18", "seed": 0, "best_val_acc": 0.9, "best_epoch": 3, "final_val_acc": 0.85,
             "epochs": 4, "size_mb": 42.7, "params": 11e6, "gflops": 0.03, "latency_ms": 1.0, "train_seconds": 9}
    metrics = {"classes": 3, "images": {"train": 72, "val": 2600}, "skipped_files": 0, "device": "cpu",
               "teacher_signal": "cached", "stage_seconds": {}, **metrics_extra,
               "models": {"teacher": model, "student": model, "baseline": {**model, "best_val_acc": 0.87}}}
    config = {"data": "DATA", "image_size": 16, "seed": 0, "seeds": seeds,
              "distill": {"method": "kd", "temperature": 4.0, "alpha": 0.7}}
    return markdown(metrics, config)


def test_the_report_says_whether_the_gain_is_larger_than_the_noise():
    single = report_text({"mcnemar": mcnemar(120, 70)}, [])
    assert "by +3.0 points" in single and "wrong 120 times and the reverse 70 times" in single
    assert "chi-square with continuity correction, p = 0.00038" in single
    assert "the gain is larger than the noise" in single
    rows = {"student": [{"seed": s, "best_val_acc": a, "best_epoch": 2, "final_val_acc": a} for s, a in
                        ((0, 0.90), (1, 0.92))],
            "baseline": [{"seed": s, "best_val_acc": a, "best_epoch": 2, "final_val_acc": a} for s, a in
                         ((0, 0.89), (1, 0.92))]}
    noisy = report_text({"seeds": rows, "summary": summarize_seeds(rows, [(30, 26), (20, 20)])}, [0, 1])
    assert "Over 2 seeds the distilled student is 0.5 ± 0.7 points above the baseline" in noisy
    assert "wrong 50 times and the reverse 46 times" in noisy and "not distinguishable from noise" in noisy
    assert "| 0 | 90.00% (2) | 90.00% | 89.00% (2) | 89.00% | +1.0 | 30 | 26 |" in noisy
    assert "Distilled student (seed 0)" in noisy and "seed 0's (the first listed)" in noisy
    alone = report_text({"seeds": {"student": rows["student"]},
                         "summary": summarize_seeds({"student": rows["student"]}, [])}, [0, 1])
    assert "distilled student 91.0 ± 1.4% best" in alone and "McNemar" not in alone


# ---------------------------------------------------------------- a run over two seeds


@pytest.fixture(scope="module")
def two_seed_run(digits_dataset, tmp_path_factory):
    base = tmp_path_factory.mktemp("seeds")
    # A small architecture: every epoch writes its checkpoints, and there are nine.
    # keep_checkpoints: a test below turns a finished model back into one killed mid-training.
    settings = tiny_settings(digits_dataset, str(base / "run"), str(base / "cache"), seeds=[0, 1],
                             keep_checkpoints=True, teacher={"arch": ARCH, "epochs": 1},
                             student={"arch": ARCH, "epochs": 2})
    messages = []
    metrics = kdistill.run(settings, log=messages.append)
    return str(base / "run"), metrics, messages


def read_history(out: str, name: str) -> list[dict]:
    with open(os.path.join(out, "history", f"{name}.csv")) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def test_one_teacher_and_a_student_and_a_baseline_per_seed(two_seed_run):
    out, metrics, messages = two_seed_run
    trained = [EPOCH_LINE.match(m).group(1) for m in messages if EPOCH_LINE.match(m)]
    assert trained == ["teacher", "student-seed0", "student-seed0", "baseline-seed0", "baseline-seed0",
                       "student-seed1", "student-seed1", "baseline-seed1", "baseline-seed1"]
    assert sorted(os.listdir(os.path.join(out, "history"))) == [
        "baseline-seed0.csv", "baseline-seed1.csv", "student-seed0.csv", "student-seed1.csv", "teacher.csv"]
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == [
        "baseline-seed0", "baseline-seed1", "student-seed0", "student-seed1", "teacher"]
    for kind in ("student", "baseline"):
        assert [row["seed"] for row in metrics["seeds"][kind]] == [0, 1]
        for row in metrics["seeds"][kind]:
            history = read_history(out, f"{kind}-seed{row['seed']}")
            best = max(history, key=lambda r: r["val_acc"])
            assert (row["best_val_acc"], row["best_epoch"], row["final_val_acc"]) == \
                (best["val_acc"], best["epoch"], history[-1]["val_acc"])
        # The reported model is the first seed's.
        first = metrics["seeds"][kind][0]
        assert metrics["models"][kind]["seed"] == 0
        assert metrics["models"][kind]["best_val_acc"] == first["best_val_acc"]
        best_values = [row["best_val_acc"] for row in metrics["seeds"][kind]]
        assert metrics["summary"][kind]["best_val_acc"]["mean"] == pytest.approx(statistics.fmean(best_values))
        assert metrics["summary"][kind]["best_val_acc"]["std"] == pytest.approx(statistics.stdev(best_values))
    assert metrics["summary"]["exported_seed"] == 0
    # The seeds differ: two students trained from other initial weights in another order.
    student_weights = [load_torch(os.path.join(out, "models", f"student-seed{s}.pt")) for s in (0, 1)]
    assert not torch.equal(student_weights[0]["model.fc.weight"], student_weights[1]["model.fc.weight"])
    bundle_model, _ = load_bundle(os.path.join(out, "student.pt"))
    assert torch.equal(bundle_model.state_dict()["model.fc.weight"], student_weights[0]["model.fc.weight"])


def test_mcnemar_counts_are_those_of_the_saved_best_weights(two_seed_run, digits_dataset):
    out, metrics, _ = two_seed_run
    with open(os.path.join(out, "val_predictions.csv")) as f:
        rows = list(csv.DictReader(f))
    classes = metrics["class_names"]
    files = [row["filename"] for row in rows]
    assert sorted(files) == sorted(os.path.join(c, f) for c in classes
                                   for f in os.listdir(os.path.join(digits_dataset, "val", c)))
    images = torch.stack([torch.from_numpy(load_image(os.path.join(digits_dataset, "val", f), 16)) for f in files])
    labels = [row["label"] for row in rows]
    assert labels == [os.path.dirname(f) for f in files]

    def predictions(name: str) -> list[str]:
        model, _, _ = standardized_model(ARCH, 3, 0.0, "none", "dataset", [0.0] * 3, [1.0] * 3)
        model.load_state_dict(load_torch(os.path.join(out, "models", f"{name}.pt")))
        with torch.no_grad():
            return [classes[i] for i in model.eval()(images.float() / 255).argmax(1).tolist()]

    pooled = [0, 0]
    for position, seed in enumerate((0, 1)):
        right = {}
        for kind in ("student", "baseline"):
            predicted = predictions(f"{kind}-seed{seed}")
            assert predicted == [row[f"{kind}-seed{seed}"] for row in rows]
            right[kind] = [p == label for p, label in zip(predicted, labels)]
            accuracy = sum(right[kind]) / len(labels)
            assert accuracy == pytest.approx(metrics["seeds"][kind][position]["best_val_acc"], abs=1e-6)
        b = sum(s and not r for s, r in zip(right["student"], right["baseline"]))
        c = sum(r and not s for s, r in zip(right["student"], right["baseline"]))
        test = metrics["summary"]["mcnemar"]["per_seed"][position]
        assert (test["seed"], test["b"], test["c"]) == (seed, b, c)
        assert test["p_value"] == pytest.approx(mcnemar(b, c)["p_value"])
        pooled = [pooled[0] + b, pooled[1] + c]
    assert [metrics["summary"]["mcnemar"]["pooled"][k] for k in ("b", "c")] == pooled
    report = open(os.path.join(out, "report.md"), encoding="utf-8").read()
    assert "students over seeds 0, 1" in report and "## Over seeds" in report
    assert f"wrong {pooled[0]} times and the reverse {pooled[1]} times (McNemar's test" in report
    assert re.search(r"Over 2 seeds the distilled student is \d+\.\d ± \d+\.\d points (above|below)", report)


def test_a_run_killed_in_the_last_seed_resumes_there_without_retraining_finished_seeds(two_seed_run, tmp_path):
    out, metrics, _ = two_seed_run
    stopped = str(tmp_path / "stopped")
    shutil.copytree(out, stopped)
    # The state a kill during baseline-seed1's second epoch leaves: its checkpoint holds epoch 1
    # (the previous good copy), every earlier stage is finished, no metrics yet.
    checkpoint = os.path.join(stopped, "checkpoints", "baseline-seed1", "last.pt")
    os.replace(checkpoint + ".prev", checkpoint)
    os.remove(os.path.join(stopped, "metrics.json"))
    settings = yaml.safe_load(open(os.path.join(out, "config.yaml")))
    messages = []
    resumed = kdistill.run({**settings, "out": stopped}, log=messages.append)
    assert [m.split(":")[0] for m in messages if EPOCH_LINE.match(m)] == ["baseline-seed1 epoch 2/2"]
    assert "baseline-seed1: resuming after epoch 1 of 2" in messages
    assert resumed["seeds"] == metrics["seeds"] and resumed["summary"] == metrics["summary"]
    without_time = [{k: v for k, v in row.items() if k != "seconds"} for row in read_history(out, "baseline-seed1")]
    assert [{k: v for k, v in row.items() if k != "seconds"} for row in read_history(stopped, "baseline-seed1")] \
        == without_time


def test_seeds_from_the_command_line_and_their_validation(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert cli.main(["run", "--data", str(tmp_path), "--out", out, "--seeds", "2,0,1", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["seeds"] == [2, 0, 1]
    assert cli.main(["run", "--data", str(tmp_path), "--out", out, "--seeds", "1,1"]) == 2
    assert capsys.readouterr().err.strip() == "kdistill: error: setting seeds must not repeat a seed, got [1, 1]"
    assert kdistill.build_config(sets=["seeds=[4, 5]"]).seeds == [4, 5]
    assert kdistill.build_config().seeds == []
