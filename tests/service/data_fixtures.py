"""Write image/caption rows as Parquet shards (local folder or s3://) for tests.

Unlike service.datasets.write_shards, this writes every record as given, bad ones included: the
data tests need rows that the pipeline must drop.
"""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("jpg", pa.binary()),
        ("caption", pa.string()),
        ("label", pa.string()),
    ]
)


def rows_from_records(records: list[dict]) -> pa.Table:
    """Rows {"key", "jpg", "caption", "label"} -> a Table (key, jpg binary, caption, label)."""
    return pa.Table.from_pylist(
        [{name: r.get(name) for name in SCHEMA.names} for r in records], schema=SCHEMA
    )


def write_parquet_shards(
    records_iter: Iterable[dict], out_uri: str, rows_per_shard: int, storage=None
) -> list[str]:
    """Write shard-00000.parquet, ... under a local folder or s3://bucket/prefix; return URIs."""
    from service.storage import display, ensure_bucket

    fs, base = ensure_bucket(out_uri, storage, "test output")
    written: list[str] = []
    chunk: list[dict] = []

    def flush() -> None:
        path = f"{base}/shard-{len(written):05d}.parquet"
        pq.write_table(rows_from_records(chunk), path, filesystem=fs)
        written.append(display(path, fs))
        chunk.clear()

    for record in records_iter:
        chunk.append(record)
        if len(chunk) >= rows_per_shard:
            flush()
    if chunk:
        flush()
    return written


# ----------------------------------------------------------------------------- dense labels


def make_dense_dataset(
    root,
    rows: int = 16,
    test_rows: int | None = None,
    image_size: int = 32,
    objects: int = 2,
    seed: int = 0,
    rows_per_shard: int = 1000,
    val_rows: int = 0,
):
    """A small dense-labelled dataset (maskclip.dense format) of multi-object shape scenes:
    `root/dense/train` (`rows` rows), `root/dense/val` (`val_rows`, when given: the indexes after
    train's) and `root/dense/test` (`test_rows`, default `rows`; the indexes after those), each
    with a `mask` column and classes.txt (background + SHAPES).
    Deterministic in (seed, image_size, objects). Returns the folder (a Path) holding train/ and
    test/, as `--dense-probe DIR` / `--zero-shot-seg DIR` take it."""
    from pathlib import Path

    from service.datasets import synth

    out = Path(root) / "dense"
    synth(
        str(out),
        rows,
        image_size=image_size,
        seed=seed,
        rows_per_shard=rows_per_shard,
        val_rows=val_rows,
        test_rows=rows if test_rows is None else test_rows,
        objects=objects,
        progress=False,
    )
    return out


def write_dense_split(out, records: list[dict], classes: list[str] | None = None) -> None:
    """Rows {"key", "jpg", "caption", "label"?, "mask"} written as given (bad masks included) as
    one shard `out/part-00000.parquet`, with classes.txt when `classes` is given (none written
    otherwise): for tests of what readers of the dense format refuse."""
    from pathlib import Path

    from maskclip.dense import CLASSES_FILE, MASK_COLUMN, format_classes

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([*SCHEMA, (MASK_COLUMN, pa.binary())])
    table = pa.Table.from_pylist(
        [{name: r.get(name) for name in schema.names} for r in records], schema=schema
    )
    pq.write_table(table, out / "part-00000.parquet")
    if classes is not None:
        (out / CLASSES_FILE).write_text(format_classes(classes))
