"""The job spec: strict pydantic models, YAML loading, `--set` overrides, one-line errors.

    spec = load_spec("jobs/quickstart.yaml", ["optim.max_steps=200", "model.mask_ratio=0.6"])

Every problem becomes `SpecError`, whose lines read `path.to.field: what is wrong (got X)`.
Credentials never live here: they come from the environment / AWS chain / service account.

The `model:` section is built from `maskclip.config`'s dataclasses (fields, defaults, `Literal`
choices, `bounds`, docstrings), so a model setting is declared once, in the library. Every field
of every section has a docstring: `maskclip schema` prints it as the field's description.
Importing this module loads pydantic and yaml, never torch or ray (the CLI's fast path).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from maskclip.config import (
    ConfigError,
    DistillConfig,
    ModelConfig,
    TextConfig,
    VisionConfig,
    field_docs,
    field_types,
)
from maskclip.registry import get_config, list_models

from .errors import SpecError

PosInt = Annotated[int, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]

SECRET_KEY = re.compile(
    r"(^|[_-])(secret|password|passwd|token|credentials?|api_?key|access_?key)([_-]|$)", re.I
)
CREDENTIALS_HELP = (
    "credentials never go in the job spec; set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or a "
    "profile, or the Kubernetes service account) in the environment"
)
USERINFO = re.compile(
    r"(?i)\b([a-z][a-z0-9+.-]*://)([^\s/?#@]*)@|(?<![\w:/@.-])([^\s/?#@:'\"]+:[^\s/?#@'\"]+)@(?=[a-z0-9])"
)
"""User info in a URI (`scheme://user[:pass]@host`, any user part: a token often rides as the
user name) or a bare `user:pass@host`: credentials by value, refused anywhere in a spec."""
MLFLOW_CREDENTIALS = "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD"
AWS_CREDENTIALS = "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
MAX_SPEC_BYTES = 1024 * 1024
"""Spec files larger than this are refused (a real spec is a few KB)."""
MAX_SPEC_VALUES = 100_000
"""Keys and values in a document with every YAML alias expanded. Aliases share one object when
loaded, so a 1 KB spec of 9 nested levels of 10 aliases stands for 10^9 values: walking it
naively kept `maskclip validate` busy past 30 s. Sizes are counted once per distinct object, so
measuring is linear in the file, and such a document is refused before anything walks it."""
MAX_SPEC_DEPTH = 64
"""Nesting deeper than this is refused (a spec nests 4-5 levels)."""


class Section(BaseModel):
    # use_attribute_docstrings: the docstring under a field is its schema description
    model_config = ConfigDict(extra="forbid", validate_default=True, use_attribute_docstrings=True)


class RunSection(Section):
    name: str = Field("quickstart", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
    """Run name: the same name resumes the same run (checkpoints and MLflow run)."""
    tags: dict[str, str] = {}
    """Free-form MLflow tags set on the run; numbers and booleans become strings."""
    seed: int = 0
    """Seed of every random draw (init, masks, shuffles); each worker offsets it by its rank."""
    output_dir: str = "runs"
    """Local folder for run folders (checkpoints default here, tokenizer, resolved spec)."""

    @field_validator("tags", mode="before")
    @classmethod
    def _scalar_tags(cls, tags):
        """MLflow tags are strings: `release: 2` and `baseline: true` become "2" and "true"."""
        if not isinstance(tags, dict):
            return tags

        def text(v):
            if isinstance(v, bool):
                return str(v).lower()
            return str(v) if isinstance(v, (int, float)) else v

        return {k: text(v) for k, v in tags.items()}


RENAMED = {
    "model.image_distill_weight": "model.image_weight",
    "model.text_distill_weight": "model.text_weight",
}
"""Keys renamed to the library's names (DistillConfig's): a spec, `--set` or sweep path using
the old name fails with one line naming the new one; there are no aliases."""

LIBRARY_PARTS: dict[str, type] = {
    "vision": VisionConfig,
    "text": TextConfig,
    "distill": DistillConfig,
    "": ModelConfig,
}
"""The dataclass behind each part of a ModelConfig ("": ModelConfig itself)."""

LIBRARY_KEYS: dict[str, str] = {
    "image_size": "vision",
    "context_length": "text",
    "contrastive_weight": "",
    **{f.name: "distill" for f in dataclasses.fields(DistillConfig)},
}
"""`model:` keys taken from the library, flat: every DistillConfig field and a few ModelConfig
overrides (key -> its part). Their default, choices, range and description are the library's."""

