"""The job spec: strict pydantic models, YAML loading, `--set` overrides, one-line errors.

    spec = load_spec("jobs/quickstart.yaml", ["optim.max_steps=200", "model.mask_ratio=0.6"])

Every problem becomes `SpecError`, whose lines read `path.to.field: what is wrong (got X)`.
Credentials never live here: they come from the environment / AWS chain / service account.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from maskclip.config import ModelConfig
from maskclip.registry import get_config, list_models

from .errors import SpecError

PosInt = Annotated[int, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(gt=0, lt=1)]

SECRET_KEY = re.compile(
    r"(^|[_-])(secret|password|passwd|token|credentials?|api_?key|access_?key)([_-]|$)", re.I
)
CREDENTIALS_HELP = (
    "credentials never go in the job spec; set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or a "
    "profile, or the Kubernetes service account) in the environment"
)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class RunSection(Section):
    name: str = Field("quickstart", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
    """Run name: the same name resumes the same run (checkpoints and MLflow run)."""
    tags: dict[str, str] = {}
    seed: int = 0
    output_dir: str = "runs"
    """Local folder for run folders (checkpoints default here, tokenizer, resolved spec)."""


class ModelSection(Section):
    size: str = "maskclip_tiny"
    image_size: PosInt | None = None
    """Override the size's image resolution (must be divisible by its patch size)."""
    vocab_size: Annotated[int, Field(ge=300)] = 4096
    """BPE vocabulary trained on the training captions (saved with every checkpoint)."""
    context_length: PosInt | None = None
    mode: Literal["efficient", "faithful"] = "efficient"
    mask_ratio: Fraction = 0.75
    masking: Literal["block", "random"] = "block"
    distill_fraction: Annotated[float, Field(gt=0, le=1)] = 0.125
    masks_per_image: PosInt = 2
    contrastive_weight: NonNegFloat = 1.0
    image_distill_weight: NonNegFloat = 1.0
    text_distill_weight: NonNegFloat = 1.0
    text_mask_ratio: Fraction = 0.15
    text_target: Literal["teacher", "tokens"] = "teacher"
    image_loss: Literal["cosine", "smooth_l1", "ibot"] = "cosine"
    target_norm: Literal["layernorm", "none"] = "layernorm"
    decoder_depth: PosInt = 2
    decoder_width: Annotated[int, Field(ge=0)] = 0
    ema_momentum_start: Annotated[float, Field(ge=0, le=1)] = 0.996
    ema_momentum_end: Annotated[float, Field(ge=0, le=1)] = 1.0

    @field_validator("size")
    @classmethod
    def _known_size(cls, v: str) -> str:
        if v not in list_models():
            raise ValueError(f"unknown model size; choose one of {', '.join(list_models())}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ModelSection:
        if self.ema_momentum_start > self.ema_momentum_end:
            raise ValueError("ema_momentum_start must not exceed ema_momentum_end")
        patch = get_config(self.size).vision.patch_size
        if self.image_size is not None and self.image_size % patch:
            raise ValueError(f"image_size must be a multiple of the patch size {patch}")
        return self


class DataSection(Section):
    train: str
    """Parquet shards: a folder, a glob, a file, or an s3:// URI (prefix or glob)."""
    val: str | None = None
    """Optional validation shards (with a label column: zero-shot + retrieval)."""
    image_column: str = "jpg"
    caption_column: str = "caption"
    label_column: str = "label"
    shuffle: bool = True
    shuffle_buffer: PosInt = 2000
    max_bad_fraction: Annotated[float, Field(ge=0, le=1)] = 0.05
    """Fail once more than this fraction of rows could not be decoded (they are skipped)."""
    max_caption_chars: PosInt = 1000
    tokenizer_captions: PosInt = 20000
    """How many training captions train the BPE tokenizer."""
    max_image_pixels: PosInt = 64_000_000
    """Decompression-bomb guard: larger images are skipped as bad rows."""


class OptimSection(Section):
    lr: Annotated[float, Field(gt=0)] = 5e-4
    warmup_steps: Annotated[int, Field(ge=0)] = 20
    schedule: Literal["cosine", "constant"] = "cosine"
    weight_decay: NonNegFloat = 0.1
    batch_size: PosInt = 64
    """Per worker."""
    max_steps: PosInt | None = 300
    epochs: PosInt | None = None
    """Set exactly one of max_steps / epochs (epochs need a known dataset size)."""
    grad_clip: NonNegFloat = 1.0
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 autocast on GPU, fp32 on CPU."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A NaN/inf loss: 'stop' the run (last good checkpoint kept) or 'skip' the step."""
    log_every: PosInt = 10
    val_every: Annotated[int, Field(ge=0)] = 0
    """Validate every N steps (0: only at the end)."""

    @model_validator(mode="after")
    def _one_budget(self) -> OptimSection:
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of max_steps and epochs")
        return self


class ScalingSection(Section):
    num_workers: PosInt = 1
    use_gpu: bool = False
    cpus_per_worker: Annotated[float, Field(gt=0)] = 0.5
    """Fractional by default so Ray Data keeps CPUs to decode with (a 2-core laptop works)."""
    gpus_per_worker: Annotated[float, Field(gt=0)] = 1.0
    ray_address: str | None = None
    """None: start an embedded local Ray; 'auto' or ray://... joins an existing cluster."""


class CheckpointSection(Section):
    storage_path: str | None = None
    """Local folder or s3://bucket/prefix; default <run.output_dir>/checkpoints."""
    every_steps: PosInt = 100
    keep: PosInt = 2
    max_failures: Annotated[int, Field(ge=0)] = 2
    """Worker failures survived per run (restart from the last checkpoint)."""


class TrackingSection(Section):
    enabled: bool = True
    tracking_uri: str | None = None
    """MLflow tracking URI; default $MLFLOW_TRACKING_URI or sqlite:///<output_dir>/mlflow.db."""
    experiment: str = "maskclip"


class StorageSection(Section):
    endpoint_url: str | None = None
    """S3 endpoint override for S3-compatible servers (MinIO, moto, ...)."""
    region: str | None = None


class JobSpec(Section):
    run: RunSection = RunSection()
    model: ModelSection = ModelSection()
    data: DataSection
    optim: OptimSection = OptimSection()
    scaling: ScalingSection = ScalingSection()
    checkpoint: CheckpointSection = CheckpointSection()
    tracking: TrackingSection = TrackingSection()
    storage: StorageSection = StorageSection()
    sweep: dict[str, Any] | None = None
    """Sweep section (see service.tune); ignored by `maskclip run`."""

    def model_config_for(self, vocab_size: int | None = None) -> ModelConfig:
        """The library's ModelConfig for this spec (vocab size from the trained tokenizer)."""
        m = self.model
        vision = {"image_size": m.image_size} if m.image_size else {}
        text: dict[str, Any] = {"vocab_size": vocab_size or m.vocab_size}
        if m.context_length:
            text["context_length"] = m.context_length
        return get_config(
            m.size,
            vision=vision,
            text=text,
            contrastive_weight=m.contrastive_weight,
            distill={
                "image_weight": m.image_distill_weight,
                "text_weight": m.text_distill_weight,
                "mask_ratio": m.mask_ratio,
                "masking": m.masking,
                "mode": m.mode,
                "distill_fraction": m.distill_fraction,
                "masks_per_image": m.masks_per_image,
                "decoder_depth": m.decoder_depth,
                "decoder_width": m.decoder_width,
                "image_loss": m.image_loss,
                "target_norm": m.target_norm,
                "text_mask_ratio": m.text_mask_ratio,
                "text_target": m.text_target,
                "ema_momentum_start": m.ema_momentum_start,
                "ema_momentum_end": m.ema_momentum_end,
            },
        )

    @property
    def image_size(self) -> int:
        return self.model.image_size or get_config(self.model.size).vision.image_size

    @property
    def context_length(self) -> int:
        return self.model.context_length or get_config(self.model.size).text.context_length

    def storage_path(self) -> str:
        return self.checkpoint.storage_path or str(
            Path(self.run.output_dir).resolve() / "checkpoints"
        )

    def tracking_uri(self, env: dict[str, str] | None = None) -> str:
        import os

        env = os.environ if env is None else env
        if self.tracking.tracking_uri:
            return self.tracking.tracking_uri
        if env.get("MLFLOW_TRACKING_URI"):
            return env["MLFLOW_TRACKING_URI"]
        return f"sqlite:///{Path(self.run.output_dir).resolve() / 'mlflow.db'}"

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------- loading and errors


def _fmt_value(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def format_validation_error(err: ValidationError) -> list[str]:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(spec)"
        msg = e["msg"]
        msg = msg.removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required field is missing"
        got = "" if e["type"] == "missing" else f" (got {_fmt_value(e.get('input'))})"
        lines.append(f"{loc}: {msg}{got}")
    return lines


def _find_secrets(data: Any, path: str = "") -> list[str]:
    found = []
    if isinstance(data, dict):
        for k, v in data.items():
            p = f"{path}.{k}" if path else str(k)
            if SECRET_KEY.search(str(k)) and path != "run.tags":
                found.append(f"{p}: {CREDENTIALS_HELP}")
            else:
                found.extend(_find_secrets(v, p))
    return found


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise SpecError(f"--set {text}: expected dotted.path=value")
    path, raw = text.split("=", 1)
    keys = path.strip().split(".")
    if not all(keys):
        raise SpecError(f"--set {text}: expected dotted.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return keys, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for i, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise SpecError(f"{'.'.join(keys[: i + 1])}: is not a section (got {child!r})")
            node = child
        node[keys[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{path}: no such spec file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(f"{path}:{where}: malformed YAML: {problem}") from None
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not a UTF-8 text file") from None
    if data is None:
        raise SpecError(f"{path}: the spec file is empty")
    if not isinstance(data, dict):
        raise SpecError(
            f"{path}: the spec must be a mapping of sections (got {type(data).__name__})"
        )
    return data


def build_spec(data: dict[str, Any]) -> JobSpec:
    secrets = _find_secrets(data)
    if secrets:
        raise SpecError(secrets)
    try:
        return JobSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(format_validation_error(err)) from None


def load_spec(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    data = apply_overrides(read_yaml(path), overrides or [])
    return build_spec(data)


def check_inputs(spec: JobSpec) -> None:
    """Checks that need the filesystem: local data paths must exist."""
    problems = []
    for field in ("train", "val"):
        uri = getattr(spec.data, field)
        if uri is None or "://" in uri:
            continue
        if any(c in uri for c in "*?["):
            import glob

            if not glob.glob(uri, recursive=True):
                problems.append(f"data.{field}: no files match (got {uri!r})")
        elif not Path(uri).exists():
            problems.append(f"data.{field}: no such file or directory (got {uri!r})")
    if problems:
        raise SpecError(problems)


def json_schema() -> dict[str, Any]:
    return JobSpec.model_json_schema()
