"""`--web.config.file`: TLS and basic auth in the format of the Prometheus exporter-toolkit.

```yaml
tls_server_config:
  cert_file: server.crt          # relative paths are relative to this file
  key_file: server.key
  client_auth_type: RequireAndVerifyClientCert   # optional (default NoClientCert)
  client_ca_file: ca.crt                         # required with a Verify* client_auth_type
  min_version: TLS12                             # TLS10..TLS13 (default TLS12)
  max_version: TLS13
  cipher_suites: [TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256]   # Go names; TLS 1.2 only
  prefer_server_cipher_suites: true
  client_allowed_sans: [scraper.example.com]     # with client certificates
http_server_config:
  headers: {Strict-Transport-Security: max-age=31536000}
basic_auth_users:
  prometheus: $2b$12$...                         # bcrypt hash (htpasswd -nBC 12 "" ...)
```

What it covers, and the one exception:

- **TLS** covers the whole listener, the ingest endpoint included (apps then push to
  `https://...`).
- **Basic auth** covers every endpoint except `POST /api/v1/reports`. The ingest endpoint keeps
  its own bearer token (`ingest.token`): one HTTP request carries one `Authorization` header,
  so an app cannot send both credentials, and a scrape credential should not be handed to
  every application process. When basic auth is on and ingest has no token, the daemon says
  so at start-up.

Operational behaviour:

- bcrypt is slow on purpose (~0.2 s at cost 12) and Prometheus scrapes often, so verified
  credentials are cached, keyed by a SHA-256 of (user, hash, password) - the cache never
  holds a password - in a bounded LRU. Only successes are cached, so a flood of guesses cannot
  evict them, and the cache is kept across reloads: the key holds the user's hash, so a
  changed or removed user no longer matches. Cache misses run in a worker thread, at most two
  at a time, handed out in turn across client addresses, and each address may fail only so
  often (`exporter.http.authwork`): guessing passwords cannot stall `/metrics` for everyone
  else, nor queue a correct first login behind the guesses. Unknown users are checked against
  a dummy hash so response time does not reveal which users exist; the comparison itself is
  bcrypt's constant-time one. Every failure is a 401, a password over bcrypt's 72 bytes
  included (bcrypt 5 refuses to check one, as Go's bcrypt does).
- **Reload without restart**: the web config file and the certificate, key and CA files are
  checked (at most once a second) when a TLS handshake or a request arrives; when one has
  changed, everything is re-read and validated on a *new* SSLContext, which new connections
  then use (switched in the TLS server-name callback). An invalid new file is logged and the
  previous configuration stays in force. Turning TLS on or off needs a restart.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt
import yaml
from aiohttp import web

from exporter.http.authwork import FailureLimit, FairChecks
from exporter.ingest.wire import REPORTS_PATH
from exporter.logs import kv

log = logging.getLogger("pgpressure.webconfig")

INGEST_PATH = REPORTS_PATH  # POST here answers to the ingest bearer token, not basic auth
RELOAD_CHECK_INTERVAL = 1.0  # seconds between mtime checks
AUTH_CACHE_SIZE = 1024
AUTH_CONCURRENCY = 2  # bcrypt checks running at once (cache misses)
BCRYPT_MAX_PASSWORD = 72  # bytes: bcrypt ignores (bcrypt 5: refuses) anything longer
# seconds a client out of failure allowance waits for its 401: a flooding client then costs
# the event loop a timer per second and connection, not a request as fast as it can send
LIMITED_DELAY = 1.0
REALM = "pgpressure"

_CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_UNVERIFIED_CLIENT_AUTH = ("RequestClientCert", "RequireAnyClientCert")
_TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
# Go's names (what exporter-toolkit configs contain) -> OpenSSL's, for TLS 1.2 suites.
_CIPHERS = {
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256": "ECDHE-ECDSA-AES128-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256": "ECDHE-RSA-AES128-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
}
_TLS_KEYS = {
    "cert_file",
    "key_file",
    "client_auth_type",
    "client_ca_file",
    "client_allowed_sans",
    "min_version",
    "max_version",
    "cipher_suites",
    "prefer_server_cipher_suites",
}
_HTTP_KEYS = {"headers", "http2"}
# Headers exporter-toolkit lets users set; anything else could break the protocol.
_ALLOWED_HEADERS = {
    "strict-transport-security",
    "x-content-type-options",
    "x-frame-options",
    "x-xss-protection",
    "content-security-policy",
}
_BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")


class WebConfigError(Exception):
    """A problem with the web config file, phrased for the user (key path included)."""


@dataclass(frozen=True)
class TlsSettings:
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None
    client_auth_type: str
    min_version: str
    max_version: str | None
    ciphers: str | None
    prefer_server_ciphers: bool
    allowed_sans: tuple[str, ...]

    def files(self) -> tuple[Path, ...]:
        return tuple(p for p in (self.cert_file, self.key_file, self.client_ca_file) if p)


@dataclass(frozen=True)
class WebSettings:
    tls: TlsSettings | None
    users: dict[str, bytes]  # user -> bcrypt hash
    headers: dict[str, str] = field(default_factory=dict)


# -- parsing ---------------------------------------------------------------------------------
def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise WebConfigError(f"{where}: expected a mapping of keys")
    return value


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise WebConfigError(f"{where}: expected a non-empty string")
    return value


def _check_keys(doc: dict, allowed: set[str], source: str, prefix: str) -> None:
    for key in doc:
        if key not in allowed:
            raise WebConfigError(
                f"{source}: {prefix}{key}: unknown key (known: {', '.join(sorted(allowed))})"
            )


def _path(value: Any, where: str, base: Path) -> Path:
    path = Path(_string(value, where))
    return path if path.is_absolute() else base / path


def _parse_tls(doc: dict, source: str, base: Path) -> TlsSettings | None:
    """The TLS settings, or None without a certificate (no TLS, as in exporter-toolkit)."""
    _check_keys(doc, _TLS_KEYS, source, "tls_server_config.")
    w = f"{source}: tls_server_config"
    if not _has_certificate(doc, w):
        return None
    auth, ca = _client_auth(doc, w)
    min_version = _tls_version(doc, "min_version", w) or "TLS12"
    max_version = _tls_version(doc, "max_version", w)
    ciphers = _ciphers(doc.get("cipher_suites"), w)
    sans = _allowed_sans(doc.get("client_allowed_sans"), auth, w)
    return TlsSettings(
        cert_file=_path(doc["cert_file"], f"{w}.cert_file", base),
        key_file=_path(doc["key_file"], f"{w}.key_file", base),
        client_ca_file=_path(ca, f"{w}.client_ca_file", base) if ca else None,
        client_auth_type=auth,
        min_version=min_version,
        max_version=max_version,
        ciphers=ciphers,
        prefer_server_ciphers=bool(doc.get("prefer_server_cipher_suites", True)),
        allowed_sans=sans,
    )


def _has_certificate(doc: dict, w: str) -> bool:
    """Both cert_file and key_file, or neither and no other TLS key; else an error."""
    if not doc.get("cert_file") and not doc.get("key_file"):
        if any(doc.get(k) for k in _TLS_KEYS):
            raise WebConfigError(f"{w}.cert_file: required key is missing")
        return False
    for key in ("cert_file", "key_file"):
        if not doc.get(key):
            raise WebConfigError(f"{w}.{key}: required key is missing")
    return True


def _client_auth(doc: dict, w: str) -> tuple[str, Any]:
    """(client_auth_type, client_ca_file): only the types that verify what they accept, each
    with the CA it verifies against."""
    auth = doc.get("client_auth_type") or "NoClientCert"
    if auth in _UNVERIFIED_CLIENT_AUTH:
        raise WebConfigError(
            f"{w}.client_auth_type: {auth} (accepting unverified client certificates) is "
            "not supported; use VerifyClientCertIfGiven or RequireAndVerifyClientCert with "
            "client_ca_file"
        )
    if auth not in _CLIENT_AUTH:
        raise WebConfigError(
            f"{w}.client_auth_type: invalid value {auth!r} (expected one of "
            f"{', '.join(_CLIENT_AUTH)})"
        )
    ca = doc.get("client_ca_file")
    if auth != "NoClientCert" and not ca:
        raise WebConfigError(f"{w}.client_ca_file: required when client_auth_type is {auth}")
    if ca and auth == "NoClientCert":
        raise WebConfigError(
            f"{w}.client_auth_type: client_ca_file is set but client_auth_type is "
            "NoClientCert; set VerifyClientCertIfGiven or RequireAndVerifyClientCert"
        )
    return auth, ca


def _tls_version(doc: dict, key: str, w: str) -> str | None:
    value = doc.get(key) or None
    if value is not None and value not in _TLS_VERSIONS:
        raise WebConfigError(
            f"{w}.{key}: invalid value {value!r} (expected one of {', '.join(_TLS_VERSIONS)})"
        )
    return value


def _ciphers(suites: Any, w: str) -> str | None:
    """Go's suite names (what exporter-toolkit configs hold) as an OpenSSL cipher string."""
    if not suites:
        return None
    if not isinstance(suites, list):
        raise WebConfigError(f"{w}.cipher_suites: expected a list of cipher suite names")
    unknown = [s for s in suites if s not in _CIPHERS]
    if unknown:
        raise WebConfigError(f"{w}.cipher_suites: unknown or unsupported suite {unknown[0]!r}")
    return ":".join(_CIPHERS[s] for s in suites)


