"""The WebP thumbnail stored next to every image and video (``<stem>.thumb.webp``, CONTRACT §3)."""
from __future__ import annotations

import io

from PIL import Image

THUMBNAIL_EDGE = 256


def thumbnail(image: Image.Image) -> bytes:
    """WebP thumbnail: longest edge 256 px, aspect kept, quality 85."""
    thumb = image.convert("RGB")
    thumb.thumbnail((THUMBNAIL_EDGE, THUMBNAIL_EDGE), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    thumb.save(out, format="WEBP", quality=85)
    return out.getvalue()
