"""Foreign (img2dataset-layout) shards read as they are, from disk, a real HTTP server on 127.0.0.1,
a pipe: command and fsspec; sample counts; bad samples under data.on_error; variable captions."""
import io
import os
import shutil
import tarfile
import time

import pytest
import torch

from tests.http_shards import ShardServer, write_web_shards
from user_dist.config import ConfigError, DataConfig
from user_dist.data import _SPLITS, eval_loader, train_loader
from user_dist.data_format import ShardError, image_id_to_int
from user_dist.sources import check_location, open_split

torch.set_num_threads(1)
B = 8


@pytest.fixture(autouse=True)
def _fresh_split_cache():
    _SPLITS.clear()  # every test resolves its locations anew
    yield
    _SPLITS.clear()


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    """4 shards x 12 samples, jpg/png/webp/jpeg images, stats files beside the tars."""
    root = tmp_path_factory.mktemp("web")
    write_web_shards(str(root / "a"), 4, 12, formats=("jpg", "png", "webp", "jpeg"), sizes=(40, 30))
    return root


def cfg_for(spec, **kw):
    kw.setdefault("num_workers", 0)
    kw.setdefault("image_size", 16)
    kw.setdefault("max_text_len", 16)
    return DataConfig(train_shards=spec, mode="jpg", **kw)


def keys_of(batches):
    return [tuple(b["image_ids"].tolist()) for b in batches]


def test_counts_come_from_stats_then_config_else_an_error_naming_the_key(web, tmp_path):
    spec = str(web / "a" / "{00000..00003}.tar")
    split = open_split(spec)
    assert (split.layout, split.counted, split.num_samples, split.num_pairs) == ("web", "stats", 48, 48)
    assert open_split(spec, num_samples=50).counted == "stats"  # the stats files win over a count given
    bare = tmp_path / "bare"
    shutil.copytree(web / "a", bare, ignore=shutil.ignore_patterns("*_stats.json"))
    given = open_split(str(bare / "{00000..00003}.tar"), num_samples=50)
    assert given.counted == "config" and [s.num_samples for s in given.shards] == [12, 13, 12, 13]
    with pytest.raises(ShardError, match=r"4 of 4 shard\(s\) have no img2dataset stats file.*data.train_num_samples"):
        open_split(str(bare / "{00000..00003}.tar"))
    assert open_split(str(bare / "{00000..00003}.tar"), count="read").num_samples == 48
    (bare / "00001_stats.json").write_text('{"count": 3}')
    with pytest.raises(ShardError, match="00001_stats.json: not an img2dataset stats file"):
        open_split(str(bare / "{00000..00003}.tar"))


def test_location_errors_name_the_key_and_the_fix(web, tmp_path):
    with pytest.raises(ShardError, match=r"data.val_shards '.*\{00000..00009\}.tar': 6 of 10 shard\(s\) do not exist"):
        check_location(str(web / "a" / "{00000..00009}.tar"), "data.val_shards")
    with pytest.raises(ShardError, match="a folder with no manifest.json.*give its tars as a pattern"):
        check_location(str(web / "a"), "data.train_shards")
    (tmp_path / "manifest.json").write_text("{}")  # a manifest folder: its count is not the config's to give
    with pytest.raises(ConfigError, match="data.train_num_samples=10 with data.train_shards .* a folder whose manifest"):
        train_loader(DataConfig(train_shards=str(tmp_path), train_num_samples=10), None, B, rank=0, world_size=1,
                     epoch=0, seed=0)


