"""Feature methods (FitNets, AT, PEFD): terms against values computed by hand, gradients, adapters
sized from the shapes, settings checks, unlabelled images, and a tiny training run."""
import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

from kdistill.config import TrainConfig, build_config
from kdistill.distillers import AT, DISTILLERS, PEFD, BuildContext, FitNets, Outputs, Step
from kdistill.distillers.at import attention_map
from kdistill.errors import KdistillError
from kdistill.features import OnlineTeacher, matching_teacher_module, resolve_auto_layers
from kdistill.batches import Batches
from kdistill.train import fit
from kdistill.callbacks import Session

CPU = torch.device("cpu")
BN_EPS = 1e-5  # BatchNorm2d's default


def hand_cross_entropy(logits, labels):
    """Mean over the labelled rows of -log softmax(row)[label]."""
    losses = [math.log(sum(math.exp(v) for v in row)) - row[label]
              for row, label in zip(logits, labels) if label >= 0]
    return sum(losses) / len(losses) if losses else 0.0


def hand_pool(channel, size):
    """A 2-D list average-pooled to size (integer ratios), as plain loops."""
    rows, cols = len(channel) // size[0], len(channel[0]) // size[1]
    return [[sum(channel[i * rows + a][j * cols + b] for a in range(rows) for b in range(cols)) / (rows * cols)
             for j in range(size[1])] for i in range(size[0])]


def probe_of(shapes, fill=1.0):
    """The features build() reads, here filled with one value, for each module path's shape."""
    return {path: torch.full(shape, fill) for path, shape in shapes.items()}


def built(method, student_shapes, teacher_shapes, **settings):
    objective = method(settings=method.Settings(**settings))
    objective.build(BuildContext(probe_of(student_shapes), probe_of(teacher_shapes), 10))
    return objective


# ---------------------------------------------------------------- values computed by hand

LOGITS = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
LABELS = [0, 2]
# a student hint (2 images, 2 channels, 2x2): the regressor's pre-activations go negative somewhere
HINT = [[[[1.0, 2.0], [0.0, -1.0]], [[0.5, 0.5], [2.0, -2.0]]],
        [[[-1.0, 0.0], [3.0, 1.0]], [[1.0, -1.0], [0.0, 2.0]]]]


@pytest.mark.parametrize("guide_size", [2, 1])  # the same size as the hint, and smaller: the hint is pooled
def test_fitnets_terms_match_hand_computed_values(guide_size):
    conv_weight, conv_bias = [[0.5, -1.0], [1.0, 1.0], [-0.25, 0.75]], [0.1, -0.2, 0.0]
    bn_weight, bn_bias, bn_mean, bn_var = [1.0, 2.0, 0.5], [0.0, 0.1, -0.1], [0.2, 0.0, -0.5], [1.0, 4.0, 0.25]
    guide = [[[[0.1 * (n + c + i + j) for j in range(guide_size)] for i in range(guide_size)] for c in range(3)]
             for n in range(2)]
    objective = built(FitNets, {"layer2": torch.Size([2, 2, 2, 2])},
                      {"layer2": torch.Size([2, 3, guide_size, guide_size])}, hint_weight=10.0)
    conv, bn, _ = objective.regressor
    with torch.no_grad():
        conv.weight.copy_(torch.tensor(conv_weight).view(3, 2, 1, 1))
        conv.bias.copy_(torch.tensor(conv_bias))
        bn.weight.copy_(torch.tensor(bn_weight))
        bn.bias.copy_(torch.tensor(bn_bias))
        bn.running_mean.copy_(torch.tensor(bn_mean))
        bn.running_var.copy_(torch.tensor(bn_var))
    objective.eval()  # BatchNorm from the running statistics set above

    squared_errors = []
    for n in range(2):
        pooled = [hand_pool(HINT[n][c], (guide_size, guide_size)) for c in range(2)]
        for t in range(3):
            for i in range(guide_size):
                for j in range(guide_size):
                    z = sum(conv_weight[t][c] * pooled[c][i][j] for c in range(2)) + conv_bias[t]
                    y = bn_weight[t] * (z - bn_mean[t]) / math.sqrt(bn_var[t] + BN_EPS) + bn_bias[t]
                    squared_errors.append((max(y, 0.0) - guide[n][t][i][j]) ** 2)
    hint = 10.0 * sum(squared_errors) / len(squared_errors)
    ce = hand_cross_entropy(LOGITS, LABELS)

    terms = objective(Step(Outputs(torch.tensor(LOGITS), {"layer2": torch.tensor(HINT)}), torch.tensor(LABELS),
                           Outputs(torch.zeros(2, 3), {"layer2": torch.tensor(guide)})))
    assert terms["hint"].item() == pytest.approx(hint, rel=1e-5)
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert terms["loss"].item() == pytest.approx(hint + ce, rel=1e-5)


