"""The built-in synthetic dataset: both modes, every split, deterministic, not solvable word by word."""
import json
import os
import re
from collections import Counter

import numpy as np
import pytest

from data_shards import synthetic
from data_shards.synthetic import build_synthetic, generate_split
from data_shards.writer import BuildError
from user_dist.data_format import decode_json, iter_raw_samples, load_manifest, load_npy

SIZES = dict(train_images=30, val_images=12, test_images=20)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    build_synthetic(str(out), region_dim=32, shard_size=8, **SIZES)
    return out


def samples(folder):
    manifest = load_manifest(str(folder))
    return [r for s in manifest.shards for r in iter_raw_samples(manifest.shard_path(s))]


def test_every_split_is_built_in_both_modes_with_the_asked_sizes(built):
    for mode in ("regions", "jpg"):
        for split, n in (("train", 30), ("val", 12), ("test", 20)):
            manifest = load_manifest(str(built / "shards" / mode / split))
            assert manifest.num_samples == n and manifest.split == split
    assert load_manifest(str(built / "shards" / "regions" / "val")).features["regions.npy"]["shape"] == [None, 32]
    assert os.path.isfile(built / "raw" / "dataset_synthetic.json")


def test_both_modes_hold_the_same_images_and_captions_in_the_same_order(built):
    regions = [decode_json(r) for r in samples(built / "shards" / "regions" / "test")]
    jpgs = [decode_json(r) for r in samples(built / "shards" / "jpg" / "test")]
    assert regions == jpgs
    assert len({m["image_id"] for m in regions}) == 20


def test_images_have_five_distinct_captions_and_a_variable_number_of_regions(built):
    counts = set()
    for raw in samples(built / "shards" / "regions" / "train"):
        assert len(set(decode_json(raw)["captions"])) == 5
        regions, boxes = load_npy(raw.members["regions.npy"]), load_npy(raw.members["boxes.npy"])
        assert regions.dtype == np.float16 and regions.shape[1] == 32 and boxes.shape == (len(regions), 4)
        counts.add(len(regions))
    assert len(counts) >= 3


def test_same_seed_gives_identical_shards_and_another_seed_differs(built, tmp_path):
    build_synthetic(str(tmp_path / "a"), region_dim=32, shard_size=8, modes=["regions"], **SIZES)
    build_synthetic(str(tmp_path / "b"), region_dim=32, shard_size=8, modes=["regions"], seed=1, **SIZES)
    ref = load_manifest(str(built / "shards" / "regions" / "val")).shards
    assert load_manifest(str(tmp_path / "a" / "shards" / "regions" / "val")).shards == ref
    assert load_manifest(str(tmp_path / "b" / "shards" / "regions" / "val")).shards[0].sha256 != ref[0].sha256
    assert not os.path.exists(tmp_path / "a" / "shards" / "jpg")


def test_skip_existing_keeps_built_folders_and_refuses_other_parameters(built):
    manifest = built / "shards" / "regions" / "val" / "manifest.json"
    before = os.stat(manifest).st_mtime_ns
    build_synthetic(str(built), region_dim=32, shard_size=8, skip_existing=True, **SIZES)
    assert os.stat(manifest).st_mtime_ns == before
    with pytest.raises(BuildError, match="other parameters"):
        build_synthetic(str(built), region_dim=64, shard_size=8, skip_existing=True, **SIZES)
    with pytest.raises(BuildError, match="already holds shards"):
        build_synthetic(str(built), region_dim=32, shard_size=8, **SIZES)


def test_captions_are_true_to_the_scene():
    for entry in generate_split("val", 50, seed=0):
        names = {(o["colour"], o["shape"]) for o in entry["scene"]}
        for sentence in entry["sentences"]:
            for colour, shape in mentioned(sentence["raw"]):
                assert (colour, shape) in names, (sentence["raw"], entry["scene"])


def mentioned(caption):
    """(colour, shape) pairs named in a caption, synonyms resolved."""
    colour_of = {w: c for c, (_, words) in synthetic.COLOURS.items() for w in words}
    shape_of = {w: s for s, words in synthetic.SHAPES.items() for w in words}
    shape_words = "|".join(sorted(shape_of, key=len, reverse=True))
    found = re.findall(rf"\b({'|'.join(colour_of)}) ({shape_words})\b", caption)
    return [(colour_of[c], shape_of[s]) for c, s in found]


def test_no_caption_is_identified_by_its_words_alone():
    """Other images hold every colour and every shape a caption names, bound differently."""
    entries = generate_split("test", 400, seed=0)
    scenes = [({o["colour"] for o in e["scene"]}, {o["shape"] for o in e["scene"]},
               {(o["colour"], o["shape"]) for o in e["scene"]}) for e in entries]
    decoys = []
    for i, entry in enumerate(entries):
        pairs = mentioned(entry["sentences"][0]["raw"])
        colours, shapes = {c for c, _ in pairs}, {s for _, s in pairs}
        decoys.append(sum(1 for j, (cs, ss, bound) in enumerate(scenes)
                          if j != i and colours <= cs and shapes <= ss and not set(pairs) <= bound))
    assert np.median(decoys) >= 1, Counter(decoys)
    words = Counter(w for e in entries for w in set(re.findall("[a-z]+", " ".join(s["raw"] for s in e["sentences"]))))
    assert min(words.values()) >= 20, words  # every word is shared by many images


def test_skip_existing_redoes_a_folder_left_unfinished(built):
    folder = built / "shards" / "jpg" / "val"
    os.remove(folder / "manifest.json")  # as after an interrupted build
    build_synthetic(str(built), region_dim=32, shard_size=8, skip_existing=True, **SIZES)
    assert load_manifest(str(folder)).num_samples == 12


def test_every_caption_has_an_id_unique_over_all_splits(built):
    ids = []
    for split in ("train", "val", "test"):
        for raw in samples(built / "shards" / "regions" / split):
            meta = decode_json(raw)
            assert meta["caption_ids"] == [5 * meta["image_id"] + j for j in range(5)]
            ids += meta["caption_ids"]
    assert len(set(ids)) == len(ids) == 5 * 62


def test_manifests_count_five_captions_per_image(built):
    shards = load_manifest(str(built / "shards" / "jpg" / "train")).shards
    raw = json.load(open(built / "shards" / "jpg" / "train" / "manifest.json"))["shards"]
    assert [(e["num_captions"], e["max_captions"]) for e in raw] == [(5 * s.num_samples, 5) for s in shards]


def objects_mask(pixels):
    """(H, W) bool: pixels far from the image's noisy grey background."""
    return np.abs(pixels - np.median(pixels, axis=(0, 1))).max(axis=-1) > 50


def test_a_scene_drawn_stretched_and_resized_square_looks_like_its_64px_picture():
    """What the web set relies on: its 256-512 px images resized to 64 x 64 show the jpg splits' scenes."""
    entries = generate_split("val", 20, seed=0)
    small = [objects_mask(np.asarray(synthetic.draw_scene(e["scene"], np.random.default_rng(k)), np.float64))
             for k, e in enumerate(entries)]
    for k, e in enumerate(entries):
        big = synthetic.draw_scene(e["scene"], np.random.default_rng(100 + k), 480, 272)
        mask = objects_mask(np.asarray(big.resize((64, 64), synthetic.Image.BICUBIC), np.float64))
        iou = [(mask & s).sum() / (mask | s).sum() for s in small]
        assert iou[k] > 0.8 and max(iou[:k] + iou[k + 1:]) < 0.5, iou
