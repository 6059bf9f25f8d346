"""A throwaway PostgreSQL cluster for the demo and the tests.

PostgreSQL refuses to run as root, so when we are root the cluster is created and run as
the unprivileged `postgres` user (Debian's package creates it). The cluster preloads
pg_stat_statements, listens on 127.0.0.1 only, and is removed on stop. It is for a
developer's machine: connections over 127.0.0.1 are trusted (except the `monitor` role the
tests give a password), so do not start it on a host shared with untrusted users.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


class ClusterError(RuntimeError):
    pass


def find_bindir() -> Path:
    """The newest installed PostgreSQL server binaries (Debian layout, then PATH)."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
        key=lambda p: int(Path(p).parent.parent.name),
        reverse=True,
    )
    if candidates:
        return Path(candidates[0]).parent
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl:
        return Path(pg_ctl).parent
    raise ClusterError(
        "PostgreSQL server binaries not found: install them (apt-get install postgresql)"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_HBA = """\
local all all trust
host all monitor 127.0.0.1/32 scram-sha-256
host all all 127.0.0.1/32 trust
"""


@dataclass
class Cluster:
    port: int = field(default_factory=free_port)
    settings: dict[str, str] = field(default_factory=dict)
    base: Path | None = None
    bindir: Path = field(default_factory=find_bindir)

    def __post_init__(self) -> None:
        self._owned_base = self.base is None
        if self.base is None:
            self.base = Path(tempfile.mkdtemp(prefix="pgpressure-pg-"))
        self.datadir = self.base / "data"
        self.sockdir = self.base / "sock"
        self.logfile = self.base / "postgres.log"
        self._user = None
        if os.geteuid() == 0:
            try:
                self._user = pwd.getpwnam("postgres")
            except KeyError:
                raise ClusterError(
                    "running as root and no 'postgres' user exists to run PostgreSQL as"
                ) from None

    # -- process control -----------------------------------------------------------------
    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self._user is not None:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, check=check, capture_output=True, text=True)

    def _chown(self, path: Path) -> None:
        if self._user is not None:
            os.chown(path, self._user.pw_uid, self._user.pw_gid)

    def init(self) -> Cluster:
        assert self.base is not None
        self.base.mkdir(parents=True, exist_ok=True)
        os.chmod(self.base, 0o700)  # the socket and the log: the cluster's owner only
        self._chown(self.base)
        self.sockdir.mkdir(exist_ok=True)
        self._chown(self.sockdir)
        self._run(
            "initdb",
            "-D",
            str(self.datadir),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
        )
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.sockdir}'",
            "shared_preload_libraries": "'pg_stat_statements'",
            "pg_stat_statements.track": "all",
            "max_connections": "300",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "log_min_messages": "warning",
            **self.settings,
        }
        with open(self.datadir / "postgresql.conf", "a") as f:
            f.write("\n# pgpressure throwaway cluster\n")
            for key, value in conf.items():
                f.write(f"{key} = {value}\n")
        (self.datadir / "pg_hba.conf").write_text(_HBA)
        return self

    def start(self) -> Cluster:
        result = self._run(
            "pg_ctl",
            "-D",
            str(self.datadir),
            "-l",
            str(self.logfile),
            "-w",
            "-t",
            "30",
            "start",
            check=False,
        )
        if result.returncode != 0:
            tail = self.logfile.read_text()[-2000:] if self.logfile.exists() else ""
            raise ClusterError(f"pg_ctl start failed: {result.stderr.strip()}\n{tail}")
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "stop", check=False)

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def destroy(self) -> None:
        self.stop("immediate")
        if self._owned_base and self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)

    # -- convenience -----------------------------------------------------------------------
    def dsn(
        self, user: str = "postgres", dbname: str = "postgres", password: str | None = None
    ) -> str:
        auth = f"{user}:{password}" if password else user
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{dbname}"

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        result = self._run(
            "psql",
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            str(self.sockdir),
            "-p",
            str(self.port),
            "-U",
            "postgres",
            "-d",
            dbname,
            "-c",
            sql,
            check=False,
        )
        if result.returncode != 0:
            raise ClusterError(f"psql failed: {result.stderr.strip()}")
        return result.stdout.strip()

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(ClusterError):
                self.psql("SELECT 1")
                return
            time.sleep(0.1)
        raise ClusterError("PostgreSQL did not become ready")

    def __enter__(self) -> Cluster:
        self.init().start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()
