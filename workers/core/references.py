"""Reference-image downloads behind an SSRF guard (CONTRACT §7).

Only http(s); every hop's host is resolved and each address must be public (no loopback, private,
link-local, metadata, CGNAT, multicast or reserved ranges, IPv4-mapped IPv6 included) unless the host is
listed in ``REFERENCE_ALLOW_HOSTS``; redirects are followed by hand and re-checked; the body is capped and
the whole fetch has one deadline; the bytes must decode as an image. Every failure is a
``ReferenceFailure`` (``REFERENCE_FRAME_ERROR``) with a reason that is safe to report.
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


def check_url(url: str, allow_hosts: frozenset[str], resolve: Resolver = system_resolver) -> None:
    """Raise ``ReferenceFailure`` unless ``url`` is http(s) to a public (or explicitly allowed) host."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ReferenceFailure(f"scheme {parts.scheme or '(none)'!r} is not allowed (http or https only)")
    host = (parts.hostname or "").lower()
    if not host:
        raise ReferenceFailure("URL has no host")
    if host in allow_hosts:
        return
    try:
        addresses = resolve(host, parts.port or (443 if parts.scheme == "https" else 80))
    except (OSError, UnicodeError):
        raise ReferenceFailure("host name does not resolve") from None
    for address in addresses:
        reason = blocked_reason(address)
        if reason:
            raise ReferenceFailure(f"host resolves to a {reason}, which is blocked")


class ReferenceFetcher:
    def __init__(self, settings: Settings, session: requests.Session | None = None,
                 resolve: Resolver = system_resolver, clock: Callable[[], float] = time.monotonic):
        self.allow_hosts = settings.reference_allow_hosts
        self.max_bytes = settings.reference_max_bytes
        self.timeout = settings.reference_timeout_seconds
        self.session = session or requests.Session()
        self.session.trust_env = False  # never route reference downloads through an env proxy
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
            check_url(url, self.allow_hosts, self.resolve)
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
