"""End-to-end pipeline benchmark: Ray Train + Ray Data against a bare PyTorch loop (CPU).

    .venv/bin/python benchmarks/pipeline.py             # defaults: 2000 (and 20000) rows, 40 steps
    .venv/bin/python benchmarks/pipeline.py --quick     # smoke run: small numbers, ~2 min
    .venv/bin/python benchmarks/pipeline.py --rows 4000 --steps 60 --batch-size 64

Everything lives in a temporary folder (data, runs, checkpoints, an sqlite MLflow store) that is
removed at the end. The data are `--rows` synthetic 32 px rows (service.datasets.synth); the
10x dataset repeats those shards ten times (same shard size, ten times the shards and rows).

1. Training throughput, Ray / bare. Bare: MaskCLIPTask (maskclip_tiny, efficient mode) with the
   service's AdamW, schedule, grad clipping and EMA update, over pre-decoded batches in memory,
   with as many torch threads as the Ray Train worker gets (OMP_NUM_THREADS, else
   floor(scaling.cpus_per_worker), min 1: what Ray sets for the worker). Ray: `run_job` on the
   10x dataset with one worker; samples/s per log interval from the wall-clock timestamps of the
   metrics rank 0 logs to MLflow (so logging overhead counts), median over the intervals after
   the first log. Both measure `--steps` steps after warm-up; the bare loop runs before and
   after the Ray phases and the mean of the two is used.
2. Ray Data decode rows/s (`build_dataset(spec, "train")` iterated alone with iter_batches,
   after warm-up batches) / the bare loop's samples/s.
3. Peak RSS of the process tree (driver + Ray processes, RSS summed over psutil children every
   0.2 s) of a fresh subprocess that starts Ray and streams the whole 10x dataset through the
   pipeline, over the same for the 1x dataset.

The numbers are noisy on a loaded machine (the load average is printed). The last three lines
are for scripts: `ray/bare throughput ratio: X.XX`, `data/train throughput ratio: X.XX`,
`rss 10x/1x ratio: X.XX`.

With `--image-size N` (e.g. 224) it measures the input pipeline alone instead, at real size:

    .venv/bin/python benchmarks/pipeline.py --image-size 224                # 2000 rows, 5 rounds
    .venv/bin/python benchmarks/pipeline.py --image-size 224 --source-size 1024x768
    .venv/bin/python benchmarks/pipeline.py --image-size 224 --rows 64 --steps 2   # smoke test

`--rows` photo-like JPEGs (a smooth colour field, texture and noise; `--source-size`, default
500x375, quality 90, ~65 KB each: what img2dataset keeps of a web photo) are written as shards.
Then `--steps` rounds (after one untimed warm-up round), each arm in turn within a round:
bare: service.data.DecodeBatch (the pipeline's own decode + random-resized-crop + tokenize, one
thread) over the rows already in memory, on one CPU, with JPEG draft mode and without; ray:
`build_dataset(spec, "train")` iterated alone over `--repeat` (4) copies of the shards, rows/s
from its first batch to the end of the pass (the execution's start-up, printed apart, is
excluded: a training run pays it once per epoch), divided by the CPUs its decode tasks hold
(service.data.decode_plan: `--cpus` tasks of one CPU; default: all CPUs but one, which the
driver, Ray's own processes and the consumer keep, as a training node keeps them for the
trainer). The Ray arm reads the rows from the shards inside its decode tasks; the bare arm
starts from rows already in memory. Both arms do the same work per row:
decode, crop and tokenize, images left as uint8 (the training loop normalises them on its
device). Prints the medians: `decode rows/s per cpu: X` (bare, draft), `decode rows/s per cpu
without draft: X` and `ray/bare decode ratio: X` (the median of the rounds' ratios; goal >= 0.9).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MARK = "PIPELINE_BENCH_RSS "
RUN_NAME = "bench-pipeline"
EXPERIMENT = "bench-pipeline"


# ---------------------------------------------------------------- data and spec


def make_data(root: Path, rows: int, rows_per_shard: int) -> tuple[Path, Path]:
    """`rows` synthetic rows in root/x1; root/x10 holds each of its shards ten times."""
    from service.datasets import synth

    x1, x10 = root / "x1", root / "x10"
    synth(str(x1), rows=rows, image_size=32, rows_per_shard=rows_per_shard, progress=False)
    x10.mkdir()
    shards = sorted(x1.glob("*.parquet"))
    for copy in range(10):
        for i, shard in enumerate(shards):
            shutil.copyfile(shard, x10 / f"part-{copy * len(shards) + i:05d}.parquet")
    return x1, x10


def make_spec(root: Path, train: Path, args, total_steps: int):
    from service.spec import build_spec

    return build_spec(
        {
            "run": {"name": RUN_NAME, "output_dir": str(root / "runs"), "seed": 0},
            "model": {"size": "maskclip_tiny", "mode": "efficient", "vocab_size": 1000},
            "data": {"train": str(train)},
            "optim": {
                "batch_size": args.batch_size,
                "max_steps": total_steps,
                "log_every": args.log_every,
            },
            "scaling": {"num_workers": 1},
            # no checkpoint inside the measured steps (the bare loop writes none)
            "checkpoint": {"storage_path": str(root / "checkpoints"), "every_steps": 10**9},
            "tracking": {
                "tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
                "experiment": EXPERIMENT,
            },
        }
    )


def worker_threads(spec) -> int:
    """Torch threads of the Ray Train worker: Ray sets OMP_NUM_THREADS from its CPUs."""
    env = os.environ.get("OMP_NUM_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, math.floor(spec.scaling.cpus_per_worker))


# ---------------------------------------------------------------- 1. bare loop


def predecoded_batches(spec, tokenizer_json: str, n_batches: int):
    """The first rows of data.train decoded by the pipeline's own DecodeBatch (train transform)."""
    import torch

    from maskclip.transforms import normalise_images
    from service.data import DecodeBatch
    from service.storage import resolve_source

    d, b = spec.data, spec.optim.batch_size
    decoder = DecodeBatch(
        image_column=d.image_column,
        caption_column=d.caption_column,
        label_column=None,
        tokenizer_json=tokenizer_json,
        image_size=spec.image_size,
        train=True,
        max_pixels=d.max_image_pixels,
        max_caption_chars=d.max_caption_chars,
        stats_actor_name=None,
        keep_caption=False,
    )
    images, tokens = [], []
    train = resolve_source(d.train, spec.storage)
    for path in train.paths:
        for rb in train.iter_file(path, [d.image_column, d.caption_column], b):
            cols = {
                name: rb.column(name).to_numpy(zero_copy_only=False) for name in rb.schema.names
            }
            for out in decoder(cols):
                images.append(torch.from_numpy(out["image"]))
                tokens.append(torch.from_numpy(out["tokens"]))
            if sum(len(x) for x in images) >= n_batches * b:
                break
        if sum(len(x) for x in images) >= n_batches * b:
            break
    # uint8 crops, normalised as the training loop normalises them
    images_all, tokens_all = normalise_images(torch.cat(images)), torch.cat(tokens)
    n = len(images_all) // b
    if n < 1:
        raise SystemExit(f"need at least {b} rows for one batch (got {len(images_all)})")
    return [(images_all[i * b : (i + 1) * b], tokens_all[i * b : (i + 1) * b]) for i in range(n)]


