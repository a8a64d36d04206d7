"""Build the TorchTrainer from a spec and run it: `run_job(spec)` is `maskclip run`.

Driver side only: start or join Ray, check the request fits, train (or reload) the tokenizer,
create or reopen the MLflow run, build the Ray Data pipeline, fit, print the summary.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

import pyarrow.fs as pafs
import ray

from maskclip.tokenizer import Tokenizer

from . import checkpoint as ckpt
from . import data
from .control import control_actor
from .errors import RunStopped, StopReason, UserError
from .spec import JobSpec
from .tracking import Tracker, flatten, start_run
from .train_loop import train_loop_per_worker

# worker prints reach the terminal once (Ray Train's print patch would log them a second time)
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}


def init_ray(spec: JobSpec) -> None:
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.update(WORKER_ENV)
    if spec.scaling.ray_address:
        ray.init(address=spec.scaling.ray_address, log_to_driver=True)
    else:
        ray.init(
            address="local",
            include_dashboard=False,
            log_to_driver=True,
            object_store_memory=512 * 1024**2,
        )


def check_fits(spec: JobSpec) -> None:
    """Refuse a request the cluster can never satisfy instead of waiting forever."""
    if spec.scaling.ray_address:  # an autoscaling cluster may grow: let Ray queue it
        return
    total = ray.cluster_resources()
    s = spec.scaling
    cpus = s.num_workers * s.cpus_per_worker
    data_cpus = 0.5  # Ray Data must keep CPU to decode with, or training starves
    if cpus + data_cpus > total.get("CPU", 0):
        raise UserError(
            f"scaling: {s.num_workers} workers x {s.cpus_per_worker} CPU (+{data_cpus} for data) "
            f"do not fit the {total.get('CPU', 0):g} CPUs of this Ray cluster; lower "
            "scaling.num_workers or scaling.cpus_per_worker"
        )
    if s.use_gpu and s.num_workers * s.gpus_per_worker > total.get("GPU", 0):
        raise UserError(
            f"scaling: {s.num_workers} workers x {s.gpus_per_worker} GPU requested but this Ray "
            f"cluster has {total.get('GPU', 0):g} GPUs; set scaling.use_gpu=false or fewer workers"
        )


def storage(spec: JobSpec):
    """(storage_path for Ray, pyarrow filesystem or None, display URI)."""
    path = spec.storage_path()
    if path.startswith("s3://"):
        fs = data.s3_filesystem(spec.storage)
        bucket = path[len("s3://") :].split("/", 1)[0]
        try:
            missing = fs.get_file_info(bucket).type == pafs.FileType.NotFound
        except OSError as e:
            msg = data._first_line(e)
            raise UserError(f"checkpoint.storage_path: cannot reach {path!r}: {msg}") from None
        if missing:
            raise UserError(f"checkpoint.storage_path: bucket {bucket!r} does not exist ({path!r})")
        return path[len("s3://") :], fs, path
    Path(path).mkdir(parents=True, exist_ok=True)
    return path, None, path


def prepare_tokenizer(spec: JobSpec, latest, fs=None) -> str:
    """The tokenizer as JSON: the checkpoint's on resume (so prompts tokenize exactly as in
    training), else a BPE trained on a sample of the training captions. `fs` is the
    checkpoint filesystem the caller already holds (looked up from the spec if not given)."""
    if latest is not None:
        path, _ = latest
        return ckpt.read_text(path, "tokenizer.json", fs if fs is not None else storage(spec)[1])
    captions = data.sample_captions(spec, spec.data.tokenizer_captions)
    if not captions:
        raise UserError(f"data.train: no usable captions in {spec.data.train!r}")
    tok = Tokenizer.train(captions, spec.model.vocab_size, spec.context_length)
    return tok.to_json()


def total_steps(spec: JobSpec) -> int:
    if spec.optim.max_steps:
        return spec.optim.max_steps
    rows = data.count_rows(spec.data.train, spec.storage)
    per_step = spec.optim.batch_size * spec.scaling.num_workers
    return max(1, spec.optim.epochs * (rows // per_step))


def ingest_options(spec: JobSpec):
    """Keep decoding a few batches ahead of training, not the whole object store ahead: on a
    small machine decode tasks running far ahead take CPU from the training step."""
    from ray.data import ExecutionResources
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    batch_bytes = spec.optim.batch_size * 3 * spec.image_size**2 * 4
    budget = max(64 * 1024**2, 8 * batch_bytes * spec.scaling.num_workers)
    limits = options.resource_limits or ExecutionResources()
    options.resource_limits = limits.copy(object_store_memory=budget)
    return options


def run_job(spec: JobSpec, tune_callbacks: list | None = None, parent_run_id: str | None = None):
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    data.check_columns(  # fail fast on bad data, before any Ray process starts
        spec.data.train, spec.storage, [spec.data.image_column, spec.data.caption_column]
    )
    if spec.data.val:
        data.check_columns(
            spec.data.val,
            spec.storage,
            [spec.data.image_column, spec.data.caption_column],
            field="data.val",
        )
    storage_path, fs, storage_uri = storage(spec)  # a missing bucket fails here too
    run_dir = Path(spec.run.output_dir) / spec.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_yaml = spec.to_yaml()
    (run_dir / "job.yaml").write_text(spec_yaml, encoding="utf-8")
    init_ray(spec)
    check_fits(spec)
    latest = ckpt.find_latest(storage_path, spec.run.name, fs)
    if latest:
        print(f"resuming {spec.run.name} from checkpoint at step {latest[1]['step']}", flush=True)
    tokenizer_json = prepare_tokenizer(spec, latest, fs)
    (run_dir / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    steps = total_steps(spec)

    # MLflow: one run per job name; a resumed job continues the same run
    uri = spec.tracking_uri() if spec.tracking.enabled else None
    run_id = None
    if uri:
        previous = latest[1].get("mlflow_run_id") if latest else None
        run_id = start_run(
            uri,
            spec.tracking.experiment,
            spec.run.name,
            flatten(spec.model_dump(mode="json")),
            spec.run.tags,
            run_id=previous,
            parent_run_id=parent_run_id,
        )
        tracker = Tracker(uri, run_id)
        tracker.log_artifact(str(run_dir / "job.yaml"), "spec")
        if latest:
            tracker.set_tag("maskclip.resumed_from_step", str(latest[1]["step"]))

    control_name = f"maskclip-control-{spec.run.name}-{os.getpid()}"
    control = control_actor(control_name, create=True)
    datasets = {"train": data.build_dataset(spec, "train", tokenizer_json, control_name)}
    if spec.data.val:
        datasets["val"] = data.build_dataset(spec, "val", tokenizer_json, None)

    s = spec.scaling
    resources = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "spec": spec.model_dump(mode="json"),
            "spec_yaml": spec_yaml,
            "tokenizer": tokenizer_json,
            "total_steps": steps,
            "mlflow_run_id": run_id,
            "tracking_uri": uri,
            "control": control_name,
            "storage_uri": storage_uri,
        },
        scaling_config=ScalingConfig(
            num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=spec.run.name,
            storage_path=storage_path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=spec.checkpoint.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep),
            callbacks=tune_callbacks,
            worker_runtime_env={"env_vars": WORKER_ENV},
        ),
        datasets=datasets,
        dataset_config=DataConfig(
            datasets_to_split=["train"], execution_options={"train": ingest_options(spec)}
        ),
    )
    print(
        f"training {spec.run.name}: {steps} steps, {s.num_workers} worker(s), "
        f"checkpoints -> {storage_uri}/{spec.run.name}",
        flush=True,
    )

    def on_signal(signum, frame):
        print(f"received signal {signum}: checkpointing and stopping", file=sys.stderr, flush=True)
        control.request_stop.remote("signal")

    # Tune runs a trial's run_job in a thread, where signal.signal raises ValueError
    in_main = threading.current_thread() is threading.main_thread()
    signals = (signal.SIGTERM, signal.SIGINT) if in_main else ()
    old = {sig: signal.signal(sig, on_signal) for sig in signals}
    try:
        result = trainer.fit()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    reason = ray.get(control.reason.remote())
    stats = ray.get(control.get.remote())
    final = result.metrics or {}
    checkpoint_uri = _checkpoint_uri(result, storage_uri, storage_path)

    if uri and run_id:
        tracker = Tracker(uri, run_id)
        tracker.log_metrics(
            {"data_rows_seen": stats["rows_seen"], "data_rows_bad": stats["rows_bad"]},
            int(final.get("step", steps)),
        )
        status = "FINISHED" if not reason else "KILLED"
        if reason and reason.startswith("nonfinite"):
            status = "FAILED"
        tracker.end(status)
    ray.kill(control)

    print(
        f"\nrun {spec.run.name}: step {final.get('step', '?')}/{steps}, "
        f"loss {final.get('loss', float('nan')):.4f}, data rows {stats['rows_seen']} "
        f"({stats['rows_bad']} skipped)"
    )
    if final.get("restored_from", -1) >= 0:
        print(f"  (a worker restart resumed from the checkpoint at step {final['restored_from']})")
    for k, v in sorted(final.items()):
        if k.startswith("val_"):
            print(f"  {k}: {v:.4f}")
    print(f"checkpoint: {checkpoint_uri}")
    print(f"mlflow run: {run_id}")
    if reason and reason.startswith("nonfinite"):
        raise RunStopped(
            StopReason.NONFINITE,
            f"{reason.split(': ', 1)[1]}: the run stopped; the last good checkpoint "
            f"is {checkpoint_uri} (set optim.on_nonfinite=skip to skip such steps)"
        )
    if reason == "data":
        raise RunStopped(StopReason.DATA, _data_message(stats, spec))
    if reason == "signal":
        raise RunStopped(
            StopReason.SIGNAL,
            "stopped by signal after checkpointing; run the same job again to resume",
        )
    return result


def _data_message(stats: dict, spec: JobSpec) -> str:
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(stats["bad_reasons"].items()))
    pct = 100 * stats["rows_bad"] / max(1, stats["rows_seen"])
    return (
        f"data.train: {stats['rows_bad']} of {stats['rows_seen']} rows ({pct:.1f}%) could not "
        f"be used ({reasons}); data.max_bad_fraction is {spec.data.max_bad_fraction:g}"
    )


def _checkpoint_uri(result, storage_uri: str, storage_path: str) -> str:
    if result.checkpoint is None:
        return "none"
    path = result.checkpoint.path
    if storage_uri.startswith("s3://"):
        return "s3://" + path.lstrip("/")
    return path
