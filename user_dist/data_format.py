"""The shard format: manifest, tar members, sample decoding and validation.

One WebDataset sample per image. Members of sample KEY (KEY has no dot):

    KEY.json            {"image_id", "captions": [n str], "caption_ids": [n int|str], "split", "source"}
    KEY.regions.npy     float16 (R, F) region features        (region shards)
    KEY.boxes.npy       float32 (R, 4) normalised x1 y1 x2 y2  (optional)
    KEY.jpg             the image bytes                        (jpg shards)
    KEY.clip_image.npy  float16 (D,)   frozen-CLIP image feature (optional)
    KEY.clip_text.npy   float16 (n, D) frozen-CLIP caption features (optional)

n >= 1 captions per image (5 for COCO and Flickr30K, which the COCO/F30K
evaluation protocols require; any count for a user's own data).

``caption_ids`` (the captions' ids, e.g. COCO's annotation ids, in the
captions' order) is optional: shards built before it existed lack it, and
only the extended COCO metrics (ECCV Caption, CxC, PMRP) need it.
Each split folder holds the shards and ``manifest.json`` (see
:func:`load_manifest`). Sample order inside a split is the source order.
This module is shared by the builders (``data_shards``) and the readers
(``user_dist.data``) so that both sides agree on one definition.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tarfile
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

MANIFEST = "manifest.json"
FORMAT = "user-dist-shards"
# Captions per image of the COCO / Flickr30K protocols (and of shards built
# before the count became variable). A sample may hold any count >= 1.
CAPTIONS_PER_IMAGE = 5
# Members a sample may carry; 'json' is always there.
KNOWN_MEMBERS = ("json", "regions.npy", "boxes.npy", "jpg", "clip_image.npy", "clip_text.npy")

log = logging.getLogger(__name__)


class ShardError(ValueError):
    """Bad shard content; the message names the shard, the sample key and what to do."""


@dataclass(frozen=True)
class ShardInfo:
    name: str
    num_samples: int
    sha256: str
    bytes: int
    # Captions in the shard and the most of one sample; manifests written before
    # the count became variable hold exactly 5 per sample.
    num_captions: int = -1
    max_captions: int = CAPTIONS_PER_IMAGE

    def __post_init__(self):
        if self.num_captions < 0:
            object.__setattr__(self, "num_captions", CAPTIONS_PER_IMAGE * self.num_samples)


@dataclass(frozen=True)
class Manifest:
    """The parsed ``manifest.json`` of one split folder."""

    folder: str
    split: str
    source: str
    members: Tuple[str, ...]
    # member -> {"dtype": str, "shape": [int | None, ...]} for every .npy member
    features: Dict[str, Dict[str, Any]]
    shards: Tuple[ShardInfo, ...]
    tool_version: str
    build: Dict[str, Any] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def num_captions(self) -> int:
        return sum(s.num_captions for s in self.shards)

    def shard_path(self, shard: ShardInfo) -> str:
        return os.path.join(self.folder, shard.name)

    def has(self, member: str) -> bool:
        return member in self.members

    def feature_dim(self, member: str) -> int:
        """Last dimension of an .npy member (F of regions, D of CLIP features)."""
        return int(self.features[member]["shape"][-1])


def load_manifest(folder: str) -> Manifest:
    """Read and check ``folder/manifest.json``; raise ShardError saying what to do."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise ShardError(f"{folder}: no {MANIFEST} here; build the shards with `python -m data_shards ...` "
                         "(docs/data.md) or fix the path")
    try:
        with open(path) as f:
            raw = json.load(f)
        if raw.get("format") != FORMAT:
            raise KeyError(f"format is {raw.get('format')!r}, expected {FORMAT!r}")
        shards = tuple(ShardInfo(s["name"], int(s["num_samples"]), s["sha256"], int(s["bytes"]),
                                 int(s.get("num_captions", -1)), int(s.get("max_captions", CAPTIONS_PER_IMAGE)))
                       for s in raw["shards"])
        manifest = Manifest(folder=folder, split=raw["split"], source=raw["source"],
                            members=tuple(raw["members"]), features=dict(raw["features"]), shards=shards,
                            tool_version=str(raw["tool_version"]), build=dict(raw.get("build", {})))
    except (ValueError, KeyError, TypeError) as exc:
        raise ShardError(f"{path}: not a valid shard manifest ({exc!r}); rebuild the folder with data_shards") from exc
    missing = [s.name for s in manifest.shards if not os.path.isfile(manifest.shard_path(s))]
    if missing:
        raise ShardError(f"{folder}: {len(missing)} shard(s) listed in {MANIFEST} are missing, e.g. {missing[0]}; "
                         "copy the complete folder or rebuild it")
    return manifest


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_checksums(manifest: Manifest) -> List[str]:
    """Names of the shards whose sha256 differs from the manifest (empty = all good)."""
    return [s.name for s in manifest.shards if sha256_file(manifest.shard_path(s)) != s.sha256]


