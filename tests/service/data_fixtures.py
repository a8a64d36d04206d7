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
