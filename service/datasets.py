"""Write and inspect image-text datasets as Parquet shards in the img2dataset layout.

    synth("data/shapes", rows=5000)                               # generated shapes
    convert_folder("photos/", "captions.csv", "data/photos")      # folder + CSV/JSONL/.txt captions
    convert_fashion_mnist("data/fmnist")                          # -> data/fmnist/{train,test}
    inspect("s3://bucket/data/shapes")                            # rows, columns, labels, bad images

A dataset folder holds `part-00000.parquet`, `part-00001.parquet`, ... (columns `key` string,
`jpg` binary, `caption` string, optional `label` string and any extra columns), then
`_manifest.json` and an empty `_SUCCESS` marker written last. Shards are written under a hidden
temporary name and renamed (local) or uploaded whole (S3), so an interrupted write never leaves a
half shard that looks finished. Readers (pyarrow.dataset, Ray Data) skip names starting with
`_` or `.`.

S3: `s3://bucket/prefix`; the endpoint comes from the argument or $AWS_ENDPOINT_URL, credentials
only from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, profile, service account).
"""

from __future__ import annotations

import csv
import fnmatch
import gzip
import io
import json
import math
import os
import struct
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from maskclip.dense import CLASSES_FILE, IGNORE, MASK_COLUMN, encode_mask, format_classes
from maskclip.templates import FASHION_MNIST_CAPTIONS

from .errors import UserError
from .rows import R_CORRUPT_IMAGE, clean_caption, clean_label, image_bytes_reason
from .rows import decode_image as check_image
from .storage import display, ensure_bucket, first_line, is_s3, resolve_source

SHARD_PATTERN = "part-{:05d}.parquet"
MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"
REQUIRED_COLUMNS = ("key", "jpg", "caption")
KNOWN_TYPES = {
    "key": pa.string(),
    "jpg": pa.binary(),
    "caption": pa.string(),
    "label": pa.string(),
    MASK_COLUMN: pa.binary(),
}
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
FASHION_MNIST_TEMPLATES = FASHION_MNIST_CAPTIONS
"""Caption templates of converted Fashion-MNIST: one source, maskclip.templates (the zero-shot
prompt set `fashion-mnist` is built from the same tuple)."""
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_FASHION_VAL_STREAM = 2
"""The val split's RNG stream (train 0 and test 1 are their places in _FASHION_FILES)."""
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class _NoRows(UserError):
    """write_shards got no good row (callers may explain why)."""


# ----------------------------------------------------------------------------- file systems


