"""precision: auto on the CPU picks each model's fastest finite computation by measurement, caches it
per machine, keeps it for the run (a resume computes as it started); threads: one per free core."""
import json
import os

import pytest
import torch
from torch import nn

import kdistill
import kdistill.teacher
import kdistill.train
from conftest import tiny_settings
from kdistill import precision_choice, threads
from kdistill.compute import Compute
from kdistill.config import build_config
from kdistill.fileio import load_torch, save_torch
from kdistill.inference import evaluate, predict_logits
from kdistill.sweep import baseline_settings, teacher_settings

CPU = torch.device("cpu")


def quiet(message: str) -> None:
    pass


def test_a_compute_names_its_memory_format_only_where_it_is_not_the_default():
    assert Compute.of(CPU, "bf16", True) == Compute(CPU, "bf16") and Compute(CPU, "bf16").key() == "cpu-bf16"
    assert Compute.of(CPU, "fp32", False).key() == "cpu-fp32"  # the keys of runs before per-model choices
    fp32_cl = Compute.of(CPU, "fp32", True)
    assert fp32_cl.channels_last and fp32_cl.key() == "cpu-fp32-channels_last" and fp32_cl.label() == "fp32+cl"
    bf16_plain = Compute.of(CPU, "bf16", False)
    assert not bf16_plain.channels_last and bf16_plain.label() == "bf16"
    assert fp32_cl.place(nn.Conv2d(3, 4, 3)).weight.is_contiguous(memory_format=torch.channels_last)


def test_the_fastest_finite_candidate_wins_and_a_non_finite_one_never_does():
    assert precision_choice._fastest({"fp32": 10.0, "fp32+cl": 30.0, "bf16": None, "bf16+cl": 20.0}) == "fp32+cl"
    assert precision_choice._fastest({"fp32": 10.0, "bf16+cl": None}) == "fp32"
    assert precision_choice._fastest({"fp32": None, "bf16": 5.0, "bf16+cl": 4.0}) == "bf16"
    broken = nn.Linear(4, 3)
    with torch.no_grad():
        broken.weight.fill_(float("nan"))
    images, labels = torch.rand(8, 4), torch.arange(8) % 3
    assert precision_choice.step_images_per_second(broken, Compute(CPU, "fp32"), images, labels, True, 1) is None
    assert precision_choice.step_images_per_second(nn.Linear(4, 3), Compute(CPU, "fp32"), images, labels, True, 1) > 0


def test_plain_fp32_is_kept_unless_another_candidate_is_clearly_faster():
    # Measured under load (a test worker beside a training run): bf16+cl 3% ahead of fp32, within the
    # noise; the same model measured again a minute earlier had fp32 ahead.
    assert precision_choice._fastest({"fp32": 202.9, "fp32+cl": 173.2, "bf16": 131.7, "bf16+cl": 208.3}) == "fp32"
    assert precision_choice._fastest({"fp32": 100.0, "fp32+cl": 109.0, "bf16+cl": 111.0}) == "bf16+cl"


def _fake_measure(table: dict, calls: list):
    def measure(timed, device):
        calls.append(timed["arch"])
        return dict(table)
    return measure


@pytest.fixture(autouse=True)
def forward_in_the_training_precision(monkeypatch):
    """A teacher's forward pass timed as no faster in another precision (tests that fake the training
    table would otherwise time real forward passes)."""
    monkeypatch.setattr(precision_choice, "measure_outputs", lambda timed, device, channels_last: {"fp32": 1.0,
                                                                                                    "bf16": 1.0})


