"""The multi-core PNG writer: exact pixels through Pillow, a valid zlib stream and chunk CRCs, Paeth against
the spec's per-byte definition, sizes near Pillow's own, and clear errors for what it cannot write."""
from __future__ import annotations

import io
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from workers.media import png


def chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of every chunk, checking each CRC."""
    assert data[:8] == png.SIGNATURE
    out, at = [], 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at:at + 4])
        kind, body = data[at + 4:at + 8], data[at + 8:at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length:at + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        out.append((kind, body))
        at += 12 + length
    return out


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


@pytest.mark.parametrize("shape", [(1, 1, 3), (3, 5, 3), (2, 7), (5, 4, 4), (2, 3, 2), (257, 33, 3)])
def test_pixels_round_trip_exactly(shape, monkeypatch):
    monkeypatch.setattr(png, "STRIP_BYTES", 64)   # many strips even for small images
    pixels = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    data = png.encode(pixels)
    assert np.array_equal(decoded(data), pixels)


def test_strips_make_one_checked_zlib_stream(monkeypatch):
    monkeypatch.setattr(png, "STRIP_BYTES", 1000)
    pixels = np.random.default_rng(1).integers(0, 256, (90, 40, 3), dtype=np.uint8)
    parts = chunks(png.encode(pixels))
    kinds = [kind for kind, _ in parts]
    idats = [body for kind, body in parts if kind == b"IDAT"]
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and len(idats) > 5   # one per strip + the checksum
    width, height, depth, colour = struct.unpack(">IIBB", parts[0][1][:10])
    assert (width, height, depth, colour) == (40, 90, 8, 2)
    raw = zlib.decompress(b"".join(idats))    # verifies the header and the combined Adler-32
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(90, 1 + 40 * 3)
    assert (rows[:, 0] == png.PAETH).all()


def test_paeth_matches_the_spec_byte_by_byte():
    rng = np.random.default_rng(2)
    rows = rng.integers(0, 256, (4, 18), dtype=np.uint8)
    above = rng.integers(0, 256, 18, dtype=np.uint8)
    channels = 3
    expected = np.zeros_like(rows)
    full = np.vstack([above, rows]).astype(int)
    for y in range(1, full.shape[0]):
        for x in range(full.shape[1]):
            a = full[y, x - channels] if x >= channels else 0
            b = full[y - 1, x]
            c = full[y - 1, x - channels] if x >= channels else 0
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            predictor = a if pa <= pb and pa <= pc else b if pb <= pc else c
            expected[y - 1, x] = (full[y, x] - predictor) % 256
    assert np.array_equal(png.paeth(rows, above, channels), expected)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.binary(max_size=300))
def test_adler32_combine_equals_adler32_of_the_whole(first, second):
    combined = png.adler32_combine(zlib.adler32(first), zlib.adler32(second), len(second))
    assert combined == zlib.adler32(first + second)


def test_adler32_combine_with_long_blocks():
    block = bytes(range(256)) * 800       # > 65521 bytes: the modular reductions matter
    assert png.adler32_combine(zlib.adler32(block), zlib.adler32(block[::-1]), len(block)) == \
        zlib.adler32(block + block[::-1])


@pytest.mark.parametrize("level", [0, 1, 6, 9])
def test_every_zlib_level_gives_a_valid_header(level):
    pixels = np.arange(60, dtype=np.uint8).reshape(4, 5, 3)
    assert np.array_equal(decoded(png.encode(pixels, level=level)), pixels)
    header = png._zlib_header(level)
    assert ((header[0] << 8) + header[1]) % 31 == 0


def test_size_is_near_pillows_on_a_smooth_image():
    y, x = np.mgrid[0:256, 0:256]
    noise = np.random.default_rng(3).normal(0, 2, (256, 256, 3))
    pixels = np.clip(np.stack([x, y, (x + y) / 2], -1) + noise, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", compress_level=png.LEVEL)
    ours = png.encode(pixels)
    assert len(ours) <= 1.1 * len(out.getvalue())
    assert len(ours) < pixels.nbytes * 0.8          # it compresses


def test_pending_results_from_a_caller_pool_in_any_order():
    pixels = [np.full((20, 10, 3), i, dtype=np.uint8) for i in range(4)]
    with ThreadPoolExecutor(2) as executor:
        pending = [png.start(p, executor) for p in pixels]
        results = [p.result() for p in reversed(pending)][::-1]
    assert [decoded(r)[0, 0, 0] for r in results] == [0, 1, 2, 3]


@pytest.mark.parametrize("pixels, message", [
    (np.zeros((4, 4, 3), dtype=np.float32), "uint8"),
    (np.zeros((4, 4, 5), dtype=np.uint8), "1-4"),
    (np.zeros((2, 4, 4, 3), dtype=np.uint8), "1-4"),
    (np.zeros((0, 4, 3), dtype=np.uint8), "at least one pixel"),
    ([[1, 2], [3, 4]], "uint8"),
])
def test_what_it_cannot_write_is_named(pixels, message):
    with pytest.raises(ValueError, match=message):
        png.encode(pixels)


def test_a_level_outside_zlibs_range_is_refused():
    with pytest.raises(ValueError, match="0-9"):
        png.encode(np.zeros((2, 2, 3), dtype=np.uint8), level=10)


@pytest.mark.timeout(60)
def test_a_forked_child_encodes_with_its_own_threads():
    import multiprocessing

    png.encode(np.zeros((8, 8, 3), dtype=np.uint8))          # the parent's pool exists now
    context = multiprocessing.get_context("fork")
    with context.Pool(1) as children:
        data = children.apply(png.encode, (np.full((30, 20, 3), 7, dtype=np.uint8),))
    assert np.array_equal(decoded(data), np.full((30, 20, 3), 7, dtype=np.uint8))
