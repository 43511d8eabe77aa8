"""user_dist/image_decode.py: every format and mode a web shard holds comes
out as a (S, S, 3) uint8 RGB array close to a float reference (full decode,
antialiased bicubic resize in float, by PIL's own "F"-mode resampler, not by
the torch code under test), and unreadable bytes raise."""
import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from launch.bench.data import web_jpeg
from user_dist.image_decode import decode_image

SIZE = 224


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    im.save(out, fmt, **kw)
    return out.getvalue()


def reference(data: bytes, size: int) -> np.ndarray:
    """(size, size, 3) float64: PIL full decode to RGB, each channel resized in float32 by
    PIL's antialiased bicubic filter (mode "F"), clipped to [0, 255]."""
    with Image.open(io.BytesIO(data)) as im:
        rgb = im.convert("RGB")
    channels = [Image.fromarray(np.asarray(rgb.getchannel(c), dtype=np.float32), "F").resize((size, size),
                                                                                                Image.BICUBIC)
                for c in range(3)]
    return np.clip(np.stack([np.asarray(c, dtype=np.float64) for c in channels], -1), 0, 255)


def psnr(image: np.ndarray, ref: np.ndarray) -> float:
    mse = float(np.mean((image.astype(np.float64) - ref) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


@pytest.fixture(scope="module")
def web_jpegs():
    """Web-style JPEGs: 256..512 px per side, quality 90 (the benchmark's generator)."""
    rng = np.random.default_rng(7)
    return [web_jpeg(rng) for _ in range(8)]


@pytest.fixture(scope="module")
def photo():
    """(300, 400, 3) uint8 web-style content, to re-encode in every format and mode."""
    with Image.open(io.BytesIO(web_jpeg(np.random.default_rng(3)))) as im:
        return np.asarray(im.convert("RGB").resize((400, 300)))


def check(out: np.ndarray, size: int = SIZE) -> None:
    assert out.shape == (size, size, 3) and out.dtype == np.uint8 and out.flags.c_contiguous


def test_web_style_jpegs_stay_close_to_the_float_reference(web_jpegs):
    """256..512 px sources at 224. Those under 448 px on a side (torchvision's
    libjpeg-turbo decode at full size, antialiased bilinear): > 44 dB each; an
    unfiltered resize (PIL NEAREST) scores 38-40 dB on these images, so the bound
    catches a resize that stops filtering. Those >= 448 px on both sides are
    decoded at half size (PIL draft mode): the reduced IDCT rings at the hard,
    saturated edges of the drawn shapes, 35-41 dB."""
    full, halved = [], []
    for data in web_jpegs:
        out = decode_image(data, SIZE)
        check(out)
        with Image.open(io.BytesIO(data)) as im:
            (halved if min(im.size) >= 2 * SIZE else full).append(psnr(out, reference(data, SIZE)))
    assert full and halved, "the fixture should exercise both JPEG paths"
    assert min(full) > 44, full
    assert min(halved) > 33, halved


@pytest.mark.parametrize("wh,mode", [((640, 480), "RGB"), ((480, 640), "RGB"), ((1024, 768), "RGB"),
                                     ((2000, 1000), "RGB"), ((640, 480), "L"), ((640, 480), "CMYK")])
def test_large_jpegs_take_the_dct_scaled_path_and_stay_sane(photo, wh, mode):
    """Sources >= 2x the size on both sides are decoded at 1/2..1/8 scale (PIL draft
    mode); the reduced IDCT rings a little at hard saturated edges: > 40 dB here."""
    data = encode(Image.fromarray(photo).resize(wh, Image.BICUBIC).convert(mode), "JPEG", quality=90)
    out = decode_image(data, SIZE)
    check(out)
    assert psnr(out, reference(data, SIZE)) > 40


@pytest.mark.parametrize("case", ["jpeg-gray", "jpeg-cmyk", "jpeg-progressive", "jpeg-444", "png-rgb", "png-rgba",
                                  "png-palette", "png-gray", "png-16bit-gray", "webp-lossy", "webp-lossless",
                                  "webp-rgba", "gif"])
def test_every_format_and_mode_comes_out_as_rgb_close_to_the_reference(photo, case):
    im = Image.fromarray(photo)
    data = {
        "jpeg-gray": lambda: encode(im.convert("L"), "JPEG", quality=90),
        "jpeg-cmyk": lambda: encode(im.convert("CMYK"), "JPEG", quality=90),
        "jpeg-progressive": lambda: encode(im, "JPEG", quality=90, progressive=True),
        "jpeg-444": lambda: encode(im, "JPEG", quality=90, subsampling=0),
        "png-rgb": lambda: encode(im, "PNG"),
        "png-rgba": lambda: encode(im.convert("RGBA"), "PNG"),
        "png-palette": lambda: encode(im.convert("P", palette=Image.ADAPTIVE, colors=256), "PNG"),
        "png-gray": lambda: encode(im.convert("L"), "PNG"),
        "png-16bit-gray": lambda: encode(Image.fromarray(np.asarray(im.convert("L"), np.uint16) * 257), "PNG"),
        "webp-lossy": lambda: encode(im, "WEBP", quality=90),
        "webp-lossless": lambda: encode(im, "WEBP", lossless=True),
        "webp-rgba": lambda: encode(im.convert("RGBA"), "WEBP", lossless=True),
        "gif": lambda: encode(im.convert("P", palette=Image.ADAPTIVE), "GIF"),
    }[case]()
    out = decode_image(data, SIZE)
    check(out)
    ref = reference(data, SIZE)
    if case == "png-16bit-gray":  # scaled down to 8 bits: the reference (PIL's convert) clips to white
        ref = np.repeat(np.asarray(im.convert("L"), np.float64)[..., None], 3, axis=2)
        ref = np.asarray(Image.fromarray(ref.astype(np.uint8)).resize((SIZE, SIZE), Image.BICUBIC), np.float64)
    assert psnr(out, ref) > 44
    if "gray" in case:
        assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])


