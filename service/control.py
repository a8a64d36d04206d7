"""A small named Ray actor per run: the driver's stop flag and the data pipeline's row counts.

Ray Data's decode tasks `add` their row counts; the driver sets the stop flag on SIGTERM/SIGINT;
rank 0's `StopWatcher` polls the actor from a thread (never from the training step) and sets the
flag itself when too many rows are bad.
"""

from __future__ import annotations

import threading

import ray

from .errors import StopReason

MIN_ROWS_FOR_BAD_FRACTION = 50
"""The bad-row fraction is judged only once this many rows were seen (noise on tiny samples)."""
POLL_S = 0.5
"""How often rank 0's watcher asks the control actor for the stop flag and the row counts."""


class RunControl:
    def __init__(self) -> None:
        self.rows_seen = 0
        self.rows_bad = 0
        self.rows_not_downloaded = 0  # img2dataset's failed downloads: not data, not bad
        self.reasons: dict[str, int] = {}
        self.stop_reason: StopReason | None = None
        self.detail = ""

    # --- data statistics
    def add(
        self,
        total: int,
        bad: int,
        reasons: dict[str, int] | None = None,
        not_downloaded: int = 0,
    ) -> None:
        """`total` rows read, of which `bad` could not be used and `not_downloaded` were failed
        downloads (service.rows.not_downloaded; not among the bad)."""
        self.rows_seen += total
        self.rows_bad += bad
        self.rows_not_downloaded += not_downloaded
        for k, v in (reasons or {}).items():
            self.reasons[k] = self.reasons.get(k, 0) + v

    def get(self) -> dict:
        return {
            "rows_seen": self.rows_seen,
            "rows_bad": self.rows_bad,
            "rows_not_downloaded": self.rows_not_downloaded,
            "bad_reasons": self.reasons,
        }

    def too_many_bad(self, max_bad_fraction: float) -> bool:
        """Judged on the downloaded rows only: failed downloads never count."""
        seen = self.rows_seen - self.rows_not_downloaded
        return seen >= MIN_ROWS_FOR_BAD_FRACTION and self.rows_bad / seen > max_bad_fraction

    # --- which worker group is the live one (a lost node makes Ray start a new one)
    def new_generation(self) -> int:
        self.generation = getattr(self, "generation", 0) + 1
        return self.generation

    def current_generation(self) -> int:
        return getattr(self, "generation", 0)

    # --- stopping
    def request_stop(self, reason: StopReason, detail: str = "") -> None:
        if self.stop_reason is None:
            self.stop_reason, self.detail = StopReason(reason), detail

    def should_stop(self) -> bool:
        return self.stop_reason is not None

    def reason(self) -> tuple[StopReason | None, str]:
        return self.stop_reason, self.detail


def control_actor(name: str, create: bool = False):
    if create:
        return (
            ray.remote(RunControl)
            .options(name=name, get_if_exists=True, num_cpus=0, max_concurrency=4)
            .remote()
        )
    return ray.get_actor(name)


def bad_rows_message(stats: dict, max_bad_fraction: float) -> str:
    """One line: how many rows could not be used, by reason, against the allowed fraction."""
    reasons = sorted(stats["bad_reasons"].items(), key=lambda kv: (-kv[1], kv[0]))
    detail = ", ".join(f"{k}: {v}" for k, v in reasons)
    missing = stats.get("rows_not_downloaded", 0)
    seen = stats["rows_seen"] - missing
    pct = 100 * stats["rows_bad"] / max(1, seen)
    rows = f"{seen} downloaded rows" if missing else f"{seen} rows"
    return (
        f"data.train: {stats['rows_bad']} of {rows} ({pct:.1f}%) could not be used ({detail}); "
        f"data.max_bad_fraction is {max_bad_fraction:g}"
    )


class StopWatcher:
    """Rank 0: a daemon thread that polls the control actor every POLL_S seconds, so the
    training step reads a plain flag (`stop_requested`) and never waits on an actor call.
    It also stops the run once more than `max_bad_fraction` of the rows seen were bad."""

    def __init__(self, control, max_bad_fraction: float):
        self.control = control
        self.max_bad_fraction = max_bad_fraction
        self.stats = {"rows_seen": 0, "rows_bad": 0, "rows_not_downloaded": 0, "bad_reasons": {}}
        self.reason: StopReason | None = None
        self._stop = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="maskclip-stop-watcher", daemon=True)
        self._thread.start()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def _run(self) -> None:
        while not self._done.wait(POLL_S):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - the actor going away ends the run anyway
                return

    def poll(self) -> None:
        self.stats = ray.get(self.control.get.remote())
        if not self._stop.is_set() and ray.get(
            self.control.too_many_bad.remote(self.max_bad_fraction)
        ):
            message = bad_rows_message(self.stats, self.max_bad_fraction)
            ray.get(self.control.request_stop.remote(StopReason.DATA, message))
        if ray.get(self.control.should_stop.remote()):
            self.reason, _ = ray.get(self.control.reason.remote())
            self._stop.set()

    def close(self) -> None:
        self._done.set()
