"""The one evaluation path: zero-shot, retrieval and linear probe on Parquet datasets.

`evaluate_model(model, tokenizer, ...)` is called by in-loop validation (`validate`, on the live
student, metrics prefixed `val_`) and by `maskclip eval` (`evaluate`, after loading a checkpoint;
`eval_` in MLflow): the same rows (service.rows), caption grouping, row cap (MAX_ROWS) and
prompt templates (maskclip.templates, from the spec's `data.templates`) give the same numbers.
No Ray: Parquet is read with pyarrow (service.storage) in bounded batches, images go through
`maskclip.transforms.eval_transform`, the student encodes them on the GPU when there is one.

    result = evaluate("runs/checkpoints/quickstart", zero_shot="data/shapes/val",
                      retrieval="data/shapes/val", linear_probe="data/fmnist")
    result["metrics"]   # {"zero_shot_top1": ..., "image_to_text_R1": ..., "linear_probe_top1": ...}

What can be evaluated (`resolve_checkpoint`):
    runs/checkpoints/<run>/checkpoint_000003   a checkpoint folder (state.pt + meta.json ...)
    runs/checkpoints/<run>                     a run folder: its newest complete checkpoint
    runs/<run>                                 a run's output folder (its job.yaml names the storage)
    s3://bucket/prefix/<run>[/checkpoint_*]    the same on S3 (downloaded to a temp folder)
    runs:/<run id>[/model]  or a 32-hex id     an MLflow run's `model/` artifacts (student.pt,
                                               tokenizer.json, job.yaml), else its checkpoints
    .../model                                  a downloaded `model/` artifact folder

Metrics are logged to MLflow (guarded: a server that does not answer costs one warning): into the
evaluated run when the checkpoint names one that exists there, else into a new eval run tagged
`maskclip.evaluated_checkpoint`.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch

from .errors import DataError, UserError

EVALUATED_CHECKPOINT_TAG = "maskclip.evaluated_checkpoint"
MODEL_FILES = ("meta.json",)
"""A checkpoint and a `model/` artifact are one format (maskclip.checkpoint): meta.json marks it."""
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_CHECKPOINT_PREFIX = "checkpoint"


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else type(e).__name__


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- resolving a reference


@dataclass
class Resolved:
    """A reference turned into a local folder: a checkpoint (`kind` "checkpoint", has meta.json)
    or a `model/` artifact folder (`kind` "model": student.pt + tokenizer.json + job.yaml)."""

    path: str
    kind: str
    source: str
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None


def _temp_dir() -> str:
    d = tempfile.mkdtemp(prefix="maskclip-eval-")
    atexit.register(shutil.rmtree, d, True)
    return d


def _local_kind(d: Path) -> str | None:
    """ "checkpoint" (with training state) or "model" for a folder of the one format; the first
    format's pickles count as a checkpoint too, so that loading it gives its one-line error."""
    from maskclip import checkpoint as fmt

    if (d / fmt.META).is_file():
        try:
            training = json.loads((d / fmt.META).read_text(encoding="utf-8")).get("training_state")
        except (ValueError, AttributeError):
            training = True  # unreadable: the loader says so in one line
        return "checkpoint" if training is not False else "model"
    if any((d / name).is_file() for name in fmt.PICKLE_FILES):
        return "checkpoint"
    return None


def _newest(base: str, fs: pafs.FileSystem) -> str | None:
    """The newest complete checkpoint_* folder (by meta.json step) directly under `base`."""
    from .checkpoint import find_latest

    parent, _, name = base.rstrip("/").rpartition("/")
    found = find_latest(parent or "/", name, fs)
    return found[0] if found else None


def _has_checkpoint_dirs(d: Path) -> bool:
    return any(p.is_dir() and p.name.startswith(_CHECKPOINT_PREFIX) for p in d.iterdir())


def _load_job_spec(text: str, where: str):
    import yaml

    from .spec import JobSpec

    try:
        # not spec.build_spec: its credential scan flags the dumped `data.tokenizer_captions`
        return JobSpec.model_validate(yaml.safe_load(text))
    except Exception as e:  # noqa: BLE001 - any problem: the folder is not a usable run
        raise UserError(f"{where}: unreadable job spec: {_first_line(e)}") from None


def _resolve_storage(storage: str, ref: str, endpoint_url: str | None) -> Resolved:
    """A run's checkpoints under `storage` (local folder or s3://bucket/prefix/<run>)."""
    if storage.startswith("s3://"):
        return _resolve_s3(storage, endpoint_url, ref)
    d = Path(storage)
    if d.is_dir():
        newest = _newest(str(d.resolve()), pafs.LocalFileSystem())
        if newest:
            return Resolved(newest, "checkpoint", ref)
    raise UserError(f"{ref}: no complete checkpoint in {storage}")


def _resolve_local(ref: str, endpoint_url: str | None) -> Resolved:
    d = Path(ref).expanduser()
    if d.is_file():
        d = d.parent  # e.g. .../checkpoint_000001/meta.json
    kind = _local_kind(d)
    if kind:
        return Resolved(str(d.resolve()), kind, ref)
    if (d / "model").is_dir() and _local_kind(d / "model") == "model":  # downloaded artifacts
        return Resolved(str((d / "model").resolve()), "model", ref)
    if _has_checkpoint_dirs(d):
        newest = _newest(str(d.resolve()), pafs.LocalFileSystem())
        if newest is None:
            raise UserError(f"{ref}: no complete checkpoint (every checkpoint_* lacks meta.json)")
        return Resolved(newest, "checkpoint", ref)
    if (d / "job.yaml").is_file():  # a run's output folder (runs/<name>): follow its storage
        spec = _load_job_spec((d / "job.yaml").read_text(encoding="utf-8"), ref)
        storage = spec.storage_path().rstrip("/") + "/" + spec.run.name
        return _resolve_storage(storage, ref, endpoint_url or spec.storage.endpoint_url)
    raise UserError(f"{ref}: not a checkpoint, run folder or model folder")


def _s3_fs(endpoint_url: str | None) -> pafs.FileSystem:
    from .spec import StorageSection
    from .storage import s3_filesystem

    return s3_filesystem(StorageSection(endpoint_url=endpoint_url))


def _download(fs: pafs.FileSystem, path: str, ref: str) -> str:
    dest = _temp_dir()
    try:
        pafs.copy_files(
            path, dest, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
        )
    except OSError as e:
        raise UserError(f"{ref}: download failed: {_first_line(e)}") from None
    return dest


