"""Shard readers: the training stream and the ordered evaluation stream.

Locations (a shard folder with a manifest, or img2dataset-layout tars by
pattern or URL, one or several weighted sources) are resolved by
user_dist/sources.py; a pair is one caption of one image, and an image may
have any number of captions.

Training (:func:`train_loader`), for one epoch on one rank:

1. the sources' shards are shuffled with a seed shared by all ranks (seed, epoch),
2. split by node (``shards[rank::world_size]``), then by loader worker
   (``rank_shards[w::num_workers]``);
3. each worker reads its shards in one pass per caption of its most-captioned
   image (5 for COCO, 1 for web data), one caption of every image per pass
   (the caption order below), each pass shuffled in a seeded buffer of
   ``data.shuffle_buffer`` pairs;
4. pairs are batched, captions augmented (seeded per batch) and tokenised.

Caption order (``data.caption_order``). The reference draws its pairs as a
uniform permutation of all 5N pairs: a batch of 128 out of COCO's 566K pairs
rarely holds two captions of one image, and a queue of 4,096 keys holds
about 4,040 distinct images. A stream of shards holds only a buffer:
expanding each image into its 5 pairs in front of it ('grouped', the order
of earlier versions) keeps an image's pairs within a buffer's length of each
other (20,000 images, batch 128: 7.6 duplicate images per batch instead of
0.32, 1,587 distinct images per 4,096 keys instead of 3,774). Same-image keys
are masked in the loss, so what is lost is negatives.

'spread' (the default) reads a worker's shards once per caption. Pass k
emits, for every image, caption ``perm[k]``, where ``perm`` is a permutation
of the image's captions seeded by (seed, epoch, key): over the passes each
caption comes exactly once (an image with n captions sits out the passes
after its n-th). Each pass reads the shards in its own order and
drains its own buffer, so within a pass no image repeats, and two captions of
an image are about a pass apart (one pair of each of the worker's images).
Pass k+1 shuffles the shards within each half of pass k's order: the shards
read last in one pass are read late in the next, so no image sits on both
sides of a pass boundary either (while the buffer holds less than half a
pass). Both statistics then match or beat a uniform shuffle's
(launch/bench_data.py measures them; docs/data.md, "Caption order").
Bounds, per worker, whatever the size of the data: the buffer holds
``shuffle_buffer`` decoded samples (each pair its own copy; 'grouped' holds
1/5 to all of that); each image is read and decoded 5 times per epoch
('grouped': once), which costs loader throughput (docs/data.md).

Every rank runs exactly ``floor(pairs / (world_size * batch_size))`` steps. The steps of a rank are shared among its workers in proportion to
their pairs; a worker whose shards run out starts them again in a new order
(a short rank repeats a few pairs, a long one drops a few), so no rank hangs
or stops early. Batch ``g`` of an epoch depends only on (seed, epoch, rank,
world_size, batch_size, num_workers, data.shuffle_buffer, data.caption_order,
the sources), so a run resumed with ``start_step=s`` yields exactly batches
s, s+1, ... of the uninterrupted epoch: workers skip earlier batches without
collating them, and the main process puts the workers' batches back in order.

Evaluation (:func:`eval_loader`): rank r reads the contiguous image range
``[r*N//W, (r+1)*N//W)`` of the split in source order, in batches of B images
and their captions, with ``image_index`` giving each image's position and
``caption_counts`` each image's number of captions.

Resampled (``data.resampled``): every worker draws shards with replacement
from all sources (:class:`ShardDraws`, seeded by seed, epoch, rank and
worker), each drawn shard giving one caption of each of its images; an epoch
is ``data.train_num_samples`` pairs, and the batch sequence stays a function
of the same parameters, so resuming is exact here too.

Batch keys and shapes: docs/architecture.md. Decoding never unpickles.
"""
from __future__ import annotations

import bisect
import hashlib
import itertools
import logging
import os
import random
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from user_dist.config import ConfigError, DataConfig
from user_dist.data_format import (ErrorPolicy, Manifest, RawSample, ShardError, decode_json, decode_npy,
                                   image_id_to_int, iter_raw_samples, member)
from user_dist.sources import Shard, Split, describe, is_manifest_folder, open_split
from user_dist.web_shards import image_member, web_metadata
from user_dist.image_decode import decode_image
from user_dist.tokenizer import CaptionEncoder

log = logging.getLogger(__name__)

# open_clip / OpenAI CLIP normalisation, matching the default jpg backbone.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


# --------------------------------------------------------------------------- decoding


