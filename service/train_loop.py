"""The per-worker training loop (Ray Train). Reads top to bottom:

spec -> model task -> optimiser/schedule -> resume from checkpoint -> DDP -> loop over the
data shard: forward, finite check, backward, clip, step, EMA, log, checkpoint -> validate.

`config` carries plain data only: the resolved spec (dict), the tokenizer (JSON), the MLflow
run id and the names of the driver's control actor.
"""

from __future__ import annotations

import math
import os
import random
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from maskclip import MaskCLIPTask
from maskclip.tokenizer import Tokenizer
from maskclip.transforms import normalise_images

from . import checkpoint as ckpt
from . import terminal
from .control import (
    StopWatcher,
    bad_rows_message,
    control_actor,
    preemption_notice,
    record_preemption_checkpoint,
)
from .errors import StopReason
from .evaluation import validate
from .figures import patch_similarity_figure
from .spec import JobSpec
from .storage import copy_to_local
from .tracking import Tracker

log = terminal.get_logger(__name__)


def build_optimizer(task: MaskCLIPTask, spec: JobSpec) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms, embeddings, tokens and the logit scale."""
    decay, no_decay = [], []
    for name, p in task.student.named_parameters():
        if not p.requires_grad:
            continue
        flat = p.ndim < 2 or "embed" in name or "token" in name or name == "logit_scale"
        (no_decay if flat else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": spec.optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # the fused CUDA kernel: one launch for the whole update; it needs every parameter on CUDA
    fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(
        groups, lr=spec.optim.lr, betas=(0.9, 0.98), eps=1e-6, fused=fused or None
    )


def build_scheduler(optimizer, spec: JobSpec, total_steps: int):
    """Linear warmup, then cosine to 0 (or constant)."""
    warmup = spec.optim.warmup_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if spec.optim.schedule == "constant":
            return 1.0
        t = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class StepResult:
    """What one `train_step` did. `applied` is False when the update was not made: a non-finite
    loss on some rank (`nonfinite`) or a stop requested on some rank (`stop`). `checkpoint`:
    some rank asked for a checkpoint after this step (a preemption notice)."""

    report: dict[str, torch.Tensor]
    applied: bool
    nonfinite: bool = False
    stop: bool = False
    checkpoint: bool = False
    grad_norm: float | None = None
    momentum: float | None = None


def train_step(
    task: MaskCLIPTask,
    optimizer: torch.optim.Optimizer,
    scheduler,
    images: torch.Tensor,
    tokens: torch.Tensor,
    gen: torch.Generator,
    *,
    step: int,
    total_steps: int,
    grad_clip: float = 0.0,
    autocast: bool = False,
    stop: bool = False,
    checkpoint: bool = False,
    distributed: bool = False,
) -> StepResult:
    """One optimisation step: forward, agree across ranks (finite loss? stop?), backward, clip,
    optimiser and schedule step, EMA teacher update. `step` is the number of steps done before
    this one. The per-worker loop and benchmarks/pipeline.py's bare-PyTorch baseline both call it.
    """
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=autocast):
        loss, report = task.training_forward(images, tokens, gen)
    # every rank must agree on skipping / stopping / checkpointing, or DDP (or the checkpoint's
    # report) would hang: one all-reduce of three flags, in the step, no extra call
    flags = torch.stack(
        [
            (~torch.isfinite(loss.detach())).float(),
            loss.new_tensor(float(stop)),
            loss.new_tensor(float(checkpoint)),
        ]
    )
    if distributed:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    nonfinite, stopping, checkpointing = (bool(f) for f in flags.tolist())
    if nonfinite or stopping:
        optimizer.zero_grad(set_to_none=True)
        return StepResult(report, applied=False, nonfinite=nonfinite, stop=stopping)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = None
    if grad_clip > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(task.student.parameters(), grad_clip))
    optimizer.step()
    scheduler.step()
    momentum = task.update_teacher(step + 1, total_steps)
    return StepResult(
        report, applied=True, checkpoint=checkpointing, grad_norm=grad_norm, momentum=momentum
    )


def train_loop_per_worker(config: dict) -> None:
    terminal.configure(worker=True)  # every product line on stdout: the driver prints those
    spec = JobSpec.model_validate(config["spec"])
    tokenizer = Tokenizer.from_json(config["tokenizer"])
    total_steps: int = config["total_steps"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    seed_everything(spec.run.seed * 1000 + rank)
    torch.set_num_threads(
        max(1, int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads())
    )

    # --- model, optimiser, schedule
    cfg = spec.model_config_for(tokenizer.vocab_size)
    task = MaskCLIPTask(cfg, tokenizer.special_ids, tokenizer.mask_id, pad_id=tokenizer.pad_id)
    task = task.to(device)
    optimizer = build_optimizer(task, spec)
    scheduler = build_scheduler(optimizer, spec, total_steps)

    # --- resume: the latest complete checkpoint of this run, if any
    step, epoch, run_id = 0, 0, config.get("mlflow_run_id")
    restored_from = -1
    # Ray hands a restarted worker group the last checkpoint its controller registered; one
    # written just before a crash may not be registered yet. Storage holds both, and
    # find_latest checks each file against meta.json: the newest sound one wins.
    found = _newest_on_storage(spec, config)
    resume = None if found is not None else ray.train.get_checkpoint()
    if resume is not None or found is not None:
        source = resume.as_directory() if resume is not None else copy_to_local(*found)
        with source as d:
            meta = ckpt.restore(d, task, optimizer, scheduler)
        step, epoch = meta["step"], meta["epoch"]
        restored_from = step
        run_id = run_id or meta.get("mlflow_run_id")
        # decorrelate the data order / masks of a resumed run from its first life
        seed_everything(spec.run.seed * 1000 + rank + 7919 * step)
        if rank == 0:
            log.info(f"resumed from checkpoint at step {step}")

    task.student.set_grad_checkpointing(spec.optim.grad_checkpointing)
    task.model = ray.train.torch.prepare_model(task.student) if world > 1 else task.student
    if spec.optim.compile:  # checkpoints and the EMA teacher keep using the plain `student`
        task.model = torch.compile(task.model)
    tracker = Tracker(None, None)
    watcher = None
    if rank == 0:
        control = control_actor(config["control"])
        generation = ray.get(control.new_generation.remote())  # before reading MLflow's history
        tracker = Tracker(
            config.get("tracking_uri"),
            run_id,
            resumed=restored_from >= 0,
            system_metrics=True,
            current=lambda: ray.get(control.current_generation.remote()) == generation,
        )
        watcher = StopWatcher(control, spec.data.max_bad_fraction)
    autocast = spec.optim.precision == "bf16" or (
        spec.optim.precision == "auto" and device.type == "cuda"
    )
    gen = torch.Generator().manual_seed(spec.run.seed * 1000 + rank + step)
    shard = ray.train.get_dataset_shard("train")

    def save_and_report(metrics: dict, final: bool = False, model: bool = True) -> None:
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                try:
                    ckpt.save(
                        d,
                        task,
                        optimizer,
                        scheduler,
                        step,
                        epoch,
                        config["tokenizer"],
                        config["spec_yaml"],
                        run_id,
                    )
                    checkpoint = ray.train.Checkpoint.from_directory(d)
                    tracker.sync()  # MLflow holds every step up to this checkpoint first
                except OSError as e:  # disk full, quota: stop; the previous checkpoint stays
                    why = e.strerror or str(e)
                    detail = (
                        f"the checkpoint at step {step} could not be written ({why}); the "
                        "previous checkpoint is intact: free space and run the same job again "
                        "to resume"
                    )
                    ray.get(watcher.control.request_stop.remote(StopReason.CHECKPOINT, detail))
                    watcher.poll()
            # the final one: _final_artifacts; a preemption's: no upload to MLflow in the way
            if checkpoint is not None and not final and model:
                _checkpoint_model(task, step, metrics, tracker, config)
            metrics = {**metrics, "step": step, "final": final, "restored_from": restored_from}
            ray.train.report(metrics, checkpoint=checkpoint)

    # --- the loop
    task.train()
    stopped: StopReason | None = None
    t_last, samples_since = time.perf_counter(), 0
    t_start, step_start = t_last, step  # the ETA is the average over this run, not a window
    max_epochs = spec.optim.epochs or 10**9
    report: dict = {}
    last_images = None
    skipped = 0  # consecutive steps skipped for a non-finite loss
    preempt_saved = False  # this worker group saved its checkpoint for a preemption notice
    while step < total_steps and epoch < max_epochs and stopped is None:
        batches_this_epoch = 0
        batches = shard.iter_torch_batches(
            batch_size=spec.optim.batch_size,
            drop_last=True,
            local_shuffle_buffer_size=spec.data.shuffle_buffer if spec.data.shuffle else None,
            device=device,
            # pinned host batches; Ray then copies them with non_blocking=True (its default,
            # RAY_AIR_DEFAULT_TENSOR_NON_BLOCKING_TRANSFER), overlapping the step
            pin_memory=device.type == "cuda",
        )
        for batch in batches:
            batches_this_epoch += 1
            images, tokens = normalise_images(batch["image"]), batch["tokens"]  # u8 on device
            last_images = images[:4]
            out = train_step(
                task,
                optimizer,
                scheduler,
                images,
                tokens,
                gen,
                step=step,
                total_steps=total_steps,
                grad_clip=spec.optim.grad_clip,
                autocast=autocast,
                stop=watcher is not None and watcher.stop_requested,
                checkpoint=not preempt_saved and preemption_notice() is not None,
                distributed=world > 1,
            )
            if out.nonfinite:
                skipped += 1
                if spec.optim.on_nonfinite == "stop" or skipped >= spec.optim.max_skipped_steps:
                    stopped = StopReason.NONFINITE
                    if watcher is not None:
                        detail = f"non-finite loss at step {step + 1}"
                        if spec.optim.on_nonfinite == "skip":
                            detail += f" ({skipped} consecutive steps skipped)"
                        ray.get(watcher.control.request_stop.remote(stopped, detail))
                    break
                log.warning(f"non-finite loss at step {step + 1}; step skipped")
                continue
            skipped = 0
            if out.stop:  # rank 0 knows why (the actor's reason); the others follow it
                stopped = (watcher.reason if watcher else None) or StopReason.SIGNAL
                break
            report = out.report
            step += 1
            samples_since += images.shape[0] * world
            if rank == 0 and (step % spec.checkpoint.every_steps == 0 or step == total_steps):
                tracker.begin_model(step)  # this step's metrics link to its checkpoint's model

            if rank == 0 and (step % spec.optim.log_every == 0 or step == total_steps):
                elapsed = time.perf_counter() - t_last
                metrics = {k: float(v) for k, v in report.items()}
                metrics["lr"] = scheduler.get_last_lr()[0]
                metrics["ema_momentum"] = out.momentum
                metrics["samples_per_s"] = samples_since / max(elapsed, 1e-9)
                if out.grad_norm is not None:
                    metrics["grad_norm"] = out.grad_norm
                metrics["data_rows_seen"] = watcher.stats["rows_seen"]
                metrics["data_rows_bad"] = watcher.stats["rows_bad"]
                tracker.log_metrics(metrics, step)
                per_step = (time.perf_counter() - t_start) / max(1, step - step_start)
                log.info(
                    f"step {step}/{total_steps}  loss {metrics['loss']:.4f}  "
                    f"{metrics['samples_per_s']:.1f} samples/s  "
                    f"ETA {_duration((total_steps - step) * per_step)}"
                )
                t_last, samples_since = time.perf_counter(), 0

            val_now = {}
            if spec.optim.val_every and step % spec.optim.val_every == 0:
                val_now = _validate(spec, task, tokenizer, device, tracker, rank, step)
            if step % spec.checkpoint.every_steps == 0 and step < total_steps:
                save_and_report({"loss": float(report["loss"]), **val_now})
            elif out.checkpoint and step < total_steps:  # a node is going away: save now
                save_and_report({"loss": float(report["loss"]), **val_now}, model=False)
            if out.checkpoint:
                preempt_saved = True
                if rank == 0 and step < total_steps:
                    record_preemption_checkpoint(preemption_notice(), step)
                    log.warning(f"preemption notice: checkpoint saved at step {step}")
            if step >= total_steps:
                break
        else:
            epoch += 1
            if batches_this_epoch == 0:  # no full batch: every later epoch would be empty too
                stopped = StopReason.DATA
                if watcher is not None:
                    watcher.poll()
                    stats = watcher.stats
                    detail = (
                        f"data.train: an epoch yielded no batch of {spec.optim.batch_size} rows; "
                        + bad_rows_message(stats, spec.data.max_bad_fraction).split(": ", 1)[1]
                    )
                    ray.get(watcher.control.request_stop.remote(stopped, detail))
    if watcher is not None:
        watcher.close()

    # --- the end: final checkpoint, validation, figure
    final_metrics = {"loss": float(report["loss"]) if report else float("nan")}
    clean = stopped in (None, StopReason.SIGNAL, StopReason.INTERRUPT)
    if clean:
        final_metrics.update(_validate(spec, task, tokenizer, device, tracker, rank, step))
        # stopped by a signal, the run is not over: a rerun resumes it and logs the final model
        # (logging it here also logged this step's metrics a second time, linked to the model)
        if rank == 0 and tracker.enabled and stopped is None:
            _final_artifacts(task, last_images, tracker, config, step, final_metrics)
    if not clean:
        # keep the last good checkpoint: report without a new one
        ray.train.report({**final_metrics, "step": step, "final": True}, checkpoint=None)
    else:
        save_and_report(final_metrics, final=True)
    if rank == 0:
        tracker.finish()  # bounded: an unanswering server cannot hold the end of the run


def _duration(seconds: float) -> str:
    """42s, 3m05s, 1h02m."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _newest_on_storage(spec: JobSpec, config: dict):
    """(path, filesystem) of the newest complete checkpoint of this run on storage, if any."""
    from .storage import is_s3, split_uri

    fs, root = split_uri(config["storage_uri"], spec.storage)  # checked by the driver
    fs = fs if is_s3(fs) else None
    found = ckpt.find_latest(root, spec.run.name, fs)
    return (found[0], fs) if found else None


