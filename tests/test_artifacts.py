"""What users get, tested as they get it: the built wheels in fresh virtualenvs, no `-e`, no
extras, and the README's commands verbatim with their defaults.

The rest of the suite runs from the editable checkout with every extra installed (see
scripts/setup.sh); these tests are its siblings that do not. They build both distributions
once (scripts/build-dists.sh) and install each into its own new virtualenv through the same
package index a user's pip would use.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from exporter.devtools.cluster import Cluster
from exporter.devtools.daemon_process import DaemonProcess, logged_process, run_daemon
from tests.ingest_reports import report_doc

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CLIENT = ROOT / "pgpressure-sqlalchemy"
INSTALL_TIMEOUT = 600
# The pins an application has that must not move (each was moved, or made the install
# impossible, when the in-app side was an extra of the daemon).
APP_PINS = ["pydantic==1.10.*", "aiohttp==3.9.*", "boto3==1.26.*", "psycopg[binary]==3.2.*"]
# What installing the client may add to an app's environment: itself and SQLAlchemy's own.
CLIENT_CLOSURE = {"pgpressure-sqlalchemy", "sqlalchemy", "greenlet", "typing-extensions"}

pytestmark = pytest.mark.slow


def _run(cmd: list[str] | str, **kwargs) -> subprocess.CompletedProcess[str]:
    kwargs.setdefault("timeout", INSTALL_TIMEOUT)
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result


class Venv:
    """A new virtualenv made with the standard library, like a user's `python -m venv`."""

    def __init__(self, path: Path) -> None:
        _run([sys.executable, "-m", "venv", str(path)])
        self.path = path
        self.bin = path / "bin"
        self.python = str(self.bin / "python")

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env["PATH"] = f"{self.bin}{os.pathsep}{env['PATH']}"
        env["VIRTUAL_ENV"] = str(self.path)
        return env

    def pip(self, *args: str) -> str:
        """pip of this venv, with the venv's environment only: a PYTHONPATH of the caller's
        (a source tree with its egg-info) would make pip think a package is installed."""
        cmd = [self.python, "-m", "pip", "--disable-pip-version-check", *args]
        return _run(cmd, env=self.env()).stdout

    def freeze(self) -> dict[str, str]:
        out = self.pip("list", "--format", "json", "--exclude", "pip", "--exclude", "setuptools")
        # names normalized as in PEP 503: typing_extensions and typing-extensions are one
        return {re.sub(r"[-_.]+", "-", p["name"]).lower(): p["version"] for p in json.loads(out)}

    def imports(self, module: str) -> bool:
        probe = subprocess.run(
            [self.python, "-c", f"import {module}"], capture_output=True, cwd="/", timeout=60
        )
        return probe.returncode == 0


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    _run([str(ROOT / "scripts" / "build-dists.sh"), str(out)])
    return out


def _one(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    assert len(found) == 1, f"expected one {pattern} in {folder}, found {found}"
    return found[0]


def _monitor_role(pg: Cluster) -> None:
    pg.psql(
        "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pgpressure') THEN "
        "CREATE ROLE pgpressure LOGIN; GRANT pg_monitor TO pgpressure; END IF; END $$"
    )


def _push(url: str, doc: dict) -> requests.Response:
    return requests.post(f"{url}/api/v1/reports", json=doc, timeout=5)


# --- the distributions -------------------------------------------------------------------------
def test_both_distributions_build_with_their_own_metadata(dists: Path):
    for name in ("pgpressure-*.tar.gz", "pgpressure_sqlalchemy-*.tar.gz"):
        _one(dists, name)
    import zipfile

    with zipfile.ZipFile(_one(dists, "pgpressure_sqlalchemy-*.whl")) as whl:
        names = whl.namelist()
        meta = whl.read(next(n for n in names if n.endswith("METADATA"))).decode()
        entry_points = whl.read(next(n for n in names if n.endswith("entry_points.txt")))
    assert {n.split("/")[0] for n in names if n.endswith(".py")} == {"pgpressure_sqlalchemy"}
    requires = re.findall(r"^Requires-Dist: (.*)$", meta, re.M)
    assert requires == ["SQLAlchemy<2.2,>=2.0"], requires
    assert b"pgpressure = pgpressure_sqlalchemy.plugin:PgPressurePlugin" in entry_points
    with zipfile.ZipFile(_one(dists, "pgpressure-*.whl")) as whl:
        daemon_files = whl.namelist()
        wire = whl.read("exporter/ingest/wire.py")
    # One push format: the daemon's copy is the client's file (a symlink in the tree).
    assert wire == (CLIENT / "src" / "pgpressure_sqlalchemy" / "wire.py").read_bytes()
    assert not any(n.startswith("pgpressure_sqlalchemy/") for n in daemon_files)


def test_the_client_declares_the_oldest_python_its_code_runs_on():
    project = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]
    floor = re.fullmatch(r">=(3\.\d+)", project["requires-python"]).group(1)
    tool = Path(sys.executable).with_name("vermin")
    vermin = [str(tool), "--no-tips", "--violations", f"-t={floor}-"]
    _run([*vermin, str(CLIENT / "src")])
    # ...and it is the oldest: one minor version lower is refused by the code itself.
    older = f"3.{int(floor.split('.')[1]) - 1}-"
    lower = subprocess.run(
        [*vermin[:-1], f"-t={older}", str(CLIENT / "src")], capture_output=True, timeout=120
    )
    assert lower.returncode != 0, "the code runs on an older Python: lower requires-python"


