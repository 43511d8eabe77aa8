"""What a configured shard location names: a :class:`Split`, its shards and their counts.

A location (``data.train_shards``, ``val_shards``, ``test_shards`` or a
``data.train_sources`` entry's ``shards``) is one of:

- a folder holding ``manifest.json`` (``python -m data_shards ...``): counts,
  checksums and members from the manifest (layout ``"manifest"``);
- tar paths or URLs in the img2dataset layout (user_dist/web_shards.py), no
  manifest (layout ``"web"``): a brace pattern (``web/{00000..00999}.tar``), a
  URL (``http(s)://``, ``s3://``, ``gs://``, ``pipe:COMMAND``;
  user_dist/remote.py), several of them joined by ``::`` (open_clip's
  notation). Sample counts come, in this order, from img2dataset's
  ``NAME_stats.json`` beside every tar, from the count the config gives
  (``data.train_num_samples`` / a source's ``num_samples``, shared evenly
  over the shards), or (evaluation splits only, ``count="read"``) from
  reading the shards. Without any, :class:`ShardError` says which to give.
"""
from __future__ import annotations

import glob
import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from user_dist.data_format import (MANIFEST, Manifest, ShardError, iter_raw_samples,
                                   load_manifest)
from user_dist.remote import is_url, local_path, read_small
from user_dist.web_shards import count_from_stats, stats_url

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    """One tar of a split: where it is, how many samples and (image, caption) pairs it holds."""

    url: str              # a path or a URL (user_dist/remote.py)
    num_samples: int      # images (the config's even share when the count is an estimate)
    num_pairs: int        # captions, one training pair each
    max_captions: int     # the most captions of one sample
    sha256: str = ""      # manifests only
    source: int = 0       # index of its source in data.train_sources (0 for a single location)



@dataclass(frozen=True)
class Split:
    """The shards a location names, with what they hold.

    layout: "manifest" (our format) or "web" (img2dataset). counted: where the counts come from:
    "manifest", "stats", "config" (an even share of a total the config gives) or "read".
    """

    spec: str
    layout: str
    shards: Tuple[Shard, ...]
    counted: str
    manifest: Optional[Manifest] = None

    @classmethod
    def of_manifest(cls, manifest: Manifest, source: int = 0) -> "Split":
        """A manifest folder's Split (counts, captions and checksums from the manifest)."""
        shards = tuple(Shard(manifest.shard_path(s), s.num_samples, s.num_captions, s.max_captions, s.sha256, source)
                       for s in manifest.shards)
        return cls(manifest.folder, "manifest", shards, "manifest", manifest)

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def num_pairs(self) -> int:
        return sum(s.num_pairs for s in self.shards)

    @property
    def max_captions(self) -> int:
        return max((s.max_captions for s in self.shards), default=0)

    @property
    def members(self) -> Tuple[str, ...]:
        return self.manifest.members if self.manifest is not None else ("image", "txt", "json")

    def has(self, member: str) -> bool:
        """Whether samples carry a member; 'jpg' means any encoded image for web shards."""
        if self.manifest is not None:
            return self.manifest.has(member)
        return member in ("jpg", "txt")

    @property
    def features(self) -> Dict[str, Dict[str, Any]]:
        return self.manifest.features if self.manifest is not None else {}

    def feature_dim(self, member: str) -> int:
        assert self.manifest is not None, "web shards hold no feature arrays"
        return self.manifest.feature_dim(member)

    def fingerprint(self) -> str:
        """A digest of what the shards are: checksums for a manifest, URLs and counts for web shards."""
        if self.layout == "manifest":
            return hashlib.sha256("".join(s.sha256 for s in self.shards).encode()).hexdigest()
        text = "\n".join(f"{s.url} {s.num_samples}" for s in self.shards)
        return hashlib.sha256(text.encode()).hexdigest()


def is_manifest_folder(spec: str) -> bool:
    return "::" not in spec and not is_url(spec) and os.path.isdir(spec)


def expand(spec: str) -> List[str]:
    """The tar paths / URLs of a location: '::'-joined parts, each brace-expanded (webdataset's
    expand_urls, as open_clip reads --train-data)."""
    from webdataset.shardlists import expand_urls

    return [u for u in expand_urls(spec) if u.strip()]


def check_location(spec: str, key: str) -> None:
    """Cheap start-up check that a location can be what it says, without reading any shard
    (URLs are not contacted).

    Raises:
        ShardError: naming the config key, e.g. a folder without manifest.json or local tars missing.
    """
    if not spec:
        raise ShardError(f"{key} is empty; give a shard folder, a brace pattern of tars or a URL (docs/data.md)")
    if is_manifest_folder(spec):
        if not os.path.isfile(os.path.join(spec, MANIFEST)):
            raise ShardError(f"{key} points to '{spec}', a folder with no {MANIFEST}; build shards with "
                             "`python -m data_shards ...` (docs/data.md), or give its tars as a pattern, e.g. "
                             f"'{spec.rstrip('/')}/{{00000..00009}}.tar'")
        return
    urls = expand(spec)
    if not urls:
        raise ShardError(f"{key} '{spec}' names no shard")
    if urls == [spec] and not is_url(spec) and not os.path.exists(spec) and not spec.endswith(".tar"):
        raise ShardError(f"{key} points to '{spec}', which does not exist; give a shard folder holding a "
                         f"{MANIFEST} (`python -m data_shards ...`, docs/data.md) or tars in the img2dataset layout "
                         "(a brace pattern or URL)")
    missing = [u for u in urls if local_path(u) is not None and not os.path.isfile(local_path(u))]
    if missing:
        near = sorted(glob.glob(os.path.join(os.path.dirname(local_path(missing[0])) or ".", "*.tar")))[:3]
        raise ShardError(f"{key} '{spec}': {len(missing)} of {len(urls)} shard(s) do not exist, e.g. {missing[0]}"
                         + (f" (that folder holds e.g. {', '.join(near)})" if near else "")
                         + "; fix the path or the brace pattern")


