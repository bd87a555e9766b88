"""Reference-image downloads behind an SSRF guard (CONTRACT §7).

Only http(s); every hop's host is resolved and each address must be public (no loopback, private,
link-local, metadata, CGNAT, multicast or reserved ranges, IPv4-mapped IPv6 included) unless the host is
listed in ``REFERENCE_ALLOW_HOSTS``; redirects are followed by hand and re-checked; the body is capped and
the whole fetch has one deadline; the bytes must decode as an image. Every failure is a
``ReferenceFailure`` (``REFERENCE_FRAME_ERROR``) with a reason that is safe to report.

The connection goes to the very address the check approved (``_PinnedAdapter``): the name is not resolved a
second time, so it cannot re-point to an internal address in between (DNS rebinding).
"""
from __future__ import annotations

import io
import ipaddress
import socket
import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from urllib.parse import SplitResult, urljoin, urlsplit

import requests
from PIL import Image, UnidentifiedImageError
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
from urllib3.util.connection import create_connection

from common.settings import References

from . import retry
from .errors import ErrorType, WorkerError

MAX_REDIRECTS = 3
MAX_PIXELS = 64 * 1024 * 1024
Resolver = Callable[[str, int], list[str]]


class ReferenceFailure(WorkerError):
    error_type = ErrorType.REFERENCE_FRAME_ERROR

    def __init__(self, reason: str):
        super().__init__(f"REFERENCE_FRAME_ERROR: {reason}", ErrorType.REFERENCE_FRAME_ERROR)
        self.reason = reason


# Not public, whatever the interpreter's ipaddress says: Python 3.11.7 calls 192.0.0.0/24 outside /29 and .170/31
# global (fixed in 3.11.10 / 3.12.4) and does not know fec0::/10 (deprecated site-local) or 3fff::/20 (RFC 9637
# documentation); 192.88.99.0/24 is the deprecated 6to4 relay anycast (RFC 7526). No image host lives there.
_SPECIAL_PURPOSE = tuple(ipaddress.ip_network(net) for net in
                         ("192.0.0.0/24", "192.88.99.0/24", "fec0::/10", "3fff::/20"))


