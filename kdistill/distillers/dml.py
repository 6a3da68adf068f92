"""DML (Zhang, Xiang, Hospedales & Lu, "Deep Mutual Learning", CVPR 2018).

No pretrained teacher: the student and a peer network, both from scratch, train together and
teach each other. With p_s = softmax(z_s), p_p = softmax(z_p) of one batch, each network
minimizes its labels' cross-entropy plus the KL from the other's prediction to its own:

    student: CE(z_s, y) + KL(p_p || p_s)        peer: CE(z_p, y) + KL(p_s || p_p)

the other's prediction held constant (detached) in each, at temperature 1, weight 1 (the paper's
equations (2)-(3) for two networks). Both losses are summed into one backward pass, so both
networks are updated in the same step (the paper's Algorithm 1 updates them one after the other).

The peer is this method's trainable part: built in build() by the context's model factory (same
architecture as the student by default, its own random initialization), it trains beside the
student, in train mode and the student's precision, on the batch the student saw (step.inputs), is
saved with the objective in every checkpoint (a killed run resumes it) and is not exported.
distill.temperature and distill.alpha are not used; the pretrained teacher, if trained for the
report, is never read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import KdistillError
from ..models import arch_problem
from ..settings import setting
from .base import BuildContext, Distiller, Step


def mutual_kl(own_logits: torch.Tensor, other_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_other || p_own), mean over the batch; the other network's prediction is a constant."""
    return F.kl_div(F.log_softmax(own_logits, dim=1), F.log_softmax(other_logits.detach(), dim=1),
                    reduction="batchmean", log_target=True)


class DML(Distiller):
    needs_teacher = False

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

    def build(self, context: BuildContext) -> None:
        if context.make_model is None:
            raise KdistillError("distill.method dml trains a peer network, but this training gives no model "
                                "factory to build it (BuildContext.make_model)")
        self.peer = context.make_model(self.settings.peer)
        self.autocast = context.autocast

    def forward(self, step: Step) -> dict[str, torch.Tensor]:
        with self.autocast():
            peer = self.peer(step.inputs).float()
        own, labels = step.student.logits, step.labels
        ce, kl = self.cross_entropy(own, labels), mutual_kl(own, peer)
        peer_ce, peer_kl = self.cross_entropy(peer, labels), mutual_kl(peer, own)
        targets = self.hard_targets(labels)
        labelled = targets >= 0
        # Share of the batch's labelled images the peer gets right (in train mode, as the student's train acc).
        peer_acc = ((peer.argmax(1) == targets) & labelled).sum() / labelled.sum().clamp(min=1)
        return {"loss": ce + kl + peer_ce + peer_kl, "ce": ce, "kl": kl, "peer_ce": peer_ce, "peer_kl": peer_kl,
                "peer_acc": peer_acc.detach()}
