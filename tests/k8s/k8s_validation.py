"""Offline, strict validation of Kubernetes manifests (core kinds and KubeRay ``ray.io/v1``).

Usage from any test. ``tests.k8s.k8s_validation`` imports when the repository root is on
``sys.path`` (``python -m pytest``, or ``pythonpath = ["."]`` in the pytest config); tests inside
tests/k8s can also ``from k8s_validation import ...`` (pytest puts that directory on the path)::

    from tests.k8s.k8s_validation import validate_manifest, require_kuberay_schemas

    require_kuberay_schemas()            # skip when the CRD schemas are absent; FAIL under CI=true
    errors = validate_manifest(doc)      # [] when valid, else one readable line per problem
    assert not errors, "\\n".join(errors)

How it validates:

* ``RayCluster`` / ``RayJob`` / ``RayService``: ``jsonschema`` (Draft 7) against the CRD's
  ``spec.versions[name=v1].schema.openAPIV3Schema``, made strict by adding
  ``additionalProperties: false`` to every object schema that lists ``properties`` and does not
  carry ``x-kubernetes-preserve-unknown-fields`` (a real API server prunes unknown fields silently;
  ``kubectl --validate=strict`` rejects them; we want typos caught). Compiled validators are cached.
  Each pod template inside (head group, worker groups, a RayJob's ``rayClusterSpec`` and
  ``submitterPodTemplate``, a RayService's ``rayClusterConfig``) is *also* validated strictly as a
  core ``v1/PodTemplate`` with ``kubernetes_validate``.
* Core kinds (Namespace, ServiceAccount, Deployment, Service, ...):
  ``kubernetes_validate.validate(doc, K8S_VERSION, strict=True)``.

The CRD schemas are read from the directory in ``$MASKCLIP_KUBERAY_SCHEMAS``, default
``<repo>/../shared/schemas/kuberay``; they are never copied into the repository. A developer
without them gets skips; CI (``CI=true``, as GitHub Actions and most runners set it) gets a
failure, so a pipeline that lost the schemas cannot report the KubeRay manifests as valid.

Difference from a real API server to keep in mind: jsonschema does not apply a field's
``default:`` first, so fields with defaults that the CRD marks required (e.g. a worker group's
``maxReplicas``) must be written explicitly.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMA_DIR_ENV = "MASKCLIP_KUBERAY_SCHEMAS"
DEFAULT_SCHEMA_DIR = REPO_ROOT.parent / "shared" / "schemas" / "kuberay"

# A Kubernetes minor version whose schemas kubernetes-validate bundles.
K8S_VERSION = "1.33"

RAY_API_VERSION = "ray.io/v1"
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}

__all__ = [
    "CRD_FILES",
    "K8S_VERSION",
    "KubeRaySchemasMissing",
    "iter_containers",
    "iter_pod_specs",
    "iter_pod_templates",
    "in_ci",
    "kuberay_schema_dir",
    "load_manifests",
    "require_kuberay_schemas",
    "strict_schema",
    "validate_manifest",
]


class KubeRaySchemasMissing(RuntimeError):
    """The KubeRay CRD schema for a ``ray.io`` kind could not be found."""


# --------------------------------------------------------------------------- schema discovery


def kuberay_schema_dir() -> Path:
    """Directory holding the KubeRay CRD YAMLs (``$MASKCLIP_KUBERAY_SCHEMAS`` or the default)."""
    return Path(os.environ.get(SCHEMA_DIR_ENV) or DEFAULT_SCHEMA_DIR)


def _missing_reason(kind: str = "RayCluster") -> str | None:
    path = kuberay_schema_dir() / CRD_FILES[kind]
    if path.is_file():
        return None
    return (
        f"KubeRay CRD schema not found: {path} "
        f"(set {SCHEMA_DIR_ENV} to a directory with {CRD_FILES[kind]})"
    )


def in_ci() -> bool:
    """``CI`` set to a true value (``true``/``1``/``yes``), as CI runners export it."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def require_kuberay_schemas(*kinds: str) -> None:
    """``pytest.skip`` the calling test when a needed CRD schema file is absent, or
    ``pytest.fail`` it when running in CI (:func:`in_ci`): missing schemas there are a broken
    pipeline, not a reason to pass."""
    import pytest

    for kind in kinds or ("RayCluster", "RayJob"):
        reason = _missing_reason(kind)
        if reason:
            if in_ci():
                pytest.fail(f"CI=true and {reason}", pytrace=False)
            pytest.skip(reason)


# --------------------------------------------------------------------------- schema compilation


