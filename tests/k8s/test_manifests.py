"""The manifests in k8s/ and the Dockerfile: strict schema validation and house rules.

Schemas: core kinds from kubernetes-validate's bundled ones, KubeRay kinds from the CRDs in
$MASKCLIP_KUBERAY_SCHEMAS (default ../shared/schemas/kuberay); tests needing them skip otherwise,
and fail under CI=true. Auth, network policies, the restricted profile and service accounts:
test_security.py.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from tests.lock import LOCK, lock_pins

try:
    from tests.k8s.k8s_validation import (
        iter_containers,
        iter_pod_specs,
        load_manifests,
        validate_manifest,
    )
except ImportError:  # tests/ not importable as a package: pytest put this directory on sys.path
    from k8s_validation import iter_containers, iter_pod_specs, load_manifests, validate_manifest

REPO = Path(__file__).resolve().parents[2]
K8S_DIR = REPO / "k8s"
DOCKERFILE = REPO / "Dockerfile"
RAY_KINDS = {"RayCluster", "RayJob", "RayService"}

MANIFEST_FILES = sorted(p for p in K8S_DIR.glob("*.y*ml") if p.name != "kustomization.yaml")
DOCS = [(p, i, d) for p in MANIFEST_FILES for i, d in enumerate(load_manifests(p))]
DOC_IDS = [f"{p.name}#{i}:{d.get('kind')}" for p, i, d in DOCS]


def _docs(kind: str) -> list[dict]:
    return [d for _, _, d in DOCS if d.get("kind") == kind]


def _one(kind: str, name: str) -> dict:
    found = [d for d in _docs(kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name} in k8s/, found {len(found)}"
    return copy.deepcopy(found[0])


def _dockerfile_arg(name: str) -> str:
    m = re.search(rf"^\s*ARG\s+{name}=(\S+)\s*$", DOCKERFILE.read_text(), re.M)
    assert m, f"Dockerfile has no 'ARG {name}=...' line"
    return m.group(1).strip("\"'")


# ----------------------------------------------------------------------------- validation


def test_k8s_dir_has_manifests():
    kinds = {d["kind"] for _, _, d in DOCS}
    assert {
        "Namespace",
        "ServiceAccount",
        "Deployment",
        "Service",
        "RayCluster",
        "NetworkPolicy",
    } <= kinds


@pytest.mark.parametrize("path,index,doc", DOCS, ids=DOC_IDS)
def test_manifest_validates(path, index, doc, request):
    if doc.get("kind") in RAY_KINDS:
        request.getfixturevalue("kuberay_schemas")
    errors = validate_manifest(doc)
    assert errors == [], f"{path.name} doc {index}:\n" + "\n".join(errors)


def _set(doc: dict, path: str, value) -> dict:
    """Return a copy of doc with the dotted path (ints index lists) set to value."""
    out = copy.deepcopy(doc)
    node = out
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]
    for k in keys[:-1]:
        node = node[k]
    node[keys[-1]] = value
    return out


RAY_BREAKAGES = {
    "worker replicas wrong type": ("spec.workerGroupSpecs.0.replicas", "two"),
    "worker group field typo": ("spec.workerGroupSpecs.0.maxReplica", 4),
    "spec field typo": ("spec.enableInTreeAutoScaling", True),
    "rayStartParams value not a string": ("spec.headGroupSpec.rayStartParams.num-cpus", 0),
    "container field typo (pod template)": (
        "spec.headGroupSpec.template.spec.containers.0.imagePullPolicyy",
        "Always",
    ),
    "pod template metadata typo": (
        "spec.headGroupSpec.template.metadata.labelz",
        {"a": "b"},
    ),
    "pod spec field typo (pod template)": (
        "spec.workerGroupSpecs.0.template.spec.tolerationz",
        [],
    ),
}


@pytest.mark.parametrize("path,value", RAY_BREAKAGES.values(), ids=list(RAY_BREAKAGES))
def test_broken_raycluster_is_rejected(kuberay_schemas, path, value):
    good = _one("RayCluster", "maskclip")
    assert validate_manifest(good) == []
    errors = validate_manifest(_set(good, path, value))
    assert errors, f"validator accepted a RayCluster with {path}={value!r}"


def test_raycluster_missing_max_replicas_is_rejected(kuberay_schemas):
    bad = _one("RayCluster", "maskclip")
    del bad["spec"]["workerGroupSpecs"][0]["maxReplicas"]
    assert any("maxReplicas" in e for e in validate_manifest(bad))


CORE_BREAKAGES = {
    "deployment replicas wrong type": ("Deployment", "mlflow", "spec.replicas", "two"),
    "container field typo": (
        "Deployment",
        "mlflow",
        "spec.template.spec.containers.0.resouces",
        {},
    ),
    "service port wrong type": ("Service", "mlflow", "spec.ports.0.port", "five-thousand"),
    "service spec typo": ("Service", "mlflow", "spec.clusterIp", "None"),
    "service account typo": ("ServiceAccount", "maskclip-ray-head", "automountToken", True),
    "network policy typo": ("NetworkPolicy", "default-deny-all", "spec.policyType", ["Ingress"]),
}


@pytest.mark.parametrize("kind,name,path,value", CORE_BREAKAGES.values(), ids=list(CORE_BREAKAGES))
def test_broken_core_manifest_is_rejected(kind, name, path, value):
    good = _one(kind, name)
    assert validate_manifest(good) == []
    assert validate_manifest(_set(good, path, value)), f"accepted {kind} with {path}={value!r}"


def test_missing_schemas_fail_in_ci_and_skip_elsewhere(tmp_path, monkeypatch):
    """A pipeline that lost the CRD schemas must not report the KubeRay manifests as valid."""
    try:
        from tests.k8s.k8s_validation import require_kuberay_schemas
    except ImportError:
        from k8s_validation import require_kuberay_schemas

    monkeypatch.setenv("MASKCLIP_KUBERAY_SCHEMAS", str(tmp_path))  # an empty directory
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true and KubeRay CRD schema not found"):
        require_kuberay_schemas("RayJob")
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception, match="KubeRay CRD schema not found"):
        require_kuberay_schemas("RayJob")
    monkeypatch.delenv("MASKCLIP_KUBERAY_SCHEMAS")
    monkeypatch.setenv("CI", "true")
    require_kuberay_schemas("RayCluster", "RayJob")  # present: neither skips nor fails


def test_broken_rayjob_is_rejected(kuberay_schemas):
    """The RayJob schema is wired too: a RayJob built from our RayCluster validates, typos don't."""
    cluster = _one("RayCluster", "maskclip")
    job = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": "maskclip-smoke", "namespace": "maskclip"},
        "spec": {
            "entrypoint": "maskclip run jobs/quickstart.yaml",
            "shutdownAfterJobFinishes": True,
            "rayClusterSpec": cluster["spec"],
        },
    }
    assert validate_manifest(job) == []
    assert validate_manifest(_set(job, "spec.shutdownAfterJobFinishes", "yes"))
    assert validate_manifest(_set(job, "spec.entryPoint", "x"))
    assert validate_manifest(
        _set(job, "spec.rayClusterSpec.workerGroupSpecs.0.template.spec.containers.0.imag", "x")
    )


