"""The control plane as deployed: `maskclip render jobs/s3.yaml` plus the k8s/ manifests.

Each check is a function returning the problems it finds, run on the real manifests (no problem)
and on a copy with one fault planted (that problem found), so a check that cannot fail would show:
  auth       Ray token auth on (KubeRay authOptions + RAY_AUTH_MODE), the token from a Secret;
             MLflow's basic-auth app, its credentials and the clients' from Secrets
  network    a default-deny NetworkPolicy; who reaches the Ray head and MLflow is computed from
             the policies (ingress of the target AND egress of the source, as a CNI enforces)
  pods       the restricted Pod Security Standard on the namespace and in every pod
  identity   one service account per role; an API token only where the autoscaler runs
"""

from __future__ import annotations

import copy
import ipaddress
from pathlib import Path

import pytest
import yaml

from service.cli import main

try:
    from tests.k8s.k8s_validation import (
        iter_containers,
        iter_pod_specs,
        iter_pod_templates,
        load_manifests,
        validate_manifest,
    )
except ImportError:  # tests/ not importable as a package: pytest put this directory on sys.path
    from k8s_validation import (
        iter_containers,
        iter_pod_specs,
        iter_pod_templates,
        load_manifests,
        validate_manifest,
    )

REPO = Path(__file__).resolve().parents[2]
K8S_FILES = sorted(p for p in (REPO / "k8s").glob("*.yaml") if p.name != "kustomization.yaml")
RAY_KINDS = {"RayCluster", "RayJob"}
NS = "maskclip"
RAY_PORTS = (6379, 8265, 10001)
SECRET_ENV_WORDS = ("TOKEN", "PASSWORD", "SECRET", "KEY_ID", "ACCESS_KEY")


def _render(capsys, *argv: str) -> list[dict]:
    assert main(["render", "jobs/s3.yaml", *argv]) == 0
    return [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]


@pytest.fixture
def rendered(capsys, monkeypatch) -> list[dict]:
    monkeypatch.chdir(REPO)
    return _render(capsys)


@pytest.fixture
def deployed(rendered) -> list[dict]:
    """k8s/ plus one rendered run: what a namespace holds while a RayJob runs."""
    return [d for p in K8S_FILES for d in load_manifests(p)] + rendered


def _one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env") or []}


def _secret_ref(env: dict) -> tuple[str, str] | None:
    ref = (env.get("valueFrom") or {}).get("secretKeyRef")
    return (ref["name"], ref["key"]) if ref else None


# ----------------------------------------------------------------------------- checks: auth


def auth_problems(docs: list[dict]) -> list[str]:
    problems = []
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] == "Secret":
            problems.append(f"{name}: a Secret in the manifests")
        for where, c in iter_containers(doc):
            for env in (c.get("env") or []) if isinstance(c.get("env"), list) else []:
                if any(w in env["name"] for w in SECRET_ENV_WORDS) and "value" in env:
                    problems.append(f"{name} {where}: {env['name']} has a literal value")
        if doc["kind"] not in RAY_KINDS:
            continue
        auth = _cluster_spec(doc).get("authOptions") or {}
        secret = auth.get("secretName")
        if auth.get("mode") != "token" or not secret:
            problems.append(f"{name}: authOptions is not mode token with a secretName ({auth})")
        for where, template in iter_pod_templates(doc):
            for c in template["spec"]["containers"]:
                env = _env(c)
                if (env.get("RAY_AUTH_MODE") or {}).get("value") != "token":
                    problems.append(f"{name} {where}: RAY_AUTH_MODE is not token")
                if _secret_ref(env.get("RAY_AUTH_TOKEN") or {}) != (secret, "auth_token"):
                    problems.append(f"{name} {where}: RAY_AUTH_TOKEN not from Secret {secret}")
                if "submitter" in where:
                    continue
                for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                    if not _secret_ref(env.get(var) or {}):
                        problems.append(f"{name} {where}: {var} not from a Secret")
    for doc in docs:
        if doc["kind"] == "Deployment" and doc["metadata"]["name"] == "mlflow":
            (c,) = doc["spec"]["template"]["spec"]["containers"]
            command = " ".join(c.get("command", []) + c.get("args", []))
            if "--app-name basic-auth" not in command:
                problems.append("mlflow: not started with --app-name basic-auth")
            env = _env(c)
            for var in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
                if not _secret_ref(env.get(var) or {}):
                    problems.append(f"mlflow: {var} not from a Secret")
    return problems


