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
    from .storage import copy_to_local

    with copy_to_local(path, filesystem) as d:
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


# ---------------------------------------------------------------- one live run per name

LEASE = "_lease.json"
LEASE_TTL_S = 60.0
"""A driver renews its run's lease every TTL/4; a lease older than TTL belongs to a dead run."""


class RunBusy(CheckpointError):
    """Another live `maskclip run` holds this run name's lease."""


class Lease:
    """`<storage>/<run name>/_lease.json`, held by the one live driver of a run name.

    Written with the owner (host, pid, a random id) and an expiry, renewed from a daemon thread,
    deleted at the end; a lease past its expiry is taken over (a killed driver cannot delete it).
    Storage offers no atomic create-if-absent on every backend (S3 through pyarrow does not), so
    acquiring writes then reads back: two drivers starting within one round trip of each other
    are the case this cannot rule out."""

    def __init__(self, storage_path: str, run_name: str, filesystem=None, ttl: float = LEASE_TTL_S):
        import os
        import socket
        import uuid

        import pyarrow.fs as pafs

        self.fs = filesystem or pafs.LocalFileSystem()
        self.dir = f"{storage_path.rstrip('/')}/{run_name}"
        self.path = f"{self.dir}/{LEASE}"
        self.run_name, self.ttl = run_name, ttl
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.owner = f"{self.host} pid {self.pid} ({uuid.uuid4().hex[:8]})"
        self._stop = None

    def _read(self) -> dict | None:
        try:
            with self.fs.open_input_stream(self.path) as f:
                return json.loads(f.read().decode("utf-8"))
        except (OSError, ValueError):
            return None

    def _write(self) -> None:
        import time

        self.fs.create_dir(self.dir, recursive=True)
        data = {
            "owner": self.owner,
            "host": self.host,
            "pid": self.pid,
            "renewed": time.time(),
            "expires": time.time() + self.ttl,
        }
        with self.fs.open_output_stream(self.path) as f:
            f.write(json.dumps(data).encode("utf-8"))

    def holder(self) -> dict | None:
        """The live lease of another driver, if any."""
        import time

        held = self._read()
        if held and held.get("owner") != self.owner and held.get("expires", 0) > time.time():
            if held.get("host") == self.host and not _alive(held.get("pid")):
                return None  # its driver on this machine is gone (killed): no need to wait
            return held
        return None

    def acquire(self) -> Lease:
        import threading
        import time

        for _ in range(2):
            held = self.holder()
            if held:
                age = time.time() - held.get("renewed", time.time())
                raise RunBusy(
                    f"run.name: {self.run_name!r} is already running ({held['owner']}, lease "
                    f"renewed {age:.0f} s ago in {self.dir}); wait for it, stop it, or choose "
                    "another run.name"
                )
            self._write()
            time.sleep(0.05)
            if (self._read() or {}).get("owner") == self.owner:
                break
        else:
            raise RunBusy(f"run.name: {self.run_name!r}: another driver took its lease just now")
        self._stop = threading.Event()
        threading.Thread(target=self._renew, name="maskclip-lease", daemon=True).start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self._write()
            except OSError as e:  # storage briefly away: the next renewal tries again
                print(f"warning: lease renewal failed: {e}", file=sys.stderr, flush=True)

    def release(self) -> None:
        if self._stop is not None:
            self._stop.set()
        if (self._read() or {}).get("owner") == self.owner:
            try:
                self.fs.delete_file(self.path)
            except OSError:
                pass  # it expires by itself

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _alive(pid) -> bool:
    import os

    if not isinstance(pid, int) or pid <= 0:
        return True  # unknown: trust the expiry
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def set_aside(storage_path: str, run_name: str, filesystem=None) -> str | None:
    """`--fresh`: move a run's checkpoints to `<run name>.replaced-<UTC time>` (kept, not
    deleted); returns the new location, or None when there was nothing."""
    import time

    import pyarrow.fs as pafs

    fs = filesystem or pafs.LocalFileSystem()
    src = f"{storage_path.rstrip('/')}/{run_name}"
    if fs.get_file_info(src).type == pafs.FileType.NotFound:
        return None
    dest = f"{src}.replaced-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    if isinstance(fs, pafs.LocalFileSystem):
        fs.move(src, dest)
    else:  # object stores have no directory rename
        pafs.copy_files(src, dest, source_filesystem=fs, destination_filesystem=fs)
        fs.delete_dir(src)
    return dest


RESUME_IGNORES = (
    "optim.max_steps",
    "optim.epochs",
    "optim.log_every",
    "optim.val_every",
    "optim.on_nonfinite",
    "optim.max_skipped_steps",
    "optim.compile",  # how a step runs, not what it computes (tests: same loss and weights)
    "optim.grad_checkpointing",
)
"""Spec fields a resumed run may change (the step budget, logging). Everything else under these
sections must match the checkpoint's spec, or the resumed run would silently be another run."""
RESUME_COMPARES = (
    "run.seed",
    "model",
    "data.train",
    "data.image_column",
    "data.caption_column",
    "optim",
    "scaling.num_workers",
)


def spec_changes(saved_yaml: str, spec_dict: dict) -> list[str]:
    """`path: old -> new` for each compared field that differs between a checkpoint's job.yaml
    and the spec about to resume it."""
    import yaml

    def flat(d, prefix=""):
        out = {}
        for k, v in (d or {}).items():
            key = f"{prefix}{k}"
            out.update(flat(v, key + ".") if isinstance(v, dict) else {key: v})
        return out

    try:
        old = flat(yaml.safe_load(saved_yaml))
    except yaml.YAMLError:
        return ["job.yaml: unreadable"]
    new = flat(spec_dict)
    compared = [  # fields both versions know: a field added since then is not a change
        k
        for k in sorted(set(old) & set(new))
        if any(k == c or k.startswith(c + ".") for c in RESUME_COMPARES) and k not in RESUME_IGNORES
    ]
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in compared if old.get(k) != new.get(k)]
