"""Shard writing: atomic shards, manifest with checksums, refusal to overwrite, WebDataset compatibility."""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data_shards.__main__ import main
from user_dist.atomic import is_temporary
from data_shards.writer import (BuildError, CaptionCounts, SampleEncoder, ShardWriter, TarShard, count_captions,
                                sample_json, write_manifest)
from user_dist.data_format import iter_raw_samples, load_manifest, load_npy, verify_checksums

ENCODER = SampleEncoder(["regions.npy"], {"regions.npy": {"dtype": "float16", "shape": [None, 4]}})


def write_split(out, n=5, shard_size=2, **kw):
    with ShardWriter(str(out), split="test", source="unit", encoder=ENCODER, shard_size=shard_size,
                     build={"command": "unit"}, **kw) as w:
        for k in range(n):
            w.add(f"unit_test_{k:06d}", sample_json(k, [f"caption {k} {j}" for j in range(5)], "test", "unit"),
                  {"regions.npy": np.full((k + 1, 4), k, dtype=np.float16)})


def test_manifest_lists_every_shard_with_its_sha256_and_sample_count(tmp_path):
    write_split(tmp_path)
    manifest = load_manifest(str(tmp_path))
    assert [s.name for s in manifest.shards] == ["unit-test-00000.tar", "unit-test-00001.tar", "unit-test-00002.tar"]
    assert [s.num_samples for s in manifest.shards] == [2, 2, 1]
    for shard in manifest.shards:
        data = open(tmp_path / shard.name, "rb").read()
        assert shard.sha256 == hashlib.sha256(data).hexdigest() and shard.bytes == len(data)
    assert verify_checksums(manifest) == []
    raw = json.load(open(tmp_path / "manifest.json"))
    assert raw["num_samples"] == 5 and raw["split"] == "test" and raw["members"] == ["json", "regions.npy"]
    assert raw["features"]["regions.npy"] == {"dtype": "float16", "shape": [None, 4]}
    assert raw["tool_version"]


def test_samples_round_trip_in_order(tmp_path):
    write_split(tmp_path)
    manifest = load_manifest(str(tmp_path))
    samples = [r for s in manifest.shards for r in iter_raw_samples(manifest.shard_path(s))]
    assert [r.key for r in samples] == [f"unit_test_{k:06d}" for k in range(5)]
    assert json.loads(samples[3].members["json"])["captions"][4] == "caption 3 4"
    np.testing.assert_array_equal(load_npy(samples[3].members["regions.npy"]), np.full((4, 4), 3, np.float16))


def test_same_input_gives_byte_identical_shards(tmp_path):
    write_split(tmp_path / "a")
    write_split(tmp_path / "b")
    assert [s.sha256 for s in load_manifest(str(tmp_path / "a")).shards] == \
        [s.sha256 for s in load_manifest(str(tmp_path / "b")).shards]


def test_refuses_to_overwrite_existing_shards_unless_told(tmp_path):
    write_split(tmp_path, n=3)
    with pytest.raises(BuildError, match="already holds shards.*--overwrite"):
        write_split(tmp_path, n=3)
    write_split(tmp_path, n=1, overwrite=True)
    assert load_manifest(str(tmp_path)).num_samples == 1
    assert sorted(os.listdir(tmp_path)) == ["manifest.json", "unit-test-00000.tar"]


def test_failed_build_leaves_no_shard_and_no_manifest(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(str(tmp_path), split="test", source="unit", encoder=ENCODER, shard_size=2,
                         build={}) as w:
            for k in range(3):
                w.add(f"k{k}", sample_json(k, ["c"] * 5, "test", "unit"),
                      {"regions.npy": np.zeros((1, 4), np.float16)})
            raise RuntimeError("input broke in the middle of the second shard")
    assert os.listdir(tmp_path) == []


def test_interrupted_shard_exists_only_under_a_hidden_temporary_name(tmp_path):
    # A killed process stops between add() and finish(): nothing may look like a shard.
    shard = TarShard(str(tmp_path / "unit-test-00000.tar"))
    shard.add("k0", {"json": b"{}"})
    names = os.listdir(tmp_path)
    assert len(names) == 1 and names[0].startswith(".") and not names[0].endswith(".tar")
    shard.finish()
    assert os.listdir(tmp_path) == ["unit-test-00000.tar"]


def test_encoder_rejects_samples_that_break_the_declared_layout():
    meta = sample_json(0, ["c"] * 5, "test", "unit")
    with pytest.raises(BuildError, match="dtype float32, expected float16"):
        ENCODER.encode("k", meta, {"regions.npy": np.zeros((2, 4), np.float32)})
    with pytest.raises(BuildError, match=r"shape \(2, 3\), expected \('R', 4\)"):
        ENCODER.encode("k", meta, {"regions.npy": np.zeros((2, 3), np.float16)})
    with pytest.raises(BuildError, match="must not contain '.'"):
        ENCODER.encode("a.b", meta, {"regions.npy": np.zeros((2, 4), np.float16)})
    with pytest.raises(BuildError, match="members"):
        ENCODER.encode("k", meta, {})


def test_webdataset_reads_our_shards(tmp_path):
    import webdataset as wds

    write_split(tmp_path, n=3, shard_size=3)
    ds = wds.WebDataset(str(tmp_path / "unit-test-00000.tar"), shardshuffle=False)
    samples = list(ds)
    assert [s["__key__"] for s in samples] == [f"unit_test_{k:06d}" for k in range(3)]
    assert json.loads(samples[2]["json"])["image_id"] == 2


def test_cli_has_help_for_every_command(capsys):
    out = subprocess.run([sys.executable, "-m", "data_shards", "--help"], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)), check=True).stdout
    for command in ("karpathy", "precomp", "synthetic", "clip"):
        assert command in out
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
        assert "--out" in capsys.readouterr().out


