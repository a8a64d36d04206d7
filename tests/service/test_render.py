"""`maskclip render`: a spec becomes a ConfigMap, the run's NetworkPolicy and a KubeRay RayJob
that validate strictly offline, with Ray token auth on and every credential from a Secret."""

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
    iter_pod_templates,
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


def _kinds(docs: list[dict]) -> list[str]:
    return [d["kind"] for d in docs]


def _rayjob(docs: list[dict]) -> dict:
    (job,) = [d for d in docs if d["kind"] == "RayJob"]
    return job


def test_rendered_manifests_validate(spec_path):
    require_kuberay_schemas("RayJob")
    for overrides in ([], ["scaling.use_gpu=false", "scaling.num_workers=1"]):
        docs = _docs(spec_path, overrides, active_deadline_seconds=7200)
        assert _kinds(docs) == ["ConfigMap", "NetworkPolicy", "RayJob"]
        for doc in docs:
            assert validate_manifest(doc) == [], f"{overrides}: " + "\n".join(
                validate_manifest(doc)
            )


def test_rayjob_shape(spec_path):
    cm, _, job = _docs(spec_path)
    spec = job["spec"]
    assert job["apiVersion"] == "ray.io/v1"
    assert job["metadata"]["name"] == "big-run-v2"
    assert job["metadata"]["namespace"] == cm["metadata"]["namespace"] == "maskclip"
    assert spec["entrypoint"] == "maskclip run /config/job.yaml"
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0 and spec["backoffLimit"] == 1  # cluster: default
    assert "activeDeadlineSeconds" not in spec

    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == k8s.RAY_VERSION  # the pinned version, not the installed one
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(rf"^ARG RAY_VERSION={re.escape(k8s.RAY_VERSION)}$", dockerfile, re.M)
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
    # one training worker (4 CPUs) + Ray Data's default 6 per GPU x 2 GPUs, guaranteed to the pod
    assert worker["resources"]["requests"]["cpu"] == worker["resources"]["limits"]["cpu"] == "16"
    assert group["rayStartParams"]["num-cpus"] == "16"

    # the image defaults to the project's, at the project's version
    from importlib.metadata import version

    images = {c["image"] for _, c in iter_containers(job)}
    assert images == {f"ghcr.io/maskclip/maskclip-service:{version('maskclip-service')}"}
    assert {c["image"] for _, c in iter_containers(_rayjob(_docs(spec_path, image="r/x:1")))} == {
        "r/x:1"
    }


def test_spec_travels_in_a_configmap_mounted_at_config(spec_path):
    cm, _, job = _docs(spec_path)
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
    *_, job = _docs(spec_path)
    pods = list(iter_pod_specs(job))
    assert len(pods) == 3  # head, workers, submitter
    accounts = [pod["serviceAccountName"] for _, pod in pods]
    assert accounts == ["maskclip-ray-head", "maskclip-ray-worker", "maskclip-ray-submitter"]
    for where, pod in pods:
        assert pod["automountServiceAccountToken"] is False, where
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 1000
        mounts_ok = {"/tmp", "/tmp/ray"}
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1000, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
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
    *_, job = _docs(spec_path)
    cluster = job["spec"]["rayClusterSpec"]
    for template in (
        cluster["headGroupSpec"]["template"],
        cluster["workerGroupSpecs"][0]["template"],
    ):
        env = {e["name"]: e.get("value") for e in template["spec"]["containers"][0]["env"]}
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.maskclip.svc:5000"
        assert env["AWS_ENDPOINT_URL"] == "https://s3.eu-west-1.amazonaws.com"
        assert env["AWS_REGION"] == "eu-west-1"
    *_, job = _docs(spec_path, ["tracking.tracking_uri=http://mlflow.other:5000"])
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow.other:5000"} in head["env"]


def test_cpu_only_spec_asks_no_gpus(spec_path):
    *_, job = _docs(spec_path, ["scaling.use_gpu=false"])
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
        if name.startswith("AWS_"):
            assert name not in out
    # RAY_AUTH_TOKEN appears only as a reference to the Secret, never with a value
    docs = [d for d in yaml.safe_load_all(out) if d]
    refs = [
        e
        for _, c in iter_containers(_rayjob(docs))
        for e in c["env"]
        if e["name"] == "RAY_AUTH_TOKEN"
    ]
    assert len(refs) == 3 and all(set(e) == {"name", "valueFrom"} for e in refs)
    assert not [d for d in docs if d["kind"] == "Secret"]


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
    assert len(names[2]) <= k8s.MAX_NAME


