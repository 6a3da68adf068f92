"""Online and self distillation: DML (a peer trained beside the student) and born-again networks
(generations of the student, each taught by the one before)."""
import dataclasses
import math
import os
import re

import pytest
import torch
from conftest import tiny_settings

import kdistill
from kdistill import pipeline
from kdistill.config import TrainConfig, build_config
from kdistill.distillers import DKD, DML, BuildContext, Outputs, Step
from kdistill.student_plan import BornAgainSettings, born_again_problems
from kdistill.errors import KdistillError
from kdistill.fileio import load_torch
from kdistill.batches import Batches
from kdistill.inference import predict_logits
from kdistill.train import fit
from kdistill.callbacks import Session

CPU = torch.device("cpu")
STUDENT = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [2.0, 0.0, 1.0]]
PEER = [[2.0, 1.0, 0.0], [0.5, 0.5, 2.0], [0.0, 1.5, 2.5]]  # top classes 0, 2, 2
LABELS = [1, 2, 0]


def softmax(values):
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def cross_entropy(rows, labels):
    """Mean over the labelled rows (label >= 0)."""
    losses = [-math.log(softmax(row)[y]) for row, y in zip(rows, labels) if y >= 0]
    return sum(losses) / len(losses)


def dml_with_peer_logits(student, peer, labels):
    """DML whose peer is the identity: the `inputs` it is given are the peer's logits."""
    dml = DML()
    dml.build(BuildContext(make_model=lambda arch: torch.nn.Identity()))
    student, peer = torch.tensor(student, requires_grad=True), torch.tensor(peer, requires_grad=True)
    return student, peer, dml(Step(Outputs(student), torch.tensor(labels), inputs=peer))


# ---------------------------------------------------------------- DML's terms, by hand


def test_dml_terms_equal_the_papers_formulas_computed_by_hand():
    _, _, terms = dml_with_peer_logits(STUDENT, PEER, LABELS)
    kl_to_student = sum(kl(softmax(p), softmax(s)) for s, p in zip(STUDENT, PEER)) / 3
    kl_to_peer = sum(kl(softmax(s), softmax(p)) for s, p in zip(STUDENT, PEER)) / 3
    expected = {"ce": cross_entropy(STUDENT, LABELS), "kl": kl_to_student, "peer_ce": cross_entropy(PEER, LABELS),
                "peer_kl": kl_to_peer, "peer_acc": 1 / 3}  # the peer's top classes 0, 2, 2: only the second is right
    expected["loss"] = expected["ce"] + expected["kl"] + expected["peer_ce"] + expected["peer_kl"]
    assert set(terms) == set(expected)
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-5), name


def test_dml_each_network_learns_from_its_own_loss_only_the_other_held_constant():
    student, peer, terms = dml_with_peer_logits(STUDENT, PEER, LABELS)
    terms["loss"].backward()
    for own, other, gradient in ((STUDENT, PEER, student.grad), (PEER, STUDENT, peer.grad)):
        for row, other_row, y, row_gradient in zip(own, other, LABELS, gradient.tolist()):
            p, q = softmax(row), softmax(other_row)
            # d/dz [CE(z, y) + KL(q || softmax(z))] = (p - onehot(y)) + (p - q), over a batch of 3
            by_hand = [((p[k] - (k == y)) + (p[k] - q[k])) / 3 for k in range(3)]
            assert row_gradient == pytest.approx(by_hand, abs=1e-6)


def test_dml_unlabelled_images_only_drop_the_cross_entropy_terms():
    labels = [1, -1, -1]
    _, _, terms = dml_with_peer_logits(STUDENT, PEER, labels)
    assert terms["ce"].item() == pytest.approx(cross_entropy(STUDENT, labels), rel=1e-5)
    assert terms["peer_ce"].item() == pytest.approx(cross_entropy(PEER, labels), rel=1e-5)
    assert terms["kl"].item() == pytest.approx(sum(kl(softmax(p), softmax(s)) for s, p in zip(STUDENT, PEER)) / 3,
                                               rel=1e-5)
    assert terms["peer_acc"].item() == 0.0  # the one labelled image (label 1) is the peer's class 0
    _, _, none_labelled = dml_with_peer_logits(STUDENT, PEER, [-1, -1, -1])
    assert none_labelled["ce"].item() == 0.0 and math.isfinite(none_labelled["loss"].item())


