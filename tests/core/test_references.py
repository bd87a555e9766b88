import time

import pytest
import requests

from common.settings import References
from tests.refserver import DripServer, ReferenceServer
from workers.core.references import ReferenceFailure, ReferenceFetcher, blocked_reason, check_url, reference_or_fallback


@pytest.fixture(scope="module")
def refserver():
    server = ReferenceServer()
    yield server
    server.stop()


def fetcher(allow=("127.0.0.1",), max_bytes=1024 * 1024, timeout=5.0):
    return ReferenceFetcher(References(reference_allow_hosts=frozenset(allow), reference_max_bytes=max_bytes,
                                     reference_timeout_seconds=timeout))


def test_allowed_host_image_is_fetched_and_decoded(refserver):
    image = fetcher().fetch(f"{refserver.url}/image.png")
    assert image.size == (48, 32) and image.mode == "RGB"


@pytest.mark.parametrize("path, reason", [("/missing.png", "HTTP 404"), ("/text.png", "not a decodable image"),
                                          ("/big.png", "larger than")])
def test_bad_downloads_are_reference_failures(refserver, path, reason):
    with pytest.raises(ReferenceFailure) as info:
        fetcher().fetch(refserver.url + path)
    assert reason in info.value.reason
    assert info.value.error_type.value == "REFERENCE_FRAME_ERROR"
    assert info.value.message.startswith("REFERENCE_FRAME_ERROR: ")


def test_hanging_host_fails_on_time(refserver):
    started = time.monotonic()
    with pytest.raises(ReferenceFailure) as info:
        fetcher(timeout=1.0).fetch(f"{refserver.url}/hang.png?s=10")
    assert time.monotonic() - started < 4
    assert "timed out" in info.value.reason


@pytest.mark.parametrize("spelling", ["localhost", "127.0.0.2", "[::1]", "2130706433", "0177.0.0.1", "0x7f.1"])
def test_loopback_spellings_are_refused_end_to_end(refserver, spelling):
    url = refserver.url.replace("127.0.0.1", spelling) + "/image.png"
    with pytest.raises(ReferenceFailure) as info:
        fetcher(allow=()).fetch(url)
    assert "blocked" in info.value.reason or "does not resolve" in info.value.reason


def test_redirect_from_allowed_host_to_loopback_is_refused(refserver):
    target = refserver.url.replace("127.0.0.1", "localhost") + "/image.png"
    with pytest.raises(ReferenceFailure) as info:
        fetcher(allow=("127.0.0.1",)).fetch(f"{refserver.url}/redirect?to={target}")
    assert "loopback" in info.value.reason


def test_redirect_within_allowed_host_is_followed(refserver):
    image = fetcher().fetch(f"{refserver.url}/redirect?to=/image.png")
    assert image.size == (48, 32)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/x.png", "gopher://x", "//no-scheme",
                                 "http:///nohost"])
def test_non_http_schemes_are_refused(url):
    with pytest.raises(ReferenceFailure):
        check_url(url, frozenset())


@pytest.mark.parametrize("address", ["127.0.0.1", "127.255.0.1", "10.0.0.1", "172.16.5.4", "192.168.1.1",
                                     "169.254.169.254", "100.64.0.1", "0.0.0.0", "::1", "fe80::1", "fd00::1",
                                     "::ffff:127.0.0.1", "::ffff:169.254.169.254", "::ffff:10.0.0.1",
                                     "224.0.0.1", "240.0.0.1", "fd00:ec2::254"])
def test_address_check_blocks_non_public_addresses(address):
    assert blocked_reason(address) is not None


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"])
def test_address_check_allows_public_addresses(address):
    assert blocked_reason(address) is None


def test_names_resolving_to_private_or_metadata_addresses_are_refused_without_connecting():
    for resolved in (["10.0.0.5"], ["169.254.169.254"], ["8.8.8.8", "192.168.0.1"], ["::ffff:172.16.0.1"]):
        with pytest.raises(ReferenceFailure):
            check_url("https://images.example.com/x.png", frozenset(), resolve=lambda h, p, r=resolved: r)
    check_url("https://images.example.com/x.png", frozenset(), resolve=lambda h, p: ["8.8.8.8"])


