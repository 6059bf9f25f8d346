# syntax=docker/dockerfile:1
# pgpressure: Prometheus exporter for SQLAlchemy pools, PostgreSQL load and RDS Proxy pinning.
#
#   docker build -t pgpressure .
#   docker run -p 9188:9188 -v "$PWD/config.yaml:/etc/pgpressure/config.yaml:ro" pgpressure
#
# Without a Docker engine, scripts/build-image.sh builds this file with buildah on a Debian
# base made by mmdebstrap (PYTHON_IMAGE); tests/test_image.py runs the result.
#
# The configuration is read from /etc/pgpressure/config.yaml (mount a file or a ConfigMap
# there); secrets come from the environment (${VAR} in the file) or from *_file paths such
# as /run/secrets/... . Extra flags go after the image name and replace the default CMD.

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# --- build: a virtualenv with pgpressure and its dependencies (wheels only) ---------------
FROM ${PYTHON_IMAGE} AS build
# binutils for `strip` below; this stage only, never in the image.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends binutils \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/pgpressure
# The daemon's pinned runtime set (scripts/lock.sh), then the package. exporter/ingest/wire.py is a
# symlink into the in-app distribution's source: its target comes along at the same relative
# path so that building the wheel follows it. The in-app distribution itself (and SQLAlchemy)
# is not installed: the daemon does not need it.
COPY requirements/daemon.txt ./requirements/
COPY pyproject.toml README.md ./
COPY exporter ./exporter
COPY pgpressure-sqlalchemy/src/pgpressure_sqlalchemy/wire.py ./pgpressure-sqlalchemy/src/pgpressure_sqlalchemy/
# botocore's API models: only the services the daemon calls (rds, cloudwatch, logs; ec2 and pi
# for the vCPUs of a target's RDS instance; sts for role_arn) and the ones botocore's
# credential chain may call (sts for IRSA and assumed-role profiles, sso and sso-oidc for SSO
# profiles, signin for `aws login` sessions).
ARG BOTOCORE_SERVICES="rds cloudwatch logs ec2 pi sts sso sso-oidc signin"
# --only-binary: every dependency ships manylinux wheels, so no compiler is ever needed.
# Then what the image does not need at run time: pip and setuptools (nothing installs into
# the venv later), the wheels' C sources, Cython files and type stubs, the debug info in
# their extension modules (pglast's parser alone carries 20 MB of it), and the API models of
# the ~430 AWS services the daemon never calls. The bytecode is compiled once, here.
RUN /opt/pgpressure/bin/pip install --no-cache-dir --only-binary=:all: \
        --no-binary=pgpressure -c requirements/daemon.txt . \
    && /opt/pgpressure/bin/python -m pip uninstall --yes --quiet pip setuptools \
    && site=$(/opt/pgpressure/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))') \
    && find "$site" -type f \( -name '*.c' -o -name '*.h' -o -name '*.pyx' -o -name '*.pxd' \
        -o -name '*.pyi' \) -delete \
    && find "$site" -type f -name '*.so' -exec strip --strip-debug {} + \
    && for model in "$site"/botocore/data/*/; do \
        case " $BOTOCORE_SERVICES " in \
            *" $(basename "$model") "*) ;; \
            *) rm -r "$model" ;; \
        esac; \
    done \
    && for service in $BOTOCORE_SERVICES; do test -d "$site/botocore/data/$service"; done \
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
