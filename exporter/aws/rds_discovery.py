"""Which RDS instance a target is on: by its identifier, or found from the DSN's host.

An instance endpoint names one instance (`DescribeDBInstances`, matching `Endpoint.Address`).
An Aurora cluster endpoint names whichever instance is the writer now, and the reader endpoint
one of the readers (DNS picks one per connection; we cannot know which, so we follow the first
reader by name and say so): both are resolved through `DescribeDBClusters` and its members'
`IsClusterWriter`, and looked up again every discovery interval, so a failover or a class
change is followed. The Serverless v2 capacity range (min/max ACUs) is the cluster's.
"""

from __future__ import annotations

from dataclasses import dataclass

from exporter.aws.clients import AwsApiError, Clients

SERVERLESS_CLASS = "db.serverless"


class InstanceNotFound(RuntimeError):
    """The configured identifier or the DSN's host names no instance in this region."""


@dataclass(frozen=True, slots=True)
class Instance:
    identifier: str
    instance_class: str = ""  # "" when DescribeDBInstances could not be read
    cluster: str = ""
    role: str = "instance"  # writer / reader (Aurora), instance (outside a cluster)
    resource_id: str = ""  # DbiResourceId: Performance Insights' identifier
    performance_insights: bool | None = None  # None: not said
    found_by: str = "db_instance_identifier"
    min_acus: float | None = None  # Serverless v2 scaling range of the cluster
    max_acus: float | None = None

    @property
    def serverless(self) -> bool:
        return self.instance_class == SERVERLESS_CLASS


def find(clients: Clients, identifier: str | None, host: str | None) -> Instance:
    """The instance now behind `identifier` or the DSN's `host` (AwsApiError on a failed call,
    InstanceNotFound when nothing matches)."""
    if identifier:
        item = _instance(clients, identifier)
        if item is None:
            raise InstanceNotFound(f"no DB instance {identifier!r} in this region")
        return _with_cluster(clients, item, "db_instance_identifier")
    host = (host or "").lower()
    lookups = (_by_instance_endpoint, _by_cluster_endpoint)
    if ".cluster-" in host:  # Aurora's cluster endpoints read: name.cluster[-ro]-xyz.region...
        lookups = lookups[::-1]
    for lookup in lookups:
        found = lookup(clients, host)
        if found is not None:
            return found
    raise InstanceNotFound(
        f"no RDS instance or Aurora cluster has the endpoint {host}; "
        "set aws.db_instance_identifier (a custom DNS name or custom endpoint is not matched)"
    )


def _instance(clients: Clients, identifier: str) -> dict | None:
    try:
        page = clients.call(
            "rds", "describe_db_instances", "DBInstances", DBInstanceIdentifier=identifier
        )
    except AwsApiError as exc:
        if exc.code == "DBInstanceNotFound":
            return None
        raise
    items = page.get("DBInstances", [])
    return items[0] if items else None


def _by_instance_endpoint(clients: Clients, host: str) -> Instance | None:
    for page in clients.pages(
        "rds", "describe_db_instances", "DBInstances", "Marker", "Marker", MaxRecords=100
    ):
        for item in page.get("DBInstances", []):
            if str(item.get("Endpoint", {}).get("Address", "")).lower() == host:
                return _with_cluster(clients, item, "instance endpoint")
    return None


def _by_cluster_endpoint(clients: Clients, host: str) -> Instance | None:
    for page in clients.pages(
        "rds", "describe_db_clusters", "DBClusters", "Marker", "Marker", MaxRecords=100
    ):
        for cluster in page.get("DBClusters", []):
            if str(cluster.get("Endpoint", "")).lower() == host:
                return _member(clients, cluster, writer=True)
            if str(cluster.get("ReaderEndpoint", "")).lower() == host:
                return _member(clients, cluster, writer=False)
    return None


def _member(clients: Clients, cluster: dict, *, writer: bool) -> Instance:
    members = cluster.get("DBClusterMembers", [])
    chosen = sorted(
        str(m.get("DBInstanceIdentifier", ""))
        for m in members
        if bool(m.get("IsClusterWriter")) is writer
    )
    name = cluster.get("DBClusterIdentifier", "")
    if not chosen:
        kind = "writer" if writer else "reader"
        raise InstanceNotFound(f"Aurora cluster {name!r} has no {kind} instance now")
    item = _instance(clients, chosen[0])
    if item is None:
        raise InstanceNotFound(f"the member {chosen[0]!r} of cluster {name!r} is gone")
    how = "cluster endpoint" if writer else f"reader endpoint (first of {len(chosen)} readers)"
    return _described(item, cluster, how)


def _with_cluster(clients: Clients, item: dict, found_by: str) -> Instance:
    name = item.get("DBClusterIdentifier")
    cluster = None
    if name:
        page = clients.call("rds", "describe_db_clusters", "DBClusters", DBClusterIdentifier=name)
        cluster = next(iter(page.get("DBClusters", [])), None)
    return _described(item, cluster, found_by)


def _described(item: dict, cluster: dict | None, found_by: str) -> Instance:
    identifier = str(item.get("DBInstanceIdentifier", ""))
    role, scaling = "instance", {}
    if cluster is not None:
        writers = {
            m.get("DBInstanceIdentifier")
            for m in cluster.get("DBClusterMembers", [])
            if m.get("IsClusterWriter")
        }
        role = "writer" if identifier in writers else "reader"
        scaling = cluster.get("ServerlessV2ScalingConfiguration") or {}
    pi = item.get("PerformanceInsightsEnabled")
    return Instance(
        identifier=identifier,
        instance_class=str(item.get("DBInstanceClass", "")),
        cluster=str(item.get("DBClusterIdentifier") or ""),
        role=role,
        resource_id=str(item.get("DbiResourceId", "")),
        performance_insights=pi if isinstance(pi, bool) else None,
        found_by=found_by,
        min_acus=_number(scaling.get("MinCapacity")),
        max_acus=_number(scaling.get("MaxCapacity")),
    )


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
