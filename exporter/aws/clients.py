"""boto3 plumbing for the AWS sources: clients, credentials, errors and paging.

Credentials come from the standard chain (environment, shared files, container or instance
role) unless keys are configured, optionally exchanged for an assumed role that is renewed
ten minutes before it expires. botocore's own retries are off: a source makes one attempt
per poll and the runner backs off, which keeps API cost predictable and failures visible.
Every failure becomes an `AwsApiError` that names the operation and AWS's error code and
never carries credentials. Paging stops after a bounded number of pages and says so
(`TooManyPages`) rather than passing a cut-off answer as the whole one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

from exporter import __version__
from exporter.config import AwsConfig
from exporter.redaction import redact

T = TypeVar("T")

#: Error codes after which the clients are rebuilt, so refreshed credentials are picked up.
EXPIRED = frozenset(
    {
        "ExpiredToken",
        "ExpiredTokenException",
        "RequestExpired",
        "InvalidClientTokenId",
        "UnrecognizedClientException",
    }
)
THROTTLED = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "LimitExceededException",
    }
)
#: Error codes that mean the identity lacks a permission (each service spells it its own way).
DENIED = frozenset(
    {
        "AccessDenied",
        "AccessDeniedException",
        "UnauthorizedOperation",
        "UnauthorizedAccess",
        "NotAuthorized",
        "NotAuthorizedException",
    }
)
#: IAM action prefix of each service the daemon calls, e.g. "ec2" for ec2:DescribeInstanceTypes.
IAM_PREFIX = {"cloudwatch": "cloudwatch", "logs": "logs", "rds": "rds", "ec2": "ec2", "pi": "pi"}


#: Calls `Clients.pages()` makes at most for one paginated request.
MAX_PAGES = 100


class AwsApiError(RuntimeError):
    """One failed AWS call, phrased for the log: operation, error code, HTTP status."""

    def __init__(self, operation: str, code: str, status: int | None, message: str) -> None:
        self.operation, self.code, self.status = operation, code, status
        where = f" (HTTP {status})" if status else ""
        super().__init__(redact(f"{operation} failed: {code}{where}: {message}".strip()))


class TooManyPages(AwsApiError):
    """`Clients.pages()` made its last allowed call and the answer still had a next-page
    token: what was yielded is not the whole answer. A caller that can continue later (the
    pinning log reader) catches it; for the others it fails the poll like any AWS error."""

    def __init__(self, operation: str, pages: int) -> None:
        message = f"stopped after {pages} pages; the answer still had a next-page token"
        super().__init__(operation, "TooManyPages", None, message)
        self.pages = pages


def api_error(operation: str, exc: Exception) -> AwsApiError:
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return AwsApiError(
            operation, err.get("Code") or "Unknown", status, err.get("Message") or ""
        )
    return AwsApiError(operation, type(exc).__name__, None, str(exc))


async def off_the_loop(fn: Callable[[], T], name: str) -> T:
    """Run a blocking boto3 call in a daemon thread and await its result.

    Not `asyncio.to_thread`: the default executor's threads are joined when the loop and
    the interpreter shut down, so a CloudWatch call hanging on its read timeout would hold
    SIGTERM for up to that long. A daemon thread is abandoned at exit instead; an answer
    that arrives after the loop closed is dropped.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any = None, error: BaseException | None = None) -> None:
        if future.done():  # the awaiting task was cancelled
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def work() -> None:
        try:
            outcome = {"result": fn()}
        except BaseException as exc:  # handed to the awaiting task, re-raised there
            outcome = {"error": exc}
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody is waiting
            loop.call_soon_threadsafe(functools.partial(settle, **outcome))

    threading.Thread(target=work, name=name, daemon=True).start()
    return await future


def operation_name(method: str) -> str:
    """boto3 method name -> API operation name, e.g. describe_db_proxies -> DescribeDBProxies."""
    return "".join(part.capitalize() for part in method.split("_")).replace("Db", "DB")


def iam_action(service: str, method: str) -> str:
    """The permission a call needs, as a policy names it: rds:DescribeDBInstances."""
    return f"{IAM_PREFIX.get(service, service)}:{operation_name(method)}"


