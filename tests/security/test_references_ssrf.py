"""SSRF through every reference field of every job type, end to end (queue → real worker → callback).

Loopback spellings only (``localhost``, ``127.0.0.2``, ``[::1]``, ``2130706433``, ``0177.0.0.1`` and a redirect
from the allowed ``127.0.0.1`` to ``localhost``): the reference hosts listen on 127.0.0.1, 127.0.0.2 and
[::1] and record every request, so "blocked" is proven by the absence of a request, not only by the
callback. Fleet A (``fallback``) generates without the reference and reports ``reference_mode_applied:
false`` + ``reference_error``; fleet B (``fail``) fails the job with ``REFERENCE_FRAME_ERROR``.

Private, link-local, metadata (169.254.169.254, fd00:ec2::254), IPv4-mapped/6to4/NAT64 forms and names that
resolve to them are checked in-process through ``ReferenceFetcher`` with an injected resolver and a session
that fails the test if anything is sent — no packet ever leaves loopback.
"""
from __future__ import annotations

import time
import uuid

import pytest
import requests

from common.settings import References
from tests.refserver import DripServer
from workers.core.references import ReferenceFailure, ReferenceFetcher, blocked_reason, check_url

from .fleet import wait_all

RUN = uuid.uuid4().hex[:8]
SPELLINGS = ["localhost", "127.0.0.2", "[::1]", "2130706433", "0177.0.0.1", "redirect"]
SDXL_FIELDS = ["metadata.reference_image_url", "reference_image_url"]
WAN_FIELDS = ["config.image", "metadata.reference_image_url", "config.first_frame", "metadata.start_reference_url",
              "config.last_frame", "metadata.end_reference_url"]
WAN_TYPES = ["video_fast", "video_high", "image_fast", "image_high", "image7b_fast_enhanced",
             "image7b_high_enhanced", "video7b_fast_enhanced", "video7b_high_enhanced"]
SMALL = {"sdxl_queue": {"resolution": "64x64", "num_inference_steps": 2},
         "wan_queue": {"size": "64*64", "num_inference_steps": 2, "frame_num": 5, "seed": 3}}


def blocked_url(refs, spelling: str, marker: str) -> str:
    if spelling == "redirect":
        return refs.url("127.0.0.1", f"/redirect?to=http://localhost:{refs.port}/image.png?m={marker}")
    return f"http://{spelling}:{refs.port}/image.png?m={marker}"


def reference_job(queue: str, job_type: str, job_id: str, field: str, url: str) -> dict:
    body = {"id": job_id, "type": job_type, "user_id": "ssrf-user", "prompt": "a red square",
            "config": dict(SMALL[queue]), "metadata": {}}
    scope, _, key = field.partition(".")
    if key:
        body[scope][key] = url
    else:
        body[scope] = url
    return body


def push_cases(fleet, refs, cases: list[tuple[str, str, str, str]]) -> dict[str, tuple[str, str, str]]:
    """cases: (queue, job type, field, spelling) → {job_id: (field, spelling, marker)}."""
    pushed = {}
    for n, (queue, job_type, field, spelling) in enumerate(cases):
        marker = f"{RUN}-{fleet.name}-{n}"
        job_id = f"ssrf-{fleet.name}-{n}-{RUN}"
        fleet.queue.push(queue, reference_job(queue, job_type, job_id, field, blocked_url(refs, spelling, marker)))
        pushed[job_id] = (field, spelling, marker)
    return pushed


def assert_never_fetched(refs, pushed) -> None:
    for job_id, (field, spelling, marker) in pushed.items():
        fetched = [hit for hit in refs.hits_for(marker) if hit[1].startswith("/image.png")]
        assert fetched == [], (job_id, field, spelling, fetched)
        if spelling == "redirect":  # the allowed first hop was taken: the block is on the redirect target
            assert [hit[1].split("?")[0] for hit in refs.hits_for(marker)] == ["/redirect"], (job_id, field)


def wan_matrix(full: bool) -> list[tuple[str, str, str, str]]:
    """Every WAN type × every field (``full``) or every type with one field each; spellings rotate so each
    field meets every spelling across the types."""
    cases = []
    for t, job_type in enumerate(WAN_TYPES):
        fields = WAN_FIELDS if full else [WAN_FIELDS[t % len(WAN_FIELDS)]]
        for f, field in enumerate(fields):
            cases.append(("wan_queue", job_type, field, SPELLINGS[(t + f) % len(SPELLINGS)]))
    return cases


