"""AWS for the tests: moto in server mode, and small local HTTP servers in front of it (or in
its place) that count calls per API operation and answer with injected faults. Where moto has
no API the daemon calls, the fault proxy answers it itself: Performance Insights'
GetResourceMetrics (`PerformanceInsights`), from datapoints a test puts."""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

# (status, headers, body) of one HTTP answer
Answer = tuple[int, dict[str, str], bytes]

# marks a next-page token that FaultProxy.inject_empty_pages() handed out
EMPTY_PAGE_TOKEN = "aws-emulator-empty-page:"


@dataclass(frozen=True)
class EmptyPages:
    """What a scan meets before its items (FaultProxy.inject_empty_pages)."""

    pages: int
    items: str
    token: str
    match: dict[str, object]


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """moto in server mode on 127.0.0.1 (a free port); yields its URL. It starts empty:
    moto keeps its state per Python process, not per server, so what an earlier test put
    (a newer datapoint for the same proxy, say) would otherwise still be there."""
    from moto.server import ThreadedMotoServer  # only the tests that use moto pay its import

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
        reset_moto(url)
        yield url
    finally:
        server.stop()


def reset_moto(url: str) -> None:
    """Forget every resource and datapoint (moto's own reset endpoint)."""
    request = urllib.request.Request(f"{url}/moto-api/reset", method="POST")
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 200, answer.status


