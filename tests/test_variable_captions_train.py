"""Images with 1..7 captions: an epoch is every caption once, in both caption orders, with and without
loader workers; steps per epoch follow the captions present."""
from collections import Counter

import numpy as np
import pytest
import torch

from data_shards.writer import SampleEncoder, ShardWriter, sample_json
from user_dist.config import DataConfig
from user_dist.data import _SPLITS, train_loader

torch.set_num_threads(1)
# 1..7 captions per image; every shard of 4 images holds 16, so that each of 2 workers gets
# 48 pairs, a whole number of batches (otherwise a few pairs repeat or drop: docs/data.md).
COUNTS = [1, 7, 3, 5, 7, 1, 5, 3, 2, 6, 4, 4, 6, 2, 4, 4, 3, 5, 1, 7, 5, 3, 7, 1]
B = 6


@pytest.fixture(scope="module")
def varied(tmp_path_factory):
    out = tmp_path_factory.mktemp("varied")
    encoder = SampleEncoder(["regions.npy"], {"regions.npy": {"dtype": "float16", "shape": [None, 4]}})
    with ShardWriter(str(out), split="train", source="var", encoder=encoder, shard_size=4,
                     build={"command": "test"}) as w:
        for i, n in enumerate(COUNTS):
            w.add(f"var_train_{i:06d}", sample_json(i, [f"image {i} caption {j}" for j in range(n)], "train", "var"),
                  {"regions.npy": np.full((2, 4), i, dtype=np.float16)})
    return out


@pytest.fixture(autouse=True)
def _fresh_split_cache():
    _SPLITS.clear()
    yield
    _SPLITS.clear()


@pytest.mark.parametrize("order", ["spread", "grouped"])
@pytest.mark.parametrize("workers", [0, 2])
def test_every_caption_once_per_epoch(varied, tokenizer, order, workers):
    cfg = DataConfig(train_shards=str(varied), caption_order=order, num_workers=workers, caption_aug=False,
                     shuffle_buffer=8, max_text_len=16)
    stream = train_loader(cfg, tokenizer, B, rank=0, world_size=1, epoch=0, seed=0)
    assert stream.steps_per_epoch == sum(COUNTS) // B == 16
    pairs = Counter()
    for batch in stream:
        for image, ids in zip(batch["image_ids"].tolist(), batch["input_ids"].tolist()):
            text = tokenizer.decode(ids, skip_special_tokens=True)
            assert text.startswith(f"image {image} caption ")
            pairs[text] += 1
    assert set(pairs.values()) == {1}
    assert set(pairs) == {f"image {i} caption {j}" for i, n in enumerate(COUNTS) for j in range(n)}
