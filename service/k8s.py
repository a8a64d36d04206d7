"""Render a job spec as KubeRay manifests: a ConfigMap with the resolved spec, a NetworkPolicy and
a ``RayJob``.

    docs = render_manifests(spec, spec.to_yaml(), image="ghcr.io/maskclip/maskclip-service:0.1.0")
    print(dump_manifests(docs))        # kubectl apply -f -

The RayJob brings up its own Ray cluster (head: no training, ``num-cpus: "0"``; one worker group
sized from ``spec.scaling``: each pod holds one training worker and ``data_cpus_per_worker``
CPUs for Ray Data), runs ``maskclip run /config/job.yaml`` on it (the spec mounted from
the ConfigMap), and tears the cluster down when the job ends.

Control plane: Ray token auth is on (``authOptions.mode: token`` and ``RAY_AUTH_MODE=token``), the
token read from the Secret ``maskclip-ray-token`` (key ``auth_token``) through ``secretKeyRef``;
the MLflow client credentials come from the Secret ``mlflow-client``. Neither Secret is rendered:
they are created once per namespace, out of band (k8s/kustomization.yaml says how). The
NetworkPolicy lets the run's pods (head, workers, submitter) and the KubeRay operator reach the
Ray ports, nothing else; k8s/networkpolicy.yaml denies everything else in the namespace.

Pods pass the restricted Pod Security Standard: uid 1000, no privilege escalation, all
capabilities dropped, RuntimeDefault seccomp, read-only root filesystem. Head and workers run
under their own service accounts (S3 through their cloud identity: no keys anywhere in the
manifests) with no Kubernetes API token mounted: a RayJob runs no autoscaler.
"""

from __future__ import annotations

import copy
import hashlib
import math
import re
from importlib import metadata
from typing import Any

import yaml

from .cluster import for_cluster, shipped_yaml
from .errors import ClusterError
from .spec import JobSpec

DEFAULT_NAMESPACE = "maskclip"
HEAD_SERVICE_ACCOUNT = "maskclip-ray-head"
WORKER_SERVICE_ACCOUNT = "maskclip-ray-worker"
SUBMITTER_SERVICE_ACCOUNT = "maskclip-ray-submitter"
RAY_TOKEN_SECRET = "maskclip-ray-token"
RAY_TOKEN_KEY = "auth_token"  # the key KubeRay's authOptions.secretName expects
MLFLOW_CLIENT_SECRET = "mlflow-client"
RAY_PORTS = {"gcs": 6379, "dashboard": 8265, "client": 10001}
KUBERAY_OPERATOR_NAMESPACE = "kuberay-system"
IMAGE_REPO = "ghcr.io/maskclip/maskclip-service"
DEFAULT_TRACKING_URI = "http://mlflow.maskclip.svc:5000"
CONFIG_DIR = "/config"
SPEC_FILE = "job.yaml"
ENTRYPOINT = f"maskclip run {CONFIG_DIR}/{SPEC_FILE}"
UID = 1000
HOME = "/home/maskclip"

MAX_NAME = 47
"""KubeRay refuses RayJob names over 47 characters (it appends 6 to name the RayCluster, whose
limit is 53) and wants a DNS-1035 label (lowercase letter first)."""

HEAD_RESOURCES = {
    "requests": {"cpu": "2", "memory": "8Gi"},
    "limits": {"cpu": "4", "memory": "8Gi"},
}
GPU_WORKER = {"memory": "28Gi"}
CPU_WORKER = {"memory": "8Gi"}
SUBMITTER_RESOURCES = {
    "requests": {"cpu": "250m", "memory": "512Mi"},
    "limits": {"cpu": "1", "memory": "1Gi"},
}
LABELS = {"app.kubernetes.io/part-of": "maskclip-service"}

RAY_VERSION = "2.60.0"
"""The Ray that rendered RayJobs declare (`rayVersion`): the one the image runs. It equals the
ray pin in requirements.lock, the Dockerfile's RAY_VERSION and k8s/raycluster.yaml (tests/k8s
checks the four against each other), whatever Ray is installed where `render` runs."""


def project_version() -> str:
    try:
        return metadata.version("maskclip-service")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "latest"


