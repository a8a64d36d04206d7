"""Losses: symmetric InfoNCE (single process or across ranks) and masked distillation.

The contrastive loss follows open_clip's `--local-loss --gather-with-grad`: each rank gathers
every rank's features (with gradient) but computes logits only for its own rows, so memory is
O(local x global) and the mean over ranks equals the single-process loss on the global batch.
Only `torch.distributed` is used; the library knows nothing of the launcher.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn
import torch.nn.functional as F
from torch import nn


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_features(
    features: torch.Tensor, rank: int, world_size: int, with_grad: bool = True
) -> torch.Tensor:
    """Concatenate `features` from every rank (rank order). With `with_grad`, gradients flow
    back to the rank that produced each slice; otherwise only the local slice carries them."""
    if world_size == 1:
        return features
    if with_grad:
        return torch.cat(torch.distributed.nn.all_gather(features), dim=0)
    gathered = [torch.zeros_like(features) for _ in range(world_size)]
    dist.all_gather(gathered, features)
    gathered[rank] = features
    return torch.cat(gathered, dim=0)


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    local_loss: bool = True,
    gather_with_grad: bool = True,
) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch. Features must be L2-normalised.

    On one process this is plain CLIP. Across ranks, with `local_loss` each rank scores its own
    rows against all columns (labels offset by rank); the per-rank losses average to the global
    loss, and DDP's gradient averaging makes the gradients match too.
    """
    rank, world_size = _world()
    n = image_features.shape[0]
    if world_size == 1:
        logits_i = logit_scale * image_features @ text_features.T
        logits_t = logits_i.T
        labels = torch.arange(n, device=image_features.device)
    else:
        all_i = gather_features(image_features, rank, world_size, gather_with_grad)
        all_t = gather_features(text_features, rank, world_size, gather_with_grad)
        if local_loss:
            logits_i = logit_scale * image_features @ all_t.T
            logits_t = logit_scale * text_features @ all_i.T
            labels = torch.arange(n, device=image_features.device) + n * rank
        else:
            logits_i = logit_scale * all_i @ all_t.T
            logits_t = logits_i.T
            labels = torch.arange(all_i.shape[0], device=image_features.device)
    return (F.cross_entropy(logits_i, labels) + F.cross_entropy(logits_t, labels)) / 2


def normalize_targets(targets: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token target normalisation: 'layernorm' (no affine, as data2vec/MAE) or 'none'."""
    if kind == "layernorm":
        return F.layer_norm(targets, targets.shape[-1:])
    if kind == "none":
        return targets
    raise ValueError(f"unknown target_norm {kind!r} (expected 'layernorm' or 'none')")


def feature_regression_loss(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Regression of predicted onto target features, both `[M, D]`.

    'cosine': mean(1 - cos(pred, target)); 'smooth_l1': smooth-L1 between L2-normalised vectors
    (scaled by sqrt(D) so the loss does not vanish as D grows).
    """
    if pred.shape[0] == 0:
        return pred.sum() * 0.0
    if kind == "cosine":
        return (1 - F.cosine_similarity(pred, target.detach(), dim=-1)).mean()
    if kind == "smooth_l1":
        scale = pred.shape[-1] ** 0.5
        return F.smooth_l1_loss(
            F.normalize(pred, dim=-1) * scale, F.normalize(target.detach(), dim=-1) * scale
        )
    raise ValueError(f"unknown feature loss {kind!r}")


class PrototypeDistillLoss(nn.Module):
    """iBOT-style soft-target cross-entropy over prototype scores.

    The teacher's scores are centred (running mean, averaged across ranks) and sharpened with
    `teacher_temp`; the student's are softened with `student_temp`.
    """

    def __init__(
        self, num_prototypes: int, student_temp: float, teacher_temp: float, center_momentum: float
    ):
        super().__init__()
        self.student_temp = student_temp
        self.teacher_temp = teacher_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, num_prototypes))

    def forward(self, student_scores: torch.Tensor, teacher_scores: torch.Tensor) -> torch.Tensor:
        if student_scores.shape[0] == 0:
            return student_scores.sum() * 0.0
        teacher_scores = teacher_scores.detach()
        target = F.softmax((teacher_scores - self.center) / self.teacher_temp, dim=-1)
        log_p = F.log_softmax(student_scores / self.student_temp, dim=-1)
        loss = -(target * log_p).sum(dim=-1).mean()
        self._update_center(teacher_scores)
        return loss

    @torch.no_grad()
    def _update_center(self, teacher_scores: torch.Tensor) -> None:
        batch_center = teacher_scores.sum(dim=0, keepdim=True)
        count = torch.tensor([float(teacher_scores.shape[0])], device=teacher_scores.device)
        rank, world_size = _world()
        if world_size > 1:
            dist.all_reduce(batch_center)
            dist.all_reduce(count)
        batch_center = batch_center / count.clamp(min=1)
        self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))
