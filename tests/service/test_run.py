"""`maskclip run` end to end with the real parts: local Ray, an MLflow server, moto S3."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pyarrow.fs as pafs
import pytest
import yaml

from service.cli import main
from tests.service.data_fixtures import write_parquet_shards
from tests.service.mlflow_fixture import MlflowServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    yield server.uri
    server.stop()


def write_job(tmp_path: Path, **sections) -> str:
    job = {
        "run": {"name": "t", "output_dir": str(tmp_path / "runs")},
        "model": {"size": "maskclip_nano", "vocab_size": 300},
        "optim": {"batch_size": 16, "max_steps": 6, "warmup_steps": 1, "log_every": 2},
        "checkpoint": {"every_steps": 3},
    }
    for k, v in sections.items():
        job.setdefault(k, {}).update(v)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return str(path)


def summary(out: str) -> dict[str, str]:
    lines = [ln for ln in out.splitlines() if ln.startswith(("checkpoint: ", "mlflow run: "))]
    return dict(ln.split(": ", 1) for ln in lines)


def test_local_run_then_resume_continues_steps_and_mlflow_run(
    ray_local, synth_parquet, mlflow_server, tmp_path, capsys
):
    job = write_job(
        tmp_path,
        data={"train": synth_parquet, "val": synth_parquet},
        tracking={"tracking_uri": mlflow_server, "experiment": "test-run"},
    )
    assert main(["run", job]) == 0
    first = summary(capsys.readouterr().out)
    ckpt_dir = Path(first["checkpoint"])
    meta = json.loads((ckpt_dir / "meta.json").read_text())
    assert meta["step"] == 6 and meta["mlflow_run_id"] == first["mlflow run"]
    assert (ckpt_dir / "tokenizer.json").is_file() and (ckpt_dir / "job.yaml").is_file()

    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(first["mlflow run"])
    assert run.data.params["model.mask_ratio"] == "0.75"
    assert run.data.params["optim.batch_size"] == "16"
    for metric in (
        "loss",
        "loss_contrastive",
        "loss_image_distill",
        "loss_text_distill",
        "lr",
        "logit_scale",
        "ema_momentum",
        "samples_per_s",
        "data_rows_bad",
        "val_zero_shot_top1",
        "val_image_to_text_R1",
    ):
        assert metric in run.data.metrics, metric
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"spec", "model", "figures"} <= artifacts
    model_files = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert {
        "model/model.safetensors",
        "model/tokenizer.json",
        "model/job.yaml",
        "model/meta.json",
    } <= model_files

    # same job name, more steps: resumes from step 6 and continues the same MLflow run
    assert main(["run", job, "--set", "optim.max_steps=10"]) == 0
    second = summary(capsys.readouterr().out)
    assert second["mlflow run"] == first["mlflow run"]
    assert json.loads((Path(second["checkpoint"]) / "meta.json").read_text())["step"] == 10
    steps = [m.step for m in client.get_metric_history(first["mlflow run"], "loss")]
    assert steps == sorted(set(steps)) and steps[-1] == 10 and 2 in steps and 8 in steps
    exp = client.get_experiment_by_name("test-run")
    assert len(client.search_runs([exp.experiment_id])) == 1


ENV_SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "aws-Sekr1t-4f9c0b",
    "MLFLOW_TRACKING_USERNAME": "mlflow-User-c3d2aa",
    "MLFLOW_TRACKING_PASSWORD": "mlflow-Pass-81e0cd",
    "MLFLOW_TRACKING_TOKEN": "mlflow-Tok-5a1b9e",
    "RAY_AUTH_TOKEN": "ray-Tok-9d0e7f",
}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_environment_secrets_never_leave_it(
    ray_local, synth_parquet, mlflow_server, tmp_path, capfd, monkeypatch
):
    """Secrets planted in the environment (AWS, MLflow basic auth and token, a Ray token) are
    nowhere a run or `render` writes: stdout and stderr (file-descriptor level, read once after
    both commands), every MLflow param, tag, metric name and artifact file of the run, every
    file under the output dir (job.yaml, tokenizer.json, the checkpoint's meta.json, ...) and the
    rendered manifests. Each place is first shown to hold what it should (not vacuous)."""
    for name, value in ENV_SECRETS.items():
        monkeypatch.setenv(name, value)
    job = write_job(
        tmp_path,
        run={"name": "secrets", "tags": {"team": "vision"}},
        data={"train": synth_parquet, "val": synth_parquet},
        optim={"max_steps": 2, "log_every": 1},
        checkpoint={"every_steps": 2},
        tracking={"tracking_uri": mlflow_server, "experiment": "test-secrets"},
    )
    assert main(["run", job]) == 0
    assert main(["render", job, "--set", "data.train=s3://b/train", "--set", "data.val=null"]) == 0
    out, err = capfd.readouterr()  # everything both commands (and Ray's forwarding) printed

    places: dict[str, bytes] = {"stdout": out.encode(), "stderr": err.encode()}
    assert "kind: RayJob" in out and "kind: ConfigMap" in out  # the manifests are in stdout
    ran = summary(out)
    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(ran["mlflow run"])
    assert run.data.params["optim.max_steps"] == "2" and run.data.tags["team"] == "vision"
    for kind, values in (("param", run.data.params), ("tag", run.data.tags)):
        for key, value in values.items():
            places[f"mlflow {kind} {key}"] = f"{key}={value}".encode()
    places["mlflow metric names"] = " ".join(run.data.metrics).encode()
    artifacts = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "art")))
    for name, blob in _files(artifacts).items():
        places[f"mlflow artifact {name}"] = blob
    assert {"spec/job.yaml", "model/job.yaml", "model/meta.json"} <= {
        name.removeprefix("mlflow artifact ") for name in places
    }
    written = _files(tmp_path / "runs")
    meta = next(n for n in written if n.endswith("meta.json") and "checkpoint" in n)
    assert json.loads(written[meta])["step"] == 2 and "secrets/job.yaml" in written
    places.update({f"file runs/{name}": blob for name, blob in written.items()})

    leaks = [
        f"{env} in {where}"
        for where, blob in places.items()
        for env, value in ENV_SECRETS.items()
        if value.encode() in blob
    ]
    assert leaks == []


@pytest.mark.timeout(120)  # the failure this guards against is a run that waits forever
@pytest.mark.parametrize("scaling", ["cpus", "gpus"])
def test_a_request_larger_than_the_local_cluster_exits_2_at_once(
    ray_local, synth_parquet, tmp_path, capsys, scaling
):
    """More CPUs / GPUs than the local Ray cluster has (2 CPUs in ray_local): Ray would queue the
    workers forever; check_fits refuses at once with one line giving the sizes, exit 2."""
    import time

    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if scaling == "cpus":
        wanted = {"num_workers": 4, "cpus_per_worker": 0.5}
        message = (
            "error: scaling: 4 workers x 0.5 CPU leave 0 of the 2 CPUs of this Ray cluster "
            "(1 node) to Ray Data, which needs 2 (4 x scaling.data_cpus_per_worker 0.5); lower "
            "scaling.num_workers or scaling.cpus_per_worker, or give the cluster more CPUs"
        )
    else:
        wanted = {"num_workers": 1, "use_gpu": True, "gpus_per_worker": gpus + 1}
        message = (
            f"error: scaling: 1 workers x {float(gpus + 1)} GPU requested but this Ray cluster "
            f"has {gpus:g} GPUs; set scaling.use_gpu=false or fewer workers"
        )
    job = write_job(
        tmp_path, data={"train": synth_parquet}, scaling=wanted, tracking={"enabled": False}
    )
    t0 = time.monotonic()
    assert main(["run", job]) == 2
    seconds = time.monotonic() - t0
    ours = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert ours == [message]
    assert seconds < 30, seconds


def test_s3_data_and_checkpoints(ray_local, s3_server, s3_bucket, synth_parquet, tmp_path, capsys):
    fs = pafs.S3FileSystem(
        endpoint_override=s3_server.removeprefix("http://"),
        scheme="http",
        access_key="testing",
        secret_key="testing",
        region="us-east-1",
    )
    for f in Path(synth_parquet).glob("*.parquet"):
        with fs.open_output_stream(f"{s3_bucket}/train/{f.name}") as out:
            out.write(f.read_bytes())
    job = write_job(
        tmp_path,
        data={"train": f"s3://{s3_bucket}/train/"},
        checkpoint={"storage_path": f"s3://{s3_bucket}/ckpt", "every_steps": 3},
        storage={"endpoint_url": s3_server, "region": "us-east-1"},
        tracking={"enabled": False},
    )
    assert main(["run", job]) == 0
    uri = summary(capsys.readouterr().out)["checkpoint"]
    assert uri.startswith(f"s3://{s3_bucket}/ckpt/t/")
    info = fs.get_file_info(uri.removeprefix("s3://") + "/meta.json")
    assert info.type == pafs.FileType.File


def test_corrupt_rows_are_skipped_and_counted(ray_local, tmp_path, capsys):
    from maskclip.synthetic import generate

    rows = generate(64, image_size=32, seed=3)
    for i in range(0, 64, 16):  # 4 bad rows of 64: 6%
        rows[i]["jpg"] = b"not an image" if i % 32 else b""
    write_parquet_shards(iter(rows), str(tmp_path / "data"), rows_per_shard=32)
    job = write_job(
        tmp_path,
        data={"train": str(tmp_path / "data"), "max_bad_fraction": 0.2},
        tracking={"enabled": False},
        optim={"max_steps": 4},
    )
    assert main(["run", job]) == 0
    out = capsys.readouterr().out
    # "run t: step 4/4, loss X, data rows N (K skipped)"
    line = next(ln for ln in out.splitlines() if ln.startswith("run t:"))
    seen, rest = line.split(", data rows ", 1)[1].split(" (", 1)
    skipped = rest.removesuffix(" skipped)")
    # 4 steps of 16 need more than the 60 good rows of one pass; a decode task reads and counts
    # whole 32-row files, each with 2 bad rows
    assert int(seen) >= 64 and int(seen) % 32 == 0, line
    assert int(skipped) == int(seen) // 16, line


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"model": {"sise": "x"}}, "model.sise: unknown key"),
        ({"model": {"mask_ratio": 1.5}}, "model.mask_ratio: Input should be less than 1 (got 1.5)"),
        ({"optim": {"lr": "fast"}}, "optim.lr: Input should be a valid number"),
        ({"data": {"train": "/no/such/data"}}, "data.train: no such file or directory"),
        ({"storage": {"aws_secret_access_key": "x"}}, "credentials never go in the job spec"),
    ],
)
def test_spec_errors_are_one_line_exit_2(tmp_path, capsys, extra, message):
    sections = {"data": {"train": str(tmp_path)}}
    for key, value in extra.items():
        sections.setdefault(key, {}).update(value)
    job = write_job(tmp_path, **sections)
    assert main(["validate", job]) == 2
    # only our lines: Ray actors of earlier tests in this process may still print to stderr
    ours = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(ours) == 1 and message in ours[0], ours


def test_validate_prints_resolved_spec_with_overrides(tmp_path, capsys):
    job = write_job(tmp_path, data={"train": str(tmp_path)})
    assert (
        main(["validate", job, "--set", "model.mask_ratio=0.6", "--set", "optim.max_steps=7"]) == 0
    )
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["model"]["mask_ratio"] == 0.6 and resolved["optim"]["max_steps"] == 7
    assert resolved["model"]["masking"] == "block"  # defaults filled in


def test_schema_command_prints_json_schema(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert "data" in schema["required"] and "model" in schema["properties"]


def test_bad_datasets_fail_fast_with_one_line(tmp_path, capsys):
    """Checked before any Ray process starts: missing columns, no shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "nocols").mkdir()
    pq.write_table(
        pa.table({"key": ["0"], "image": [b"x"], "text": ["a cat"]}),
        tmp_path / "nocols" / "part-0.parquet",
    )
    (tmp_path / "empty").mkdir()
    cases = {
        "nocols": "data.train: column 'jpg' not found",
        "empty": "data.train: no Parquet files",
    }
    for folder, message in cases.items():
        job = write_job(
            tmp_path, data={"train": str(tmp_path / folder)}, tracking={"enabled": False}
        )
        assert main(["run", job]) == 2
        errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], errors
        assert not (tmp_path / "runs").exists()  # nothing left behind