def bare_throughput(spec, tokenizer_json: str, steps: int, warmup: int, threads: int) -> float:
    """Samples/s of the per-worker loop's step (train_loop.train_step, the same function) without
    Ray, after warm-up."""
    import torch

    from maskclip import MaskCLIPTask
    from maskclip.tokenizer import Tokenizer
    from service.train_loop import build_optimizer, build_scheduler, seed_everything, train_step

    torch.set_num_threads(threads)
    tok = Tokenizer.from_json(tokenizer_json)
    batches = predecoded_batches(spec, tokenizer_json, n_batches=8)
    seed_everything(spec.run.seed * 1000)
    total = warmup + steps
    task = MaskCLIPTask(
        spec.model_config_for(tok.vocab_size), tok.special_ids, tok.mask_id, pad_id=tok.pad_id
    )
    optimizer = build_optimizer(task, spec)
    scheduler = build_scheduler(optimizer, spec, total)
    gen = torch.Generator().manual_seed(spec.run.seed * 1000)
    task.train()
    t0 = samples = 0
    for step in range(total):
        if step == warmup:
            t0, samples = time.perf_counter(), 0
        images, tokens = batches[step % len(batches)]
        out = train_step(
            task,
            optimizer,
            scheduler,
            images,
            tokens,
            gen,
            step=step,
            total_steps=total,
            grad_clip=spec.optim.grad_clip,
        )
        if out.nonfinite:
            raise SystemExit(f"bare loop: non-finite loss at step {step + 1}")
        samples += images.shape[0]
    return samples / (time.perf_counter() - t0)


