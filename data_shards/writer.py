"""Atomic shard writing: numbered tar files, then a manifest with checksums.

A shard is written under a hidden temporary name and renamed to its final
``.tar`` name only once complete, and ``manifest.json`` is written last, so a
crash never leaves something that looks complete: a folder without a manifest
is an unfinished build. Tar members are written with fixed metadata so the
same input gives byte-identical shards (and checksums).

Each manifest shard entry also records ``num_captions`` (captions in the
shard) and ``max_captions`` (most captions of one of its samples), so a reader
can size steps and buffers without opening the shard; manifests written before
these fields stay valid (a reader then assumes 5 captions per sample).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from typing import Any, BinaryIO, Dict, List, Mapping, Optional, Sequence

import numpy as np

from data_shards import TOOL_VERSION
from user_dist.atomic import AtomicFile, atomic_json, is_temporary
from user_dist.data_format import (FORMAT, KNOWN_MEMBERS, MANIFEST, ShardError, ShardInfo, check_array,
                                   decode_json, iter_raw_samples, valid_caption_ids)


class BuildError(ValueError):
    """A problem with a builder's input or output; the message says what to do."""


def encode_npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def encode_json(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True).encode("utf-8")


def sample_json(image_id: Any, captions: Sequence[str], split: str, source: str,
                caption_ids: Optional[Sequence[Any]] = None) -> Dict[str, Any]:
    """A sample's json member; caption_ids (one per caption, same order) when the source has them."""
    meta = {"image_id": image_id, "captions": list(captions), "split": split, "source": source}
    if caption_ids is not None:
        meta["caption_ids"] = list(caption_ids)
    return meta


def prepare_output(out_dir: str, overwrite: bool) -> None:
    """Create out_dir; refuse one that already holds shards unless overwrite (then clear them)."""
    os.makedirs(out_dir, exist_ok=True)
    ours = [n for n in os.listdir(out_dir) if n.endswith(".tar") or n == MANIFEST or is_temporary(n)]
    if ours and not overwrite:
        state = "a complete build" if MANIFEST in ours else "an unfinished build (no manifest.json)"
        raise BuildError(f"{out_dir} already holds shards from {state}: {len(ours)} files, e.g. "
                         f"{sorted(ours)[0]}; pass --overwrite to replace them, or choose another --out")
    for name in ours:
        os.remove(os.path.join(out_dir, name))


class _HashingFile:
    """A write-only file object that hashes and counts what passes through."""

    def __init__(self, f: BinaryIO):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0
        self.discard = False  # set when aborting: closing the tar stream then writes nothing

    def write(self, data: bytes) -> int:
        if self.discard:
            return len(data)
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)


class TarShard:
    """One tar shard being written under a temporary name (user_dist.atomic).

    ``finish()`` renames it into place, durably, and returns its ShardInfo;
    ``abort()`` (or an exception inside ``with``) removes the temporary file.
    """

    def __init__(self, path: str):
        self.path = path
        self._out = AtomicFile(path, "wb")
        self._hashing = _HashingFile(self._out.file)
        self._tar = tarfile.open(fileobj=self._hashing, mode="w|", format=tarfile.USTAR_FORMAT)
        self.num_samples = 0

    def add(self, key: str, members: Mapping[str, bytes]) -> None:
        for ext in sorted(members):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(members[ext]), 0, 0o444
            self._tar.addfile(info, io.BytesIO(members[ext]))
        self.num_samples += 1

    def finish(self) -> ShardInfo:
        self._tar.close()
        self._out.commit()
        return ShardInfo(os.path.basename(self.path), self.num_samples, self._hashing.sha.hexdigest(),
                         self._hashing.size)

    def abort(self) -> None:
        self._hashing.discard = True
        self._tar.close()
        self._out.discard()

    def __enter__(self) -> "TarShard":
        return self

    def __exit__(self, exc_type, *_: Any) -> None:
        if exc_type is not None:
            self.abort()


@dataclass
class CaptionCounts:
    """Caption totals of one shard, as recorded in its manifest entry."""

    num_captions: int = 0  # captions of all its samples
    max_captions: int = 0  # most captions of one sample

    def add(self, n: int) -> None:
        self.num_captions += n
        self.max_captions = max(self.max_captions, n)


def count_captions(path: str) -> CaptionCounts:
    """The caption counts of a finished shard, read from its samples' json members."""
    counts = CaptionCounts()
    for raw in iter_raw_samples(path):
        counts.add(len(decode_json(raw)["captions"]))
    return counts


def write_manifest(out_dir: str, *, split: str, source: str, members: Sequence[str],
                   features: Mapping[str, Mapping[str, Any]], shards: Sequence[ShardInfo],
                   build: Mapping[str, Any], captions: Optional[Sequence[CaptionCounts]] = None) -> str:
    """Write out_dir/manifest.json atomically; returns its path.

    captions: one CaptionCounts per shard (same order); None writes entries without the counts.
    """
    if captions is not None and len(captions) != len(shards):
        raise ValueError(f"{len(captions)} caption counts for {len(shards)} shards")
    entries = [{"name": s.name, "num_samples": s.num_samples, "sha256": s.sha256, "bytes": s.bytes} for s in shards]
    for entry, counts in zip(entries, captions or ()):
        entry.update(num_captions=counts.num_captions, max_captions=counts.max_captions)
    manifest = {
        "format": FORMAT, "tool_version": TOOL_VERSION, "split": split, "source": source,
        "num_samples": sum(s.num_samples for s in shards), "members": sorted(members),
        "features": {k: dict(v) for k, v in sorted(features.items())},
        "shards": entries,
        "build": dict(build),
    }
    path = os.path.join(out_dir, MANIFEST)
    atomic_json(path, manifest)
    return path


