"""Image bytes -> the (S, S, 3) uint8 array a training or evaluation batch holds.

One function, :func:`decode_image`, used by every reader (jpg shards of
data_shards and web shards' jpg / jpeg / png / webp members). The image is
resized to S x S (a square resize, the aspect ratio is not kept).
"""
from __future__ import annotations

import io

import numpy as np


def decode_image(data: bytes, size: int) -> np.ndarray:
    """Decode encoded image bytes (JPEG, PNG, WebP, ...) into a (size, size, 3) uint8 RGB array.

    Raises:
        Exception: any decoder error for unreadable bytes (callers name the shard and sample).
    """
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.draft("RGB", (size, size))  # JPEG DCT scaling: decode at >= size, much faster
        return np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC))