def test_settings_problems_name_the_bad_value():
    assert DML.problems(DML.Settings()) == []
    assert DML.problems(DML.Settings(peer="resnet34")) == []
    assert DML.problems(DML.Settings(peer="tiny_nets:tiny_student")) == []
    assert DML.problems(DML.Settings(peer="timm:resnet10t")) == []
    assert [name for name, _ in DML.problems(DML.Settings(peer="resnet9000"))] == ["peer"]
    # A peer is checked as an architecture is: importable, and callable.
    assert [name for name, _ in DML.problems(DML.Settings(peer="no_such_module:fn"))] == ["peer"]
    assert born_again_problems(BornAgainSettings()) == []
    assert born_again_problems(BornAgainSettings(base="dkd")) == []
    with pytest.raises(KdistillError, match="distill.born_again.generations must be >= 1"):
        build_config(sets=["distill.method=born_again", "distill.born_again.generations=0"])
    for base in ("at", "dml", "born_again", "nope"):  # features, no teacher, itself, unknown
        assert [name for name, _ in born_again_problems(BornAgainSettings(base=base))] == ["base"], base
    with pytest.raises(KdistillError, match="distill.born_again.base must be a method that reads the teacher's logits"):
        build_config(sets=["distill.method=born_again", "distill.born_again.base=fitnets"])


def test_dml_without_a_model_factory_says_so_in_one_line():
    with pytest.raises(KdistillError, match="gives no model factory"):
        DML().build(BuildContext())


def test_born_again_is_a_plan_of_students_each_taught_by_the_one_before():
    plan = build_config(sets=["distill.method=born_again", "distill.born_again.generations=3",
                              "distill.born_again.base=dkd", "baseline=false"]).student_plan()
    assert [(s.kind, s.method, s.taught_by, s.generation) for s in plan.students] == [
        ("baseline", "", "labels", 0), ("generation1", "dkd", "baseline", 1), ("generation2", "dkd", "generation1", 2),
        ("student", "dkd", "generation2", 3)]
    assert [s.kind for s in plan.students if plan.teaches(s.kind)] == ["baseline", "generation1", "generation2"]
    dml = build_config(sets=["distill.method=dml"]).student_plan()  # no teacher: the baseline's batches
    assert [(s.kind, s.method, s.taught_by, s.generation) for s in dml.students] == [
        ("student", "dml", "labels", None), ("baseline", "", "labels", None)]
    assert [(s.kind, s.taught_by) for s in build_config(sets=["baseline=false"]).student_plan().students] == [
        ("student", "teacher")]


def test_born_again_generations_are_distilled_with_the_base_method_and_its_own_settings():
    cfg = build_config(sets=["distill.method=born_again", "distill.born_again.base=dkd",
                             "distill.dkd.nckd_weight=3"])
    objective = cfg.distiller()
    assert isinstance(objective, DKD) and objective.settings.nckd_weight == 3
    assert isinstance(build_config(sets=["distill.method=dml"]).distiller(), DML)


# ---------------------------------------------------------------- DML in the training loop


def tiny_model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8), torch.nn.BatchNorm1d(8),
                               torch.nn.ReLU(), torch.nn.Linear(8, 3))


def dml_fit(folder, epochs, peer_modes=None):
    """A tiny fit of a student with a DML peer; returns (student, objective, history)."""
    student, objective = tiny_model(0), DML()
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(24, 3, 2, 2, generator=generator), torch.arange(24) % 3
    if peer_modes is not None:
        original_build = objective.build

        def build_and_watch(*args):
            original_build(*args)
            objective.peer.register_forward_pre_hook(lambda module, _: peer_modes.append(module.training))
        objective.build = build_and_watch
    history = fit("student", student, student, Batches(images, labels, lambda x: x),
                  Batches(images, labels, lambda x: x), objective, TrainConfig(epochs=epochs, batch_size=8, lr=0.01),
                  Session(str(folder), CPU, seed=0, log=lambda m: None,
                          make_model=lambda arch: tiny_model(1) if arch == "student" else None))
    return student, objective, history


