"""The run says when it is going wrong: small data, a model at the majority-class rate, a diverging
loss, a teacher no larger or less accurate than its student."""
import numpy as np

import kdistill
from kdistill import diagnose

from conftest import tiny_settings

FROM_SCRATCH = {"arch": "resnet18", "weights": "none"}


def model(acc, params=11e6, gflops=1.8):
    return {"best_val_acc": acc, "params": params, "gflops": gflops}


def test_small_data_is_named_only_for_a_student_from_scratch():
    labels = np.repeat([0, 1], [300, 150])
    warning, = diagnose.small_data(labels, ["ants", "bees"], FROM_SCRATCH)
    assert "150 training images in class 'bees'" in warning and "student.weights=imagenet" in warning
    assert diagnose.small_data(labels, ["ants", "bees"], {"arch": "resnet18", "weights": "imagenet"}) == []
    assert diagnose.small_data(labels, ["ants", "bees"], {"arch": "kdistill.zoo:efficientnet_lite0",
                                                          "weights": "none"}) == []
    assert diagnose.small_data(np.repeat([0, 1], 200), ["ants", "bees"], FROM_SCRATCH) == []


def test_a_model_at_the_majority_class_rate_is_named():
    val = np.repeat([0, 1, 2], [60, 20, 20])  # always answering class 0 scores 60%
    warnings = diagnose.majority_class({"student": model(0.60), "baseline": model(0.61), "teacher": model(0.62)}, val)
    assert len(warnings) == 2 and warnings[0].startswith("student ends at the majority-class rate")
    assert "60.00%" in warnings[0] and warnings[1].startswith("baseline")


def test_a_diverging_val_loss_is_named_and_ordinary_overfitting_is_not():
    rising = [{"epoch": e, "val_loss": loss} for e, loss in enumerate([2.0, 0.9, 0.7, 1.4, 2.1], 1)]
    exploded = [{"epoch": 1, "val_loss": 1.2}, {"epoch": 2, "val_loss": 802046.0}, {"epoch": 3, "val_loss": 1.1}]
    warning, = diagnose.diverged({"student": rising, "baseline": exploded}, 10)
    assert warning.startswith("baseline's val loss diverged: 8.02e+05 at epoch 2")


def test_a_teacher_smaller_or_weaker_than_its_student_is_named():
    big = model(0.80, params=11e6, gflops=1.8)
    assert diagnose.teacher_against_student({"teacher": model(0.9, 21e6, 3.6), "student": big}) == []
    smaller, weaker = diagnose.teacher_against_student({"teacher": model(0.79, 3.4e6, 0.25), "student": big})
    assert "no larger than its student (11.0M" in smaller and "less accurate than its student (80.00%)" in weaker


def test_a_run_writes_its_warnings_to_the_log_metrics_and_reports(digits_dataset, tmp_path):
    lines = []
    metrics = kdistill.run(tiny_settings(digits_dataset, str(tmp_path / "run"), str(tmp_path / "cache"),
                                         teacher={"arch": "tiny_nets:tiny_student", "epochs": 1},
                                         student={"arch": "tiny_nets:tiny_teacher", "epochs": 1}), log=lines.append)
    assert any("no larger than its student" in warning for warning in metrics["warnings"])
    assert [line for line in lines if line.startswith("warning: ")] == [f"warning: {w}" for w in metrics["warnings"]]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Warnings" in report and report.index("## Warnings") < report.index("| Model |")
    assert report.splitlines()[2].startswith("**The distilled student (tiny_nets:tiny_teacher) reaches ")
    assert "no larger than its student" in (tmp_path / "run" / "report.html").read_text()


def test_the_verdict_states_student_teacher_baseline_significance_and_deployed_cost():
    from kdistill.run_verdict import run_verdict

    metrics = {"models": {"teacher": {"best_val_acc": 0.86, "best_epoch": 12, "arch": "resnet34"},
                          "student": {"best_val_acc": 0.8485, "best_epoch": 30, "arch": "resnet18",
                                      "size_mb": 42.7, "params": 11.2e6},
                          "baseline": {"best_val_acc": 0.7588, "best_epoch": 26, "arch": "resnet18"}},
               "mcnemar": {"b": 340, "c": 105, "p_value": 1e-28, "test": "exact"},
               "deployment": {"student_onnx_int8": {"size_mb": 10.8, "latency_ms_b1": 1.25, "threads": 2}}}
    assert run_verdict(metrics) == (
        "The distilled student (resnet18) reaches 84.85% (epoch 30) val accuracy, 1.1 points under its teacher "
        "(86.00%) and +9.0 points against the same student without a teacher (McNemar p = 1e-28: the gain is "
        "larger than the noise); deployed as int8 ONNX it is 10.8 MiB and takes 1.25 ms per image on this CPU "
        "(2 threads).")
    del metrics["deployment"], metrics["models"]["baseline"], metrics["mcnemar"]
    assert run_verdict(metrics).endswith("under its teacher (86.00%); it is 42.7 MiB with 11.2M parameters.")
