"""Relation methods (RKD, PKT, SP, CRD): their terms against values worked out by hand in plain
Python on 2-3 samples, gradients, settings checks, unlabelled images, and a tiny fit each."""
import copy
import math

import pytest
import torch
from torch import nn

from kdistill.config import TrainConfig
from kdistill.distillers import CRD, DISTILLERS, PKT, RKD, SP, BuildContext, Outputs, Step
from kdistill.distillers.pkt import conditional_probabilities
from kdistill.errors import KdistillError
from kdistill.features import OnlineTeacher
from kdistill.fileio import load_torch
from kdistill.batches import Batches
from kdistill.train import fit
from kdistill.callbacks import Session

CPU = torch.device("cpu")
METHODS = (RKD, PKT, SP, CRD)


# ---------------------------------------------------------------- plain-Python helpers


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def unit(a):
    length = math.sqrt(dot(a, a))
    return [x / length for x in a]


def smooth_l1(a, b):  # beta 1
    gap = abs(a - b)
    return 0.5 * gap * gap if gap < 1 else gap - 0.5


def cross_entropy(logits, labels):
    """Mean over the labelled rows (label >= 0)."""
    terms = [math.log(sum(math.exp(v) for v in row)) - row[y] for row, y in zip(logits, labels) if y >= 0]
    return sum(terms) / len(terms)


LOGITS = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [0.3, 0.2, 0.1]]
LABELS = [1, 2, 0]


def outputs(logits, features, path, shape=None):
    tensor = torch.tensor(features)
    return Outputs(torch.tensor(logits), {path: tensor if shape is None else tensor.reshape(shape)})


# ---------------------------------------------------------------- RKD


def test_rkd_matches_hand_computed_distances_and_angles():
    student = [[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]]
    teacher = [[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]]

    def normalized_distances(points):
        d = [[math.dist(p, q) for q in points] for p in points]
        mean = sum(d[i][j] for i in range(3) for j in range(3) if i != j) / 6
        return [[value / mean for value in row] for row in d]

    def cosines(points):  # [i][j][k]: angle at point i between j and k; 0 where j or k is i
        def direction(i, j):
            return unit([b - a for a, b in zip(points[i], points[j])])
        return [[[0.0 if i in (j, k) else dot(direction(i, j), direction(i, k)) for k in range(3)]
                 for j in range(3)] for i in range(3)]

    d_s, d_t = normalized_distances(student), normalized_distances(teacher)
    distance = sum(smooth_l1(d_s[i][j], d_t[i][j]) for i in range(3) for j in range(3)) / 9
    a_s, a_t = cosines(student), cosines(teacher)
    angle = sum(smooth_l1(a_s[i][j][k], a_t[i][j][k]) for i in range(3) for j in range(3) for k in range(3)) / 27
    rkd = RKD(settings=RKD.Settings(distance_weight=2.0, angle_weight=3.0))
    terms = rkd(Step(outputs(LOGITS, student, "avgpool", (3, 2, 1, 1)), torch.tensor(LABELS),
                     outputs(LOGITS, teacher, "avgpool", (3, 2, 1, 1))))
    assert distance > 0.01 and angle > 0.01  # the two configurations really differ
    assert terms["distance"].item() == pytest.approx(distance, rel=1e-5)
    assert terms["angle"].item() == pytest.approx(angle, rel=1e-5)
    ce = cross_entropy(LOGITS, LABELS)
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert terms["loss"].item() == pytest.approx(ce + 2 * distance + 3 * angle, rel=1e-5)


def test_rkd_ignores_scale_and_defaults_to_the_papers_weights():
    features = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    logits = torch.zeros(5, 3)
    terms = RKD()(Step(Outputs(logits, {"avgpool": features}), torch.zeros(5, dtype=torch.long),
                       Outputs(logits, {"avgpool": 7.0 * features})))
    assert terms["distance"].item() == pytest.approx(0.0, abs=1e-6)  # distances are relative to their mean
    assert terms["angle"].item() == pytest.approx(0.0, abs=1e-6)
    assert (RKD.Settings().distance_weight, RKD.Settings().angle_weight) == (25.0, 50.0)


# ---------------------------------------------------------------- PKT


def hand_conditional_probabilities(points):
    eps = 1e-7
    units = [[x / (math.sqrt(dot(p, p)) + eps) for x in p] for p in points]
    kernel = [[(dot(a, b) + 1) / 2 for b in units] for a in units]
    return [[value / sum(row) for value in row] for row in kernel]


