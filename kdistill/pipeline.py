"""`kdistill run`: prepare -> teacher -> student and baseline (per seed) -> evaluate and report -> predict -> export.

The run folder is the unit of work: every stage saves as it goes and reuses what a previous run
in the same folder finished, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch
from torch import nn

from .batcher import ImageBatcher
from .batches import Batches
from .compute import ONE_PROCESS, Compute, Ranks, first_line, join_ranks, leave_ranks, lost_process
from .callbacks import Session
from .config import Config, input_side, save_config, upsampled_side
from .config_diff import check_same_experiment
from .data import DatasetFiles, PreparedData, prepare, scan_dataset
from .data_key import cache_key
from .distillers import CrossEntropy
from .errors import KdistillError, printable
from .features import resolve_auto_layers
from .run_clock import RunClock, plan_clock
from .run_folder import RunFolder
from .steps import baseline_part, resolve_steps
from .student_plan import TEACHER, PlannedStudent
from .finish import Stopwatch, Trained, best_and_final, finish_run, run_name
from .fileio import (append_text, atomic_write_text, folder_in_use, mark_as_ours, refuse_foreign_folder,
                     remove_stale_temporaries, save_weights)
from .load_follow import threads_following_load
from .loggers import make_loggers
from .models import Standardized, check_train_output, fetch_pretrained, standardized_model, weights_source
from .out_folder import RUN_SUBFOLDERS, check_out_folder, check_out_outside_data, describe_data
from .precision_choice import choose_computation
from .teacher import TrainedTeacher, distillation_batches, ensemble_summary, train_teachers, without_teacher
from .inference import predict_logits
from .train import fit

def make_logger(out: str):
    """Each message on stdout and in OUT/log.txt, stamped with the time (and, in the file, the date)."""
    log_path = os.path.join(out, "log.txt")

    def log(message: str) -> None:
        message = printable(message)
        print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)
        # Not through a link planted in a received run folder.
        append_text(log_path, f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
    return log


def silent(message: str) -> None:
    """The log of a process that is not rank 0: rank 0 tells the user."""


@dataclass(frozen=True)
class StudentTraining:
    """What every student training of a run shares: the student's, the baseline's and born-again's
    generations'."""
    cfg: Config
    data: PreparedData
    val: Batches
    compute: Compute
    log: Callable[[str], None]
    ranks: Ranks = ONE_PROCESS
    # kind -> the folder holding that kind's checkpoint folders; a kind not named: the student's
    # (train_students needs its entry; train_student alone defaults to OUT/checkpoints).
    checkpoints: dict[str, str] = field(default_factory=dict)
    clock: RunClock | None = None  # the run's, for the bar's time left


def train_student(training: StudentTraining, name: str, seed: int, train: Batches, objective: nn.Module,
                  checkpoint_dir: str | None = None) -> tuple[Standardized, str, list]:
    """(model, its input statistics, history); checkpoints in checkpoint_dir, else OUT/checkpoints/<name>."""
    cfg, data, compute, log = training.cfg, training.data, training.compute, training.log
    s, upsampled = cfg.student, upsampled_side(cfg.student, cfg.image_size)
    # The student and the baseline of a seed start from the same weights and see the same inputs
    # in the same order (same seeds, see train.fit): the teacher is the only difference between them.
    torch.manual_seed(seed + 1)
    student, _, normalize = standardized_model(s.arch, len(data.classes), s.dropout, s.weights, s.normalize,
                                               data.mean, data.std, upsampled)
    resized = f", sees each view resized to {upsampled} px" if upsampled else ""
    log(f"{name}: {s.arch} {weights_source(s.arch, s.weights)}, input standardized with "
        f"{normalize} statistics{resized}, {s.epochs} epochs, "
        f"{'distilled (' + cfg.distill.method + ')' if objective.needs_teacher else 'no teacher'}")
    student = compute.place(student)
    if cfg.compile and compute.device.type == "cuda":
        student.compile()
    history = fit(name, student, student, train, training.val, objective, s, Session(
        checkpoint_dir or os.path.join(RunFolder(cfg.out).checkpoints, name), compute.device, seed + 1, log,
        compute.precision, training.ranks, [*(make_loggers(cfg.loggers, cfg.out) if training.ranks.main else []),
                                            *threads_following_load(cfg.threads, compute.device, training.ranks)],
        cfg.keep_checkpoints, layout=compute.layout, clock=training.clock,
        # A method that trains a model of its own beside the student (DML's peer) gets it built like
        # the student, from scratch.
        make_model=lambda arch: compute.place(standardized_model(
            s.arch if arch == "student" else arch, len(data.classes), s.dropout, "none", s.normalize, data.mean,
            data.std, upsampled)[0])))
    return student.eval(), normalize, history