def _allowed_sans(sans: Any, auth: str, w: str) -> tuple[str, ...]:
    sans = sans or []
    if not isinstance(sans, list) or not all(isinstance(s, str) for s in sans):
        raise WebConfigError(f"{w}.client_allowed_sans: expected a list of names")
    if sans and auth == "NoClientCert":
        raise WebConfigError(f"{w}.client_allowed_sans: needs a client_auth_type that verifies")
    return tuple(sans)


_BCRYPT_HASH = re.compile(r"^\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}$")


def _parse_users(doc: dict, source: str) -> dict[str, bytes]:
    users = {}
    for user, hashed in doc.items():
        where = f"{source}: basic_auth_users.{user}"
        if not isinstance(user, str) or not user or ":" in user:
            raise WebConfigError(f"{where}: user names must be non-empty and contain no ':'")
        if not isinstance(hashed, str) or not hashed.startswith(_BCRYPT_PREFIXES):
            # Never echo the value: it may be a plain-text password put there by mistake.
            raise WebConfigError(
                f"{where}: expected a bcrypt hash ($2y$..., e.g. from htpasswd -nBC 12 '' )"
            )
        # Checked by shape, not by bcrypt itself: a reload runs on the event loop, and one
        # checkpw per user at cost 12 would stall it for a quarter of a second each.
        if not _BCRYPT_HASH.match(hashed):
            raise WebConfigError(f"{where}: invalid bcrypt hash")
        users[user] = hashed.encode()
    return users


