"""Karpathy JSON + image folder -> jpg shards, on a generated COCO-style fixture."""
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from data_shards.__main__ import main
from data_shards.karpathy import build_karpathy
from data_shards.writer import BuildError
from user_dist.data_format import decode_json, iter_raw_samples, load_manifest

SPLITS = ["train", "restval", "val", "test", "test", "train", "test"]


def jpeg(seed):
    pixels = np.random.default_rng(seed).integers(0, 255, (12, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture
def coco(tmp_path):
    """dataset_coco.json + train2014/ val2014/ folders, as distributed by Karpathy."""
    images = []
    for k, split in enumerate(SPLITS):
        folder = "train2014" if split == "train" else "val2014"
        name = f"COCO_{folder}_{k:012d}.jpg"
        os.makedirs(tmp_path / "images" / folder, exist_ok=True)
        (tmp_path / "images" / folder / name).write_bytes(jpeg(k))
        images.append({"filepath": folder, "filename": name, "split": split, "cocoid": 1000 + k, "imgid": k,
                       "sentences": [{"raw": f"Image {k}, caption {j}.", "tokens": []} for j in range(5)]})
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"dataset": "coco", "images": images}))
    return tmp_path, path


def read(out):
    manifest = load_manifest(str(out))
    return [r for s in manifest.shards for r in iter_raw_samples(manifest.shard_path(s))]


def test_round_trip_keeps_jpeg_bytes_captions_and_order(coco):
    root, path = coco
    build_karpathy(str(path), str(root / "images"), "test", str(root / "out"), shard_size=2)
    samples = read(root / "out")
    ks = [k for k, s in enumerate(SPLITS) if s == "test"]
    assert [r.key for r in samples] == ["coco_test_000000", "coco_test_000001", "coco_test_000002"]
    for raw, k in zip(samples, ks):
        meta = decode_json(raw)
        assert meta == {"image_id": 1000 + k, "captions": [f"Image {k}, caption {j}." for j in range(5)],
                        "split": "test", "source": "coco"}
        assert raw.members["jpg"] == jpeg(k)
    manifest = load_manifest(str(root / "out"))
    assert manifest.members == ("jpg", "json") and manifest.num_samples == 3


def test_restval_goes_to_train(coco):
    root, path = coco
    build_karpathy(str(path), str(root / "images"), "train", str(root / "out"))
    assert [decode_json(r)["image_id"] for r in read(root / "out")] == [1000, 1001, 1005]


def test_missing_image_is_named(coco):
    root, path = coco
    os.remove(root / "images" / "val2014" / "COCO_val2014_000000000003.jpg")
    with pytest.raises(BuildError, match="missing image file for 'COCO_val2014_000000000003.jpg'"):
        build_karpathy(str(path), str(root / "images"), "test", str(root / "out"))
    assert not os.path.exists(root / "out" / "manifest.json")


def test_unreadable_jpeg_is_named(coco):
    root, path = coco
    bad = root / "images" / "val2014" / "COCO_val2014_000000000004.jpg"
    bad.write_bytes(jpeg(4)[:60])
    with pytest.raises(BuildError, match="unreadable image file .*COCO_val2014_000000000004.jpg"):
        build_karpathy(str(path), str(root / "images"), "test", str(root / "out"))


def with_caption_counts(path, counts):
    """Give fixture image k counts[k] captions ('Image k, caption j.', j < count), with sentids 9000 + 10 k + j."""
    data = json.loads(path.read_text())
    for k, n in counts.items():
        data["images"][k]["sentences"] = [{"raw": f"Image {k}, caption {j}.", "sentid": 9000 + 10 * k + j}
                                          for j in range(n)]
    path.write_text(json.dumps(data))


def test_images_keep_all_their_captions_in_order_with_their_ids(coco):
    root, path = coco
    with_caption_counts(path, {3: 1, 4: 7, 6: 5})
    build_karpathy(str(path), str(root / "images"), "test", str(root / "out"))
    metas = [decode_json(r) for r in read(root / "out")]
    assert [m["captions"] for m in metas] == [[f"Image {k}, caption {j}." for j in range(n)]
                                              for k, n in ((3, 1), (4, 7), (6, 5))]
    assert [m["caption_ids"] for m in metas] == [[9000 + 10 * k + j for j in range(n)]
                                                 for k, n in ((3, 1), (4, 7), (6, 5))]


