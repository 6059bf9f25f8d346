"""AWS for the tests: moto in server mode, and small local HTTP servers in front of it (or in
its place) that count calls per API operation and answer with injected faults."""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

# (status, headers, body) of one HTTP answer
Answer = tuple[int, dict[str, str], bytes]

# marks a next-page token that FaultProxy.inject_empty_pages() handed out
EMPTY_PAGE_TOKEN = "aws-emulator-empty-page:"


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """moto in server mode on 127.0.0.1 (a free port); yields its URL."""
    from moto.server import ThreadedMotoServer  # only the tests that use moto pay its import

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


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
        self.empty_pages: dict[str, tuple[int, str, str]] = {}  # op -> (left, items, token)
        self.lock = threading.Lock()
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
            padding = None
            if fault is None and self.empty_pages.get(op, (0,))[0] > 0:
                left, items, token = self.empty_pages[op]
                self.empty_pages[op] = (left - 1, items, token)
                padding = (items, token)
        if fault is not None:
            return fault
        if padding is not None:
            return self._empty_page(headers, body, *padding)
        if EMPTY_PAGE_TOKEN.encode() in body:
            body = self._restore_token(body)
        return self.forward(method, path, headers, body)

    @staticmethod
    def _empty_page(headers: Mapping[str, str], body: bytes, items: str, token: str) -> Answer:
        """No items and a next-page token that carries the caller's own token along."""
        sent = json.loads(body or b"{}").get(token) or ""
        if sent.startswith(EMPTY_PAGE_TOKEN):
            sent = sent[len(EMPTY_PAGE_TOKEN) :]
        page = {items: [], token: EMPTY_PAGE_TOKEN + sent}
        content_type = headers.get("Content-Type") or "application/x-amz-json-1.1"
        return 200, {"Content-Type": content_type}, json.dumps(page).encode()

    @staticmethod
    def _restore_token(body: bytes) -> bytes:
        """Forward a request that follows an empty page with the token it wrapped (none if
        the empty pages came first), so paging resumes where it was."""
        request = json.loads(body)
        for key, value in list(request.items()):
            if isinstance(value, str) and value.startswith(EMPTY_PAGE_TOKEN):
                if value == EMPTY_PAGE_TOKEN:
                    del request[key]
                else:
                    request[key] = value[len(EMPTY_PAGE_TOKEN) :]
        return json.dumps(request).encode()

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
        self, operation: str, pages: int, items: str = "events", token: str = "nextToken"
    ) -> None:
        """The next `pages` calls of `operation` (a paginated JSON-protocol API) answer with
        an empty `items` list and a next-page `token`, as FilterLogEvents does while it scans
        a large log group; the call that follows them is forwarded with the caller's own
        token, so nothing is skipped. Queued faults (`inject`) are answered first."""
        with self.lock:
            self.empty_pages[operation] = (pages, items, token)

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