class TrainedStudents(NamedTuple):
    """The student and the baseline trained once per seed."""
    first: dict[str, tuple[str, int, str, Standardized]]  # kind -> (run name, seed, input statistics, model)
    histories: dict[str, list[dict]]  # run name -> history
    rows: dict[str, list[dict]]  # kind -> per seed: seed, best_val_acc, best_epoch, final_val_acc
    val_predicted: dict[str, torch.Tensor]  # run name -> predicted class of each val image (best weights)
    first_val_logits: dict[str, torch.Tensor]  # kind -> the first seed's val logits, for report.html
    generations: list[dict]  # born again, per seed and generation: run name, best_val_acc, best_epoch, final_val_acc


def _checkpoint_dir(checkpoints: dict[str, str], kind: str, name: str) -> str:
    """The checkpoint folder of the run `name` of a kind: under that kind's folder (a sweep's shared
    baseline), else under the student's (born-again's generations)."""
    return os.path.join(checkpoints.get(kind, checkpoints["student"]), name)


def train_students(training: StudentTraining, student_train: Batches, models_dir: str, lap,
                   signal_of: Callable[[TrainedTeacher], Batches]) -> TrainedStudents:
    """Train the students of cfg.student_plan() for each seed (cfg.seeds, else cfg.seed): the
    distilled student and the baseline, or born-again's generations.

    Every seed shares the prepared data and the one teacher's signal (student_train). A finished
    seed is not retrained on a rerun: its checkpoints hold all its epochs. A student taught by one
    trained before it (a born-again generation) gets the batches signal_of serves with that one's
    signal, as a trained teacher's would be. With several processes, all train; rank 0 alone saves
    the models and predicts the val images."""
    cfg, data, compute, log, ranks = training.cfg, training.data, training.compute, training.log, training.ranks
    plan = cfg.student_plan()
    plain = without_teacher(student_train, len(data.splits["train"].files))
    seeds = cfg.seeds or [cfg.seed]
    kinds = [planned.kind for planned in plan.students]
    trained = TrainedStudents({}, {}, {kind: [] for kind in kinds if kind in ("student", "baseline")}, {}, {}, [])
    baseline_training = dataclasses.replace(training, cfg=dataclasses.replace(cfg, student=baseline_part(
        cfg.student, len(plain))))
    if "baseline" in kinds and baseline_training.cfg.student.epochs != cfg.student.epochs:
        log(f"baseline: {cfg.student.steps} steps of batch {cfg.student.batch_size} make "
            f"{baseline_training.cfg.student.epochs} epochs on the {len(plain)} labelled training images (the "
            f"student's {cfg.student.epochs} include the images the teacher labels)")
    for seed in seeds:
        teachers: dict[str, TrainedTeacher] = {}  # kind -> a student of this seed that teaches a later one
        for planned in plan.students:
            name = run_name(planned.kind, seed, cfg)
            if planned.taught_by in teachers:
                log(f"{name}: born-again generation {planned.generation}, distilled from "
                    f"{run_name(planned.taught_by, seed, cfg)}")
                train = signal_of(teachers.pop(planned.taught_by))
            else:
                train = student_train if planned.taught_by == TEACHER else plain
            # Objectives are made anew for each student: a method's trainable parts must not carry over.
            objective = (cfg.distiller(planned.method) if planned.method
                         else CrossEntropy(label_smoothing=cfg.student.label_smoothing))
            checkpoint_dir = _checkpoint_dir(training.checkpoints, planned.kind, name)
            model, normalize, history = train_student(baseline_training if planned.kind == "baseline" else training,
                                                      name, seed, train, objective, checkpoint_dir)
            if plan.teaches(planned.kind):
                teachers[planned.kind] = TrainedTeacher(model, "", normalize, history, None, compute=compute)
            if ranks.main:  # every process teaches the next generation; rank 0 alone saves and reports
                _record(trained, training, planned, (name, seed, normalize, model, history), checkpoint_dir,
                        models_dir)
                lap(name)
    return trained


