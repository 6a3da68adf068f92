"""The last stage of `kdistill run`: measure the trained models, write predictions, the exports,
metrics.json and both reports, then the closing summary. Everything here reads what the training
stages made (Trained); nothing trains."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .batcher import ImageBatcher
from .callbacks import offered_val_acc
from .compute import Compute
from .config import Config
from .signal_plan import SignalPlan
from .data import PreparedData, to_unit_range
from .deploy import deployment_check
from .diagnose import run_warnings
from .evaluate import profile, write_predictions
from .export import ONNX_PROBE_IMAGES, export_onnx, save_bundle
from .html_report import write_html_report
from .report import write_report, write_val_predictions
from .run_folder import RunFolder
from .significance import discordant_counts, mcnemar, summarize_seeds
from .inference import predict_logits



@dataclass
class Stopwatch:
    """Wall time of each stage in this invocation (metrics.json's stage_seconds)."""
    started: float = field(default_factory=time.perf_counter)
    seconds: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        self.last = self.started

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = round(now - self.last, 2)
        self.last = now


@dataclass
class Trained:
    """What the training stages hand to this one."""
    cfg: Config
    data: PreparedData
    batcher: ImageBatcher
    compute: Compute
    teachers: dict[str, Any]  # run name -> teacher.TrainedTeacher
    students: Any  # pipeline.TrainedStudents
    signal: SignalPlan
    ensemble: dict | None
    transfer: str | None  # the transfer set's split, if any

    @property
    def folder(self) -> RunFolder:
        return RunFolder(self.cfg.out)


def run_name(kind: str, seed: int, cfg: Config) -> str:
    """A single run keeps the plain names; with seeds each seed's checkpoints, weights and history get their own."""
    return f"{kind}-seed{seed}" if cfg.seeds else kind


def best_and_final(history: list[dict]) -> dict:
    """The best epoch by val accuracy of the weights it offers (raw or EMA), and the last one's."""
    best = max(history, key=offered_val_acc)  # the first epoch reaching the best
    return {"best_val_acc": offered_val_acc(best), "best_epoch": best["epoch"],
            "final_val_acc": offered_val_acc(history[-1])}


def summarize(arch: str, seed: int, normalize: str, model, history: list[dict], weights_file: str, image_size: int,
              device) -> dict:
    return {"arch": arch, "seed": seed, "input_standardization": normalize,
            "input_size": getattr(model, "input_size", 0) or image_size, **best_and_final(history),
            "epochs": history[-1]["epoch"], "train_seconds": sum(row["seconds"] for row in history),
            **profile(model, weights_file, image_size, device)}


def _measure(run: Trained, histories: dict) -> tuple[dict, list]:
    """Each model's row of the comparison, and per seed the (b, c) counts of the paired test."""
    cfg, students = run.cfg, run.students
    trained = {**{name: (name, teacher.seed, teacher.normalize, teacher.model)
                  for name, teacher in run.teachers.items()}, **students.first}
    models = {kind: summarize(run.teachers[kind].arch if kind in run.teachers else cfg.student.arch, seed, normalize,
                              model, histories[name], run.folder.model_weights(name), cfg.image_size,
                              run.compute.device)
              for kind, (name, seed, normalize, model) in trained.items()}
    counts = []  # per seed, (b, c): val images only the distilled student / only the baseline gets right
    if "baseline" in students.rows:  # with born again, generation 0
        labels = run.data.splits["val"].labels
        for row in students.rows["student"]:
            right = [(students.val_predicted[run_name(kind, row["seed"], cfg)] == labels).tolist()
                     for kind in ("student", "baseline")]
            counts.append(discordant_counts(*right))
    return models, counts


def _predict_and_export(run: Trained, input_standardization: str, log) -> tuple[Any, float]:
    """predictions.csv for DATA/test, student.pt and student.onnx: (the student on the CPU, ONNX's largest gap)."""
    cfg, data, student = run.cfg, run.data, run.students.first["student"][3]
    if "test" in data.splits and data.splits["test"].files:
        test = data.splits["test"]
        write_predictions(run.folder.predictions, test.files,
                          predict_logits(student, run.batcher("test"), cfg.student.batch_size, run.compute.device,
                                         run.compute.precision),
                          data.classes)
        log(f"predict: wrote {len(test.files)} predictions of the distilled student to "
            f"{run.folder.predictions}")
    student_cpu = student.cpu()
    described = save_bundle(run.folder.student_bundle, student_cpu, cfg.student.arch, cfg.student.dropout,
                            data.classes, cfg.image_size, input_standardization)
    val_images = data.splits["val"].images[:ONNX_PROBE_IMAGES]
    onnx_diff = export_onnx(run.folder.student_onnx, student_cpu, to_unit_range(val_images), described)
    log(f"export: student.pt and student.onnx (ONNX Runtime matches PyTorch within {onnx_diff:.1e} on "
        f"{len(val_images)} val images)")
    return student_cpu, onnx_diff


def _metrics(run: Trained, models: dict, counts: list, onnx_diff: float, stage_seconds: dict) -> dict:
    cfg, data, signal, transfer = run.cfg, run.data, run.signal, run.transfer
    metrics = {"classes": len(data.classes), "class_names": data.classes,
               "images": {name: len(split.files) for name, split in data.splits.items()},
               "skipped_files": len(data.skipped), "device": str(run.compute.device),
               "precision": run.compute.precision, "threads": torch.get_num_threads(),
               "computed_in": {**{name: teacher.compute.label() for name, teacher in run.teachers.items()},
                               "student": run.compute.label()},
               "teacher_signal": signal.kind if cfg.mix == "none" else f"{signal.kind} (mixed batches)",
               "teacher_signal_reason": signal.reason,
               "transfer_set": {"source": cfg.distill.unlabeled, "images": len(data.splits[transfer].files)}
               if transfer else None, "ensemble": run.ensemble,
               "onnx_max_abs_diff": onnx_diff, "stage_seconds": stage_seconds, "models": models}
    if run.students.generations:
        metrics["generations"] = run.students.generations
    if cfg.seeds:
        metrics["seeds"] = run.students.rows
        metrics["summary"] = summarize_seeds(run.students.rows, counts)
    elif counts:
        metrics["mcnemar"] = mcnemar(*counts[0])
    return metrics


def _closing_lines(run: Trained, metrics: dict) -> list[str]:
    lines = [f"  {name:9s} best val acc {m['best_val_acc']:.2%} (epoch {m['best_epoch']}), "
             f"{m['params'] / 1e6:.1f}M params, {m['gflops']:.2f} GFLOPs" for name, m in metrics["models"].items()]
    lines += [f"  born-again generation {row['generation']} ({row['run']}) best val acc {row['best_val_acc']:.2%} "
              f"(epoch {row['best_epoch']})" for row in run.students.generations]
    if run.cfg.seeds:
        summary = metrics["summary"]
        lines.append(f"  over seeds {', '.join(map(str, run.cfg.seeds))}, best val acc mean ± std: " + "; ".join(
            f"{kind} {summary[kind]['best_val_acc']['mean']:.2%} ± {summary[kind]['best_val_acc']['std']:.2%}"
            for kind in run.students.rows))
        if "mcnemar" in summary:
            pooled = summary["mcnemar"]["pooled"]
            lines.append(f"  McNemar pooled over seeds: b {pooled['b']}, c {pooled['c']}, p = {pooled['p_value']:.2g}")
    return lines


def finish_run(run: Trained, stopwatch: Stopwatch, log) -> dict:
    """Measure, predict, export, deploy-check and report; metrics.json's content."""
    cfg, data = run.cfg, run.data
    histories = {**{name: teacher.history for name, teacher in run.teachers.items()}, **run.students.histories}
    log("report: measuring models, writing predictions, report and exports")
    val = data.splits["val"]
    write_val_predictions(run.folder.val_predictions, val.files, val.labels,
                          run.students.val_predicted, data.classes)
    models, counts = _measure(run, histories)
    # Every model in the report's comparison has its val logits (an ensemble's teacher-2, ... too).
    val_logits = {**{name: predict_logits(teacher.model, run.batcher("val"), cfg.teachers()[name].batch_size,
                                          *teacher.where) for name, teacher in run.teachers.items()},
                  **run.students.first_val_logits}
    student_cpu, onnx_diff = _predict_and_export(run, models["student"]["input_standardization"], log)
    stopwatch.lap("predict_export")
    metrics = _metrics(run, models, counts, onnx_diff, stopwatch.seconds)
    metrics["warnings"] = run_warnings(metrics, histories, data.splits["train"].labels.numpy(), val.labels.numpy(),
                                       data.classes, cfg.to_dict()["student"])
    for warning in metrics["warnings"]:
        log(f"warning: {warning}")
    if cfg.deploy_check:
        deployment_check(cfg.out, data, student_cpu, run.teachers["teacher"].model, metrics, log)
        stopwatch.lap("deploy")
    write_report(cfg.out, metrics, histories, cfg.to_dict())
    write_html_report(cfg.out, metrics, cfg.to_dict(), val, data.classes, val_logits, log)
    log("done in {:.0f} s; report in {}\n{}".format(time.perf_counter() - stopwatch.started,
                                                   run.folder.report,
                                                   "\n".join(_closing_lines(run, metrics))))
    return metrics
