"""ECCV Caption, CxC and PMRP on COCO 5K: the evaluation job against NAVER's eccv_caption package.

The test split is COCO-5K-shaped region shards built with the precomp
builder from the package's own ids (Karpathy's 5,000 test images, their
25,000 COCO caption annotation ids, in the package's order), with tiny random
region features. The job's figures are checked against the package's
functions applied to rankings this file computes itself (argpartition + sort
of the same similarity matrix), and the job's COCO 5K / 1K recalls against
the package's coco_5k_recalls / coco_1k_recalls.
"""
import importlib.util
import json
import logging
import os
import sys
import warnings

import numpy as np
import pytest

from conftest import ROOT
from user_dist.data_format import SplitIds, read_split_ids
from user_dist.evaluation import extended
from user_dist.evaluation.metrics import evaluate

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "failed to import ujson"
    from eccv_caption import Metrics

spec = importlib.util.spec_from_file_location("evaluate_script", os.path.join(ROOT, "launch", "evaluate.py"))
job = importlib.util.module_from_spec(spec)
spec.loader.exec_module(job)

N = 5000


def package_ids():
    """(image ids (5000,), caption ids (25000,)) in the package's order: image k's captions at 5k..5k+4."""
    package = Metrics()
    captions = package.coco_ids.astype(np.int64)
    images = np.array([package.coco_gts["t2i"][int(c)][0] for c in captions[::5]], dtype=np.int64)
    return images, captions


@pytest.fixture(scope="module")
def coco5k(tmp_path_factory):
    """COCO-5K-shaped region shards with COCO caption ids (precomp builder, --caption-ids)."""
    from data_shards.precomp import build_precomp

    root = tmp_path_factory.mktemp("coco_precomp")
    images, captions = package_ids()
    np.save(root / "testall_ims.npy", np.random.default_rng(0).standard_normal((N, 2, 8), dtype=np.float32))
    (root / "testall_caps.txt").write_text("".join(f"a photo with caption number {c}\n" for c in captions))
    (root / "testall_ids.txt").write_text("".join(f"{i}\n" for i in images))
    (root / "testall_cids.txt").write_text("".join(f"{c}\n" for c in captions))
    out = root / "shards"
    build_precomp(str(root), "testall", str(out), shard_size=1000, source="coco",
                  caption_ids=str(root / "testall_cids.txt"))
    return str(out), images, captions


@pytest.fixture(scope="module")
def pm_dir(tmp_path_factory):
    """Stand-in plausible-match files (the real ones are a 140 MB download): ECCV's positives plus CxC's."""
    package = Metrics()
    out = tmp_path_factory.mktemp("pm")
    for d, name in (("i2t", "pm_image_to_caption.json"), ("t2i", "pm_caption_to_image.json")):
        merged = {}
        for gts in (package.cxc_gts[d], package.eccv_gts[d]):
            for q, pos in gts.items():
                merged.setdefault(str(q), [])
                merged[str(q)] += [p for p in pos if p not in merged[str(q)]]
        (out / name).write_text(json.dumps(merged))
    return str(out)


@pytest.fixture(scope="module")
def sims(coco5k):
    """(5000, 25000) float32: noise, annotated pairs +2.5, ECCV positives +1.5 (so ranking them matters)."""
    _, images, captions = coco5k
    rng = np.random.default_rng(1)
    s = rng.standard_normal((N, 5 * N), dtype=np.float32)
    s[np.arange(N).repeat(5), np.arange(5 * N)] += 2.5
    row, col = {int(i): k for k, i in enumerate(images)}, {int(c): j for j, c in enumerate(captions)}
    for q, pos in Metrics().eccv_gts["i2t"].items():
        for c in pos:
            if c in col:  # two ECCV positives are captions outside the 5K split
                s[row[q], col[c]] += 1.5
    return s


def top_ids(scores, k, ids):
    """Ids of the k best items of each row, best first (argpartition, then a sort of those k)."""
    part = np.argpartition(-scores, k, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1)
    return ids[np.take_along_axis(part, order, axis=1)]


def reference_items(sims, images, captions, k_i2t=120, k_t2i=60):
    """The package's input, {'i2t': {image id: caption ids}, 't2i': {caption id: image ids}}, top-k of each query."""
    return {"i2t": dict(zip(images.tolist(), top_ids(sims, k_i2t, captions).tolist())),
            "t2i": dict(zip(captions.tolist(), top_ids(np.ascontiguousarray(sims.T), k_t2i, images).tolist()))}


def fold_items(sims, images, captions):
    """COCO 1K: each query ranked within its own fold (the package keeps a fold's ids of a ranking)."""
    items = {"i2t": {}, "t2i": {}}
    for f in range(5):
        block = sims[1000 * f:1000 * (f + 1), 5000 * f:5000 * (f + 1)]
        part = reference_items(block, images[1000 * f:1000 * (f + 1)], captions[5000 * f:5000 * (f + 1)], 10, 10)
        items["i2t"].update(part["i2t"])
        items["t2i"].update(part["t2i"])
    return items


