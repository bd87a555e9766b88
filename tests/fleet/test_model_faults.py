"""Faults that need the real handlers: the whole fleet under the orchestrator on the tiny demo models
(WAN with REFERENCE_FAILURE_POLICY=fail and a temporary-files directory too small for a video; SDXL with
the default policy, fallback)."""
from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.refserver import ReferenceServer

from .jobs import COMPLETED, assert_drained, assert_exactly_once, dead_ids, element, new_id, terminal, wait_terminal

SMALL_WAN = {"size": "64*64", "num_inference_steps": 2, "frame_num": 5, "seed": 5}
SMALL_SDXL = {"resolution": "64x64", "num_inference_steps": 2, "seed": 5}


@pytest.fixture(scope="module")
def references() -> Iterator[ReferenceServer]:
    server = ReferenceServer()
    yield server
    server.stop()


@pytest.mark.timeout(300)
def test_hanging_reference_host_fails_or_falls_back_on_time(model_fleet, references, report):
    """Injects: reference URLs on a loopback host that accepts the request and never answers in time
    (/hang.png, 20 s; REFERENCE_TIMEOUT_SECONDS=1). Asserts: the WAN job (policy ``fail``) fails exactly once
    with REFERENCE_FRAME_ERROR within a few seconds, not after the host's 20 s; the SDXL img2img job (policy
    ``fallback``) completes exactly once as plain text-to-image and reports the failure
    (``reference_mode_applied: false``, ``reference_error: REFERENCE_FRAME_ERROR: ...``); the next job on each
    worker completes (the workers go on); queues, processing lists and outbox end empty."""
    rig = model_fleet
    hang = f"{references.url}/hang.png?s=20"
    wan_hang, wan_next = new_id("wan-ref-hang"), new_id("wan-after-hang")
    sdxl_hang, sdxl_next = new_id("sdxl-ref-hang"), new_id("sdxl-after-hang")
    pushed = time.time()
    rig.client.rpush("wan_queue", element(wan_hang, "image_fast", config={**SMALL_WAN, "first_frame": hang}),
                     element(wan_next, "image_fast", config=SMALL_WAN))
    rig.client.rpush("sdxl_queue", element(sdxl_hang, "sdxl_image_fast", config={**SMALL_SDXL, "pipeline": "img2img"},
                                           metadata={"reference_image_url": hang}),
                     element(sdxl_next, "sdxl_image_fast", config=SMALL_SDXL))
    wait_terminal(rig.standin, [wan_hang, sdxl_hang], timeout=60)
    failed_after = terminal(rig.standin, wan_hang)[0].at - pushed  # the stand-in stamps time.time()
    wait_terminal(rig.standin, [wan_next, sdxl_next], timeout=120)
    assert_drained(rig.client)
    assert_exactly_once(rig.standin, {wan_hang: "REFERENCE_FRAME_ERROR", wan_next: COMPLETED,
                                      sdxl_hang: COMPLETED, sdxl_next: COMPLETED})
    failure = terminal(rig.standin, wan_hang)[0].body
    assert failure["error_message"].startswith("REFERENCE_FRAME_ERROR") and "timed out" in failure["error_message"]
    assert failure["metadata"]["retryable"] is False
    assert failed_after < 10, f"the WAN job failed only after {failed_after:.1f} s"
    fallback = terminal(rig.standin, sdxl_hang)[0].body["metadata"]
    assert fallback["reference_mode_applied"] is False
    assert fallback["reference_error"].startswith("REFERENCE_FRAME_ERROR:")
    assert wan_hang not in dead_ids(rig.client, "wan_queue")  # a failed callback, not a dead letter
    report("hanging reference host", f"WAN failed with REFERENCE_FRAME_ERROR after {failed_after:.1f} s; "
           "SDXL fell back and reported it", reference_fail_s=round(failed_after, 2))


@pytest.mark.timeout(300)
def test_full_temporary_disk_fails_the_video_clearly_and_the_worker_goes_on(model_fleet, tiny_tmp, report):
    """Injects: the WAN worker's temporary-files directory is too small for the MP4 it encodes (a 16 KiB
    tmpfs as TMPDIR, or RLIMIT_FSIZE where mounting is not permitted). Asserts: the video job is retried up
    to the attempt limit (each attempt hits the full disk), dead-lettered, and gets exactly one failed
    callback (INTERNAL_ERROR) whose message says the disk is full, without a path; an image job behind it
    (no temporary file) completes; the WAN program is still RUNNING; queues, processing lists and outbox end
    empty."""
    rig = model_fleet
    video, image = new_id("video-disk-full"), new_id("image-after-disk-full")
    rig.client.rpush("wan_queue",
                     element(video, "video_fast", config={**SMALL_WAN, "size": "128*128", "frame_num": 9}),
                     element(image, "image_fast", config=SMALL_WAN))
    started = time.monotonic()
    wait_terminal(rig.standin, [video, image], timeout=180)
    elapsed = time.monotonic() - started
    assert_drained(rig.client)
    assert_exactly_once(rig.standin, {video: "INTERNAL_ERROR", image: COMPLETED})
    failed = terminal(rig.standin, video)[0].body
    assert failed["error_message"].startswith("no space left on the worker's disk"), failed["error_message"]
    assert str(tiny_tmp.path) not in failed["error_message"]  # no path reaches the app
    assert video in dead_ids(rig.client, "wan_queue")  # retried up to the attempt limit, then dead-lettered
    assert rig.fleet.programs()["wan"]["state"] == "RUNNING"
    report("full temporary disk", f"{tiny_tmp.how}: video failed with {failed['metadata']['error_type']} "
           f"({failed['error_message']!r}); the next job completed; {elapsed:.1f} s")
