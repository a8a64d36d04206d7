"""The rank-0 tracker against a real MLflow server that goes away and comes back."""

from __future__ import annotations

import socket
import threading
import time

import mlflow

from service.tracking import Tracker, flatten, metric_name, start_run
from tests.service.mlflow_fixture import MlflowServer


def test_flatten_and_metric_names():
    assert flatten({"model": {"mask_ratio": 0.75, "size": "x"}, "run": {"tags": {}}}) == {
        "model.mask_ratio": "0.75",
        "model.size": "x",
    }
    assert metric_name("val_image_to_text_R@1") == "val_image_to_text_R1"


def test_server_down_mid_run_buffers_then_flushes_without_duplicates(tmp_path, capsys):
    server = MlflowServer(tmp_path).start()
    try:
        run_id = start_run(server.uri, "t", "job", {"a": "1"}, {})
        tracker = Tracker(server.uri, run_id)
        tracker.log_metrics({"loss": 3.0}, 1)
        assert tracker.flush() and tracker.pending == 0
        server.stop()  # the server goes away mid-run
        tracker.log_metrics({"loss": 2.0}, 2)
        tracker.log_metrics({"loss": 1.5}, 3)
        assert not tracker.flush()
        err = capsys.readouterr().err
        assert err.count("warning: MLflow") == 1  # one warning, not one per call
        assert tracker.pending == 2
        server.start()  # back on the same port and database
        tracker.log_metrics({"loss": 1.0}, 4)
        assert tracker.flush() and tracker.pending == 0
        history = mlflow.MlflowClient(server.uri).get_metric_history(run_id, "loss")
        assert sorted((m.step, m.value) for m in history) == [
            (1, 3.0),
            (2, 2.0),
            (3, 1.5),
            (4, 1.0),
        ]
    finally:
        server.stop()


def _black_hole() -> tuple[socket.socket, str]:
    """A loopback server that accepts connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    held = []

    def accept() -> None:
        while True:
            try:
                held.append(sock.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    return sock, f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_a_server_that_never_answers_costs_logging_nothing_and_losses_are_counted(
    capsys, monkeypatch
):
    """Rank 0 logs every step into a black hole: log_metrics returns at once every time; the
    buffer keeps the newest points and counts what it dropped; finish() is bounded and says
    how many points never reached MLflow."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    sock, uri = _black_hole()
    try:
        tracker = Tracker(uri, "0" * 32, max_buffer=50, end_timeout_s=2.0)
        slowest = 0.0
        for step in range(1, 41):
            t0 = time.perf_counter()
            tracker.log_metrics({"loss": 1.0 / step, "lr": 0.1}, step)
            slowest = max(slowest, time.perf_counter() - t0)
        assert slowest < 0.05, slowest  # never waits on the server
        assert tracker.dropped == 80 - 50 and tracker.pending == 50
        t0 = time.perf_counter()
        tracker.finish()
        assert time.perf_counter() - t0 < 3.0
        err = capsys.readouterr().err.splitlines()
        assert err[-1] == (
            f"warning: 80 metric points did not reach MLflow at {uri} "
            "(30 dropped from a full buffer of 50)"
        )
    finally:
        sock.close()


def test_start_run_returns_none_when_server_is_unreachable(capsys):
    assert start_run("http://127.0.0.1:9", "t", "job", {}, {}) is None
    assert "training continues" in capsys.readouterr().err


def test_dataset_digest_follows_the_files_and_runs_carry_source_tags(tmp_path):
    """The dataset input's digest is the same for the same files and changes when a shard is
    added; a run made with the client carries user, entry point and git commit tags."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from service.storage import resolve_source
    from service.tracking import dataset_input, log_datasets

    folder = tmp_path / "train"
    folder.mkdir()
    table = pa.table({"jpg": [b"x"], "caption": ["a"]})
    pq.write_table(table, folder / "shard-00000.parquet")
    first = dataset_input(resolve_source(str(folder)), "train").dataset
    again = dataset_input(resolve_source(str(folder)), "train").dataset
    pq.write_table(table, folder / "shard-00001.parquet")
    grown = dataset_input(resolve_source(str(folder)), "train").dataset
    assert first.digest == again.digest != grown.digest and len(first.digest) == 16
    assert str(folder) in first.source and '"files": 2' in grown.profile

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = start_run(uri, "t", "job", {}, {})
    log_datasets(uri, run_id, {"train": resolve_source(str(folder)), "val": None})
    run = mlflow.MlflowClient(uri).get_run(run_id)
    assert [d.dataset.digest for d in run.inputs.dataset_inputs] == [grown.digest]
    assert len(run.data.tags["mlflow.source.git.commit"]) == 40
    assert run.data.tags["mlflow.user"] and run.data.tags["mlflow.source.name"]


def test_a_replayed_checkpoint_step_is_not_logged_twice(tmp_path, monkeypatch):
    """A worker killed after logging step 15 but before its checkpoint registered restarts at
    step 10 and replays 15: the replayed checkpoint's model must not add a second point."""
    from tests.service.test_mlflow_models import _model_folder

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.chdir(tmp_path)
    run_id = start_run(uri, "replay", "job", {}, {})
    first = Tracker(uri, run_id)
    for step in (5, 10, 15):
        first.begin_model(step)
        first.log_metrics({"loss": 4.0 - step / 10}, step)
    assert first.flush()
    first.log_model(str(_model_folder(tmp_path, 10, 0)[0]), 10)  # 15's was never written

    second = Tracker(uri, run_id, resumed=True)  # the restarted worker, from step 10
    assert second.logged_up_to == 15
    assert second.begin_model(15) is None
    second.log_metrics({"loss": 2.0}, 15)
    model_id = second.log_model(str(_model_folder(tmp_path, 15, 1)[0]), 15, {"loss": 2.0})
    assert model_id is not None  # the replayed checkpoint is still a model of the run
    second.begin_model(20)
    second.log_metrics({"loss": 1.0}, 20)
    assert second.flush()

    client = mlflow.MlflowClient(uri)
    history = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == [5, 10, 15, 20]
    assert [m.value for m in history if m.step == 15] == [2.5]  # the first life's point
    assert client.get_logged_model(model_id).metrics in (None, [])
