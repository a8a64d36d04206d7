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
        all_tags = {RUN_KEY_TAG: run_name, "mlflow.runName": run_name, **tags}
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
    ):
        self.uri, self.run_id = uri, run_id
        self.enabled = bool(uri and run_id)
        self.max_buffer, self.end_timeout_s = max_buffer, end_timeout_s
        self.dropped = 0
        self._buffer: deque = deque()
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._wake = threading.Event()
        self._sender: threading.Thread | None = None
        self._warned = False
        self._client = _client(uri) if self.enabled else None
        self.logged_up_to = self._last_logged_step() if resumed else -1

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
                self._buffer.append(Metric(metric_name(k), float(v), ts, step))
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

    def finish(self) -> None:
        """Send what is buffered, waiting at most `end_timeout_s`; then report, in one line,
        the points that never reached the server (dropped from a full buffer or unsent)."""
        if not self.enabled:
            return
        result: list[bool] = []
        sender = threading.Thread(target=lambda: result.append(self.flush()), daemon=True)
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