def test_pkt_probabilities_and_divergence_match_hand_computed_values():
    student = [[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]
    teacher = [[1.0, 1.0], [-1.0, 3.0], [2.0, 0.0]]
    # (1,0), (0,2), (1,1): cosines 0, 1/sqrt2, 1/sqrt2 -> kernel (cos + 1) / 2 -> rows summing to 1
    half, corner = 0.5, (1 / math.sqrt(2) + 1) / 2
    expected_rows = [[1, half, corner], [half, 1, corner], [corner, corner, 1]]
    expected = [[value / sum(row) for value in row] for row in expected_rows]
    computed = conditional_probabilities(torch.tensor(student))
    assert computed.flatten().tolist() == pytest.approx([value for row in expected for value in row], rel=1e-5)
    p_s, p_t = hand_conditional_probabilities(student), hand_conditional_probabilities(teacher)
    eps = 1e-7
    pkt = sum(p_t[i][j] * math.log((p_t[i][j] + eps) / (p_s[i][j] + eps)) for i in range(3) for j in range(3)) / 9
    terms = PKT(settings=PKT.Settings(weight=100.0))(Step(
        outputs(LOGITS, student, "avgpool", (3, 2, 1, 1)), torch.tensor(LABELS),
        outputs(LOGITS, teacher, "avgpool", (3, 2, 1, 1))))
    assert pkt > 1e-3
    assert terms["pkt"].item() == pytest.approx(pkt, rel=1e-5)
    assert terms["loss"].item() == pytest.approx(cross_entropy(LOGITS, LABELS) + 100 * pkt, rel=1e-5)
    assert PKT.Settings().weight == 30000.0


# ---------------------------------------------------------------- SP


def test_sp_matches_hand_computed_gram_matrices_for_maps_of_different_shapes():
    student = [[1.0, 2.0], [0.0, 1.0], [3.0, -1.0]]  # (3, 2) vectors
    teacher = [[1.0, 0.0, 2.0, 1.0], [0.0, 1.0, 1.0, 0.0], [2.0, 2.0, 0.0, -1.0]]  # (3, 1, 2, 2) maps

    def normalized_gram(rows):
        gram = [[dot(a, b) for b in rows] for a in rows]
        return [[value / math.sqrt(dot(row, row)) for value in row] for row in gram]

    g_s, g_t = normalized_gram(student), normalized_gram(teacher)
    sp = sum((g_t[i][j] - g_s[i][j]) ** 2 for i in range(3) for j in range(3)) / 9
    terms = SP(settings=SP.Settings(weight=10.0))(Step(
        outputs(LOGITS, student, "layer4"), torch.tensor(LABELS), outputs(LOGITS, teacher, "layer4", (3, 1, 2, 2))))
    assert sp > 1e-3
    assert terms["sp"].item() == pytest.approx(sp, rel=1e-5)
    assert terms["loss"].item() == pytest.approx(cross_entropy(LOGITS, LABELS) + 10 * sp, rel=1e-5)
    assert (SP.Settings().weight, SP.Settings().student_layer) == (3000.0, "layer4")


# ---------------------------------------------------------------- CRD


def crd_built(num_samples=3, dim=2, **settings):
    crd = CRD(settings=CRD.Settings(feat_dim=dim, **settings))
    crd.build(BuildContext({"avgpool": torch.ones((2, dim, 1, 1))}, {"avgpool": torch.ones((2, dim, 1, 1))},
                           num_samples))
    return crd


def test_crd_nce_loss_and_memory_update_match_hand_computed_values():
    crd = crd_built(nce_k=2, nce_temperature=0.5, momentum=0.25, weight=0.8)
    with torch.no_grad():  # identity heads: an embedding is the feature itself, normalized
        for head in (crd.embed_student, crd.embed_teacher):
            head.weight.copy_(torch.eye(2))
            head.bias.zero_()
    student_memory = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]
    teacher_memory = [[0.0, 1.0], [0.8, 0.6], [-1.0, 0.0]]
    crd.student_memory.copy_(torch.tensor(student_memory))
    crd.teacher_memory.copy_(torch.tensor(teacher_memory))
    index, negatives = [2, 0], [[0, 1], [1, 1]]
    crd.draw_negatives = lambda positions: torch.tensor(negatives)  # the draw, fixed by hand
    student, teacher = [[4.0, -3.0], [0.0, 2.0]], [[0.0, 2.0], [1.0, 1.0]]
    logits, labels = LOGITS[:2], LABELS[:2]
    terms = crd(Step(outputs(logits, student, "avgpool", (2, 2, 1, 1)), torch.tensor(labels),
                     outputs(logits, teacher, "avgpool", (2, 2, 1, 1)), torch.tensor(index)))

    v_s, v_t = [unit(f) for f in student], [unit(f) for f in teacher]
    rows = [[i] + n for i, n in zip(index, negatives)]
    n, k, tau = 3, 2, 0.5
    # the student's embedding against the teacher's bank, and the other way round
    scores_s = [[math.exp(dot(v_s[b], teacher_memory[r]) / tau) for r in rows[b]] for b in range(2)]
    scores_t = [[math.exp(dot(v_t[b], student_memory[r]) / tau) for r in rows[b]] for b in range(2)]

    def nce(scores):
        z = sum(sum(row) for row in scores) / 6 * n  # set from this first batch
        noise, eps, total = k / n, 1e-7, 0.0
        for row in scores:
            p = [s / z for s in row]
            total += math.log(p[0] / (p[0] + noise + eps))
            total += sum(math.log(noise / (q + noise + eps)) for q in p[1:])
        return -total / 2, z

    (nce_s, z_s), (nce_t, z_t) = nce(scores_s), nce(scores_t)
    assert terms["crd"].item() == pytest.approx(nce_s + nce_t, rel=1e-5)
    assert terms["loss"].item() == pytest.approx(cross_entropy(logits, labels) + 0.8 * (nce_s + nce_t), rel=1e-5)
    assert crd.normalizers.tolist() == pytest.approx([z_s, z_t], rel=1e-5)

    def updated(memory, embeddings):
        memory = [list(row) for row in memory]
        for position, e in zip(index, embeddings):
            memory[position] = unit([0.25 * m + 0.75 * x for m, x in zip(memory[position], e)])
        return [value for row in memory for value in row]
    assert crd.student_memory.flatten().tolist() == pytest.approx(updated(student_memory, v_s), rel=1e-5)
    assert crd.teacher_memory.flatten().tolist() == pytest.approx(updated(teacher_memory, v_t), rel=1e-5)
    assert crd.student_memory[1].tolist() == [0.0, 1.0]  # a sample not in the batch keeps its entry

    crd(Step(outputs(logits, student, "avgpool"), torch.tensor(labels), outputs(logits, teacher, "avgpool"),
             torch.tensor(index)))
    assert crd.normalizers.tolist() == pytest.approx([z_s, z_t], rel=1e-5)  # Z stays as first set