def _put(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write `data` at `path` so that it appears complete or not at all."""
    if is_s3(fs):  # one object PUT: never visible half-written
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    parent, name = path.rsplit("/", 1)
    tmp = f"{parent}/.{name}.tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


# ----------------------------------------------------------------------------- writing


def _is_dataset_file(name: str) -> bool:
    return (
        fnmatch.fnmatch(name, "part-*.parquet")
        or name in (MANIFEST, SUCCESS, CLASSES_FILE)
        or fnmatch.fnmatch(name, ".part-*.tmp")
    )


def _prepare_dir(fs: pafs.FileSystem, base: str, out: str, overwrite: bool) -> None:
    infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True, recursive=False))
    old = [i for i in infos if i.type == pafs.FileType.File and _is_dataset_file(i.base_name)]
    if not old:
        return
    if not overwrite and any(not i.base_name.startswith(".") for i in old):
        raise UserError(
            f"{out}: already holds a dataset (part-*.parquet / _SUCCESS); "
            "pass --overwrite (overwrite=True) or choose another output"
        )
    for i in old:
        fs.delete_file(i.path)


def _progress(total: int | None, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="row",
        file=sys.stderr,
        disable=not (enabled and sys.stderr.isatty()),
        dynamic_ncols=True,
    )


def write_shards(
    rows: Iterable[dict],
    out: str,
    rows_per_shard: int = 1000,
    endpoint_url: str | None = None,
    region: str | None = None,
    progress: bool = True,
    *,
    total: int | None = None,
    overwrite: bool = False,
    source: str | None = None,
    classes: list[str] | None = None,
) -> dict:
    """Write `rows` ({key, jpg, caption[, label, ...]}) as Parquet shards under `out`.

    Rows without image bytes or caption are counted as `bad` and skipped; a missing `key` becomes
    the row's index. Columns are those of the first good row (later extra keys are ignored).
    Refuses a folder that already holds shards unless `overwrite`. `classes` (a dense dataset's
    class names, maskclip.dense) is written as classes.txt beside the shards, before _SUCCESS.
    Returns the manifest: {out, rows, shards, bad, columns, labels (or None), source[, classes]}.
    """
    if rows_per_shard < 1:
        raise UserError(f"rows_per_shard must be at least 1 (got {rows_per_shard})")
    fs, base = ensure_bucket(out, None, "output", endpoint_url=endpoint_url, region=region)
    try:
        _prepare_dir(fs, base, out, overwrite)
    except OSError as e:
        raise UserError(f"{out}: {first_line(e)}") from None

    schema: pa.Schema | None = None
    buffer: list[dict] = []
    shards: list[dict] = []
    labels: Counter = Counter()
    n_rows = bad = 0
    extra_warned = False

    def flush() -> None:
        nonlocal schema
        if not buffer:
            return
        if schema is not None:
            names = schema.names
        else:
            first = list(buffer[0])
            names = [c for c in REQUIRED_COLUMNS if c in first]
            names += [c for c in first if c not in REQUIRED_COLUMNS]
        arrays = []
        for name in names:
            values = [r.get(name) for r in buffer]
            if schema is not None:
                typ = schema.field(name).type
            else:
                typ = KNOWN_TYPES.get(name)
            try:
                arrays.append(pa.array(values, type=typ))
            except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
                raise UserError(f"{out}: column {name!r}: {first_line(e)}") from None
        table = pa.Table.from_arrays(arrays, names=names)
        if schema is None:
            schema = table.schema
        sink = pa.BufferOutputStream()
        use_dict = [c for c in ("label",) if c in names] or False
        pq.write_table(table, sink, use_dictionary=use_dict, compression="snappy")
        name = SHARD_PATTERN.format(len(shards))
        try:
            _put(fs, f"{base}/{name}", sink.getvalue().to_pybytes())
        except OSError as e:
            raise UserError(f"{out}/{name}: {first_line(e)}") from None
        shards.append({"file": name, "rows": table.num_rows})
        buffer.clear()

    with _progress(total, f"writing {out}", progress) as bar:
        for row in rows:
            caption, why = clean_caption(row.get("caption"))
            if why is not None or image_bytes_reason(row.get("jpg")) is not None:
                bad += 1
                bar.update(1)
                continue
            key = row.get("key")
            row = {**row, "key": f"{n_rows:09d}" if key is None else str(key), "caption": caption}
            if buffer and not extra_warned and row.keys() - buffer[0].keys():
                extra_warned = True
                cols = ", ".join(sorted(row.keys() - buffer[0].keys()))
                print(
                    f"warning: {out}: column(s) {cols} not in the first row; ignored",
                    file=sys.stderr,
                )
            if row.get("label") is not None:
                labels[str(row["label"])] += 1
            buffer.append(row)
            n_rows += 1
            bar.update(1)
            if len(buffer) >= rows_per_shard:
                flush()
        flush()

    if n_rows == 0:
        raise _NoRows(f"{out}: no rows to write ({bad} bad rows skipped)")
    assert schema is not None
    manifest = {
        "out": out,
        "rows": n_rows,
        "shards": len(shards),
        "bad": bad,
        "columns": {f.name: str(f.type) for f in schema},
        "labels": dict(sorted(labels.items())) if "label" in schema.names else None,
        "files": shards,
        "source": source,
    }
    if classes is not None:
        manifest["classes"] = list(classes)
    try:
        if classes is not None:
            _put(fs, f"{base}/{CLASSES_FILE}", format_classes(list(classes)).encode())
        _put(fs, f"{base}/{MANIFEST}", json.dumps(manifest, indent=2).encode())
        _put(fs, f"{base}/{SUCCESS}", b"")
    except OSError as e:
        raise UserError(f"{out}: {first_line(e)}") from None
    return manifest


# ----------------------------------------------------------------------------- synthetic shapes


def synth(
    out: str,
    rows: int,
    image_size: int = 32,
    seed: int = 0,
    rows_per_shard: int = 1000,
    *,
    start: int = 0,
    val_rows: int = 0,
    test_rows: int = 0,
    objects: int = 0,
    endpoint_url: str | None = None,
    region: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Generated shapes (maskclip.synthetic), streamed in chunks.

    Row i depends only on (seed, i). With `val_rows` and/or `test_rows`, writes `out/train`
    (indexes start .. start+rows-1), `out/val` (the next val_rows indexes) and `out/test` (the
    next test_rows): disjoint splits; returns {split: stats}. Otherwise writes `out` itself and
    returns its stats. `objects` > 0: multi-object scenes (maskclip.synthetic.make_scene) with a
    `mask` column and classes.txt in each split (the dense-label format, maskclip.dense).
    """
    from maskclip.synthetic import MAX_OBJECTS, generate, generate_scenes, scene_classes

    if rows < 1:
        raise UserError(f"rows must be at least 1 (got {rows})")
    if val_rows < 0 or test_rows < 0:
        raise UserError(
            f"val_rows and test_rows must not be negative (got {val_rows}, {test_rows})"
        )
    if image_size < 8:
        raise UserError(f"image_size must be at least 8 (got {image_size})")
    if not 0 <= objects <= MAX_OBJECTS:
        raise UserError(f"objects must be between 1 and {MAX_OBJECTS} (got {objects})")

    def stream(first: int, n: int) -> Iterator[dict]:
        chunk = max(1, min(rows_per_shard, 512))
        for s in range(first, first + n, chunk):
            k = min(chunk, first + n - s)
            if objects:
                for row in generate_scenes(k, image_size, seed, start=s, objects=objects):
                    row.pop("objects")  # in the caption and the mask; not a column
                    yield row
            else:
                yield from generate(k, image_size=image_size, seed=seed, start=s)

    what = f"synthetic scenes objects={objects}" if objects else "synthetic shapes"

    def write(dest: str, first: int, n: int) -> dict:
        return write_shards(
            stream(first, n),
            dest,
            rows_per_shard,
            endpoint_url,
            region,
            progress,
            total=n,
            overwrite=overwrite,
            source=f"{what} seed={seed} image_size={image_size} start={first}",
            classes=scene_classes() if objects else None,
        )

    if not val_rows and not test_rows:
        return write(out, start, rows)
    result = {"train": write(_join(out, "train"), start, rows)}
    if val_rows:
        result["val"] = write(_join(out, "val"), start + rows, val_rows)
    if test_rows:
        result["test"] = write(_join(out, "test"), start + rows + val_rows, test_rows)
    return result


def _join(uri: str, name: str) -> str:
    return uri.rstrip("/") + "/" + name


# ----------------------------------------------------------------------------- folder of images


class _Warnings:
    """One stderr line per skipped item, capped; counts every reason."""

    def __init__(self, cap: int = 20):
        self.cap = cap
        self.counts: Counter = Counter()
        self.shown = 0

    def __call__(self, item: str, reason: str, kind: str) -> None:
        self.counts[kind] += 1
        if self.shown < self.cap:
            self.shown += 1
            from tqdm import tqdm

            tqdm.write(f"warning: {item}: {reason}", file=sys.stderr)

    def finish(self) -> None:
        hidden = sum(self.counts.values()) - self.shown
        if hidden > 0:
            print(f"warning: ... and {hidden} more skipped (not shown)", file=sys.stderr)


_FILE_KEYS = ("file", "filename", "file_name", "image", "path", "filepath")
_CAPTION_KEYS = ("caption", "text")
_LABEL_KEYS = ("label", "class")


def _pick(keys: Iterable[str], wanted: tuple[str, ...]) -> str | None:
    lower = {k.strip().lower(): k for k in keys if isinstance(k, str)}
    return next((lower[w] for w in wanted if w in lower), None)


def _caption_entries(captions: Path) -> Iterator[tuple[str, str | None, str | None]]:
    """(file, caption, label) from a CSV/TSV or JSONL/JSON captions file."""
    if not captions.is_file():
        raise UserError(f"{captions}: captions file not found")
    suffix = captions.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            with open(captions, newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
                header = reader.fieldnames or []
                fcol, ccol = _pick(header, _FILE_KEYS), _pick(header, _CAPTION_KEYS)
                lcol = _pick(header, _LABEL_KEYS)
                if fcol is None or ccol is None:
                    raise UserError(
                        f"{captions}: needs a file column (file/filename/image) and a caption "
                        f"column (caption/text); header has: {', '.join(header) or 'nothing'}"
                    )
                for rec in reader:
                    yield rec.get(fcol) or "", rec.get(ccol), rec.get(lcol) if lcol else None
            return
        if suffix in (".jsonl", ".ndjson", ".json"):
            with open(captions, encoding="utf-8-sig") as f:
                text_start = f.read(1)
                f.seek(0)
                if suffix == ".json" and text_start == "[":
                    records = enumerate(json.load(f), 1)
                else:
                    records = _json_lines(f, captions)
                for n, rec in records:
                    if not isinstance(rec, dict):
                        raise UserError(f"{captions}: record {n} is not a JSON object")
                    fkey = _pick(rec, _FILE_KEYS)
                    ckey, lkey = _pick(rec, _CAPTION_KEYS), _pick(rec, _LABEL_KEYS)
                    if fkey is None:
                        raise UserError(f"{captions}: record {n} has no file/image field")
                    yield (
                        str(rec[fkey]),
                        rec.get(ckey) if ckey else None,
                        rec.get(lkey) if lkey else None,
                    )
            return
    except json.JSONDecodeError as e:
        raise UserError(f"{captions}: invalid JSON at line {e.lineno}: {e.msg}") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{captions}: {first_line(e)}") from None
    raise UserError(f"{captions}: unknown captions format (use .csv, .tsv, .jsonl or .json)")


def _json_lines(f, path: Path) -> Iterator[tuple[int, Any]]:
    for n, line in enumerate(f, 1):
        if line.strip():
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: invalid JSON at line {n}: {e.msg}") from None


def _sidecar_entries(images_dir: Path) -> Iterator[tuple[str, str | None, str | None]]:
    for path in sorted(images_dir.rglob("*")):
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
            txt = path.with_suffix(".txt")
            caption = txt.read_text(encoding="utf-8", errors="replace") if txt.is_file() else None
            yield path.relative_to(images_dir).as_posix(), caption, None


def convert_folder(
    images_dir: str,
    captions: str | None,
    out: str,
    max_size: int = 256,
    quality: int = 90,
    rows_per_shard: int = 1000,
    *,
    limit: int | None = None,
    endpoint_url: str | None = None,
    region: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
    max_warnings: int = 20,
    masks: str | None = None,
    classes: str | None = None,
) -> dict:
    """A folder of images + captions -> shards of RGB JPEGs (longer side <= max_size).

    Captions come from a CSV/TSV (columns file/filename/image + caption/text [+ label/class]),
    JSONL ({"file"|"image", "caption", "label"?}; or a .json list) with paths relative to
    `images_dir`, or, when `captions` is None, a sidecar `<image>.txt` next to each image.
    An image listed several times gives one row per caption. Missing/unreadable images and
    missing captions are skipped with one warning line each (capped at `max_warnings`).
    Returns write_shards' stats plus `seen` and `skipped` {reason: count}.

    `masks`: a folder of per-pixel class masks (maskclip.dense: PNG, 8-bit single channel, the
    image's size, value = class index, 255 = ignore), one per image at the image's relative path
    with the suffix .png (`photos/a/b.jpg` -> `masks/a/b.png`), named by `classes` (default
    `masks/classes.txt`). Masks are resized with their image (nearest) into a `mask` column and
    classes.txt is written beside the shards; a row whose mask is missing or wrong (size, mode,
    class index past the list) is skipped with one warning line, like a bad image.
    """
    from maskclip.transforms import encode_jpeg

    root = Path(images_dir).expanduser()
    if not root.is_dir():
        raise UserError(f"{images_dir}: images folder not found")
    if max_size < 8:
        raise UserError(f"max_size must be at least 8 (got {max_size})")
    if not 1 <= quality <= 100:
        raise UserError(f"quality must be between 1 and 100 (got {quality})")
    if captions:
        captions_path = Path(captions).expanduser()
        entries = _caption_entries(captions_path)
        has_labels = any(lab not in (None, "") for _, _, lab in _caption_entries(captions_path))
    else:
        entries, has_labels = _sidecar_entries(root), False
    masks_root, class_names = _mask_source(masks, classes)
    warn = _Warnings(max_warnings)
    seen = 0
    key_uses: Counter = Counter()

    def rows() -> Iterator[dict]:
        nonlocal seen
        made = 0
        for file, caption, label in entries:
            if limit is not None and made >= limit:
                return
            seen += 1
            caption, why = clean_caption(caption)
            if not file:
                warn(f"{captions} entry {seen}", "empty file name", "no file name")
                continue
            path = Path(file) if os.path.isabs(file) else root / file
            if why is not None:
                hint = f" (no {Path(file).with_suffix('.txt').name})" if not captions else ""
                warn(file, f"{why}{hint}", why)
                continue
            caption = " ".join(caption.split())
            try:
                data = path.read_bytes()
            except OSError as e:
                warn(file, f"cannot read: {e.strerror or first_line(e)}", "missing file")
                continue
            img, why = check_image(data)
            if why is not None:
                warn(file, why, why)
                continue
            try:
                jpg = encode_jpeg(img, quality=quality, max_size=max_size)
            except (OSError, ValueError) as e:
                warn(file, first_line(e), R_CORRUPT_IMAGE)
                continue
            key = Path(file).as_posix() if not os.path.isabs(file) else path.name
            key_uses[key] += 1
            if key_uses[key] > 1:
                key = f"{key}#{key_uses[key] - 1}"
            row = {"key": key, "jpg": jpg, "caption": caption}
            if has_labels:
                row["label"] = clean_label(label)[0]
            if masks_root is not None:
                assert class_names is not None
                rel = Path(file).with_suffix(".png") if not os.path.isabs(file) else None
                mask_path = masks_root / (rel or path.with_suffix(".png").name)
                mask, why = _folder_mask(mask_path, img.size, jpg, len(class_names))
                if why is not None:
                    warn(file, why, "missing mask" if mask is None else "bad mask")
                    continue
                row[MASK_COLUMN] = mask
            made += 1
            yield row

    try:
        stats = write_shards(
            rows(),
            out,
            rows_per_shard,
            endpoint_url,
            region,
            progress,
            overwrite=overwrite,
            source=f"folder {images_dir} captions={captions or 'sidecar .txt'}"
            + (f" masks={masks}" if masks else ""),
            classes=class_names,
        )
    except _NoRows:
        if seen:
            warn.finish()
            raise UserError(
                f"{images_dir}: no usable images ({seen} entries, all skipped: "
                f"{_format_counts(warn.counts)})"
            ) from None
        where = f"listed in {captions}" if captions else "with sidecar .txt captions"
        raise UserError(f"{images_dir}: no images found {where}") from None
    warn.finish()
    stats.update(seen=seen, skipped=dict(warn.counts))
    return stats


def _mask_source(masks: str | None, classes: str | None) -> tuple[Path | None, list[str] | None]:
    """(masks folder, class names) of convert_folder's dense labels, or (None, None)."""
    from maskclip.dense import MaskError, parse_classes

    if masks is None:
        if classes is not None:
            raise UserError(f"{classes}: classes given without a masks folder (--masks DIR)")
        return None, None
    root = Path(masks).expanduser()
    if not root.is_dir():
        raise UserError(f"{masks}: masks folder not found")
    path = Path(classes).expanduser() if classes else root / CLASSES_FILE
    if not path.is_file():
        hint = "" if classes else " (pass the class list with --classes FILE)"
        raise UserError(f"{path}: classes file not found{hint}")
    try:
        return root, parse_classes(path.read_text(encoding="utf-8"))
    except MaskError as e:
        raise UserError(f"{path}: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: {first_line(e)}") from None


def _folder_mask(
    path: Path, image_size: tuple[int, int], jpg: bytes, num_classes: int
) -> tuple[bytes | None, str | None]:
    """(mask PNG bytes at the JPEG's size, None), or (None, why) when the mask file is missing,
    or (b"", why) when it breaks the format."""
    from PIL import Image

    from maskclip.dense import MaskError, decode_mask, encode_mask

    try:
        data = path.read_bytes()
    except OSError as e:
        return None, f"no mask {path} ({e.strerror or first_line(e)})"
    try:
        mask = decode_mask(data, size=image_size, num_classes=num_classes)
    except MaskError as e:
        return b"", f"mask {path}: {e}"
    with Image.open(io.BytesIO(jpg)) as im:
        size = im.size
    if size != image_size:
        mask = np.asarray(Image.fromarray(mask).resize(size, Image.Resampling.NEAREST))
    return encode_mask(mask), None


def _format_counts(counts: dict) -> str:
    return ", ".join(f"{v} {k}" for k, v in counts.items()) or "none"


# ----------------------------------------------------------------------------- Fashion-MNIST


def read_idx(path: str | os.PathLike, limit: int | None = None) -> np.ndarray:
    """An IDX array (optionally .gz); only the first `limit` items are read."""
    path = Path(path)
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[0] or head[1] or head[2] not in _IDX_DTYPES:
                raise UserError(f"{path}: not an IDX file")
            dtype = np.dtype(_IDX_DTYPES[head[2]])
            dims = struct.unpack(f">{head[3]}I", f.read(4 * head[3]))
            n = dims[0] if limit is None else min(dims[0], max(0, limit))
            nbytes = n * math.prod(dims[1:]) * dtype.itemsize
            data = f.read(nbytes)
    except (OSError, EOFError, struct.error) as e:
        raise UserError(f"{path}: cannot read IDX file: {first_line(e)}") from None
    if len(data) < nbytes:
        raise UserError(f"{path}: truncated IDX file")
    return np.frombuffer(data, dtype=dtype).reshape((n, *dims[1:]))


def _find_idx(source: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem, stem.replace("-idx", ".idx")):
        if (source / name).is_file():
            return source / name
    raise UserError(f"fashion-mnist: {source / (stem + '.gz')} not found")


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def fashion_mnist_caption(label: int, rng: np.random.Generator) -> str:
    name = FASHION_MNIST_CLASSES[label]
    template = FASHION_MNIST_TEMPLATES[rng.integers(len(FASHION_MNIST_TEMPLATES))]
    return template.format(a=_article(name), c=name)


FASHION_MNIST_FOREGROUND = 32
"""Mosaic masks: an item's pixel of intensity >= this (of 255, after resizing) is the item's
class; < FASHION_MNIST_BACKGROUND is background; between the two (soft edges) is IGNORE."""
FASHION_MNIST_BACKGROUND = 8
_MOSAIC_CAPTIONS = (  # {items}: "a sneaker at the top left, a bag at the top right and ..."
    "{items}",
    "a grey-scale grid: {items}",
    "{number} fashion items, {items}",
)
_MOSAIC_LIST_CAPTIONS = (  # {items}: "a sneaker, a bag, a coat and a dress" (reading order)
    "{number} fashion items: {items}",
    "a grid of {items} on black",
)


def fashion_mnist_mosaic_classes() -> list[str]:
    """classes.txt of a mosaic: 0 = background, i = FASHION_MNIST_CLASSES[i - 1]."""
    return ["background", *FASHION_MNIST_CLASSES]


def fashion_mnist_item_mask(tile: np.ndarray, label: int) -> np.ndarray:
    """One grey item's mask: label + 1 where it is bright, background where dark, IGNORE on the
    soft edge between (FASHION_MNIST_FOREGROUND / _BACKGROUND)."""
    m = np.where(tile >= FASHION_MNIST_FOREGROUND, label + 1, IGNORE).astype(np.uint8)
    m[tile < FASHION_MNIST_BACKGROUND] = 0
    return m


def _mosaic_row(
    items: np.ndarray, labels: list[int], grid: int, image_size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, str]:
    """grid*grid 28x28 grey items (reading order) -> ([S, S] uint8 image, [S, S] mask, caption)."""
    from PIL import Image

    from maskclip.synthetic import and_list, cell_name, where_phrase

    cell = image_size // grid
    image = np.zeros((image_size, image_size), np.uint8)
    mask = np.zeros((image_size, image_size), np.uint8)
    for k, (a, y) in enumerate(zip(items, labels)):
        row, col = divmod(k, grid)
        img = Image.fromarray(np.ascontiguousarray(a, dtype=np.uint8), mode="L")
        if cell != img.width:
            img = img.resize((cell, cell), Image.Resampling.BICUBIC)
        tile = np.asarray(img)
        m = fashion_mnist_item_mask(tile, y)
        box = np.s_[row * cell : (row + 1) * cell, col * cell : (col + 1) * cell]
        image[box], mask[box] = tile, m
    names = [FASHION_MNIST_CLASSES[y] for y in labels]
    named = [f"{_article(n)} {n}" for n in names]
    number = ("four", "nine")[grid - 2]
    if rng.integers(3) == 0:
        t = _MOSAIC_LIST_CAPTIONS[rng.integers(len(_MOSAIC_LIST_CAPTIONS))]
        caption = t.format(items=and_list(named), number=number)
    else:
        t = _MOSAIC_CAPTIONS[rng.integers(len(_MOSAIC_CAPTIONS))]
        located = [
            f"{n} {where_phrase(cell_name(k % grid, k // grid, grid))}" for k, n in enumerate(named)
        ]
        caption = t.format(items=and_list(located), number=number)
    return image, mask, caption


def convert_fashion_mnist(
    out: str,
    source_dir: str = FASHION_MNIST_DIR,
    image_size: int = 32,
    rows_per_shard: int = 1000,
    limit: int | None = None,
    seed: int = 0,
    *,
    mosaic: int = 0,
    val_rows: int = 0,
    quality: int = 95,
    endpoint_url: str | None = None,
    region: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Fashion-MNIST idx files -> `out/train` (60k) and `out/test` (10k) shards.

    label = class name; caption = a seeded random template over the class name; the 28x28 grey
    images are resized to image_size and stored as RGB JPEG, with a `mask` column (the item's
    pixels = its class + 1, see fashion_mnist_item_mask) and classes.txt, so single items are a
    dense-labelled set too. `limit` caps each split (the first
    rows). Returns {"train": stats, "test": stats}.

    `mosaic` = k (2 or 3): each row is a k x k grid of items (each resized to image_size / k)
    drawn without repeats from a seeded permutation of the split (train mosaics from train items,
    test from test), with a `mask` column (maskclip.dense; classes.txt = background + the 10
    classes; FASHION_MNIST_FOREGROUND / _BACKGROUND thresholds), a caption naming every item and
    its place ("a sneaker at the top left, a bag at the top right, ..."), and label = the top-left
    item's class. A split has len(split) // k² rows; `limit` caps the rows (reading only the
    first limit * k² items).

    `val_rows` = N: also `out/val`, the last N rows of the train file (N * k² items with
    `mosaic`), held out of `out/train`, which gets the rest: a split to choose settings on
    (data.dense_probe_split: val) that leaves test/ untouched. Each split draws from its own
    seeded stream (train 0, test 1, val 2), so train/ is the same rows as without val_rows, less
    its last N, and test/ does not change. `limit` caps val too (its first rows).
    """
    from PIL import Image

    from maskclip.transforms import encode_jpeg

    source = Path(source_dir)
    if not source.is_dir():
        raise UserError(
            f"fashion-mnist: no data at {source_dir}; "
            "install it with: apt-get install dataset-fashion-mnist"
        )
    if image_size < 8:
        raise UserError(f"image_size must be at least 8 (got {image_size})")
    if mosaic not in (0, 1, 2, 3):
        raise UserError(f"mosaic must be 2 or 3 (items per side; got {mosaic})")
    if mosaic > 1 and (image_size % mosaic or image_size // mosaic < 8):
        raise UserError(
            f"image_size {image_size} does not split into {mosaic}x{mosaic} cells of at least "
            f"8 px (use a multiple of {mosaic}, at least {8 * mosaic})"
        )
    if val_rows < 0:
        raise UserError(f"val_rows must not be negative (got {val_rows})")
    per_row = mosaic * mosaic if mosaic > 1 else 1
    items = None if limit is None else limit * per_row
    splits = {}  # split -> (images, labels, RNG stream id), in the order written
    for split_id, (split, (images_stem, labels_stem)) in enumerate(_FASHION_FILES.items()):
        held = val_rows if split == "train" else 0
        n = None if items is None or held else items  # the val rows are the file's last ones
        images = read_idx(_find_idx(source, images_stem), n)
        labels = read_idx(_find_idx(source, labels_stem), n)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise UserError(
                f"fashion-mnist: {split}: {images.shape} images do not match {labels.shape} labels"
            )
        if held:
            rows = len(images) // per_row
            if held >= rows:
                raise UserError(f"val_rows {held}: the {split} split has only {rows} rows")
            cut = len(images) - held * per_row
            splits[split] = (images[:cut][:items], labels[:cut][:items], split_id)
            splits["val"] = (images[cut:][:items], labels[cut:][:items], _FASHION_VAL_STREAM)
        else:
            splits[split] = (images, labels, split_id)
    for split, (_, labels, _) in splits.items():
        bad_label = np.flatnonzero(labels >= len(FASHION_MNIST_CLASSES))
        if len(bad_label):
            i = int(bad_label[0])
            raise UserError(f"fashion-mnist: {split} row {i}: label {labels[i]} out of range")
    result = {}
    for split, (images, labels, split_id) in splits.items():
        if per_row > 1:
            result[split] = write_shards(
                _mosaic_rows(images, labels, mosaic, image_size, [seed, split_id], split, quality),
                _join(out, split),
                rows_per_shard,
                endpoint_url,
                region,
                progress,
                total=len(images) // per_row,
                overwrite=overwrite,
                source=f"fashion-mnist {split} ({source_dir}) mosaic={mosaic} "
                f"image_size={image_size} seed={seed}",
                classes=fashion_mnist_mosaic_classes(),
            )
            continue

        def rows(images=images, labels=labels, split=split, split_id=split_id) -> Iterator[dict]:
            rng = np.random.default_rng([seed, split_id])
            for i, (a, y) in enumerate(zip(images, labels)):
                y = int(y)
                if not 0 <= y < len(FASHION_MNIST_CLASSES):
                    raise UserError(f"fashion-mnist: {split} row {i}: label {y} out of range")
                img = Image.fromarray(np.ascontiguousarray(a, dtype=np.uint8), mode="L")
                if image_size != img.width:
                    img = img.resize((image_size, image_size), Image.Resampling.BICUBIC)
                yield {
                    "key": f"{split}-{i:05d}",
                    "jpg": encode_jpeg(img.convert("RGB"), quality=quality),
                    "caption": fashion_mnist_caption(y, rng),
                    "label": FASHION_MNIST_CLASSES[y],
                    MASK_COLUMN: encode_mask(fashion_mnist_item_mask(np.asarray(img), y)),
                }

        result[split] = write_shards(
            rows(),
            _join(out, split),
            rows_per_shard,
            endpoint_url,
            region,
            progress,
            total=len(images),
            overwrite=overwrite,
            source=f"fashion-mnist {split} ({source_dir}) image_size={image_size} seed={seed}",
            classes=fashion_mnist_mosaic_classes(),
        )
    return result


def _mosaic_rows(
    images: np.ndarray,
    labels: np.ndarray,
    grid: int,
    image_size: int,
    seed: list[int],
    split: str,
    quality: int,
) -> Iterator[dict]:
    from PIL import Image

    from maskclip.transforms import encode_jpeg

    rng = np.random.default_rng(seed)
    per_row = grid * grid
    order = rng.permutation(len(images))
    for j in range(len(images) // per_row):
        pick = order[j * per_row : (j + 1) * per_row]
        ys = [int(y) for y in labels[pick]]
        image, mask, caption = _mosaic_row(images[pick], ys, grid, image_size, rng)
        yield {
            "key": f"{split}-{j:05d}",
            "jpg": encode_jpeg(Image.fromarray(image, mode="L").convert("RGB"), quality=quality),
            "caption": caption,
            "label": FASHION_MNIST_CLASSES[ys[0]],
            MASK_COLUMN: encode_mask(mask),
        }


# ----------------------------------------------------------------------------- inspect


def inspect(
    uri: str,
    endpoint_url: str | None = None,
    region: str | None = None,
    samples: int = 3,
    *,
    check_rows: int = 1000,
    image_column: str = "jpg",
    caption_column: str = "caption",
    label_column: str = "label",
) -> dict:
    """Summarise a dataset with bounded memory.

    Returns {uri, rows, shards, columns {name: type}, parts {subfolder: rows}, complete (every
    folder with shards has _SUCCESS), samples [{key, caption, label}], labels {label: count} or
    None, missing_columns, checked, bad_images, bad_examples, image_sizes}. `rows` comes from the
    Parquet footers; images are decoded only for the first `check_rows` rows.

    With a `mask` column (maskclip.dense) also: classes (names from the first folder's
    classes.txt, or None), classes_missing [folders with shards but no classes.txt],
    classes_error (an unreadable classes.txt: why), classes_differ [folders whose list differs],
    masks_checked, mask_shares {class: share of labelled pixels} over the checked rows' masks
    (class indices as names when classes.txt is missing), mask_ignored (share of pixels = 255),
    bad_masks, bad_mask_examples ("key: why": size vs image, index past classes.txt).
    """
    source = resolve_source(uri, None, "dataset", endpoint_url=endpoint_url, region=region)
    fs, files, root = source.filesystem, source.paths, source.root
    rows = 0
    schema: pa.Schema | None = None
    mismatched: list[str] = []
    parts: Counter = Counter()
    metas: list[tuple[str, pq.ParquetFile]] = []
    for path in files:
        pf = source.open(path)
        n = pf.metadata.num_rows
        rows += n
        s = pf.schema_arrow
        if schema is None:
            schema = s
        elif not s.equals(schema):
            mismatched.append(display(path, fs))
        rel_dir = path[len(root) :].strip("/").rpartition("/")[0]
        parts[rel_dir or "."] += n
        metas.append((path, pf))
    assert schema is not None
    names = schema.names

    complete = True
    for rel_dir in parts:
        d = root if rel_dir == "." else f"{root}/{rel_dir}"
        try:
            complete &= fs.get_file_info(f"{d}/{SUCCESS}").type == pafs.FileType.File
        except OSError:
            complete = False

    has_mask = MASK_COLUMN in names
    part_classes: dict[str, list[str] | None] = {}
    classes_error: str | None = None
    unreadable: set[str] = set()
    if has_mask:
        for rel_dir in parts:
            d = root if rel_dir == "." else f"{root}/{rel_dir}"
            part_classes[rel_dir], why = _read_classes(fs, f"{d}/{CLASSES_FILE}")
            if why is not None:
                unreadable.add(rel_dir)
                classes_error = classes_error or why
    known = [c for c in part_classes.values() if c is not None]
    classes = known[0] if known else None
    mask_counts = np.zeros(256, np.int64)
    masks_checked = bad_masks = 0
    bad_mask_examples: list[str] = []

    labels: Counter | None = Counter() if label_column in names else None
    sample_rows: list[dict] = []
    checked = bad = 0
    bad_examples: list[str] = []
    sizes: Counter = Counter()
    decode = image_column in names and check_rows > 0
    small_cols = [c for c in ("key", caption_column, label_column) if c in names]
    for path, pf in metas:
        try:
            if labels is not None:
                col = pf.read(columns=[label_column]).column(0)
                labels.update(v for v in col.to_pylist())
            if len(sample_rows) < samples and small_cols:
                for batch in pf.iter_batches(batch_size=max(1, samples), columns=small_cols):
                    sample_rows.extend(batch.to_pylist()[: samples - len(sample_rows)])
                    break
            if decode and checked < check_rows:
                cols = [image_column] + (["key"] if "key" in names else [])
                cols += [MASK_COLUMN] if has_mask else []
                rel_dir = path[len(root) :].strip("/").rpartition("/")[0] or "."
                n_classes = len(part_classes.get(rel_dir) or []) or None
                for batch in pf.iter_batches(batch_size=256, columns=cols):
                    for r in batch.to_pylist():
                        if checked >= check_rows:
                            break
                        checked += 1
                        img, why = check_image(r[image_column])
                        if why is None:
                            sizes[f"{img.width}x{img.height}"] += 1
                        else:
                            bad += 1
                            if len(bad_examples) < 3:
                                bad_examples.append(f"{r.get('key', '?')}: {why}")
                        if has_mask:
                            masks_checked += 1
                            size = None if img is None else img.size
                            mask, why = _check_mask(r[MASK_COLUMN], size, n_classes)
                            if mask is not None:
                                mask_counts += np.bincount(mask.ravel(), minlength=256)
                            else:
                                bad_masks += 1
                                if len(bad_mask_examples) < 3:
                                    bad_mask_examples.append(f"{r.get('key', '?')}: {why}")
                    if checked >= check_rows:
                        break
        except (OSError, pa.ArrowInvalid) as e:
            raise UserError(f"dataset: cannot read {display(path, fs)}: {first_line(e)}") from None

    result = {
        "uri": uri,
        "rows": rows,
        "shards": len(files),
        "columns": {f.name: str(f.type) for f in schema},
        "missing_columns": [c for c in (image_column, caption_column) if c not in names],
        "schema_mismatch": mismatched,
        "parts": dict(sorted(parts.items())),
        "complete": complete,
        "samples": sample_rows,
        "labels": None
        if labels is None
        else dict(sorted(labels.items(), key=lambda kv: (-kv[1], str(kv[0])))),
        "checked": checked,
        "bad_images": bad,
        "bad_examples": bad_examples,
        "image_sizes": dict(sizes.most_common(5)),
    }
    if has_mask:
        labelled = mask_counts[:IGNORE]
        n = len(classes) if classes else int(np.flatnonzero(labelled).max(initial=-1)) + 1
        total = mask_counts.sum()
        shares = labelled / labelled.sum() if labelled.sum() else labelled.astype(float)
        class_names = classes or [str(i) for i in range(n)]
        result.update(
            classes=classes,
            classes_missing=[
                _part_dir(root, d, fs)
                for d, c in part_classes.items()
                if c is None and d not in unreadable
            ],
            classes_error=classes_error,
            classes_differ=[
                _part_dir(root, d, fs) for d, c in part_classes.items() if c and c != classes
            ],
            masks_checked=masks_checked,
            mask_shares={class_names[i]: float(shares[i]) for i in range(n)},
            mask_ignored=float(mask_counts[IGNORE] / total) if total else 0.0,
            bad_masks=bad_masks,
            bad_mask_examples=bad_mask_examples,
        )
    return result


def _part_dir(root: str, rel_dir: str, fs: pafs.FileSystem) -> str:
    return display(root if rel_dir == "." else f"{root}/{rel_dir}", fs)


def _read_classes(fs: pafs.FileSystem, path: str) -> tuple[list[str] | None, str | None]:
    """(class names, None) from a classes.txt; (None, None) when absent; (None, why) if bad."""
    from maskclip.dense import MaskError, parse_classes

    try:
        if fs.get_file_info(path).type != pafs.FileType.File:
            return None, None
        with fs.open_input_stream(path) as f:
            text = f.read().decode("utf-8")
        return parse_classes(text), None
    except (MaskError, UnicodeDecodeError, OSError) as e:
        return None, f"{display(path, fs)}: {first_line(e)}"


def _check_mask(
    data: Any, size: tuple[int, int] | None, num_classes: int | None
) -> tuple[np.ndarray | None, str | None]:
    from maskclip.dense import MaskError, decode_mask

    if not data:
        return None, "no mask"
    try:
        return decode_mask(data, size=size, num_classes=num_classes), None
    except MaskError as e:
        return None, str(e)


def format_inspect(info: dict) -> str:
    """A readable multi-line summary of inspect()'s result; the last line is `rows: N`."""
    lines = [
        f"dataset: {info['uri']}  ({info['shards']} shard{'s' * (info['shards'] != 1)}, "
        + ("complete" if info["complete"] else "no _SUCCESS marker: incomplete or foreign")
        + ")"
    ]
    lines.append("columns: " + ", ".join(f"{k} ({v})" for k, v in info["columns"].items()))
    if info["missing_columns"]:
        lines.append("missing columns: " + ", ".join(info["missing_columns"]))
    if info["schema_mismatch"]:
        lines.append(
            f"schema differs in {len(info['schema_mismatch'])} shard(s), e.g. "
            + info["schema_mismatch"][0]
        )
    if len(info["parts"]) > 1:
        lines.append("parts: " + ", ".join(f"{k}: {v} rows" for k, v in info["parts"].items()))
    if info["labels"] is not None:
        shown = list(info["labels"].items())[:12]
        more = len(info["labels"]) - len(shown)
        lines.append(
            f"labels ({len(info['labels'])}): "
            + ", ".join(f"{k} {v}" for k, v in shown)
            + (f", ... {more} more" if more > 0 else "")
        )
    if info["samples"]:
        lines.append("samples:")
        for s in info["samples"]:
            label = f"  [{s['label']}]" if s.get("label") is not None else ""
            lines.append(f"  {s.get('key', '?')}{label}  {s.get('caption', '')}")
    if "mask_shares" in info:
        lines.extend(_format_masks(info))
    if info["checked"]:
        sizes = ", ".join(f"{k} ({v})" for k, v in info["image_sizes"].items())
        lines.append(
            f"images: {info['checked']} checked, {info['bad_images']} not decodable"
            + (f"; sizes {sizes}" if sizes else "")
        )
        lines.extend(f"  bad: {b}" for b in info["bad_examples"])
    lines.append(f"rows: {info['rows']}")
    return "\n".join(lines)


def _format_masks(info: dict) -> list[str]:
    lines = []
    if info["classes"] is not None:
        names = info["classes"]
        shown = names[:30]
        more = f", ... {len(names) - len(shown)} more" if len(names) > len(shown) else ""
        lines.append(f"classes ({len(names)}): " + ", ".join(shown) + more)
    if info["classes_error"]:
        lines.append(f"classes: bad {CLASSES_FILE}: {info['classes_error']}")
    if info["classes_missing"]:
        lines.append(
            f"classes: mask column but no {CLASSES_FILE} in "
            + ", ".join(info["classes_missing"])
            + (" (classes shown by index)" if info["classes"] is None else "")
        )
    if info["classes_differ"]:
        lines.append(
            f"classes: {CLASSES_FILE} differs from the first in "
            + ", ".join(info["classes_differ"])
        )
    if info["masks_checked"]:
        shares = list(info["mask_shares"].items())
        shown = shares[:30]
        more = f", ... {len(shares) - len(shown)} more" if len(shares) > len(shown) else ""
        lines.append(
            f"mask pixel shares ({info['masks_checked'] - info['bad_masks']} masks, "
            f"{info['mask_ignored']:.1%} ignored): "
            + ", ".join(f"{k} {v:.3f}" for k, v in shown)
            + more
        )
        lines.append(f"masks: {info['masks_checked']} checked, {info['bad_masks']} bad")
        lines.extend(f"  bad mask: {b}" for b in info["bad_mask_examples"])
    return lines


__all__ = [
    "convert_fashion_mnist",
    "convert_folder",
    "format_inspect",
    "inspect",
    "read_idx",
    "synth",
    "write_shards",
]
