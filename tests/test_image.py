"""The image, built for real and run the way a container engine runs it.

scripts/build-image.sh builds ./Dockerfile with buildah on a Debian base made by mmdebstrap
(there is no Docker engine on the test machines). The image then runs under buildah's chroot
isolation, as the image's USER, with the image's own ENTRYPOINT and CMD read from the built
image: once with the config.yaml it ships, once with a configuration mounted where its CMD
reads it, against the test suite's PostgreSQL and an AWS emulator.

Chroot isolation shares the host's network, and the CMD listens on :9188, which a developer's
`pgpressure demo` may hold. So each run gets a network namespace of its own: in it, relays
over unix sockets make the test cluster answer on 127.0.0.1:5432 (the shipped DSN's address)
and the emulator on 127.0.0.1:4566, and make the daemon's :9188 reachable from the test.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from exporter.devtools.cluster import Cluster
from tests.conftest import MONITOR_PASSWORD
from tests.ingest_reports import report_doc

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TAG = "localhost/pgpressure:test"
BUILD_TIMEOUT = 1800  # cold: mmdebstrap, apt-get in the build stage, pip; about 90 s here
SIZE_BUDGET = 200_000_000  # bytes; 167 MB when this was written (352 MB before the cuts)
# what the daemon's AWS sources and botocore's credential chain call (see the Dockerfile)
BOTOCORE_SERVICES = {"cloudwatch", "ec2", "logs", "pi", "rds", "signin", "sso", "sso-oidc", "sts"}
EMULATOR_PORT = 4566  # where the emulator answers inside the namespace
TOKEN = "image-test-token-7c1d"


# --- the image ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Image:
    tag: str
    size: int
    config: dict  # the OCI config: Entrypoint, Cmd, User, Env, ExposedPorts
    healthcheck: list[str]  # the HEALTHCHECK test, ["CMD", ...]

    @property
    def command(self) -> list[str]:
        return [*self.config["Entrypoint"], *self.config["Cmd"]]

    @property
    def config_file(self) -> str:
        """The configuration path the CMD names (--config.file=PATH or --config.file PATH)."""
        args = self.command
        for i, arg in enumerate(args):
            if arg.startswith("--config.file="):
                return arg.split("=", 1)[1]
            if arg == "--config.file":
                return args[i + 1]
        raise AssertionError(f"no --config.file in {args}")

    @property
    def port(self) -> int:
        """The port the CMD listens on (--web.listen-address=[HOST]:PORT)."""
        for arg in self.command:
            if arg.startswith("--web.listen-address="):
                return int(arg.rsplit(":", 1)[1])
        raise AssertionError(f"no --web.listen-address in {self.command}")


def _run(cmd: list[str], timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        output = f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        raise AssertionError(f"{cmd[:6]} exited {result.returncode}:\n{output}")
    return result


def _unavailable(reason: str) -> None:
    """In CI the image is always built and run: what is missing is a failure there."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must build and run the image, but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def image() -> Image:
    missing = [tool for tool in ("buildah", "mmdebstrap", "ip") if shutil.which(tool) is None]
    if missing:
        _unavailable(f"{' and '.join(missing)} not installed (scripts/setup.sh installs them)")
    if os.geteuid() != 0:
        _unavailable("building and running the image needs root (buildah chroot, mmdebstrap)")
    started = time.monotonic()
    built = _run([str(ROOT / "scripts" / "build-image.sh"), TAG], timeout=BUILD_TIMEOUT)
    print(f"\nbuilt {TAG} in {time.monotonic() - started:.0f} s")
    size = re.search(rf"^image {re.escape(TAG)}: (\d+) bytes", built.stdout, re.M)
    assert size, f"the script did not report the image's size:\n{built.stdout[-2000:]}"
    inspected = json.loads(_run(["buildah", "inspect", "--type", "image", TAG]).stdout)
    healthcheck = (inspected.get("Docker", {}).get("config") or {}).get("Healthcheck") or {}
    return Image(
        TAG, int(size.group(1)), inspected["OCIv1"]["config"], healthcheck.get("Test") or []
    )


