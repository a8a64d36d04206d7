"""`maskclip submit | status | logs | stop | list` against a REAL local Ray head (Jobs API).

The head is a separate `ray start --head --block` process with its own --temp-dir and free ports,
so an in-process `ray.init(address="local")` elsewhere in the session is unaffected; teardown
ends exactly the processes it started (its process group and descendants, by pid) instead of a
machine-wide `ray stop`. RAY_ADDRESS is never written to os.environ.

The head requires Ray token auth (RAY_AUTH_MODE=token, a fresh token): every command here sends
the token from RAY_AUTH_TOKEN, set for this module only; one test shows a missing or wrong token
is a one-line error that never prints the token.
"""

from __future__ import annotations

import io
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("ray.job_submission")
requests = pytest.importorskip("requests")

from service import cluster  # noqa: E402
from service.cli import main  # noqa: E402
from service.errors import UserError  # noqa: E402
from service.spec import load_spec  # noqa: E402

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
VALIDATE = f"maskclip validate {cluster.SPEC_FILE}"
SPEC = """\
run:
  name: {name}
data:
  train: s3://maskclip-data/train/
scaling:
  num_workers: 1
checkpoint:
  storage_path: s3://maskclip-data/checkpoints
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_spec(folder: Path, name: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(SPEC.format(name=name))
    return path


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


@pytest.fixture(scope="module")
def ray_token():
    """A fresh Ray auth token, in RAY_AUTH_TOKEN for this module's clients only."""
    token = f"mc-test-{secrets.token_hex(16)}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_TOKEN", token)
        mp.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
        yield token


