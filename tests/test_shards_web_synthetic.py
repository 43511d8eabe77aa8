"""The synthetic world in img2dataset's layout, read back with tarfile and PIL only (no project reader)."""
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from collections import defaultdict

import numpy as np
import pytest
import yaml
from PIL import Image

from data_shards import synthetic
from data_shards.__main__ import main
from data_shards.web_synthetic import (DEFAULT_IMAGES, DEFAULT_SHARD_SIZE, EXTRA_SHARD_BASE, brace_pattern,
                                       build_web, shard_counts)
from data_shards.writer import BuildError

IMAGES = {"train": 30, "extra": 24}
SHARD_SIZE = 12
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("web")
    build_web(str(out), images=IMAGES, shard_size=SHARD_SIZE)
    return out


def read_tar(path):
    """{key: {ext: bytes}} in file order, and the member names in file order."""
    samples, names = defaultdict(dict), []
    with tarfile.open(path) as tar:
        for info in tar:
            names.append(info.name)
            key, ext = info.name.split(".", 1)
            samples[key][ext] = tar.extractfile(info).read()
    return dict(samples), names


def source(built, name):
    """[(shard file name, {key: {ext: bytes}})] of one source, in shard order."""
    folder = built / name
    return [(n, read_tar(folder / n)[0]) for n in sorted(os.listdir(folder)) if n.endswith(".tar")]


def file_digests(folder):
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in sorted(os.listdir(folder))}


def test_each_source_holds_numbered_tars_with_img2dataset_stats(built):
    for name, n in IMAGES.items():
        counts = shard_counts(n, SHARD_SIZE)
        tars = [f"{k:05d}.tar" for k in range(len(counts))]
        assert sorted(os.listdir(built / name)) == sorted(tars + [f"{k:05d}_stats.json" for k in range(len(counts))]
                                                          + [".synthetic_web.json"])
        for k, (tar, samples) in enumerate(source(built, name)):
            stats = json.loads((built / name / f"{k:05d}_stats.json").read_text())
            assert stats["successes"] == stats["count"] == len(samples) == counts[k]
            assert stats["failed_to_download"] == stats["failed_to_resize"] == 0
    assert brace_pattern(str(built / "train")) == str(built / "train" / "{00000..00002}.tar")


def test_samples_are_an_image_one_caption_and_json_with_img2dataset_keys(built):
    for name, base in (("train", 0), ("extra", EXTRA_SHARD_BASE)):
        for shard, (tar, samples) in enumerate(source(built, name)):
            _, names = read_tar(built / name / tar)
            keys = list(samples)
            assert keys == [f"{(base + shard) * 10_000 + p:09d}" for p in range(len(samples))]
            assert names == [f"{k}.{ext}" for k in keys for ext in sorted(samples[k])]  # grouped, in key order
            for key, members in samples.items():
                [image_ext] = set(members) - {"txt", "json"}
                meta = json.loads(members["json"])
                text = members["txt"].decode("utf-8")
                assert sorted(members) == sorted([image_ext, "txt", "json"])
                assert meta["key"] == key and meta["caption"] == text and "\n" not in text
                assert meta["status"] == "success" and meta["url"].startswith("http://synthetic.invalid/")
                assert meta["url"].endswith(f"{key}.{image_ext}")


def test_images_decode_with_pil_in_their_format_and_size(built):
    formats = defaultdict(set)
    for name in IMAGES:
        for _, samples in source(built, name):
            for key, members in samples.items():
                [ext] = set(members) - {"txt", "json"}
                meta = json.loads(members["json"])
                with Image.open(io.BytesIO(members[ext])) as im:
                    im.load()
                    formats[name].add(im.format)
                    assert im.format == {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext]
                    assert im.size == (meta["width"], meta["height"]) == (meta["original_width"],
                                                                         meta["original_height"])
                    assert 256 <= im.width <= 512 and 256 <= im.height <= 512
    assert formats == {"train": {"JPEG"}, "extra": {"JPEG", "PNG", "WEBP"}}
    sizes = {json.loads(m["json"])["width"] / json.loads(m["json"])["height"]
             for _, s in source(built, "train") for m in s.values()}
    assert min(sizes) < 0.8 and max(sizes) > 1.25  # portrait and landscape


def test_keys_are_unique_across_sources(built):
    keys = [k for name in IMAGES for _, samples in source(built, name) for k in samples]
    assert len(keys) == len(set(keys)) == sum(IMAGES.values())


