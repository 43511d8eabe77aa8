"""SCAN / VSE-infinity precomputed features -> ``regions.npy`` shards.

Layout under --root, for one split name (train, dev, test, testall ...):

    {split}_ims.npy    (N, 36, 2048) float region features (bottom-up attention)
    {split}_caps.txt   5N lines: the captions of image k are lines 5k..5k+4
    {split}_ids.txt    N lines (one id per image) or 5N lines (one per caption)

--caption-ids FILE (optional): 5N lines, the id of each caption line of
{split}_caps.txt in the same order (e.g. COCO's annotation ids, which the
ECCV Caption / CxC metrics need); recorded as each sample's caption_ids.

The .npy is memory-mapped and read one image at a time: COCO train is about
33 GB and never has to fit in memory. Features are stored as float16.
"""
from __future__ import annotations

import argparse
import os
import re
from typing import List

import numpy as np

from data_shards.writer import BuildError, SampleEncoder, ShardWriter, sample_json
from user_dist.data_format import CAPTIONS_PER_IMAGE

DEFAULT_SHARD_SIZE = 1000


def read_lines(path: str) -> List[str]:
    if not os.path.isfile(path):
        raise BuildError(f"missing file {path} (the precomp layout needs {{split}}_ims.npy, _caps.txt, _ids.txt)")
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\r\n") for line in f]


def image_ids(ids: List[str], n: int, path: str) -> List[str]:
    """One id per image, from a file with one id per image or one per caption."""
    if len(ids) == n:
        return ids
    if len(ids) == CAPTIONS_PER_IMAGE * n:
        per_image = ids[::CAPTIONS_PER_IMAGE]
        for k, first in enumerate(per_image):
            group = ids[CAPTIONS_PER_IMAGE * k:CAPTIONS_PER_IMAGE * (k + 1)]
            if any(i != first for i in group):
                raise BuildError(f"{path}: lines {5 * k + 1}-{5 * k + 5} (captions of image {k}) carry different "
                                 f"ids {group}; expected one id per image")
        return per_image
    raise BuildError(f"{path}: {len(ids)} lines, expected N={n} (one per image) or 5N={5 * n}")


def parse_id(text: str) -> object:
    return int(text) if text.strip().isdigit() else text.strip()


def caption_ids_file(path: str, n_captions: int, caps_path: str) -> List[object]:
    """One id per caption line of caps_path, from path (ints where they are digits)."""
    lines = read_lines(path)
    if len(lines) != n_captions:
        raise BuildError(f"--caption-ids {path}: {len(lines)} lines, but {caps_path} has {n_captions} captions; "
                         "the file needs one id per caption line, in the same order")
    empty = next((k for k, line in enumerate(lines) if not line.strip()), None)
    if empty is not None:
        raise BuildError(f"--caption-ids {path}: line {empty + 1} is empty; every caption needs an id")
    return [parse_id(line) for line in lines]


def build_precomp(root: str, split: str, out_dir: str, *, shard_size: int = DEFAULT_SHARD_SIZE,
                  overwrite: bool = False, source: str = "", caption_ids: str = "") -> str:
    """Write the region shards of one split; returns the manifest path.

    caption_ids: optional file of 5N caption ids in the caps file's order.
    """
    ims_path = os.path.join(root, f"{split}_ims.npy")
    caps_path = os.path.join(root, f"{split}_caps.txt")
    ids_path = os.path.join(root, f"{split}_ids.txt")
    if not os.path.isfile(ims_path):
        raise BuildError(f"missing file {ims_path}; --root must hold {split}_ims.npy, {split}_caps.txt, "
                         f"{split}_ids.txt")
    try:
        ims = np.load(ims_path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise BuildError(f"{ims_path}: not a plain numeric .npy array ({exc})") from exc
    if ims.ndim != 3 or not np.issubdtype(ims.dtype, np.floating):
        raise BuildError(f"{ims_path}: shape {ims.shape} dtype {ims.dtype}, expected (N, regions, dim) floats")
    n, _, dim = ims.shape
    captions = read_lines(caps_path)
    if len(captions) != CAPTIONS_PER_IMAGE * n:
        raise BuildError(f"mismatched N: {ims_path} has N={n} images but {caps_path} has {len(captions)} "
                         f"lines (expected 5N={CAPTIONS_PER_IMAGE * n})")
    ids = image_ids(read_lines(ids_path), n, ids_path)
    cap_ids = caption_ids_file(caption_ids, len(captions), caps_path) if caption_ids else None
    source = re.sub(r"[^A-Za-z0-9_-]", "_", source or os.path.basename(os.path.abspath(root)))
    build = {"command": "precomp", "root": os.path.abspath(root), "split": split}
    if caption_ids:
        build["caption_ids"] = os.path.abspath(caption_ids)
    encoder = SampleEncoder(["regions.npy"], {"regions.npy": {"dtype": "float16", "shape": [None, int(dim)]}})
    with ShardWriter(out_dir, split=split, source=source, encoder=encoder, shard_size=shard_size,
                     build=build, overwrite=overwrite) as writer:
        for k in range(n):
            regions = np.asarray(ims[k], dtype=np.float16)  # reads one image from the memory map
            if not np.isfinite(regions).all():
                raise BuildError(f"{ims_path}: image {k} (id {ids[k]}) has values that are not finite in float16")
            rows = slice(CAPTIONS_PER_IMAGE * k, CAPTIONS_PER_IMAGE * (k + 1))
            meta = sample_json(parse_id(ids[k]), captions[rows], split, source,
                               cap_ids[rows] if cap_ids is not None else None)
            writer.add(f"{source}_{split}_{k:06d}", meta, {"regions.npy": regions})
    return os.path.join(out_dir, "manifest.json")


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("precomp", help="SCAN/VSE-infinity precomp features -> region shards",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="folder with {split}_ims.npy, {split}_caps.txt, {split}_ids.txt")
    p.add_argument("--split", required=True, help="file prefix: train, dev, test, testall ...")
    p.add_argument("--out", required=True, help="output folder for this split's shards")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="images per shard")
    p.add_argument("--source", default="", help="source name in keys/metadata (default: the --root folder name)")
    p.add_argument("--caption-ids", default="", metavar="FILE",
                   help="one id per caption line of {split}_caps.txt, same order (e.g. COCO annotation ids)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    p.set_defaults(run=lambda a: print(build_precomp(a.root, a.split, a.out, shard_size=a.shard_size,
                                                     overwrite=a.overwrite, source=a.source,
                                                     caption_ids=a.caption_ids)))
