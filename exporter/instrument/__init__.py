"""In-app SQLAlchemy pool instrumentation for pgpressure (standard library + SQLAlchemy only).

    from exporter.instrument import instrument
    instrument(engine, app="orders", endpoint="http://pgpressure:9188")

or add `?plugin=pgpressure&pgpressure_app=orders` to the engine URL. See docs/instrumenting.md.
"""

from exporter.instrument.core import Instrumentation, flush, instrument

__all__ = ["Instrumentation", "flush", "instrument"]