class LocalHttpServer:
    """A ThreadingHTTPServer on 127.0.0.1 (a free port), serving in a daemon thread from the
    moment it is made; `url` is where, `close()` stops it (so does leaving a `with`).
    Subclasses answer every GET and POST in `answer()`."""

    protocol_version = "HTTP/1.0"  # HTTP/1.1: clients keep their connections open

    def __init__(self) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = owner.protocol_version

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, headers, payload = owner.answer(self.command, self.path, self.headers, body)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _handle  # http.server's naming

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.block_on_close = False  # kept-alive client connections do not hold close()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> Answer:
        raise NotImplementedError

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FaultProxy(LocalHttpServer):
    """Forwards every request to `upstream` (moto); counts them by operation (X-Amz-Target
    for the JSON protocols, Action= for the query protocol) and records when each came.
    Instead of forwarding, it answers with a fault armed for that operation: first the
    queued ones (`inject`, each used once), else the lasting one (`inject_until_cleared`).
    Clients keep their connections open (HTTP/1.1), as they do with AWS."""

    protocol_version = "HTTP/1.1"

    def __init__(self, upstream: str) -> None:
        self.upstream = urlsplit(upstream)
        self.calls: Counter[str] = Counter()
        self.faults: dict[str, list[Answer]] = defaultdict(list)
        self.lasting: dict[str, Answer] = {}
        self._times: dict[str, list[float]] = defaultdict(list)
        self.empty_pages: dict[str, EmptyPages] = {}
        self.lock = threading.Lock()
        self.performance_insights = PerformanceInsights()
        super().__init__()

    @staticmethod
    def operation(headers: Mapping[str, str], body: bytes) -> str:
        target = headers.get("X-Amz-Target")
        if target:
            return target.rsplit(".", 1)[-1]
        action = parse_qs(body.decode("utf-8", "replace")).get("Action")
        return action[0] if action else "?"

    def answer(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> Answer:
        op = self.operation(headers, body)
        with self.lock:
            self.calls[op] += 1
            self._times[op].append(time.monotonic())
            fault = self.faults[op].pop(0) if self.faults[op] else self.lasting.get(op)
            scan = self.empty_pages.get(op)
        if fault is not None:
            return fault
        if scan is not None:
            return self._scan(scan, method, path, headers, body)
        if (headers.get("X-Amz-Target") or "").startswith(PerformanceInsights.TARGET_PREFIX):
            return self.performance_insights.answer(op, body)
        return self.forward(method, path, headers, body)

    def _scan(
        self, scan: EmptyPages, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> Answer:
        """A request that starts a scan (no token) gets the first empty page; one with the
        k-th empty page's token gets the next, and after the last it is forwarded without
        the token, so the scan reaches the real items. Requests the scan does not match go
        through untouched."""
        request = json.loads(body or b"{}")
        if any(request.get(k) != v for k, v in scan.match.items()):
            return self.forward(method, path, headers, body)
        sent = request.get(scan.token)
        if sent and not str(sent).startswith(EMPTY_PAGE_TOKEN):
            return self.forward(method, path, headers, body)  # paging the real items
        served = int(str(sent)[len(EMPTY_PAGE_TOKEN) :]) if sent else 0
        if served >= scan.pages:
            del request[scan.token]
            return self.forward(method, path, headers, json.dumps(request).encode())
        page = {scan.items: [], scan.token: f"{EMPTY_PAGE_TOKEN}{served + 1}"}
        content_type = headers.get("Content-Type") or "application/x-amz-json-1.1"
        return 200, {"Content-Type": content_type}, json.dumps(page).encode()

    def forward(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> Answer:
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=30)
        try:
            skip = {"connection", "content-length", "transfer-encoding"}
            conn.request(
                method, path, body, {k: v for k, v in headers.items() if k.lower() not in skip}
            )
            resp = conn.getresponse()
            payload = resp.read()
            out = {k: v for k, v in resp.getheaders() if k.lower() not in skip}
            return resp.status, out, payload
        finally:
            conn.close()

    @staticmethod
    def _fault(status: int, body: bytes | str, headers: dict[str, str] | None) -> Answer:
        return status, headers or {}, body.encode() if isinstance(body, str) else body

    def inject(
        self,
        operation: str,
        status: int,
        body: bytes | str,
        headers: dict[str, str] | None = None,
        times: int = 1,
    ) -> None:
        """The next `times` calls of `operation` get this answer."""
        with self.lock:
            self.faults[operation] += [self._fault(status, body, headers)] * times

    def inject_until_cleared(
        self, operation: str, status: int, body: bytes | str, headers: dict[str, str] | None = None
    ) -> None:
        """Every call of `operation` gets this answer until `clear(operation)`."""
        with self.lock:
            self.lasting[operation] = self._fault(status, body, headers)

    def inject_empty_pages(
        self,
        operation: str,
        pages: int,
        items: str = "events",
        token: str = "nextToken",
        match: Mapping[str, object] | None = None,
    ) -> None:
        """Every scan of `operation` (a paginated JSON-protocol API) whose request has the
        fields in `match` answers `pages` empty pages with a next-page `token` before its
        items, as FilterLogEvents does while it searches a large log group. Like AWS, a scan
        started again from the beginning (no token) meets all the empty pages again; only
        following the tokens gets past them. Queued faults (`inject`) are answered first."""
        with self.lock:
            self.empty_pages[operation] = EmptyPages(pages, items, token, dict(match or {}))

    def clear(self, operation: str) -> None:
        """Disarm every fault of `operation`: its calls are forwarded again."""
        with self.lock:
            self.faults.pop(operation, None)
            self.lasting.pop(operation, None)
            self.empty_pages.pop(operation, None)

    def times(self, operation: str) -> list[float]:
        """time.monotonic() of every call of `operation` so far, oldest first."""
        with self.lock:
            return list(self._times[operation])

    def reset(self) -> None:
        with self.lock:
            self.calls.clear()
            self.faults.clear()
            self.lasting.clear()
            self.empty_pages.clear()
            self._times.clear()
        self.performance_insights.reset()


class PerformanceInsights:
    """The Performance Insights API, which moto does not have: `GetResourceMetrics` (JSON 1.1)
    answers from the datapoints `put()` for a DbiResourceId, aligned to the asked period. A
    resource nothing was put for answers InvalidArgumentException, as AWS does for an instance
    without Performance Insights."""

    TARGET_PREFIX = "PerformanceInsightsv20180227."
    HEADERS = {"Content-Type": "application/x-amz-json-1.1"}

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.points: dict[str, dict[str, list[tuple[float, float]]]] = {}

    def put(self, resource_id: str, metric: str, points: list[tuple[float, float]]) -> None:
        """(Unix time, value) datapoints of `metric` (e.g. os.general.numVCPUs.avg)."""
        with self.lock:
            self.points.setdefault(resource_id, {}).setdefault(metric, []).extend(points)

    def reset(self) -> None:
        with self.lock:
            self.points.clear()

    def answer(self, operation: str, body: bytes) -> Answer:
        request = json.loads(body or b"{}")
        if operation != "GetResourceMetrics":
            return self._error(400, "InvalidArgumentException", f"{operation} is not emulated")
        with self.lock:
            known = self.points.get(request.get("Identifier", ""))
            known = None if known is None else {k: list(v) for k, v in known.items()}
        if known is None:
            return self._error(400, "InvalidArgumentException", "Performance Insights is off")
        start, end = float(request["StartTime"]), float(request["EndTime"])
        period = int(request.get("PeriodInSeconds") or 60)
        start, end = start // period * period, -(-end // period) * period
        metrics = []
        for query in request.get("MetricQueries", []):
            name = query["Metric"]
            points = sorted(p for p in known.get(name, []) if start <= p[0] < end)
            datapoints = [{"Timestamp": t // period * period, "Value": v} for t, v in points]
            metrics.append({"Key": {"Metric": name}, "DataPoints": datapoints})
        answer = {
            "AlignedStartTime": start,
            "AlignedEndTime": end,
            "Identifier": request.get("Identifier"),
            "MetricList": metrics,
        }
        return 200, dict(self.HEADERS), json.dumps(answer).encode()

    def _error(self, status: int, code: str, message: str) -> Answer:
        body = json.dumps({"__type": code, "Message": message}).encode()
        return status, dict(self.HEADERS), body


# --- an RDS Proxy world in the emulator -------------------------------------------------------
REGION = "us-east-1"


def clients(endpoint: str, *services: str) -> dict[str, Any]:
    """boto3 clients that talk to the emulator directly, e.g. to build the world."""
    import boto3  # only the tests that use AWS pay its import

    return {
        name: boto3.client(
            name,
            region_name=REGION,
            endpoint_url=endpoint,
            aws_access_key_id="setup",
            aws_secret_access_key="setup",
        )
        for name in services
    }


def rds_proxy_only_config(endpoint: str, rds_proxy: str, key_id: str, secret: str) -> str:
    """A daemon configuration with only the rds_proxy source (flow-style YAML settings)."""
    return f"""
databases: []
ingest: {{enabled: false}}
aws:
  region: {REGION}
  endpoint_url: {endpoint}
  access_key_id: {key_id}
  secret_access_key: {secret}
  rds_proxy: {rds_proxy}
"""


# A pinning line as RDS Proxy writes it to /aws/rds/proxy/<proxy>, and the reason text it
# gives for SQL that changed session state.
PIN_LINE = (
    "[WARN] [proxyEndpoint=default] [clientConnection={c}] The client session was pinned to "
    "the database connection [dbConnection={d}] for the remainder of the session. The proxy "
    "can't reuse this connection until the session ends. Reason: {reason}"
)
SETTINGS_REASON = (
    "SQL changed session settings that the proxy doesn't track. Consider moving "
    'session configuration to the proxy\'s initialization query. Digest: "{digest}".'
)


def put_datapoints(
    cw: Any,
    proxy: str,
    name: str,
    values: list[float],
    when: datetime,
    extra: dict[str, str] | None = None,
    unit: str = "Count",
) -> None:
    """Datapoints of one RDS Proxy metric, as the proxy's hosts publish them (one each)."""
    dims = [{"Name": "ProxyName", "Value": proxy}]
    dims += [{"Name": k, "Value": v} for k, v in (extra or {}).items()]
    cw.put_metric_data(
        Namespace="AWS/RDS",
        MetricData=[
            {"MetricName": name, "Dimensions": dims, "Timestamp": when, "Value": v, "Unit": unit}
            for v in values
        ],
    )


def put_instance_datapoints(
    cw: Any, instance: str, name: str, values: list[float], when: datetime, unit: str = "None"
) -> None:
    """Datapoints of one AWS/RDS metric of one DB instance (dimension DBInstanceIdentifier)."""
    dims = [{"Name": "DBInstanceIdentifier", "Value": instance}]
    cw.put_metric_data(
        Namespace="AWS/RDS",
        MetricData=[
            {"MetricName": name, "Dimensions": dims, "Timestamp": when, "Value": v, "Unit": unit}
            for v in values
        ],
    )


def create_subnets(ec2: Any, region: str, cidr: str = "10.20") -> list[str]:
    """A VPC with a subnet in two availability zones, as a proxy needs."""
    vpc = ec2.create_vpc(CidrBlock=f"{cidr}.0.0/16")["Vpc"]["VpcId"]
    return [
        ec2.create_subnet(
            VpcId=vpc, CidrBlock=f"{cidr}.{i}.0/24", AvailabilityZone=f"{region}{zone}"
        )["Subnet"]["SubnetId"]
        for i, zone in enumerate("ab")
    ]


def create_proxy(rds: Any, name: str, subnets: list[str], engine: str = "POSTGRESQL") -> None:
    rds.create_db_proxy(
        DBProxyName=name,
        EngineFamily=engine,
        RoleArn="arn:aws:iam::123456789012:role/proxy",
        Auth=[
            {
                "AuthScheme": "SECRETS",
                "IAMAuth": "DISABLED",
                "SecretArn": "arn:aws:secretsmanager:us-east-1:123456789012:secret:db-abc",
            }
        ],
        VpcSubnetIds=subnets,
    )


def put_log_lines(
    logs: Any, proxy: str, lines: list[str], start: float, create: bool = True
) -> None:
    """`lines` in the proxy's log group, one a second from `start` (Unix time)."""
    group = f"/aws/rds/proxy/{proxy}"
    if create:
        logs.create_log_group(logGroupName=group)
        logs.create_log_stream(logGroupName=group, logStreamName="proxy-host-1")
    logs.put_log_events(
        logGroupName=group,
        logStreamName="proxy-host-1",
        logEvents=[
            {"timestamp": int((start + i) * 1000), "message": line} for i, line in enumerate(lines)
        ],
    )
