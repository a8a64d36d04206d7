"""The Ray Data pipeline: a resolved Parquet source (local or S3) -> decoded, augmented,
tokenized batches.

    train = resolve_source(spec.data.train, spec.storage)         # service.storage, listed once
    captions = sample_captions(train, spec.data.tokenizer_captions, spec.data.max_caption_chars)
    ds = build_dataset(train, spec, "train", tok.to_json(), control_name)
    for batch in ds.iter_batches(batch_size=64, local_shuffle_buffer_size=...): ...
        images = normalise_images(torch.as_tensor(batch["image"]))  # uint8 -> float32

One Ray Data operator: each task reads its share of the files (read_units: a file, or part of
one when files are fewer than decode tasks) and decodes it; a task per kept CPU (decode_plan).

Images leave the pipeline as uint8 [B, 3, H, W] crops, normalised by the consumer
(maskclip.transforms.normalise_images, after the copy to the device): float32 rows are 4x the
bytes (600 KB at 224 px) in Ray's object store, which at 224 px filled it and spilled GBs.

Streaming only: nothing here materializes the dataset; rows that cannot be used (service.rows:
bad image, no caption, ...) are dropped and counted per reason in the run's control actor
(service.control.RunControl), which decides when too many were bad.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from . import rows
from .storage import Source

if TYPE_CHECKING:
    import ray.data

    from service.spec import JobSpec

MAP_NUM_CPUS = 0.5
"""CPUs per decode/transform task while Ray Data has under one CPU per training worker (training
workers take 0.5 each on a 2-core machine); with more, a task takes a whole CPU (it decodes on
one thread)."""
MIN_DECODE_TASKS = 2
"""Decode tasks allowed at once, at least, when they take MAP_NUM_CPUS each: what a 2-core laptop
(1 worker, 0.5 + 0.5 CPU) ran."""
TARGET_BATCH_BYTES = 8 << 20
"""Decoded uint8 images per map batch (and so per decode task) are kept near this size (64..256
rows; 64 at 224 px, ~0.15 s of decoding)."""
TARGET_BLOCK_BYTES = 16 << 20
"""Ray Data blocks of this pipeline are cut at this size (DataContext.target_max_block_size,
128 MB by default): ~100 uint8 rows at 224 px. A decode task pauses once 2 of its output blocks
wait unconsumed (Ray Data's streaming-generator buffer), and Ray Data starts a task only while
that pending output fits the object-store budget (trainer.ingest_options: 154 MB for batch 32 at
224 px), so a whole task's output in one block ran one task at a time. Smaller blocks cost per
block: one decode task at 224 px gave 0.82 of the bare loop's rows/s with 4 MB blocks and 0.93
with 16 MB (benchmarks/pipeline.py --image-size 224 --cpus 1, same machine, 2026-12-03)."""

STATS_LOOKUP_S = 30.0
"""Decoders look the control actor up by name again after this many seconds."""


def sample_captions(source: Source, n: int, max_chars: int, column: str = "caption") -> list[str]:
    """The first `n` usable captions of `source`, read with pyarrow (caption column only)."""
    out: list[str] = []
    for batch in source.iter_batches([column], batch_size=1024):
        for value in batch.column(0).to_pylist():
            text, _ = rows.clean_caption(value, max_chars)
            if text is not None:
                out.append(text)
                if len(out) >= n:
                    return out
    return out


# ---------------------------------------------------------------- the dataset


TORCH_HALF_IMPORTED_EXIT = 75
"""Exit status of a worker process that ends itself because torch is half imported in it."""


def import_torch():
    """`import torch`, or end this worker process when an earlier import in it was cut short.

    Ray cancels the running tasks of a Data execution (a KeyboardInterrupt inside the task) when
    it tears the execution down, e.g. after a training worker died. A decode task cancelled
    inside its first `import torch` leaves torch's native extension loaded and half of its
    modules registered, and every later `import torch` in that process fails
    ("AttributeError: partially initialized module 'torch'..." or "RuntimeError: ... registered
    at torch/_prims/__init__.py"). Ray reuses task worker processes, so each later decode task
    that landed there failed: in CI a run started after the worker-kill test ended with
    "training failed after 2 restart(s)" (2026-12-02). Such a process cannot recover, so it
    exits, and Ray runs the task again in a new worker (Ray Data's tasks retry worker deaths
    without limit: max_retries=-1 in ray.data._internal.remote_fn, Ray 2.60). A first import
    that fails for any other reason raises as usual, so a broken install is not retried forever.
    """
    if "torch" not in sys.modules and "torch._C" in sys.modules:
        print(
            f"maskclip: worker process {os.getpid()} holds a half-imported torch (an earlier "
            "import was cancelled); ending it so Ray reruns the task in a new worker",
            file=sys.stderr,
            flush=True,
        )
        os._exit(TORCH_HALF_IMPORTED_EXIT)
    import torch

    return torch


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
        status_column: str | None = None,
        draft: bool = True,
    ):
        torch = import_torch()

        from maskclip.tokenizer import Tokenizer
        from maskclip.transforms import draft_min_side, eval_transform, train_transform

        torch.set_num_threads(1)
        if train:  # every actor would otherwise draw the same crops (torch's fixed default seed)
            torch.manual_seed(int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1))
        self.image_column = image_column
        self.caption_column = caption_column
        self.label_column = label_column
        self.status_column = status_column
        self.tokenizer = Tokenizer.from_json(tokenizer_json)
        # uint8 crops: the consumer normalises (maskclip.transforms.normalise_images)
        transform = train_transform if train else eval_transform
        self.transform = transform(image_size, normalise=False)
        self.image_size = image_size
        # JPEG draft mode: large JPEGs decode at 1/2..1/8 scale, never below what the crop needs
        self.min_side = draft_min_side(image_size, train) if draft else None
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

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        images_in = batch[self.image_column]
        captions_in = batch[self.caption_column]
        labels_in = batch[self.label_column] if self.label_column else None
        status_in = batch[self.status_column] if self.status_column else None
        n = len(images_in)
        images: list[np.ndarray] = []
        captions: list[str] = []
        labels: list[str] = []
        reasons: dict[str, int] = {}
        missing = 0
        for i in range(n):
            if status_in is not None and rows.not_downloaded(status_in[i], images_in[i]):
                missing += 1
                continue
            row, why = rows.clean_row(
                images_in[i],
                captions_in[i],
                None if labels_in is None else labels_in[i],
                max_pixels=self.max_pixels,
                max_caption_chars=self.max_caption_chars,
                transform=self.transform,
                need_label=labels_in is not None,
                min_side=self.min_side,
            )
            if row is None:
                reasons[why] = reasons.get(why, 0) + 1
                continue
            images.append(row.image.numpy())
            captions.append(row.caption)
            if labels_in is not None:
                labels.append(row.label)
        bad = n - missing - len(images)
        stats = self._stats_actor()
        if stats is not None:
            stats.add.remote(n, bad, reasons, missing)  # fire and forget
        if not images:  # an all-bad batch yields nothing (an empty tensor block would not concat)
            return
        out = {
            "image": np.stack(images),  # uint8 [B, 3, H, W]
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
    """`DecodeBatch(**kwargs)(batch)`, the DecodeBatch cached per process (read_decode's step).

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


def read_units(source: Source, tasks: int) -> list[dict[str, Any]]:
    """What one decode task reads: a whole file, or when there are fewer files than `tasks`, an
    equal share of a file's rows (so one big file still keeps every decode task busy; a share
    reads only its row groups, but a file written as one row group is read by each share)."""
    if len(source.paths) >= tasks:
        return [{"path": p, "start": 0, "stop": None} for p in source.paths]
    pieces = math.ceil(tasks / len(source.paths))
    units = []
    for path, n in zip(source.paths, source.file_rows()):
        cuts = [n * i // pieces for i in range(pieces + 1)]
        units += [{"path": path, "start": a, "stop": b} for a, b in zip(cuts, cuts[1:]) if b > a]
    return units


def read_decode(
    units: pa.Table, *, source: Source, columns: list[str], rows_per_batch: int, **decoder: Any
) -> Iterator[dict[str, np.ndarray]]:
    """map_batches fn: read a batch of read_units and decode their rows in the same task.

    One operator, not a read operator feeding a decode operator: the raw JPEG bytes never go
    through the object store, and Ray Data schedules, backpressures and budgets one kind of
    task. Measured at 224 px with one decode task: 0.66 of the bare loop's rows/s as two
    operators, 0.85 fused (benchmarks/pipeline.py --image-size 224 --cpus 1, 2026-12-03). Not
    `ray.data.read_parquet`: its ListFiles step always asks for a whole CPU (a job whose training
    workers hold all but a fraction of a CPU would never start reading)."""
    for unit in units.to_pylist():
        path, start, stop = unit["path"], unit["start"], unit["stop"]
        for rb in source.iter_file(path, columns, rows_per_batch, start, stop):
            cols = {n: rb.column(n).to_numpy(zero_copy_only=False) for n in rb.schema.names}
            yield from decode_batch(cols, **decoder)


def map_batch_size(image_size: int) -> int:
    """Rows per decode batch: ~TARGET_BATCH_BYTES of uint8 images, within 64..256."""
    per_row = 3 * image_size * image_size
    return int(min(256, max(64, TARGET_BATCH_BYTES // per_row)))


def decode_plan(spec: JobSpec) -> tuple[int, float]:
    """(decode tasks at once, CPUs per decode task): the CPUs the spec keeps for Ray Data
    (scaling.num_workers x data_cpus_per_worker, which `maskclip run` checks the cluster has
    and `maskclip render` gives the pods) filled with single-threaded decode tasks: one per
    whole CPU, or, under one CPU per worker, tasks of MAP_NUM_CPUS, at least MIN_DECODE_TASKS.
    A 2-core laptop (1 worker, 0.5 data CPUs) keeps 2 tasks of 0.5 CPU; 1 worker with 1 data
    CPU runs 1 task; jobs/s3.yaml (4 workers x 6) runs 24 tasks of 1 CPU. Ray Data starts fewer
    when the cluster has fewer free CPUs, and backpressure (trainer.ingest_options) holds them
    back when decoding runs ahead of training."""
    s = spec.scaling
    data_cpus = s.num_workers * s.data_cpus()
    if s.data_cpus() >= 1:
        return int(data_cpus + 1e-9), 1.0
    return max(MIN_DECODE_TASKS, int(data_cpus / MAP_NUM_CPUS + 1e-9)), MAP_NUM_CPUS


def build_dataset(
    source: Source, spec: JobSpec, split: str, tokenizer_json: str, stats_actor_name: str | None
) -> ray.data.Dataset:
    """A lazy, streaming Dataset of {"image": u8 [B,3,H,W], "tokens": i64 [B,L]} (+ val labels);
    the consumer normalises the images (maskclip.transforms.normalise_images).

    "train": random-resized-crop; file order shuffled per epoch when data.shuffle (rows are
    shuffled further by the consumer's local_shuffle_buffer_size). "val": resize + centre crop,
    plus "label" (if the column exists; a row without one is bad) and "caption". Dropped rows are
    counted in the control actor named `stats_actor_name` (if any); with img2dataset's status
    column, failed downloads are dropped and counted apart (service.rows.not_downloaded).
    """
    import ray
    import ray.data

    from .data_pacing import install

    install()  # before the Dataset exists: it keeps a copy of the current DataContext
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    d = spec.data
    source.require([d.image_column, d.caption_column])
    label_column = d.label_column if split == "val" and d.label_column in source.columns else None
    status_column = rows.STATUS_COLUMN if rows.STATUS_COLUMN in source.columns else None
    columns = [d.image_column, d.caption_column]
    columns += [c for c in (label_column, status_column) if c and c not in columns]
    tasks, task_cpus = decode_plan(spec)
    units = read_units(source, tasks)
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    if split == "train" and d.shuffle:  # only the list of units is shuffled: no barrier on rows
        ds = ds.randomize_block_order(
            seed=ray.data.RandomSeedConfig(seed=spec.run.seed, reseed_after_execution=True)
        )
    # the context object every operator of this Dataset shares (a copy of the current one)
    ds.context.target_max_block_size = TARGET_BLOCK_BYTES
    return ds.map_batches(
        read_decode,
        fn_kwargs={
            "source": source,
            "columns": columns,
            "rows_per_batch": map_batch_size(spec.image_size),
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
            "status_column": status_column,
        },
        batch_size=1,
        batch_format="pyarrow",
        compute=ray.data.TaskPoolStrategy(size=tasks),
        num_cpus=task_cpus,
    )
