"""`maskclip sweep job.yaml`: a Ray Tune sweep over the spec's `sweep:` section.

Driver: validate the sweep (nothing starts on a bad one), start or join Ray, open the MLflow
parent run, run a Tuner over `_trial` (or restore it: finished trials are not rerun), then tag the
trials ASHA stopped, print the trial table, log `trials.csv` + a metric-vs-parameter plot + the
best trial to the parent run and print `best checkpoint: ...`.

Each trial is one `run_job` (the same code as `maskclip run`) named `<sweep>-<trial id>`: a
restarted trial resumes its own checkpoints and MLflow run, nested under the parent run.

SIGTERM / SIGINT (`SweepStop`): the running trials checkpoint and stop, trials not started yet
start nothing, Tune saves the experiment, the stopped trials' MLflow runs are tagged
`maskclip.stopped` and KILLED, and the command exits 143 / 130; running it again resumes.
"""

from __future__ import annotations

import copy
import csv
import math
import os
import re
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import terminal
from .control import CONTROL_PREFIX
from .errors import RunStopped, StopReason, UserError
from .spec import JobSpec, apply_overrides, build_spec
from .sweep_spec import SweepSection, override, validate_sweep
from .tracking import RUN_KEY_TAG, Tracker, _client, flatten, register_best, start_run

log = terminal.get_logger(__name__)

SWEEP_TAG = "maskclip.sweep"
EARLY_STOPPED_TAG = "maskclip.early_stopped"
STOPPED_TAG = "maskclip.stopped"  # signal | interrupt: stopped at a checkpoint, a rerun resumes
STOPPED_STEP_TAG = "maskclip.stopped_checkpoint_step"
SWEEP_KV_NAMESPACE = b"maskclip-sweep"
TRIAL_ID = re.compile(r"([0-9a-f]{5}_\d{5})")


# ---------------------------------------------------------------- the trial (a Ray actor)