def test_auto_measures_once_per_machine_and_model_and_a_run_keeps_what_it_recorded(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(precision_choice, "measure", _fake_measure({"fp32": 1.0, "fp32+cl": 3.0, "bf16+cl": 2.0}, calls))
    cfg = build_config(overrides={"cache_dir": str(tmp_path / "cache"), "precision": "auto", "threads": 1,
                                  "teacher": {"arch": "resnet34"}, "student": {"arch": "resnet18"}})
    recorded = str(tmp_path / "run" / "compute.json")
    threads_used, computes = precision_choice.choose_computation(cfg, 3, CPU, recorded, {}, quiet)
    assert threads_used == 1 and torch.get_num_threads() == 1
    assert computes == {"teacher": Compute.of(CPU, "fp32", True), "student": Compute.of(CPU, "fp32", True)}
    assert calls == ["resnet34", "resnet18"]
    assert json.load(open(recorded)) == {"threads": 1, "models": {"teacher": "fp32+cl", "student": "fp32+cl"}}
    # Another run on this machine reads the cached measurement.
    precision_choice.choose_computation(cfg, 3, CPU, str(tmp_path / "other" / "compute.json"), {}, quiet)
    assert calls == ["resnet34", "resnet18"]
    # The same run, rerun: what it recorded, whatever a new measurement would say.
    monkeypatch.setattr(precision_choice, "measure", _fake_measure({"fp32": 9.0, "bf16+cl": 1.0}, calls))
    for cached in (tmp_path / "cache" / "precision").iterdir():
        cached.unlink()
    assert precision_choice.choose_computation(cfg, 3, CPU, recorded, {}, quiet)[1]["student"].label() == "fp32+cl"
    # A setting that names the precision is every model's, unmeasured.
    fixed = build_config(overrides={"precision": "bf16", "threads": 1})
    assert set(precision_choice.choose_computation(fixed, 3, CPU, str(tmp_path / "f.json"), {}, quiet)[1].values()) == {
        Compute(CPU, "bf16")}


def test_a_damaged_cached_table_is_measured_again_and_a_given_teacher_is_not_timed(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(precision_choice, "measure", _fake_measure({"fp32": 2.0, "bf16+cl": 1.0}, calls))
    cfg = build_config(overrides={"cache_dir": str(tmp_path / "cache"), "precision": "auto", "threads": 1})
    precision_choice.choose_computation(cfg, 3, CPU, str(tmp_path / "a.json"), {}, quiet)
    for cached in (tmp_path / "cache" / "precision").iterdir():  # a table no measurement wrote
        cached.write_text(json.dumps({"images_per_second": {"fp64": 9.0, "bf16+cl": "fast"}}))
    computes = precision_choice.choose_computation(cfg, 3, CPU, str(tmp_path / "b.json"), {}, quiet)[1]
    assert len(calls) == 4 and computes["student"] == Compute(CPU, "fp32")
    given = tmp_path / "teacher.pt"
    save_torch({}, str(given))
    cfg = build_config(overrides={"cache_dir": str(tmp_path / "cache"), "precision": "auto", "threads": 1,
                                  "teacher": {"epochs": 0, "weights": str(given)}})
    computes = precision_choice.choose_computation(cfg, 3, CPU, str(tmp_path / "c.json"), {}, quiet)[1]
    assert len(calls) == 4 and computes["teacher"] == Compute(CPU, precision_choice.resolve_precision("auto", CPU))


def test_a_model_that_started_training_keeps_the_computation_its_checkpoint_records(tmp_path, monkeypatch):
    monkeypatch.setattr(precision_choice, "measure", _fake_measure({"fp32": 5.0, "bf16+cl": 1.0}, []))
    cfg = build_config(overrides={"cache_dir": str(tmp_path / "cache"), "precision": "auto", "threads": 1})
    # A baseline checkpoint from before per-model choices: bf16, the memory format its default.
    baseline = str(tmp_path / "shared" / "baseline" / "last.pt")
    os.makedirs(os.path.dirname(baseline))
    save_torch({"computed_on": {"device": "cpu", "precision": "bf16"}, "history": []}, baseline)
    _, computes = precision_choice.choose_computation(
        cfg, 3, CPU, str(tmp_path / "compute.json"), {"student": [str(tmp_path / "none.pt"), baseline]}, quiet)
    assert computes["student"] == Compute(CPU, "bf16") and computes["teacher"] == Compute(CPU, "fp32")


def test_a_teachers_outputs_take_the_precision_its_forward_pass_is_clearly_fastest_in(tmp_path, monkeypatch):
    fake = _fake_measure({"fp32": 1.0, "fp32+cl": 3.0, "bf16+cl": 2.0}, [])
    monkeypatch.setattr(precision_choice, "measure", fake)
    timed_layouts = []

    def forward(timed, device, channels_last):
        timed_layouts.append((timed["arch"], timed["trains"], channels_last))
        return {"fp32": 152.7, "bf16": 322.3}  # EfficientNet-Lite0 at 128 px on the Xeon, fp32+cl and bf16+cl
    monkeypatch.setattr(precision_choice, "measure_outputs", forward)
    cfg = build_config(overrides={"cache_dir": str(tmp_path / "cache"), "precision": "auto", "threads": 1,
                                  "teacher": {"arch": "resnet34"}, "student": {"arch": "resnet18"}})
    recorded = str(tmp_path / "run" / "compute.json")
    computes = precision_choice.choose_computation(cfg, 3, CPU, recorded, {}, quiet)[1]
    # The teacher trains in fp32 + channels_last and keeps its outputs in bf16; the student's outputs are
    # its evaluation's, in the precision it trains in.
    assert computes["teacher"] == Compute.of(CPU, "fp32", True)._replace(outputs="bf16")
    assert computes["teacher"].output_precision == "bf16" and computes["student"].output_precision == "fp32"
    assert computes["teacher"].key() == "cpu-fp32-channels_last-outputs-bf16"  # another stored signal
    assert timed_layouts == [("resnet34", False, True)]
    assert json.load(open(recorded))["models"]["teacher"] == "fp32+cl, outputs bf16"
    # A rerun reads it back; a near tie keeps the training's precision.
    assert precision_choice.choose_computation(cfg, 3, CPU, recorded, {}, quiet)[1] == computes
    assert precision_choice._fastest({"fp32": 100.0, "bf16": 108.0}, "fp32") == "fp32"
    assert precision_choice._fastest({"fp32": 120.0, "bf16": 100.0}, "bf16") == "fp32"
    with pytest.raises(ValueError):
        precision_choice._from_label(CPU, "fp32+cl, outputs fp32")  # no other precision: not a label written


def test_a_run_under_auto_trains_each_model_as_chosen_and_resumes_as_it_started(digits_dataset, tmp_path,
                                                                                 monkeypatch):
    tables = {"tiny_nets:tiny_teacher": {"fp32": 1.0, "fp32+cl": 2.0, "bf16+cl": 1.5},  # fp32 + channels_last
              "tiny_nets:tiny_student": {"fp32": 1.0, "fp32+cl": 1.2, "bf16+cl": 2.0}}  # bf16 + channels_last
    monkeypatch.setattr(precision_choice, "measure", lambda timed, device: tables[timed["arch"]])
    monkeypatch.setattr(precision_choice, "measure_outputs", lambda timed, device, channels_last: {"fp32": 1.0,
                                                                                                    "bf16": 2.0})
    settings = tiny_settings(digits_dataset, str(tmp_path / "run"), str(tmp_path / "cache"), precision="auto",
                             threads=1, teacher={"arch": "tiny_nets:tiny_teacher", "mode": "full", "epochs": 1},
                             student={"arch": "tiny_nets:tiny_student", "epochs": 2})
    teacher_passes = []

    def spied(model, batches, batch_size, device, precision="fp32", **kwargs):
        teacher_passes.append(precision)
        return predict_logits(model, batches, batch_size, device, precision, **kwargs)
    monkeypatch.setattr(kdistill.teacher, "predict_logits", spied)
    evaluations = []

    def spied_evaluate(model, batches, batch_size, device, precision="fp32", ranks=None):
        evaluations.append(precision)
        return evaluate(model, batches, batch_size, device, precision, ranks)
    monkeypatch.setattr(kdistill.train, "evaluate", spied_evaluate)
    metrics = kdistill.run(settings, log=quiet)
    assert metrics["computed_in"] == {"teacher": "fp32+cl, outputs bf16", "student": "bf16+cl"}
    assert metrics["threads"] == 1
    assert teacher_passes and set(teacher_passes) == {"bf16"}  # the teacher's stored logits: in bf16
    # Every epoch's val evaluation too: the teacher's best epoch is picked on the outputs it then gives.
    assert len(evaluations) >= 1 + 2 * 2 and set(evaluations) == {"bf16"}
    checkpoints = tmp_path / "run" / "checkpoints"
    computed_on = {name: load_torch(str(checkpoints / name / "last.pt"))["computed_on"]
                   for name in ("teacher", "student", "baseline")}
    assert computed_on["teacher"] == {"device": "cpu", "precision": "fp32", "layout": "channels_last"}
    assert computed_on["student"] == computed_on["baseline"] == {"device": "cpu", "precision": "bf16"}
    # The run again on a machine that would now choose otherwise: the finished teacher keeps what its
    # checkpoint records, the student and baseline (trained again) what the run recorded; a changed
    # computation would be refused, and nothing is measured again.
    monkeypatch.setattr(precision_choice, "measure", lambda timed, device: pytest.fail("measured again"))
    monkeypatch.setattr(precision_choice, "measure_outputs", lambda *args: pytest.fail("measured again"))
    for cached in (tmp_path / "cache" / "precision").iterdir():
        cached.unlink()
    (checkpoints / "student" / "last.pt").unlink()  # the student trains again, from its recorded choice
    (checkpoints / "baseline" / "last.pt").unlink()
    again = kdistill.run(settings, log=quiet)
    assert again["computed_in"] == metrics["computed_in"]


def test_threads_leave_the_cores_others_keep_busy(monkeypatch):
    assert [threads.auto_threads(2, others) for others in (0.0, 0.4, 0.6, 1.4, 2.0, 5.0)] == [2, 2, 1, 1, 1, 1]
    assert threads.auto_threads(8, 2.6) == 5
    assert threads.auto_threads(64, 30.0, quota=2) == 2 and threads.auto_threads(64, 63.0, quota=2) == 1
    # The CPUs' busy time less this process's own: 1.5 s busy in 1 s, 0.5 s of it ours.
    busy, own, clock = iter([100.0, 101.5]), iter([(2.0, 0.0), (2.4, 0.1)]), iter([0.0, 1.0])
    monkeypatch.setattr(threads, "_busy_seconds", lambda cpus: next(busy))
    monkeypatch.setattr(threads.os, "times", lambda: next(own))
    monkeypatch.setattr(threads.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(threads.time, "sleep", lambda seconds: None)
    assert threads.others_busy_cores() == pytest.approx(1.0)


def test_the_thread_count_comes_from_the_setting_then_omp_then_the_record(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads.choose_threads(3, 2) == (3, "setting threads")
    assert threads.choose_threads(0, 2)[1] == "OMP_NUM_THREADS"
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert threads.choose_threads(0, 2) == (2, "as this run started")
    monkeypatch.setattr(threads, "others_busy_cores", lambda: 1.0)
    monkeypatch.setattr(threads, "_affinity", lambda: {0, 1})
    monkeypatch.setattr(threads, "quota_cores", lambda: None)
    count, why = threads.choose_threads(0, None)
    assert count == 1 and "keep 1.0 of the 2 cores" in why


def test_a_busy_process_beside_this_one_is_seen():
    import subprocess
    import sys
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        assert threads.others_busy_cores(1.0) >= 0.6
    finally:
        spinner.kill()
        spinner.wait()


def test_the_thread_count_shares_no_teacher_or_baseline_apart():
    quiet_run, loaded_run = build_config(overrides={"threads": 0}), build_config(overrides={"threads": 1})
    assert teacher_settings(quiet_run) == teacher_settings(loaded_run)
    assert baseline_settings(quiet_run) == baseline_settings(loaded_run)
