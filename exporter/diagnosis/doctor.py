"""`pgpressure doctor`: the findings, for a terminal.

    pgpressure doctor [--url http://daemon:9188]                 # what the daemon sees now
    pgpressure doctor --prometheus URL [--at TIME] [--window 15m] # post mortem, from Prometheus

Live, it reads the daemon's `GET /api/v1/findings`. Post mortem, it computes the same evidence
with PromQL at `--at` (unix seconds or ISO 8601, default now) and runs the same rules, with
the thresholds of `--config.file` if given. Exit status: 0 healthy, 1 with findings, 2 cannot
tell (the daemon or Prometheus unreachable, still warming up, or no pgpressure data at all).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import textwrap
import time
import urllib.error
import urllib.request
from datetime import datetime
from typing import Any, TextIO

from exporter.config import ConfigError, load, parse_duration
from exporter.diagnosis import rules
from exporter.diagnosis.collect import collect
from exporter.diagnosis.finding import Chart, Finding
from exporter.diagnosis.promql import Prometheus, PrometheusError
from exporter.diagnosis.thresholds import Thresholds

HEALTHY, FINDINGS, CANNOT_TELL = 0, 1, 2
FINDINGS_PATH = "/api/v1/findings"
BARS = "▁▂▃▄▅▆▇█"


class CannotTell(Exception):
    """Why the doctor cannot say whether things are healthy."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgpressure doctor",
        description="Name the cause of pool, database and proxy pressure, with the fix.",
    )
    parser.add_argument("--url", default="http://localhost:9188", help="the daemon, live")
    parser.add_argument("--prometheus", help="post mortem: Prometheus's base URL")
    parser.add_argument("--at", type=parse_time, help="the window's end (post mortem)")
    parser.add_argument("--window", type=parse_duration, default=900.0, help="e.g. 15m")
    parser.add_argument("--step", type=parse_duration, default=15.0, help="the scrape interval")
    parser.add_argument("--selector", default="", help='added to every series, e.g. job="pg"')
    parser.add_argument("--config.file", dest="config_file", help="thresholds (diagnosis:)")
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")
    parser.add_argument("--timeout", type=parse_duration, default=30.0)
    return parser


def parse_time(text: str) -> float:
    """Unix seconds, or ISO 8601 (`2024-05-01T03:00:00Z`; no zone means UTC)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a time: {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.now().astimezone().tzinfo)
    return when.timestamp()


def main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = out or sys.stdout
    try:
        findings = post_mortem(args) if args.prometheus else from_daemon(args.url, args.timeout)
    except CannotTell as exc:
        print(f"cannot tell: {exc}", file=out)
        return CANNOT_TELL
    if args.json:
        json.dump([f.to_json() for f in findings], out, indent=2)
        print(file=out)
    else:
        print_findings(findings, out)
    return FINDINGS if findings else HEALTHY


def _thresholds(config_file: str | None) -> Thresholds:
    if not config_file:
        return Thresholds()
    try:
        return load(config_file).diagnosis.thresholds
    except ConfigError as exc:
        raise CannotTell(str(exc)) from None


def post_mortem(args: argparse.Namespace) -> list[Finding]:
    thresholds = _thresholds(args.config_file)
    at = args.at if args.at is not None else time.time()
    reader = Prometheus(
        args.prometheus,
        at,
        args.window,
        step=args.step,
        selector=args.selector,
        timeout=args.timeout,
    )
    try:
        evidence = collect(reader)
    except PrometheusError as exc:
        raise CannotTell(str(exc)) from None
    if evidence.empty:
        raise CannotTell(f"no pgpressure series in {args.prometheus} in the window ending {at:.0f}")
    return rules.evaluate(evidence, thresholds)


def from_daemon(url: str, timeout: float) -> list[Finding]:
    try:
        with urllib.request.urlopen(url.rstrip("/") + FINDINGS_PATH, timeout=timeout) as r:
            doc: dict[str, Any] = json.load(r)
    except (OSError, ValueError) as exc:
        raise CannotTell(f"cannot read {url}{FINDINGS_PATH}: {exc}") from None
    if doc.get("status") != "ok":
        raise CannotTell(f"the daemon says {doc.get('status')!r} (its history is too short)")
    return [Finding.from_json(f) for f in doc.get("findings", [])]


def sparkline(chart: Chart) -> str:
    values = [v for v in chart.values if not math.isnan(v)]
    if not values:
        return ""
    top = max(max(values), chart.reference or 0.0) or 1.0
    bars = "".join(
        " " if math.isnan(v) else BARS[min(len(BARS) - 1, int(v / top * (len(BARS) - 1)))]
        for v in chart.values
    )
    ref = f" ({chart.reference_label} {chart.reference:g})" if chart.reference else ""
    return f"{bars}  {chart.label}{ref}"


def print_findings(findings: list[Finding], out: TextIO) -> None:
    if not findings:
        print("healthy: no rule found a cause of pressure in the window", file=out)
        return
    width = min(shutil.get_terminal_size((100, 20)).columns, 120)
    wrap = textwrap.TextWrapper(width=width, initial_indent="  ", subsequent_indent="    ")
    for f in findings:
        subject = " ".join(f"{k}={v}" for k, v in f.subject.items() if v)
        print(f"{f.severity.upper()} {f.rule}  {subject}", file=out)
        print(wrap.fill(f.summary), file=out)
        values = ", ".join(f"{k}={_short(v)}" for k, v in f.evidence.items() if v is not None)
        print(wrap.fill(f"evidence over {f.window:.0f}s: {values}"), file=out)
        if f.chart is not None and sparkline(f.chart):
            print(f"  {sparkline(f.chart)}", file=out)
        print(wrap.fill(f"fix: {f.fix}"), file=out)
        for line in f.details:
            print(wrap.fill(f"- {line}"), file=out)
        print(f"  runbook: {f.runbook_url}", file=out)
        print(file=out)


def _short(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


if __name__ == "__main__":
    raise SystemExit(main())
