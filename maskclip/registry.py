"""Named model sizes (timm style): each is a tiny function returning a `ModelConfig`.

cfg = get_config("maskclip_tiny", distill={"mask_ratio": 0.6})
model = create_model("maskclip_vit_b16")
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from .config import DistillConfig, ModelConfig, TextConfig, VisionConfig

_REGISTRY: dict[str, Callable[[], ModelConfig]] = {}


def register_model(fn: Callable[[], ModelConfig]) -> Callable[[], ModelConfig]:
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


@register_model
def maskclip_nano() -> ModelConfig:
    """Smallest: unit tests and smoke runs (32 px, patch 8, width 64)."""
    return ModelConfig(
        embed_dim=64,
        vision=VisionConfig(image_size=32, patch_size=8, width=64, depth=2, heads=2),
        text=TextConfig(vocab_size=1024, context_length=32, width=64, depth=2, heads=2),
    )


@register_model
def maskclip_micro() -> ModelConfig:
    """Reproduction size: thousands of steps in minutes on 2 CPU cores (32 px, patch 8 -> 16
    patches, width 128; context 16 fits the Fashion-MNIST templates)."""
    return ModelConfig(
        embed_dim=96,
        vision=VisionConfig(image_size=32, patch_size=8, width=128, depth=4, heads=4),
        text=TextConfig(vocab_size=1024, context_length=16, width=96, depth=2, heads=2),
    )


@register_model
def maskclip_tiny() -> ModelConfig:
    """CPU test/demo size (32 px, patch 4 -> 64 patches, width 192)."""
    return ModelConfig(
        embed_dim=128,
        vision=VisionConfig(image_size=32, patch_size=4, width=192, depth=6, heads=3),
        text=TextConfig(vocab_size=4096, context_length=32, width=128, depth=4, heads=2),
    )


@register_model
def maskclip_vit_s16() -> ModelConfig:
    """ViT-S/16 image tower, 224 px."""
    return ModelConfig(
        embed_dim=384,
        vision=VisionConfig(image_size=224, patch_size=16, width=384, depth=12, heads=6),
        text=TextConfig(vocab_size=49408, context_length=77, width=384, depth=12, heads=6),
    )


@register_model
def maskclip_vit_b16() -> ModelConfig:
    """The paper's size: ViT-B/16 at 224 px; text 12 layers x 512, 8 heads, context 77; embed 512."""
    return ModelConfig(
        embed_dim=512,
        vision=VisionConfig(image_size=224, patch_size=16, width=768, depth=12, heads=12),
        text=TextConfig(vocab_size=49408, context_length=77, width=512, depth=12, heads=8),
    )


def _merge(obj: Any, overrides: dict[str, Any]) -> Any:
    changes = {}
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in overrides.items():
        if key not in names:
            raise KeyError(f"{type(obj).__name__} has no field {key!r}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            value = _merge(current, value)
        changes[key] = value
    return dataclasses.replace(obj, **changes)


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """The registered config, with nested overrides (`vision={...}`, `distill={...}`, ...)."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    return _merge(_REGISTRY[name](), overrides)


def create_model(name_or_cfg: str | ModelConfig, pad_id: int = 0, **overrides: Any):
    """Build the student `MaskCLIP` module from a registered name or a `ModelConfig`."""
    from .towers import MaskCLIP

    cfg = name_or_cfg if isinstance(name_or_cfg, ModelConfig) else get_config(name_or_cfg)
    if overrides:
        cfg = _merge(cfg, overrides)
    return MaskCLIP(cfg, pad_id=pad_id)


def clip_baseline(cfg: ModelConfig) -> ModelConfig:
    """The same config with both distillation branches off: exactly CLIP."""
    return dataclasses.replace(
        cfg, distill=dataclasses.replace(cfg.distill, image_weight=0.0, text_weight=0.0)
    )


__all__ = [
    "DistillConfig",
    "ModelConfig",
    "TextConfig",
    "VisionConfig",
    "clip_baseline",
    "create_model",
    "get_config",
    "list_models",
    "register_model",
]