# --------------------------------------------------------------------------- reading tars


@dataclass
class RawSample:
    """The undecoded members of one sample, and where it came from (for error messages)."""

    shard: str
    key: str
    members: Dict[str, bytes]


def split_member_name(name: str) -> Tuple[str, str]:
    """'dir/KEY.regions.npy' -> ('dir/KEY', 'regions.npy'), the WebDataset convention."""
    head, _, base = name.rpartition("/")
    key, dot, ext = base.partition(".")
    if not dot:
        return name, ""
    return (f"{head}/{key}" if head else key), ext


_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)


def _octal(field: bytes) -> int:
    if field[:1] == b"\x80":  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    return int(field.rstrip(b" \0") or b"0", 8)


def _read_full(f: BinaryIO, n: int) -> bytes:
    """n bytes, or fewer only at the end of the stream (a socket or pipe may return less per read)."""
    data = f.read(n)
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = f.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def iter_tar_members(f: BinaryIO, want: Optional[Callable[[str], bool]] = None) -> Iterator[Tuple[str, bytes]]:
    """(name, bytes) of the regular files of a tar stream, in order.

    want: when given, only members whose name it accepts are read and yielded;
    the others are skipped with a seek (``f`` must be seekable).

    A small reader of the ustar/pax/GNU formats: several times faster than
    ``tarfile`` for many small members, and strict: a bad header checksum, a
    member cut short or a missing end-of-archive marker raise
    ``tarfile.ReadError`` (a shard copied only in part is never read as whole).
    """
    long_name: Optional[bytes] = None
    while True:
        header = _read_full(f, _BLOCK)
        if len(header) < _BLOCK:
            raise tarfile.ReadError("the file ends without the end-of-archive marker (truncated)")
        if header == _ZERO_BLOCK:
            return
        stored = _octal(header[148:156])
        if stored != sum(header[:148]) + 8 * 32 + sum(header[156:]):
            raise tarfile.ReadError("bad header checksum (corrupt data)")
        size, kind = _octal(header[124:136]), header[156:157]
        if want is not None and kind in (b"0", b"\0", b"7"):
            name = _member_name(header, long_name)
            if not want(name):
                end = f.seek(size + (-size % _BLOCK), os.SEEK_CUR)
                if end > os.fstat(f.fileno()).st_size:
                    raise tarfile.ReadError("a member is cut short (truncated)")
                long_name = None
                continue
        data = _read_full(f, size)
        if len(data) < size:
            raise tarfile.ReadError("a member is cut short (truncated)")
        _read_full(f, -size % _BLOCK)
        if kind == b"L":  # GNU long name of the next member
            long_name = data.rstrip(b"\0")
        elif kind == b"x":  # pax extended header: "LEN path=NAME\n" records
            for record in data.decode("utf-8").splitlines():
                _, _, field = record.partition(" ")
                if field.startswith("path="):
                    long_name = field[5:].encode("utf-8")
        elif kind in (b"0", b"\0", b"7"):
            yield _member_name(header, long_name), data
            long_name = None
        # other kinds (directories, links, global pax headers) carry no sample data


def _member_name(header: bytes, long_name: Optional[bytes]) -> str:
    name = header[:100].rstrip(b"\0")
    prefix = header[345:500].rstrip(b"\0")
    if header[257:262] == b"ustar" and prefix:
        name = prefix + b"/" + name
    return (long_name or name).decode("utf-8")


