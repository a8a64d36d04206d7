"""Plain dataclass configs for the MaskCLIP library: the one declaration of every model setting.

Nothing here imports Ray, MLflow or pydantic: the service layer builds its job-spec section from
these dataclasses (`dataclasses.fields`, the `Literal` choices, the `bounds` in each field's
metadata and the docstring under each field), so a setting, its default, its range and its
description are written once, here. Every knob the paper left unconfirmed is a documented field
with the default we chose. Each config checks its own values on construction (`ConfigError`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin, get_type_hints

_LIMITS = {"gt": (operator.gt, ">"), "ge": (operator.ge, ">="), "lt": (operator.lt, "<")}
_LIMITS["le"] = (operator.le, "<=")


class ConfigError(ValueError):
    """A config value out of its range or choices; names the field (as the spec's key does)."""

    def __init__(self, field: str, message: str, value: Any):
        self.field, self.message, self.value = field, message, value
        super().__init__(f"{field}: {message} (got {value!r})")


def bounds(**limits: float) -> dict[str, Any]:
    """Field metadata giving a numeric range, named as pydantic names them: gt, ge, lt, le."""
    unknown = set(limits) - set(_LIMITS)
    if unknown:
        raise TypeError(f"unknown bound(s) {sorted(unknown)}; use gt, ge, lt, le")
    return {"bounds": limits}


def choices(annotation: Any) -> tuple[Any, ...]:
    """The values of a `Literal[...]` annotation; () for any other type."""
    return get_args(annotation) if get_origin(annotation) is Literal else ()


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotation of each field (this module uses `from __future__ import annotations`)."""
    return get_type_hints(cls)


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring: the string literal right under it in the class body (PEP 257's
    attribute docstrings, as pydantic's `use_attribute_docstrings` reads them)."""
    import ast
    import inspect
    import textwrap

    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source shipped (a frozen or zipped install)
        return {}
    body = ast.parse(source).body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def check_fields(obj: Any) -> None:
    """Raise ConfigError for a field outside its `Literal` choices or its `bounds`."""
    types = field_types(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        allowed = choices(types[f.name])
        if allowed and value not in allowed:
            raise ConfigError(f.name, f"must be one of {', '.join(map(repr, allowed))}", value)
        for name, limit in f.metadata.get("bounds", {}).items():
            compare, symbol = _LIMITS[name]
            if not compare(value, limit):
                raise ConfigError(f.name, f"must be {symbol} {limit}", value)


@dataclass
class VisionConfig:
    """Image tower: a timm VisionTransformer (no pretrained weights)."""

    image_size: int = field(default=224, metadata=bounds(gt=0))
    """Input resolution in pixels (square); a multiple of patch_size."""
    patch_size: int = field(default=16, metadata=bounds(gt=0))
    """Side of a square patch in pixels."""
    width: int = field(default=768, metadata=bounds(gt=0))
    """Token width of the image transformer."""
    depth: int = field(default=12, metadata=bounds(gt=0))
    """Transformer blocks."""
    heads: int = field(default=12, metadata=bounds(gt=0))
    """Attention heads per block."""
    mlp_ratio: float = field(default=4.0, metadata=bounds(gt=0))
    """MLP hidden width as a multiple of width."""

    def __post_init__(self) -> None:
        check_fields(self)
        if self.image_size % self.patch_size:
            raise ConfigError(
                "image_size",
                f"must be a multiple of the patch size {self.patch_size}",
                self.image_size,
            )


@dataclass
class TextConfig:
    """Text tower: a pre-norm transformer over caption tokens, pooled at the end-of-text token.

    Attention is bidirectional over non-padding tokens (so masked caption tokens can be predicted
    from both sides); CLIP and MaskCLIP share this tower so the ablation changes one thing only.
    """

    vocab_size: int = field(default=49408, metadata=bounds(gt=0))
    """Token vocabulary (the tokenizer's size, special tokens included)."""
    context_length: int = field(default=77, metadata=bounds(gt=0))
    """Caption tokens per row, start/end tokens included; longer captions are truncated."""
    width: int = field(default=512, metadata=bounds(gt=0))
    """Token width of the text transformer."""
    depth: int = field(default=12, metadata=bounds(gt=0))
    """Transformer blocks."""
    heads: int = field(default=8, metadata=bounds(gt=0))
    """Attention heads per block."""
    mlp_ratio: float = field(default=4.0, metadata=bounds(gt=0))
    """MLP hidden width as a multiple of width."""

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class DistillConfig:
    """Masked self-distillation (MaskCLIP). Both weights at 0 gives exactly CLIP."""

    image_weight: float = field(default=1.0, metadata=bounds(ge=0))
    """Weight of the masked image distillation loss (0 turns the image branch off)."""
    text_weight: float = field(default=1.0, metadata=bounds(ge=0))
    """Weight of the masked text loss (0 turns the text branch off)."""
    mask_ratio: float = field(default=0.75, metadata=bounds(gt=0, lt=1))
    """Fraction of image patches masked for the student (exact count per image)."""
    masking: Literal["block", "random"] = "block"
    """'block' (BEiT-style block-wise) or 'random' patch masks."""
    mode: Literal["efficient", "faithful"] = "efficient"
    """'faithful': the student's masked pass runs over all patches with mask tokens in place of
    masked ones (BEiT/iBOT style), for every image in the batch.
    'efficient': the masked pass encodes only the visible patches (MAE style) and the decoder
    inserts mask tokens; distillation runs on `distill_fraction` of the batch. The contrastive
    loss always sees the full image in both modes."""
    distill_fraction: float = field(default=0.125, metadata=bounds(gt=0, le=1))
    """Efficient mode only: masked student views per step, as a fraction of the batch (at
    least one). The extra cost grows with it: counted training FLOPs over CLIP are 1.08x at
    0.125 and 1.16x at 0.25 for maskclip_tiny with 2 masks per image (benchmarks/step.py)."""
    masks_per_image: int = field(default=2, metadata=bounds(gt=0))
    """Efficient mode only: independent masks drawn for each distilled image (data2vec 2.0's
    multi-mask). The EMA teacher encodes each image once and its targets serve all of that
    image's masked views, so at batch 64 the 8 views come from 4 images and the teacher pass
    costs half as much. 1 gives one view per image (teacher pass per view)."""
    decoder_depth: int = field(default=2, metadata=bounds(gt=0))
    """Transformer blocks in the light decoder that predicts teacher patch features."""
    decoder_width: int = field(default=0, metadata=bounds(ge=0))
    """Decoder width; 0 means half the vision width (at least 32)."""
    image_loss: Literal["cosine", "smooth_l1", "ibot"] = "cosine"
    """'cosine' (1 - cos on normalised features), 'smooth_l1' (on normalised features) or 'ibot'
    (soft-target cross-entropy over a learned prototype head, teacher centring + temperatures).
    Default cosine: it needs no extra head or centring state and is stable at small batch."""
    target_norm: Literal["layernorm", "none"] = "layernorm"
    """Normalisation of teacher targets: 'layernorm' (per-token, no affine, as data2vec/MAE) or 'none'."""
    text_mask_ratio: float = field(default=0.15, metadata=bounds(gt=0, lt=1))
    """Fraction of caption tokens (excluding padding/special tokens) masked for the text branch."""
    text_target: Literal["teacher", "tokens"] = "teacher"
    """'teacher': predict the EMA text teacher's token features (symmetric to the image branch);
    'tokens': predict the original token ids (BERT-style MLM)."""
    ema_momentum_start: float = field(default=0.996, metadata=bounds(ge=0, le=1))
    """EMA teacher momentum at step 0; it follows a cosine up to ema_momentum_end over training
    (SLIP/A-CLIP recipe)."""
    ema_momentum_end: float = field(default=1.0, metadata=bounds(ge=0, le=1))
    """EMA teacher momentum at the last step (1.0: the teacher freezes at the end)."""
    num_prototypes: int = field(default=1024, metadata=bounds(gt=0))
    """image_loss 'ibot' only: outputs of the prototype head the soft targets are taken over."""
    student_temp: float = field(default=0.1, metadata=bounds(gt=0))
    """image_loss 'ibot' only: softmax temperature of the student's prototype scores."""
    teacher_temp: float = field(default=0.04, metadata=bounds(gt=0))
    """image_loss 'ibot' only: softmax temperature of the teacher's centred scores (sharper than
    the student's)."""
    center_momentum: float = field(default=0.9, metadata=bounds(ge=0, le=1))
    """image_loss 'ibot' only: EMA momentum of the teacher-score centre (1.0 never updates it)."""

    def __post_init__(self) -> None:
        check_fields(self)
        if self.ema_momentum_start > self.ema_momentum_end:
            raise ConfigError(
                "ema_momentum_start",
                f"must not exceed ema_momentum_end {self.ema_momentum_end}",
                self.ema_momentum_start,
            )

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

    embed_dim: int = field(default=512, metadata=bounds(gt=0))
    """Width of the shared image-text embedding both towers project into."""
    vision: VisionConfig = field(default_factory=VisionConfig)
    """The image tower."""
    text: TextConfig = field(default_factory=TextConfig)
    """The text tower."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """Masked self-distillation (both weights 0: CLIP)."""
    contrastive_weight: float = field(default=1.0, metadata=bounds(ge=0))
    """Weight of the image-text contrastive (CLIP) loss."""
    logit_scale_init: float = math.log(1 / 0.07)
    """Initial log of the contrastive logit scale (CLIP: temperature 0.07)."""
    logit_scale_max: float = math.log(100.0)
    """The logit scale is clamped to at most exp(this) (CLIP: 100)."""

    def __post_init__(self) -> None:
        check_fields(self)
