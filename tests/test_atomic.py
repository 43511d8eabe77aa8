"""Atomic writes (user_dist.atomic): a reader sees the old file or the whole
new one, and a failed write leaves nothing behind."""
import json
import os

import pytest
import torch

from user_dist.atomic import AtomicFile, atomic_json, atomic_save, atomic_write, is_temporary, temporary_path


def test_a_write_replaces_the_file_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "meta.json"
    path.write_text("old")
    atomic_json(str(path), {"step": 3})
    assert json.loads(path.read_text()) == {"step": 3}
    assert os.listdir(tmp_path) == ["meta.json"]


def test_a_writer_that_fails_midway_leaves_the_old_file_untouched(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("old: 1\n")
    with pytest.raises(RuntimeError, match="input broke"):
        with AtomicFile(str(path)) as f:
            f.write("new: ")
            raise RuntimeError("input broke")
    assert path.read_text() == "old: 1\n"
    assert os.listdir(tmp_path) == ["config.yaml"]


def test_the_temporary_file_is_hidden_until_the_rename(tmp_path):
    path = str(tmp_path / "shard-00000.tar")
    out = AtomicFile(path, "wb")
    out.file.write(b"x")
    names = os.listdir(tmp_path)
    assert names == [os.path.basename(temporary_path(path))] and names[0].startswith(".")
    assert is_temporary(names[0]) and not is_temporary("shard-00000.tar") and not is_temporary("a.tmp.12")
    out.commit()
    assert os.listdir(tmp_path) == ["shard-00000.tar"]


def test_a_full_disk_keeps_the_old_file_and_leaves_no_temporary(small_disk):
    disk = small_disk(1)
    path = os.path.join(disk.path, "model_fp32.pt")
    atomic_save(path, lambda tmp: torch.save({"w": torch.zeros(4)}, tmp))
    with pytest.raises((OSError, RuntimeError)):
        atomic_write(path, b"\0" * (2 * 2 ** 20))  # twice the disk
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.zeros(4))
    assert os.listdir(disk.path) == ["model_fp32.pt"]
