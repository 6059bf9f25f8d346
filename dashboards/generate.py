"""Generate pgpressure's Grafana dashboards with grafana-foundation-sdk.

    python dashboards/generate.py            # write dashboards/*.json
    python dashboards/generate.py --check    # exit 1 if the committed JSON is out of date

The dashboards are defined in the `gen` package next to this file, one module per dashboard.
Every dashboard asks for its Prometheus on import (`__inputs` DS_PROMETHEUS, also a data source
variable so provisioned files work) and has `job`, `target`, `app` and `proxy` variables
(multi-value, "All" = `.*`), so every query filters with `=~"$var"`. Every panel has a unit and
a description that says how to read it. Queries use the metrics in exporter/metrics.py and the
recording rules in alerts/pgpressure.rules.yml; tests/test_dashboards.py checks both, and that
every query parses.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

from gen import render

OUT_DIR = Path(__file__).resolve().parent


def _stale(out: Path, rendered: dict[str, str]) -> list[str]:
    """Names whose committed file differs from `rendered`; the diff goes to stderr."""
    stale = []
    for name, text in rendered.items():
        path = out / name
        current = path.read_text() if path.exists() else ""
        if current != text:
            stale.append(name)
            sys.stderr.writelines(
                difflib.unified_diff(
                    current.splitlines(True),
                    text.splitlines(True),
                    f"{name} (committed)",
                    f"{name} (generated)",
                    n=2,
                )
            )
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if committed JSON differs")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output directory")
    args = parser.parse_args(argv)
    rendered = render()
    if not args.check:
        for name, text in rendered.items():
            (args.out / name).write_text(text)
        return 0
    stale = _stale(args.out, rendered)
    if stale:
        print(
            f"out of date: {', '.join(stale)}; run python dashboards/generate.py",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