def parse_web_config(text: str, source: str = "<web config>", base: Path | None = None):
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise WebConfigError(f"{source}{where}: {getattr(exc, 'problem', None) or exc}") from None
    doc = _mapping(doc, f"{source}: (top level)")
    _check_keys(doc, {"tls_server_config", "http_server_config", "basic_auth_users"}, source, "")
    base = base or Path(".")
    tls = _parse_tls(
        _mapping(doc.get("tls_server_config"), f"{source}: tls_server_config"), source, base
    )
    users = _parse_users(
        _mapping(doc.get("basic_auth_users"), f"{source}: basic_auth_users"), source
    )
    http = _mapping(doc.get("http_server_config"), f"{source}: http_server_config")
    _check_keys(http, _HTTP_KEYS, source, "http_server_config.")
    headers = {}
    for name, value in _mapping(
        http.get("headers"), f"{source}: http_server_config.headers"
    ).items():
        if str(name).lower() not in _ALLOWED_HEADERS:
            raise WebConfigError(
                f"{source}: http_server_config.headers.{name}: header not allowed (allowed: "
                f"{', '.join(sorted(_ALLOWED_HEADERS))})"
            )
        headers[str(name)] = _string(value, f"{source}: http_server_config.headers.{name}")
    return WebSettings(tls=tls, users=users, headers=headers)


