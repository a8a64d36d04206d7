"""One live run per name, and a resume that is the same run: the lease, the spec check,
`--fresh` and what `maskclip validate` says it will do."""

from __future__ import annotations

import json
import time

import pytest
import yaml

from service import checkpoint as ckpt
from service.cli import main
from service.spec import build_spec
from tests.service.test_checkpoint import make


def _job(tmp_path, data, **run) -> str:
    job = {
        "run": {"name": "study", "output_dir": str(tmp_path / "runs"), **run},
        "model": {"size": "maskclip_nano", "vocab_size": 300},
        "data": {"train": data},
        "optim": {"batch_size": 16, "max_steps": 2, "warmup_steps": 1, "log_every": 1},
        "checkpoint": {"storage_path": str(tmp_path / "ckpts")},
        "tracking": {"enabled": False},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return str(path)


def _checkpoint_from(tmp_path, job: str, step: int = 5):
    """A checkpoint of run `study` whose job.yaml is `job` as resolved."""
    from service.spec import load_spec

    spec = load_spec(job)
    _, tok, task, opt, sched = make(tmp_path)
    return ckpt.save(
        tmp_path / "ckpts" / "study" / f"checkpoint_{step:06d}",
        task,
        opt,
        sched,
        step,
        0,
        tok.to_json(),
        spec.to_yaml(),
        None,
    )


def test_a_second_driver_of_a_live_run_is_refused_and_an_expired_lease_is_taken_over(
    tmp_path, synth_parquet, capsys
):
    job = _job(tmp_path, synth_parquet)
    holder = ckpt.Lease(str(tmp_path / "ckpts"), "study").acquire()
    try:
        started = time.monotonic()
        assert main(["run", job]) == 2
        assert time.monotonic() - started < 30  # refused before Ray starts
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(err) == 1, err
        assert err[0].startswith("error: run.name: 'study' is already running (")
        assert holder.owner in err[0]
    finally:
        holder.release()
    assert not (tmp_path / "ckpts" / "study" / ckpt.LEASE).exists()

    dead = ckpt.Lease(str(tmp_path / "ckpts"), "study", ttl=0.2).acquire()
    dead._stop.set()  # a killed driver: no more renewals, nothing deleted
    time.sleep(0.5)
    taker = ckpt.Lease(str(tmp_path / "ckpts"), "study").acquire()
    lease = json.loads((tmp_path / "ckpts" / "study" / ckpt.LEASE).read_text())
    assert lease["owner"] == taker.owner != dead.owner
    taker.release()


def test_the_lease_works_on_s3(s3_server, s3_bucket):
    from service.storage import s3_filesystem

    fs = s3_filesystem(endpoint_url=s3_server)
    first = ckpt.Lease(f"{s3_bucket}/ckpts", "study", fs).acquire()
    with pytest.raises(ckpt.RunBusy, match="'study' is already running"):
        ckpt.Lease(f"{s3_bucket}/ckpts", "study", fs).acquire()
    first.release()
    ckpt.Lease(f"{s3_bucket}/ckpts", "study", fs).acquire().release()


def test_resuming_with_another_seed_or_model_is_refused_naming_the_fields(
    tmp_path, synth_parquet, capsys
):
    """The study that changed only run.seed used to resume seed 0's finished run silently."""
    job = _job(tmp_path, synth_parquet)
    _checkpoint_from(tmp_path, job)
    assert main(["run", job, "--set", "run.seed=1", "--set", "model.mask_ratio=0.5"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err == [
        "error: run.name: 'study' has a checkpoint at step 5 made with another spec "
        "(model.mask_ratio: 0.75 -> 0.5; run.seed: 0 -> 1); run with --fresh to start over "
        "(the old checkpoints are kept aside), or choose another run.name"
    ]
    # the step budget may change: that is what resuming is for
    spec = build_spec(yaml.safe_load(open(job)))
    changed = spec.model_dump(mode="json")
    changed["optim"]["max_steps"] = 99
    assert ckpt.spec_changes(spec.to_yaml(), changed) == []


def test_validate_says_whether_the_run_resumes(tmp_path, synth_parquet, capsys):
    job = _job(tmp_path, synth_parquet)
    assert main(["validate", job]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == (
        f"# run study: starts fresh (no checkpoint under {tmp_path / 'ckpts'})"
    )
    assert yaml.safe_load(out)["run"]["name"] == "study"
    _checkpoint_from(tmp_path, job, step=7)
    assert main(["validate", job]) == 0
    assert capsys.readouterr().out.splitlines()[0] == (
        "# run study: resumes from the checkpoint at step 7"
    )


@pytest.mark.slow
def test_fresh_sets_the_old_checkpoints_aside_and_trains_from_step_0(
    ray_local, tmp_path, synth_parquet, capsys
):
    job = _job(tmp_path, synth_parquet)
    old = _checkpoint_from(tmp_path, job)
    assert main(["run", job, "--set", "run.seed=1", "--fresh"]) == 0
    out = capsys.readouterr().out
    assert "--fresh: the earlier checkpoints of study are now at " in out
    assert f"starting study fresh (no checkpoint under {tmp_path / 'ckpts'})" in out
    aside = [p for p in (tmp_path / "ckpts").iterdir() if p.name.startswith("study.replaced-")]
    assert len(aside) == 1 and (aside[0] / old.name / "meta.json").is_file()
    path, meta = ckpt.find_latest(str(tmp_path / "ckpts"), "study")
    assert meta["step"] == 2  # trained from scratch: 2 steps, not 5 + 2


def test_a_lease_whose_driver_on_this_machine_died_is_taken_over_at_once(tmp_path):
    """A driver killed with SIGKILL cannot delete its lease; rerunning the job on the same
    machine does not wait for the lease to expire when that driver's process is gone."""
    import subprocess
    import sys

    code = (
        "import os, sys; from service import checkpoint as c; "
        "c.Lease(sys.argv[1], 'study', ttl=600).acquire(); os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)
    held = json.loads((tmp_path / "study" / ckpt.LEASE).read_text())
    assert held["expires"] > time.time() + 500  # still "valid" by its clock
    taker = ckpt.Lease(str(tmp_path), "study").acquire()
    assert json.loads((tmp_path / "study" / ckpt.LEASE).read_text())["owner"] == taker.owner
    taker.release()