def test_allowed_reference_is_fetched_and_applied_as_a_control(fleet_a, refs, standin):
    """The same fleet reaches the reference hosts when the URL is allowed: the zero hits below mean blocked."""
    marker = f"{RUN}-control"
    url = refs.url("127.0.0.1", f"/image.png?m={marker}")
    sdxl, wan = f"control-sdxl-{RUN}", f"control-wan-{RUN}"
    fleet_a.queue.push("sdxl_queue", reference_job("sdxl_queue", "sdxl_image_fast", sdxl, SDXL_FIELDS[0], url))
    fleet_a.queue.push("wan_queue", reference_job("wan_queue", "image_fast", wan, "config.image", url))
    bodies = wait_all(standin, [sdxl, wan], timeout=90)
    for job_id in (sdxl, wan):
        assert bodies[job_id]["status"] == "completed", bodies[job_id]
        assert bodies[job_id]["metadata"]["reference_mode_applied"] is True, bodies[job_id]["metadata"]
    assert len(refs.hits_for(marker)) == 2
    for host in ("127.0.0.2", "::1", "localhost"):  # every listener answers when a fetcher allows it
        fetcher = ReferenceFetcher(References(reference_allow_hosts=frozenset({host}), reference_timeout_seconds=5))
        assert fetcher.fetch(refs.url(f"[{host}]" if ":" in host else host, f"/image.png?m={marker}-{host}")).size
        assert refs.hits_for(f"{marker}-{host}")


def test_fallback_policy_generates_without_a_blocked_reference_and_says_so(fleet_a, refs, standin):
    cases = [("sdxl_queue", "sdxl_image_fast", field, spelling) for field in SDXL_FIELDS for spelling in SPELLINGS]
    cases += wan_matrix(full=False)
    pushed = push_cases(fleet_a, refs, cases)
    bodies = wait_all(standin, list(pushed), timeout=150)
    for job_id, (field, spelling, _) in pushed.items():
        body = bodies[job_id]
        assert body["status"] == "completed", (field, spelling, body)
        meta = body["metadata"]
        assert meta["reference_mode_applied"] is False, (field, spelling, meta)
        assert meta["reference_error"].startswith("REFERENCE_FRAME_ERROR: "), meta
        assert any(word in meta["reference_error"] for word in ("blocked", "resolve")), meta["reference_error"]
    assert_never_fetched(refs, pushed)


def test_fail_policy_fails_every_type_and_field_with_reference_frame_error(fleet_b, refs, standin):
    cases = [("sdxl_queue", t, field, spelling) for t in ("sdxl_image_fast", "sdxl_image_high")
             for field in SDXL_FIELDS for spelling in SPELLINGS[::2]]
    cases += wan_matrix(full=True)
    pushed = push_cases(fleet_b, refs, cases)
    bodies = wait_all(standin, list(pushed), timeout=150)
    for job_id, (field, spelling, _) in pushed.items():
        body = bodies[job_id]
        assert body["status"] == "failed", (field, spelling, body)
        assert body["metadata"]["error_type"] == "REFERENCE_FRAME_ERROR", body
        assert body["metadata"]["retryable"] is False
        assert body["error_message"].startswith("REFERENCE_FRAME_ERROR: ") and str(refs.port) not in \
            body["error_message"]
    assert_never_fetched(refs, pushed)


def test_a_reference_host_that_drips_bytes_cannot_wedge_an_sdxl_worker(fleets, standin):
    """Review #4, process level: the real SDXL workers (tiny demo models) fetch an img2img reference from an
    allowed host that sends its headers and then 1 byte/s of a 100 kB body. REFERENCE_TIMEOUT_SECONDS=5 ends
    the fetch: fleet A falls back and says why, fleet B fails the job with REFERENCE_FRAME_ERROR; neither
    worker is wedged for the host's lifetime (60 s)."""
    server = DripServer(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n",
                        b"\0" * 100_000, interval=1.0, lifetime=60)
    try:
        jobs = {name: f"drip-{name}-{RUN}" for name in ("a", "b")}
        started = time.monotonic()
        for name, job_id in jobs.items():
            fleets[name].queue.push("sdxl_queue", reference_job("sdxl_queue", "sdxl_image_fast", job_id,
                                                                SDXL_FIELDS[0], server.url(f"/ref.png?{job_id}")))
        bodies = wait_all(standin, list(jobs.values()), timeout=40)
        assert time.monotonic() - started < 30
        assert server.connections >= 2
        fallback, failed = bodies[jobs["a"]], bodies[jobs["b"]]
        assert fallback["status"] == "completed", fallback
        assert fallback["metadata"]["reference_mode_applied"] is False
        assert fallback["metadata"]["reference_error"] == "REFERENCE_FRAME_ERROR: download timed out after 5 s"
        assert failed["status"] == "failed" and failed["metadata"]["error_type"] == "REFERENCE_FRAME_ERROR", failed
        assert "timed out" in failed["error_message"]
    finally:
        server.stop()


