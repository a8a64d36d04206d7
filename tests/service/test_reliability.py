"""Faults the run must survive or end cleanly on (real runs, injected for real)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

from service.checkpoint import load_model as load_checkpoint_model
from service.cli import main
from tests.service.conftest import _free_port
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
    model, _, loaded_meta = load_checkpoint_model(ckpt)  # verifies every file's hash too
    assert loaded_meta["step"] == meta["step"]
    assert all(torch.isfinite(p).all() for p in model.state_dict().values())


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
        optim={"max_steps": 80, "log_every": 5},
        checkpoint={"every_steps": 5, "max_failures": 2},
        tracking={"tracking_uri": tracking, "experiment": "kill"},
    )
    storage = tmp_path / "runs" / "checkpoints"
    killed: list[int] = []

    def killer():
        if not _wait_for(lambda: any(s >= 5 for s in _checkpoint_steps(storage)), 240):
            return
        time.sleep(2)  # let the controller register it (either way the worker finds it)
        if max(_checkpoint_steps(storage)) >= 60:
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
    assert _checkpoint_steps(storage)[-1] == 80
    client = mlflow.MlflowClient(tracking)
    runs = client.search_runs([client.get_experiment_by_name("kill").experiment_id])
    assert len(runs) == 1
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")]
    assert steps == list(range(5, 81, 5))  # no gaps, no repeats


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


@pytest.mark.parametrize(
    "signame, code, message",
    [
        ("SIGTERM", 143, "stopped by signal after checkpointing"),
        ("SIGINT", 130, "interrupted after checkpointing"),
    ],
)
def test_sigterm_checkpoints_before_exit_and_rerun_resumes(
    synth_parquet, tmp_path, signame, code, message
):
    """Preemption / `maskclip stop` (SIGTERM) and Ctrl-C (SIGINT) to the driver make the workers
    checkpoint first; the exit code says which."""
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
                proc.send_signal(getattr(signal, signame))
                break
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = "".join(lines) + out
    assert proc.returncode == code, output[-3000:]
    assert f"error: {message}; run the same job again to resume" in output
    steps = _checkpoint_steps(tmp_path / "runs" / "checkpoints")
    assert steps and 4 <= steps[-1] < 5000  # checkpointed although every_steps is 1000


def test_s3_outage_mid_run_is_retried_and_the_run_continues(
    ray_local, s3_server, synth_parquet, tmp_path, capfd
):
    """Stop the S3 server (moto) mid-run for a few seconds and start it again on the same port:
    shard reads and checkpoint uploads wait in the S3 client's retries, no worker restarts, and
    every checkpoint that fell in the outage is still written."""
    import threading
    import time

    import boto3
    from moto.server import ThreadedMotoServer

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="outage")
    for f in Path(synth_parquet).glob("*.parquet"):  # 96 rows: 12 steps an epoch, re-read often
        s3.put_object(Bucket="outage", Key=f"train/{f.name}", Body=f.read_bytes())
    job = write_job(
        tmp_path,
        data={"train": "s3://outage/train/"},
        optim={"batch_size": 8, "max_steps": 100, "log_every": 10},
        checkpoint={"storage_path": "s3://outage/ckpt", "every_steps": 5, "keep": 100},
        storage={"endpoint_url": endpoint, "region": "us-east-1"},
        tracking={"enabled": False},
    )

    def steps() -> list[int]:
        keys = s3.list_objects_v2(Bucket="outage", Prefix="ckpt/").get("Contents", [])
        metas = [k["Key"] for k in keys if k["Key"].endswith("/meta.json")]
        return sorted(
            json.loads(s3.get_object(Bucket="outage", Key=k)["Body"].read())["step"] for k in metas
        )

    outage: dict = {}

    def cut_and_restore():
        nonlocal server
        if not _wait_for(lambda: any(s >= 10 for s in steps()), 240):
            return
        outage["step"] = max(steps())
        server.stop()  # connections are now refused
        time.sleep(4)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)  # same state, same port
        server.start()
        outage["restored"] = True

    thread = threading.Thread(target=cut_and_restore, daemon=True)
    thread.start()
    try:
        assert main(["run", job]) == 0
        thread.join(30)
        written = steps()
    finally:
        if outage.get("restored") or not thread.is_alive():
            server.stop()
    out = capfd.readouterr().out
    assert outage.get("restored"), "the outage was never injected"
    assert outage["step"] < 100, "the run had finished before the outage"
    assert "a worker restart resumed" not in out  # the client's retries carried it, no restart
    assert summary(out)["checkpoint"].startswith("s3://outage/ckpt/t/")
    assert written == list(range(5, 101, 5))  # none lost to the outage, none repeated


def test_missing_checkpoint_bucket_is_one_line_error(
    ray_local, s3_server, synth_parquet, tmp_path, capsys
):
    job = write_job(
        tmp_path,
        data={"train": synth_parquet},
        checkpoint={"storage_path": "s3://no-such-ckpt-bucket/runs"},
        storage={"endpoint_url": s3_server, "region": "us-east-1"},
        tracking={"enabled": False},
    )
    assert main(["run", job]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "error: checkpoint.storage_path: bucket 'no-such-ckpt-bucket' does not exist "
        "('s3://no-such-ckpt-bucket/runs')"
    )


def test_nonfinite_skip_stops_after_max_skipped_steps(ray_local, synth_parquet, tmp_path, capsys):
    """`on_nonfinite: skip` on a model that only yields NaN ends after max_skipped_steps
    consecutive skips instead of looping forever."""
    job = write_job(
        tmp_path,
        data={"train": synth_parquet},
        optim={
            "lr": 1.0e30,
            "grad_clip": 0.0,
            "warmup_steps": 0,
            "max_steps": 200,
            "on_nonfinite": "skip",
            "max_skipped_steps": 3,
        },
        checkpoint={"every_steps": 1},
        tracking={"enabled": False},
    )
    assert main(["run", job]) == 1
    captured = capsys.readouterr()
    err = [ln for ln in captured.err.splitlines() if ln.startswith("error: ")]
    assert len(err) == 1 and "(3 consecutive steps skipped)" in err[0], captured.err[-2000:]
    assert captured.out.count("step skipped") == 2  # the third one stops
    ckpt = summary(captured.out)["checkpoint"]
    model, _, _ = load_checkpoint_model(ckpt)
    assert all(torch.isfinite(p).all() for p in model.state_dict().values())


def test_an_all_corrupt_training_set_ends_with_one_line(ray_local, tmp_path, capsys):
    """64 undecodable rows: no epoch ever yields a batch. The run ends (exit 2) with one line
    naming the data and the bad rows by reason, instead of looping over empty epochs."""
    from tests.service.data_fixtures import write_parquet_shards

    rows = [{"key": f"{i:04d}", "jpg": b"not a jpeg", "caption": "a red circle"} for i in range(64)]
    write_parquet_shards(rows, str(tmp_path / "bad"), rows_per_shard=32)
    job = write_job(
        tmp_path,
        data={"train": str(tmp_path / "bad")},
        optim={"max_steps": 50},
        tracking={"enabled": False},
    )
    assert main(["run", job]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error: ")]
    assert len(err) == 1, err
    assert err[0].startswith("error: data.train: ") and "corrupt image: 64" in err[0], err


def test_running_out_of_max_failures_ends_with_one_line(ray_local, synth_parquet, tmp_path, capfd):
    """With checkpoint.max_failures 0, one SIGKILLed worker ends the run: one line with the
    count and the last error, exit 1, the kept checkpoint named; rerunning resumes."""
    import os
    import signal
    import threading
    import time

    import psutil

    job = write_job(
        tmp_path,
        data={"train": synth_parquet},
        optim={"max_steps": 400, "log_every": 5},
        checkpoint={"every_steps": 5, "max_failures": 0},
        tracking={"enabled": False},
    )
    storage = tmp_path / "runs" / "checkpoints"
    killed: list[int] = []

    def killer():
        if not _wait_for(lambda: any(s >= 5 for s in _checkpoint_steps(storage)), 240):
            return
        time.sleep(1)
        for p in psutil.process_iter(["cmdline"]):
            if "RayTrainWorker" in " ".join(p.info["cmdline"] or []):
                os.kill(p.pid, signal.SIGKILL)
                killed.append(p.pid)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    assert main(["run", job]) == 1
    thread.join(5)
    assert killed, "no training worker was found to kill"
    err = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("error: ")]
    assert len(err) == 1, err
    assert err[0].startswith(
        "error: training failed after 0 restart(s) (checkpoint.max_failures): "
    )
    assert "running the same job again resumes from the checkpoint at step " in err[0]


def _tiny_filesystem(path: Path, size: str) -> bool:
    """Mount a tmpfs of `size` at `path` (needs root, as CI has); False where that is refused."""
    import subprocess

    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return done.returncode == 0


def test_a_checkpoint_write_that_runs_out_of_space_ends_with_one_line_and_resumes(
    ray_local, synth_parquet, tmp_path, capsys, monkeypatch
):
    """The workers' temporary folder (where a checkpoint is written before Ray copies it to
    storage) is a 64 KiB filesystem: the write fails with ENOSPC; the run ends with one line,
    exit 1, the previous checkpoint intact; once there is space, the same job resumes from it."""
    import os
    import subprocess

    from service import trainer

    job = write_job(
        tmp_path,
        data={"train": synth_parquet},
        optim={"max_steps": 4},
        checkpoint={"every_steps": 2},
        tracking={"enabled": False},
    )
    assert main(["run", job]) == 0
    capsys.readouterr()
    tiny = tmp_path / "tiny"
    if not _tiny_filesystem(tiny, "64k"):
        if os.environ.get("CI") == "true":
            pytest.fail("mounting a tmpfs was refused; CI runs as root and must be able to")
        pytest.skip("mounting a tmpfs needs root")
    try:
        monkeypatch.setitem(trainer.WORKER_ENV, "TMPDIR", str(tiny))
        assert main(["run", job, "--set", "optim.max_steps=8"]) == 1
    finally:
        subprocess.run(["umount", str(tiny)], check=False)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error: ")]
    assert err == [
        "error: the checkpoint at step 6 could not be written (No space left on device); the "
        "previous checkpoint is intact: free space and run the same job again to resume"
    ]
    assert max(_checkpoint_steps(tmp_path / "runs" / "checkpoints")) == 4
    monkeypatch.delitem(trainer.WORKER_ENV, "TMPDIR")
    assert main(["run", job, "--set", "optim.max_steps=8"]) == 0
    out = capsys.readouterr().out
    assert "resuming t from checkpoint at step 4" in out
    assert max(_checkpoint_steps(tmp_path / "runs" / "checkpoints")) == 8


def test_a_failed_run_names_the_data_tasks_own_error_not_rays_retry_hint(ray_local):
    """A real Ray Data task failure, as a training worker reports it: the run's one error line
    names the task's own exception (Ray appends Ray Data's exception and a retry hint after it,
    which is all the line used to show)."""
    import types

    import ray.data

    from service.trainer import _last_error

    def broken(batch):
        raise AttributeError("'Frame' object has no attribute 'draft'")

    with pytest.raises(Exception) as info:
        ray.data.range(4).map_batches(broken).take_all()
    assert "retry attempts" in str(info.value)  # what the line showed before
    failure = types.SimpleNamespace(worker_failures={0: info.value})
    assert _last_error(failure) == "AttributeError: 'Frame' object has no attribute 'draft'"
