"""The evaluation stream: ordered, every image exactly once across ranks and workers, no augmentation."""
import pytest
import torch

from data_shards.synthetic import build_synthetic
from user_dist.config import DataConfig
from user_dist.data import eval_loader, num_images
from user_dist.data_format import decode_json, iter_raw_samples, load_manifest, load_npy

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """A 23-image test split in shards of 5 (the last holds 3)."""
    root = tmp_path_factory.mktemp("eval")
    build_synthetic(str(root), train_images=4, val_images=4, test_images=23, region_dim=8, shard_size=5,
                    modes=["regions"])
    folder = str(root / "shards" / "regions" / "test")
    manifest = load_manifest(folder)
    return folder, [r for s in manifest.shards for r in iter_raw_samples(manifest.shard_path(s))]


def test_two_ranks_with_two_workers_read_every_image_once_in_source_order(split, tokenizer):
    folder, raws = split
    cfg = DataConfig(num_workers=2, caption_aug_prob=0.5, max_text_len=64)
    seen = []
    for rank in range(2):
        stream = eval_loader(folder, cfg, tokenizer, 4, rank=rank, world_size=2)
        assert stream.num_images == 23 == num_images(folder)
        batches = list(stream)
        assert len(batches) == len(stream) == 3
        seen += [i for b in batches for i in b["image_index"].tolist()]
    assert seen == list(range(23))


def test_batches_hold_the_source_features_and_five_captions_per_image(split, tokenizer):
    folder, raws = split
    cfg = DataConfig(num_workers=2, max_text_len=64)
    batches = list(eval_loader(folder, cfg, tokenizer, 6, rank=1, world_size=2))
    for b in batches:
        index = b["image_index"].tolist()
        assert b["input_ids"].shape[0] == 5 * len(index) == b["attention_mask"].shape[0]
        for row, i in enumerate(index):
            meta = decode_json(raws[i])
            assert b["image_ids"][row].item() == meta["image_id"]
            regions = load_npy(raws[i].members["regions.npy"])
            assert torch.equal(b["regions"][row, :len(regions)], torch.from_numpy(regions))  # float16, bit for bit
            assert b["region_mask"][row].sum().item() == len(regions)
            texts = tokenizer.batch_decode(b["input_ids"][5 * row:5 * row + 5], skip_special_tokens=True)
            assert texts == [c.lower() for c in meta["captions"]]  # no augmentation


def test_more_ranks_than_batches_leaves_some_ranks_with_a_short_range(split, tokenizer):
    folder, _ = split
    cfg = DataConfig(num_workers=0)
    ranges = [eval_loader(folder, cfg, tokenizer, 50, rank=r, world_size=3).image_range for r in range(3)]
    assert ranges == [(0, 7), (7, 15), (15, 23)]