@dataclass
class Sample:
    """One decoded image with its 5 captions."""

    key: str
    image_id: int
    captions: List[str]
    regions: Optional[np.ndarray] = None     # (R, F) float16, regions mode
    image: Optional[np.ndarray] = None       # (S, S, 3) uint8, jpg mode
    clip_image: Optional[np.ndarray] = None  # (D,) float16
    clip_text: Optional[np.ndarray] = None   # (5, D) float16


class SampleReader:
    """Decodes one location's samples in the configured mode, applying the error policy.

    split: what the location holds (user_dist/sources.py); a Manifest is taken as its folder's Split.
    namespace: prefixed to image ids before they become ints (several training sources), so that
    equal keys of two sources are two images.
    """

    def __init__(self, split: Union[Split, Manifest], data_cfg: DataConfig, namespace: str = ""):
        if isinstance(split, Manifest):
            split = Split.of_manifest(split)
        need = "regions.npy" if data_cfg.mode == "regions" else "jpg"
        if not split.has(need):
            what = "web shards hold images and captions only (no region features)" if split.layout == "web" else \
                f"these shards hold {', '.join(split.members)}"
            raise ShardError(f"{split.spec}: data.mode={data_cfg.mode} needs '{need}' members but {what}; point "
                             "the config at the other shards or change data.mode")
        self.split, self.manifest = split, split.manifest
        self.mode, self.image_size, self.namespace = data_cfg.mode, data_cfg.image_size, namespace
        self.clip = split.has("clip_image.npy")
        self.timeout, self.retries = data_cfg.io_timeout_s, data_cfg.io_retries
        self.policy = ErrorPolicy(data_cfg.on_error)

    def decode_metadata(self, raw: RawSample) -> Sample:
        """The sample's key, image id and captions (its JSON, or a web sample's txt and json), no features."""
        if self.split.layout == "web":
            image_id, captions = web_metadata(raw)
        else:
            meta = decode_json(raw)
            image_id, captions = meta["image_id"], meta["captions"]
        try:
            image_int = image_id_to_int(f"{self.namespace}/{image_id}" if self.namespace else image_id)
        except TypeError as exc:
            raise ShardError(f"{raw.shard}: sample '{raw.key}' member 'json': {exc}") from exc
        return Sample(raw.key, image_int, captions)

    def decode(self, raw: RawSample) -> Sample:
        sample = self.decode_metadata(raw)
        f = self.split.features
        if self.mode == "regions":
            sample.regions = decode_npy(raw, "regions.npy", f["regions.npy"])
        else:
            sample.image = self.decode_jpg(raw, image_member(raw) if self.split.layout == "web" else "jpg")
        if self.clip:
            sample.clip_image = decode_npy(raw, "clip_image.npy", f["clip_image.npy"])
            sample.clip_text = decode_npy(raw, "clip_text.npy", f["clip_text.npy"])
            if len(sample.clip_text) != len(sample.captions):
                raise ShardError(f"{raw.shard}: sample '{raw.key}' has {len(sample.clip_text)} CLIP caption "
                                 f"features for {len(sample.captions)} captions; rebuild its CLIP features")
        return sample

    def decode_jpg(self, raw: RawSample, ext: str = "jpg") -> np.ndarray:
        data = member(raw, ext)
        try:
            return decode_image(data, self.image_size)
        except Exception as exc:
            raise ShardError(f"{raw.shard}: sample '{raw.key}' member '{ext}' is not a readable image ({exc})") from exc

    def raw_samples(self, shard: Shard) -> Iterator[RawSample]:
        """Undecoded samples of a shard; truncation, a failed read and a wrong count go to the error policy
        (a count the config only estimated is not checked)."""
        count = 0
        try:
            for raw in iter_raw_samples(shard.url, self.timeout, self.retries):
                count += 1
                yield raw
        except ShardError as exc:
            self.policy(exc)
            return
        if count != shard.num_samples and self.split.counted != "config":
            where = {"manifest": f"{self.split.spec}/manifest.json", "stats": "its img2dataset stats file",
                     "read": "an earlier read"}[self.split.counted]
            self.policy(ShardError(f"{shard.url}: {count} samples, but {where} says {shard.num_samples}; the shard "
                                   "is truncated or the count is stale"))

    def samples(self, shard: Shard) -> Iterator[Sample]:
        for raw in self.raw_samples(shard):
            try:
                sample = self.decode(raw)
            except ShardError as exc:
                self.policy(exc)
                continue
            yield sample


class SourceReaders:
    """The readers of several training sources; a shard is read by its source's (``shard.source``)."""

    def __init__(self, readers: Sequence[SampleReader]):
        self.readers = list(readers)

    def samples(self, shard: Shard) -> Iterator[Sample]:
        return self.readers[shard.source].samples(shard)


# --------------------------------------------------------------------------- batches


