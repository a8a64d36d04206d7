"""MaskCLIPTask: student + EMA teacher + losses behind one `training_forward`.

    task = MaskCLIPTask(get_config("maskclip_tiny"), special_ids=tok.special_ids, mask_id=tok.mask_id)
    loss, report = task.training_forward(images, tokens)
    loss.backward(); optimizer.step()
    task.update_teacher(step, total_steps)

The launcher may wrap `task.model` (e.g. DDP) after construction: the task only calls it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .losses import (
    PrototypeDistillLoss,
    clip_loss,
    feature_regression_loss,
    normalize_targets,
)
from .masking import patch_mask, text_mask
from .teacher import EMATeacher, cosine_momentum
from .towers import MaskCLIP


class MaskCLIPTask(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        special_ids: tuple[int, ...] = (0,),
        mask_id: int = 0,
        pad_id: int = 0,
        local_loss: bool = True,
        gather_with_grad: bool = True,
    ):
        super().__init__()
        self.cfg = cfg
        self.special_ids = tuple(special_ids)
        self.mask_id = mask_id
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.model: nn.Module = MaskCLIP(cfg, pad_id=pad_id)
        self.student = self.model  # unwrapped reference, also after DDP wraps `model`
        d = cfg.distill
        self.teacher = EMATeacher(self._ema_pairs()) if d.enabled else None
        self.proto_loss = None
        if d.image_enabled and d.image_loss == "ibot":
            self.proto_loss = PrototypeDistillLoss(
                d.num_prototypes, d.student_temp, d.teacher_temp, d.center_momentum
            )
        self.momentum = d.ema_momentum_start

    def _ema_pairs(self) -> dict[str, nn.Module]:
        d = self.cfg.distill
        pairs: dict[str, nn.Module] = {}
        if d.image_enabled:
            pairs["visual"] = self.student.visual
            if self.student.image_prototypes is not None:
                pairs["image_prototypes"] = self.student.image_prototypes
        if d.text_enabled and d.text_target == "teacher":
            pairs["text"] = self.student.text
        return pairs

    def train(self, mode: bool = True) -> MaskCLIPTask:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.train(False)
        return self

    def distill_rows(self, batch: int) -> int:
        """How many masked student views (image and caption) one step distils."""
        d = self.cfg.distill
        if d.mode == "faithful":
            return batch
        return min(batch, max(1, round(d.distill_fraction * batch)))

    def masks_per_image(self) -> int:
        d = self.cfg.distill
        return max(1, d.masks_per_image) if d.mode == "efficient" else 1

    def view_sources(self, views: int, device: torch.device | None = None) -> torch.Tensor:
        """Batch row of each masked image view: in efficient mode each of the first
        ceil(views / masks_per_image) images gets `masks_per_image` consecutive views."""
        return torch.arange(views, device=device) // self.masks_per_image()

    def training_forward(
        self,
        images: torch.Tensor,
        tokens: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One step's forward: total loss and a report of detached named terms."""
        d = self.cfg.distill
        b = self.distill_rows(images.shape[0])
        image_mask = masked_tokens = tmask = sources = None
        if d.image_enabled:
            image_mask = patch_mask(
                d.masking, b, self.student.visual.grid, d.mask_ratio, generator
            ).to(images.device)
            sources = self.view_sources(b, images.device)
        if d.text_enabled:
            masked_tokens, tmask = text_mask(
                tokens[:b], d.text_mask_ratio, self.special_ids, self.mask_id, generator
            )
        out = self.model(images, tokens, image_mask, masked_tokens, tmask, sources)

        loss_clip = clip_loss(
            out["image_features"],
            out["text_features"],
            out["logit_scale"],
            self.local_loss,
            self.gather_with_grad,
        )
        total = self.cfg.contrastive_weight * loss_clip
        report = {
            "loss_contrastive": loss_clip.detach(),
            "logit_scale": out["logit_scale"].detach(),
        }
        if d.image_enabled:
            loss_img = self._image_distill(images, sources, image_mask, out)
            total = total + d.image_weight * loss_img
            report["loss_image_distill"] = loss_img.detach()
            report["masked_fraction"] = image_mask.float().mean()
        if d.text_enabled:
            loss_txt = self._text_distill(tokens[:b], tmask, out["text_pred"])
            total = total + d.text_weight * loss_txt
            report["loss_text_distill"] = loss_txt.detach()
            report["text_masked_fraction"] = tmask.float().sum() / (
                tokens[:b] != self.student.text.pad_id
            ).sum().clamp(min=1)
        if self.teacher is not None:
            report["ema_momentum"] = torch.tensor(self.momentum)
        report["loss"] = total.detach()
        return total, report

    def _image_distill(self, images, sources, mask, out) -> torch.Tensor:
        d = self.cfg.distill
        with torch.no_grad():
            # the teacher encodes each source image once; every view of it shares the result
            seen = -(-mask.shape[0] // self.masks_per_image())  # from shapes: no device sync
            target = self.teacher["visual"].tokens(images[:seen])[:, 1:][sources][mask]
            target = normalize_targets(target, d.target_norm)
            if self.proto_loss is not None:
                return self.proto_loss(
                    out["image_scores"], self.teacher["image_prototypes"](target)
                )
        return feature_regression_loss(out["image_pred"], target, d.image_loss)

    def _text_distill(self, tokens, mask, pred) -> torch.Tensor:
        d = self.cfg.distill
        if d.text_target == "tokens":
            return F.cross_entropy(pred, tokens[mask]) if pred.shape[0] else pred.sum() * 0.0
        with torch.no_grad():
            target = normalize_targets(self.teacher["text"].tokens(tokens)[mask], d.target_norm)
        kind = d.image_loss if d.image_loss in ("cosine", "smooth_l1") else "cosine"
        return feature_regression_loss(pred, target, kind)

    @torch.no_grad()
    def update_teacher(self, step: int, total_steps: int) -> float:
        """Call after each optimiser step; returns the momentum used."""
        d = self.cfg.distill
        self.momentum = cosine_momentum(step, total_steps, d.ema_momentum_start, d.ema_momentum_end)
        if self.teacher is not None:
            self.teacher.update(self._ema_pairs(), self.momentum)
        return self.momentum