def test_allow_list_lets_a_private_host_through():
    check_url("http://minio.internal/x.png", frozenset({"minio.internal"}), resolve=lambda h, p: ["10.0.0.9"])


OK_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
DRIP_INTERVAL = 1 / 3   # seconds between two dripped bytes: a third of the fetches' 1 s timeout


@pytest.mark.parametrize("scheme, head, drip", [
    ("http", OK_HEAD, b"\0" * 100_000),                                         # the body, 3 B/s
    ("http", b"HTTP/1.1 200 OK\r\n", b"X-Slow: " + b"a" * 10_000),              # the headers, 3 B/s
    ("http", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"1" * 10_000),  # a chunk-size line
    # a TLS handshake record (a guard: CPython already bounds one handshake call by the socket timeout)
    ("https", b"", b"\x16\x03\x03\x40\x00" + b"\x02" * 10_000),
], ids=["body", "headers", "chunk-size", "tls-handshake"])
def test_a_host_that_drips_bytes_meets_the_one_deadline(scheme, head, drip):
    """Review #4: each byte arrives well inside any per-read timeout (three bytes per timeout); only a total
    deadline stops it."""
    server = DripServer(head, drip, interval=DRIP_INTERVAL, lifetime=12, read_request=scheme == "http")
    try:
        started = time.monotonic()
        with pytest.raises(ReferenceFailure) as info:
            fetcher(timeout=1.0).fetch(server.url().replace("http:", f"{scheme}:"))
        assert time.monotonic() - started < 1.5
        assert "timed out after 1 s" in info.value.reason
    finally:
        server.stop()


def test_the_deadline_covers_redirects(refserver):
    server = DripServer(OK_HEAD, b"\0" * 100_000, interval=DRIP_INTERVAL, lifetime=12)
    try:
        started = time.monotonic()
        with pytest.raises(ReferenceFailure) as info:
            fetcher(timeout=1.0).fetch(f"{refserver.url}/redirect?to={server.url()}")
        assert time.monotonic() - started < 1.5 and "timed out" in info.value.reason
    finally:
        server.stop()


@pytest.mark.parametrize("url", ["http://[::1/x.png", "http://[not-an-address]/x.png", "http://127.0.0.1:99999/x",
                                 "http://127.0.0.1:port/x"])
def test_a_malformed_url_is_a_reference_failure_and_falls_back(url):
    """Review #16: urlsplit's ValueError used to escape ``reference_or_fallback``."""
    with pytest.raises(ReferenceFailure) as info:
        fetcher().fetch(url)
    assert info.value.reason == "malformed URL"
    assert reference_or_fallback(fetcher(), url, "fallback") == (None, "REFERENCE_FRAME_ERROR: malformed URL")


def test_a_malformed_redirect_location_is_a_reference_failure():
    server = DripServer(b"HTTP/1.1 302 Found\r\nLocation: http://[::1/x.png\r\nContent-Length: 0\r\n\r\n")
    try:
        with pytest.raises(ReferenceFailure) as info:
            fetcher().fetch(server.url())
        assert info.value.reason == "malformed URL"
    finally:
        server.stop()


@pytest.mark.parametrize("address", ["192.0.0.8", "192.0.0.9", "192.0.0.100", "192.0.0.255", "192.88.99.1",
                                     "::ffff:192.0.0.8", "fec0::1", "3fff::1"])
def test_ranges_the_interpreters_ipaddress_calls_global_are_blocked(address):
    """Review #22: Python 3.11.7's ipaddress treats 192.0.0.0/24 outside /29 as global (fixed in 3.11.10);
    also the deprecated 6to4 relay anycast, IPv6 site-local and the new IPv6 documentation range."""
    assert blocked_reason(address) is not None


def test_approved_addresses_do_not_outlive_their_fetch(refserver):
    """Review #22: pins are per fetch, so nothing accumulates per host; after the fetch the session connects
    nowhere, not even to the host it just fetched from."""
    f = fetcher()
    assert f.fetch(f"{refserver.url}/image.png").size == (48, 32)
    with pytest.raises(requests.ConnectionError):
        f.session.get(f"{refserver.url}/image.png", timeout=3)
