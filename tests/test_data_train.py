"""The training stream: equal steps on every rank, epoch coverage, seeded order, exact resume, batch layout."""
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from data_shards.synthetic import build_synthetic
from user_dist.config import ConfigError, DataConfig
from user_dist.data import IMAGE_MEAN, IMAGE_STD, train_loader
from user_dist.data_format import decode_json, iter_raw_samples, load_manifest

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """120 images in 12 shards of 10 (balanced), and in 18 shards of 7 (last one holds 1)."""
    root = tmp_path_factory.mktemp("train")
    build_synthetic(str(root / "even"), train_images=120, val_images=4, test_images=4, region_dim=16, shard_size=10)
    build_synthetic(str(root / "uneven"), train_images=120, val_images=4, test_images=4, region_dim=16,
                    shard_size=7, modes=["regions"])
    return root


def config(shards, layout="even", mode="regions", **kw):
    kw.setdefault("num_workers", 2)
    kw.setdefault("max_text_len", 64)
    return DataConfig(train_shards=str(shards / layout / "shards" / mode / "train"), mode=mode, **kw)


def epoch(cfg, tokenizer, batch_size, world_size, **kw):
    kw.setdefault("epoch", 0)
    kw.setdefault("seed", 0)
    return [list(train_loader(cfg, tokenizer, batch_size, rank=r, world_size=world_size, **kw))
            for r in range(world_size)]


def captions_by_key(folder):
    manifest = load_manifest(folder)
    return {decode_json(r)["image_id"]: decode_json(r)["captions"]
            for s in manifest.shards for r in iter_raw_samples(manifest.shard_path(s))}


def test_every_rank_runs_the_same_number_of_full_batches_on_uneven_shards(shards, tokenizer):
    cfg = config(shards, "uneven")
    streams = [train_loader(cfg, tokenizer, 16, rank=r, world_size=2, epoch=0, seed=0) for r in range(2)]
    assert [len(s) for s in streams] == [600 // 32] * 2
    batches = [list(s) for s in streams]
    assert [len(b) for b in batches] == [18, 18]
    assert all(b["input_ids"].shape[0] == 16 and b["regions"].shape[0] == 16 for rank in batches for b in rank)


def test_a_balanced_epoch_uses_every_caption_exactly_once(shards, tokenizer):
    cfg = config(shards, caption_aug=False)
    texts = captions_by_key(cfg.train_shards)
    seen = Counter()
    for rank in epoch(cfg, tokenizer, 15, 2):  # 600 pairs = 2 ranks x 20 steps x 15
        assert len(rank) == 20
        for b in rank:
            for image_id, ids in zip(b["image_ids"].tolist(), b["input_ids"]):
                seen[image_id, tokenizer.decode(ids, skip_special_tokens=True)] += 1
    expected = Counter({(i, c.lower()): 1 for i, caps in texts.items() for c in caps})
    assert seen == expected


def test_pairs_of_one_image_are_spread_over_batches(shards, tokenizer):
    [rank] = epoch(config(shards, num_workers=0, shuffle_buffer=200), tokenizer, 20, 1)
    first = rank[0]["image_ids"].tolist()
    assert max(Counter(first).values()) < 5


def test_fewer_shards_than_ranks_times_workers_is_a_config_error_with_the_numbers(shards, tokenizer):
    with pytest.raises(ConfigError, match=r"has 12 shards, fewer than world_size x data.num_workers = 4 x 4 = 16"):
        train_loader(config(shards, num_workers=4), tokenizer, 8, rank=0, world_size=4, epoch=0, seed=0)


def test_order_depends_on_seed_and_epoch_only(shards, tokenizer):
    cfg = config(shards, region_drop_prob=0.3)
    a, b = (epoch(cfg, tokenizer, 30, 2, epoch=1)[1] for _ in range(2))
    assert all(torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["regions"], y["regions"])
               for x, y in zip(a, b))
    other_epoch = epoch(cfg, tokenizer, 30, 2, epoch=2)[1]
    assert not torch.equal(a[0]["image_ids"], other_epoch[0]["image_ids"])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_in_the_middle_of_an_epoch_gives_the_same_batches(shards, tokenizer, num_workers):
    cfg = config(shards, "uneven", num_workers=num_workers, region_drop_prob=0.2)  # augmentation on
    full = list(train_loader(cfg, tokenizer, 16, rank=1, world_size=2, epoch=3, seed=5))
    resumed = train_loader(cfg, tokenizer, 16, rank=1, world_size=2, epoch=3, seed=5, start_step=7)
    assert len(resumed) == len(full) - 7
    tail = list(resumed)
    assert len(tail) == len(full) - 7
    for x, y in zip(full[7:], tail):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_region_batches_are_zero_padded_with_a_mask(shards, tokenizer):
    b = epoch(config(shards, num_workers=0), tokenizer, 12, 1)[0][0]
    # The shards' float16 travels to the device, which converts (half the bytes to copy and pin).
    assert b["regions"].dtype == torch.float16 and b["regions"].shape[::2] == (12, 16)
    assert b["region_mask"].dtype == torch.bool and b["region_mask"].shape == b["regions"].shape[:2]
    assert (b["regions"][~b["region_mask"]] == 0).all() and b["region_mask"].sum(1).min() >= 2
    assert b["input_ids"].dtype == torch.int64 and b["attention_mask"].dtype == torch.int64
    assert b["input_ids"].shape == b["attention_mask"].shape and b["input_ids"].shape[0] == 12
    assert (b["input_ids"][:, 0] == tokenizer.cls_token_id).all()
    assert b["image_ids"].dtype == torch.int64 and b["image_ids"].shape == (12,)


def test_caption_augmentation_masks_words_in_training(shards, tokenizer):
    rank = epoch(config(shards, num_workers=0, caption_aug_prob=0.5), tokenizer, 60, 1)[0]
    ids = torch.cat([b["input_ids"].flatten() for b in rank])
    assert (ids == tokenizer.mask_token_id).sum() > 0.1 * (ids > 0).sum()


def test_jpg_batches_hold_normalised_images(shards, tokenizer):
    import io

    cfg = config(shards, mode="jpg", num_workers=0, image_size=64)  # the rendered size: no resampling
    b = epoch(cfg, tokenizer, 10, 1)[0][0]
    assert b["images"].shape == (10, 3, 64, 64) and b["images"].dtype == torch.float32 and "regions" not in b
    manifest = load_manifest(cfg.train_shards)
    jpgs = {decode_json(r)["image_id"]: r.members["jpg"]
            for s in manifest.shards for r in iter_raw_samples(manifest.shard_path(s))}
    image = Image.open(io.BytesIO(jpgs[b["image_ids"][0].item()])).convert("RGB")
    pixels = np.asarray(image, dtype=np.float64).transpose(2, 0, 1) / 255.0
    expected = (pixels - np.array(IMAGE_MEAN)[:, None, None]) / np.array(IMAGE_STD)[:, None, None]
    np.testing.assert_allclose(b["images"][0].numpy(), expected, atol=1e-5)
