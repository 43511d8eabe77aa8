"""The synthetic world as web-style shards: img2dataset's WebDataset layout, one caption per image.

``python -m data_shards synthetic --out DIR --web`` writes, besides the
project-format shards, two foreign-format sources (no manifest):

    DIR/web/train/00000.tar, 00000_stats.json, 00001.tar, ...   JPEG images
    DIR/web/extra/00000.tar, 00000_stats.json, ...             JPEG, PNG and WebP images

as img2dataset writes them: a sample is ``KEY.jpg`` (or ``.png`` / ``.webp``),
``KEY.txt`` (its one caption, utf-8) and ``KEY.json`` ({"key", "caption",
"url", "width", "height", "original_width", "original_height", "status",
...}); ``NNNNN_stats.json`` counts the shard's samples ("successes"). The
tars are written by ``webdataset.TarWriter``, not by this project's writer,
so that the readers are tested on tars they did not write.

KEY is img2dataset's 9 digits: shard number * 10000 + position. The extra
source numbers its shards from EXTRA_SHARD_BASE in keys (as a second
img2dataset run started at that shard would), so keys, and the image ids a
reader takes from them, never collide between the two sources.

Scenes, pictures and captions come from data_shards.synthetic: an image is a
scene drawn at 256..512 px per side (the 64x64 layout stretched to the
canvas, so a square resize shows what the jpg splits show) and its caption
is one of the synthetic captions, so a model trained here can be validated
on DIR/shards/jpg/val. Everything is a deterministic function of the seed and
the sizes; each source folder is written under a temporary name and renamed
into place when complete.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Dict, List, Mapping

import numpy as np

from data_shards.synthetic import caption, draw_scene, encode_image, make_scene
from data_shards.writer import BuildError, encode_json

WEB_VERSION = 1
SOURCES = ("train", "extra")
# Random streams distinct from the splits' (synthetic.SPLIT_SEED uses 1..3).
SOURCE_SEED = {"train": 4, "extra": 5}
KEYS_PER_SHARD = 10_000  # img2dataset's key: shard * 10**4 + position (its default of 10000 samples per shard)
EXTRA_SHARD_BASE = 50_000
SIDE = (256, 512)  # each side of an image, in pixels, inclusive
# The extra source's image formats (img2dataset --encode_format), drawn per sample.
EXTRA_FORMATS = (("jpg", "JPEG"),) * 4 + (("png", "PNG"), ("webp", "WEBP"))
PARAMS_FILE = ".synthetic_web.json"  # hidden: not matched by the shards' brace pattern
DEFAULT_IMAGES = {"train": 5_000, "extra": 1_000}
DEFAULT_SHARD_SIZE = 500
URL = "http://synthetic.invalid/{source}/{key}.{ext}"


def sample(source: str, key: str, rng: np.random.Generator) -> Dict[str, bytes]:
    """One img2dataset sample: {"jpg" | "png" | "webp": image, "txt": caption, "json": metadata}."""
    scene = make_scene(rng)
    text = caption(scene, rng)
    width, height = (int(v) for v in rng.integers(SIDE[0], SIDE[1] + 1, 2))
    ext, fmt = EXTRA_FORMATS[int(rng.integers(len(EXTRA_FORMATS)))] if source == "extra" else ("jpg", "JPEG")
    image = encode_image(draw_scene(scene, rng, width, height), fmt)
    meta = {"key": key, "caption": text, "url": URL.format(source=source, key=key, ext=ext), "status": "success",
            "error_message": None, "width": width, "height": height, "original_width": width,
            "original_height": height, "exif": None, "sha256": hashlib.sha256(image).hexdigest()}
    return {ext: image, "txt": text.encode("utf-8"), "json": encode_json(meta)}


def stats(count: int) -> Dict[str, Any]:
    """A shard's ``_stats.json`` as img2dataset writes it, every sample a success (times fixed: reproducible)."""
    return {"count": count, "successes": count, "failed_to_download": 0, "failed_to_resize": 0,
            "duration": 0.0, "start_time": 0.0, "end_time": 0.0, "status_dict": {"success": count}}


