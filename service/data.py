"""The Ray Data pipeline: Parquet shards (local or S3) -> decoded, augmented, tokenized batches.

    paths, fs = resolve_source(spec.data.train, spec.storage)
    captions = sample_captions(spec, spec.data.tokenizer_captions)   # train the tokenizer
    stats = get_or_create_stats("maskclip-data-stats-<run>")
    ds = build_dataset(spec, "train", tok.to_json(), "maskclip-data-stats-<run>")
    for batch in ds.iter_batches(batch_size=64, local_shuffle_buffer_size=...): ...
    check_bad_fraction(ray.get(stats.get.remote()), spec.data.max_bad_fraction)

Streaming only: nothing here materializes the dataset; rows that cannot be used (bad image, no
caption, ...) are dropped and counted per reason in a small named actor (`DataStats`).
Credentials never come from the spec: the AWS chain (environment, profile, service account).
"""

from __future__ import annotations

import glob as _glob
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from service.errors import UserError

if TYPE_CHECKING:
    import ray.actor
    import ray.data

    from service.spec import JobSpec, StorageSection

S3_MAX_ATTEMPTS = 10
READ_NUM_CPUS = 0.25
"""CPUs per Parquet read task: reading is mostly I/O; leaves room next to training workers."""
READ_ROWS_PER_BLOCK = 256
"""Rows per Arrow block coming out of a read task (raw image bytes: a few MB)."""
MAP_NUM_CPUS = 0.5
"""CPUs per decode/transform task (training workers take 0.5 each on a 2-core machine)."""
MAP_CONCURRENCY = 2
"""At most this many decode/transform tasks at once."""
TARGET_BATCH_BYTES = 32 << 20
"""Decoded float32 images per map batch are kept near this size (64..256 rows)."""

STATS_LOOKUP_S = 30.0
"""Decoders look the stats actor up by name again after this many seconds."""

_GLOB_CHARS = "*?["

# Reasons a row is dropped (keys of DataStats.bad_reasons).
R_MISSING_IMAGE = "missing image"
R_EMPTY_IMAGE = "empty image"
R_CORRUPT_IMAGE = "corrupt image"
R_LARGE_IMAGE = "image too large"
R_MISSING_CAPTION = "missing caption"
R_EMPTY_CAPTION = "empty caption"
R_BAD_CAPTION = "caption not UTF-8"
R_TRANSFORM = "transform failed"


# ---------------------------------------------------------------- filesystems and sources


class RetryingS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3FileSystem with retries (backoff, S3_MAX_ATTEMPTS tries) that survive pickling.

    A plain S3FileSystem drops its retry strategy when pickled, so the copies that Ray sends to
    the train controller, the workers and the data tasks would retry only a few times in about
    a second: a brief S3 outage then fails the run. This keeps the options and rebuilds it with
    the same retries. Credentials are never among the options: each process takes them from
    the AWS chain, so they are not pickled either.
    """

    def __init__(self, **options: Any):
        retry = pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS)
        super().__init__(retry_strategy=retry, **options)
        self._options = options

    def __reduce__(self):
        return _rebuild_s3, (self._options,)


def _rebuild_s3(options: dict[str, Any]) -> RetryingS3FileSystem:
    return RetryingS3FileSystem(**options)


def s3_filesystem(storage: StorageSection | None) -> pafs.S3FileSystem:
    """An S3FileSystem for the spec's endpoint/region; credentials from the AWS chain only."""
    endpoint = getattr(storage, "endpoint_url", None) or (
        os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    )
    region = getattr(storage, "region", None) or (
        os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None
    )
    kwargs: dict[str, Any] = {}
    if region:
        kwargs["region"] = region
    if endpoint:
        endpoint = endpoint.strip().rstrip("/")
        if endpoint.startswith("http://"):
            kwargs["scheme"] = "http"
            endpoint = endpoint[len("http://") :]
        elif endpoint.startswith("https://"):
            kwargs["scheme"] = "https"
            endpoint = endpoint[len("https://") :]
        kwargs["endpoint_override"] = endpoint
    return RetryingS3FileSystem(**kwargs)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _display(path: str, fs: pafs.FileSystem | None) -> str:
    """How a resolved path is shown to the user (s3:// prefix for S3 paths)."""
    return f"s3://{path}" if isinstance(fs, pafs.S3FileSystem) else path