def hand_kd(student, teacher, t):
    """T^2 * mean over rows of KL(softmax(teacher / T) || softmax(student / T)), as plain loops."""
    def softmax(row):
        exps = [math.exp(v / t) for v in row]
        return [e / sum(exps) for e in exps]
    total = sum(sum(q * math.log(q / p) for p, q in zip(softmax(s), softmax(k))) for s, k in zip(student, teacher))
    return t * t * total / len(student)


def test_fitnets_with_kd_adds_kds_term_on_the_logits_and_keeps_the_hint():
    teacher_logits = [[2.0, 0.0, 1.0], [0.5, 0.5, -1.0]]
    hint_map = torch.tensor(HINT)
    guide = torch.arange(24, dtype=torch.float32).view(2, 3, 2, 2) / 10
    shapes = ({"layer2": torch.Size([2, 2, 2, 2])}, {"layer2": torch.Size([2, 3, 2, 2])})
    plain, with_kd = built(FitNets, *shapes), FitNets(temperature=3.0, alpha=0.8,
                                                      settings=FitNets.Settings(kd=True))
    with_kd.build(BuildContext(*map(probe_of, shapes), 10))
    with_kd.load_state_dict(plain.state_dict())  # the same regressor, so the same hint
    student = Outputs(torch.tensor(LOGITS), {"layer2": hint_map})
    teacher = Outputs(torch.tensor(teacher_logits), {"layer2": guide})
    hint = plain(Step(student, torch.tensor(LABELS), teacher))["hint"].item()
    terms = with_kd(Step(student, torch.tensor(LABELS), teacher))
    kd, ce = hand_kd(LOGITS, teacher_logits, 3.0), hand_cross_entropy(LOGITS, LABELS)
    assert terms["kd"].item() == pytest.approx(kd, rel=1e-5) and terms["hint"].item() == pytest.approx(hint, rel=1e-6)
    assert terms["loss"].item() == pytest.approx(0.8 * kd + 0.2 * ce + hint, rel=1e-5)


def test_attention_maps_of_a_1x2x2x2_tensor_by_hand():
    features = torch.tensor([[[[1.0, 2.0], [0.0, -1.0]], [[3.0, 0.0], [1.0, 1.0]]]])
    # p=2: mean over channels of f^2 = (1+9)/2, (4+0)/2, (0+1)/2, (1+1)/2 = 5, 2, 0.5, 1; norm sqrt(30.25) = 5.5
    assert attention_map(features, 2.0).tolist()[0] == pytest.approx([5 / 5.5, 2 / 5.5, 0.5 / 5.5, 1 / 5.5])
    # p=1 takes |f|: (1+3)/2, (2+0)/2, (0+1)/2, (1+1)/2 = 2, 1, 0.5, 1; norm sqrt(6.25) = 2.5
    assert attention_map(features, 1.0).tolist()[0] == pytest.approx([0.8, 0.4, 0.2, 0.4])


def hand_attention(feature, p, size):
    """Plain-loop attention map of one image's channels (lists of 2-D lists), pooled to size first."""
    channels = [hand_pool(channel, size) for channel in feature]
    values = [sum(abs(channel[i][j]) ** p for channel in channels) / len(channels)
              for i in range(size[0]) for j in range(size[1])]
    norm = math.sqrt(sum(v * v for v in values))
    return [v / norm for v in values]