def write_shard(folder: str, source: str, shard: int, count: int, seed: int) -> None:
    """folder/NNNNN.tar and NNNNN_stats.json; the shard's samples depend on (seed, source, shard) only."""
    import webdataset  # slow to import (it loads torch): only when writing

    rng = np.random.default_rng([seed, SOURCE_SEED[source], shard])
    first_key = ((EXTRA_SHARD_BASE if source == "extra" else 0) + shard) * KEYS_PER_SHARD
    with open(os.path.join(folder, f"{shard:05d}.tar"), "wb") as f:
        # Fixed mtime (and webdataset's fixed user, group and mode): the same seed gives the same bytes.
        with webdataset.TarWriter(f, encoder=False, mtime=0) as tar:
            for position in range(count):
                key = f"{first_key + position:09d}"
                tar.write({"__key__": key, **sample(source, key, rng)})
    with open(os.path.join(folder, f"{shard:05d}_stats.json"), "w") as f:
        json.dump(stats(count), f, indent=4)


def shard_counts(images: int, shard_size: int) -> List[int]:
    return [min(shard_size, images - start) for start in range(0, images, shard_size)]


def build_source(folder: str, source: str, params: Mapping[str, Any], *, skip_existing: bool,
                 overwrite: bool) -> str:
    """Write one source folder, or keep it (skip_existing, same params); returns the folder."""
    if os.path.exists(folder):
        if skip_existing and not overwrite:
            built = _read_params(folder)
            if built != dict(params):
                raise BuildError(f"{folder} was built with other parameters ({built}) than asked ({dict(params)}); "
                                 "pass --overwrite to rebuild it or choose another --out")
            return folder
        if not overwrite:
            raise BuildError(f"{folder} already exists; pass --skip-existing to keep it, --overwrite to replace "
                             "it, or choose another --out")
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    _remove_unfinished(parent, source)
    import webdataset  # noqa: F401  imported once here, before the workers fork
    # Written whole under a temporary name, renamed when complete: a killed build leaves no folder
    # that looks complete (its temporary folder is removed by the next build).
    tmp = tempfile.mkdtemp(prefix=f".{source}.tmp-", dir=parent)
    try:
        counts = shard_counts(int(params["images"]), int(params["shard_size"]))
        # Shards are independent (each has its own random stream): one process per core.
        with ProcessPoolExecutor(min(len(counts), os.cpu_count() or 1),
                                 mp_context=multiprocessing.get_context("fork")) as pool:
            for done in [pool.submit(write_shard, tmp, source, shard, count, int(params["seed"]))
                         for shard, count in enumerate(counts)]:
                done.result()
        with open(os.path.join(tmp, PARAMS_FILE), "w") as f:
            json.dump(dict(params), f, sort_keys=True)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        if os.path.exists(folder):
            shutil.rmtree(folder)
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _read_params(folder: str) -> Any:
    try:
        with open(os.path.join(folder, PARAMS_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None  # not built by this command


def _remove_unfinished(parent: str, source: str) -> None:
    for name in os.listdir(parent):
        if name.startswith(f".{source}.tmp-"):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def build_web(out: str, *, seed: int = 0, images: Mapping[str, int] = DEFAULT_IMAGES,
              shard_size: int = DEFAULT_SHARD_SIZE, skip_existing: bool = False, overwrite: bool = False) -> List[str]:
    """Write out/train and out/extra (img2dataset layout); returns the two folders."""
    if not 1 <= shard_size <= KEYS_PER_SHARD:
        raise BuildError(f"--web-shard-size must be in 1..{KEYS_PER_SHARD} (img2dataset keys hold "
                         f"{KEYS_PER_SHARD} per shard), got {shard_size}")
    if any(images.get(s, 0) < 1 for s in SOURCES):
        raise BuildError(f"web image counts must be positive, got {dict(images)}")
    if -(-images["train"] // shard_size) > EXTRA_SHARD_BASE:
        raise BuildError(f"{images['train']} train images make more than {EXTRA_SHARD_BASE} shards: their keys "
                         "would collide with the extra source's; raise --web-shard-size")
    folders = []
    for source in SOURCES:
        params = {"generator_version": WEB_VERSION, "seed": seed, "source": source, "images": images[source],
                  "shard_size": shard_size}
        folders.append(build_source(os.path.join(out, source), source, params, skip_existing=skip_existing,
                                    overwrite=overwrite))
    return folders


def brace_pattern(folder: str) -> str:
    """The folder's shards as a brace pattern, e.g. 'DIR/web/train/{00000..00009}.tar'."""
    shards = sorted(n for n in os.listdir(folder) if n.endswith(".tar"))
    if len(shards) == 1:
        return os.path.join(folder, shards[0])
    return os.path.join(folder, f"{{{shards[0][:-4]}..{shards[-1][:-4]}}}.tar")

