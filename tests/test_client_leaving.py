"""A process that exits says so: its last report is marked `leaving`, on a normal exit and on
SIGTERM (whose default action would skip atexit), so the daemon folds it at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

from tests.test_instrument import Receiver, app_name, receiver, url  # noqa: F401 -- fixture

APP = textwrap.dedent(
    """
    import os, sys, time
    import sqlalchemy as sa
    from pgpressure_sqlalchemy import instrument
    dsn, endpoint, app, how = sys.argv[1:5]
    engine = sa.create_engine(dsn)
    instrument(engine, app=app, endpoint=endpoint, interval=60)
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")
    os.write(1, b"ready\\n")
    if how == "wait":
        time.sleep(60)
    """
)


def _start(pg, receiver: Receiver, app: str, how: str) -> subprocess.Popen:  # noqa: F811
    process = subprocess.Popen(
        [sys.executable, "-c", APP, url(pg), receiver.url, app, how],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert process.stdout.readline() == b"ready\n"
    return process


def test_a_process_that_exits_sends_a_leaving_report(pg, receiver):  # noqa: F811
    app = app_name()
    process = _start(pg, receiver, app, "exit")
    assert process.wait(timeout=30) == 0
    last = receiver.wait_for(lambda: receiver.last(app))
    assert last["leaving"] is True
    assert last["pools"][0]["checkouts"] == 1


def test_sigterm_sends_the_leaving_report_and_still_ends_the_process(pg, receiver):  # noqa: F811
    app = app_name()
    process = _start(pg, receiver, app, "wait")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == -signal.SIGTERM  # died of SIGTERM, as before
    assert receiver.wait_for(lambda: receiver.last(app).get("leaving")) is True