def _has_glob(text: str) -> bool:
    return any(c in text for c in _GLOB_CHARS)


def _is_parquet(path: str) -> bool:
    return path.lower().endswith((".parquet", ".pq"))


def _hidden(rel: str) -> bool:
    """Names starting with '_' or '.' (markers, manifests, half-written temporaries) are skipped."""
    return any(part.startswith(("_", ".")) for part in rel.split("/") if part)


def _data_files(files: list[str], base: str = "") -> list[str]:
    """Parquet files among `files` (by extension), skipping hidden names below `base`."""
    cut = len(base.rstrip("/")) + 1 if base else 0
    return sorted(f for f in files if _is_parquet(f) and not _hidden(f[cut:] if cut else f))


def _glob_files(matched: list[str]) -> list[str]:
    """Files a glob matched: the Parquet ones if any (a broad '*' also hits markers), else all."""
    visible = [f for f in matched if not _hidden(f.rsplit("/", 1)[-1])]
    parquet = [f for f in visible if _is_parquet(f)]
    return sorted(parquet or visible)


def _resolve_local(uri: str, field: str) -> list[str]:
    if _has_glob(uri):
        matches = sorted(_glob.glob(uri, recursive=True))
        if not matches:
            raise UserError(f"{field}: no files match {uri!r}")
        files: list[str] = []
        matched_files: list[str] = []
        for m in matches:
            p = Path(m)
            if p.is_dir() and not _hidden(p.name):
                found = [f.as_posix() for f in p.rglob("*") if f.is_file()]
                files.extend(_data_files(found, p.as_posix()))
            elif p.is_file():
                matched_files.append(p.as_posix())
        paths = sorted(set(files + _glob_files(matched_files)))
    else:
        p = Path(uri)
        if not p.exists():
            raise UserError(f"{field}: no such file or directory {uri!r}")
        if p.is_file():
            return [str(p.resolve())]
        paths = _data_files([f.as_posix() for f in p.rglob("*") if f.is_file()], p.as_posix())
    paths = sorted(str(Path(x).resolve()) for x in paths)
    if not paths:
        raise UserError(f"{field}: no Parquet files at {uri!r}")
    return paths


def _resolve_s3(uri: str, storage: Any, field: str) -> tuple[list[str], pafs.S3FileSystem]:
    path = uri[len("s3://") :].strip("/") if uri.startswith("s3://") else uri
    bucket = path.split("/", 1)[0]
    if not bucket:
        raise UserError(f"{field}: no bucket in {uri!r} (expected s3://bucket/prefix)")
    if _has_glob(bucket):
        raise UserError(f"{field}: the bucket name cannot be a pattern in {uri!r}")
    fs = s3_filesystem(storage)
    try:
        if _has_glob(path):
            import fnmatch

            parts = path.split("/")
            base_parts = []
            for part in parts:
                if _has_glob(part):
                    break
                base_parts.append(part)
            base = "/".join(base_parts)
            infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
            paths = _glob_files(
                [
                    i.path
                    for i in infos
                    if i.type == pafs.FileType.File and fnmatch.fnmatchcase(i.path, path)
                ]
            )
        else:
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.File:
                return [path], fs
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
            paths = _data_files([i.path for i in infos if i.type == pafs.FileType.File], path)
        if not paths:
            if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise UserError(f"{field}: bucket {bucket!r} does not exist ({uri!r})")
            raise UserError(f"{field}: no Parquet files at {uri!r}")
    except UserError:
        raise
    except OSError as e:
        msg = _first_line(e)
        if "NoSuchBucket" in msg or "does not exist" in msg.lower():
            raise UserError(f"{field}: bucket {bucket!r} does not exist ({uri!r})") from None
        raise UserError(f"{field}: cannot list {uri!r}: {msg}") from None
    return paths, fs


