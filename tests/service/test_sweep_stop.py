"""SIGTERM to `maskclip sweep`: the running trial checkpoints and stops, its MLflow run is marked,
the command exits 143 with one line, and the same command resumes the sweep: the stopped trial
continues from its checkpoint, the pending one runs, no trial gets a second MLflow run.

The sweep runs as a subprocess (its own local Ray, as a user starts it), two grid trials one
at a time; the signal goes to it once the first trial has written a checkpoint. (That a
finished trial is not rerun by a restored sweep: test_tune.py.) About 4 minutes on an idle
2-core machine (two Ray starts, three Ray Train starts); 10 minutes under a load of 20.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

STEPS = 30


def _checkpoint_steps(storage: Path) -> dict[str, list[int]]:
    """run name -> the steps of its complete checkpoints."""
    found: dict[str, list[int]] = {}
    for meta in storage.glob("*/checkpoint_*/meta.json"):
        try:
            step = json.loads(meta.read_text())["step"]
        except (OSError, ValueError, KeyError):
            continue
        found.setdefault(meta.parent.parent.name, []).append(step)
    return {k: sorted(v) for k, v in found.items()}


def _sweep(job: Path, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", "sweep", str(job)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
    )


def test_sigterm_stops_a_sweep_at_a_checkpoint_and_the_same_command_resumes_it(
    tmp_path, synth_parquet
):
    import mlflow

    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    job = {
        "run": {"name": "sw", "output_dir": str(tmp_path / "runs")},
        "model": {"size": "maskclip_nano", "vocab_size": 300},
        "data": {"train": synth_parquet},
        "optim": {"batch_size": 16, "max_steps": STEPS, "warmup_steps": 1, "log_every": 2},
        "checkpoint": {"every_steps": 4},
        "tracking": {"tracking_uri": tracking, "experiment": "sweep-stop"},
        "sweep": {
            "parameters": {"model.contrastive_weight": {"grid": [0.5, 1.0]}},
            "search": "grid",
            "metric": "loss",
            "max_concurrent": 1,
        },
    }
    path = tmp_path / "sw.yaml"
    path.write_text(yaml.safe_dump(job))
    storage = tmp_path / "runs" / "checkpoints"
    repo = Path(__file__).resolve().parents[2]

    # --- first start: SIGTERM once the first trial has a checkpoint
    proc = _sweep(path, repo)
    deadline = time.time() + 600
    stopped = None
    while time.time() < deadline and proc.poll() is None and stopped is None:
        stopped = next(iter(_checkpoint_steps(storage)), None)
        time.sleep(0.3)
    assert stopped is not None, proc.communicate()
    signalled_at_step = max(_checkpoint_steps(storage)[stopped])
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, (out[-3000:], err[-3000:])
    assert "Traceback" not in err and "logging.cc" not in out + err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last == (
        "error: sweep sw stopped by signal: 1 running trial(s) checkpointed, 0 finished "
        "trial(s) kept; run the same command again to resume"
    ), err[-3000:]
    stopped_steps = _checkpoint_steps(storage)[stopped]
    assert signalled_at_step <= max(stopped_steps) < STEPS, stopped_steps
    assert len(_checkpoint_steps(storage)) == 1  # the second trial never started

    client = mlflow.MlflowClient(tracking)
    exp = client.get_experiment_by_name("sweep-stop")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`maskclip.sweep` = 'sw'")
    assert parent.info.status == "KILLED" and parent.data.tags["maskclip.stopped"] == "signal"
    children = {
        c.data.tags["maskclip.run_name"]: c
        for c in client.search_runs(
            [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
        )
    }
    assert set(children) == {stopped}
    assert children[stopped].info.status == "KILLED"
    assert children[stopped].data.tags["maskclip.stopped"] == "signal"
    assert children[stopped].data.tags["maskclip.stopped_checkpoint_step"] == str(
        max(stopped_steps)
    )

    # --- the same command again: resumes
    proc = _sweep(path, repo)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, (out[-3000:], err[-3000:])
    assert "resuming sweep sw" in out + err
    assert f"resuming {stopped} from checkpoint at step {max(stopped_steps)}" in out + err
    steps = _checkpoint_steps(storage)
    assert len(steps) == 2 and all(max(s) == STEPS for s in steps.values()), steps

    (parent,) = client.search_runs([exp.experiment_id], "tags.`maskclip.sweep` = 'sw'")
    assert parent.info.status == "FINISHED" and "maskclip.stopped" not in parent.data.tags
    runs = client.search_runs(
        [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert len(runs) == 2  # no trial twice
    by_name = {r.data.tags["maskclip.run_name"]: r for r in runs}
    resumed = by_name[stopped]
    assert resumed.info.run_id == children[stopped].info.run_id
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags["maskclip.resumed_from_step"] == str(max(stopped_steps))
    assert "maskclip.stopped" not in resumed.data.tags
    history = sorted(m.step for m in client.get_metric_history(resumed.info.run_id, "loss"))
    assert history == list(range(2, STEPS + 1, 2))  # continuous across the stop, none twice
    for r in runs:
        assert r.info.status == "FINISHED"
        assert max(m.step for m in client.get_metric_history(r.info.run_id, "loss")) == STEPS
