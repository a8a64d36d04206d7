"""Shared fixtures for the service tests: a local Ray, a moto S3 server, synthetic Parquet, specs.

    def test_x(ray_local, s3_bucket, synth_parquet, make_spec):
        spec = make_spec(optim={"max_steps": 2})

`ray_local` depends on `s3_server`, so the AWS_* variables are set before Ray starts and every
Ray worker process inherits them.
"""

from __future__ import annotations

import copy
import os
import socket
from collections.abc import Iterator

import pytest

from tests.service.data_fixtures import write_parquet_shards

SYNTH_ROWS = 96
SYNTH_SHARDS = 3
SYNTH_IMAGE_SIZE = 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1; yields its endpoint URL (AWS_* env set for the session)."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        mp.delenv("AWS_SESSION_TOKEN", raising=False)
        mp.delenv("AWS_PROFILE", raising=False)
        try:
            yield endpoint
        finally:
            server.stop()


@pytest.fixture(scope="session")
def ray_local(s3_server: str) -> Iterator[None]:
    """A local 2-CPU Ray (512 MiB object store, no dashboard), shared by the whole session."""
    import ray

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(
        address="local",
        num_cpus=2,
        object_store_memory=512 * 1024 * 1024,
        include_dashboard=False,
        ignore_reinit_error=True,
    )
    try:
        yield
    finally:
        ray.shutdown()


_bucket_counter = 0


@pytest.fixture
def s3_bucket(s3_server: str) -> Iterator[str]:
    """A fresh, empty bucket on the moto server; yields its name."""
    import boto3

    global _bucket_counter
    _bucket_counter += 1
    name = f"test-bucket-{os.getpid()}-{_bucket_counter}"
    client = boto3.client(
        "s3",
        endpoint_url=s3_server,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    client.create_bucket(Bucket=name)
    yield name


@pytest.fixture(scope="session")
def synth_parquet(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A local folder of 3 Parquet shards, 96 synthetic 32 px rows (key, jpg, caption, label)."""
    from maskclip.synthetic import generate

    out = tmp_path_factory.mktemp("synth") / "train"
    rows = generate(SYNTH_ROWS, image_size=SYNTH_IMAGE_SIZE, seed=0)
    write_parquet_shards(iter(rows), str(out), rows_per_shard=SYNTH_ROWS // SYNTH_SHARDS)
    return str(out)


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


@pytest.fixture
def make_spec(synth_parquet: str, tmp_path):
    """make_spec(**sections) -> JobSpec: data.train=synth_parquet, nano model, batch 8, 4 steps.

    Sections are merged into the defaults, e.g. make_spec(data={"shuffle": False}).
    """
    from service.spec import build_spec

    def make(**sections) -> object:
        base = {
            "run": {"name": "test", "output_dir": str(tmp_path / "runs")},
            "model": {"size": "maskclip_nano", "vocab_size": 300},
            "data": {"train": synth_parquet},
            "optim": {"batch_size": 8, "max_steps": 4, "warmup_steps": 1},
            "tracking": {"enabled": False},
        }
        return build_spec(_merge(base, sections))

    return make


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test that ran `maskclip run` shows the end of each run's ray.log in its report
    (CI keeps only the report: a worker's traceback lives in that file)."""
    outcome = yield
    report = outcome.get_result()
    tmp = item.funcargs.get("tmp_path") if hasattr(item, "funcargs") else None
    if report.when != "call" or not report.failed or tmp is None:
        return
    from pathlib import Path

    for log in sorted(Path(tmp).glob("**/ray.log"))[:3]:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
        report.sections.append((f"end of {log}", "\n".join(lines[-80:])))