def test_cli_render_prints_multi_doc_yaml(spec_path, capsys):
    argv = ["render", str(spec_path), "--image", "reg.example/mc:dev", "--namespace", "ml"]
    argv += ["--set", "scaling.num_workers=2", "--active-deadline", "600"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("---\n")
    docs = [d for d in yaml.safe_load_all(out) if d]
    assert _kinds(docs) == ["ConfigMap", "NetworkPolicy", "RayJob"]
    assert {d["metadata"]["namespace"] for d in docs} == {"ml"}
    job = docs[2]
    assert job["spec"]["activeDeadlineSeconds"] == 600
    assert job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 2
    assert {c["image"] for _, c in iter_containers(job)} == {"reg.example/mc:dev"}
    assert "&id" not in out and "*id" not in out  # no YAML anchors/aliases


def test_cli_render_output_validates(spec_path, capsys):
    require_kuberay_schemas("RayJob")  # skips without the schemas, fails under CI=true
    assert main(["render", str(spec_path), "--set", "scaling.use_gpu=false"]) == 0
    docs = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    assert _kinds(docs) == ["ConfigMap", "NetworkPolicy", "RayJob"]
    for doc in docs:
        assert validate_manifest(doc) == [], doc["kind"]


DIGEST = "sha256:" + "0123456789abcdef" * 4


@pytest.mark.parametrize(
    "image",
    [
        f"ghcr.io/maskclip/maskclip-service@{DIGEST}",
        f"ghcr.io/maskclip/maskclip-service:0.1.0@{DIGEST}",
        f"registry.internal:5000/ml/maskclip@{DIGEST}",
        "reg.example/mc:dev",
    ],
)
def test_cli_render_takes_an_image_pinned_by_digest(spec_path, capsys, image):
    assert main(["render", str(spec_path), "--image", image]) == 0
    job = _rayjob([d for d in yaml.safe_load_all(capsys.readouterr().out) if d])
    assert {c["image"] for _, c in iter_containers(job)} == {image}


@pytest.mark.parametrize(
    "image,expected",
    [
        ("ghcr.io/maskclip/mc@sha256:abc123", "the digest must be sha256: and 64 lowercase hex"),
        (f"ghcr.io/maskclip/mc@md5:{'a' * 32}", "the digest must be sha256:"),
        (f"ghcr.io/maskclip/mc@{DIGEST.upper().replace('SHA', 'sha')}", "64 lowercase hex"),
        ("ghcr.io/maskclip/mc:1.0; rm -rf /", "not an image reference"),
        ("Ghcr.io/Maskclip", "not an image reference"),
    ],
)
def test_cli_render_refuses_a_bad_image_in_one_line(spec_path, capsys, image, expected):
    assert main(["render", str(spec_path), "--image", image]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("error: --image: ") and expected in line, line


def test_control_plane_is_authenticated_with_tokens_from_secrets(spec_path):
    _, policy, job = _docs(spec_path)
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token", "secretName": "maskclip-ray-token"}
    token = {"secretKeyRef": {"name": "maskclip-ray-token", "key": "auth_token"}}
    mlflow_user = {"secretKeyRef": {"name": "mlflow-client", "key": "username"}}
    mlflow_password = {"secretKeyRef": {"name": "mlflow-client", "key": "password"}}
    for where, c in iter_containers(job):
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"] == {"name": "RAY_AUTH_MODE", "value": "token"}, where
        assert env["RAY_AUTH_TOKEN"] == {"name": "RAY_AUTH_TOKEN", "valueFrom": token}, where
        if "submitter" in where:  # `ray job submit` needs no MLflow or S3 credentials
            assert not any(n.startswith(("MLFLOW_", "AWS_")) for n in env), where
            continue
        assert env["MLFLOW_TRACKING_USERNAME"]["valueFrom"] == mlflow_user, where
        assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"] == mlflow_password, where
    # the run's pods and the KubeRay operator reach the run's pods; nothing else is listed
    run = {"matchLabels": {"maskclip.io/run": "big-run-v2"}}
    assert policy["metadata"]["name"] == "big-run-v2-ray"
    assert policy["spec"]["podSelector"] == run
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    same_run, operator = policy["spec"]["ingress"]
    assert same_run == {"from": [{"podSelector": run}]}
    assert operator["ports"] == [{"protocol": "TCP", "port": 8265}]
    assert operator["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "kuberay-system"
    }
    assert policy["spec"]["egress"] == [{"to": [{"podSelector": run}]}]
    for where, template in [*iter_pod_templates(job)]:
        assert template["metadata"]["labels"]["maskclip.io/run"] == "big-run-v2", where


def test_cli_render_bad_spec_is_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {train: s3://maskclip-data/train/}\nscaling: {num_workers: 0}\n")
    assert main(["render", str(bad)]) == 2
    assert "scaling.num_workers" in capsys.readouterr().err


def _worker_cpus(job: dict) -> tuple[str, str, str]:
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    (worker,) = group["template"]["spec"]["containers"]
    res = worker["resources"]
    return res["requests"]["cpu"], res["limits"]["cpu"], group["rayStartParams"]["num-cpus"]


@pytest.mark.parametrize(
    "overrides, cpus",
    [
        ([], "16"),  # 4 + 6 x 2 GPUs
        (["scaling.data_cpus_per_worker=3"], "7"),
        (["scaling.data_cpus_per_worker=2.5"], "7"),  # 6.5 -> whole CPUs for Ray's num-cpus
        (["scaling.use_gpu=false", "scaling.cpus_per_worker=0.5"], "1"),  # 0.5 + 0.5
    ],
)
def test_worker_pods_hold_the_worker_and_the_cpus_for_ray_data(spec_path, overrides, cpus):
    *_, job = _docs(spec_path, overrides)
    assert _worker_cpus(job) == (cpus, cpus, cpus)
    assert job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_shipped_s3_job_leaves_ray_data_cpus_on_an_8_vcpu_gpu_node(capsys):
    """jobs/s3.yaml on g5.2xlarge nodes (8 vCPUs, infra/variables.tf): 1 CPU drives the GPU, 6
    decode; the pod asks 7 so it fits the node's allocatable CPUs, like k8s/raycluster.yaml's."""
    assert main(["render", str(REPO / "jobs" / "s3.yaml")]) == 0
    job = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d["kind"] == "RayJob"][0]
    assert _worker_cpus(job) == ("7", "7", "7")
    spec = load_spec(REPO / "jobs" / "s3.yaml", [])
    assert spec.scaling.cpus_per_worker == 1 and spec.scaling.data_cpus() == 6
    tf = (REPO / "infra" / "variables.tf").read_text()
    assert re.search(r'default\s*=\s*\["g5\.2xlarge"\]', tf)
    cluster = yaml.safe_load((REPO / "k8s" / "raycluster.yaml").read_text())
    (group,) = cluster["spec"]["workerGroupSpecs"]
    res = group["template"]["spec"]["containers"][0]["resources"]
    assert res["requests"]["cpu"] == res["limits"]["cpu"] == "7"


def test_cli_render_refuses_workers_that_take_every_cpu(spec_path, capsys):
    """No CPU left for Ray Data (the head has num-cpus 0): the run would wait forever for its
    first batch. render refuses with exit 2 and one line naming the numbers."""
    argv = ["render", str(spec_path), "--set", "scaling.data_cpus_per_worker=0"]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        "error: scaling: 3 workers x 4 CPU leave 0 of the 12 CPUs of the rendered pods (3 x 4; "
        "the head has none) to Ray Data, which needs 0.5 (3 x scaling.data_cpus_per_worker 0); "
        "set scaling.data_cpus_per_worker above 0 (the default is 6 per GPU)"
    ]


# ---- the same rule where the job runs: `maskclip run` on a cluster (also submit's and the
# RayJob's entrypoint), checked against the cluster's nodes as ray.nodes() lists them

HEAD = {"CPU": 0.0, "memory": 8e9}


def _cluster_spec(**scaling):
    base = {"num_workers": 4, "use_gpu": True, "ray_address": "auto"}
    return build_spec({"data": {"train": "s3://b/train/"}, "scaling": {**base, **scaling}})


def test_run_on_a_cluster_refuses_workers_that_take_every_cpu():
    """jobs/s3.yaml before this fix: 4 x 8 CPUs on 8-CPU GPU pods, a head with num-cpus 0."""
    from service.errors import UserError
    from service.trainer import check_fits

    nodes = [HEAD] + [{"CPU": 8.0, "GPU": 1.0}] * 4
    with pytest.raises(UserError) as e:
        check_fits(_cluster_spec(cpus_per_worker=8), nodes)
    assert str(e.value) == (
        "scaling: 4 workers x 8 CPU leave 0 of the 32 CPUs of this Ray cluster (5 nodes) to Ray "
        "Data, which needs 24 (4 x scaling.data_cpus_per_worker 6); lower scaling.num_workers or "
        "scaling.cpus_per_worker, or give the cluster more CPUs"
    )
    check_fits(_cluster_spec(cpus_per_worker=2), nodes)  # 8 + 24 = 32: fits
    with pytest.raises(UserError, match=r"leave 4 of the 32 CPUs .* needs 8 \(4 x "):
        check_fits(_cluster_spec(cpus_per_worker=7, data_cpus_per_worker=2), nodes)
    # CPU-only nodes for Ray Data count: the rule is the cluster's total
    check_fits(_cluster_spec(cpus_per_worker=8), [*nodes, {"CPU": 32.0}])


def test_run_on_a_cluster_that_has_not_scaled_up_yet_waits(capsys):
    from service.trainer import check_fits

    check_fits(_cluster_spec(cpus_per_worker=8), [HEAD])
    assert "fewer than the workers ask; waiting for it to scale up" in capsys.readouterr().out


def test_local_run_has_no_one_to_wait_for():
    from service.errors import UserError
    from service.trainer import check_fits

    local = _cluster_spec(use_gpu=False, num_workers=2, cpus_per_worker=0.5, ray_address=None)
    check_fits(local, [{"CPU": 2.0}])  # 2 x 0.5 + 2 x 0.5 for Ray Data: the ray_local fixture
    with pytest.raises(UserError, match=r"^scaling: 2 workers x 1 CPU leave 0 of the 2 CPUs"):
        check_fits(
            local.model_copy(
                update={"scaling": local.scaling.model_copy(update={"cpus_per_worker": 1.0})}
            ),
            [{"CPU": 2.0}],
        )


def test_job_retries_gcs_fault_tolerance_and_stop_grace_come_from_the_spec(spec_path):
    """cluster.backoff_limit, an external Redis for GCS fault tolerance (its password from a
    Secret) and the stop grace period reach the RayJob, which still validates against the CRD."""
    require_kuberay_schemas("RayJob")
    overrides = [
        "cluster.backoff_limit=3",
        "cluster.gcs_redis_address=redis.maskclip.svc:6379",
        "cluster.gcs_redis_auth_from=maskclip-redis",
        "cluster.stop_grace_s=200",
    ]
    docs = _docs(spec_path, overrides)
    job = _rayjob(docs)
    assert validate_manifest(job) == [], validate_manifest(job)
    spec = job["spec"]
    assert spec["backoffLimit"] == 3
    assert spec["rayClusterSpec"]["gcsFaultToleranceOptions"] == {
        "redisAddress": "redis.maskclip.svc:6379",
        "redisPassword": {
            "valueFrom": {"secretKeyRef": {"name": "maskclip-redis", "key": "password"}}
        },
    }
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    (worker,) = [g["template"]["spec"] for g in spec["rayClusterSpec"]["workerGroupSpecs"]]
    assert head["terminationGracePeriodSeconds"] == worker["terminationGracePeriodSeconds"] == 230
    env = {e["name"]: e.get("value") for e in head["containers"][0]["env"]}
    assert env["RAY_JOB_STOP_WAIT_TIME_S"] == "200"
    assert "gcsFaultToleranceOptions" not in _rayjob(_docs(spec_path))["spec"]["rayClusterSpec"]
    assert (
        _rayjob(_docs(spec_path, backoff_limit=0))["spec"]["backoffLimit"] == 0
    )  # --backoff-limit


def test_worker_pods_checkpoint_before_they_go(spec_path):
    """A worker pod told to stop runs `maskclip node-preempt` first (preStop): it waits at most
    cluster.stop_grace_s for the run's checkpoint, and the pod's grace period leaves Ray 30 s
    more. The hook is a real command of this CLI; the shipped RayCluster's workers have it too."""
    from service.cli import build_parser

    require_kuberay_schemas("RayJob")
    job = _rayjob(_docs(spec_path, ["cluster.stop_grace_s=75"]))
    assert validate_manifest(job) == [], validate_manifest(job)
    (worker,) = [g["template"]["spec"] for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]]
    hook = worker["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert hook == ["maskclip", "node-preempt", "--within", "75"]
    assert worker["terminationGracePeriodSeconds"] == 105
    args = build_parser().parse_args(hook[1:])
    assert args.within == 75.0 and args.node_id is None  # the pod's own node, RAY_ADDRESS
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert "lifecycle" not in head["containers"][0]  # the head's loss ends the job anyway

    shipped = yaml.safe_load((REPO / "k8s" / "raycluster.yaml").read_text())
    (group,) = shipped["spec"]["workerGroupSpecs"]
    pod = group["template"]["spec"]
    within = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert within[:3] == ["maskclip", "node-preempt", "--within"]
    assert pod["terminationGracePeriodSeconds"] == float(within[3]) + 30
