"""Run job specs on a running Ray cluster through the Ray Jobs API (the dashboard, port 8265).

    job_id = submit("jobs/s3.yaml", ["optim.max_steps=2000"], "http://127.0.0.1:8265")
    status(job_id, address); logs(job_id, address, follow=True); stop(job_id, address)
    list_jobs(address)

* The spec is validated locally first; only the resolved spec (``job.yaml``) travels, in a
  temporary working dir: the cluster image already has the project installed. ``working_dir=``
  ships the repository too (dev clusters), run as ``python -m service.cli`` from that copy: a
  clean copy of ``shipped_files(repo)`` (no ``.git``, ``.venv``, ``.terraform``, ``.env``,
  Terraform state, keys or credential files; symlinks never followed).
* Submission ids derive from ``run.name`` and a hash of what is shipped, so submitting the same
  spec again returns the job already PENDING / RUNNING / SUCCEEDED instead of starting a second
  one; after a FAILED / STOPPED job the next submission gets ``-2``, ``-3``, ... (the same run
  name resumes from its last checkpoint).
* Only non-secret settings travel as environment variables (MLFLOW_TRACKING_URI,
  AWS_ENDPOINT_URL, AWS_REGION, AWS_DEFAULT_REGION); credentials come from the cluster's own
  identity (service account) — never from here.
* Plain ``http://`` is refused to non-loopback hosts (the job, and any Ray auth token, would travel
  in clear) unless ``allow_insecure=True``.
* Ray token auth: ``RAY_AUTH_MODE=disabled`` sends nothing; otherwise the token from
  ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token`` (Ray's own lookup order) is
  sent as an ``Authorization: Bearer`` header. Tokens are never printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import hashlib
import ipaddress
import os
import socket
import stat
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import urlsplit

from .errors import UserError
from .spec import JobSpec, SpecError, build_spec, load_spec

if TYPE_CHECKING:  # ray is imported lazily: `maskclip validate` / `render` must not pay for it
    from ray.job_submission import JobDetails, JobSubmissionClient

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
SPEC_FILE = "job.yaml"
DEFAULT_ENTRYPOINT = f"maskclip run {SPEC_FILE}"
DEV_ENTRYPOINT = f"python -m service.cli run {SPEC_FILE}"
SKIP_DIRS = frozenset(
    {".git", ".venv", "venv", ".terraform", "__pycache__", ".pytest_cache", ".ruff_cache"}
    | {".mypy_cache", "node_modules"}
)
"""Folders never shipped by ``--working-dir``, at any depth (state, environments, VCS)."""
SKIP_TOP_DIRS = frozenset({"data", "runs", "mlruns", "mlartifacts", "build", "dist"})
"""Folders of local data and outputs, skipped at the top of the working dir only."""
SECRET_FILES = (
    ".env",
    ".env.*",
    "*.tfstate",
    "*.tfstate.*",
    "id_rsa*",
    "id_dsa*",
    "id_ecdsa*",
    "id_ed25519*",
    "*.pem",
    "*.key",
    "credentials*",
)
"""File names never shipped (fnmatch, any depth): env files, Terraform state (it holds secrets
in clear), SSH and TLS keys, cloud credential files. `.gitignore` and `.dockerignore` list the
same (tests/service/test_cluster.py checks that they agree)."""
SKIP_FILES = SECRET_FILES + ("*.pyc", "mlflow.db")
RAY_EXCLUDES = [*(f"{d}/" for d in sorted(SKIP_DIRS)), *SECRET_FILES]
"""The same rules as Ray ``excludes`` (gitignore syntax): a second fence around the clean copy."""
PASSTHROUGH_ENV = ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION")
STOP_GRACE_S = 120
"""Seconds between SIGTERM and SIGKILL when a job is stopped (the run checkpoints on SIGTERM)."""

ACTIVE = frozenset({"PENDING", "RUNNING"})
REUSABLE = ACTIVE | {"SUCCEEDED"}
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
CONNECT_TIMEOUT_S = 5.0


# ---------------------------------------------------------------- addresses and auth


def _one_line(text: Any) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return lines[0] if lines else type(text).__name__


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_address(address: str, allow_insecure: bool = False) -> str:
    """Validate a Jobs API URL and return it normalized (no trailing slash).

    Accepts ``http(s)://host[:port][/prefix]``. Plain ``http://`` to a host other than loopback is
    refused unless ``allow_insecure``; ``ray://`` (Ray Client) is not the Jobs API."""
    text = (address or "").strip().rstrip("/")
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme == "ray":
        raise UserError(
            f"{text}: ray:// (Ray Client) addresses are not supported; use the Jobs API URL "
            "http(s)://HOST:8265 (the dashboard port)"
        )
    if scheme not in ("http", "https") or not parts.hostname:
        raise UserError(
            f"{text or '(empty)'}: expected a Jobs API URL like http://127.0.0.1:8265 "
            "(http(s)://HOST:PORT, the Ray dashboard port)"
        )
    try:
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        raise UserError(f"{text}: malformed port in the Jobs API URL") from None
    if parts.username or parts.password:
        raise UserError(f"{parts.hostname}: put no credentials in the address")
    if parts.query or parts.fragment:
        raise UserError(f"{text}: the Jobs API URL takes no query or fragment")
    if scheme == "http" and not _is_loopback(parts.hostname) and not allow_insecure:
        raise UserError(
            f"refusing plain http:// to {parts.hostname}: the job (and any Ray token) would travel "
            "unencrypted; use https://, a port-forward to localhost (kubectl -n maskclip "
            "port-forward svc/maskclip-head-svc 8265), or --allow-insecure-http"
        )
    return f"{scheme}://{parts.netloc}{parts.path}"


