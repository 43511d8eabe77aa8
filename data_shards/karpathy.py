"""Karpathy split JSON + image folder -> ``jpg`` shards (raw-image mode).

``dataset_coco.json`` / ``dataset_flickr30k.json``: ``images[i]`` has
``filename``, ``filepath`` (COCO only: train2014 / val2014), ``split``
(train / restval / val / test) and ``sentences[j].raw``. COCO's ``restval``
goes to train, as in every paper that uses these splits. The JPEG bytes are
stored unchanged; each one is decoded once here so an unreadable file is
reported at build time, not in the middle of a training run.
"""
from __future__ import annotations

import argparse
import io
import json
import os
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

from PIL import Image

from data_shards.writer import BuildError, SampleEncoder, ShardWriter, sample_json
from user_dist.data_format import CAPTIONS_PER_IMAGE

# Karpathy split names that make up each output split.
SPLIT_PARTS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",), "restval": ("restval",)}
DEFAULT_SHARD_SIZE = 1000


def load_karpathy(json_path: str) -> Dict[str, Any]:
    try:
        with open(json_path) as f:
            data = json.load(f)
        data["images"]
    except FileNotFoundError:
        raise BuildError(f"Karpathy JSON not found: {json_path}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise BuildError(f"{json_path}: not a Karpathy split file (expected {{'images': [...]}}): {exc!r}") from exc
    return data


def five_captions(entry: Dict[str, Any], json_path: str, first_five: bool) -> List[str]:
    captions = [s["raw"] for s in entry.get("sentences", [])]
    if len(captions) == CAPTIONS_PER_IMAGE or (first_five and len(captions) > CAPTIONS_PER_IMAGE):
        return captions[:CAPTIONS_PER_IMAGE]
    hint = " (pass --first-five to keep the first 5, as the standard protocol does)" \
        if len(captions) > CAPTIONS_PER_IMAGE else ""
    raise BuildError(f"{json_path}: image '{entry.get('filename')}' has {len(captions)} captions, "
                     f"expected {CAPTIONS_PER_IMAGE}{hint}")


def read_image(entry: Dict[str, Any], images_dir: str) -> Tuple[str, bytes]:
    """Find and read the image file; decode it once to catch unreadable files."""
    candidates = [os.path.join(images_dir, entry.get("filepath", ""), entry["filename"]),
                  os.path.join(images_dir, entry["filename"])]
    path = next((p for p in candidates if os.path.isfile(p)), None)
    if path is None:
        tried = " or ".join(dict.fromkeys(candidates))
        raise BuildError(f"missing image file for '{entry['filename']}': tried {tried}; check --images")
    with open(path, "rb") as f:
        data = f.read()
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (32, 32))  # JPEG DCT scaling: a cheap but complete decode
            im.convert("RGB").load()
    except Exception as exc:
        raise BuildError(f"unreadable image file {path}: {exc}; replace it or remove it from the JSON") from exc
    return path, data


def iter_split(data: Dict[str, Any], split: str) -> Iterator[Dict[str, Any]]:
    parts = SPLIT_PARTS.get(split, (split,))
    return (entry for entry in data["images"] if entry.get("split") in parts)


def build_karpathy(json_path: str, images_dir: str, split: str, out_dir: str, *,
                   shard_size: int = DEFAULT_SHARD_SIZE, first_five: bool = False, overwrite: bool = False,
                   source: str = "", build_info: Optional[Mapping[str, Any]] = None) -> str:
    """Write the jpg shards of one split; returns the manifest path.

    build_info: extra entries for the manifest's "build" record (who made the input).
    """
    data = load_karpathy(json_path)
    source = source or str(data.get("dataset", os.path.splitext(os.path.basename(json_path))[0]))
    entries = list(iter_split(data, split))
    if not entries:
        found = sorted({str(e.get("split")) for e in data["images"]})
        raise BuildError(f"{json_path}: no image in split '{split}'; splits found: {', '.join(found)}")
    build = {"command": "karpathy", "json": os.path.abspath(json_path), "split": split, "first_five": first_five,
             **(build_info or {})}
    encoder = SampleEncoder(["jpg"], {})
    with ShardWriter(out_dir, split=split, source=source, encoder=encoder, shard_size=shard_size,
                     build=build, overwrite=overwrite) as writer:
        for index, entry in enumerate(entries):
            captions = five_captions(entry, json_path, first_five)
            _, jpg = read_image(entry, images_dir)
            image_id = entry.get("cocoid", entry.get("imgid", index))
            writer.add(f"{source}_{split}_{index:06d}", sample_json(image_id, captions, split, source),
                       {"jpg": jpg})
    return os.path.join(out_dir, "manifest.json")


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("karpathy", help="Karpathy JSON + image folder -> jpg shards",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True, help="dataset_coco.json / dataset_flickr30k.json")
    p.add_argument("--images", required=True, help="image root (COCO: holds train2014/ and val2014/)")
    p.add_argument("--split", required=True, help="train (includes restval) | val | test")
    p.add_argument("--out", required=True, help="output folder for this split's shards")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="images per shard")
    p.add_argument("--first-five", action="store_true", help="keep the first 5 captions of images with more")
    p.add_argument("--source", default="", help="source name in keys/metadata (default: the JSON's 'dataset')")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    p.set_defaults(run=lambda a: print(build_karpathy(a.json, a.images, a.split, a.out, shard_size=a.shard_size,
                                                      first_five=a.first_five, overwrite=a.overwrite,
                                                      source=a.source)))
