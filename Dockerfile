# syntax=docker/dockerfile:1
# Image for the sink worker: `docker build -t sink .`
# The builder turns the project into a wheel and installs it with its dependencies into a
# venv; the final stage copies only that venv, so no compiler, pip cache or source tree ships.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml README.md constraints.txt ./
COPY sink ./sink
# Dependencies at the versions of constraints.txt, which all ship binary wheels for CPython
# 3.11 on amd64 and arm64: refuse to compile (the slim image has no compiler anyway).
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && /opt/venv/bin/pip install --no-cache-dir --only-binary=:all: \
        --constraint constraints.txt /wheels/sink-*.whl \
    && /opt/venv/bin/pip uninstall --yes pip \
    && /opt/venv/bin/python -m compileall -q /opt/venv/lib

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="sink" \
      org.opencontainers.image.description="Exactly-once Kafka to ClickHouse sink for usage-metering events" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN groupadd --system --gid 10001 sink \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin sink \
    && mkdir -p /etc/sink
COPY --from=builder /opt/venv /opt/venv
USER 10001
WORKDIR /tmp
EXPOSE 8080
# Kubernetes uses its own probes; this serves `docker run` and compose.
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
ENTRYPOINT ["sink"]
CMD ["run", "-c", "/etc/sink/sink.yaml"]
