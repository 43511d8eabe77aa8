"""Pictures on the report page, opened in a real browser (headless Chromium).

The evaluation job writes report.html with JPEG thumbnails embedded as data
URIs: from the evaluated jpg shards, or matched by image id from another jpg
shard folder (--images-from) when region shards were evaluated. Chromium
loads the page and a probe script records, after the load event, every
<img>'s naturalWidth: a picture the browser cannot decode has 0. Without
Chromium (Debian: apt-get install -y chromium; .ci/run installs it) the
browser half of each test is skipped, saying so; the page checks still run.
"""
import html
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from test_evaluate_cli import job, model_checkpoint
from user_dist.data_format import decode_json, iter_raw_samples, load_manifest
from user_dist.evaluation.report import example_queries, shown_images, top_k
from user_dist.evaluation.thumbnails import jpeg_data_uri

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
# Runs after the load event (data: images are decoded by then) and leaves its finding in the DOM.
PROBE = ("<script>window.addEventListener('load', () => document.body.setAttribute('data-probe', "
         "JSON.stringify([...document.images].map(i => [i.alt, i.complete, i.naturalWidth]))));</script>")


def browser_images(page: str, tmp_path) -> list:
    """[alt, complete, naturalWidth] of every <img> of ``page`` as headless Chromium loaded it."""
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install -y chromium); the page was checked "
                    "without a browser")
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>"))
    cmd = [CHROMIUM, "--headless", "--disable-gpu", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()]
    if os.geteuid() == 0:
        cmd.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    found = re.search(r'data-probe="([^"]*)"', proc.stdout)
    assert found, f"Chromium (exit {proc.returncode}) did not run the probe:\n{proc.stderr[-3000:]}"
    return json.loads(html.unescape(found.group(1)))


def raw_jpgs(folder):
    """(image_id, jpg bytes, json meta) of a jpg shard folder, in order."""
    manifest = load_manifest(folder)
    return [(decode_json(r)["image_id"], r.members["jpg"], decode_json(r))
            for s in manifest.shards for r in iter_raw_samples(manifest.shard_path(s))]


def picture_cells(sims, examples, missing=()):
    """The split positions of every image cell of the page with a picture, in page order."""
    n = sims.shape[0]
    cells = list(example_queries(examples, n))
    for j in example_queries(examples, 5 * n):
        cells += list(top_k(sims[:, j]))
    return [int(k) for k in cells if k not in missing]


def test_region_shards_show_pictures_matched_by_id_from_another_folder(tmp_path, small_synthetic):
    from data_shards.writer import SampleEncoder, ShardWriter

    samples = raw_jpgs(small_synthetic / "jpg" / "test")
    # Another folder: the same split reversed, in other shards, without the first and last image
    # and with a damaged picture of image 5 (example queries on this page: 0, 5, 11, 16);
    # matching by position would pick wrong pictures.
    other = tmp_path / "pictures"
    with ShardWriter(str(other), split="test", source="synthetic", encoder=SampleEncoder(["jpg"], {}),
                     shard_size=4, build={}) as writer:
        for k, (_, jpg, meta) in reversed(list(enumerate(samples))):
            if k not in (0, len(samples) - 1):
                writer.add(f"pic_{k:03d}", meta, {"jpg": jpg if k != 5 else b"not a jpeg"})
    ckpt, _, _ = model_checkpoint(tmp_path / "run", 100, [f"data.test_shards={small_synthetic / 'regions' / 'test'}",
                                                          "eval.save_sims=true", "eval.report_examples=4"])
    assert job.main(["--checkpoint", str(ckpt), "--images-from", str(other)]) == 0
    out = tmp_path / "run" / "eval" / "step_00000100"
    page = (out / "report.html").read_text()
    sims = np.load(out / "sims.npy")
    assert example_queries(4, 17).tolist() == [0, 5, 11, 16]
    want = picture_cells(sims, 4, missing=(0, 5, 16))
    srcs = re.findall(r'<img src="([^"]+)" alt="image (\d+)"', page)
    assert [int(k) for _, k in srcs] == want
    for uri, k in srcs:  # the picture of the image's own id
        assert uri == jpeg_data_uri(samples[int(k)][1])
    shown = shown_images([sims], 4)
    assert f"3 of the {len(shown)} images shown have no picture there" in page
    assert len(set(uri for uri, _ in srcs)) == len(set(want))  # only the shown images are embedded
    seen = browser_images(page, tmp_path)
    assert len(seen) == len(want)
    assert all(complete and width > 0 for _, complete, width in seen), seen


def test_jpg_shards_evaluated_show_their_own_pictures(tmp_path, small_synthetic):
    jpg_test = small_synthetic / "jpg" / "test"
    ckpt, _, _ = model_checkpoint(tmp_path, 100, [f"data.test_shards={jpg_test}", "data.mode=jpg",
                                                  "data.image_size=64", "model.image.backbone=timm:resnet10t",
                                                  "eval.save_sims=true"])
    assert job.main(["--run", str(tmp_path), "--towers", "online"]) == 0
    out = tmp_path / "eval" / "step_00000100"
    page = (out / "report.html").read_text()
    want = picture_cells(np.load(out / "sims.npy"), 5)
    samples = raw_jpgs(jpg_test)
    srcs = re.findall(r'<img src="([^"]+)" alt="image (\d+)"', page)
    assert [int(k) for _, k in srcs] == want
    assert all(uri == jpeg_data_uri(samples[int(k)][1]) for uri, k in srcs)
    assert f"Pictures from <code>{jpg_test}</code>." in page and "no picture there" not in page
    seen = browser_images(page, tmp_path)
    assert len(seen) == len(want) and all(complete and width > 0 for _, complete, width in seen), seen
