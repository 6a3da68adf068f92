"""Contrastive Representation Distillation (Tian, Krishnan and Isola, ICLR 2020): the student's
embedding of an image should be recognizable among the teacher's embeddings of other images, and
the other way round, estimated with noise-contrastive estimation against a memory bank.

    v_s = normalize(W_s f_s), v_t = normalize(W_t f_t)               embedding heads, feat_dim wide
    P_s[i, k] = exp(v_s[i] . M_t[row_k] / tau) / Z_s                   rows: the sample i itself, then
    P_t[i, k] = exp(v_t[i] . M_s[row_k] / tau) / Z_t                   K negatives of other classes
    nce(P) = -(1/B) sum_i [log(P[i,0] / (P[i,0] + K/N)) + sum_k>0 log((K/N) / (P[i,k] + K/N))]
    loss = CE + weight * (nce(P_s) + nce(P_t))

the NCE loss of the paper's Eq. 18 as RepDistiller (the authors' code) computes it; mdistiller's
CRD is the same. M_s, M_t (N x feat_dim, N training samples) hold each sample's last embeddings,
updated with momentum and re-normalized after each batch; Z is fixed from the first batch
(mean score * N), as in RepDistiller. Both banks and Z are buffers, so checkpoints keep them.

Negatives are drawn uniformly, with replacement, among the samples of other classes than the
positive's, as RepDistiller's 'exact' mode (cls_negative), with torch's global random stream
(checkpointed by fit, so a resume draws the same): drawn from all samples, about 1/classes of them
(10% at 10 classes) would share the positive's class and push apart what should stay together.
build() sees no labels, so each sample's class is recorded (a buffer, checkpointed) from the batches
that hold it, as Distiller.hard_targets gives it: the label; for an unlabelled image the teacher's
top class and for a mixed one its larger part, the class of the view its bank row was last updated
with. A sample not seen yet (in the first epoch) may be drawn for any positive; a positive not seen
yet, or whose class holds every sample, draws from all other samples. K is capped at N - 1 for small
training sets. This is the paper's 'CRD' (CE + CRD, RepDistiller -a 0 -b 0.8), without KD.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import KdistillError
from ..settings import setting
from .base import LayerPairDistiller

EPS = 1e-7  # RepDistiller's, in the NCE ratios


def nce_loss(probabilities: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Eq. 18 from (B, 1 + K) unnormalized probabilities, the positive first; noise is uniform
    over the N samples, so K noise draws have probability K / N."""
    noise = (probabilities.shape[1] - 1) / num_samples
    positive = torch.log(probabilities[:, 0] / (probabilities[:, 0] + noise + EPS))
    negatives = torch.log(noise / (probabilities[:, 1:] + noise + EPS))
    return -(positive.sum() + negatives.sum()) / len(probabilities)


