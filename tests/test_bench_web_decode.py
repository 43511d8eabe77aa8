"""launch/bench_data.py --web: the img2dataset-layout tar it writes, and its
decoder table (a smoke run on a few images: numbers are not checked, only
that every decoder and the end-to-end reader were timed and scored)."""
import io
import json
import os
import re
import subprocess
import tarfile

import numpy as np
from PIL import Image

from conftest import PYTHON, ROOT, child_env
from launch.bench.data import DECODERS, build_web_tar, web_decode_rows


def test_the_web_tar_has_the_img2dataset_layout_and_photo_like_jpegs(tmp_path):
    tar = build_web_tar(str(tmp_path), 5)
    with tarfile.open(tar) as t:
        names = t.getnames()
        members = {n: t.extractfile(n).read() for n in names}
    keys = [f"{k:09d}" for k in range(5)]
    assert names == [f"{k}.{ext}" for k in keys for ext in ("jpg", "json", "txt")]  # TarWriter: sorted
    stats = json.loads((tmp_path / "00000_stats.json").read_text())
    assert stats["successes"] == stats["count"] == 5
    for key in keys:
        meta = json.loads(members[f"{key}.json"])
        assert meta["key"] == key and meta["caption"] == members[f"{key}.txt"].decode("utf-8")
        with Image.open(io.BytesIO(members[f"{key}.jpg"])) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            assert all(256 <= side <= 512 for side in im.size)
            pixels = np.asarray(im, dtype=np.float64)
        # not flat colour: noise between neighbours and gradients/shapes across the image
        assert np.abs(np.diff(pixels, axis=1)).mean() > 1 and pixels.std() > 30


def test_every_decoder_row_is_timed_and_scored(tmp_path):
    rows = web_decode_rows(build_web_tar(str(tmp_path), 3), 32, seconds=0.06, rounds=2)
    assert [r.name for r in rows] == list(DECODERS) + ["tar read + decode_image + caption (end to end)"]
    assert rows[0].vs_baseline == 1.0
    assert all(r.rate.cpu > 0 and r.rate.wall > 0 for r in rows)
    # the baseline is the float reference up to uint8 rounding and PIL's filter
    assert rows[0].psnr_min > 40
    assert all(r.psnr_min > 20 for r in rows[:-1]) and np.isnan(rows[-1].psnr_mean)


def test_the_cli_prints_the_cpu_and_one_table_row_per_decoder(tmp_path):
    cmd = [PYTHON, os.path.join(ROOT, "launch", "bench_data.py"), "--web", "--web-images", "3", "--seconds", "0.1",
           "--image-size", "32"]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"^CPU: .+ \(\d+ logical CPUs\); Pillow ", out, re.M), out
    assert "| decoder | pairs/s/worker (CPU time) | CPU ms/image | vs baseline | pairs/s (wall time) |" in out
    for name in list(DECODERS) + ["tar read + decode_image + caption (end to end)"]:
        assert re.search(rf"^\| {re.escape(name)} \| [\d,]+ \| [\d.]+ \| [\d.]+x \| [\d,]+ \|", out, re.M), name
