"""MLflow helpers. The driver creates (or finds) the run; rank 0 logs into it.

MLflow being down never stops training: every call is guarded, the first failure prints one
warning, metrics are buffered (bounded) and flushed when the server answers again.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from collections import deque
from typing import Any

RUN_KEY_TAG = "maskclip.run_name"
_BAD_METRIC_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")


def metric_name(name: str) -> str:
    """MLflow allows alphanumerics, _ - . / and space: `val_image_to_text_R@1` -> `..._R1`."""
    return _BAD_METRIC_CHARS.sub("", name)


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Nested spec dict -> {"model.mask_ratio": "0.75", ...} so runs compare side by side."""
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = "" if data is None else str(data)[:500]
    return out


def _client(uri: str):
    import mlflow

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    return mlflow.MlflowClient(tracking_uri=uri)


def start_run(
    uri: str,
    experiment: str,
    run_name: str,
    params: dict[str, str],
    tags: dict[str, str],
    run_id: str | None = None,
    parent_run_id: str | None = None,
    reopen_unfinished: bool = True,
) -> str | None:
    """Create the run (or reopen `run_id`, or the unfinished run with this name unless
    `reopen_unfinished` is False); None if MLflow cannot be reached — training goes on without it."""
    try:
        client = _client(uri)
        exp = client.get_experiment_by_name(experiment)
        exp_id = (
            exp.experiment_id
            if exp
            else client.create_experiment(experiment, artifact_location=_local_artifact_root(uri))
        )
        if run_id is None and reopen_unfinished:
            found = client.search_runs(
                [exp_id],
                filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_name}' and attributes.status != 'FINISHED'",
                max_results=1,
            )
            run_id = found[0].info.run_id if found else None
        if run_id is not None:
            client.update_run(run_id, status="RUNNING")
            return run_id
        all_tags = {RUN_KEY_TAG: run_name, "mlflow.runName": run_name, **source_tags(), **tags}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
        items = list(params.items())
        from mlflow.entities import Param

        for i in range(0, len(items), 100):
            client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in items[i : i + 100]])
        return run.info.run_id
    except Exception as e:  # noqa: BLE001 - tracking must never stop training
        print(
            f"warning: MLflow at {uri} unavailable ({type(e).__name__}); training continues "
            "without tracking",
            file=sys.stderr,
        )
        return None