def default_image() -> str:
    return f"{IMAGE_REPO}:{project_version()}"


_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_IMAGE_RE = re.compile(
    rf"(?:(?P<registry>(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?\.)*[a-zA-Z0-9]"
    rf"(?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?::[0-9]+)?)/)?"
    rf"(?P<path>{_COMPONENT}(?:/{_COMPONENT})*)"
    rf"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}}))?"
    rf"(?:@(?P<digest>[A-Za-z0-9_+.-]+:[0-9a-fA-F]+))?"
)
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")


def check_image(image: str) -> str:
    """An OCI image reference, ``repo[:tag]`` or pinned ``repo[:tag]@sha256:<64 hex>``; raises
    :class:`ClusterError` (one line) for anything else, a malformed digest included."""
    m = _IMAGE_RE.fullmatch(image or "")
    if not m or len(image) > 512:
        raise ClusterError(
            f"--image: not an image reference (got {image!r}); expected "
            "REPO[:TAG] or REPO[:TAG]@sha256:<64 hex digits>"
        )
    digest = m.group("digest")
    if digest is not None and not _DIGEST_RE.fullmatch(digest):
        raise ClusterError(
            f"--image: the digest must be sha256: and 64 lowercase hex digits (got {digest!r})"
        )
    return image


def k8s_name(run_name: str, max_len: int = MAX_NAME) -> str:
    """A DNS-1035 label from a run name: lowercase, ``[a-z0-9-]``, letter first, ≤ max_len.
    Names that had to be shortened get a hash suffix so distinct runs stay distinct."""
    name = re.sub(r"[^a-z0-9-]+", "-", run_name.lower())
    name = re.sub(r"-{2,}", "-", name).strip("-")
    if not name or not name[0].isalpha():
        name = f"maskclip-{name}".rstrip("-")
    if len(name) > max_len:
        digest = hashlib.sha256(run_name.encode()).hexdigest()[:6]
        name = f"{name[: max_len - 7].rstrip('-')}-{digest}"
    return name


def _secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def ray_auth_env() -> list[dict[str, Any]]:
    """Token auth on every Ray container (head, workers, the job submitter): the mode by value,
    the token from the Secret. KubeRay's ``authOptions`` would inject the same two variables; it
    keeps ones already set, and writing them here keeps auth on under an operator that predates
    ``authOptions`` (the API server drops the unknown field silently)."""
    return [
        {"name": "RAY_AUTH_MODE", "value": "token"},
        _secret_env("RAY_AUTH_TOKEN", RAY_TOKEN_SECRET, RAY_TOKEN_KEY),
    ]


def mlflow_client_env() -> list[dict[str, Any]]:
    """The MLflow client's basic-auth credentials (read natively by MLflow) from a Secret."""
    return [
        _secret_env("MLFLOW_TRACKING_USERNAME", MLFLOW_CLIENT_SECRET, "username"),
        _secret_env("MLFLOW_TRACKING_PASSWORD", MLFLOW_CLIENT_SECRET, "password"),
    ]


def _env(spec: JobSpec) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {
            "name": "MLFLOW_TRACKING_URI",
            "value": spec.tracking.tracking_uri or DEFAULT_TRACKING_URI,
        },
        *mlflow_client_env(),
        *ray_auth_env(),
    ]
    if spec.storage.endpoint_url:
        env.append({"name": "AWS_ENDPOINT_URL", "value": spec.storage.endpoint_url})
    if spec.storage.region:
        env.append({"name": "AWS_REGION", "value": spec.storage.region})
    env.append({"name": "HOME", "value": HOME})
    return env


def _container_security() -> dict[str, Any]:
    """Restricted Pod Security Standard, plus a read-only root filesystem."""
    return {
        "runAsNonRoot": True,
        "runAsUser": UID,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _pod_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": UID,
        "runAsGroup": UID,
        "fsGroup": UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _volumes(config_map: str | None, shm: str | None) -> tuple[list[dict], list[dict]]:
    """(volumes, volumeMounts): writable emptyDirs for a read-only root filesystem."""
    volumes = [
        {"name": "tmp", "emptyDir": {"sizeLimit": "4Gi"}},
        {"name": "ray-tmp", "emptyDir": {"sizeLimit": "16Gi"}},
        {"name": "home", "emptyDir": {"sizeLimit": "16Gi"}},
    ]
    mounts = [
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "ray-tmp", "mountPath": "/tmp/ray"},
        {"name": "home", "mountPath": HOME},
    ]
    if shm:  # the object store, NCCL and DataLoader workers need more than 64 MiB of /dev/shm
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    if config_map:
        volumes.append({"name": "job-spec", "configMap": {"name": config_map}})
        mounts.append({"name": "job-spec", "mountPath": CONFIG_DIR, "readOnly": True})
    return volumes, mounts


