#!/usr/bin/env bash
# The test command from the README: lint, then the whole suite against real PostgreSQL,
# Prometheus, Alertmanager and an AWS emulator started by the tests themselves.
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check exporter tests bench dashboards docs deploy
ruff format --check exporter tests bench dashboards docs deploy
python3 -m pytest -q "$@"