def _trial(config: dict, base: dict, sweep_name: str, parent_run_id: str | None) -> None:
    """One trial: the base spec + this trial's sampled values, trained by `run_job`."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from . import trainer

    trial_id = ray.tune.get_context().get_trial_id()
    data = apply_overrides(copy.deepcopy(base), [override(k, v) for k, v in sorted(config.items())])
    data["run"]["name"] = f"{sweep_name}-{trial_id}"
    data["sweep"] = None
    spec = build_spec(data)
    terminal.configure(worker=True)  # this trial's lines on stdout: the sweep's driver prints them
    if _stopping(sweep_name):  # the sweep was told to stop: start nothing, a rerun runs it
        _wait_for_tune()
    try:
        trainer.run_job(spec, tune_callbacks=[TuneReportCallback()], parent_run_id=parent_run_id)
    except RunStopped as e:
        if e.reason not in (StopReason.SIGNAL, StopReason.INTERRUPT):
            raise
        _wait_for_tune()  # checkpointed: stay RUNNING, so Tune saves it as unfinished


def _wait_for_tune() -> None:
    """Until the sweep's driver ends this trial: Tune's experiment state then holds it as
    unfinished (restored as pending: a rerun resumes it), not as completed or failed."""
    threading.Event().wait()


# ---------------------------------------------------------------- stopping on a signal


def _stopping_key(sweep_name: str) -> bytes:
    return f"stopping:{sweep_name}".encode()


def _stopping(sweep_name: str) -> bool:
    from ray.experimental import internal_kv

    try:
        key = _stopping_key(sweep_name)
        return bool(internal_kv._internal_kv_get(key, namespace=SWEEP_KV_NAMESPACE))
    except Exception:  # noqa: BLE001 - no flag readable: not stopping
        return False


class SweepStop:
    """SIGTERM / SIGINT to `maskclip sweep`. The handler only notes the signal and starts a
    thread, which marks the sweep as stopping (a trial starting now starts nothing), asks every
    running trial's control actor to stop (its workers checkpoint at their next step, and the
    trial then waits), waits until those runs have ended (at most `grace_s`), then sends Tune
    its own interruption (SIGUSR1: Tune saves the experiment state and returns). Tune's SIGINT
    handler is switched off: it would end the trials before their checkpoint. A second SIGINT
    ends at once."""

    def __init__(self, name: str, grace_s: float):
        self.name, self.grace_s = name, grace_s
        self.signum: int | None = None
        self.asked: set[str] = set()  # run names asked to stop
        self._old: dict = {}
        self._done = threading.Event()

    @property
    def reason(self) -> StopReason:
        return StopReason.INTERRUPT if self.signum == signal.SIGINT else StopReason.SIGNAL

    def __enter__(self) -> SweepStop:
        from ray.experimental import internal_kv

        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        internal_kv._internal_kv_del(_stopping_key(self.name), namespace=SWEEP_KV_NAMESPACE)
        if threading.current_thread() is threading.main_thread():
            # SIGUSR1 ignored until Tune installs its handler (the default would kill us)
            sigs = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
            self._old = {sig: signal.getsignal(sig) for sig in sigs}
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, frame) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:  # a second Ctrl-C: end now, no checkpoint
                raise KeyboardInterrupt
            return
        self.signum = signum
        log.warning(
            f"received signal {signum}: the running trials checkpoint and stop "
            f"(at most {self.grace_s:g} s)"
        )
        threading.Thread(target=self._stop_trials, name="maskclip-sweep-stop", daemon=True).start()

    def _exit_if_ray_is_gone(self) -> None:
        """The local Ray this sweep started got the signal too (sent to the process group, as
        `timeout` does): nothing can checkpoint now, and Ray's client would end the process
        with a native stack trace once it gives up on the GCS. End with one line instead;
        Tune's experiment state and the trials' last checkpoints are on storage."""
        import sys

        import ray

        node = ray._private.worker._global_node
        gcs = (node.all_processes.get("gcs_server") or []) if node is not None else []
        if any(p.process is not None and p.process.poll() is not None for p in gcs):
            print(
                f"error: sweep {self.name} {self._why()}, and so was its local Ray: the running "
                "trials could not checkpoint now; run the same command again to resume them "
                "from their last checkpoints",
                file=sys.stderr,
                flush=True,
            )
            os._exit(self.reason.exit_code)

    def _why(self) -> str:
        return "interrupted" if self.reason == StopReason.INTERRUPT else "stopped by signal"

    def _stop_trials(self) -> None:
        import ray
        from ray.experimental import internal_kv

        prefix = f"{CONTROL_PREFIX}{self.name}-"
        time.sleep(1.0)  # a signal to the whole process group reaches the local Ray too
        self._exit_if_ray_is_gone()
        try:
            internal_kv._internal_kv_put(
                _stopping_key(self.name), b"1", overwrite=True, namespace=SWEEP_KV_NAMESPACE
            )
            deadline = time.monotonic() + self.grace_s
            while time.monotonic() < deadline:
                live = [n for n in ray.util.list_named_actors() if n.startswith(prefix)]
                for actor in live:
                    run_name = actor[len(CONTROL_PREFIX) :].rsplit("-", 1)[0]
                    if run_name not in self.asked:
                        ray.get_actor(actor).request_stop.remote(self.reason)
                        self.asked.add(run_name)
                if not live:
                    break
                time.sleep(0.5)
                self._exit_if_ray_is_gone()
        except Exception as e:  # noqa: BLE001 - Tune is told to stop all the same
            log.warning(f"could not ask every trial to checkpoint ({type(e).__name__}: {e})")
        finally:
            while not self._done.is_set():  # Tune's handler: installed once its loop starts
                if callable(signal.getsignal(signal.SIGUSR1)):
                    os.kill(os.getpid(), signal.SIGUSR1)
                    break
                time.sleep(0.2)


# ---------------------------------------------------------------- search space and Tuner


def param_space(sweep: SweepSection) -> dict[str, Any]:
    from ray import tune

    space: dict[str, Any] = {}
    for path, d in sweep.parameters.items():
        if d.kind == "uniform":
            space[path] = tune.uniform(*d.uniform)
        elif d.kind == "loguniform":
            space[path] = tune.loguniform(*d.loguniform)
        elif d.kind == "grid" or (d.kind == "choice" and sweep.search == "grid"):
            space[path] = tune.grid_search(list(d.values_to_check()))
        else:
            space[path] = tune.choice(list(d.choice))
    return space


def search_algorithm(sweep: SweepSection, seed: int):
    """(search algorithm, max_concurrent_trials for TuneConfig). Tune ignores
    max_concurrent_trials for a BasicVariantGenerator instance: it takes its own limit."""
    if sweep.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=seed), sweep.max_concurrent
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=seed, max_concurrent=sweep.max_concurrent), None


def scheduler(sweep: SweepSection, spec: JobSpec):
    if sweep.scheduler != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="step",
        max_t=sweep.asha.max_t or spec.optim.max_steps,
        grace_period=sweep.asha.grace_period or spec.checkpoint.every_steps,
        reduction_factor=sweep.asha.reduction_factor,
        # a trial that reaches max_t is finishing anyway: let run_job close its MLflow run
        stop_last_trials=False,
    )


def _absolute(spec: JobSpec) -> dict:
    """The spec as data with local paths made absolute: trials run in other processes."""
    data = spec.model_dump(mode="json")

    def local(p: str | None) -> str | None:
        return p if p is None or "://" in p else str(Path(p).resolve())

    data["data"]["train"] = local(spec.data.train)
    data["data"]["val"] = local(spec.data.val)
    data["data"]["dense_probe"] = local(spec.data.dense_probe)
    data["data"]["zero_shot_seg"] = local(spec.data.zero_shot_seg)
    data["run"]["output_dir"] = local(spec.run.output_dir)
    data["checkpoint"]["storage_path"] = local(spec.storage_path())
    if spec.tracking.enabled:
        data["tracking"]["tracking_uri"] = spec.tracking_uri()
    data["sweep"] = None
    return data


def check_concurrency(spec: JobSpec, sweep: SweepSection) -> None:
    """Concurrent trials hold their trial + worker CPUs; Ray Data still needs one task's CPU."""
    import ray

    if spec.scaling.ray_address:  # an autoscaling cluster may grow: let Ray queue trials
        return
    total = ray.cluster_resources().get("CPU", 0)
    s = spec.scaling
    per_trial = sweep.resources_per_trial.cpu + s.num_workers * s.cpus_per_worker
    data_cpus = 0.5
    if sweep.max_concurrent * per_trial + data_cpus > total:
        raise UserError(
            f"sweep.max_concurrent: {sweep.max_concurrent} trials x ({sweep.resources_per_trial.cpu:g}"
            f" trial + {s.num_workers} x {s.cpus_per_worker:g} worker CPU) (+{data_cpus} for data) "
            f"do not fit the {total:g} CPUs of this Ray cluster; lower sweep.max_concurrent"
        )