class Batcher:
    """Turns decoded samples into the batch dicts of docs/architecture.md."""

    def __init__(self, data_cfg: DataConfig, tokenizer, train: bool):
        aug = data_cfg.caption_aug_prob if (train and data_cfg.caption_aug) else 0.0
        self.text = CaptionEncoder(tokenizer, data_cfg.max_text_len, aug, data_cfg.pad_to_multiple)
        self.region_drop = data_cfg.region_drop_prob if train else 0.0
        # (x / 255 - mean) / std  ==  x * scale - shift, per channel
        self.scale = 1.0 / (255.0 * torch.tensor(IMAGE_STD).view(1, 3, 1, 1))
        self.shift = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1) / torch.tensor(IMAGE_STD).view(1, 3, 1, 1)

    def image_part(self, samples: Sequence[Sample], rng: Optional[np.random.Generator]) -> Dict[str, torch.Tensor]:
        out: Dict[str, torch.Tensor] = {}
        if samples[0].regions is not None:
            regions = [s.regions for s in samples]
            if self.region_drop > 0 and rng is not None:
                regions = [self.drop_regions(r, rng) for r in regions]
            longest, dim = max(len(r) for r in regions), regions[0].shape[1]
            # The shards' dtype travels (float16 as written by data_shards): half the bytes to
            # copy here, to pin and to send to the device, which converts (TrainStep, encode_split).
            # Fill a fresh (B, R, F) tensor in place, only the padding rows zeroed (a fresh large
            # buffer costs page faults; avoid making two).
            dtype = torch.float16 if regions[0].dtype == np.float16 else torch.float32
            padded = torch.empty(len(regions), longest, dim, dtype=dtype)
            mask = torch.zeros(len(regions), longest, dtype=torch.bool)
            for k, r in enumerate(regions):
                padded[k, :len(r)].copy_(_readonly_tensor(r))
                padded[k, len(r):].zero_()
                mask[k, :len(r)] = True
            out["regions"], out["region_mask"] = padded, mask
        else:
            # (B, S, S, 3) uint8 -> (B, 3, S, S) float32 in one converting copy, then normalised in place
            pixels = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2)
            images = torch.empty(pixels.shape, dtype=torch.float32).copy_(pixels)
            out["images"] = images.mul_(self.scale).sub_(self.shift)
        if samples[0].clip_image is not None:
            out["clip_image"] = torch.from_numpy(np.stack([s.clip_image for s in samples]).astype(np.float32))
        out["image_ids"] = torch.tensor([s.image_id for s in samples], dtype=torch.int64)
        return out

    def drop_regions(self, regions: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        keep = rng.random(len(regions)) >= self.region_drop
        if not keep.any():
            keep[int(rng.integers(len(regions)))] = True
        return regions[keep]

    def train_batch(self, pairs: Sequence[Tuple[Sample, int]], rng: np.random.Generator) -> Dict[str, torch.Tensor]:
        """B (sample, caption index) pairs -> one row per pair."""
        samples = [s for s, _ in pairs]
        batch = self.image_part(samples, rng)
        batch["input_ids"], batch["attention_mask"] = self.text.encode([s.captions[c] for s, c in pairs], rng)
        if samples[0].clip_text is not None:
            batch["clip_text"] = torch.from_numpy(np.stack([s.clip_text[c] for s, c in pairs]).astype(np.float32))
        return batch

    def eval_batch(self, samples: Sequence[Sample], index: Sequence[int]) -> Dict[str, torch.Tensor]:
        """B images -> B image rows; C = sum of caption_counts caption rows, image k's n_k captions after
        those of images 0..k-1 (5B rows, image k at 5k..5k+4, for COCO); image_index (B,);
        caption_counts (B,) int64."""
        batch = self.image_part(samples, None)
        batch["input_ids"], batch["attention_mask"] = self.text.encode([c for s in samples for c in s.captions])
        if samples[0].clip_text is not None:
            batch["clip_text"] = torch.from_numpy(np.concatenate([s.clip_text for s in samples]).astype(np.float32))
        batch["image_index"] = torch.tensor(list(index), dtype=torch.int64)
        batch["caption_counts"] = torch.tensor([len(s.captions) for s in samples], dtype=torch.int64)
        return batch


# --------------------------------------------------------------------------- helpers


def _readonly_tensor(arr: np.ndarray) -> torch.Tensor:
    """A tensor view of a read-only array (decoded straight from the tar bytes), only ever read."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable array": we never write to it
        return torch.from_numpy(arr)


def shuffle_buffer(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle a stream with a buffer of `size` items; drains (shuffled) when the stream ends."""
    buf: List[Any] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        k = rng.randrange(size)
        yield buf[k]
        buf[k] = item
    rng.shuffle(buf)
    yield from buf


def in_order(numbered: Iterable[Tuple[int, Any]], start: int, stop: int) -> Iterator[Any]:
    """Yield the items numbered start..stop-1 in order, whatever order the workers delivered them in."""
    pending: Dict[int, Any] = {}
    expected = start
    for number, item in numbered:
        pending[number] = item
        while expected in pending:
            out = pending.pop(expected)
            expected += 1
            if out is not None:
                yield out
    if expected != stop or pending:
        raise RuntimeError(f"data workers delivered batches up to {expected} of {start}..{stop - 1}; "
                           f"left over: {sorted(pending)}")


def share(total: int, weights: Sequence[int]) -> List[int]:
    """Split `total` into integer parts proportional to `weights` (largest remainder)."""
    whole = sum(weights)
    exact = [total * w / whole for w in weights]
    parts = [int(e) for e in exact]
    by_remainder = sorted(range(len(weights)), key=lambda k: (parts[k] - exact[k], k))
    for k in by_remainder[:total - sum(parts)]:
        parts[k] += 1
    return parts


def round_robin(counts: Sequence[int]) -> List[int]:
    """Worker of each batch: cycle over the workers that still have batches."""
    order = []
    for r in range(max(counts, default=0)):
        order += [w for w, c in enumerate(counts) if c > r]
    return order


def _loader(dataset: IterableDataset, num_workers: int) -> Iterable[Any]:
    if num_workers == 0:
        return dataset
    # A private generator: DataLoader otherwise draws its workers' base seed
    # from the global torch RNG each time an iterator starts, which would shift
    # the training step's dropout stream between a resumed and an
    # uninterrupted run. (All data randomness is seeded explicitly anyway.)
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                      worker_init_fn=_worker_init, generator=torch.Generator().manual_seed(0))


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers decode and collate; leave the cores to the main process
    # SLURM delivers preemption signals to every process of the step. The
    # rank checkpoints and exits on them; its loader workers must not die
    # first (they stop with their rank).
    import signal

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def _worker_id() -> int:
    info = get_worker_info()
    return info.id if info is not None else 0