def test_captions_come_from_the_synthetic_world_and_name_colours_the_image_shows(built):
    """Each colour a caption names covers a patch of the picture (objects are >= 20 px across)."""
    colour_of = {w: c for c, (_, words) in synthetic.COLOURS.items() for w in words}
    shape_words = {w for words in synthetic.SHAPES.values() for w in words}
    for name in IMAGES:
        for _, samples in source(built, name):
            for members in samples.values():
                [ext] = set(members) - {"txt", "json"}
                text = members["txt"].decode()
                named = {colour_of[w] for w in re.findall("[a-z]+", text) if w in colour_of}
                assert named and any(w in text for w in shape_words), text
                with Image.open(io.BytesIO(members[ext])) as im:
                    pixels = np.asarray(im.convert("RGB"), dtype=np.float64)
                for colour in named:
                    rgb = np.array(synthetic.COLOURS[colour][0], dtype=np.float64)
                    near = (np.linalg.norm(pixels - rgb, axis=-1) < 40).sum()
                    assert near > 150, (text, colour, near)


def test_same_seed_gives_identical_files_and_another_seed_differs(built, tmp_path):
    build_web(str(tmp_path / "a"), images=IMAGES, shard_size=SHARD_SIZE)
    build_web(str(tmp_path / "b"), images=IMAGES, shard_size=SHARD_SIZE, seed=1)
    for name in IMAGES:
        assert file_digests(tmp_path / "a" / name) == file_digests(built / name)
    assert file_digests(tmp_path / "b" / "train")["00000.tar"] != file_digests(built / "train")["00000.tar"]


def test_skip_existing_keeps_a_built_source_and_refuses_other_parameters(built):
    before = os.stat(built / "train" / "00000.tar").st_mtime_ns
    build_web(str(built), images=IMAGES, shard_size=SHARD_SIZE, skip_existing=True)
    assert os.stat(built / "train" / "00000.tar").st_mtime_ns == before
    with pytest.raises(BuildError, match="other parameters"):
        build_web(str(built), images={"train": 31, "extra": 24}, shard_size=SHARD_SIZE, skip_existing=True)
    with pytest.raises(BuildError, match="already exists; pass --skip-existing"):
        build_web(str(built), images=IMAGES, shard_size=SHARD_SIZE)


def test_overwrite_replaces_a_source(tmp_path):
    build_web(str(tmp_path), images={"train": 5, "extra": 3}, shard_size=2)
    build_web(str(tmp_path), images={"train": 3, "extra": 3}, shard_size=2, overwrite=True)
    assert sorted(n for n in os.listdir(tmp_path / "train") if n.endswith(".tar")) == ["00000.tar", "00001.tar"]


def test_a_killed_build_leaves_no_source_folder_and_the_next_build_cleans_up(tmp_path):
    cmd = [sys.executable, "-m", "data_shards", "synthetic", "--out", str(tmp_path), "--modes", "jpg",
           "--train-images", "2", "--val-images", "2", "--test-images", "2", "--web",
           "--web-train-images", "4000", "--web-shard-size", "2000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    web = tmp_path / "web"
    deadline = time.monotonic() + 120
    # Kill once the first tar is being written inside the temporary folder.
    while not (web.is_dir() and any(os.listdir(web / d) for d in os.listdir(web) if d.startswith(".train.tmp-"))):
        assert proc.poll() is None and time.monotonic() < deadline, "the build ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (web / "train").exists() and [d for d in os.listdir(web) if d.startswith(".train.tmp-")]
    build_web(str(web), images={"train": 3, "extra": 2}, shard_size=2)
    assert sorted(os.listdir(web)) == ["extra", "train"]


def test_cli_writes_the_web_set_besides_the_other_shards(tmp_path, capsys):
    assert main(["synthetic", "--out", str(tmp_path), "--modes", "jpg", "--train-images", "3", "--val-images", "2",
                 "--test-images", "2", "--web", "--web-train-images", "5", "--web-extra-images", "3",
                 "--web-shard-size", "2"]) == 0
    out = capsys.readouterr().out.split()
    assert out[-2:] == [str(tmp_path / "web" / "train" / "{00000..00002}.tar"),
                        str(tmp_path / "web" / "extra" / "{00000..00001}.tar")]
    assert os.path.isfile(tmp_path / "shards" / "jpg" / "val" / "manifest.json")


def test_bad_sizes_are_refused():
    with pytest.raises(BuildError, match="--web-shard-size must be in 1..10000"):
        build_web("unused", shard_size=10_001)
    with pytest.raises(BuildError, match="must be positive"):
        build_web("unused", images={"train": 0, "extra": 1})


def test_the_config_names_the_shards_a_default_build_writes():
    with open(os.path.join(ROOT, "configs", "web_synthetic.yaml")) as f:
        data = yaml.safe_load(f)["data"]
    last = {name: len(shard_counts(n, DEFAULT_SHARD_SIZE)) - 1 for name, n in DEFAULT_IMAGES.items()}
    assert [s["shards"] for s in data["train_sources"]] == [
        f"data/synthetic/web/{name}/{{00000..{last[name]:05d}}}.tar" for name in ("train", "extra")]
    assert data["val_shards"] == "data/synthetic/shards/jpg/val" and data["mode"] == "jpg"
