"""Diagnosis: findings that name the cause of pressure, not only the symptom.

Evidence records (`evidence`) are plain numbers over a window, per subject (a PostgreSQL
target, an app's pool, an RDS Proxy). They are built the same way (`collect`) from either of
two window readers: the daemon's bounded in-memory history (`history`, live) or Prometheus's
HTTP API (`promql`, post mortem). Every rule (`rules/`) is a pure function of one record and
the thresholds (`thresholds`), so one rule set serves both and is unit-testable on records.
"""