def iter_raw_samples(path: str, timeout: float = 60.0, retries: int = 3) -> Iterator[RawSample]:
    """Group the members of a tar shard (a path or a URL: user_dist/remote.py) into samples, in file order.

    Raises ShardError naming the shard and the last good key when the tar is
    truncated or corrupt, or a remote read fails (a partly read sample is never yielded).
    """
    from user_dist.remote import open_shard

    current: Optional[RawSample] = None
    last_key = "<start of file>"
    try:
        with open_shard(path, timeout, retries) as f:
            for name, data in iter_tar_members(f):
                key, ext = split_member_name(name)
                if current is not None and current.key != key:
                    last_key = current.key
                    yield current
                    current = None
                if current is None:
                    current = RawSample(path, key, {})
                if ext in current.members:
                    raise ShardError(f"{path}: sample '{key}' has member '{ext}' twice; rebuild this shard")
                current.members[ext] = data
    except (tarfile.TarError, OSError, ValueError) as exc:
        if isinstance(exc, ShardError):
            raise
        raise ShardError(f"{path}: truncated, corrupt or unreadable tar after sample '{last_key}' ({exc}); "
                         "rebuild or re-copy this shard (or set data.on_error=skip)") from exc
    if current is not None:
        yield current


# --------------------------------------------------------------------------- decoding