def test_at_terms_match_hand_computed_values_over_three_layer_pairs():
    # a: same size, 2 vs 3 channels; b: the teacher's 4x4 map is pooled to the student's 2x2;
    # c: a 2x4 student map, the teacher's 4x4 map pooled to 2x4 (height and width apart)
    students = {"a": [[[[1.0, 2.0], [0.0, -1.0]], [[3.0, 0.0], [1.0, 1.0]]]],
                "b": [[[[0.0, 1.0], [2.0, 1.0]]]],
                "c": [[[[1.0, 2.0, 0.0, 1.0], [-1.0, 0.5, 2.0, 0.0]]]]}
    teachers = {"a": [[[[0.5, 1.0], [1.5, 0.0]], [[1.0, 1.0], [0.0, 2.0]], [[-2.0, 0.0], [1.0, 0.5]]]],
                "b": [[[[float((3 * i + j) % 5) - 1.0 for j in range(4)] for i in range(4)] for _ in range(2)]],
                "c": [[[[1.0, 0.0, 2.0, 1.0], [2.0, 1.0, 0.0, 0.5], [0.0, 3.0, 1.0, 1.0], [1.0, 1.0, -1.0, 2.0]]]]}
    weight, p = 1000.0, 2.0
    at = 0.0
    for path, size in (("a", (2, 2)), ("b", (2, 2)), ("c", (2, 4))):
        s_map, t_map = hand_attention(students[path][0], p, size), hand_attention(teachers[path][0], p, size)
        at += sum((s - t) ** 2 for s, t in zip(s_map, t_map)) / len(s_map)  # mean over 1 image x positions
    objective = AT(settings=AT.Settings(student_layers=list("abc"), teacher_layers=list("abc"), weight=weight, p=p))
    terms = objective(Step(Outputs(torch.tensor([LOGITS[0]]), {k: torch.tensor(v) for k, v in students.items()}),
                           torch.tensor([1]),
                           Outputs(torch.zeros(1, 3), {k: torch.tensor(v) for k, v in teachers.items()})))
    assert at > 0
    assert terms["at"].item() == pytest.approx(weight * at, rel=1e-5)
    assert terms["ce"].item() == pytest.approx(hand_cross_entropy([LOGITS[0]], [1]), rel=1e-6)
    assert terms["loss"].item() == pytest.approx(weight * at + terms["ce"].item(), rel=1e-6)


def test_pefd_terms_match_hand_computed_values():
    student = [[1.0, -2.0], [0.5, 1.5]]
    teacher = [[1.0, 0.0, 2.0], [0.0, 3.0, 1.0]]
    projectors = [([[1.0, 0.5], [-1.0, 1.0], [0.0, 2.0]], [0.0, 0.5, 1.0]),
                  ([[0.5, 0.5], [1.0, -0.5], [2.0, 0.0]], [1.0, 0.0, -0.5])]
    objective = built(PEFD, {"avgpool": torch.Size([2, 2, 1, 1])}, {"avgpool": torch.Size([2, 3, 1, 1])},
                      projectors=2, weight=25.0)
    with torch.no_grad():
        for linear, (weight, bias) in zip(objective.ensemble, projectors):
            linear.weight.copy_(torch.tensor(weight))
            linear.bias.copy_(torch.tensor(bias))
    distances = []
    for f_s, f_t in zip(student, teacher):
        outputs = [[max(sum(w * x for w, x in zip(row, f_s)) + b, 0.0) for row, b in zip(weight, bias)]
                   for weight, bias in projectors]
        mean = [sum(column) / len(outputs) for column in zip(*outputs)]
        cosine = sum(a * b for a, b in zip(mean, f_t)) / math.sqrt(sum(a * a for a in mean) * sum(b * b for b in f_t))
        distances.append(1 - cosine)
    pefd = 25.0 * sum(distances) / 2
    terms = objective(Step(Outputs(torch.tensor(LOGITS), {"avgpool": torch.tensor(student).view(2, 2, 1, 1)}),
                           torch.tensor(LABELS),
                           Outputs(torch.zeros(2, 3), {"avgpool": torch.tensor(teacher).view(2, 3, 1, 1)})))
    assert pefd > 0
    assert terms["pefd"].item() == pytest.approx(pefd, rel=1e-5)
    assert terms["loss"].item() == pytest.approx(pefd + hand_cross_entropy(LOGITS, LABELS), rel=1e-5)


# ---------------------------------------------------------------- shapes, gradients, labels

