"""Bad shards: clear errors naming shard and key by default; skip mode counts and logs."""
import io
import logging
import os
import shutil

import numpy as np
import pytest
import torch

from data_shards.synthetic import build_synthetic
from data_shards.writer import TarShard, encode_json, encode_npy, write_manifest
from user_dist.config import DataConfig
from user_dist.data import eval_loader, train_loader
from user_dist.data_format import ShardError, ShardInfo, iter_raw_samples, load_manifest, sha256_file

torch.set_num_threads(1)
F = 8


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    build_synthetic(str(root), train_images=4, val_images=4, test_images=12, region_dim=F, shard_size=4,
                    modes=["regions"])
    return root / "shards" / "regions" / "test"


def with_bad_sample(tmp_path, good, members):
    """A copy of the good split whose shard 1 has its second sample replaced by `members`."""
    folder = tmp_path / "split"
    shutil.copytree(good, folder)
    manifest = load_manifest(str(folder))
    shard = manifest.shards[1]
    raws = list(iter_raw_samples(manifest.shard_path(shard)))
    os.remove(manifest.shard_path(shard))
    with TarShard(manifest.shard_path(shard)) as out:
        for k, raw in enumerate(raws):
            out.add(raw.key, members if k == 1 else raw.members)
        out.finish()
    shards = [s if s.name != shard.name else ShardInfo(s.name, s.num_samples, sha256_file(manifest.shard_path(s)),
                                                           os.path.getsize(manifest.shard_path(s)))
              for s in manifest.shards]
    write_manifest(str(folder), split="test", source="synthetic", members=manifest.members,
                   features=manifest.features, shards=shards, build={})
    return str(folder), raws[1].key


def meta():
    return encode_json({"image_id": 5, "captions": ["c"] * 5, "split": "test", "source": "synthetic"})


def read_all(folder, tokenizer, on_error="error"):
    cfg = DataConfig(num_workers=0, on_error=on_error)
    return [i for b in eval_loader(folder, cfg, tokenizer, 3) for i in b["image_index"].tolist()]


@pytest.mark.parametrize("members, message", [
    ({"json": None}, r"has no 'regions.npy' member \(it has: json\)"),
    ({"json": None, "regions.npy": encode_npy(np.zeros((3, F), np.float32))}, "dtype float32, expected float16"),
    ({"json": None, "regions.npy": encode_npy(np.zeros((3, F + 1), np.float16))}, r"shape \(3, 9\), expected"),
    ({"json": None, "regions.npy": encode_npy(np.zeros((0, F), np.float16))}, r"shape \(0, 8\), expected"),
    ({"json": b"{not json", "regions.npy": encode_npy(np.zeros((3, F), np.float16))}, "not valid sample metadata"),
    ({"json": encode_json({"image_id": 1, "captions": []}), "regions.npy": encode_npy(np.zeros((3, F), np.float16))},
     "must hold a list of one or more caption strings"),
    ({"json": encode_json({"image_id": 1, "captions": ["a", 3]}), "regions.npy": encode_npy(np.zeros((3, F), np.float16))},
     "must hold a list of one or more caption strings"),
])
def test_bad_sample_is_an_error_naming_shard_and_key(tmp_path, good, tokenizer, members, message):
    members = {k: (meta() if v is None else v) for k, v in members.items()}
    folder, key = with_bad_sample(tmp_path, good, members)
    with pytest.raises(ShardError, match=message) as error:
        read_all(folder, tokenizer)
    assert "synthetic-test-00001.tar" in str(error.value) and f"'{key}'" in str(error.value)


def test_pickled_arrays_are_refused_not_unpickled(tmp_path, good, tokenizer):
    buf = io.BytesIO()
    np.save(buf, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    folder, key = with_bad_sample(tmp_path, good, {"json": meta(), "regions.npy": buf.getvalue()})
    with pytest.raises(ShardError, match=f"'{key}' member 'regions.npy' is not a readable .npy.*pickled"):
        read_all(folder, tokenizer)


def test_skip_mode_counts_and_logs_bad_samples_and_reads_the_rest(tmp_path, good, tokenizer, caplog):
    folder, key = with_bad_sample(tmp_path, good, {"json": meta()})
    with caplog.at_level(logging.WARNING):
        assert read_all(folder, tokenizer, on_error="skip") == [i for i in range(12) if i != 5]
    assert "skipped bad sample (1 so far in this process)" in caplog.text and key in caplog.text


def truncated_copy(tmp_path, good, keep_bytes):
    folder = tmp_path / "split"
    shutil.copytree(good, folder)
    path = folder / "synthetic-test-00001.tar"
    data = path.read_bytes()
    path.write_bytes(data[:keep_bytes(data)])
    return str(folder)


@pytest.mark.parametrize("cut", [lambda d: len(d) // 2, lambda d: 512 * 9])
def test_truncated_shard_is_an_error_naming_the_shard(tmp_path, good, tokenizer, cut):
    folder = truncated_copy(tmp_path, good, cut)
    with pytest.raises(ShardError, match="synthetic-test-00001.tar: truncated, corrupt or unreadable tar after sample"):
        read_all(folder, tokenizer)


def test_corrupt_header_is_detected(tmp_path, good, tokenizer):
    folder = tmp_path / "split"
    shutil.copytree(good, folder)
    path = folder / "synthetic-test-00002.tar"
    data = bytearray(path.read_bytes())
    data[3] ^= 0x20  # a flipped bit in the first member's name
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="synthetic-test-00002.tar: .*bad header checksum"):
        read_all(str(folder), tokenizer)


def test_truncated_shard_in_skip_mode_keeps_the_other_shards(tmp_path, good, tokenizer, caplog):
    folder = truncated_copy(tmp_path, good, lambda d: len(d) // 2)
    with caplog.at_level(logging.WARNING):
        index = read_all(folder, tokenizer, on_error="skip")
    assert set(range(4)) | set(range(8, 12)) <= set(index) and not set(index) >= set(range(4, 8))
    assert "truncated" in caplog.text


def test_training_stream_skips_bad_samples_and_keeps_its_length(tmp_path, good, tokenizer):
    folder, _ = with_bad_sample(tmp_path, good, {"json": meta()})
    cfg = DataConfig(train_shards=folder, num_workers=0, on_error="skip")
    stream = train_loader(cfg, tokenizer, 10, rank=0, world_size=1, epoch=0, seed=0)
    assert len(list(stream)) == len(stream) == 6


def test_missing_manifest_says_how_to_build_shards(tmp_path, tokenizer):
    with pytest.raises(ShardError, match="a folder with no manifest.json; build shards with `python -m data_shards"):
        eval_loader(str(tmp_path), DataConfig(), tokenizer, 4)


def test_mode_without_its_members_is_reported(good, tokenizer):
    with pytest.raises(ShardError, match="data.mode=jpg needs 'jpg' members"):
        eval_loader(str(good), DataConfig(mode="jpg"), tokenizer, 4)
