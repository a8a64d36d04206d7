"""Build the TorchTrainer from a spec and run it: `run_job(spec)` is `maskclip run`.

Driver side only: start or join Ray, check the request fits, train (or reload) the tokenizer,
create or reopen the MLflow run, build the Ray Data pipeline, fit, print the summary.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
from pathlib import Path

import ray

from maskclip.tokenizer import Tokenizer

from . import checkpoint as ckpt
from . import data, terminal
from .control import PREEMPTION_POLL_ENV, PREEMPTION_POLL_S, control_actor
from .control import control_name as control_actor_name
from .errors import DataError, RunStopped, SpecError, StopReason, UserError
from .evaluation import dense_sources
from .spec import JobSpec
from .storage import Source, ensure_bucket, is_s3, resolve_source
from .tracking import Tracker, flatten, log_datasets, register_best, start_run
from .train_loop import train_loop_per_worker

log = terminal.get_logger(__name__)

# worker prints reach the terminal once (Ray Train's print patch would log them a second time)
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"  # where Ray's state API clients look first
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
ELASTIC_START_TIMEOUT_S = 15.0
"""How long an elastic run's new worker group waits for its placement before Ray Train decides
its size again (Ray's default: 60 s). Right after a node is lost, Ray Train's view of the
cluster can still count the lost node's CPUs: the restart asks for every worker, the placement
never comes, and Ray Train only shrinks the group when this wait ends (a retried controller
error, not charged to checkpoint.max_failures). In the node-loss test this wait was 60 of the
77 s lost. Fixed-size runs keep Ray's default: they have no smaller size to fall back on, and
waiting for an autoscaled node should not log a timeout every 15 s. A value the user exports
wins."""


def init_ray(spec: JobSpec, log_dir: Path | None = None) -> None:
    """Start (or join) Ray. Ray's own log lines go to `log_dir`/ray.log (service.terminal), the
    worker's stdout (the training loop's lines) to the terminal.

    The local start runs Ray's dashboard, bound to 127.0.0.1: Train V2 starts a detached
    PlacementGroupCleaner with every fit that polls the controller's liveness every second
    through the state API, which the dashboard's StateHead module serves. Under
    include_dashboard=False that module is not loaded and the cleaner logged "Failed to query
    Ray Train Controller actor state" once a second (270 lines in the demo); and a worker finds
    the API by scanning the machine for Ray instances, so with two Ray instances on one machine
    (parallel runs, tests) the lookup raised ConnectionError, which the cleaner does not catch
    (the thread Traceback of short runs). RAY_API_SERVER_ADDRESS, inherited by every Ray
    process started from here, names this cluster's dashboard; the cleaner then works: it can
    remove a dead controller's placement group. Measured on the 2-core dev machine (3-4 starts
    of each, under a load of 5-17 from other work): 20 Ray processes instead of 9, unique memory
    (USS) 545 MB instead of 400 MB (RSS 1.83 GB vs 0.78 GB, which counts shared pages once per
    process); ray.init took 11-43 s either way, no difference above that noise. No switch in
    Ray 2.60 turns the cleaner off or loads the state module alone."""
    from ray.data import DataContext

    from . import terminal

    DataContext.get_current().enable_progress_bars = False
    # Ray Train reads drained (preempted) nodes every second, not every 5 s: the notice reaches
    # the workers sooner (service.control, preemption); Ray Train passes it to its controller
    os.environ.setdefault(PREEMPTION_POLL_ENV, str(PREEMPTION_POLL_S))
    if log_dir is not None:
        terminal.route_ray(Path(log_dir) / terminal.RAY_LOG)
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
        os.environ.update(WORKER_ENV)
        if spec.scaling.ray_address:
            terminal.phase(f"connecting to Ray at {spec.scaling.ray_address}")
            ray.init(address=spec.scaling.ray_address, log_to_driver=True)
        else:
            start_local_ray()
    terminal.route_worker_output()
    if log_dir is not None:
        terminal.route_ray(Path(log_dir) / terminal.RAY_LOG)  # loggers Ray configured in init


def start_local_ray(**options) -> None:
    """ray.init of a local cluster with its dashboard on a free 127.0.0.1 port (see init_ray);
    `options` (num_cpus=2, ...) go to ray.init."""
    from . import terminal

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    terminal.phase(f"starting a local Ray (dashboard http://127.0.0.1:{port})")
    # for the Ray processes started now, which keep it; not for this process, whose later Jobs
    # API clients (e.g. in a test session) would be sent to this dashboard whatever their address
    with _scoped_env(API_SERVER_ENV, f"http://127.0.0.1:{port}"):
        ray.init(
            address="local",
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=port,
            log_to_driver=True,
            **{"object_store_memory": 512 * 1024**2, **options},
        )


@contextlib.contextmanager
def _scoped_env(name: str, value: str | None):
    """`name`=`value` in this process's environment for the block (None: left as it is), then
    put back as it was: for variables Ray reads when it starts processes, not later."""
    previous = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def check_fits(spec: JobSpec, nodes: list[dict] | None = None) -> None:
    """Refuse, with one line naming the numbers, a request the Ray cluster can never run: more
    GPUs than it has, or training workers that leave Ray Data fewer CPUs than
    scaling.data_cpus_per_worker asks (Ray Data's read and decode tasks would then wait forever
    and so would the first step). `nodes` defaults to the alive nodes of `ray.nodes()`.

    A cluster joined through scaling.ray_address may still grow (autoscaling): while its nodes
    cannot hold the workers yet, nothing is refused (Ray queues the workers); once they can,
    the CPU rule applies. `maskclip submit` and the RayJob of `maskclip render` run
    `maskclip run` on the cluster, so the check runs there, where the nodes can be listed."""
    if nodes is None:
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    s = spec.scaling
    cpus = sum(n.get("CPU", 0) for n in nodes)
    gpus = sum(n.get("GPU", 0) for n in nodes)
    where = f"this Ray cluster ({len(nodes)} node{'s' if len(nodes) != 1 else ''})"
    growing = bool(s.ray_address) and (
        s.num_workers * s.cpus_per_worker > cpus
        or (s.use_gpu and s.num_workers * s.gpus_per_worker > gpus)
    )
    if growing:
        log.info(
            f"scaling: {where} has {cpus:g} CPUs and {gpus:g} GPUs now, fewer than the workers "
            "ask; waiting for it to scale up (CPUs for Ray Data are not checked)"
        )
        return
    if s.use_gpu and s.num_workers * s.gpus_per_worker > gpus:
        raise UserError(
            f"scaling: {s.num_workers} workers x {s.gpus_per_worker} GPU requested but this Ray "
            f"cluster has {gpus:g} GPUs; set scaling.use_gpu=false or fewer workers"
        )
    problem = s.cpu_shortfall(cpus, where)
    if problem:
        raise UserError(problem)


def storage(spec: JobSpec):
    """(storage_path for Ray, pyarrow filesystem or None when local, display URI); a missing
    bucket fails here, a local folder is created."""
    uri = spec.storage_path()
    fs, path = ensure_bucket(uri, spec.storage, "checkpoint.storage_path")
    return path, (fs if is_s3(fs) else None), uri


def prepare_tokenizer(spec: JobSpec, latest, fs=None, train: Source | None = None) -> str:
    """The tokenizer as JSON: the checkpoint's on resume (so prompts tokenize exactly as in
    training), else CLIP's standard BPE (model.tokenizer 'clip') or a BPE trained on a sample
    of the training captions. `fs` is the
    checkpoint filesystem and `train` the resolved data.train the caller already holds
    (looked up from the spec if not given)."""
    if latest is not None:
        path, _ = latest
        return ckpt.read_text(path, "tokenizer.json", fs if fs is not None else storage(spec)[1])
    if spec.model.tokenizer == "clip":
        return Tokenizer.clip(spec.context_length).to_json()
    d = spec.data
    train = train or resolve_source(d.train, spec.storage, "data.train")
    terminal.phase(
        f"training the BPE tokenizer (vocabulary {spec.model.vocab_size}) on up to "
        f"{d.tokenizer_captions} captions of data.train"
    )
    captions = data.sample_captions(
        train, d.tokenizer_captions, d.max_caption_chars, d.caption_column
    )
    if not captions:
        raise DataError(f"data.train: no usable captions in {d.train!r}")
    tok = Tokenizer.train(captions, spec.model.vocab_size, spec.context_length)
    return tok.to_json()


def total_steps(spec: JobSpec, train: Source) -> int:
    if spec.optim.max_steps:
        return spec.optim.max_steps
    per_step = spec.optim.batch_size * spec.scaling.num_workers
    terminal.phase(f"counting the rows of data.train for optim.epochs={spec.optim.epochs}")
    return max(1, spec.optim.epochs * (train.num_rows() // per_step))


INGEST_BATCHES_AHEAD = 32


def ingest_options(spec: JobSpec):
    """Keep decoding some batches ahead of training, not the whole object store ahead: on a
    small machine decode tasks running far ahead take CPU from the training step. The budget is
    INGEST_BATCHES_AHEAD uint8 batches per worker, at least 64 MB (the same bytes as the 8
    float32 batches it held before decoding went to uint8; service.data.TARGET_BLOCK_BYTES was
    measured against it)."""
    from ray.data import ExecutionResources
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    batch_bytes = spec.optim.batch_size * 3 * spec.image_size**2  # uint8 images
    budget = max(64 * 1024**2, INGEST_BATCHES_AHEAD * batch_bytes * spec.scaling.num_workers)
    limits = options.resource_limits or ExecutionResources()
    options.resource_limits = limits.copy(object_store_memory=budget)
    return options


def run_job(
    spec: JobSpec,
    tune_callbacks: list | None = None,
    parent_run_id: str | None = None,
    fresh: bool = False,
):
    """Train `spec` (`maskclip run`). One live driver per run name: a lease in the checkpoint
    storage refuses a second one. `fresh` sets the run's old checkpoints aside first."""
    # each source listed once; bad data fails fast, before any folder, lease or Ray process
    columns = [spec.data.image_column, spec.data.caption_column]
    train = resolve_source(spec.data.train, spec.storage, "data.train")
    train.require(columns)
    val = resolve_source(spec.data.val, spec.storage, "data.val") if spec.data.val else None
    if val is not None:
        val.require(columns)
    dense_sources(spec)  # data.dense_probe's train/ and scored split, data.zero_shot_seg
    where = storage(spec)  # a missing bucket fails here
    with ckpt.Lease(where[0], spec.run.name, where[1]):
        return _run_job(spec, where, train, val, tune_callbacks, parent_run_id, fresh)


