"""Command line, in the style of Prometheus exporters (exporter-toolkit flag names).

pgpressure [run] --config.file config.yaml [--web.listen-address :9188]
                 [--web.config.file web.yml] [--web.max-connections 512]
                 [--log.level info] [--log.format logfmt]
pgpressure check-config --config.file config.yaml
pgpressure demo [--web.listen-address :9188]
pgpressure doctor [--url http://daemon:9188 | --prometheus URL [--at TIME] [--window 15m]]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import ssl
import sys
from collections.abc import Callable

from exporter import __version__, logs
from exporter.config import Config, ConfigError, load
from exporter.http.connlimit import DEFAULT_MAX_CONNECTIONS
from exporter.redaction import redact

COMMANDS = ("run", "check-config", "demo", "doctor")

log = logging.getLogger("pgpressure")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log.level",
        dest="log_level",
        default="info",
        choices=sorted(logs.LEVELS),
        help="only log at or above this level",
    )
    parser.add_argument(
        "--log.format",
        dest="log_format",
        default="logfmt",
        choices=("logfmt", "json"),
        help="log line format",
    )


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number above 0, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgpressure",
        description="Prometheus exporter for SQLAlchemy pools, PostgreSQL load and RDS Proxy.",
    )
    parser.add_argument("--version", action="version", version=f"pgpressure {__version__}")
    sub = parser.add_subparsers(dest="command")

    run = sub.add_parser("run", help="run the exporter (the default)")
    run.add_argument(
        "--config.file",
        dest="config_file",
        default="config.yaml",
        help="YAML configuration file (default: config.yaml)",
    )
    run.add_argument(
        "--web.listen-address",
        dest="listen_address",
        default=":9188",
        help="address to listen on (default: :9188)",
    )
    run.add_argument(
        "--web.config.file",
        dest="web_config_file",
        default=None,
        help="exporter-toolkit web config: TLS and basic auth",
    )
    run.add_argument(
        "--web.max-connections",
        dest="max_connections",
        type=_positive_int,
        default=DEFAULT_MAX_CONNECTIONS,
        help="HTTP connections open at once; more are closed on accept "
        f"(default: {DEFAULT_MAX_CONNECTIONS})",
    )
    _common(run)

    check = sub.add_parser("check-config", help="validate the configuration and exit")
    check.add_argument("--config.file", dest="config_file", default="config.yaml")
    _common(check)

    demo = sub.add_parser("demo", help="run on a throwaway database with a workload")
    demo.add_argument("--web.listen-address", dest="listen_address", default=":9188")
    demo.add_argument(
        "--duration",
        type=float,
        default=None,
        help="stop after this many seconds (default: until Ctrl-C)",
    )
    _common(demo)

    # Its own parser (exporter.diagnosis.doctor); listed here for --help.
    sub.add_parser("doctor", help="print the diagnosis: live (--url) or post mortem (--prometheus)")
    return parser


def _argv_with_default_command(argv: list[str]) -> list[str]:
    if any(a in COMMANDS for a in argv[:1]) or any(
        a in ("-h", "--help", "--version") for a in argv[:1]
    ):
        return argv
    return ["run", *argv]


def _fail(message: str) -> int:
    # Not through logging, so redact here: a value quoted in a config error can be a secret
    # (e.g. a token interpolated into the wrong key).
    print(f"pgpressure: {redact(message)}", file=sys.stderr)
    return 1


def _web_config(path: str, config: Config) -> tuple[ssl.SSLContext | None, list[Callable]]:
    """(SSL context, middlewares) of the web config file; warns when basic auth is on and
    the ingest endpoint, which it does not cover, has no token of its own."""
    from exporter.http.webconfig import load_web_config

    web = load_web_config(path)
    ingest = config.ingest
    if web.basic_auth and ingest.enabled and not ingest.bearer_token():
        log.warning(
            "basic_auth_users do not cover the ingest endpoint POST /api/v1/reports, "
            "which has its own bearer token: set ingest.token"
        )
    return web.ssl_context, [web.middleware]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["doctor"]:
        from exporter.diagnosis.doctor import main as doctor

        return doctor(argv[1:])
    args = build_parser().parse_args(_argv_with_default_command(argv))
    logs.setup(args.log_level, args.log_format)

    if args.command == "demo":
        from exporter.devtools.demo import run_demo

        return run_demo(args.listen_address, args.duration)

    try:
        config = load(args.config_file)
    except ConfigError as exc:
        return _fail(str(exc))
    if args.command == "check-config":
        print(
            f"{args.config_file}: OK ({len(config.databases)} database target(s), "
            f"ingest {'on' if config.ingest.enabled else 'off'}, "
            f"rds_proxy {'on' if config.aws.rds_proxy.enabled else 'off'})"
        )
        return 0

    ssl_context, middlewares = None, []
    if args.web_config_file:
        from exporter.http.webconfig import WebConfigError

        try:
            ssl_context, middlewares = _web_config(args.web_config_file, config)
        except WebConfigError as exc:
            return _fail(str(exc))

    from exporter.daemon import Daemon, parse_listen_address

    try:
        parse_listen_address(args.listen_address)
    except ValueError as exc:
        return _fail(str(exc))
    log.info("starting pgpressure", extra=logs.kv(version=__version__, config=args.config_file))
    daemon = Daemon(
        config,
        args.listen_address,
        ssl_context,
        middlewares,
        args.max_connections,
        config_file=args.config_file,  # re-read on SIGHUP and POST /-/reload
    )
    try:
        asyncio.run(daemon.run())
    except OSError as exc:
        return _fail(f"cannot listen on {args.listen_address}: {exc.strerror or exc}")
    log.info("stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
