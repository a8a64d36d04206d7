"""The terminal belongs to the product: its lines on stdout (warnings and errors on stderr), Ray's
own logs in a file under the run folder.

- `maskclip` logger: every product line of the driver goes through it (`log = get_logger(...)`);
  `configure(verbosity)` is called once by `service.cli.main` (-q: warnings only, -v: debug and
  Ray's own output back on the terminal). Imported here alone, it still prints at INFO, so a
  test or script that calls `run_job` directly sees the same lines as `maskclip run`.
- Ray: `route_ray(path)` sends Ray's driver-side loggers (`ray`, `ray.data`, `ray.train`, ...)
  and Python warnings raised inside Ray to `path`; an ERROR record still surfaces as one line.
  `route_worker_output()` takes over Ray's log_to_driver printing: a worker's stdout is the
  product's (train_loop.py's step, validation and warning lines: Ray's own loggers in workers
  write to stderr) and reaches the terminal without Ray's `(pid=...)` prefix; a worker's stderr
  (Ray Data execution plans, core_worker lines, deprecation warnings) goes to the file.
- Progress: on a terminal, the rank-0 `step N/M ...` lines drive a tqdm bar whose ETA is the
  average over the run (smoothing=0: validation and checkpoint pauses are part of it); off a
  terminal the lines are printed as they come, so logs and tests keep `step N/M`.

Nothing here imports ray at module level: the CLI imports it for `--help`.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from pathlib import Path

ROOT = "maskclip"
RESULT = 25
"""The level of a command's results (a run's summary, a sweep's table): shown under -q too."""
logging.addLevelName(RESULT, "RESULT")
RAY_LOG = "ray.log"
"""The file, in the run's output folder, that receives Ray's own log lines."""

_STEP = re.compile(r"^step (\d+)/(\d+)\s+(.*)$")
_lock = threading.RLock()  # a signal handler may log while its thread holds it
_state: dict = {"verbosity": 0, "ray_file": None, "ray_path": None, "bar": None, "stderr": False}


def get_logger(name: str) -> logging.Logger:
    """The product logger of a module: `get_logger(__name__)` -> maskclip.service.trainer."""
    return logging.getLogger(f"{ROOT}.{name}")


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.levelno >= logging.ERROR:
            return f"error: {msg}"
        if record.levelno >= logging.WARNING:
            return f"warning: {msg}"
        return msg


class _Std(logging.Handler):
    """INFO and below to sys.stdout, WARNING and above to sys.stderr, each looked up when the
    record is written (pytest's capsys and redirect_stdout replace them). `to_stdout` (the
    worker's handler) writes every level to stdout: only a worker's stdout is the product's."""

    def __init__(self, to_stdout: bool = False) -> None:
        super().__init__()
        self.to_stdout = to_stdout
        self.setFormatter(_Format())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            err = (record.levelno >= logging.WARNING and not self.to_stdout) or _state["stderr"]
            _write(text, sys.stderr if err else sys.stdout)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def _write(text: str, stream) -> None:
    bar = _state["bar"]
    with _lock:
        if bar is not None and stream is sys.stdout:
            bar.write(text, file=stream)
        else:
            stream.write(text + "\n")
            stream.flush()


def configure(verbosity: int = 0, *, worker: bool = False) -> None:
    """Set up the `maskclip` logger once (idempotent): verbosity -1 (--quiet) shows results,
    warnings and errors, 0 the product's lines, 1 (-v) debug lines and Ray's own output."""
    _state["verbosity"] = verbosity
    _state["stderr"] = False
    logger = logging.getLogger(ROOT)
    for h in list(logger.handlers):
        if isinstance(h, _Std):
            logger.removeHandler(h)
    logger.addHandler(_Std(to_stdout=worker))
    logger.setLevel(RESULT if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO)
    logger.propagate = False


def stdout_for_data() -> None:
    """Keep stdout for a command's data (--json): every product line goes to stderr."""
    _state["stderr"] = True


def verbosity() -> int:
    return _state["verbosity"]


# --- Ray's own output ---------------------------------------------------------------------


class _RayHandler(logging.Handler):
    """Ray's driver-side log records: to the run's ray.log; an ERROR as one line on stderr."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _to_ray_file(self.format(record))
            if record.levelno >= logging.ERROR:
                lines = record.getMessage().strip().splitlines() or [""]
                where = _state["ray_path"]
                more = f" (details: {where})" if where else ""
                _write(f"ray error: {lines[0][:300]}{more}", sys.stderr)
        except Exception:  # noqa: BLE001
            self.handleError(record)


_RAY_HANDLER = _RayHandler()


def to_ray_log(text: str) -> None:
    """Append `text` to the run's ray.log (nothing before a run routes Ray's lines there)."""
    _to_ray_file(text)


def _to_ray_file(text: str) -> None:
    f = _state["ray_file"]
    if f is None:
        return
    with _lock:
        f.write(text.rstrip("\n") + "\n")
        f.flush()


def ray_log_path() -> Path | None:
    """The file Ray's own lines go to now (None: the terminal, under -v or before a run)."""
    return _state["ray_path"]


