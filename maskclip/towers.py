"""The MaskCLIP student: image tower (timm ViT), text tower, projections, logit scale,
and the light heads that predict teacher features at masked positions.

With both distillation weights at 0 none of the distillation modules is built and the model is
exactly CLIP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import DistillConfig, ModelConfig, TextConfig, VisionConfig


def run_blocks(
    blocks, x: torch.Tensor, checkpointing: bool = False, **kwargs: torch.Tensor | None
) -> torch.Tensor:
    """Run transformer blocks in order; with `checkpointing` (and autograd recording) each
    block's activations are recomputed in backward instead of kept (less memory, ~1/3 more
    compute). Same numbers either way."""
    recompute = checkpointing and torch.is_grad_enabled()
    for block in blocks:
        if recompute:
            x = checkpoint(block, x, use_reentrant=False, **kwargs)
        else:
            x = block(x, **kwargs)
    return x


def set_fused_attention(module: nn.Module, enabled: bool = True) -> int:
    """Every timm `Attention` under `module` uses F.scaled_dot_product_attention (`enabled`) or
    the explicit softmax(QK^T)V path; returns how many were set. MaskCLIP turns it on at build
    so the fused kernel (flash / memory-efficient on GPU) does not depend on TIMM_FUSED_ATTN."""
    n = 0
    for m in module.modules():
        if isinstance(m, Attention):
            m.fused_attn = enabled
            n += 1
    return n


class VisionTower(nn.Module):
    """timm VisionTransformer (class-token pooling) + linear projection to the shared space.

    `tokens` runs the trunk on full images, on images whose masked patches are replaced by a
    learned mask token (faithful distillation), or on the visible patches only (efficient).
    """

    def __init__(self, cfg: VisionConfig, embed_dim: int, with_mask_token: bool = False):
        super().__init__()
        self.trunk = VisionTransformer(
            img_size=cfg.image_size,
            patch_size=cfg.patch_size,
            num_classes=0,
            global_pool="token",
            embed_dim=cfg.width,
            depth=cfg.depth,
            num_heads=cfg.heads,
            mlp_ratio=cfg.mlp_ratio,
        )
        self.width = cfg.width
        self.grid = tuple(self.trunk.patch_embed.grid_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False)
        self.grad_checkpointing = False
        self.mask_token = None
        if with_mask_token:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
            trunc_normal_(self.mask_token, std=0.02)

    def tokens(
        self,
        images: torch.Tensor,
        mask: torch.Tensor | None = None,
        visible_only: bool = False,
        blocks: int | None = None,
    ) -> torch.Tensor:
        """Final-norm tokens `[B, 1 + n, width]` (class token first).

        mask: `[B, num_patches]` bool, True = masked. With `visible_only` the masked patches are
        dropped (n = visible count, same for every row); otherwise they become the mask token.
        blocks: run only the first `blocks` transformer blocks (negative: all but the last
        -blocks), then the final norm; None runs them all.
        """
        t = self.trunk
        x = t.patch_embed(images)
        if mask is not None and not visible_only:
            x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = t._pos_embed(x)
        if mask is not None and visible_only:
            b, _, d = x.shape
            x = torch.cat([x[:, :1], x[:, 1:][~mask].reshape(b, -1, d)], dim=1)
        x = t.norm_pre(t.patch_drop(x))
        trunk = t.blocks if blocks is None else t.blocks[:blocks]
        x = run_blocks(trunk, x, self.grad_checkpointing)
        return t.norm(x)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(tokens[:, 0])


class TextTower(nn.Module):
    """Pre-norm transformer over caption tokens with bidirectional attention over non-padding
    tokens, pooled at the last non-padding (end-of-text) token, projected to the shared space."""

    def __init__(self, cfg: TextConfig, embed_dim: int, pad_id: int = 0):
        super().__init__()
        self.pad_id = pad_id
        self.width = cfg.width
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.context_length, cfg.width))
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.heads, cfg.mlp_ratio, qkv_bias=True) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.width)
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False)
        self.grad_checkpointing = False
        nn.init.normal_(self.token_embed.weight, std=0.02)
        trunc_normal_(self.pos_embed, std=0.01)

    def tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final-norm token features `[B, L, width]`."""
        x = self.token_embed(tokens) + self.pos_embed[:, : tokens.shape[1]]
        keep = tokens != self.pad_id
        # skip the mask when nothing is padded (faster attention kernel); meta tensors keep it,
        # and so does torch.compile (the check is a host sync and would break the graph)
        attn_mask = keep[:, None, None, :]
        if not tokens.is_meta and not torch.compiler.is_compiling() and bool(keep.all()):
            attn_mask = None
        x = run_blocks(self.blocks, x, self.grad_checkpointing, attn_mask=attn_mask)
        return self.norm(x)

    def embed(self, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        last = (tokens != self.pad_id).sum(dim=1).clamp(min=1) - 1
        return self.proj(features[torch.arange(features.shape[0], device=features.device), last])


class PatchDecoder(nn.Module):
    """Light transformer decoder predicting teacher patch features from student tokens.

    Efficient mode feeds it the visible tokens only and it inserts its own mask tokens (MAE);
    faithful mode feeds it every position (mask tokens already inserted by the encoder).
    """

    def __init__(
        self, in_dim: int, width: int, depth: int, num_patches: int, out_dim: int, insert: bool
    ):
        super().__init__()
        self.embed = nn.Linear(in_dim, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, width))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width)) if insert else None
        heads = max(1, width // 64)
        self.blocks = nn.Sequential(
            *[Block(width, heads, 4.0, qkv_bias=True) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, out_dim)
        self.grad_checkpointing = False
        trunc_normal_(self.pos_embed, std=0.02)
        if self.mask_token is not None:
            trunc_normal_(self.mask_token, std=0.02)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """tokens: encoder output with class token first; returns predictions `[M, out_dim]`
        at the masked positions (row-major over `mask`)."""
        x = self.embed(tokens)
        cls, patches = x[:, :1], x[:, 1:]
        if self.mask_token is not None:
            b, n = mask.shape
            full = self.mask_token.to(x.dtype).expand(b, n, x.shape[-1])
            patches = full.masked_scatter(~mask.unsqueeze(-1), patches)
        x = torch.cat([cls, patches], dim=1) + self.pos_embed
        x = self.norm(run_blocks(self.blocks, x, self.grad_checkpointing))
        return self.head(x[:, 1:][mask])


class TokenHead(nn.Module):
    """Predicts, at masked caption positions, teacher token features (MLP) or token ids."""

    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width))
        self.out = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.net(x))