def source_tags() -> dict[str, str]:
    """The tags `mlflow.start_run` sets and `MlflowClient.create_run` does not: who ran it, from
    which entry point, at which git commit (omitted outside a git checkout)."""
    import getpass
    import subprocess
    from pathlib import Path

    tags = {
        "mlflow.source.type": "LOCAL",
        "mlflow.source.name": Path(sys.argv[0]).name or "maskclip",
    }
    try:
        tags["mlflow.user"] = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        pass
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=5
        )
        if commit.returncode == 0 and commit.stdout.strip():
            tags["mlflow.source.git.commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return tags


def dataset_input(source, name: str):
    """An MLflow dataset input for a resolved Parquet source (service.storage.Source): its name,
    URI and a digest of the resolved file list and sizes (the same files give the same digest;
    a changed or added shard changes it). Nothing is read but the listing."""
    import hashlib
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    sizes = []
    for path in source.paths:
        try:
            size = source.filesystem.get_file_info(path).size
        except Exception:  # noqa: BLE001 - the digest is best effort
            size = None
        sizes.append([path, size])
    digest = hashlib.sha256(json.dumps(sizes).encode()).hexdigest()[:16]
    profile = {"files": len(source.paths), "bytes": sum(s or 0 for _, s in sizes)}
    dataset = Dataset(
        name=name,
        digest=digest,
        source_type="parquet",
        source=json.dumps({"uri": source.uri}),
        schema=json.dumps({"columns": source.columns}),
        profile=json.dumps(profile),
    )
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", name)])


def log_datasets(uri: str | None, run_id: str | None, sources: dict) -> None:
    """Log {context name: Source} as the run's dataset inputs; a failure is one warning."""
    if not (uri and run_id):
        return
    try:
        inputs = [dataset_input(s, name) for name, s in sources.items() if s is not None]
        _client(uri).log_inputs(run_id, datasets=inputs)
    except Exception as e:  # noqa: BLE001 - tracking never stops training
        print(f"warning: MLflow dataset inputs not logged ({type(e).__name__})", file=sys.stderr)


#: The models-from-code file MLflow stores beside each checkpoint (see `log_checkpoint_model`).
#: It needs only `maskclip` (not this service) to load.
_PYFUNC_CODE = '''"""MaskCLIP checkpoint as an MLflow pyfunc: the weights are the safetensors folder in
artifacts/checkpoint, opened with maskclip.checkpoint.load (nothing is pickled)."""
import mlflow
import mlflow.pyfunc


class MaskCLIPModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from maskclip.checkpoint import load

        self.checkpoint = context.artifacts["checkpoint"]
        self.model, self.tokenizer, self.meta = load(self.checkpoint)

    def predict(self, context, model_input, params=None):
        """Captions (a list, or a DataFrame's first column) -> L2-normalised text embeddings."""
        import torch

        texts = list(model_input.iloc[:, 0]) if hasattr(model_input, "iloc") else list(model_input)
        with torch.no_grad():
            return self.model.encode_text(self.tokenizer.encode(texts)).numpy()


mlflow.models.set_model(MaskCLIPModel())
'''


def save_pyfunc(checkpoint_dir: str, dest: str) -> str:
    """Write an MLflow pyfunc model folder at `dest` around a checkpoint folder. What MLflow
    stores: MLmodel, the code file above (models from code: no cloudpickle), requirements,
    and the checkpoint folder itself under artifacts/checkpoint (model.safetensors,
    tokenizer.json, job.yaml, meta.json). `mlflow.pyfunc.load_model(uri)` opens it in one call;
    `.unwrap_python_model().model` is the MaskCLIP module, and
    `maskclip.checkpoint.load(<download>/artifacts/checkpoint)` works without MLflow."""
    import tempfile
    from pathlib import Path

    import mlflow.pyfunc
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "caption")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1))]),
    )
    with tempfile.TemporaryDirectory() as d:
        code = Path(d) / "maskclip_pyfunc.py"
        code.write_text(_PYFUNC_CODE)
        if Path(checkpoint_dir).name != "checkpoint":  # MLflow keeps the folder's own name
            import shutil

            checkpoint_dir = str(shutil.copytree(checkpoint_dir, Path(d) / "checkpoint"))
        mlflow.pyfunc.save_model(
            dest,
            python_model=str(code),
            artifacts={"checkpoint": checkpoint_dir},
            signature=signature,
            pip_requirements=["maskclip-service"],
        )
    return dest


def log_checkpoint_model(
    uri: str | None,
    run_id: str | None,
    checkpoint_dir: str,
    step: int,
    metrics: dict[str, float] | None = None,
    name: str = "maskclip",
    model_id: str | None = None,
) -> str | None:
    """Log a model-only checkpoint folder as an MLflow 3 LoggedModel of the run: an output of
    the run at `step`, status READY once the files are up. `model_id`: a model already created
    by `create_checkpoint_model` (whose metrics the run's own points link: see Tracker);
    otherwise one is created here and `metrics` are logged linked to it. Returns the model id,
    or None (MLflow down: one warning, training goes on)."""
    if not (uri and run_id):
        return None
    import tempfile
    import time
    from pathlib import Path

    try:
        from mlflow.entities import LoggedModelOutput, Metric

        client = _client(uri)
        if model_id is None:
            model_id = create_checkpoint_model(uri, run_id, step, name)
            if model_id is None:
                return None
            if metrics:
                ts = int(time.time() * 1000)
                points = [
                    Metric(metric_name(k), float(v), ts, step, model_id=model_id)
                    for k, v in metrics.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)
                ]
                client.log_batch(run_id, metrics=points)
        try:
            with tempfile.TemporaryDirectory() as d:
                folder = save_pyfunc(checkpoint_dir, str(Path(d) / "model"))
                client.log_model_artifacts(model_id, folder)
        except Exception:
            client.finalize_logged_model(model_id, "FAILED")
            raise
        client.finalize_logged_model(model_id, "READY")
        client.log_outputs(run_id, [LoggedModelOutput(model_id, step)])
        return model_id
    except Exception as e:  # noqa: BLE001 - tracking never stops training
        _model_not_logged(step, e)
        return None


