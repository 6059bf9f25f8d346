"""In-app SQLAlchemy pool instrumentation for pgpressure (standard library + SQLAlchemy only).

    from pgpressure_sqlalchemy import instrument
    instrument(engine, app="orders", endpoint="http://pgpressure:9188")

or add `?plugin=pgpressure&pgpressure_app=orders` to the engine URL. See docs/instrumenting.md.

The names are resolved on first use (PEP 562), so loading the URL plugin or the wire format
(`pgpressure_sqlalchemy.wire`, standard library only) does not import the instrumentation:
the plugin can then catch anything that goes wrong in it and leave the engine alone.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Instrumentation", "flush", "instrument"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from pgpressure_sqlalchemy import core

        return getattr(core, name)
    raise AttributeError(f"module 'pgpressure_sqlalchemy' has no attribute {name!r}")