# (method, settings, student shapes, teacher shapes): channels and heights/widths differ
MISMATCHED = [
    (FitNets, {}, {"layer2": (2, 4, 8, 8)}, {"layer2": (2, 6, 4, 4)}),
    (FitNets, {}, {"layer2": (2, 4, 4, 6)}, {"layer2": (2, 6, 8, 3)}),
    (AT, {"student_layers": ["layer2", "layer3"], "teacher_layers": ["layer2", "layer3"]},
     {"layer2": (2, 4, 8, 8), "layer3": (2, 8, 4, 6)}, {"layer2": (2, 6, 4, 4), "layer3": (2, 3, 8, 3)}),
    (PEFD, {}, {"avgpool": (2, 4, 1, 1)}, {"avgpool": (2, 6, 1, 1)}),
    (PEFD, {"teacher_layer": "layer4"}, {"avgpool": (2, 4, 1, 1)}, {"layer4": (2, 6, 3, 3)}),
]


def random_outputs(shapes, requires_grad, seed):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 3, generator=generator).requires_grad_(requires_grad)
    features = {path: torch.randn(shape, generator=generator).relu().requires_grad_(requires_grad)
                for path, shape in shapes.items()}
    return Outputs(logits, features)


def test_build_sizes_the_adapters_from_the_shapes():
    fitnets = built(FitNets, {"layer2": torch.Size([2, 4, 8, 8])}, {"layer2": torch.Size([2, 6, 4, 4])})
    assert fitnets.regressor[0].weight.shape == (6, 4, 1, 1) and fitnets.regressor[1].num_features == 6
    pefd = built(PEFD, {"avgpool": torch.Size([2, 4, 1, 1])}, {"layer4": torch.Size([2, 6, 3, 3])},
                 teacher_layer="layer4", projectors=5)
    assert len(pefd.ensemble) == 5 and all(linear.weight.shape == (6, 4) for linear in pefd.ensemble)
    with pytest.raises(KdistillError, match="distill.fitnets.teacher_layer"):
        built(FitNets, {"layer2": torch.Size([2, 4, 8, 8])}, {"layer2": torch.Size([2, 6])})


def test_fitnets_regressor_ends_in_relu_only_for_a_non_negative_guided_layer():
    shapes = {"layer2": torch.Size([2, 4, 4, 4])}, {"layer2": torch.Size([2, 6, 4, 4])}
    relu_guide = built(FitNets, *shapes)  # a ResNet stage: a ReLU output, never negative
    signed = FitNets()
    signed_guide = probe_of(shapes[1])
    signed_guide["layer2"][1, 2, 3, 0] = -0.5  # one negative value: a linear bottleneck's output
    signed.build(BuildContext(probe_of(shapes[0]), signed_guide, 10))
    assert isinstance(relu_guide.regressor[-1], torch.nn.ReLU)
    assert not any(isinstance(layer, torch.nn.ReLU) for layer in signed.regressor)
    hint_map = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    assert signed.regressor(hint_map).min() < 0 and relu_guide.regressor(hint_map).min() >= 0
    # The same parameters either way, so a checkpoint loads into both.
    assert relu_guide.state_dict().keys() == signed.state_dict().keys()


@pytest.mark.parametrize("method, settings, student_shapes, teacher_shapes", MISMATCHED)
def test_gradients_reach_the_student_and_its_adapters_when_shapes_differ(method, settings, student_shapes,
                                                                         teacher_shapes):
    objective = built(method, student_shapes, teacher_shapes, **settings)
    student = random_outputs(student_shapes, True, seed=0)
    teacher = random_outputs(teacher_shapes, False, seed=1)
    terms = objective(Step(student, torch.tensor([0, 2]), teacher))
    assert set(terms) == {"loss", "ce", {FitNets: "hint", AT: "at", PEFD: "pefd"}[method]}
    assert all(term.dim() == 0 for term in terms.values()) and torch.isfinite(terms["loss"])
    terms["loss"].backward()
    assert student.logits.grad.abs().sum() > 0
    assert all(feature.grad.abs().sum() > 0 for feature in student.features.values())
    assert all(parameter.grad is not None and parameter.grad.abs().sum() > 0
               for name, parameter in objective.named_parameters() if name.endswith("weight"))