def resolve_source(
    uri: str, storage: StorageSection | None, field: str = "data.train"
) -> tuple[list[str], pafs.FileSystem | None]:
    """Parquet files for a folder / glob / file / s3:// prefix or glob -> (sorted paths, fs).

    Local paths come back absolute with fs None; S3 paths as "bucket/key" with an S3FileSystem.
    """
    uri = str(uri).strip()
    if not uri:
        raise UserError(f"{field}: empty data path")
    if uri.startswith("s3://"):
        return _resolve_s3(uri, storage, field)
    if "://" in uri:
        scheme = uri.split("://", 1)[0]
        raise UserError(
            f"{field}: unsupported scheme '{scheme}://' in {uri!r} (use a path or s3://)"
        )
    return _resolve_local(uri, field), None


def _read_schema(path: str, fs: pafs.FileSystem | None, field: str) -> pa.Schema:
    try:
        return pq.read_schema(path, filesystem=fs)
    except (OSError, pa.ArrowInvalid) as e:
        raise UserError(
            f"{field}: cannot read Parquet schema of {_display(path, fs)}: {_first_line(e)}"
        ) from None


def _check_schema(
    schema: pa.Schema, columns: list[str], path: str, fs: pafs.FileSystem | None, field: str
) -> list[str]:
    names = list(schema.names)
    for c in columns:
        if c not in names:
            raise UserError(
                f"{field}: column {c!r} not found in {_display(path, fs)} (columns: {', '.join(names)})"
            )
    return names


def check_columns(
    uri: str, storage: StorageSection | None, columns: list[str], field: str = "data.train"
) -> list[str]:
    """Check `columns` exist in the first file's Parquet schema; return the schema's names."""
    paths, fs = resolve_source(uri, storage, field)
    return _check_schema(_read_schema(paths[0], fs, field), columns, paths[0], fs, field)


def _clean_caption(value: Any, max_chars: int) -> tuple[str | None, str | None]:
    """-> (caption, None) or (None, reason)."""
    if value is None:
        return None, R_MISSING_CAPTION
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return None, R_BAD_CAPTION
    elif not isinstance(value, str):
        if isinstance(value, float) and value != value:  # NaN from pandas-ish writers
            return None, R_MISSING_CAPTION
        value = str(value)
    text = value.strip()
    if not text:
        return None, R_EMPTY_CAPTION
    return text[:max_chars], None


def _open_parquet(path: str, fs, columns: list[str], field: str) -> pq.ParquetFile:
    """Open one shard and check it has `columns`; one-line UserError otherwise."""
    try:
        pf = pq.ParquetFile(path, filesystem=fs)
    except (OSError, pa.ArrowInvalid) as e:
        raise UserError(
            f"{field}: cannot read Parquet file {_display(path, fs)}: {_first_line(e)}"
        ) from None
    _check_schema(pf.schema_arrow, columns, path, fs, field)
    return pf


def sample_captions(spec: JobSpec, n: int) -> list[str]:
    """The first `n` usable captions of data.train, read with pyarrow (caption column only)."""
    field = "data.train"
    col = spec.data.caption_column
    paths, fs = resolve_source(spec.data.train, spec.storage, field)
    out: list[str] = []
    for path in paths:
        if len(out) >= n:
            break
        pf = _open_parquet(path, fs, [col], field)
        try:
            for batch in pf.iter_batches(batch_size=1024, columns=[col]):
                for value in batch.column(0).to_pylist():
                    text, _ = _clean_caption(value, spec.data.max_caption_chars)
                    if text is not None:
                        out.append(text)
                        if len(out) >= n:
                            break
                if len(out) >= n:
                    break
        except (OSError, pa.ArrowInvalid) as e:
            raise UserError(
                f"{field}: cannot read captions from {_display(path, fs)}: {_first_line(e)}"
            ) from None
    return out