def test_auth_is_on_and_secrets_come_from_secrets(deployed):
    assert auth_problems(deployed) == []
    # the rendered RayJob and the RayCluster use one token Secret, the one the CLI documents
    secrets = {
        _cluster_spec(d)["authOptions"]["secretName"] for d in deployed if d["kind"] in RAY_KINDS
    }
    assert secrets == {"maskclip-ray-token"}


AUTH_FAULTS = {
    "authOptions removed": (
        "RayJob",
        lambda d: d["spec"]["rayClusterSpec"].pop("authOptions"),
        "authOptions is not mode token",
    ),
    "auth mode disabled": (
        "RayCluster",
        lambda d: d["spec"]["authOptions"].update(mode="disabled"),
        "authOptions is not mode token",
    ),
    "literal token": (
        "RayJob",
        lambda d: d["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["env"].append(
            {"name": "RAY_AUTH_TOKEN", "value": "s3cr3t"}
        ),
        "RAY_AUTH_TOKEN has a literal value",
    ),
    "worker without RAY_AUTH_MODE": (
        "RayCluster",
        lambda d: d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].update(
            env=[{"name": "HOME", "value": "/home/maskclip"}]
        ),
        "RAY_AUTH_MODE is not token",
    ),
    "mlflow without basic-auth": (
        "Deployment",
        lambda d: d["spec"]["template"]["spec"]["containers"][0].update(
            args=["exec mlflow server --host 0.0.0.0"]
        ),
        "not started with --app-name basic-auth",
    ),
}


@pytest.mark.parametrize("kind,plant,expected", AUTH_FAULTS.values(), ids=list(AUTH_FAULTS))
def test_auth_check_finds_a_planted_fault(deployed, kind, plant, expected):
    docs = copy.deepcopy(deployed)
    plant(next(d for d in docs if d["kind"] == kind))
    assert any(expected in p for p in auth_problems(docs)), auth_problems(docs)


# ----------------------------------------------------------------------------- checks: network


def _selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, f"selector not modelled here: {selector}"
    return (selector.get("matchLabels") or {}).items() <= labels.items()


class Pod:
    def __init__(self, name: str, labels: dict, namespace: str = NS, ip: str = "10.42.3.7"):
        self.name, self.labels, self.namespace, self.ip = name, labels, namespace, ip
        self.ns_labels = {"kubernetes.io/metadata.name": namespace}


def _peer_matches(peer: dict, policy_ns: str, pod: Pod) -> bool:
    if "ipBlock" in peer:
        ip = ipaddress.ip_address(pod.ip)
        block = peer["ipBlock"]
        return ip in ipaddress.ip_network(block["cidr"]) and not any(
            ip in ipaddress.ip_network(e) for e in block.get("except") or []
        )
    if "namespaceSelector" in peer:
        if not _selects(peer["namespaceSelector"], pod.ns_labels):
            return False
    elif pod.namespace != policy_ns:
        return False
    return _selects(peer.get("podSelector") or {}, pod.labels)


def _port_matches(ports: list[dict] | None, port: int) -> bool:
    return not ports or any(
        p.get("protocol", "TCP") == "TCP" and p.get("port") in (None, port) for p in ports
    )


def _admits(policies: list[dict], pod: Pod, peer: Pod, port: int, direction: str) -> bool:
    key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    applicable = [
        p
        for p in policies
        if p["metadata"]["namespace"] == pod.namespace
        and _selects(p["spec"]["podSelector"], pod.labels)
        and direction in p["spec"].get("policyTypes", ["Ingress"])
    ]
    if not applicable:
        return True  # not isolated in this direction
    return any(
        _port_matches(rule.get("ports"), port)
        and (
            not rule.get(peers_key)
            or any(_peer_matches(x, p["metadata"]["namespace"], peer) for x in rule[peers_key])
        )
        for p in applicable
        for rule in p["spec"].get(key) or []
    )


def reachable(docs: list[dict], src: Pod, dst: Pod, port: int) -> bool:
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    return _admits(policies, src, dst, port, "Egress") and _admits(
        policies, dst, src, port, "Ingress"
    )


def _pods(docs: list[dict]) -> dict[str, Pod]:
    """A pod per template, keyed ``<object>/<component>`` (labels as in the template)."""
    out = {}
    for doc in docs:
        for where, template in iter_pod_templates(doc):
            part = "head" if "head" in where else "submitter" if "submitter" in where else None
            part = part or ("worker" if "worker" in where else "pod")
            labels = (template.get("metadata") or {}).get("labels") or {}
            out[f"{doc['kind']}/{doc['metadata']['name']}/{part}"] = Pod(where, labels)
    return out