@pytest.mark.parametrize("method, settings, student_shapes, teacher_shapes", MISMATCHED[::2])
def test_unlabelled_images_drop_only_the_cross_entropy(method, settings, student_shapes, teacher_shapes):
    objective = built(method, student_shapes, teacher_shapes, **settings)
    student, teacher = random_outputs(student_shapes, False, 0), random_outputs(teacher_shapes, False, 1)
    feature_term = {FitNets: "hint", AT: "at", PEFD: "pefd"}[method]
    labelled = objective(Step(student, torch.tensor([0, 2]), teacher))
    unlabelled = objective(Step(student, torch.tensor([-1, -1]), teacher))
    half = objective(Step(student, torch.tensor([-1, 2]), teacher))
    assert unlabelled["ce"].item() == 0.0 and labelled["ce"].item() > 0
    assert unlabelled[feature_term].item() == pytest.approx(labelled[feature_term].item(), rel=1e-6)
    assert unlabelled["loss"].item() == pytest.approx(labelled[feature_term].item(), rel=1e-6)
    assert half["ce"].item() == pytest.approx(hand_cross_entropy(student.logits.tolist(), [-1, 2]), rel=1e-5)


# ---------------------------------------------------------------- settings


def test_defaults_are_valid_and_registered():
    for key, method in (("fitnets", FitNets), ("at", AT), ("pefd", PEFD)):
        assert DISTILLERS[key] is method and method.problems(method.Settings()) == []
    assert FitNets().student_features() == ("layer2",) and PEFD().teacher_features() == ("avgpool",)
    assert AT().teacher_features() == ("layer1", "layer2", "layer3", "layer4")


@pytest.mark.parametrize("method, name, value", [
    (FitNets, "student_layer", ""), (FitNets, "teacher_layer", "layer 2"), (FitNets, "hint_weight", -1.0),
    (AT, "student_layers", []), (AT, "teacher_layers", ["layer1", "layer2"]),
    (AT, "teacher_layers", ["layer1", " layer2", "layer3", "layer4"]), (AT, "p", 0.0), (AT, "weight", -1.0),
    (PEFD, "student_layer", ""), (PEFD, "teacher_layer", " "), (PEFD, "projectors", 0), (PEFD, "weight", -0.5),
])
def test_problems_reject_a_bad_value_of_each_setting(method, name, value):
    found = method.settings_problems(method.Settings(**{name: value}))
    assert found and found[0][0] == name, found  # an empty student_layers also mismatches teacher_layers
    assert all(message for _, message in found)


# ---------------------------------------------------------------- a tiny training run


def tiny_net(width, layer2_stride, seed):
    """A ResNet-shaped network whose module names match the default paths."""
    torch.manual_seed(seed)

    def stage(channels_in, stride):
        return nn.Sequential(nn.Conv2d(channels_in, width, 3, stride, 1), nn.ReLU())

    return nn.Sequential(OrderedDict(
        layer1=stage(3, 1), layer2=stage(width, layer2_stride), layer3=stage(width, 2), layer4=stage(width, 1),
        avgpool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(width, 3)))


@pytest.mark.parametrize("method", [FitNets, AT, PEFD])
def test_fit_trains_the_adapters_with_the_student_and_leaves_the_teacher_alone(method, tmp_path):
    student = tiny_net(4, layer2_stride=2, seed=0)
    teacher = tiny_net(6, layer2_stride=1, seed=1).eval()  # larger maps from layer2 on
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    objective = method()
    initial = {}
    build = objective.build

    def build_and_record(*args):
        build(*args)
        initial.update({k: v.clone() for k, v in objective.state_dict().items()})

    objective.build = build_and_record
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(16, 3, 8, 8, generator=generator), torch.arange(16) % 3
    train = Batches(images, labels, lambda x: x, teacher=OnlineTeacher(teacher, objective.teacher_features()))
    history = fit("student", student, student, train, Batches(images, labels, lambda x: x), objective,
                  TrainConfig(epochs=1, batch_size=8, lr=0.01), Session(str(tmp_path), CPU, seed=0))
    feature_term = {FitNets: "hint", AT: "at", PEFD: "pefd"}[method]
    assert math.isfinite(history[0]["train_loss"]) and history[0][f"train_{feature_term}"] > 0
    weights = [k for k in initial if k.endswith("weight")]
    assert len(weights) == {FitNets: 2, AT: 0, PEFD: 3}[method]
    assert all(not torch.equal(initial[k], objective.state_dict()[k]) for k in weights)
    assert any(not torch.equal(student_before[k], v) for k, v in student.state_dict().items())
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())


