"""The training loop: plain PyTorch, one function, used for the teacher, the student and the baseline.

After every epoch the whole state (model, optimizer, scheduler, weight average, RNG states,
history) is written atomically to last.pt, so a killed run resumes from its last finished epoch
and ends with the same numbers as one that never stopped.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import time

import torch
from torch import nn
from torch.optim import lr_scheduler
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .batches import Batches, hard_labels, shard_size
from .inference import evaluate
from .callbacks import Callback, Checkpointer, EarlyStopping, EpochLog, FitState, Session, offered_val_acc
from .config import TrainConfig
from .distillers import Distiller, Outputs, Step
from .errors import KdistillError
from .features import FeatureTaps, build_objective
from .fileio import load_torch
from .progress import seconds_left, time_left, with_progress
from .progressive import progressive_resizing
from .compute import Ranks, autocast, first_line

VIEW_SEED_OFFSET = 7919  # the view generator's seed, apart from the shuffle generator's
RANK_SEED_STRIDE = 104729  # with several processes, each one's global random stream apart from the others'
WARMUP_START_FACTOR = 0.01  # cosine's warmup starts at lr * this


def parameter_groups(trainable: nn.Module, weight_decay: float, decay_norm_and_bias: bool) -> list[dict]:
    """The trained parameters with weight decay; unless decay_norm_and_bias, none on biases and
    norm weights (every parameter with ndim <= 1): they hold scales and offsets, not the capacity
    that decay is meant to limit (the usual practice)."""
    parameters = [p for p in trainable.parameters() if p.requires_grad]
    if decay_norm_and_bias or weight_decay == 0:
        return [{"params": parameters, "weight_decay": weight_decay}]
    groups = [{"params": [p for p in parameters if p.ndim > 1], "weight_decay": weight_decay},
              {"params": [p for p in parameters if p.ndim <= 1], "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def build_optimizer(trainable: nn.Module, cfg: TrainConfig, steps_per_epoch: int
                    ) -> tuple[torch.optim.Optimizer, lr_scheduler.LRScheduler | None]:
    """The optimizer and its learning-rate schedule (None: constant), stepped after every batch."""
    groups = parameter_groups(trainable, cfg.weight_decay, cfg.decay_norm_and_bias)
    if cfg.optimizer == "sgd":  # Nesterov needs momentum; momentum 0 is plain SGD
        optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    else:
        optimizer = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.optimizer](groups, lr=cfg.lr)
    total_steps, warmup_steps = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    if cfg.schedule == "cosine":
        if not warmup_steps:
            return optimizer, lr_scheduler.CosineAnnealingLR(optimizer, total_steps)
        warmup = lr_scheduler.LinearLR(optimizer, WARMUP_START_FACTOR, total_iters=warmup_steps)
        cosine = lr_scheduler.CosineAnnealingLR(optimizer, total_steps - warmup_steps)
        return optimizer, lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])
    if cfg.schedule == "onecycle":
        # The learning rate only: momentum stays the momentum set.
        return optimizer, lr_scheduler.OneCycleLR(
            optimizer, cfg.lr, total_steps, pct_start=cfg.warmup_epochs / cfg.epochs if cfg.warmup_epochs else 0.3,
            cycle_momentum=False)
    # step: per batch, lr_step epochs' worth of batches at a time (the same rates as stepping per epoch)
    return optimizer, (lr_scheduler.StepLR(optimizer, cfg.lr_step * steps_per_epoch, cfg.lr_gamma)
                       if cfg.lr_step else None)


def _evaluate_weights(model: nn.Module, trainable: nn.Module, weights: dict, val: Batches, batch_size: int,
                      device: torch.device, precision: str, ranks: Ranks) -> tuple[float, float]:
    """evaluate() with `weights` in trainable, its own weights put back after."""
    own = {k: v.clone() for k, v in trainable.state_dict().items()}
    trainable.load_state_dict(weights)
    try:
        return evaluate(model, val, batch_size, device, precision, ranks)
    finally:
        trainable.load_state_dict(own)


def _restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str, log) -> dict | None:
    """last.pt if it loads; a corrupt one falls back to the previous good copy (last.pt.prev)."""
    for candidate in (path, path + ".prev"):
        if not os.path.exists(candidate):
            continue
        try:
            return load_torch(candidate)
        except KdistillError as e:
            log(f"warning: {e}; trying the previous checkpoint")
    return None


def _check_same_computation(name: str, saved: dict, current: dict, checkpoint_dir: str) -> None:
    """bf16 autocast, cudnn's autotuned kernels and CPU kernels give different numbers, and so does
    another number of processes: a run resumes only where it started, so it ends as one that never
    stopped would."""
    if not isinstance(saved, dict) or not {"device", "precision"} <= saved.keys():
        raise KdistillError(f"{name}: the checkpoint in {checkpoint_dir} does not say where it was computed "
                            f"(computed_on: {str(saved)[:80]}); remove it to start this model again, or use another --out")
    if saved != current:
        def where(run: dict) -> str:
            layout = f" ({run['layout']})" if run.get("layout") else ""
            return f"{run['device']} in {run['precision']}{layout} by {run.get('processes', 1)} process(es)"
        raise KdistillError(
            f"{name}: the checkpoint in {checkpoint_dir} was trained on {where(saved)}, this run uses "
            f"{where(current)}; resuming would not repeat its numbers. Resume with device={saved['device']}, precision="
            f"{saved['precision']} and {saved.get('processes', 1)} process(es), or use another --out")


def _resume(path: str, state: dict, parts: dict, generators: tuple, ranks: Ranks) -> tuple[list, int, float]:
    """Put a checkpoint's state back into the training's parts (model, objective, optimizer,
    scheduler, ema; None where unused) and random streams: (history, next epoch, best val acc).
    A file that loads but does not hold such a state is refused in one line, not a traceback."""
    try:
        for key, part in parts.items():
            if part is not None:
                part.load_state_dict(state.get(key, {}) if key == "objective" else state[key])
        own = state["rank_rngs"][ranks.rank] if ranks.joined else state  # the random streams of this process
        generators[0].set_state(own["shuffle_rng"])
        generators[1].set_state(own["view_rng"])
        _restore_rng(own["rng"])
        history, epoch, best_val_acc = list(state["history"]), int(state["epoch"]), float(state["best_val_acc"])
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise KdistillError(f"checkpoint {path} is not a checkpoint of this training ({first_line(e)[:160]}); remove it "
                            f"to start this model again, or use another --out") from None
    return history, epoch + 1, best_val_acc


def _warn_if_the_average_stays_near_the_start(name: str, decay: float, steps_per_epoch: int, epochs: int,
                                             log) -> None:
    """A decay set for thousands of steps, on a small dataset: the average would end mostly the
    weights after the first step, so its val column would say little. Say so, and name a decay that fits."""
    steps = steps_per_epoch * epochs
    first_share = decay ** (steps - 1)  # the average starts at the weights after the first step
    if steps > 1 and first_share > 0.01:
        log(f"{name}: with ema {decay:g}, the weights after the first step still make up {first_share:.0%} of "
            f"the average after this run's {steps} steps ({steps_per_epoch} per epoch), so it will stay near "
            f"them (the better of it and the trained weights is kept); an ema of at most "
            f"{0.01 ** (1 / (steps - 1)):.3g} averages over the run")


def _stop(name: str, epoch: int, checkpoint_dir: str, what: str, batch: int = 0, teacher_batch: int = 0) -> None:
    """Stop the run: nothing of this epoch is written, the last good checkpoint stays. Where the
    teacher's outputs were not finite first, the teacher is named, not the model being trained."""
    kept = f"The last good checkpoint (epoch {epoch - 1}) is kept in {checkpoint_dir}"
    if teacher_batch:
        raise KdistillError(f"{name}: the teacher's outputs are not finite (epoch {epoch}, batch {teacher_batch}); "
                            f"stopped. The teacher is broken (its weights or its stored signal), not {name}; "
                            f"check teacher.weights or retrain the teacher. {kept}")
    raise KdistillError(f"{name}: {what} at epoch {epoch}{f', batch {batch}' if batch else ''}; stopped. {kept}; "
                        f"try a lower lr")