def test_the_lock_files_are_current():
    _run([str(ROOT / "scripts" / "lock.sh"), "--check"])


# --- the daemon from its wheel -----------------------------------------------------------------
@pytest.fixture(scope="module")
def daemon_venv(dists: Path, tmp_path_factory: pytest.TempPathFactory) -> Venv:
    venv = Venv(tmp_path_factory.mktemp("daemon") / "venv")
    venv.pip("install", "-q", "-c", str(ROOT / "requirements" / "daemon.txt"),
             str(_one(dists, "pgpressure-*.whl")))  # fmt: skip
    return venv


def test_the_daemon_wheel_needs_no_sqlalchemy(daemon_venv: Venv):
    installed = daemon_venv.freeze()
    assert "sqlalchemy" not in installed and "pgpressure-sqlalchemy" not in installed
    assert not daemon_venv.imports("sqlalchemy")
    assert daemon_venv.imports("exporter.ingest.aggregator")


@pytest.fixture
def shipped_config_daemon(daemon_venv: Venv, pg: Cluster) -> Iterator[DaemonProcess]:
    """`pgpressure --config.file config.yaml` from the wheel, as the README runs it: the
    shipped file unchanged, the default listen address, PGHOST/PGPORT from the environment."""
    _monitor_role(pg)
    env = daemon_venv.env() | {"PGHOST": "127.0.0.1", "PGPORT": str(pg.port)}
    log_path = daemon_venv.path / "daemon.log"
    cmd = [str(daemon_venv.bin / "pgpressure"), "--config.file", "config.yaml"]
    with logged_process(cmd, log_path, env, cwd=ROOT) as process:
        daemon = DaemonProcess("http://127.0.0.1:9188", process, log_path, ROOT / "config.yaml")
        daemon.wait_for(lambda: daemon.get("/-/ready").status_code == 200, timeout=30)
        yield daemon


def test_the_daemon_wheel_runs_the_shipped_config_and_ingests(shipped_config_daemon):
    daemon = shipped_config_daemon
    daemon.wait_for(lambda: daemon.value("pgpressure_source_up", source="activity") == 1)
    daemon.wait_for(lambda: daemon.value("pgpressure_source_up", target="main") == 2)
    assert _push(daemon.url, report_doc(app="wheel-app")).status_code == 200
    daemon.wait_for(lambda: daemon.value("sqlalchemy_app_processes", app="wheel-app") == 1)
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(timeout=10) == 0


# --- the client from its wheel, in an application with its own pins -----------------------------
APP = textwrap.dedent(
    """
    import logging, sys
    import sqlalchemy as sa
    from pgpressure_sqlalchemy import flush, instrument

    logging.basicConfig(level=logging.WARNING)
    dsn, endpoint = sys.argv[1], sys.argv[2]
    by_call = sa.create_engine(dsn, pool_size=2, max_overflow=1)
    instrument(by_call, app="pinned-app", pool="by-call", endpoint=endpoint, interval=60)
    by_url = sa.create_engine(
        dsn + "?plugin=pgpressure&pgpressure_app=pinned-app&pgpressure_pool=by-url"
        f"&pgpressure_endpoint={endpoint}&pgpressure_interval=60"
    )
    for engine in (by_call, by_url):
        for _ in range(3):
            with engine.connect() as conn:
                assert conn.execute(sa.text("SELECT 1")).scalar() == 1
    print(flush())
    """
)


