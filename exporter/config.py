"""YAML configuration -> typed, validated objects.

A bad file must produce one message a person can act on: the key path, the line in the
file, and what was wrong, without echoing secrets. `${VAR}` is interpolated in every value (not
in comments); passwords can come from `password_file`. Every secret we learn about is
registered with `exporter.redaction` so logs and errors can never show it.
"""

from __future__ import annotations

import errno
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import unquote, urlsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from exporter import redaction
from exporter.diagnosis.thresholds import Thresholds


class ConfigError(Exception):
    """A configuration problem, already phrased for the user."""


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """`500ms`, `1s`, `2m`, `1h` or plain seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 500ms, 1s, 2m or a number of seconds")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(
                f"invalid duration {value!r}: use 500ms, 1s, 2m, 1h or a number of seconds"
            )
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError("duration must be a finite number greater than zero")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ActivityConfig(_Strict):
    interval: Duration = 1.0
    top_applications: int = Field(20, ge=1, le=1000)


class StatementsConfig(_Strict):
    enabled: bool = True
    interval: Duration = 15.0
    top_n: int = Field(20, ge=1, le=500)
    pinning_risk: bool = True
    # the daemon's own role's statements in the pinning-risk report (asyncpg's set_config)
    pinning_own_statements: bool = False


def dsn_host(dsn: str) -> str | None:
    """The DSN's host name (lower case); None for a socket path or several hosts."""
    try:
        host = urlsplit(dsn).hostname
    except ValueError:
        return None
    return host if host and "," not in host and not host.startswith("/") else None


class DatabaseAwsConfig(_Strict):
    """The RDS or Aurora instance behind a target (`databases[].aws`): its vCPUs, AWS's own
    load figure (DBLoad) and, for Aurora Serverless v2, its capacity. Without
    `db_instance_identifier` the instance is found from the DSN's host; a cluster endpoint
    follows the cluster's writer (or a reader, for the reader endpoint) across failovers.
    Region and credentials are the top-level `aws:` block's; CloudWatch is read every
    `aws.rds_proxy.interval`, `aws.rds_proxy.delay` late, in the same call as RDS Proxy."""

    db_instance_identifier: str | None = None
    discovery_interval: Duration = 300.0  # DescribeDBInstances: class changes, failovers
    performance_insights: bool = True  # Serverless v2 vCPUs from PI's os.general.numVCPUs

    @field_validator("db_instance_identifier")
    @classmethod
    def _rds_identifier(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]{0,62}", value):
            raise ValueError(
                "not an RDS DB instance identifier (a letter, then up to 62 letters, digits "
                "or hyphens)"
            )
        return value