def test_first_five_keeps_the_first_five_of_images_with_more(coco):
    root, path = coco
    with_caption_counts(path, {2: 6})
    main(["karpathy", "--json", str(path), "--images", str(root / "images"), "--split", "val",
          "--out", str(root / "out"), "--first-five"])
    [meta] = [decode_json(r) for r in read(root / "out")]
    assert meta["captions"] == [f"Image 2, caption {j}." for j in range(5)]
    assert meta["caption_ids"] == [9000 + 20 + j for j in range(5)]
    assert load_manifest(str(root / "out")).build["first_five"] is True


def test_first_five_refuses_an_image_with_fewer_naming_its_id_and_count(coco, capsys):
    root, path = coco
    with_caption_counts(path, {4: 3})
    assert main(["karpathy", "--json", str(path), "--images", str(root / "images"), "--split", "test",
                 "--out", str(root / "out"), "--first-five"]) == 2
    assert "image 'COCO_val2014_000000000004.jpg' (id 1004) has 3 captions; --first-five needs at least 5" \
        in capsys.readouterr().err
    assert not os.path.exists(root / "out" / "manifest.json")


def test_an_image_without_captions_is_refused_and_named(coco):
    root, path = coco
    with_caption_counts(path, {6: 0})
    with pytest.raises(BuildError, match=r"'COCO_val2014_000000000006.jpg' \(id 1006\) has no captions"):
        build_karpathy(str(path), str(root / "images"), "test", str(root / "out"))


def test_coco_annotation_ids_cover_every_kept_caption(coco):
    root, path = coco
    with_caption_counts(path, {3: 2})
    val = coco_captions_file(root / "captions_val2014.json", [3, 4, 6])
    build_karpathy(str(path), str(root / "images"), "test", str(root / "out"), coco_captions=[val])
    assert decode_json(read(root / "out")[0])["caption_ids"] == [500034, 500033]


def test_manifest_counts_the_captions_of_each_shard(coco):
    root, path = coco
    with_caption_counts(path, {3: 1, 4: 7, 6: 2})
    build_karpathy(str(path), str(root / "images"), "test", str(root / "out"), shard_size=2)
    entries = json.loads((root / "out" / "manifest.json").read_text())["shards"]
    assert [(e["num_samples"], e["num_captions"], e["max_captions"]) for e in entries] == [(2, 8, 7), (1, 2, 2)]


def test_unknown_split_lists_the_splits_found(coco):
    root, path = coco
    with pytest.raises(BuildError, match="no image in split 'dev'; splits found: restval, test, train, val"):
        build_karpathy(str(path), str(root / "images"), "dev", str(root / "out"))


def test_flickr_layout_without_filepath(tmp_path):
    (tmp_path / "flickr30k-images").mkdir()
    (tmp_path / "flickr30k-images" / "1000092795.jpg").write_bytes(jpeg(0))
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps({"dataset": "flickr30k", "images": [
        {"filename": "1000092795.jpg", "split": "test", "imgid": 7,
         "sentences": [{"raw": f"c{j}"} for j in range(5)]}]}))
    build_karpathy(str(path), str(tmp_path / "flickr30k-images"), "test", str(tmp_path / "out"))
    [raw] = read(tmp_path / "out")
    assert raw.key == "flickr30k_test_000000" and decode_json(raw)["image_id"] == 7


def test_own_data_needs_only_file_names_splits_and_five_captions(tmp_path):
    """The minimal JSON docs/data.md gives for a user's own image-caption data:
    no dataset name, no filepath, no ids."""
    (tmp_path / "photos").mkdir()
    images = []
    for k in range(3):
        (tmp_path / "photos" / f"p{k}.jpg").write_bytes(jpeg(k))
        images.append({"filename": f"p{k}.jpg", "split": "train" if k < 2 else "test",
                       "sentences": [{"raw": f"photo {k} caption {j}"} for j in range(5)]})
    path = tmp_path / "my_captions.json"
    path.write_text(json.dumps({"images": images}))
    build_karpathy(str(path), str(tmp_path / "photos"), "train", str(tmp_path / "out"))
    samples = read(tmp_path / "out")
    assert [decode_json(r) for r in samples] == [
        {"image_id": k, "captions": [f"photo {k} caption {j}" for j in range(5)], "split": "train",
         "source": "my_captions"} for k in range(2)]
    assert [r.members["jpg"] for r in samples] == [jpeg(0), jpeg(1)]


