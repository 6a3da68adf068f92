"""DML (Zhang, Xiang, Hospedales & Lu, "Deep Mutual Learning", CVPR 2018).

No pretrained teacher: the student and a peer network, both from scratch, train together and
teach each other. With p_s = softmax(z_s), p_p = softmax(z_p) of one batch, each network
minimizes its labels' cross-entropy plus the KL from the other's prediction to its own:

    student: CE(z_s, y) + KL(p_p || p_s)        peer: CE(z_p, y) + KL(p_s || p_p)

the other's prediction held constant (detached) in each, at temperature 1, weight 1 (the paper's
equations (2)-(3) for two networks). Both losses are summed into one backward pass, so both
networks are updated in the same step (the paper's Algorithm 1 updates them one after the other).

The peer is this method's trainable part: built in build() (same architecture as the student by
default, its own random initialization), it trains beside the student, in train mode, is saved
with the objective in every checkpoint (a killed run resumes it) and is not exported.
distill.temperature and distill.alpha are not used; the pretrained teacher, if trained for the
report, is never read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..models import arch_problem
from ..settings import setting
from .base import Distiller, Outputs


def mutual_kl(own_logits: torch.Tensor, other_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_other || p_own), mean over the batch; the other network's prediction is a constant."""
    return F.kl_div(F.log_softmax(own_logits, dim=1), F.log_softmax(other_logits.detach(), dim=1),
                    reduction="batchmean", log_target=True)


class DML(Distiller):
    needs_teacher = False
    needs_input = True
    # arch -> a new model for this task from scratch, placed on the training device, standardizing
    # its input like the student ("student": the student's architecture). Set by the pipeline,
    # which knows the classes and the data's statistics.
    make_model: Callable[[str], nn.Module] | None = None

    @dataclass
    class Settings:
        peer: str = setting("student", "the peer network trained beside the student, from scratch: student (the "
                                       "student's architecture, as in the paper) or an architecture (a torchvision "
                                       "name, timm:NAME or module:callable)")

    @staticmethod
    def problems(settings) -> list[tuple[str, str]]:
        peer = settings.peer
        problem = None if peer == "student" else arch_problem(peer, 32)
        return [] if problem is None else [("peer", f"must be student or an architecture: {problem}")]

    def build(self, student_probe, teacher_probe, num_samples) -> None:
        self.peer = self.make_model(self.settings.peer)

    def forward(self, student: Outputs, labels: torch.Tensor, teacher: Outputs | None = None,
                index: torch.Tensor | None = None, inputs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        own, peer = student.logits, self.peer(inputs).float()
        ce, kl = self.cross_entropy(own, labels), mutual_kl(own, peer)
        peer_ce, peer_kl = self.cross_entropy(peer, labels), mutual_kl(peer, own)
        targets = self.hard_targets(labels)
        labelled = targets >= 0
        # Share of the batch's labelled images the peer gets right (in train mode, as the student's train acc).
        peer_acc = ((peer.argmax(1) == targets) & labelled).sum() / labelled.sum().clamp(min=1)
        return {"loss": ce + kl + peer_ce + peer_kl, "ce": ce, "kl": kl, "peer_ce": peer_ce, "peer_kl": peer_kl,
                "peer_acc": peer_acc.detach()}