def _validate(spec, task, tokenizer, device, tracker, rank, step) -> dict:
    """service.evaluation.validate on the live student (rank 0 reads data.val and the dense
    sets with pyarrow): the same numbers `maskclip eval` gives on the checkpoint saved here."""
    from .errors import DataError

    if rank != 0:
        return {}  # validate() itself returns {} when the spec names no validation data
    try:
        metrics = validate(spec, task.student, tokenizer, device)
    except DataError as e:  # e.g. no usable validation row: training goes on, unvalidated
        log.warning(f"validation skipped: {e}")
        return {}
    tracker.log_metrics(metrics, step)
    log.info("validation " + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    return metrics


def _model_folder(task, directory: str, step: int, config) -> str:
    """The checkpoint format without training state (model.safetensors, tokenizer.json,
    job.yaml, meta.json): what `maskclip eval` and `maskclip.checkpoint.load` open."""
    ckpt.save(
        directory,
        task,
        None,
        None,
        step,
        0,
        config["tokenizer"],
        config["spec_yaml"],
        config.get("mlflow_run_id"),
        training_state=False,
    )
    return directory


def _checkpoint_model(task, step: int, metrics: dict, tracker, config) -> None:
    """Rank 0: this checkpoint's weights as an MLflow LoggedModel of the run at `step`, its
    metrics linked (service.tracking.log_checkpoint_model). Never stops training."""
    if not tracker.enabled:
        return
    try:
        with tempfile.TemporaryDirectory() as d:
            folder = _model_folder(task, os.path.join(d, "checkpoint"), step, config)
            tracker.log_model(folder, step, metrics)
    except Exception as e:  # noqa: BLE001 - e.g. a full temp disk: the Ray checkpoint is saved
        log.warning("checkpoint at step %d not logged as an MLflow model (%s)", step, e)


def _final_artifacts(task, images, tracker, config, step: int, metrics: dict) -> None:
    """The final model, once: the run's `model/` artifacts (for runs:/<id>/model) and a
    LoggedModel at `step` with the final metrics linked; and the mask/similarity figure."""
    with tempfile.TemporaryDirectory() as d:
        model_dir = _model_folder(task, os.path.join(d, "checkpoint"), step, config)
        tracker.log_artifacts(model_dir, "model")
        tracker.log_model(model_dir, step, metrics)
        if images is not None:
            fig_path = os.path.join(d, "masks_and_similarity.png")
            patch_similarity_figure(task, images, fig_path)
            tracker.log_artifact(fig_path, "figures")
