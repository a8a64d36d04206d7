"""One storage layer: URIs, the retrying S3 filesystem, Parquet sources, display names.

    fs, path = split_uri("s3://bucket/data")              # (RetryingS3FileSystem, "bucket/data")
    src = resolve_source(spec.data.train, spec.storage)   # files, filesystem, schema: listed once
    src.require(["jpg", "caption"])                       # one-line DataError naming the file
    src.num_rows()                                        # from the footers, cached
    for batch in src.iter_batches(["caption"], 1024): ...

Local paths come back absolute with a LocalFileSystem; S3 paths as "bucket/key" with a
RetryingS3FileSystem. Credentials never come from a spec or an argument: the AWS chain
(environment, profile, service account) in each process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import os
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .errors import DataError, UserError
from .rows import STATUS_COLUMN

if TYPE_CHECKING:
    from .spec import StorageSection

S3_MAX_ATTEMPTS = 10
_GLOB_CHARS = "*?["
_PARQUET = (".parquet", ".pq")
SPLIT_NAMES = frozenset(
    {"train", "training", "val", "valid", "validation", "test", "eval", "dev", "holdout"}
)
"""Folder names that mark a dataset split (`maskclip data synth --val-rows` writes train/, val/)."""


# ---------------------------------------------------------------- filesystems and URIs


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


def s3_filesystem(
    storage: StorageSection | None = None,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
) -> RetryingS3FileSystem:
    """The S3 filesystem for an endpoint/region: the explicit arguments, else the spec's storage
    section, else $AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL and $AWS_REGION / $AWS_DEFAULT_REGION.

    With an endpoint (an S3-compatible server) and no region, the region is us-east-1, so that
    pyarrow never probes EC2 metadata for one.
    """
    endpoint = (
        endpoint_url
        or getattr(storage, "endpoint_url", None)
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    region = (
        region
        or getattr(storage, "region", None)
        or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
    )
    kwargs: dict[str, Any] = {}
    if endpoint:
        endpoint = endpoint.strip().rstrip("/")
        for scheme in ("http", "https"):
            if endpoint.startswith(f"{scheme}://"):
                kwargs["scheme"] = scheme
                endpoint = endpoint[len(scheme) + 3 :]
        kwargs["endpoint_override"] = endpoint
        region = region or "us-east-1"
    if region:
        kwargs["region"] = region
    return RetryingS3FileSystem(**kwargs)


def is_s3(fs: pafs.FileSystem | None) -> bool:
    return fs is not None and fs.type_name == "s3"


def split_uri(
    uri: str,
    storage: StorageSection | None = None,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    field: str | None = None,
) -> tuple[pafs.FileSystem, str]:
    """s3://bucket/key -> (S3 filesystem, "bucket/key"); a local path or file:// URI ->
    (LocalFileSystem, absolute path). A one-line UserError (prefixed by `field`) otherwise."""
    where = f"{field}: " if field else ""
    uri = str(uri).strip()
    if not uri:
        raise UserError(f"{where}empty path")
    if uri.startswith("s3://"):
        path = uri[len("s3://") :].strip("/")
        bucket = path.split("/", 1)[0]
        if not bucket:
            raise UserError(f"{where}no bucket in {uri!r} (expected s3://bucket/prefix)")
        if _has_glob(bucket):
            raise UserError(f"{where}the bucket name cannot be a pattern in {uri!r}")
        return s3_filesystem(storage, endpoint_url=endpoint_url, region=region), path
    uri = uri.removeprefix("file://")
    if "://" in uri:
        scheme = uri.split("://", 1)[0]
        raise UserError(f"{where}unsupported scheme '{scheme}://' in {uri!r} (use a path or s3://)")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def display(path: str, fs: pafs.FileSystem | None) -> str:
    """How a filesystem path is shown to the user (s3:// prefix for S3 paths)."""
    return f"s3://{path}" if is_s3(fs) else path


def first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def ensure_bucket(
    uri: str,
    storage: StorageSection | None = None,
    field: str = "checkpoint.storage_path",
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) of a place to write to: an S3 prefix whose bucket exists, or a local
    folder (created). One-line UserError naming `field` and the URI otherwise."""
    fs, path = split_uri(uri, storage, endpoint_url=endpoint_url, region=region, field=field)
    try:
        if is_s3(fs):
            bucket = path.split("/", 1)[0]
            if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise UserError(f"{field}: bucket {bucket!r} does not exist ({uri!r})")
        elif os.path.isfile(path):
            raise UserError(f"{field}: {uri!r} is a file, expected a folder")
        else:
            fs.create_dir(path, recursive=True)
    except OSError as e:
        raise UserError(f"{field}: cannot reach {uri!r}: {first_line(e)}") from None
    return fs, path


@contextlib.contextmanager
def copy_to_local(path: str, fs: pafs.FileSystem | None) -> Iterator[str]:
    """`with copy_to_local(path, fs) as d:` a local folder holding what is at `path`: the path
    itself when local, else a temporary download (removed on exit)."""
    if fs is None or not is_s3(fs):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="maskclip-") as d:
        pafs.copy_files(
            path, d, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
        )
        yield d


# ---------------------------------------------------------------- Parquet sources


def _has_glob(text: str) -> bool:
    return any(c in text for c in _GLOB_CHARS)


def _hidden(rel: str) -> bool:
    """Names starting with '_' or '.' (markers, manifests, half-written temporaries) are skipped."""
    return any(part.startswith(("_", ".")) for part in rel.split("/") if part)


def _below(path: str, base: str) -> str:
    return path[len(base) :].lstrip("/") if base else path


def _glob_base(pattern: str) -> str:
    """The folders of a glob before its first pattern."""
    parts = pattern.split("/")
    return "/".join(parts[: next(i for i, p in enumerate(parts) if _has_glob(p))])


def _glob_match(parts: list[str], pattern: list[str]) -> bool:
    """Shell-glob match by path segment ('*' stays within a name, '**' spans folders); a
    pattern that matches a folder matches every file below it."""
    if not pattern:
        return True
    if pattern[0] == "**":
        return any(_glob_match(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
    return (
        bool(parts)
        and fnmatch.fnmatchcase(parts[0], pattern[0])
        and _glob_match(parts[1:], pattern[1:])
    )


def _list(fs: pafs.FileSystem, path: str, uri: str, field: str) -> list[str]:
    """The data files at `path` (a file, a folder/prefix listed recursively, or a glob).

    One LIST for an S3 prefix or glob (a HEAD more only when the prefix holds nothing).
    """
    if _has_glob(path):
        base = _glob_base(path)
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        matched = [
            i.path
            for i in infos
            if i.type == pafs.FileType.File
            and _glob_match(i.path.split("/"), path.split("/"))
            and not _hidden(_below(i.path, base))
        ]
        if not matched and not is_s3(fs):
            raise DataError(f"{field}: no files match {uri!r}")
        # a broad '*' also matches other files: keep the Parquet ones when there are any
        return sorted([f for f in matched if f.lower().endswith(_PARQUET)] or matched)
    if not is_s3(fs):
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"{field}: no such file or directory {uri!r}")
        if info.type == pafs.FileType.File:
            return [path]
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    files = [
        i.path
        for i in infos
        if i.type == pafs.FileType.File
        and i.path.lower().endswith(_PARQUET)
        and not _hidden(_below(i.path, path))
    ]
    if not files and not infos and fs.get_file_info(path).type == pafs.FileType.File:
        return [path]
    _refuse_nested_splits(files, path, uri, field)
    return sorted(files)


def _refuse_nested_splits(files: list[str], path: str, uri: str, field: str) -> None:
    """A folder is one split: one that holds split folders (train/, val/, ...) below it is
    refused rather than read whole, which would train on the validation rows. Globs are the
    user's explicit choice and are not checked."""
    found: dict[str, str] = {}
    for f in files:
        folders = _below(f, path).split("/")[:-1]
        for i, name in enumerate(folders):
            if name.lower() in SPLIT_NAMES:
                found.setdefault("/".join(folders[: i + 1]) + "/", f)
                break
    if found:
        names = sorted(found)
        raise DataError(
            f"{field}: {uri!r} holds the split folders {', '.join(names)}; point {field} at one "
            f"of them (e.g. {uri.rstrip('/')}/{names[0]}), not at the folder above them"
        )


@dataclasses.dataclass
class Source:
    """A data source resolved once: its Parquet files, their filesystem and the first file's
    schema. The checks, the tokenizer sampling, the step count and the dataset all take it."""

    uri: str
    field: str
    paths: list[str]
    filesystem: pafs.FileSystem
    schema: pa.Schema
    root: str = ""
    """Where the files were listed: the folder/prefix, a glob's fixed part or a file's folder."""
    _file_rows: list[int] | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def columns(self) -> list[str]:
        return list(self.schema.names)

    def summary(self) -> str:
        """One line: what this source reads (files, rows from the footers, columns)."""
        n = len(self.paths)
        line = (
            f"{self.field}: {self.uri}: {n} Parquet file{'s' if n != 1 else ''}, "
            f"{self.num_rows()} rows; columns: {', '.join(self.columns)}"
        )
        if STATUS_COLUMN in self.columns:
            line += " (failed downloads by 'status' are skipped, not counted as bad)"
        return line

    def display(self, path: str) -> str:
        return display(path, self.filesystem)

    def require(self, columns: list[str], schema: pa.Schema | None = None, path: str = "") -> None:
        """DataError naming the field, the file and the columns found if one is missing."""
        names = list((schema or self.schema).names)
        for c in columns:
            if c not in names:
                raise DataError(
                    f"{self.field}: column {c!r} not found in {self.display(path or self.paths[0])}"
                    f" (columns: {', '.join(names)})"
                )

    def open(self, path: str, columns: list[str] | None = None) -> pq.ParquetFile:
        """One file, checked to have `columns`; one-line DataError otherwise."""
        try:
            pf = pq.ParquetFile(path, filesystem=self.filesystem)
        except (OSError, pa.ArrowInvalid) as e:
            raise DataError(
                f"{self.field}: cannot read Parquet file {self.display(path)}: {first_line(e)}"
            ) from None
        if columns:
            self.require(columns, pf.schema_arrow, path)
        return pf

    def num_rows(self) -> int:
        """Rows in all the files, from their footers only (no data is read); cached."""
        return sum(self.file_rows())

    def iter_file(
        self,
        path: str,
        columns: list[str],
        batch_size: int,
        start: int = 0,
        stop: int | None = None,
    ) -> Iterator[pa.RecordBatch]:
        """One file's `columns`, `batch_size` rows at a time (rows `start`..`stop` only, reading
        just the row groups that hold them); one-line DataError if unreadable."""
        pf = self.open(path, columns)
        meta = pf.metadata
        stop = meta.num_rows if stop is None else min(stop, meta.num_rows)
        groups, first = [], None  # the row groups overlapping [start, stop), and where they begin
        at = 0
        for i in range(meta.num_row_groups):
            n = meta.row_group(i).num_rows
            if at < stop and at + n > start:
                groups.append(i)
                first = at if first is None else first
            at += n
        if not groups:
            return
        at = first
        try:
            for rb in pf.iter_batches(batch_size=batch_size, columns=columns, row_groups=groups):
                lo, hi = max(start - at, 0), min(stop - at, rb.num_rows)
                at += rb.num_rows
                if hi > lo:
                    yield rb if (lo, hi) == (0, rb.num_rows) else rb.slice(lo, hi - lo)
                if at >= stop:
                    return
        except (OSError, pa.ArrowInvalid) as e:
            raise DataError(
                f"{self.field}: cannot read {self.display(path)}: {first_line(e)}"
            ) from None

    def file_rows(self) -> list[int]:
        """Rows per file, from the footers only; cached (num_rows sums them)."""
        if self._file_rows is None:
            with ThreadPoolExecutor(max_workers=min(16, len(self.paths))) as pool:
                self._file_rows = list(
                    pool.map(lambda p: self.open(p).metadata.num_rows, self.paths)
                )
        return self._file_rows

    def iter_batches(self, columns: list[str], batch_size: int = 1024) -> Iterator[pa.RecordBatch]:
        """All files' `columns` in order, `batch_size` rows at a time."""
        for path in self.paths:
            yield from self.iter_file(path, columns, batch_size)


def resolve_source(
    uri: str,
    storage: StorageSection | None = None,
    field: str = "data.train",
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
) -> Source:
    """The Parquet files of a folder / glob / file / s3:// prefix or glob, listed once, with the
    first file's schema. Names starting with '_' or '.' are skipped. One-line DataError (a
    UserError) naming `field` on anything wrong."""
    try:
        fs, path = split_uri(uri, storage, endpoint_url=endpoint_url, region=region, field=field)
    except UserError as e:
        raise DataError(str(e)) from None
    uri = str(uri).strip()
    error: OSError | None = None
    try:
        paths = _list(fs, path, uri, field)
    except OSError as e:  # a missing bucket fails the LIST on some servers: say so below
        paths, error = [], e
    if not paths and is_s3(fs):
        bucket = path.split("/", 1)[0]
        try:
            missing = fs.get_file_info(bucket).type == pafs.FileType.NotFound
        except OSError as e:
            missing, error = False, error or e
        if missing:
            raise DataError(f"{field}: bucket {bucket!r} does not exist ({uri!r})")
    if error is not None:
        raise DataError(f"{field}: cannot list {uri!r}: {first_line(error)}")
    if not paths:
        raise DataError(f"{field}: no Parquet files at {uri!r}")
    try:
        schema = pq.read_schema(paths[0], filesystem=fs)
    except (OSError, pa.ArrowInvalid) as e:
        raise DataError(
            f"{field}: cannot read Parquet schema of {display(paths[0], fs)}: {first_line(e)}"
        ) from None
    root = _glob_base(path) if _has_glob(path) else path
    root = root.rsplit("/", 1)[0] if paths == [root] else root
    return Source(uri, field, paths, fs, schema, root)