def _default_deny(docs: list[dict]) -> bool:
    return any(
        d["kind"] == "NetworkPolicy"
        and d["spec"]["podSelector"] == {}
        and set(d["spec"].get("policyTypes", [])) == {"Ingress", "Egress"}
        and not d["spec"].get("ingress")
        and not d["spec"].get("egress")
        for d in docs
    )


def test_namespace_denies_by_default(deployed):
    assert _default_deny(deployed)
    stranger = Pod("stranger", {"app": "debug"})
    mlflow = _pods(deployed)["Deployment/mlflow/pod"]
    assert not reachable(deployed, stranger, Pod("any", {}), 8080)
    assert not reachable(deployed, mlflow, Pod("internet", {}, ip="93.184.216.34"), 80)
    assert reachable(deployed, mlflow, Pod("s3", {}, namespace="aws", ip="52.216.0.1"), 443)
    imds = Pod("imds", {}, namespace="node", ip="169.254.169.254")
    assert not reachable(deployed, mlflow, imds, 443) and not reachable(deployed, mlflow, imds, 80)


def test_ray_heads_reachable_only_from_their_own_pods(deployed, capsys):
    pods = _pods(deployed)
    job = next(d for d in deployed if d["kind"] == "RayJob")["metadata"]["name"]
    other = _pods(_render(capsys, "--set", "run.name=another-run"))
    operator = Pod("op", {"app.kubernetes.io/name": "kuberay-operator"}, namespace="kuberay-system")
    client = Pod("notebook", {"maskclip.io/ray-client": "true"})
    outsiders = {
        "mlflow": pods["Deployment/mlflow/pod"],
        "unlabelled pod": Pod("debug", {"app": "debug"}),
        "other namespace": Pod("x", {}, namespace="default"),
        "operator-named pod elsewhere": Pod("x", operator.labels, namespace="default"),
    }
    # the rendered RayJob: its workers and submitter reach every head port; nobody else does
    head = pods[f"RayJob/{job}/head"]
    for port in RAY_PORTS:
        for part in ("worker", "submitter"):
            assert reachable(deployed, pods[f"RayJob/{job}/{part}"], head, port), (part, port)
        for name, pod in {
            **outsiders,
            "another run's worker": other["RayJob/another-run/worker"],
            "the RayCluster's worker": pods["RayCluster/maskclip/worker"],
            "a ray-client pod": client,
        }.items():
            assert not reachable(deployed, pod, head, port), (name, port)
    assert reachable(deployed, operator, head, 8265)
    assert not reachable(deployed, operator, head, 6379)
    # the interactive RayCluster: its workers, labelled clients (8265/10001) and the operator
    head = pods["RayCluster/maskclip/head"]
    for port in RAY_PORTS:
        assert reachable(deployed, pods["RayCluster/maskclip/worker"], head, port)
        assert reachable(deployed, client, head, port) == (port != 6379), port
        for name, pod in {**outsiders, "a RayJob's worker": pods[f"RayJob/{job}/worker"]}.items():
            assert not reachable(deployed, pod, head, port), (name, port)
    assert reachable(deployed, operator, head, 8265)


def test_mlflow_reachable_from_the_namespace_only(deployed):
    pods = _pods(deployed)
    mlflow = pods["Deployment/mlflow/pod"]
    for key, pod in pods.items():
        if key != "Deployment/mlflow/pod":
            assert reachable(deployed, pod, mlflow, 5000), key
    assert reachable(deployed, Pod("notebook", {"maskclip.io/ray-client": "true"}), mlflow, 5000)
    assert not reachable(deployed, Pod("x", {}, namespace="default"), mlflow, 5000)
    assert not reachable(deployed, pods["RayCluster/maskclip/worker"], mlflow, 5001)


def test_network_model_sees_a_missing_default_deny(deployed):
    """Without default-deny-all and the per-run policy, a pod of another namespace reaches a
    RayJob head (the namespace-wide egress policy still holds back pods of this namespace)."""
    job = next(d for d in deployed if d["kind"] == "RayJob")["metadata"]["name"]
    stripped = [
        d
        for d in deployed
        if not (
            d["kind"] == "NetworkPolicy"
            and (
                d["metadata"]["name"] == "default-deny-all"
                or "maskclip.io/run" in d["metadata"]["labels"]
            )
        )
    ]
    assert not _default_deny(stripped)
    head = _pods(stripped)[f"RayJob/{job}/head"]
    outsider = Pod("x", {}, namespace="default")
    assert not reachable(deployed, outsider, _pods(deployed)[f"RayJob/{job}/head"], 8265)
    assert reachable(stripped, outsider, head, 8265)


