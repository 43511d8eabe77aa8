"""Several training sources and resampling: the batch sequence is a pure function of (seed, epoch,
step, rank, workers, sources); weights set the sources' shares; image ids are namespaced by source."""
from collections import Counter

import pytest
import torch

from tests.http_shards import write_web_shards
from user_dist.config import ConfigError, DataConfig, SourceConfig, load_config
from user_dist.data import _SPLITS, train_loader
from user_dist.data_format import image_id_to_int

torch.set_num_threads(1)
B = 8


@pytest.fixture(autouse=True)
def _fresh_split_cache():
    _SPLITS.clear()
    yield
    _SPLITS.clear()


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Source a: 4 shards x 12 samples; source b: 2 shards x 6, with the same keys as a's first ones."""
    root = tmp_path_factory.mktemp("mix")
    write_web_shards(str(root / "a"), 4, 12, sizes=(20, 20), seed=1)
    write_web_shards(str(root / "b"), 2, 6, sizes=(20, 20), seed=2)
    return root


def mixed(two, wa=1.0, wb=1.0, **kw):
    kw.setdefault("num_workers", 0)
    return DataConfig(mode="jpg", image_size=8, max_text_len=16, train_sources=[
        SourceConfig(shards=str(two / "a" / "{00000..00003}.tar"), weight=wa, name="a"),
        SourceConfig(shards=str(two / "b" / "{00000..00001}.tar"), weight=wb, name="b")], **kw)


def ids(stream):
    return [tuple(b["image_ids"].tolist()) for b in stream]


def source_ids(two):
    a = {image_id_to_int(f"a/{s * 10000 + i:09d}") for s in range(4) for i in range(12)}
    b = {image_id_to_int(f"b/{s * 10000 + i:09d}") for s in range(2) for i in range(6)}
    return a, b


def test_sources_without_resampling_are_one_epoch_of_both_with_namespaced_ids(two, tokenizer):
    stream = train_loader(mixed(two), tokenizer, B, rank=0, world_size=1, epoch=0, seed=0)
    got = [i for b in ids(stream) for i in b]
    a, b = source_ids(two)
    assert len(stream) == 60 // B and len(got) == len(set(got)) == 56 and set(got) <= a | b
    assert a & b == set()  # key 000000000 is in both sources, and stays two images


def test_weights_need_resampling(two):
    with pytest.raises(ConfigError, match="weights need data.resampled=true"):
        load_config(None, [f"data.train_sources=[{{shards: '{two}/a/{{00000..00003}}.tar', weight: 3}}]"])


def test_resampled_stream_is_a_function_of_seed_epoch_rank_and_workers(two, tokenizer):
    cfg = mixed(two, 3.0, 1.0, resampled=True, train_num_samples=160, num_workers=2, shuffle_buffer=20)
    run = lambda **kw: ids(train_loader(cfg, tokenizer, B, **{"rank": 0, "world_size": 2, "epoch": 0, "seed": 0,
                                                              **kw}))
    first = run()
    assert len(first) == 160 // (2 * B)
    assert run() == first
    assert run(epoch=1) != first and run(rank=1) != first and run(seed=1) != first
    stream = train_loader(cfg, tokenizer, B, rank=0, world_size=2, epoch=0, seed=0, start_step=4)
    tail = list(stream)
    assert [tuple(b["image_ids"].tolist()) for b in tail] == first[4:]
    full = list(train_loader(cfg, tokenizer, B, rank=0, world_size=2, epoch=0, seed=0))
    assert all(torch.equal(x["images"], y["images"]) and torch.equal(x["input_ids"], y["input_ids"])
               for x, y in zip(tail, full[4:]))


def test_weights_are_the_sources_shares_of_the_samples(two, tokenizer):
    """Source a has 4x b's samples: equal per-shard draws would give a 80% of the samples; weights 1:3
    must give a 25% instead."""
    cfg = mixed(two, 1.0, 3.0, resampled=True, train_num_samples=1600, shuffle_buffer=50)
    a, b = source_ids(two)
    counts = Counter("a" if i in a else "b" for batch in ids(train_loader(cfg, tokenizer, B, rank=0, world_size=1,
                                                                            epoch=0, seed=0)) for i in batch)
    assert counts["a"] + counts["b"] == 1600
    assert 0.19 < counts["a"] / 1600 < 0.31, counts


def test_resampled_epoch_size_defaults_to_all_samples_and_is_in_the_fingerprint(two, tokenizer):
    stream = train_loader(mixed(two, resampled=True), tokenizer, B, rank=0, world_size=1, epoch=0, seed=0)
    assert len(stream) == 60 // B and stream.fingerprint["resampled_epoch"] == 60
    other = train_loader(mixed(two, 1.0, 2.0, resampled=True), tokenizer, B, rank=0, world_size=1, epoch=0, seed=0)
    assert other.fingerprint["shards"] != stream.fingerprint["shards"]