def _resolve_s3(uri: str, endpoint_url: str | None, ref: str | None = None) -> Resolved:
    ref = ref or uri
    path = uri[len("s3://") :].strip("/")
    if not path:
        raise UserError(f"{ref}: no bucket (expected s3://bucket/prefix)")
    fs = _s3_fs(endpoint_url)
    try:
        if fs.get_file_info(f"{path}/meta.json").type == pafs.FileType.File:
            return Resolved(_download(fs, path, ref), "checkpoint", ref)
        newest = _newest(path, fs)
        if newest:
            return Resolved(_download(fs, newest, ref), "checkpoint", ref)
        infos = fs.get_file_info([f"{path}/{n}" for n in MODEL_FILES])
        if all(i.type == pafs.FileType.File for i in infos):
            return Resolved(_download(fs, path, ref), "model", ref)
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            raise UserError(f"{ref}: nothing at this S3 location")
    except UserError:
        raise
    except OSError as e:
        raise UserError(f"{ref}: cannot read from S3: {_first_line(e)}") from None
    raise UserError(f"{ref}: not a checkpoint, run folder or model folder")


def default_tracking_uri(explicit: str | None = None) -> str | None:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else the local default store if it exists."""
    if explicit:
        return explicit
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    local = Path("runs") / "mlflow.db"
    return f"sqlite:///{local.resolve()}" if local.is_file() else None


def _resolve_mlflow(
    run_id: str, artifact_path: str, ref: str, tracking_uri: str | None, endpoint_url: str | None
) -> Resolved:
    uri = default_tracking_uri(tracking_uri)
    if uri is None:
        raise UserError(f"{ref}: an MLflow run id needs MLFLOW_TRACKING_URI or --tracking-uri")
    from .tracking import _client

    try:
        run = _client(uri).get_run(run_id)
    except Exception as e:  # noqa: BLE001 - missing run or server down: a bad reference either way
        raise UserError(f"{ref}: no such MLflow run at {uri} ({_first_line(e)})") from None
    try:
        import mlflow.artifacts

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        dest = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=artifact_path, dst_path=_temp_dir(), tracking_uri=uri
        )
        if _local_kind(Path(dest)) == "model":
            return Resolved(dest, "model", ref, run_id, uri)
        if _local_kind(Path(dest)) == "checkpoint":
            return Resolved(dest, "checkpoint", ref, run_id, uri)
    except Exception:  # noqa: BLE001 - no model artifacts (e.g. a stopped run): try checkpoints
        pass
    params = run.data.params
    name = params.get("run.name")
    if name:
        storage = params.get("checkpoint.storage_path") or str(
            Path(params.get("run.output_dir") or "runs").resolve() / "checkpoints"
        )
        try:
            found = _resolve_storage(f"{storage.rstrip('/')}/{name}", ref, endpoint_url)
            return Resolved(found.path, found.kind, ref, run_id, uri)
        except UserError:
            pass
    raise UserError(f"{ref}: MLflow run has no '{artifact_path}' artifacts and no checkpoint found")


def _version_model_id(version) -> str | None:
    """The logged model behind a registry version (its model_id, or a models:/<id> source)."""
    source = version.source or ""
    return version.model_id or (
        source[len("models:/") :] if source.startswith("models:/") else None
    )


def _resolve_registered(ref: str, tracking_uri: str | None) -> Resolved:
    """models:/<name>@<alias>, models:/<name>/<version> or models:/<logged model id>: the
    checkpoint folder inside the MLflow model (service.tracking.save_pyfunc's
    artifacts/checkpoint)."""
    uri = default_tracking_uri(tracking_uri)
    if uri is None:
        raise UserError(f"{ref}: an MLflow model needs MLFLOW_TRACKING_URI or --tracking-uri")
    from .tracking import _client

    client = _client(uri)
    body = ref[len("models:/") :].strip("/")
    try:
        if "@" in body:
            name, alias = body.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
            model_id, run_id = _version_model_id(version), version.run_id
        elif "/" in body:
            name, number = body.split("/", 1)
            version = client.get_model_version(name, number)
            model_id, run_id = _version_model_id(version), version.run_id
        else:
            model_id = body
            run_id = client.get_logged_model(model_id).source_run_id
    except Exception as e:  # noqa: BLE001 - unknown name/alias/id or server down
        raise UserError(
            f"{ref}: no such registered model, alias or version at {uri} ({_first_line(e)})"
        ) from None
    if not model_id:
        raise UserError(f"{ref}: this model version has no logged model to download")
    try:
        import mlflow.artifacts

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        dest = mlflow.artifacts.download_artifacts(
            f"models:/{model_id}", dst_path=_temp_dir(), tracking_uri=uri
        )
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{ref}: cannot download the model ({_first_line(e)})") from None
    folder = Path(dest) / "artifacts" / "checkpoint"
    kind = _local_kind(folder) if folder.is_dir() else None
    if kind is None:
        raise UserError(f"{ref}: not a maskclip model (no artifacts/checkpoint folder)")
    return Resolved(str(folder), kind, ref, run_id, uri)


def _resolve(
    ref: str, endpoint_url: str | None = None, tracking_uri: str | None = None
) -> Resolved:
    ref = str(ref).strip()
    if not ref:
        raise UserError("checkpoint reference is empty")
    if ref.startswith("models:/"):
        return _resolve_registered(ref, tracking_uri)
    if ref.startswith("runs:/"):
        parts = ref[len("runs:/") :].strip("/").split("/", 1)
        if not parts[0]:
            raise UserError(f"{ref}: expected runs:/<run id>[/artifact path]")
        artifact = parts[1] if len(parts) > 1 and parts[1] else "model"
        return _resolve_mlflow(parts[0], artifact, ref, tracking_uri, endpoint_url)
    if ref.startswith("s3://"):
        return _resolve_s3(ref, endpoint_url)
    if ref.startswith("file://"):
        ref = ref[len("file://") :]
    elif "://" in ref:
        raise UserError(
            f"{ref}: unsupported scheme "
            "(use a path, s3://, runs:/<id>, models:/<name>@<alias> or a run id)"
        )
    if Path(ref).expanduser().exists():
        return _resolve_local(ref, endpoint_url)
    if _RUN_ID.match(ref):
        return _resolve_mlflow(ref, "model", ref, tracking_uri, endpoint_url)
    raise UserError(f"{ref}: no such checkpoint, run folder or MLflow run id")


def resolve_checkpoint(
    ref: str, endpoint_url: str | None = None, tracking_uri: str | None = None
) -> str:
    """A local folder holding the referenced checkpoint (or `model/` artifacts); remote ones are
    downloaded to a temporary folder removed at exit. Raises UserError on a bad reference."""
    return _resolve(ref, endpoint_url, tracking_uri).path


# ---------------------------------------------------------------- loading


@dataclass
class Loaded:
    model: Any  # maskclip.towers.MaskCLIP (the student), eval mode
    tokenizer: Any
    step: int | None
    mlflow_run_id: str | None
    spec: Any | None  # service.spec.JobSpec, when the folder has job.yaml
    info: dict = field(default_factory=dict)


def load(resolved: Resolved) -> Loaded:
    """The model of a checkpoint or `model/` folder, rebuilt from its own meta.json (no spec
    needed); CheckpointError (one line) on anything unreadable. Nothing is unpickled."""
    from . import checkpoint as ckpt

    d = Path(resolved.path)
    model, tok, meta = ckpt.load_model(d)
    spec = None
    if (d / ckpt.SPEC_FILE).is_file():  # only for the run's name and MLflow store
        try:
            spec = _load_job_spec((d / ckpt.SPEC_FILE).read_text(encoding="utf-8"), str(d))
        except (UserError, ValueError) as e:  # another version's spec: the model needs none
            _warn(f"{d / ckpt.SPEC_FILE}: unreadable ({type(e).__name__}); evaluating without it")
    run_id = meta.get("mlflow_run_id") or resolved.mlflow_run_id
    return Loaded(model, tok, meta.get("step"), run_id, spec)


# ---------------------------------------------------------------- the one evaluation path

MAX_ROWS = 5000
"""Default cap on every split's rows, for in-loop validation and `maskclip eval` alike: the first
5,000 usable rows (retrieval compares N images with up to N distinct captions)."""
BATCH_SIZE = 256


@dataclass(frozen=True)
class Columns:
    """Where the data is in the Parquet rows, and the row rules' limits (`data.*` of a spec)."""

    image: str = "jpg"
    caption: str = "caption"
    label: str = "label"
    max_caption_chars: int | None = 1000
    max_image_pixels: int = 64_000_000

    @classmethod
    def of(cls, data, label_column: str | None = None) -> Columns:
        """From a spec's DataSection (None: the defaults); `label_column` overrides its own."""
        if data is None:
            return cls(label=label_column) if label_column else cls()
        return cls(
            data.image_column,
            data.caption_column,
            label_column or data.label_column,
            data.max_caption_chars,
            data.max_image_pixels,
        )


