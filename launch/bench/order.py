"""How the training stream orders an image's captions, against a uniform shuffle
(printed by launch/bench_data.py for every shard folder it measures):

    python launch/bench_data.py --regions DIR [--batch-size 128] [--window 4096] [--world-size 1]
                                [--order spread|grouped|both] [--seconds 0]

Two statistics of one epoch's stream of keys (the image of each pair; the
global stream: at each step the ranks' batches in rank order, as the
all-gathered keys enter the queue):

- duplicates per batch: global batch size minus the distinct images in it,
  averaged over the epoch's batches (same-image pairs are masked in the
  loss, so each duplicate is a lost in-batch negative);
- distinct images among any ``window`` consecutive keys (the image queue's
  negatives): mean and worst over every window of the epoch.

The uniform figures are those of the reference's order, a uniform
permutation of all the split's pairs: exact expectations (hypergeometric)
for the two means, and the worst window of ``--sims`` simulated shuffles
(their mean).

The stream is the real one (``train_loader``'s plan: shard split, workers'
schedule, passes, shuffle buffers), read by a reader that decodes only each
sample's JSON: the same order as training on well-formed shards (bad samples
skipped with ``data.on_error=skip`` are counted here as read), at the cost of
parsing the tars (5 times for ``spread``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from user_dist.config import DataConfig, TextEncoderConfig
from user_dist.data import Sample, SampleReader, train_loader
from user_dist.data_format import RawSample, load_manifest


class MetadataReader(SampleReader):
    """Decodes a sample's JSON only: the key order of the stream without the features."""

    def decode(self, raw: RawSample) -> Sample:
        return self.decode_metadata(raw)


# --------------------------------------------------------------------------- statistics of a key sequence


