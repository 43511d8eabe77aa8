"""Image bytes -> the (S, S, 3) uint8 array a training or evaluation batch holds.

One function, :func:`decode_image`, used by every reader (jpg shards of
data_shards and web shards' jpg / jpeg / png / webp members). The image is
resized to S x S (a square resize, the aspect ratio is not kept).

Which decoder runs (measured by ``launch/bench_data.py --web``, figures in
docs/performance.md "Web-style image decoding"):

- a JPEG at least twice S on both sides (COCO's 640 x 480 for S = 224):
  PIL's draft mode, libjpeg's DCT scaling, decodes it at 1/2, 1/4 or 1/8 of
  its size, still >= S on both sides: a fraction of the work of a full decode;
- any other JPEG (web-style 256..512 px sources): torchvision's
  ``decode_jpeg`` (libjpeg-turbo), with less per-image overhead than PIL's
  decoder, which reads the stream in chunks from Python;
- PNG, WebP, GIF, ... : PIL, converted to RGB (palette, grey, 16-bit grey,
  RGBA, CMYK).

The resize is torch's antialiased bilinear filter on uint8 (vectorised,
several times faster than PIL's bicubic one); against a float64 reference
(full decode, antialiased bicubic) it stays above 40 dB PSNR on web-style
images (tests/test_image_decode.py).

Unreadable bytes raise (PIL's OSError / UnidentifiedImageError, torchvision's
RuntimeError): a truncated JPEG never becomes a grey image, as long as
``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` stays False (the default).
"""
from __future__ import annotations

import io
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

# torchvision 0.29 (pinned in setup.py) deprecates its decoders in favour of
# TorchCodec; decode_jpeg still works there, and the warning would otherwise
# come once from every loader worker.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


def resize_uint8(image: torch.Tensor, size: int) -> np.ndarray:
    """(H, W, 3) uint8 tensor -> (size, size, 3) uint8 array, antialiased bilinear.

    torch's vectorised uint8 path needs the channels-last layout, which the
    (1, 3, H, W) view of an (H, W, 3) tensor has.
    """
    if image.shape[:2] == (size, size):
        return image.numpy()
    x = image.permute(2, 0, 1).unsqueeze(0)
    out = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out[0].permute(1, 2, 0).contiguous().numpy()


def pil_rgb(im: Image.Image) -> torch.Tensor:
    """(H, W, 3) uint8 of an image in any PIL mode (palette, grey, RGBA, CMYK, ...).

    16-bit grey (PNG "I;16", or "I") is scaled to 8 bits: ``convert("RGB")``
    would clip it, nearly every pixel to white.
    """
    if im.mode.startswith("I"):
        grey = (np.clip(np.asarray(im), 0, 65535) >> 8).astype(np.uint8)
        return torch.from_numpy(np.repeat(grey[..., None], 3, axis=2))
    return torch.from_numpy(np.array(im.convert("RGB")))  # np.array: torch wants a writable buffer


def decode_image(data: bytes, size: int) -> np.ndarray:
    """Decode encoded image bytes (JPEG, PNG, WebP, ...) into a (size, size, 3) uint8 RGB array.

    Raises:
        Exception: any decoder error for unreadable bytes (callers name the shard and sample).
    """
    with Image.open(io.BytesIO(data)) as im:  # reads the header only
        if im.format == "JPEG":
            full = im.size
            im.draft("RGB", (size, size))  # picks the largest DCT scaling that keeps both sides >= size
            if im.size == full:
                rgb = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
                return resize_uint8(rgb.permute(1, 2, 0), size)
        return resize_uint8(pil_rgb(im), size)
