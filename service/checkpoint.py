"""Checkpoints of a run on its storage: the format is the library's (`maskclip.checkpoint`:
safetensors + JSON, nothing pickled); this module adds what the service keeps beside it and
where a run's checkpoints live.

A checkpoint folder (Ray Train's layout `<storage>/<run name>/checkpoint_*`) holds the library's
files plus `job.yaml` (the resolved spec) and, in meta.json, the MLflow run id. The same folder
minus the training state is the MLflow model artifact and what `maskclip eval` reads.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from maskclip import checkpoint as fmt

from .errors import CheckpointError

META = fmt.META


class TornCheckpoint(CheckpointError):
    """A checkpoint whose files do not match its meta.json (an interrupted copy to storage)."""


SPEC_FILE = "job.yaml"


def save(
    directory: str | Path,
    task,
    optimizer,
    scheduler,
    step: int,
    epoch: int,
    tokenizer_json: str,
    spec_yaml: str,
    mlflow_run_id: str | None,
    *,
    training_state: bool = True,
) -> Path:
    return fmt.save(
        directory,
        task,
        tokenizer_json,
        step=step,
        epoch=epoch,
        optimizer=optimizer,
        scheduler=scheduler,
        training_state=training_state,
        extra_files={SPEC_FILE: spec_yaml},
        extra_meta={"mlflow_run_id": mlflow_run_id},
    )


def read_meta(directory: str | Path) -> dict[str, Any]:
    try:
        return fmt.read_meta(directory)
    except fmt.FormatError as e:
        raise CheckpointError(str(e)) from None


def restore(directory: str | Path, task, optimizer=None, scheduler=None) -> dict[str, Any]:
    """Load a checkpoint into live objects; returns its meta (step, epoch, mlflow run id)."""
    try:
        return fmt.restore(directory, task, optimizer, scheduler)
    except fmt.FormatError as e:
        raise CheckpointError(str(e)) from None


def load_model(directory: str | Path):
    """(student MaskCLIP in eval mode, Tokenizer, meta); CheckpointError (one line) otherwise."""
    try:
        return fmt.load(directory)
    except fmt.FormatError as e:
        raise CheckpointError(str(e)) from None


def find_latest(
    storage_path: str, run_name: str, filesystem=None, *, verify: bool = True
) -> tuple[str, dict] | None:
    """The newest sound checkpoint of a run under Ray's storage layout
    `<storage_path>/<run_name>/checkpoint_*`; local or any pyarrow filesystem.

    A folder without meta.json is an interrupted write and is skipped silently. With `verify`
    (the default), a folder whose files do not match its meta.json (a crash mid-upload: Ray
    copies the files concurrently, so "meta.json last" does not hold on storage) is skipped
    with one warning line and the previous checkpoint is used. A checkpoint of the first
    format (pickles) is an error: it is never loaded, and silently starting over would hide it.
    """
    import pyarrow.fs as pafs

    fs = filesystem or pafs.LocalFileSystem()
    base = f"{storage_path.rstrip('/')}/{run_name}"
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True, recursive=False))
    except OSError:
        return None
    found = []
    for info in infos:
        if info.type != pafs.FileType.Directory or "checkpoint" not in info.base_name:
            continue
        try:
            with fs.open_input_stream(f"{info.path}/{META}") as f:
                meta = json.loads(f.read().decode("utf-8"))
            step = int(meta["step"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # interrupted write: never picked
        found.append((step, info.path, meta))
    for _, path, meta in sorted(found, key=lambda t: t[0], reverse=True):
        if meta.get("format") != fmt.FORMAT:
            raise CheckpointError(
                f"{path}: checkpoint format {meta.get('format')!r} is not supported (the first "
                "format stored pickles, which are never loaded since a pickle can run code); "
                "start a new run name or move the old checkpoints away"
            )
        if not verify:
            return path, meta
        try:
            check(path, fs)
        except TornCheckpoint as e:
            print(f"warning: skipping a torn checkpoint: {e}", file=sys.stderr, flush=True)
            continue
        return path, meta
    return None


def check(path: str, filesystem=None) -> dict[str, Any]:
    """Refuse a checkpoint before any work starts on it: every file meta.json lists is there
    with its size and SHA-256, and each parses (safetensors headers, JSON, the tokenizer);
    CheckpointError (one line) otherwise. Nothing is unpickled. On S3 this downloads it once."""
    with local_copy(path, filesystem) as d:
        try:
            return fmt.check(d)
        except fmt.FormatError as e:
            kind = TornCheckpoint if isinstance(e, fmt.IncompleteError) else CheckpointError
            raise kind(str(e).replace(str(d), path, 1)) from None


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
