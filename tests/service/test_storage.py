"""service.storage: URIs, the retrying S3 filesystem, sources resolved once (local and moto S3)."""

from __future__ import annotations

import os
import pickle
import shutil
import threading
import time

import pyarrow.fs as pafs
import pytest

from maskclip.synthetic import generate
from service import storage as S
from service.errors import DataError, UserError
from service.spec import StorageSection
from tests.service.conftest import SYNTH_ROWS, _free_port
from tests.service.data_fixtures import write_parquet_shards

# ---------------------------------------------------------------- URIs and filesystems


def test_split_uri(tmp_path, monkeypatch):
    fs, path = S.split_uri("s3://bucket/a/b/", endpoint_url="http://127.0.0.1:9")
    assert isinstance(fs, S.RetryingS3FileSystem) and path == "bucket/a/b"
    assert "127.0.0.1:9" in repr(fs.__reduce__())
    monkeypatch.chdir(tmp_path)
    fs, path = S.split_uri("data/x")
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "data" / "x")
    assert S.split_uri(f"file://{tmp_path}")[1] == str(tmp_path)
    cases = {
        "gs://b/x": "f: unsupported scheme 'gs://' in 'gs://b/x' (use a path or s3://)",
        "s3://": "f: no bucket in 's3://' (expected s3://bucket/prefix)",
        "s3://b*/x": "f: the bucket name cannot be a pattern in 's3://b*/x'",
        " ": "f: empty path",
    }
    for uri, msg in cases.items():
        with pytest.raises(UserError) as e:
            S.split_uri(uri, field="f")
        assert str(e.value) == msg


def test_display_and_first_line():
    s3 = S.s3_filesystem(endpoint_url="http://127.0.0.1:9")
    assert S.display("b/k.parquet", s3) == "s3://b/k.parquet"
    assert S.display("/d/k.parquet", pafs.LocalFileSystem()) == "/d/k.parquet"
    assert S.display("/d/k.parquet", None) == "/d/k.parquet"
    assert S.first_line(OSError("first\nsecond")) == "first"
    assert S.first_line(ValueError("")) == "ValueError"


def test_s3_filesystem_settings(monkeypatch):
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    spec = StorageSection(endpoint_url="http://127.0.0.1:9000", region="eu-west-1")
    fs = S.s3_filesystem(spec)
    assert fs.region == "eu-west-1"
    assert "127.0.0.1:9000" in repr(fs.__reduce__())  # endpoint without the scheme
    assert "'http'" in repr(fs.__reduce__())
    fs2 = S.s3_filesystem(StorageSection(endpoint_url="https://minio.example:9000/"))
    assert "minio.example:9000" in repr(fs2.__reduce__())
    assert fs2.region == "us-east-1"  # an endpoint without a region: never probe EC2 metadata
    # explicit arguments win over the spec's section
    fs3 = S.s3_filesystem(spec, endpoint_url="http://other:1", region="ap-south-1")
    assert fs3.region == "ap-south-1" and "other:1" in repr(fs3.__reduce__())