def blocked_reason(address: str) -> str | None:
    """Why an IP address may not be fetched from, or ``None`` when it is public."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if isinstance(ip, ipaddress.IPv6Address) and ip.sixtofour is not None:  # 2002::/16 embeds an IPv4 address
        inner = blocked_reason(str(ip.sixtofour))
        if inner:
            return f"6to4 form of a {inner}"
    for label, test in (("loopback", ip.is_loopback), ("link-local", ip.is_link_local),
                        ("private", ip.is_private), ("multicast", ip.is_multicast),
                        ("unspecified", ip.is_unspecified), ("reserved", ip.is_reserved)):
        if test:
            return f"{label} address"
    if any(ip in net for net in _SPECIAL_PURPOSE if net.version == ip.version):
        return "special-purpose address"
    if not ip.is_global:
        return "non-public address"
    return None


def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


def check_url(url: str, allow_hosts: frozenset[str], resolve: Resolver = system_resolver) -> str:
    """The address to connect to for ``url``; ``ReferenceFailure`` unless it is http(s) to a host whose every
    address is public (or a host listed in ``allow_hosts``, which may resolve anywhere)."""
    parts = _split(url)
    if parts.scheme not in ("http", "https"):
        raise ReferenceFailure(f"scheme {parts.scheme or '(none)'!r} is not allowed (http or https only)")
    host = (parts.hostname or "").lower()
    if not host:
        raise ReferenceFailure("URL has no host")
    try:
        addresses = list(resolve(host, _port(parts)))
    except (OSError, UnicodeError, ValueError):
        raise ReferenceFailure("host name does not resolve") from None
    if not addresses:
        raise ReferenceFailure("host name does not resolve")
    if host not in allow_hosts:
        for address in addresses:
            reason = blocked_reason(address)
            if reason:
                raise ReferenceFailure(f"host resolves to a {reason}, which is blocked")
    return addresses[0]


class ReferenceFetcher:
    def __init__(self, settings: References, session: requests.Session | None = None,
                 resolve: Resolver = system_resolver, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.allow_hosts = settings.reference_allow_hosts
        self.max_bytes = settings.reference_max_bytes
        self.timeout = settings.reference_timeout_seconds
        self.session = session or requests.Session()
        self.session.trust_env = False  # never route reference downloads through an env proxy
        for scheme in ("http://", "https://"):
            self.session.mount(scheme, _PinnedAdapter())
        self.resolve = resolve
        self.clock = clock
        self.sleep = sleep

    def fetch(self, url: str) -> Image.Image:
        """Download and decode one image (RGB) or raise ``ReferenceFailure``, all within one deadline."""
        if not isinstance(url, str) or not url.strip():
            raise ReferenceFailure("reference URL is empty")
        with _Fetch(self.timeout) as fetch:
            data = self._download(url.strip(), fetch, self.clock() + self.timeout)
        return self._decode(data)

    def _download(self, url: str, fetch: _Fetch, deadline: float) -> bytes:
        """Up to 3 tries within the deadline, on connection errors, 5xx and 429 (``Retry-After`` honoured)."""
        def attempt() -> retry.Answer:
            try:
                return retry.Answer(self._follow(url, fetch, deadline))
            except _Transient as exc:
                return retry.Answer(retry=True, retry_after=exc.retry_after, problem=str(exc))

        answer = retry.call(attempt, initial=0.5, cap=2.0, deadline=deadline, tries=3, sleep=self.sleep,
                            clock=self.clock)
        if answer.retry:
            raise ReferenceFailure(f"download failed ({answer.problem})")
        return answer.value

    def _follow(self, url: str, fetch: _Fetch, deadline: float) -> bytes:
        for _ in range(MAX_REDIRECTS + 1):
            address = check_url(url, self.allow_hosts, self.resolve)
            parts = _split(url)
            fetch.pins[_pin_key(parts.hostname or "", _port(parts))] = address
            remaining = deadline - self.clock()
            if remaining <= 0 or fetch.expired:
                raise self._timed_out()
            try:
                response = self.session.get(url, stream=True, allow_redirects=False,
                                            timeout=(min(remaining, 5.0), remaining))
            except (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema):
                raise ReferenceFailure("malformed URL") from None
            except requests.RequestException as exc:
                raise self._timed_out() if fetch.expired or isinstance(exc, requests.Timeout) \
                    else _Transient(type(exc).__name__) from None
            except ValueError:  # requests parses a redirect's Location itself, even without following it
                raise ReferenceFailure("malformed URL") from None
            with response:
                if response.is_redirect:
                    url = _join(url, response.headers.get("Location", ""))
                    continue
                if response.status_code >= 500 or response.status_code == 429:
                    raise _Transient(f"HTTP {response.status_code}", retry.retry_after(response.headers))
                if response.status_code != 200:
                    raise ReferenceFailure(f"download answered HTTP {response.status_code}")
                return self._read(response, fetch)
        raise ReferenceFailure(f"more than {MAX_REDIRECTS} redirects")

    def _read(self, response: requests.Response, fetch: _Fetch) -> bytes:
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise ReferenceFailure(f"image is larger than {self.max_bytes} bytes")
        body = bytearray()
        try:
            for chunk in response.iter_content(64 * 1024):
                body += chunk
                if len(body) > self.max_bytes:
                    raise ReferenceFailure(f"image is larger than {self.max_bytes} bytes")
        except requests.RequestException as exc:
            raise self._timed_out() if fetch.expired else _Transient(type(exc).__name__) from None
        if fetch.expired:  # the deadline cut the connection: what arrived is not the whole image
            raise self._timed_out()
        return bytes(body)

    def _timed_out(self) -> ReferenceFailure:
        return ReferenceFailure(f"download timed out after {self.timeout:g} s")

    @staticmethod
    def _decode(data: bytes) -> Image.Image:
        try:
            with Image.open(io.BytesIO(data)) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise ReferenceFailure("image has too many pixels")
                image.load()
                return image.convert("RGB")
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError):
            raise ReferenceFailure("downloaded file is not a decodable image") from None


class _Transient(Exception):
    """A failure worth another try (connection error, 5xx, 429), with the server's ``Retry-After``."""

    def __init__(self, problem: str, retry_after: float | None = None):
        super().__init__(problem)
        self.retry_after = retry_after


def _split(url: str) -> SplitResult:
    """``urlsplit`` with its port checked; ``ReferenceFailure("malformed URL")`` for what it cannot parse
    (``http://[::1/x``, a bracketed non-address, a port out of range), so the fallback policy applies."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
        return parts
    except ValueError:
        raise ReferenceFailure("malformed URL") from None


def _join(base: str, location: str) -> str:
    """A redirect's target, or ``ReferenceFailure("malformed URL")`` for a ``Location`` that cannot parse."""
    try:
        return urljoin(base, location)
    except ValueError:
        raise ReferenceFailure("malformed URL") from None


def _port(parts: SplitResult) -> int:
    return parts.port or (443 if parts.scheme == "https" else 80)