# ----------------------------------------------------------------------------- caption ids


def with_sentids(path):
    """Give the fixture's sentences Karpathy-style sentids (9000 + 10 k + j)."""
    data = json.loads(path.read_text())
    for k, image in enumerate(data["images"]):
        for j, s in enumerate(image["sentences"]):
            s["sentid"] = 9000 + 10 * k + j
    path.write_text(json.dumps(data))


def coco_captions_file(path, images, text=lambda k, j: f"Image {k}, caption {j}.", skip=()):
    """A COCO captions_*.json for the fixture's images: annotation id 500000 + 10 k + (4 - j), the
    captions listed in reverse order so that matching must go by text, not by position."""
    annotations = [{"image_id": 1000 + k, "id": 500000 + 10 * k + (4 - j), "caption": text(k, j)}
                   for k in images for j in reversed(range(5)) if (k, j) not in skip]
    path.write_text(json.dumps({"images": [], "annotations": annotations}))
    return str(path)


def test_without_coco_captions_the_sentids_are_recorded(coco):
    root, path = coco
    with_sentids(path)
    build_karpathy(str(path), str(root / "images"), "test", str(root / "out"))
    ks = [k for k, s in enumerate(SPLITS) if s == "test"]
    assert [decode_json(r)["caption_ids"] for r in read(root / "out")] == [[9000 + 10 * k + j for j in range(5)]
                                                                          for k in ks]
    assert load_manifest(str(root / "out")).build["caption_ids"] == "sentid"


def test_coco_captions_give_coco_annotation_ids_matched_by_image_and_text(coco):
    root, path = coco
    with_sentids(path)
    # COCO's text differs in case, spacing and punctuation; a repeated caption takes the next free id
    data = json.loads(path.read_text())
    data["images"][3]["sentences"][4]["raw"] = data["images"][3]["sentences"][3]["raw"]
    path.write_text(json.dumps(data))
    text = lambda k, j: f"  image {k} caption {min(j, 3) if k == 3 else j}\n"  # noqa: E731
    train = coco_captions_file(root / "captions_train2014.json", [0, 5], text)
    val = coco_captions_file(root / "captions_val2014.json", [1, 2, 3, 4, 6], text)
    assert main(["karpathy", "--json", str(path), "--images", str(root / "images"), "--split", "test",
                 "--out", str(root / "out"), "--coco-captions", f"{train},{val}"]) == 0
    got = [decode_json(r)["caption_ids"] for r in read(root / "out")]
    assert got[0] == [500000 + 10 * 3 + (4 - j) for j in range(3)] + [500030, 500031]  # the repeat: ids 4-3, 4-4
    assert got[1:] == [[500000 + 10 * k + (4 - j) for j in range(5)] for k in (4, 6)]
    manifest = load_manifest(str(root / "out"))
    assert manifest.build["caption_ids"] == "coco" and len(manifest.build["coco_captions"]) == 2


def test_captions_without_a_coco_match_stop_the_build_and_are_listed(coco, capsys):
    root, path = coco
    ann = coco_captions_file(root / "captions_val2014.json", [3, 4, 6], skip={(4, 2), (6, 0)})
    assert main(["karpathy", "--json", str(path), "--images", str(root / "images"), "--split", "test",
                 "--out", str(root / "out"), "--coco-captions", ann]) == 2
    err = capsys.readouterr().err
    assert "2 caption(s) have no match" in err
    assert "image 1004: 'Image 4, caption 2.'" in err and "image 1006: 'Image 6, caption 0.'" in err
    assert not os.path.exists(root / "out" / "manifest.json")


def test_a_file_that_is_not_coco_captions_is_named(coco):
    root, path = coco
    (root / "bad.json").write_text(json.dumps({"images": []}))
    with pytest.raises(BuildError, match="bad.json: not a COCO captions file"):
        build_karpathy(str(path), str(root / "images"), "test", str(root / "out"), coco_captions=[str(root / "bad.json")])