@dataclass
class Features:
    """The usable rows of one source, encoded: image features, plus captions' text features
    and/or labels when asked for; `skipped` counts the bad rows by reason (service.rows)."""

    images: torch.Tensor  # [N, D] normalised
    texts: torch.Tensor | None = None  # [N, D] normalised
    captions: list[str] | None = None
    labels: list[str] | None = None
    skipped: dict[str, int] = field(default_factory=dict)

    def caption_ids(self) -> list[int]:
        """Equal ids for identical caption strings (several true matches in retrieval)."""
        index: dict[str, int] = {}
        return [index.setdefault(c, len(index)) for c in self.captions or []]


@dataclass
class Evaluation:
    """What `evaluate_model` measured: metrics (unprefixed), rows used per evaluation, bad rows
    skipped per source, and the zero-shot details (class names, templates, confusion matrix)."""

    metrics: dict[str, float] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, dict[str, int]] = field(default_factory=dict)
    zero_shot: dict | None = None
    dense: dict | None = None
    """Dense details: the class names, per task its per-class IoU and pixel confusion matrix."""
    examples: list[dict] = field(default_factory=list)
    """For the figures (not JSON): per test source, {"title", "images" [k, 3, H, W] normalised,
    "target" [k, H, W], "preds" {task: [k, H, W]}, "classes"}."""


def _join(uri: str, name: str) -> str:
    return uri.rstrip("/") + "/" + name


def _source(data, field: str, storage, endpoint_url: str | None):
    from .storage import Source, resolve_source

    if isinstance(data, Source):
        return data
    return resolve_source(str(data), storage, field, endpoint_url=endpoint_url)


def encode_source(
    model,
    tokenizer,
    source,
    *,
    columns: Columns,
    captions: bool,
    labels: bool,
    max_rows: int | None,
    batch_size: int,
    device: torch.device,
) -> Features:
    """Encode the first `max_rows` usable rows of a `service.storage.Source`, in file order.
    A row is usable when every column asked for passes `service.rows` (a null label is a bad
    row, never a class named ""); bad rows are skipped and counted by reason."""
    from maskclip.evaluate import encode_features
    from maskclip.transforms import eval_transform

    from .rows import STATUS_COLUMN, clean_row, not_downloaded

    transform = eval_transform(model.cfg.vision.image_size)
    names = [columns.image]
    names += [columns.caption] if captions else []
    names += [columns.label] if labels else []
    source.require(names)
    status = STATUS_COLUMN if STATUS_COLUMN in source.columns else None  # img2dataset output
    read = names + ([status] if status else [])
    kept_captions: list[str] = []
    kept_labels: list[str] = []
    skipped: dict[str, int] = {}

    def image_batches():
        pending: list[torch.Tensor] = []
        n = 0
        for rb in source.iter_batches(read, batch_size):
            cols = {c: rb.column(c).to_pylist() for c in read}
            for i in range(rb.num_rows):
                if status and not_downloaded(cols[status][i], cols[columns.image][i]):
                    continue  # a failed download is not data: neither used nor a bad row
                row, why = clean_row(
                    cols[columns.image][i],
                    cols[columns.caption][i] if captions else None,
                    cols[columns.label][i] if labels else None,
                    max_pixels=columns.max_image_pixels,
                    max_caption_chars=columns.max_caption_chars,
                    transform=transform,
                    need_caption=captions,
                    need_label=labels,
                )
                if why is not None:
                    skipped[why] = skipped.get(why, 0) + 1
                    continue
                pending.append(row.image)
                if captions:
                    kept_captions.append(row.caption)
                if labels:
                    kept_labels.append(row.label)
                n += 1
                if len(pending) == batch_size or n == max_rows:
                    yield {"image": torch.stack(pending)}
                    pending = []
                if n == max_rows:
                    return
        if pending:
            yield {"image": torch.stack(pending)}

    images = encode_features(model, image_batches(), device)["image"]
    if images is None:
        bad = sum(skipped.values())
        why = ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())) or "no rows"
        raise DataError(f"{source.field}: no usable rows in {source.uri} ({bad} skipped: {why})")
    if skipped:
        _warn(f"{source.field}: skipped {sum(skipped.values())} unusable row(s) in {source.uri}")
    texts = None
    if captions:
        chunks = (
            {"tokens": tokenizer.encode(kept_captions[i : i + batch_size])}
            for i in range(0, len(kept_captions), batch_size)
        )
        texts = encode_features(model, chunks, device)["text"]
    return Features(
        images,
        texts,
        kept_captions if captions else None,
        kept_labels if labels else None,
        skipped,
    )