def resolve_address(address: str | None = None) -> str:
    """``address``, else ``$RAY_ADDRESS``, else http://127.0.0.1:8265."""
    if address:
        return address
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if env:
        if not env.lower().startswith(("http://", "https://")):
            raise UserError(
                f"RAY_ADDRESS={env} is not a Jobs API URL (expected http(s)://HOST:8265); "
                "pass --address"
            )
        return env
    return DEFAULT_ADDRESS


def _read_token(env: dict[str, str]) -> str | None:
    if env.get("RAY_AUTH_TOKEN", "").strip():
        return env["RAY_AUTH_TOKEN"].strip()
    path = env.get("RAY_AUTH_TOKEN_PATH", "").strip()
    candidates = [Path(path).expanduser()] if path else [Path.home() / ".ray" / "auth_token"]
    for p in candidates:
        try:
            token = p.read_text(encoding="utf-8").strip()
        except OSError:
            continue
        if token:
            return token
    return None


def auth_headers(env: dict[str, str] | None = None) -> dict[str, str]:
    """The Authorization header for a token-auth Ray cluster ({} when none applies).

    Mirrors Ray 2.60's own client: ``RAY_AUTH_MODE=disabled`` → none; ``token`` → required;
    unset → sent when a token exists. The header value is never printed or logged."""
    env = dict(os.environ) if env is None else env
    mode = env.get("RAY_AUTH_MODE", "").strip().lower()
    if mode == "disabled":
        return {}
    token = _read_token(env)
    if not token:
        if mode == "token":
            raise UserError(
                "RAY_AUTH_MODE=token but no Ray token found: set RAY_AUTH_TOKEN or "
                "RAY_AUTH_TOKEN_PATH, or write it to ~/.ray/auth_token"
            )
        return {}
    return {"Authorization": f"Bearer {token}"}


def _precheck_tcp(address: str) -> None:
    """Fail fast (seconds, not a hung request) when nothing listens at the address."""
    parts = urlsplit(address)
    if urllib.request.getproxies().get(parts.scheme):
        return  # the request goes through a proxy: a direct connect says nothing
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as e:
        reason = e.strerror or _one_line(e) or type(e).__name__
        raise UserError(f"cannot reach the Ray Jobs API at {address}: {reason}") from None


