"""Plain dataclass configs for the MaskCLIP library.

Nothing here imports Ray, MLflow or pydantic: the service layer turns a job spec into these.
Every knob the paper left unconfirmed is a documented field with the default we chose.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class VisionConfig:
    """Image tower: a timm VisionTransformer (no pretrained weights)."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0


@dataclass
class TextConfig:
    """Text tower: a pre-norm transformer over caption tokens, pooled at the end-of-text token.

    Attention is bidirectional over non-padding tokens (so masked caption tokens can be predicted
    from both sides); CLIP and MaskCLIP share this tower so the ablation changes one thing only.
    """

    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    depth: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0


@dataclass
class DistillConfig:
    """Masked self-distillation (MaskCLIP). Both weights at 0 gives exactly CLIP."""

    image_weight: float = 1.0
    """Weight of the masked image distillation loss (0 turns the image branch off)."""
    text_weight: float = 1.0
    """Weight of the masked text loss (0 turns the text branch off)."""
    mask_ratio: float = 0.75
    """Fraction of image patches masked for the student (exact count per image)."""
    masking: str = "block"
    """'block' (BEiT-style block-wise) or 'random' patch masks."""
    mode: str = "efficient"
    """'faithful': the student's masked pass runs over all patches with mask tokens in place of
    masked ones (BEiT/iBOT style), for every image in the batch.
    'efficient': the masked pass encodes only the visible patches (MAE style) and the decoder
    inserts mask tokens; distillation runs on `distill_fraction` of the batch. The contrastive
    loss always sees the full image in both modes."""
    distill_fraction: float = 0.125
    """Efficient mode only: masked student views per step, as a fraction of the batch (at
    least one). The extra cost grows with it: counted training FLOPs over CLIP are 1.08x at
    0.125 and 1.16x at 0.25 for maskclip_tiny with 2 masks per image (benchmarks/step.py)."""
    masks_per_image: int = 2
    """Efficient mode only: independent masks drawn for each distilled image (data2vec 2.0's
    multi-mask). The EMA teacher encodes each image once and its targets serve all of that
    image's masked views, so at batch 64 the 8 views come from 4 images and the teacher pass
    costs half as much. 1 gives one view per image (teacher pass per view)."""
    decoder_depth: int = 2
    """Transformer blocks in the light decoder that predicts teacher patch features."""
    decoder_width: int = 0
    """Decoder width; 0 means half the vision width."""
    image_loss: str = "cosine"
    """'cosine' (1 - cos on normalised features), 'smooth_l1' (on normalised features) or 'ibot'
    (soft-target cross-entropy over a learned prototype head, teacher centring + temperatures).
    Default cosine: it needs no extra head or centring state and is stable at small batch."""
    target_norm: str = "layernorm"
    """Normalisation of teacher targets: 'layernorm' (per-token, no affine, as data2vec/MAE) or 'none'."""
    text_mask_ratio: float = 0.15
    """Fraction of caption tokens (excluding padding/special tokens) masked for the text branch."""
    text_target: str = "teacher"
    """'teacher': predict the EMA text teacher's token features (symmetric to the image branch);
    'tokens': predict the original token ids (BERT-style MLM)."""
    ema_momentum_start: float = 0.996
    ema_momentum_end: float = 1.0
    """EMA momentum follows a cosine from start to end over training (SLIP/A-CLIP recipe)."""
    num_prototypes: int = 1024
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    center_momentum: float = 0.9
    """iBOT loss only: prototype count, temperatures and teacher-centring momentum."""

    @property
    def image_enabled(self) -> bool:
        return self.image_weight > 0

    @property
    def text_enabled(self) -> bool:
        return self.text_weight > 0

    @property
    def enabled(self) -> bool:
        return self.image_enabled or self.text_enabled


@dataclass
class ModelConfig:
    """A whole MaskCLIP model: towers, shared embedding and distillation."""

    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    contrastive_weight: float = 1.0
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float = math.log(100.0)
