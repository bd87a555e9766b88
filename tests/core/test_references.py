import time

import pytest

from tests.refserver import ReferenceServer
from workers.core.references import ReferenceFailure, ReferenceFetcher, blocked_reason, check_url
from workers.core.settings import Settings


@pytest.fixture(scope="module")
def refserver():
    server = ReferenceServer()
    yield server
    server.stop()


def fetcher(allow=("127.0.0.1",), max_bytes=1024 * 1024, timeout=5.0):
    return ReferenceFetcher(Settings(reference_allow_hosts=frozenset(allow), reference_max_bytes=max_bytes,
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
