"""Karpathy split JSON + image folder -> ``jpg`` shards (raw-image mode).

``dataset_coco.json`` / ``dataset_flickr30k.json``: ``images[i]`` has
``filename``, ``filepath`` (COCO only: train2014 / val2014), ``split``
(train / restval / val / test) and ``sentences[j].raw`` (and ``.sentid``).
COCO's ``restval`` goes to train, as in every paper that uses these splits.

Captions: an image keeps all its sentences, in order (any count >= 1); with
``--first-five`` it keeps the first 5 and an image with fewer stops the build
(the COCO 5K/1K and F30K evaluation protocols score exactly 5 per image).

Caption ids: each sample records ``caption_ids``, Karpathy's ``sentid`` of
every caption it keeps (when every one of them has one). With ``--coco-captions
captions_train2014.json,captions_val2014.json`` it records COCO's own
annotation ids instead, matched by image id and caption text (lower case,
letters and digits only, so spacing, case and punctuation differences do not
matter); a caption without a match stops the build, which then lists how many
and the first ones with their image ids: a split never mixes id kinds. The JPEG bytes are
stored unchanged; each one is decoded once here so an unreadable file is
reported at build time, not in the middle of a training run.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
from collections import defaultdict
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from PIL import Image

from data_shards.writer import BuildError, SampleEncoder, ShardWriter, sample_json
from user_dist.data_format import CAPTIONS_PER_IMAGE

# Karpathy split names that make up each output split.
SPLIT_PARTS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",), "restval": ("restval",)}
DEFAULT_SHARD_SIZE = 1000
UNMATCHED_SHOWN = 5
log = logging.getLogger(__name__)


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


def image_id(entry: Dict[str, Any], index: int) -> Any:
    """COCO's cocoid, else Karpathy's imgid, else the image's position in its split (own data)."""
    return entry.get("cocoid", entry.get("imgid", index))


def kept_sentences(entry: Dict[str, Any], index: int, json_path: str, first_five: bool) -> List[Dict[str, Any]]:
    """The sentence records ({"raw", "sentid", ...}) the image keeps: all of them, or the first 5."""
    sentences = list(entry.get("sentences", []))
    where = f"{json_path}: image '{entry.get('filename')}' (id {image_id(entry, index)!r})"
    if first_five:
        if len(sentences) < CAPTIONS_PER_IMAGE:
            raise BuildError(f"{where} has {len(sentences)} captions; --first-five needs at least "
                             f"{CAPTIONS_PER_IMAGE} (the COCO/F30K protocols score exactly {CAPTIONS_PER_IMAGE}): "
                             "fix the JSON or leave out --first-five to keep every caption")
        return sentences[:CAPTIONS_PER_IMAGE]
    if not sentences:
        raise BuildError(f"{where} has no captions; every image needs at least one (give it a caption or "
                         "remove it from the JSON)")
    return sentences


def sentids(sentences: Sequence[Mapping[str, Any]]) -> Optional[List[Any]]:
    """Karpathy's sentids of the sentences, or None when one has none (own data)."""
    ids = [s.get("sentid") for s in sentences]
    return None if any(i is None for i in ids) else ids


