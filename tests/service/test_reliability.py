"""Faults the run must survive or end cleanly on (real runs, injected for real)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from service.cli import main
from tests.service.test_run import summary, write_job

pytestmark = pytest.mark.slow


def test_nonfinite_loss_stops_with_clear_message_and_keeps_last_good_checkpoint(
    ray_local, synth_parquet, tmp_path, capsys
):
    job = write_job(
        tmp_path,
        data={"train": synth_parquet},
        optim={
            "lr": 1.0e30,
            "grad_clip": 0.0,
            "warmup_steps": 0,
            "max_steps": 30,
            "log_every": 1,
            "on_nonfinite": "stop",
        },
        checkpoint={"every_steps": 1},
        tracking={"enabled": False},
    )
    assert main(["run", job]) == 1
    captured = capsys.readouterr()
    last = [ln for ln in captured.err.splitlines() if ln.strip()][-1]
    assert last.startswith("error: non-finite loss at step"), last
    ckpt = summary(captured.out)["checkpoint"]
    meta = json.loads((Path(ckpt) / "meta.json").read_text())
    assert 1 <= meta["step"] < 30  # the last good step, loadable
    assert (Path(ckpt) / "state.pt").stat().st_size > 0


def test_mlflow_down_at_start_training_continues(ray_local, synth_parquet, tmp_path, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    job = write_job(
        tmp_path,
        data={"train": synth_parquet},
        optim={"max_steps": 4},
        tracking={"tracking_uri": f"http://127.0.0.1:{port}"},
    )
    assert main(["run", job]) == 0
    captured = capsys.readouterr()
    assert "MLflow" in captured.err and "training continues" in captured.err
    assert summary(captured.out)["mlflow run"] == "None"
    assert Path(summary(captured.out)["checkpoint"], "meta.json").is_file()


def _checkpoint_steps(storage: Path) -> list[int]:
    steps = []
    for meta in storage.glob("*/checkpoint_*/meta.json"):
        steps.append(json.loads(meta.read_text())["step"])
    return sorted(steps)


def _wait_for(predicate, timeout: float) -> bool:
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_worker_sigkill_restarts_from_checkpoint_and_keeps_one_mlflow_run(
    ray_local, synth_parquet, tmp_path, capfd
):
    import os
    import signal
    import threading
    import time

    import mlflow
    import psutil

    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    job = write_job(
        tmp_path,
        data={"train": synth_parquet},
        optim={"max_steps": 200, "log_every": 5},
        checkpoint={"every_steps": 5, "max_failures": 2},
        tracking={"tracking_uri": tracking, "experiment": "kill"},
    )
    storage = tmp_path / "runs" / "checkpoints"
    killed: list[int] = []

    def killer():
        if not _wait_for(lambda: any(s >= 5 for s in _checkpoint_steps(storage)), 240):
            return
        time.sleep(2)  # let the controller register it (either way the worker finds it)
        if max(_checkpoint_steps(storage)) >= 150:
            return  # too late to test a mid-run restart
        for p in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(p.info["cmdline"] or [])
            if "RayTrainWorker" in cmdline:
                os.kill(p.pid, signal.SIGKILL)
                killed.append((p.pid, cmdline[:80]))

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    assert main(["run", job]) == 0
    thread.join(5)
    out = capfd.readouterr()
    assert killed, "no training worker was found to kill"
    assert "a worker restart resumed from the checkpoint at step" in out.out, (
        killed,
        out.out[-800:],
    )
    assert summary(out.out)["checkpoint"]
    assert _checkpoint_steps(storage)[-1] == 200
    client = mlflow.MlflowClient(tracking)
    runs = client.search_runs([client.get_experiment_by_name("kill").experiment_id])
    assert len(runs) == 1
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")]
    assert steps == list(range(5, 201, 5))  # no gaps, no repeats


def test_driver_killed_then_rerun_resumes(synth_parquet, tmp_path):
    """The whole run is killed (driver + its embedded Ray) and the same job started again."""
    import os
    import signal
    import subprocess
    import sys

    import mlflow

    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    job = write_job(
        tmp_path,
        data={"train": synth_parquet},
        optim={"max_steps": 400, "log_every": 5},
        checkpoint={"every_steps": 5},
        tracking={"tracking_uri": tracking, "experiment": "driver"},
    )
    storage = tmp_path / "runs" / "checkpoints"
    cmd = [sys.executable, "-m", "service.cli", "run", job]
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    proc = subprocess.Popen(
        cmd, start_new_session=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        assert _wait_for(lambda: any(s >= 10 for s in _checkpoint_steps(storage)), 240)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    reached = _checkpoint_steps(storage)[-1]
    assert reached < 400
    done = subprocess.run(
        cmd + ["--set", f"optim.max_steps={reached + 10}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resuming t from checkpoint at step {reached}" in done.stdout
    assert _checkpoint_steps(storage)[-1] == reached + 10
    client = mlflow.MlflowClient(tracking)
    runs = client.search_runs([client.get_experiment_by_name("driver").experiment_id])
    assert len(runs) == 1


def test_sigterm_checkpoints_before_exit_and_rerun_resumes(synth_parquet, tmp_path):
    """Preemption / `maskclip stop`: SIGTERM to the driver makes the workers checkpoint first."""
    import os
    import signal
    import subprocess
    import sys

    job = write_job(
        tmp_path,
        data={"train": synth_parquet},
        optim={"max_steps": 5000, "log_every": 2},
        checkpoint={"every_steps": 1000},
        tracking={"enabled": False},
    )
    cmd = [sys.executable, "-m", "service.cli", "run", job]
    proc = subprocess.Popen(
        cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "step 4/5000" in line:
                proc.send_signal(signal.SIGTERM)
                break
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = "".join(lines) + out
    assert proc.returncode == 143, output[-3000:]
    assert "stopped by signal after checkpointing" in output
    steps = _checkpoint_steps(tmp_path / "runs" / "checkpoints")
    assert steps and 4 <= steps[-1] < 5000  # checkpointed although every_steps is 1000