# ---------------------------------------------------------------- 2. Ray Data alone


def data_throughput(spec, tokenizer_json: str, warmup_batches: int) -> tuple[float, int]:
    """Rows/s of build_dataset(spec, "train") iterated alone, after `warmup_batches`."""
    from service import data
    from service.storage import resolve_source

    train = resolve_source(spec.data.train, spec.storage)
    ds = data.build_dataset(train, spec, "train", tokenizer_json, None)
    rows = 0
    t0 = None
    for i, batch in enumerate(ds.iter_batches(batch_size=spec.optim.batch_size)):
        if i == warmup_batches:
            t0, rows = time.perf_counter(), 0
        rows += len(batch["image"])
    if t0 is None:
        raise SystemExit(f"data: fewer than {warmup_batches + 1} batches; use more --rows")
    return rows / (time.perf_counter() - t0), rows


# ---------------------------------------------------------------- 1. Ray Train


def ray_throughput(spec) -> tuple[float, float, int]:
    """run_job, then (median samples/s from metric timestamps, median logged samples_per_s,
    number of intervals), skipping everything before the first log."""
    import mlflow

    from service.trainer import run_job

    run_job(spec)
    client = mlflow.MlflowClient(tracking_uri=spec.tracking_uri())
    exp = client.get_experiment_by_name(EXPERIMENT)
    run = client.search_runs([exp.experiment_id], max_results=1)[0]
    history = sorted(
        client.get_metric_history(run.info.run_id, "samples_per_s"), key=lambda m: m.step
    )
    if len(history) < 2:
        raise SystemExit(f"ray: only {len(history)} samples_per_s metrics; use more --steps")
    rates, logged = [], []
    for prev, cur in zip(history, history[1:]):
        dt = (cur.timestamp - prev.timestamp) / 1000
        rates.append((cur.step - prev.step) * spec.optim.batch_size / max(dt, 1e-3))
        logged.append(cur.value)
    return statistics.median(rates), statistics.median(logged), len(rates)


# ---------------------------------------------------------------- 3. peak RSS (subprocess)


def _psutil():
    """psutil; `import ray` first puts Ray's vendored copy on sys.path (not a project dep)."""
    import importlib

    import ray  # noqa: F401

    return importlib.import_module("psutil")


class TreeRSS:
    """Samples the summed RSS of this process and all its descendants every `interval` s."""

    def __init__(self, interval: float = 0.2):
        psutil = _psutil()
        self.me = psutil.Process()
        self.interval = interval
        self.peak = self.peak_procs = self.peak_pss = 0
        self.top: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        psutil = _psutil()

        total = pss = 0
        seen: list[tuple[int, str]] = []
        for p in [self.me, *self.me.children(recursive=True)]:
            try:
                info = p.memory_full_info()  # rss, plus pss (shared pages split, not repeated)
                total += info.rss
                pss += getattr(info, "pss", info.rss)
                seen.append((info.rss, p.name()))
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        self.peak_pss = max(self.peak_pss, pss)
        if total > self.peak:
            self.peak, self.peak_procs = total, len(seen)
            self.top = [f"{name} {rss / 2**20:.0f}" for rss, name in sorted(seen, reverse=True)[:6]]

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def rss_child(args) -> None:
    """Fresh process: start Ray, stream the whole dataset, print the tree's peak RSS."""
    import ray

    from service import data
    from service.storage import resolve_source
    from service.trainer import init_ray

    root = Path(args.rss_child)
    spec = make_spec(root.parent, root, args, total_steps=1)
    tokenizer_json = Path(args.tokenizer).read_text(encoding="utf-8")
    t = time.perf_counter()
    with TreeRSS() as rss:
        init_ray(spec)
        train = resolve_source(spec.data.train, spec.storage)
        ds = data.build_dataset(train, spec, "train", tokenizer_json, None)
        rows = sum(len(b["image"]) for b in ds.iter_batches(batch_size=spec.optim.batch_size))
        rss.sample()
        ray.shutdown()
    result = {
        "rows": rows,
        "peak_rss": rss.peak,
        "procs": rss.peak_procs,
        "peak_pss": rss.peak_pss,
        "top": rss.top,
        "seconds": time.perf_counter() - t,
    }
    print(MARK + json.dumps(result), flush=True)


