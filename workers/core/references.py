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
import time
from typing import Callable
from urllib.parse import urljoin, urlsplit

import requests
from PIL import Image, UnidentifiedImageError
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
from urllib3.util.connection import create_connection

from .errors import ErrorType, WorkerError
from .settings import Settings

MAX_REDIRECTS = 3
MAX_PIXELS = 64 * 1024 * 1024
Resolver = Callable[[str, int], list[str]]


class ReferenceFailure(WorkerError):
    error_type = ErrorType.REFERENCE_FRAME_ERROR

    def __init__(self, reason: str):
        super().__init__(f"REFERENCE_FRAME_ERROR: {reason}", ErrorType.REFERENCE_FRAME_ERROR)
        self.reason = reason


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
    if not ip.is_global:
        return "non-public address"
    return None


def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


def check_url(url: str, allow_hosts: frozenset[str], resolve: Resolver = system_resolver) -> str:
    """The address to connect to for ``url``; ``ReferenceFailure`` unless it is http(s) to a host whose every
    address is public (or a host listed in ``allow_hosts``, which may resolve anywhere)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ReferenceFailure(f"scheme {parts.scheme or '(none)'!r} is not allowed (http or https only)")
    host = (parts.hostname or "").lower()
    if not host:
        raise ReferenceFailure("URL has no host")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        addresses = list(resolve(host, port))
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
    def __init__(self, settings: Settings, session: requests.Session | None = None,
                 resolve: Resolver = system_resolver, clock: Callable[[], float] = time.monotonic):
        self.allow_hosts = settings.reference_allow_hosts
        self.max_bytes = settings.reference_max_bytes
        self.timeout = settings.reference_timeout_seconds
        self.session = session or requests.Session()
        self.session.trust_env = False  # never route reference downloads through an env proxy
        self._pins: dict[tuple[str, int], str] = {}
        for scheme in ("http://", "https://"):
            self.session.mount(scheme, _PinnedAdapter(self._pins))
        self.resolve = resolve
        self.clock = clock

    def fetch(self, url: str) -> Image.Image:
        """Download and decode one image (RGB) or raise ``ReferenceFailure``."""
        if not isinstance(url, str) or not url.strip():
            raise ReferenceFailure("reference URL is empty")
        deadline = self.clock() + self.timeout
        data = self._download(url.strip(), deadline)
        return self._decode(data)

    def _download(self, url: str, deadline: float) -> bytes:
        problem = "no attempt made"
        for attempt in range(3):
            if attempt:
                time.sleep(min(0.5 * 2 ** attempt, max(0.0, deadline - self.clock())))
            if self.clock() >= deadline:
                break
            try:
                return self._follow(url, deadline)
            except _Transient as exc:
                problem = str(exc)
        raise ReferenceFailure(f"download failed ({problem})")

    def _follow(self, url: str, deadline: float) -> bytes:
        for _ in range(MAX_REDIRECTS + 1):
            address = check_url(url, self.allow_hosts, self.resolve)
            parts = urlsplit(url)
            self._pins[_pin_key(parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))] = \
                address
            remaining = deadline - self.clock()
            if remaining <= 0:
                raise ReferenceFailure(f"download timed out after {self.timeout:g} s")
            try:
                response = self.session.get(url, stream=True, allow_redirects=False,
                                            timeout=(min(remaining, 5.0), remaining))
            except requests.Timeout:
                raise ReferenceFailure(f"download timed out after {self.timeout:g} s") from None
            except requests.RequestException as exc:
                raise _Transient(type(exc).__name__) from None
            with response:
                if response.is_redirect:
                    url = urljoin(url, response.headers.get("Location", ""))
                    continue
                if response.status_code >= 500 or response.status_code == 429:
                    raise _Transient(f"HTTP {response.status_code}")
                if response.status_code != 200:
                    raise ReferenceFailure(f"download answered HTTP {response.status_code}")
                return self._read(response, deadline)
        raise ReferenceFailure(f"more than {MAX_REDIRECTS} redirects")

    def _read(self, response: requests.Response, deadline: float) -> bytes:
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise ReferenceFailure(f"image is larger than {self.max_bytes} bytes")
        body = bytearray()
        try:
            for chunk in response.iter_content(64 * 1024):
                body += chunk
                if len(body) > self.max_bytes:
                    raise ReferenceFailure(f"image is larger than {self.max_bytes} bytes")
                if self.clock() > deadline:
                    raise ReferenceFailure(f"download timed out after {self.timeout:g} s")
        except requests.RequestException as exc:
            raise _Transient(type(exc).__name__) from None
        return bytes(body)

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
    """A failure worth another try (connection error, 5xx, 429)."""


def _pin_key(host: str, port: int) -> tuple[str, int]:
    return host.lower().strip("[]").rstrip("."), int(port)


class _PinnedAdapter(HTTPAdapter):
    """Opens every connection to the address ``check_url`` approved for its (host, port) — never to a fresh
    DNS answer — and refuses to connect where nothing was approved. TLS still verifies the host name."""

    def __init__(self, pins: dict[tuple[str, int], str]):
        self._pins = pins
        super().__init__(max_retries=0)

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        http = type("PinnedHTTPConnection", (_Pinned, HTTPConnection), {"pins": self._pins})
        https = type("PinnedHTTPSConnection", (_Pinned, HTTPSConnection), {"pins": self._pins})
        self.poolmanager.pool_classes_by_scheme = {
            "http": type("PinnedHTTPPool", (HTTPConnectionPool,), {"ConnectionCls": http}),
            "https": type("PinnedHTTPSPool", (HTTPSConnectionPool,), {"ConnectionCls": https})}


class _Pinned:
    pins: dict[tuple[str, int], str]

    def _new_conn(self):  # urllib3's own, with the approved address instead of a DNS lookup
        address = self.pins.get(_pin_key(self.host, self.port))
        if address is None:
            raise NewConnectionError(self, "no address was approved for this host")
        try:
            return create_connection((address, self.port), self.timeout, source_address=self.source_address,
                                     socket_options=self.socket_options)
        except socket.timeout:
            raise ConnectTimeoutError(self, f"connection to {self.host} timed out") from None
        except OSError as exc:
            raise NewConnectionError(self, f"failed to connect: {exc}") from None


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
