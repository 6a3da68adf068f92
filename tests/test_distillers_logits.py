"""Logit methods of the distiller zoo (DKD, DIST, LSKD): their terms against values computed by hand
in plain Python, gradients, settings checks, unlabelled images, and a tiny training run each."""
import dataclasses
import math

import pytest
import torch

from kdistill.config import TrainConfig
from kdistill.distillers import DIST, DISTILLERS, DKD, KD, LSKD, Outputs, Step
from kdistill.batches import Batches
from kdistill.train import fit
from kdistill.callbacks import Session

CPU = torch.device("cpu")
STUDENT = [[1.0, 2.0, 0.5, -1.0], [0.0, -1.0, 3.0, 0.5], [2.0, 0.0, 1.0, 1.0]]
TEACHER = [[2.0, 1.0, 0.0, 0.5], [0.5, 0.5, 2.0, -0.5], [1.0, 0.5, 2.5, 0.0]]  # top classes 0, 2, 2
LABELS = [1, 2, 0]


# ---------------------------------------------------------------- plain-Python formulas


def softmax(values, t=1.0):
    exps = [math.exp(v / t) for v in values]
    return [e / sum(exps) for e in exps]


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def cross_entropy(rows, labels):
    """Mean over the labelled rows (label >= 0)."""
    losses = [-math.log(softmax(row)[y]) for row, y in zip(rows, labels) if y >= 0]
    return sum(losses) / len(losses)


def pearson(a, b, eps=1e-8):
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    da, db = [x - mean_a for x in a], [x - mean_b for x in b]
    covariance = sum(x * y for x, y in zip(da, db))
    return covariance / (math.sqrt(sum(x * x for x in da)) * math.sqrt(sum(y * y for y in db)) + eps)


def z_score(row):
    mean = sum(row) / len(row)
    std = math.sqrt(sum((x - mean) ** 2 for x in row) / (len(row) - 1))  # unbiased, as the reference
    return [(x - mean) / (1e-7 + std) for x in row]


def dkd_by_hand(student, teacher, targets, t):
    tckd = nckd = 0.0
    for s_row, t_row, y in zip(student, teacher, targets):
        p_s, p_t = softmax(s_row, t), softmax(t_row, t)
        tckd += kl([p_t[y], 1 - p_t[y]], [p_s[y], 1 - p_s[y]])
        others = [k for k in range(len(s_row)) if k != y]
        nckd += kl(softmax([t_row[k] for k in others], t), softmax([s_row[k] for k in others], t))
    return t * t * tckd / len(student), t * t * nckd / len(student)


def dist_by_hand(student, teacher, tau):
    y_s = [softmax(row, tau) for row in student]
    y_t = [softmax(row, tau) for row in teacher]
    inter = 1 - sum(pearson(a, b) for a, b in zip(y_s, y_t)) / len(y_s)
    columns = range(len(y_s[0]))
    intra = 1 - sum(pearson([row[c] for row in y_s], [row[c] for row in y_t]) for c in columns) / len(columns)
    return tau * tau * inter, tau * tau * intra


def lskd_by_hand(student, teacher, t):
    total = sum(kl(softmax(z_score(t_row), t), softmax(z_score(s_row), t)) for s_row, t_row in zip(student, teacher))
    return t * t * total / len(student)


def tensors(labels=LABELS):
    return torch.tensor(STUDENT), torch.tensor(labels), torch.tensor(TEACHER)


# ---------------------------------------------------------------- DKD


