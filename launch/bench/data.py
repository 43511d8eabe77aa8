"""Data-loader throughput per loader worker, for region shards and JPEG shards
(``--sections data`` of launch/benchmark.py, and launch/bench_data.py):

    python launch/bench_data.py                       # builds temporary shards first
    python launch/bench_data.py --regions DIR --jpg DIR --seconds 20

Everything runs in this one process, which is exactly what one loader worker
does. Two stages are timed per shard folder:

- decode: images/s read from the tars and decoded (regions.npy / JPEG ->
  resized uint8), i.e. the per-worker sample rate;
- train batches: (image, caption) pairs/s out of ``train_loader`` with
  ``num_workers=0``: decode + pair shuffle + caption augmentation +
  tokenisation + padding into batches.

Without --regions/--jpg it builds, in a temporary folder, a COCO-shaped region
split (36 x 2048 float16 per image, through the ``precomp`` builder) and the
synthetic set's region and jpg shards.

``--web`` measures web-style image decoding instead: it writes an
img2dataset-layout tar (KEY.jpg / KEY.txt / KEY.json, ``webdataset.TarWriter``)
of JPEGs of 256..512 px per side at quality 90 (gradients, noise and shapes,
which decode like photographs; flat colour would decode unrealistically fast),
or reads ``--web-tar``, and times each decoder candidate against plain PIL
(full decode + bicubic resize) in the same run, then the whole per-worker path
(tar read + decode_image + caption) over the tar:

    python launch/bench_data.py --web --web-images 500 --seconds 4
"""
from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Tuple

import numpy as np
import torch

from user_dist.config import DataConfig, TextEncoderConfig
from user_dist.data import SampleReader, train_loader
from user_dist.data_format import iter_raw_samples, load_manifest, member
from user_dist.image_decode import decode_image, resize_uint8
from user_dist.tokenizer import build_tokenizer

from .order import order_stats


def build_fixtures(root: str, images: int) -> List[Tuple[str, str, str]]:
    from data_shards.precomp import build_precomp
    from data_shards.synthetic import build_synthetic

    rng = np.random.default_rng(0)
    ims = np.lib.format.open_memmap(os.path.join(root, "train_ims.npy"), mode="w+", dtype=np.float32,
                                    shape=(images, 36, 2048))
    for k in range(images):  # BUTD-like: non-negative, mostly small
        ims[k] = np.maximum(rng.standard_normal((36, 2048), dtype=np.float32), 0)
    ims.flush()
    del ims
    with open(os.path.join(root, "train_caps.txt"), "w") as f:
        f.writelines(f"a man riding a wave on top of a surfboard number {k} {j}\n" for k in range(images) for j in range(5))
    with open(os.path.join(root, "train_ids.txt"), "w") as f:
        f.writelines(f"{k}\n" for k in range(images))
    build_precomp(root, "train", os.path.join(root, "coco_like"), shard_size=250)
    build_synthetic(os.path.join(root, "synthetic"), train_images=images, val_images=1, test_images=1,
                    shard_size=250)
    return [("regions 36x2048 (COCO-like)", "regions", os.path.join(root, "coco_like")),
            ("regions synthetic (R~4, 2048)", "regions", os.path.join(root, "synthetic", "shards", "regions", "train")),
            ("jpg synthetic (64px -> 224)", "jpg", os.path.join(root, "synthetic", "shards", "jpg", "train"))]


def decode_rate(folder: str, cfg: DataConfig, seconds: float) -> float:
    reader = SampleReader(load_manifest(folder), cfg)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for shard in reader.manifest.shards:
            for _ in reader.samples(shard):
                n += 1
    return n / (time.perf_counter() - start)


def batch_rate(cfg: DataConfig, tokenizer, batch_size: int, seconds: float) -> float:
    n, start = 0, time.perf_counter()
    for epoch in range(1000):
        for batch in train_loader(cfg, tokenizer, batch_size, rank=0, world_size=1, epoch=epoch, seed=0):
            n += batch["input_ids"].shape[0]
            if time.perf_counter() - start > seconds:
                return n / (time.perf_counter() - start)
    return n / (time.perf_counter() - start)