def _stop_unless_finite(name: str, epoch: int, checkpoint_dir: str, row: dict, parts: dict) -> None:
    """An epoch whose val loss or parameters are not finite must not become a checkpoint, let alone
    the best: the training loss is checked before each step, so a step that broke the weights at
    the end of an epoch shows only here."""
    for key in ("val_loss", "val_loss_ema"):
        if key in row and not math.isfinite(row[key]):
            _stop(name, epoch, checkpoint_dir, f"the {'weight average' if key.endswith('ema') else 'val'} loss is "
                                                f"{row[key]}")
    for what, module in parts.items():
        if module is None:
            continue
        for tensor_name, tensor in module.state_dict().items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                _stop(name, epoch, checkpoint_dir, f"the {what} hold non-finite values ({tensor_name})")


def _start(name: str, model: nn.Module, trainable: nn.Module, train: Batches, objective: Distiller,
           cfg: TrainConfig, session: Session) -> tuple[FitState, FeatureTaps]:
    """The training's parts, built, and put back from the last checkpoint where there is one."""
    ranks, device = session.ranks, session.device
    if ranks.joined and 0 < len(train) % cfg.batch_size < ranks.world_size:
        raise KdistillError(f"{name}: the last batch of each epoch has {len(train) % cfg.batch_size} images, fewer "
                            f"than the {ranks.world_size} processes; change batch_size or the number of processes")
    ranks.sync_batch_norm(trainable, device)  # before the taps: they hook the modules it replaces
    student_taps = FeatureTaps(model, objective.student_features(), "the student")
    build_objective(objective, model, student_taps, train, device, session.make_model,
                    functools.partial(autocast, device, session.precision))
    ranks.sync_batch_norm(objective, device)  # a method's own BatchNorm (FitNets' regressor)
    # The method's own trainable parts (regressors, projectors) train beside the model.
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    optimizer, scheduler = build_optimizer(nn.ModuleList([trainable, objective]), cfg, steps_per_epoch)
    # The average of the weights after every step; BatchNorm statistics averaged too (use_buffers).
    ema = (AveragedModel(trainable, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
           if cfg.ema else None)
    if ema is not None:
        _warn_if_the_average_stays_near_the_start(name, cfg.ema, steps_per_epoch, cfg.epochs, session.log)
    state = FitState(session, cfg, {"model": trainable, "objective": objective, "optimizer": optimizer,
                                    "scheduler": scheduler, "ema": ema},
                     (torch.Generator().manual_seed(session.seed),
                      torch.Generator().manual_seed(session.seed + VIEW_SEED_OFFSET)),
                     # Where and how the numbers were computed: a resume elsewhere would not repeat them.
                     {"device": device.type, "precision": session.precision,
                      **({"layout": session.layout} if session.layout else {}),
                      **({"processes": ranks.world_size} if ranks.joined else {})})
    last_path = os.path.join(session.checkpoint_dir, "last.pt")
    saved = ranks.from_main(load_checkpoint(last_path, session.log) if ranks.main else None)
    if saved is not None:
        if isinstance(saved, dict):  # anything else is refused by _resume
            _check_same_computation(name, saved.get("computed_on", {"device": "cpu", "precision": "fp32"}),
                                    state.computed_on, session.checkpoint_dir)
        if isinstance(saved, dict) and saved.get("finished"):  # trained to its end, its training state dropped
            _finished(name, saved, state, last_path)
            return state, student_taps
        state.history, state.start_epoch, state.best_val_acc = _resume(last_path, saved, state.parts,
                                                                       state.generators, ranks)
        if state.start_epoch <= cfg.epochs:
            session.log(f"{name}: resuming after epoch {state.start_epoch - 1} of {cfg.epochs}")
    elif ranks.joined:  # dropout masks and a method's draws of its own differ from process to process
        torch.manual_seed(session.seed + RANK_SEED_STRIDE * ranks.rank)
    return state, student_taps


def _finished(name: str, saved: dict, state: FitState, path: str) -> None:
    """A model that finished and kept only its history (keep_checkpoints off): nothing to train."""
    try:
        state.history, epoch, state.best_val_acc = list(saved["history"]), int(saved["epoch"]), float(
            saved["best_val_acc"])
    except (KeyError, TypeError, ValueError) as e:
        raise KdistillError(f"checkpoint {path} is not a checkpoint of this training ({first_line(e)[:160]}); remove "
                            f"it to start this model again, or use another --out") from None
    stopped_early = state.cfg.patience and epoch < state.cfg.epochs
    if epoch < state.cfg.epochs and not stopped_early:
        raise KdistillError(f"{name}: finished at epoch {epoch} and its training state was dropped to save space "
                            f"(keep_checkpoints false), so it cannot train on to epoch {state.cfg.epochs}; use another "
                            f"--out (or keep_checkpoints: true for runs you may extend)")
    state.start_epoch, state.stop, state.finished_before = epoch + 1, True, True


def _train_epoch(state: FitState, epoch: int, forward, objective_forward, train: Batches,
                 student_taps: FeatureTaps, callbacks: list[Callback]) -> dict:
    """One pass over the training batches; the epoch's training numbers (those of the global batch)."""
    session, cfg, parts = state.session, state.cfg, state.parts
    ranks, device, precision = session.ranks, session.device, session.precision
    optimizer, scheduler, ema = parts["optimizer"], parts["scheduler"], parts["ema"]
    sums: dict[str, torch.Tensor] = {}
    correct = torch.zeros((), device=device)
    # The first batch whose loss was not finite, tracked on the device: checking it each batch
    # would make the CPU wait for the GPU at every step.
    first_bad_batch = torch.zeros((), dtype=torch.int64, device=device)
    first_bad_teacher = torch.zeros((), dtype=torch.int64, device=device)  # its outputs, likewise
    seen, labelled = 0, torch.zeros((), dtype=torch.int64, device=device)
    lr = optimizer.param_groups[0]["lr"]
    batches = train.iterate(cfg.batch_size, device, shuffle=True, generator=state.generators[0],
                            view_generator=state.generators[1], precision=precision, shard=ranks.shard)
    # The bar: this model's time left (its epochs so far, this one included) and the run's, the running loss.
    model_left = seconds_left([row["seconds"] for row in state.history], cfg.epochs - epoch + 1)
    left = time_left(model_left) + (session.clock.bar_text(session.name, model_left) if session.clock else "")
    for batch, (x, y, teacher, index) in enumerate(with_progress(
            batches, shard_size(len(train), cfg.batch_size, ranks.shard), f"{session.name} epoch {epoch}/{cfg.epochs}"
            f"{left}", lambda: f"loss {(sums['loss'] / seen).item():.3f}"), 1):
        with autocast(device, precision):
            logits = forward(x)
        terms = objective_forward(Step(Outputs(logits.float(), student_taps.take()), y, teacher, index, x, epoch,
                                       cfg.epochs))
        loss = terms["loss"]
        first_bad_batch = torch.where((first_bad_batch == 0) & ~torch.isfinite(loss), batch, first_bad_batch)
        if teacher is not None:
            first_bad_teacher = torch.where((first_bad_teacher == 0) & ~torch.isfinite(teacher.logits).all(),
                                            batch, first_bad_teacher)
        if ranks.joined:
            # DDP averages the processes' gradients: weighting each by its share of the global batch
            # (unequal in a smaller last batch) gives the gradient of the global batch's mean.
            loss = loss * (len(y) * ranks.world_size / min(cfg.batch_size, len(train) - (batch - 1) * cfg.batch_size))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update_parameters(parts["model"])
        for key, value in terms.items():
            sums[key] = sums.get(key, 0) + value.detach() * len(y)
        classes = hard_labels(y)
        correct += (logits.argmax(1) == classes).sum()  # an unlabelled image (-1) never counts
        seen += len(y)
        labelled += (classes >= 0).sum()
        for callback in callbacks:
            callback.on_batch_end(state, batch)
    sums = {key: ranks.sum(value) for key, value in sums.items()}
    seen = int(ranks.sum(torch.tensor(seen, device=device)))
    first_bad_batch, first_bad_teacher = ranks.earliest(first_bad_batch), ranks.earliest(first_bad_teacher)
    if first_bad_batch.item():
        _stop(session.name, epoch, session.checkpoint_dir, "the loss stopped being finite", first_bad_batch.item(),
              first_bad_teacher.item())
    return {"epoch": epoch, "lr": lr, "train_loss": (sums["loss"] / seen).item(),
            "train_acc": ranks.sum(correct).item() / max(ranks.sum(labelled).item(), 1),
            **{f"train_{k}": (v / seen).item() for k, v in sums.items() if k != "loss"}}


def _validate(state: FitState, model: nn.Module, val: Batches, row: dict) -> nn.Module:
    """The val numbers into row (the weight average's too); the weights this epoch offers as its best."""
    session, cfg, trainable, ema = state.session, state.cfg, state.parts["model"], state.parts["ema"]
    session.ranks.share_buffers(trainable)
    session.ranks.share_buffers(ema)
    evaluated = (cfg.batch_size, session.device, session.eval_precision or session.precision, session.ranks)
    row["val_loss"], row["val_acc"] = evaluate(model, val, *evaluated)
    offered = trainable
    if ema is not None:
        row["val_loss_ema"], row["val_acc_ema"] = _evaluate_weights(model, trainable, ema.module.state_dict(), val,
                                                                    *evaluated)
        row["best_source"] = "ema" if row["val_acc_ema"] > row["val_acc"] else "raw"
        offered = ema.module if row["best_source"] == "ema" else trainable
    _stop_unless_finite(session.name, row["epoch"], session.checkpoint_dir, row,
                        {"weights": trainable, "method's parts": state.parts["objective"], "weight average": ema})
    return offered


def fit(name: str, model: nn.Module, trainable: nn.Module, train: Batches, val: Batches, objective: Distiller,
        cfg: TrainConfig, session: Session) -> list[dict]:
    """Train `trainable` (a part of `model`, or all of it) for cfg.epochs; return per-epoch history.

    The rest of `model` stays in eval mode throughout, so a frozen backbone keeps its BatchNorm
    statistics. The best-by-val weights are kept in checkpoint_dir/best.pt: with cfg.ema, those of
    the trained model or of its exponential moving average, whichever scored higher. What happens
    besides the step (checkpoints, the log line, early stopping, session.callbacks) hangs on the
    callbacks' events (callbacks.py).

    With several processes (ranks), cfg.batch_size is the global batch: each process trains on its
    share of it, DDP averages the gradients, and the metrics are those of the global batch, the
    same on every process. Rank 0 alone writes the checkpoints; every process resumes from them.
    """
    session = dataclasses.replace(session, name=name)
    state, student_taps = _start(name, model, trainable, train, objective, cfg, session)
    # Gradients averaged over the processes: the model's, and those of the method's trainable parts.
    # A method's buffers (CRD's memory banks) stay each process's own.
    forward = session.ranks.distribute(model, session.device)
    objective_forward = session.ranks.distribute(objective, session.device, False)
    # Progressive resizing first: it adds the epoch's view side to the row the others save and log.
    callbacks = [*progressive_resizing(model, cfg), Checkpointer(), EpochLog(), *session.callbacks, EarlyStopping(),
                 *([session.clock] if session.clock else [])]
    try:
        for callback in callbacks:
            callback.on_fit_start(state)
        for epoch in range(state.start_epoch, cfg.epochs + 1):
            if state.stop:
                break
            started = time.perf_counter()
            model.eval()
            trainable.train()
            for callback in callbacks:  # after the modes are set: a callback may change them (head warm-up)
                callback.on_epoch_start(state, epoch)
            row = _train_epoch(state, epoch, forward, objective_forward, train, student_taps, callbacks)
            offered = _validate(state, model, val, row)
            row["seconds"] = time.perf_counter() - started
            state.history.append(row)
            state.best_weights = None
            if offered_val_acc(row) > state.best_val_acc:
                state.best_val_acc, state.best_weights = offered_val_acc(row), offered.state_dict()
            for callback in callbacks:
                callback.on_epoch_end(state, row)
        for callback in callbacks:
            callback.on_fit_end(state)
    finally:
        for callback in callbacks:
            callback.close(state)
        student_taps.remove()
    best = os.path.join(session.checkpoint_dir, "best.pt")
    trainable.load_state_dict(session.ranks.from_main(load_torch(best, what="best checkpoint") if session.ranks.main
                                                      else None))
    return state.history
