"""The `pgpressure` SQLAlchemy engine plugin: instrumentation without code changes.

    postgresql+psycopg://u@h/db?plugin=pgpressure&pgpressure_app=orders

The `pgpressure_*` parameters are taken out of the URL (and out of create_engine() keyword
arguments) so they never reach the driver. A bad parameter is logged, never raised: an app
must not fail to start because its monitoring is misconfigured, nor because the
instrumentation itself is broken: this module imports only SQLAlchemy at load time and the
rest of the package when the engine exists, inside the same guard.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.engine import CreateEnginePlugin
from sqlalchemy.engine.url import URL

log = logging.getLogger("pgpressure.instrument")

PREFIX = "pgpressure_"
_TRUE = ("1", "true", "yes", "on")


class PgPressurePlugin(CreateEnginePlugin):
    def __init__(self, url: URL, kwargs: dict[str, Any]) -> None:
        super().__init__(url, kwargs)
        self.options: dict[str, str] = {}
        for key, value in url.query.items():
            if key.startswith(PREFIX):
                self.options[key[len(PREFIX) :]] = value[-1] if isinstance(value, tuple) else value
        for key in [k for k in kwargs if k.startswith(PREFIX)]:
            self.options[key[len(PREFIX) :]] = kwargs.pop(key)

    def update_url(self, url: URL) -> URL:
        return url.difference_update_query([k for k in url.query if k.startswith(PREFIX)])

    def engine_created(self, engine: Any) -> None:
        opts = self.options
        try:
            from pgpressure_sqlalchemy.core import instrument

            app_name = str(opts.get("application_name", "1")).lower()
            instrument(
                engine,
                app=opts.get("app"),
                pool=opts.get("pool"),
                endpoint=opts.get("endpoint"),
                token=opts.get("token"),
                interval=float(opts["interval"]) if opts.get("interval") else None,
                statements=str(opts.get("statements", "1")).lower() in _TRUE,
                application_name=app_name in _TRUE,
            )
        except Exception as exc:
            log.warning("pgpressure: engine not instrumented: %s", exc)