def route_ray(path: Path) -> Path | None:
    """From now on, Ray's own log lines go to `path` (appended), unless -v asked for them on the
    terminal. Call again after importing more of Ray: its libraries configure their loggers
    when first imported. Returns the path, or None under -v."""
    if _state["verbosity"] > 0:
        return None
    path = Path(path)
    if _state["ray_path"] != path:
        path.parent.mkdir(parents=True, exist_ok=True)
        old, _state["ray_file"] = _state["ray_file"], open(path, "a", encoding="utf-8")  # noqa: SIM115
        _state["ray_path"] = path
        if old is not None:
            old.close()
    _route_ray_loggers()
    logging.captureWarnings(True)
    warn_logger = logging.getLogger("py.warnings")
    if _WARNINGS not in warn_logger.handlers:
        warn_logger.addHandler(_WARNINGS)
        warn_logger.propagate = False
    return path


def _route_ray_loggers() -> None:
    names = ["ray"] + [
        n
        for n, lg in logging.root.manager.loggerDict.items()
        if n.startswith("ray.") and isinstance(lg, logging.Logger)
    ]
    for name in names:
        logger = logging.getLogger(name)
        console = [
            h
            for h in logger.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
        ]
        for h in console:
            logger.removeHandler(h)
        if (console or name == "ray") and _RAY_HANDLER not in logger.handlers:
            logger.addHandler(_RAY_HANDLER)


class _Warnings(logging.Handler):
    """Python warnings (logging.captureWarnings): those raised inside Ray go to ray.log, the
    others (ours, torch's ...) stay on stderr as before."""

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if "/ray/" in text.split(":", 1)[0]:
            _to_ray_file(text)
        else:
            _write(text.rstrip("\n"), sys.stderr)


_WARNINGS = _Warnings()


def route_worker_output() -> bool:
    """Replace Ray's log_to_driver printer (after ray.init): worker stdout -> the terminal as the
    product's lines, worker stderr -> ray.log, raylet/autoscaler events -> stderr (an OOM kill
    needs the user's action). Under -v Ray's printer stays. False if Ray's printer was not found
    (then Ray prints as it always did)."""
    if _state["verbosity"] > 0:
        return False
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # pragma: no cover - a Ray without the dispatcher
        return False
    names = [name for name, _ in getattr(dispatcher, "handlers", [])]
    if "ray_print_logs" not in names:
        return False
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", _on_worker_output)
    return True


def _on_worker_output(data: dict) -> None:
    lines = data.get("lines") or []
    pid = data.get("pid")
    if pid in ("raylet", "autoscaler"):
        for line in lines:
            _to_ray_file(f"({pid}) {line}")
        if pid == "autoscaler":  # its status reports go to the file, its events (as Ray does)
            lines = _autoscaler_events(lines)
        for line in lines:
            if line.strip():
                _write(f"ray: {line.strip()}", sys.stderr)
        return
    if data.get("is_err"):
        who = data.get("actor_name") or data.get("task_name") or ""
        prefix = f"({who} pid={pid})".replace("( ", "(")
        for line in lines:
            _to_ray_file(f"{prefix} {line}")
        return
    for line in lines:
        product_line(line)


def _autoscaler_events(lines: list[str]) -> list[str]:
    """The events among the autoscaler's lines (Ray's own filter; it asks the cluster which
    autoscaler runs, so none are known while Ray is not connected)."""
    import ray
    from ray._private.worker import filter_autoscaler_events

    if not ray.is_initialized():
        return []
    return [e for e in filter_autoscaler_events(lines) if not e.startswith("Tip: ")]


# --- progress ---------------------------------------------------------------------------


def product_line(line: str) -> None:
    """A rank-0 line of the training loop: `step N/M ...` drives the progress bar on a terminal;
    every other line (validation, warnings, resume) is printed above it."""
    if _state["verbosity"] < 0 and not line.startswith(("warning:", "error:")):
        return  # -q: the worker's warnings only
    m = _STEP.match(line)
    if m is None or not _is_tty():
        _write(line, sys.stdout)
        return
    step, total, rest = int(m.group(1)), int(m.group(2)), m.group(3)
    bar = _state["bar"]
    if bar is None or bar.total != total:
        from tqdm import tqdm

        bar = tqdm(
            total=total,
            initial=step,
            unit="step",
            smoothing=0,  # ETA from the average over the run, not the last window
            dynamic_ncols=True,
            file=sys.stdout,
        )
        _state["bar"] = bar
    else:
        bar.update(step - bar.n)
    bar.set_postfix_str(rest.split("  ETA")[0].replace("  ", ", "), refresh=True)


def end_progress() -> None:
    """Close the progress bar (the summary prints below it)."""
    bar, _state["bar"] = _state["bar"], None
    if bar is not None:
        bar.close()


def _is_tty() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def phase(message: str) -> None:
    """A start-up phase (tokenizer training, row counting, Ray start): printed before it runs."""
    logging.getLogger(ROOT).info(message)


# the product's lines print even when nothing called configure() (a script, a test)
if not any(isinstance(h, _Std) for h in logging.getLogger(ROOT).handlers):
    configure(0)
