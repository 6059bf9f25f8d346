"""The daemon's AWS sources, built together so they share one CloudWatch reader.

RDS Proxy (daemon-wide) and each target's RDS instance read `AWS/RDS` through one
`MetricData`, hence one `GetMetricData` call per minute for all of them, on one set of boto3
clients (one credential chain, one assumed role). Each instance source hands the vCPUs it
learns to its target's activity source, which exports `pg_vcpus`.
"""

from __future__ import annotations

from exporter.aws.cloudwatch import MetricData
from exporter.aws.rds_instances import RdsInstanceSource
from exporter.aws.rds_proxy import RdsProxySource
from exporter.config import Config
from exporter.core.source import Source
from exporter.postgres.activity import ActivitySource


def aws_sources(config: Config, sources: list[Source]) -> list[Source]:
    """The AWS sources for this configuration ([] without RDS Proxy or any `aws:` target);
    `sources` are the daemon's others, to find each target's activity source."""
    targets = [db for db in config.databases if db.aws is not None]
    if not config.aws.rds_proxy.enabled and not targets:
        return []
    metric_data = MetricData(config.aws)
    out: list[Source] = []
    if config.aws.rds_proxy.enabled:
        out.append(RdsProxySource(config.aws, metric_data=metric_data))
    activity = {s.target: s for s in sources if isinstance(s, ActivitySource)}
    for db in targets:
        target = activity.get(db.name)
        out.append(
            RdsInstanceSource(
                db,
                config.aws,
                metric_data,
                on_vcpus=target.use_aws_vcpus if target else None,
                active_seconds=(lambda t=target: t.active_seconds_total) if target else None,
            )
        )
    return out
