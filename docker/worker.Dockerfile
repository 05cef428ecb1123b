# GPU worker image: runs `prefect worker start` on a process work pool, so every flow run
# (validate -> GPU check -> QLoRA train -> evaluate -> register) executes inside this container.
#
# Build context is the repository root (compose uses `context: ..`):
#   docker build -f docker/worker.Dockerfile -t qlora-worker .
#
# Why this base: torch 2.13.0 from PyPI (TORCH_VERSION below) is the CUDA 13.0 build (its wheel
# depends on cuda-toolkit 13.0.x / nvidia-*-cu13). The wheel ships its own CUDA user-space
# libraries, so the base is not needed for them; it is chosen to match anyway because the
# nvidia/cuda image declares NVIDIA_REQUIRE_CUDA=cuda>=13.0, so the NVIDIA container toolkit refuses
# to start it on a host driver that is too old (CUDA 13.0 needs driver >= 580), with a clear message
# instead of a confusing failure inside torch. To use an older driver, install the cu128 wheel
# (`--index-url https://download.pytorch.org/whl/cu128`) and switch to 12.8.1-runtime-ubuntu24.04.
FROM nvidia/cuda:13.0.2-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Ubuntu 24.04 ships Python 3.12 (pyproject's requires-python must allow it). Versions of these
# distro packages are not pinned: the base image tag pins the release, and apt then brings that
# release's security updates (DL3008 is ignored for this reason only).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV"

# Non-root user. A fixed uid/gid (not 1000, which the ubuntu image already gives to `ubuntu`)
# keeps ownership of the named volumes stable across rebuilds.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --create-home --home-dir /home/app app

WORKDIR /app

# 1) torch first, in a layer of its own: it is by far the largest download and changes least.
ARG TORCH_VERSION=2.13.0
RUN pip install "torch==${TORCH_VERSION}"

# 2) The project's other dependencies, read from pyproject.toml alone, so editing source code does
# not invalidate this layer. EXTRAS is a comma-separated list of optional-dependency groups.
# torch is passed again so that a pyproject pin that disagrees with TORCH_VERSION fails the build
# instead of silently swapping the CUDA build.
ARG EXTRAS=""
COPY docker/list_requirements.py pyproject.toml /tmp/deps/
RUN python /tmp/deps/list_requirements.py /tmp/deps/pyproject.toml "$EXTRAS" > /tmp/deps/requirements.txt \
    && pip install -r /tmp/deps/requirements.txt "torch==${TORCH_VERSION}" \
    && rm -rf /tmp/deps

# 3) The source, then the project itself without dependencies (they are all installed above).
# README.md is copied because pyproject's `readme` is read when the package is built.
# The source stays owned by root: the worker user can run it but not modify it.
COPY pyproject.toml README.md prefect.yaml ./
COPY tasks/ ./tasks/
COPY flows/ ./flows/
COPY configs/ ./configs/
RUN pip install --no-deps . \
    && rm -rf build ./*.egg-info

# prefect.yaml's pull step changes into $QLORA_PIPELINE_DIR before each flow run: the source is here.
# Writable places for the non-root user. Named volumes mounted here start with this ownership.
ENV QLORA_PIPELINE_DIR=/app \
    HF_HOME=/home/app/.cache/huggingface
RUN mkdir -p /app/outputs /app/.cache "$HF_HOME" \
    && chown -R app:app /app/outputs /app/.cache /home/app/.cache

# Numeric uid:gid so the runtime (and Kubernetes runAsNonRoot) can verify it is not root.
USER 10001:10001

# compose.yaml replaces this with "create pool; deploy; start worker"; this default only starts
# the worker (for use with an already prepared Prefect server).
CMD ["prefect", "worker", "start", "--pool", "qlora-pool"]
