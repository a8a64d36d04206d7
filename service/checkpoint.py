"""What a checkpoint holds, and how to write and read one.

A checkpoint directory:
    state.pt        student, EMA teacher, optimiser, scheduler, step, epoch, RNG states
    tokenizer.json  the BPE tokenizer (a reloaded model tokenizes prompts exactly as in training)
    job.yaml        the resolved job spec
    meta.json       step, MLflow run id, model config — written LAST: a directory without it is
                    an interrupted write and is never loaded
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maskclip import MaskCLIPTask, ModelConfig
from maskclip.config import DistillConfig, TextConfig, VisionConfig
from maskclip.tokenizer import Tokenizer

from .errors import CheckpointError

FORMAT = 1
META = "meta.json"


def rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save(
    directory: str | Path,
    task: MaskCLIPTask,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    step: int,
    epoch: int,
    tokenizer_json: str,
    spec_yaml: str,
    mlflow_run_id: str | None,
    extra: dict[str, Any] | None = None,
) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {
        "student": task.student.state_dict(),
        "teacher": task.teacher.state_dict() if task.teacher is not None else None,
        "proto_loss": task.proto_loss.state_dict() if task.proto_loss is not None else None,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": step,
        "epoch": epoch,
        "momentum": task.momentum,
        "rng": rng_state(),
    }
    torch.save(state, d / "state.pt")
    (d / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    (d / "job.yaml").write_text(spec_yaml, encoding="utf-8")
    meta = {
        "format": FORMAT,
        "step": step,
        "epoch": epoch,
        "mlflow_run_id": mlflow_run_id,
        "model_config": dataclasses.asdict(task.cfg),
        "special_ids": list(task.special_ids),
        "mask_id": task.mask_id,
        **(extra or {}),
    }
    (d / META).write_text(json.dumps(meta, indent=1), encoding="utf-8")  # last: marks complete
    return d


def read_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / META
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a complete checkpoint (no {META})")
    return json.loads(path.read_text(encoding="utf-8"))


def restore(
    directory: str | Path,
    task: MaskCLIPTask,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
) -> dict[str, Any]:
    """Load a checkpoint into live objects; returns its meta (step, epoch, mlflow run id)."""
    meta = read_meta(directory)
    state = torch.load(Path(directory) / "state.pt", map_location="cpu", weights_only=False)
    task.student.load_state_dict(state["student"])
    if task.teacher is not None and state["teacher"] is not None:
        task.teacher.load_state_dict(state["teacher"])
    if task.proto_loss is not None and state["proto_loss"] is not None:
        task.proto_loss.load_state_dict(state["proto_loss"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    task.momentum = state["momentum"]
    set_rng_state(state["rng"])
    return meta


def model_config_from_dict(d: dict[str, Any]) -> ModelConfig:
    return ModelConfig(
        embed_dim=d["embed_dim"],
        vision=VisionConfig(**d["vision"]),
        text=TextConfig(**d["text"]),
        distill=DistillConfig(**d["distill"]),
        contrastive_weight=d["contrastive_weight"],
        logit_scale_init=d["logit_scale_init"],
        logit_scale_max=d["logit_scale_max"],
    )


def load_for_eval(directory: str | Path) -> tuple[MaskCLIPTask, Tokenizer, dict[str, Any]]:
    """A trained task (student + teacher) and its tokenizer, ready for evaluation."""
    meta = read_meta(directory)
    tok = Tokenizer.from_json((Path(directory) / "tokenizer.json").read_text(encoding="utf-8"))
    cfg = model_config_from_dict(meta["model_config"])
    task = MaskCLIPTask(cfg, tuple(meta["special_ids"]), meta["mask_id"], pad_id=tok.pad_id)
    state = torch.load(Path(directory) / "state.pt", map_location="cpu", weights_only=False)
    task.student.load_state_dict(state["student"])
    task.eval()
    return task, tok, meta


def find_latest(storage_path: str, run_name: str, filesystem=None) -> tuple[str, dict] | None:
    """The newest complete checkpoint (has meta.json) of a run under Ray's storage layout
    `<storage_path>/<run_name>/checkpoint_*`; local or any pyarrow filesystem."""
    import pyarrow.fs as pafs

    fs = filesystem or pafs.LocalFileSystem()
    base = f"{storage_path.rstrip('/')}/{run_name}"
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True, recursive=False))
    except OSError:
        return None
    best = None
    for info in infos:
        if info.type != pafs.FileType.Directory or "checkpoint" not in info.base_name:
            continue
        try:
            with fs.open_input_stream(f"{info.path}/{META}") as f:
                meta = json.loads(f.read().decode("utf-8"))
        except (OSError, ValueError):
            continue  # interrupted write: never picked
        if best is None or meta["step"] > best[1]["step"]:
            best = (info.path, meta)
    return best


def read_text(path: str, name: str, filesystem=None) -> str:
    import pyarrow.fs as pafs

    fs = filesystem or pafs.LocalFileSystem()
    with fs.open_input_stream(f"{path}/{name}") as f:
        return f.read().decode("utf-8")


class local_copy:
    """`with local_copy(path, fs) as d:` a local directory holding the checkpoint at `path`
    (the path itself when local; a temporary download from S3 otherwise)."""

    def __init__(self, path: str, filesystem=None):
        self.path, self.fs, self._tmp = path, filesystem, None

    def __enter__(self) -> str:
        if self.fs is None:
            return self.path
        import tempfile

        import pyarrow.fs as pafs

        self._tmp = tempfile.TemporaryDirectory()
        pafs.copy_files(
            self.path,
            self._tmp.name,
            source_filesystem=self.fs,
            destination_filesystem=pafs.LocalFileSystem(),
        )
        return self._tmp.name

    def __exit__(self, *exc) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