def resume_plan(spec: JobSpec, storage_path: str, fs, *, verify: bool = True):
    """The checkpoint this spec would resume, after checking it was made by the same spec in
    everything but the step budget (SpecError naming the differing fields otherwise)."""
    latest = ckpt.find_latest(storage_path, spec.run.name, fs, verify=verify)
    if latest is None:
        return None
    try:
        saved = ckpt.read_text(latest[0], ckpt.SPEC_FILE, fs)
    except (OSError, UnicodeDecodeError):
        saved = None
    changes = ckpt.spec_changes(saved, spec.model_dump(mode="json")) if saved else []
    if changes:
        raise SpecError(
            f"run.name: {spec.run.name!r} has a checkpoint at step {latest[1]['step']} made with "
            f"another spec ({'; '.join(changes)}); run with --fresh to start over (the old "
            "checkpoints are kept aside), or choose another run.name"
        )
    return latest


def _run_job(spec: JobSpec, where, train, val, tune_callbacks, parent_run_id, fresh: bool):
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    for source in (train, val) if val is not None else (train,):
        log.info(source.summary())  # what is read: shards, rows, columns
    storage_path, fs, storage_uri = where
    if fresh:
        moved = ckpt.set_aside(storage_path, spec.run.name, fs)
        if moved:
            log.info(f"--fresh: the earlier checkpoints of {spec.run.name} are now at {moved}")
    run_dir = Path(spec.run.output_dir) / spec.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_yaml = spec.to_yaml()
    (run_dir / "job.yaml").write_text(spec_yaml, encoding="utf-8")
    latest = resume_plan(spec, storage_path, fs)  # verified, before Ray starts
    if latest:
        log.info(f"resuming {spec.run.name} from checkpoint at step {latest[1]['step']}")
    else:
        log.info(f"starting {spec.run.name} fresh (no checkpoint under {storage_uri})")
    init_ray(spec, run_dir)
    if terminal.ray_log_path() is not None:
        log.info(f"Ray's own log lines: {terminal.ray_log_path()} (-v shows them here)")
    check_fits(spec)
    tokenizer_json = prepare_tokenizer(spec, latest, fs, train)
    (run_dir / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    steps = total_steps(spec, train)

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
            reopen_unfinished=not fresh,
        )
        log_datasets(uri, run_id, {"train": train, "val": val})
        tracker = Tracker(uri, run_id)
        tracker.log_artifact(str(run_dir / "job.yaml"), "spec")
        if latest:
            tracker.set_tag("maskclip.resumed_from_step", str(latest[1]["step"]))

    control_name = control_actor_name(spec.run.name)
    control = control_actor(control_name, create=True)
    datasets = {"train": data.build_dataset(train, spec, "train", tokenizer_json, control_name)}
    if val is not None and not is_s3(val.filesystem):
        # rank 0 reads data.val itself (service.evaluation.validate) from the worker's working
        # directory, which is not this one: give it the absolute path
        absolute = str(Path(spec.data.val).expanduser().resolve())
        spec = spec.model_copy(update={"data": spec.data.model_copy(update={"val": absolute})})
    dense = {  # the dense evaluation folders validate reads, likewise
        k: str(Path(v).expanduser().resolve())
        for k in ("dense_probe", "zero_shot_seg")
        if (v := getattr(spec.data, k)) and "://" not in v
    }
    if dense:
        spec = spec.model_copy(update={"data": spec.data.model_copy(update=dense)})

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
            num_workers=(s.min_workers, s.num_workers) if s.min_workers else s.num_workers,
            use_gpu=s.use_gpu,
            resources_per_worker=resources,
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
    log.info(
        f"training {spec.run.name}: {steps} steps, {s.num_workers} worker(s), "
        f"checkpoints -> {storage_uri}/{spec.run.name}"
    )

    signalled = []

    def on_signal(signum, frame):
        if signalled and signum == signal.SIGINT:  # a second Ctrl-C: end now, no checkpoint
            raise KeyboardInterrupt
        signalled.append(signum)
        log.warning(f"received signal {signum}: checkpointing and stopping")
        why = StopReason.INTERRUPT if signum == signal.SIGINT else StopReason.SIGNAL
        control.request_stop.remote(why)

    # Tune runs a trial's run_job in a thread, where signal.signal raises ValueError
    in_main = threading.current_thread() is threading.main_thread()
    signals = (signal.SIGTERM, signal.SIGINT) if in_main else ()
    old = {sig: signal.signal(sig, on_signal) for sig in signals}
    try:
        with _start_timeout(spec):
            result = _fit_keeping_signals(trainer) if in_main else trainer.fit()
    except ray.train.TrainingFailedError as e:
        if uri and run_id:
            Tracker(uri, run_id).end("FAILED")
        ray.kill(control)
        latest = ckpt.find_latest(storage_path, spec.run.name, fs, verify=False)
        where = f"the checkpoint at step {latest[1]['step']}" if latest else "no checkpoint yet"
        terminal.to_ray_log(f"training failed; the failures Ray reported:\n{_all_errors(e)}")
        raise RunStopped(
            StopReason.FAILED,
            f"training failed after {spec.checkpoint.max_failures} restart(s) "
            f"(checkpoint.max_failures): {_last_error(e)}; running the same job again resumes "
            f"from {where}",
        ) from None
    finally:
        terminal.end_progress()  # the summary prints below the bar
        for sig, handler in old.items():
            signal.signal(sig, handler)
    reason, detail = ray.get(control.reason.remote())
    stats = ray.get(control.get.remote())
    final = result.metrics or {}
    checkpoint_uri = _checkpoint_uri(result, storage_uri, storage_path)

    if uri and run_id:
        tracker = Tracker(uri, run_id)
        tracker.log_metrics(
            {
                "data_rows_seen": stats["rows_seen"],
                "data_rows_bad": stats["rows_bad"],
                "data_rows_not_downloaded": stats["rows_not_downloaded"],
            },
            int(final.get("step", steps)),
        )
        failed = reason in (StopReason.NONFINITE, StopReason.DATA, StopReason.CHECKPOINT)
        tracker.end("FAILED" if failed else "KILLED" if reason else "FINISHED")
        if parent_run_id is None and reason is None:  # a sweep registers its best trial
            champion = register_best(uri, [run_id], spec.run.name)
            if champion:
                log.info(f"registered model: models:/{champion}")
    ray.kill(control)

    missing = stats["rows_not_downloaded"]
    not_downloaded = f", {missing} not downloaded" if missing else ""  # img2dataset's failures
    log.log(
        terminal.RESULT,
        f"\nrun {spec.run.name}: step {final.get('step', '?')}/{steps}, "
        f"loss {final.get('loss', float('nan')):.4f}, data rows {stats['rows_seen']} "
        f"({stats['rows_bad']} skipped{not_downloaded})",
    )
    if final.get("restored_from", -1) >= 0:
        log.log(
            terminal.RESULT,
            f"  (a worker restart resumed from the checkpoint at step {final['restored_from']})",
        )
    for k, v in sorted(final.items()):
        if k.startswith("val_"):
            log.log(terminal.RESULT, f"  {k}: {v:.4f}")
    log.log(terminal.RESULT, f"checkpoint: {checkpoint_uri}")
    log.log(terminal.RESULT, f"mlflow run: {run_id}")
    if reason is None:
        return result
    message = {
        StopReason.NONFINITE: f"{detail}: the run stopped; the last good checkpoint is "
        f"{checkpoint_uri} (set optim.on_nonfinite=skip to skip such steps)",
        StopReason.DATA: detail,
        StopReason.CHECKPOINT: detail,
        StopReason.SIGNAL: "stopped by signal after checkpointing; run the same job again to "
        "resume",
        StopReason.INTERRUPT: "interrupted after checkpointing; run the same job again to resume",
    }[reason]
    raise RunStopped(reason, message)


