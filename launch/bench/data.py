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
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Iterator, List, Tuple

import numpy as np
import torch

from user_dist.config import DataConfig, TextEncoderConfig
from user_dist.data import SampleReader, train_loader
from user_dist.data_format import load_manifest
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regions", default="", help="a region shard folder to measure")
    parser.add_argument("--jpg", default="", help="a jpg shard folder to measure")
    parser.add_argument("--images", type=int, default=1000, help="images per built fixture")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--seconds", type=float, default=8.0, help="time per measurement (0: no throughput)")
    parser.add_argument("--window", type=int, default=4096,
                        help="caption order: keys per window (the image queue's size)")
    parser.add_argument("--world-size", type=int, default=1, help="caption order: ranks sharing the stream")
    parser.add_argument("--order", choices=("spread", "grouped", "both"), default=DataConfig.caption_order,
                        help="caption order: data.caption_order to measure ('both': one table each)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
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