def test_dml_peer_trains_in_train_mode_beside_the_student_and_is_checkpointed(tmp_path):
    peer_modes = []
    student, objective, history = dml_fit(tmp_path / "run", 2, peer_modes)
    initial_peer = tiny_model(1).state_dict()
    trained_peer = objective.peer.state_dict()
    assert peer_modes and all(peer_modes)  # train mode on every batch (BatchNorm uses batch statistics)
    assert all(not torch.equal(initial_peer[k], trained_peer[k]) for k in ("1.weight", "4.weight", "2.running_mean"))
    assert math.isfinite(history[-1]["train_loss"])
    assert 0.0 <= history[-1]["train_peer_acc"] <= 1.0 and history[-1]["train_peer_kl"] > 0
    # The peer is the objective's: in the checkpoint, not in the student's weights.
    saved = load_torch(os.path.join(tmp_path, "run", "last.pt"))["objective"]
    assert {k for k in saved if k.startswith("peer.")} == {f"peer.{k}" for k in trained_peer}
    assert all(torch.equal(saved[f"peer.{k}"], v) for k, v in trained_peer.items())
    assert not any("peer" in k for k in student.state_dict())
    # Gradients reach the peer's parameters.
    x = torch.randn(4, 3, 2, 2)
    objective(Step(Outputs(student(x)), torch.tensor([0, 1, 2, 0]), inputs=x))["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in objective.peer.parameters())


def test_dml_resumed_after_its_first_epoch_ends_as_an_uninterrupted_run(tmp_path):
    student, objective, _ = dml_fit(tmp_path / "straight", 2)
    dml_fit(tmp_path / "stopped", 1)
    resumed_student, resumed_objective, history = dml_fit(tmp_path / "stopped", 2)
    assert [row["epoch"] for row in history] == [1, 2]
    for expected, got in ((student, resumed_student), (objective, resumed_objective)):
        assert all(torch.equal(v, got.state_dict()[k]) for k, v in expected.state_dict().items())


# ---------------------------------------------------------------- in the pipeline


def record_students(monkeypatch) -> dict:
    """Run name -> (the batches it trained on, the objective, the model it returned)."""
    calls = {}
    real = pipeline.train_student

    def recording(training, name, seed, train, objective, *rest):
        model, normalize, history = real(training, name, seed, train, objective, *rest)
        calls[name] = (train, objective, model)
        return model, normalize, history
    monkeypatch.setattr(pipeline, "train_student", recording)
    return calls


def training_lines(messages):
    return [m for m in messages if re.match(r"\S+ epoch \d+/\d+:", m)]


def test_born_again_trains_generations_each_taught_by_the_one_before_and_a_rerun_retrains_nothing(
        digits_dataset, tmp_path, monkeypatch):
    calls = record_students(monkeypatch)
    settings = tiny_settings(digits_dataset, str(tmp_path / "run"), str(tmp_path / "cache"), baseline=False,
                             teacher={"mode": "head", "epochs": 1}, student={"epochs": 2, "lr_step": 0},
                             distill={"method": "born_again", "born_again": {"generations": 2}})
    messages = []
    metrics = kdistill.run(settings, log=messages.append)
    assert list(calls) == ["baseline", "generation1", "student"]  # generation 0 first, even with baseline off
    for name, teacher_name in (("generation1", "baseline"), ("student", "generation1")):
        train = calls[name][0]
        served = train.extras["teacher_logits"]
        expected = predict_logits(calls[teacher_name][2], dataclasses.replace(train, extras={}), 16, CPU)
        assert torch.allclose(served, expected, atol=1e-5), name
        assert f"{name}: born-again generation" in " ".join(messages)
    assert not torch.allclose(calls["generation1"][0].extras["teacher_logits"],
                              calls["student"][0].extras["teacher_logits"])
    assert not calls["baseline"][0].extras and calls["baseline"][0].teacher is None
    generations = metrics["generations"]
    assert [(row["generation"], row["run"]) for row in generations] == [(0, "baseline"), (1, "generation1"),
                                                                        (2, "student")]
    assert generations[2]["best_val_acc"] == metrics["models"]["student"]["best_val_acc"]
    assert generations[0]["best_val_acc"] == metrics["models"]["baseline"]["best_val_acc"]
    assert set(metrics["models"]) == {"teacher", "student", "baseline"} and "mcnemar" in metrics
    for name in ("baseline", "generation1", "student"):
        assert os.path.exists(os.path.join(tmp_path, "run", "checkpoints", name, "last.pt"))
        assert os.path.exists(os.path.join(tmp_path, "run", "history", f"{name}.csv"))
    assert "born-again generation 1 (generation1) best val acc" in messages[-1]

    rerun_messages = []
    again = kdistill.run(settings, log=rerun_messages.append)
    assert training_lines(messages) and not training_lines(rerun_messages)
    assert again["generations"] == generations


def test_dml_in_the_pipeline_sees_the_baselines_batches_and_exports_no_peer(digits_dataset, tmp_path, monkeypatch):
    calls = record_students(monkeypatch)
    settings = tiny_settings(digits_dataset, str(tmp_path / "run"), str(tmp_path / "cache"), augment="flip",
                             keep_checkpoints=True,  # the peer's checkpointed state is read below
                             teacher={"mode": "head", "epochs": 1}, student={"epochs": 1, "lr_step": 0},
                             distill={"method": "dml"})
    metrics = kdistill.run(settings, log=lambda m: None)
    train, objective, student = calls["student"]
    assert train.teacher is None and not train.extras  # the trained teacher's signal is never read
    assert torch.equal(train.views, calls["baseline"][0].views)  # the baseline's stored views, in its order
    peer = objective.peer.model  # the peer standardizes its input like the student
    assert type(peer) is type(student.model) and torch.equal(objective.peer.mean, student.mean)
    assert not torch.equal(peer.conv1.weight, student.model.conv1.weight)
    saved = load_torch(os.path.join(tmp_path, "run", "checkpoints", "student", "last.pt"))["objective"]
    assert "peer.model.conv1.weight" in saved
    bundle = load_torch(os.path.join(tmp_path, "run", "student.pt"))
    assert not any("peer" in key for key in bundle["state_dict"])
    assert 0.0 <= metrics["models"]["student"]["best_val_acc"] <= 1.0