def _last_error(e: Exception) -> str:
    """One line on what failed: the innermost exception of a worker's failure. Ray passes a
    task's error on as text: a data task's traceback, then "The above exception was the direct
    cause ..." and Ray Data's own exception with a retry hint; the line that names the first
    exception is the one before that sentence (else the text's last line)."""
    failures = getattr(e, "worker_failures", None) or {}
    cause = next(iter(failures.values()), None) or getattr(e, "controller_failure", None) or e
    lines = [ln.strip() for ln in str(cause).splitlines()]
    if _CHAINED in lines:
        inner = [ln for ln in lines[: lines.index(_CHAINED)] if ln]
        if inner:
            return inner[-1][:300]  # "AttributeError: ..." as Python printed it
    text = next((ln for ln in reversed(lines) if ln), "")
    return f"{type(cause).__name__}: {text}"[:300] if text else type(cause).__name__


_CHAINED = "The above exception was the direct cause of the following exception:"


def _all_errors(e: Exception) -> str:
    """Every worker's failure (Ray's text, with the worker's traceback) for the run's ray.log."""
    failures = getattr(e, "worker_failures", None) or {}
    parts = [f"worker {rank}: {err}" for rank, err in failures.items()]
    controller = getattr(e, "controller_failure", None)
    if controller is not None:
        parts.append(f"controller: {controller}")
    return "\n".join(parts) or str(e)


def _start_timeout(spec: JobSpec):
    """ELASTIC_START_TIMEOUT_S for an elastic run's fit (Ray Train hands the driver's value to
    its controller when fit starts), unless the user exported one; put back afterwards, so a
    later run in this process (a test, a sweep's next trial) gets its own."""
    elastic = spec.scaling.min_workers is not None and START_TIMEOUT_ENV not in os.environ
    return _scoped_env(START_TIMEOUT_ENV, str(ELASTIC_START_TIMEOUT_S) if elastic else None)


def _fit_keeping_signals(trainer):
    """`trainer.fit()` in a thread, so that the handlers above stay installed: called from the
    main thread, Ray Train 2.60's fit() replaces SIGINT's handler with one that aborts the run
    without a checkpoint (it skips that in other threads, as under Tune)."""
    box: dict = {}

    def target() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    thread = threading.Thread(target=target, name="maskclip-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)  # short waits: signal handlers run in the main thread between them
    if "error" in box:
        raise box["error"]
    return box["result"]


def _checkpoint_uri(result, storage_uri: str, storage_path: str) -> str:
    if result.checkpoint is None:
        return "none"
    path = result.checkpoint.path
    if storage_uri.startswith("s3://"):
        return "s3://" + path.lstrip("/")
    return path