@contextlib.contextmanager
def working_container(image: Image) -> Iterator[str]:
    name = f"pgpressure-test-{uuid.uuid4().hex[:8]}"
    _run(["buildah", "from", "--pull-never", "--name", name, image.tag])
    try:
        yield name
    finally:
        _run(["buildah", "rm", name], check=False)


def buildah_run(image: Image, container: str, *args: str, mounts: tuple[str, ...] = ()) -> list:
    """The command line that runs `args` in the container as the image's user."""
    volumes = [f"--volume={m}" for m in mounts]
    return [
        "buildah",
        "run",
        "--isolation=chroot",
        f"--user={image.config['User']}",
        *volumes,
        container,
        "--",
        *args,
    ]


# --- a network namespace and the relays into it ---------------------------------------------
# Runs as its own process, in the namespace or out of it. Arguments: LISTEN=TARGET, each
# tcp:HOST:PORT or unix:PATH. Prints the addresses it listens on (JSON) once it does; exits
# when its stdin closes, or after ten minutes whatever happens.
RELAY = r"""
import json, os, socket, sys, threading
threading.Timer(600, os._exit, (0,)).start()

def endpoint(spec):
    kind, _, addr = spec.partition(":")
    if kind == "unix":
        return socket.AF_UNIX, addr
    host, _, port = addr.rpartition(":")
    return socket.AF_INET, (host, int(port))

def pipe(src, dst):
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    for s in (src, dst):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

def serve(listener, target):
    while True:
        client, _ = listener.accept()
        upstream = socket.socket(target[0])
        try:
            upstream.settimeout(10)
            upstream.connect(target[1])
            upstream.settimeout(None)
        except OSError:
            client.close()
            upstream.close()
            continue
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=pipe, args=(a, b), daemon=True).start()

bound = []
for route in sys.argv[1:]:
    listen, _, target = route.partition("=")
    family, addr = endpoint(listen)
    listener = socket.socket(family)
    if family == socket.AF_INET:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(addr)
    listener.listen(64)
    bound.append(listener.getsockname())
    threading.Thread(target=serve, args=(listener, endpoint(target)), daemon=True).start()
print(json.dumps(bound), flush=True)
sys.stdin.read()
os._exit(0)
"""


@contextlib.contextmanager
def relay(*routes: str, netns: str | None = None) -> Iterator[list]:
    """Run RELAY with these routes (in `netns` if given); yields the addresses it listens on."""
    cmd = [sys.executable, "-c", RELAY, *routes]
    if netns is not None:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    process = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        ready, _, _ = select.select([process.stdout], [], [], 20)
        line = process.stdout.readline() if ready else ""
        if not line:
            process.kill()
            raise AssertionError(f"relay {routes} did not start: {process.stderr.read()[-2000:]}")
        yield json.loads(line)
    finally:
        process.stdin.close()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Namespace:
    name: str
    url: str  # the daemon's port in the namespace, as the test reaches it


@contextlib.contextmanager
def namespace(port: int, forward: dict[int, int]) -> Iterator[Namespace]:
    """A network namespace with only a loopback; in it, 127.0.0.1:P answers as the host's
    127.0.0.1:forward[P]; `port` in it is reachable at the yielded url."""
    name = f"pgpressure-test-{uuid.uuid4().hex[:8]}"
    sockets = Path(tempfile.mkdtemp(prefix="pgpressure-netns-"))
    _run(["ip", "netns", "add", name], timeout=30)
    try:
        _run(["ip", "-n", name, "link", "set", "lo", "up"], timeout=30)
        outward = [f"tcp:127.0.0.1:{p}=unix:{sockets}/{p}.sock" for p in forward]
        inward = [f"unix:{sockets}/{p}.sock=tcp:127.0.0.1:{h}" for p, h in forward.items()]
        with (
            relay(*inward),
            relay(*outward, f"unix:{sockets}/web.sock=tcp:127.0.0.1:{port}", netns=name),
            relay(f"tcp:127.0.0.1:0=unix:{sockets}/web.sock") as bound,
        ):
            yield Namespace(name, f"http://127.0.0.1:{bound[0][1]}")
    finally:
        _run(["ip", "netns", "delete", name], timeout=30, check=False)
        shutil.rmtree(sockets, ignore_errors=True)