def test_the_client_wheel_keeps_an_apps_pins_and_instruments_it(
    dists: Path, pg: Cluster, tmp_path: Path
):
    venv = Venv(tmp_path / "app-venv")
    venv.pip("install", "-q", *APP_PINS)
    before = venv.freeze()
    venv.pip("install", "-q", str(_one(dists, "pgpressure_sqlalchemy-*.whl")))
    after = venv.freeze()
    moved = {name: (v, after.get(name)) for name, v in before.items() if after.get(name) != v}
    assert not moved, f"installing the client moved the app's packages: {moved}"
    assert set(after) - set(before) <= CLIENT_CLOSURE, set(after) - set(before)

    # The app has a module named like the daemon's package, which broke the old import name.
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "exporter.py").write_text("raise ImportError('the app own exporter.py')\n")
    (app_dir / "app.py").write_text(APP)
    dsn = pg.dsn(dbname="postgres").replace("postgresql://", "postgresql+psycopg://", 1)
    with run_daemon("ingest: {enabled: true}\n") as daemon:
        result = _run([venv.python, "app.py", dsn, daemon.url], cwd=app_dir, env=venv.env())
        assert "not instrumented" not in result.stderr, result.stderr
        for pool in ("by-call", "by-url"):
            labels = {"app": "pinned-app", "pool": pool}
            daemon.wait_for(
                lambda labels=labels: daemon.value("sqlalchemy_pool_checkouts_total", **labels) == 3
            )


def test_a_broken_plugin_setting_leaves_the_engine_alone(dists: Path, tmp_path: Path):
    """The URL plugin never fails create_engine(): a bad value is a warning."""
    venv = Venv(tmp_path / "venv")
    venv.pip("install", "-q", str(_one(dists, "pgpressure_sqlalchemy-*.whl")))
    code = (
        "import sqlalchemy as sa\n"
        "e = sa.create_engine('sqlite://?plugin=pgpressure&pgpressure_interval=abc"
        "&pgpressure_endpoint=ftp://nowhere')\n"
        "with e.connect() as c: print(c.execute(sa.text('SELECT 41 + 1')).scalar())\n"
    )
    result = _run([venv.python, "-c", code], env=venv.env(), cwd=tmp_path)
    assert result.stdout.strip() == "42"
    assert "pgpressure: engine not instrumented" in result.stderr


# --- the README, verbatim -------------------------------------------------------------------------
def _section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, re.M | re.S)
    assert match, f"README has no section {title!r}"
    return match.group(1)


def _shell_blocks(text: str) -> list[str]:
    return [
        line.split("  #")[0].strip()
        for block in re.findall(r"```sh\n(.*?)```", text, re.S)
        for line in block.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def test_readme_install_in_an_application_runs_verbatim(tmp_path: Path):
    commands = _shell_blocks(_section("Installing in an application"))
    assert commands, "the section shows how to install the client"
    venv = Venv(tmp_path / "venv")
    for command in commands:
        _run(command, shell=True, cwd=ROOT, env=venv.env(), executable="/bin/bash")
    assert venv.imports("pgpressure_sqlalchemy.plugin")
    assert set(venv.freeze()) <= CLIENT_CLOSURE


def test_readme_demo_runs_verbatim_on_its_default_address(tmp_path: Path):
    """The first command of the README's two, with `--duration` so that it ends, and the
    default listen address (:9188). The second, `scripts/test.sh`, is this suite."""
    first, second = _shell_blocks(_section("Try it: two commands"))
    assert second == "scripts/setup.sh && scripts/test.sh"
    assert first == "scripts/setup.sh && pgpressure demo"
    log_path = tmp_path / "demo.log"
    with logged_process(["bash", "-c", f"{first} --duration 45"], log_path, cwd=ROOT) as demo:
        daemon = DaemonProcess("http://127.0.0.1:9188", demo, log_path, Path("/dev/null"))
        daemon.wait_for(lambda: daemon.get("/-/ready").status_code == 200, timeout=240)
        daemon.wait_for(lambda: (daemon.value("sqlalchemy_pool_checkouts_total") or 0) > 0, 30)
        assert daemon.value("pgpressure_source_up", source="activity") == 1
        deadline = time.monotonic() + 120
        while demo.poll() is None and time.monotonic() < deadline:
            time.sleep(1)
        assert demo.returncode == 0, log_path.read_text()[-3000:]
    assert "cannot listen" not in log_path.read_text()