SIZE_DEFAULTS = ("image_size", "context_length")
"""Keys that default to the registered size's own value (None in the spec)."""


def _library_field(key: str) -> tuple[Any, Any]:
    """A pydantic (annotation, FieldInfo) for a library field: its Literal/type, its `bounds`
    metadata as constraints, its docstring as the description."""
    cls = LIBRARY_PARTS[LIBRARY_KEYS[key]]
    spec = next(f for f in dataclasses.fields(cls) if f.name == key)
    kind = Annotated[field_types(cls)[key], Field(**spec.metadata.get("bounds", {}))]
    doc = field_docs(cls).get(key, "")
    if key in SIZE_DEFAULTS:
        return kind | None, Field(None, description=f"{doc} Unset: the size's own value.")
    assert spec.default is not dataclasses.MISSING, key
    return kind, Field(spec.default, description=doc)


class _ModelBase(Section):
    size: str = "maskclip_tiny"
    """A registered model size (maskclip.registry): tower widths, depths, patch and image size."""
    tokenizer: Literal["trained", "clip"] = "trained"
    """'trained': a BPE of vocab_size tokens trained on the run's captions (fits a small
    vocabulary; text towers of two runs are not comparable). 'clip': OpenAI CLIP's standard BPE
    (49,408 tokens, shipped by open_clip_torch), the same for every run; vocab_size is unused."""
    vocab_size: Annotated[int, Field(ge=300)] = 4096
    """BPE vocabulary trained on the training captions (saved with every checkpoint)."""

    @field_validator("size")
    @classmethod
    def _known_size(cls, v: str) -> str:
        if v not in list_models():
            raise ValueError(f"unknown model size; choose one of {', '.join(list_models())}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> _ModelBase:
        self.to_config()  # the library's own cross-field checks; a ConfigError names the field
        return self

    def to_config(self, vocab_size: int | None = None) -> ModelConfig:
        """The library's ModelConfig: the registered size with this section's settings over it
        (the vocabulary from the trained tokenizer when given)."""
        parts: dict[str, dict[str, Any]] = {"vision": {}, "text": {}, "distill": {}, "": {}}
        parts["text"]["vocab_size"] = vocab_size or self.vocab_size
        for key, part in LIBRARY_KEYS.items():
            value = getattr(self, key)
            if value is not None:
                parts[part][key] = value
        top = parts.pop("")
        return get_config(self.size, **parts, **top)


ModelSection = create_model(
    "ModelSection",
    __base__=_ModelBase,
    __doc__="The model: a registered size and the library's settings (maskclip.config).",
    __module__=__name__,
    **{key: _library_field(key) for key in LIBRARY_KEYS},
)


class DataSection(Section):
    train: str
    """Parquet shards: a folder, a glob, a file, or an s3:// URI (prefix or glob)."""
    val: str | None = None
    """Optional validation shards (with a label column: zero-shot + retrieval)."""
    dense_probe: str | None = None
    """Optional dense-labelled root (`mask` column, classes.txt beside the shards) with train/
    and the dense_probe_split folder: validation adds the linear probe on patch tokens, fitted
    on train/ and scored on that split (val_dense_probe_miou, val_dense_probe_pixel_accuracy),
    as `maskclip eval --dense-probe` (which scores test/)."""
    dense_probe_split: str = Field("test", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
    """The folder under data.dense_probe that the in-loop probe is scored on (it is fitted on
    train/). A sweep that chooses by val_dense_probe_* must name a held-out split here (`val`,
    from `maskclip data convert --fashion-mnist --val-rows N`; test/ is refused there) and leave
    test/ for the report."""
    zero_shot_seg: str | None = None
    """Optional dense-labelled split folder (or a root whose test/ is used): validation adds
    zero-shot segmentation with the class prompts (val_zero_shot_seg_miou, ..._pixel_accuracy),
    as `maskclip eval --zero-shot-seg`."""
    image_column: str = "jpg"
    """Column of encoded image bytes (JPEG, PNG, WebP, ...)."""
    caption_column: str = "caption"
    """Column of caption text."""
    label_column: str = "label"
    """Column of class names (validation: the zero-shot classes; a row without one is bad)."""
    shuffle: bool = True
    """Shuffle the file order every epoch (training); rows are mixed further by shuffle_buffer."""
    shuffle_buffer: PosInt = 2000
    """Rows in each worker's local shuffle buffer."""
    max_bad_fraction: Annotated[float, Field(ge=0, le=1)] = 0.05
    """Fail once more than this fraction of rows could not be decoded (they are skipped)."""
    max_caption_chars: PosInt = 1000
    """Captions are cut to this many characters before tokenizing."""
    tokenizer_captions: PosInt = 20000
    """How many training captions train the BPE tokenizer."""
    max_image_pixels: PosInt = 64_000_000
    """Decompression-bomb guard: larger images are skipped as bad rows."""
    templates: str | list[str] = "default"
    """Zero-shot prompts for validation (and `maskclip eval` of this run's checkpoints): a set
    of maskclip.templates (default, shapes, fashion-mnist) or a list of templates, each with one
    {} for the class name."""

    @field_validator("dense_probe_split")
    @classmethod
    def _held_out(cls, v: str) -> str:
        if v == "train":
            raise ValueError("the probe is fitted on train/; score it on a held-out split (val)")
        return v

    @field_validator("templates")
    @classmethod
    def _known_templates(cls, v: str | list[str]) -> str | list[str]:
        from maskclip.templates import check_templates

        why = check_templates(v)
        if why:
            raise ValueError(why)
        return v


class OptimSection(Section):
    lr: Annotated[float, Field(gt=0)] = 5e-4
    """Peak AdamW learning rate (reached after warmup_steps)."""
    warmup_steps: Annotated[int, Field(ge=0)] = 20
    """Steps of linear learning-rate warmup from 0."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """After warmup: 'cosine' decay to 0 at the last step, or 'constant'."""
    weight_decay: NonNegFloat = 0.1
    """AdamW weight decay (not applied to biases, norms, embeddings or the logit scale)."""
    batch_size: PosInt = 64
    """Per worker."""
    max_steps: PosInt | None = 300
    """Training steps (optimizer updates) in the run."""
    epochs: PosInt | None = None
    """Set exactly one of max_steps / epochs (epochs need a known dataset size)."""
    grad_clip: NonNegFloat = 1.0
    """Clip the gradient's global norm to this (0: no clipping)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 autocast on GPU, fp32 on CPU."""
    compile: bool = False
    """torch.compile the student's forward (off until measured on the target GPU:
    benchmarks/gpu.py). The first steps are slow while it compiles."""
    grad_checkpointing: bool = False
    """Recompute each transformer block's activations in backward: less activation memory
    (bigger batches per GPU) for about a third more compute. Same numbers."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A NaN/inf loss: 'stop' the run (last good checkpoint kept) or 'skip' the step."""
    max_skipped_steps: PosInt = 20
    """With on_nonfinite 'skip': stop the run (as 'stop' does) after this many consecutive
    skipped steps, since a model that only yields NaN would otherwise loop forever."""
    log_every: PosInt = 10
    """Log metrics (console and MLflow) every N steps."""
    val_every: Annotated[int, Field(ge=0)] = 0
    """Validate every N steps (0: only at the end)."""

    @model_validator(mode="after")
    def _one_budget(self) -> OptimSection:
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError(
                f"optim.max_steps ({self.max_steps}) and optim.epochs ({self.epochs}) are both "
                "set: set optim.max_steps=null to use epochs, or optim.epochs=null"
            )
        if self.max_steps is None and self.epochs is None:
            raise ValueError("set exactly one of max_steps and epochs (both are null)")
        return self


DATA_CPUS_PER_GPU = 6.0
"""Default CPUs for Ray Data per GPU (scaling.data_cpus_per_worker)."""
DATA_CPUS_CPU_WORKER = 0.5
"""Default CPUs for Ray Data per CPU-only worker: 1 worker + its data fit a 2-core laptop."""
MIN_DATA_CPUS = 0.5
"""Ray Data needs at least this many CPUs in any plan: one decode task (service.data)."""


class ScalingSection(Section):
    num_workers: PosInt = 1
    """Ray Train workers (data-parallel ranks); with min_workers, the most it runs with."""
    min_workers: PosInt | None = None
    """Elastic training (Ray Train V2): the run goes on with as few as this many workers when
    nodes go away (restarting from its last checkpoint with fewer ranks) and grows back to
    num_workers when they return. None: exactly num_workers."""
    use_gpu: bool = False
    """Give each worker gpus_per_worker GPUs (the cluster must have them)."""
    cpus_per_worker: Annotated[float, Field(gt=0)] = 0.5
    """Fractional by default so Ray Data keeps CPUs to decode with (a 2-core laptop works)."""
    gpus_per_worker: Annotated[float, Field(gt=0)] = 1.0
    """GPUs per worker when use_gpu (fractions share a GPU)."""
    data_cpus_per_worker: Annotated[float, Field(ge=0)] | None = None
    """CPUs kept for Ray Data (read, decode, augment) per training worker, on top of
    cpus_per_worker. `maskclip render` sizes each worker pod as cpus_per_worker + this;
    `maskclip run` refuses a plan whose workers leave the cluster fewer CPUs; decode tasks
    scale with it. Default: 6 per GPU with use_gpu, else 0.5 (a 2-core laptop). Measured here
    (benchmarks/pipeline.py --image-size 224, README): ~760 rows/s per core for a 500x375 JPEG
    (decode + random-resized-crop to 224 px), and 4.4-5.1 ms to decode a 1024x768 one, so 6
    cores feed ~1,000 samples/s per GPU of large crawl images, or ~4,000 of 500x375 ones."""
    ray_address: str | None = None
    """None: start an embedded local Ray; 'auto' or ray://... joins an existing cluster."""

    def data_cpus(self) -> float:
        """scaling.data_cpus_per_worker, or its default (6 per GPU with use_gpu, else 0.5)."""
        if self.data_cpus_per_worker is not None:
            return self.data_cpus_per_worker
        return DATA_CPUS_PER_GPU * self.gpus_per_worker if self.use_gpu else DATA_CPUS_CPU_WORKER

    @model_validator(mode="after")
    def _elastic_range(self) -> ScalingSection:
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError("min_workers must not exceed num_workers")
        return self

    def cpu_shortfall(
        self,
        cluster_cpus: float,
        where: str,
        advice: str = "lower scaling.num_workers or scaling.cpus_per_worker, or give the "
        "cluster more CPUs",
    ) -> str | None:
        """One line naming the numbers when the training workers leave fewer of `cluster_cpus`
        to Ray Data than it needs (num_workers x data_cpus(), at least MIN_DATA_CPUS): such a
        run would wait forever for its first batch. None when the plan fits. The one rule for
        `maskclip run` (the cluster's CPUs) and `maskclip render` (the rendered pods')."""
        n, cpw = self.num_workers, self.cpus_per_worker
        training = n * cpw
        need = max(MIN_DATA_CPUS, n * self.data_cpus())
        if training + need <= cluster_cpus + 1e-9:
            return None
        spare = max(0.0, cluster_cpus - training)
        return (
            f"scaling: {n} workers x {cpw:g} CPU leave {spare:g} of the {cluster_cpus:g} CPUs of "
            f"{where} to Ray Data, which needs {need:g} ({n} x scaling.data_cpus_per_worker "
            f"{self.data_cpus():g}); {advice}"
        )


class CheckpointSection(Section):
    storage_path: str | None = None
    """Local folder or s3://bucket/prefix; default <run.output_dir>/checkpoints."""
    every_steps: PosInt = 100
    """Checkpoint every N steps (and at the end); sweeps report at these steps."""
    keep: PosInt = 2
    """Checkpoints kept (the newest); older ones are deleted."""
    max_failures: Annotated[int, Field(ge=0)] = 2
    """Worker failures survived per run (restart from the last checkpoint)."""


class ClusterSection(Section):
    """What a Kubernetes cluster does around the run (`maskclip render`); ignored locally."""

    backoff_limit: Annotated[int, Field(ge=0)] = 1
    """RayJob retries of the whole job (a new Ray cluster each; the run resumes from its last
    checkpoint). Worker failures inside one cluster are checkpoint.max_failures."""
    gcs_redis_address: str | None = None
    """host:port of an external Redis for Ray's GCS fault tolerance: the head can restart
    without losing the running job. None: no GCS fault tolerance."""
    gcs_redis_auth_from: str | None = None
    """Name of a Kubernetes Secret whose key `password` is the Redis password (never the
    password itself)."""
    stop_grace_s: PosInt = 120
    """Seconds a stopping job has to checkpoint; pods get this plus 30 s before SIGKILL."""


class TrackingSection(Section):
    enabled: bool = True
    """Log parameters, metrics and the model to MLflow."""
    tracking_uri: str | None = None
    """MLflow tracking URI; default $MLFLOW_TRACKING_URI or sqlite:///<output_dir>/mlflow.db."""
    experiment: str = "maskclip"
    """MLflow experiment name (created if missing)."""


class StorageSection(Section):
    endpoint_url: str | None = None
    """S3 endpoint override for S3-compatible servers (MinIO, moto, ...)."""
    region: str | None = None
    """S3 region; default $AWS_REGION / $AWS_DEFAULT_REGION (us-east-1 with an endpoint_url)."""


class JobSpec(Section):
    run: RunSection = RunSection()
    """The run's name, seed, tags and output folder."""
    model: ModelSection = ModelSection()
    """Model size and every MaskCLIP setting (maskclip.config's fields, flat)."""
    data: DataSection
    """Training (and validation) Parquet shards and how rows are read."""
    optim: OptimSection = OptimSection()
    """Optimizer, schedule, batch size and step budget."""
    scaling: ScalingSection = ScalingSection()
    """Ray Train workers and their resources."""
    checkpoint: CheckpointSection = CheckpointSection()
    """Where and how often checkpoints are written."""
    cluster: ClusterSection = ClusterSection()
    """Kubernetes (KubeRay) job retries, GCS fault tolerance and stop grace."""
    tracking: TrackingSection = TrackingSection()
    """MLflow tracking."""
    storage: StorageSection = StorageSection()
    """S3 endpoint and region (credentials come from the environment)."""
    sweep: dict[str, Any] | None = None
    """Sweep section (see service.sweep_spec); ignored by `maskclip run`."""

    def model_config_for(self, vocab_size: int | None = None) -> ModelConfig:
        """The library's ModelConfig for this spec (vocab size from the trained tokenizer)."""
        return self.model.to_config(vocab_size)

    @property
    def image_size(self) -> int:
        return self.model_config_for().vision.image_size

    @property
    def context_length(self) -> int:
        return self.model_config_for().text.context_length

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


def redact(text: str) -> str:
    """`text` with the user info of every URI in it replaced by `***`."""

    def mask(m: re.Match[str]) -> str:
        return f"{m.group(1)}***@" if m.group(1) else "***@"

    return USERINFO.sub(mask, text)


def _fmt_value(v: Any) -> str:
    text = redact(repr(v))
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
        # a section-level check names its fields itself: a dump of the section says nothing more
        whole = isinstance(e.get("input"), dict) and e["type"] == "value_error"
        got = "" if e["type"] == "missing" or whole else f" (got {_fmt_value(e.get('input'))})"
        cause = e.get("ctx", {}).get("error")
        if isinstance(cause, ConfigError):  # the library's check: name its field, not the section
            loc, msg, got = (
                f"{loc}.{cause.field}",
                cause.message,
                f" (got {_fmt_value(cause.value)})",
            )
        lines.append(f"{loc}: {msg}{got}")
    return lines


def _find_renamed(data: dict[str, Any]) -> list[str]:
    found = []
    for old, new in RENAMED.items():
        section, key = old.split(".")
        node = data.get(section)
        if isinstance(node, dict) and key in node:
            found.append(f"{old}: renamed to {new} (got {_fmt_value(node[key])})")
    return found


def _measure(data: Any) -> None:
    """Refuse a document whose alias-expanded size passes MAX_SPEC_VALUES, that nests deeper than
    MAX_SPEC_DEPTH, or that contains itself; each distinct object is sized once (linear)."""
    sizes: dict[int, int | None] = {}

    def size(node: Any, depth: int) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        if id(node) in sizes:
            known = sizes[id(node)]
            if known is None:
                raise SpecError("(spec): a YAML alias refers to a node that contains it")
            return known
        if depth > MAX_SPEC_DEPTH:
            raise SpecError(f"(spec): nested deeper than {MAX_SPEC_DEPTH} levels")
        sizes[id(node)] = None
        children = [*node.keys(), *node.values()] if isinstance(node, dict) else node
        total = 1
        for child in children:
            total = min(total + size(child, depth + 1), MAX_SPEC_VALUES + 1)
        sizes[id(node)] = total
        return total

    if size(data, 0) > MAX_SPEC_VALUES:
        raise SpecError(
            f"(spec): with its YAML aliases expanded the document holds more than "
            f"{MAX_SPEC_VALUES:,} keys and values; write the spec without nested aliases"
        )


def _credentials_hint(path: str, uri: str) -> str:
    """The environment variables that carry what a URI's user info held (MLflow's or AWS's)."""
    parts = set(re.split(r"[.\[]", path))
    if "tracking" in parts:
        return MLFLOW_CREDENTIALS
    if uri.lower().startswith("s3://") or parts & {"data", "checkpoint", "storage"}:
        return AWS_CREDENTIALS
    return f"{MLFLOW_CREDENTIALS} for MLflow, {AWS_CREDENTIALS} for S3"


def _find_secrets(data: Any) -> list[str]:
    """Credentials by value or by key name anywhere in the document (tags and sweep values too):
    a key that names a credential, a string holding a URI with user info. Each distinct object is
    visited once, so YAML aliases cost nothing; no line repeats the secret."""
    found: list[str] = []
    seen: set[int] = set()
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, (dict, list)):
            if id(node) in seen:
                continue
            seen.add(id(node))
        if isinstance(node, dict):
            children = []
            for k, v in node.items():
                p = f"{path}.{k}" if path else str(k)
                if SECRET_KEY.search(str(k)):
                    found.append(f"{redact(p)}: {CREDENTIALS_HELP}")
                elif isinstance(k, str) and USERINFO.search(k):
                    found.append(f"{redact(p)}: a key holds a URI with credentials; remove them")
                else:
                    children.append((p, v))
            stack.extend(reversed(children))
        elif isinstance(node, list):
            stack.extend((f"{path}[{i}]", v) for i, v in reversed(list(enumerate(node))))
        elif isinstance(node, str) and USERINFO.search(node):
            found.append(
                f"{redact(path) or '(spec)'}: credentials in a URI are refused "
                f"(got {_fmt_value(node)}); set {_credentials_hint(path, node)} in the environment"
            )
    return found


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise SpecError(f"--set {redact(text)}: expected dotted.path=value")
    path, raw = text.split("=", 1)
    keys = path.strip().split(".")
    if not all(keys):
        raise SpecError(f"--set {redact(text)}: expected dotted.path=value")
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
                raise SpecError(
                    f"{'.'.join(keys[: i + 1])}: is not a section (got {_fmt_value(child)})"
                )
            node = child
        node[keys[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{path}: no such spec file")
    if p.stat().st_size > MAX_SPEC_BYTES:
        raise SpecError(
            f"{path}: {p.stat().st_size:,} bytes; a spec file may hold at most {MAX_SPEC_BYTES:,}"
        )
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except RecursionError:
        raise SpecError(f"{path}: nested too deeply to read") from None
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
    """The validated spec; refused first: documents too large once aliases are expanded,
    credentials (by key name or by value), renamed keys. Every caller (files, `--set`, sweep
    values, `submit`, `render`) comes through here."""
    _measure(data)
    problems = _find_secrets(data) + _find_renamed(data)
    if problems:
        raise SpecError(problems)
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
    for field in ("train", "val", "dense_probe", "zero_shot_seg"):
        uri = getattr(spec.data, field)
        if uri is None or "://" in uri:
            continue
        if any(c in uri for c in "*?["):
            import glob

            if not glob.glob(uri, recursive=True):
                problems.append(f"data.{field}: no files match (got {uri!r})")
        elif not Path(uri).exists():
            problems.append(f"data.{field}: no such file or directory (got {uri!r})")
        elif field == "dense_probe":  # the probe fits on train/, scores on dense_probe_split/
            for split in ("train", spec.data.dense_probe_split):
                path = f"{uri.rstrip('/')}/{split}"
                if not Path(path).exists():  # worded as service.storage.resolve_source words it
                    problems.append(
                        f"data.dense_probe ({split}/): no such file or directory {path!r}"
                    )
    if problems:
        raise SpecError(problems)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a job spec, the `sweep:` section's included; every field described."""
    from .sweep_spec import SweepSection  # sweep_spec imports this module

    schema = JobSpec.model_json_schema()
    sweep = SweepSection.model_json_schema(ref_template="#/$defs/{model}")
    schema["$defs"].update(sweep.pop("$defs", {}))
    schema["$defs"]["SweepSection"] = sweep
    described = schema["properties"]["sweep"]
    schema["properties"]["sweep"] = {
        "anyOf": [{"$ref": "#/$defs/SweepSection"}, {"type": "null"}],
        "default": None,
        "description": described["description"],
    }
    return schema
