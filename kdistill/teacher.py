"""The teacher: trained once (its head on cached features, or fully fine-tuned), then served to the
student as a signal: cached logits, logits for stored views, or the model itself online."""
from __future__ import annotations

import dataclasses
import os
from typing import NamedTuple

import torch

from .augment import stored_views
from .batcher import ImageBatcher
from .compute import ONE_PROCESS, Compute, Ranks
from .config import Config
from .data import PreparedData
from .distillers import CrossEntropy
from .features import OnlineTeacher
from .fileio import tensors_sha256
from .models import Standardized, standardized_model, trainable_part
from .teacher_signal import cached_tensors, head_inputs, signal_key
from .train import Batches, fit, predict_logits


class TrainedTeacher(NamedTuple):
    model: Standardized  # eval mode, frozen
    head: str  # module path of the head
    normalize: str  # the input statistics it was trained with
    history: list[dict]
    features: dict[str, torch.Tensor] | None  # cached backbone features per split (head-only mode)

    def train_logits(self, batcher: ImageBatcher, batch_size: int, compute: Compute,
                     transfer: str | None = None) -> torch.Tensor:
        """The teacher's logits for every training image (unaugmented view), then for every image
        of the transfer split, if any."""
        if self.features is not None:
            # The head on the cached backbone features: the same logits, without a second backbone pass.
            features = self.features["train"]
            logits = predict_logits(self.model.get_submodule(self.head),
                                    Batches(features, torch.zeros(len(features)), lambda x: x), batch_size, *compute)
        else:
            logits = predict_logits(self.model, batcher("train"), batch_size, *compute)
        if transfer is None:
            return logits
        return torch.cat([logits, predict_logits(self.model, batcher(transfer), batch_size, *compute)])


def train_teacher(cfg: Config, data: PreparedData, batcher: ImageBatcher, compute: Compute, log,
                  ranks: Ranks = ONE_PROCESS) -> TrainedTeacher:
    """The teacher trained (by every process, see fit); frozen backbone features computed once per
    node, by its first process."""
    t = cfg.teacher
    torch.manual_seed(cfg.seed)
    teacher, head, normalize = standardized_model(t.arch, len(data.classes), t.dropout, t.weights, t.normalize,
                                                  data.mean, data.std)
    trained_part = "frozen backbone, head only" if t.mode == "head" else "fully fine-tuned"
    log(f"teacher: {t.arch}, weights {t.weights}, {trained_part}, input standardized with {normalize} "
        f"statistics, {t.epochs} epochs")
    teacher = compute.place(teacher)
    head_only = t.mode == "head"
    trainable = trainable_part(teacher, head, head_only)
    checkpoint_dir = os.path.join(cfg.out, "checkpoints", "teacher")
    train, val = data.splits["train"], data.splits["val"]
    features = None
    if head_only and cfg.augment == "none":
        # The frozen backbone is a fixed function of the image: compute its features once and
        # train the head on them. Exact, and ten epochs cost one forward pass.
        backbone = {k: v for k, v in teacher.state_dict().items() if not k.startswith(head + ".")}
        key = signal_key("features", t.arch, tensors_sha256(backbone), data.key, compute.key())

        def compute_features() -> dict[str, torch.Tensor]:
            return {name: head_inputs(teacher, head, batcher(name), t.batch_size, *compute)
                    for name in ("train", "val")}
        features = ranks.main_first(lambda: cached_tensors(
            os.path.join(data.folder, "signal", f"features-{key}.pt"),
            {"train": len(train.files), "val": len(val.files)}, compute_features, "teacher features", log))
        history = fit("teacher", trainable, trainable,
                      Batches(features["train"], train.labels, lambda x: x),
                      Batches(features["val"], val.labels, lambda x: x),
                      CrossEntropy(t.label_smoothing), t, checkpoint_dir, compute.device, cfg.seed, log,
                      compute.precision, ranks)
    else:
        history = fit("teacher", teacher, trainable, batcher("train", augment=True), batcher("val"),
                      CrossEntropy(t.label_smoothing), t, checkpoint_dir, compute.device, cfg.seed, log,
                      compute.precision, ranks)
    return TrainedTeacher(teacher.eval().requires_grad_(False), head, normalize, history, features)


def distillation_batches(signal: str, cfg: Config, data: PreparedData, trained_teacher: TrainedTeacher,
                         batcher: ImageBatcher, compute: Compute, log, transfer: str | None = None,
                         ranks: Ranks = ONE_PROCESS) -> Batches:
    """The student's training batches with the teacher's signal: cached, stored views, or online.

    transfer: the split of unlabelled images the teacher labels, served after the training images
    (labels -1: they reach the student through the teacher's terms only). A stored signal is
    computed once per node, by its first process; the others read it."""
    teacher, batch_size = trained_teacher.model, cfg.student.batch_size
    served = batcher.join("train", transfer) if transfer else "train"
    train = batcher.splits[served]
    if signal == "online":  # the teacher sees each freshly drawn (and mixed) view
        return batcher(served, augment=True, mix=True,
                       teacher=OnlineTeacher(teacher, cfg.distiller().teacher_features()))
    teacher_hash = tensors_sha256(teacher.state_dict())
    # A transfer set joins the key only when set, so earlier signal caches stay valid.
    transfer_key = [f"transfer {transfer}"] if transfer else []
    if signal == "cached":  # no augmentation: one set of logits per training image
        key = signal_key("logits", teacher_hash, data.key, *transfer_key, compute.key())
        logits = ranks.main_first(lambda: cached_tensors(
            os.path.join(data.folder, "signal", f"logits-{key}.pt"), {"train": len(train.files)},
            lambda: {"train": trained_teacher.train_logits(batcher, batch_size, compute, transfer)},
            "teacher logits", log))["train"]
        return batcher(served, extras={"teacher_logits": logits})
    # views (FKD): logits for K stored augmented views per image
    views = stored_views(cfg.augment, len(train.files), cfg.distill.views, cfg.image_size, cfg.seed,
                         cfg.rrc_scale, cfg.rrc_ratio)
    count = views.shape[1]
    if count != cfg.distill.views:
        log(f"teacher signal: augment={cfg.augment} has {count} distinct views per image; storing those")
    # The box ranges draw the views too (the key of the other kinds is as it always was).
    augmentation = f"{cfg.augment} {cfg.rrc_scale} {cfg.rrc_ratio}" if cfg.augment == "rrc_flip" else cfg.augment
    key = signal_key("views", teacher_hash, data.key, augmentation, str(count), str(cfg.seed), *transfer_key,
                     compute.key())
    logits = ranks.main_first(lambda: cached_tensors(
        os.path.join(data.folder, "signal", f"views-{key}.pt"), {"train": len(train.files)},
        lambda: {"train": torch.stack([predict_logits(teacher, batcher(served, views=views[:, k:k + 1]),
                                                      batch_size, *compute) for k in range(count)], 1)},
        f"teacher logits for {count} views per image", log))["train"]
    return batcher(served, views=views, extras={"teacher_logits": logits})


def without_teacher(batches: Batches, labelled: int) -> Batches:
    """The same batches, views and order, without the teacher's signal: the baseline's input.

    With a transfer set, the first `labelled` samples only (the training images): without a
    teacher, an unlabelled image teaches nothing."""
    plain = dataclasses.replace(batches, extras={}, teacher=None)
    if len(batches) == labelled:
        return plain
    return dataclasses.replace(plain, inputs=batches.inputs.first, labels=batches.labels[:labelled],
                               views=None if batches.views is None else batches.views[:labelled])
