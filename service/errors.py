"""Typed errors and stop reasons; the CLI maps them to exit codes in one place (service.cli).

UserError            bad input the user can fix: one line naming the field/file/row, exit 2
  SpecError          the job spec (its `lines` are `path.to.field: what is wrong (got X)`)
  DataError          a dataset: missing files or columns, too many bad rows
  CheckpointError    a checkpoint or model folder that cannot be used
  ClusterError       a Ray cluster / Jobs API / KubeRay problem
RunStopped           a run that ended early; carries its StopReason and exit code
"""

from __future__ import annotations

import enum


class UserError(Exception):
    """Bad input (file, dataset, address, ...): one line, names the field/file/row, exit 2."""

    exit_code = 2

    @property
    def lines(self) -> list[str]:
        return [str(self)]


class SpecError(UserError):
    """A bad spec: `lines` are `path: message (got value)` strings, one per problem."""

    def __init__(self, lines: list[str] | str):
        self._lines = [lines] if isinstance(lines, str) else list(lines)
        super().__init__("\n".join(self._lines))

    @property
    def lines(self) -> list[str]:
        return list(self._lines)


class DataError(UserError):
    """A dataset that cannot be used (missing, wrong columns, too many bad rows)."""


class CheckpointError(UserError):
    """A checkpoint or model folder that cannot be read (incomplete, foreign format, corrupt)."""


class ClusterError(UserError):
    """A Ray cluster / Jobs API / KubeRay problem the user can fix (address, auth, job id)."""


class StopReason(str, enum.Enum):
    """Why a run ended before its step budget; the exit code of `maskclip run` follows it."""

    SIGNAL = "signal"  # SIGTERM / `maskclip stop`: checkpointed, a rerun resumes
    INTERRUPT = "interrupt"  # SIGINT (Ctrl-C): checkpointed, a rerun resumes
    DATA = "data"  # too many bad rows
    NONFINITE = "nonfinite"  # a NaN/inf loss with optim.on_nonfinite=stop
    FAILED = "failed"  # workers failed past checkpoint.max_failures, or every trial of a sweep
    CHECKPOINT = "checkpoint"  # a checkpoint could not be written (disk full): the last one stays

    @property
    def exit_code(self) -> int:
        return {
            "signal": 143,
            "interrupt": 130,
            "data": 2,
            "nonfinite": 1,
            "failed": 1,
            "checkpoint": 1,
        }[self.value]


class RunStopped(Exception):
    """The run ended early for `reason`; `message` is the one line the CLI prints."""

    def __init__(self, reason: StopReason, message: str):
        super().__init__(message)
        self.reason = reason

    @property
    def exit_code(self) -> int:
        return self.reason.exit_code
