"""A frozen teacher's features, where a method reads them, are stored like its logits where that is
exact (no augmentation, or stored views): computed once, in float16, served with each batch."""
import glob
import os

import pytest
import torch
from conftest import tiny_settings
from torch import nn

import kdistill
from kdistill import pipeline
from kdistill.config import build_config
from kdistill.distillers import AT, RKD, BuildContext, FitNets, Outputs, Step
from kdistill.errors import KdistillError
from kdistill.features import FeatureTaps
from kdistill.fileio import load_torch
from kdistill.models import standardized_model
from kdistill.teacher_signal import hooked_outputs
from kdistill.batches import Batches

CPU = torch.device("cpu")
TINY = {"teacher": {"arch": "tiny_nets:tiny_teacher", "epochs": 1},
        "student": {"arch": "tiny_nets:tiny_student", "epochs": 1, "lr_step": 0}}
FP16 = {"rtol": 2e-3, "atol": 2e-3}  # float16 keeps 11 significant bits


def record_student_training(monkeypatch):
    """The student's batches (input, teacher Outputs), and the teachers' forward passes made while
    the student trains."""
    seen = {"batches": [], "teacher_forwards": 0, "training": False}
    real_fit, real_train_teachers = pipeline.fit, pipeline.train_teachers

    def counting_train_teachers(*args, **kwargs):
        teachers = real_train_teachers(*args, **kwargs)
        for trained in teachers.values():
            def count(module, inputs, output):
                seen["teacher_forwards"] += seen["training"]
            trained.model.register_forward_hook(count)
        return teachers

    def recording_fit(name, model, trainable, train, *args, **kwargs):
        if name != "student":
            return real_fit(name, model, trainable, train, *args, **kwargs)
        real_iterate = train.iterate

        def iterate(*iterate_args, **iterate_kwargs):
            for batch in real_iterate(*iterate_args, **iterate_kwargs):
                seen["batches"].append((batch.x.clone(), batch.teacher))
                yield batch
        train.iterate = iterate
        seen["training"] = True
        try:
            return real_fit(name, model, trainable, train, *args, **kwargs)
        finally:
            seen["training"] = False
    monkeypatch.setattr(pipeline, "fit", recording_fit)
    monkeypatch.setattr(pipeline, "train_teachers", counting_train_teachers)
    return seen


def saved_teacher(out: str) -> nn.Module:
    model, _, _ = standardized_model("tiny_nets:tiny_teacher", 3, 0.0, "none", "dataset", [0.0] * 3, [1.0] * 3)
    model.load_state_dict(load_torch(os.path.join(out, "models", "teacher.pt")))
    return model.eval()


@pytest.mark.parametrize("augment, signal", [("none", "cached"), ("flip", "views")])
def test_stored_teacher_features_are_the_teachers_on_exactly_the_served_inputs(digits_dataset, tmp_path,
                                                                              monkeypatch, augment, signal):
    seen = record_student_training(monkeypatch)
    out, messages = str(tmp_path / "run"), []
    settings = tiny_settings(digits_dataset, out, str(tmp_path / "cache"), baseline=False, augment=augment,
                             **TINY, distill={"method": "fitnets"})
    metrics = kdistill.run(settings, log=messages.append)
    assert metrics["teacher_signal"] == signal
    assert seen["teacher_forwards"] == 0  # the student's epoch ran no teacher
    teacher = saved_teacher(out)
    taps = FeatureTaps(teacher, ["layer2"], "the teacher")
    assert len(seen["batches"]) == 1 + 5  # the probe that sizes the regressor, then 72 images in batches of 16
    for x, served in seen["batches"]:
        with torch.no_grad():
            logits = teacher(x)
        hooked = taps.take()["layer2"]
        assert served.features["layer2"].dtype == torch.float32 and served.features["layer2"].shape == hooked.shape
        torch.testing.assert_close(served.features["layer2"], hooked, **FP16)
        torch.testing.assert_close(served.logits, logits, rtol=1e-4, atol=1e-4)
    views = "images and views" if signal == "views" else "images"
    assert f"teacher signal: features at layer2 (16, 8, 8) of {72 * (2 if signal == 'views' else 1)} {views} take " \
           f"{72 * (2 if signal == 'views' else 1) * 16 * 8 * 8 * 2 / 2**20:.1f} MB in float16" in messages
    assert len(glob.glob(str(tmp_path / "cache" / "*" / "signal" / "teacher-features-*.pt"))) == 1