# --------------------------------------------------------------------------- training stream


@dataclass
class TrainPlan:
    """Which shards and batches each loader worker of one rank handles in one epoch.

    With ``draws`` (data.resampled) every worker draws shards with replacement from all sources
    instead of reading its own share of them (:meth:`resampled_pairs`).
    """

    worker_shards: List[List[Shard]]
    schedule: List[int]  # worker of global batch g
    batch_size: int
    start_step: int
    seed: int
    epoch: int
    rank: int
    shuffle_buffer: int
    caption_order: str  # data.caption_order
    draws: Optional["ShardDraws"] = None

    def pairs(self, worker: int, reader: SampleReader) -> Iterator[Tuple[Sample, int]]:
        """The worker's shuffled (sample, caption) pairs; starts its shards again when they run out."""
        if self.draws is not None:
            yield from self.resampled_pairs(worker, reader)
            return
        for repeat in itertools.count():
            tag = f"{self.seed}:{self.epoch}:{self.rank}:{worker}:{repeat}"
            if self.caption_order == "grouped":
                passes = grouped_pass(self.worker_shards[worker], reader, tag, repeat)
            else:
                passes = spread_passes(self.worker_shards[worker], reader, tag, f"{self.seed}:{self.epoch}")
            produced = 0
            for pass_pairs, rng in passes:
                for pair in shuffle_buffer(pass_pairs, self.shuffle_buffer, rng):
                    produced += 1
                    yield pair
            if produced == 0:
                raise ShardError(f"no readable sample in {[s.url for s in self.worker_shards[worker]]} (all "
                                 "skipped as bad); rebuild these shards")

    def resampled_pairs(self, worker: int, reader: SampleReader) -> Iterator[Tuple[Sample, int]]:
        """data.resampled: shard draws seeded by (seed, epoch, rank, worker), each drawn shard giving one
        caption of each of its images (drawn per draw and key), through one shuffle buffer."""
        assert self.draws is not None
        tag = f"{self.seed}:{self.epoch}:{self.rank}:{worker}"
        yield from shuffle_buffer(self.draws.pairs(reader, tag), self.shuffle_buffer, random.Random(f"buffer:{tag}"))

    def chunks(self, worker: int, reader: SampleReader) -> Iterator[Tuple[int, List[Tuple[Sample, int]]]]:
        """(g, the pairs of batch g) for each batch g of the worker, from batch 0 on."""
        pairs = self.pairs(worker, reader)
        for g in (g for g, w in enumerate(self.schedule) if w == worker):
            yield g, list(itertools.islice(pairs, self.batch_size))

    def batches(self, worker: int, reader: SampleReader, batcher: Batcher) -> Iterator[Tuple[int, Any]]:
        for g, chunk in self.chunks(worker, reader):
            if g < self.start_step:
                continue  # resuming: consume the pairs of batches already trained on, without collating
            rng = np.random.default_rng([self.seed, self.epoch, self.rank, g, 7])
            yield g, batcher.train_batch(chunk, rng)


