"""The terminal: a run prints the product's lines and nothing of Ray's own (they go to the run's
ray.log); --version, shell completion and --json work."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from service.cli import main
from tests.service import test_evaluation

world = test_evaluation.world  # its module-scoped checkpoint fixture

# what Ray printed on a default run before (issue 17): the Train V2 cleaner's state-API
# warnings, Ray Data execution plans, C++ core worker lines, any worker line with Ray's prefix
RAY_INTERNAL = ("PlacementGroupCleaner", "Execution plan", "core_worker", "(pid=", " pid=")


def _job(tmp_path: Path, train: str, **optim) -> Path:
    job = {
        "run": {"name": "quiet", "output_dir": str(tmp_path / "runs")},
        "model": {"size": "maskclip_nano", "vocab_size": 300},
        "data": {"train": train, "val": train},
        "optim": {"batch_size": 16, "max_steps": 4, "warmup_steps": 1, "log_every": 2, **optim},
        "checkpoint": {"every_steps": 2},
        "tracking": {"enabled": False},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def test_a_run_prints_no_ray_internal_line(synth_parquet, tmp_path):
    """A real `maskclip run` (its own local Ray, as `make demo`): stdout and stderr hold the
    product's lines only; Ray's own lines are in runs/quiet/ray.log, whose path is printed."""
    job = _job(tmp_path, synth_parquet)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", "run", str(job)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    leaked = [ln for ln in output.splitlines() if any(s in ln for s in RAY_INTERNAL)]
    assert leaked == [], "\n".join(leaked[:20])
    assert "Traceback" not in output, output[-3000:]
    lines = proc.stdout.splitlines()
    # the worker's lines reach the terminal, plain (stdout is not a terminal here: no bar)
    assert "step 2/4" in " ".join(lines) and "step 4/4" in " ".join(lines), proc.stdout
    assert any(ln.startswith("validation ") for ln in lines), proc.stdout
    assert any(ln.startswith("checkpoint: ") for ln in lines), proc.stdout
    ray_log = tmp_path / "runs" / "quiet" / "ray.log"
    assert f"Ray's own log lines: {ray_log}" in proc.stdout
    text = ray_log.read_text()
    assert "pid=" in text  # worker stderr (Ray Data, Ray Train) landed here
    assert "Failed to query Ray Train Controller actor state" not in text  # the cause is fixed
    # each product line once (Ray Train's print patch would log worker prints a second time)
    assert sum(ln.startswith("step 4/4") for ln in lines) == 1


def test_version_is_the_package_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"maskclip {version('maskclip-service')}\n"


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_script_names_the_commands(shell, capsys, tmp_path):
    assert main(["completion", shell]) == 0
    script = capsys.readouterr().out
    for command in ("run", "validate", "eval", "submit", "completion"):
        assert command in script
    assert "--zero-shot" in script and "--no-wait" in script
    if shell == "bash":
        path = tmp_path / "maskclip.bash"
        path.write_text(script)
        # the script parses, and completing `maskclip va` offers `validate`
        probe = (
            f"source {path}; COMP_WORDS=(maskclip va); COMP_CWORD=1; COMP_LINE='maskclip va'; "
            'COMP_POINT=${#COMP_LINE}; _shtab_maskclip; echo "${COMPREPLY[@]}"'
        )
        done = subprocess.run(["bash", "-c", probe], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["validate"], done.stdout + done.stderr


def test_validate_json(synth_parquet, tmp_path, capsys):
    job = _job(tmp_path, synth_parquet)
    assert main(["validate", str(job), "--json", "--set", "run.tags={release: 2, ok: true}"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["resume"].startswith("run quiet: starts fresh (no checkpoint under ")
    assert doc["spec"]["optim"]["max_steps"] == 4
    assert doc["spec"]["run"]["tags"] == {"release": "2", "ok": "true"}


def test_epochs_with_max_steps_is_one_hint_line(synth_parquet, tmp_path, capsys):
    job = _job(tmp_path, synth_parquet)
    assert main(["validate", str(job), "--set", "optim.epochs=2"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: optim: optim.max_steps (4) and optim.epochs (2) are both set: set "
        "optim.max_steps=null to use epochs, or optim.epochs=null"
    ]


def test_quiet_and_verbose_flags(synth_parquet, tmp_path, capsys):
    """-q keeps data (validate's spec) and drops product info lines; the flags go before or
    after the command."""
    from service import terminal

    job = _job(tmp_path, synth_parquet)
    assert main(["-q", "validate", str(job)]) == 0
    assert terminal.verbosity() == -1
    terminal.get_logger("test").info("an info line")
    terminal.get_logger("test").warning("a warning")
    terminal.get_logger("test").log(terminal.RESULT, "checkpoint: somewhere")
    terminal.product_line("step 2/4  loss 1.0")  # a worker's progress: hidden under -q
    terminal.product_line("warning: non-finite loss at step 3; step skipped")  # shown
    out, err = capsys.readouterr()
    assert out.startswith("# run quiet: starts fresh") and "an info line" not in out
    assert out.endswith("checkpoint: somewhere\nwarning: non-finite loss at step 3; step skipped\n")
    assert "step 2/4" not in out
    assert err == "warning: a warning\n"
    assert main(["validate", str(job), "-v"]) == 0
    assert terminal.verbosity() == 1
    main(["validate", str(job)])  # back to the default for the tests after this one
    assert terminal.verbosity() == 0


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_worker_output_is_routed_by_stream(tmp_path, monkeypatch):
    """What Ray's log_to_driver hands the driver: a worker's stdout is the product's (printed
    without Ray's prefix), its stderr goes to ray.log, autoscaler status reports to ray.log and
    only its events to the terminal."""
    from service import terminal

    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    path = terminal.route_ray(tmp_path / "ray.log")
    worker = {"pid": 41, "ip": "10.0.0.1", "actor_name": "RayTrainWorker"}
    terminal._on_worker_output({**worker, "is_err": False, "lines": ["step 2/4  loss 1.0"]})
    terminal._on_worker_output(
        {**worker, "is_err": True, "lines": ["Execution plan of Dataset train_0: ..."]}
    )
    status = ["======== Autoscaler status: 2026 ========", "Node status"]
    terminal._on_worker_output({"pid": "autoscaler", "is_err": False, "lines": status})
    assert out.getvalue() == "step 2/4  loss 1.0\n"
    assert err.getvalue() == ""
    text = path.read_text()
    assert "(RayTrainWorker pid=41) Execution plan of Dataset train_0" in text
    assert "(autoscaler) Node status" in text
    # a Ray driver-side logger: its records go to the file; an ERROR also as one line
    import logging

    terminal.route_ray(path)
    logging.getLogger("ray.data").info("Starting execution of Dataset x")
    logging.getLogger("ray").error("GCS lost\nmore detail")
    assert "Starting execution of Dataset x" in path.read_text()
    assert err.getvalue() == f"ray error: GCS lost (details: {path})\n"


def test_progress_bar_on_a_terminal_plain_lines_off_it(monkeypatch):
    from service import terminal

    plain = io.StringIO()
    monkeypatch.setattr(sys, "stdout", plain)
    terminal.product_line("step 2/10  loss 1.5  8.0 samples/s  ETA 9s")
    assert plain.getvalue() == "step 2/10  loss 1.5  8.0 samples/s  ETA 9s\n"

    tty = _Tty()
    monkeypatch.setattr(sys, "stdout", tty)
    try:
        terminal.product_line("step 2/10  loss 1.5  8.0 samples/s  ETA 9s")
        terminal.product_line("validation val_zero_shot_top1 0.500")
        terminal.product_line("step 10/10  loss 0.5  9.0 samples/s  ETA 0s")
        bar = terminal._state["bar"]
        assert (bar.n, bar.total, bar.smoothing) == (10, 10, 0)
    finally:
        terminal.end_progress()
    shown = tty.getvalue()
    assert "10/10" in shown and "loss 0.5, 9.0 samples/s" in shown
    assert "validation val_zero_shot_top1 0.500\n" in shown  # printed above the bar
    assert "ETA 0s" not in shown  # the bar's ETA replaces the worker's


def test_status_and_list_json_fields():
    from ray.job_submission import JobDetails, JobStatus, JobType

    from service.cli.cluster import job_json

    info = JobDetails(
        type=JobType.SUBMISSION,
        submission_id="maskclip-quick-1",
        entrypoint="maskclip run job.yaml",
        status=JobStatus.SUCCEEDED,
        message="done",
        start_time=1_700_000_000_000,
        end_time=1_700_000_060_000,
        metadata={"maskclip_run": "quick"},
    )
    assert job_json(info) == {
        "job": "maskclip-quick-1",
        "run": "quick",
        "status": "SUCCEEDED",
        "message": "done",
        "entrypoint": "maskclip run job.yaml",
        "start": "2023-11-14T22:13:20+00:00",
        "end": "2023-11-14T22:14:20+00:00",
    }


def test_a_ray_error_is_one_line_and_v_gives_the_traceback(monkeypatch, capsys):
    from ray.exceptions import RaySystemError

    from service.cli import train as train_cmd

    def raising(args):
        raise RaySystemError("the GCS went away\nsecond line\nthird line")

    monkeypatch.setattr(train_cmd, "cmd_validate", raising)
    assert main(["validate", "job.yaml"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: RaySystemError: System error: the GCS")
    assert err[0].endswith("-v for the traceback)")
    with pytest.raises(RaySystemError):
        main(["-v", "validate", "job.yaml"])
    main(["schema"])  # back to the default verbosity
    capsys.readouterr()


def test_verbose_leaves_ray_output_alone(tmp_path):
    from service import terminal

    terminal.configure(1)
    try:
        assert terminal.route_ray(tmp_path / "ray.log") is None
        assert terminal.route_worker_output() is False
        assert not (tmp_path / "ray.log").exists()
    finally:
        terminal.configure(0)


def test_eval_json_alone_prints_only_json_and_says_what_it_does(world, capsys):
    """`maskclip eval ... --json`: stdout is the JSON document (pipe it to jq); the phases
    (loading, encoding) go to stderr."""
    argv = ["eval", world["ckpt"], "--zero-shot", world["test"], "--no-mlflow", "--json"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert 0.0 <= result["metrics"]["zero_shot_top1"] <= 1.0
    assert err.splitlines()[:3] == [
        f"evaluating {world['ckpt']}: zero-shot on {world['test']}",
        f"loading {world['ckpt']}",
        "encoding on cpu (step 3): at most 5000 rows per split, 256 at a time",
    ]
