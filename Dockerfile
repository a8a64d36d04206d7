# syntax=docker/dockerfile:1
# maskclip-service GPU image: the `maskclip` CLI, Ray (Train/Data/Tune + dashboard/Jobs API) and
# MLflow. Used by the KubeRay head/worker pods, RayJobs rendered by `maskclip render`, and the
# MLflow tracking server (k8s/mlflow.yaml).
#
#   docker build -t ghcr.io/maskclip/maskclip-service:0.1.0 .
#
# Every Python package comes from requirements.lock, the lock the dev venv and CI install from
# (hash-checked). RAY_VERSION only double-checks it: it must equal the lock's ray pin, `rayVersion`
# in k8s/raycluster.yaml and service/k8s.py's RAY_VERSION (tests/k8s/test_manifests.py checks all
# four), and the build fails if the installed Ray differs. The lock's torch is PyPI's Linux wheel,
# the CUDA 13.0 build, which brings its own CUDA libraries (nvidia-* wheels); the CUDA runtime base
# supplies the matching userland and NVIDIA container env.

ARG BASE_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

ARG RAY_VERSION=2.60.0

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

# 1) Every dependency, exactly as `make install` and CI get them: the whole lock, hash-checked,
#    cached on the lock alone. It holds the `server` extra (mlflow[auth] for the MLflow basic-auth
#    app, k8s/mlflow.yaml; psycopg2 for a PostgreSQL backend store) and also the test tools (about
#    200 MB beside the CUDA libraries): the image runs the set CI tested, not a re-resolution of it.
COPY requirements.lock ./
RUN pip install --no-cache-dir --require-hashes -r requirements.lock

# 2) The project itself (changes often, small layer).
COPY pyproject.toml README.md ./
COPY maskclip ./maskclip
COPY service ./service
COPY jobs ./jobs
RUN pip install --no-cache-dir --no-deps . \
 && pip check \
 && rm -rf build ./*.egg-info \
 && python -c "import ray, sys; sys.exit(ray.__version__ != '${RAY_VERSION}')"

USER 1000:1000
ENV HOME=/home/maskclip

ENTRYPOINT ["/usr/bin/tini", "--", "maskclip"]
CMD ["--help"]