def count_rows(uri: str, storage: StorageSection | None, field: str = "data.train") -> int:
    """Rows in all the Parquet files, from their footers only (no data is read)."""
    paths, fs = resolve_source(uri, storage, field)

    def one(path: str) -> int:
        try:
            return pq.ParquetFile(path, filesystem=fs).metadata.num_rows
        except (OSError, pa.ArrowInvalid) as e:
            raise UserError(
                f"{field}: cannot read Parquet metadata of {_display(path, fs)}: {_first_line(e)}"
            ) from None

    if len(paths) == 1:
        return one(paths[0])
    with ThreadPoolExecutor(max_workers=min(16, len(paths))) as pool:
        return sum(pool.map(one, paths))


# ---------------------------------------------------------------- bad-row statistics


class DataStats:
    """Counts rows seen / dropped (per reason). Use as `ray.remote(DataStats)`."""

    def __init__(self) -> None:
        self._total = 0
        self._bad = 0
        self._reasons: dict[str, int] = {}

    def add(self, total: int, bad: int, reasons: dict[str, int]) -> None:
        self._total += int(total)
        self._bad += int(bad)
        for k, v in reasons.items():
            self._reasons[k] = self._reasons.get(k, 0) + int(v)

    def get(self) -> dict:
        return {"rows_seen": self._total, "rows_bad": self._bad, "bad_reasons": dict(self._reasons)}

    def reset(self) -> None:
        self.__init__()


def get_or_create_stats(name: str) -> ray.actor.ActorHandle:
    """The named DataStats actor (created on first use; 0 CPUs)."""
    import ray

    return (
        ray.remote(DataStats)
        .options(name=name, get_if_exists=True, num_cpus=0, max_concurrency=1)
        .remote()
    )


def check_bad_fraction(stats: dict, max_bad_fraction: float, min_rows: int = 50) -> None:
    """Raise a one-line UserError once too many of the rows seen so far were dropped."""
    seen = int(stats.get("rows_seen", 0))
    bad = int(stats.get("rows_bad", 0))
    if seen < min_rows or seen == 0 or bad / seen <= max_bad_fraction:
        return
    reasons = sorted(stats.get("bad_reasons", {}).items(), key=lambda kv: (-kv[1], kv[0]))
    detail = ", ".join(f"{k}: {v}" for k, v in reasons)
    detail = f" ({detail})" if detail else ""
    raise UserError(
        f"data.train: {bad} of {seen} rows ({100 * bad / seen:.1f}%) could not be used{detail}; "
        f"data.max_bad_fraction is {_pct(max_bad_fraction)}"
    )


def _pct(x: float) -> str:
    return f"{100 * x:.4g}%"


# ---------------------------------------------------------------- the dataset