def run_rss_child(data_dir: Path, tokenizer: Path, args) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--rss-child",
        str(data_dir),
        "--tokenizer",
        str(tokenizer),
        "--batch-size",
        str(args.batch_size),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK) :])
    tail = (proc.stdout + proc.stderr)[-3000:]
    raise SystemExit(f"rss subprocess for {data_dir} failed (exit {proc.returncode}):\n{tail}")


# ---------------------------------------------------------------- 4. --image-size: decode alone


def photo_rows(n: int, size: tuple[int, int], seed: int = 0, quality: int = 90):
    """`n` rows {key, jpg, caption} of photo-like JPEGs: a random smooth colour field, a texture
    and pixel noise, so that they compress like photographs (not like flat shapes)."""
    import io

    import numpy as np
    from PIL import Image

    w, h = size
    rng = np.random.default_rng(seed)
    words = ["a", "photo", "of", "red", "blue", "dog", "cat", "tree", "car", "house", "on", "the"]
    for i in range(n):
        cell = int(rng.integers(12, 60))
        small = rng.integers(0, 256, (h // cell + 2, w // cell + 2, 3), dtype=np.uint8)
        base = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
        tex = rng.integers(0, 256, (h // 3 + 1, w // 3 + 1, 3), dtype=np.uint8)
        tex = Image.fromarray(tex).resize((w, h), Image.Resampling.BILINEAR)
        a = np.asarray(base, np.float32) * 0.75 + np.asarray(tex, np.float32) * 0.2
        a += rng.normal(0, float(rng.uniform(2, 8)), (h, w, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
        caption = " ".join(rng.choice(words, size=int(rng.integers(4, 12))))
        yield {"key": f"{i:09d}", "jpg": buf.getvalue(), "caption": caption}


def decode_spec(root: Path, train: Path, args):
    from service.spec import build_spec

    return build_spec(
        {
            "run": {"name": RUN_NAME, "output_dir": str(root / "runs"), "seed": 0},
            "model": {"size": "maskclip_tiny", "vocab_size": 1000, "image_size": args.image_size},
            "data": {"train": str(train)},
            "optim": {"batch_size": 32, "max_steps": 1},
            "scaling": {"num_workers": 1, "data_cpus_per_worker": args.cpus},
            "tracking": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}"},
        }
    )


def decoder_kwargs(spec, tokenizer_json: str) -> dict:
    """DecodeBatch's arguments as build_dataset gives them for "train"."""
    d = spec.data
    return {
        "image_column": d.image_column,
        "caption_column": d.caption_column,
        "label_column": None,
        "tokenizer_json": tokenizer_json,
        "image_size": spec.image_size,
        "train": True,
        "max_pixels": d.max_image_pixels,
        "max_caption_chars": d.max_caption_chars,
        "stats_actor_name": None,
        "keep_caption": False,
    }


def bare_decode(decoder, batches: list[dict]) -> float:
    """Rows/s of `decoder` over in-memory column batches, in this process (one thread)."""
    t0, rows = time.perf_counter(), 0
    for cols in batches:
        for out in decoder(cols):
            rows += len(out["image"])
    return rows / (time.perf_counter() - t0)


def ray_decode(ds, batch_size: int) -> tuple[float, float]:
    """(rows/s of the dataset iterated alone after its first batch, seconds to the first batch:
    the execution's start-up, which a training run pays once per epoch)."""
    t0 = time.perf_counter()
    t_first, rows = None, 0
    for batch in ds.iter_batches(batch_size=batch_size):
        if t_first is None:
            t_first = time.perf_counter()
            continue
        rows += len(batch["image"])
    if t_first is None or rows == 0:
        raise SystemExit("ray: the pass yielded fewer than two batches; use more --rows")
    return rows / (time.perf_counter() - t_first), t_first - t0


def decode_main(args) -> None:
    from service import data
    from service.data import DecodeBatch
    from service.datasets import write_shards
    from service.storage import resolve_source

    w, _, h = args.source_size.partition("x")
    size = (int(w), int(h))
    rounds = args.steps if args.steps is not None else 5
    rows = args.rows if args.rows is not None else 2000
    args.cpus = args.cpus or max(1, (os.cpu_count() or 2) - 1)
    root = Path(tempfile.mkdtemp(prefix="bench-decode-"))
    t_start = time.perf_counter()
    try:
        print(f"{load()}; temp folder {root}", flush=True)
        out = root / "photos"
        stats = write_shards(
            photo_rows(rows, size), str(out), max(1, rows // 2), progress=False, total=rows
        )
        nbytes = sum(p.stat().st_size for p in out.glob("*.parquet"))
        print(
            f"data: {stats['rows']} {size[0]}x{size[1]} q90 JPEGs in {stats['shards']} shards, "
            f"{nbytes / rows / 1000:.0f} KB a row ({time.perf_counter() - t_start:.0f} s)",
            flush=True,
        )
        shards = sorted(out.glob("*.parquet"))
        repeated = root / "repeated"
        repeated.mkdir()
        for copy in range(args.repeat):
            for i, shard in enumerate(shards):
                os.link(shard, repeated / f"part-{copy * len(shards) + i:05d}.parquet")
        spec = decode_spec(root, repeated, args)
        from service.trainer import ingest_options, init_ray, prepare_tokenizer, start_local_ray

        tokenizer_json = prepare_tokenizer(spec, None)
        kwargs = decoder_kwargs(spec, tokenizer_json)
        arms = {"draft": DecodeBatch(**kwargs), "no draft": DecodeBatch(**kwargs, draft=False)}
        source = resolve_source(str(out), spec.storage)
        cols = [spec.data.image_column, spec.data.caption_column]
        bs = data.map_batch_size(spec.image_size)
        batches = [
            {n: rb.column(n).to_numpy(zero_copy_only=False) for n in rb.schema.names}
            for path in source.paths
            for rb in source.iter_file(path, cols, bs)
        ]
        tasks, per_task = data.decode_plan(spec)
        ray_cpus = tasks * per_task
        start_local_ray(num_cpus=math.ceil(ray_cpus) + 1)  # + 1: slack for Ray Data
        init_ray(spec)
        ds = data.build_dataset(
            resolve_source(spec.data.train, spec.storage), spec, "train", tokenizer_json, None
        )
        # the object-store budget training runs it under (else decoding runs ahead and spills)
        ds.context.execution_options = ingest_options(spec)
        print(
            f"ray: {tasks} decode task(s) of {per_task:g} CPU; bare: one process, one thread; "
            f"{rounds} round(s) after a warm-up round",
            flush=True,
        )
        results: dict[str, list[float]] = {"draft": [], "no draft": [], "ray": []}
        ratios = []
        for r in range(rounds + 1):
            bare = {name: bare_decode(dec, batches) for name, dec in arms.items()}
            ray_rate, startup = ray_decode(ds, 32)
            ray_rate /= ray_cpus
            if r == 0:
                continue  # warm-up: Ray starts its worker processes, caches fill
            for name, rate in bare.items():
                results[name].append(rate)
            results["ray"].append(ray_rate)
            ratios.append(ray_rate / bare["draft"])
            print(
                f"round {r}: bare {bare['draft']:.0f} rows/s (without draft "
                f"{bare['no draft']:.0f}), ray {ray_rate:.0f} rows/s per CPU, ratio "
                f"{ratios[-1]:.2f} (start-up {startup:.1f} s, excluded); {load()}",
                flush=True,
            )
        import ray

        ray.shutdown()
        med = {k: statistics.median(v) for k, v in results.items()}
        print(f"\ntotal {time.perf_counter() - t_start:.0f} s; {load()}")
        print(
            f"{args.image_size} px train decode + augment of {size[0]}x{size[1]} JPEGs, medians "
            f"of {rounds} round(s)"
        )
        print(f"decode rows/s per cpu without draft: {med['no draft']:.1f}")
        print(f"ray decode rows/s per cpu: {med['ray']:.1f}")
        print(f"decode rows/s per cpu: {med['draft']:.1f}")
        print(f"ray/bare decode ratio: {statistics.median(ratios):.2f}", flush=True)
    finally:
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------- main


def load() -> str:
    return (
        "load average "
        + " ".join(f"{x:.2f}" for x in os.getloadavg())
        + f" on {os.cpu_count()} CPUs"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=None, help="rows of the 1x dataset (default 2000)")
    ap.add_argument("--steps", type=int, default=None, help="measured training steps (default 40)")
    ap.add_argument("--batch-size", type=int, default=None, help="per step (default 64)")
    ap.add_argument("--log-every", type=int, default=None, help="Ray run log interval (default 10)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 300 rows, 10 steps, batch 32")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument(
        "--image-size", type=int, default=None, help="measure the decode pipeline alone at N px"
    )
    ap.add_argument("--source-size", default="500x375", help="with --image-size: JPEG WxH")
    ap.add_argument(
        "--repeat", type=int, default=4, help="with --image-size: Ray reads the rows N times"
    )
    ap.add_argument(
        "--cpus",
        type=int,
        default=None,
        help="with --image-size: decode CPUs (default: all but one)",
    )
    ap.add_argument("--rss-child", help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.image_size:
        decode_main(args)
        return
    quick = {"rows": 300, "steps": 10, "batch_size": 32, "log_every": 5}
    full = {"rows": 2000, "steps": 40, "batch_size": 64, "log_every": 10}
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.rss_child:
        rss_child(args)
        return

    # whole log intervals, and one more interval of warm-up before the first log
    args.steps = max(args.log_every, math.ceil(args.steps / args.log_every) * args.log_every)
    ray_steps = args.steps + args.log_every
    warmup_steps = min(5, args.steps)
    root = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    t_start = time.perf_counter()
    try:
        print(f"{load()}; temp folder {root}", flush=True)
        x1, x10 = make_data(root, args.rows, rows_per_shard=max(1, args.rows // 2))
        print(
            f"data: {args.rows} rows in {x1}, {10 * args.rows} rows in {x10} "
            f"({time.perf_counter() - t_start:.0f} s)",
            flush=True,
        )
        if 10 * args.rows < ray_steps * args.batch_size:
            print(
                f"note: the Ray run ({ray_steps} steps x {args.batch_size}) spans more than one "
                f"epoch of {10 * args.rows} rows; epoch restarts count in its throughput"
            )
        spec = make_spec(root, x10, args, ray_steps)

        from service.trainer import init_ray, prepare_tokenizer

        tokenizer_json = prepare_tokenizer(spec, None)  # what run_job trains too
        tokenizer = root / "tokenizer.json"
        tokenizer.write_text(tokenizer_json, encoding="utf-8")

        threads = worker_threads(spec)
        bare_before = bare_throughput(spec, tokenizer_json, args.steps, warmup_steps, threads)
        print(
            f"\nbare loop: {bare_before:.1f} samples/s ({args.steps} steps after {warmup_steps} "
            f"warm-up, batch {args.batch_size}, {threads} torch thread(s)); {load()}",
            flush=True,
        )

        init_ray(spec)
        data_rate, data_rows = data_throughput(spec, tokenizer_json, warmup_batches=5)
        print(
            f"\nRay Data alone: {data_rate:.1f} rows/s ({data_rows} rows after 5 warm-up "
            f"batches); {load()}",
            flush=True,
        )

        ray_rate, ray_logged, intervals = ray_throughput(spec)
        print(
            f"\nRay Train: {ray_rate:.1f} samples/s (median of {intervals} log intervals of "
            f"{args.log_every} steps, from metric timestamps; the logged samples_per_s median "
            f"is {ray_logged:.1f}); {load()}",
            flush=True,
        )
        import ray

        ray.shutdown()
        # again after the Ray phases: on a shared machine the load drifts between phases
        bare_after = bare_throughput(spec, tokenizer_json, args.steps, warmup_steps, threads)
        bare = (bare_before + bare_after) / 2
        print(
            f"\nbare loop again: {bare_after:.1f} samples/s; mean of both {bare:.1f}; {load()}",
            flush=True,
        )

        small = run_rss_child(x1, tokenizer, args)
        large = run_rss_child(x10, tokenizer, args)
        for name, r in (("1x", small), ("10x", large)):
            print(
                f"\npeak RSS {name}: {r['peak_rss'] / 2**20:.0f} MiB over {r['procs']} "
                f"processes, {r['rows']} rows streamed in {r['seconds']:.0f} s (peak PSS "
                f"{r['peak_pss'] / 2**20:.0f} MiB); largest at the peak (MiB): "
                + ", ".join(r["top"])
            )
        print(f"\ntotal {time.perf_counter() - t_start:.0f} s; {load()}")
        print("\nray/bare: Ray Train samples/s / mean bare loop samples/s (target >= 0.95)")
        print("data/train: Ray Data rows/s alone / mean bare loop samples/s (target >= 3)")
        print("rss 10x/1x: peak process-tree RSS streaming 10x rows / 1x rows (target <= 1.2)")
        print(f"ray/bare throughput ratio: {ray_rate / bare:.2f}")
        print(f"data/train throughput ratio: {data_rate / bare:.2f}")
        print(f"rss 10x/1x ratio: {large['peak_rss'] / small['peak_rss']:.2f}", flush=True)
    finally:
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
