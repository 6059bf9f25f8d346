"""A small WSGI service as a fleet runs it: one instrumented engine made at import (under
gunicorn --preload, in the master, which never checks a connection out), one checkout per
request. The app name is gunicorn's --name; the endpoint and push interval come from the
PGPRESSURE_* environment, the database from FLEET_DSN."""

from __future__ import annotations

import os

import sqlalchemy as sa

from pgpressure_sqlalchemy import instrument

engine = sa.create_engine(os.environ["FLEET_DSN"], pool_size=2, max_overflow=1, pool_timeout=10)
instrument(engine)


def app(environ, start_response):
    """One checkout and a short query (none for /ready); answers the worker's pid, so callers
    see recycling."""
    if environ["PATH_INFO"] != "/ready":
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT pg_sleep(0.005)")
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(os.getpid()).encode()]
