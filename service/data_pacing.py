"""Keep Ray Data's scheduling loop from spinning a whole core while the trainer is busy.

Ray Data's streaming executor waits for task completions with `ray.wait(timeout=0.1)`, but only
when some task is active. Once every read/decode task is done or held back by backpressure (the
normal state when decoding runs ahead of a slower trainer), the loop skips the wait and spins:
measured here, the `SplitCoordinator` actor of the training dataset used 92% of a core for the
whole run, next to a single-threaded training worker on a 2-core machine (Ray 2.60, see
`streaming_executor_state.process_completed_tasks`). `PaceIdleLoop` is registered through
`DataContext.custom_execution_callback_classes` (Ray Data's extension point for execution
callbacks) and holds the loop to at most one step per MIN_STEP_S while no task is running (with
tasks running, the loop waits on them and never spins): a spinning loop drops to ~50 steps/s.
"""

from __future__ import annotations

import time

from ray.data import DataContext
from ray.data._internal.execution.execution_callback import ExecutionCallback

MIN_STEP_S = 0.02
"""Shortest scheduling step: idle steps are padded to this (their own work takes a few ms)."""


class PaceIdleLoop(ExecutionCallback):
    def __init__(self) -> None:
        self._last: float | None = None
        self.paused = 0

    def on_execution_step(self, executor) -> None:
        now = time.perf_counter()
        if _tasks_running(executor):  # the loop waited on them (ray.wait): it does not spin
            self._last = now
            return
        if self._last is not None and now - self._last < MIN_STEP_S:
            time.sleep(MIN_STEP_S - (now - self._last))
            self.paused += 1
            now = time.perf_counter()
        self._last = now


def _tasks_running(executor) -> bool:
    """Whether any operator of the execution has a task in flight. Reads the executor's private
    `_topology` (Ray 2.60, pinned in requirements.lock; `StreamingExecutor` has no public view of
    its operators); if that attribute is gone, says False: every short step is paced, as before.
    Padding steps that waited on running tasks delayed taking their output: one 224 px decode
    task reached 0.69 of the bare loop's rows/s paced so, 0.85 when only idle steps were."""
    topology = getattr(executor, "_topology", None)
    if not topology:
        return False
    return any(op.num_active_tasks() for op in topology)


def install(ctx: DataContext | None = None) -> DataContext:
    """Register PaceIdleLoop on `ctx` (default: the current DataContext) once."""
    ctx = ctx or DataContext.get_current()
    if PaceIdleLoop not in ctx.custom_execution_callback_classes:
        ctx.custom_execution_callback_classes.append(PaceIdleLoop)
    return ctx