def test_web_epoch_reads_every_sample_once_with_ids_from_json_or_key(web, tmp_path, tokenizer):
    spec = str(web / "a" / "{00000..00003}.tar")
    stream = train_loader(cfg_for(spec, shuffle_buffer=10), tokenizer, B, rank=0, world_size=1, epoch=0, seed=0)
    batches = list(stream)
    assert len(batches) == len(stream) == 48 // B
    ids = [i for b in batches for i in b["image_ids"].tolist()]
    expected = {image_id_to_int(f"{s * 10000 + i:09d}") for s in range(4) for i in range(12)}
    assert len(ids) == len(set(ids)) == 48 and set(ids) == expected
    assert batches[0]["images"].shape == (B, 3, 16, 16)
    # no json member: the sample key is the id
    write_web_shards(str(tmp_path / "nojson"), 2, 8, with_json=False, key_offset=500, sizes=(20, 20))
    stream = train_loader(cfg_for(str(tmp_path / "nojson" / "{00000..00001}.tar")), tokenizer, B, rank=0,
                          world_size=1, epoch=0, seed=0)
    ids = {i for b in stream for i in b["image_ids"].tolist()}
    assert ids == {image_id_to_int(f"{500 + s * 10000 + i:09d}") for s in range(2) for i in range(8)}