def caption_key(text: str) -> str:
    """A caption as matched against COCO's annotations: lower case, runs of letters and digits."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


class CocoCaptionIds:
    """COCO annotation ids by image id and caption text, from COCO's captions_*.json files.

    Each file: {"annotations": [{"image_id": int, "id": int, "caption": str}, ...], ...}.
    """

    def __init__(self, paths: Sequence[str]):
        self.by_image: Dict[int, List[Tuple[str, int]]] = defaultdict(list)
        for path in paths:
            try:
                with open(path) as f:
                    annotations = json.load(f)["annotations"]
                for a in annotations:
                    self.by_image[int(a["image_id"])].append((caption_key(a["caption"]), int(a["id"])))
            except FileNotFoundError:
                raise BuildError(f"--coco-captions file not found: {path}") from None
            except (ValueError, KeyError, TypeError) as exc:
                raise BuildError(f"{path}: not a COCO captions file (expected {{'annotations': [{{'image_id', 'id', "
                                 f"'caption'}}, ...]}}, e.g. captions_val2014.json): {exc!r}") from exc

    def match(self, image_id: int, captions: Sequence[str]) -> List[Optional[int]]:
        """The annotation id of each caption (None: no match); each annotation is used once."""
        free = list(self.by_image.get(int(image_id), ()))
        ids: List[Optional[int]] = []
        for text in captions:
            key = caption_key(text)
            hit = next((k for k, (ann_key, _) in enumerate(free) if ann_key == key), None)
            ids.append(None if hit is None else free.pop(hit)[1])
        return ids


def coco_caption_ids(entries: Sequence[Dict[str, Any]], json_path: str, first_five: bool,
                     coco: CocoCaptionIds) -> List[List[int]]:
    """COCO annotation ids of every entry's kept captions; BuildError listing the captions without one."""
    out, unmatched, differ = [], [], 0
    for index, entry in enumerate(entries):
        if "cocoid" not in entry:
            raise BuildError(f"{json_path}: image '{entry.get('filename')}' has no 'cocoid'; --coco-captions needs "
                             "COCO's Karpathy JSON (dataset_coco.json)")
        sentences = kept_sentences(entry, index, json_path, first_five)
        ids = coco.match(entry["cocoid"], [s["raw"] for s in sentences])
        unmatched += [(entry["cocoid"], s["raw"]) for s, i in zip(sentences, ids) if i is None]
        differ += sum(i is not None and i != s.get("sentid") for s, i in zip(sentences, ids))
        out.append(ids)
    if unmatched:
        shown = "; ".join(f"image {i}: {c!r}" for i, c in unmatched[:UNMATCHED_SHOWN])
        raise BuildError(f"{len(unmatched)} caption(s) have no match in --coco-captions (same image id, same text "
                         f"up to case, spacing and punctuation), e.g. {shown}. Pass both captions_train2014.json "
                         "and captions_val2014.json, or leave out --coco-captions to record Karpathy's sentids")
    log.info("matched %d captions to COCO annotation ids (%d differ from the JSON's sentid)",
             sum(len(i) for i in out), differ)
    return out


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
                   source: str = "", build_info: Optional[Mapping[str, Any]] = None,
                   coco_captions: Sequence[str] = ()) -> str:
    """Write the jpg shards of one split; returns the manifest path.

    build_info: extra entries for the manifest's "build" record (who made the input).
    coco_captions: COCO captions_*.json files: record COCO annotation ids (else sentids).
    """
    data = load_karpathy(json_path)
    source = source or str(data.get("dataset", os.path.splitext(os.path.basename(json_path))[0]))
    entries = list(iter_split(data, split))
    if not entries:
        found = sorted({str(e.get("split")) for e in data["images"]})
        raise BuildError(f"{json_path}: no image in split '{split}'; splits found: {', '.join(found)}")
    # Matched before any shard is written: an unmatched caption stops the build at once.
    coco_ids = coco_caption_ids(entries, json_path, first_five, CocoCaptionIds(coco_captions)) \
        if coco_captions else None
    build = {"command": "karpathy", "json": os.path.abspath(json_path), "split": split, "first_five": first_five,
             "caption_ids": "coco" if coco_captions else "sentid", **(build_info or {})}
    if coco_captions:
        build["coco_captions"] = [os.path.abspath(p) for p in coco_captions]
    encoder = SampleEncoder(["jpg"], {})
    with ShardWriter(out_dir, split=split, source=source, encoder=encoder, shard_size=shard_size,
                     build=build, overwrite=overwrite) as writer:
        for index, entry in enumerate(entries):
            sentences = kept_sentences(entry, index, json_path, first_five)
            _, jpg = read_image(entry, images_dir)
            ids = coco_ids[index] if coco_ids is not None else sentids(sentences)
            writer.add(f"{source}_{split}_{index:06d}",
                       sample_json(image_id(entry, index), [s["raw"] for s in sentences], split, source, ids),
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
    p.add_argument("--first-five", action="store_true",
                   help="keep exactly the first 5 captions of every image and refuse images with fewer (the COCO "
                        "5K/1K and F30K protocols need 5); default: keep all of an image's captions")
    p.add_argument("--source", default="", help="source name in keys/metadata (default: the JSON's 'dataset')")
    p.add_argument("--coco-captions", default="", metavar="FILES",
                   help="comma list of COCO's captions_train2014.json,captions_val2014.json: record COCO annotation "
                        "ids as caption_ids (default: the JSON's sentids)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    p.set_defaults(run=lambda a: print(build_karpathy(
        a.json, a.images, a.split, a.out, shard_size=a.shard_size, first_five=a.first_five, overwrite=a.overwrite,
        source=a.source, coco_captions=[p for p in a.coco_captions.split(",") if p])))
