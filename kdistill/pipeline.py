"""`kdistill run`: prepare -> teacher -> student -> baseline -> evaluate and report -> predict -> export.

The run folder is the unit of work: every stage saves as it goes and reuses what a previous run
in the same folder finished, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import os
import time

import torch
from torch import nn

from .config import Config, read_yaml, result_differences, save_config
from .data import PreparedData, SplitData, normalize, prepare
from .distillers import CrossEntropy, build_distiller
from .errors import KdistillError, printable
from .evaluate import profile, write_predictions
from .export import export_onnx, save_bundle
from .fileio import save_torch, state_dict_sha256
from .models import build_model, trainable_part
from .report import write_report
from .teacher_signal import cached_tensors, head_inputs, signal_key
from .train import Batches, fit, predict_logits


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KdistillError(f"setting device is {name!r} but no CUDA device is available")
    return device


def make_logger(out: str):
    log_path = os.path.join(out, "log.txt")

    def log(message: str) -> None:
        message = printable(message)
        print(message, flush=True)
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(message + "\n")
    return log


class ImageBatcher:
    """Turns cached uint8 splits into Batches: resident on the GPU when they fit, normalized there."""

    def __init__(self, data: PreparedData, cfg: Config, device: torch.device):
        self.device = device
        self.mean = torch.tensor(data.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(data.std, device=device).view(1, 3, 1, 1)
        self.flip = cfg.augment == "flip"
        self.channels_last = device.type == "cuda"
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
        self.resident = device.type == "cuda" and sum(
            s.images.numel() for s in data.splits.values()) < 0.4 * free

    def __call__(self, split: SplitData, augment: bool = False, **extra) -> Batches:
        images = split.images.to(self.device) if self.resident else split.images
        labels = split.labels if split.labels is not None else torch.zeros(len(split.files), dtype=torch.int64)
        flip = augment and self.flip

        def to_model_input(batch: torch.Tensor) -> torch.Tensor:
            x = normalize(batch, self.mean, self.std)
            if flip:  # a random horizontal flip per image, as one tensor operation
                mask = torch.rand(len(x), 1, 1, 1, device=x.device) < 0.5
                x = torch.where(mask, x.flip(3), x)
            return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
        return Batches(images, labels, to_model_input, **extra)


def _place(model: nn.Module, device: torch.device) -> nn.Module:
    model.to(device)
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


def train_teacher(cfg: Config, data: PreparedData, batcher: ImageBatcher, device, log) -> tuple[nn.Module, list]:
    t = cfg.teacher
    torch.manual_seed(cfg.seed)
    teacher, head = build_model(t.arch, len(data.classes), t.dropout, t.weights)
    teacher = _place(teacher, device)
    head_only = t.mode == "head"
    trainable = trainable_part(teacher, head, head_only)
    checkpoint_dir = os.path.join(cfg.out, "checkpoints", "teacher")
    train, val = data.splits["train"], data.splits["val"]
    if head_only and cfg.augment == "none":
        # The frozen backbone is a fixed function of the image: compute its features once and
        # train the head on them. Exact, and ten epochs cost one forward pass.
        backbone = {k: v for k, v in teacher.state_dict().items() if not k.startswith(head + ".")}
        key = signal_key("features", t.arch, state_dict_sha256(backbone), data.key)

        def compute() -> dict[str, torch.Tensor]:
            return {name: head_inputs(teacher, head, batcher(split), t.batch_size, device)
                    for name, split in (("train", train), ("val", val))}
        features = cached_tensors(os.path.join(data.folder, "signal", f"features-{key}.pt"),
                                  {"train": len(train.files), "val": len(val.files)}, compute,
                                  "teacher features", log)
        history = fit("teacher", trainable, trainable,
                      Batches(features["train"], train.labels, lambda x: x),
                      Batches(features["val"], val.labels, lambda x: x),
                      CrossEntropy(), t, checkpoint_dir, device, cfg.seed, log)
    else:
        history = fit("teacher", teacher, trainable, batcher(train, augment=True), batcher(val),
                      CrossEntropy(), t, checkpoint_dir, device, cfg.seed, log)
    return teacher.eval().requires_grad_(False), history


def train_student(name: str, cfg: Config, data: PreparedData, train: Batches, val: Batches,
                  objective: nn.Module, device, log) -> tuple[nn.Module, list]:
    s = cfg.student
    # The student and the baseline start from the same weights and see the same batch order:
    # the teacher is the only difference between them.
    torch.manual_seed(cfg.seed + 1)
    student, _ = build_model(s.arch, len(data.classes), s.dropout, s.weights)
    student = _place(student, device)
    if cfg.compile and device.type == "cuda":
        student.compile()
    history = fit(name, student, student, train, val, objective, s,
                  os.path.join(cfg.out, "checkpoints", name), device, cfg.seed + 1, log)
    return student.eval(), history


def summarize(arch: str, model: nn.Module, history: list[dict], weights_file: str, image_size: int,
              device: torch.device) -> dict:
    best = max(history, key=lambda row: row["val_acc"])  # the first epoch reaching the best
    return {"arch": arch, "best_val_acc": best["val_acc"], "best_epoch": best["epoch"],
            "final_val_acc": history[-1]["val_acc"], "epochs": len(history),
            "train_seconds": sum(row["seconds"] for row in history),
            **profile(model, weights_file, image_size, device)}


def _check_out_folder(cfg: Config) -> None:
    """An --out holding a different experiment is refused rather than mixed or overwritten."""
    config_path = os.path.join(cfg.out, "config.yaml")
    if os.path.exists(config_path):
        differences = result_differences(read_yaml(config_path, f"saved config {config_path}"), cfg.to_dict())
        if differences:
            raise KdistillError(f"{cfg.out} holds a run with other settings ({'; '.join(differences[:3])}); "
                                f"use another --out, or the same settings to resume it")


def run(cfg: Config, log=None) -> dict:
    """Run the whole experiment described by cfg (already validated); return metrics.json's content."""
    if not cfg.data or not cfg.out:
        raise KdistillError("settings data and out are required (--data DATA --out OUT)")
    _check_out_folder(cfg)
    os.makedirs(cfg.out, exist_ok=True)
    save_config(cfg, os.path.join(cfg.out, "config.yaml"))
    log = log or make_logger(cfg.out)
    device = resolve_device(cfg.device)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    started = time.perf_counter()

    data = prepare(cfg.data, cfg.image_size, cfg.resolved_cache_dir(), val_fraction=cfg.val_fraction,
                   seed=cfg.seed, workers=cfg.workers, max_pixels=cfg.max_image_pixels,
                   skip_bad=cfg.skip_bad, log=log)
    batcher = ImageBatcher(data, cfg, device)
    models_dir = os.path.join(cfg.out, "models")
    train, val = data.splits["train"], data.splits["val"]
    histories, trained = {}, {}

    teacher, histories["teacher"] = train_teacher(cfg, data, batcher, device, log)
    save_torch(teacher.state_dict(), os.path.join(models_dir, "teacher.pt"), what="teacher weights")
    trained["teacher"] = (cfg.teacher.arch, teacher)

    signal = cfg.signal_mode()
    if signal == "cached":
        key = signal_key("logits", state_dict_sha256(teacher.state_dict()), data.key)
        logits = cached_tensors(
            os.path.join(data.folder, "signal", f"logits-{key}.pt"), {"train": len(train.files)},
            lambda: {"train": predict_logits(teacher, batcher(train), cfg.student.batch_size, device)},
            "teacher logits", log)["train"]
        student_train = batcher(train, extras={"teacher_logits": logits})
    else:
        student_train = batcher(train, augment=True, teacher=teacher)
    distiller = build_distiller(cfg.distill.method, cfg.distill.temperature, cfg.distill.alpha)
    student, histories["student"] = train_student("student", cfg, data, student_train, batcher(val),
                                                  distiller, device, log)
    trained["student"] = (cfg.student.arch, student)
    if cfg.baseline:
        baseline, histories["baseline"] = train_student("baseline", cfg, data, batcher(train, augment=True),
                                                        batcher(val), CrossEntropy(), device, log)
        trained["baseline"] = (cfg.student.arch, baseline)

    models = {}
    for name, (arch, model) in trained.items():
        weights_file = os.path.join(models_dir, f"{name}.pt")
        if name != "teacher":
            save_torch(model.state_dict(), weights_file, what=f"{name} weights")
        models[name] = summarize(arch, model, histories[name], weights_file, cfg.image_size, device)

    if "test" in data.splits and data.splits["test"].files:
        test = data.splits["test"]
        write_predictions(os.path.join(cfg.out, "predictions.csv"), test.files,
                          predict_logits(student, batcher(test), cfg.student.batch_size, device), data.classes)
        log(f"predict: wrote {len(test.files)} predictions of the distilled student to "
            f"{os.path.join(cfg.out, 'predictions.csv')}")

    student_cpu = student.cpu()
    save_bundle(os.path.join(cfg.out, "student.pt"), student_cpu, cfg.student.arch, cfg.student.dropout,
                data.classes, cfg.image_size, data.mean, data.std)
    onnx_diff = export_onnx(os.path.join(cfg.out, "student.onnx"), student_cpu, cfg.image_size, data.mean, data.std)
    log(f"export: student.pt and student.onnx (ONNX Runtime matches PyTorch within {onnx_diff:.1e})")

    metrics = {"classes": len(data.classes), "class_names": data.classes,
               "images": {name: len(split.files) for name, split in data.splits.items()},
               "skipped_files": len(data.skipped), "device": str(device), "teacher_signal": signal,
               "onnx_max_abs_diff": onnx_diff, "models": models}
    write_report(cfg.out, metrics, histories, cfg.to_dict())
    lines = [f"  {name:9s} best val acc {m['best_val_acc']:.2%} (epoch {m['best_epoch']}), "
             f"{m['params'] / 1e6:.1f}M params, {m['gflops']:.2f} GFLOPs" for name, m in models.items()]
    log("done in {:.0f} s; report in {}\n{}".format(time.perf_counter() - started,
                                                   os.path.join(cfg.out, "report.md"), "\n".join(lines)))
    return metrics