def rewrite(src, dst, change):
    """Copy a tar, applying change(name, data) -> data | None (None drops the member)."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for m in tin.getmembers():
            data = change(m.name, tin.extractfile(m).read())
            if data is not None:
                m.size = len(data)
                tout.addfile(m, io.BytesIO(data))


@pytest.mark.parametrize("name,change,message", [
    ("000000003.jpg", lambda d: d[:len(d) // 3], "sample '000000003' member 'jpg' is not a readable image"),
    ("000000003.jpg", lambda d: None, "sample '000000003' has no image member"),
    ("000000003.txt", lambda d: None, "sample '000000003' has no 'txt' caption member"),
    ("000000003.txt", lambda d: b"\xff\xfe bad", "sample '000000003' member 'txt' is not utf-8 text"),
    ("000000003.txt", lambda d: b"  ", "sample '000000003' member 'txt' is empty"),
])
def test_bad_web_sample_is_named_under_error_and_counted_under_skip(tmp_path, tokenizer, name, change, message):
    paths = write_web_shards(str(tmp_path / "w"), 2, 8, sizes=(20, 20))
    rewrite(paths[0], str(tmp_path / "bad.tar"), lambda n, d: change(d) if n == name else d)
    os.replace(tmp_path / "bad.tar", paths[0])
    spec = str(tmp_path / "w" / "{00000..00001}.tar")
    with pytest.raises(ShardError, match=f"00000.tar: {message}"):
        list(train_loader(cfg_for(spec), tokenizer, B, rank=0, world_size=1, epoch=0, seed=0))
    _SPLITS.clear()
    stream = train_loader(cfg_for(spec, on_error="skip"), tokenizer, B, rank=0, world_size=1, epoch=0, seed=0)
    batches = list(stream)
    assert len(batches) == 2  # the epoch keeps its length: the short worker starts its shards again
    skipped = stream.dataset.reader.policy.skipped
    assert skipped >= 1
    bad = image_id_to_int("000000003")
    assert bad not in {i for b in batches for i in b["image_ids"].tolist()}


def test_http_source_gives_the_local_batches_exactly(web, tokenizer):
    local = cfg_for(str(web / "a" / "{00000..00003}.tar"), shuffle_buffer=7, num_workers=2)
    with ShardServer(str(web / "a")) as server:
        remote = cfg_for(server.url("{00000..00003}.tar"), shuffle_buffer=7, num_workers=2)
        got = list(train_loader(remote, tokenizer, B, rank=0, world_size=1, epoch=1, seed=3))
        assert server.requests["00002_stats.json"] == 1 and server.requests["00002.tar"] >= 1
    want = list(train_loader(local, tokenizer, B, rank=0, world_size=1, epoch=1, seed=3))
    assert keys_of(got) == keys_of(want)
    assert all(torch.equal(a["images"], b["images"]) and torch.equal(a["input_ids"], b["input_ids"])
               for a, b in zip(got, want))


def test_http_cut_off_shard_is_an_error_or_a_counted_skip_never_a_hang(web, tokenizer):
    with ShardServer(str(web / "a")) as server:
        size = os.path.getsize(web / "a" / "00001.tar")
        server.cut["00001.tar"] = size // 2
        spec = server.url("{00000..00003}.tar")
        t0 = time.monotonic()
        with pytest.raises(ShardError, match=r"00001.tar: truncated, corrupt or unreadable tar after sample '0000100\d\d'.*"
                                             r"server sent \d+ of \d+ bytes"):
            list(train_loader(cfg_for(spec, io_retries=0), tokenizer, B, rank=0, world_size=1, epoch=0, seed=0))
        _SPLITS.clear()
        stream = train_loader(cfg_for(spec, on_error="skip"), tokenizer, B, rank=0, world_size=1, epoch=0, seed=0)
        batches = list(stream)
        assert time.monotonic() - t0 < 60
    assert len(batches) == 48 // B and stream.dataset.reader.policy.skipped >= 1
    ids = [i for b in batches for i in b["image_ids"].tolist()]
    # the samples after the cut never arrive; the ones before it do
    assert image_id_to_int("000010011") not in ids and image_id_to_int("000010000") in ids


def test_stalled_server_times_out_and_503_is_retried(web, tokenizer):
    with ShardServer(str(web / "a")) as server:
        server.fail["00000.tar"] = 2
        spec = server.url("{00000..00003}.tar")
        assert len(list(train_loader(cfg_for(spec), tokenizer, B, rank=0, world_size=1, epoch=0, seed=0))) == 6
        assert server.requests["00000.tar"] == 3  # two 503 answers, then the shard
        server.stall["00002.tar"] = 4096
        t0 = time.monotonic()
        with pytest.raises(ShardError, match="00002.tar: .*reading failed after"):
            list(train_loader(cfg_for(spec, io_timeout_s=1.0), tokenizer, B, rank=0, world_size=1, epoch=0, seed=0))
        assert time.monotonic() - t0 < 30


def test_pipe_and_fsspec_sources(web, tokenizer):
    folder = web / "a"
    want = keys_of(train_loader(cfg_for(str(folder / "{00000..00003}.tar")), tokenizer, B, rank=0, world_size=1,
                                epoch=0, seed=0))
    _SPLITS.clear()
    piped = cfg_for(f"pipe:cat {folder}/{{00000..00003}}.tar", train_num_samples=48)
    assert keys_of(train_loader(piped, tokenizer, B, rank=0, world_size=1, epoch=0, seed=0)) == want
    _SPLITS.clear()
    failing = cfg_for(f"pipe:cat {folder}/00000.tar; exit 3::pipe:cat {folder}/00001.tar", train_num_samples=24)
    with pytest.raises(ShardError, match="pipe:cat .*00000.tar; exit 3.*the command failed"):
        list(train_loader(failing, tokenizer, B, rank=0, world_size=1, epoch=0, seed=0))
    fsspec = pytest.importorskip("fsspec")
    memory = fsspec.filesystem("memory")
    for name in os.listdir(folder):
        memory.pipe(f"/web/{name}", (folder / name).read_bytes())
    _SPLITS.clear()
    got = keys_of(train_loader(cfg_for("memory://web/{00000..00003}.tar"), tokenizer, B, rank=0, world_size=1,
                               epoch=0, seed=0))
    assert got == want
    for name in os.listdir(folder):  # a store without stats files: missing objects, so the config's count
        if name.endswith(".tar"):
            memory.pipe(f"/bare/{name}", (folder / name).read_bytes())
    _SPLITS.clear()
    got = keys_of(train_loader(cfg_for("memory://bare/{00000..00003}.tar", train_num_samples=48), tokenizer, B,
                               rank=0, world_size=1, epoch=0, seed=0))
    assert got == want


def test_eval_split_of_web_shards_counts_by_reading(web, tmp_path, tokenizer):
    bare = tmp_path / "bare"
    shutil.copytree(web / "a", bare, ignore=shutil.ignore_patterns("*_stats.json"))
    spec = str(bare / "{00000..00003}.tar")
    stream = eval_loader(spec, cfg_for(spec), tokenizer, 10, rank=1, world_size=2)
    batches = list(stream)
    assert stream.num_images == 48 and stream.image_range == (24, 48)
    assert [b["image_index"].tolist() for b in batches] == [list(range(24, 34)), list(range(34, 44)),
                                                           list(range(44, 48))]
    assert all(b["caption_counts"].tolist() == [1] * len(b["image_index"]) for b in batches)