# ----------------------------------------------------------------------------- checks: pods

ALLOWED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
    "projected", "secret",
}  # fmt: skip


def restricted_problems(docs: list[dict]) -> list[str]:
    """The restricted Pod Security Standard (v1.33), plus a read-only root filesystem."""
    problems = []
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] == "Namespace":
            labels = doc["metadata"].get("labels") or {}
            for mode in ("enforce", "audit", "warn"):
                if labels.get(f"pod-security.kubernetes.io/{mode}") != "restricted":
                    problems.append(f"{name}: pod-security.kubernetes.io/{mode} is not restricted")
        for where, pod in iter_pod_specs(doc):
            psc = pod.get("securityContext") or {}
            for key in ("hostNetwork", "hostPID", "hostIPC"):
                if pod.get(key):
                    problems.append(f"{name} {where}: {key}")
            for v in pod.get("volumes") or []:
                kind = (set(v) - {"name"}).pop()
                if kind not in ALLOWED_VOLUMES:
                    problems.append(f"{name} {where}: volume type {kind}")
            containers = [c for key in ("initContainers", "containers") for c in pod.get(key) or []]
            if doc["kind"] in RAY_KINDS and "head" in where:
                cspec = _cluster_spec(doc)
                if cspec.get("enableInTreeAutoscaling"):
                    options = cspec.get("autoscalerOptions") or {}
                    containers.append({"name": "autoscaler", **options})
            for c in containers:
                sc = c.get("securityContext") or {}
                cname = f"{name} {where} {c['name']}"
                if sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True:
                    problems.append(f"{cname}: runAsNonRoot")
                if sc.get("runAsUser", psc.get("runAsUser")) in (0, None):
                    problems.append(f"{cname}: runAsUser unset or 0")
                if sc.get("allowPrivilegeEscalation") is not False:
                    problems.append(f"{cname}: allowPrivilegeEscalation")
                if sc.get("privileged"):
                    problems.append(f"{cname}: privileged")
                caps = sc.get("capabilities") or {}
                if "ALL" not in (caps.get("drop") or []):
                    problems.append(f"{cname}: capabilities do not drop ALL")
                if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
                    problems.append(f"{cname}: adds capabilities {caps['add']}")
                seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
                if seccomp not in ("RuntimeDefault", "Localhost"):
                    problems.append(f"{cname}: seccompProfile {seccomp}")
                if any(p.get("hostPort") for p in c.get("ports") or []):
                    problems.append(f"{cname}: hostPort")
                if c["name"] != "autoscaler" and sc.get("readOnlyRootFilesystem") is not True:
                    problems.append(f"{cname}: root filesystem writable")
    return problems


def test_every_pod_is_restricted_compliant(deployed):
    assert restricted_problems(deployed) == []
    assert len(list(p for d in deployed for p in iter_pod_specs(d))) == 6


RESTRICTED_FAULTS = {
    "namespace not enforcing": (
        "Namespace",
        lambda d: d["metadata"]["labels"].update(
            {"pod-security.kubernetes.io/enforce": "baseline"}
        ),
        "enforce is not restricted",
    ),
    "capability kept": (
        "RayJob",
        lambda d: d["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["securityContext"][
            "capabilities"
        ].update(drop=["NET_RAW"]),
        "do not drop ALL",
    ),
    "escalation allowed": (
        "Deployment",
        lambda d: d["spec"]["template"]["spec"]["containers"][0]["securityContext"].update(
            allowPrivilegeEscalation=True
        ),
        "allowPrivilegeEscalation",
    ),
    "seccomp unconfined": (
        "RayJob",
        lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0][
            "securityContext"
        ].update(seccompProfile={"type": "Unconfined"}),
        "seccompProfile Unconfined",
    ),
    "autoscaler keeps capabilities": (
        "RayCluster",
        lambda d: d["spec"]["autoscalerOptions"]["securityContext"].pop("capabilities"),
        "autoscaler: capabilities do not drop ALL",
    ),
    "hostPath volume": (
        "RayCluster",
        lambda d: d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["volumes"].append(
            {"name": "h", "hostPath": {"path": "/"}}
        ),
        "volume type hostPath",
    ),
}


