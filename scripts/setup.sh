#!/usr/bin/env bash
# Installs everything pgpressure's demo and tests need on a fresh Debian machine:
# PostgreSQL (with pg_stat_statements), Prometheus, promtool, Alertmanager, Chromium, and
# buildah and mmdebstrap (to build and run the image without a Docker engine), then both
# distributions from this checkout, editable, with the demo and test extras at the versions
# of requirements/dev.txt. Safe to run again: skips what is there.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v pg_ctl >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 \
  || need+=(postgresql postgresql-contrib)
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v prometheus-alertmanager >/dev/null 2>&1 || need+=(prometheus-alertmanager)
command -v prometheus-postgres-exporter >/dev/null 2>&1 || need+=(prometheus-postgres-exporter)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v buildah >/dev/null 2>&1 || need+=(buildah)
command -v mmdebstrap >/dev/null 2>&1 || need+=(mmdebstrap)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: need root to install: ${need[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# Debian starts a cluster on 5432 when it installs postgresql; the tests use their own.
python3 -m pip install -q -c requirements/dev.txt -e '.[test,demo]' -e ./pgpressure-sqlalchemy
