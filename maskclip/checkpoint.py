"""The one model and checkpoint format: safetensors for tensors, JSON for everything else.

A folder holds a model (what `maskclip eval`, the MLflow model artifact and `load` use) and,
for a resume checkpoint, the training state too. Nothing is ever read with pickle, so opening a
folder someone else wrote (a shared S3 prefix, an MLflow artifact) cannot run code.

    model.safetensors      the student's weights (MaskCLIP: both towers, decoders, logit scale)
    tokenizer.json         the tokenizer (prompts tokenize exactly as in training)
    training.safetensors   resume only: EMA teacher, iBOT centre, optimiser tensors, torch/numpy RNG
    training.json          resume only: step, epoch, EMA momentum, optimiser groups, scheduler, RNG
    <extra files>          text the caller adds (the service writes its resolved job.yaml)
    meta.json              written LAST: format, model config, token ids, step, caller's fields,
                           and every other file's size and SHA-256 — a folder without it, or whose
                           files do not match it, is incomplete and never loaded

    save(d, task, tokenizer_json, step=..., optimizer=opt, scheduler=sched, extra_meta={...})
    model, tokenizer, meta = load(d)                 # rebuilt from meta.json's config alone
    meta = restore(d, task, optimizer, scheduler)    # resume: every tensor and RNG stream
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import DistillConfig, ModelConfig, TextConfig, VisionConfig

if TYPE_CHECKING:
    import torch

    from .tokenizer import Tokenizer

# torch, numpy and safetensors are imported where used: finding a run's checkpoints and reading
# meta.json (`maskclip validate`, the cluster commands) must not pay for importing torch.

FORMAT = "maskclip/2"
META = "meta.json"
MODEL = "model.safetensors"
TOKENIZER = "tokenizer.json"
TRAINING = "training.safetensors"
TRAINING_JSON = "training.json"
PICKLE_FILES = ("state.pt", "student.pt")
"""The first format's pickles: recognised to give a clear error, never opened."""


class FormatError(ValueError):
    """A folder that is not a complete checkpoint of this format (one line, names the folder)."""


class IncompleteError(FormatError):
    """A file meta.json lists is missing or differs from it: a torn write (e.g. a crash while
    the folder was being copied to storage), not a foreign or corrupt checkpoint."""


# ---------------------------------------------------------------- model config


def config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """ModelConfig from its dict; unknown keys (a newer writer) are an error, missing ones take
    today's defaults."""
    nested = {"vision": VisionConfig, "text": TextConfig, "distill": DistillConfig}
    kwargs = {k: nested[k](**v) if k in nested else v for k, v in d.items()}
    return ModelConfig(**kwargs)