def _pod_template(
    *,
    component: str,
    service_account: str,
    run_label: str,
    container: dict[str, Any],
    config_map: str | None,
    shm: str | None,
    tolerations: list[dict] | None = None,
    restart_policy: str | None = None,
) -> dict[str, Any]:
    volumes, mounts = _volumes(config_map, shm)
    container = {
        **container,
        "imagePullPolicy": "IfNotPresent",
        # The root filesystem is read-only: relative paths (run.output_dir "runs") land here.
        "workingDir": HOME,
        "securityContext": _container_security(),
        "volumeMounts": mounts,
    }
    pod: dict[str, Any] = {
        "serviceAccountName": service_account,
        # No pod of a RayJob calls the Kubernetes API (no autoscaler): no API token mounted.
        # S3 access is unaffected: IRSA projects its own web-identity token.
        "automountServiceAccountToken": False,
        "securityContext": _pod_security(),
        "containers": [container],
        "volumes": volumes,
    }
    if tolerations:
        pod["tolerations"] = tolerations
    if restart_policy:
        pod["restartPolicy"] = restart_policy
    return {
        "metadata": {
            "labels": {
                **LABELS,
                "app.kubernetes.io/name": f"maskclip-{component}",
                "maskclip.io/run": run_label,
            }
        },
        "spec": pod,
    }


def worker_pod_cpus(spec: JobSpec) -> int:
    """CPUs of one worker pod (and Ray's ``num-cpus`` there): the training worker's
    ``scaling.cpus_per_worker`` plus ``scaling.data_cpus_per_worker`` for Ray Data, rounded up
    to whole CPUs (``ray start --num-cpus`` takes an integer). One training worker per pod."""
    s = spec.scaling
    return max(1, math.ceil(s.cpus_per_worker + s.data_cpus() - 1e-9))


def check_cpu_plan(spec: JobSpec) -> None:
    """ClusterError (one line) when the rendered cluster leaves Ray Data no CPU: the head has
    ``num-cpus: 0``, so the worker pods' spare CPUs are all that Ray Data gets."""
    s = spec.scaling
    cpus = worker_pod_cpus(spec)
    problem = s.cpu_shortfall(
        s.num_workers * cpus,
        f"the rendered pods ({s.num_workers} x {cpus}; the head has none)",
        "set scaling.data_cpus_per_worker above 0 (the default is 6 per GPU)",
    )
    if problem:
        raise ClusterError(problem)


def _worker_resources(spec: JobSpec) -> dict[str, Any]:
    s = spec.scaling
    base = GPU_WORKER if s.use_gpu else CPU_WORKER
    cpu = str(worker_pod_cpus(spec))
    # requests == limits: the CPUs Ray is told about (num-cpus) are guaranteed to the pod
    requests: dict[str, str] = {"cpu": cpu, "memory": base["memory"]}
    limits: dict[str, str] = {"cpu": cpu, "memory": base["memory"]}
    if s.use_gpu:
        # Kubernetes GPUs are whole devices: a fractional gpus_per_worker gets ceil() of them.
        gpus = str(math.ceil(s.gpus_per_worker))
        requests["nvidia.com/gpu"] = gpus
        limits["nvidia.com/gpu"] = gpus
    return {"requests": requests, "limits": limits}


def preemption_hook(spec: JobSpec) -> list[str]:
    """The worker pods' preStop command: `maskclip node-preempt` (the node's Ray address is
    KubeRay's RAY_ADDRESS), waiting at most cluster.stop_grace_s for the run's checkpoint."""
    return ["maskclip", "node-preempt", "--within", str(spec.cluster.stop_grace_s)]


