"""How many vCPUs an RDS instance has, from AWS, for targets without `vcpus` configured.

A provisioned class is an EC2 instance type with `db.` in front (`db.r6g.2xlarge` is
`r6g.2xlarge`), so `ec2:DescribeInstanceTypes` gives `VCpuInfo.DefaultVCpus`. Instance types do
not change, so an answer is kept for hours; a class change is a different type and is looked
up at once.

Aurora Serverless v2 (`db.serverless`) has no fixed vCPUs and AWS publishes no ACU-to-vCPU
ratio, so none is invented here. Performance Insights' own "Max vCPU" line is its counter
`os.general.numVCPUs`, which follows the capacity as it scales: with Performance Insights on,
that counter's newest minute is the figure; without it the vCPUs are unknown and load can be
read against capacity (ACUs) only.
"""

from __future__ import annotations

from collections.abc import Callable

from exporter.aws.clients import Clients

TYPE_TTL = 6 * 3600.0  # seconds an instance type's vCPUs are kept
PI_METRIC = "os.general.numVCPUs.avg"
PI_LOOKBACK = 600.0  # seconds of Performance Insights history asked for the newest minute


class NoVcpuFigure(RuntimeError):
    """AWS answered, but with nothing to read vCPUs from."""


class VcpuLookup:
    def __init__(self, clients: Clients, clock: Callable[[], float]) -> None:
        self.clients = clients
        self.clock = clock
        self._types: dict[str, tuple[float, float]] = {}  # EC2 type -> (vCPUs, read at)

    def cached(self, instance_class: str) -> float | None:
        """The last answer for this class, however old (a stale figure beats none while
        the call fails)."""
        entry = self._types.get(ec2_type(instance_class))
        return entry[0] if entry else None

    def for_class(self, instance_class: str) -> float:
        """DefaultVCpus of the class's EC2 instance type (AwsApiError when the call fails)."""
        kind = ec2_type(instance_class)
        now = self.clock()
        entry = self._types.get(kind)
        if entry is not None and now - entry[1] < TYPE_TTL:
            return entry[0]
        page = self.clients.call(
            "ec2", "describe_instance_types", "InstanceTypes", InstanceTypes=[kind]
        )
        for item in page.get("InstanceTypes", []):
            vcpus = item.get("VCpuInfo", {}).get("DefaultVCpus")
            if item.get("InstanceType") == kind and isinstance(vcpus, int) and vcpus > 0:
                self._types[kind] = (float(vcpus), now)
                return float(vcpus)
        raise NoVcpuFigure(f"DescribeInstanceTypes has no vCPU count for {kind}")

    def from_performance_insights(self, resource_id: str) -> float:
        """The newest minute of os.general.numVCPUs (AwsApiError when the call fails,
        NoVcpuFigure when Performance Insights has no such minute)."""
        now = self.clock()
        page = self.clients.call(
            "pi",
            "get_resource_metrics",
            "MetricList",
            ServiceType="RDS",
            Identifier=resource_id,
            MetricQueries=[{"Metric": PI_METRIC}],
            StartTime=now - PI_LOOKBACK,
            EndTime=now,
            PeriodInSeconds=60,
        )
        points = [
            (point["Timestamp"], float(point["Value"]))
            for metric in page.get("MetricList", [])
            if metric.get("Key", {}).get("Metric") == PI_METRIC
            for point in metric.get("DataPoints", [])
            if isinstance(point.get("Value"), int | float) and point["Value"] > 0
        ]
        if not points:
            raise NoVcpuFigure(f"Performance Insights has no {PI_METRIC} in the last 10 minutes")
        return max(points)[1]


def ec2_type(instance_class: str) -> str:
    """db.r6g.2xlarge -> r6g.2xlarge"""
    return instance_class.removeprefix("db.")