def _record(trained: TrainedStudents, training: StudentTraining, planned: PlannedStudent, result: tuple,
            checkpoint_dir: str, models_dir: str) -> None:
    """Save a trained student's weights and put its numbers and val predictions into trained.
    result: (run name, seed, input statistics, model, history)."""
    cfg, compute = training.cfg, training.compute
    name, seed, normalize, model, history = result
    save_weights(model.state_dict(), os.path.join(models_dir, f"{name}.pt"),
                 os.path.join(checkpoint_dir, "best.pt"), f"{name} weights")
    trained.histories[name] = history
    # For the paired test: the best weights' answer on each val image.
    val_logits = predict_logits(model, training.val, cfg.student.batch_size, compute.device, compute.precision)
    trained.val_predicted[name] = val_logits.argmax(1)
    if planned.generation is not None:
        trained.generations.append({"generation": planned.generation, "run": name, "seed": seed,
                                    **best_and_final(history)})
    if planned.kind in trained.rows:  # the student and the baseline; born again's others are in generations only
        trained.rows[planned.kind].append({"seed": seed, **best_and_final(history)})
        if seed == (cfg.seeds or [cfg.seed])[0]:
            trained.first_val_logits[planned.kind] = val_logits
            # The first seed's models are reported, exported and predict the test images. Not the
            # best seed by val: that choice would be selection on the val images they are judged on.
            trained.first[planned.kind] = (name, seed, normalize, model)


def run(cfg: Config, log=None, shared_checkpoints: dict[str, str] | None = None, force: bool = False) -> dict:
    """Run the whole experiment described by cfg (already validated); return metrics.json's content.

    shared_checkpoints: kind (teacher, baseline) -> a folder holding that kind's checkpoint folders
    instead of OUT/checkpoints, shared by runs that train it alike (kdistill sweep).
    force: write into an --out that kdistill did not create (fileio.claim_folder).

    Started by torchrun, every process runs this: all train (see train.fit), rank 0 alone writes
    the run folder and logs, and returns the metrics; the others return an empty dict."""
    if not cfg.data or not cfg.out:
        missing = [name for name in ("data", "out") if not getattr(cfg, name)]
        raise KdistillError(f"setting{'s' if len(missing) > 1 else ''} {' and '.join(missing)} "
                            f"{'are' if len(missing) > 1 else 'is'} required (--data DATA, --out OUT)")
    cfg = dataclasses.replace(cfg, data=os.path.abspath(cfg.data))
    check_out_outside_data(cfg)
    # Cheap local checks first (the folder's layout, the run folder), then anything needing the network.
    dataset = scan_dataset(cfg.data, cfg.val_fraction, cfg.seed, cfg.distill.unlabeled, cfg.resolved_cache_dir())
    transfer = dataset.splits.get({"": "", "test": "test"}.get(cfg.distill.unlabeled, "unlabeled"))
    cfg = resolve_steps(cfg, len(dataset.splits["train"].files), len(transfer.files) if transfer else 0)
    data_identity = describe_data(dataset, cache_key(dataset, cfg.image_size, cfg.max_image_pixels))
    check_out_folder(cfg, dataset, data_identity)
    ranks, device = join_ranks(cfg.device, cfg.ddp_timeout_s, cfg.sync_bn)
    try:
        check_same_experiment(ranks, cfg.to_dict(), data_identity)
        for name, part in (*cfg.teachers().items(), ("student", cfg.student)):
            if part.batch_size % ranks.world_size:
                raise KdistillError(f"setting {name}.batch_size ({part.batch_size}) is the global batch: it must "
                                    f"divide evenly among the {ranks.world_size} processes")
        if ranks.main:
            refuse_foreign_folder(cfg.out, force)
        with folder_in_use(cfg.out, hold=ranks.main):  # rank 0 holds it for all processes
            return _experiment(cfg, dataset, data_identity, ranks, device, log, shared_checkpoints)
    except RuntimeError as e:
        if ranks.joined and lost_process(e):
            raise KdistillError(
                f"process {ranks.rank} of {ranks.world_size}: another process stopped, or did not answer within "
                f"ddp_timeout_s={cfg.ddp_timeout_s} s ({first_line(e)}); this one stopped too. Finished epochs are "
                f"saved in {cfg.out}: run the same command again to resume") from None
        raise
    finally:
        leave_ranks(ranks)