def rates(cases: List[Tuple[str, str, str]], batch_size: int, seconds: float,
          image_size: int = 224) -> Iterator[Tuple[str, float, float]]:
    """(name, decode images/s, train batch pairs/s) of each (name, mode, folder),
    measured in this thread as one loader worker (``torch`` on one thread)."""
    tokenizer = build_tokenizer(TextEncoderConfig())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like a loader worker
    try:
        for name, mode, folder in cases:
            cfg = DataConfig(train_shards=folder, mode=mode, num_workers=0, image_size=image_size)
            yield name, decode_rate(folder, cfg, seconds), batch_rate(cfg, tokenizer, batch_size, seconds)
    finally:
        torch.set_num_threads(threads)


TABLE = "| shards | decode (images/s/worker) | train batches (pairs/s/worker) |\n|---|---|---|"


def row(name: str, decode: float, batches: float) -> str:
    return f"| {name} | {decode:,.0f} | {batches:,.0f} |"


def data_section(args) -> List[Tuple[str, float, float]]:
    """``--sections data``: the rates on fixtures of ``--data-images`` images built here."""
    with tempfile.TemporaryDirectory() as tmp:
        fixtures = build_fixtures(tmp, args.data_images)
        rows = list(rates(fixtures, min(128, 5 * args.data_images), args.data_seconds))
    print("\n== data pipeline, per loader worker (launch/bench/data.py) ==\n" + TABLE)
    for r in rows:
        print(row(*r))
    return rows


# --------------------------------------------------------------------------- web-style decoding (--web)


def web_jpeg(rng: np.random.Generator, quality: int = 90) -> bytes:
    """One web-style JPEG, 256..512 px per side: smooth colour gradients, sensor-like
    noise and a few filled shapes (edges), lightly blurred like a resized photograph."""
    from PIL import Image, ImageDraw, ImageFilter

    w, h = (int(v) for v in rng.integers(256, 513, size=2))
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    period = rng.uniform(20, 200, size=(3, 2))
    phase = rng.uniform(0, 2 * np.pi, size=3)
    pixels = np.stack([127 + 100 * np.sin(x / period[c, 0] + y / period[c, 1] + phase[c]) for c in range(3)], -1)
    pixels += rng.normal(0, 12, size=(h, w, 3))
    im = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = [x0, y0, x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2))]
        fill = tuple(int(c) for c in rng.integers(0, 256, size=3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    out = io.BytesIO()
    im.filter(ImageFilter.GaussianBlur(0.7)).save(out, "JPEG", quality=quality)
    return out.getvalue()


def build_web_tar(folder: str, images: int, seed: int = 0) -> str:
    """An img2dataset-style shard ``folder/00000.tar`` (KEY.jpg, KEY.txt, KEY.json per
    sample) and its ``00000_stats.json``; returns the tar's path."""
    import json

    import webdataset

    rng = np.random.default_rng(seed)
    path = os.path.join(folder, "00000.tar")
    with webdataset.TarWriter(path) as sink:
        for k in range(images):
            key, caption = f"{k:09d}", f"a web photo number {k} of a dog on a beach"
            jpg = web_jpeg(rng)
            sink.write({"__key__": key, "jpg": jpg, "txt": caption,
                        "json": {"key": key, "caption": caption, "status": "success", "url": f"{key}.jpg"}})
    with open(os.path.join(folder, "00000_stats.json"), "w") as f:
        json.dump({"count": images, "successes": images, "failed_to_download": 0, "failed_to_resize": 0}, f)
    return path


def read_jpegs(tar: str) -> List[bytes]:
    """The ``jpg`` members of a tar, in order (read with the project's tar reader)."""
    return [raw.members["jpg"] for raw in iter_raw_samples(tar) if "jpg" in raw.members]


def pil_bicubic(data: bytes, size: int) -> np.ndarray:
    """The baseline: PIL full decode + convert + bicubic resize."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC))


def pil_draft_bicubic(data: bytes, size: int) -> np.ndarray:
    """PIL draft mode (DCT scaling to >= size) + bicubic resize: decode_image before issue 14."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.draft("RGB", (size, size))
        return np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC))


def pil_draft_torch(data: bytes, size: int) -> np.ndarray:
    """PIL draft mode + torch's antialiased uint8 bilinear resize."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.draft("RGB", (size, size))
        return resize_uint8(torch.from_numpy(np.array(im.convert("RGB"))), size)


def turbo(data: bytes) -> torch.Tensor:
    """(H, W, 3) uint8: torchvision's decode_jpeg (libjpeg-turbo)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB).permute(1, 2, 0)


