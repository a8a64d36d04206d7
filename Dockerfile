# syntax=docker/dockerfile:1
# maskclip-service GPU image: the `maskclip` CLI, Ray (Train/Data/Tune + dashboard/Jobs API) and
# MLflow. Used by the KubeRay head/worker pods, RayJobs rendered by `maskclip render`, and the
# MLflow tracking server (k8s/mlflow.yaml).
#
#   docker build -t ghcr.io/maskclip/maskclip-service:0.1.0 .
#
# RAY_VERSION must equal `rayVersion` in k8s/raycluster.yaml and the Ray installed for development
# (tests/k8s/test_manifests.py checks all three). The PyTorch wheels bring their own CUDA 13.0
# libraries; the CUDA runtime base supplies the matching userland and NVIDIA container env.

ARG BASE_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

ARG RAY_VERSION=2.60.0
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH}

# Python, plus wget (KubeRay's health probes exec it) and tini (signal handling / zombie reaping).
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3 python3-venv ca-certificates wget tini \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv "${VIRTUAL_ENV}"

# Non-root runtime user with a fixed uid/gid 1000 (the Ubuntu 24.04 base ships `ubuntu` with 1000).
RUN (userdel --remove ubuntu 2>/dev/null || true) \
 && groupadd --gid 1000 maskclip \
 && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash maskclip

WORKDIR /app

# 1) PyTorch (CUDA build): the biggest, slowest-changing layer.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" \
      "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

# 2) Project dependencies, cached on pyproject.toml alone (stub packages stand in for the source);
#    psycopg2 lets the MLflow server use a PostgreSQL backend store; mlflow[auth] brings what its
#    basic-auth app (k8s/mlflow.yaml, --app-name basic-auth) needs.
COPY pyproject.toml README.md ./
RUN mkdir -p maskclip service \
 && touch maskclip/__init__.py service/__init__.py \
 && pip install --no-cache-dir ".[service]" "ray[default,data,train,tune]==${RAY_VERSION}" \
      "psycopg2-binary>=2.9" "mlflow[auth]" \
 && pip uninstall -y maskclip-service \
 && rm -rf maskclip service build ./*.egg-info

# 3) The project itself (changes often, small layer).
COPY maskclip ./maskclip
COPY service ./service
COPY jobs ./jobs
RUN pip install --no-cache-dir --no-deps . \
 && rm -rf build ./*.egg-info \
 && python -c "import ray, sys; sys.exit(ray.__version__ != '${RAY_VERSION}')"

USER 1000:1000
ENV HOME=/home/maskclip

ENTRYPOINT ["/usr/bin/tini", "--", "maskclip"]
CMD ["--help"]