def test_the_shards_carry_the_package_ids_in_split_order(coco5k):
    shards, images, captions = coco5k
    ids = read_split_ids(shards)
    assert ids.image_ids == images.tolist() and ids.caption_ids == captions.tolist()


def test_sims_mode_reports_the_package_metrics_on_the_same_rankings(coco5k, sims, pm_dir, tmp_path, capsys):
    shards, images, captions = coco5k
    np.save(tmp_path / "sims.npy", sims)
    assert job.main(["--sims", str(tmp_path / "sims.npy"), "--protocol", "coco5k", "--ids", shards,
                     "--pm-dir", pm_dir, "--json", str(tmp_path / "m.json")]) == 0
    got = json.loads((tmp_path / "m.json").read_text())
    package = Metrics(extra_file_dir=pm_dir)
    items = reference_items(sims, images, captions)
    # the reference lists are long enough for every query's positives
    for d, k in (("i2t", 120), ("t2i", 60)):
        assert max(len(p) for p in package.pm_gts[d].values()) <= k
    eccv = package.eccv_metrics(items, "all")
    want = {}
    for d in ("i2t", "t2i"):
        for m in ("map_at_r", "rprecision", "r1"):
            want[f"eccv_{d}_{m}"] = 100 * eccv[f"eccv_{m}"][d]
        for k in (1, 5, 10):
            want[f"cxc_{d}_r{k}"] = 100 * package.cxc_recalls(items, d, K=k)[d]
        want[f"pmrp_{d}"] = 100 * package.pmrp(items, d)[d]
    assert list(got["extended"]) == list(extended.EXTENDED_KEYS)
    assert got["extended"] == pytest.approx(want, abs=1e-9)
    assert 5 < got["extended"]["eccv_i2t_map_at_r"] < 95 and 5 < got["extended"]["cxc_t2i_r1"] < 95  # not trivial
    # the job's own COCO recalls are the package's
    for d in ("i2t", "t2i"):
        for k in (1, 5, 10):
            assert got[f"{d}_r{k}"] == pytest.approx(100 * package.coco_5k_recalls(items, d, K=k)[d], abs=1e-9)
    coco1k, folds = evaluate(sims, "coco1k"), fold_items(sims, images, captions)
    for d in ("i2t", "t2i"):
        for k in (1, 5, 10):
            assert coco1k[f"{d}_r{k}"] == pytest.approx(100 * package.coco_1k_recalls(folds, d, K=k), abs=1e-9)
    out = capsys.readouterr().out
    assert "ECCV mAP@R" in out and "CxC R@10" in out and "PMRP" in out  # the terminal table


def test_ids_that_are_not_coco_5k_give_a_one_line_note(coco5k, sims, caplog):
    _, images, captions = coco5k
    cases = [(SplitIds(images.tolist(), None), "carry no caption ids"),
             (SplitIds(images.tolist(), (captions + 1).tolist()), "not COCO 5K's annotation ids"),
             (SplitIds(images.tolist(), captions[[5, 1, 2, 3, 4, 0, *range(6, 5 * N)]].tolist()),
              f"caption {captions[5]} belongs to COCO image {images[1]} but sits with image {images[0]}")]
    for ids, message in cases:
        caplog.clear()
        with caplog.at_level(logging.INFO):
            assert extended.extended_or_note(sims, ids, asked=True) is None
        [record] = [r for r in caplog.records if "not computed" in r.message]
        assert record.levelno == logging.WARNING and message in record.message and "\n" not in record.message
    caplog.clear()
    with caplog.at_level(logging.INFO):  # not asked (eval.extended=auto): an info line only
        assert extended.extended_or_note(sims, cases[0][0], asked=False) is None
    assert [r.levelno for r in caplog.records if "not computed" in r.message] == [logging.INFO]


def test_without_the_package_the_note_says_how_to_install_it(coco5k, sims, caplog, monkeypatch):
    monkeypatch.setitem(sys.modules, "eccv_caption", None)  # import eccv_caption raises ImportError
    with caplog.at_level(logging.WARNING):
        assert extended.extended_or_note(sims, coco5k[0], asked=True) is None
    assert "pip install 'user-dist[eval]'" in caplog.text


def test_a_pm_folder_without_the_files_says_where_to_get_them(tmp_path):
    with pytest.raises(ValueError, match="lacks pm_image_to_caption.json, pm_caption_to_image.json. Download .*"
                                         "naver-ai/eccv-caption.*eval.pm_dir=DIR.*--pm-dir DIR"):
        extended.compute_extended(np.zeros((N, 5 * N), np.float32), SplitIds([], []), pm_dir=str(tmp_path))