class Clients:
    """boto3 clients for one region; thread-safe, rebuilt on `reset()` or role renewal. The
    clients every AWS source uses are built together on the first call, so none is built in
    the middle of a paced sequence of calls; EC2 and Performance Insights only when first
    asked for (a daemon that reads only RDS Proxy never builds them)."""

    SERVICES = ("cloudwatch", "logs", "rds")
    ON_DEMAND = ("ec2", "pi")

    def __init__(self, config: AwsConfig, clock: Callable[[], float]) -> None:
        self.config = config
        self.clock = clock
        self._lock = threading.Lock()
        self._clients: dict[str, Any] = {}
        self._session_now: boto3.session.Session | None = None
        self._role_expires = 0.0
        self.botocore_config = BotoConfig(
            region_name=config.region,
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=5,
            read_timeout=20,
            user_agent_extra=f"pgpressure/{__version__}",
        )

    def _session(self) -> boto3.session.Session:
        session = boto3.session.Session(
            aws_access_key_id=self.config.access_key_id,
            aws_secret_access_key=self.config.secret_access_key,
            region_name=self.config.region,
        )
        if not self.config.role_arn:
            return session
        try:
            sts = session.client(
                "sts", endpoint_url=self.config.endpoint_url, config=self.botocore_config
            )
            creds = sts.assume_role(RoleArn=self.config.role_arn, RoleSessionName="pgpressure")[
                "Credentials"
            ]
        except (ClientError, BotoCoreError) as exc:
            raise api_error("AssumeRole", exc) from None
        self._role_expires = creds["Expiration"].timestamp()
        return boto3.session.Session(
            aws_access_key_id=creds["AccessKeyId"],
            aws_secret_access_key=creds["SecretAccessKey"],
            aws_session_token=creds["SessionToken"],
            region_name=self.config.region,
        )

    def get(self, service: str) -> Any:
        with self._lock:
            renew = self.config.role_arn and self._role_expires - self.clock() < 600
            if renew:
                self._close_all()
            if self._session_now is None:
                self._session_now = self._session()
                for name in self.SERVICES:
                    self._clients[name] = self._build(name)
            if service not in self._clients:
                if service not in self.ON_DEMAND:
                    raise ValueError(f"no client for {service!r}")
                self._clients[service] = self._build(service)
            return self._clients[service]

    def _build(self, service: str) -> Any:
        assert self._session_now is not None
        return self._session_now.client(
            service, endpoint_url=self.config.endpoint_url, config=self.botocore_config
        )

    def built(self) -> bool:
        return bool(self._clients)

    def reset(self) -> None:
        with self._lock:
            self._close_all()

    def _close_all(self) -> None:
        """Drop the clients, closing each so its connection pool is released (the lock is
        held): on `reset()` and on every role renewal, which would otherwise leak one pool
        per service each time the role is renewed."""
        for client in self._clients.values():
            close = getattr(client, "close", None)
            if close is not None:
                close()
        self._clients.clear()
        self._session_now = None

    def call(self, service: str, method: str, expect: str, **kwargs: Any) -> dict:
        """One API call. `expect` is a key every well-formed answer has: botocore turns an
        unparseable 200 answer into a dict without it, which must not read as "no data"."""
        try:
            page = getattr(self.get(service), method)(**kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise api_error(operation_name(method), exc) from None
        if not isinstance(page, dict) or expect not in page:
            raise AwsApiError(
                operation_name(method), "MalformedResponse", None, f"the answer has no {expect}"
            )
        return page

    def pages(
        self,
        service: str,
        method: str,
        expect: str,
        token_in: str,
        token_out: str,
        *,
        max_pages: int = MAX_PAGES,
        pace: Callable[[], None] | None = None,
        **kwargs: Any,
    ) -> Iterator[dict]:
        """Follow a paginated API, at most `max_pages` calls so a misbehaving endpoint cannot
        loop forever. If the last allowed page still has a next-page token, `TooManyPages` is
        raised after it was yielded (a caller that stops reading early never sees it).
        `pace`, if given, is called before every call, e.g. to space calls under a quota."""
        for _ in range(max_pages):
            if pace is not None:
                pace()
            page = self.call(service, method, expect, **kwargs)
            yield page
            token = page.get(token_out)
            if not token:
                return
            kwargs[token_in] = token
        raise TooManyPages(operation_name(method), max_pages)
