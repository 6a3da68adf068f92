"""Issue 25: defaults for kdistill's runs (10 classes, 20-30 epochs) rather than ImageNet recipes
(DKD's warmup as a share of the run, DIST's tau, LSKD's CE weight), CRD's negatives of other
classes, AT's warning on 1x1 maps, and no gradient of any method reaching the teacher."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from kdistill.batches import Batches
from kdistill.config import TrainConfig
from kdistill.distillers import AT, CRD, DIST, DISTILLERS, DKD, LSKD, BuildContext, CrossEntropy, Outputs, Step
from kdistill.train import fit
from kdistill.callbacks import Session

CPU = torch.device("cpu")


def logit_batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(6, 10, generator=generator), torch.arange(6) % 10, torch.randn(6, 10, generator=generator)


# ---------------------------------------------------------------- DKD's warmup


def test_dkd_warms_up_over_mdistillers_share_of_training_by_default():
    assert DKD.Settings().warmup_fraction == pytest.approx(20 / 240)  # configs/cifar100/dkd: 20 of 240 epochs
    assert DKD.settings_problems(DKD.Settings()) == []
    for bad in (-0.1, 1.5):
        problems = DKD.settings_problems(DKD.Settings(warmup_fraction=bad))
        assert [name for name, _ in problems] == ["warmup_fraction"] and str(bad) in problems[0][1]


@pytest.mark.parametrize("fraction, epochs, epoch, ramp", [
    (20 / 240, 24, 1, 0.5), (20 / 240, 24, 2, 1.0),  # 2 warmup epochs of 24
    (20 / 240, 8, 1, 1.0),  # 0.67 rounds to 1: full weight at once (a fixed 20 epochs gave 1/20 here)
    (0.5, 8, 1, 0.25), (0.5, 8, 3, 0.75), (0.5, 8, 4, 1.0), (0.5, 8, 8, 1.0),
    (0.0, 30, 1, 1.0),  # none
])
def test_dkd_ramps_per_epoch_over_its_share_of_the_run(fraction, epochs, epoch, ramp):
    method = DKD(temperature=4.0, settings=DKD.Settings(warmup_fraction=fraction))
    student, labels, teacher = logit_batch()
    terms = method(Step(Outputs(student), labels, Outputs(teacher), epoch=epoch, epochs=epochs))
    expected = terms["ce"] + ramp * (terms["tckd"] + 8.0 * terms["nckd"])
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


class EpochRecorder(CrossEntropy):
    def forward(self, step):
        self.seen.add((step.epoch, step.epochs))
        return super().forward(step)


def test_the_training_loop_tells_the_method_the_runs_epochs(tmp_path):
    images, labels = torch.randn(12, 3, 2, 2, generator=torch.Generator().manual_seed(0)), torch.arange(12) % 3
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    objective = EpochRecorder()
    objective.seen = set()
    fit("student", student, student, Batches(images, labels, lambda x: x), Batches(images, labels, lambda x: x),
        objective, TrainConfig(epochs=3, batch_size=4, lr=0.01), Session(str(tmp_path), CPU, seed=0, log=lambda m: None))
    assert objective.seen == {(1, 3), (2, 3), (3, 3)}


# ---------------------------------------------------------------- DIST's tau, LSKD's CE weight


def test_dist_defaults_to_its_cifar_temperature():
    assert DIST.Settings().tau == 4.0  # hunto/DIST_KD's CIFAR-100 recipe (ImageNet: 1)
    student, labels, teacher = logit_batch()
    by_default = DIST().logit_terms(student, labels, teacher)
    at_four = DIST(settings=DIST.Settings(tau=4.0)).logit_terms(student, labels, teacher)
    assert by_default["loss"].item() == at_four["loss"].item()


def test_lskd_defaults_to_its_cifar_cross_entropy_weight():
    assert LSKD.Settings().ce_weight == 0.1  # the reference's CIFAR-100 runs (ImageNet: 1)
    terms = LSKD().logit_terms(*logit_batch())
    assert terms["loss"].item() == pytest.approx((0.1 * terms["ce"] + 9.0 * terms["kd"]).item(), rel=1e-6)


# ---------------------------------------------------------------- CRD's negatives


def crd_for(num_samples, nce_k=200):
    crd = CRD(settings=CRD.Settings(feat_dim=2, nce_k=nce_k))
    crd.build(BuildContext({"avgpool": torch.ones(2, 2, 1, 1)}, {"avgpool": torch.ones(2, 2, 1, 1)}, num_samples))
    return crd


def crd_step(crd, labels, index, teacher_logits=None):
    """One forward pass over the samples `index` with these labels (records their classes)."""
    count = len(index)
    teacher_logits = torch.zeros(count, 3) if teacher_logits is None else teacher_logits
    crd(Step(Outputs(torch.zeros(count, 3), {"avgpool": torch.randn(count, 2, 1, 1)}), labels,
             Outputs(teacher_logits, {"avgpool": torch.randn(count, 2, 1, 1)}), index))


def drawn_for_each(crd, index, times=40):
    draws = torch.cat([crd.draw_negatives(index) for _ in range(times)], 1)
    return [set(row) for row in draws.tolist()]


def test_crd_draws_negatives_only_from_other_classes_once_their_classes_are_seen():
    torch.manual_seed(0)
    crd = crd_for(12)
    classes = torch.arange(12) % 3
    crd_step(crd, classes, torch.arange(12))
    assert torch.equal(crd.sample_classes, classes)
    index = torch.tensor([0, 4, 8, 5])
    for positive, drawn in zip(index.tolist(), drawn_for_each(crd, index)):
        # Every sample of another class, uniformly drawn; none of the positive's (nor itself).
        assert drawn == {i for i in range(12) if classes[i] != classes[positive]}
    assert "sample_classes" in crd.state_dict()  # a resume draws as the run would have


def test_crd_samples_not_seen_yet_stay_candidates_and_unknown_positives_draw_from_all():
    torch.manual_seed(0)
    crd = crd_for(12)
    crd_step(crd, torch.arange(6) % 3, torch.arange(6))  # samples 6-11 not seen yet
    (drawn_for_0, drawn_for_7) = drawn_for_each(crd, torch.tensor([0, 7]))
    assert drawn_for_0 == {1, 2, 4, 5} | set(range(6, 12))  # not 3, seen with class 0
    assert drawn_for_7 == set(range(12)) - {7}


def test_crd_files_unlabelled_and_mixed_images_as_hard_targets_does():
    torch.manual_seed(0)
    crd = crd_for(6)
    teacher_logits = F.one_hot(torch.tensor([2, 1, 0]), 3).float()
    crd_step(crd, torch.tensor([0, -1, -1]), torch.tensor([0, 1, 2]), teacher_logits)  # teacher's top class
    crd_step(crd, torch.tensor([[0.3, 0.7, 0.0], [0.0, 0.4, 0.6], [0.9, 0.0, 0.1]]), torch.tensor([3, 4, 5]))
    assert crd.sample_classes.tolist() == [0, 1, 0, 1, 2, 0]


def test_crd_with_a_single_class_draws_from_all_other_samples():
    torch.manual_seed(0)
    crd = crd_for(5)
    crd_step(crd, torch.zeros(5, dtype=torch.long), torch.arange(5))
    assert drawn_for_each(crd, torch.tensor([2])) == [{0, 1, 3, 4}]


# ---------------------------------------------------------------- AT on 1x1 maps


def test_at_warns_once_at_build_when_a_pair_of_maps_is_1x1():
    settings = AT.Settings(student_layers=["layer3", "layer4"], teacher_layers=["layer3", "layer4"])
    at = AT(settings=settings)
    student_probe = {"layer3": torch.ones(2, 4, 2, 2), "layer4": torch.ones(2, 8, 1, 1)}
    teacher_probe = {"layer3": torch.ones(2, 6, 4, 4), "layer4": torch.ones(2, 6, 2, 2)}  # pooled to 1x1
    with pytest.warns(UserWarning, match=r"layer4 -> layer4 are 1x1") as caught:
        at.build(BuildContext(student_probe, teacher_probe, 10))
    assert len(caught) == 1 and "layer3" not in str(caught[0].message)
    generator = torch.Generator().manual_seed(0)
    student = Outputs(torch.zeros(2, 3), {"layer4": torch.rand(2, 8, 1, 1, generator=generator)})
    teacher = Outputs(torch.zeros(2, 3), {"layer4": torch.rand(2, 6, 2, 2, generator=generator)})
    only_layer4 = AT(settings=AT.Settings(student_layers=["layer4"], teacher_layers=["layer4"]))
    assert only_layer4(Step(student, torch.tensor([0, 1]), teacher))["at"].item() == 0.0  # why it warns
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AT().build(BuildContext({f"layer{i}": torch.ones(2, 4, 2, 2) for i in range(1, 5)},
                                {f"layer{i}": torch.ones(2, 4, 2, 1) for i in range(1, 5)}, 10))  # 2x1: no warning


# ---------------------------------------------------------------- the teacher gets no gradient


TEACHER_METHODS = [name for name, method in DISTILLERS.items() if method.needs_teacher]


@pytest.mark.parametrize("name", TEACHER_METHODS)
def test_no_gradient_of_a_methods_loss_reaches_the_teacher(name):
    torch.manual_seed(0)
    method = DISTILLERS[name](temperature=4.0)
    student_shape, teacher_shape = (4, 4, 2, 2), (4, 6, 2, 2)
    method.build(BuildContext({path: torch.rand(student_shape) for path in method.student_features()},
                              {path: torch.rand(teacher_shape) for path in method.teacher_features()}, 20))
    student = Outputs(torch.randn(4, 3, requires_grad=True),
                      {path: torch.rand(student_shape, requires_grad=True) for path in method.student_features()})
    # Leaves that would take a gradient: as a teacher trained in the same graph would.
    teacher = Outputs(torch.randn(4, 3, requires_grad=True),
                      {path: torch.rand(teacher_shape, requires_grad=True) for path in method.teacher_features()})
    terms = method(Step(student, torch.tensor([0, 1, 2, -1]), teacher, torch.arange(4) + 3))
    terms["loss"].backward()
    assert student.logits.grad is not None and student.logits.grad.abs().sum() > 0  # the loss does train
    assert teacher.logits.grad is None
    assert all(feature.grad is None for feature in teacher.features.values())
