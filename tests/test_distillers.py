import math

import pytest
import torch
import torch.nn.functional as F

from kdistill.distillers import KD, CrossEntropy, Outputs, Step, build_distiller


def softmax(values, t):
    exps = [math.exp(v / t) for v in values]
    return [e / sum(exps) for e in exps]


def test_kd_matches_hand_computed_values():
    student = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    teacher = [[2.0, 1.0, 0.0], [0.5, 0.5, 2.0]]
    labels = [1, 2]
    t, alpha = 2.0, 0.25
    kl = 0.0
    ce = 0.0
    for s_row, t_row, y in zip(student, teacher, labels):
        p_t, p_s = softmax(t_row, t), softmax(s_row, t)
        kl += sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s))
        ce += -math.log(softmax(s_row, 1.0)[y])
    kl, ce = kl / 2, ce / 2  # batchmean
    expected = alpha * t * t * kl + (1 - alpha) * ce
    terms = KD(temperature=t, alpha=alpha).logit_terms(torch.tensor(student), torch.tensor(labels),
                                                       torch.tensor(teacher))
    assert terms["kd"].item() == pytest.approx(t * t * kl, rel=1e-5)
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert terms["loss"].item() == pytest.approx(expected, rel=1e-5)


def test_alpha_zero_is_cross_entropy_and_alpha_one_is_scaled_kl():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(8, 5, generator=generator)
    teacher = torch.randn(8, 5, generator=generator)
    labels = torch.randint(0, 5, (8,), generator=generator)
    ce = F.cross_entropy(student, labels)
    assert KD(temperature=3.0, alpha=0.0).logit_terms(student, labels, teacher)["loss"].item() == pytest.approx(ce.item(), rel=1e-6)
    assert CrossEntropy().logit_terms(student, labels)["loss"].item() == pytest.approx(ce.item(), rel=1e-6)
    for t in (1.0, 4.0):
        kl = F.kl_div(F.log_softmax(student / t, 1), F.softmax(teacher / t, 1), reduction="batchmean")
        loss = KD(temperature=t, alpha=1.0).logit_terms(student, labels, teacher)["loss"]
        assert loss.item() == pytest.approx(t * t * kl.item(), rel=1e-5)


def test_kd_is_zero_when_student_equals_teacher_and_gradients_flow_to_student_only():
    logits = torch.randn(4, 3)
    student = logits.clone().requires_grad_(True)
    terms = KD(temperature=4.0, alpha=1.0).logit_terms(student, torch.zeros(4, dtype=torch.long), logits)
    assert terms["kd"].item() == pytest.approx(0.0, abs=1e-6)
    nudged = (logits + 1.0 * torch.eye(4, 3)).requires_grad_(True)  # a teacher that could take a gradient
    KD(temperature=4.0, alpha=0.5)(Step(Outputs(student), torch.zeros(4, dtype=torch.long), Outputs(nudged)))[
        "loss"].backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert nudged.grad is None


def test_registry_builds_by_name():
    distiller = build_distiller("kd", temperature=2.0, alpha=0.25)
    assert isinstance(distiller, KD) and distiller.temperature == 2.0 and distiller.alpha == 0.25
