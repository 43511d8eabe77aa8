"""Caption order of the training stream: an image's captions spread as a uniform shuffle spreads them,
every caption once per epoch, exact resume, and the measurement tool reads the real stream."""
from collections import Counter

import numpy as np
import pytest
import torch

from data_shards.synthetic import build_synthetic
from launch.bench import order as order_stats
from user_dist.config import DataConfig
from user_dist.data import train_loader
from user_dist.data_format import load_manifest

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """3,200 images in 32 shards of 100 (the stream statistics); 240 images in 24 shards of 10 (collated batches)."""
    root = tmp_path_factory.mktemp("order")
    build_synthetic(str(root / "large"), train_images=3200, val_images=1, test_images=1, region_dim=4,
                    shard_size=100, modes=["regions"])
    build_synthetic(str(root / "small"), train_images=240, val_images=1, test_images=1, region_dim=4,
                    shard_size=10, modes=["regions"])
    return root


def config(shards, size="large", **kw):
    # The buffer holds a fifth of a worker's images, as the default 2,000 does on 20,000 images and 2 workers.
    kw.setdefault("shuffle_buffer", 300)
    kw.setdefault("num_workers", 2)
    return DataConfig(train_shards=str(shards / size / "shards" / "regions" / "train"), mode="regions", **kw)


def keys(cfg, tokenizer, batch, rank=0, world_size=1, start_step=0, epoch=0):
    """(steps, B, 2) [image_id, caption] of the rank's stream, from the metadata only."""
    stream = train_loader(cfg, tokenizer, batch, rank=rank, world_size=world_size, epoch=epoch, seed=3,
                          start_step=start_step)
    return np.stack(list(stream.keys(order_stats.MetadataReader(load_manifest(cfg.train_shards), cfg))))


@pytest.mark.parametrize("world_size, batch, workers", [(1, 64, 2), (2, 32, 1), (1, 64, 0)])
def test_spread_order_matches_a_uniform_shuffle_in_duplicates_and_queue_diversity(shards, tokenizer, world_size,
                                                                                   batch, workers):
    stats = order_stats.order_stats(config(shards, num_workers=workers), batch, 1024, world_size, tokenizer=tokenizer)
    assert stats.keys == 16000 and stats.batch == 64
    assert stats.duplicates <= max(0.5, 3 * stats.uniform_duplicates)
    assert stats.window_mean >= 0.95 * stats.uniform_window_mean
    assert stats.window_worst >= 0.95 * stats.uniform_window_worst


def test_grouped_order_clusters_an_images_captions(shards, tokenizer):
    stats = order_stats.order_stats(config(shards, caption_order="grouped"), 64, 1024, tokenizer=tokenizer)
    assert stats.duplicates > 3 * stats.uniform_duplicates
    assert stats.window_mean < 0.6 * stats.uniform_window_mean


def test_spread_order_uses_every_caption_exactly_once_per_epoch(shards, tokenizer):
    cfg = config(shards)  # 32 shards of 100 over 2 ranks x 2 workers: 8,000 pairs per rank = 80 x 100
    seen = Counter(map(tuple, np.concatenate([keys(cfg, tokenizer, 100, r, 2).reshape(-1, 2) for r in range(2)])))
    assert len(seen) == 3200 * 5 and set(seen.values()) == {1}


def test_each_pass_gives_each_image_one_caption_drawn_at_random(shards, tokenizer):
    passes = keys(config(shards, num_workers=0), tokenizer, 100).reshape(5, 3200, 2)  # 1 worker: 5 passes
    assert all(len(set(one[:, 0])) == 3200 for one in passes)
    first = Counter(passes[0, :, 1].tolist())  # which caption of each image comes first: uniform over 0..4
    assert sorted(first) == [0, 1, 2, 3, 4] and min(first.values()) > 3200 / 5 * 0.8


def test_resume_in_a_later_pass_gives_the_same_keys(shards, tokenizer):
    cfg = config(shards)
    full = keys(cfg, tokenizer, 64, epoch=2)
    assert np.array_equal(keys(cfg, tokenizer, 64, start_step=177, epoch=2), full[177:])  # pass 4 of 5


def test_order_stats_reads_the_keys_of_the_collated_stream(shards, tokenizer):
    cfg = config(shards, "small", shuffle_buffer=20)
    stream = train_loader(cfg, tokenizer, 16, rank=1, world_size=2, epoch=1, seed=3, start_step=5)
    batches = list(stream)
    collated = [b["image_ids"] for b in batches]
    full = [torch.from_numpy(k[:, 0]) for k in stream.keys()]
    metadata = [torch.from_numpy(k[:, 0]) for k in keys(cfg, tokenizer, 16, 1, 2, start_step=5, epoch=1)]
    assert len(collated) == len(full) == len(metadata) == 1200 // 32 - 5
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(collated, full, metadata))
