"""Whole training jobs on web-style shards served by a real HTTP server on 127.0.0.1: the built-in
web-style set (two weighted sources drawn with replacement) on 2 ranks; SIGKILL and resume give the
uninterrupted run's losses and weights exactly."""
import os
import subprocess

import pytest

from conftest import PYTHON, ROOT, child_env
from tests.http_shards import ShardServer, write_web_shards
from test_train_job import assert_resumed_run_matches, killed_after_checkpoint, run

pytestmark = pytest.mark.slow

CONFIG = os.path.join(ROOT, "configs", "web_synthetic.yaml")
# configs/web_synthetic.yaml with test-sized towers (the data keys are the config's own, but for the URLs).
TINY = {"model.embed_size": 32, "model.mlp_hidden": 16, "model.text.hidden_size": 32, "model.text.num_layers": 1,
        "model.text.intermediate_size": 64, "queue.size_per_rank": 64, "data.image_size": 32}


@pytest.fixture(scope="module")
def web_root(tmp_path_factory):
    """The synthetic generator's web sources (120 + 40 images, tars of 30, stats files), and a web
    validation split without stats files (counted by reading)."""
    root = tmp_path_factory.mktemp("web_http")
    subprocess.run([PYTHON, "-m", "data_shards", "synthetic", "--out", str(root), "--modes", "jpg", "--train-images",
                    "8", "--val-images", "8", "--test-images", "8", "--shard-size", "8", "--web",
                    "--web-train-images", "120", "--web-extra-images", "40", "--web-shard-size", "30"],
                   check=True, cwd=ROOT, env=child_env(), capture_output=True)
    write_web_shards(str(root / "web" / "val"), 2, 20, sizes=(48, 48), seed=3, key_offset=900000000, stats=False)
    return root


def web_overrides(server, run_root, name, **extra):
    sources = (f"[{{shards: '{server.url('train/{00000..00003}.tar')}', weight: 0.7, name: train}}, "
               f"{{shards: '{server.url('extra/{00000..00001}.tar')}', weight: 0.3, name: extra}}]")
    ov = {**TINY, "data.train_sources": sources, "data.train_num_samples": 240,
          "data.val_shards": server.url("val/{00000..00001}.tar"), "data.shuffle_buffer": 40,
          "data.test_shards": server.url("val/{00000..00001}.tar"), "eval.protocols": "[generic]",
          "eval.batch_size": 20, "train.batch_size": 12, "train.epochs": 2, "train.precision": "fp32",
          "train.deterministic": "true", "train.ckpt_every_steps": 6, "train.max_steps": 12, "train.log_every": 1,
          "train.run_root": run_root, "train.run_name": name, "train.dist_timeout_s": 60, **extra}
    return ["--config", CONFIG, *[f"{k}={v}" for k, v in ov.items()]]


def test_web_synthetic_config_over_http_killed_and_resumed_matches_an_uninterrupted_run(web_root, tmp_path):
    """configs/web_synthetic.yaml (two weighted sources, resampled) read from a loopback HTTP server by
    2 ranks, SIGKILLed after its step-6 checkpoint and resumed, vs the uninterrupted run."""
    with ShardServer(str(web_root / "web")) as server:
        code, out = run("torchrun", web_overrides(server, tmp_path, "full"))
        assert code == 0, out[-3000:]
        assert "2 web shard(s), 40 samples from img2dataset stats files" in out  # the extra source
        assert "val/{00000..00001}.tar: 2 web shard(s), 40 samples counted by reading" in out

        cut_dir = killed_after_checkpoint(web_overrides(server, tmp_path, "cut"), tmp_path, 6)

        code, out = run("torchrun", web_overrides(server, tmp_path, "cut", **{"train.resume": "auto"}))
        assert code == 0, out[-3000:]
        assert "at step 6 " in out and "different data stream" not in out, out[-3000:]
        assert server.requests["extra/00001.tar"] > 0 and server.requests["train/00003.tar"] > 0

    assert_resumed_run_matches(tmp_path / "full", cut_dir, steps=12, epoch=1)