# ----------------------------------------------------------------------------- house rules


@pytest.mark.parametrize("path,index,doc", DOCS, ids=DOC_IDS)
def test_every_container_has_requests_and_limits(path, index, doc):
    for where, container in iter_containers(doc):
        resources = container.get("resources") or {}
        for section in ("requests", "limits"):
            values = resources.get(section) or {}
            missing = {"cpu", "memory"} - set(values)
            assert not missing, f"{path.name} {where}: resources.{section} lacks {sorted(missing)}"


def test_services_are_cluster_ip():
    services = _docs("Service")
    assert services
    for svc in services:
        assert svc["spec"].get("type", "ClusterIP") == "ClusterIP", svc["metadata"]["name"]
    for cluster in _docs("RayCluster"):
        head = cluster["spec"]["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP"
        assert not cluster["spec"].get("headServiceAnnotations")


@pytest.mark.parametrize("path,index,doc", DOCS, ids=DOC_IDS)
def test_pods_run_as_non_root(path, index, doc):
    for where, pod in iter_pod_specs(doc):
        pod_sc = pod.get("securityContext") or {}
        assert pod_sc.get("runAsNonRoot") is True, f"{path.name} {where}: runAsNonRoot"
        assert pod_sc.get("runAsUser", 0) != 0, f"{path.name} {where}: runAsUser"
        assert pod.get("serviceAccountName", "default") != "default", f"{path.name} {where}"
        for c in (pod.get("initContainers") or []) + pod.get("containers", []):
            sc = c.get("securityContext") or {}
            assert sc.get("allowPrivilegeEscalation") is False, f"{where} {c['name']}"
            assert sc.get("privileged") is not True, f"{where} {c['name']}"
            assert sc.get("runAsUser", pod_sc.get("runAsUser")) != 0, f"{where} {c['name']}"


@pytest.mark.parametrize("path,index,doc", DOCS, ids=DOC_IDS)
def test_containers_have_read_only_root_and_writable_scratch(path, index, doc):
    """Every container runs on a read-only root filesystem; what Ray, Python and torch write
    (/tmp, /tmp/ray, $HOME caches) goes to mounted emptyDirs."""
    for where, pod in iter_pod_specs(doc):
        volumes = {v["name"]: v for v in pod.get("volumes") or []}
        for c in (pod.get("initContainers") or []) + pod.get("containers", []):
            sc = c.get("securityContext") or {}
            name = f"{path.name} {where} {c['name']}"
            assert sc.get("readOnlyRootFilesystem") is True, name
            mounts = {m["mountPath"]: m for m in c.get("volumeMounts") or []}
            assert "/tmp" in mounts, f"{name}: /tmp must be a writable volume"
            for m in mounts.values():
                assert m["name"] in volumes, f"{name}: mount of undeclared volume {m['name']}"
            if doc["kind"] in ("RayCluster", "RayJob"):
                home = {e["name"]: e.get("value") for e in c.get("env") or []}.get("HOME")
                assert home in mounts and "emptyDir" in volumes[mounts[home]["name"]], name
                assert "emptyDir" in volumes[mounts["/tmp/ray"]["name"]], name


def test_raycluster_shape():
    spec = _one("RayCluster", "maskclip")["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    (gpu,) = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu"]
    assert (gpu["replicas"], gpu["minReplicas"], gpu["maxReplicas"]) == (0, 0, 4)
    pod = gpu["template"]["spec"]
    assert any(
        t.get("key") == "nvidia.com/gpu" and t.get("effect") == "NoSchedule"
        for t in pod.get("tolerations", [])
    )
    (worker,) = pod["containers"]
    assert str(worker["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    for template in (head["template"], gpu["template"]):
        for c in template["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert env.get("MLFLOW_TRACKING_URI") == "http://mlflow.maskclip.svc:5000"
            assert env.get("AWS_REGION")


def test_mlflow_takes_its_database_from_a_secret_not_in_the_repo():
    deploy = _one("Deployment", "mlflow")
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in c["env"]}
    ref = env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] and ref["key"]
    assert env["MLFLOW_ARTIFACTS_DESTINATION"]["value"].startswith("s3://")
    assert "--serve-artifacts" in " ".join(c.get("command", []) + c.get("args", []))
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"])
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health"
    assert not _docs("Secret"), "Secrets must be created out of band, never committed"


def test_mlflow_service_matches_tracking_uri():
    svc = _one("Service", "mlflow")
    assert svc["metadata"]["namespace"] == "maskclip"
    assert [p["port"] for p in svc["spec"]["ports"]] == [5000]
    deploy = _one("Deployment", "mlflow")
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()


def test_namespaced_objects_live_in_maskclip():
    for path, _, doc in DOCS:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "maskclip", f"{path.name} {doc['kind']}"


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    listed = kustomization.get("resources", [])
    assert len(listed) == len(set(listed)), "duplicate entries"
    assert sorted(listed) == sorted(p.name for p in MANIFEST_FILES)


# ----------------------------------------------------------------------------- image


def test_ray_version_agrees_across_lock_image_manifests_and_render():
    """One Ray version in the lock, the image, the long-lived cluster and rendered RayJobs, checked
    file against file: what pip installed here plays no part, so a newer Ray on PyPI changes
    nothing until the lock moves (and then this names every place that must move with it)."""
    from service.k8s import RAY_VERSION

    locked = lock_pins(LOCK)["ray"]
    assert len(locked) == 1, f"{LOCK.name} pins ray more than once: {sorted(locked)}"
    (pinned,) = locked
    assert re.fullmatch(r"\d+\.\d+\.\d+", pinned), pinned
    where = {
        "Dockerfile ARG RAY_VERSION": _dockerfile_arg("RAY_VERSION"),
        "k8s/raycluster.yaml rayVersion": _one("RayCluster", "maskclip")["spec"]["rayVersion"],
        "service/k8s.py RAY_VERSION (maskclip render)": RAY_VERSION,
    }
    wrong = {k: v for k, v in where.items() if v != pinned}
    assert not wrong, f"{LOCK.name} pins ray=={pinned}; these differ: {wrong}"


def test_image_installs_everything_from_the_lock():
    """The image takes its packages from the lock, hash-checked, and the project without deps:
    no pip install that could resolve a version of its own."""
    text = DOCKERFILE.read_text()
    commands = re.split(r"&&|\n(?!\s)", text.replace("\\\n", " "))
    installs = [c.split() for c in commands if "pip install" in c]
    assert len(installs) == 2
    for words in installs:
        from_lock = "--require-hashes" in words and "requirements.lock" in words
        project_only = "--no-deps" in words and words[-1] == "."
        assert from_lock or project_only, f"Dockerfile: {' '.join(words)}"
    assert re.search(r"^COPY requirements\.lock \./$", text, re.M)
    assert "--index-url" not in text and "--extra-index-url" not in text


def test_dockerfile_runs_as_non_root_user():
    text = DOCKERFILE.read_text()
    users = re.findall(r"^\s*USER\s+(\S+)", text, re.M)
    assert users, "Dockerfile never sets USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}, f"final USER is {users[-1]}"
    assert re.search(r"useradd\b.*--uid 1000\b.*\bmaskclip\b", text)
    assert re.search(r"^\s*WORKDIR\s+/app\s*$", text, re.M)
    assert re.search(r"^\s*ENTRYPOINT\s+.*maskclip", text, re.M)


SECRET_PATTERNS = [
    r"AWS_SECRET_ACCESS_KEY\s*[=\s]\s*\S",
    r"AWS_ACCESS_KEY_ID\s*[=\s]\s*\S",
    r"AWS_SESSION_TOKEN\s*[=\s]\s*\S",
    r"AKIA[0-9A-Z]{16}",
    r"(?i)\w*PASSWORD\w*\s*=\s*\S",
    r"(?i)\w*TOKEN\w*\s*=\s*\S",
    r"(?i)\w*SECRET\w*\s*=\s*\S",
    r"(?i)-----BEGIN [A-Z ]*PRIVATE KEY-----",
]


@pytest.mark.parametrize("path", [DOCKERFILE, REPO / ".dockerignore", *MANIFEST_FILES], ids=str)
def test_no_secrets_in_image_or_manifests(path):
    text = path.read_text()
    for pattern in SECRET_PATTERNS:
        assert not re.search(pattern, text), f"{path.name} matches {pattern}"


def test_dockerignore_keeps_local_state_out():
    ignored = {
        line.strip().rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", "data", "runs", "mlruns", ".pytest_cache"} <= ignored
