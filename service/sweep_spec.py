"""The `sweep:` section of a job spec, validated before anything starts.

    sweep:
      parameters:
        model.mask_ratio: {uniform: [0.5, 0.9]}
        optim.lr: {loguniform: [1.0e-4, 3.0e-3]}
        model.masking: {choice: [block, random]}
      search: random            # random | grid | optuna (optuna must be installed)
      scheduler: asha           # none | asha (time attribute: the training step)
      asha: {grace_period: 50, reduction_factor: 2}
      metric: val_zero_shot_top1
      num_samples: 8
      max_concurrent: 1

`validate_sweep(spec)` walks every dotted path through the JobSpec model and builds the spec with
each bound / choice substituted (through the same code as `--set`), so `model.mask_ratio:
{uniform: [0, 1]}` fails now, with one line, rather than in trial 7.
"""

from __future__ import annotations

import copy
import importlib.util
import math
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .spec import RENAMED, JobSpec, SpecError, apply_overrides, build_spec, format_validation_error

PosInt = Annotated[int, Field(gt=0)]

#: Fields a sweep may not vary: they name the trial, its storage or its tracking.
NOT_SWEEPABLE = ("run.name", "run.output_dir", "checkpoint.storage_path", "tracking", "sweep")
#: Metrics every report carries; validation metrics (val_*) need data.val.
TRAIN_METRICS = ("loss",)
VAL_METRICS = (
    "val_zero_shot_top1",
    "val_zero_shot_top5",
    "val_image_to_text_R1",
    "val_image_to_text_R5",
    "val_image_to_text_R10",
    "val_text_to_image_R1",
    "val_text_to_image_R5",
    "val_text_to_image_R10",
    # dense evaluation (service.evaluation): need data.dense_probe / data.zero_shot_seg too
    "val_dense_probe_miou",
    "val_dense_probe_pixel_accuracy",
    "val_zero_shot_seg_miou",
    "val_zero_shot_seg_pixel_accuracy",
)
#: Room for "-<trial id>" ("-a1b2c_00000") in the 63-character run name.
TRIAL_SUFFIX_LEN = 12


class _Strict(BaseModel):
    # use_attribute_docstrings: the docstring under a field is its schema description
    model_config = ConfigDict(extra="forbid", validate_default=True, use_attribute_docstrings=True)


class Distribution(_Strict):
    """Exactly one of uniform / loguniform: [lo, hi], choice / grid: [v1, v2, ...]."""

    uniform: tuple[float, float] | None = None
    """[low, high]: sampled uniformly."""
    loguniform: tuple[float, float] | None = None
    """[low, high] with low > 0: sampled uniformly in log space."""
    choice: list[Any] | None = None
    """Values sampled at random (each trial draws one)."""
    grid: list[Any] | None = None
    """Values each tried in turn (every sample runs the whole grid)."""

    @model_validator(mode="after")
    def _exactly_one(self) -> Distribution:
        set_ = [
            k for k in ("uniform", "loguniform", "choice", "grid") if getattr(self, k) is not None
        ]
        if len(set_) != 1:
            raise ValueError("give exactly one of uniform, loguniform, choice, grid")
        kind = set_[0]
        if kind in ("uniform", "loguniform"):
            lo, hi = getattr(self, kind)
            if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
                raise ValueError(f"{kind} needs [low, high] with low < high")
            if kind == "loguniform" and lo <= 0:
                raise ValueError("loguniform needs a positive low bound")
        elif not getattr(self, kind):
            raise ValueError(f"{kind} needs at least one value")
        return self

    @property
    def kind(self) -> str:
        return next(
            k for k in ("uniform", "loguniform", "choice", "grid") if getattr(self, k) is not None
        )

    def values_to_check(self) -> list[Any]:
        """Bounds of a range, every value of a list: each must make a valid spec."""
        return list(getattr(self, self.kind))

    def describe(self) -> str:
        return f"{self.kind}{list(getattr(self, self.kind))}"


class AshaSection(_Strict):
    grace_period: PosInt | None = None
    """Steps before a trial can be stopped; default checkpoint.every_steps (the first report)."""
    reduction_factor: Annotated[float, Field(gt=1)] = 2
    """At each rung, keep the best 1/reduction_factor of the trials."""
    max_t: PosInt | None = None
    """Default optim.max_steps."""


class TrialResources(_Strict):
    cpu: Annotated[float, Field(gt=0)] = 0.1
    """The trial's own process (it only drives its TorchTrainer); workers take scaling.*."""


class SweepSection(_Strict):
    parameters: dict[str, Distribution]
    """Dotted spec path (e.g. model.mask_ratio) -> the values to try."""
    search: Literal["random", "grid", "optuna"] = "random"
    """How trials pick values: 'random', 'grid' (grid/choice values only) or 'optuna' (TPE)."""
    scheduler: Literal["none", "asha"] = "none"
    """'asha' stops poor trials early at checkpoints; 'none' runs every trial to the end."""
    asha: AshaSection = AshaSection()
    """ASHA settings (scheduler: asha)."""
    metric: str = "val_zero_shot_top1"
    """The reported metric that ranks trials (loss or a val_* metric, which needs data.val)."""
    mode: Literal["max", "min"] | None = None
    """Default: min for loss metrics, max otherwise."""
    num_samples: PosInt | None = None
    """Trials (times the grid's size); default 1 for search: grid, 4 otherwise."""
    max_concurrent: PosInt = 1
    """Trials run at the same time (each takes scaling.num_workers workers)."""
    resources_per_trial: TrialResources = TrialResources()
    """Resources of each trial's driver process."""

    @property
    def resolved_mode(self) -> str:
        return self.mode or ("min" if "loss" in self.metric else "max")

    @property
    def resolved_num_samples(self) -> int:
        return self.num_samples or (1 if self.search == "grid" else 4)