def _pin_key(host: str, port: int) -> tuple[str, int]:
    return host.lower().strip("[]").rstrip("."), int(port)


_CURRENT: ContextVar[_Fetch | None] = ContextVar("reference_fetch", default=None)


class _Fetch:
    """One ``fetch()``: the addresses approved for it (pins live only as long as the fetch, so nothing
    accumulates per host) and one deadline for everything (connect, TLS, redirects, headers, body).

    Per-read socket timeouts cannot bound a host that sends a byte every few seconds, so at the deadline a
    timer shuts down every connection the fetch uses, which wakes whatever recv, handshake or header read is
    blocked. It shuts down a duplicate of each socket's descriptor that the fetch owns (closed on exit), so
    it never touches a descriptor that was closed and reused meanwhile, and it reaches a socket that TLS
    wrapping has taken over."""

    def __init__(self, timeout: float):
        self.pins: dict[tuple[str, int], str] = {}
        self.expired = False
        self._watched: dict[int, tuple[object, socket.socket]] = {}  # id → (connection kept alive, duplicate)
        self._lock = threading.Lock()
        self._timer = threading.Timer(timeout, self._expire)
        self._timer.daemon = True

    def watch(self, connection: object, sock: socket.socket) -> None:
        duplicate = socket.fromfd(sock.fileno(), sock.family, sock.type)
        with self._lock:
            previous = self._watched.pop(id(connection), None)
            self._watched[id(connection)] = (connection, duplicate)
            expired = self.expired
        if previous is not None:
            previous[1].close()
        if expired:
            _shut(duplicate)

    def watches(self, connection: object) -> bool:
        with self._lock:
            return id(connection) in self._watched

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            sockets = [sock for _, sock in self._watched.values()]
        for sock in sockets:
            _shut(sock)

    def __enter__(self) -> _Fetch:
        self._token = _CURRENT.set(self)
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        _CURRENT.reset(self._token)
        with self._lock:
            sockets, self._watched = [sock for _, sock in self._watched.values()], {}
        for sock in sockets:
            sock.close()


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed by the other side


class _PinnedAdapter(HTTPAdapter):
    """Opens every connection to the address ``check_url`` approved for its (host, port) in the current
    fetch — never to a fresh DNS answer — and sends nothing outside a fetch. TLS still verifies the host."""

    def __init__(self) -> None:
        super().__init__(max_retries=0)

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        http = type("PinnedHTTPConnection", (_Pinned, HTTPConnection), {})
        https = type("PinnedHTTPSConnection", (_Pinned, HTTPSConnection), {})
        self.poolmanager.pool_classes_by_scheme = {
            "http": type("PinnedHTTPPool", (HTTPConnectionPool,), {"ConnectionCls": http}),
            "https": type("PinnedHTTPSPool", (HTTPSConnectionPool,), {"ConnectionCls": https})}


class _Pinned:
    def _new_conn(self):  # urllib3's own, with the approved address instead of a DNS lookup
        fetch = _CURRENT.get()
        address = fetch.pins.get(_pin_key(self.host, self.port)) if fetch is not None else None
        if address is None:
            raise NewConnectionError(self, "no address was approved for this host")
        try:
            sock = create_connection((address, self.port), self.timeout, source_address=self.source_address,
                                     socket_options=self.socket_options)
        except TimeoutError:
            raise ConnectTimeoutError(self, f"connection to {self.host} timed out") from None
        except OSError as exc:
            raise NewConnectionError(self, f"failed to connect: {exc}") from None
        try:
            fetch.watch(self, sock)
        except OSError as exc:  # no descriptor left to watch it with: do not use an unwatched connection
            sock.close()
            raise NewConnectionError(self, f"failed to connect: {exc}") from None
        return sock

    def request(self, *args, **kwargs):  # a kept-alive connection is reused only inside a fetch, watched
        fetch = _CURRENT.get()
        if fetch is None:
            raise NewConnectionError(self, "requests are sent only inside a reference fetch")
        if self.sock is not None and not fetch.watches(self):
            fetch.watch(self, self.sock)
        return super().request(*args, **kwargs)


def reference_or_fallback(fetcher: ReferenceFetcher, url: str, policy: str
                          ) -> tuple[Image.Image | None, str | None]:
    """Apply ``REFERENCE_FAILURE_POLICY``: ``(image, None)`` on success; on failure ``(None, report)``
    under ``fallback`` (the caller generates without it and reports ``report``), or raise under ``fail``."""
    try:
        return fetcher.fetch(url), None
    except ReferenceFailure as failure:
        if policy == "fail":
            raise
        return None, failure.message
