"""Frozen-CLIP features: new shards with clip_image/clip_text, input untouched, resumable, read by the loader."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from data_shards.clip_features import build_clip
from data_shards.synthetic import build_synthetic
from data_shards.writer import BuildError
from user_dist.config import DataConfig, TextEncoderConfig
from user_dist.data import train_loader
from user_dist.data_format import ShardError, decode_json, iter_raw_samples, load_manifest, load_npy
from user_dist.tokenizer import build_tokenizer

torch.set_num_threads(1)
D = 16
# A tiny open_clip model (random init): what matters here is the plumbing, not the features.
TINY = {"embed_dim": D,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    build_synthetic(str(root), train_images=10, val_images=4, test_images=4, region_dim=8, shard_size=4)
    (root / "tiny-clip.json").write_text(json.dumps(TINY))
    return root


def clip(data, src, out, **kw):
    return build_clip(str(src), str(out), model="tiny-clip", weights="", model_config=str(data / "tiny-clip.json"),
                      batch_size=3, **kw)


def samples(folder):
    manifest = load_manifest(str(folder))
    return manifest, [r for s in manifest.shards for r in iter_raw_samples(manifest.shard_path(s))]


def test_features_are_added_to_new_shards_and_the_input_is_untouched(data, tmp_path):
    src = data / "shards" / "jpg" / "train"
    before = load_manifest(str(src)).shards
    clip(data, src, tmp_path / "out")
    assert load_manifest(str(src)).shards == before
    manifest, out = samples(tmp_path / "out")
    _, ins = samples(src)
    assert manifest.features["clip_text.npy"] == {"dtype": "float16", "shape": [5, D]}
    assert set(manifest.members) == {"json", "jpg", "clip_image.npy", "clip_text.npy"}
    for a, b in zip(ins, out):
        assert a.key == b.key and a.members["jpg"] == b.members["jpg"] and a.members["json"] == b.members["json"]
        image, text = load_npy(b.members["clip_image.npy"]), load_npy(b.members["clip_text.npy"])
        assert image.shape == (D,) and text.shape == (5, D)
        np.testing.assert_allclose(np.linalg.norm(text.astype(np.float64), axis=1), 1, atol=2e-3)


def test_region_shards_take_their_images_from_jpg_shards_by_image_id(data, tmp_path):
    with pytest.raises(BuildError, match="no jpg member; pass --images-from"):
        clip(data, data / "shards" / "regions" / "val", tmp_path / "x")
    clip(data, data / "shards" / "regions" / "val", tmp_path / "joined", images_from=data / "shards" / "jpg" / "val")
    _, joined = samples(tmp_path / "joined")
    clip(data, data / "shards" / "jpg" / "val", tmp_path / "from_jpg")
    _, direct = samples(tmp_path / "from_jpg")
    for a, b in zip(joined, direct):
        assert a.members["clip_image.npy"] == b.members["clip_image.npy"]
        assert "regions.npy" in a.members


def test_an_interrupted_build_resumes_and_keeps_finished_shards(data, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(data / "shards" / "jpg" / "train", src)
    second = src / "synthetic-train-00001.tar"
    good = second.read_bytes()
    second.write_bytes(good[:3000])  # the build stops at the second shard
    with pytest.raises(ShardError, match="truncated"):
        clip(data, src, tmp_path / "out")
    first = tmp_path / "out" / "synthetic-train-00000.tar"
    assert first.exists() and not (tmp_path / "out" / "manifest.json").exists()
    inode = os.stat(first).st_ino
    second.write_bytes(good)
    clip(data, src, tmp_path / "out")
    assert os.stat(first).st_ino == inode  # kept, not rewritten
    assert load_manifest(str(tmp_path / "out")).num_samples == 10
    # the kept shard's captions are counted too: 4 + 4 + 2 images of 5 captions
    entries = json.loads((tmp_path / "out" / "manifest.json").read_text())["shards"]
    assert [(e["num_captions"], e["max_captions"]) for e in entries] == [(20, 5), (20, 5), (10, 5)]


def test_samples_without_five_captions_are_refused_and_named(data, tmp_path):
    from data_shards.karpathy import build_karpathy

    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(samples(data / "shards" / "jpg" / "val")[1][0].members["jpg"])
    (tmp_path / "mine.json").write_text(json.dumps({"images": [
        {"filename": "a.jpg", "split": "test", "sentences": [{"raw": f"c{j}"} for j in range(3)]}]}))
    build_karpathy(str(tmp_path / "mine.json"), str(tmp_path / "images"), "test", str(tmp_path / "src"))
    with pytest.raises(BuildError, match="sample 'mine_test_000000' has 3 captions; CLIP features are built for 5"):
        clip(data, tmp_path / "src", tmp_path / "out")


def test_refuses_a_complete_output_and_in_place_edits(data, tmp_path):
    src = data / "shards" / "jpg" / "test"
    clip(data, src, tmp_path / "out")
    with pytest.raises(BuildError, match="already holds shards from a complete build"):
        clip(data, src, tmp_path / "out")
    with pytest.raises(BuildError, match="never edited in place"):
        clip(data, src, src)


def test_training_batches_carry_the_clip_features_of_each_pair(data, tmp_path):
    clip(data, data / "shards" / "jpg" / "train", tmp_path / "out")
    _, raws = samples(tmp_path / "out")
    text = {decode_json(r)["image_id"]: load_npy(r.members["clip_text.npy"]) for r in raws}
    image = {decode_json(r)["image_id"]: load_npy(r.members["clip_image.npy"]) for r in raws}
    tokenizer = build_tokenizer(TextEncoderConfig())
    cfg = DataConfig(train_shards=str(tmp_path / "out"), mode="jpg", image_size=32, num_workers=0, caption_aug=False)
    for b in train_loader(cfg, tokenizer, 7, rank=0, world_size=1, epoch=0, seed=0):
        assert b["clip_image"].shape == (7, D) and b["clip_text"].shape == (7, D)
        for row, image_id in enumerate(b["image_ids"].tolist()):
            assert torch.equal(b["clip_image"][row], torch.from_numpy(image[image_id].astype(np.float32)))
            assert any(torch.equal(b["clip_text"][row], torch.from_numpy(t.astype(np.float32))) for t in text[image_id])