# --- the daemon, as the image runs it ----------------------------------------------------------
def _descendants(pid: int) -> list[int]:
    """The processes below `pid`, parents before children."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(0), []):
            out.append(child)
            todo.append(child)
    return out


@dataclass
class Daemon:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        response = requests.get(self.url + "/metrics", timeout=5)
        response.raise_for_status()
        out: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(response.text):
            for s in family.samples:
                out.setdefault(s.name, []).append((s.labels, s.value))
        return out

    def value(self, name: str, **labels: str) -> float | None:
        found = [
            v
            for ls, v in self.metrics().get(name, [])
            if all(ls.get(k) == want for k, want in labels.items())
        ]
        return sum(found) if found else None

    def wait_for(self, what: str, predicate: Callable[[], object], timeout: float = 30) -> object:
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"the daemon exited:\n{self.log()[-3000:]}"
            with contextlib.suppress(requests.RequestException):
                last = predicate()
                if last:
                    return last
            time.sleep(0.3)
        raise AssertionError(
            f"{what}: not within {timeout} s (last {last!r})\n{self.log()[-3000:]}"
        )

    def stop(self) -> int:
        """SIGTERM to the entrypoint's process, as `docker stop` sends it; its exit status."""
        leaf = _descendants(self.process.pid)[-1:]
        assert leaf, "the daemon's process is gone"
        os.kill(leaf[0], signal.SIGTERM)
        return self.process.wait(30)


@contextlib.contextmanager
def run_image(image: Image, net: Namespace, mounts: tuple[str, ...] = ()) -> Iterator[Daemon]:
    """The image's ENTRYPOINT and CMD in a fresh container in `net`, until ready."""
    with (
        working_container(image) as container,
        tempfile.NamedTemporaryFile(prefix="pgpressure-image-", suffix=".log") as log,
    ):
        cmd = [
            "ip",
            "netns",
            "exec",
            net.name,
            *buildah_run(image, container, *image.command, mounts=mounts),
        ]
        process = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        daemon = Daemon(net.url, process, Path(log.name))
        try:
            daemon.wait_for(
                "ready", lambda: requests.get(net.url + "/-/ready", timeout=2).status_code == 200
            )
            # The image's own HEALTHCHECK, from a second container of the image in the same
            # network: a second `buildah run` in the running container made the first one
            # panic on exit (buildah 1.28).
            assert image.healthcheck[:1] == ["CMD"], image.healthcheck
            with working_container(image) as second:
                health = _run(
                    [
                        "ip",
                        "netns",
                        "exec",
                        net.name,
                        *buildah_run(image, second, *image.healthcheck[1:]),
                    ],
                    check=False,
                    timeout=60,
                )
            assert health.returncode == 0, f"HEALTHCHECK failed: {health.stdout}{health.stderr}"
            yield daemon
        finally:
            if process.poll() is None:
                with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
                    daemon.stop()
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(30)


def push(daemon: Daemon, doc: dict, token: str | None = None) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.post(daemon.url + "/api/v1/reports", json=doc, headers=headers, timeout=5)


def _database_and_ingest_work(daemon: Daemon, app: str, token: str | None = None) -> None:
    """The database source reaches PostgreSQL, and a pushed report counts its process."""
    daemon.wait_for(
        "pgpressure_source_up{source=database} 1",
        lambda: daemon.value("pgpressure_source_up", source="database", target="main") == 1,
    )
    daemon.wait_for(
        "pgpressure_source_up{source=activity} 1 and pg_sessions",
        lambda: (
            daemon.value("pgpressure_source_up", source="activity", target="main") == 1
            and "pg_sessions" in daemon.metrics()
        ),
    )
    answer = push(daemon, report_doc(app=app, proc="image-test:1:1"), token)
    assert answer.status_code == 200, answer.text
    daemon.wait_for(
        f"sqlalchemy_app_processes{{app={app}}} 1",
        lambda: daemon.value("sqlalchemy_app_processes", app=app) == 1,
    )