def decode_json(raw: RawSample) -> Dict[str, Any]:
    data = member(raw, "json")
    try:
        meta = json.loads(data)
        captions = meta["captions"]
        meta["image_id"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ShardError(f"{raw.shard}: sample '{raw.key}' member 'json' is not valid sample metadata ({exc!r})") from exc
    if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
        raise ShardError(f"{raw.shard}: sample '{raw.key}' member 'json' must hold a list of one or more caption "
                         f"strings, found {captions!r:.200}")
    if "caption_ids" in meta and not valid_caption_ids(meta["caption_ids"], len(captions)):
        raise ShardError(f"{raw.shard}: sample '{raw.key}' member 'json' has caption_ids {meta['caption_ids']!r:.200}; "
                         f"expected {len(captions)} distinct ints or strings, one per caption (rebuild the shard)")
    return meta


def valid_caption_ids(ids: Any, count: int) -> bool:
    """True for a list of `count` distinct ids, each an int (not a bool) or a non-empty string."""
    return (isinstance(ids, list) and len(ids) == count and len(set(map(str, ids))) == len(ids)
            and all((isinstance(i, int) and not isinstance(i, bool)) or (isinstance(i, str) and i) for i in ids))


@dataclass(frozen=True)
class SplitIds:
    """The ids of a split in split order (the order the evaluation encodes it).

    image_ids: N ids as the shards hold them; caption_ids: 5N ids (image k's at
    5k..5k+4), or None when any sample has none (shards built before caption
    ids were recorded).
    """

    image_ids: List[Any]
    caption_ids: Optional[List[Any]]


def read_split_ids(folder: str) -> SplitIds:
    """Every sample's image id and caption ids, reading only the ``json`` members
    (the other members are skipped with a seek, never read). ``folder`` may also be
    any location of web shards (user_dist/sources.py): their ids are the json keys or
    sample keys, and they have no caption ids."""
    if not os.path.isdir(folder):
        from user_dist.sources import read_web_ids

        return SplitIds(read_web_ids(folder), None)
    manifest = load_manifest(folder)
    image_ids: List[Any] = []
    caption_ids: Optional[List[Any]] = []
    for shard in manifest.shards:
        path = manifest.shard_path(shard)
        count = 0
        try:
            with open(path, "rb") as f:
                for name, data in iter_tar_members(f, want=lambda n: split_member_name(n)[1] == "json"):
                    meta = decode_json(RawSample(path, split_member_name(name)[0], {"json": data}))
                    image_ids.append(meta["image_id"])
                    count += 1
                    if caption_ids is not None:
                        if "caption_ids" in meta:
                            caption_ids.extend(meta["caption_ids"])
                        else:
                            caption_ids = None
        except (tarfile.TarError, OSError) as exc:
            raise ShardError(f"{path}: truncated or corrupt tar ({exc}); rebuild or re-copy this shard") from exc
        if count != shard.num_samples:
            raise ShardError(f"{path}: {count} samples, the manifest says {shard.num_samples}; rebuild or re-copy "
                             "this shard")
    return SplitIds(image_ids, caption_ids)


def member(raw: RawSample, ext: str) -> bytes:
    if ext not in raw.members:
        raise ShardError(f"{raw.shard}: sample '{raw.key}' has no '{ext}' member (it has: "
                         f"{', '.join(sorted(raw.members)) or 'nothing'}); rebuild the shard with the right "
                         "data_shards command or pick the matching data.mode")
    return raw.members[ext]


# The header np.save writes for a C-ordered array of a plain numeric dtype.
_NPY_HEADER = re.compile(rb"\{'descr': '([<>|=][a-z]\d+)', 'fortran_order': False, 'shape': \(([\d, ]*)\), \}")


def load_npy(data: bytes) -> np.ndarray:
    """An .npy file's array, never unpickling. Plain numeric arrays take a fast
    path (regex on the header, no ast parsing; a read-only view of `data`);
    anything else goes through ``np.load(allow_pickle=False)``."""
    if data[:6] == b"\x93NUMPY" and len(data) > 10:
        start = 10 if data[6] == 1 else 12
        length = int.from_bytes(data[8:start], "little")
        match = _NPY_HEADER.match(data, start, start + length)
        if match:
            dtype = np.dtype(match[1].decode())
            shape = tuple(int(x) for x in match[2].split(b",") if x.strip())
            count = int(np.prod(shape, dtype=np.int64))
            if len(data) - start - length != count * dtype.itemsize:
                raise ValueError(f"{len(data) - start - length} data bytes for shape {shape} {dtype} (truncated?)")
            return np.frombuffer(data, dtype, count, start + length).reshape(shape)
    return np.load(io.BytesIO(data), allow_pickle=False)


def decode_npy(raw: RawSample, ext: str, spec: Dict[str, Any]) -> np.ndarray:
    """Decode an .npy member without unpickling and check it against the manifest spec."""
    try:
        arr = load_npy(member(raw, ext))
    except ShardError:
        raise
    except Exception as exc:  # numpy raises ValueError for pickled/object arrays and for bad headers
        raise ShardError(f"{raw.shard}: sample '{raw.key}' member '{ext}' is not a readable .npy array "
                         f"({exc}); object/pickled arrays are refused") from exc
    check_array(arr, spec, f"{raw.shard}: sample '{raw.key}' member '{ext}'")
    return arr


def check_array(arr: np.ndarray, spec: Dict[str, Any], where: str) -> None:
    """dtype must equal spec['dtype']; shape must match spec['shape'] (None = any size >= 1)."""
    want = spec["shape"]
    if arr.dtype != np.dtype(spec["dtype"]):
        raise ShardError(f"{where} has dtype {arr.dtype}, expected {spec['dtype']}")
    ok = arr.ndim == len(want) and all((w is None and n >= 1) or n == w for n, w in zip(arr.shape, want))
    if not ok:
        shape = tuple("R" if w is None else w for w in want)
        raise ShardError(f"{where} has shape {tuple(arr.shape)}, expected {shape}")


def image_id_to_int(image_id: Any) -> int:
    """A stable int64 for an image id: ints (or digit strings) as is, other strings hashed."""
    if isinstance(image_id, bool):
        raise TypeError(f"image_id {image_id!r} is not an int or a string")
    if isinstance(image_id, int) or (isinstance(image_id, str) and image_id.isdigit()):
        value = int(image_id)
        if 0 <= value < 2 ** 63:
            return value
    digest = hashlib.blake2b(str(image_id).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2 ** 63 - 1)


class ErrorPolicy:
    """What to do with a bad sample: 'error' raises, 'skip' logs and counts.

    ``skipped`` counts the samples (or shard tails) skipped by this process.
    """

    def __init__(self, on_error: str):
        if on_error not in ("error", "skip"):
            raise ValueError(f"data.on_error is '{on_error}'; valid choices: error, skip")
        self.on_error = on_error
        self.skipped = 0

    def __call__(self, exc: ShardError) -> None:
        if self.on_error == "error":
            raise exc
        self.skipped += 1
        log.warning("skipped bad sample (%d so far in this process): %s", self.skipped, exc)