def yaml_value(value: Any) -> str:
    """A value as `--set` text that YAML reads back as the same value (1e-9 stays a float)."""
    text = yaml.safe_dump(value, default_flow_style=True)
    return text.removesuffix("\n...\n").strip()


def override(path: str, value: Any) -> str:
    return f"{path}={yaml_value(value)}"


def _leaf_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation (X, X | None, Annotated[X, ...]), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) is not None:
        for arg in get_args(annotation):
            found = _leaf_model(arg)
            if found is not None:
                return found
    return None


def check_path(path: str) -> str | None:
    """None if `path` names a leaf field of JobSpec, else what is wrong."""
    if path in RENAMED:
        return f"renamed to {RENAMED[path]}"
    parts = path.split(".")
    if not all(parts):
        return "not a dotted field path (e.g. model.mask_ratio)"
    model: type[BaseModel] | None = JobSpec
    for i, part in enumerate(parts):
        if model is None or part not in model.model_fields:
            return "not a field of the job spec"
        model = _leaf_model(model.model_fields[part].annotation)
        if model is not None and i == len(parts) - 1:
            return "is a section, not a field; sweep one of its fields"
    for banned in NOT_SWEEPABLE:
        if path == banned or path.startswith(banned + "."):
            return "cannot be swept (it names the trial, its storage or its tracking)"
    return None


def validate_sweep(spec: JobSpec) -> SweepSection:
    """The spec's sweep section, validated; raises SpecError with one line per problem."""
    if spec.sweep is None:
        raise SpecError("sweep: the spec has no sweep: section (see jobs/sweep.yaml)")
    try:
        sweep = SweepSection.model_validate(spec.sweep)
    except ValidationError as err:
        raise SpecError([f"sweep.{line}" for line in format_validation_error(err)]) from None

    problems: list[str] = []
    if not sweep.parameters:
        problems.append("sweep.parameters: give at least one parameter to sweep")
    if len(spec.run.name) > 63 - TRIAL_SUFFIX_LEN:
        problems.append(
            f"run.name: at most {63 - TRIAL_SUFFIX_LEN} characters for a sweep (trial "
            f"runs are named <run.name>-<trial id>) (got {spec.run.name!r})"
        )
    base = spec.model_dump(mode="json")
    base["sweep"] = None
    for path, dist in sweep.parameters.items():
        where = f"sweep.parameters.{path}"
        wrong = check_path(path)
        if wrong:
            problems.append(f"{where}: {wrong}")
            continue
        if sweep.search == "grid" and dist.kind not in ("grid", "choice"):
            problems.append(f"{where}: search: grid needs grid or choice values, not {dist.kind}")
            continue
        if sweep.search == "optuna" and dist.kind == "grid":
            problems.append(f"{where}: search: optuna cannot take grid values; use choice")
            continue
        for value in dist.values_to_check():
            try:
                build_spec(apply_overrides(copy.deepcopy(base), [override(path, value)]))
            except SpecError as e:
                problems.append(
                    f"{where}: {dist.kind} value {value!r} makes an invalid spec: {e.lines[0]}"
                )
                break

    if sweep.search == "optuna" and importlib.util.find_spec("optuna") is None:
        problems.append(
            "sweep.search: optuna is not installed (pip install optuna); use random or grid"
        )
    metric = sweep.metric
    if metric not in TRAIN_METRICS + VAL_METRICS:
        problems.append(
            f"sweep.metric: not a reported metric; choose one of "
            f"{', '.join(TRAIN_METRICS + VAL_METRICS)} (got {metric!r})"
        )
    elif metric.startswith("val_") and spec.data.val is None:
        problems.append(f"sweep.metric: {metric} needs validation data; set data.val")
    elif metric.startswith("val_dense_probe_") and spec.data.dense_probe is None:
        problems.append(f"sweep.metric: {metric} needs dense data; set data.dense_probe")
    elif metric.startswith("val_dense_probe_") and spec.data.dense_probe_split == "test":
        # the probe's test/ is where the chosen setting is reported: choosing on it is tuning on it
        problems.append(
            f"sweep.metric: {metric} would rank trials on data.dense_probe's test/ split; hold "
            "a split out (maskclip data convert --fashion-mnist --val-rows N writes val/) and "
            "set data.dense_probe_split: val"
        )
    elif metric.startswith("val_zero_shot_seg_") and spec.data.zero_shot_seg is None:
        problems.append(f"sweep.metric: {metric} needs dense data; set data.zero_shot_seg")
    if sweep.scheduler == "asha":
        max_t = sweep.asha.max_t or spec.optim.max_steps
        grace = sweep.asha.grace_period or spec.checkpoint.every_steps
        if max_t is None:
            problems.append("sweep.asha.max_t: required when the budget is optim.epochs")
        elif grace > max_t:
            problems.append(f"sweep.asha.grace_period: must not exceed max_t {max_t} (got {grace})")
        every = spec.checkpoint.every_steps
        if every >= (spec.optim.max_steps or math.inf):
            problems.append(
                "sweep.scheduler: asha decides at checkpoints; set "
                "checkpoint.every_steps below optim.max_steps"
            )
        elif metric.startswith("val_") and (
            not spec.optim.val_every or every % spec.optim.val_every
        ):
            problems.append(
                f"sweep.metric: asha compares {metric} at checkpoints; set optim.val_every to "
                f"checkpoint.every_steps ({every}) or a divisor of it (got {spec.optim.val_every})"
            )
    if problems:
        raise SpecError(problems)
    return sweep