def turbo_pil_bicubic(data: bytes, size: int) -> np.ndarray:
    """torchvision decode_jpeg (libjpeg-turbo) + PIL bicubic resize."""
    from PIL import Image

    return np.asarray(Image.fromarray(turbo(data).numpy()).resize((size, size), Image.BICUBIC))


def turbo_torch(data: bytes, size: int) -> np.ndarray:
    """torchvision decode_jpeg + torch's antialiased uint8 bilinear resize (no draft)."""
    return resize_uint8(turbo(data), size)


BASELINE = "PIL: full decode + bicubic (baseline)"
DECODERS: Dict[str, Callable[[bytes, int], np.ndarray]] = {
    BASELINE: pil_bicubic,
    "PIL: draft + bicubic (decode_image before)": pil_draft_bicubic,
    "PIL: draft + torch bilinear AA": pil_draft_torch,
    "torchvision decode_jpeg + PIL bicubic": turbo_pil_bicubic,
    "torchvision decode_jpeg + torch bilinear AA": turbo_torch,
    "**decode_image** (chosen)": decode_image,
}


def reference_decode(data: bytes, size: int) -> np.ndarray:
    """(size, size, 3) float64: full PIL decode, antialiased bicubic resize in float64."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        x = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float64)).permute(2, 0, 1)[None]
    out = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return out[0].permute(1, 2, 0).clamp(0, 255).numpy()


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    mse = float(np.mean((image.astype(np.float64) - reference) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


@dataclass
class Rate:
    """Images (pairs) per second of wall time and of this process's CPU time. On a
    shared machine other processes stretch the wall time, not the CPU time: with
    torch on one thread, ``cpu`` is the rate of a worker that has a core to itself."""

    wall: float
    cpu: float


def timed(step: Callable[[], int], seconds: float) -> Rate:
    """Repeat ``step`` (which returns the images it handled) for about ``seconds``."""
    n, wall, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - wall < seconds:
        n += step()
    return Rate(n / (time.perf_counter() - wall), n / max(time.process_time() - cpu, 1e-9))


def images_per_s(fn: Callable[[bytes, int], np.ndarray], images: List[bytes], size: int, seconds: float) -> Rate:
    def step() -> int:
        for data in images:
            fn(data, size)
        return len(images)

    return timed(step, seconds)


def reader_pairs_per_s(tar: str, size: int, seconds: float) -> Rate:
    """The per-worker path over the tar: read members, decode_image the jpg, decode the caption."""
    def step() -> int:
        n = 0
        for raw in iter_raw_samples(tar):
            decode_image(member(raw, "jpg"), size)
            member(raw, "txt").decode("utf-8")
            n += 1
        return n

    return timed(step, seconds)


@dataclass
class WebDecodeRow:
    name: str
    rate: Rate
    vs_baseline: float  # CPU-time rates
    psnr_mean: float  # dB against reference_decode; nan: not a decoder (the end-to-end row)
    psnr_min: float

    def line(self) -> str:
        quality = "-" if np.isnan(self.psnr_mean) else f"{self.psnr_mean:.1f} / {self.psnr_min:.1f}"
        return (f"| {self.name} | {self.rate.cpu:,.0f} | {1e3 / self.rate.cpu:.2f} | {self.vs_baseline:.2f}x | "
                f"{self.rate.wall:,.0f} | {quality} |")


WEB_TABLE = ("| decoder | pairs/s/worker (CPU time) | CPU ms/image | vs baseline | pairs/s (wall time) "
             "| PSNR dB vs float reference (mean / min) |\n|---|---|---|---|---|---|")


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def web_decode_rows(tar: str, size: int, seconds: float, rounds: int = 3,
                    quality_images: int = 20) -> List[WebDecodeRow]:
    """Every decoder of DECODERS on the tar's JPEGs, then the end-to-end reader path, in
    this thread with torch on one thread (one loader worker). The candidates take turns
    for ``rounds`` rounds of seconds / rounds each and keep their best round, so that a
    burst of load from another process on the machine does not favour one of them."""
    images = read_jpegs(tar)
    if not images:
        raise ValueError(f"{tar}: no 'jpg' members; give an img2dataset tar written with "
                         "output_format=webdataset and encode_format=jpg")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        refs = [reference_decode(d, size) for d in images[:quality_images]]
        best = {name: Rate(0.0, 0.0) for name in DECODERS}
        for _ in range(rounds):
            for name, fn in DECODERS.items():
                r = images_per_s(fn, images, size, seconds / rounds)
                best[name] = Rate(max(best[name].wall, r.wall), max(best[name].cpu, r.cpu))
        runs = [reader_pairs_per_s(tar, size, seconds / rounds) for _ in range(rounds)]
        reader = Rate(max(r.wall for r in runs), max(r.cpu for r in runs))
    finally:
        torch.set_num_threads(threads)
    rows = []
    for name, fn in DECODERS.items():
        scores = [psnr(fn(d, size), r) for d, r in zip(images, refs)]
        rows.append(WebDecodeRow(name, best[name], best[name].cpu / best[BASELINE].cpu, float(np.mean(scores)),
                                 float(np.min(scores))))
    rows.append(WebDecodeRow("tar read + decode_image + caption (end to end)", reader, reader.cpu / best[BASELINE].cpu,
                             float("nan"), float("nan")))
    return rows


def web_section(args) -> List[WebDecodeRow]:
    """``--web``: build (or read ``--web-tar``) and print the decoder table."""
    import PIL
    import torchvision

    with tempfile.TemporaryDirectory() as tmp:
        tar = args.web_tar
        if not tar:
            print(f"writing {args.web_images} web-style JPEGs to {tmp}/00000.tar ...", flush=True)
            tar = build_web_tar(tmp, args.web_images)
        images = read_jpegs(tar)
        from PIL import Image

        sides = []
        for data in images:
            with Image.open(io.BytesIO(data)) as im:
                sides.append(im.size)
        rows = web_decode_rows(tar, args.image_size, args.seconds)
    w, h = np.array(sides).T
    print(f"\n== web-style image decoding to {args.image_size} px, one loader worker (1 thread) ==\n"
          f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs); Pillow {PIL.__version__}, torchvision "
          f"{torchvision.__version__}, torch {torch.__version__}\n"
          f"{len(images)} JPEGs, {w.min()}..{w.max()} x {h.min()}..{h.max()} px, "
          f"{np.mean([len(d) for d in images]) / 1024:.1f} KiB mean; best of 3 rounds of {args.seconds / 3:.2f} s "
          f"per decoder; rates from this\n"
          f"process's CPU time (wall-time rates drop when other processes share the cores)\n\n{WEB_TABLE}")
    for r in rows:
        print(r.line(), flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regions", default="", help="a region shard folder to measure")
    parser.add_argument("--jpg", default="", help="a jpg shard folder to measure")
    parser.add_argument("--images", type=int, default=1000, help="images per built fixture")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--seconds", type=float, default=8.0, help="time per measurement (0: no throughput)")
    parser.add_argument("--web", action="store_true",
                        help="measure web-style JPEG decoding (decoder candidates vs plain PIL) instead")
    parser.add_argument("--web-images", type=int, default=500, help="--web: JPEGs in the built img2dataset tar")
    parser.add_argument("--web-tar", default="", help="--web: an img2dataset tar (jpg members) to measure instead")
    parser.add_argument("--window", type=int, default=4096,
                        help="caption order: keys per window (the image queue's size)")
    parser.add_argument("--world-size", type=int, default=1, help="caption order: ranks sharing the stream")
    parser.add_argument("--order", choices=("spread", "grouped", "both"), default=DataConfig.caption_order,
                        help="caption order: data.caption_order to measure ('both': one table each)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.web:
        web_section(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        cases = [(f"regions {f}", "regions", f) for f in [args.regions] if f] + \
                [(f"jpg {f}", "jpg", f) for f in [args.jpg] if f]
        if not cases:
            print(f"building fixtures ({args.images} images each) in {tmp} ...", flush=True)
            cases = build_fixtures(tmp, args.images)
        if args.seconds > 0:
            print("\n" + TABLE)
            for r in rates(cases, args.batch_size, args.seconds, args.image_size):
                print(row(*r), flush=True)
        orders = ("spread", "grouped") if args.order == "both" else (args.order,)
        for label, mode, folder in cases:
            for order in orders:
                cfg = DataConfig(train_shards=folder, mode=mode, caption_order=order)
                stats = order_stats(cfg, args.batch_size, args.window, args.world_size)
                print(f"\ncaption order of {label}: data.caption_order={order}, {stats.images:,} images, "
                      f"{args.world_size} rank(s) x batch {args.batch_size}, one epoch of {stats.keys:,} keys\n")
                print(stats.table(), flush=True)
