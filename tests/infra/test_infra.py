"""infra/ (Terraform): every file parses, and its names agree with what k8s/ expects."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest
import yaml

hcl2 = pytest.importorskip("hcl2", reason="python-hcl2 is not installed")

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
K8S = REPO / "k8s"
TF_FILES = sorted(INFRA.glob("*.tf"))


def _unquote(value):
    """python-hcl2 >= 7 keeps the quotes of string literals and block labels; drop them."""
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    if isinstance(value, dict):
        return {_unquote(k): _unquote(v) for k, v in value.items() if k != "__is_block__"}
    if isinstance(value, list):
        return [_unquote(v) for v in value]
    return value


@cache
def _parse(path: Path) -> dict:
    with open(path) as f:
        return _unquote(hcl2.load(f))


def _blocks(kind: str) -> dict:
    """All top-level blocks of one kind across infra/*.tf, keyed by label(s)."""
    out: dict = {}
    for path in TF_FILES:
        for block in _parse(path).get(kind, []):
            out.update(block)
    return out


def _variables() -> dict:
    return {name: body.get("default") for name, body in _blocks("variable").items()}


def _k8s(kind: str, name: str) -> dict:
    for path in K8S.glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == kind and doc["metadata"]["name"] == name:
                return doc
    raise AssertionError(f"{kind}/{name} not found in k8s/")


def test_infra_has_terraform_files():
    names = {p.name for p in TF_FILES}
    assert {"variables.tf", "outputs.tf"} <= names
    assert (INFRA / "README.md").is_file()


@pytest.mark.parametrize("path", TF_FILES, ids=lambda p: p.name)
def test_tf_file_parses(path):
    parsed = _parse(path)
    assert isinstance(parsed, dict) and parsed, f"{path.name} parsed to nothing"


def test_bucket_defaults():
    v = _variables()
    assert v["data_bucket"] == "maskclip-data"
    assert v["artifact_bucket"] == "maskclip-artifacts"


def test_artifact_bucket_matches_mlflow_deployment():
    deploy = _k8s("Deployment", "mlflow")
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    destination = env["MLFLOW_ARTIFACTS_DESTINATION"]
    assert destination.startswith(f"s3://{_variables()['artifact_bucket']}/"), destination


def test_runner_role_matches_service_account_annotation():
    v = _variables()
    sa = _k8s("ServiceAccount", v["k8s_service_account"])
    assert sa["metadata"]["namespace"] == v["k8s_namespace"]
    arn = sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert re.fullmatch(rf"arn:aws:iam::[A-Z0-9_]+:role/{re.escape(v['runner_role_name'])}", arn)


def test_irsa_binds_the_k8s_service_account():
    v = _variables()
    irsa = _blocks("module")["runner_irsa"]
    assert irsa["source"].endswith("//modules/iam-role-for-service-accounts-eks")
    assert irsa["role_name"] == "${var.runner_role_name}"
    bindings = [
        sa
        for provider in irsa["oidc_providers"].values()
        for sa in provider["namespace_service_accounts"]
    ]
    assert bindings == ["${var.k8s_namespace}:${var.k8s_service_account}"]
    assert (v["k8s_namespace"], v["k8s_service_account"]) == ("maskclip", "maskclip-runner")
    namespace = _k8s("Namespace", v["k8s_namespace"])
    assert namespace["metadata"]["name"] == "maskclip"


def test_runner_policy_is_least_privilege():
    text = (INFRA / "iam.tf").read_text()
    actions = set(re.findall(r'"(s3:[A-Za-z*]+)"', text))
    assert "s3:*" not in actions
    assert actions <= {
        "s3:GetObject",
        "s3:PutObject",
        "s3:DeleteObject",
        "s3:ListBucket",
        "s3:GetBucketLocation",
        "s3:AbortMultipartUpload",
        "s3:ListMultipartUploadParts",
    }
    # writes to the data bucket only under the checkpoint prefix
    assert '${aws_s3_bucket.this["data"].arn}/${var.checkpoint_prefix}/*' in text


def test_buckets_are_private_and_encrypted():
    resources = _blocks("resource")
    assert "aws_s3_bucket_public_access_block" in resources
    block = resources["aws_s3_bucket_public_access_block"]["this"]
    for flag in (
        "block_public_acls",
        "block_public_policy",
        "ignore_public_acls",
        "restrict_public_buckets",
    ):
        assert block[flag] is True, flag
    assert "aws_s3_bucket_server_side_encryption_configuration" in resources


def test_gpu_node_group_is_tainted_and_scales_from_zero():
    eks = _blocks("module")["eks"]
    groups = eks["eks_managed_node_groups"]
    assert {"system", "gpu"} <= set(groups)
    gpu = groups["gpu"]
    assert gpu["min_size"] == 0
    taints = list(gpu["taints"].values())
    assert {"key": "nvidia.com/gpu", "value": "present", "effect": "NO_SCHEDULE"} in taints
    assert "taints" not in groups["system"]


def test_modules_and_chart_are_pinned():
    for name, module in _blocks("module").items():
        if module["source"].startswith(("./", "../")):
            continue
        assert re.fullmatch(r"\d+\.\d+\.\d+", module.get("version", "")), f"module {name}"
    release = _blocks("resource")["helm_release"]["kuberay_operator"]
    assert release["chart"] == "kuberay-operator"
    version = release["version"]
    if version.startswith("${var."):
        version = _variables()[version[len("${var.") : -1]]
    assert re.fullmatch(r"\d+\.\d+\.\d+", version), version


def test_cluster_version_matches_manifest_validation():
    """tests/k8s validates core kinds against the schemas of the Kubernetes version EKS runs."""
    source = (REPO / "tests" / "k8s" / "k8s_validation.py").read_text()
    m = re.search(r'^K8S_VERSION = "([\d.]+)"', source, re.M)
    assert m, "K8S_VERSION not found in tests/k8s/k8s_validation.py"
    assert _variables()["kubernetes_version"] == m.group(1)
