"""Stored files of a WAN result (CONTRACT §3–§4): one PNG for image types, an H.264 MP4 for video types.

MP4: libx264, yuv420p, 16 fps, ``movflags=+faststart`` (the index first, so browsers start playing at once);
dimensions must be even (the request already guarantees multiples of 16). Thumbnails are WebP from the
middle frame. ``duration_seconds`` is computed from the frames actually written.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from workers.core.handler import Output
from workers.media import png
from workers.media.thumbnail import thumbnail

from .request import FPS


@dataclass(frozen=True)
class Encoded:
    data: bytes
    frames: int
    width: int
    height: int

    @property
    def duration_seconds(self) -> float:
        return round(self.frames / FPS, 4)


def mp4_bytes(frames: np.ndarray, fps: int = FPS, crf: int = 18) -> Encoded:
    """H.264 MP4 of ``uint8`` frames ``(F, H, W, 3)``."""
    count, height, width = frames.shape[0], frames.shape[1], frames.shape[2]
    if count == 0:
        raise ValueError("no frames to encode")
    if width % 2 or height % 2:
        raise ValueError("H.264 yuv420p needs even width and height")
    with tempfile.TemporaryDirectory(prefix="wan-mp4-") as folder:
        path = Path(folder) / "0.mp4"   # +faststart rewrites the file in a second pass: needs a real file
        _write_mp4(path, frames, fps, crf)
        return Encoded(path.read_bytes(), count, width, height)


def _write_mp4(path: Path, frames: np.ndarray, fps: int, crf: int) -> None:
    height, width = frames.shape[1], frames.shape[2]
    with av.open(str(path), mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=Fraction(fps, 1))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast"}  # medium: 3.5 s of an 81-frame job (bench/)
        for index in range(frames.shape[0]):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[index]), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def outputs(frames: np.ndarray, is_video: bool, asset_meta: dict) -> list[Output]:
    """The one stored file (``0.png`` or ``0.mp4``) with its thumbnail and asset metadata."""
    middle = Image.fromarray(frames[len(frames) // 2])
    height, width = int(frames.shape[1]), int(frames.shape[2])
    meta = {**asset_meta, "width": width, "height": height, "asset_index": 0}
    if not is_video:
        pending = png.start(frames[0])    # on the encoding threads while the thumbnail is made here
        thumb = thumbnail(middle)
        data = pending.result()
        meta.update(format="png", file_size_bytes=len(data))
        return [Output("0.png", data, "image/png", "image", thumb, meta)]
    video = mp4_bytes(frames)
    meta.update(format="mp4", frame_num=video.frames, fps=FPS, duration_seconds=video.duration_seconds,
                file_size_bytes=len(video.data))
    return [Output("0.mp4", video.data, "video/mp4", "video", thumbnail(middle), meta)]