@pytest.mark.parametrize(
    "kind,plant,expected", RESTRICTED_FAULTS.values(), ids=list(RESTRICTED_FAULTS)
)
def test_restricted_check_finds_a_planted_fault(deployed, kind, plant, expected):
    docs = copy.deepcopy(deployed)
    plant(next(d for d in docs if d["kind"] == kind))
    assert any(expected in p for p in restricted_problems(docs)), restricted_problems(docs)


# ----------------------------------------------------------------------------- checks: identity

EXPECTED_ACCOUNTS = {
    "head": "maskclip-ray-head",
    "worker": "maskclip-ray-worker",
    "submitter": "maskclip-ray-submitter",
    "pod": "maskclip-mlflow",
}


def identity_problems(docs: list[dict]) -> list[str]:
    """One service account per role; an API token only in a pod that runs the autoscaler."""
    problems = []
    accounts = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceAccount"}
    for doc in docs:
        for where, template in iter_pod_templates(doc):
            pod = template["spec"]
            name = f"{doc['kind']}/{doc['metadata']['name']} {where}"
            part = "head" if "head" in where else "submitter" if "submitter" in where else None
            part = part or ("worker" if "worker" in where else "pod")
            account = pod.get("serviceAccountName")
            if account != EXPECTED_ACCOUNTS[part] or account not in accounts:
                problems.append(f"{name}: service account {account}")
                continue
            autoscaler = (
                part == "head"
                and doc["kind"] in RAY_KINDS
                and bool(_cluster_spec(doc).get("enableInTreeAutoscaling"))
            )
            mounted = pod.get(
                "automountServiceAccountToken",
                accounts[account].get("automountServiceAccountToken", True),
            )
            if mounted and not autoscaler:
                problems.append(f"{name}: mounts an API token without calling the API")
    for name, sa in accounts.items():
        if name != "maskclip-ray-head" and sa.get("automountServiceAccountToken") is not False:
            problems.append(f"ServiceAccount/{name}: automountServiceAccountToken not false")
    return problems


def test_identities_are_separate_and_tokens_mounted_only_for_the_autoscaler(deployed):
    assert identity_problems(deployed) == []
    cluster = _one(deployed, "RayCluster", "maskclip")
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    assert head["automountServiceAccountToken"] is True  # the autoscaler sidecar patches pods
    job = _one(deployed, "RayJob")
    assert not job["spec"]["rayClusterSpec"].get("enableInTreeAutoscaling")
    assert all(pod["automountServiceAccountToken"] is False for _, pod in iter_pod_specs(job))


IDENTITY_FAULTS = {
    "worker shares the head's account": (
        "RayCluster",
        lambda d: d["spec"]["workerGroupSpecs"][0]["template"]["spec"].update(
            serviceAccountName="maskclip-ray-head"
        ),
        "service account maskclip-ray-head",
    ),
    "RayJob head mounts a token": (
        "RayJob",
        lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"].update(
            automountServiceAccountToken=True
        ),
        "mounts an API token",
    ),
    "mlflow mounts a token": (
        "Deployment",
        lambda d: d["spec"]["template"]["spec"].pop("automountServiceAccountToken"),
        "mounts an API token",
    ),
}


@pytest.mark.parametrize("kind,plant,expected", IDENTITY_FAULTS.values(), ids=list(IDENTITY_FAULTS))
def test_identity_check_finds_a_planted_fault(deployed, kind, plant, expected):
    docs = copy.deepcopy(deployed)
    plant(next(d for d in docs if d["kind"] == kind))
    if kind == "Deployment":  # the pod falls back to its account: make that one mount, too
        next(d for d in docs if d["metadata"]["name"] == "maskclip-mlflow").pop(
            "automountServiceAccountToken"
        )
    assert any(expected in p for p in identity_problems(docs)), identity_problems(docs)


# ----------------------------------------------------------------------------- schemas


def test_everything_deployed_validates(deployed, kuberay_schemas):
    kinds = {d["kind"] for d in deployed}
    assert {"NetworkPolicy", "RayJob", "RayCluster", "Namespace", "ServiceAccount"} <= kinds
    for doc in deployed:
        assert validate_manifest(doc) == [], f"{doc['kind']}/{doc['metadata']['name']}"


def test_schema_rejects_a_bad_auth_mode(deployed, kuberay_schemas):
    job = copy.deepcopy(_one(deployed, "RayJob"))
    job["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "on"
    assert any("authOptions" in e for e in validate_manifest(job))