def test_crd_draws_negatives_among_the_other_samples_with_the_global_generator():
    crd = crd_built(num_samples=6, nce_k=500)
    index = torch.tensor([0, 3, 5])
    torch.manual_seed(1)
    negatives = crd.draw_negatives(index)
    assert crd.negative_count == 5 and negatives.shape == (3, 5)  # nce_k capped at 6 - 1
    torch.manual_seed(1)
    assert torch.equal(crd.draw_negatives(index), negatives)  # the global stream decides: a resume repeats it
    many = torch.cat([crd.draw_negatives(index) for _ in range(50)])
    for row, positive in enumerate(index.tolist()):
        drawn = set(many[row::3].flatten().tolist())
        assert drawn == set(range(6)) - {positive}  # every other sample, never the positive
    pair = crd_built(num_samples=2, nce_k=16384)
    assert pair.draw_negatives(torch.tensor([1, 0])).tolist() == [[0], [1]]  # two samples: the draw is forced


def test_crd_build_sizes_heads_and_banks_and_the_state_dict_keeps_them():
    crd = CRD()
    crd.build(BuildContext({"avgpool": torch.ones((2, 16, 1, 1))}, {"avgpool": torch.ones((2, 24, 1, 1))}, 40))
    assert crd.embed_student.in_features == 16 and crd.embed_teacher.in_features == 24
    assert crd.embed_student.out_features == crd.embed_teacher.out_features == 128
    assert crd.student_memory.shape == crd.teacher_memory.shape == (40, 128)
    assert crd.negative_count == 39
    assert crd.student_memory.norm(dim=1).mean().item() == pytest.approx(1.0, abs=0.1)
    state = crd.state_dict()
    assert {"student_memory", "teacher_memory", "normalizers", "embed_student.weight"} <= state.keys()
    again = CRD()
    again.build(BuildContext({"avgpool": torch.ones((2, 16, 1, 1))}, {"avgpool": torch.ones((2, 24, 1, 1))}, 40))
    assert not torch.equal(again.student_memory, crd.student_memory)
    again.load_state_dict(state)
    assert torch.equal(again.student_memory, crd.student_memory) and torch.equal(again.teacher_memory,
                                                                                 crd.teacher_memory)
    conv = CRD(settings=CRD.Settings(student_layer="layer3", teacher_layer="layer3"))
    conv.build(BuildContext({"layer3": torch.ones((2, 4, 3, 3))}, {"layer3": torch.ones((2, 8, 2, 2))}, 10))
    assert (conv.embed_student.in_features, conv.embed_teacher.in_features) == (36, 32)  # flattened maps
    with pytest.raises(KdistillError, match="crd needs at least 2"):
        CRD().build(BuildContext({"avgpool": torch.ones((2, 16, 1, 1))}, {"avgpool": torch.ones((2, 24, 1, 1))}, 1))