# ---------------------------------------------------------------- state <-> tensors + JSON


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    import torch

    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict] = {}
    for pid, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{pid}.{name}"] = value
            else:
                plain.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "plain": plain}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], info: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    for pid, entries in info["plain"].items():
        state.setdefault(int(pid), {}).update(entries)
    groups = [  # JSON has no tuples; torch's optimisers write betas as one
        {k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in info["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    import numpy as np
    import torch

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors = {
        "rng.torch": torch.get_rng_state(),
        "rng.numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
    }
    py = random.getstate()
    plain = {
        "numpy": [kind, int(pos), int(has_gauss), float(gauss)],
        "python": [py[0], list(py[1]), py[2]],
    }
    return tensors, plain


def _set_rng_state(tensors: dict[str, torch.Tensor], plain: dict) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(tensors["rng.torch"])
    kind, pos, has_gauss, gauss = plain["numpy"]
    keys = tensors["rng.numpy"].numpy().astype(np.uint32)
    np.random.set_state((kind, keys, pos, has_gauss, gauss))
    version, internal, gauss_next = plain["python"]
    random.setstate((version, tuple(internal), gauss_next))


def _prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().cpu().contiguous() for k, v in state.items()}


def _strip(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    cut = len(prefix) + 1
    return {k[cut:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory: save each one as its own copy."""
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        v = v.detach().cpu()
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        out[k] = v.clone().contiguous() if ptr in seen else v.contiguous()
        seen.add(ptr)
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- writing


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """safetensors bytes written by Python, so that a full disk or a quota is an OSError with
    its errno (safetensors' own writer reports it as a SafetensorError message)."""
    from safetensors.torch import save

    data = save(tensors, metadata={"format": FORMAT})
    with open(path, "wb") as f:
        f.write(data)


def save(
    directory: str | os.PathLike,
    task,
    tokenizer_json: str,
    *,
    step: int = 0,
    epoch: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    training_state: bool = True,
    extra_files: dict[str, str] | None = None,
    extra_meta: dict[str, Any] | None = None,
) -> Path:
    """Write `task` (a MaskCLIPTask) to `directory`; meta.json last.

    `training_state=False` writes the model only (an MLflow model or an export)."""

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    _write_tensors(d / MODEL, _unshared(task.student.state_dict()))
    (d / TOKENIZER).write_text(tokenizer_json, encoding="utf-8")
    if training_state:
        tensors: dict[str, torch.Tensor] = {}
        info: dict[str, Any] = {"step": step, "epoch": epoch, "momentum": task.momentum}
        if task.teacher is not None:
            tensors.update(_prefixed("teacher", _unshared(task.teacher.state_dict())))
        if task.proto_loss is not None:
            tensors.update(_prefixed("proto_loss", task.proto_loss.state_dict()))
        if optimizer is not None:
            opt_tensors, info["optimizer"] = _flatten_optimizer(optimizer.state_dict())
            tensors.update({k: v.detach().cpu().contiguous() for k, v in opt_tensors.items()})
        if scheduler is not None:
            info["scheduler"] = scheduler.state_dict()
        rng_tensors, info["rng"] = _rng_state()
        tensors.update(rng_tensors)
        _write_tensors(d / TRAINING, tensors)
        (d / TRAINING_JSON).write_text(json.dumps(info), encoding="utf-8")
    for name, text in (extra_files or {}).items():
        (d / name).write_text(text, encoding="utf-8")
    names = [MODEL, TOKENIZER, *(extra_files or {})]
    if training_state:
        names += [TRAINING, TRAINING_JSON]
    meta = {
        "format": FORMAT,
        "step": step,
        "epoch": epoch,
        "model_config": config_to_dict(task.cfg),
        "special_ids": list(task.special_ids),
        "mask_id": task.mask_id,
        "training_state": training_state,
        **(extra_meta or {}),
        "files": {n: {"size": (d / n).stat().st_size, "sha256": _sha256(d / n)} for n in names},
    }
    tmp = d / f".{META}.tmp"
    tmp.write_text(json.dumps(meta, indent=1), encoding="utf-8")
    os.replace(tmp, d / META)  # last, atomically: marks the folder complete
    return d


# ---------------------------------------------------------------- reading


def read_meta(directory: str | os.PathLike, *, verify: bool = True) -> dict[str, Any]:
    """meta.json of a complete checkpoint of this format; FormatError (one line) otherwise.

    With `verify`, every file meta.json lists must be there with its size and SHA-256."""
    d = Path(directory)
    path = d / META
    if not path.is_file():
        old = [n for n in PICKLE_FILES if (d / n).is_file()]
        if old:
            raise FormatError(
                f"{d}: {old[0]} is the first checkpoint format (a pickle) and is never loaded, "
                "since a pickle can run code; retrain, or export it with the version that wrote it"
            )
        raise FormatError(f"{d}: not a complete checkpoint (no {META})")
    meta = _read_json(path)
    if meta.get("format") != FORMAT:
        old = meta.get("format")
        hint = (
            "the first format stored pickles (state.pt), which are never loaded since a pickle "
            "can run code; retrain, or export it with the version that wrote it"
            if old == 1
            else f"this version reads {FORMAT!r}"
        )
        raise FormatError(f"{d}: checkpoint format {old!r} is not supported ({hint})")
    if verify:
        for name, want in (meta.get("files") or {}).items():
            f = d / name
            if not f.is_file():
                raise IncompleteError(f"{d}: incomplete checkpoint: {name} is missing")
            if f.stat().st_size != want["size"] or _sha256(f) != want["sha256"]:
                raise IncompleteError(f"{d}: incomplete checkpoint: {name} does not match {META}")
    return meta


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:  # UnicodeDecodeError is a ValueError
        raise FormatError(f"{path}: not a readable JSON file ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path}: not a JSON object")
    return data


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FormatError(f"{path}: not a readable safetensors file ({first})") from None


def check(directory: str | os.PathLike) -> dict[str, Any]:
    """Everything a loader will read is there, matches meta.json and parses (safetensors
    headers, JSON, the tokenizer), without building a model; returns meta. For a caller that
    must refuse a checkpoint before starting work on it (the service's resume)."""
    from safetensors import SafetensorError, safe_open

    d = Path(directory)
    meta = read_meta(d)
    names = [MODEL] + ([TRAINING] if meta.get("training_state") else [])
    for name in names:
        try:
            with safe_open(str(d / name), framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise FormatError(f"{d / name}: not a readable safetensors file ({first})") from None
    if meta.get("training_state"):
        _read_json(d / TRAINING_JSON)
    _read_tokenizer(d)
    return meta


def _read_tokenizer(d: Path) -> Tokenizer:
    from .tokenizer import Tokenizer

    try:
        return Tokenizer.from_json((d / TOKENIZER).read_text(encoding="utf-8"))
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises its own types
        raise FormatError(f"{d}: unreadable {TOKENIZER} ({type(e).__name__})") from None


def build_task(meta: dict[str, Any], tokenizer: Tokenizer):
    from .task import MaskCLIPTask

    cfg = config_from_dict(meta["model_config"])
    return MaskCLIPTask(cfg, tuple(meta["special_ids"]), meta["mask_id"], pad_id=tokenizer.pad_id)


def load(directory: str | os.PathLike):
    """(student MaskCLIP in eval mode, Tokenizer, meta) from a folder, rebuilt from meta.json's
    model config alone (no job spec needed)."""
    from .towers import MaskCLIP

    d = Path(directory)
    meta = check(d)  # the whole folder is sound, training state included, or nothing loads
    tok = _read_tokenizer(d)
    model = MaskCLIP(config_from_dict(meta["model_config"]), pad_id=tok.pad_id)
    _load_state(model, _load_tensors(d / MODEL), d / MODEL)
    return model.eval(), tok, meta


def _load_state(module: torch.nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise FormatError(f"{where}: weights do not fit the saved config ({first})") from None


def restore(directory: str | os.PathLike, task, optimizer=None, scheduler=None) -> dict[str, Any]:
    """Load a resume checkpoint into live objects (student, teacher, optimiser, scheduler, EMA
    momentum, RNG streams); returns its meta (step, epoch, the caller's fields)."""
    d = Path(directory)
    meta = read_meta(d)
    if not meta.get("training_state"):
        raise FormatError(f"{d}: a model without training state cannot be resumed")
    _load_state(task.student, _load_tensors(d / MODEL), d / MODEL)
    tensors = _load_tensors(d / TRAINING)
    info = _read_json(d / TRAINING_JSON)
    if task.teacher is not None:
        _load_state(task.teacher, _strip("teacher", tensors), d / TRAINING)
    if task.proto_loss is not None:
        _load_state(task.proto_loss, _strip("proto_loss", tensors), d / TRAINING)
    if optimizer is not None and "optimizer" in info:
        optimizer.load_state_dict(_unflatten_optimizer(tensors, info["optimizer"]))
    if scheduler is not None and "scheduler" in info:
        scheduler.load_state_dict(info["scheduler"])
    task.momentum = info["momentum"]
    _set_rng_state(tensors, info["rng"])
    return meta