def _zero_shot(model, tok, feats: Features, templates: list[str], device) -> dict:
    from maskclip.evaluate import confusion_matrix, zero_shot_accuracy, zero_shot_classifier

    names = sorted(set(feats.labels or []))
    index = {c: i for i, c in enumerate(names)}
    y = torch.tensor([index[c] for c in feats.labels], dtype=torch.long)
    clf = zero_shot_classifier(
        lambda t: model.encode_text(t).float().cpu(), tok, names, templates, device
    )
    acc = zero_shot_accuracy(feats.images, clf, y)
    pred = (feats.images @ clf.T).argmax(dim=1)
    cm = confusion_matrix(pred, y, len(names))
    return {
        "metrics": {f"zero_shot_{k}": v for k, v in acc.items()},
        "class_names": names,
        "templates": templates,
        "confusion_matrix": cm.tolist(),
        "predicted": cm.sum(axis=0).tolist(),  # how often each class was predicted
    }


def _linear_probe(train: Features, test: Features) -> float:
    from maskclip.evaluate import linear_probe

    names = sorted(set(train.labels or []) | set(test.labels or []))
    if len(set(train.labels or [])) < 2:
        raise DataError("linear probe: the train split needs at least two classes")
    index = {c: i for i, c in enumerate(names)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning on tiny/odd sets
        out = linear_probe(
            train.images.numpy(),
            [index[c] for c in train.labels],
            test.images.numpy(),
            [index[c] for c in test.labels],
        )
    return out["top1"]


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


# ---------------------------------------------------------------- dense (per-pixel) evaluation

DENSE_BASELINES = ("pixels", "random")
"""Baselines the dense probe can report beside the model: "pixels" (the probe on each patch's
raw pixels, flattened) and "random" (the probe on a freshly initialised model of the same
config, seed RANDOM_INIT_SEED)."""
RANDOM_INIT_SEED = 0
EXAMPLES = 4
"""Test images shown in the dense figures."""
_R_MISSING_MASK = "missing mask"


def read_classes(source) -> list[str]:
    """The class names of a dense-labelled source: `classes.txt` beside its shards (the folder
    or prefix the source lists). One-line DataError naming the folder when it is missing or
    unreadable."""
    from maskclip.dense import CLASSES_FILE, MaskError, parse_classes

    path = f"{source.root.rstrip('/')}/{CLASSES_FILE}"
    try:
        with source.filesystem.open_input_stream(path) as f:
            text = f.read().decode("utf-8")
    except FileNotFoundError:
        raise DataError(
            f"{source.field}: no {CLASSES_FILE} in {source.display(source.root)} (a dense-labelled "
            f"folder names its classes there, line i = class i)"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(
            f"{source.field}: cannot read {source.display(path)}: {_first_line(e)}"
        ) from None
    try:
        return parse_classes(text)
    except MaskError as e:
        raise DataError(f"{source.field}: {source.display(path)}: {e}") from None


@dataclass
class DenseSplit:
    """The usable rows of a dense-labelled source, encoded: per-patch features by name
    ("tokens": the model's final-layer patch tokens; baselines: "pixels", "random"), each
    [N, gh, gw, D]; the masks [N, H, W] uint8 with the image transform's geometry; the first
    EXAMPLES transformed images (for the figure); the class names; bad rows skipped by reason."""

    classes: list[str]
    features: dict[str, torch.Tensor]
    masks: torch.Tensor
    images: torch.Tensor
    skipped: dict[str, int] = field(default_factory=dict)


def random_init_like(model, seed: int = RANDOM_INIT_SEED):
    """A freshly initialised student of `model`'s config (the random-init baseline), built under
    `seed` without touching the global RNG, on `model`'s device, in eval mode."""
    from maskclip.towers import MaskCLIP

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = MaskCLIP(model.cfg, pad_id=model.text.pad_id)
    return fresh.to(_model_device(model)).eval()


def encode_dense_source(
    model,
    source,
    *,
    columns: Columns,
    max_rows: int | None,
    batch_size: int,
    device: torch.device,
    baselines: tuple[str, ...] = (),
    blocks: int | None = None,
    project: bool = False,
    classes: list[str] | None = None,
) -> DenseSplit:
    """Encode the first `max_rows` usable rows of a dense-labelled `service.storage.Source`
    (image + `mask` column, `classes.txt` beside the shards), in file order.

    Each mask is decoded and checked against its image (maskclip.dense.decode_mask: the image's
    size, indices below the class count or IGNORE); a mask that breaks the format stops the
    evaluation with a one-line DataError naming the file and row (its `key` when the shards
    have one). The image goes through `maskclip.transforms.eval_transform` and the mask through
    the same call (torchvision resizes a Mask nearest-neighbour, with the same resize and
    centre-crop geometry). Bad images are skipped and counted (service.rows), as are null masks.
    `project`: also the tokens projected into the joint space ("projected", one trunk pass for
    both); `baselines`: also the DENSE_BASELINES named; `blocks`: the probe's tokens (model
    and random init) after that many transformer blocks (MaskCLIP.encode_patches), the
    projected ones always final.
    """
    from torchvision import tv_tensors

    from maskclip.dense import MASK_COLUMN, MaskError, decode_mask
    from maskclip.evaluate import patch_pixels
    from maskclip.transforms import eval_transform

    from .rows import R_TRANSFORM, STATUS_COLUMN, clean_row, not_downloaded

    source.require([columns.image, MASK_COLUMN])
    names = classes if classes is not None else read_classes(source)
    transform = eval_transform(model.cfg.vision.image_size)
    status = STATUS_COLUMN if STATUS_COLUMN in source.columns else None
    key = "key" if "key" in source.columns else None
    read = [columns.image, MASK_COLUMN] + [c for c in (status, key) if c]

    def model_features(x):
        t = model.encode_patches(x, blocks=blocks)
        if not project:
            return {"tokens": t}
        final = t if blocks is None else model.encode_patches(x)
        return {"tokens": t, "projected": model.project_patches(final)}

    encoders = {"model": model_features}
    if "pixels" in baselines:
        patch = model.cfg.vision.patch_size
        encoders["pixels"] = lambda x: {"pixels": patch_pixels(x, patch)}
    if "random" in baselines:
        fresh = random_init_like(model).to(device)
        encoders["random"] = lambda x: {"random": fresh.encode_patches(x, blocks=blocks)}
    feats: dict[str, list[torch.Tensor]] = {}
    masks: list[torch.Tensor] = []
    examples: list[torch.Tensor] = []
    skipped: dict[str, int] = {}
    pending: list[torch.Tensor] = []

    def flush() -> None:
        x = torch.stack(pending).to(device)
        with torch.no_grad():
            for enc in encoders.values():
                for k, v in enc(x).items():
                    feats.setdefault(k, []).append(v.float().cpu())
        pending.clear()

    n = 0
    for path in source.paths:
        row_in_file = 0
        for rb in source.iter_file(path, read, batch_size):
            cols = {c: rb.column(c).to_pylist() for c in read}
            for i in range(rb.num_rows):
                where = f"row {row_in_file}" + (f" (key {cols[key][i]!r})" if key else "")
                row_in_file += 1
                if status and not_downloaded(cols[status][i], cols[columns.image][i]):
                    continue
                row, why = clean_row(
                    cols[columns.image][i],
                    max_pixels=columns.max_image_pixels,
                    max_caption_chars=None,
                    need_caption=False,
                )
                if why is None and cols[MASK_COLUMN][i] is None:
                    why = _R_MISSING_MASK
                if why is not None:
                    skipped[why] = skipped.get(why, 0) + 1
                    continue
                try:
                    mask = decode_mask(cols[MASK_COLUMN][i], row.image.size, len(names))
                except MaskError as e:
                    raise DataError(
                        f"{source.field}: {source.display(path)} {where}: {e}"
                    ) from None
                try:
                    image, m = transform((row.image, tv_tensors.Mask(torch.tensor(mask))))
                except Exception:  # noqa: BLE001 - as service.rows: a failed transform is a bad row
                    skipped[R_TRANSFORM] = skipped.get(R_TRANSFORM, 0) + 1
                    continue
                image = image.as_subclass(torch.Tensor)
                pending.append(image)
                masks.append(m.as_subclass(torch.Tensor))
                if len(examples) < EXAMPLES:
                    examples.append(image)
                n += 1
                if len(pending) == batch_size:
                    flush()
                if n == max_rows:
                    break
            if n == max_rows:
                break
        if n == max_rows:
            break
    if pending:
        flush()
    if not masks:
        bad = sum(skipped.values())
        why = ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())) or "no rows"
        raise DataError(f"{source.field}: no usable rows in {source.uri} ({bad} skipped: {why})")
    if skipped:
        _warn(f"{source.field}: skipped {sum(skipped.values())} unusable row(s) in {source.uri}")
    return DenseSplit(
        names,
        {k: torch.cat(v) for k, v in feats.items()},
        torch.stack(masks),
        torch.stack(examples),
        skipped,
    )


