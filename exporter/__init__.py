"""pgpressure: a Prometheus exporter for SQLAlchemy pools, PostgreSQL load and RDS Proxy."""

__version__ = "0.3.0"