class MaskCLIP(nn.Module):
    """Student model. `forward` runs every student pass (so DDP sees one forward per step)."""

    def __init__(self, cfg: ModelConfig, pad_id: int = 0):
        super().__init__()
        self.cfg = cfg
        d: DistillConfig = cfg.distill
        self.visual = VisionTower(
            cfg.vision, cfg.embed_dim, with_mask_token=d.image_enabled and d.mode == "faithful"
        )
        self.text = TextTower(cfg.text, cfg.embed_dim, pad_id=pad_id)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init)))
        vw, tw = cfg.vision.width, cfg.text.width
        self.image_decoder = self.image_prototypes = self.text_head = None
        if d.image_enabled:
            self.image_decoder = PatchDecoder(
                vw,
                d.decoder_width or max(32, vw // 2),
                d.decoder_depth,
                self.visual.num_patches,
                vw,
                insert=d.mode == "efficient",
            )
            if d.image_loss == "ibot":
                self.image_prototypes = nn.Linear(vw, d.num_prototypes)
        if d.text_enabled:
            out = tw if d.text_target == "teacher" else cfg.text.vocab_size
            self.text_head = TokenHead(tw, out)
        set_fused_attention(self, True)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute every transformer block's activations in backward (both towers and the
        patch decoder): activation memory per block drops to its input, for ~1/3 more compute."""
        for m in (self.visual, self.text, self.image_decoder):
            if m is not None:
                m.grad_checkpointing = enabled

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=self.cfg.logit_scale_max).exp()

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        f = self.visual.embed(self.visual.tokens(images))
        return F.normalize(f, dim=-1) if normalize else f

    def encode_patches(
        self, images: torch.Tensor, project: bool = False, blocks: int | None = None
    ) -> torch.Tensor:
        """Final-layer patch tokens (class token excluded) on the patch grid: `[B, gh, gw,
        width]` after the trunk's final norm; with `project` each token goes through the image
        projection into the joint image-text space and is L2-normalised (`[B, gh, gw,
        embed_dim]`, comparable with `encode_text`). Dense evaluation reads these.
        blocks: the tokens after the first `blocks` transformer blocks instead (negative: all
        but the last -blocks), through the final norm; for probing earlier layers."""
        tokens = self.visual.tokens(images, blocks=blocks)[:, 1:]
        gh, gw = self.visual.grid
        tokens = tokens.reshape(tokens.shape[0], gh, gw, tokens.shape[-1])
        return self.project_patches(tokens) if project else tokens

    def project_patches(self, tokens: torch.Tensor) -> torch.Tensor:
        """`encode_patches(images)` -> `encode_patches(images, project=True)` without running
        the trunk again (the image projection, then L2 normalisation, on the last dim)."""
        return F.normalize(self.visual.proj(tokens), dim=-1)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        f = self.text.embed(self.text.tokens(tokens), tokens)
        return F.normalize(f, dim=-1) if normalize else f

    def forward(
        self,
        images: torch.Tensor,
        tokens: torch.Tensor,
        image_mask: torch.Tensor | None = None,
        masked_tokens: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        image_sources: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Full-view embeddings for the contrastive loss, plus (when masks are given) the
        student's predictions at masked positions: image view i masks image
        `image_sources[i]` (default: the first `len(image_mask)` rows, one view each); masked
        captions are the first `len(masked_tokens)` rows.

        Passes with equal sequence lengths share one batch (rows never interact): the masked
        captions ride with the full ones, and in faithful mode the masked images (mask tokens,
        all positions) ride with the full images. Bigger matmuls, half the kernel launches.
        """
        n = images.shape[0]
        efficient = self.cfg.distill.mode == "efficient"
        out: dict[str, torch.Tensor] = {"logit_scale": self.scale()}

        masked_images = None
        if image_mask is not None:
            b = image_mask.shape[0]
            masked_images = images[:b] if image_sources is None else images[image_sources]
        if masked_images is not None and not efficient:
            keep = torch.zeros(n, image_mask.shape[1], dtype=torch.bool, device=images.device)
            both = self.visual.tokens(
                torch.cat([images, masked_images]), torch.cat([keep, image_mask])
            )
            full_img, masked_enc = both[:n], both[n:]
        else:
            full_img = self.visual.tokens(images)
            masked_enc = None
            if masked_images is not None:
                masked_enc = self.visual.tokens(masked_images, image_mask, True)
        out["image_features"] = F.normalize(self.visual.embed(full_img), dim=-1)
        if image_mask is not None:
            pred = self.image_decoder(masked_enc, image_mask)
            out["image_pred"] = pred
            if self.image_prototypes is not None:
                out["image_scores"] = self.image_prototypes(pred)

        if masked_tokens is not None:
            both = self.text.tokens(torch.cat([tokens, masked_tokens]))
            full_txt = both[:n]
            out["text_pred"] = self.text_head(both[n:][text_mask])
        else:
            full_txt = self.text.tokens(tokens)
        out["text_features"] = F.normalize(self.text.embed(full_txt, tokens), dim=-1)
        return out