def test_stored_features_above_the_memory_limit_are_refused_in_one_line(digits_dataset, tmp_path):
    settings = tiny_settings(digits_dataset, str(tmp_path / "run"), str(tmp_path / "cache"), baseline=False, **TINY,
                             distill={"method": "fitnets", "teacher_signal": "cached", "max_signal_memory_gb": 1e-5})
    with pytest.raises(KdistillError) as error:
        kdistill.run(settings, log=lambda message: None)
    assert str(error.value) == (
        "setting distill.teacher_signal=cached: the teacher features of 72 images need 0.00 GB in int8, above "
        "distill.max_signal_memory_gb=1e-05; set distill.teacher_signal=online, or raise "
        "distill.max_signal_memory_gb")


def test_under_auto_features_above_the_limit_make_the_teacher_run_online(digits_dataset, tmp_path, monkeypatch):
    seen = record_student_training(monkeypatch)
    messages = []
    settings = tiny_settings(digits_dataset, str(tmp_path / "run"), str(tmp_path / "cache"), baseline=False, **TINY,
                             distill={"method": "fitnets", "max_signal_memory_gb": 1e-5})
    metrics = kdistill.run(settings, log=messages.append)
    assert metrics["teacher_signal"] == "online" and seen["teacher_forwards"] == 1 + 5  # probe, then each batch
    assert ("teacher signal: online, the teacher runs on every training batch (its features would not fit in "
            "distill.max_signal_memory_gb=1e-05)") in messages
    with open(tmp_path / "run" / "report.md") as f:
        assert ("teacher signal online (the teacher ran on every training batch; its features would not fit in "
                "distill.max_signal_memory_gb=1e-05)") in f.read()
    assert metrics["teacher_signal_reason"] == "its features would not fit in distill.max_signal_memory_gb=1e-05"


def test_auto_stores_random_crops_with_a_view_per_epoch_and_features_that_fit(digits_dataset, tmp_path, monkeypatch):
    """The recommended preset's case: rrc_flip with distill.views >= student.epochs stores the views,
    logits and features alike, and the teacher never runs while the student trains; where the
    features would not fit, the same settings run the teacher online, saying why."""
    seen = record_student_training(monkeypatch)
    tiny = {"teacher": TINY["teacher"], "student": {**TINY["student"], "epochs": 2}}

    def run(name, limit):
        messages = []
        settings = tiny_settings(digits_dataset, str(tmp_path / name), str(tmp_path / "cache"), baseline=False,
                                 augment="rrc_flip", **tiny, distill={
                                     "method": "fitnets", "views": 2, "max_signal_memory_gb": limit,
                                     "fitnets": {"kd": True, "teacher_layer": "auto"}})
        seen["teacher_forwards"] = 0
        return kdistill.run(settings, log=messages.append), messages
    metrics, messages = run("stored", 4.0)
    assert metrics["teacher_signal"] == "views" and seen["teacher_forwards"] == 0
    assert len(glob.glob(str(tmp_path / "cache" / "*" / "signal" / "teacher-features-*.pt"))) == 1
    metrics, messages = run("online", 1e-5)
    assert metrics["teacher_signal"] == "online" and seen["teacher_forwards"] == 1 + 2 * 5  # probe, each batch
    assert ("teacher signal: online, the teacher runs on every training batch (its features would not fit in "
            "distill.max_signal_memory_gb=1e-05)") in messages


