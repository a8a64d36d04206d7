"""Fixtures for the Kubernetes manifest tests (helpers live in k8s_validation.py)."""

from __future__ import annotations

import pytest

try:
    from tests.k8s.k8s_validation import require_kuberay_schemas
except ImportError:  # tests/ not importable as a package: pytest put this directory on sys.path
    from k8s_validation import require_kuberay_schemas


@pytest.fixture
def kuberay_schemas() -> None:
    """Skip the test when the KubeRay CRD schemas ($MASKCLIP_KUBERAY_SCHEMAS) are absent; fail it
    when CI=true."""
    require_kuberay_schemas("RayCluster", "RayJob")
