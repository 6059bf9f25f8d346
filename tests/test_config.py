"""Configuration: typed values, and one clear message with key and line for every mistake."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from exporter.config import ConfigError, interpolate, parse, parse_duration

CANARY = "Canary-Pw-7f3e9"


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "exporter", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("1s", 1.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("15", 15.0),
        (3, 3.0),
        (0.25, 0.25),
    ],
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "bad", ["1 fortnight", "-1s", "0", "s", True, "1.5.2s", float("nan"), float("inf")]
)
def test_bad_durations_are_refused(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_interpolation_with_defaults_and_missing_variables():
    assert interpolate("a: ${X}", {"X": "1"}) == "a: 1"
    assert interpolate("a: ${Y:-fallback}", {}) == "a: fallback"
    with pytest.raises(ConfigError, match="NOPE"):
        interpolate("a: ${NOPE}", {})


def test_contract_example_parses(monkeypatch):
    monkeypatch.setenv("PGPRESSURE_INGEST_TOKEN", "tok-123456")
    config = parse(Path("config.yaml").read_text())
    db = config.databases[0]
    assert db.name == "main"
    assert db.activity.interval == 1.0
    assert config.ingest.stale_after == 30.0
    assert config.ingest.token == "tok-123456"
    assert config.aws.rds_proxy.delay == 120.0


def _error(text: str) -> str:
    with pytest.raises(ConfigError) as exc:
        parse(text, "c.yaml")
    return str(exc.value)


def test_missing_dsn_names_key_and_line():
    message = _error("databases:\n  - name: main\n    vcpus: 2\n")
    assert message == "c.yaml line 2: databases[0].dsn: required key is missing"


def test_unknown_key_names_key_and_line():
    message = _error(
        "databases:\n  - name: main\n    dsn: postgresql://h/db\n    activty: {interval: 1s}\n"
    )
    assert message == "c.yaml line 4: databases[0].activty: unknown key"


def test_bad_duration_names_key_and_line():
    message = _error(
        "databases:\n  - name: main\n    dsn: postgresql://h/db\n"
        "    activity:\n      interval: soon\n"
    )
    assert message.startswith("c.yaml line 5: databases[0].activity.interval: invalid duration")


def test_yaml_syntax_error_has_line():
    assert _error("databases: [\n  {name: a\n").startswith("c.yaml line ")


def test_duplicate_target_names_are_refused():
    message = _error(
        "databases:\n  - {name: a, dsn: 'postgresql://h/db'}\n"
        "  - {name: a, dsn: 'postgresql://h/db2'}\n"
    )
    assert "repeated: a" in message


def test_cli_bad_configs_exit_1_with_clear_message_and_no_password(tmp_path):
    cases = {
        "missing dsn": ("databases:\n  - name: main\n", "databases[0].dsn: required key"),
        "unknown key": (
            f"databases:\n  - name: main\n    dsn: postgresql://u:{CANARY}@h/db\n"
            "    colour: blue\n",
            "databases[0].colour: unknown key",
        ),
        "bad duration": (
            f"databases:\n  - name: main\n    dsn: postgresql://u:{CANARY}@h/db\n"
            "    statement_timeout: 2 parsecs\n",
            "databases[0].statement_timeout: invalid duration",
        ),
        "unreadable password_file": (
            f"databases:\n  - name: main\n    dsn: postgresql://u@h/db\n"
            f"    password_file: {tmp_path}/nope\n",
            "databases[0].password_file: cannot read",
        ),
        "bad dsn scheme": (
            f"databases:\n  - name: main\n    dsn: mysql://u:{CANARY}@h/db\n",
            "databases[0].dsn: dsn must be a postgresql:// URL",
        ),
        "non-finite duration (YAML .nan)": (
            "databases:\n  - name: main\n    dsn: postgresql://u@h/db\n"
            "    activity: {interval: .nan}\n",
            "databases[0].activity.interval: duration must be a finite number",
        ),
        "token and token_file": (
            f"ingest:\n  token: {CANARY}\n  token_file: {tmp_path}/token\n",
            "ingest: set token or token_file, not both",
        ),
        "empty token_file": (
            f"ingest:\n  token_file: {tmp_path}/empty-token\n",
            "ingest.token_file: cannot read",
        ),
    }
    (tmp_path / "empty-token").write_text("\n")
    for name, (text, expected) in cases.items():
        path = tmp_path / "config.yaml"
        path.write_text(text)
        for command in (["check-config"], ["run"]):
            result = run_cli(*command, "--config.file", str(path))
            assert result.returncode == 1, name
            assert expected in result.stderr, (name, result.stderr)
            assert CANARY not in result.stderr + result.stdout, name
            assert "Traceback" not in result.stderr, name


def test_check_config_ok(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("databases:\n  - {name: main, dsn: 'postgresql://u@h/db'}\n")
    result = run_cli("check-config", "--config.file", str(path))
    assert result.returncode == 0, result.stderr
    assert "OK (1 database target(s)" in result.stdout


def test_missing_config_file_is_a_clear_error(tmp_path):
    result = run_cli("--config.file", str(tmp_path / "absent.yaml"))
    assert result.returncode == 1
    assert "cannot read config file" in result.stderr


def test_a_config_file_that_is_not_utf8_is_a_clear_error(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_bytes(b"databases: []\n# caf\xe9\n")
    result = run_cli("check-config", "--config.file", str(path))
    assert result.returncode == 1
    assert "not UTF-8 text" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("address", [":70000", "host", ":-1", "h:port"])
def test_a_bad_listen_address_is_a_clear_error(tmp_path, address):
    path = tmp_path / "config.yaml"
    path.write_text("databases: []\ningest: {enabled: false}\n")
    result = run_cli("--config.file", str(path), "--web.listen-address", address)
    assert result.returncode == 1
    assert "invalid --web.listen-address" in result.stderr and "Traceback" not in result.stderr
