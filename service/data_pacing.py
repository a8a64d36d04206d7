"""Keep Ray Data's scheduling loop from spinning a whole core while the trainer is busy.

Ray Data's streaming executor waits for task completions with `ray.wait(timeout=0.1)`, but only
when some task is active. Once every read/decode task is done or held back by backpressure (the
normal state when decoding runs ahead of a slower trainer), the loop skips the wait and spins:
measured here, the `SplitCoordinator` actor of the training dataset used 92% of a core for the
whole run, next to a single-threaded training worker on a 2-core machine (Ray 2.60, see
`streaming_executor_state.process_completed_tasks`). `PaceIdleLoop` is registered through
`DataContext.custom_execution_callback_classes` (Ray Data's extension point for execution
callbacks) and holds the loop to at most one step per MIN_STEP_S: a step that already waited on
tasks that long is never delayed, a spinning loop drops to ~50 steps/s.
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
        if self._last is not None and now - self._last < MIN_STEP_S:
            time.sleep(MIN_STEP_S - (now - self._last))
            self.paused += 1
            now = time.perf_counter()
        self._last = now


def install(ctx: DataContext | None = None) -> DataContext:
    """Register PaceIdleLoop on `ctx` (default: the current DataContext) once."""
    ctx = ctx or DataContext.get_current()
    if PaceIdleLoop not in ctx.custom_execution_callback_classes:
        ctx.custom_execution_callback_classes.append(PaceIdleLoop)
    return ctx