@pytest.mark.parametrize("epoch, ramp", [(2, 0.5), (4, 1.0), (9, 1.0)])
def test_dkd_matches_hand_computed_values_with_its_linear_warmup(epoch, ramp):
    t, tckd_weight, nckd_weight = 2.0, 0.5, 3.0
    tckd, nckd = dkd_by_hand(STUDENT, TEACHER, LABELS, t)
    ce = cross_entropy(STUDENT, LABELS)
    method = DKD(temperature=t, settings=DKD.Settings(tckd_weight=tckd_weight, nckd_weight=nckd_weight,
                                                      warmup_fraction=0.4))
    student, labels, teacher = tensors()
    terms = method(Step(Outputs(student), labels, Outputs(teacher), epoch=epoch, epochs=10))  # a warmup of 4 epochs
    assert terms["tckd"].item() == pytest.approx(tckd, rel=1e-5)
    assert terms["nckd"].item() == pytest.approx(nckd, rel=1e-5)
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert terms["loss"].item() == pytest.approx(ce + ramp * (tckd_weight * tckd + nckd_weight * nckd), rel=1e-5)


def test_dkd_without_warmup_and_its_defaults():
    assert dataclasses.asdict(DKD.Settings()) == {"tckd_weight": 1.0, "nckd_weight": 8.0,
                                                  "warmup_fraction": 20 / 240}
    tckd, nckd = dkd_by_hand(STUDENT, TEACHER, LABELS, 4.0)
    method = DKD(temperature=4.0, settings=DKD.Settings(warmup_fraction=0.0))
    student, labels, teacher = tensors()
    terms = method(Step(Outputs(student), labels, Outputs(teacher), epochs=30))
    assert terms["loss"].item() == pytest.approx(cross_entropy(STUDENT, LABELS) + tckd + 8.0 * nckd, rel=1e-5)


def test_dkd_terms_recompose_kd_for_one_image():
    # The paper's identity: KL = TCKD + (1 - teacher's target probability) * NCKD, image by image.
    t = 3.0
    for s_row, t_row, y in zip(STUDENT, TEACHER, LABELS):
        student, labels, teacher = torch.tensor([s_row]), torch.tensor([y]), torch.tensor([t_row])
        terms = DKD(temperature=t).logit_terms(student, labels, teacher)
        kd = KD(temperature=t, alpha=1.0).logit_terms(student, labels, teacher)["kd"]
        teacher_target = softmax(t_row, t)[y]
        assert (terms["tckd"] + (1 - teacher_target) * terms["nckd"]).item() == pytest.approx(kd.item(), rel=1e-5)


def test_dkd_stays_finite_when_the_rest_of_the_classes_underflow():
    # 1 - p_target is below float32's range here; taken in log space it stays exact and finite.
    student = torch.tensor([[120.0, 0.0, 0.0]], requires_grad=True)
    terms = DKD(temperature=1.0).logit_terms(student, torch.tensor([0]), torch.tensor([[110.0, 0.0, 1.0]]))
    assert terms["tckd"].item() == pytest.approx(0.0, abs=1e-30)
    # The non-target classes keep their own distribution: (0, 0) against (0, 1).
    assert terms["nckd"].item() == pytest.approx(kl(softmax([0.0, 1.0]), softmax([0.0, 0.0])), rel=1e-5)
    terms["loss"].backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


# ---------------------------------------------------------------- DIST


def test_dist_matches_hand_computed_values():
    tau, ce_weight, beta, gamma = 2.0, 0.5, 1.5, 3.0
    inter, intra = dist_by_hand(STUDENT, TEACHER, tau)
    ce = cross_entropy(STUDENT, LABELS)
    terms = DIST(settings=DIST.Settings(ce_weight=ce_weight, beta=beta, gamma=gamma, tau=tau)).logit_terms(*tensors())
    assert terms["inter"].item() == pytest.approx(inter, rel=1e-5)
    assert terms["intra"].item() == pytest.approx(intra, rel=1e-5)
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert terms["loss"].item() == pytest.approx(ce_weight * ce + beta * inter + gamma * intra, rel=1e-5)