def _split_or_test(uri, storage, endpoint_url: str | None):
    """--zero-shot-seg DIR: DIR/test when DIR has a test/ folder (a dataset root), else DIR."""
    from .storage import Source, split_uri

    if isinstance(uri, Source):
        return uri
    try:
        fs, path = split_uri(str(uri), storage, endpoint_url=endpoint_url, field="zero-shot seg")
        if fs.get_file_info(path.rstrip("/") + "/test").type == pafs.FileType.Directory:
            return _join(str(uri), "test")
    except (UserError, OSError):
        pass  # resolve_source says what is wrong with it
    return uri


def dense_sources(spec) -> dict:
    """The dense folders in-loop validation will read, resolved now: data.dense_probe's train/
    and its data.dense_probe_split folder, data.zero_shot_seg (its test/ when it is a root),
    each listed (service.storage.resolve_source) and checked to hold the image and `mask`
    columns and a classes.txt. `maskclip run` and `maskclip sweep` call this before Ray starts,
    so a missing folder is one line (`data.dense_probe (val/): no such file or directory ...`,
    a DataError, exit 2), not a worker's failure at the first validation. {label: Source}."""
    from maskclip.dense import MASK_COLUMN

    from .storage import resolve_source

    d = spec.data
    wanted: dict[str, str] = {}
    if d.dense_probe:
        for split in ("train", d.dense_probe_split):
            wanted[f"data.dense_probe ({split}/)"] = _join(d.dense_probe, split)
    if d.zero_shot_seg:
        seg = _split_or_test(d.zero_shot_seg, spec.storage, None)
        label = "data.zero_shot_seg" if seg == d.zero_shot_seg else "data.zero_shot_seg (test/)"
        wanted[label] = seg
    found = {}
    for label, uri in wanted.items():
        source = resolve_source(uri, spec.storage, label)
        source.require([d.image_column, MASK_COLUMN])
        read_classes(source)
        found[label] = source
    return found


def _segmentation_details(out: dict, classes: list[str]) -> dict:
    """The JSON-able part of a dense result: per-class IoU (None where absent) and the
    confusion matrix."""
    return {
        "iou": {c: (None if v != v else v) for c, v in zip(classes, out["iou"])},
        "confusion_matrix": out["confusion_matrix"].tolist(),
    }


def _dense_probe(train: DenseSplit, test: DenseSplit) -> dict:
    """dense_probe on each feature kind of the two splits -> {kind: maskclip result}."""
    from maskclip.evaluate import dense_probe

    if train.classes != test.classes:
        raise DataError(
            f"dense-probe: train and test list different classes in their classes.txt "
            f"({len(train.classes)}: {', '.join(train.classes[:5])}... vs "
            f"{len(test.classes)}: {', '.join(test.classes[:5])}...)"
        )
    return {
        kind: dense_probe(
            train.features[kind],
            train.masks,
            test.features[kind],
            test.masks,
            len(train.classes),
            keep=EXAMPLES,
        )
        for kind in ("tokens", *DENSE_BASELINES)
        if kind in train.features
    }


def _zero_shot_seg(model, tok, split: DenseSplit, templates: list[str], device) -> dict:
    from maskclip.evaluate import zero_shot_classifier, zero_shot_segmentation

    clf = zero_shot_classifier(
        lambda t: model.encode_text(t).float().cpu(), tok, split.classes, templates, device
    )
    return zero_shot_segmentation(split.features["projected"], clf, split.masks, keep=EXAMPLES)


