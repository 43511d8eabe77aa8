"""SCAN / VSE-infinity precomputed layout -> region shards, on generated {split}_ims.npy / caps / ids."""
import tracemalloc

import numpy as np
import pytest

from data_shards.precomp import build_precomp
from data_shards.writer import BuildError
from user_dist.data_format import decode_json, iter_raw_samples, load_manifest, load_npy


def make_precomp(root, split="testall", n=7, regions=36, dim=16, ids_per_caption=False):
    rng = np.random.default_rng(0)
    ims = (rng.standard_normal((n, regions, dim)) * 3).astype(np.float32)
    np.save(root / f"{split}_ims.npy", ims)
    (root / f"{split}_caps.txt").write_text("".join(f"image {k} caption {j} .\n" for k in range(n) for j in range(5)))
    ids = [str(391895 + k) for k in range(n) for _ in range(5 if ids_per_caption else 1)]
    (root / f"{split}_ids.txt").write_text("\n".join(ids) + "\n")
    return ims


def read(out):
    manifest = load_manifest(str(out))
    return manifest, [r for s in manifest.shards for r in iter_raw_samples(manifest.shard_path(s))]


def test_round_trip_keeps_features_as_float16_captions_ids_and_order(tmp_path):
    ims = make_precomp(tmp_path)
    build_precomp(str(tmp_path), "testall", str(tmp_path / "out"), shard_size=3, source="coco")
    manifest, samples = read(tmp_path / "out")
    assert [s.num_samples for s in manifest.shards] == [3, 3, 1]
    assert manifest.features["regions.npy"] == {"dtype": "float16", "shape": [None, 16]}
    for k, raw in enumerate(samples):
        assert raw.key == f"coco_testall_{k:06d}"
        np.testing.assert_array_equal(load_npy(raw.members["regions.npy"]), ims[k].astype(np.float16))
        meta = decode_json(raw)
        assert meta["image_id"] == 391895 + k
        assert meta["captions"] == [f"image {k} caption {j} ." for j in range(5)]


def test_ids_file_with_one_line_per_caption_is_accepted(tmp_path):
    make_precomp(tmp_path, ids_per_caption=True)
    build_precomp(str(tmp_path), "testall", str(tmp_path / "out"))
    assert [decode_json(r)["image_id"] for r in read(tmp_path / "out")[1]] == [391895 + k for k in range(7)]


def test_features_stream_from_the_memory_map(tmp_path):
    make_precomp(tmp_path, n=60, dim=256)  # 60 x 36 x 256 float32 = 2.2 MB
    tracemalloc.start()
    build_precomp(str(tmp_path), "testall", str(tmp_path / "out"), shard_size=10)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1_000_000, f"peak {peak} bytes: the .npy was loaded instead of memory-mapped"


def test_mismatched_n_between_ims_and_caps_is_reported(tmp_path):
    make_precomp(tmp_path)
    with open(tmp_path / "testall_caps.txt", "a") as f:
        f.write("one caption too many\n")
    with pytest.raises(BuildError, match=r"mismatched N: .*testall_ims.npy has N=7 images but .*36 lines "
                                         r"\(expected 5N=35\)"):
        build_precomp(str(tmp_path), "testall", str(tmp_path / "out"))


def test_ids_that_fit_neither_n_nor_5n_are_reported(tmp_path):
    make_precomp(tmp_path)
    (tmp_path / "testall_ids.txt").write_text("1\n2\n")
    with pytest.raises(BuildError, match="testall_ids.txt: 2 lines, expected N=7"):
        build_precomp(str(tmp_path), "testall", str(tmp_path / "out"))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(BuildError, match="missing file .*dev_ims.npy"):
        build_precomp(str(tmp_path), "dev", str(tmp_path / "out"))


def test_caption_ids_file_gives_each_sample_its_five_ids_in_caption_order(tmp_path):
    make_precomp(tmp_path)
    (tmp_path / "cids.txt").write_text("".join(f"{700000 + 5 * k + j}\n" for k in range(7) for j in range(5)))
    build_precomp(str(tmp_path), "testall", str(tmp_path / "out"), shard_size=3, caption_ids=str(tmp_path / "cids.txt"))
    manifest, samples = read(tmp_path / "out")
    assert [decode_json(r)["caption_ids"] for r in samples] == [[700000 + 5 * k + j for j in range(5)]
                                                               for k in range(7)]
    assert manifest.build["caption_ids"].endswith("cids.txt")


def test_caption_ids_file_of_the_wrong_length_or_with_repeats_is_refused(tmp_path):
    make_precomp(tmp_path)
    (tmp_path / "short.txt").write_text("".join(f"{k}\n" for k in range(34)))
    with pytest.raises(BuildError, match="short.txt: 34 lines, but .*testall_caps.txt has 35 captions"):
        build_precomp(str(tmp_path), "testall", str(tmp_path / "out"), caption_ids=str(tmp_path / "short.txt"))
    (tmp_path / "twice.txt").write_text("".join(f"{k if k != 12 else 3}\n" for k in range(35)))
    with pytest.raises(BuildError, match="caption id 3 appears in samples 'coco_testall_000000' and "
                                         "'coco_testall_000002'"):
        build_precomp(str(tmp_path), "testall", str(tmp_path / "out"), caption_ids=str(tmp_path / "twice.txt"),
                      source="coco")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_without_a_caption_ids_file_samples_have_none(tmp_path):
    make_precomp(tmp_path, n=2)
    build_precomp(str(tmp_path), "testall", str(tmp_path / "out"))
    assert all("caption_ids" not in decode_json(r) for r in read(tmp_path / "out")[1])