@contextlib.contextmanager
def _api_errors(address: str, job_id: str | None = None) -> Iterator[None]:
    """Turn Ray SDK / HTTP failures into one-line UserErrors."""
    import requests

    try:
        from ray.exceptions import AuthenticationError
    except ImportError:  # pragma: no cover - older Ray
        AuthenticationError = RuntimeError  # noqa: N806

    try:
        yield
    except AuthenticationError as e:
        what = "rejected the token" if "failed" in str(e).lower() else "requires a token"
        raise UserError(
            f"the Ray Jobs API at {address} {what}: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH "
            "(or ~/.ray/auth_token) to the cluster's token"
        ) from None
    except (requests.RequestException, OSError) as e:
        raise UserError(f"cannot reach the Ray Jobs API at {address}: {_one_line(e)}") from None
    except RuntimeError as e:
        text = str(e)
        if job_id and "404" in text:
            raise UserError(f"no job {job_id} on the Ray cluster at {address}") from None
        raise UserError(f"the Ray Jobs API at {address} failed: {_one_line(text)}") from None


def connect(address: str | None = None, allow_insecure: bool = False) -> JobSubmissionClient:
    """A JobSubmissionClient for a checked address (connection and Ray version checked)."""
    url = check_address(resolve_address(address), allow_insecure)
    headers = auth_headers()
    _precheck_tcp(url)
    from ray.job_submission import JobSubmissionClient

    with _api_errors(url):
        try:
            return JobSubmissionClient(url, headers=headers)
        except ConnectionError as e:
            raise UserError(f"cannot reach the Ray Jobs API at {url}: {_one_line(e)}") from None


def _client_address(client: JobSubmissionClient) -> str:
    return getattr(client, "_address", "the cluster")


# ---------------------------------------------------------------- spec → submission


def for_cluster(spec: JobSpec) -> JobSpec:
    """The spec as it runs on a cluster: join the cluster's Ray (``scaling.ray_address: auto``)
    instead of starting an embedded one."""
    if spec.scaling.ray_address:
        return spec
    scaling = spec.scaling.model_copy(update={"ray_address": "auto"})
    return spec.model_copy(update={"scaling": scaling})


def shipped_yaml(spec: JobSpec) -> str:
    """The YAML that travels to the cluster as ``job.yaml``: the fully resolved spec, checked to
    load back (a spec that only fails on the cluster is a slow failure). Should the full dump not
    load back, the equivalent dump without default values is shipped instead."""
    import yaml

    full = spec.to_yaml()
    try:
        build_spec(yaml.safe_load(full))
        return full
    except SpecError:
        pass
    minimal = yaml.safe_dump(spec.model_dump(mode="json", exclude_defaults=True), sort_keys=False)
    build_spec(yaml.safe_load(minimal))  # raises SpecError if even this cannot load
    return minimal


def cluster_warnings(spec: JobSpec) -> list[str]:
    """Things that work locally but not on a (multi-node) cluster."""
    out = []
    for field in ("train", "val"):
        uri = getattr(spec.data, field)
        if uri and "://" not in uri:
            out.append(
                f"data.{field} is a local path ({uri}); every cluster node must see it "
                "(use s3://... on a real cluster)"
            )
    storage = spec.checkpoint.storage_path
    if not storage or "://" not in storage:
        out.append(
            "checkpoint.storage_path is local; multi-node runs need shared storage "
            "(s3://bucket/prefix) to checkpoint and resume"
        )
    return out


def _digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()


def submission_id(spec: JobSpec, *, entrypoint: str | None = None, extra: str = "") -> str:
    """``maskclip-<run.name>-<8 hex>``: the hash covers the resolved (cluster) spec, the
    entrypoint and ``extra`` (a digest of shipped code), so the same submission maps to the same
    id."""
    spec = for_cluster(spec)
    digest = _digest(shipped_yaml(spec), entrypoint or DEFAULT_ENTRYPOINT, extra)
    return f"maskclip-{spec.run.name}-{digest[:8]}"