def evaluate_model(
    model,
    tokenizer,
    *,
    zero_shot=None,
    retrieval=None,
    linear_probe: str | None = None,
    dense_probe=None,
    dense_probe_split: str = "test",
    zero_shot_seg=None,
    dense_baselines: tuple[str, ...] | list[str] = (),
    dense_blocks: int | None = None,
    templates: str | list[str] = "default",
    max_rows: int | None = MAX_ROWS,
    probe_rows: int | None = None,
    batch_size: int = BATCH_SIZE,
    device: torch.device | str | None = None,
    columns: Columns | None = None,
    storage=None,
    endpoint_url: str | None = None,
) -> Evaluation:
    """The one evaluation: `maskclip eval` and in-loop validation both call this.

    zero_shot: labelled data (a URI or a resolved `service.storage.Source`): top-1/top-5 over
    its own class names with `templates` (a set name of `maskclip.templates` or a list).
    retrieval: image<->caption R@1/5/10, identical caption strings counted as one candidate.
    When both name the same source it is read once and both use the same rows (image, caption
    and label all usable). linear_probe: a root with train/ and test/ (labelled): test top-1 of
    a logistic regression on train features (train capped at `probe_rows`, default `max_rows`).
    `max_rows` caps every split (default MAX_ROWS; None: all rows). The model is evaluated in
    eval mode, on `device` (default: where it is), and put back in the mode it was in.

    dense_probe: a dense-labelled root (maskclip.dense: `mask` column, classes.txt beside the
    shards) with train/ and `dense_probe_split`/ (default test/; in-loop validation passes
    data.dense_probe_split): `maskclip.evaluate.dense_probe` fitted on the final-layer patch
    tokens of train/ (capped like the linear probe), scored on the split -> dense_probe_miou,
    dense_probe_pixel_accuracy; rows dense_probe_train and dense_probe_<split>.
    dense_baselines ("pixels", "random"): the same probe on patch pixels / on a random-init model
    of the same config -> dense_probe_pixels_miou, ..., dense_probe_random_pixel_accuracy.
    zero_shot_seg: a dense-labelled split folder, or a root whose test/ is used: patch tokens
    projected into the joint space matched to the class prompts (`templates`) ->
    zero_shot_seg_miou, zero_shot_seg_pixel_accuracy.
    """
    if not (zero_shot or retrieval or linear_probe or dense_probe or zero_shot_seg):
        raise UserError(
            "nothing to evaluate: give zero_shot, retrieval, linear_probe, dense_probe "
            "and/or zero_shot_seg data"
        )
    if batch_size < 1 or (max_rows is not None and max_rows < 1):
        raise UserError("batch_size and max_rows must be positive")
    baselines = tuple(dict.fromkeys(dense_baselines))
    depth = len(model.visual.trunk.blocks)
    if dense_blocks is not None and not (-depth < dense_blocks <= depth and dense_blocks):
        raise UserError(
            f"dense blocks {dense_blocks}: the image tower has {depth} blocks "
            f"(1..{depth}, or -1..-{depth - 1} for all but the last few)"
        )
    unknown = [b for b in baselines if b not in DENSE_BASELINES]
    if unknown:
        raise UserError(f"dense baseline {unknown[0]!r}: choose from {', '.join(DENSE_BASELINES)}")
    if baselines and not dense_probe:
        raise UserError("dense baselines are dense-probe numbers: give dense_probe data too")
    if dense_probe and dense_probe_split == "train":
        raise UserError(
            "dense probe split 'train': the probe is fitted there; score a held-out one"
        )
    from maskclip.templates import templates as template_list

    try:
        prompts = template_list(templates)
    except ValueError as e:
        raise UserError(f"templates: {e}") from None
    columns = columns or Columns()
    dev = torch.device(device) if device is not None else _model_device(model)

    def src(data, field):
        return _source(data, field, storage, endpoint_url)

    def encode(source, *, captions=False, labels=False, cap=max_rows):
        feats = encode_source(
            model,
            tokenizer,
            source,
            columns=columns,
            captions=captions,
            labels=labels,
            max_rows=cap,
            batch_size=batch_size,
            device=dev,
        )
        if feats.skipped:
            out.skipped[source.field] = feats.skipped
        return feats

    out = Evaluation()
    was_training = model.training
    model.eval()
    try:
        zs_src = src(zero_shot, "zero-shot") if zero_shot else None
        same = isinstance(retrieval, str) and retrieval.rstrip("/") == str(zero_shot).rstrip("/")
        rt_src = zs_src if same or retrieval is zero_shot else None
        if retrieval and rt_src is None:
            rt_src = src(retrieval, "retrieval")
        shared = None
        if zs_src is not None and rt_src is zs_src:  # one source: read once, the same rows
            shared = encode(zs_src, captions=True, labels=True)
        if zs_src is not None:
            feats = shared or encode(zs_src, labels=True)
            zs = _zero_shot(model, tokenizer, feats, prompts, dev)
            out.metrics.update(zs.pop("metrics"))
            out.rows["zero_shot"] = len(feats.labels)
            out.zero_shot = zs
        if rt_src is not None:
            from maskclip.evaluate import retrieval_recall

            feats = shared or encode(rt_src, captions=True)
            out.metrics.update(
                retrieval_recall(feats.images, feats.texts, caption_ids=feats.caption_ids())
            )
            out.rows["retrieval"] = feats.images.shape[0]
        if linear_probe:
            train = encode(
                src(_join(linear_probe, "train"), "linear-probe train"),
                labels=True,
                cap=probe_rows or max_rows,
            )
            test = encode(src(_join(linear_probe, "test"), "linear-probe test"), labels=True)
            out.metrics["linear_probe_top1"] = _linear_probe(train, test)
            out.rows["linear_probe_train"] = len(train.labels)
            out.rows["linear_probe_test"] = len(test.labels)
        if dense_probe or zero_shot_seg:
            _evaluate_dense(
                out,
                model,
                tokenizer,
                dense_probe,
                zero_shot_seg,
                baselines,
                prompts,
                src,
                probe_split=dense_probe_split,
                blocks=dense_blocks,
                columns=columns,
                max_rows=max_rows,
                probe_rows=probe_rows,
                batch_size=batch_size,
                device=dev,
                storage=storage,
                endpoint_url=endpoint_url,
            )
    finally:
        model.train(was_training)
    return out