def strict_schema(schema: Any) -> Any:
    """Deep copy of an OpenAPI v3 schema with ``additionalProperties: false`` added to every
    object schema that has ``properties`` and no ``x-kubernetes-preserve-unknown-fields``."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return copy.deepcopy(schema)
    out = {k: strict_schema(v) for k, v in schema.items()}
    if (
        "properties" in out
        and not schema.get("x-kubernetes-preserve-unknown-fields")
        and "additionalProperties" not in out
    ):
        out["additionalProperties"] = False
    return out


@cache
def _crd_validator(kind: str):
    import jsonschema

    reason = _missing_reason(kind)
    if reason:
        raise KubeRaySchemasMissing(reason)
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are ~1 MB of YAML
    crd = yaml.load((kuberay_schema_dir() / CRD_FILES[kind]).read_text(), Loader=loader)
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    schema = strict_schema(versions["v1"]["schema"]["openAPIV3Schema"])
    cls = jsonschema.Draft7Validator
    cls.check_schema(schema)
    return cls(schema)


# --------------------------------------------------------------------------- walking manifests


def load_manifests(path: str | Path) -> list[dict]:
    """All non-empty YAML documents of a (multi-document) manifest file."""
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def iter_pod_templates(doc: dict) -> Iterator[tuple[str, dict]]:
    """``(where, pod_template)`` for every pod template in a manifest (core or KubeRay)."""
    kind = doc.get("kind")
    spec = doc.get("spec") or {}

    def cluster(prefix: str, cspec: dict) -> Iterator[tuple[str, dict]]:
        if not isinstance(cspec, dict):
            return
        head = cspec.get("headGroupSpec") or {}
        if isinstance(head, dict) and isinstance(head.get("template"), dict):
            yield f"{prefix}headGroupSpec.template", head["template"]
        for i, group in enumerate(cspec.get("workerGroupSpecs") or []):
            if isinstance(group, dict) and isinstance(group.get("template"), dict):
                name = group.get("groupName", i)
                yield f"{prefix}workerGroupSpecs[{name}].template", group["template"]

    if kind == "RayCluster":
        yield from cluster("spec.", spec)
    elif kind == "RayJob":
        yield from cluster("spec.rayClusterSpec.", spec.get("rayClusterSpec") or {})
        if isinstance(spec.get("submitterPodTemplate"), dict):
            yield "spec.submitterPodTemplate", spec["submitterPodTemplate"]
    elif kind == "RayService":
        yield from cluster("spec.rayClusterConfig.", spec.get("rayClusterConfig") or {})
    elif kind in {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}:
        if isinstance(spec.get("template"), dict):
            yield "spec.template", spec["template"]
    elif kind == "CronJob":
        template = ((spec.get("jobTemplate") or {}).get("spec") or {}).get("template")
        if isinstance(template, dict):
            yield "spec.jobTemplate.spec.template", template
    elif kind == "PodTemplate" and isinstance(doc.get("template"), dict):
        yield "template", doc["template"]


def iter_pod_specs(doc: dict) -> Iterator[tuple[str, dict]]:
    """``(where, pod_spec)`` for every pod in a manifest (a bare Pod included)."""
    if doc.get("kind") == "Pod":
        yield "spec", doc.get("spec") or {}
        return
    for where, template in iter_pod_templates(doc):
        yield f"{where}.spec", template.get("spec") or {}


def iter_containers(doc: dict) -> Iterator[tuple[str, dict]]:
    """``(where, container)`` for every container and init container in a manifest, plus the
    KubeRay autoscaler sidecar options when in-tree autoscaling is on."""
    for where, pod in iter_pod_specs(doc):
        for key in ("initContainers", "containers"):
            for c in pod.get(key) or []:
                yield f"{where}.{key}[{c.get('name')}]", c
    if doc.get("kind") in {"RayCluster", "RayJob", "RayService"}:
        spec = doc.get("spec") or {}
        cspec = {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec") or {}}.get(
            doc["kind"], spec.get("rayClusterConfig") or {}
        )
        if cspec.get("enableInTreeAutoscaling"):
            yield "autoscalerOptions", cspec.get("autoscalerOptions") or {}


# --------------------------------------------------------------------------- validation


def _label(doc: dict) -> str:
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    return f"{doc.get('kind', '?')}/{meta.get('name', '?')}"


def _path(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<root>"


def _validate_core(doc: dict, k8s_version: str, where: str = "", label: str = "") -> list[str]:
    import kubernetes_validate

    label = label or _label(doc)
    try:
        kubernetes_validate.validate(doc, k8s_version, strict=True)
    except kubernetes_validate.ValidationError as e:
        loc = _path(list(getattr(e, "absolute_path", None) or getattr(e, "path", None) or []))
        return [f"{label}: {where}{loc}: {getattr(e, 'message', e)}"]
    except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError) as e:
        return [f"{label}: {where}no usable schema: {getattr(e, 'message', e)}"]
    return []


def validate_manifest(doc: dict, *, k8s_version: str = K8S_VERSION) -> list[str]:
    """Validate one parsed manifest strictly; return human-readable errors (empty = valid).

    ``ray.io/v1`` kinds raise :class:`KubeRaySchemasMissing` when their CRD schema is not
    available (call :func:`require_kuberay_schemas` first to skip instead)."""
    if not isinstance(doc, dict):
        return [f"manifest is a {type(doc).__name__}, not a mapping"]
    for key in ("apiVersion", "kind", "metadata"):
        if key not in doc:
            return [f"{_label(doc)}: missing {key}"]

    kind, api = doc["kind"], doc["apiVersion"]
    if not str(api).startswith("ray.io/"):
        return _validate_core(doc, k8s_version)

    if api != RAY_API_VERSION or kind not in CRD_FILES:
        return [f"{_label(doc)}: unsupported KubeRay resource {api} {kind}"]

    errors = [
        f"{_label(doc)}: {_path(e.absolute_path)}: {e.message}"
        for e in sorted(_crd_validator(kind).iter_errors(doc), key=lambda e: list(map(str, e.path)))
    ]
    # metadata is opaque to the CRD schema: check the part a server would reject.
    name = doc["metadata"].get("name") if isinstance(doc["metadata"], dict) else None
    if not isinstance(name, str) or not name:
        errors.append(f"{_label(doc)}: metadata.name: required string")

    for where, template in iter_pod_templates(doc):
        pod_template = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": f"{name or 'x'}-template"},
            "template": template,
        }
        errors += _validate_core(
            pod_template, k8s_version, where=f"{where} (as PodTemplate) ", label=_label(doc)
        )
    return errors