# ---------------------------------------------------------------- every method


def prepared(method, student_shape, teacher_shape, num_samples=20):
    torch.manual_seed(0)
    distiller = method()
    student_layer, teacher_layer = distiller.student_features()[0], distiller.teacher_features()[0]
    distiller.build(BuildContext({student_layer: torch.ones(student_shape)},
                                 {teacher_layer: torch.ones(teacher_shape)}, num_samples))
    return distiller, student_layer, teacher_layer


def random_batch(method, batch=4, student_shape=(4, 2, 2), teacher_shape=(6, 3, 3)):
    """Student and teacher maps differ in channels and in spatial size."""
    generator = torch.Generator().manual_seed(0)
    distiller, student_layer, teacher_layer = prepared(method, (2,) + student_shape, (2,) + teacher_shape)
    student = Outputs(torch.randn(batch, 3, generator=generator).requires_grad_(True),
                      {student_layer: torch.randn((batch,) + student_shape, generator=generator).requires_grad_(True)})
    teacher = Outputs(torch.randn(batch, 3, generator=generator),
                      {teacher_layer: torch.randn((batch,) + teacher_shape, generator=generator)})
    return distiller, student, teacher, torch.arange(batch) % 3, torch.arange(batch) + 3


@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_the_students_logits_features_and_heads(method):
    distiller, student, teacher, labels, index = random_batch(method)
    terms = distiller(Step(student, labels, teacher, index))
    assert all(value.dim() == 0 for value in terms.values()) and torch.isfinite(terms["loss"])
    terms["loss"].backward()
    for tensor in (student.logits, *student.features.values()):
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0
    for name, parameter in distiller.named_parameters():  # CRD's embedding heads
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("method", METHODS)
def test_unlabelled_images_only_drop_the_cross_entropy(method):
    distiller, student, teacher, _, index = random_batch(method)
    labels = teacher.logits.argmax(1)  # CRD files an unlabelled image under the teacher's top class
    state = copy.deepcopy(distiller.state_dict())
    rng = torch.get_rng_state()
    labelled = distiller(Step(student, labels, teacher, index))
    distiller.load_state_dict(state)  # CRD's banks moved: start the second call where the first did
    torch.set_rng_state(rng)
    partly = torch.tensor([labels[0].item(), -1, labels[2].item(), -1])
    partial = distiller(Step(student, partly, teacher, index))
    distiller.load_state_dict(state)
    torch.set_rng_state(rng)
    none = distiller(Step(student, torch.full_like(labels, -1), teacher, index))
    relation_terms = [key for key in labelled if key not in ("loss", "ce")]
    assert relation_terms
    for key in relation_terms:
        assert partial[key].item() == pytest.approx(labelled[key].item(), rel=1e-6)
        assert none[key].item() == pytest.approx(labelled[key].item(), rel=1e-6)
    logits = student.logits.tolist()
    assert partial["ce"].item() == pytest.approx(cross_entropy(logits, partly.tolist()), rel=1e-5)
    assert none["ce"].item() == 0.0
    assert none["loss"].item() == pytest.approx((labelled["loss"] - labelled["ce"]).item(), rel=1e-5)
    none["loss"].backward()  # still a graph: the teacher's terms train the student


@pytest.mark.parametrize("method", METHODS)
def test_a_batch_of_one_gives_finite_terms(method):  # fit keeps a last, partial batch
    distiller, student, teacher, labels, index = random_batch(method, batch=1)
    terms = distiller(Step(student, labels, teacher, index))
    assert all(torch.isfinite(value) for value in terms.values())
    terms["loss"].backward()


