"""service.data: caption sampling, decoding, the Ray Data pipeline and its bad-row accounting
(sources themselves: test_storage.py; the row rules: test_rows.py)."""

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
from service import rows as R
from service.control import (
    MIN_ROWS_FOR_BAD_FRACTION,
    RunControl,
    bad_rows_message,
    control_actor,
)
from service.errors import DataError
from service.storage import resolve_source
from tests.service.conftest import SYNTH_ROWS
from tests.service.data_fixtures import write_parquet_shards

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    captions = [r["caption"] for r in generate(64, image_size=8)]
    return Tokenizer.train(captions, vocab_size=300, context_length=32)


def decoder_kwargs(tokenizer: Tokenizer, **changes) -> dict:
    """DecodeBatch's keyword arguments for jpg/caption rows at 16 px, `changes` applied."""
    return {
        "image_column": "jpg",
        "caption_column": "caption",
        "label_column": None,
        "tokenizer_json": tokenizer.to_json(),
        "image_size": 16,
        "train": False,
        "max_pixels": 10_000,
        "max_caption_chars": 50,
        "stats_actor_name": None,
        "keep_caption": False,
    } | changes


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
        R.R_EMPTY_IMAGE: 1,
        R.R_CORRUPT_IMAGE: 2,
        R.R_MISSING_IMAGE: 1,
        R.R_MISSING_CAPTION: 1,
        R.R_EMPTY_CAPTION: 1,
        R.R_LARGE_IMAGE: 1,
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


# ---------------------------------------------------------------- sampling and the run's helpers


def test_sample_captions(make_spec, synth_parquet):
    src = resolve_source(synth_parquet)
    caps = D.sample_captions(src, 40, 300)  # needs more than one 32-row shard
    assert len(caps) == 40 and all(isinstance(c, str) and c for c in caps)
    assert len(D.sample_captions(src, 10_000, 300)) == SYNTH_ROWS
    assert all(len(c) <= 5 for c in D.sample_captions(src, 3, 5))
    with pytest.raises(DataError, match=r"^data\.train: column 'text' not found"):
        D.sample_captions(src, 3, 300, column="text")


