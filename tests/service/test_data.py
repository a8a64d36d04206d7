"""service.data: sources (local / S3 via moto), one-line errors, decoding, bad-row accounting."""

from __future__ import annotations

import io
import time
import uuid

import numpy as np
import pytest
from PIL import Image

from maskclip.synthetic import generate
from maskclip.tokenizer import Tokenizer
from service import data as D
from service.errors import UserError
from tests.service.conftest import SYNTH_ROWS
from tests.service.data_fixtures import write_parquet_shards

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    captions = [r["caption"] for r in generate(64, image_size=8)]
    return Tokenizer.train(captions, vocab_size=300, context_length=32)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


def _odd_but_fine_images() -> dict[str, bytes]:
    grey16 = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60).astype(np.uint16)
    palette = Image.new("RGB", (32, 32), (10, 200, 30)).convert("P")
    palette.info["transparency"] = 0
    return {
        "cmyk": _jpeg(Image.new("CMYK", (32, 32), (0, 200, 50, 10))),
        "grey": _png(Image.new("L", (32, 32), 128)),
        "rgba": _png(Image.new("RGBA", (32, 32), (200, 10, 10, 100))),
        "grey16": _png(Image.fromarray(grey16)),
        "palette": _png(palette),
    }


def _bad_and_odd_records() -> tuple[list[dict], dict[str, int]]:
    """Good synthetic rows + rows that must be dropped (with expected reasons) + odd-but-fine."""
    good = generate(20, image_size=32, seed=1)
    jpg = good[0]["jpg"]
    row = {"label": "circle"}
    bad = [
        {**row, "key": "zero", "jpg": b"", "caption": "zero bytes"},
        {**row, "key": "trunc", "jpg": jpg[: len(jpg) // 2], "caption": "truncated jpeg"},
        {**row, "key": "text", "jpg": b"this is not an image at all", "caption": "text bytes"},
        {**row, "key": "noimg", "jpg": None, "caption": "no image"},
        {**row, "key": "nocap", "jpg": jpg, "caption": None},
        {**row, "key": "emptycap", "jpg": jpg, "caption": "   "},
        {**row, "key": "huge", "jpg": _png(Image.new("RGB", (200, 200))), "caption": "huge"},
    ]
    expected = {
        D.R_EMPTY_IMAGE: 1,
        D.R_CORRUPT_IMAGE: 2,
        D.R_MISSING_IMAGE: 1,
        D.R_MISSING_CAPTION: 1,
        D.R_EMPTY_CAPTION: 1,
        D.R_LARGE_IMAGE: 1,
    }
    odd = [
        {**row, "key": f"odd-{k}", "jpg": v, "caption": f"an odd {k} image"}
        for k, v in _odd_but_fine_images().items()
    ]
    long_caption = {**row, "key": "long", "jpg": jpg, "caption": "a red circle " * 500}
    return good + bad + odd + [long_caption], expected


def _rows(ds, batch_size: int = 8) -> list[dict]:
    out = []
    for b in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        out.append(b)
    return out


def _wait_stats(actor, rows: int, timeout: float = 20.0) -> dict:
    import ray

    deadline = time.monotonic() + timeout
    while True:
        stats = ray.get(actor.get.remote())
        if stats["rows_seen"] >= rows or time.monotonic() > deadline:
            return stats
        time.sleep(0.1)


def _op_names(ds) -> list[str]:
    names, todo = [], [ds._logical_plan.dag]
    while todo:
        op = todo.pop()
        names.append(op.name)
        todo.extend(op.input_dependencies)
    return names


# ---------------------------------------------------------------- sources and errors


def test_resolve_local_folder_glob_and_file(synth_parquet):
    paths, fs = D.resolve_source(synth_parquet, None)
    assert fs is None and len(paths) == 3 and paths == sorted(paths)
    assert D.resolve_source(f"{synth_parquet}/*.parquet", None)[0] == paths
    assert D.resolve_source(paths[1], None)[0] == [paths[1]]
    assert D.count_rows(synth_parquet, None) == SYNTH_ROWS


def test_markers_and_hidden_files_are_skipped(tmp_path, synth_parquet):
    import shutil

    folder = tmp_path / "ds"
    shutil.copytree(synth_parquet, folder)
    (folder / "_SUCCESS").write_bytes(b"")
    (folder / "_manifest.json").write_text("{}")
    (folder / ".shard-00009.parquet").write_bytes(b"half written")
    (folder / "_tmp").mkdir()
    (folder / "_tmp" / "x.parquet").write_bytes(b"half written")
    (folder / "README.md").write_text("hello")
    want = [str(folder / f"shard-0000{i}.parquet") for i in range(3)]
    assert D.resolve_source(str(folder), None)[0] == want
    assert D.resolve_source(str(folder / "*"), None)[0] == want
    assert D.resolve_source(str(folder / "*.md"), None)[0] == [str(folder / "README.md")]


def test_local_errors_are_one_line(tmp_path, synth_parquet):
    cases = {
        str(tmp_path / "nope"): "data.train: no such file or directory",
        str(tmp_path / "*.parquet"): "data.train: no files match",
        str(tmp_path): "data.train: no Parquet files at",
        "gs://bucket/x": "data.train: unsupported scheme 'gs://'",
    }
    for uri, start in cases.items():
        with pytest.raises(UserError) as e:
            D.resolve_source(uri, None)
        assert str(e.value).startswith(start), str(e.value)
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"^data\.val: no such file"):
        D.resolve_source(str(tmp_path / "nope"), None, field="data.val")


def test_check_columns(synth_parquet):
    assert D.check_columns(synth_parquet, None, ["jpg", "caption"]) == [
        "key",
        "jpg",
        "caption",
        "label",
    ]
    with pytest.raises(UserError) as e:
        D.check_columns(synth_parquet, None, ["jpg", "image"])
    msg = str(e.value)
    assert msg.startswith("data.train: column 'image' not found in ")
    assert msg.endswith("shard-00000.parquet (columns: key, jpg, caption, label)")


def test_s3_sources_and_errors(s3_server, s3_bucket):
    uris = write_parquet_shards(iter(generate(30, image_size=16)), f"s3://{s3_bucket}/d/x", 12)
    assert len(uris) == 3
    paths, fs = D.resolve_source(f"s3://{s3_bucket}/d", None)
    assert paths == [u.removeprefix("s3://") for u in uris] and fs is not None
    assert D.resolve_source(f"s3://{s3_bucket}/d/x/*-00001.parquet", None)[0] == [paths[1]]
    assert D.count_rows(f"s3://{s3_bucket}/d/", None) == 30
    # An explicit endpoint in the spec's storage section works too (credentials still from env).
    from service.spec import StorageSection

    storage = StorageSection(endpoint_url=s3_server, region="us-east-1")
    assert D.resolve_source(f"s3://{s3_bucket}/d", storage)[0] == paths
    assert D.check_columns(f"s3://{s3_bucket}/d", storage, ["jpg"])[1] == "jpg"

    with pytest.raises(UserError) as e:
        D.resolve_source(f"s3://{s3_bucket}/empty/prefix", None)
    assert str(e.value) == f"data.train: no Parquet files at 's3://{s3_bucket}/empty/prefix'"
    with pytest.raises(UserError) as e:
        D.resolve_source("s3://no-such-bucket-xyz/data", None)
    assert str(e.value).startswith("data.train: bucket 'no-such-bucket-xyz' does not exist")
    with pytest.raises(UserError) as e:
        D.check_columns(f"s3://{s3_bucket}/d", None, ["image"])
    assert str(e.value) == (
        f"data.train: column 'image' not found in s3://{s3_bucket}/d/x/shard-00000.parquet "
        "(columns: key, jpg, caption, label)"
    )


def test_s3_filesystem_settings():
    from service.spec import StorageSection

    fs = D.s3_filesystem(StorageSection(endpoint_url="http://127.0.0.1:9000", region="eu-west-1"))
    assert fs.region == "eu-west-1"
    assert "127.0.0.1:9000" in repr(fs.__reduce__())  # endpoint without the scheme
    fs2 = D.s3_filesystem(StorageSection(endpoint_url="https://minio.example:9000/"))
    assert "minio.example:9000" in repr(fs2.__reduce__())


def test_sample_captions(make_spec):
    spec = make_spec()
    caps = D.sample_captions(spec, 40)  # needs more than one 32-row shard
    assert len(caps) == 40 and all(isinstance(c, str) and c for c in caps)
    assert len(D.sample_captions(spec, 10_000)) == SYNTH_ROWS
    short = D.sample_captions(make_spec(data={"max_caption_chars": 5}), 3)
    assert all(len(c) <= 5 for c in short)
    with pytest.raises(UserError, match=r"^data\.train: column 'text' not found"):
        D.sample_captions(make_spec(data={"caption_column": "text"}), 3)


def test_check_bad_fraction():
    stats = {
        "rows_seen": 120,
        "rows_bad": 37,
        "bad_reasons": {"empty caption": 7, "corrupt image": 30},
    }
    with pytest.raises(UserError) as e:
        D.check_bad_fraction(stats, 0.05)
    assert str(e.value) == (
        "data.train: 37 of 120 rows (30.8%) could not be used (corrupt image: 30, "
        "empty caption: 7); data.max_bad_fraction is 5%"
    )
    D.check_bad_fraction(stats, 0.5)  # below the threshold
    D.check_bad_fraction({**stats, "rows_seen": 40, "rows_bad": 39}, 0.05)  # too few rows yet
    D.check_bad_fraction({"rows_seen": 0, "rows_bad": 0, "bad_reasons": {}}, 0.0)
    with pytest.raises(UserError, match=r"1 of 50 rows \(2\.0%\).*is 1%$"):
        D.check_bad_fraction({"rows_seen": 50, "rows_bad": 1, "bad_reasons": {"x": 1}}, 0.01)


# ---------------------------------------------------------------- decoding (in-process)


def test_decode_batch_reasons_without_ray(tokenizer):
    records, expected = _bad_and_odd_records()
    records.append({"key": "badutf8", "jpg": records[0]["jpg"], "caption": b"\xff\xfe bad"})
    records.append({"key": "bytes-ok", "jpg": records[0]["jpg"], "caption": b"ok"})
    expected = {**expected, D.R_BAD_CAPTION: 1}
    batch = {
        "jpg": np.array([r["jpg"] for r in records], dtype=object),
        "caption": np.array([r["caption"] for r in records], dtype=object),
        "label": np.array([r.get("label") for r in records], dtype=object),
    }
    dec = D.DecodeBatch(
        image_column="jpg",
        caption_column="caption",
        label_column="label",
        tokenizer_json=tokenizer.to_json(),
        image_size=24,
        train=False,
        max_pixels=10_000,
        max_caption_chars=50,
        stats_actor_name=None,
        keep_caption=True,
    )
    (out,) = list(dec(batch))
    n_bad = sum(expected.values())
    n_good = len(records) - n_bad
    assert out["image"].shape == (n_good, 3, 24, 24) and out["image"].dtype == np.float32
    assert np.isfinite(out["image"]).all()
    assert out["tokens"].shape == (n_good, 32) and out["tokens"].dtype == np.int64
    assert (out["tokens"][:, 0] == tokenizer.sot_id).all()
    assert len(out["label"]) == len(out["caption"]) == n_good
    assert max(len(c) for c in out["caption"]) == 50  # the long caption was truncated, kept
    assert sum(c.startswith("an odd") for c in out["caption"]) == 5  # CMYK/grey/RGBA/16-bit/P
    # An all-bad batch yields nothing (no empty tensor block).
    only_bad = {k: v[20:27] for k, v in batch.items()}
    assert list(dec(only_bad)) == []


# ---------------------------------------------------------------- Ray Data


def test_build_dataset_local_shapes_and_streaming(ray_local, make_spec, tokenizer):
    spec = make_spec()
    name = f"stats-{uuid.uuid4().hex[:8]}"
    actor = D.get_or_create_stats(name)
    ds = D.build_dataset(spec, "train", tokenizer.to_json(), name)
    ops = _op_names(ds)
    assert not any("Shuffle" in o or "Sort" in o or "Repartition" in o for o in ops), ops
    # The only all-to-all op shuffles the list of file paths, before any file is read.
    assert ops.index("RandomizeBlockOrder") > ops.index("MapBatches(_read_files)"), ops
    n, size = 0, spec.image_size
    for b in ds.iter_batches(batch_size=8, batch_format="numpy"):
        assert b["image"].shape[1:] == (3, size, size) and b["image"].dtype == np.float32
        assert b["tokens"].shape[1:] == (spec.context_length,) and b["tokens"].dtype == np.int64
        assert set(b) == {"image", "tokens"}
        n += len(b["image"])
    assert n == SYNTH_ROWS
    stats = _wait_stats(actor, SYNTH_ROWS)
    assert stats == {"rows_seen": SYNTH_ROWS, "rows_bad": 0, "bad_reasons": {}}
    assert D.get_or_create_stats(name)._actor_id == actor._actor_id  # same named actor
    # A second pass (epoch) streams again through the same lazy dataset.
    assert sum(len(b["tokens"]) for b in ds.iter_batches(batch_size=32)) == SYNTH_ROWS


def test_build_dataset_s3_matches_local(ray_local, s3_bucket, make_spec, synth_parquet, tokenizer):
    rows = generate(SYNTH_ROWS, image_size=32, seed=0)  # the same rows as synth_parquet
    write_parquet_shards(iter(rows), f"s3://{s3_bucket}/val", 40)

    def val_rows(uri):
        spec = make_spec(data={"val": uri})
        ds = D.build_dataset(spec, "val", tokenizer.to_json(), None)
        out = []
        for b in _rows(ds, batch_size=16):
            assert set(b) == {"image", "tokens", "label", "caption"}
            out.extend(zip(b["caption"], b["label"], b["image"].sum(axis=(1, 2, 3)).round(2)))
        return sorted(out)

    from_s3 = val_rows(f"s3://{s3_bucket}/val/")
    assert len(from_s3) == SYNTH_ROWS
    assert from_s3 == val_rows(synth_parquet)  # eval transform: deterministic


def test_build_dataset_drops_and_counts_bad_rows(ray_local, tmp_path, make_spec, tokenizer):
    records, expected = _bad_and_odd_records()
    folder = tmp_path / "bad"
    write_parquet_shards(iter(records), str(folder), rows_per_shard=13)
    spec = make_spec(data={"train": str(folder), "max_image_pixels": 10_000, "shuffle": False})
    name = f"stats-{uuid.uuid4().hex[:8]}"
    actor = D.get_or_create_stats(name)
    ds = D.build_dataset(spec, "train", tokenizer.to_json(), name)
    n = sum(len(b["image"]) for b in _rows(ds, batch_size=4))
    n_bad = sum(expected.values())
    assert n == len(records) - n_bad
    stats = _wait_stats(actor, len(records))
    assert stats == {"rows_seen": len(records), "rows_bad": n_bad, "bad_reasons": expected}
    with pytest.raises(UserError, match=r"^data\.train: 7 of 33 rows \(21\.2%\) could not be used"):
        D.check_bad_fraction(stats, spec.data.max_bad_fraction, min_rows=10)
    D.check_bad_fraction(stats, 0.25, min_rows=10)


def test_build_dataset_user_errors(ray_local, make_spec, tokenizer, tmp_path):
    with pytest.raises(UserError, match=r"^data\.train: column 'image' not found in .*"):
        D.build_dataset(
            make_spec(data={"image_column": "image"}), "train", tokenizer.to_json(), None
        )
    with pytest.raises(UserError, match=r"^data\.val: not set$"):
        D.build_dataset(make_spec(), "val", tokenizer.to_json(), None)
    with pytest.raises(UserError, match=r"^data\.val: no such file or directory"):
        D.build_dataset(
            make_spec(data={"val": str(tmp_path / "missing")}), "val", tokenizer.to_json(), None
        )


def test_s3_filesystem_keeps_its_retries_when_pickled(s3_server):
    """Ray pickles the filesystem to the controller, workers and data tasks; a plain
    pyarrow S3FileSystem comes back with ~1 s of retries. Ours still waits out a server that
    only starts 3 s after the request."""
    import pickle
    import threading

    import boto3
    from moto.server import ThreadedMotoServer

    from service.spec import StorageSection
    from tests.service.conftest import _free_port

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    fs = pickle.loads(
        pickle.dumps(D.s3_filesystem(StorageSection(endpoint_url=endpoint, region="us-east-1")))
    )
    assert isinstance(fs, D.RetryingS3FileSystem)
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


def test_idle_scheduling_loop_is_paced_and_busy_steps_are_not():
    from service.data_pacing import MIN_STEP_S, PaceIdleLoop

    pace = PaceIdleLoop()
    t = time.perf_counter()
    for _ in range(11):  # a spinning loop: back-to-back steps
        pace.on_execution_step(None)
    assert time.perf_counter() - t >= 10 * MIN_STEP_S * 0.95
    assert pace.paused == 10
    time.sleep(MIN_STEP_S * 1.5)  # a step that waited on tasks
    t = time.perf_counter()
    pace.on_execution_step(None)
    assert time.perf_counter() - t < MIN_STEP_S / 2 and pace.paused == 10


def test_datasets_carry_the_pacing_callback(ray_local, make_spec, tokenizer):
    from service.data_pacing import PaceIdleLoop

    ds = D.build_dataset(make_spec(), "train", tokenizer.to_json(), None)
    assert PaceIdleLoop in ds.context.custom_execution_callback_classes
    assert PaceIdleLoop in ds.context.execution_callback_classes