@pytest.fixture(scope="module")
def ray_head(ray_token):
    """Jobs API URL of a private Ray head (2 CPUs, dashboard on 127.0.0.1, token auth on)."""
    ray_exe = shutil.which("ray", path=str(VENV_BIN)) or shutil.which("ray")
    if not ray_exe:
        pytest.skip("the `ray` CLI is not installed")
    temp_dir = tempfile.mkdtemp(prefix="mcray", dir="/tmp")  # short: unix socket paths
    dash = _free_port()
    ports = {
        "--port": _free_port(),
        "--dashboard-port": dash,
        "--dashboard-agent-listen-port": _free_port(),
        "--ray-client-server-port": _free_port(),
        "--metrics-export-port": _free_port(),
    }
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=ray_token,
        RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",  # `maskclip` for the entrypoints
    )
    cmd = [
        ray_exe,
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        "--include-dashboard=true",
        "--num-cpus=2",
        "--object-store-memory=200000000",
        f"--temp-dir={temp_dir}",
        *(f"{flag}={port}" for flag, port in ports.items()),
    ]
    log_path = Path(temp_dir) / "ray-start.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 150  # a head starts in ~10 s quiet, over 60 s at load 30+
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                auth = {"Authorization": f"Bearer {ray_token}"}
                if requests.get(f"{url}/api/jobs/", headers=auth, timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"Jobs API not up in 150 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        # SIGTERM makes the head drain for up to 30 s; these are throwaway processes of ours:
        # kill the head's process group, then any descendant in another session (job entrypoints).
        children = _descendants(proc.pid)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for child in children:
            try:
                child.kill()
            except Exception:
                pass
        proc.wait(timeout=10)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def specs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("specs")
    _write_spec(folder, "validate-me")
    _write_spec(folder, "sleeper")
    return folder


@pytest.fixture(scope="module")
def validate_job(ray_head, specs):
    """A job that runs `maskclip validate job.yaml` on the cluster, followed to its end."""
    out = io.StringIO()
    job_id = cluster.submit(
        specs / "validate-me.yaml",
        ["optim.max_steps=7"],
        ray_head,
        wait=True,
        entrypoint=VALIDATE,
        out=out,
    )
    return job_id, out.getvalue()


@pytest.fixture(scope="module")
def stopped_job(ray_head, specs):
    out = io.StringIO()
    job_id = cluster.submit(
        specs / "sleeper.yaml",
        [],
        ray_head,
        entrypoint=f"{sys.executable} -c 'import time; time.sleep(120)'",
        out=out,
    )
    deadline = time.monotonic() + 60
    while cluster.job_status(job_id, ray_head) == "PENDING" and time.monotonic() < deadline:
        time.sleep(0.3)
    before = cluster.job_status(job_id, ray_head)
    t0 = time.monotonic()
    final = cluster.stop(job_id, ray_head, timeout_s=60, out=out)
    return job_id, before, final, time.monotonic() - t0, out.getvalue()


# ---------------------------------------------------------------- against the cluster


def test_submitted_spec_runs_on_the_cluster(ray_head, validate_job):
    job_id, output = validate_job
    assert job_id.startswith("maskclip-validate-me-")
    assert cluster.job_status(job_id, ray_head) == "SUCCEEDED"
    # --wait streamed the job's own output: the spec resolved on the cluster from job.yaml
    assert "train: s3://maskclip-data/train/" in output
    assert "max_steps: 7" in output
    assert "ray_address: auto" in output  # the cluster run joins the cluster's Ray


def test_logs_and_status_cli(ray_head, validate_job, capsys):
    job_id, _ = validate_job
    assert main(["logs", job_id, "--address", ray_head]) == 0
    out = capsys.readouterr().out
    assert "name: validate-me" in out and "s3://maskclip-data/train/" in out
    assert main(["status", job_id, "--address", ray_head]) == 0
    out = capsys.readouterr().out
    assert "SUCCEEDED" in out and "validate-me" in out


def test_resubmitting_the_same_spec_is_idempotent(ray_head, specs, validate_job, capsys):
    job_id, _ = validate_job
    argv = ["submit", str(specs / "validate-me.yaml"), "--address", ray_head]
    argv += ["--set", "optim.max_steps=7", "--entrypoint", VALIDATE]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"job {job_id} (run validate-me) is already SUCCEEDED" in out
    # a different spec is a different submission id
    other = cluster.submission_id(
        load_spec(specs / "validate-me.yaml", ["optim.max_steps=8"]), entrypoint=VALIDATE
    )
    assert other != job_id and other.startswith("maskclip-validate-me-")


def test_stop_is_graceful_and_final(ray_head, stopped_job):
    job_id, before, final, seconds, output = stopped_job
    assert before == "RUNNING"
    assert final == "STOPPED"
    assert f"job {job_id}: STOPPED" in output
    assert seconds < 60  # SIGTERM ends `sleep` at once; no SIGKILL grace period needed
    assert cluster.stop(job_id, ray_head, out=io.StringIO()) == "STOPPED"  # already stopped


def test_list_shows_jobs_with_run_names(ray_head, validate_job, stopped_job, capsys):
    assert main(["list", "--address", ray_head]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["SUBMISSION", "ID", "RUN", "STATUS"]
    rows = {line.split()[0]: line.split()[1:3] for line in lines[1:]}
    assert rows[validate_job[0]] == ["validate-me", "SUCCEEDED"]
    assert rows[stopped_job[0]] == ["sleeper", "STOPPED"]


def test_failed_job_is_resubmitted_under_a_new_id(ray_head, specs):
    spec = _write_spec(specs, "failer")
    out = io.StringIO()
    first = cluster.submit(spec, [], ray_head, wait=True, entrypoint="exit 3", out=out)
    assert cluster.job_status(first, ray_head) == "FAILED"
    second = cluster.submit(spec, [], ray_head, entrypoint="exit 3", out=out)
    assert second == f"{first}-2"


def test_working_dir_ships_the_repository(ray_head, specs):
    out = io.StringIO()
    probe = "python -c 'import service; print(\"service from\", service.__file__)'"
    job_id = cluster.submit(
        specs / "validate-me.yaml",
        [],
        ray_head,
        wait=True,
        working_dir=REPO,
        entrypoint=f"cat {cluster.SPEC_FILE} && {probe}",
        out=out,
    )
    output = out.getvalue()
    assert cluster.job_status(job_id, ray_head) == "SUCCEEDED", output
    assert "name: validate-me" in output
    (line,) = [ln for ln in output.splitlines() if ln.startswith("service from ")]
    assert str(REPO) not in line  # imported from the shipped copy, not the local checkout
    assert "working_dir_files" in line


def test_unknown_job_is_a_one_line_error(ray_head, capsys):
    assert main(["status", "no-such-job", "--address", ray_head]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: no job no-such-job on the Ray cluster at {ray_head}"


def test_the_cluster_requires_the_token(ray_head, ray_token, monkeypatch, tmp_path, capsys):
    """The head runs with token auth: no token or a wrong one is one line, exit 2, and neither
    the right token nor the wrong one is ever printed; the module's token (RAY_AUTH_TOKEN) works."""
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)  # an earlier ray.init() may have set it
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "no-token"))
    assert requests.get(f"{ray_head}/api/jobs/", timeout=5).status_code == 401
    assert main(["list", "--address", ray_head]) == 2
    out, err = capsys.readouterr()
    assert err.startswith(f"error: the Ray Jobs API at {ray_head} "), err
    assert err.strip().endswith("to the cluster's token") and len(err.strip().splitlines()) == 1
    wrong = f"wrong-{secrets.token_hex(8)}"
    monkeypatch.setenv("RAY_AUTH_TOKEN", wrong)
    assert main(["list", "--address", ray_head]) == 2
    out2, err2 = capsys.readouterr()
    assert err2.strip() == (
        f"error: the Ray Jobs API at {ray_head} rejected the token: set RAY_AUTH_TOKEN or "
        "RAY_AUTH_TOKEN_PATH (or ~/.ray/auth_token) to the cluster's token"
    )
    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_token)
    assert main(["list", "--address", ray_head]) == 0
    out3, err3 = capsys.readouterr()
    for text in (out, err, out2, err2, out3, err3):
        assert ray_token not in text and wrong not in text


