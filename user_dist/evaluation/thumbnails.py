"""Pictures for the report page: small JPEG thumbnails of chosen split images.

The report shows images by their position in the evaluated split. Their
pictures come from image shards (jpg shards, or web tars in the img2dataset
layout with jpg / jpeg / png / webp members: user_dist/sources.py):

- the evaluated shards themselves when they hold images (read by
  position: the split order is the shards' order);
- otherwise a jpg shard folder given by the user (``--images-from``), for
  example the jpg shards of the same split beside the region shards that
  were evaluated. Images are matched by ``image_id`` (the sample JSON), so the
  two folders may differ in order, sharding and coverage; an id it lacks
  simply has no picture.

Only the images the page shows are read and encoded, each as a JPEG data URI
of at most THUMBNAIL_PX pixels a side, so the page stays one small file.
"""
from __future__ import annotations

import base64
import io
import itertools
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, Mapping, Optional, Tuple

from user_dist.data_format import RawSample, ShardError, decode_json, image_id_to_int, iter_raw_samples, member
from user_dist.sources import Split, open_split
from user_dist.web_shards import image_member, web_metadata

THUMBNAIL_PX = 112  # longest side, pixels
JPEG_QUALITY = 80


@dataclass
class ReportImages:
    """Pictures of split positions for the report, and where they came from.

    uris: split position -> "data:image/jpeg;base64,..." (positions without a picture are absent).
    source: the jpg shard folder they were read from (named on the page).
    """

    source: str
    uris: Dict[int, str] = field(default_factory=dict)


def jpeg_data_uri(jpg: bytes, px: int = THUMBNAIL_PX) -> str:
    """JPEG bytes -> a data URI of the picture shrunk to at most ``px`` a side (never enlarged)."""
    from PIL import Image

    with Image.open(io.BytesIO(jpg)) as im:
        im.draft("RGB", (px, px))  # JPEG DCT scaling: decode a large photo at about the size needed
        im = im.convert("RGB")
        im.thumbnail((px, px), Image.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _raw_at(split: Split, positions: Iterable[int]) -> Iterator[Tuple[int, RawSample]]:
    """(position, raw sample) for the wanted split positions, opening only the shards that hold them."""
    wanted = sorted(set(positions))
    starts = list(itertools.accumulate([s.num_samples for s in split.shards], initial=0))
    for k, shard in enumerate(split.shards):
        inside = [p for p in wanted if starts[k] <= p < starts[k + 1]]
        if not inside:
            continue
        want = set(inside)
        for i, raw in enumerate(iter_raw_samples(shard.url), start=starts[k]):
            if i in want:
                yield i, raw
                want.discard(i)
                if not want:
                    break


def _readable(raw: RawSample) -> Optional[str]:
    """The sample's picture as a data URI, None when it has none or it is not a readable image."""
    try:
        return jpeg_data_uri(member(raw, "jpg" if "jpg" in raw.members else image_member(raw)))
    except Exception:  # noqa: BLE001 - a missing or damaged picture only costs the page one thumbnail
        return None


def _check_jpg(split: Split, what: str) -> None:
    if not split.has("jpg"):
        raise ShardError(f"{split.spec}: {what} must be image shards, but these hold "
                         f"{', '.join(split.members)}; point it at the jpg shard folder of the split")


def _split(spec: str) -> Split:
    return open_split(spec, "the report's image shards", count="read")


def _image_id(split: Split, raw: RawSample) -> int:
    return image_id_to_int(web_metadata(raw)[0] if split.layout == "web" else decode_json(raw)["image_id"])


def images_by_position(split: Split, positions: Iterable[int]) -> ReportImages:
    """Pictures of image shards of the evaluated split itself, read by split position."""
    _check_jpg(split, "the evaluated shards")
    out = ReportImages(split.spec)
    for i, raw in _raw_at(split, positions):
        uri = _readable(raw)
        if uri is not None:
            out.uris[i] = uri
    return out


def image_ids(split: Split, positions: Iterable[int]) -> Dict[int, int]:
    """Split position -> image id (as ``image_id_to_int`` makes it), from the samples' JSON."""
    return {i: _image_id(split, raw) for i, raw in _raw_at(split, positions)}


def images_by_id(images_dir: str, ids: Mapping[int, int]) -> ReportImages:
    """Pictures from another jpg shard folder, matched by image id.

    Args:
        images_dir: a jpg shard folder (manifest.json).
        ids: split position -> image id of the evaluated split.
    The folder is read in order until every wanted id is found (all of it when some are absent).
    """
    split = _split(images_dir)
    _check_jpg(split, "--images-from")
    positions: Dict[int, list] = {}
    for pos, image_id in ids.items():
        positions.setdefault(image_id, []).append(pos)
    out = ReportImages(images_dir)
    for shard in split.shards:
        for raw in iter_raw_samples(shard.url):
            try:
                image_id = _image_id(split, raw)
            except (ShardError, TypeError):
                continue  # an unreadable sample of the picture folder: its image stays without a picture
            if image_id in positions:
                uri = _readable(raw)
                for pos in positions.pop(image_id):
                    if uri is not None:
                        out.uris[pos] = uri
            if not positions:
                return out
    return out


def report_images(split_dir: str, positions: Iterable[int], images_from: str = "") -> Optional[ReportImages]:
    """The pictures the report shows, or None when there are none at hand.

    ``images_from`` (a jpg shard folder) wins; else the evaluated shards when they are jpg shards.
    """
    positions = sorted(set(positions))
    split = _split(split_dir)
    if images_from:
        return images_by_id(images_from, image_ids(split, positions))
    if split.has("jpg"):
        return images_by_position(split, positions)
    return None
