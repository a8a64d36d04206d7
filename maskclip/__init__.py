"""maskclip: a pure PyTorch library for MaskCLIP (CLIP + masked self-distillation).

No Ray, MLflow, boto3 or pydantic here: the `service` package is the only glue.
"""

from .config import DistillConfig, ModelConfig, TextConfig, VisionConfig
from .registry import clip_baseline, create_model, get_config, list_models, register_model
from .task import MaskCLIPTask
from .towers import MaskCLIP

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