def _model_not_logged(step: int, e: Exception) -> None:
    print(
        f"warning: checkpoint at step {step} not logged as an MLflow model "
        f"({type(e).__name__}: {str(e)[:120]})",
        file=sys.stderr,
        flush=True,
    )


def create_checkpoint_model(uri: str, run_id: str, step: int, name: str = "maskclip") -> str | None:
    """A PENDING LoggedModel of the run for the checkpoint at `step`; its files come later
    (`log_checkpoint_model(..., model_id=...)`). None when MLflow does not answer."""
    try:
        client = _client(uri)
        run = client.get_run(run_id)
        return client.create_logged_model(
            run.info.experiment_id,
            name=name,
            source_run_id=run_id,
            params={"step": str(step)},
            tags={"maskclip.step": str(step)},
            model_type="maskclip",
        ).model_id
    except Exception as e:  # noqa: BLE001 - tracking never stops training
        _model_not_logged(step, e)
        return None


#: What ranks a plain run's checkpoints when no sweep metric is given: the first of these
#: that the checkpoints carry (zero-shot needs labelled data.val, retrieval any data.val).
RANKING = ("val_zero_shot_top1", "val_image_to_text_R1", "loss")


def best_model(
    uri: str, run_ids: list[str], metric: str | None, mode: str | None = None
) -> tuple[str, float] | None:
    """(model id, value) of the READY logged model of these runs with the best linked `metric`
    (None: the first of RANKING the models carry); mode: min/max, default min for losses."""
    client = _client(uri)
    run = client.get_run(run_ids[0])
    found = []
    token = None
    while True:
        page = client.search_logged_models(
            [run.info.experiment_id], max_results=100, page_token=token
        )
        found += [m for m in page if m.source_run_id in run_ids and str(m.status) == "READY"]
        token = page.token
        if not token:
            break
    carried = {x.key for m in found for x in (m.metrics or [])}
    if metric is None:
        metric = next((k for k in RANKING if k in carried), None)
        if metric is None:
            return None
    mode = mode or ("min" if "loss" in metric else "max")
    scored = []
    for m in found:
        values = [x.value for x in (m.metrics or []) if x.key == metric_name(metric)]
        if values and values[-1] == values[-1]:  # NaN never wins
            scored.append((values[-1], m.model_id))
    if not scored:
        return None
    value, model_id = (min if mode == "min" else max)(scored)
    return model_id, value


def register_best(
    uri: str | None,
    run_ids: list[str],
    registered_name: str,
    metric: str | None = None,
    mode: str | None = None,
    alias: str = "champion",
) -> str | None:
    """Register the best checkpoint model of these runs (one run, or a sweep's trials) as a new
    version of `registered_name` and point `alias` at it: `maskclip eval
    models:/<name>@champion`. Returns "name@alias", or None (nothing to register, or MLflow
    down: one warning)."""
    if not (uri and run_ids):
        return None
    try:
        best = best_model(uri, run_ids, metric, mode)
        if best is None:
            return None
        model_id, value = best
        client = _client(uri)
        model = client.get_logged_model(model_id)
        try:
            client.get_registered_model(registered_name)
        except Exception:  # noqa: BLE001 - RESOURCE_DOES_NOT_EXIST
            client.create_registered_model(registered_name)
        version = client.create_model_version(
            registered_name,
            source=f"models:/{model_id}",
            run_id=model.source_run_id,
            model_id=model_id,
            tags={"maskclip.ranked_by": str(metric or "default"), "maskclip.value": str(value)},
        )
        client.set_registered_model_alias(registered_name, alias, version.version)
        return f"{registered_name}@{alias}"
    except Exception as e:  # noqa: BLE001 - tracking never stops training
        print(
            f"warning: best model not registered in MLflow ({type(e).__name__}: {str(e)[:120]})",
            file=sys.stderr,
        )
        return None


def _local_artifact_root(uri: str) -> str | None:
    """For a local sqlite store keep artifacts beside the database, not in ./mlruns of
    wherever the command happened to run."""
    if not uri.startswith("sqlite:///"):
        return None
    from pathlib import Path

    return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()


