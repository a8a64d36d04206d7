"""maskclip: a pure PyTorch library for MaskCLIP (CLIP + masked self-distillation).

No Ray, MLflow, boto3 or pydantic here: the `service` package is the only glue.

The configs and the registry (`maskclip.config`, `maskclip.registry`) import without torch; the
modules that need it load on first use (PEP 562), so `from maskclip import get_config` and the
service's spec and CLI stay fast (`maskclip --help` paid ~1.7 s importing torch before this).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import DistillConfig, ModelConfig, TextConfig, VisionConfig
from .registry import clip_baseline, create_model, get_config, list_models, register_model

if TYPE_CHECKING:
    from .task import MaskCLIPTask
    from .towers import MaskCLIP

_LAZY = {"MaskCLIPTask": ".task", "MaskCLIP": ".towers"}

__all__ = [
    "DistillConfig",
    "MaskCLIP",
    "MaskCLIPTask",
    "ModelConfig",
    "TextConfig",
    "VisionConfig",
    "clip_baseline",
    "create_model",
    "get_config",
    "list_models",
    "register_model",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