def _evaluate_dense(
    out: Evaluation,
    model,
    tokenizer,
    dense_probe,
    zero_shot_seg,
    baselines: tuple[str, ...],
    prompts: list[str],
    src,
    *,
    probe_split: str = "test",
    blocks: int | None = None,
    columns: Columns,
    max_rows: int | None,
    probe_rows: int | None,
    batch_size: int,
    device: torch.device,
    storage=None,
    endpoint_url: str | None = None,
) -> None:
    """The dense part of `evaluate_model`: fills out.metrics / rows / skipped / dense /
    examples. The probe is fitted on `dense_probe`/train and scored on `dense_probe`/
    `probe_split`; that split is encoded once when the zero-shot seg folder is the same one."""

    def encode(source, cap, **kw) -> DenseSplit:
        split = encode_dense_source(
            model,
            source,
            columns=columns,
            max_rows=cap,
            batch_size=batch_size,
            device=device,
            blocks=blocks,
            **kw,
        )
        if split.skipped:
            out.skipped[source.field] = split.skipped
        return split

    seg_uri = _split_or_test(zero_shot_seg, storage, endpoint_url) if zero_shot_seg else None
    scored = _join(dense_probe, probe_split) if dense_probe else None
    shared = seg_uri is not None and isinstance(seg_uri, str) and scored is not None
    shared = shared and seg_uri.rstrip("/") == scored.rstrip("/")
    details: dict[str, Any] = {}
    examples: dict[str, dict] = {}

    def example(key: str, title: str, split: DenseSplit, task: str, pred) -> None:
        ex = examples.setdefault(
            key,
            {
                "title": title,
                "images": split.images,
                "target": split.masks[: len(split.images)],
                "preds": {},
                "classes": split.classes,
            },
        )
        ex["preds"][task] = pred

    if dense_probe:
        train_src = src(_join(dense_probe, "train"), "dense-probe train")
        test_src = src(scored, f"dense-probe {probe_split}")
        train = encode(train_src, probe_rows or max_rows, baselines=baselines)
        test = encode(test_src, max_rows, baselines=baselines, project=shared)
        results = _dense_probe(train, test)
        for kind, r in results.items():
            name = "dense_probe" if kind == "tokens" else f"dense_probe_{kind}"
            out.metrics[f"{name}_miou"] = r["miou"]
            out.metrics[f"{name}_pixel_accuracy"] = r["pixel_accuracy"]
            details[name] = _segmentation_details(r, test.classes)
            example("dense_probe", test_src.uri, test, name.replace("_", " "), r["pred"])
        details["dense_probe"]["train_patches"] = results["tokens"]["train_patches"]
        details["classes"] = test.classes
        out.rows["dense_probe_train"] = len(train.masks)
        out.rows[f"dense_probe_{probe_split}"] = len(test.masks)
    if zero_shot_seg:
        if shared:
            seg, key = test, "dense_probe"
        else:
            seg_src = src(seg_uri, "zero-shot seg")
            seg, key = encode(seg_src, max_rows, project=True), "zero_shot_seg"
        r = _zero_shot_seg(model, tokenizer, seg, prompts, device)
        out.metrics["zero_shot_seg_miou"] = r["miou"]
        out.metrics["zero_shot_seg_pixel_accuracy"] = r["pixel_accuracy"]
        details["zero_shot_seg"] = _segmentation_details(r, seg.classes)
        details.setdefault("classes", seg.classes)
        if details["classes"] != seg.classes:
            details["zero_shot_seg"]["classes"] = seg.classes
        example(key, (test_src if shared else seg_src).uri, seg, "zero-shot seg", r["pred"])
        out.rows["zero_shot_seg"] = len(seg.masks)
    out.dense = details
    out.examples = list(examples.values())


def validate(spec, model, tokenizer, device=None) -> dict[str, float]:
    """In-loop validation on `data.val` (read with pyarrow, not Ray Data): zero-shot when it has
    the label column, and retrieval, with the spec's templates and columns; plus the dense probe
    on `data.dense_probe` (scored on its `data.dense_probe_split` folder) and zero-shot
    segmentation on `data.zero_shot_seg` when set. The same call as `maskclip eval CKPT
    --zero-shot VAL --retrieval VAL [--dense-probe DIR] [--zero-shot-seg DIR]` on the saved
    model (eval's probe scores DIR/test: the same numbers when dense_probe_split is test).
    Metrics are prefixed `val_` and named as in MLflow and sweep.metric (`val_image_to_text_R1`,
    `val_dense_probe_miou`); {} without any data.
    """
    d = spec.data
    if d.val is None and not (d.dense_probe or d.zero_shot_seg):
        return {}
    source = _source(d.val, "data.val", spec.storage, None) if d.val is not None else None
    has_labels = source is not None and d.label_column in source.columns
    result = evaluate_model(
        model,
        tokenizer,
        zero_shot=source if has_labels else None,
        retrieval=source,
        dense_probe=d.dense_probe,
        dense_probe_split=d.dense_probe_split,
        zero_shot_seg=d.zero_shot_seg,
        templates=d.templates,
        device=device,
        columns=Columns.of(d),
        storage=spec.storage,
    )
    return {f"val_{k}": v for k, v in result.metrics.items()}  # one name in spec, Tune, MLflow


def read_templates(value: str | list[str] | None) -> str | list[str] | None:
    """--templates: a set name of `maskclip.templates`, or a file with one template per line
    (each with one `{}` for the class name; blank lines and # comments skipped). None stays
    None (the checkpoint's `data.templates`, else "default")."""
    from maskclip.templates import TEMPLATE_SETS, check_template

    if value is None or isinstance(value, list) or value in TEMPLATE_SETS:
        return value
    p = Path(value)
    if not p.is_file():
        raise UserError(
            f"--templates {value}: neither a file nor a template set ({', '.join(TEMPLATE_SETS)})"
        )
    out = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        t = line.strip()
        if not t or t.startswith("#"):
            continue
        why = check_template(t)
        if why:
            raise UserError(f"--templates {value} line {i}: {why} (got {t!r})")
        out.append(t)
    if not out:
        raise UserError(f"--templates {value}: no templates in the file")
    return out