class DatabaseConfig(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")
    dsn: str = Field(min_length=1)
    password_file: Path | None = None
    vcpus: float | None = Field(None, gt=0)
    activity: ActivityConfig = ActivityConfig()
    statements: StatementsConfig = StatementsConfig()
    statement_timeout: Duration = 2.0
    lock_timeout: Duration = 0.5
    connect_timeout: Duration = 3.0
    max_datnames: int = Field(50, ge=1)
    aws: DatabaseAwsConfig | None = None

    @field_validator("aws")
    @classmethod
    def _aws_instance_can_be_found(
        cls, aws: DatabaseAwsConfig | None, info: ValidationInfo
    ) -> DatabaseAwsConfig | None:
        dsn = info.data.get("dsn")
        if aws is not None and not aws.db_instance_identifier and dsn and not dsn_host(dsn):
            raise ValueError(
                "the dsn names no single host to find the instance by: "
                "set aws.db_instance_identifier"
            )
        return aws

    def host(self) -> str | None:
        return dsn_host(self.dsn)

    @field_validator("dsn")
    @classmethod
    def _dsn_is_postgres_url(cls, dsn: str) -> str:
        parts = urlsplit(dsn)
        if parts.scheme not in ("postgresql", "postgres"):
            raise ValueError("dsn must be a postgresql:// URL")
        if parts.password:
            redaction.register(unquote(parts.password))
        return dsn

    def password(self) -> str | None:
        """The password from password_file, read when connecting so rotation works."""
        if self.password_file is None:
            return None
        value = self.password_file.read_text().strip()
        redaction.register(value)
        return value


class IngestConfig(_Strict):
    enabled: bool = True
    token: str | None = None
    token_file: Path | None = None
    stale_after: Duration = 30.0
    max_body_bytes: int = Field(1_048_576, ge=1024)
    max_apps: int = Field(50, ge=1)
    max_pools_per_app: int = Field(20, ge=1)
    max_processes: int = Field(2000, ge=1)
    # No longer used: bodies being received are bounded by memory_budget_bytes, not by a
    # count a slow client could fill. Kept so that configurations setting it still load.
    max_concurrent_requests: int = Field(32, ge=1)
    # Everything ingest holds, in bytes (exporter.ingest.budget): half the memory limit of
    # deploy/kubernetes/base/deployment.yaml (256Mi), the rest for the daemon itself.
    memory_budget_bytes: int = Field(128 * 1024 * 1024, ge=1024 * 1024)

    @field_validator("token")
    @classmethod
    def _register_token(cls, token: str | None) -> str | None:
        if token:
            redaction.register(token)
        return token or None

    @model_validator(mode="after")
    def _one_token_source(self) -> IngestConfig:
        if self.token and self.token_file is not None:
            raise ValueError("set token or token_file, not both")
        return self

    def bearer_token(self) -> str | None:
        """The token pushes must carry, or None when ingest is open. With `token_file` an
        empty or unreadable file raises: it must never silently open the endpoint."""
        if self.token_file is not None:
            value = self.token_file.read_text().strip()
            if not value:
                raise OSError(errno.ENODATA, "the file is empty")
            redaction.register(value)
            return value
        return self.token


class RdsProxyConfig(_Strict):
    enabled: bool = False
    proxies: list[str] = []
    interval: Duration = 60.0
    delay: Duration = 120.0
    logs: bool = True
    discovery_interval: Duration = 300.0
    max_log_events_per_poll: int = Field(10_000, ge=1)
    max_proxies: int = Field(50, ge=1)


class AwsConfig(_Strict):
    region: str = "us-east-1"
    endpoint_url: str | None = None
    role_arn: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    rds_proxy: RdsProxyConfig = RdsProxyConfig()

    @field_validator("secret_access_key", "access_key_id")
    @classmethod
    def _register_keys(cls, value: str | None) -> str | None:
        if value:
            redaction.register(value)
        return value


class DiagnosisConfig(_Strict):
    """The live rules (exporter.diagnosis): how often they run, over how much history."""

    enabled: bool = True
    interval: Duration = 15.0
    window: Annotated[Duration, Field(ge=60.0, le=3600.0)] = 900.0
    max_series: int = Field(50_000, ge=100)  # the history's bound
    thresholds: Thresholds = Thresholds()


class Config(_Strict):
    databases: list[DatabaseConfig] = []
    ingest: IngestConfig = IngestConfig()
    aws: AwsConfig = AwsConfig()
    diagnosis: DiagnosisConfig = DiagnosisConfig()

    @model_validator(mode="after")
    def _unique_names(self) -> Config:
        names = [d.name for d in self.databases]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"database names must be unique, repeated: {', '.join(dupes)}")
        return self


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def interpolate(text: str, env: dict[str, str] | None = None) -> str:
    """Replace ${VAR} and ${VAR:-default}; an unset variable without default is an error."""
    env = os.environ if env is None else env
    missing: list[str] = []

    def repl(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        missing.append(name)
        return ""

    out = _ENV.sub(repl, text)
    if missing:
        raise ConfigError(f"environment variable(s) not set: {', '.join(sorted(set(missing)))}")
    return out


def _line_of(node: yaml.Node | None, loc: tuple[int | str, ...]) -> int | None:
    """Walk the composed YAML tree along a pydantic error location to find its line."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            nxt = next((v for k, v in node.value if k.value == part), None)
            key = next((k for k, v in node.value if k.value == part), None)
            if nxt is None:
                return line
            line = (key or nxt).start_mark.line + 1
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                return line
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _describe(err: dict[str, Any]) -> str:
    """pydantic's message without the input value (which may be a secret)."""
    kind = err["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    msg = str(err["msg"])
    return msg.removeprefix("Value error, ")


def _interpolate_values(data: Any) -> Any:
    """Interpolate in parsed string values only, so comments and keys are left alone."""
    if isinstance(data, str):
        return interpolate(data)
    if isinstance(data, dict):
        return {k: _interpolate_values(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_interpolate_values(v) for v in data]
    return data


def parse(text: str, source: str = "<config>") -> Config:
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{source}{where}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys")
    try:
        data = _interpolate_values(data)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            path = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc)
            path = path.replace(".[", "[") or "(top level)"
            line = _line_of(root, loc)
            where = f" line {line}" if line else ""
            lines.append(f"{source}{where}: {path}: {_describe(err)}")
        raise ConfigError("\n".join(lines)) from None


def load(path: str | Path) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"cannot read config file {path}: not UTF-8 text (byte {exc.start})"
        ) from None
    config = parse(text, str(path))
    check_files(config, str(path))
    return config


def check_files(config: Config, source: str) -> None:
    """Secrets in files must be readable at start, not at the first 3 a.m. reconnect."""
    for i, db in enumerate(config.databases):
        if db.password_file is not None:
            _check_file(db.password, f"{source}: databases[{i}].password_file", db.password_file)
    if config.ingest.token_file is not None:
        _check_file(
            config.ingest.bearer_token, f"{source}: ingest.token_file", config.ingest.token_file
        )


def _check_file(read: Callable[[], object], where: str, path: Path) -> None:
    try:
        read()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: cannot read {path}: not UTF-8 text") from None