@pytest.mark.parametrize("size", [32, 64, 300, 511])
def test_any_output_size_including_upsampling(web_jpegs, size):
    data = web_jpegs[0]
    out = decode_image(data, size)
    check(out, size)
    assert psnr(out, reference(data, size)) > 30


def test_an_image_already_at_the_size_is_returned_as_decoded(photo):
    square = Image.fromarray(photo).resize((SIZE, SIZE))
    data = encode(square, "PNG")
    assert np.array_equal(decode_image(data, SIZE), np.asarray(square))


def test_decoding_is_deterministic_and_independent_of_torch_threads(web_jpegs, photo):
    large = encode(Image.fromarray(photo).resize((900, 700)), "JPEG", quality=90)
    threads = torch.get_num_threads()
    try:
        for data in (web_jpegs[1], large, encode(Image.fromarray(photo), "PNG")):
            torch.set_num_threads(1)
            one = decode_image(data, SIZE)
            torch.set_num_threads(2)
            assert np.array_equal(one, decode_image(data, SIZE))
            assert np.array_equal(one, decode_image(data, SIZE))
    finally:
        torch.set_num_threads(threads)


def test_truncated_images_are_not_loaded(web_jpegs):
    """PIL's LOAD_TRUNCATED_IMAGES would turn a cut JPEG into a half-grey image."""
    import user_dist.data  # noqa: F401  (every reader imports it: it must leave the flag alone)

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("cut", [0.5, 0.9, -2, 200])
@pytest.mark.parametrize("source", ["web", "large", "png", "webp"])
def test_truncated_bytes_raise(web_jpegs, photo, source, cut):
    """Cut anywhere (mid-scan, inside the header; for a JPEG also just its EOI marker),
    on both JPEG paths and the PIL formats: an exception, never an image. (A PNG cut
    in its final IEND chunk still holds every pixel and decodes.)"""
    if source == "png" and cut == -2:
        cut = -30  # inside the last IDAT chunk
    data = {"web": lambda: web_jpegs[2],
            "large": lambda: encode(Image.fromarray(photo).resize((1000, 800)), "JPEG", quality=90),
            "png": lambda: encode(Image.fromarray(photo), "PNG"),
            "webp": lambda: encode(Image.fromarray(photo), "WEBP", quality=90)}[source]()
    end = int(len(data) * cut) if isinstance(cut, float) else cut if cut > 0 else len(data) + cut
    with pytest.raises(Exception):
        decode_image(data[:end], SIZE)


@pytest.mark.parametrize("data", [b"", b"not an image at all", b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4,
                                  b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, b"RIFF\x10\x00\x00\x00WEBPVP8 "],
                         ids=["empty", "text", "jpeg-magic-garbage", "png-magic-garbage", "webp-magic-garbage"])
def test_garbage_raises(data):
    with pytest.raises(Exception):
        decode_image(data, SIZE)
