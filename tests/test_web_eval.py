"""The evaluation job on web-style test shards served over HTTP: one caption per image, counted by
reading (no stats files), scored with the generic protocol; the report shows their pictures; the
COCO protocols refuse the split naming it and its caption counts."""
import json
import re

import numpy as np
import pytest
import torch

from tests.http_shards import ShardServer, write_web_shards
from test_evaluate_cli import job, model_checkpoint
from user_dist.data import _SPLITS, eval_loader
from user_dist.evaluation.metrics import evaluate
from user_dist.tokenizer import build_tokenizer

JPG = ["data.mode=jpg", "data.image_size=32", "model.image.backbone=timm:test_vit", "eval.save_sims=true",
       "eval.protocols=[generic]"]


@pytest.fixture(scope="module")
def web_test(tmp_path_factory):
    root = tmp_path_factory.mktemp("web_test")
    write_web_shards(str(root), 3, 7, sizes=(40, 36), formats=("jpg", "png", "webp"), stats=False, seed=5)
    return root


def test_web_test_split_over_http_is_scored_like_the_towers_and_shows_its_pictures(tmp_path, web_test, caplog,
                                                                                   capsys):
    _SPLITS.clear()
    with ShardServer(str(web_test)) as server:
        url = server.url("{00000..00002}.tar")
        _, cfg, model = model_checkpoint(tmp_path, 100, [*JPG, f"data.test_shards='{url}'"])
        assert job.main(["--run", str(tmp_path), "--towers", "online"]) == 0
        out = tmp_path / "eval" / "step_00000100"
        sims = np.load(out / "sims.npy")
        assert sims.shape == (21, 21)
        # independent: the whole split as one batch through the towers
        [batch] = list(eval_loader(url, cfg.data, build_tokenizer(cfg.model.text), 21))
        with torch.no_grad():
            want = (model.encode_image(batch) @ model.encode_text(batch).T).numpy()
        np.testing.assert_allclose(sims, want, rtol=1e-4, atol=1e-5)
        metrics = json.loads((out / "metrics.json").read_text())
        mine = evaluate(want, "generic", caption_counts=np.ones(21, dtype=np.int64))
        assert metrics["generic"]["rsum"] == pytest.approx(mine["rsum"], abs=1e-6)
        page = (out / "report.html").read_text()
        assert re.findall(r'<img src="data:image/jpeg;base64,', page) and "no picture there" not in page

        model_checkpoint(tmp_path / "coco", 100, [*JPG, f"data.test_shards='{url}'", "eval.protocols=[coco1k]"])
        caplog.clear()
        assert job.main(["--run", str(tmp_path / "coco")]) != 0
        said = caplog.text + capsys.readouterr().err
        assert "protocol coco1k needs exactly 5 per image" in said and "captions per image: 1 for all 21 images" in said and url in said, said[-2000:]
