# syntax=docker/dockerfile:1
# pgpressure: Prometheus exporter for SQLAlchemy pools, PostgreSQL load and RDS Proxy pinning.
#
#   docker build -t pgpressure .
#   docker run -p 9188:9188 -v "$PWD/config.yaml:/etc/pgpressure/config.yaml:ro" pgpressure
#
# The configuration is read from /etc/pgpressure/config.yaml (mount a file or a ConfigMap
# there); secrets come from the environment (${VAR} in the file) or from *_file paths such
# as /run/secrets/... . Extra flags go after the image name and replace the default CMD.

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# --- build: a virtualenv with pgpressure and its dependencies (wheels only) ---------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/pgpressure
COPY pyproject.toml README.md ./
COPY exporter ./exporter
# --only-binary: every dependency ships manylinux wheels, so no compiler is ever needed.
RUN /opt/pgpressure/bin/pip install --no-cache-dir --only-binary=:all: \
        --no-binary=pgpressure . \
    && /opt/pgpressure/bin/python -m compileall -q /opt/pgpressure

# --- runtime: the virtualenv on a clean slim image, as an unprivileged user ---------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="pgpressure" \
      org.opencontainers.image.description="Prometheus exporter for SQLAlchemy pools, PostgreSQL load and RDS Proxy pinning" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/pgpressure/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 pgpressure \
    && useradd --system --uid 10001 --gid pgpressure --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin pgpressure \
    && mkdir -p /etc/pgpressure
COPY --from=build /opt/pgpressure /opt/pgpressure
COPY config.yaml /etc/pgpressure/config.yaml
USER 10001:10001
EXPOSE 9188
# python, not curl: the slim image has no curl and needs none.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9188/-/healthy', timeout=4).status == 200 else 1)"]
ENTRYPOINT ["pgpressure"]
CMD ["run", "--config.file=/etc/pgpressure/config.yaml", "--web.listen-address=:9188"]
