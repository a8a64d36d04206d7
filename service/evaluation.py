"""Evaluate a trained checkpoint: zero-shot, retrieval and linear probe on Parquet datasets.

No Ray: Parquet is read with pyarrow in bounded batches, images are decoded with
`maskclip.transforms.eval_transform`, the student encodes them on the GPU when there is one.

    result = evaluate("runs/checkpoints/quickstart", zero_shot="data/shapes/val",
                      retrieval="data/shapes/val", linear_probe="data/fmnist")
    result["metrics"]   # {"zero_shot_top1": ..., "image_to_text_R@1": ..., "linear_probe_top1": ...}

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

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from .errors import UserError

RETRIEVAL_ROWS = 5000
"""Default cap on retrieval pairs (the similarity matrix is N x N)."""
EVALUATED_CHECKPOINT_TAG = "maskclip.evaluated_checkpoint"
MODEL_FILES = ("student.pt", "tokenizer.json", "job.yaml")
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
    if (d / "meta.json").is_file():
        return "checkpoint"
    if all((d / name).is_file() for name in MODEL_FILES):
        return "model"
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
    if (d / "state.pt").is_file():
        raise UserError(
            f"{ref}: an interrupted checkpoint write (no meta.json); use an earlier one"
        )
    if (d / "job.yaml").is_file():  # a run's output folder (runs/<name>): follow its storage
        spec = _load_job_spec((d / "job.yaml").read_text(encoding="utf-8"), ref)
        storage = spec.storage_path().rstrip("/") + "/" + spec.run.name
        return _resolve_storage(storage, ref, endpoint_url or spec.storage.endpoint_url)
    raise UserError(f"{ref}: not a checkpoint, run folder or model folder")


def _s3_fs(endpoint_url: str | None) -> pafs.FileSystem:
    from .data import s3_filesystem
    from .spec import StorageSection

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


def _resolve(
    ref: str, endpoint_url: str | None = None, tracking_uri: str | None = None
) -> Resolved:
    ref = str(ref).strip()
    if not ref:
        raise UserError("checkpoint reference is empty")
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
        raise UserError(f"{ref}: unsupported scheme (use a path, s3://, runs:/<id> or a run id)")
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


def load_model_folder(directory: str | Path):
    """A `model/` artifact folder (student.pt, tokenizer.json, job.yaml, no meta.json) ->
    (student MaskCLIP in eval mode, tokenizer, spec); the config is rebuilt from job.yaml."""
    from maskclip.tokenizer import Tokenizer
    from maskclip.towers import MaskCLIP

    d = Path(directory)
    tok = Tokenizer.from_json((d / "tokenizer.json").read_text(encoding="utf-8"))
    spec = _load_job_spec((d / "job.yaml").read_text(encoding="utf-8"), str(d))
    model = MaskCLIP(spec.model_config_for(tok.vocab_size), pad_id=tok.pad_id)
    model.load_state_dict(torch.load(d / "student.pt", map_location="cpu", weights_only=True))
    model.eval()
    return model, tok, spec


def load(resolved: Resolved) -> Loaded:
    from . import checkpoint as ckpt

    d = Path(resolved.path)
    try:
        if resolved.kind == "checkpoint":
            task, tok, meta = ckpt.load_for_eval(d)
            spec = None
            if (d / "job.yaml").is_file():
                spec = _load_job_spec((d / "job.yaml").read_text(encoding="utf-8"), str(d))
            return Loaded(
                task.student,
                tok,
                meta.get("step"),
                meta.get("mlflow_run_id") or resolved.mlflow_run_id,
                spec,
            )
        model, tok, spec = load_model_folder(d)
        return Loaded(model, tok, None, resolved.mlflow_run_id, spec)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - corrupt / mismatched files: one line, exit 2
        raise UserError(
            f"{resolved.source}: cannot load ({type(e).__name__}: {_first_line(e)})"
        ) from None


# ---------------------------------------------------------------- data and features


@dataclass
class Features:
    images: torch.Tensor  # [N, D] normalised
    texts: torch.Tensor | None  # [N, D] normalised (captions), when asked for
    labels: list[str] | None
    bad: int = 0
    captions: list[str] | None = None  # when texts were asked for

    def caption_ids(self) -> list[int]:
        """Equal ids for identical caption strings (several true matches in retrieval)."""
        index: dict[str, int] = {}
        return [index.setdefault(c, len(index)) for c in self.captions or []]


def _join(uri: str, name: str) -> str:
    return uri.rstrip("/") + "/" + name


@torch.no_grad()
def encode_parquet(
    model,
    tokenizer,
    uri: str,
    *,
    device: torch.device,
    need_text: bool = False,
    need_labels: bool = False,
    max_rows: int | None = None,
    batch_size: int = 256,
    endpoint_url: str | None = None,
    field: str = "data",
    image_column: str = "jpg",
    caption_column: str = "caption",
    label_column: str = "label",
) -> Features:
    """Encode the first `max_rows` usable rows of Parquet shards; unusable rows are skipped."""
    from maskclip.transforms import ImageDecodeError, decode_image, eval_transform

    from .data import resolve_source
    from .spec import StorageSection

    paths, fs = resolve_source(uri, StorageSection(endpoint_url=endpoint_url), field)
    transform = eval_transform(model.cfg.vision.image_size)
    columns = [image_column]
    if need_text:
        columns.append(caption_column)
    if need_labels:
        columns.append(label_column)
    img_out: list[torch.Tensor] = []
    txt_out: list[torch.Tensor] = []
    captions: list[str] = []
    labels: list[str] = []
    pending_img: list[torch.Tensor] = []
    pending_txt: list[str] = []
    n = bad = 0

    def flush() -> None:
        if not pending_img:
            return
        x = torch.stack(pending_img).to(device)
        img_out.append(model.encode_image(x).float().cpu())
        if need_text:
            tokens = tokenizer.encode(pending_txt).to(device)
            txt_out.append(model.encode_text(tokens).float().cpu())
        pending_img.clear()
        pending_txt.clear()

    for path in paths:
        if max_rows is not None and n >= max_rows:
            break
        where = f"s3://{path}" if isinstance(fs, pafs.S3FileSystem) else path
        try:
            pf = pq.ParquetFile(path, filesystem=fs)
            names = pf.schema_arrow.names
            missing = [c for c in columns if c not in names]
            if missing:
                raise UserError(
                    f"{field}: column {missing[0]!r} not found in {where} "
                    f"(columns: {', '.join(names)})"
                )
            batches = pf.iter_batches(batch_size=batch_size, columns=columns)
            for rb in batches:
                cols = {c: rb.column(c).to_pylist() for c in columns}
                for i in range(rb.num_rows):
                    if max_rows is not None and n >= max_rows:
                        break
                    caption = cols[caption_column][i] if need_text else None
                    label = cols[label_column][i] if need_labels else None
                    if (need_text and not caption) or (need_labels and label is None):
                        bad += 1
                        continue
                    try:
                        img = transform(decode_image(cols[image_column][i]))
                    except (ImageDecodeError, TypeError, ValueError):
                        bad += 1
                        continue
                    pending_img.append(img)
                    if need_text:
                        pending_txt.append(str(caption))
                        captions.append(str(caption))
                    if need_labels:
                        labels.append(str(label))
                    n += 1
                    if len(pending_img) >= batch_size:
                        flush()
        except UserError:
            raise
        except (OSError, pa.ArrowInvalid) as e:
            raise UserError(f"{field}: cannot read {where}: {_first_line(e)}") from None
    flush()
    if n == 0:
        raise UserError(f"{field}: no usable rows in {uri} ({bad} skipped)")
    if bad:
        _warn(f"{field}: skipped {bad} unusable row(s) in {uri}")
    return Features(
        torch.cat(img_out),
        torch.cat(txt_out) if need_text else None,
        labels if need_labels else None,
        bad,
        captions if need_text else None,
    )


def read_templates(path: str | None) -> list[str]:
    """Prompt templates: maskclip.synthetic.prompt_templates(), or a file with one template per
    line, each with one `{}` for the class name (blank lines and # comments skipped)."""
    if path is None:
        from maskclip.synthetic import prompt_templates

        return prompt_templates()
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--templates {path}: no such file")
    out = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        t = line.strip()
        if not t or t.startswith("#"):
            continue
        try:
            ok = t.count("{}") == 1 and t.format("x") != t
        except (IndexError, KeyError, ValueError):
            ok = False
        if not ok:
            raise UserError(
                f"--templates {path} line {i}: needs exactly one {{}} placeholder (got {t!r})"
            )
        out.append(t)
    if not out:
        raise UserError(f"--templates {path}: no templates in the file")
    return out


# ---------------------------------------------------------------- the evaluations


def _device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _zero_shot(model, tok, feats: Features, templates: list[str], device) -> dict:
    from maskclip.evaluate import confusion_matrix, zero_shot_accuracy, zero_shot_classifier

    names = sorted(set(feats.labels or []))
    index = {c: i for i, c in enumerate(names)}
    y = torch.tensor([index[c] for c in feats.labels], dtype=torch.long)
    clf = zero_shot_classifier(
        lambda t: model.encode_text(t.to(device)).float().cpu(), tok, names, templates
    )
    acc = zero_shot_accuracy(feats.images, clf, y)
    pred = (feats.images @ clf.T).argmax(dim=1)
    cm = confusion_matrix(pred, y, len(names))
    return {
        "metrics": {f"zero_shot_{k}": v for k, v in acc.items()},
        "class_names": names,
        "confusion_matrix": cm.tolist(),
    }


def _linear_probe(train: Features, test: Features) -> float:
    from maskclip.evaluate import linear_probe

    names = sorted(set(train.labels or []) | set(test.labels or []))
    if len(set(train.labels or [])) < 2:
        raise UserError("linear probe: the train split needs at least two classes")
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


def evaluate(
    ref: str,
    zero_shot: str | None = None,
    retrieval: str | None = None,
    linear_probe: str | None = None,
    templates: str | list[str] | None = None,
    batch_size: int = 256,
    max_rows: int | None = None,
    *,
    probe_rows: int | None = None,
    endpoint_url: str | None = None,
    tracking_uri: str | None = None,
    log_mlflow: bool = True,
    device: str | None = None,
) -> dict:
    """Evaluate the checkpoint `ref` (see `resolve_checkpoint`) and return
    {"checkpoint": {...}, "metrics": {...}, "rows": {...}, "zero_shot": {...}, "mlflow": {...}}.

    zero_shot: Parquet data with a label column: top-1/top-5 over its class names, confusion
    matrix. retrieval: image<->caption R@1/5/10 on the first max_rows pairs (default 5000).
    linear_probe: a root with train/ and test/ splits (both labelled): test top-1 of a logistic
    regression on train features (train capped at `probe_rows`, test at `max_rows`).
    `max_rows` caps every split (default: all rows; retrieval 5000).
    """
    if not (zero_shot or retrieval or linear_probe):
        raise UserError("nothing to evaluate: give zero_shot, retrieval and/or linear_probe data")
    if batch_size < 1 or (max_rows is not None and max_rows < 1):
        raise UserError("batch_size and max_rows must be positive")
    prompt_list = list(templates) if isinstance(templates, list) else read_templates(templates)
    resolved = _resolve(ref, endpoint_url, tracking_uri)
    loaded = load(resolved)
    dev = _device(device)
    model = loaded.model.to(dev).eval()
    tok = loaded.tokenizer
    common = dict(device=dev, batch_size=batch_size, endpoint_url=endpoint_url)
    metrics: dict[str, float] = {}
    rows: dict[str, int] = {}
    result: dict[str, Any] = {
        "checkpoint": {
            "ref": ref,
            "path": resolved.path,
            "kind": resolved.kind,
            "step": loaded.step,
            "mlflow_run_id": loaded.mlflow_run_id,
            "run_name": loaded.spec.run.name if loaded.spec else None,
        },
        "data": {"zero_shot": zero_shot, "retrieval": retrieval, "linear_probe": linear_probe},
        "metrics": metrics,
        "rows": rows,
    }

    retrieval_cap = max_rows or RETRIEVAL_ROWS
    shared = None
    if zero_shot and retrieval and zero_shot.rstrip("/") == retrieval.rstrip("/"):
        cap = None if max_rows is None else max_rows  # zero-shot wants all rows unless capped
        shared = encode_parquet(
            model,
            tok,
            zero_shot,
            need_text=True,
            need_labels=True,
            max_rows=cap,
            field="zero-shot",
            **common,
        )
    if zero_shot:
        feats = shared or encode_parquet(
            model, tok, zero_shot, need_labels=True, max_rows=max_rows, field="zero-shot", **common
        )
        zs = _zero_shot(model, tok, feats, prompt_list, dev)
        metrics.update(zs.pop("metrics"))
        rows["zero_shot"] = len(feats.labels)
        result["zero_shot"] = {**zs, "templates": prompt_list}
    if retrieval:
        if shared is not None:
            cap = retrieval_cap
            feats = Features(
                shared.images[:cap], shared.texts[:cap], None, 0, shared.captions[:cap]
            )
        else:
            feats = encode_parquet(
                model,
                tok,
                retrieval,
                need_text=True,
                max_rows=retrieval_cap,
                field="retrieval",
                **common,
            )
        from maskclip.evaluate import retrieval_recall

        metrics.update(retrieval_recall(feats.images, feats.texts, caption_ids=feats.caption_ids()))
        rows["retrieval"] = feats.images.shape[0]
    if linear_probe:
        train_cap = probe_rows or max_rows
        train = encode_parquet(
            model,
            tok,
            _join(linear_probe, "train"),
            need_labels=True,
            max_rows=train_cap,
            field="linear-probe train",
            **common,
        )
        test = encode_parquet(
            model,
            tok,
            _join(linear_probe, "test"),
            need_labels=True,
            max_rows=max_rows,
            field="linear-probe test",
            **common,
        )
        metrics["linear_probe_top1"] = _linear_probe(train, test)
        rows["linear_probe_train"] = len(train.labels)
        rows["linear_probe_test"] = len(test.labels)

    result["mlflow"] = {"uri": None, "run_id": None, "logged": False}
    if log_mlflow:
        result["mlflow"] = log_results(result, resolved, loaded, tracking_uri)
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


def confusion_figure(class_names: list[str], matrix, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cm = np.asarray(matrix)
    n = len(class_names)
    size = max(4.0, 0.5 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), class_names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("zero-shot confusion matrix")
    if n <= 20:
        top = cm.max() if cm.size else 0
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    str(cm[i, j]),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if cm[i, j] > top / 2 else "black",
                )
    fig.colorbar(im, ax=ax, shrink=0.7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def log_results(result: dict, resolved: Resolved, loaded: Loaded, tracking_uri: str | None) -> dict:
    """Log metrics (prefixed eval_), the confusion figure and the result JSON; never raises."""
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
                confusion_figure(zs["class_names"], zs["confusion_matrix"], fig)
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