def _device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def evaluate(
    ref: str,
    zero_shot: str | None = None,
    retrieval: str | None = None,
    linear_probe: str | None = None,
    templates: str | list[str] | None = None,
    batch_size: int = BATCH_SIZE,
    max_rows: int | None = MAX_ROWS,
    *,
    dense_probe: str | None = None,
    zero_shot_seg: str | None = None,
    dense_baselines: tuple[str, ...] | list[str] = (),
    dense_blocks: int | None = None,
    probe_rows: int | None = None,
    endpoint_url: str | None = None,
    tracking_uri: str | None = None,
    log_mlflow: bool = True,
    device: str | None = None,
    label_column: str | None = None,
) -> dict:
    """Evaluate the checkpoint `ref` (see `resolve_checkpoint`) with `evaluate_model` and return
    {"checkpoint": {...}, "metrics": {...}, "rows": {...}, "zero_shot": {...}, "mlflow": {...}}.

    Columns, row limits and (unless `templates` is given: a set name, a file or a list) the
    prompt templates come from the checkpoint's own spec (`data.*`), as in its in-loop
    validation; without one, the defaults. `label_column` overrides the spec's. The dense
    evaluations (dense_probe, zero_shot_seg, dense_baselines: see `evaluate_model`) add a
    "dense" entry (class names, per-class IoU, confusion matrices) and, in MLflow, a figure of a
    few test images with their ground truth and each prediction.
    """
    if not (zero_shot or retrieval or linear_probe or dense_probe or zero_shot_seg):
        raise UserError(
            "nothing to evaluate: give zero_shot, retrieval, linear_probe, dense_probe "
            "and/or zero_shot_seg data"
        )
    if batch_size < 1 or (max_rows is not None and max_rows < 1):
        raise UserError("batch_size and max_rows must be positive")
    from .terminal import phase

    prompts = read_templates(templates)
    resolved = _resolve(ref, endpoint_url, tracking_uri)
    phase(f"loading {ref}")
    loaded = load(resolved)
    data = loaded.spec.data if loaded.spec is not None else None
    if prompts is None:
        prompts = data.templates if data is not None else "default"
    dev = _device(device)
    cap = "all rows" if max_rows is None else f"at most {max_rows} rows"
    step = "" if loaded.step is None else f" (step {loaded.step})"
    phase(f"encoding on {dev}{step}: {cap} per split, {batch_size} at a time")
    model = loaded.model.to(dev).eval()
    ev = evaluate_model(
        model,
        loaded.tokenizer,
        zero_shot=zero_shot,
        retrieval=retrieval,
        linear_probe=linear_probe,
        dense_probe=dense_probe,
        zero_shot_seg=zero_shot_seg,
        dense_baselines=tuple(dense_baselines),
        dense_blocks=dense_blocks,
        templates=prompts,
        max_rows=max_rows,
        probe_rows=probe_rows,
        batch_size=batch_size,
        device=dev,
        columns=Columns.of(data, label_column),
        endpoint_url=endpoint_url,
    )
    result: dict[str, Any] = {
        "checkpoint": {
            "ref": ref,
            "path": resolved.path,
            "kind": resolved.kind,
            "step": loaded.step,
            "mlflow_run_id": loaded.mlflow_run_id,
            "run_name": loaded.spec.run.name if loaded.spec else None,
        },
        "data": {
            "zero_shot": zero_shot,
            "retrieval": retrieval,
            "linear_probe": linear_probe,
            "dense_probe": dense_probe,
            "zero_shot_seg": zero_shot_seg,
        },
        "metrics": ev.metrics,
        "rows": ev.rows,
        "skipped": ev.skipped,
    }
    if ev.zero_shot is not None:
        result["zero_shot"] = ev.zero_shot
    if ev.dense is not None:
        result["dense"] = {
            **ev.dense,
            "baselines": list(dict.fromkeys(dense_baselines)),
            "blocks": dense_blocks,
        }
    result["mlflow"] = {"uri": None, "run_id": None, "logged": False}
    if log_mlflow:
        result["mlflow"] = log_results(result, resolved, loaded, tracking_uri, ev.examples)
    return result


# ---------------------------------------------------------------- MLflow


def eval_tracking_uri(explicit: str | None, spec) -> str | None:
    """--tracking-uri > $MLFLOW_TRACKING_URI > the spec's tracking URI > its default local store
    (only if that store exists: evaluation never creates a stray database)."""
    if explicit or os.environ.get("MLFLOW_TRACKING_URI"):
        return default_tracking_uri(explicit)
    if spec is not None and spec.tracking.enabled:
        if spec.tracking.tracking_uri:
            return spec.tracking.tracking_uri
        local = Path(spec.run.output_dir) / "mlflow.db"
        if local.is_file():
            return f"sqlite:///{local.resolve()}"
    return default_tracking_uri(None)


def log_results(
    result: dict,
    resolved: Resolved,
    loaded: Loaded,
    tracking_uri: str | None,
    examples: list[dict] | None = None,
) -> dict:
    """Log metrics (prefixed eval_), the confusion figure, the dense figures (`examples`, from
    `Evaluation.examples`: eval/segmentation_<i>.png) and the result JSON; never raises."""
    from .tracking import _client, metric_name

    uri = resolved.tracking_uri if resolved.tracking_uri and not tracking_uri else None
    uri = uri or eval_tracking_uri(tracking_uri, loaded.spec)
    out = {"uri": uri, "run_id": None, "logged": False}
    if uri is None:
        return out
    try:
        import time

        from mlflow.entities import Metric, Param

        client = _client(uri)
        run_id, new_run = loaded.mlflow_run_id, False
        if run_id:
            try:
                client.get_run(run_id)
            except Exception as e:  # noqa: BLE001
                if getattr(e, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                    raise
                run_id = None
        if run_id is None:
            experiment = loaded.spec.tracking.experiment if loaded.spec else "maskclip-eval"
            exp = client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
            name = f"eval-{result['checkpoint']['run_name'] or Path(resolved.path).name}"
            run = client.create_run(
                exp_id,
                run_name=name,
                tags={EVALUATED_CHECKPOINT_TAG: resolved.source, "mlflow.runName": name},
            )
            run_id, new_run = run.info.run_id, True
            params = {f"eval.{k}": str(v) for k, v in result["data"].items() if v}
            params["eval.checkpoint_step"] = str(result["checkpoint"]["step"])
            client.log_batch(run_id, params=[Param(k, v[:500]) for k, v in params.items()])
        else:
            client.set_tag(run_id, EVALUATED_CHECKPOINT_TAG, resolved.source)
        ts = int(time.time() * 1000)
        step = int(result["checkpoint"]["step"] or 0)
        client.log_batch(
            run_id,
            metrics=[
                Metric(f"eval_{metric_name(k)}", float(v), ts, step)
                for k, v in result["metrics"].items()
            ],
        )
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "eval_results.json"), "w", encoding="utf-8") as f:
                json.dump({**result, "mlflow": None}, f, indent=1)
            client.log_artifact(run_id, os.path.join(d, "eval_results.json"), "eval")
            zs = result.get("zero_shot")
            if zs:
                fig = os.path.join(d, "zero_shot_confusion.png")
                from .figures import confusion_figure

                confusion_figure(zs["class_names"], zs["confusion_matrix"], fig)
                client.log_artifact(run_id, fig, "eval")
            for i, ex in enumerate(examples or []):
                from .figures import segmentation_figure

                fig = os.path.join(d, f"segmentation_{i}.png")
                segmentation_figure(
                    ex["images"], ex["target"], ex["preds"], ex["classes"], fig, ex["title"]
                )
                client.log_artifact(run_id, fig, "eval")
        if new_run:
            client.set_terminated(run_id)
        out.update(run_id=run_id, logged=True)
    except Exception as e:  # noqa: BLE001 - tracking never stops the evaluation
        _warn(
            f"MLflow at {uri} unavailable ({type(e).__name__}: {_first_line(e)[:120]}); "
            "results not logged"
        )
    return out