def test_cli_reports_build_errors_without_a_traceback(tmp_path, capsys):
    assert main(["precomp", "--root", str(tmp_path), "--split", "test", "--out", str(tmp_path / "o")]) == 2
    assert "missing file" in capsys.readouterr().err


def test_a_full_disk_leaves_no_partial_shard_and_no_manifest(small_disk, capsys):
    disk = small_disk(1)  # a real 1 MB file system: the first split does not fit
    out = os.path.join(disk.path, "synthetic")
    assert main(["synthetic", "--out", out, "--train-images", "200", "--val-images", "10", "--test-images", "10",
                 "--region-dim", "256", "--modes", "regions", "--shard-size", "50"]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and f"while writing under {out}" in err
    assert "were removed and no manifest.json was written" in err
    left = [os.path.join(b, n) for b, _, names in os.walk(out) for n in names]
    assert not [p for p in left if is_temporary(p) or p.endswith("manifest.json")], left


# ----------------------------------------------------------------------------- caption ids


def write_ids_split(out, caption_ids=lambda k: [10 * k + j for j in range(5)], n=5):
    with ShardWriter(str(out), split="test", source="unit", encoder=ENCODER, shard_size=2,
                     build={"command": "unit"}) as w:
        for k in range(n):
            meta = sample_json(f"img{k}", [f"caption {k} {j}" for j in range(5)], "test", "unit", caption_ids(k))
            w.add(f"unit_test_{k:06d}", meta, {"regions.npy": np.full((3, 4), k, dtype=np.float16)})


def test_split_ids_are_read_in_split_order_from_the_json_members_alone(tmp_path):
    from user_dist.data_format import read_split_ids

    write_ids_split(tmp_path)
    ids = read_split_ids(str(tmp_path))
    assert ids.image_ids == [f"img{k}" for k in range(5)]
    assert ids.caption_ids == [10 * k + j for k in range(5) for j in range(5)]


def test_split_ids_of_shards_without_caption_ids_have_none(tmp_path):
    from user_dist.data_format import read_split_ids

    write_split(tmp_path)
    ids = read_split_ids(str(tmp_path))
    assert ids.image_ids == list(range(5)) and ids.caption_ids is None


def test_split_ids_of_a_truncated_shard_are_refused(tmp_path):
    from user_dist.data_format import ShardError, read_split_ids

    write_ids_split(tmp_path)
    shard = tmp_path / "unit-test-00001.tar"
    shard.write_bytes(shard.read_bytes()[:2000])  # cut inside the second sample's regions
    with pytest.raises(ShardError, match="unit-test-00001.tar: truncated or corrupt tar"):
        read_split_ids(str(tmp_path))


@pytest.mark.parametrize("ids,message", [([1, 2, 3, 4], "not 5 distinct"), ([1, 2, 3, 4, 4], "not 5 distinct"),
                                         ([1, 2, 3, 4, True], "not 5 distinct"), ([1, 2, 3, 4, None], "not 5")])
def test_bad_caption_ids_are_refused_when_writing_and_reading(tmp_path, ids, message):
    from user_dist.data_format import RawSample, ShardError, decode_json

    meta = sample_json(0, [f"c{j}" for j in range(5)], "test", "unit", ids)
    with pytest.raises(BuildError, match=f"sample 'k' \\(image 0\\): caption ids .* are {message}"):
        ENCODER.encode("k", meta, {"regions.npy": np.zeros((1, 4), np.float16)})
    with pytest.raises(ShardError, match="sample 'k' member 'json' has caption_ids"):
        decode_json(RawSample("s.tar", "k", {"json": json.dumps(meta).encode()}))


def test_manifest_counts_each_shards_captions_and_its_largest_sample(tmp_path):
    counts = [1, 7, 5, 2, 3]
    with ShardWriter(str(tmp_path), split="test", source="unit", encoder=ENCODER, shard_size=2,
                     build={"command": "unit"}) as w:
        for k, n in enumerate(counts):
            w.add(f"unit_test_{k:06d}", sample_json(k, [f"caption {k} {j}" for j in range(n)], "test", "unit",
                                                    [10 * k + j for j in range(n)]),
                  {"regions.npy": np.zeros((1, 4), dtype=np.float16)})
    entries = json.load(open(tmp_path / "manifest.json"))["shards"]
    assert [(e["num_samples"], e["num_captions"], e["max_captions"]) for e in entries] == \
        [(2, 8, 7), (2, 7, 5), (1, 3, 3)]
    assert [count_captions(str(tmp_path / e["name"])) for e in entries] == \
        [CaptionCounts(8, 7), CaptionCounts(7, 5), CaptionCounts(3, 3)]


def test_a_manifest_without_caption_counts_stays_readable(tmp_path):
    write_split(tmp_path)
    manifest = load_manifest(str(tmp_path))
    write_manifest(str(tmp_path), split="test", source="unit", members=manifest.members,
                   features=manifest.features, shards=manifest.shards, build={})
    entries = json.load(open(tmp_path / "manifest.json"))["shards"]
    assert not any("num_captions" in e or "max_captions" in e for e in entries)
    assert load_manifest(str(tmp_path)).shards == manifest.shards

