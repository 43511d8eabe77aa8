"""Foreign WebDataset shards in the img2dataset layout, read as they are.

A sample KEY of such a shard holds (img2dataset's output, also CC3M / CC12M /
LAION-style web data)::

    KEY.jpg | KEY.jpeg | KEY.png | KEY.webp   the image bytes (the first present, in this order)
    KEY.txt                                   one caption, utf-8
    KEY.json                                  optional metadata; its "key" is the sample's id

There is no manifest. Beside each ``NAME.tar``, img2dataset writes
``NAME_stats.json`` whose ``successes`` is the number of samples in the tar:
:func:`stats_url` / :func:`count_from_stats` read it.
"""
from __future__ import annotations

import json
from typing import Any, List, Optional, Tuple

from user_dist.data_format import RawSample, ShardError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
LAYOUT_MEMBERS = (*IMAGE_EXTS, "txt", "json")


def image_member(raw: RawSample) -> str:
    """The extension of the sample's image member.

    Raises:
        ShardError: the sample has none of jpg/jpeg/png/webp.
    """
    for ext in IMAGE_EXTS:
        if ext in raw.members:
            return ext
    raise ShardError(f"{raw.shard}: sample '{raw.key}' has no image member (one of {', '.join(IMAGE_EXTS)}; it has: "
                     f"{', '.join(sorted(raw.members)) or 'nothing'})")


def web_metadata(raw: RawSample) -> Tuple[Any, List[str]]:
    """(image id, [caption]) of a web sample: the id is the json's "key" when there is one, else the
    sample key; the caption is the txt member, stripped.

    Raises:
        ShardError: no txt member, text that is not utf-8 or is empty, json that does not parse.
    """
    if "txt" not in raw.members:
        raise ShardError(f"{raw.shard}: sample '{raw.key}' has no 'txt' caption member (it has: "
                         f"{', '.join(sorted(raw.members)) or 'nothing'})")
    try:
        caption = raw.members["txt"].decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise ShardError(f"{raw.shard}: sample '{raw.key}' member 'txt' is not utf-8 text ({exc})") from exc
    if not caption:
        raise ShardError(f"{raw.shard}: sample '{raw.key}' member 'txt' is empty")
    image_id: Any = raw.key.rpartition("/")[2]
    if "json" in raw.members:
        try:
            meta = json.loads(raw.members["json"])
        except ValueError as exc:
            raise ShardError(f"{raw.shard}: sample '{raw.key}' member 'json' does not parse ({exc})") from exc
        if isinstance(meta, dict) and isinstance(meta.get("key"), (str, int)) and not isinstance(meta["key"], bool) \
                and str(meta["key"]):
            image_id = meta["key"]
    return image_id, [caption]


def stats_url(shard_url: str) -> Optional[str]:
    """img2dataset's stats file of a shard ('.../00012.tar' -> '.../00012_stats.json'); None for a
    'pipe:' command or a name that does not end in '.tar'."""
    if shard_url.startswith("pipe:") or not shard_url.endswith(".tar"):
        return None
    return shard_url[:-len(".tar")] + "_stats.json"


def count_from_stats(data: bytes, where: str) -> int:
    """The sample count of a stats file ("successes": the samples img2dataset wrote into the tar).

    Raises:
        ShardError: naming the file, when it does not parse or has no non-negative "successes".
    """
    try:
        count = json.loads(data)["successes"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ShardError(f"{where}: not an img2dataset stats file with a 'successes' count ({exc!r}); delete it "
                         "or give the count with data.train_num_samples") from exc
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise ShardError(f"{where}: 'successes' is {count!r}, not a sample count")
    return count