def test_s3_filesystem_keeps_its_retries_when_pickled(s3_server):
    """Ray pickles the filesystem to the controller, workers and data tasks; a plain
    pyarrow S3FileSystem comes back with ~1 s of retries. Ours still waits out a server that
    only starts 3 s after the request."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    fs = pickle.loads(pickle.dumps(S.s3_filesystem(endpoint_url=endpoint, region="us-east-1")))
    assert isinstance(fs, S.RetryingS3FileSystem)
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(
        Bucket="late-server"
    )  # moto's state is per process: the late server on `port` serves this bucket too
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    starter = threading.Timer(3.0, server.start)
    starter.start()
    try:
        t = time.perf_counter()
        info = fs.get_file_info("late-server")
        assert info.type.name == "Directory"
        assert time.perf_counter() - t >= 2.9
    finally:
        starter.join()
        server.stop()


def test_ensure_bucket(tmp_path, s3_bucket):
    fs, path = S.ensure_bucket(str(tmp_path / "new" / "ckpt"), None, "checkpoint.storage_path")
    assert (tmp_path / "new" / "ckpt").is_dir() and path == str(tmp_path / "new" / "ckpt")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError) as e:
        S.ensure_bucket(str(tmp_path / "file"), None, "out")
    assert str(e.value) == f"out: {str(tmp_path / 'file')!r} is a file, expected a folder"
    fs, path = S.ensure_bucket(f"s3://{s3_bucket}/runs", None, "checkpoint.storage_path")
    assert S.is_s3(fs) and path == f"{s3_bucket}/runs"
    with pytest.raises(UserError) as e:
        S.ensure_bucket("s3://no-such-bucket-abc/runs", None, "checkpoint.storage_path")
    assert str(e.value) == (
        "checkpoint.storage_path: bucket 'no-such-bucket-abc' does not exist "
        "('s3://no-such-bucket-abc/runs')"
    )


def test_copy_to_local(tmp_path, s3_bucket):
    src = tmp_path / "ck"
    src.mkdir()
    (src / "meta.json").write_text('{"step": 3}')
    with S.copy_to_local(str(src), None) as d:
        assert d == str(src)
    fs = S.s3_filesystem()
    pafs.copy_files(str(src), f"{s3_bucket}/ck", destination_filesystem=fs)
    with S.copy_to_local(f"{s3_bucket}/ck", fs) as d:
        assert open(f"{d}/meta.json").read() == '{"step": 3}'
        kept = d
    assert not os.path.exists(kept)


# ---------------------------------------------------------------- local sources


def test_resolve_local_folder_glob_and_file(synth_parquet):
    src = S.resolve_source(synth_parquet)
    assert isinstance(src.filesystem, pafs.LocalFileSystem)
    assert len(src.paths) == 3 and src.paths == sorted(src.paths) and src.root == synth_parquet
    assert src.columns == ["key", "jpg", "caption", "label"]
    assert S.resolve_source(f"{synth_parquet}/*.parquet").paths == src.paths
    one = S.resolve_source(src.paths[1])
    assert one.paths == [src.paths[1]] and one.root == synth_parquet
    assert src.num_rows() == SYNTH_ROWS and one.num_rows() == SYNTH_ROWS // 3


def test_markers_hidden_files_and_globs(tmp_path, synth_parquet):
    folder = tmp_path / "ds"
    shutil.copytree(synth_parquet, folder / "a")
    shutil.copytree(synth_parquet, folder / "b")
    (folder / "_SUCCESS").write_bytes(b"")
    (folder / "_manifest.json").write_text("{}")
    (folder / "a" / ".shard-00009.parquet").write_bytes(b"half written")
    (folder / "_tmp").mkdir()
    (folder / "_tmp" / "x.parquet").write_bytes(b"half written")
    (folder / "a" / "README.md").write_text("hello")
    a = [str(folder / "a" / f"shard-0000{i}.parquet") for i in range(3)]
    b = [str(folder / "b" / f"shard-0000{i}.parquet") for i in range(3)]
    assert S.resolve_source(str(folder)).paths == a + b
    assert S.resolve_source(str(folder / "*")).paths == a + b  # a folder match: its files
    assert S.resolve_source(str(folder / "a" / "*")).paths == a  # Parquet ones when any
    with pytest.raises(DataError, match=r"cannot read Parquet schema of .*/a/README\.md: "):
        S.resolve_source(str(folder / "a" / "*.md"))  # what a narrow glob names is taken
    with pytest.raises(DataError, match="no files match"):  # '*' stays within a name
        S.resolve_source(str(folder / "*.parquet"))
    assert S.resolve_source(str(folder / "**" / "shard-00001.parquet")).paths == [a[1], b[1]]
    assert S.resolve_source(str(folder / "b" / "shard-0000[02].parquet")).paths == [b[0], b[2]]


def test_a_folder_with_split_folders_below_is_refused_not_read_whole(tmp_path, synth_parquet):
    """`maskclip data synth --val-rows` writes out/train and out/val: data.train pointing at
    `out` would train on the validation rows. One line naming the split folders instead."""
    folder = tmp_path / "shapes"
    shutil.copytree(synth_parquet, folder / "train")
    shutil.copytree(synth_parquet, folder / "val")
    with pytest.raises(DataError) as e:
        S.resolve_source(str(folder), field="data.train")
    assert str(e.value) == (
        f"data.train: '{folder}' holds the split folders train/, val/; point data.train at one "
        f"of them (e.g. {folder}/train/), not at the folder above them"
    )
    assert len(S.resolve_source(str(folder / "train")).paths) == 3
    # shards at the top next to a nested split, deeper splits and other names for them
    shutil.copy(folder / "train" / "shard-00000.parquet", folder / "top.parquet")
    shutil.rmtree(folder / "train")
    with pytest.raises(DataError, match=r"holds the split folders val/; point"):
        S.resolve_source(str(folder))
    shutil.move(folder / "val", folder / "v1" / "Validation")
    with pytest.raises(DataError, match=r"holds the split folders v1/Validation/; point"):
        S.resolve_source(str(folder))
    # other subfolders are read (sharded writers nest by part); a glob is taken as written
    shutil.move(folder / "v1" / "Validation", folder / "part-1")
    assert len(S.resolve_source(str(folder)).paths) == 4
    shutil.move(folder / "part-1", folder / "val")
    assert len(S.resolve_source(str(folder / "**" / "*.parquet")).paths) == 4


def test_summary_says_what_is_read(synth_parquet, tmp_path):
    assert S.resolve_source(synth_parquet, field="data.train").summary() == (
        f"data.train: {synth_parquet}: 3 Parquet files, {SYNTH_ROWS} rows; "
        "columns: key, jpg, caption, label"
    )
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"jpg": [b"x", None], "caption": ["a", "b"], "status": ["success", "x"]})
    pq.write_table(table, tmp_path / "00000.parquet")
    assert S.resolve_source(str(tmp_path / "00000.parquet"), field="data.val").summary() == (
        f"data.val: {tmp_path}/00000.parquet: 1 Parquet file, 2 rows; columns: jpg, caption, "
        "status (failed downloads by 'status' are skipped, not counted as bad)"
    )


def test_local_errors_are_one_line(tmp_path, synth_parquet):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    cases = {
        str(tmp_path / "nope"): "data.train: no such file or directory",
        str(tmp_path / "empty" / "*.parquet"): "data.train: no files match",
        str(tmp_path / "empty"): "data.train: no Parquet files at",
        "gs://bucket/x": "data.train: unsupported scheme 'gs://'",
        str(tmp_path / "bad.parquet"): "data.train: cannot read Parquet schema of ",
    }
    for uri, start in cases.items():
        with pytest.raises(DataError) as e:
            S.resolve_source(uri)
        assert str(e.value).startswith(start), str(e.value)
        assert "\n" not in str(e.value)
    with pytest.raises(DataError, match=r"^data\.val: no such file"):
        S.resolve_source(str(tmp_path / "nope"), None, field="data.val")


def test_require_open_and_iter_batches(tmp_path, synth_parquet):
    src = S.resolve_source(synth_parquet)
    src.require(["jpg", "caption"])
    with pytest.raises(DataError) as e:
        src.require(["jpg", "image"])
    assert str(e.value) == (
        f"data.train: column 'image' not found in {synth_parquet}/shard-00000.parquet "
        "(columns: key, jpg, caption, label)"
    )
    captions = [c for b in src.iter_batches(["caption"], 10) for c in b.column(0).to_pylist()]
    assert len(captions) == SYNTH_ROWS and all(isinstance(c, str) for c in captions)
    # a file that breaks after the listing: one line naming it
    folder = tmp_path / "d"
    shutil.copytree(synth_parquet, folder)
    src = S.resolve_source(str(folder))
    (folder / "shard-00001.parquet").write_bytes(b"garbage")
    with pytest.raises(DataError) as e:
        list(src.iter_batches(["caption"]))
    assert str(e.value).startswith(
        f"data.train: cannot read Parquet file {folder}/shard-00001.parquet: "
    )
    with pytest.raises(DataError, match="cannot read Parquet file .*shard-00001"):
        src.num_rows()


# ---------------------------------------------------------------- S3 sources


class _CountingS3(S.RetryingS3FileSystem):
    """Counts the listings (FileSelector calls) resolve_source makes."""

    lists = 0

    def get_file_info(self, paths_or_selector):
        if isinstance(paths_or_selector, pafs.FileSelector):
            type(self).lists += 1
        return super().get_file_info(paths_or_selector)


def test_s3_sources_and_errors(s3_server, s3_bucket, monkeypatch):
    uris = write_parquet_shards(iter(generate(30, image_size=16)), f"s3://{s3_bucket}/d/x", 12)
    assert len(uris) == 3
    src = S.resolve_source(f"s3://{s3_bucket}/d")
    assert src.paths == [u.removeprefix("s3://") for u in uris] and S.is_s3(src.filesystem)
    glob = S.resolve_source(f"s3://{s3_bucket}/d/x/*-00001.parquet")
    assert glob.paths == [src.paths[1]] and glob.root == f"{s3_bucket}/d/x"
    assert S.resolve_source(uris[2]).paths == [src.paths[2]]
    assert src.num_rows() == 30
    storage = StorageSection(endpoint_url=s3_server, region="us-east-1")
    assert S.resolve_source(f"s3://{s3_bucket}/d", storage).paths == src.paths

    with pytest.raises(DataError) as e:
        S.resolve_source(f"s3://{s3_bucket}/empty/prefix")
    assert str(e.value) == f"data.train: no Parquet files at 's3://{s3_bucket}/empty/prefix'"
    with pytest.raises(DataError) as e:
        S.resolve_source("s3://no-such-bucket-xyz/data")
    assert str(e.value) == (
        "data.train: bucket 'no-such-bucket-xyz' does not exist ('s3://no-such-bucket-xyz/data')"
    )
    with pytest.raises(DataError) as e:
        src.require(["image"])
    assert str(e.value) == (
        f"data.train: column 'image' not found in s3://{s3_bucket}/d/x/shard-00000.parquet "
        "(columns: key, jpg, caption, label)"
    )

    # one LIST per resolve; the checks, the row count and reading list nothing more
    monkeypatch.setattr(S, "RetryingS3FileSystem", _CountingS3)
    _CountingS3.lists = 0
    src = S.resolve_source(f"s3://{s3_bucket}/d/")
    assert isinstance(src.filesystem, _CountingS3) and _CountingS3.lists == 1
    src.require(["jpg", "caption"])
    assert src.num_rows() == src.num_rows() == 30
    assert sum(b.num_rows for b in src.iter_batches(["caption"])) == 30
    assert _CountingS3.lists == 1