@pytest.mark.parametrize("augment, passes", [("none", [1]), ("flip", [2])])
def test_logits_and_features_are_stored_from_one_pass_of_the_teacher(digits_dataset, tmp_path, monkeypatch,
                                                                     augment, passes):
    """A feature method's stored signal costs one teacher pass over the images (or each stored view),
    not one for the logits and another for the features; a second run reuses both files."""
    from kdistill import teacher as teacher_module

    made = []
    real_hooked_outputs = teacher_module.hooked_outputs

    def counting(model, paths, view_batches, *args):
        made.append(len(view_batches))
        return real_hooked_outputs(model, paths, view_batches, *args)

    def no_separate_logits_pass(*args, **kwargs):
        raise AssertionError("the teacher's logits were computed in a pass of their own")
    monkeypatch.setattr(teacher_module, "hooked_outputs", counting)
    monkeypatch.setattr(teacher_module, "predict_logits", no_separate_logits_pass)
    for run in ("first", "second"):
        settings = tiny_settings(digits_dataset, str(tmp_path / run), str(tmp_path / "cache"), baseline=False,
                                 augment=augment, **TINY, distill={"method": "fitnets", "fitnets": {"kd": True}})
        assert kdistill.run(settings)["teacher_signal"] == ("views" if augment == "flip" else "cached")
        assert made == passes  # the second run's teacher is the same weights: both files are reused
    signal = glob.glob(str(tmp_path / "cache" / "*" / "signal" / "*.pt"))
    kinds = sorted(os.path.basename(path).rsplit("-", 1)[0] for path in signal)
    assert kinds == sorted(["teacher-features", "views" if augment == "flip" else "logits"])


def test_auto_stores_features_where_exact():
    assert build_config(sets=["distill.method=at"]).signal_mode() == "cached"
    assert build_config(sets=["distill.method=at", "augment=flip"]).signal_mode() == "views"
    assert build_config(sets=["distill.method=at", "augment=crop_flip"]).signal_mode() == "online"
    assert build_config(sets=["distill.method=at", "augment=flip", "mix=mixup"]).signal_mode() == "online"


def feature_batches(count=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(count, 3, 16, 16, generator=generator)
    return Batches(images, torch.arange(count) % 3, lambda x: x)


def test_float16_features_change_the_feature_methods_loss_terms_by_less_than_a_thousandth():
    from tiny_nets import tiny_student, tiny_teacher

    torch.manual_seed(0)
    teacher, student = tiny_teacher().eval(), tiny_student().eval()
    batches = feature_batches()
    paths = ["layer1", "layer2", "avgpool"]
    stored = {dtype: hooked_outputs(teacher, paths, [batches], 32, CPU, dtype=dtype)[1] for dtype in
              (torch.float16, torch.float32)}
    assert stored[torch.float16]["layer2"].dtype == torch.float16
    taps = FeatureTaps(student, paths, "the student")
    with torch.no_grad():
        student_logits = student(batches.inputs)
    student_features = taps.take()
    labels = batches.labels
    methods = [FitNets(settings=FitNets.Settings("layer2", "layer2")), AT(), RKD(settings=RKD.Settings("avgpool",
                                                                                                         "avgpool"))]
    methods[1].settings.student_layers = methods[1].settings.teacher_layers = ["layer1", "layer2"]
    for method in methods:
        teacher_probe = {path: value[:, 0] for path, value in stored[torch.float32].items()}
        method.build(BuildContext(student_features, teacher_probe, 32))
        terms = {}
        for dtype, features in stored.items():
            teacher_outputs = Outputs(torch.zeros(32, 10), {path: value[:, 0].float() for path, value in
                                                            features.items()})
            with torch.no_grad():
                terms[dtype] = method(Step(Outputs(student_logits, student_features), labels, teacher_outputs))
        for name, value in terms[torch.float32].items():
            assert abs(terms[torch.float16][name] - value) <= 1e-3 * abs(value) + 1e-7, (type(method), name)


def test_features_beyond_float16s_range_are_stored_in_float32():
    loud = nn.Sequential()
    loud.add_module("layer1", nn.Linear(3 * 16 * 16, 4))
    nn.init.constant_(loud.layer1.weight, 1000.0)
    flat = Batches(torch.ones(4, 3 * 16 * 16), torch.zeros(4, dtype=torch.int64), lambda x: x)
    assert hooked_outputs(loud, ["layer1"], [flat], 4, CPU, dtype=torch.float16) is None
    logits, features = hooked_outputs(loud, ["layer1"], [flat], 4, CPU, dtype=torch.float32)
    assert features["layer1"].max() > 65504 and logits.shape == (4, 1, 4) and logits.dtype == torch.float32
