#!/usr/bin/env bash
# Run the instrumentation tests on SQLAlchemy 2.0 (the main suite runs on the installed 2.1).
# scripts/test.sh runs it after the main suite, so CI covers both SQLAlchemy lines.
# A venv that sees the system packages (pytest, drivers, pgpressure itself) but has its own
# SQLAlchemy 2.0 and greenlet.  Usage: tests/sqla20.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${PGPRESSURE_SQLA20_VENV:-${TMPDIR:-/tmp}/pgpressure-sqla20}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv --system-site-packages "$VENV"
fi
"$VENV/bin/python" -m pip install -q "SQLAlchemy[asyncio]==2.0.58"
"$VENV/bin/python" -c 'import sqlalchemy; assert sqlalchemy.__version__.startswith("2.0."), sqlalchemy.__version__; print("SQLAlchemy", sqlalchemy.__version__)'
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
    tests/test_instrument.py tests/test_instrument_e2e.py tests/test_apps.py "$@"
