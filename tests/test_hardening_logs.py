"""Logs against what an outside probe did to them (issue 16): the ESC byte (0x1b) passed raw
into logfmt logs, so text from a client or a database could drive the terminal of whoever
reads the log (colours, cursor moves, a rewritten title) or hide a line.

Text from outside reaches the log through error messages; here the database's own: the name
of a database that does not exist, with ESC and other control characters in it.
"""

from __future__ import annotations

import json
import urllib.parse

import pytest

from exporter.devtools.cluster import Cluster
from exporter.devtools.daemon_process import one_target_config, run_daemon
from tests.conftest import MONITOR_PASSWORD

HOSTILE = "\x1b[31mno\x1b]0;owned\x07such\rdb\x7f"


@pytest.mark.parametrize("log_format", ["logfmt", "json"])
def test_control_characters_from_outside_are_escaped_in_the_log(
    pg: Cluster, log_format: str
) -> None:
    dsn = pg.dsn(user="monitor", password=MONITOR_PASSWORD, dbname=urllib.parse.quote(HOSTILE))
    with run_daemon(one_target_config(dsn), "--log.format", log_format, wait_ready=False) as d:
        d.wait_for(lambda: "does not exist" in d.log(), timeout=20)
        log = d.log()
    lines = [line for line in log.splitlines() if "does not exist" in line]
    assert lines
    for c in "\x1b\x07\r\x7f":
        assert c not in log, repr(c)
    if log_format == "logfmt":
        assert "\\x1b[31mno\\x1b]0;owned\\x07such\\rdb\\x7f" in lines[0]
    else:
        # The JSON still says exactly what the database said.
        assert any(HOSTILE in json.loads(line)["err"] for line in lines)