class SampleEncoder:
    """Checks every sample against one declared layout and encodes its members.

    Args:
        features: .npy member -> {"dtype", "shape"} (None in shape = variable size).
        members: every member a sample must have besides 'json' (e.g. ['regions.npy']).
    """

    def __init__(self, members: Sequence[str], features: Mapping[str, Mapping[str, Any]]):
        unknown = set(members) - set(KNOWN_MEMBERS)
        if unknown:
            raise ValueError(f"unknown shard members {sorted(unknown)}; known: {KNOWN_MEMBERS}")
        self.members = sorted(set(members) | {"json"})
        self.features = {k: dict(v) for k, v in features.items()}

    def encode(self, key: str, meta: Mapping[str, Any], arrays: Mapping[str, Any]) -> Dict[str, bytes]:
        """meta: the sample's json dict; arrays: member -> ndarray (.npy) or bytes (jpg)."""
        if "." in key or "/" in key:
            raise BuildError(f"sample key '{key}' must not contain '.' or '/' (WebDataset splits keys at dots)")
        if not meta["captions"]:
            raise BuildError(f"sample '{key}' (image {meta['image_id']!r}): no captions; every image needs at least one")
        if "caption_ids" in meta and not valid_caption_ids(meta["caption_ids"], len(meta["captions"])):
            raise BuildError(f"sample '{key}' (image {meta['image_id']!r}): caption ids {meta['caption_ids']!r} are "
                             f"not {len(meta['captions'])} distinct ints or strings, one per caption")
        got = sorted(set(arrays) | {"json"})
        if got != self.members:
            raise BuildError(f"sample '{key}' has members {got}, expected {self.members}")
        out = {"json": encode_json(dict(meta))}
        for ext, value in arrays.items():
            if ext.endswith(".npy"):
                try:
                    check_array(value, self.features[ext], f"sample '{key}' member '{ext}'")
                except ShardError as exc:
                    raise BuildError(str(exc)) from exc
                out[ext] = encode_npy(value)
            else:
                out[ext] = bytes(value)
        return out


class ShardWriter:
    """Writes one split's samples into ``{prefix}-NNNNN.tar`` shards and a manifest.

    Use as a context manager: on success the manifest is written at exit; on
    an exception the unfinished shard is removed and no manifest is written.
    """

    def __init__(self, out_dir: str, *, split: str, source: str, encoder: SampleEncoder, shard_size: int,
                 build: Mapping[str, Any], overwrite: bool = False, prefix: Optional[str] = None):
        if shard_size <= 0:
            raise BuildError(f"--shard-size must be positive, got {shard_size}")
        prepare_output(out_dir, overwrite)
        self.out_dir, self.split, self.source = out_dir, split, source
        self.encoder, self.shard_size, self.build = encoder, shard_size, build
        self.prefix = prefix or f"{source}-{split}"
        self.shards: List[ShardInfo] = []
        self.captions: List[CaptionCounts] = []  # one per shard, the current one included
        self._current: Optional[TarShard] = None
        self._caption_keys: Dict[str, str] = {}  # caption id -> sample key: ids must be unique in a split

    def add(self, key: str, meta: Mapping[str, Any], arrays: Mapping[str, Any]) -> None:
        members = self.encoder.encode(key, meta, arrays)
        for cid in meta.get("caption_ids", ()):
            other = self._caption_keys.setdefault(str(cid), key)
            if other != key:
                raise BuildError(f"caption id {cid!r} appears in samples '{other}' and '{key}' of split "
                                 f"'{self.split}'; caption ids must be unique (check the ids' source)")
        if self._current is None:
            name = f"{self.prefix}-{len(self.shards):05d}.tar"
            self._current = TarShard(os.path.join(self.out_dir, name))
            self.captions.append(CaptionCounts())
        self._current.add(key, members)
        self.captions[-1].add(len(meta["captions"]))
        if self._current.num_samples == self.shard_size:
            self.shards.append(self._current.finish())
            self._current = None

    def close(self) -> str:
        if self._current is not None:
            self.shards.append(self._current.finish())
            self._current = None
        if not self.shards:
            raise BuildError(f"no samples were written to {self.out_dir}; check the input split name")
        return write_manifest(self.out_dir, split=self.split, source=self.source, members=self.encoder.members,
                              features=self.encoder.features, shards=self.shards, build=self.build,
                              captions=self.captions)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, *_: Any) -> None:
        if exc_type is None:
            self.close()
            return
        # A failed build removes what it wrote, so a rerun does not need --overwrite.
        if self._current is not None:
            self._current.abort()
        for shard in self.shards:
            os.remove(os.path.join(self.out_dir, shard.name))
