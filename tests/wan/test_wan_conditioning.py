"""Reference frames → VACE conditioning (pure), fetching under the failure policy (real loopback HTTP), and
the MP4/PNG encoders (decoded back with PyAV / Pillow)."""
from __future__ import annotations

import io

import av
import numpy as np
import pytest
from PIL import Image

from workers.core.errors import ErrorType
from workers.core.references import ReferenceFailure, ReferenceFetcher
from workers.wan import encode
from workers.wan.references import NO_VACE, ReferenceMode, conditioning, resolve
from workers.wan.request import References

RED, BLUE = Image.new("RGB", (80, 48), (220, 20, 20)), Image.new("RGB", (40, 40), (20, 20, 220))


def rgb(image: Image.Image) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.asarray(image).reshape(-1, 3).mean(axis=0).round())


def mask_values(mask: list[Image.Image]) -> list[int]:
    values = []
    for frame in mask:
        array = np.asarray(frame)
        assert array.min() == array.max()  # each mask frame is uniform
        values.append(int(array[0, 0]))
    return values


def test_single_is_a_vace_reference_image_only():
    cond = conditioning({"image": RED}, 64, 32, 9)
    assert cond.video is None and cond.mask is None and cond.kept_frames == ()
    assert len(cond.reference_images) == 1 and rgb(cond.reference_images[0]) == (220, 20, 20)
    assert set(cond.kwargs()) == {"video", "mask", "reference_images"}


@pytest.mark.parametrize("images,kept", [({"first_frame": RED}, (0,)), ({"last_frame": BLUE}, (8,)),
                                         ({"first_frame": RED, "last_frame": BLUE}, (0, 8))])
def test_start_end_both_place_frames_and_mask_them_black(images, kept):
    cond = conditioning(images, 64, 32, 9)
    assert cond.kept_frames == kept and cond.reference_images is None
    assert len(cond.video) == len(cond.mask) == 9
    assert all(frame.size == (64, 32) for frame in cond.video + cond.mask)
    assert mask_values(cond.mask) == [0 if i in kept else 255 for i in range(9)]
    colours = [rgb(frame) for frame in cond.video]
    for i in range(9):
        if i == 0 and "first_frame" in images:
            assert colours[i] == (220, 20, 20)
        elif i == 8 and "last_frame" in images:
            assert colours[i] == (20, 20, 220)
        else:
            assert colours[i] == (128, 128, 128)


def test_one_frame_both_keeps_the_first_and_image_plus_frames_combine():
    cond = conditioning({"first_frame": RED, "last_frame": BLUE}, 32, 32, 1)
    assert cond.kept_frames == (0,) and rgb(cond.video[0]) == (220, 20, 20) and mask_values(cond.mask) == [0]
    combined = conditioning({"image": BLUE, "first_frame": RED}, 32, 32, 5)
    assert combined.kept_frames == (0,) and len(combined.reference_images) == 1


def test_fit_crops_to_exact_size_without_bars():
    half = Image.new("RGB", (100, 50), (0, 0, 0))
    half.paste((255, 255, 255), (0, 0, 100, 25))
    frame = conditioning({"first_frame": half}, 32, 32, 5).video[0]
    assert frame.size == (32, 32)
    top, bottom = np.asarray(frame)[2].mean(), np.asarray(frame)[-3].mean()
    assert top > 200 and bottom < 50


def test_resolve_fetches_all_references_over_http(media, wan_settings):
    fetcher = ReferenceFetcher(wan_settings)
    refs = References(first=media.at("/frame.png?c=10,200,10"), last=media.at("/frame.png?c=10,10,200"))
    outcome = resolve(refs, fetcher, "fallback", vace_available=True)
    assert outcome.applied and outcome.mode is ReferenceMode.BOTH and outcome.error is None
    assert rgb(outcome.images["first_frame"]) == (10, 200, 10) and rgb(outcome.images["last_frame"]) == (10, 10, 200)
    assert outcome.metadata() == {"reference_mode": "both", "reference_mode_applied": True,
                                  "reference_inputs": ["first_frame", "last_frame"]}


def test_unfetchable_reference_falls_back_reported_or_fails_under_fail_policy(media, wan_settings):
    fetcher = ReferenceFetcher(wan_settings)
    refs = References(first=media.at("/frame.png"), last=media.at("/missing.png"))
    outcome = resolve(refs, fetcher, "fallback", vace_available=True)
    assert not outcome.applied and outcome.images == {} and outcome.mode is ReferenceMode.BOTH
    assert outcome.error.startswith("REFERENCE_FRAME_ERROR: ") and "404" in outcome.error
    assert outcome.metadata()["reference_failed_input"] == "config.last_frame"
    with pytest.raises(ReferenceFailure) as caught:
        resolve(refs, fetcher, "fail", vace_available=True)
    assert caught.value.error_type is ErrorType.REFERENCE_FRAME_ERROR and not caught.value.retryable


def test_without_vace_nothing_is_fetched_and_the_reason_is_reported(media, wan_settings):
    before = len(media.hits)
    outcome = resolve(References(image=media.at("/frame.png?c=1,2,3")), ReferenceFetcher(wan_settings), "fail",
                      vace_available=False)
    assert len(media.hits) == before
    assert outcome.metadata() == {"reference_mode": "single", "reference_mode_applied": False,
                                  "reference_error": NO_VACE}
    assert "no VACE model installed" in NO_VACE


def test_mp4_is_h264_yuv420p_16fps_faststart_with_every_frame():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (9, 48, 64, 3), dtype=np.uint8)
    video = encode.mp4_bytes(frames)
    assert (video.frames, video.width, video.height, video.duration_seconds) == (9, 64, 48, 0.5625)
    assert video.data[4:8] == b"ftyp" and 0 < video.data.find(b"moov") < video.data.find(b"mdat")
    with av.open(io.BytesIO(video.data)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
        assert stream.average_rate == 16
        assert sum(1 for _ in container.decode(stream)) == 9
    with pytest.raises(ValueError, match="even"):
        encode.mp4_bytes(frames[:, :47])


def test_outputs_name_type_thumbnail_and_metadata():
    frames = np.zeros((5, 32, 48, 3), dtype=np.uint8)
    frames[2] = 255  # the thumbnail comes from the middle frame
    [video] = encode.outputs(frames, True, {"seed": 3})
    assert (video.name, video.content_type, video.kind) == ("0.mp4", "video/mp4", "video")
    assert video.metadata == {"seed": 3, "width": 48, "height": 32, "asset_index": 0, "format": "mp4",
                              "frame_num": 5, "fps": 16, "duration_seconds": 0.3125,
                              "file_size_bytes": len(video.data)}
    with Image.open(io.BytesIO(video.thumbnail)) as thumb:
        assert thumb.format == "WEBP" and np.asarray(thumb.convert("L")).mean() > 240
    [image] = encode.outputs(frames[:1], False, {"seed": 3})
    assert (image.name, image.content_type, image.kind, image.metadata["format"]) == (
        "0.png", "image/png", "image", "png")
    assert image.data[:8] == b"\x89PNG\r\n\x1a\n"