def _announce_and_check_models(cfg: Config, ranks: Ranks, log) -> None:
    """Before any work: what steps make, third-party models that would crash, weights to download."""
    for name, part in (*cfg.teachers().items(), ("student", cfg.student)):
        if part.steps and part.epochs:
            log(f"{name}: {part.steps} steps of batch {part.batch_size} make {part.epochs} epochs on this data")
        if part.epochs == 0:  # a finished teacher: loaded and checked with the data (given_teacher)
            continue
        if ":" in part.arch:  # a third-party model that would crash in training: say so now
            check_train_output(part.arch, input_side(part, cfg.image_size), f"{name}.arch")
        if part.weights == "imagenet":  # offline? say so now, not after preparing the data
            ranks.main_first(functools.partial(fetch_pretrained, part.arch))  # downloaded once per node


def _model_checkpoints(cfg: Config, checkpoints: dict[str, str]) -> dict[str, list[str]]:
    """Each model's last.pt files: a teacher's, and the student's with the baseline's of every seed
    (the baseline computes as the student does)."""
    seeds = cfg.seeds or [cfg.seed]
    return {**{name: [os.path.join(checkpoints["teacher"], name, "last.pt")] for name in cfg.teachers()},
            "student": [os.path.join(_checkpoint_dir(checkpoints, kind, run_name(kind, seed, cfg)), "last.pt")
                        for seed in seeds for kind in ("student", "baseline")]}


def _experiment(cfg: Config, dataset: DatasetFiles, data_identity: dict, ranks: Ranks, device: torch.device,
                log, shared_checkpoints: dict[str, str] | None) -> dict:
    folder = RunFolder(cfg.out)
    if ranks.main:
        mark_as_ours(cfg.out)  # holding the folder's lock
        save_config(cfg, folder.config)
        atomic_write_text(folder.data_identity, json.dumps(data_identity))
        log = log or make_logger(cfg.out)
        remove_stale_temporaries(cfg.out, log, RUN_SUBFOLDERS)  # left by an interrupted run in this folder
    else:
        log = silent
    _announce_and_check_models(cfg, ranks, log)
    cfg = resolve_auto_layers(cfg, log)  # after the checks of the architectures, before any signal
    torch.backends.cudnn.benchmark = device.type == "cuda"
    stopwatch = Stopwatch()

    models_dir = folder.models
    checkpoints = {kind: folder.checkpoints for kind in ("teacher", "student", "baseline")}
    checkpoints |= shared_checkpoints or {}
    log(f"prepare: {cfg.data}")
    data = ranks.main_first(lambda: prepare(
        cfg.data, cfg.image_size, cfg.resolved_cache_dir(), workers=cfg.workers, max_pixels=cfg.max_image_pixels,
        skip_bad=cfg.skip_bad, log=log, scanned=dataset))
    threads, computes = ranks.from_main(choose_computation(
        cfg, len(data.classes), device, folder.compute_choice, _model_checkpoints(cfg, checkpoints), log)
        if ranks.main else None)
    torch.set_num_threads(threads)
    compute = computes["student"]  # the baseline's too: it differs from the student by the teacher alone
    batcher = ImageBatcher(data, cfg, device, channels_last=compute.channels_last)
    stopwatch.lap("prepare")
    transfer = {"": None, "test": "test"}.get(cfg.distill.unlabeled, "unlabeled")
    clock = plan_clock(cfg, len(data.splits["train"].files), len(data.splits[transfer].files) if transfer else 0)
    teachers = train_teachers(cfg, data, batcher, computes, log, checkpoints["teacher"], ranks, clock)
    ensemble = ensemble_summary(cfg, teachers, batcher("val"), log) if ranks.main else None
    stopwatch.lap("teacher")

    if transfer:
        log(f"teacher signal: {len(data.splits[transfer].files)} unlabelled images of {cfg.distill.unlabeled} "
            f"join the student's training set, labelled by the teacher (the baseline trains without them)")

    def served(plan, sources: dict[str, TrainedTeacher]):  # the teachers' signal, or a born-again generation's
        return distillation_batches(plan, cfg, data, sources, batcher, log, transfer, ranks)
    student_train, signal = served(cfg.signal_plan(), teachers)
    stopwatch.lap("teacher_signal")
    students = train_students(StudentTraining(cfg, data, batcher("val"), compute, log, ranks, checkpoints, clock),
                              student_train, models_dir, stopwatch.lap,
                              lambda generation: served(signal, {"teacher": generation})[0])
    if not ranks.main:
        return {}
    return finish_run(Trained(cfg, data, batcher, compute, teachers, students, signal, ensemble, transfer), stopwatch,
                      log)