class DecodeBatch:
    """Decode + transform images, tokenize captions, drop bad rows (counted per reason).

    Usable as a map_batches callable class (fn_constructor_kwargs); build_dataset runs it in
    tasks through `decode_batch`, which keeps one instance per worker process.
    """

    def __init__(
        self,
        *,
        image_column: str,
        caption_column: str,
        label_column: str | None,
        tokenizer_json: str,
        image_size: int,
        train: bool,
        max_pixels: int,
        max_caption_chars: int,
        stats_actor_name: str | None,
        keep_caption: bool,
    ):
        import torch

        from maskclip.tokenizer import Tokenizer
        from maskclip.transforms import eval_transform, train_transform

        torch.set_num_threads(1)
        if train:  # every actor would otherwise draw the same crops (torch's fixed default seed)
            torch.manual_seed(int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1))
        self.image_column = image_column
        self.caption_column = caption_column
        self.label_column = label_column
        self.tokenizer = Tokenizer.from_json(tokenizer_json)
        self.transform = train_transform(image_size) if train else eval_transform(image_size)
        self.image_size = image_size
        self.max_pixels = max_pixels
        self.max_caption_chars = max_caption_chars
        self.keep_caption = keep_caption
        self.stats_actor_name = stats_actor_name
        self._stats = None
        self._stats_at = -float("inf")

    def _stats_actor(self):
        """The stats actor, looked up again now and then (a run may recreate it by name)."""
        if not self.stats_actor_name:
            return None
        now = time.monotonic()
        if now - self._stats_at > STATS_LOOKUP_S:
            import ray

            self._stats_at = now
            try:
                self._stats = ray.get_actor(self.stats_actor_name)
            except ValueError:
                self._stats = None
        return self._stats

    def _image(self, data: Any) -> tuple[np.ndarray | None, str | None]:
        from maskclip.transforms import ImageDecodeError, decode_image

        if data is None:
            return None, R_MISSING_IMAGE
        try:
            img = decode_image(data, max_pixels=self.max_pixels)
        except ImageDecodeError as e:
            msg = str(e)
            if msg.startswith("empty"):
                return None, R_EMPTY_IMAGE
            if msg.startswith("image too large"):
                return None, R_LARGE_IMAGE
            return None, R_CORRUPT_IMAGE
        try:
            x = self.transform(img)
        except Exception:
            return None, R_TRANSFORM
        return x.numpy().astype(np.float32, copy=False), None

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        images_in = batch[self.image_column]
        captions_in = batch[self.caption_column]
        labels_in = batch[self.label_column] if self.label_column else None
        n = len(images_in)
        images: list[np.ndarray] = []
        captions: list[str] = []
        labels: list[str] = []
        reasons: dict[str, int] = {}
        for i in range(n):
            caption, why = _clean_caption(captions_in[i], self.max_caption_chars)
            if why is None:
                image, why = self._image(images_in[i])
            if why is not None:
                reasons[why] = reasons.get(why, 0) + 1
                continue
            images.append(image)
            captions.append(caption)
            if labels_in is not None:
                label = labels_in[i]
                if isinstance(label, (bytes, bytearray)):
                    label = bytes(label).decode("utf-8", errors="replace")
                labels.append("" if label is None else str(label))
        bad = n - len(images)
        stats = self._stats_actor()
        if stats is not None:
            stats.add.remote(n, bad, reasons)  # fire and forget
        if not images:  # an all-bad batch yields nothing (an empty tensor block would not concat)
            return
        out = {
            "image": np.stack(images).astype(np.float32, copy=False),
            "tokens": self.tokenizer.encode(captions).numpy().astype(np.int64, copy=False),
        }
        if labels_in is not None:
            out["label"] = np.array(labels, dtype=np.str_)
        if self.keep_caption:
            out["caption"] = np.array(captions, dtype=np.str_)
        yield out


_DECODERS: dict[tuple, DecodeBatch] = {}
_MAX_DECODERS = 4


def decode_batch(batch: dict[str, np.ndarray], **kwargs: Any) -> Iterator[dict[str, np.ndarray]]:
    """map_batches fn: `DecodeBatch(**kwargs)(batch)`, the DecodeBatch cached per process.

    Tasks, not an actor pool: Ray keeps task worker processes (torch already imported, decoder
    built) across executions, so a new epoch or a validation pass starts in well under a second;
    an actor pool starts new processes every execution (~7 s each on 2 CPUs), and its actors
    hold their CPUs for the whole execution even while the trainer is busy.
    """
    key = tuple(sorted(kwargs.items()))
    decoder = _DECODERS.get(key)
    if decoder is None:
        while len(_DECODERS) >= _MAX_DECODERS:
            _DECODERS.pop(next(iter(_DECODERS)))
        decoder = _DECODERS[key] = DecodeBatch(**kwargs)
    yield from decoder(batch)


def _read_files(
    batch: pa.Table,
    *,
    filesystem: pafs.FileSystem | None,
    columns: list[str],
    field: str,
    rows_per_block: int,
) -> Iterator[pa.Table]:
    """map_batches fn: a batch of paths -> the files' rows, `rows_per_block` rows at a time."""
    for path in batch.column("path").to_pylist():
        pf = _open_parquet(path, filesystem, columns, field)
        for rb in pf.iter_batches(batch_size=rows_per_block, columns=columns):
            if rb.num_rows:
                yield pa.Table.from_batches([rb])