def build_ssl_context(tls: TlsSettings, source: str = "<web config>") -> ssl.SSLContext:
    w = f"{source}: tls_server_config"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _TLS_VERSIONS[tls.min_version]
    if tls.max_version:
        ctx.maximum_version = _TLS_VERSIONS[tls.max_version]
    for key, path in (("cert_file", tls.cert_file), ("key_file", tls.key_file)):
        if not path.is_file():
            raise WebConfigError(f"{w}.{key}: cannot read {path}")
    try:
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
    except (ssl.SSLError, OSError) as exc:
        raise WebConfigError(
            f"{w}.cert_file/key_file: cannot load the certificate and key "
            f"({tls.cert_file}, {tls.key_file}): {getattr(exc, 'reason', None) or exc}"
        ) from None
    ctx.verify_mode = _CLIENT_AUTH[tls.client_auth_type]
    if tls.client_ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=tls.client_ca_file)
        except (ssl.SSLError, OSError) as exc:
            raise WebConfigError(
                f"{w}.client_ca_file: cannot load {tls.client_ca_file}: "
                f"{getattr(exc, 'reason', None) or exc}"
            ) from None
    if tls.ciphers:
        try:
            ctx.set_ciphers(tls.ciphers)
        except ssl.SSLError as exc:
            raise WebConfigError(f"{w}.cipher_suites: {exc}") from None
    if tls.prefer_server_ciphers:
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    return ctx


# -- basic auth ------------------------------------------------------------------------------
class _AuthCache:
    """Bounded LRU of digest(user, hash, password) -> verified; never holds a password."""

    # Only True is stored (see the module docstring): get() is True or None.

    def __init__(self, size: int = AUTH_CACHE_SIZE) -> None:
        self.size = size
        self._entries: OrderedDict[bytes, bool] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(user: str, hashed: bytes, password: bytes) -> bytes:
        h = hashlib.sha256()
        for part in (user.encode(), hashed, password):
            h.update(len(part).to_bytes(4, "big"))
            h.update(part)
        return h.digest()

    def get(self, key: bytes) -> bool | None:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: bytes, value: bool) -> None:
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


def _parse_basic(header: str | None) -> tuple[str, bytes] | None:
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value or len(value) > 4096:
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(b":")
    if not sep:
        return None
    try:
        return user.decode("utf-8"), password
    except UnicodeDecodeError:
        return None