def test_dist_defaults_and_no_relation_loss_for_a_student_equal_to_its_teacher():
    assert dataclasses.asdict(DIST.Settings()) == {"ce_weight": 1.0, "beta": 2.0, "gamma": 2.0, "tau": 4.0}
    student, labels, teacher = tensors()
    terms = DIST().logit_terms(student, labels, teacher)
    inter, intra = dist_by_hand(STUDENT, TEACHER, 4.0)
    assert terms["inter"].item() == pytest.approx(inter, rel=1e-5)
    assert terms["intra"].item() == pytest.approx(intra, rel=1e-5)
    same = DIST().logit_terms(teacher, labels, teacher)
    # Not exactly 0: the 1e-8 in the correlation, against the small spread of tau-4 probabilities.
    for term, by_hand in zip(("inter", "intra"), dist_by_hand(TEACHER, TEACHER, 4.0)):
        assert by_hand < 1e-3 and same[term].item() == pytest.approx(by_hand, abs=5e-5)


# ---------------------------------------------------------------- LSKD


def test_lskd_matches_hand_computed_values():
    t, ce_weight, kd_weight = 1.5, 0.5, 3.0
    kd = lskd_by_hand(STUDENT, TEACHER, t)
    ce = cross_entropy(STUDENT, LABELS)
    settings = LSKD.Settings(ce_weight=ce_weight, kd_weight=kd_weight, base_temperature=t)
    terms = LSKD(settings=settings).logit_terms(*tensors())
    assert terms["kd"].item() == pytest.approx(kd, rel=1e-5)
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert terms["loss"].item() == pytest.approx(ce_weight * ce + kd_weight * kd, rel=1e-5)


def test_lskd_defaults_and_indifference_to_each_images_logit_scale_and_shift():
    assert dataclasses.asdict(LSKD.Settings()) == {"ce_weight": 0.1, "kd_weight": 9.0, "base_temperature": 2.0}
    student, labels, teacher = tensors()
    terms = LSKD().logit_terms(student, labels, teacher)
    assert terms["kd"].item() == pytest.approx(lskd_by_hand(STUDENT, TEACHER, 2.0), rel=1e-5)
    rescaled = teacher * torch.tensor([[3.0], [0.5], [7.0]]) + torch.tensor([[1.0], [-4.0], [2.0]])
    assert LSKD().logit_terms(rescaled, labels, teacher)["kd"].item() == pytest.approx(0.0, abs=1e-6)
    assert KD(temperature=2.0, alpha=1.0).logit_terms(rescaled, labels, teacher)["kd"].item() > 0.1  # plain KD is not


def test_lskd_gradient_is_finite_for_a_row_of_equal_logits():
    student = torch.tensor([[0.5, 0.5, 0.5], [1.0, 0.0, 2.0]], requires_grad=True)
    LSKD().logit_terms(student, torch.tensor([0, 1]), torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))[
        "loss"].backward()
    assert torch.isfinite(student.grad).all()


# ---------------------------------------------------------------- all three


METHODS = {"dkd": (DKD, {"tckd_weight": -1.0, "nckd_weight": -0.5, "warmup_fraction": -0.1}),
           "dist": (DIST, {"ce_weight": -1.0, "beta": -1.0, "gamma": -2.0, "tau": 0.0}),
           "lskd": (LSKD, {"ce_weight": -0.1, "kd_weight": -9.0, "base_temperature": -2.0})}


@pytest.mark.parametrize("name", METHODS)
def test_registered_by_name_with_valid_defaults(name):
    method, _ = METHODS[name]
    assert DISTILLERS[name] is method
    assert method.problems(method.Settings()) == []
    for f in dataclasses.fields(method.Settings):
        assert f.metadata["help"]  # written into config.yaml as the setting's comment


@pytest.mark.parametrize("name", METHODS)
def test_problems_rejects_a_bad_value_of_each_setting(name):
    method, bad_values = METHODS[name]
    for field_name, bad in bad_values.items():
        problems = method.settings_problems(method.Settings(**{field_name: bad}))
        assert [problem[0] for problem in problems] == [field_name]
        assert str(bad) in problems[0][1]


