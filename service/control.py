"""A small named Ray actor per run: the driver's stop flag and the data pipeline's row counts.

Ray Data's decode tasks `add` their row counts; rank 0 reads them and the stop flag (set by the
driver on SIGTERM/SIGINT, or by rank 0 itself when too many rows are bad).
"""

from __future__ import annotations

import ray


class RunControl:
    def __init__(self) -> None:
        self.rows_seen = 0
        self.rows_bad = 0
        self.reasons: dict[str, int] = {}
        self.stop_reason: str | None = None

    # --- data statistics (same interface as service.data.DataStats)
    def add(self, total: int, bad: int, reasons: dict[str, int] | None = None) -> None:
        self.rows_seen += total
        self.rows_bad += bad
        for k, v in (reasons or {}).items():
            self.reasons[k] = self.reasons.get(k, 0) + v

    def get(self) -> dict:
        return {"rows_seen": self.rows_seen, "rows_bad": self.rows_bad, "bad_reasons": self.reasons}

    def data_stats(self) -> dict:
        return self.get()

    def check_data(self, max_bad_fraction: float, min_rows: int = 50) -> bool:
        return self.rows_seen >= min_rows and self.rows_bad / self.rows_seen > max_bad_fraction

    def data_message(self) -> str:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.reasons.items()))
        pct = 100 * self.rows_bad / max(1, self.rows_seen)
        return (
            f"data.train: {self.rows_bad} of {self.rows_seen} rows ({pct:.1f}%) could not be "
            f"used ({reasons}); raise data.max_bad_fraction or fix the data"
        )

    # --- stopping
    def request_stop(self, reason: str = "signal") -> None:
        self.stop_reason = self.stop_reason or reason

    def should_stop(self) -> bool:
        return self.stop_reason is not None

    def reason(self) -> str | None:
        return self.stop_reason


def control_actor(name: str, create: bool = False):
    if create:
        return (
            ray.remote(RunControl)
            .options(name=name, get_if_exists=True, num_cpus=0, max_concurrency=4)
            .remote()
        )
    return ray.get_actor(name)
