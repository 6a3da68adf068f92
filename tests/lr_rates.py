"""The learning rate of every step, read from the optimizer and schedule that kdistill.train.fit builds."""
import torch

from kdistill.config import TrainConfig
from kdistill.train import build_optimizer


def learning_rates(cfg: TrainConfig, steps_per_epoch: int) -> list[float]:
    optimizer, scheduler = build_optimizer(torch.nn.Linear(2, 2), cfg, steps_per_epoch)
    rates = []
    for _ in range(cfg.epochs * steps_per_epoch):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return rates