@pytest.mark.parametrize("name", METHODS)
def test_gradients_of_every_term_reach_the_student_and_never_the_teacher(name):
    student, labels, teacher = tensors()
    student.requires_grad_(True)
    teacher.requires_grad_(True)  # as if the teacher's graph were kept: the method must still cut it
    terms = DISTILLERS[name](temperature=2.0)(Step(Outputs(student), labels, Outputs(teacher)))
    for term, value in terms.items():
        assert value.dim() == 0 and torch.isfinite(value), term
        (gradient,) = torch.autograd.grad(value, student, retain_graph=True)
        assert torch.isfinite(gradient).all() and gradient.abs().sum() > 0, term
    terms["loss"].backward()
    assert teacher.grad is None


@pytest.mark.parametrize("name", METHODS)
def test_unlabelled_images_only_drop_the_cross_entropy(name):
    method = DISTILLERS[name](temperature=2.0)  # logit_terms: DKD past its warmup
    # DKD splits unlabelled images by the teacher's top class (0 and 2 here): label them so to compare.
    as_labelled = method.logit_terms(*tensors([0, 2, 2]))
    partly = method.logit_terms(*tensors([-1, 2, -1]))
    unlabelled = method.logit_terms(*tensors([-1, -1, -1]))
    assert partly["ce"].item() == pytest.approx(cross_entropy(STUDENT[1:2], [2]), rel=1e-5)
    assert unlabelled["ce"].item() == 0.0
    weight = getattr(method.settings, "ce_weight", 1.0)
    for term in as_labelled:
        if term not in ("loss", "ce"):
            assert partly[term].item() == pytest.approx(as_labelled[term].item(), rel=1e-6)
            assert unlabelled[term].item() == pytest.approx(as_labelled[term].item(), rel=1e-6)
    teacher_part = as_labelled["loss"] - weight * as_labelled["ce"]
    assert unlabelled["loss"].item() == pytest.approx(teacher_part.item(), rel=1e-5)
    assert partly["loss"].item() == pytest.approx(teacher_part.item() + weight * partly["ce"].item(), rel=1e-5)


def loss_from_terms(name, method, row, epochs):
    """The epoch's mean loss from its mean terms (each loss is linear in its terms)."""
    s = method.settings
    if name == "dkd":
        ramp = min(row["epoch"] / max(1, round(s.warmup_fraction * epochs)), 1.0)
        return row["train_ce"] + ramp * (s.tckd_weight * row["train_tckd"] + s.nckd_weight * row["train_nckd"])
    if name == "dist":
        return s.ce_weight * row["train_ce"] + s.beta * row["train_inter"] + s.gamma * row["train_intra"]
    return s.ce_weight * row["train_ce"] + s.kd_weight * row["train_kd"]


@pytest.mark.parametrize("name", METHODS)
def test_a_tiny_fit_trains_the_student_with_the_method(tmp_path, name):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(30, 3, 2, 2, generator=generator)
    labels = torch.arange(30) % 3
    labels[::5] = -1  # a few unlabelled images, as in a transfer set
    teacher_logits = 3 * torch.randn(30, 3, generator=generator)
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    before = [p.detach().clone() for p in student.parameters()]
    method = DISTILLERS[name](temperature=4.0)
    if name == "dkd":
        method.settings.warmup_fraction = 1.0  # a warmup over the whole (2-epoch) run
    train = Batches(images, labels, lambda x: x, extras={"teacher_logits": teacher_logits})
    val = Batches(images, torch.arange(30) % 3, lambda x: x)
    history = fit(name, student, student, train, val, method, TrainConfig(epochs=2, batch_size=8, lr=0.01),
                  Session(str(tmp_path), CPU, seed=0, log=lambda m: None))
    assert [row["epoch"] for row in history] == [1, 2]
    for row in history:
        assert math.isfinite(row["train_loss"])
        # The loop's epoch and epochs reach the method: DKD's warmup ramp is 1/2, then 1.
        assert row["train_loss"] == pytest.approx(loss_from_terms(name, method, row, epochs=2), rel=1e-5)
    assert any(not torch.equal(b, a) for b, a in zip(before, student.parameters()))
