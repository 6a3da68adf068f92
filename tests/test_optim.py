"""Optimizers, learning-rate schedules, weight decay groups, label smoothing and the weight average."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

from kdistill.config import TrainConfig, build_config
from kdistill.distillers import KD, CrossEntropy, build_distiller
from kdistill.errors import KdistillError
from kdistill.fileio import load_torch
from kdistill.models import build_model
from kdistill.batches import Batches
from kdistill.train import build_optimizer, fit, offered_val_acc
from kdistill.callbacks import Session
from lr_rates import learning_rates

CPU = torch.device("cpu")


# ---------------------------------------------------------------- schedules


def test_cosine_warms_up_linearly_then_anneals_by_the_formula():
    lr, steps = 0.1, 4  # 3 epochs of 4 steps: 1 epoch of warmup, then 8 steps of cosine
    warmup = [lr * (0.01 + 0.99 * k / steps) for k in range(steps)]
    cosine = [0.5 * (1 + math.cos(math.pi * t / 8)) * lr for t in range(8)]
    rates = learning_rates(TrainConfig(epochs=3, lr=lr, schedule="cosine", warmup_epochs=1), steps)
    assert rates == pytest.approx(warmup + cosine, rel=1e-9, abs=1e-12)
    plain = learning_rates(TrainConfig(epochs=3, lr=lr, schedule="cosine"), steps)
    assert plain == pytest.approx([0.5 * (1 + math.cos(math.pi * t / 12)) * lr for t in range(12)], rel=1e-9)


def test_onecycle_rises_to_lr_at_the_end_of_warmup_then_anneals():
    lr, steps = 0.1, 4
    start, end = lr / 25, lr / 25 / 1e4  # OneCycleLR's div_factor and final_div_factor

    def cos_between(a, b, fraction):
        return b + (a - b) / 2 * (1 + math.cos(math.pi * fraction))

    expected = [cos_between(start, lr, t / 3) for t in range(4)] + [cos_between(lr, end, t / 8) for t in range(1, 9)]
    rates = learning_rates(TrainConfig(epochs=3, lr=lr, schedule="onecycle", warmup_epochs=1), steps)
    assert rates == pytest.approx(expected, rel=1e-9)
    assert max(rates) == pytest.approx(lr, rel=1e-12) and rates.index(max(rates)) == 3
    default = learning_rates(TrainConfig(epochs=10, lr=lr, schedule="onecycle"), 10)
    assert default.index(max(default)) in (29, 30)  # OneCycleLR's default: the peak at 30% of training


def test_step_schedule_is_stepped_per_batch_with_the_same_rates_as_per_epoch():
    rates = learning_rates(TrainConfig(epochs=5, lr=1.0, lr_step=2, lr_gamma=0.5), 3)
    assert rates == pytest.approx([1.0] * 6 + [0.5] * 6 + [0.25] * 3, rel=1e-12)
    assert set(learning_rates(TrainConfig(epochs=3, lr=0.01), 3)) == {0.01}  # lr_step 0: constant


def tiny_data(count=30, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, 2, 2, generator=generator), torch.arange(count) % 3


def tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8), torch.nn.BatchNorm1d(8),
                               torch.nn.ReLU(), torch.nn.Linear(8, 3))


def run_fit(folder, cfg, model=None, images=None, labels=None, val_labels=None, log=lambda m: None):
    model = model or tiny_model()
    default_images, default_labels = tiny_data()
    images = default_images if images is None else images
    labels = default_labels if labels is None else labels
    val = Batches(images, labels if val_labels is None else val_labels, lambda x: x)
    history = fit("model", model, model, Batches(images, labels, lambda x: x), val, CrossEntropy(), cfg,
                  Session(str(folder), CPU, seed=0, log=log))
    return model, history


def test_fit_steps_the_cosine_schedule_every_batch_and_logs_the_rate_at_each_epoch_start(tmp_path):
    # 30 images in batches of 8: 4 steps per epoch, the last one partial
    cfg = TrainConfig(epochs=3, batch_size=8, lr=0.1, schedule="cosine", warmup_epochs=1)
    _, history = run_fit(tmp_path, cfg)
    rates = learning_rates(cfg, 4)
    assert [row["lr"] for row in history] == pytest.approx([rates[0], rates[4], rates[8]], rel=1e-12)
    assert history[0]["lr"] == pytest.approx(0.001) and history[1]["lr"] == pytest.approx(0.1)


# ---------------------------------------------------------------- optimizers and weight decay


def test_sgd_is_nesterov_with_momentum_0_9():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer, _ = build_optimizer(torch.nn.ParameterList([parameter]), TrainConfig(optimizer="sgd", lr=0.1), 1)
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.param_groups[0]["nesterov"] and optimizer.param_groups[0]["momentum"] == 0.9
    for _ in range(2):  # a constant gradient of 1: Nesterov steps 1 + 0.9, then 1 + 0.9 * 1.9
        optimizer.zero_grad()
        parameter.sum().backward()
        optimizer.step()
    assert parameter.item() == pytest.approx(-0.1 * (1.9 + 2.71), rel=1e-6)


def one_step_with_no_gradient(optimizer_name: str) -> float:
    parameter = torch.nn.Parameter(torch.full((2, 2), 4.0))
    cfg = TrainConfig(optimizer=optimizer_name, lr=0.1, weight_decay=0.5)
    optimizer, _ = build_optimizer(torch.nn.ParameterList([parameter]), cfg, 1)
    (parameter * 0).sum().backward()
    optimizer.step()
    return parameter[0, 0].item()


def test_adamw_decays_the_weights_apart_from_the_gradient_and_adam_adds_decay_to_it():
    assert one_step_with_no_gradient("adamw") == pytest.approx(4.0 * (1 - 0.1 * 0.5), rel=1e-6)  # decoupled
    assert one_step_with_no_gradient("adam") == pytest.approx(4.0 - 0.1, rel=1e-4)  # L2: one normalized step


def decay_by_name(model: torch.nn.Module, cfg: TrainConfig) -> dict[str, float]:
    optimizer, _ = build_optimizer(model, cfg, 1)
    decay = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    assert len(decay) == sum(1 for p in model.parameters() if p.requires_grad)  # each trained parameter once
    return {name: decay[id(p)] for name, p in model.named_parameters() if p.requires_grad}


def test_norm_and_bias_parameters_skip_weight_decay_unless_asked():
    model, _ = build_model("resnet18", 3)
    decay = decay_by_name(model, TrainConfig(optimizer="adamw", weight_decay=0.05, decay_norm_and_bias=False))
    for name in ("conv1.weight", "layer1.0.conv1.weight", "layer4.1.conv2.weight", "fc.weight"):
        assert decay[name] == 0.05, name
    for name in ("bn1.weight", "bn1.bias", "layer2.0.downsample.1.weight", "fc.bias"):
        assert decay[name] == 0.0, name
    assert set(decay_by_name(model, TrainConfig(weight_decay=0.05)).values()) == {0.05}  # the default decays all
    model.requires_grad_(False).fc.requires_grad_(True)  # a frozen backbone: only the head is optimized
    assert decay_by_name(model, TrainConfig(weight_decay=0.05, decay_norm_and_bias=False)) == {
        "fc.weight": 0.05, "fc.bias": 0.0}


def test_default_optimizer_is_the_adam_fit_always_built():
    model, _ = build_model("resnet18", 3)
    optimizer, scheduler = build_optimizer(model, TrainConfig(), 5)
    before = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=0.0)
    assert type(optimizer) is torch.optim.Adam and scheduler is None
    assert optimizer.state_dict()["param_groups"] == before.state_dict()["param_groups"]


# ---------------------------------------------------------------- label smoothing


def smoothed_cross_entropy(logits: list[list[float]], labels: list[int], smoothing: float) -> float:
    total = 0.0
    for row, label in zip(logits, labels):
        log_norm = math.log(sum(math.exp(v) for v in row))
        log_p = [v - log_norm for v in row]
        total += -(1 - smoothing) * log_p[label] - smoothing * sum(log_p) / len(row)
    return total / len(labels)


def test_label_smoothing_changes_the_cross_entropy_terms_only():
    student = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    teacher = torch.tensor([[2.0, 1.0, 0.0], [0.5, 0.5, 2.0]])
    labels, smoothing = [1, 2], 0.2
    expected = smoothed_cross_entropy(student, labels, smoothing)
    assert expected == pytest.approx(F.cross_entropy(torch.tensor(student), torch.tensor(labels),
                                                     label_smoothing=smoothing).item(), rel=1e-6)
    assert expected != pytest.approx(smoothed_cross_entropy(student, labels, 0.0), rel=1e-3)
    terms = CrossEntropy(label_smoothing=smoothing).logit_terms(torch.tensor(student), torch.tensor(labels))
    assert terms["ce"].item() == pytest.approx(expected, rel=1e-6) and terms["loss"] is terms["ce"]
    smoothed = build_distiller("kd", temperature=2.0, alpha=0.25, label_smoothing=smoothing).logit_terms(
        torch.tensor(student), torch.tensor(labels), teacher)
    plain = KD(temperature=2.0, alpha=0.25).logit_terms(torch.tensor(student), torch.tensor(labels), teacher)
    assert smoothed["ce"].item() == pytest.approx(expected, rel=1e-6)
    assert smoothed["kd"].item() == pytest.approx(plain["kd"].item(), rel=1e-7)
    assert smoothed["loss"].item() == pytest.approx(0.25 * plain["kd"].item() + 0.75 * expected, rel=1e-6)


# ---------------------------------------------------------------- the weight average (EMA)


def test_ema_is_the_exponential_average_of_the_weights_after_every_step_batchnorm_included(tmp_path):
    model = tiny_model()
    after_each_step = []
    handle = register_optimizer_step_post_hook(
        lambda optimizer, args, kwargs: after_each_step.append(
            {k: v.detach().clone() for k, v in model.state_dict().items()}))
    try:
        _, history = run_fit(tmp_path, TrainConfig(epochs=2, batch_size=10, lr=0.05, ema=0.6), model=model)
    finally:
        handle.remove()
    assert len(after_each_step) == 6  # 2 epochs of 3 batches
    expected = dict(after_each_step[0])  # the average starts at the weights after the first step
    for weights in after_each_step[1:]:
        expected = {k: 0.6 * expected[k] + 0.4 * weights[k] for k in expected}
    average = load_torch(str(tmp_path / "last.pt"))["ema"]
    assert average["n_averaged"].item() == 6
    for name, value in expected.items():
        if after_each_step[0][name].is_floating_point():  # parameters, BatchNorm's running mean and variance
            assert torch.allclose(average[f"module.{name}"], value, atol=1e-6), name
    assert not torch.allclose(average["module.2.running_mean"], after_each_step[-1]["2.running_mean"])
    assert all({"val_acc_ema", "val_loss_ema", "best_source"} <= set(row) for row in history)


def test_an_average_too_slow_for_the_run_is_named_with_the_decay_that_would_fit(tmp_path):
    """2 epochs of 3 steps: at 0.9 the weights after the first step are 0.9^5 = 59% of the final
    average; 0.01^(1/5) = 0.398 is the decay at which they would be 1%. At 0.3 (0.24%) nothing is said."""
    logged = []
    run_fit(tmp_path / "slow", TrainConfig(epochs=2, batch_size=10, lr=0.05, ema=0.9), log=logged.append)
    assert ("model: with ema 0.9, the weights after the first step still make up 59% of the average after this "
            "run's 6 steps (3 per epoch), so it will stay near them (the better of it and the trained weights is "
            "kept); an ema of at most 0.398 averages over the run") in logged
    logged.clear()
    run_fit(tmp_path / "fits", TrainConfig(epochs=2, batch_size=10, lr=0.05, ema=0.3), log=logged.append)
    assert logged and not any("with ema" in message for message in logged)


class Killed(Exception):
    pass


def kill_after_epoch(epoch: int):
    def log(message: str) -> None:
        if message.startswith(f"model epoch {epoch}/"):
            raise Killed
    return log


def test_when_the_average_scores_higher_best_pt_holds_it(tmp_path):
    images, _ = tiny_data()
    model = tiny_model().eval()
    with torch.no_grad():
        val_labels = model(images).argmax(1)  # the initial weights are right on every val image
    # Training pulls the weights to other labels; the first steps, in warmup, barely move them, so
    # a slow average stays near where the val labels are right.
    cfg = TrainConfig(epochs=2, batch_size=10, lr=0.5, optimizer="sgd", schedule="cosine", warmup_epochs=1,
                      ema=0.999)
    train = {"images": images, "labels": (val_labels + 1) % 3, "val_labels": val_labels}
    with pytest.raises(Killed):  # stopped after epoch 1, to look at that epoch's files
        run_fit(tmp_path, cfg, model=model, log=kill_after_epoch(1), **train)
    state, saved_best = load_torch(str(tmp_path / "last.pt")), load_torch(str(tmp_path / "best.pt"))
    first = state["history"][0]
    assert first["best_source"] == "ema" and first["val_acc_ema"] > first["val_acc"]
    assert offered_val_acc(first) == first["val_acc_ema"] == state["best_val_acc"]
    assert saved_best.keys() == state["model"].keys()
    assert all(torch.equal(saved_best[k], state["ema"][f"module.{k}"]) for k in saved_best)
    assert not all(torch.equal(saved_best[k], state["model"][k]) for k in saved_best)
    resumed, history = run_fit(tmp_path, cfg, **train)
    assert max(history, key=offered_val_acc)["epoch"] == 1  # still the best: best.pt kept, and loaded
    assert all(torch.equal(resumed.state_dict()[k], saved_best[k]) for k in saved_best)


@pytest.mark.parametrize("settings", [
    {"ema": 0.9},
    {"schedule": "cosine", "warmup_epochs": 1, "optimizer": "sgd"},
    {"schedule": "onecycle", "optimizer": "adamw", "weight_decay": 0.01, "decay_norm_and_bias": False,
     "label_smoothing": 0.1, "ema": 0.5},
])
def test_a_run_killed_after_epoch_1_resumes_to_the_same_end(tmp_path, settings):
    """Killed at an epoch's end with the same settings (a cosine or one-cycle schedule depends on
    the number of epochs, so stopping early is the kill, not a shorter run)."""
    cfg = TrainConfig(epochs=3, batch_size=8, lr=0.05, **settings)
    straight, straight_history = run_fit(tmp_path / "straight", cfg)
    with pytest.raises(Killed):
        run_fit(tmp_path / "resumed", cfg, log=kill_after_epoch(1))
    assert load_torch(str(tmp_path / "resumed" / "last.pt"))["epoch"] == 1
    resumed, resumed_history = run_fit(tmp_path / "resumed", cfg)

    def without_seconds(history):
        return [{k: v for k, v in row.items() if k != "seconds"} for row in history]
    assert without_seconds(resumed_history) == without_seconds(straight_history)
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), straight.state_dict().values()))
    ends = [load_torch(str(tmp_path / name / "last.pt")) for name in ("straight", "resumed")]
    for part in ("model", "ema"):
        assert ends[0][part].keys() == ends[1][part].keys()
        assert all(torch.equal(ends[0][part][k], ends[1][part][k]) for k in ends[0][part])
    assert ends[0]["scheduler"] == ends[1]["scheduler"]


# ---------------------------------------------------------------- settings that go together


@pytest.mark.parametrize("sets, name", [
    (["student.warmup_epochs=2"], "student.warmup_epochs"),  # schedule step has no warmup
    (["student.schedule=cosine", "student.lr_step=10"], "student.lr_step"),
    (["teacher.schedule=onecycle", "teacher.epochs=3", "teacher.warmup_epochs=3"], "teacher.warmup_epochs"),
])
def test_settings_that_do_not_go_together_are_refused_naming_one(sets, name):
    with pytest.raises(KdistillError, match=rf"^setting {name} ") as error:
        build_config(sets=sets)
    assert "\n" not in str(error.value)


def test_settings_that_go_together_are_taken():
    cfg = build_config(sets=["student.schedule=cosine", "student.warmup_epochs=5", "student.optimizer=sgd",
                             "student.ema=0.999", "teacher.schedule=onecycle", "teacher.warmup_epochs=2"])
    assert (cfg.student.schedule, cfg.student.warmup_epochs, cfg.teacher.warmup_epochs) == ("cosine", 5, 2)
