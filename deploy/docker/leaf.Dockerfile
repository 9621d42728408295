# syntax=docker/dockerfile:1
# The leaf (`trimmer leaf`): runs TorchScript / torch.export models, CPU torch by default.
#
#   make image                                   # or, from the repository root:
#   docker build -f deploy/docker/leaf.Dockerfile -t feature-trimmer-leaf:0.1.0 .
#   docker run --rm -p 8001:8001 -v /path/to/model-repo:/models:ro feature-trimmer-leaf:0.1.0
#
# CUDA variant: the same file with torch from a CUDA wheel index. The wheels
# bundle the CUDA runtime, so the slim base stays; the host needs the NVIDIA
# driver and container toolkit (`docker run --gpus all`, or a Kubernetes
# `nvidia.com/gpu` limit):
#
#   docker build -f deploy/docker/leaf.Dockerfile \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 \
#     -t feature-trimmer-leaf:0.1.0-cuda .
#
# Models at /models (<model>/<version>/model.pt|model.pt2). Runs as uid 10001.

ARG PYTHON_VERSION=3.11
# Any Debian-based image with python, pip and venv (a registry mirror, a hardened base).
ARG BASE_IMAGE=python:${PYTHON_VERSION}-slim

FROM ${BASE_IMAGE} AS build
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md LICENSE ./
COPY trimmer trimmer
COPY root root
COPY leaf leaf
COPY loadtest loadtest
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
# torch first, from the chosen wheel index (an unpinned `torch` from PyPI would pull a multi-GB
# CUDA build), then the project with the [leaf] extra. Not stripped like the root's: torch's and
# CUDA's libraries are left exactly as built.
RUN python -m venv /opt/trimmer \
 && /opt/trimmer/bin/pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}" \
 && /opt/trimmer/bin/pip install --no-cache-dir "$(ls /wheels/*.whl)[leaf]"

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="feature-trimmer leaf" \
      org.opencontainers.image.description="Model worker for feature-trimmer: typed tensors in, TorchScript / torch.export out" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/trimmer /opt/trimmer
RUN useradd --system --uid 10001 --no-log-init --no-create-home --shell /usr/sbin/nologin trimmer \
 && mkdir -p /models
ENV PATH=/opt/trimmer/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TRIMMER_HEALTH_URL=http://127.0.0.1:8001/v2/health/live
USER 10001
EXPOSE 8001
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['TRIMMER_HEALTH_URL'], timeout=2)"]
ENTRYPOINT ["trimmer", "leaf"]
# 0.0.0.0 so a published port reaches it; the Kubernetes sidecar shape overrides this with 127.0.0.1.
CMD ["--repo", "/models", "--host", "0.0.0.0", "--port", "8001"]