def termination_grace_s(spec: JobSpec) -> int:
    """terminationGracePeriodSeconds of the head and worker pods: cluster.stop_grace_s for the
    checkpoint (the worker's preStop hook, or `maskclip stop`), then 30 s for Ray to stop."""
    return spec.cluster.stop_grace_s + 30


def config_map_name(spec: JobSpec) -> str:
    return f"{k8s_name(spec.run.name)}-spec"


def render_config_map(
    spec: JobSpec, spec_yaml: str, namespace: str = DEFAULT_NAMESPACE
) -> dict[str, Any]:
    name = k8s_name(spec.run.name)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": config_map_name(spec),
            "namespace": namespace,
            "labels": {**LABELS, "maskclip.io/run": name},
        },
        "data": {SPEC_FILE: spec_yaml},
    }


def render_rayjob(
    spec: JobSpec,
    spec_yaml: str,
    image: str | None = None,
    namespace: str = DEFAULT_NAMESPACE,
    *,
    ttl_seconds_after_finished: int = 3600,
    backoff_limit: int | None = None,
    active_deadline_seconds: int | None = None,
    shm_size: str = "10Gi",
) -> dict[str, Any]:
    """The RayJob for a spec; ``spec_yaml`` is what the ConfigMap ships (its hash is annotated so
    a changed spec shows up in ``kubectl diff``)."""
    image = check_image(image) if image else default_image()
    check_cpu_plan(spec)
    name = k8s_name(spec.run.name)
    cm = config_map_name(spec)
    s = spec.scaling
    env = _env(spec)
    head = _pod_template(
        component="ray-head",
        service_account=HEAD_SERVICE_ACCOUNT,
        run_label=name,
        container={
            "name": "ray-head",
            "image": image,
            "ports": [{"name": n, "containerPort": p} for n, p in RAY_PORTS.items()],
            "env": [
                *env,
                {"name": "RAY_JOB_STOP_WAIT_TIME_S", "value": str(spec.cluster.stop_grace_s)},
            ],
            "resources": HEAD_RESOURCES,
        },
        config_map=cm,
        shm="3Gi",  # Ray's object store takes 30% of the memory limit
    )
    group = "gpu" if s.use_gpu else "cpu"
    tolerations = (
        [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        if s.use_gpu
        else None
    )
    worker = _pod_template(
        component="ray-worker",
        service_account=WORKER_SERVICE_ACCOUNT,
        run_label=name,
        container={
            "name": "ray-worker",
            "image": image,
            "env": env,
            "resources": _worker_resources(spec),
            # a worker pod told to stop (a spot reclaim, a drained node, a deleted pod) first
            # tells the run: Ray drains the node, the run checkpoints at its next step, and
            # the hook returns once that checkpoint is on storage (service.control)
            "lifecycle": {"preStop": {"exec": {"command": preemption_hook(spec)}}},
        },
        config_map=cm,
        shm=shm_size,
        tolerations=tolerations,
    )
    submitter = _pod_template(
        component="ray-job-submitter",
        service_account=SUBMITTER_SERVICE_ACCOUNT,
        run_label=name,
        container={
            "name": "ray-job-submitter",
            "image": image,
            # `ray job submit` needs the token; it needs no S3 and no MLflow credentials.
            "env": [*ray_auth_env(), {"name": "HOME", "value": HOME}],
            "resources": SUBMITTER_RESOURCES,
        },
        config_map=None,
        shm=None,
        restart_policy="Never",
    )
    job_spec: dict[str, Any] = {
        "entrypoint": ENTRYPOINT,
        "submissionMode": "K8sJobMode",
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": int(ttl_seconds_after_finished),
        "backoffLimit": int(spec.cluster.backoff_limit if backoff_limit is None else backoff_limit),
        "rayClusterSpec": {
            "rayVersion": RAY_VERSION,
            # KubeRay reads the token from this Secret (key auth_token) for its own dashboard
            # calls and injects it into every Ray container; it generates no Secret of its own.
            "authOptions": {"mode": "token", "secretName": RAY_TOKEN_SECRET},
            "headGroupSpec": {
                "serviceType": "ClusterIP",
                # No training and no Ray Data tasks on the head: it runs the GCS, dashboard,
                # the job's driver and Ray Data's scheduling loop (CPU-light, see data_pacing).
                "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
                "template": head,
            },
            "workerGroupSpecs": [
                {
                    "groupName": group,
                    "replicas": s.num_workers,
                    "minReplicas": s.num_workers,
                    "maxReplicas": s.num_workers,
                    # one training worker (cpus_per_worker) + Ray Data (data_cpus_per_worker)
                    "rayStartParams": {"num-cpus": str(worker_pod_cpus(spec))},
                    "template": worker,
                }
            ],
        },
        "submitterPodTemplate": submitter,
    }
    for template in (head, worker):  # stopping checkpoints first: give it the time
        template["spec"]["terminationGracePeriodSeconds"] = termination_grace_s(spec)
    c = spec.cluster
    if c.gcs_redis_address:
        gcs: dict[str, Any] = {"redisAddress": c.gcs_redis_address}
        if c.gcs_redis_auth_from:
            ref = {"name": c.gcs_redis_auth_from, "key": "password"}
            gcs["redisPassword"] = {"valueFrom": {"secretKeyRef": ref}}
        job_spec["rayClusterSpec"]["gcsFaultToleranceOptions"] = gcs
    if active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = int(active_deadline_seconds)
    rayjob = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {
                **LABELS,
                "app.kubernetes.io/name": "maskclip-rayjob",
                "maskclip.io/run": name,
            },
            "annotations": {
                "maskclip.io/run-name": spec.run.name,
                "maskclip.io/spec-sha256": hashlib.sha256(spec_yaml.encode()).hexdigest(),
            },
        },
        "spec": job_spec,
    }
    return copy.deepcopy(rayjob)  # no shared sub-objects (no YAML aliases, safe to edit)


