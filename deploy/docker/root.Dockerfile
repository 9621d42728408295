# syntax=docker/dockerfile:1
# The root (`trimmer root`): trims fan-out payloads per model. No torch, no
# plotting or benchmarking libraries: the base install only (pyproject.toml).
#
#   make image                                   # or, from the repository root:
#   docker build -f deploy/docker/root.Dockerfile -t feature-trimmer-root:0.1.0 .
#   docker run --rm -p 8080:8080 -v "$PWD/deploy/k8s/base/config:/etc/trimmer:ro" feature-trimmer-root:0.1.0
#
# Config at /etc/trimmer/root.yaml (a ConfigMap in deploy/k8s/), bundles under
# /var/lib/trimmer/bundles. Runs as uid 10001. Target size: < 250 MB.

ARG PYTHON_VERSION=3.11
# Any Debian-based image with python, pip and venv (a registry mirror, a hardened base).
ARG BASE_IMAGE=python:${PYTHON_VERSION}-slim

# ---- build: compile the C accelerators into a wheel (needs a compiler the runtime image does not carry)
FROM ${BASE_IMAGE} AS build
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev binutils \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md LICENSE ./
COPY trimmer trimmer
COPY root root
COPY leaf leaf
COPY loadtest loadtest
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .
# The runtime environment, built here where the compiler and binutils are: the base install (no
# extras, no torch), then stripped of debug symbols and bundled test suites (slim-site.sh). The
# last step fails the build if the C accelerators did not compile (e.g. a base without Python.h):
# the pure-Python fallback works but trims several times slower.
# The wheel pins nothing; dependencies resolve from the index at build time.
COPY deploy/docker/slim-site.sh /usr/local/bin/slim-site
RUN python -m venv /opt/trimmer \
 && /opt/trimmer/bin/pip install --no-cache-dir /wheels/*.whl \
 && slim-site /opt/trimmer \
 && /opt/trimmer/bin/python -I -c "import trimmer._fasttrim, trimmer._tensorext"

# ---- runtime
FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="feature-trimmer root" \
      org.opencontainers.image.description="Send what you use: trims ML-serving fan-out payloads to each model's feature allowlist" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/trimmer /opt/trimmer
RUN useradd --system --uid 10001 --no-log-init --no-create-home --shell /usr/sbin/nologin trimmer \
 && mkdir -p /etc/trimmer /var/lib/trimmer/bundles
ENV PATH=/opt/trimmer/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TRIMMER_HEALTH_URL=http://127.0.0.1:8080/healthz
USER 10001
# 8080: service port (listen.port). 9901: admin listener (/metrics, /admin/*) when the config sets admin.port.
EXPOSE 8080 9901
# No curl in the slim image: the interpreter does the probe. Point TRIMMER_HEALTH_URL elsewhere if listen.port differs.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['TRIMMER_HEALTH_URL'], timeout=2)"]
ENTRYPOINT ["trimmer", "root"]
CMD ["--config", "/etc/trimmer/root.yaml"]
