"""The shortcuts are exact: cached teacher logits and cached backbone features change no number."""
import copy

import torch

from kdistill.config import TrainConfig
from kdistill.distillers import CrossEntropy
from kdistill.models import build_model, trainable_part
from kdistill.compute import Compute
from kdistill.teacher import TrainedTeacher
from kdistill.teacher_signal import cached_tensors, head_inputs
from kdistill.batches import Batches
from kdistill.inference import predict_logits
from kdistill.train import fit
from kdistill.callbacks import Session

CPU = torch.device("cpu")


def image_batches(n=40, size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)
    labels = torch.arange(n) % 4
    return Batches(images, labels, lambda x: x.float() / 255 - 0.5)


def test_cached_teacher_logits_equal_online_ones_and_are_reused(tmp_path):
    torch.manual_seed(0)
    teacher, _ = build_model("resnet18", 4)
    teacher.eval()
    batches = image_batches()
    calls = []

    def compute():
        calls.append(1)
        return {"train": predict_logits(teacher, batches, 16, CPU)}
    path = str(tmp_path / "logits.pt")
    cached = cached_tensors(path, {"train": 40}, compute, "teacher logits", lambda m: None)["train"]
    again = cached_tensors(path, {"train": 40}, compute, "teacher logits", lambda m: None)["train"]
    assert len(calls) == 1 and torch.equal(cached, again)
    online = torch.cat([teacher(batch.x) for batch in batches.iterate(7, CPU)]).detach()  # other batch size
    torch.testing.assert_close(cached, online, rtol=1e-4, atol=1e-4)
    # Batches serve the cached logits aligned with their (shuffled) images.
    served = Batches(batches.inputs, batches.labels, batches.to_model_input, extras={"teacher_logits": cached})
    for x, _, teacher_said, _ in served.iterate(8, CPU, shuffle=True, generator=torch.Generator().manual_seed(1)):
        torch.testing.assert_close(teacher_said.logits, teacher(x).detach(), rtol=1e-4, atol=1e-4)


def test_a_damaged_signal_file_is_recomputed(tmp_path):
    path = tmp_path / "logits.pt"
    path.write_bytes(b"not a checkpoint")
    messages = []
    result = cached_tensors(str(path), {"train": 3}, lambda: {"train": torch.ones(3, 2)}, "teacher logits",
                            messages.append)
    assert torch.equal(result["train"], torch.ones(3, 2)) and any("recomputing" in m for m in messages)


def test_head_trained_on_cached_features_matches_head_trained_online(tmp_path):
    torch.manual_seed(0)
    online_model, head = build_model("resnet18", 4, dropout=0.5)
    cached_model = copy.deepcopy(online_model)
    train, val = image_batches(40, seed=0), image_batches(16, seed=1)
    config = TrainConfig(epochs=3, batch_size=8, lr=1e-2, lr_step=2)
    quiet = lambda m: None  # noqa: E731

    online_head = trainable_part(online_model, head, head_only=True)
    torch.manual_seed(5)
    online_history = fit("online", online_model, online_head, train, val, CrossEntropy(), config,
                         Session(str(tmp_path / "online"), CPU, seed=3, log=quiet))

    cached_head = trainable_part(cached_model, head, head_only=True)
    features = {name: head_inputs(cached_model, head, b, 16, CPU) for name, b in (("train", train), ("val", val))}
    torch.manual_seed(5)
    cached_history = fit("cached", cached_head, cached_head,
                         Batches(features["train"], train.labels, lambda x: x),
                         Batches(features["val"], val.labels, lambda x: x),
                         CrossEntropy(), config, Session(str(tmp_path / "cached"), CPU, seed=3, log=quiet))

    for key, value in online_head.state_dict().items():
        torch.testing.assert_close(cached_head.state_dict()[key], value, rtol=1e-4, atol=1e-5)
    for a, b in zip(online_history, cached_history):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-4 and a["val_acc"] == b["val_acc"]


def test_teacher_logits_from_cached_features_equal_a_full_forward_pass():
    torch.manual_seed(0)
    teacher, head = build_model("resnet18", 4, dropout=0.3)
    teacher.eval()
    batches = image_batches()
    features = head_inputs(teacher, head, batches, 16, CPU)
    from_features = TrainedTeacher(teacher, head, "dataset", [], {"train": features}, Compute(CPU, "fp32")
                                   ).train_logits(None, 16)
    torch.testing.assert_close(from_features, predict_logits(teacher, batches, 16, CPU), rtol=1e-4, atol=1e-4)


def test_stored_views_are_keyed_by_the_views_themselves():
    """Any parameter that draws the views (a crop range, a seed, a new augmentation's own) changes
    the views and so the key: no stale signal can be served for other crops."""
    from types import SimpleNamespace

    from kdistill.augmentations import stored_views
    from kdistill.teacher import StoredSignal

    teacher = SimpleNamespace(model=torch.nn.Linear(2, 2), compute=SimpleNamespace(key=lambda: "cpu-fp32"))
    data = SimpleNamespace(key="data")

    def key(augment, scale, seed=0):
        views = stored_views(augment, 10, 4, 32, seed, {"rrc_scale": scale, "rrc_ratio": (3 / 4, 4 / 3)})
        stored = StoredSignal(SimpleNamespace(augment=augment), data, None, "train", None, views, print, None)
        return stored.key_parts(teacher)
    assert key("rrc_flip", (0.35, 1.0)) == key("rrc_flip", (0.35, 1.0))
    assert key("rrc_flip", (0.35, 1.0)) != key("rrc_flip", (0.25, 1.0))
    assert key("rrc_flip", (0.35, 1.0)) != key("rrc_flip", (0.35, 1.0), seed=1)
    assert key("crop_flip", (0.35, 1.0)) != key("flip", (0.35, 1.0))