def test_dense_validation_folders_are_checked_before_ray_starts(synth_parquet, tmp_path, capsys):
    """data.dense_probe_split: val on a dense root with only train/ and test/: `maskclip
    validate`, `run` and `sweep` stop with one line naming the folder, exit 2, before any run folder,
    checkpoint storage or Ray process, instead of failing in a worker at the first validation."""
    import ray

    from tests.service.data_fixtures import make_dense_dataset

    dense = make_dense_dataset(tmp_path, rows=2, test_rows=2)  # train/ and test/, no val/
    data = {"train": synth_parquet, "dense_probe": str(dense), "dense_probe_split": "val"}
    job = write_job(tmp_path, data=data, tracking={"enabled": False})
    ray_was_up = ray.is_initialized()
    message = f"error: data.dense_probe (val/): no such file or directory '{dense}/val'"
    assert main(["validate", job]) == 2  # validate already says so, without torch or Ray
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert errors == [message]
    assert main(["run", job]) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert errors == [message]
    sweep = {"parameters": {"model.mask_ratio": {"uniform": [0.5, 0.8]}}, "metric": "loss"}
    job = write_job(tmp_path, data=data, tracking={"enabled": False}, sweep=sweep)
    assert main(["sweep", job]) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert errors == [message]
    assert not (tmp_path / "runs").exists()  # no run folder, no checkpoint storage
    assert ray.is_initialized() == ray_was_up  # no Ray started here
    # once val/ is there, the same check passes: it resolves train/ and val/
    from service.evaluation import dense_sources
    from service.spec import load_spec

    (dense / "test").rename(dense / "val")
    found = dense_sources(load_spec(job))
    assert {k: v.uri for k, v in found.items()} == {
        "data.dense_probe (train/)": f"{dense}/train",
        "data.dense_probe (val/)": f"{dense}/val",
    }


def test_an_elastic_fit_waits_15_s_for_a_placement_and_a_fixed_one_keeps_rays_60(monkeypatch):
    """Ray Train reads RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S from the driver when fit starts:
    set for an elastic run's fit only, put back after it, and a value the user exported wins."""
    import os

    from service.spec import build_spec
    from service.trainer import START_TIMEOUT_ENV, _start_timeout

    elastic = build_spec({"data": {"train": "d"}, "scaling": {"num_workers": 2, "min_workers": 1}})
    fixed = build_spec({"data": {"train": "d"}, "scaling": {"num_workers": 2}})
    monkeypatch.delenv(START_TIMEOUT_ENV, raising=False)
    with _start_timeout(elastic):
        assert os.environ[START_TIMEOUT_ENV] == "15.0"
    assert START_TIMEOUT_ENV not in os.environ
    with _start_timeout(fixed):
        assert START_TIMEOUT_ENV not in os.environ
    monkeypatch.setenv(START_TIMEOUT_ENV, "90")
    with _start_timeout(elastic):
        assert os.environ[START_TIMEOUT_ENV] == "90"
    assert os.environ[START_TIMEOUT_ENV] == "90"
