"""The rank-0 tracker against a real MLflow server that goes away and comes back."""

from __future__ import annotations

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
        server.stop()  # the server goes away mid-run
        tracker.log_metrics({"loss": 2.0}, 2)
        tracker.log_metrics({"loss": 1.5}, 3)
        err = capsys.readouterr().err
        assert err.count("warning: MLflow") == 1  # one warning, not one per call
        assert len(tracker._buffer) == 2
        server.start()  # back on the same port and database
        tracker.log_metrics({"loss": 1.0}, 4)
        assert len(tracker._buffer) == 0
        history = mlflow.MlflowClient(server.uri).get_metric_history(run_id, "loss")
        assert sorted((m.step, m.value) for m in history) == [
            (1, 3.0),
            (2, 2.0),
            (3, 1.5),
            (4, 1.0),
        ]
    finally:
        server.stop()


def test_start_run_returns_none_when_server_is_unreachable(capsys):
    assert start_run("http://127.0.0.1:9", "t", "job", {}, {}) is None
    assert "training continues" in capsys.readouterr().err
