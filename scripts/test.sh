#!/usr/bin/env bash
# The test command from the README: lint, then the whole suite against real PostgreSQL,
# Prometheus, Alertmanager and an AWS emulator started by the tests themselves, then the
# instrumentation tests once more on SQLAlchemy 2.0. Arguments go to the first pytest only.
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check exporter pgpressure-sqlalchemy tests bench dashboards docs deploy
ruff format --check exporter pgpressure-sqlalchemy tests bench dashboards docs deploy
python3 -m pytest -q "$@"
# The in-app instrumentation supports SQLAlchemy 2.0 and 2.1: its tests again on 2.0.
if [ "$#" -eq 0 ]; then
    tests/sqla20.sh
fi
