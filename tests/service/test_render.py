"""`maskclip render`: a spec becomes a ConfigMap + KubeRay RayJob that validate strictly offline."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from service import k8s
from service.cli import main
from service.spec import build_spec, load_spec
from tests.k8s.k8s_validation import (
    iter_containers,
    iter_pod_specs,
    require_kuberay_schemas,
    validate_manifest,
)

REPO = Path(__file__).resolve().parents[2]
SPEC = """\
run:
  name: Big_Run.v2
data:
  train: s3://maskclip-data/train/
scaling:
  num_workers: 3
  use_gpu: true
  gpus_per_worker: 2
  cpus_per_worker: 4
storage:
  endpoint_url: https://s3.eu-west-1.amazonaws.com
  region: eu-west-1
checkpoint:
  storage_path: s3://maskclip-data/checkpoints
"""
SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE",
    "AWS_SESSION_TOKEN": "FwoGZXIvYXdzEXAMPLESESSION",
    "RAY_AUTH_TOKEN": "ray-token-EXAMPLE",
}


@pytest.fixture
def spec_path(tmp_path) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(SPEC)
    return path


def _docs(spec_path: Path, overrides=(), **kw) -> list[dict]:
    return k8s.render_manifests(load_spec(spec_path, list(overrides)), **kw)


def _rayjob(docs: list[dict]) -> dict:
    (job,) = [d for d in docs if d["kind"] == "RayJob"]
    return job


def test_rendered_manifests_validate(spec_path):
    require_kuberay_schemas("RayJob")
    for overrides in ([], ["scaling.use_gpu=false", "scaling.num_workers=1"]):
        docs = _docs(spec_path, overrides, active_deadline_seconds=7200)
        assert [d["kind"] for d in docs] == ["ConfigMap", "RayJob"]
        for doc in docs:
            assert validate_manifest(doc) == [], f"{overrides}: " + "\n".join(
                validate_manifest(doc)
            )


def test_rayjob_shape(spec_path):
    import ray

    cm, job = _docs(spec_path)
    spec = job["spec"]
    assert job["apiVersion"] == "ray.io/v1"
    assert job["metadata"]["name"] == "big-run-v2"
    assert job["metadata"]["namespace"] == cm["metadata"]["namespace"] == "maskclip"
    assert spec["entrypoint"] == "maskclip run /config/job.yaml"
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0 and spec["backoffLimit"] == 0
    assert "activeDeadlineSeconds" not in spec

    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(rf"^ARG RAY_VERSION={re.escape(ray.__version__)}$", dockerfile, re.M)
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # no training on the head
    (group,) = cluster["workerGroupSpecs"]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (3, 3, 3)
    pod = group["template"]["spec"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    (worker,) = pod["containers"]
    for section in ("requests", "limits"):
        assert worker["resources"][section]["nvidia.com/gpu"] == "2"
    assert int(worker["resources"]["limits"]["cpu"]) >= 4

    # the image defaults to the project's, at the project's version
    from importlib.metadata import version

    images = {c["image"] for _, c in iter_containers(job)}
    assert images == {f"ghcr.io/maskclip/maskclip-service:{version('maskclip-service')}"}
    assert {c["image"] for _, c in iter_containers(_rayjob(_docs(spec_path, image="r/x:1")))} == {
        "r/x:1"
    }


def test_spec_travels_in_a_configmap_mounted_at_config(spec_path):
    cm, job = _docs(spec_path)
    shipped = build_spec(yaml.safe_load(cm["data"]["job.yaml"]))  # loads back as a valid spec
    assert shipped.data.train == "s3://maskclip-data/train/"
    assert shipped.scaling.num_workers == 3
    assert shipped.scaling.ray_address == "auto"  # joins the RayJob's cluster
    cluster = job["spec"]["rayClusterSpec"]
    for template in (
        cluster["headGroupSpec"]["template"],
        cluster["workerGroupSpecs"][0]["template"],
    ):
        pod = template["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/config"]
        assert volumes[mount["name"]]["configMap"]["name"] == cm["metadata"]["name"]


def test_pods_follow_the_house_rules(spec_path):
    _, job = _docs(spec_path)
    pods = list(iter_pod_specs(job))
    assert len(pods) == 3  # head, workers, submitter
    for where, pod in pods:
        assert pod["serviceAccountName"] == "maskclip-runner", where
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 1000
        mounts_ok = {"/tmp", "/tmp/ray"}
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1000, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            mounted = {m["mountPath"] for m in c["volumeMounts"]}
            assert mounts_ok <= mounted, where
            volumes = {v["name"]: v for v in pod["volumes"]}
            for m in c["volumeMounts"]:
                if m["mountPath"] in mounts_ok:
                    assert "emptyDir" in volumes[m["name"]]
    for where, c in iter_containers(job):
        for section in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][section]), f"{where} {section}"


def test_env_comes_from_the_spec(spec_path):
    _, job = _docs(spec_path)
    cluster = job["spec"]["rayClusterSpec"]
    for template in (
        cluster["headGroupSpec"]["template"],
        cluster["workerGroupSpecs"][0]["template"],
    ):
        env = {e["name"]: e["value"] for e in template["spec"]["containers"][0]["env"]}
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.maskclip.svc:5000"
        assert env["AWS_ENDPOINT_URL"] == "https://s3.eu-west-1.amazonaws.com"
        assert env["AWS_REGION"] == "eu-west-1"
    _, job = _docs(spec_path, ["tracking.tracking_uri=http://mlflow.other:5000"])
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow.other:5000"} in head["env"]


def test_cpu_only_spec_asks_no_gpus(spec_path):
    _, job = _docs(spec_path, ["scaling.use_gpu=false"])
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["groupName"] == "cpu"
    assert "tolerations" not in group["template"]["spec"]
    assert "nvidia.com/gpu" not in yaml.safe_dump(job)


def test_no_secrets_in_the_output(spec_path, monkeypatch, capsys):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    assert main(["render", str(spec_path)]) == 0
    out = capsys.readouterr().out
    for name, value in SECRETS.items():
        assert value not in out
        assert name not in out


@pytest.mark.parametrize(
    "run_name,expected",
    [
        ("quickstart", "quickstart"),
        ("My_Run.v2", "my-run-v2"),
        ("run__A..b", "run-a-b"),
        ("42-runs", "maskclip-42-runs"),
        ("a" * 63, None),
    ],
)
def test_names_are_sanitized(run_name, expected):
    name = k8s.k8s_name(run_name)
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), name  # DNS-1035 label
    assert len(name) <= k8s.MAX_NAME <= 63
    if expected:
        assert name == expected
    else:
        assert name != k8s.k8s_name("a" * 62 + "b")  # truncation keeps names distinct


def test_long_run_name_renders(spec_path):
    docs = _docs(spec_path, ["run.name=" + "Very_Long-Run.Name" * 3 + "x"])
    names = [d["metadata"]["name"] for d in docs]
    assert all(len(n) <= 63 for n in names)
    assert len(names[1]) <= k8s.MAX_NAME


def test_cli_render_prints_multi_doc_yaml(spec_path, capsys):
    argv = ["render", str(spec_path), "--image", "reg.example/mc:dev", "--namespace", "ml"]
    argv += ["--set", "scaling.num_workers=2", "--active-deadline", "600"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("---\n")
    docs = [d for d in yaml.safe_load_all(out) if d]
    assert [d["kind"] for d in docs] == ["ConfigMap", "RayJob"]
    assert {d["metadata"]["namespace"] for d in docs} == {"ml"}
    job = docs[1]
    assert job["spec"]["activeDeadlineSeconds"] == 600
    assert job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 2
    assert {c["image"] for _, c in iter_containers(job)} == {"reg.example/mc:dev"}
    assert "&id" not in out and "*id" not in out  # no YAML anchors/aliases
    try:
        require_kuberay_schemas("RayJob")
    except pytest.skip.Exception:
        return
    for doc in docs:
        assert validate_manifest(doc) == []


def test_cli_render_bad_spec_is_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {train: s3://maskclip-data/train/}\nscaling: {num_workers: 0}\n")
    assert main(["render", str(bad)]) == 2
    assert "scaling.num_workers" in capsys.readouterr().err