def _stops_cleanly(daemon: Daemon) -> None:
    status = daemon.stop()
    log = daemon.log()
    assert status == 0, f"exit status {status}:\n{log[-3000:]}"
    assert "msg=stopped" in log and "Traceback" not in log, log[-3000:]


# --- the tests ---------------------------------------------------------------------------------
def test_the_image_is_small_and_configured_as_the_dockerfile_says(image: Image):
    print(f"\n{image.tag}: {image.size} bytes")
    assert image.size < SIZE_BUDGET, f"{image.size} bytes, over the budget of {SIZE_BUDGET}"
    assert image.config["User"] == "10001:10001"
    assert image.config["Entrypoint"] == ["pgpressure"]
    assert f"{image.port}/tcp" in image.config["ExposedPorts"]
    assert image.config_file == "/etc/pgpressure/config.yaml"
    assert "/-/healthy" in " ".join(image.healthcheck)


# Runs in the image: what its Python can and cannot import, and what files it holds.
PROBE = r"""
import importlib, json, pathlib, sysconfig
site = pathlib.Path(sysconfig.get_path("purelib"))
def imports(name):
    try:
        importlib.import_module(name)
        return True
    except ImportError:
        return False
extensions = {}
for so in sorted(site.rglob("*.so")):
    parts = list(so.relative_to(site).parts)
    parts[-1] = parts[-1].split(".")[0]
    name = ".".join(parts)
    try:
        importlib.import_module(name)
        extensions[name] = "ok"
    except Exception as exc:
        extensions[name] = repr(exc)
import boto3
print(json.dumps({
    "imports": {m: imports(m) for m in (
        "exporter.cli", "exporter.ingest.wire", "exporter.ingest.aggregator", "boto3", "pglast",
        "sqlalchemy", "pgpressure_sqlalchemy", "pip", "setuptools")},
    "extensions": extensions,
    "services": sorted(boto3.session.Session().get_available_services()),
    "sources": sorted(str(p.relative_to(site)) for p in site.rglob("*")
                      if p.suffix in (".c", ".h", ".pyx", ".pxd", ".pyi")),
    "exporter_wire_is_a_file": (site / "exporter" / "ingest" / "wire.py").is_file()
        and not (site / "exporter" / "ingest" / "wire.py").is_symlink(),
}))
"""


def test_the_image_holds_the_daemon_and_not_what_it_never_runs(image: Image):
    with working_container(image) as container:
        probe = _run(buildah_run(image, container, "python", "-c", PROBE), timeout=120)
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    imports = found["imports"]
    for module in (
        "exporter.cli",
        "exporter.ingest.wire",
        "exporter.ingest.aggregator",
        "boto3",
        "pglast",
    ):
        assert imports[module], f"{module} does not import in the image"
    # SQLAlchemy and the in-app distribution are the apps' side; pip and setuptools are cut.
    for module in ("sqlalchemy", "pgpressure_sqlalchemy", "pip", "setuptools"):
        assert not imports[module], f"{module} is in the image"
    assert found["exporter_wire_is_a_file"], (
        "exporter/ingest/wire.py should be the linked file itself"
    )
    # Every extension module still loads after `strip --strip-debug`.
    assert len(found["extensions"]) >= 10, found["extensions"]
    broken = {name: err for name, err in found["extensions"].items() if err != "ok"}
    assert not broken, broken
    assert set(found["services"]) == BOTOCORE_SERVICES
    assert found["sources"] == []


def _pgpressure_role(pg: Cluster) -> None:
    """The role the shipped config.yaml connects as (trusted on 127.0.0.1 in the test
    cluster, as a password_file-less DSN needs)."""
    pg.psql(
        "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pgpressure') THEN "
        "CREATE ROLE pgpressure LOGIN; GRANT pg_monitor TO pgpressure; END IF; END $$"
    )


def test_the_shipped_config_with_the_images_own_entrypoint_and_cmd(image: Image, pg: Cluster):
    """Nothing mounted, nothing overridden: the shipped config's DSN (localhost:5432) finds
    PostgreSQL, ingest is open, and the HEALTHCHECK passes on the CMD's port."""
    _pgpressure_role(pg)
    with namespace(image.port, {5432: pg.port}) as net, run_image(image, net) as daemon:
        _database_and_ingest_work(daemon, app="shipped")
        _stops_cleanly(daemon)