def test_ties_are_broken_by_position_in_the_split_like_a_stable_sort():
    """Scores with many ties (4 values): each query's list equals a stable descending argsort's head."""
    import torch

    rng = np.random.default_rng(3)
    scores = rng.integers(0, 4, (40, 300)).astype(np.float32)
    ids = np.arange(1000, 1300)
    need = rng.integers(1, 60, 40)
    got = extended._top_lists(torch.from_numpy(scores), np.arange(40), need, ids, by_row=True)
    assert got == [ids[np.argsort(-scores[q], kind="stable")[:need[q]]].tolist() for q in range(40)]
    cols = rng.permutation(300)[:25]  # text-to-image direction: queries are columns
    got = extended._top_lists(torch.from_numpy(scores), cols, need[:25], np.arange(40), by_row=False)
    assert got == [np.argsort(-scores[:, c], kind="stable")[:n].tolist() for c, n in zip(cols, need[:25])]


def test_the_table_and_the_report_show_the_extended_metrics_beside_the_protocols():
    from user_dist.evaluation.report import format_table, render_html

    rng = np.random.default_rng(0)
    sims = rng.standard_normal((6, 30)).astype(np.float32)
    values = {k: float(v) for k, v in zip(extended.EXTENDED_KEYS, rng.uniform(0, 100, len(extended.EXTENDED_KEYS)))}
    results = {"generic": evaluate(sims, "generic"), extended.EXTENDED: values}
    protocols, ext = format_table(results).split("\n\n")
    assert [r.split()[0] for r in protocols.splitlines()[2:]] == ["generic"]
    rows = {r.rsplit(None, 2)[0]: r.split()[-2:] for r in ext.splitlines()[1:]}
    assert rows["ECCV mAP@R"] == [f"{values['eccv_i2t_map_at_r']:.2f}", f"{values['eccv_t2i_map_at_r']:.2f}"]
    assert rows["CxC R@5"] == [f"{values['cxc_i2t_r5']:.2f}", f"{values['cxc_t2i_r5']:.2f}"]
    assert rows["PMRP"] == [f"{values['pmrp_i2t']:.2f}", f"{values['pmrp_t2i']:.2f}"] and len(rows) == 7
    captions, labels = [f"c{j}" for j in range(30)], [f"i{k}" for k in range(6)]
    page = render_html("t", results, sims, captions, labels)
    part = page.split("COCO 5K with extended positives", 1)[1].split("<h2>", 1)[0]
    assert f"<td>ECCV R-Precision</td><td>{values['eccv_i2t_rprecision']:.2f}</td>" in part
    assert "extended positives" not in render_html("t", {"generic": results["generic"]}, sims, captions, labels)


@pytest.mark.slow
def test_a_checkpoint_evaluated_on_coco5k_shards_records_the_extended_metrics_everywhere(coco5k, tmp_path):
    """End to end: a random-init tiny model encodes the 5,000 x 25,000 split (about a minute on 2 CPU cores)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_evaluate_cli import model_checkpoint

    shards, images, captions = coco5k
    model_checkpoint(tmp_path, 100, [f"data.test_shards={shards}", "model.region_dim=8", "eval.protocols=[coco5k]",
                                     "eval.save_sims=true", "eval.extended=always", "eval.batch_size=500",
                                     "data.max_text_len=12"])
    assert job.main(["--run", str(tmp_path)]) == 0
    out = tmp_path / "eval" / "step_00000100"
    recorded = json.loads((out / "metrics.json").read_text())["extended"]
    # the package on this file's own rankings of the saved matrix
    sims = np.load(out / "sims.npy")
    package = Metrics()
    eccv = package.eccv_metrics(reference_items(sims, images, captions), "all")
    assert recorded["eccv_i2t_map_at_r"] == pytest.approx(100 * eccv["eccv_map_at_r"]["i2t"], abs=1e-9)
    assert recorded["eccv_t2i_rprecision"] == pytest.approx(100 * eccv["eccv_rprecision"]["t2i"], abs=1e-9)
    # --sims on the saved matrix with the ids.json written beside it gives the same figures
    assert job.main(["--sims", str(out / "sims.npy"), "--protocol", "coco5k", "--ids", str(out / "ids.json"),
                     "--json", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["extended"] == recorded
    acc = EventAccumulator(str(tmp_path / "tb" / "eval"))
    acc.Reload()
    assert {f"eval/{k}" for k in recorded} <= set(acc.Tags()["scalars"])
    assert acc.Scalars("eval/cxc_t2i_r10")[0].value == pytest.approx(recorded["cxc_t2i_r10"], rel=1e-6)
    page = (out / "report.html").read_text()
    assert "COCO 5K with extended positives" in page and f"{recorded['eccv_i2t_map_at_r']:.2f}" in page