# ---------------------------------------------------------------- MLflow parent run


def _find_parent(uri: str, experiment: str, name: str) -> str | None:
    try:
        client = _client(uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return None
        found = client.search_runs(
            [exp.experiment_id],
            f"tags.`{SWEEP_TAG}` = '{name}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if not found:
            return None
        client.update_run(found[0].info.run_id, status="RUNNING")
        if STOPPED_TAG in found[0].data.tags:  # it is resuming: no longer stopped
            client.delete_tag(found[0].info.run_id, STOPPED_TAG)
        return found[0].info.run_id
    except Exception:  # noqa: BLE001 - tracking never stops the sweep
        return None


def sweep_params(sweep: SweepSection, spec: JobSpec) -> dict[str, str]:
    params = {f"space.{p}": d.describe() for p, d in sweep.parameters.items()}
    params.update(
        {
            "sweep.search": sweep.search,
            "sweep.scheduler": sweep.scheduler,
            "sweep.metric": sweep.metric,
            "sweep.mode": sweep.resolved_mode,
            "sweep.num_samples": str(sweep.resolved_num_samples),
            "sweep.max_concurrent": str(sweep.max_concurrent),
            "sweep.trial_cpu": str(sweep.resources_per_trial.cpu),
        }
    )
    if sweep.scheduler == "asha":
        params.update(
            {
                "sweep.asha.time_attr": "step",
                "sweep.asha.grace_period": str(
                    sweep.asha.grace_period or spec.checkpoint.every_steps
                ),
                "sweep.asha.reduction_factor": str(sweep.asha.reduction_factor),
                "sweep.asha.max_t": str(sweep.asha.max_t or spec.optim.max_steps),
            }
        )
    base = {
        k: v
        for k, v in flatten(spec.model_dump(mode="json")).items()
        if not k.startswith("sweep") and k not in sweep.parameters
    }
    return {**base, **params}


# ---------------------------------------------------------------- results


@dataclass
class TrialRow:
    trial_id: str
    run_name: str
    status: str  # completed | early_stopped | error
    params: dict[str, Any]
    step: int | None
    value: float
    loss: float
    checkpoint: str
    mlflow_run: str = ""
    error: str = ""
    extra: dict = field(default_factory=dict)


def _float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def collect(grid, sweep: SweepSection, sweep_name: str, storage_is_s3: bool) -> list[TrialRow]:
    rows = []
    for result in grid:
        m = result.metrics or {}
        trial_id = m.get("trial_id") or _trial_id_from_path(result.path)
        if result.error is not None:
            status = "error"
        elif m.get("final"):
            status = "completed"
        else:
            status = "early_stopped"
        ckpt = m.get("checkpoint_path") or "none"
        if storage_is_s3 and ckpt != "none":
            ckpt = "s3://" + ckpt.lstrip("/")
        params = {p: (result.config or {}).get(p) for p in sweep.parameters}
        err = str(result.error).strip().splitlines()[-1][:200] if result.error else ""
        rows.append(
            TrialRow(
                trial_id,
                f"{sweep_name}-{trial_id}",
                status,
                params,
                m.get("step"),
                _float(m.get(sweep.metric)),
                _float(m.get("loss")),
                ckpt,
                error=err,
            )
        )
    rows.sort(key=lambda r: r.trial_id)
    return rows


def _trial_id_from_path(path: str | None) -> str:
    found = TRIAL_ID.search(Path(path or "").name)
    return found.group(1) if found else "unknown"


def best_row(rows: list[TrialRow], mode: str) -> TrialRow | None:
    """Best metric among completed trials (their checkpoint is the trained model); else any."""
    scored = [r for r in rows if math.isfinite(r.value) and r.status != "error"]
    done = [r for r in scored if r.status == "completed"] or scored
    if not done:
        return None
    return (max if mode == "max" else min)(done, key=lambda r: r.value)


def _trial_runs(uri: str, parent: str):
    """(MlflowClient, the sweep parent run's child runs): the trials' MLflow runs."""
    client = _client(uri)
    exp_id = client.get_run(parent).info.experiment_id
    children = client.search_runs(
        [exp_id], f"tags.`mlflow.parentRunId` = '{parent}'", max_results=5000
    )
    return client, children


def reconcile_runs(uri: str, parent: str, rows: list[TrialRow]) -> None:
    """Find each trial's MLflow run; tag ASHA-stopped ones and close runs left RUNNING."""
    try:
        client, children = _trial_runs(uri, parent)
    except Exception as e:  # noqa: BLE001
        log.warning(f"could not read the trial runs from MLflow ({type(e).__name__})")
        return
    by_name = {r.data.tags.get(RUN_KEY_TAG): r for r in children}
    for row in rows:
        run = by_name.get(row.run_name)
        if run is None:
            continue
        row.mlflow_run = run.info.run_id
        close_trial_run(uri, run, row.status, row.step)


def close_trial_run(uri: str, run, status: str, step: int | None) -> None:
    """Tag an early-stopped trial's run and end it if it is still RUNNING (its process was
    stopped before run_job could end it). Idempotent: the sweep's end repeats it for all."""
    tracker = Tracker(uri, run.info.run_id)
    if status in ("completed", "early_stopped"):  # a trial stopped by a signal ran on since
        for tag in (STOPPED_TAG, STOPPED_STEP_TAG):
            if tag in run.data.tags:
                tracker._guarded("tagging", "delete_tag", tag)
    if status == "early_stopped" and run.data.tags.get(EARLY_STOPPED_TAG) != "true":
        tracker.set_tag(EARLY_STOPPED_TAG, "true")
        if step is not None:
            tracker.set_tag("maskclip.stopped_at_step", str(step))
    if run.info.status == "RUNNING":
        tracker.end({"completed": "FINISHED", "early_stopped": "KILLED"}.get(status, "FAILED"))


def _trial_runs_closer(uri: str, parent: str, sweep_name: str):
    """A Tune callback that closes a trial's MLflow run when Tune stops or completes the trial,
    not only when the whole sweep ends: a sweep that is killed leaves no stopped trial RUNNING.
    """
    from ray.tune import Callback

    class TrialRunCloser(Callback):
        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            last = trial.last_result or {}
            status = "completed" if last.get("final") else "early_stopped"
            name = f"{sweep_name}-{trial.trial_id}"
            try:
                client = _client(uri)
                exp_id = client.get_run(parent).info.experiment_id
                found = client.search_runs(
                    [exp_id],
                    f"tags.`mlflow.parentRunId` = '{parent}' and tags.`{RUN_KEY_TAG}` = '{name}'",
                    max_results=1,
                )
            except Exception:  # noqa: BLE001 - the sweep's end reconciles again
                return
            if found:
                close_trial_run(uri, found[0], status, last.get("step"))

    return TrialRunCloser()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return "" if v is None else str(v)


def _exact(v: Any) -> str:
    return "" if v is None else str(v)


def table(rows: list[TrialRow], sweep: SweepSection, fmt=None) -> list[list[str]]:
    """Header + one row per trial; `fmt` formats values (default: 4 significant digits)."""
    fmt = fmt or _fmt
    loss = [] if sweep.metric == "loss" else ["loss"]
    header = ["trial", "status", *sweep.parameters, "step", sweep.metric, *loss]
    header += ["checkpoint", "mlflow_run"]
    body = [
        [r.run_name, r.status, *(fmt(r.params[p]) for p in sweep.parameters), fmt(r.step)]
        + [fmt(r.value), *(fmt(r.loss) for _ in loss), r.checkpoint, r.mlflow_run]
        for r in rows
    ]
    return [header, *body]


def print_table(cells: list[list[str]]) -> None:
    shown = [row[:-2] for row in cells]  # checkpoint / run id: in trials.csv, too wide here
    widths = [max(len(row[i]) for row in shown) for i in range(len(shown[0]))]
    for i, row in enumerate(shown):
        log.log(terminal.RESULT, "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            log.log(terminal.RESULT, "  ".join("-" * w for w in widths))


def plot(rows: list[TrialRow], sweep: SweepSection, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    names = list(sweep.parameters)
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.4), squeeze=False)
    colors = {"completed": "tab:blue", "early_stopped": "tab:orange", "error": "tab:red"}
    for ax, name in zip(axes[0], names):
        dist = sweep.parameters[name]
        values = [r.params[name] for r in rows]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numeric:
            xs = [float(v) for v in values]
        else:
            cats = sorted({str(v) for v in values})
            xs = [cats.index(str(v)) for v in values]
            ax.set_xticks(range(len(cats)), cats)
        for status, color in colors.items():
            pts = [
                (x, r.value)
                for x, r in zip(xs, rows)
                if r.status == status and math.isfinite(r.value)
            ]
            if pts:
                ax.scatter(*zip(*pts), c=color, label=status.replace("_", " "))
        if dist.kind == "loguniform" or (
            numeric and xs and min(xs) > 0 and max(xs) / min(xs) >= 100
        ):
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(name)
        ax.set_ylabel(sweep.metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{sweep.metric} ({sweep.resolved_mode}) per trial")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- the driver


def _stopped(stop: SweepStop, grid, uri: str | None, parent: str | None, where) -> None:
    """After a signal: mark the stopped trials' MLflow runs (and the parent), then end with
    one line. Runs that checkpointed were ended KILLED by run_job; runs Tune ended before
    they could (still RUNNING) are closed here."""
    from . import checkpoint as ckpt

    names = set(stop.asked)
    if uri and parent:
        try:
            client, children = _trial_runs(uri, parent)
        except Exception as e:  # noqa: BLE001
            log.warning(f"could not mark the stopped trials in MLflow ({type(e).__name__})")
            children = []
        for run in children:
            run_name = run.data.tags.get(RUN_KEY_TAG, "")
            if run_name not in names and run.info.status != "RUNNING":
                continue
            names.add(run_name)
            tracker = Tracker(uri, run.info.run_id)
            tracker.set_tag(STOPPED_TAG, stop.reason.value)
            latest = ckpt.find_latest(where[0], run_name, where[1], verify=False)
            if latest:
                tracker.set_tag(STOPPED_STEP_TAG, str(latest[1]["step"]))
            if run.info.status == "RUNNING":
                tracker.end("KILLED")
        tracker = Tracker(uri, parent)
        tracker.set_tag(STOPPED_TAG, stop.reason.value)
        tracker.end("KILLED")
    done = sum(  # a stopped trial's last report is final too: it is not among these
        1
        for r in grid
        if r.error is None
        and (r.metrics or {}).get("final")
        and f"{stop.name}-{(r.metrics or {}).get('trial_id') or _trial_id_from_path(r.path)}"
        not in names
    )
    raise RunStopped(
        stop.reason,
        f"sweep {stop.name} {stop._why()}: {len(stop.asked)} running trial(s) checkpointed, "
        f"{done} finished trial(s) kept; run the same command again to resume",
    )


def run_sweep(spec: JobSpec):
    """`maskclip sweep`: returns the Tune ResultGrid after logging and printing the summary."""
    sweep = validate_sweep(spec)  # before anything starts
    from .evaluation import dense_sources

    dense_sources(spec)  # a missing dense folder is one line here, not every trial's failure
    import ray.tune
    from ray.tune import TuneConfig, Tuner

    from .trainer import init_ray, storage

    name = spec.run.name
    base = _absolute(spec)
    init_ray(spec, Path(spec.run.output_dir) / name)
    if terminal.ray_log_path() is not None:
        log.info(f"Ray's own log lines: {terminal.ray_log_path()} (-v shows them here)")
    check_concurrency(spec, sweep)
    # checkpoint reports between validations carry no val_* metric: ASHA skips those reports
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")

    storage_path, fs, storage_uri = storage(spec)
    sweeps_path = f"{storage_path.rstrip('/')}/sweeps"
    exp_path = f"{sweeps_path}/{name}"
    resuming = Tuner.can_restore(exp_path, storage_filesystem=fs)

    uri = base["tracking"]["tracking_uri"] if spec.tracking.enabled else None
    parent = None
    if uri:
        parent = _find_parent(uri, spec.tracking.experiment, name) if resuming else None
        if parent is None:
            parent = start_run(
                uri,
                spec.tracking.experiment,
                name,
                sweep_params(sweep, spec),
                {**spec.run.tags, SWEEP_TAG: name},
            )
            Tracker(uri, parent).set_tag(SWEEP_TAG, name)

    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(_trial, base=base, sweep_name=name, parent_run_id=parent),
        {"CPU": sweep.resources_per_trial.cpu},
    )
    mode = sweep.resolved_mode
    if resuming:
        log.info(
            f"resuming sweep {name} from {storage_uri}/sweeps/{name} (finished trials are kept; "
            "the search space of the first start applies)"
        )
        tuner = Tuner.restore(exp_path, trainable, resume_errored=True, storage_filesystem=fs)
    else:
        search_alg, max_concurrent_trials = search_algorithm(sweep, spec.run.seed)
        tuner = Tuner(
            trainable,
            param_space=param_space(sweep),
            tune_config=TuneConfig(
                num_samples=sweep.resolved_num_samples,
                max_concurrent_trials=max_concurrent_trials,
                search_alg=search_alg,
                scheduler=scheduler(sweep, spec),
                metric=sweep.metric,
                mode=mode,
                reuse_actors=False,
            ),
            run_config=ray.tune.RunConfig(
                name=name,
                storage_path=sweeps_path,
                storage_filesystem=fs,
                verbose=1,
                callbacks=[_trial_runs_closer(uri, parent, name)] if uri and parent else None,
            ),
        )
    log.info(
        f"sweep {name}: {sweep.search} search, scheduler {sweep.scheduler}, "
        f"metric {sweep.metric} ({mode}), {sweep.max_concurrent} trial(s) at a time"
    )
    with SweepStop(name, spec.cluster.stop_grace_s) as stop:
        grid = tuner.fit()
    if stop.signum is not None:
        _stopped(stop, grid, uri, parent, (storage_path, fs))

    rows = collect(grid, sweep, name, storage_uri.startswith("s3://"))
    if uri and parent:
        reconcile_runs(uri, parent, rows)
    best = best_row(rows, mode)
    cells = table(rows, sweep)
    log.log(
        terminal.RESULT,
        f"\nsweep {name}: {len(rows)} trials "
        f"({sum(r.status == 'completed' for r in rows)} completed, "
        f"{sum(r.status == 'early_stopped' for r in rows)} stopped early, "
        f"{sum(r.status == 'error' for r in rows)} failed)",
    )
    print_table(cells)
    for r in rows:
        if r.error:
            log.log(terminal.RESULT, f"  {r.run_name}: {r.error}")

    if uri and parent:
        tracker = Tracker(uri, parent)
        with tempfile.TemporaryDirectory() as d:
            csv_path = os.path.join(d, "trials.csv")
            with open(csv_path, "w", newline="") as f:
                csv.writer(f).writerows(table(rows, sweep, fmt=_exact))
            tracker.log_artifact(csv_path)
            png = os.path.join(d, "sweep_plot.png")
            try:
                plot(rows, sweep, png)
                tracker.log_artifact(png)
            except Exception as e:  # noqa: BLE001 - a plot never fails the sweep
                log.warning(f"sweep plot failed ({type(e).__name__}: {e})")
        if best is not None:
            tracker.log_metrics({f"best_{sweep.metric}": best.value}, 0)
            tracker.set_tag("maskclip.best_trial", best.run_name)
            tracker.set_tag("maskclip.best_checkpoint", best.checkpoint)
            tracker.set_tag("maskclip.best_mlflow_run", best.mlflow_run)
            for p, v in best.params.items():
                tracker.set_tag(f"best.{p}", str(v))
            if best.mlflow_run:  # the best trial's best checkpoint model: <sweep>@champion
                champion = register_best(uri, [best.mlflow_run], name, sweep.metric, mode)
                if champion:
                    tracker.set_tag("maskclip.registered_model", f"models:/{champion}")
                    log.info(f"registered model: models:/{champion}")
        all_failed = bool(rows) and all(r.status == "error" for r in rows)
        tracker.end("FAILED" if all_failed else "FINISHED")

    if best is not None:
        log.log(
            terminal.RESULT,
            f"best trial: {best.run_name} ({sweep.metric} {_fmt(best.value)}; "
            + ", ".join(f"{p}={_fmt(v)}" for p, v in best.params.items())
            + ")",
        )
    log.log(terminal.RESULT, f"best checkpoint: {best.checkpoint if best else 'none'}")
    log.log(terminal.RESULT, f"mlflow run: {parent}")
    if rows and all(r.status == "error" for r in rows):
        raise RunStopped(
            StopReason.FAILED,
            f"sweep {name}: all {len(rows)} trials failed (see the errors above); "
            "run the same sweep again to retry them",
        )
    return grid