def network_policy_name(spec: JobSpec) -> str:
    return f"{k8s_name(spec.run.name)}-ray"


def render_network_policy(spec: JobSpec, namespace: str = DEFAULT_NAMESPACE) -> dict[str, Any]:
    """The run's pods (head, workers, submitter: label ``maskclip.io/run``) talk to each other on
    any port; the KubeRay operator reaches the head's dashboard (it polls the job's status there).
    Nothing else reaches them: k8s/networkpolicy.yaml denies all other traffic in the namespace
    and allows DNS, HTTPS egress (S3, STS) and MLflow."""
    name = k8s_name(spec.run.name)
    run = {"matchLabels": {"maskclip.io/run": name}}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": network_policy_name(spec),
            "namespace": namespace,
            "labels": {**LABELS, "maskclip.io/run": name},
        },
        "spec": {
            "podSelector": run,
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [
                {"from": [{"podSelector": run}]},
                {
                    "from": [
                        {
                            "namespaceSelector": {
                                "matchLabels": {
                                    "kubernetes.io/metadata.name": KUBERAY_OPERATOR_NAMESPACE
                                }
                            },
                            "podSelector": {
                                "matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}
                            },
                        }
                    ],
                    "ports": [{"protocol": "TCP", "port": RAY_PORTS["dashboard"]}],
                },
            ],
            "egress": [{"to": [{"podSelector": run}]}],
        },
    }


def render_manifests(
    spec: JobSpec,
    spec_yaml: str | None = None,
    image: str | None = None,
    namespace: str = DEFAULT_NAMESPACE,
    **options: Any,
) -> list[dict[str, Any]]:
    """[ConfigMap with ``job.yaml``, the run's NetworkPolicy, RayJob] — apply them together.
    ``spec_yaml`` defaults to the spec as it runs on a cluster (``scaling.ray_address: auto``);
    ``options`` go to :func:`render_rayjob`."""
    spec_yaml = shipped_yaml(for_cluster(spec)) if spec_yaml is None else spec_yaml
    return [
        render_config_map(spec, spec_yaml, namespace),
        render_network_policy(spec, namespace),
        render_rayjob(spec, spec_yaml, image, namespace, **options),
    ]


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str_presenter(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    style = "|" if "\n" in data else None  # the shipped spec stays readable
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str_presenter)


def dump_manifests(docs: list[dict[str, Any]]) -> str:
    """Multi-document YAML (``---`` between documents)."""
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, explicit_start=True)
