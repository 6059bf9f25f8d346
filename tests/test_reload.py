"""Reloading the configuration without a restart, on the real daemon: SIGHUP and POST /-/reload.

What a reload must keep is what a restart would lose: the connection and counters of a target
whose configuration did not change, and the apps' aggregated counters (a departed process's
totals live only in the daemon). What changed must take effect: a new target is sampled, a
removed one leaves /metrics and PostgreSQL, a changed one reconnects with its new settings, a
new ingest token is required. A file that does not load changes nothing and says why.
"""

from __future__ import annotations

import signal
import uuid
from collections.abc import Iterator

import pytest
import requests

from exporter.devtools.cluster import Cluster
from exporter.devtools.daemon_process import DaemonProcess, run_daemon
from exporter.ingest import REPORTS_PATH
from tests.conftest import MONITOR_PASSWORD
from tests.ingest_reports import pool_doc, report_doc

TOKEN = "reload-token-1"
NEW_TOKEN = "reload-token-2"


@pytest.fixture
def databases(pg: Cluster) -> Iterator[list[str]]:
    """Three new databases, so each target's connection can be told apart by its datname."""
    names = ["r_" + uuid.uuid4().hex[:8] for _ in range(3)]
    for name in names:
        pg.psql(f"CREATE DATABASE {name}")
    yield names
    for name in names:
        pg.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def config(pg: Cluster, targets: dict[str, tuple[str, str]], ingest: str) -> str:
    """Targets as name -> (database, activity interval); `ingest` is its flow mapping."""
    lines = ["databases:"]
    for name, (dbname, interval) in targets.items():
        dsn = pg.dsn(user="monitor", password=MONITOR_PASSWORD, dbname=dbname)
        lines += [
            f"  - name: {name}",
            f"    dsn: {dsn}",
            f"    activity: {{interval: {interval}}}",
            "    statements: {enabled: false}",
        ]
    return "\n".join([*lines, f"ingest: {ingest}", ""])


def pgpressure_pids(pg: Cluster, dbname: str) -> set[int]:
    """The daemon's sessions in this database."""
    out = pg.psql(
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'pgpressure' "
        f"AND datname = '{dbname}'"
    )
    return {int(line) for line in out.split()}


def targets_up(d: DaemonProcess) -> dict[str, float]:
    """target -> pgpressure_source_up of its activity source."""
    return {
        labels["target"]: value
        for labels, value in d.metrics().get("pgpressure_source_up", [])
        if labels["source"] == "activity"
    }


def push(d: DaemonProcess, token: str | None, **report) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.post(
        d.url + REPORTS_PATH, json=report_doc(**report), headers=headers, timeout=5
    )


def reload(d: DaemonProcess, text: str, how: str = "http") -> requests.Response | None:
    """Write the new configuration and reload it by POST /-/reload or by SIGHUP."""
    d.config_path.write_text(text)
    if how == "http":
        return d.session.post(d.url + "/-/reload", timeout=10)
    d.process.send_signal(signal.SIGHUP)
    return None


def test_sighup_adds_removes_and_changes_targets_and_keeps_the_unchanged_one(pg, databases):
    kept, changed, removed_db = databases
    before = {"kept": (kept, "1s"), "changed": (changed, "1s"), "removed": (removed_db, "1s")}
    with run_daemon(config(pg, before, "{enabled: false}")) as d:
        d.wait_for(lambda: targets_up(d) == {"kept": 1, "changed": 1, "removed": 1})
        kept_pids = d.wait_for(lambda: pgpressure_pids(pg, kept))
        changed_pids = d.wait_for(lambda: pgpressure_pids(pg, changed))
        kept_attempts = d.value("pgpressure_source_errors_total", target="kept")

        after = {"kept": (kept, "1s"), "changed": (changed, "2s"), "added": (removed_db, "1s")}
        reload(d, config(pg, after, "{enabled: false}"), how="sighup")

        d.wait_for(lambda: set(targets_up(d)) == {"kept", "changed", "added"})
        d.wait_for(lambda: targets_up(d) == {"kept": 1, "changed": 1, "added": 1})
        assert d.process.poll() is None  # SIGHUP's default action would have ended it
        # the unchanged target runs on, on the same connection
        assert pgpressure_pids(pg, kept) == kept_pids
        assert d.value("pgpressure_source_errors_total", target="kept") == kept_attempts
        # the changed one reconnected; the removed one's series and session are gone
        new_changed = d.wait_for(lambda: pgpressure_pids(pg, changed) - changed_pids)
        assert pgpressure_pids(pg, changed) == new_changed
        assert d.value("pgpressure_source_up", target="removed") is None
        assert d.value("pg_sessions", target="removed") is None
        assert "configuration reloaded" in d.log()
        assert d.value("pgpressure_config_last_reload_successful") == 1