BAD_SETTINGS = [
    (RKD, "student_layer", ""), (RKD, "teacher_layer", ""), (RKD, "distance_weight", -1.0),
    (RKD, "angle_weight", -0.5),
    (PKT, "student_layer", ""), (PKT, "teacher_layer", ""), (PKT, "weight", -1.0),
    (SP, "student_layer", ""), (SP, "teacher_layer", ""), (SP, "weight", -3.0),
    (CRD, "student_layer", ""), (CRD, "teacher_layer", ""), (CRD, "weight", -0.1), (CRD, "feat_dim", 0),
    (CRD, "nce_k", 0), (CRD, "nce_temperature", 0.0), (CRD, "momentum", 1.0), (CRD, "momentum", -0.1),
]


@pytest.mark.parametrize("method, name, value", BAD_SETTINGS)
def test_problems_names_each_bad_setting(method, name, value):
    assert method.problems(method.Settings()) == []
    found = method.settings_problems(method.Settings(**{name: value}))
    assert [field for field, _ in found] == [name]
    assert repr(value) in found[0][1] or "module" in found[0][1]


def test_registered_by_name():
    assert {key: DISTILLERS[key] for key in ("rkd", "pkt", "sp", "crd")} == {
        "rkd": RKD, "pkt": PKT, "sp": SP, "crd": CRD}
    assert [method.needs_index for method in METHODS] == [False, False, False, True]


# ---------------------------------------------------------------- a tiny fit each


class TinyNet(nn.Module):
    """Module names as torchvision's resnets: layer4 (a conv map), avgpool, fc."""

    def __init__(self, width):
        super().__init__()
        self.layer4 = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, 3)

    def forward(self, x):
        return self.fc(self.avgpool(self.layer4(x)).flatten(1))


def tiny_fit(folder, distiller, epochs=2, log=lambda message: None, unlabelled=False):
    torch.manual_seed(0)
    images = torch.randn(30, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(30) % 3
    teacher, student = TinyNet(6).eval(), TinyNet(4)
    train = Batches(images, torch.full_like(labels, -1) if unlabelled else labels, lambda x: x,
                    teacher=OnlineTeacher(teacher, distiller.teacher_features()))
    start = copy.deepcopy(student.state_dict())
    history = fit("model", student, student, train, Batches(images, labels, lambda x: x), distiller,
                  TrainConfig(epochs=epochs, batch_size=8, lr=0.01), Session(str(folder), CPU, seed=0, log=log))
    return student, start, history


@pytest.mark.parametrize("method", METHODS)
def test_a_tiny_fit_trains_the_student_by_the_relation_term_alone(tmp_path, method):
    distiller = method()
    # Unlabelled training images: no cross-entropy, so the student moves by the method's term only.
    student, start, history = tiny_fit(tmp_path, distiller, unlabelled=True)
    relation_term = {RKD: "train_angle", PKT: "train_pkt", SP: "train_sp", CRD: "train_crd"}[method]
    assert all(math.isfinite(row["train_loss"]) and row[relation_term] > 0 and row["train_ce"] == 0
               for row in history)
    assert not torch.equal(student.state_dict()["layer4.0.weight"], start["layer4.0.weight"])


def test_crd_fit_trains_its_heads_checkpoints_its_banks_and_resumes_with_the_same_negatives(tmp_path):
    straight = CRD()
    tiny_fit(tmp_path / "straight", straight)
    torch.manual_seed(0)
    untrained = CRD()
    untrained.build(BuildContext({"avgpool": torch.ones((2, 4, 1, 1))}, {"avgpool": torch.ones((2, 6, 1, 1))}, 30))
    assert untrained.negative_count == 29  # 16384 capped at 30 - 1
    assert not torch.equal(straight.embed_student.weight, untrained.embed_student.weight)
    assert not torch.equal(straight.embed_teacher.weight, untrained.embed_teacher.weight)
    assert not torch.equal(straight.student_memory, untrained.student_memory)
    assert (straight.normalizers > 0).all()
    saved = load_torch(str(tmp_path / "straight" / "last.pt"))["objective"]
    assert saved["student_memory"].shape == (30, 128) and torch.equal(saved["teacher_memory"],
                                                                        straight.teacher_memory)

    class Killed(Exception):
        pass

    def kill_after_epoch_1(message):
        if message.startswith("model epoch 1/"):
            raise Killed
    with pytest.raises(Killed):
        tiny_fit(tmp_path / "resumed", CRD(), log=kill_after_epoch_1)
    resumed = CRD()
    tiny_fit(tmp_path / "resumed", resumed)
    for name, value in straight.state_dict().items():  # banks included: the same negatives were drawn
        assert torch.equal(resumed.state_dict()[name], value), name