def duplicates_per_batch(ids: np.ndarray, batch: int) -> np.ndarray:
    """B - distinct images, for each full batch of `batch` consecutive keys of `ids` (K,)."""
    rows = np.sort(ids[:len(ids) // batch * batch].reshape(-1, batch), axis=1)  # (K // B, B)
    return (np.diff(rows, axis=1) == 0).sum(axis=1)


def window_distinct(ids: np.ndarray, window: int) -> np.ndarray:
    """Distinct images among keys [i, i + window), for each window start i (K - window + 1,)."""
    n = len(ids)
    starts = n - window + 1
    if starts <= 0:
        raise ValueError(f"a window of {window} keys is longer than the stream ({n} keys)")
    # prev[j]: the last position before j holding the same image (-1: none)
    order = np.argsort(ids, kind="stable")
    same = ids[order[1:]] == ids[order[:-1]]
    prev = np.full(n, -1, dtype=np.int64)
    prev[order[1:][same]] = order[:-1][same]
    # Key j repeats an image already in window i iff prev[j] >= i and j < i + window:
    # for i in [j - window + 1, prev[j]]. Count them with a difference array.
    j = np.arange(n)
    lo = np.maximum(0, j - window + 1)
    hi = np.minimum(prev, starts - 1)
    hit = (prev >= 0) & (lo <= hi)
    diff = np.zeros(starts + 1, dtype=np.int64)
    np.add.at(diff, lo[hit], 1)
    np.add.at(diff, hi[hit] + 1, -1)
    return window - np.cumsum(diff)[:starts]


def uniform_distinct(captions: Sequence[int], draws: int) -> float:
    """Expected distinct images among `draws` pairs of a uniform permutation of all pairs, image i
    having captions[i] pairs: sum_i 1 - C(P - c_i, n) / C(P, n)."""
    c = np.asarray(captions, dtype=np.float64)
    total = c.sum()
    miss = np.ones_like(c)
    for t in range(int(c.max())):  # C(P-c, n) / C(P, n) = prod_{t<c} (P - n - t) / (P - t)
        miss *= np.where(t < c, (total - draws - t) / (total - t), 1.0)
    return float((1 - miss).sum())


def uniform_worst_window(captions: Sequence[int], keys: int, window: int, sims: int, seed: int = 0) -> float:
    """The worst window's distinct images over the first `keys` pairs of a uniform permutation
    (mean over `sims` permutations)."""
    ids = np.repeat(np.arange(len(captions)), captions)
    rng = np.random.default_rng(seed)
    return float(np.mean([window_distinct(rng.permutation(ids)[:keys], window).min() for _ in range(sims)]))


# --------------------------------------------------------------------------- the real stream


def stream_image_ids(data_cfg: DataConfig, batch: int, world_size: int = 1, epoch: int = 0,
                     seed: int = 0, tokenizer=None) -> np.ndarray:
    """The image id of each key of one epoch's global stream (steps x world_size x batch,)."""
    if tokenizer is None:
        from user_dist.tokenizer import build_tokenizer

        tokenizer = build_tokenizer(TextEncoderConfig())
    reader = MetadataReader(load_manifest(data_cfg.train_shards), data_cfg)
    ranks = [train_loader(data_cfg, tokenizer, batch, rank=r, world_size=world_size, epoch=epoch,
                          seed=seed).keys(reader) for r in range(world_size)]
    steps = [np.concatenate(step) for step in zip(*ranks)]  # rank r's batch s at rows r*B..(r+1)*B of step s
    return np.concatenate(steps)[:, 0]


@dataclass
class OrderStats:
    """Both order statistics of one stream next to a uniform shuffle's."""

    order: str
    images: int
    keys: int                     # keys in the epoch's stream (steps x global batch)
    batch: int                    # global batch
    window: int
    duplicates: float             # mean over the epoch's batches of batch - distinct images
    window_mean: float            # distinct images among `window` consecutive keys, mean over windows
    window_worst: int             # ... the worst window
    uniform_duplicates: float
    uniform_window_mean: float
    uniform_window_worst: float   # simulated (mean of the worst over `sims` shuffles)

    def table(self) -> str:
        rows = [("duplicate images per batch (B - distinct)", self.duplicates, self.uniform_duplicates, "{:.3f}"),
                (f"distinct images in {self.window} consecutive keys, mean", self.window_mean,
                 self.uniform_window_mean, "{:,.0f}"),
                (f"distinct images in {self.window} consecutive keys, worst", self.window_worst,
                 self.uniform_window_worst, "{:,.0f}")]
        out = ["| statistic | stream | uniform shuffle | stream / uniform |", "|---|---|---|---|"]
        for name, mine, uniform, fmt in rows:
            ratio = f"{mine / uniform:.2f}" if uniform else "-"
            out.append(f"| {name} | {fmt.format(mine)} | {fmt.format(uniform)} | {ratio} |")
        return "\n".join(out)


def order_stats(data_cfg: DataConfig, batch: int, window: int, world_size: int = 1, epoch: int = 0,
                seed: int = 0, sims: int = 3, tokenizer=None) -> OrderStats:
    """Measure one epoch of the training stream of ``data_cfg.train_shards`` (``batch`` per rank)."""
    ids = stream_image_ids(data_cfg, batch, world_size, epoch, seed, tokenizer)
    global_batch = world_size * batch
    captions = [s.num_captions // max(1, s.num_samples) for s in load_manifest(data_cfg.train_shards).shards
                for _ in range(s.num_samples)]  # per-shard average: exact when all images have as many
    distinct = window_distinct(ids, window)
    return OrderStats(
        order=data_cfg.caption_order, images=len(captions), keys=len(ids), batch=global_batch, window=window,
        duplicates=float(duplicates_per_batch(ids, global_batch).mean()),
        window_mean=float(distinct.mean()), window_worst=int(distinct.min()),
        uniform_duplicates=global_batch - uniform_distinct(captions, global_batch),
        uniform_window_mean=uniform_distinct(captions, window),
        uniform_window_worst=uniform_worst_window(captions, len(ids), window, sims, seed))