class Tracker:
    """Rank-0 logger into an existing run. All methods are safe to call when MLflow is down.

    Metrics go through a bounded buffer that a daemon thread sends, so a server that accepts
    connections and never answers costs the training step nothing (each request still waits
    MLFLOW_HTTP_REQUEST_TIMEOUT x retries, in that thread). Points that do not fit the buffer
    are dropped oldest-first and counted; `end()` waits at most `end_timeout_s` for the rest
    and says how many points never reached the server."""

    def __init__(
        self,
        uri: str | None,
        run_id: str | None,
        max_buffer: int = 10000,
        resumed: bool = False,
        end_timeout_s: float = 30.0,
        system_metrics: bool = False,
        current=None,
    ):
        """`current`: a callable that says whether this process is still the run's live rank 0.
        A worker group that Ray has replaced (a node lost) may live on for a moment; its
        sender then drops what it holds instead of sending steps the new group logs again."""
        self.uri, self.run_id = uri, run_id
        self.current = current
        self.enabled = bool(uri and run_id)
        self.max_buffer, self.end_timeout_s = max_buffer, end_timeout_s
        self.dropped = 0
        self._buffer: deque = deque()
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._wake = threading.Event()
        self._sender: threading.Thread | None = None
        self._warned = False
        self._models: dict[int, str] = {}  # step -> the LoggedModel its points link to
        self._client = _client(uri) if self.enabled else None
        self.logged_up_to = self._last_logged_step() if resumed else -1
        self._system = self._start_system_metrics(resumed) if system_metrics else None

    def _start_system_metrics(self, resumed: bool):
        """MLflow's system metrics (system/cpu_utilization_percentage, memory, disk, network,
        GPU when present) for this process's machine, sampled every
        $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL s (10); off with
        MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false."""
        if not self.enabled or os.environ.get(
            "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", ""
        ).lower() in ("false", "0"):
            return None
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(
                self.run_id, resume_logging=resumed, tracking_uri=self.uri
            )
            monitor.start()
            return monitor
        except Exception as e:  # noqa: BLE001 - e.g. psutil missing
            self._warn("system metrics", e)
            return None

    def _finish_system_metrics(self) -> None:
        """Stop the sampler and send what it collected since its last point, so even a run
        shorter than one sampling interval has system metrics."""
        monitor, self._system = self._system, None
        if monitor is None:
            return
        try:
            monitor._shutdown_event.set()
            if monitor._process is not None:
                monitor._process.join(self.end_timeout_s)
            monitor._process = None
            monitor.collect_metrics()
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()
        except Exception as e:  # noqa: BLE001
            self._warn("system metrics", e)

    def _last_logged_step(self) -> int:
        """A restarted worker replays the steps after its last checkpoint; those steps were
        already logged, so they are not logged twice (MLflow keeps one point per step)."""
        if not self.enabled:
            return -1
        try:
            history = self._client.get_metric_history(self.run_id, "loss")
            return max((m.step for m in history), default=-1)
        except Exception as e:  # noqa: BLE001
            self._warn("reading the run", e)
            return -1

    def _warn(self, what: str, err: Exception) -> None:
        if not self._warned:
            print(
                f"warning: MLflow {what} failed ({type(err).__name__}: {str(err)[:120]}); "
                "metrics are buffered and training continues",
                file=sys.stderr,
                flush=True,
            )
            self._warned = True

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue one step's metrics; returns at once (the sender thread sends them)."""
        if not self.enabled or step <= self.logged_up_to:
            return
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        with self._lock:
            for k, v in metrics.items():
                if len(self._buffer) >= self.max_buffer:
                    self._buffer.popleft()
                    self.dropped += 1
                self._buffer.append(
                    Metric(metric_name(k), float(v), ts, step, model_id=self._models.get(step))
                )
        if self._sender is None:
            self._sender = threading.Thread(
                target=self._send_loop, name="mlflow-sender", daemon=True
            )
            self._sender.start()
        self._wake.set()

    def _send_loop(self) -> None:
        while True:
            self._wake.wait(5.0)  # also retries a failed send every few seconds
            self._wake.clear()
            self.flush()

    def flush(self) -> bool:
        """Send buffered metrics; what was sent leaves the buffer, so nothing is sent twice.
        True when the buffer is empty afterwards."""
        if not self.enabled:
            return True
        with self._send_lock:
            try:
                if self.current is not None and not self.current():
                    with self._lock:  # superseded: the new rank 0 logs these steps itself
                        self._buffer.clear()
                    return True
                while True:
                    with self._lock:
                        chunk = [self._buffer[i] for i in range(min(500, len(self._buffer)))]
                    if not chunk:
                        break
                    self._client.log_batch(self.run_id, metrics=chunk)
                    with self._lock:  # the chunk is still at the front: only this lock sends
                        for _ in chunk:
                            self._buffer.popleft()
                self._warned = False
                return True
            except Exception as e:  # noqa: BLE001
                self._warn("logging", e)
                return False

    def sync(self, timeout_s: float = 5.0) -> bool:
        """Send what is buffered, waiting at most `timeout_s` (the sender goes on after that).
        Called before a checkpoint is reported: a worker restarted from it then finds every
        step up to it in MLflow and does not log those steps again."""
        if not self.enabled or self._warned:
            return False
        done: list[bool] = []
        sender = threading.Thread(target=lambda: done.append(self.flush()), daemon=True)
        sender.start()
        sender.join(timeout_s)
        return bool(done and done[0])

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._buffer)

    def _guarded(self, what: str, method: str, *args, **kwargs) -> None:
        """Call an MlflowClient method on this run; a failure is one warning, never an error."""
        if not self.enabled:
            return
        try:
            getattr(self._client, method)(self.run_id, *args, **kwargs)
        except Exception as e:  # noqa: BLE001
            self._warn(what, e)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self._guarded("artifact upload", "log_artifact", path, artifact_path)

    def log_artifacts(self, directory: str, artifact_path: str | None = None) -> None:
        self._guarded("artifact upload", "log_artifacts", directory, artifact_path)

    def set_tag(self, key: str, value: str) -> None:
        self._guarded("tagging", "set_tag", key, value)

    def begin_model(self, step: int) -> str | None:
        """Before logging the metrics of a step that will be checkpointed: create its
        LoggedModel, so that this step's points (training and validation) are logged once,
        linked to it, instead of a second time for the model (the run's history would then
        hold every checkpoint step twice). Skipped while the server is failing."""
        if not self.enabled or self._warned or step <= self.logged_up_to:
            return None
        model_id = create_checkpoint_model(self.uri, self.run_id, step)
        if model_id is not None:
            self._models[step] = model_id
        return model_id

    def log_model(self, checkpoint_dir: str, step: int, metrics: dict | None = None) -> str | None:
        """`log_checkpoint_model` into this run; skipped (None) while the server is failing, so
        a down server costs a checkpoint no upload timeouts. A model begun for this step
        (`begin_model`) gets its files; its metrics are the step's points, already linked.
        A step a restarted worker replays (at or before `logged_up_to`) already has its points
        in the run: its model is logged without them, so the run's history never holds a step
        twice."""
        if not self.enabled or self._warned:
            return None
        model_id = self._models.pop(step, None)
        if model_id is not None:
            return log_checkpoint_model(
                self.uri, self.run_id, checkpoint_dir, step, model_id=model_id
            )
        if step <= self.logged_up_to:
            metrics = None
        return log_checkpoint_model(self.uri, self.run_id, checkpoint_dir, step, metrics)

    def finish(self) -> None:
        """Send what is buffered, waiting at most `end_timeout_s`; then report, in one line,
        the points that never reached the server (dropped from a full buffer or unsent)."""
        if not self.enabled:
            return
        result: list[bool] = []

        def send() -> None:
            result.append(self.flush())
            self._finish_system_metrics()

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        sender.join(self.end_timeout_s)
        lost = self.dropped + (0 if result and result[0] else self.pending)
        if lost:
            print(
                f"warning: {lost} metric points did not reach MLflow at {self.uri} "
                f"({self.dropped} dropped from a full buffer of {self.max_buffer})",
                file=sys.stderr,
                flush=True,
            )

    def end(self, status: str = "FINISHED") -> None:
        if not self.enabled:
            return
        self.finish()
        self._guarded("closing the run", "set_terminated", status=status)