def test_tokenizer_and_step_count_take_the_resolved_source(make_spec, synth_parquet, monkeypatch):
    from service import trainer

    src = resolve_source(synth_parquet)

    def again(*a, **k):
        raise AssertionError("resolved the source a second time")

    monkeypatch.setattr(trainer, "resolve_source", again)
    spec = make_spec(data={"tokenizer_captions": 50})
    tok = Tokenizer.from_json(trainer.prepare_tokenizer(spec, None, None, src))
    assert tok.vocab_size <= spec.model.vocab_size
    epochs = make_spec(optim={"max_steps": None, "epochs": 3, "batch_size": 8})
    assert trainer.total_steps(epochs, src) == 3 * (SYNTH_ROWS // 8)
    assert trainer.total_steps(spec, src) == 4  # max_steps


def test_run_control_decides_when_too_many_rows_are_bad():
    """What the run uses (service.control; the dead DataStats copy is gone)."""
    control = RunControl()
    control.add(100, 30, {"empty caption": 7, "corrupt image": 23})
    control.add(20, 7, {"corrupt image": 7})
    stats = control.get()
    assert stats == {
        "rows_seen": 120,
        "rows_bad": 37,
        "rows_not_downloaded": 0,
        "bad_reasons": {"empty caption": 7, "corrupt image": 30},
    }
    assert control.too_many_bad(0.05) and not control.too_many_bad(0.5)
    assert bad_rows_message(stats, 0.05) == (
        "data.train: 37 of 120 rows (30.8%) could not be used (corrupt image: 30, "
        "empty caption: 7); data.max_bad_fraction is 0.05"
    )
    few = RunControl()
    few.add(MIN_ROWS_FOR_BAD_FRACTION - 1, MIN_ROWS_FOR_BAD_FRACTION - 2)
    assert not few.too_many_bad(0.05)  # too few rows yet
    assert not RunControl().too_many_bad(0.0)  # nothing seen
    one = RunControl()
    one.add(MIN_ROWS_FOR_BAD_FRACTION, 1, {"x": 1})
    assert one.too_many_bad(0.01) and not one.too_many_bad(0.02)


def test_failed_downloads_never_count_toward_max_bad_fraction():
    """A crawl where 30% of the downloads failed and 4% of the rest are bad: within 0.05."""
    control = RunControl()
    control.add(1000, 28, {"corrupt image": 28}, 300)
    stats = control.get()
    assert stats["rows_not_downloaded"] == 300 and stats["rows_bad"] == 28
    assert not control.too_many_bad(0.05) and control.too_many_bad(0.03)  # 28 / 700 = 4%
    assert bad_rows_message(stats, 0.03) == (
        "data.train: 28 of 700 downloaded rows (4.0%) could not be used (corrupt image: 28); "
        "data.max_bad_fraction is 0.03"
    )
    only_failed = RunControl()
    only_failed.add(MIN_ROWS_FOR_BAD_FRACTION + 10, 0, {}, MIN_ROWS_FOR_BAD_FRACTION)
    assert not only_failed.too_many_bad(0.0)  # 10 downloaded rows: too few to judge


# ---------------------------------------------------------------- decoding (in-process)


def test_decode_batch_reasons_without_ray(tokenizer):
    records, expected = _bad_and_odd_records()
    records.append({"key": "badutf8", "jpg": records[0]["jpg"], "caption": b"\xff\xfe bad"})
    records.append({"key": "bytes-ok", "jpg": records[0]["jpg"], "caption": b"ok", "label": "x"})
    records.append({"key": "nolabel", "jpg": records[0]["jpg"], "caption": "ok", "label": None})
    expected = {**expected, R.R_BAD_CAPTION: 1, R.R_MISSING_LABEL: 1}
    batch = {
        "jpg": np.array([r["jpg"] for r in records], dtype=object),
        "caption": np.array([r["caption"] for r in records], dtype=object),
        "label": np.array([r.get("label") for r in records], dtype=object),
    }
    dec = D.DecodeBatch(
        **decoder_kwargs(tokenizer, label_column="label", image_size=24, keep_caption=True)
    )
    (out,) = list(dec(batch))
    n_bad = sum(expected.values())
    n_good = len(records) - n_bad
    assert out["image"].shape == (n_good, 3, 24, 24) and out["image"].dtype == np.uint8
    assert out["tokens"].shape == (n_good, 32) and out["tokens"].dtype == np.int64
    assert (out["tokens"][:, 0] == tokenizer.sot_id).all()
    assert len(out["label"]) == len(out["caption"]) == n_good
    assert "" not in set(out["label"])  # a null label is a bad row, never a class ""
    assert max(len(c) for c in out["caption"]) == 50  # the long caption was truncated, kept
    assert sum(c.startswith("an odd") for c in out["caption"]) == 5  # CMYK/grey/RGBA/16-bit/P
    # An all-bad batch yields nothing (no empty tensor block).
    only_bad = {k: v[20:27] for k, v in batch.items()}
    assert list(dec(only_bad)) == []


@pytest.mark.parametrize("train", [True, False])
def test_uint8_batches_normalise_to_the_float_rows_of_before(tokenizer, train):
    """The pipeline ships uint8 crops (4x fewer bytes through Ray's object store); normalised by
    the consumer (normalise_images, as the training loop does) they equal, bit for bit, what the
    float path gave: each row through rows.clean_row with the normalising transform (what
    DecodeBatch emitted before, and what `maskclip eval` / in-loop validation still use), with
    the same random crops (same torch seed) for "train"."""
    import torch

    from maskclip.transforms import eval_transform, normalise_images, train_transform

    records = generate(12, image_size=40, seed=5)
    cols = {c: np.array([r[c] for r in records], dtype=object) for c in ("jpg", "caption")}
    dec = D.DecodeBatch(**decoder_kwargs(tokenizer, image_size=24, train=train))
    torch.manual_seed(11)
    (out,) = dec(cols)
    assert out["image"].dtype == np.uint8 and out["image"].shape == (12, 3, 24, 24)
    new = normalise_images(torch.from_numpy(out["image"]))

    old_transform = (train_transform if train else eval_transform)(24)  # normalise=True
    torch.manual_seed(11)
    old = []
    for r in records:
        row, why = R.clean_row(
            r["jpg"],
            r["caption"],
            max_pixels=10_000,
            max_caption_chars=50,
            transform=old_transform,
            min_side=dec.min_side,
        )
        assert why is None
        old.append(row.image)
    old = torch.stack(old)
    assert new.dtype == old.dtype == torch.float32
    assert torch.equal(new, old)
    assert torch.equal(normalise_images(new), new)  # already float: left as it is


def _img2dataset_records(n: int, broken=(5, 25)) -> list[dict]:
    """img2dataset-style rows: key, jpg, caption, status, error_message; 3 in every 10 rows
    are failed downloads (null jpg, status failed_to_download); the rows at `broken` were
    downloaded but hold an unreadable image: bad rows, not failed downloads."""
    out = []
    for i, r in enumerate(generate(n, image_size=16, seed=3)):
        failed = i % 10 in (0, 3, 7)
        out.append(
            {
                "key": f"{i:09d}",
                "jpg": None if failed else (b"\xff\xd8 broken" if i in broken else r["jpg"]),
                "caption": r["caption"],
                "status": "failed_to_download" if failed else "success",
                "error_message": "HTTP Error 404: Not Found" if failed else None,
            }
        )
    return out


def _write_img2dataset(records: list[dict], folder, rows_per_shard: int) -> None:
    """Shards named as img2dataset names them (00000.parquet, ...), its columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    schema = pa.schema(
        [
            ("key", pa.string()),
            ("jpg", pa.binary()),
            ("caption", pa.string()),
            ("status", pa.string()),
            ("error_message", pa.string()),
        ]
    )
    for k in range(0, len(records), rows_per_shard):
        table = pa.Table.from_pylist(records[k : k + rows_per_shard], schema=schema)
        pq.write_table(table, folder / f"{k // rows_per_shard:05d}.parquet")


def test_decode_batch_skips_failed_downloads_and_counts_them_apart(tokenizer):
    records = _img2dataset_records(40)
    batch = {c: np.array([r[c] for r in records], dtype=object) for c in ("jpg", "caption")}
    batch["status"] = np.array([r["status"] for r in records], dtype=object)
    calls = []

    class Stats:  # stands in for the control actor's handle: records what is sent
        class add:  # noqa: N801
            @staticmethod
            def remote(*args):
                calls.append(args)

    kwargs = decoder_kwargs(tokenizer, train=True, stats_actor_name="unused")
    dec = D.DecodeBatch(status_column="status", **kwargs)
    dec._stats, dec._stats_at = Stats, time.monotonic()
    (out,) = list(dec(batch))
    assert len(out["image"]) == 40 - 12 - 2  # 12 failed downloads, 2 broken images
    assert calls == [(40, 2, {R.R_CORRUPT_IMAGE: 2}, 12)]
    # the same rows without the status column: every failed download is a bad row
    calls.clear()
    plain = D.DecodeBatch(**kwargs)
    plain._stats, plain._stats_at = Stats, time.monotonic()
    list(plain({k: v for k, v in batch.items() if k != "status"}))
    assert calls == [(40, 14, {R.R_MISSING_IMAGE: 12, R.R_CORRUPT_IMAGE: 2}, 0)]


@pytest.mark.parametrize(
    "scaling, plan",
    [
        ({}, (2, 0.5)),  # a 2-core laptop: 1 worker, 0.5 CPU for data
        ({"num_workers": 2}, (2, 0.5)),
        ({"num_workers": 3, "data_cpus_per_worker": 0.5}, (3, 0.5)),
        ({"use_gpu": True, "num_workers": 4}, (24, 1.0)),  # 6 per GPU by default
        ({"use_gpu": True, "num_workers": 4, "data_cpus_per_worker": 6}, (24, 1.0)),  # s3.yaml
        ({"num_workers": 2, "data_cpus_per_worker": 2.5}, (5, 1.0)),
        ({"data_cpus_per_worker": 1}, (1, 1.0)),  # benchmarks/pipeline.py --cpus 1
    ],
)
def test_decode_tasks_scale_with_the_cpus_kept_for_data(make_spec, scaling, plan):
    assert D.decode_plan(make_spec(scaling=scaling)) == plan


def test_a_decode_batch_is_8_mb_and_blocks_16_mb():
    assert D.map_batch_size(224) == 64 and D.map_batch_size(32) == 256
    assert D.TARGET_BLOCK_BYTES == 16 << 20


def test_fewer_files_than_decode_tasks_are_shared_out_by_rows(tmp_path):
    """One 10-row file and 4 decode tasks: 4 shares that read every row exactly once, in order;
    with as many files as tasks, one unit per file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    one = tmp_path / "one"
    one.mkdir()
    pq.write_table(pa.table({"i": list(range(10))}), one / "a.parquet", row_group_size=3)
    src = resolve_source(str(one))
    units = D.read_units(src, 4)
    assert [(u["start"], u["stop"]) for u in units] == [(0, 2), (2, 5), (5, 7), (7, 10)]
    read = [
        v
        for u in units
        for rb in src.iter_file(u["path"], ["i"], 2, u["start"], u["stop"])
        for v in rb.column(0).to_pylist()
    ]
    assert read == list(range(10))
    assert D.read_units(src, 1) == [{"path": src.paths[0], "start": 0, "stop": None}]


# ---------------------------------------------------------------- Ray Data


def test_build_dataset_local_shapes_and_streaming(ray_local, make_spec, tokenizer):
    spec = make_spec()
    name = f"control-{uuid.uuid4().hex[:8]}"
    actor = control_actor(name, create=True)
    ds = D.build_dataset(resolve_source(spec.data.train), spec, "train", tokenizer.to_json(), name)
    assert ds.context.target_max_block_size == D.TARGET_BLOCK_BYTES
    from ray.data import DataContext

    assert DataContext.get_current().target_max_block_size != D.TARGET_BLOCK_BYTES  # a copy
    ops = _op_names(ds)
    assert not any("Shuffle" in o or "Sort" in o or "Repartition" in o for o in ops), ops
    # The only all-to-all op shuffles the list of files, before any file is read.
    assert ops.index("RandomizeBlockOrder") > ops.index("MapBatches(read_decode)"), ops
    n, size = 0, spec.image_size
    for b in ds.iter_batches(batch_size=8, batch_format="numpy"):
        assert b["image"].shape[1:] == (3, size, size) and b["image"].dtype == np.uint8
        assert b["tokens"].shape[1:] == (spec.context_length,) and b["tokens"].dtype == np.int64
        assert set(b) == {"image", "tokens"}
        n += len(b["image"])
    assert n == SYNTH_ROWS
    stats = _wait_stats(actor, SYNTH_ROWS)
    assert stats == {
        "rows_seen": SYNTH_ROWS,
        "rows_bad": 0,
        "rows_not_downloaded": 0,
        "bad_reasons": {},
    }
    # A second pass (epoch) streams again through the same lazy dataset.
    assert sum(len(b["tokens"]) for b in ds.iter_batches(batch_size=32)) == SYNTH_ROWS


def test_build_dataset_s3_matches_local(ray_local, s3_bucket, make_spec, synth_parquet, tokenizer):
    rows = generate(SYNTH_ROWS, image_size=32, seed=0)  # the same rows as synth_parquet
    write_parquet_shards(iter(rows), f"s3://{s3_bucket}/val", 40)

    def val_rows(uri):
        spec = make_spec(data={"val": uri})
        ds = D.build_dataset(
            resolve_source(uri, field="data.val"), spec, "val", tokenizer.to_json(), None
        )
        out = []
        for b in _rows(ds, batch_size=16):
            assert set(b) == {"image", "tokens", "label", "caption"}
            out.extend(zip(b["caption"], b["label"], b["image"].sum(axis=(1, 2, 3)).round(2)))
        return sorted(out)

    from_s3 = val_rows(f"s3://{s3_bucket}/val/")
    assert len(from_s3) == SYNTH_ROWS
    assert from_s3 == val_rows(synth_parquet)  # eval transform: deterministic


def test_build_dataset_drops_and_counts_bad_rows(ray_local, tmp_path, make_spec, tokenizer):
    import ray

    records, expected = _bad_and_odd_records()
    folder = tmp_path / "bad"
    write_parquet_shards(iter(records), str(folder), rows_per_shard=13)
    spec = make_spec(data={"train": str(folder), "max_image_pixels": 10_000, "shuffle": False})
    name = f"control-{uuid.uuid4().hex[:8]}"
    actor = control_actor(name, create=True)
    ds = D.build_dataset(resolve_source(str(folder)), spec, "train", tokenizer.to_json(), name)
    n = sum(len(b["image"]) for b in _rows(ds, batch_size=4))
    n_bad = sum(expected.values())
    assert n == len(records) - n_bad
    stats = _wait_stats(actor, len(records))
    assert stats == {
        "rows_seen": len(records),
        "rows_bad": n_bad,
        "rows_not_downloaded": 0,
        "bad_reasons": expected,
    }
    assert ray.get(actor.too_many_bad.remote(spec.data.max_bad_fraction)) is False  # 33 < 50
    assert bad_rows_message(stats, 0.1).startswith(
        "data.train: 7 of 33 rows (21.2%) could not be used"
    )


def test_build_dataset_user_errors(ray_local, make_spec, tokenizer, synth_parquet):
    spec = make_spec(data={"image_column": "image"})
    with pytest.raises(DataError, match=r"^data\.train: column 'image' not found in .*"):
        D.build_dataset(resolve_source(synth_parquet), spec, "train", tokenizer.to_json(), None)


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


def test_steps_with_tasks_running_are_never_paced():
    """Ray Data's loop waits on running tasks itself; padding those steps only delays their
    output. Steps of an execution whose operators have tasks in flight are not paced; the same
    steps with every operator idle are."""
    from types import SimpleNamespace

    from service.data_pacing import MIN_STEP_S, PaceIdleLoop

    class Op:  # the one method of a PhysicalOperator the pacing reads
        def __init__(self, active: int):
            self.active = active

        def num_active_tasks(self) -> int:
            return self.active

    def executor(active: int):
        return SimpleNamespace(_topology={Op(0): None, Op(active): None})

    pace = PaceIdleLoop()
    t = time.perf_counter()
    for _ in range(11):
        pace.on_execution_step(executor(1))
    assert pace.paused == 0 and time.perf_counter() - t < 10 * MIN_STEP_S / 2
    for _ in range(11):
        pace.on_execution_step(executor(0))
    assert pace.paused == 11  # each idle step came right after another step


def test_datasets_carry_the_pacing_callback(ray_local, make_spec, tokenizer):
    from service.data_pacing import PaceIdleLoop

    spec = make_spec()
    ds = D.build_dataset(resolve_source(spec.data.train), spec, "train", tokenizer.to_json(), None)
    assert PaceIdleLoop in ds.context.custom_execution_callback_classes
    assert PaceIdleLoop in ds.context.execution_callback_classes


def test_a_crawl_with_30_percent_failed_downloads_trains_and_says_so(ray_local, tmp_path, capsys):
    """img2dataset output as it is: 30% of the rows failed to download (null jpg, status
    failed_to_download), 2 of the others are broken images. With the default
    data.max_bad_fraction 0.05 the run finishes; the summary and MLflow count the failures
    as not downloaded, apart from the bad rows; the first lines say what was read."""
    import re

    import mlflow
    import yaml

    from service.cli import main

    # 30 failed downloads: 30% of all rows would stop the run if they counted as bad rows;
    # one broken image among the 70 downloaded ones (1.4%) is within 0.05
    records = _img2dataset_records(100, broken=(5,))
    _write_img2dataset(records, tmp_path / "crawl", rows_per_shard=20)
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    job = {
        "run": {"name": "crawl", "output_dir": str(tmp_path / "runs")},
        "model": {"size": "maskclip_nano", "vocab_size": 300},
        "data": {"train": str(tmp_path / "crawl"), "shuffle": False},
        "optim": {"batch_size": 8, "max_steps": 3, "warmup_steps": 1, "log_every": 1},
        "checkpoint": {"every_steps": 3},
        "tracking": {"tracking_uri": db, "experiment": "crawl"},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    assert main(["run", str(path)]) == 0
    captured = capsys.readouterr()
    lines = (captured.out + captured.err).splitlines()
    assert (
        f"data.train: {tmp_path / 'crawl'}: 5 Parquet files, 100 rows; columns: key, jpg, "
        "caption, status, error_message (failed downloads by 'status' are skipped, not counted "
        "as bad)"
    ) in lines
    (line,) = [ln for ln in lines if ln.startswith("run crawl: step 3/3")]
    seen, bad, missing = map(
        int, re.search(r"data rows (\d+) \((\d+) skipped, (\d+) not downloaded\)", line).groups()
    )
    # a decode task reads whole 20-row files here (fewer rows than one decode batch), 6 of each
    # 20 failed; the one broken image (file 0) counts only if the run read that file before
    # its 3 steps were done (two decode tasks take the files in turn)
    assert seen % 20 == 0 and seen > 0, line
    assert missing == 3 * seen // 10 and bad in (0, 1), line
    run_id = next(ln.split(": ", 1)[1] for ln in lines if ln.startswith("mlflow run: "))
    metrics = mlflow.MlflowClient(db).get_run(run_id).data.metrics
    assert metrics["data_rows_not_downloaded"] == missing
    assert metrics["data_rows_bad"] == bad


def test_model_tokenizer_clip_uses_the_standard_vocabulary_without_reading_captions(
    make_spec, synth_parquet, monkeypatch
):
    """Two runs with model.tokenizer: clip get the same tokenizer, whatever their captions."""
    from maskclip.tokenizer import Tokenizer
    from service import data
    from service.trainer import prepare_tokenizer

    def never(*args, **kwargs):
        raise AssertionError("the captions were sampled")

    monkeypatch.setattr(data, "sample_captions", never)
    spec = make_spec(model={"size": "maskclip_nano", "tokenizer": "clip"})
    tok = Tokenizer.from_json(prepare_tokenizer(spec, None))
    assert tok.vocab_size == Tokenizer.clip().vocab_size == 49413
    assert tok.to_json() == Tokenizer.clip(spec.context_length).to_json()


# ---------------------------------------------------------------- 224 px decode benchmark


def _pipeline_bench():
    """benchmarks/pipeline.py as a module (benchmarks/ is not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "pipeline.py"
    spec = importlib.util.spec_from_file_location("bench_pipeline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("source", "decoded"), [((500, 375), (500, 375)), ((1024, 768), (512, 384))]
)
def test_decode_benchmark_bare_arm_is_the_pipelines_decode(tokenizer, source, decoded):
    """The --image-size path's bare arm on a tiny setting, without Ray: its photo-like JPEGs
    have the asked size, and the pipeline's DecodeBatch (draft on by default) turns them into
    224 px crops; a 1024x768 JPEG is decoded at half scale, a 500x375 one at full size."""
    bench = _pipeline_bench()
    records = list(bench.photo_rows(6, source))
    assert [Image.open(io.BytesIO(r["jpg"])).size for r in records] == [source] * 6
    assert all(len(r["jpg"]) > 3 * source[0] * source[1] // 100 for r in records)  # not flat
    assert R.decode_image(records[0]["jpg"], min_side=366)[0].size == decoded
    kwargs = decoder_kwargs(
        tokenizer, image_size=224, train=True, max_pixels=64_000_000, max_caption_chars=1000
    )
    cols = {k: np.array([r[k] for r in records], dtype=object) for k in ("jpg", "caption")}
    for draft in (True, False):
        decoder = D.DecodeBatch(**kwargs, draft=draft)
        (out,) = decoder(cols)
        assert out["image"].shape == (6, 3, 224, 224) and out["image"].dtype == np.uint8
        assert bench.bare_decode(decoder, [cols]) > 0


def test_a_worker_whose_torch_import_was_cut_short_is_replaced_and_the_rows_decode(
    ray_local, tokenizer, tmp_path
):
    """A real Ray Data execution whose decode task lands in a worker where an earlier
    `import torch` was cut short (as Ray's cancel does: a KeyboardInterrupt part way, injected
    here at torch._meta_registrations): the worker ends itself, Ray reruns the task in a new
    one, and every row decodes. Before, the task failed with "partially initialized module
    'torch'" and so did the run."""
    import os
    import sys

    import ray.data

    marker = tmp_path / "poisoned-pid"

    def cut_torch_import_short():
        import importlib.abc

        class Interrupt(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "torch._meta_registrations":
                    raise KeyboardInterrupt
                return None

        assert "torch" not in sys.modules, "this worker had torch already: nothing to cut short"
        finder = Interrupt()
        sys.meta_path.insert(0, finder)
        try:
            import torch  # noqa: F401
        except KeyboardInterrupt:
            pass
        finally:
            sys.meta_path.remove(finder)
        assert "torch" not in sys.modules and "torch._C" in sys.modules

    def decode_after_a_cut_short_import(batch, **kwargs):
        if not marker.exists():  # the first attempt only
            marker.write_text(str(os.getpid()))
            cut_torch_import_short()
        for out in D.decode_batch(batch, **kwargs):
            yield {**out, "pid": np.full(len(out["image"]), os.getpid())}

    records = generate(24, image_size=20, seed=3)
    ds = ray.data.from_items([{"jpg": r["jpg"], "caption": r["caption"]} for r in records])
    rows_out = ds.map_batches(
        decode_after_a_cut_short_import,
        fn_kwargs=decoder_kwargs(tokenizer),
        batch_size=None,
        # workers of their own (none has imported torch yet), one task at a time
        runtime_env={"env_vars": {"MASKCLIP_TEST_WORKERS": uuid.uuid4().hex}},
        compute=ray.data.TaskPoolStrategy(size=1),
    ).take_all()
    poisoned = int(marker.read_text())
    assert len(rows_out) == 24
    assert {int(r["pid"]) for r in rows_out}.isdisjoint({poisoned})
    with pytest.raises(ProcessLookupError):
        os.kill(poisoned, 0)  # the poisoned worker is gone