def minute_read(delay: float, back: int = 0) -> datetime:
    """A time in the newest minute the rds_proxy source reads now (60 s periods ending
    `delay` ago, aligned to the minute), or in the one `back` minutes before it."""
    end = (time.time() - delay) // 60 * 60
    return datetime.fromtimestamp(end - 30 - 60 * back, UTC)


def test_a_mounted_config_reaches_postgres_and_every_aws_api_it_uses(
    image: Image, pg: Cluster, fresh_db: str, tmp_path: Path
):
    """A configuration mounted where the CMD reads it: PostgreSQL as the password-protected
    monitor role, ingest behind a token, and RDS Proxy through the AWS emulator with an
    assumed role, which calls every botocore service model the image keeps for the daemon
    (sts, rds, cloudwatch, logs): the pruned models are enough."""
    from exporter.devtools import aws_emulator as emulator

    delay, proxy = 60, "orders-proxy"
    with emulator.moto_server() as moto:
        aws = emulator.clients(moto, "ec2", "rds", "cloudwatch", "logs")
        emulator.create_proxy(aws["rds"], proxy, emulator.create_subnets(aws["ec2"], "us-east-1"))
        for name, values in (("DatabaseConnections", [6.0, 4.0]), ("ClientConnections", [9.0])):
            emulator.put_datapoints(aws["cloudwatch"], proxy, name, values, minute_read(delay))
        reason = emulator.SETTINGS_REASON.format(digest="select nextval($1)")
        lines = [emulator.PIN_LINE.format(c=i, d=100 + i, reason=reason) for i in range(3)]
        emulator.put_log_lines(aws["logs"], proxy, lines, time.time() - 30)
        config = tmp_path / "config.yaml"
        config.write_text(f"""
databases:
  - name: main
    dsn: postgresql://monitor@127.0.0.1:5432/{fresh_db}
    password_file: /run/secrets/pg
    vcpus: 2
    activity: {{interval: 1s}}
    statements: {{interval: 1s}}
ingest:
  enabled: true
  token: ${{PGPRESSURE_TEST_TOKEN:-{TOKEN}}}
aws:
  region: us-east-1
  endpoint_url: http://127.0.0.1:{EMULATOR_PORT}
  access_key_id: AKIAPGPRESSUREIMAGE01
  secret_access_key: pgpressure-image-secret
  role_arn: arn:aws:iam::123456789012:role/pgpressure-reader
  rds_proxy: {{enabled: true, interval: 1s, delay: {delay}s, logs: true}}
""")
        secret = tmp_path / "pg"
        secret.write_text(MONITOR_PASSWORD + "\n")
        for path in (tmp_path, config, secret):  # readable by the image's user
            path.chmod(0o755 if path.is_dir() else 0o644)
        mounts = (f"{config}:{image.config_file}:ro", f"{secret}:/run/secrets/pg:ro")
        forward = {5432: pg.port, EMULATOR_PORT: int(moto.rsplit(":", 1)[1])}
        with (
            namespace(image.port, forward) as net,
            run_image(image, net, mounts) as daemon,
        ):
            assert push(daemon, report_doc(app="mounted")).status_code == 401
            _database_and_ingest_work(daemon, app="mounted", token=TOKEN)
            daemon.wait_for(
                "pgpressure_source_up{source=rds_proxy} 1",
                lambda: daemon.value("pgpressure_source_up", source="rds_proxy") == 1,
            )
            daemon.wait_for(
                "rds_proxy_database_connections",
                lambda: (
                    daemon.value("rds_proxy_database_connections", proxy=proxy, target="") == 10.0
                ),
            )
            daemon.wait_for(
                "pinning events from the proxy's log",
                lambda: (
                    daemon.value("rds_proxy_pinning_events_total", proxy=proxy, reason="sequence")
                    == 3.0
                ),
            )
            assert MONITOR_PASSWORD not in daemon.log()
            _stops_cleanly(daemon)