class CRD(LayerPairDistiller):
    needs_index = True

    @dataclass
    class Settings:
        student_layer: str = setting("avgpool", "student module whose output (flattened) is embedded")
        teacher_layer: str = setting("avgpool", "teacher module whose output (flattened) is embedded")
        weight: float = setting(0.8, "weight of the contrastive term (paper and RepDistiller: 0.8)", ge=0)
        feat_dim: int = setting(128, "width of the embedding heads and the memory banks (paper: 128)", ge=1)
        nce_k: int = setting(16384, "negatives per sample (paper: 16384; capped at training images - 1)", ge=1)
        nce_temperature: float = setting(0.07, "temperature of the contrastive scores (paper: 0.07)", gt=0)
        momentum: float = setting(0.5, "weight of a memory bank entry's old value in its update (paper: 0.5)",
                                  ge=0, lt=1)

    @staticmethod
    def problems(settings) -> list[tuple[str, str]]:
        return LayerPairDistiller.layer_problems(settings)

    def build(self, context):
        student_probe, teacher_probe, num_samples = context.student_probe, context.teacher_probe, context.num_samples
        if num_samples < 2:
            raise KdistillError(f"distill.method crd needs at least 2 training images, got {num_samples}")
        dim = self.settings.feat_dim
        self.embed_student = nn.Linear(math.prod(student_probe[self.settings.student_layer].shape[1:]), dim)
        self.embed_teacher = nn.Linear(math.prod(teacher_probe[self.settings.teacher_layer].shape[1:]), dim)
        self.negative_count = min(self.settings.nce_k, num_samples - 1)
        # RepDistiller's start: uniform entries whose rows have an expected norm of 1.
        bound = 1.0 / math.sqrt(dim / 3)
        self.register_buffer("student_memory", torch.rand(num_samples, dim) * 2 * bound - bound)
        self.register_buffer("teacher_memory", torch.rand(num_samples, dim) * 2 * bound - bound)
        self.register_buffer("normalizers", torch.full((2,), -1.0))  # Z of each side; < 0: not yet set
        self.register_buffer("sample_classes", torch.full((num_samples,), -1))  # -1: not known (yet)

    def draw_negatives(self, index: torch.Tensor) -> torch.Tensor:
        """(B, K) rows of the banks: uniform over the samples of other classes than each positive's,
        or over all other samples where its class is unknown or holds every sample."""
        count, shape = len(self.sample_classes), (len(index), self.negative_count)
        any_other = torch.randint(count - 1, shape, device=index.device)
        any_other = any_other + (any_other >= index[:, None]).long()  # skip the positive's own row
        # In class order, the positive's class is one block [start, start + same): a position among
        # the count - same others steps over it. Stable, so the order and the draw repeat exactly.
        classes, order = torch.sort(self.sample_classes, stable=True)
        own = self.sample_classes[index]
        start = torch.searchsorted(classes, own)
        same = torch.searchsorted(classes, own, right=True) - start
        position = (torch.rand(shape, device=index.device) * (count - same)[:, None]).long()
        position = position + (position >= start[:, None]).long() * same[:, None]
        other_class = order[position.clamp(max=count - 1)]
        return torch.where(((own >= 0) & (same < count))[:, None], other_class, any_other)

    def forward(self, step):
        student, labels, teacher, index = step.student, step.labels, step.teacher, step.index
        self.sample_classes[index] = self.hard_targets(labels, teacher.logits)
        ce = self.cross_entropy(student.logits, labels)
        student_embedding = F.normalize(self.embed_student(student.features[self.settings.student_layer].flatten(1)))
        teacher_embedding = F.normalize(self.embed_teacher(teacher.features[self.settings.teacher_layer].flatten(1)))
        rows = torch.cat([index[:, None], self.draw_negatives(index)], 1)
        # Each side's embedding is scored against the other side's bank (the banks carry no gradient).
        scores = [torch.exp(torch.einsum("bkd,bd->bk", memory[rows], embedding) / self.settings.nce_temperature)
                  for memory, embedding in ((self.teacher_memory, student_embedding),
                                            (self.student_memory, teacher_embedding))]
        num_samples = len(self.student_memory)
        # Set once, from the first batch; torch.where spares the GPU a sync at every step.
        first = torch.stack([side.detach().mean() * num_samples for side in scores])
        self.normalizers.copy_(torch.where(self.normalizers < 0, first, self.normalizers))
        normalizers = self.normalizers.clone()  # copy_ rewrites the buffer in place at every step
        crd = nce_loss(scores[0] / normalizers[0], num_samples) + nce_loss(scores[1] / normalizers[1], num_samples)
        self.update_memory(index, student_embedding.detach(), teacher_embedding.detach())
        return {"loss": ce + self.settings.weight * crd, "ce": ce, "crd": crd}

    @torch.no_grad()
    def update_memory(self, index: torch.Tensor, student_embedding: torch.Tensor,
                      teacher_embedding: torch.Tensor) -> None:
        momentum = self.settings.momentum
        for memory, embedding in ((self.student_memory, student_embedding),
                                  (self.teacher_memory, teacher_embedding)):
            memory[index] = F.normalize(memory[index] * momentum + embedding * (1 - momentum))