def job_env(address: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """Non-secret settings passed to the job: a fixed allow-list, never credentials.

    Values pointing at the submitting machine (localhost, sqlite:///, file:) are dropped when
    the cluster is remote: they would mean something else there."""
    env = dict(os.environ) if env is None else env
    remote = not _is_loopback(urlsplit(address).hostname or "")
    out = {}
    for name in PASSTHROUGH_ENV:
        value = env.get(name, "").strip()
        if not value:
            continue
        if remote and _is_local_value(value):
            print(
                f"note: not passing {name}={value} to the remote cluster (it points at this "
                "machine)",
                file=sys.stderr,
            )
            continue
        out[name] = value
    return out


def _is_local_value(value: str) -> bool:
    low = value.lower()
    if low.startswith(("sqlite:", "file:", "/", "./")):
        return True
    host = urlsplit(value).hostname
    return bool(host) and _is_loopback(host)


def runtime_env(
    working_dir: str | Path,
    address: str,
    *,
    excludes: list[str] | None = None,
    stop_grace_s: int = STOP_GRACE_S,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    env_vars = job_env(address, env)
    # Read by Ray's JobSupervisor (it runs in the job's runtime env): SIGTERM, then this long
    # before SIGKILL, so the run can write its last checkpoint.
    env_vars["RAY_JOB_STOP_WAIT_TIME_S"] = str(int(stop_grace_s))
    out: dict[str, Any] = {"working_dir": str(working_dir), "env_vars": env_vars}
    if excludes:
        out["excludes"] = list(excludes)
    return out


def _skipped_file(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in SKIP_FILES)


def shipped_files(repo: Path, links: list[str] | None = None) -> list[str]:
    """The files ``submit --working-dir repo`` ships, as sorted POSIX paths relative to repo.

    Skipped: SKIP_DIRS at any depth, SKIP_TOP_DIRS at the top, SKIP_FILES (secrets, bytecode),
    ``*.egg-info`` folders, anything not a regular file. Symlinks (files or folders) are never
    followed: a link to ``~/.aws`` or ``/etc`` would ship what it points at; their paths are
    appended to ``links`` when given."""
    out: list[str] = []
    for folder, dirs, files in os.walk(repo, followlinks=False):
        here = Path(folder)
        top = here == repo
        kept = []
        for d in sorted(dirs):
            rel = (here / d).relative_to(repo).as_posix()
            if (here / d).is_symlink():
                if links is not None:
                    links.append(rel)
            elif not (d in SKIP_DIRS or d.endswith(".egg-info") or (top and d in SKIP_TOP_DIRS)):
                kept.append(d)
        dirs[:] = kept
        for name in sorted(files):
            path = here / name
            rel = path.relative_to(repo).as_posix()
            if path.is_symlink():
                if links is not None:
                    links.append(rel)
            elif not _skipped_file(name) and stat.S_ISREG(path.lstat().st_mode):
                out.append(rel)
    return sorted(out)


def _stage(spec_yaml: str, repo: Path | None, dest: Path) -> str:
    """Fill ``dest`` (the job's working dir) and return a digest of its code (repo only).

    With a repo, ``dest`` is a clean copy of exactly ``shipped_files(repo)``; each file is opened
    with O_NOFOLLOW, so a file swapped for a link after listing is refused, not followed."""
    h = hashlib.sha256()
    dest.mkdir(parents=True, exist_ok=True)
    if repo is not None:
        if not repo.is_dir():
            raise UserError(f"--working-dir {repo}: no such directory")
        links: list[str] = []
        for rel in shipped_files(repo, links):
            try:
                fd = os.open(repo / rel, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            except OSError as e:
                raise UserError(f"--working-dir {repo}: cannot read {rel}: {e.strerror}") from None
            with os.fdopen(fd, "rb") as f:
                content = f.read()
                mode = os.fstat(f.fileno()).st_mode & 0o755
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
            target.chmod(mode | 0o600)
            h.update(rel.encode() + b"\0" + content + b"\0")
        if links:
            shown = ", ".join(links[:5]) + (", ..." if len(links) > 5 else "")
            print(
                f"note: --working-dir: not shipping {len(links)} symlink(s) (links are never "
                f"followed): {shown}",
                file=sys.stderr,
            )
    (dest / SPEC_FILE).write_text(spec_yaml, encoding="utf-8")
    return h.hexdigest() if repo is not None else ""


def _job_info(client: JobSubmissionClient, job_id: str) -> JobDetails | None:
    """The job's details, or None when no job has that id."""
    try:
        return client.get_job_info(job_id)
    except RuntimeError as e:
        if "404" in str(e) or "does not exist" in str(e).lower():
            return None
        raise


def _status(info: JobDetails) -> str:
    return getattr(info.status, "value", str(info.status))


def submit(
    spec_path: str | Path,
    overrides: list[str] | None = None,
    address: str | None = None,
    allow_insecure: bool = False,
    wait: bool = False,
    *,
    working_dir: str | Path | None = None,
    entrypoint: str | None = None,
    stop_grace_s: int = STOP_GRACE_S,
    out: TextIO | None = None,
) -> str:
    """Submit a spec to a Ray cluster; return the submission id (an existing one when the same
    spec is already PENDING / RUNNING / SUCCEEDED).

    ``entrypoint`` (advanced/tests) replaces ``maskclip run job.yaml``; it runs in the job's
    working dir, where ``job.yaml`` is. ``wait`` follows the logs until the job ends."""
    out = out or sys.stdout
    spec = for_cluster(load_spec(spec_path, overrides or []))
    url = check_address(resolve_address(address), allow_insecure)
    for warning in cluster_warnings(spec):
        print(f"warning: {warning}", file=sys.stderr)
    repo = Path(working_dir).resolve() if working_dir else None
    command = entrypoint or (DEV_ENTRYPOINT if repo else DEFAULT_ENTRYPOINT)
    client = connect(url, allow_insecure)
    name = spec.run.name

    with tempfile.TemporaryDirectory(prefix="maskclip-submit-") as tmp:
        stage = Path(tmp) / "job"
        code_digest = _stage(shipped_yaml(spec), repo, stage)
        base = submission_id(spec, entrypoint=command, extra=code_digest)
        renv = runtime_env(
            stage,
            url,
            excludes=RAY_EXCLUDES if repo else None,
            stop_grace_s=stop_grace_s,
        )
        with _api_errors(url):
            job_id = None
            for attempt in range(1, 100):
                candidate = base if attempt == 1 else f"{base}-{attempt}"
                info = _job_info(client, candidate)
                if info is None:
                    try:
                        job_id = client.submit_job(
                            entrypoint=command,
                            submission_id=candidate,
                            runtime_env=renv,
                            metadata={"maskclip_run": name},
                        )
                    except RuntimeError as e:
                        if "already exists" not in str(e):
                            raise
                        info = _job_info(client, candidate)  # lost a race: look again
                        if info is None:
                            raise
                    else:
                        print(f"submitted {job_id} (run {name}) to {url}", file=out)
                        break
                state = _status(info)
                if state in REUSABLE:
                    job_id = candidate
                    print(
                        f"job {job_id} (run {name}) is already {state} on {url}; "
                        "not submitting it again",
                        file=out,
                    )
                    break
            else:
                raise UserError(f"run {name}: 99 submissions of this spec ended FAILED/STOPPED")

    print(f"  maskclip logs {job_id} --address {url} --follow", file=out)
    if wait:
        _follow(client, job_id, url, out)
        final = _wait_terminal(client, job_id, url, timeout_s=60)
        print(f"job {job_id}: {final}", file=out)
    return job_id


# ---------------------------------------------------------------- status, logs, stop, list


def _fmt_time(ms: int | None) -> str:
    if not ms:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))


def job_status(job_id: str, address: str | None = None, *, allow_insecure: bool = False) -> str:
    """The job's status string (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
    client = connect(address, allow_insecure)
    url = _client_address(client)
    with _api_errors(url, job_id):
        return _status(client.get_job_info(job_id))


def status(
    job_id: str,
    address: str | None = None,
    *,
    allow_insecure: bool = False,
    out: TextIO | None = None,
) -> JobDetails:
    """Print and return the job's details."""
    out = out or sys.stdout
    client = connect(address, allow_insecure)
    url = _client_address(client)
    with _api_errors(url, job_id):
        info = client.get_job_info(job_id)
    meta = info.metadata or {}
    rows = [
        ("job", info.submission_id or info.job_id),
        ("run", meta.get("maskclip_run", "-")),
        ("status", _status(info)),
        ("message", info.message or "-"),
        ("entrypoint", info.entrypoint),
        ("start", _fmt_time(info.start_time)),
        ("end", _fmt_time(info.end_time)),
    ]
    for key, value in rows:
        print(f"{key + ':':<12}{value}", file=out)
    return info


def _follow(client: JobSubmissionClient, job_id: str, url: str, out: TextIO) -> None:
    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    import aiohttp

    with _api_errors(url, job_id):
        try:
            asyncio.run(tail())
        except aiohttp.ClientError as e:
            raise UserError(f"lost the log stream from {url}: {_one_line(e)}") from None


def logs(
    job_id: str,
    address: str | None = None,
    follow: bool = False,
    *,
    allow_insecure: bool = False,
    out: TextIO | None = None,
) -> str:
    """Print the job's logs (``follow``: stream them until the job ends). Returns the full text
    when not following, else ''."""
    out = out or sys.stdout
    client = connect(address, allow_insecure)
    url = _client_address(client)
    with _api_errors(url, job_id):
        client.get_job_info(job_id)  # a clear "no job X" before streaming
        if follow:
            _follow(client, job_id, url, out)
            return ""
        text = client.get_job_logs(job_id)
    out.write(text)
    out.flush()
    return text


def _wait_terminal(
    client: JobSubmissionClient, job_id: str, url: str, timeout_s: float, poll_s: float = 0.5
) -> str:
    deadline = time.monotonic() + timeout_s
    with _api_errors(url, job_id):
        while True:
            state = _status(client.get_job_info(job_id))
            if state in TERMINAL or time.monotonic() >= deadline:
                return state
            time.sleep(poll_s)


def stop(
    job_id: str,
    address: str | None = None,
    *,
    allow_insecure: bool = False,
    timeout_s: float = STOP_GRACE_S + 30,
    out: TextIO | None = None,
) -> str:
    """Stop a job gracefully (SIGTERM: the run checkpoints and exits; SIGKILL after the job's
    grace period) and wait for it to end; print and return the final status."""
    out = out or sys.stdout
    client = connect(address, allow_insecure)
    url = _client_address(client)
    with _api_errors(url, job_id):
        state = _status(client.get_job_info(job_id))
        if state in TERMINAL:
            print(f"job {job_id} already {state}", file=out)
            return state
        client.stop_job(job_id)
    print(f"stopping {job_id} (SIGTERM; the run checkpoints before it exits) ...", file=out)
    final = _wait_terminal(client, job_id, url, timeout_s)
    if final in TERMINAL:
        print(f"job {job_id}: {final}", file=out)
    else:
        print(f"job {job_id}: still {final} after {timeout_s:.0f} s", file=out)
    return final


def list_jobs(
    address: str | None = None, *, allow_insecure: bool = False, out: TextIO | None = None
) -> list[JobDetails]:
    """Print a table of submitted jobs (submission id, run name, status, start time), oldest
    first; return their details."""
    out = out or sys.stdout
    client = connect(address, allow_insecure)
    url = _client_address(client)
    with _api_errors(url):
        jobs = [j for j in client.list_jobs() if j.submission_id]
    jobs.sort(key=lambda j: j.start_time or 0)
    rows = [("SUBMISSION ID", "RUN", "STATUS", "START")]
    for j in jobs:
        run = (j.metadata or {}).get("maskclip_run", "-")
        rows.append((j.submission_id, run, _status(j), _fmt_time(j.start_time)))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[3], file=out)
    return jobs