def test_working_dir_ships_only_the_clean_copy(ray_head, ray_token, specs, tmp_path):
    """What the cluster receives from --working-dir is exactly shipped_files(): the job lists its
    own working dir; no secret file, no symlink target, and no token in the job's runtime_env."""
    repo, secret = _planted_repo(tmp_path)
    out = io.StringIO()
    job_id = cluster.submit(
        specs / "validate-me.yaml",
        [],
        ray_head,
        wait=True,
        working_dir=repo,
        entrypoint="find . \\( -type f -o -type l \\) -print | sort && grep -rl SECRET . ; true",
        out=out,
    )
    output = out.getvalue()
    assert cluster.job_status(job_id, ray_head) == "SUCCEEDED", output
    listed = sorted(ln[2:] for ln in output.splitlines() if ln.startswith("./"))
    assert listed == sorted([*SHIPPED, cluster.SPEC_FILE]), output
    assert secret not in output
    info = cluster.connect(ray_head).get_job_info(job_id)
    assert ray_token not in repr(info) and secret not in repr(info)
    assert set(info.runtime_env.get("env_vars", {})) <= {
        *cluster.PASSTHROUGH_ENV,
        "RAY_JOB_STOP_WAIT_TIME_S",
    }


# ---------------------------------------------------------------- no cluster needed