class WebConfig:
    """The loaded web config: SSL context for the listener, middleware for requests."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.source = str(path)
        self.settings = self._load()
        self._mtimes = self._stat()
        self._checked = time.monotonic()
        self.cache = _AuthCache()
        self._checks = FairChecks(AUTH_CONCURRENCY)
        self._failures = FailureLimit()
        self._dummy_hash: bytes | None = None  # made on first use, off the event loop
        self.ssl_context: ssl.SSLContext | None = None
        self._current_ctx: ssl.SSLContext | None = None
        if self.settings.tls is not None:
            self._current_ctx = build_ssl_context(self.settings.tls, self.source)
            # The listener's context: on every handshake its server-name callback (called
            # with or without SNI) checks for changed files and hands the connection the
            # newest context.
            self.ssl_context = build_ssl_context(self.settings.tls, self.source)
            self.ssl_context.sni_callback = self._sni_callback
        self.reloads = 0

    @property
    def basic_auth(self) -> bool:
        """Whether requests must carry a user and password (a reload may change it)."""
        return bool(self.settings.users)

    # -- loading and reloading -------------------------------------------------------------
    def _load(self) -> WebSettings:
        try:
            text = self.path.read_text()
        except OSError as exc:
            raise WebConfigError(
                f"cannot read web config file {self.path}: {exc.strerror or exc}"
            ) from None
        return parse_web_config(text, self.source, self.path.parent)

    def _files(self) -> tuple[Path, ...]:
        tls = self.settings.tls
        return (self.path, *(tls.files() if tls else ()))

    def _stat(self) -> tuple[tuple[int, int], ...]:
        out = []
        for p in self._files():
            try:
                st = os.stat(p)
                out.append((st.st_mtime_ns, st.st_size))
            except OSError:
                out.append((0, 0))
        return tuple(out)

    @staticmethod
    def _make_dummy(users: dict[str, bytes]) -> bytes:
        # Same cost as the real hashes, so an unknown user takes as long as a known one.
        cost = 10
        for hashed in users.values():
            try:
                cost = int(hashed.split(b"$")[2])
            except (IndexError, ValueError):
                continue
            break
        return bcrypt.hashpw(b"pgpressure-dummy", bcrypt.gensalt(rounds=min(max(cost, 4), 16)))

    def maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < RELOAD_CHECK_INTERVAL:
            return
        self._checked = now
        mtimes = self._stat()
        if mtimes == self._mtimes:
            return
        self._mtimes = mtimes
        try:
            settings = self._load()
            ctx = build_ssl_context(settings.tls, self.source) if settings.tls else None
        except WebConfigError as exc:
            log.error("web config not reloaded, keeping the previous one", extra=kv(err=str(exc)))
            return
        if (settings.tls is None) != (self.settings.tls is None):
            log.warning(
                "web config: turning TLS on or off needs a restart; other changes applied",
                extra=kv(file=self.source),
            )
            settings = WebSettings(self.settings.tls, settings.users, settings.headers)
            ctx = self._current_ctx
        if settings.users != self.settings.users:
            self._dummy_hash = None  # the users' cost may have changed; the cache stays valid
        self.settings = settings
        self._mtimes = self._stat()  # the TLS file set may have changed
        if ctx is not None:
            self._current_ctx = ctx
        self.reloads += 1
        log.info(
            "web config reloaded",
            extra=kv(file=self.source, tls=settings.tls is not None, users=len(settings.users)),
        )

    def _sni_callback(self, sslobj: ssl.SSLObject, server_name: str | None, ctx: Any) -> None:
        try:
            self.maybe_reload()
            if self._current_ctx is not None:
                sslobj.context = self._current_ctx
        except Exception as exc:  # a failing callback would abort the handshake
            log.error("TLS certificate reload failed", extra=kv(err=str(exc)))
        return None

    # -- requests --------------------------------------------------------------------------
    async def _verify(self, user: str, password: bytes, client: str) -> bool:
        """Whether `user` and `password` are right: from the cache, else by bcrypt when the
        client may still fail and its turn comes (`exporter.http.authwork`)."""
        if len(password) > BCRYPT_MAX_PASSWORD:
            self._failures.failed(client)
            return False
        users = self.settings.users
        known = user in users
        if known and self.cache.get(self.cache.key(user, users[user], password)):
            return True
        if not self._failures.allows(client):
            await asyncio.sleep(LIMITED_DELAY)
            return False
        if not known and self._dummy_hash is None:
            self._dummy_hash = await self._checks.run(client, lambda: self._make_dummy(users))
        hashed = users[user] if known else self._dummy_hash
        if hashed is None:  # the client's queue is full
            return False
        ok = await self._checks.run(client, lambda: bcrypt.checkpw(password, hashed)) and known
        if ok:
            self.cache.put(self.cache.key(user, hashed, password), True)
        else:
            self._failures.failed(client)
        return bool(ok)

    def _san_allowed(self, request: web.Request) -> bool:
        allowed = self.settings.tls.allowed_sans if self.settings.tls else ()
        if not allowed:
            return True
        peercert = request.transport.get_extra_info("peercert") if request.transport else None
        if not peercert:
            return False
        names = {value for kind, value in peercert.get("subjectAltName", ())}
        return any(hmac.compare_digest(a, n) for a in allowed for n in names)

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        self.maybe_reload()
        settings = self.settings
        if not self._san_allowed(request):
            return web.Response(status=403, text="client certificate not allowed\n")
        if settings.users and not (request.method == "POST" and request.path == INGEST_PATH):
            creds = _parse_basic(request.headers.get("Authorization"))
            if creds is None or not await self._verify(*creds, request.remote or ""):
                return web.Response(
                    status=401,
                    text="Unauthorized\n",
                    headers={"WWW-Authenticate": f'Basic realm="{REALM}"'},
                )
        response = await handler(request)
        for name, value in settings.headers.items():
            response.headers[name] = value
        return response


def load_web_config(path: str | Path) -> WebConfig:
    """The web config of this file: its `ssl_context` for the listener (None without TLS),
    its `middleware` for requests, and whether `basic_auth` is on. Raises WebConfigError."""
    config = WebConfig(path)
    log.info(
        "web config loaded",
        extra=kv(
            file=str(path),
            tls=config.settings.tls is not None,
            client_auth=config.settings.tls.client_auth_type if config.settings.tls else "-",
            basic_auth_users=len(config.settings.users),
        ),
    )
    return config