@dataclass
class ShardDraws:
    """Shards drawn with replacement (data.resampled). A shard of source s is drawn with probability
    proportional to weight_s / samples_s, so that source s gives a share weight_s / sum(weights) of
    the samples whatever its size or shard count."""

    shards: List[Shard]
    cum_weights: List[float]

    @classmethod
    def make(cls, sources: Sequence["TrainSource"]) -> "ShardDraws":
        shards, weights = [], []
        for src in sources:
            for shard in src.split.shards:
                shards.append(shard)
                weights.append(src.weight / src.split.num_samples)
        return cls(shards, list(itertools.accumulate(weights)))

    def pairs(self, reader: SampleReader, tag: str) -> Iterator[Tuple[Sample, int]]:
        rng = random.Random(f"draw:{tag}")
        empty = 0
        for d in itertools.count():
            shard = rng.choices(self.shards, cum_weights=self.cum_weights)[0]
            got = 0
            for sample in reader.samples(shard):
                got += 1
                n = len(sample.captions)
                yield sample, (0 if n == 1 else caption_permutation(f"{tag}:{d}:{sample.key}", n)[0])
            empty = 0 if got else empty + 1
            if empty >= max(16, len(self.shards)):  # every shard bad: stop instead of drawing forever
                raise ShardError(f"{empty} shard draws in a row gave no readable sample (the last: {shard.url}); "
                                 "check the sources (data.on_error=skip skipped them all)")


Pass = Tuple[Iterator[Tuple[Sample, int]], random.Random]  # a pass's pairs and its shuffle buffer's generator


def grouped_pass(shards: Sequence[Shard], reader: SampleReader, tag: str, repeat: int) -> Iterator[Pass]:
    """data.caption_order=grouped (the order of earlier versions): one pass, each image followed by its pairs."""
    shards = list(shards)
    if repeat:
        random.Random(f"reshuffle:{tag}").shuffle(shards)
    yield ((s, c) for shard in shards for s in reader.samples(shard) for c in range(len(s.captions))), \
        random.Random(f"buffer:{tag}")


