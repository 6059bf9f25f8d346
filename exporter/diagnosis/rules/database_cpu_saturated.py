"""`database_cpu_saturated` (target): more sessions want CPU than the server has vCPUs.

The field report that started pgpressure: a pool of 20 + overflow 100 on a few vCPUs. Every
extra connection is one more session in the CPU queue, so statements that take 60 ms alone
take seconds, callers wait for connections, and the reflex (a bigger pool) makes it worse.
This rule says so, and names the statements that use the CPU.
"""

from __future__ import annotations

from exporter.diagnosis.evidence import TargetEvidence
from exporter.diagnosis.finding import Chart, Finding
from exporter.diagnosis.text import num, pct, secs
from exporter.diagnosis.thresholds import Thresholds

NAME = "database_cpu_saturated"
SUBJECT = "target"


def saturated(ev: TargetEvidence, thresholds: Thresholds) -> bool:
    """AAS above the vCPUs with CPU the main wait: the one definition other rules share."""
    t = thresholds.database_cpu_saturated
    if ev.vcpus is None or ev.aas <= 0:
        return False
    return ev.aas > t.aas_over_vcpus * ev.vcpus and ev.aas_cpu / ev.aas >= t.cpu_share


def evaluate(ev: TargetEvidence, thresholds: Thresholds) -> Finding | None:
    t = thresholds.database_cpu_saturated
    if not saturated(ev, thresholds):
        return None
    vcpus = ev.vcpus or 1.0
    cpu_share = ev.aas_cpu / ev.aas
    pool_max = ev.pools_capacity
    top = ev.top_by_exec()
    details = tuple(
        f"queryid {s.queryid} ({s.datname}): {secs(s.exec_seconds_per_s)} of execution per "
        f"second, {pct(s.exec_seconds_per_s / ev.aas)} of the load, {num(s.calls_per_s)} calls/s"
        for s in top
    )
    pools = f"; the pools linked here can open {num(pool_max)}" if ev.pools else ""
    fix = (
        f"Do not enlarge the pools: on {num(vcpus)} vCPUs more connections only lengthen the "
        f"CPU queue{pools}. Cap all pools together near {num(2 * vcpus)}-{num(4 * vcpus)} "
        "connections and let callers wait in the application, where it is cheap; cut the "
        "CPU of the top statements (indexes, fewer rows, cached results)"
        + (f", starting with queryid {top[0].queryid}" if top else "")
        + "; or add vCPUs."
    )
    return Finding(
        rule=NAME,
        severity="critical" if ev.aas >= t.critical_over_vcpus * vcpus else "warning",
        subject={"target": ev.target},
        summary=(
            f"{ev.target}: {num(ev.aas)} active sessions on {num(vcpus)} vCPUs, "
            f"{pct(cpu_share)} on CPU: sessions queue for CPU, and a larger pool would make "
            "it worse"
        ),
        evidence={
            "aas": ev.aas,
            "aas_cpu": ev.aas_cpu,
            "vcpus": vcpus,
            "cpu_share": cpu_share,
            "pools_max_connections": pool_max if ev.pools else None,
        },
        window=ev.window,
        fix=fix,
        chart=Chart("active sessions", ev.aas_trend, "", vcpus, "vCPUs"),
        details=details,
    )