def test_auto_takes_the_shallowest_last_teacher_module_with_the_student_maps_size():
    student = [("layer1", (64, 16, 16)), ("layer2", (128, 8, 8)), ("fc", (10,))]
    # In the order forward passes end: a block's layers before the block; "act" runs twice and its
    # features are those of its last call (4x4), so it never stands for a 16x16 map.
    teacher = [("stem", (32, 16, 16)), ("act", (32, 16, 16)), ("blocks.0.conv", (64, 8, 8)), ("blocks.0", (64, 8, 8)),
               ("blocks.1.conv", (64, 8, 8)), ("blocks.1", (64, 8, 8)), ("blocks.2", (96, 4, 4)),
               ("act", (96, 4, 4)), ("head", (10,))]
    assert matching_teacher_module("layer2", student, teacher, "s") == "blocks.1"
    assert matching_teacher_module("layer1", student, teacher, "s") == "stem"
    with pytest.raises(KdistillError, match=r"^setting distill.at.teacher_layers is auto, .* student's fc gives "
                                            r"features of shape \(10,\)"):
        matching_teacher_module("fc", student, teacher, "distill.at.teacher_layers")
    with pytest.raises(KdistillError, match="no module of the teacher gives a map .* like the student's layer2"):
        matching_teacher_module("layer2", student, [("head", (10,))], "s")


def test_auto_takes_the_nearest_map_where_no_teacher_module_has_the_students_size():
    """A 64 px student's 8x8 map against a teacher that sees 128 px, or a 112 px student's 14x14:
    the nearest by ratio, and of two equally near (16x16 and 4x4 for 8x8) the larger."""
    teacher = [("stem", (32, 32, 32)), ("layer1", (64, 16, 16)), ("layer2", (128, 8, 8)), ("layer3", (256, 4, 4))]
    for side, nearest in ((14, "layer1"), (12, "layer1"), (10, "layer2"), (6, "layer2"), (5, "layer3"),
                          (2, "layer3"), (64, "stem")):
        assert matching_teacher_module("hint", [("hint", (8, side, side))], teacher, "s") == nearest, side
    assert matching_teacher_module("hint", [("hint", (8, 8, 8))], teacher[:2] + teacher[3:], "s") == "layer1"


@pytest.mark.parametrize("student_side, teacher_side", [(16, 14), (14, 16)])
def test_fitnets_pools_maps_whose_sizes_are_not_multiples_of_each_other(student_side, teacher_side):
    """What auto's nearest map gives (a 112 px student's 14x14 against a 16x16): the larger map is
    average-pooled to the smaller with overlapping windows (16 to 14: the first cell is the mean of
    the top-left 2x2), not refused."""
    torch.manual_seed(0)
    hint_map, guide = torch.randn(2, 4, student_side, student_side), torch.randn(2, 3, teacher_side, teacher_side)
    objective = built(FitNets, {"layer2": hint_map.shape}, {"layer2": guide.shape}, hint_weight=10.0).eval()
    terms = objective(Step(Outputs(torch.tensor(LOGITS), {"layer2": hint_map}), torch.tensor(LABELS),
                           Outputs(torch.zeros(2, 3), {"layer2": guide})))
    pooled = torch.nn.functional.adaptive_avg_pool2d(hint_map if student_side > teacher_side else guide, 14)
    larger = hint_map if student_side > teacher_side else guide
    assert torch.allclose(pooled[:, :, 0, 0], larger[:, :, :2, :2].mean((2, 3)))
    regressed = objective.regressor(pooled if student_side > teacher_side else hint_map)
    expected = 10.0 * torch.nn.functional.mse_loss(regressed, guide if student_side > teacher_side else pooled)
    assert terms["hint"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_auto_with_a_student_module_that_does_not_exist_names_the_students_setting():
    """The recommended preset with another student: its hint layer (ResNet's layer2) is the setting
    to change, and the error lists the modules there are."""
    cfg = build_config(sets=["distill.method=fitnets", "distill.fitnets.teacher_layer=auto", "image_size=32",
                             "student.arch=mobilenet_v3_small"])
    with pytest.raises(KdistillError) as error:
        resolve_auto_layers(cfg, lambda message: None)
    assert str(error.value) == ("setting distill.fitnets.student_layer: the student mobilenet_v3_small has no module "
                                "'layer2'; its top-level modules are: features, avgpool, classifier")