def spread_passes(shards: Sequence[Shard], reader: SampleReader, tag: str, caption_seed: str) -> Iterator[Pass]:
    """data.caption_order=spread: one pass per caption of the shards' most-captioned image; pass k reads
    the shards in its own order and emits caption perm[k] of each image that has more than k captions,
    perm a permutation of the image's captions seeded by (caption_seed, key). Pass k+1 shuffles the
    shards within each half of pass k's order, so the shards read last in one pass are read late in
    the next: while the buffer holds less than half a pass, no image has pairs on both sides of a
    pass boundary."""
    order = list(shards)
    random.Random(f"pass:{tag}:0").shuffle(order)
    for k in range(max(s.max_captions for s in shards)):
        if k:
            rng = random.Random(f"pass:{tag}:{k}")
            first, second = order[:len(order) // 2], order[len(order) // 2:]
            rng.shuffle(first)
            rng.shuffle(second)
            order = first + second
        yield _one_caption_each(order, reader, k, caption_seed), random.Random(f"buffer:{tag}:{k}")


def _one_caption_each(shards: List[Shard], reader: SampleReader, k: int,
                      caption_seed: str) -> Iterator[Tuple[Sample, int]]:
    for shard in shards:
        for sample in reader.samples(shard):
            n = len(sample.captions)
            if k < n:  # an image with fewer captions than passes sits out the last ones
                yield sample, caption_permutation(f"{caption_seed}:{sample.key}", n)[k]


def caption_permutation(seed: str, n: int) -> List[int]:
    """A permutation of range(n) drawn from a hash of `seed` (its Lehmer code; faster than seeding a
    random.Random for every image and pass)."""
    code = int.from_bytes(hashlib.blake2b(seed.encode(), digest_size=16).digest(), "little")
    rest, perm = list(range(n)), []
    for m in range(n, 0, -1):
        code, i = divmod(code, m)
        perm.append(rest.pop(i))
    return perm


class _TrainWorkers(IterableDataset):
    def __init__(self, plan: TrainPlan, reader: SampleReader, batcher: Batcher):
        self.plan, self.reader, self.batcher = plan, reader, batcher

    def __iter__(self) -> Iterator[Tuple[int, Any]]:
        return self.plan.batches(_worker_id(), self.reader, self.batcher)


class TrainStream:
    """The batches of one epoch on one rank, from ``start_step`` on.

    ``steps_per_epoch`` is the same on every rank; ``len(stream)`` is the
    number of batches this stream yields (``steps_per_epoch - start_step``).
    ``fingerprint`` lists what must not change for an exact resume; save it
    with the checkpoint and compare on resume.
    """

    def __init__(self, dataset: _TrainWorkers, num_workers: int, steps_per_epoch: int, fingerprint: Dict[str, Any]):
        self.dataset, self.num_workers = dataset, num_workers
        self.steps_per_epoch, self.start_step = steps_per_epoch, dataset.plan.start_step
        self.fingerprint = fingerprint

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        return in_order(_loader(self.dataset, self.num_workers), self.start_step, self.steps_per_epoch)

    def keys(self, reader: Optional[SampleReader] = None) -> Iterator[np.ndarray]:
        """(B, 2) int64 [image_id, caption index] of each batch from ``start_step`` on, in stream
        order, computed in this process without collating (to measure the order:
        launch/bench/order.py). ``reader`` replaces the stream's own, e.g. by one that decodes only
        the metadata."""
        plan = self.dataset.plan
        reader = reader or self.dataset.reader
        workers = [plan.chunks(w, reader) for w in range(len(plan.worker_shards))]
        for g, w in enumerate(plan.schedule):
            number, chunk = next(workers[w])
            assert number == g
            if g >= self.start_step:
                yield np.array([(sample.image_id, c) for sample, c in chunk], dtype=np.int64)


def steps_per_epoch(num_pairs: int, batch_size: int, world_size: int) -> int:
    """An epoch = every caption once: floor(pairs / (world_size * batch_size)); resampled, pairs = the
    epoch's samples."""
    return num_pairs // (world_size * batch_size)


@dataclass(frozen=True)
class TrainSource:
    """One training source: its shards, its weight and the namespace of its image ids."""

    split: Split
    weight: float
    namespace: str


_SPLITS: Dict[Tuple[Any, ...], Split] = {}


def cached_split(spec: str, key: str, data_cfg: DataConfig, **kw: Any) -> Split:
    """open_split, once per process for the same arguments: a web location's stats files are read
    at the first epoch, not at every one."""
    args = (spec, key, data_cfg.io_timeout_s, data_cfg.io_retries, tuple(sorted(kw.items())))
    if args not in _SPLITS:
        _SPLITS[args] = open_split(spec, key, timeout=data_cfg.io_timeout_s, retries=data_cfg.io_retries, **kw)
    return _SPLITS[args]


def describe_data(data_cfg: DataConfig, validation: bool = True) -> List[str]:
    """One line per training source (and the validation split): what its location resolved to."""
    lines = [("training: " if len(data_cfg.train_sources) < 2 else f"training source '{src.namespace}' "
              f"(weight {src.weight:g}): ") + describe(src.split) for src in train_sources(data_cfg)]
    if validation:
        lines.append("validation: " + describe(eval_split(data_cfg.val_shards, data_cfg, "data.val_shards")))
    return lines


def train_sources(data_cfg: DataConfig) -> List[TrainSource]:
    """The training sources of a config: data.train_sources, else data.train_shards as one source.

    Raises:
        ShardError: a location that cannot be resolved (user_dist/sources.py).
        ConfigError: data.train_num_samples given for a manifest folder without data.resampled.
    """
    if data_cfg.train_sources:
        several = len(data_cfg.train_sources) > 1
        return [TrainSource(cached_split(src.shards, f"data.train_sources.{i}.shards", data_cfg,
                                         num_samples=src.num_samples, source=i),
                            src.weight, (src.name or f"source{i}") if several else "")
                for i, src in enumerate(data_cfg.train_sources)]
    spec, count = data_cfg.train_shards, data_cfg.train_num_samples
    if count and is_manifest_folder(spec):
        if not data_cfg.resampled:
            raise ConfigError(f"data.train_num_samples={count} with data.train_shards '{spec}', a folder whose "
                              "manifest gives its sample count: remove it (to train fewer steps set "
                              "train.max_steps) or set data.resampled=true to make it the epoch's size")
        count = 0  # resampled: the epoch's size, read in train_loader
    return [TrainSource(cached_split(spec, "data.train_shards", data_cfg, num_samples=count,
                                     warn_ignored_count=not data_cfg.resampled), 1.0, "")]


def epoch_pairs(data_cfg: DataConfig, sources: Optional[Sequence[TrainSource]] = None) -> int:
    """(image, caption) pairs of one training epoch: every caption of every source once, or with
    data.resampled data.train_num_samples (default: all sources' samples)."""
    if data_cfg.resampled and data_cfg.train_num_samples:
        return data_cfg.train_num_samples  # known without reading a source (--print-plan)
    sources = train_sources(data_cfg) if sources is None else sources
    if data_cfg.resampled:
        return sum(src.split.num_samples for src in sources)
    return sum(src.split.num_pairs for src in sources)


def train_loader(data_cfg: DataConfig, tokenizer, batch_size: int, *, rank: int, world_size: int, epoch: int,
                 seed: int, start_step: int = 0) -> TrainStream:
    """The training stream of `epoch` on `rank` (module docstring), from batch `start_step` on.

    Raises:
        ConfigError: fewer shards than world_size x workers (without resampling), or fewer pairs than
            one global batch.
        ShardError: a missing/invalid manifest or location, or shards without the members data.mode needs.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers fork after the tokenizer exists
    sources = train_sources(data_cfg)
    readers = SourceReaders([SampleReader(src.split, data_cfg, src.namespace) for src in sources])
    reader: Any = readers.readers[0] if len(sources) == 1 else readers
    workers = max(1, data_cfg.num_workers)
    where = " + ".join(src.split.spec for src in sources)
    pairs = epoch_pairs(data_cfg, sources)
    steps = steps_per_epoch(pairs, batch_size, world_size)
    if steps == 0:
        raise ConfigError(f"the training data '{where}' has {pairs} pairs per epoch, fewer than one global batch "
                          f"({world_size} x {batch_size})")
    if not 0 <= start_step <= steps:
        raise ValueError(f"start_step {start_step} is outside the epoch's 0..{steps} steps")
    if data_cfg.resampled:
        draws = ShardDraws.make(sources)
        worker_shards = [draws.shards] * workers
        counts = share(steps, [1] * workers)
    else:
        draws = None
        shards = [shard for src in sources for shard in src.split.shards]
        if len(shards) < world_size * workers:
            raise ConfigError(f"the training data '{where}' has {len(shards)} shards, fewer than world_size x "
                              f"data.num_workers = {world_size} x {workers} = {world_size * workers}; rebuild with "
                              "a smaller --shard-size, lower data.num_workers or set data.resampled=true")
        random.Random(f"shards:{seed}:{epoch}").shuffle(shards)  # same order on every rank
        mine = shards[rank::world_size]
        worker_shards = [mine[w::workers] for w in range(workers)]
        counts = share(steps, [sum(s.num_pairs for s in ws) for ws in worker_shards])
    plan = TrainPlan(worker_shards, round_robin(counts), batch_size, start_step, seed, epoch, rank,
                     data_cfg.shuffle_buffer, data_cfg.caption_order, draws)
    if data_cfg.train_sources:
        digest = hashlib.sha256("\n".join(f"{s.split.spec} {s.weight} {s.namespace} {s.split.fingerprint()}"
                                          for s in sources).encode()).hexdigest()
    else:
        digest = sources[0].split.fingerprint()  # as checkpoints written before sources existed recorded it
    fingerprint = {"seed": seed, "world_size": world_size, "batch_size": batch_size, "num_workers": workers,
                   "shuffle_buffer": data_cfg.shuffle_buffer, "mode": data_cfg.mode, "shards": digest}
    if data_cfg.caption_order != "grouped":  # absent: the order of checkpoints written before the switch
        fingerprint["caption_order"] = data_cfg.caption_order
    if data_cfg.resampled:
        fingerprint["resampled_epoch"] = pairs
    return TrainStream(_TrainWorkers(plan, reader, Batcher(data_cfg, tokenizer, train=True)),
                       data_cfg.num_workers, steps, fingerprint)


# --------------------------------------------------------------------------- evaluation stream


class _Cursor:
    """Reads samples of a split by source index, moving forward through the shards."""

    def __init__(self, reader: SampleReader):
        self.reader = reader
        self.starts = list(itertools.accumulate([s.num_samples for s in reader.split.shards], initial=0))
        self.shard, self.index = -1, 0  # self.raws yields the raw sample of source index self.index next
        self.raws: Iterator[RawSample] = iter(())

    def take(self, i: int) -> Optional[RawSample]:
        """The raw sample at source index i (None if its shard was cut short and skipped)."""
        shard = bisect.bisect_right(self.starts, i) - 1
        if shard != self.shard or i < self.index:
            self.shard, self.index = shard, self.starts[shard]
            self.raws = self.reader.raw_samples(self.reader.split.shards[shard])
        while self.index < i:  # samples of other ranks/workers: read past, never decoded
            next(self.raws, None)
            self.index += 1
        self.index += 1
        return next(self.raws, None)

    def read(self, start: int, stop: int) -> Tuple[List[Sample], List[int]]:
        samples, index = [], []
        for i in range(start, stop):
            raw = self.take(i)
            if raw is None:
                continue
            try:
                samples.append(self.reader.decode(raw))
                index.append(i)
            except ShardError as exc:
                self.reader.policy(exc)
        return samples, index


class _EvalWorkers(IterableDataset):
    def __init__(self, reader: SampleReader, batcher: Batcher, ranges: List[Tuple[int, int]], workers: int):
        self.reader, self.batcher, self.ranges, self.workers = reader, batcher, ranges, workers

    def __iter__(self) -> Iterator[Tuple[int, Any]]:
        cursor = _Cursor(self.reader)
        for k in range(_worker_id(), len(self.ranges), self.workers):
            samples, index = cursor.read(*self.ranges[k])
            yield k, (self.batcher.eval_batch(samples, index) if samples else None)


class EvalStream:
    """Ordered evaluation batches of one split on one rank.

    Attributes:
        num_images: images in the whole split (manifest).
        image_range: (start, stop) source positions read by this rank.
    """

    def __init__(self, dataset: _EvalWorkers, num_workers: int, num_images: int, image_range: Tuple[int, int]):
        self.dataset, self.num_workers = dataset, num_workers
        self.num_images, self.image_range = num_images, image_range

    def __len__(self) -> int:
        return len(self.dataset.ranges)

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        return in_order(_loader(self.dataset, self.num_workers), 0, len(self.dataset.ranges))


def eval_split(spec: str, data_cfg: DataConfig, key: str = "the evaluation split") -> Split:
    """An evaluation location as a Split with exact per-shard counts (web shards without stats files
    are counted by reading them, once per process)."""
    return cached_split(spec, key, data_cfg, count="read")


def num_images(spec: str, data_cfg: Optional[DataConfig] = None) -> int:
    """Images in an evaluation split."""
    return eval_split(spec, data_cfg or DataConfig()).num_samples


def eval_loader(shard_dir: str, data_cfg: DataConfig, tokenizer, batch_size: int, *, rank: int = 0,
                world_size: int = 1) -> EvalStream:
    """Ordered batches of B images and their captions (Batcher.eval_batch); every image once across ranks
    and workers, no augmentation. ``shard_dir``: any location (user_dist/sources.py)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    split = eval_split(shard_dir, data_cfg)
    reader = SampleReader(split, data_cfg)
    n = split.num_samples
    start, stop = rank * n // world_size, (rank + 1) * n // world_size
    ranges = [(a, min(a + batch_size, stop)) for a in range(start, stop, batch_size)]
    workers = max(1, min(data_cfg.num_workers, len(ranges)))
    dataset = _EvalWorkers(reader, Batcher(data_cfg, tokenizer, train=False), ranges, workers)
    return EvalStream(dataset, min(data_cfg.num_workers, len(ranges)), n, (start, stop))


def check_model_fits(data_cfg: DataConfig, model_cfg) -> None:
    """Fail at start-up when the shards' members or feature sizes disagree with the config.

    Raises:
        ConfigError: naming the config key, the location and both sizes.
    """
    locations = [(src.split, f"data.train_sources.{i}" if data_cfg.train_sources else "data.train_shards")
                 for i, src in enumerate(train_sources(data_cfg))]
    locations.append((eval_split(data_cfg.val_shards, data_cfg, "data.val_shards"), "data.val_shards"))
    for split, key in locations:
        where = split.spec
        if data_cfg.mode == "regions":
            if not split.has("regions.npy"):
                raise ConfigError(f"{key} '{where}' holds no regions.npy (members: "
                                  f"{', '.join(split.members)}); use data.mode=jpg or region shards")
            dim = split.feature_dim("regions.npy")
            if dim != model_cfg.region_dim:
                raise ConfigError(f"model.region_dim is {model_cfg.region_dim} but the regions in "
                                  f"{where}/manifest.json have {dim} features; set model.region_dim={dim}")
        elif not split.has("jpg"):
            raise ConfigError(f"{key} '{where}' holds no jpg images; use data.mode=regions")
        if model_cfg.gse.kind in ("cge", "both") and model_cfg.gse.clip_source == "shards":
            if not split.has("clip_image.npy"):
                raise ConfigError(f"model.gse.kind={model_cfg.gse.kind} reads CLIP features from the shards, but "
                                  f"{where} has no clip_image.npy; add them with `python -m data_shards "
                                  "clip` or set model.gse.clip_source=online")
            dim = split.feature_dim("clip_image.npy")
            if dim != model_cfg.gse.clip_dim:
                raise ConfigError(f"model.gse.clip_dim is {model_cfg.gse.clip_dim} but {where} holds "
                                  f"{dim}-d CLIP features; set model.gse.clip_dim={dim}")