def test_plain_http_to_a_remote_host_is_refused(capsys):
    with pytest.raises(UserError, match="https://.*port-forward.*--allow-insecure-http"):
        cluster.check_address("http://10.1.2.3:8265")
    assert cluster.check_address("http://10.1.2.3:8265/", allow_insecure=True) == (
        "http://10.1.2.3:8265"
    )
    assert cluster.check_address("https://ray.example.com") == "https://ray.example.com"
    assert cluster.check_address("http://localhost:8265") == "http://localhost:8265"
    assert cluster.check_address("http://[::1]:8265") == "http://[::1]:8265"
    with pytest.raises(UserError, match="ray://"):
        cluster.check_address("ray://10.1.2.3:10001", allow_insecure=True)
    with pytest.raises(UserError, match="expected a Jobs API URL"):
        cluster.check_address("10.1.2.3:8265")
    # the CLI refuses before any network traffic: exit 2, one line
    assert main(["list", "--address", "http://10.1.2.3:8265"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: refusing plain http:// to 10.1.2.3") and "\n" not in err


def test_unreachable_address_is_a_one_line_error(capsys):
    url = f"http://127.0.0.1:{_free_port()}"
    t0 = time.monotonic()
    assert main(["status", "some-job", "--address", url]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot reach the Ray Jobs API at {url}: ") and "\n" not in err
    assert time.monotonic() - t0 < 10


def test_address_defaults(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster.resolve_address(None) == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "https://ray.example.com:8265")
    assert cluster.resolve_address(None) == "https://ray.example.com:8265"
    assert cluster.resolve_address("http://127.0.0.1:1") == "http://127.0.0.1:1"
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # a GCS address, not the Jobs API
    with pytest.raises(UserError, match="RAY_ADDRESS=127.0.0.1:6379 is not a Jobs API URL"):
        cluster.resolve_address(None)


def test_only_non_secret_settings_travel(tmp_path):
    env = {
        "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE",
        "AWS_SESSION_TOKEN": "tok",
        "RAY_AUTH_TOKEN": "ray-secret",
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000",
        "AWS_ENDPOINT_URL": "https://s3.example.com",
        "AWS_REGION": "eu-west-1",
    }
    local = cluster.runtime_env(tmp_path, "http://127.0.0.1:8265", env=env)
    assert local["working_dir"] == str(tmp_path)
    assert local["env_vars"] == {
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000",
        "AWS_ENDPOINT_URL": "https://s3.example.com",
        "AWS_REGION": "eu-west-1",
        "RAY_JOB_STOP_WAIT_TIME_S": str(cluster.STOP_GRACE_S),
    }
    remote = cluster.runtime_env(tmp_path, "https://ray.example.com", env=env)
    assert "MLFLOW_TRACKING_URI" not in remote["env_vars"]  # points at this machine
    text = repr(local) + repr(remote)
    for secret in ("wJalr", "AKIA", "tok'", "ray-secret"):
        assert secret not in text


def test_auth_headers(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("abc123\n")
    assert cluster.auth_headers({"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": "x"}) == {}
    assert cluster.auth_headers({"RAY_AUTH_TOKEN": "x"}) == {"Authorization": "Bearer x"}
    assert cluster.auth_headers(
        {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
    ) == {"Authorization": "Bearer abc123"}
    with pytest.raises(UserError, match="no Ray token found") as e:
        cluster.auth_headers({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "x")})
    assert "abc123" not in str(e.value)


def test_submission_id_is_stable(specs):
    spec = load_spec(specs / "sleeper.yaml")
    a = cluster.submission_id(spec)
    assert a == cluster.submission_id(load_spec(specs / "sleeper.yaml"))
    assert a.startswith("maskclip-sleeper-") and len(a) == len("maskclip-sleeper-") + 8
    assert a != cluster.submission_id(spec, entrypoint="echo hi")
    assert a != cluster.submission_id(load_spec(specs / "sleeper.yaml", ["run.seed=1"]))


# ---------------------------------------------------------------- what --working-dir ships

SECRET_PATHS = [
    ".env",
    ".env.local",
    "infra/.env",
    "infra/terraform.tfstate",
    "infra/terraform.tfstate.backup",
    "infra/.terraform/providers/aws/plugin",
    "deep/er/.terraform/terraform.tfstate",
    ".venv/bin/activate",
    "id_rsa",
    "keys/id_ed25519",
    "keys/id_ed25519.pub",
    "tls/server.pem",
    "server.key",
    "credentials",
    "aws/credentials.json",
]
SHIPPED = ["probe.py", "service/app.py", "infra/main.tf", "k8s/raycluster.yaml", "README.md"]


def _planted_repo(tmp_path: Path) -> tuple[Path, str]:
    """A working dir with every kind of secret file, a .git folder and symlinks (to a secret
    file outside it, and to a folder outside it) next to the files that should ship."""
    secret = f"SECRET-{secrets.token_hex(8)}"
    repo = tmp_path / "repo"
    for rel in [*SECRET_PATHS, ".git/config"]:
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(f"{secret}\n")
    for rel in SHIPPED:
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(f"# {rel}\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "token").write_text(f"{secret}\n")
    (repo / "linked_token").symlink_to(outside / "token")
    (repo / "linked_dir").symlink_to(outside, target_is_directory=True)
    return repo, secret


def test_working_dir_is_a_clean_copy(tmp_path, capsys):
    repo, secret = _planted_repo(tmp_path)
    links: list[str] = []
    assert cluster.shipped_files(repo, links) == sorted(SHIPPED)
    assert sorted(links) == ["linked_dir", "linked_token"]
    stage = tmp_path / "stage"
    digest = cluster._stage("run: {name: x}\n", repo, stage)
    assert len(digest) == 64
    staged = sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*") if not p.is_dir())
    assert staged == sorted([*SHIPPED, cluster.SPEC_FILE])
    assert not any(p.is_symlink() for p in stage.rglob("*"))
    assert not any(secret in p.read_text() for p in stage.rglob("*") if p.is_file())
    err = capsys.readouterr().err
    assert "not shipping 2 symlink(s)" in err and secret not in err
    # the same rules travel as Ray `excludes` around the copy
    assert {".env", "*.tfstate", "*.pem", "credentials*", ".git/"} <= set(cluster.RAY_EXCLUDES)


def _docker_ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule (moby patternmatcher): patterns are anchored at the context
    root, `**` spans folders, a match on a parent folder excludes everything under it, `!`
    re-includes, the last match wins."""

    def regex(pattern: str) -> re.Pattern[str]:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out)

    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for raw in patterns:
        negate = raw.startswith("!")
        rx = regex(raw.removeprefix("!").strip("/"))
        if any(rx.fullmatch(p) for p in prefixes):
            ignored = not negate
    return ignored


def test_gitignore_dockerignore_and_submit_agree_on_secrets(tmp_path):
    """Every secret path is ignored by git (`git check-ignore` on the repo's .gitignore), left
    out of the image build context (.dockerignore) and not shipped by --working-dir."""
    lines = (REPO / ".dockerignore").read_text().splitlines()
    docker = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    git_dir = tmp_path / "g"
    git_dir.mkdir()
    subprocess.run(["git", "init", "-q", str(git_dir)], check=True)
    shutil.copy(REPO / ".gitignore", git_dir / ".gitignore")
    check = subprocess.run(
        ["git", "-c", "core.excludesFile=/dev/null", "check-ignore", "--no-index", "--stdin"],
        cwd=git_dir,
        input="\n".join([*SECRET_PATHS, *SHIPPED]) + "\n",
        capture_output=True,
        text=True,
    )
    git_ignored = set(check.stdout.split())
    repo, _ = _planted_repo(tmp_path)
    shipped = set(cluster.shipped_files(repo))
    for path in SECRET_PATHS:
        assert path in git_ignored, f".gitignore lets {path} through"
        assert _docker_ignored(path, docker), f".dockerignore lets {path} through"
        assert path not in shipped, f"--working-dir ships {path}"
    assert _docker_ignored(".git/config", docker) and ".git/config" not in shipped
    for path in SHIPPED:  # and the rules are not so broad that they hide the code
        assert path not in git_ignored and path in shipped
    for path in ("service/app.py", "maskclip/model.py", "README.md", "pyproject.toml"):
        assert not _docker_ignored(path, docker), path  # what the Dockerfile copies
    assert _docker_ignored("runs/t/meta.json", docker) and _docker_ignored("tests/x.py", docker)