def test_reload_applies_a_new_ingest_token_and_keeps_the_apps_counters(pg, databases):
    targets = {"main": (databases[0], "1s")}
    with run_daemon(config(pg, targets, f"{{token: {TOKEN}}}")) as d:
        # a process that has left (its totals now live only in the daemon) and a live one
        departed = {"app": "orders", "proc": "h:1:1", "pools": [pool_doc(checkouts=7)]}
        assert push(d, TOKEN, leaving=True, **departed).status_code == 200
        assert push(d, TOKEN, app="orders", proc="h:2:1", pools=[pool_doc(checkouts=5)]).ok
        d.wait_for(lambda: d.value("sqlalchemy_pool_checkouts_total", app="orders") == 12)
        loaded_at = d.value("pgpressure_config_last_reload_success_timestamp_seconds")

        answer = reload(d, config(pg, targets, f"{{token: {NEW_TOKEN}, stale_after: 60s}}"))
        assert answer.status_code == 200, answer.text

        assert push(d, TOKEN, app="orders", proc="h:3:1").status_code == 401
        assert push(d, NEW_TOKEN, app="orders", proc="h:2:1", seq=2,
                    pools=[pool_doc(checkouts=6)]).ok  # fmt: skip
        d.wait_for(lambda: d.value("sqlalchemy_pool_checkouts_total", app="orders") == 13)
        assert d.value("pgpressure_config_last_reload_success_timestamp_seconds") > loaded_at


def test_ingest_turned_off_and_on_by_reload(pg, databases):
    targets = {"main": (databases[0], "1s")}
    with run_daemon(config(pg, targets, "{enabled: true}")) as d:
        assert push(d, None).status_code == 200
        assert reload(d, config(pg, targets, "{enabled: false}")).status_code == 200
        assert push(d, None).status_code == 404
        d.wait_for(lambda: d.value("sqlalchemy_app_processes") is None)
        assert reload(d, config(pg, targets, "{enabled: true}")).status_code == 200
        assert push(d, None).status_code == 200
        d.wait_for(lambda: d.value("sqlalchemy_app_processes", app="orders") == 1)


def test_a_bad_file_keeps_the_old_configuration_and_says_why(pg, databases):
    good = config(pg, {"main": (databases[0], "1s")}, f"{{token: {TOKEN}}}")
    with run_daemon(good) as d:
        d.wait_for(lambda: targets_up(d) == {"main": 1})
        pids = d.wait_for(lambda: pgpressure_pids(pg, databases[0]))
        # line 5 of the file: a key the target does not have, and a new target besides
        bad = good.replace("    statements:", "    statement: {enabled: false}\n    statements:", 1)
        other = f"  - name: other\n    dsn: {pg.dsn(dbname=databases[1])}\n"
        bad = bad.replace("ingest:", other + "ingest:")
        assert bad.splitlines()[4].startswith("    statement:")

        answer = reload(d, bad)
        assert answer.status_code == 500
        assert "line 5" in answer.text and "databases[0].statement" in answer.text
        error = d.wait_for(
            lambda: [line for line in d.log().splitlines() if "not reloaded" in line]
        )
        assert "level=error" in error[0] and "line 5" in error[0], error
        assert "databases[0].statement" in error[0]
        assert d.value("pgpressure_config_last_reload_successful") == 0

        # still the old configuration: same target and connection, same token
        assert targets_up(d) == {"main": 1}
        assert pgpressure_pids(pg, databases[0]) == pids
        assert push(d, None).status_code == 401
        assert push(d, TOKEN).status_code == 200

        # a broken YAML file and an unreadable one are kept out the same way
        assert "line" in reload(d, "databases: [\n").text
        d.config_path.unlink()
        answer = d.session.post(d.url + "/-/reload", timeout=10)
        assert answer.status_code == 500 and "cannot read config file" in answer.text

        assert reload(d, good).status_code == 200
        assert d.value("pgpressure_config_last_reload_successful") == 1
        assert pgpressure_pids(pg, databases[0]) == pids


def test_reload_is_a_post(pg, databases):
    with run_daemon(config(pg, {"main": (databases[0], "1s")}, "{enabled: false}")) as d:
        assert d.get("/-/reload").status_code == 405