def open_split(spec: str, key: str = "data.train_shards", *, num_samples: int = 0, count: str = "stats",
               source: int = 0, timeout: float = 60.0, retries: int = 3, warn_ignored_count: bool = True) -> Split:
    """Resolve a location into a Split (module docstring).

    num_samples: the location's sample count when the config gives one (0: find it); stats files win
        (with a warning unless not warn_ignored_count: a resampled epoch's size is no count).
    count: "stats" (a manifest, *_stats.json or the config's count, else an error) or "read" (also
    count by reading the tars: evaluation splits, where positions must be exact).
    Raises:
        ShardError: naming `key`, e.g. no count available, a bad stats file, missing shards.
    """
    check_location(spec, key)
    if is_manifest_folder(spec):
        manifest = load_manifest(spec)
        if num_samples:
            raise ShardError(f"{key} '{spec}' has a manifest, which gives its {manifest.num_samples} samples; "
                             "a sample count for it is for web shards only (remove it; to train for fewer steps "
                             "set train.max_steps)")
        return Split.of_manifest(manifest, source)
    urls = expand(spec)
    counts_or_none = [_stats_count(u, timeout, retries) for u in urls]
    missing = [u for u, c in zip(urls, counts_or_none) if c is None]
    if not missing:
        if num_samples and warn_ignored_count and num_samples != sum(counts_or_none):
            log.warning("%s: the img2dataset stats files count %d samples; they are used, not the %d that %s "
                        "gives", spec, sum(counts_or_none), num_samples, count_key(key))
        return Split(spec, "web", _web_shards(urls, counts_or_none, source), "stats")
    if num_samples:
        if num_samples < len(urls):
            raise ShardError(f"{key} '{spec}': {num_samples} samples for {len(urls)} shards; give the count of "
                             "all shards together (at least one sample per shard)")
        counts = [num_samples * (i + 1) // len(urls) - num_samples * i // len(urls) for i in range(len(urls))]
        return Split(spec, "web", _web_shards(urls, counts, source), "config")
    if count == "read":
        counts = [c if c is not None else count_samples(u, timeout, retries) for u, c in zip(urls, counts_or_none)]
        return Split(spec, "web", _web_shards(urls, counts, source), "read")
    raise ShardError(f"{key} '{spec}': {len(missing)} of {len(urls)} shard(s) have no img2dataset stats file beside "
                     f"them (e.g. {stats_url(missing[0]) or missing[0]}), so the sample count is unknown; give it "
                     f"with {count_key(key)} (the samples of all its shards together)")


def count_key(key: str) -> str:
    """The config key that gives a location's sample count."""
    if key.startswith("data.train_sources"):
        return f"{key.rsplit('.', 1)[0]}.num_samples"
    return "data.train_num_samples" if key == "data.train_shards" else f"{key} (counted by reading for evaluation)"


def _web_shards(urls: Sequence[str], counts: Sequence[int], source: int) -> Tuple[Shard, ...]:
    return tuple(Shard(u, c, c, 1, "", source) for u, c in zip(urls, counts))


def _stats_count(url: str, timeout: float, retries: int) -> Optional[int]:
    stats = stats_url(url)
    if stats is None:
        return None
    try:
        data = read_small(stats, timeout, retries)
    except OSError as exc:
        raise ShardError(f"{stats}: cannot read this stats file ({exc})") from exc
    return None if data is None else count_from_stats(data, stats)


def count_samples(url: str, timeout: float = 60.0, retries: int = 3) -> int:
    """Samples in a tar, by reading it through (raises ShardError on a truncated or corrupt tar)."""
    return sum(1 for _ in iter_raw_samples(url, timeout, retries))


def describe(split: Split) -> str:
    """One line for logs: what a location resolved to."""
    how = {"manifest": "from its manifest", "stats": "from img2dataset stats files",
           "config": "as configured (an even share per shard)", "read": "counted by reading"}[split.counted]
    captions = "1 caption each" if split.max_captions == 1 else \
        f"{split.num_pairs} captions, up to {split.max_captions} per image"
    return (f"{split.spec}: {len(split.shards)} {split.layout} shard(s), {split.num_samples} samples {how}, "
            f"{captions}")



def read_web_ids(spec: str, timeout: float = 60.0, retries: int = 3) -> List[Any]:
    """The image ids of a web location's samples in split order (json key, else sample key)."""
    from user_dist.web_shards import web_metadata

    return [web_metadata(raw)[0] for url in expand(spec) for raw in iter_raw_samples(url, timeout, retries)]