# ------------------------------------------------------------------ non-loopback targets: in-process, no packets
class NoNetwork(requests.Session):
    """A session that fails the test if the fetcher ever tries to send a request."""

    def send(self, request, **kwargs):  # noqa: D102
        raise AssertionError(f"a request was sent to {request.url}")


METADATA_AND_PRIVATE = ["169.254.169.254", "fd00:ec2::254", "::ffff:169.254.169.254", "::ffff:a9fe:a9fe",
                        "64:ff9b::a9fe:a9fe", "2002:a9fe:a9fe::1", "2002:7f00:1::1", "2002:c0a8:101::1", "10.1.2.3",
                        "172.31.255.1", "192.168.0.1", "100.100.100.200", "fe80::a9fe:a9fe%eth0", "fc00::1",
                        "0.0.0.0", "::", "224.0.0.251"]


@pytest.mark.parametrize("address", METADATA_AND_PRIVATE)
def test_names_resolving_to_internal_addresses_are_refused_before_any_request(address):
    fetcher = ReferenceFetcher(References(reference_timeout_seconds=2), session=NoNetwork(),
                               resolve=lambda host, port: ["93.184.216.34", address])
    for url in ("https://images.example.com/ref.png", "http://cdn.example.net:8080/a.png?sig=x"):
        with pytest.raises(ReferenceFailure) as info:
            fetcher.fetch(url)
        assert "blocked" in info.value.reason
    assert blocked_reason(address)


@pytest.mark.parametrize("literal", ["http://169.254.169.254/latest/meta-data/", "http://[fd00:ec2::254]/",
                                     "http://[::ffff:169.254.169.254]/", "http://0x7f000001/", "http://0/",
                                     "http://2852039166/", "http://169.254.169.254.nip.io/"])
def test_metadata_endpoint_literals_and_encodings_are_refused(literal):
    def resolve(host, port):  # what a resolver answers for these spellings (no real lookup)
        return {"0x7f000001": ["127.0.0.1"], "0": ["0.0.0.0"], "2852039166": ["169.254.169.254"],
                "169.254.169.254.nip.io": ["169.254.169.254"]}.get(host, [host])

    with pytest.raises(ReferenceFailure):
        check_url(literal, frozenset(), resolve=resolve)
    fetcher = ReferenceFetcher(References(), session=NoNetwork(), resolve=resolve)
    with pytest.raises(ReferenceFailure):
        fetcher.fetch(literal)


def test_the_connection_goes_to_the_checked_address_not_to_a_second_dns_answer(refs):
    """DNS rebinding: a name checked as X must be connected to at X, whatever the system resolver says later.
    Loopback-only proof: ``localhost`` is allowed and the injected resolver answers 127.0.0.2, while the
    system resolver says 127.0.0.1 — the request must arrive at the 127.0.0.2 listener."""
    marker = f"{RUN}-pinned"
    fetcher = ReferenceFetcher(References(reference_allow_hosts=frozenset({"localhost"}), reference_timeout_seconds=3),
                               resolve=lambda host, port: ["127.0.0.2"])
    assert fetcher.fetch(f"http://localhost:{refs.port}/image.png?m={marker}").size == (40, 24)
    assert refs.hits_for(marker) == [("127.0.0.2", f"/image.png?m={marker}")]
    assert check_url(f"http://localhost:{refs.port}/", frozenset({"localhost"}),
                     resolve=lambda host, port: ["127.0.0.2"]) == "127.0.0.2"


def test_the_fetchers_session_never_connects_to_an_unchecked_host(refs):
    fetcher = ReferenceFetcher(References(reference_timeout_seconds=3))
    marker = f"{RUN}-unchecked"
    with pytest.raises(requests.ConnectionError):
        fetcher.session.get(refs.url("127.0.0.1", f"/image.png?m={marker}"), timeout=3)
    assert refs.hits_for(marker) == []


def test_with_an_empty_allow_list_no_loopback_form_is_fetched(refs):
    """REFERENCE_ALLOW_HOSTS empty (the production default): 127.0.0.1 itself and every other spelling."""
    fetcher = ReferenceFetcher(References(reference_timeout_seconds=3))
    for n, spelling in enumerate(["127.0.0.1", *SPELLINGS]):
        marker = f"{RUN}-empty-{n}"
        url = (f"http://127.0.0.1:{refs.port}/redirect?to=/image.png?m={marker}" if spelling == "redirect"
               else f"http://{spelling}:{refs.port}/image.png?m={marker}")
        with pytest.raises(ReferenceFailure) as info:
            fetcher.fetch(url)
        assert "blocked" in info.value.reason
        assert refs.hits_for(marker) == []