def read_parquet_stream(
    paths: list[str],
    fs: pafs.FileSystem | None,
    columns: list[str],
    field: str = "data.train",
    shuffle_seed: int | None = None,
    rows_per_block: int = READ_ROWS_PER_BLOCK,
) -> ray.data.Dataset:
    """Stream the files' `columns` as small Arrow blocks (one read task per file).

    Not `ray.data.read_parquet`: its ListFiles step always asks for a whole CPU (a job whose
    training workers hold all but a fraction of a CPU would never start reading). With
    `shuffle_seed`, the file order is shuffled again on every execution (epoch); that is cheap
    here because only the list of paths goes through `randomize_block_order` (in Ray it is an
    all-to-all barrier, which on the rows themselves would hold the whole dataset).
    """
    import ray.data

    ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=len(paths))
    if shuffle_seed is not None:
        ds = ds.randomize_block_order(
            seed=ray.data.RandomSeedConfig(seed=shuffle_seed, reseed_after_execution=True)
        )
    return ds.map_batches(
        _read_files,
        fn_kwargs={
            "filesystem": fs,
            "columns": columns,
            "field": field,
            "rows_per_block": rows_per_block,
        },
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=READ_NUM_CPUS,
    )


def map_batch_size(image_size: int) -> int:
    """Rows per decode batch: ~TARGET_BATCH_BYTES of float32 images, within 64..256."""
    per_row = 3 * image_size * image_size * 4
    return int(min(256, max(64, TARGET_BATCH_BYTES // per_row)))


def build_dataset(
    spec: JobSpec, split: str, tokenizer_json: str, stats_actor_name: str | None
) -> ray.data.Dataset:
    """A lazy, streaming Dataset of {"image": f32 [B,3,H,W], "tokens": i64 [B,L]} (+ val labels).

    "train": data.train with random-resized-crop; file order shuffled per epoch when
    data.shuffle (rows are shuffled further by the consumer's local_shuffle_buffer_size).
    "val": data.val with resize + centre crop, plus "label" (if the column exists) and "caption".
    Dropped rows are counted in the DataStats actor named `stats_actor_name` (if any); use one
    name per split.
    """
    import ray
    import ray.data

    from .data_pacing import install

    install()  # before the Dataset exists: it keeps a copy of the current DataContext
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    d = spec.data
    uri = d.train if split == "train" else d.val
    field = f"data.{split}"
    if uri is None:
        raise UserError(f"{field}: not set")
    paths, fs = resolve_source(uri, spec.storage, field)
    names = _check_schema(
        _read_schema(paths[0], fs, field), [d.image_column, d.caption_column], paths[0], fs, field
    )
    label_column = d.label_column if split == "val" and d.label_column in names else None
    columns = [d.image_column, d.caption_column] + ([label_column] if label_column else [])

    ds = read_parquet_stream(
        paths,
        fs,
        columns,
        field,
        shuffle_seed=spec.run.seed if split == "train" and d.shuffle else None,
    )
    return ds.map_batches(
        decode_batch,
        fn_kwargs={
            "image_column": d.image_column,
            "caption_column": d.caption_column,
            "label_column": label_column,
            "tokenizer_json": tokenizer_json,
            "image_size": spec.image_size,
            "train": split == "train",
            "max_pixels": d.max_image_pixels,
            "max_caption_chars": d.max_caption_chars,
            "stats_actor_name": stats_actor_name,
            "keep_caption": split == "val",
        },
        batch_size=map_batch_size(spec.image_size),
        batch_format="numpy",
        zero_copy_batch=True,
        compute=ray.data.TaskPoolStrategy(size=MAP_CONCURRENCY),
        num_cpus=MAP_NUM_CPUS,
    )
