"""Whole training jobs on web-style shards served by a real HTTP server on 127.0.0.1: two weighted
sources drawn with replacement, 2 ranks, SIGKILL and resume give the uninterrupted run's batches,
losses and weights exactly."""
import os

import pytest

from conftest import kill_job
from tests.http_shards import ShardServer, write_web_shards
from test_train_job import assert_same_tensors, final_state, losses, run, start, tiny_overrides
from user_dist import checkpoint as ckpt

pytestmark = pytest.mark.slow

TINY_JPG = {"data.mode": "jpg", "data.image_size": 32, "model.image.backbone": "timm:test_vit",
            "model.mlp_hidden": 16, "model.text.vocab_size": 30522}


@pytest.fixture(scope="module")
def web_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("web_http")
    write_web_shards(str(root / "a"), 4, 30, sizes=(48, 40), seed=1)
    write_web_shards(str(root / "b"), 2, 15, sizes=(40, 48), seed=2, key_offset=500000, formats=("png", "webp"))
    write_web_shards(str(root / "val"), 2, 20, sizes=(48, 48), seed=3, key_offset=900000, stats=False)
    return root


def web_overrides(server, tiny_shards, run_root, name, **extra):
    sources = (f"[{{shards: '{server.url('a/{00000..00003}.tar')}', weight: 0.7, name: a}}, "
               f"{{shards: '{server.url('b/{00000..00001}.tar')}', weight: 0.3, name: b}}]")
    return tiny_overrides(tiny_shards, run_root, name, **{
        **TINY_JPG, "data.train_sources": sources, "data.resampled": "true", "data.train_num_samples": 240,
        "data.val_shards": server.url("val/{00000..00001}.tar"), "data.shuffle_buffer": 40,
        "train.batch_size": 12, "train.deterministic": "true", "train.validate_every_epochs": 0, "train.ckpt_every_steps": 6, "train.max_steps": 12,
        **extra})


def test_a_resampled_http_run_killed_and_resumed_matches_an_uninterrupted_one(web_root, tiny_shards, tmp_path):
    with ShardServer(str(web_root)) as server:
        code, out = run("torchrun", web_overrides(server, tiny_shards, tmp_path, "full"))
        assert code == 0, out[-3000:]
        assert "2 web shard(s), 30 samples from img2dataset stats files" in out  # source b, counted from stats
        # assert "val/{00000..00001}.tar: 2 web shard(s), 40 samples counted by reading" in out

        proc = start("torchrun", web_overrides(server, tiny_shards, tmp_path, "cut"), env={"USER_DIST_FAULT_KILL": "6"})
        try:
            out, _ = proc.communicate(timeout=300)
        finally:
            kill_job(proc, f"train.run_root={tmp_path} ")
        assert proc.returncode != 0 and "kills itself after step 6" in out, out[-3000:]
        cut_dir = tmp_path / "cut"
        assert os.path.basename(ckpt.latest_checkpoint(str(cut_dir / "checkpoints"))) == "step_00000006"

        code, out = run("torchrun", web_overrides(server, tiny_shards, tmp_path, "cut", **{"train.resume": "auto"}))
        assert code == 0, out[-3000:]
        assert "at step 6 " in out and "different data stream" not in out, out[-3000:]
        assert server.requests["b/00000.tar"] > 0 and server.requests["a/00003.tar"] > 0

    full, cut = losses(tmp_path / "full"), losses(cut_dir)
    assert sorted(full) == sorted(cut) == list(range(1, 13))
    assert [full[s] for s in range(1, 13)] == [cut[s] for s in range(1, 13)]
    meta_a, model_a, mom_a, q_a = final_state(tmp_path / "full")
    meta_b, model_b, mom_b, q_b = final_state(cut_dir)
    assert meta_a.step == meta_b.step == 12 and meta_a.epoch == meta_b.epoch == 1
    assert_same_tensors(model_a, model_b, "online towers")
    assert_same_tensors(mom_a, mom_b, "momentum towers")
    for r in (0, 1):
        assert_same_tensors(q_a[r], q_b[r], f"queue shard of rank {r}")
