"""Evaluation of splits whose images have any number n_k >= 1 of captions.

The reference is a float64 brute force independent of the library: every
query's items sorted by score (argsort; on a tie the wrong item first, the
pessimistic rule) and the position of the first correct one read off, with
each caption's image taken from a plain list of owners. Real shards come from
data_shards' ShardWriter (1..7 captions per image), real checkpoints from
tests/test_evaluate_cli.py's helper, real ranks from gloo process groups.
"""
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from conftest import PYTHON, ROOT, child_env, run_gloo_ranks
from test_evaluate_cli import TINY, job, model_checkpoint
from test_metrics import metrics_from_ranks
from user_dist.evaluation import metrics
from user_dist.evaluation.metrics import (METRIC_KEYS, ProtocolError, check_shape, evaluate, i2t_ranks,
                                          i2t_ranks_torch, t2i_ranks, t2i_ranks_torch)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ----------------------------------------------------------------------------- the reference


def owners_of(counts):
    """[image of caption 0, image of caption 1, ...] for captions laid out image by image."""
    return [k for k, n in enumerate(counts) for _ in range(n)]


def brute_force_ranks(sims, counts):
    """(i2t (N,), t2i (C,)) 0-based ranks by sorting every query in float64, wrong items first on ties."""
    s = np.asarray(sims, dtype=np.float64)
    owner = np.array(owners_of(counts))
    n, m = s.shape
    i2t = []
    for k in range(n):
        correct = owner == k
        order = sorted(range(m), key=lambda j: (-s[k, j], correct[j]))  # stable: score down, wrong first
        i2t.append(next(pos for pos, j in enumerate(order) if correct[j]))
    t2i = []
    for j in range(m):
        order = sorted(range(n), key=lambda k: (-s[k, j], k == owner[j]))
        t2i.append(order.index(owner[j]))
    return np.array(i2t), np.array(t2i)


def brute_force_metrics(sims, counts):
    return metrics_from_ranks(*brute_force_ranks(sims, counts))


def random_case(seed, n, levels=None, max_captions=7):
    """(sims (N, C) float32, counts (N,)): counts 1..max_captions; own pairs lifted; quantised
    to ``levels`` values when given (many ties)."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, max_captions + 1, size=n)
    sims = rng.standard_normal((n, counts.sum()))
    sims[owners_of(counts), np.arange(counts.sum())] += 1.0
    if levels:
        sims = np.floor(sims * levels / 4) / levels  # a coarse grid: ties between own and wrong items
    return sims.astype(np.float32), counts


# ----------------------------------------------------------------------------- ranks and metrics


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed,n,levels", [(0, 1, None), (1, 2, None), (2, 13, None), (3, 40, None),
                                           (4, 40, 2), (5, 31, 1), (6, 300, None)])
def test_ranks_and_metrics_equal_a_float64_brute_force_with_random_caption_counts(seed, n, levels, device):
    sims, counts = random_case(seed, n, levels)
    want_i2t, want_t2i = brute_force_ranks(sims, counts)
    np.testing.assert_array_equal(i2t_ranks(sims, counts), want_i2t)
    np.testing.assert_array_equal(t2i_ranks(sims, counts), want_t2i)
    tensor = torch.from_numpy(sims).to(device)
    np.testing.assert_array_equal(i2t_ranks_torch(tensor, counts).cpu().numpy(), want_i2t)
    np.testing.assert_array_equal(t2i_ranks_torch(tensor, torch.from_numpy(counts)).cpu().numpy(), want_t2i)
    want = brute_force_metrics(sims, counts)
    for got in (evaluate(sims, "generic", caption_counts=counts), evaluate(tensor, "generic", caption_counts=counts)):
        assert list(got) == list(METRIC_KEYS)
        for k in METRIC_KEYS:
            assert got[k] == pytest.approx(want[k], abs=1e-9), k
    if levels:  # the case is about ties, own captions against wrong ones included
        assert len(np.unique(sims)) < 20


@pytest.mark.parametrize("n", [6, 7, 8, 20])
def test_variable_counts_are_ranked_across_chunk_boundaries(n, monkeypatch):
    monkeypatch.setattr(metrics, "_CHUNK_ROWS", 7)
    sims, counts = random_case(100 + n, n, levels=3)
    want_i2t, want_t2i = brute_force_ranks(sims, counts)
    for got_i2t, got_t2i in ((i2t_ranks(sims, counts), t2i_ranks(sims, counts)),
                             (i2t_ranks_torch(torch.from_numpy(sims), counts),
                              t2i_ranks_torch(torch.from_numpy(sims), counts))):
        np.testing.assert_array_equal(np.asarray(got_i2t), want_i2t)
        np.testing.assert_array_equal(np.asarray(got_t2i), want_t2i)


def test_only_the_best_own_caption_counts_for_an_image():
    # image 0 owns captions 0..2, image 1 caption 3, image 2 captions 4..5
    sims = np.array([[0.1, 0.9, 0.2, 0.5, 0.3, 0.95],
                     [0.0, 0.0, 0.0, 0.4, 0.4, 0.4],
                     [0.0, 0.0, 0.0, 0.0, 0.2, 0.1]], np.float32)
    counts = [3, 1, 2]
    # image 0: best own 0.9, one wrong above (0.95); image 1: 0.4 tied by two wrong ones; image 2: 0.2 first
    assert i2t_ranks(sims, counts).tolist() == [1, 2, 0]
    # caption 3 (image 1, 0.4) has image 0 above it (0.5); captions 4 and 5 (image 2) have images 0 and 1 above
    assert t2i_ranks(sims, counts).tolist() == [0, 0, 0, 1, 2, 2]
    assert i2t_ranks(sims, counts).tolist() == brute_force_ranks(sims, counts)[0].tolist()


@pytest.mark.parametrize("device", DEVICES)
def test_five_captions_per_image_given_as_counts_equal_the_5_per_image_results_exactly(device):
    rng = np.random.default_rng(7)
    for sims, protocol in ((rng.standard_normal((1000, 5000)).astype(np.float32), "f30k"),
                           (np.floor(rng.standard_normal((60, 300)) * 3).astype(np.float32), "generic")):
        n = sims.shape[0]
        five = np.full(n, 5)
        tensor = torch.from_numpy(sims).to(device)
        assert evaluate(sims, protocol, caption_counts=five) == evaluate(sims, protocol)
        assert evaluate(tensor, protocol, caption_counts=torch.from_numpy(five)) == evaluate(tensor, protocol)
    want_i2t, want_t2i = brute_force_ranks(sims, five)  # the small, tied one
    np.testing.assert_array_equal(i2t_ranks(sims, five), want_i2t)
    np.testing.assert_array_equal(t2i_ranks(sims, five), want_t2i)
    check_shape((5000, 25000), "coco5k", caption_counts=np.full(5000, 5))  # the protocols take 5 given as counts
    check_shape((5000, 25000), "coco1k", caption_counts=np.full(5000, 5))


def test_one_caption_per_image_is_scored_like_a_square_matrix():
    sims = np.random.default_rng(8).standard_normal((50, 50)).astype(np.float32)
    m = evaluate(sims, "generic", caption_counts=np.ones(50, np.int64))
    # with one caption each, both directions rank the diagonal: the transposed matrix swaps them
    t = evaluate(np.ascontiguousarray(sims.T), "generic", caption_counts=np.ones(50, np.int64))
    for k in ("r1", "r5", "r10", "medr", "meanr"):
        assert m[f"i2t_{k}"] == t[f"t2i_{k}"] and m[f"t2i_{k}"] == t[f"i2t_{k}"]


# ----------------------------------------------------------------------------- protocols and refusals


def coco_like_counts():
    counts = np.full(5000, 5)
    counts[[10, 200, 3000, 4999]] = 6
    return counts


@pytest.mark.parametrize("protocol", ["coco5k", "coco1k"])
def test_coco_protocols_refuse_other_counts_naming_the_split_and_the_counts(protocol):
    counts = coco_like_counts()
    with pytest.raises(ProtocolError) as err:
        check_shape((5000, int(counts.sum())), protocol, source="split data/coco/test", caption_counts=counts)
    assert str(err.value) == (
        f"split data/coco/test: captions per image range 5..6 (4,996 images with 5, 4 with 6); protocol {protocol} "
        "needs exactly 5 per image: rebuild the split with `--first-five` (python -m data_shards karpathy) or use "
        "protocol generic")


def test_f30k_refuses_a_split_of_single_captions_and_generic_takes_it():
    ones = np.ones(1000, np.int64)
    with pytest.raises(ProtocolError, match=r"^split X: captions per image: 1 for all 1,000 images; protocol f30k "
                                            r"needs exactly 5 per image"):
        check_shape((1000, 1000), "f30k", source="split X", caption_counts=ones)
    check_shape((1000, 1000), "generic", source="split X", caption_counts=ones)


def test_the_refusal_lists_the_most_frequent_counts_when_there_are_many():
    counts = np.repeat(np.arange(1, 13), np.arange(12, 0, -1))  # 12 x 1, 11 x 2, ..., 1 x 12
    with pytest.raises(ProtocolError) as err:
        evaluate(np.zeros((len(counts), counts.sum()), np.float32), "f30k", source="s", caption_counts=counts)
    assert "range 1..12 (12 images with 1, 11 with 2, 10 with 3, 9 with 4, 8 with 5, 7 with 6, 6 with 7, " \
           "5 with 8, and 4 other counts)" in str(err.value)


@pytest.mark.parametrize("counts,message", [
    ([2, 3], r"2 caption counts for a matrix of shape \(3, 6\); expected one count per image"),
    ([2, 3, 2], r"the caption counts sum to 7 captions but the matrix has 6 columns"),
    ([3, 0, 3], r"image 1 has 0 captions; every image needs one or more"),
    ([2.0, 2.0, 2.0], r"caption counts must be a 1-D integer array"),
])
def test_caption_counts_that_do_not_describe_the_matrix_are_refused(counts, message):
    with pytest.raises(ProtocolError, match=message):
        evaluate(np.zeros((3, 6), np.float32), "generic", source="m.npy", caption_counts=np.array(counts))


def test_the_extended_metrics_refuse_a_split_without_five_captions_per_image():
    from user_dist.data_format import SplitIds
    from user_dist.evaluation.extended import ExtendedUnavailable, compute_extended, extended_or_note

    counts = coco_like_counts()
    ids = SplitIds(list(range(5000)), list(range(int(counts.sum()))))
    with pytest.raises(ExtendedUnavailable, match=r"need COCO 5K's 5 captions per image, and the split's captions "
                                                   r"per image range 5..6"):
        compute_extended(np.zeros((2, 3), np.float32), ids, caption_counts=counts)
    assert extended_or_note(np.zeros((2, 3), np.float32), ids, True, caption_counts=counts) is None


# ----------------------------------------------------------------------------- the report follows the owners


def test_the_report_marks_an_images_own_captions_and_shows_its_first_caption():
    from user_dist.evaluation.report import render_html

    counts = [3, 1, 2, 4]
    owner = owners_of(counts)
    captions = [f"caption {j} of image{owner[j]}" for j in range(len(owner))]
    sims = np.random.default_rng(9).standard_normal((4, 10)).astype(np.float32)
    sims[owner, range(10)] += 0.5
    page = render_html("t", {"generic": evaluate(sims, "generic", caption_counts=counts)}, sims, captions,
                       [f"image #{k}" for k in range(4)], examples=4, caption_counts=counts)
    i2t, t2i = page.split("<h2>Image to text")[1].split("<h2>Text to image")
    rows = i2t.split("<tr>")[1:]
    assert len(rows) == 4
    for k, row in enumerate(rows):
        first = captions[owner.index(k)]
        assert f"<b>image #{k}</b><br><small>{first}</small>" in row  # label and the image's first caption
        for cell in row.split("<td")[2:]:
            text = cell.split("<br>")[0]
            assert ('class="ok"' in cell) == text.endswith(f"of image{k}"), cell
            assert ("&#10003;" in cell) == ('class="ok"' in cell)
    ranks = i2t_ranks(sims, counts)
    assert [f"rank of its best caption: {r + 1}<" in row for r, row in zip(ranks, rows)] == [True] * 4
    for row in t2i.split("<tr>")[1:]:  # caption queries: the owner's cell is the marked one
        query = row.split("</td>")[0]
        k = int(query.split("of image")[1].split("<")[0])
        marked = [c for c in row.split("<td")[2:] if 'class="ok"' in c]
        assert all(f"<b>image #{k}</b>" in c for c in marked)
        assert len(marked) == (1 if f"<b>image #{k}</b>" in row.split("</td>", 1)[1] else 0)


def test_the_report_refuses_captions_that_do_not_fit_the_counts():
    from user_dist.evaluation.report import render_html

    sims = np.zeros((2, 5), np.float32)
    with pytest.raises(ValueError, match="does not hold 5 captions per image; give its caption_counts"):
        render_html("t", {}, sims, ["c"] * 5, ["a", "b"])
    with pytest.raises(ValueError, match="the caption counts sum to 4 captions but the matrix has 5 columns"):
        render_html("t", {}, sims, ["c"] * 5, ["a", "b"], caption_counts=[2, 2])


# ----------------------------------------------------------------------------- encoding over ranks


class Towers(torch.nn.Module):
    """Deterministic towers: an image is its regions' mean, a caption its tokens' embedding bag."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.img, self.txt = torch.nn.Linear(6, 4), torch.nn.EmbeddingBag(50, 4)

    def encode_image(self, b):
        return torch.nn.functional.normalize(self.img(b["regions"].mean(1)), dim=-1)

    def encode_text(self, b):
        return torch.nn.functional.normalize(self.txt(b["input_ids"]), dim=-1)


SPLIT_COUNTS = [1, 7, 3, 5, 2, 6, 4, 1, 1, 7, 2, 5, 3, 3, 6, 1, 4, 2, 7, 5, 1, 2, 6]  # 23 images


def split_batches(rank, world):
    """This rank's images (every world-th, out of order) in batches of 3, 1, 4, 2, 5 images; caption j
    of image k has tokens (100 k + j) * 7 + 0..3 (mod 50), token length 4."""
    mine = list(range(len(SPLIT_COUNTS)))[rank::world][::-1]
    regions = torch.randn(len(SPLIT_COUNTS), 3, 6, generator=torch.Generator().manual_seed(0))
    batches, i, sizes = [], 0, [3, 1, 4, 2, 5]
    while i < len(mine):
        idx = mine[i:i + sizes[len(batches) % len(sizes)]]
        ids = torch.tensor([[((100 * k + j) * 7 + t) % 50 for t in range(4)] for k in idx
                            for j in range(SPLIT_COUNTS[k])])
        batches.append({"regions": regions[idx], "input_ids": ids, "image_index": torch.tensor(idx),
                        "caption_counts": torch.tensor([SPLIT_COUNTS[k] for k in idx])})
        i += len(idx)
    return batches


def encode_on_rank(rank):
    from user_dist import distributed
    from user_dist.evaluation.encode import encode_split

    split = encode_split(Towers(), split_batches(rank, distributed.world_size()), torch.device("cpu"))
    return {"images": split.images, "captions": split.captions, "ids": split.input_ids,
            "counts": split.caption_counts}


def test_variable_captions_encoded_on_three_ranks_equal_one_process_in_split_order():
    ranks = run_gloo_ranks(encode_on_rank, 3)
    one = encode_on_rank(0)  # no process group here: one process, the whole split
    assert one["counts"].tolist() == SPLIT_COUNTS
    assert one["captions"].shape == (sum(SPLIT_COUNTS), 4)
    want_first_tokens = [((100 * k + j) * 7) % 50 for k, n in enumerate(SPLIT_COUNTS) for j in range(n)]
    assert one["ids"][:, 0].tolist() == want_first_tokens  # split order: image by image, captions in order
    for got in ranks:  # every rank returns the gathered split
        for key in one:
            torch.testing.assert_close(got[key], one[key])


def test_a_batch_whose_counts_do_not_match_its_captions_is_refused():
    from user_dist.evaluation.encode import encode_split

    [batch, *_] = split_batches(0, 1)
    batch["caption_counts"] = batch["caption_counts"] + 1
    with pytest.raises(ValueError, match=r"evaluation batch with 3 images holds \d+ captions but caption_counts"):
        encode_split(Towers(), [batch], torch.device("cpu"))
    del batch["caption_counts"]
    with pytest.raises(ValueError, match="holds no caption_counts"):
        encode_split(Towers(), [batch], torch.device("cpu"))


# ----------------------------------------------------------------------------- end to end on real shards


WORDS = ["red", "blue", "green", "small", "large", "square", "circle", "triangle", "left", "right", "above",
         "below", "near", "a", "the", "dog", "cat", "tree", "car", "boat"]
SHARD_COUNTS = [1, 2, 3, 4, 5, 6, 7, 5, 5, 1, 3, 7, 2, 6, 4, 1, 5, 2, 3, 7, 6, 4, 1]  # 23 images, every count 1..7


def build_variable_split(out_dir, counts, seed=0, region_dim=32):
    """Region shards (shards of 5 samples) whose image k has counts[k] captions, with caption ids."""
    from data_shards.writer import SampleEncoder, ShardWriter, sample_json

    rng = np.random.default_rng(seed)
    encoder = SampleEncoder(["regions.npy", "boxes.npy"],
                            {"regions.npy": {"dtype": "float16", "shape": [None, region_dim]},
                             "boxes.npy": {"dtype": "float32", "shape": [None, 4]}})
    with ShardWriter(str(out_dir), split="test", source="variable", encoder=encoder, shard_size=5,
                     build={"command": "test"}) as writer:
        for k, n in enumerate(counts):
            captions = [" ".join(rng.choice(WORDS, size=6)) + f" number {k} {j}" for j in range(n)]
            meta = sample_json(1000 + k, captions, "test", "variable", [10 * k + j for j in range(n)])
            regions = rng.standard_normal((4, region_dim)).astype(np.float16)
            boxes = rng.random((4, 4)).astype(np.float32)
            writer.add(f"variable_{k:04d}", meta, {"regions.npy": regions, "boxes.npy": boxes})
    return str(out_dir)


@pytest.fixture(scope="module")
def variable_split(tmp_path_factory):
    return build_variable_split(tmp_path_factory.mktemp("variable") / "test", SHARD_COUNTS)


def straight_sims(model, cfg, shards):
    """(N, C) scores of the whole split in one batch through the towers, and its caption counts."""
    from user_dist.data import eval_loader
    from user_dist.tokenizer import build_tokenizer

    [batch] = list(eval_loader(shards, cfg.data, build_tokenizer(cfg.model.text), 1000))
    with torch.no_grad():
        return (model.eval().encode_image(batch) @ model.encode_text(batch).T).numpy(), batch["caption_counts"]


def test_a_variable_caption_split_is_evaluated_end_to_end_and_its_saved_matrix_rescored(tmp_path, variable_split,
                                                                                       capsys):
    _, cfg, model = model_checkpoint(tmp_path, 100, [f"data.test_shards={variable_split}", "eval.save_sims=true",
                                                      "eval.batch_size=4"])
    assert job.main(["--run", str(tmp_path)]) == 0
    out = tmp_path / "eval" / "step_00000100"
    sims, counts = np.load(out / "sims.npy"), np.load(out / "caption_counts.npy")
    assert counts.tolist() == SHARD_COUNTS and counts.dtype == np.int64
    want, batch_counts = straight_sims(model, cfg, variable_split)
    assert batch_counts.tolist() == SHARD_COUNTS and sims.shape == (23, sum(SHARD_COUNTS))
    np.testing.assert_allclose(sims, want, atol=1e-5)
    got = json.loads((out / "metrics.json").read_text())["generic"]
    ref = brute_force_metrics(sims, SHARD_COUNTS)
    for k in METRIC_KEYS:
        assert got[k] == pytest.approx(ref[k], abs=1e-9), k
    ids = json.loads((out / "ids.json").read_text())
    assert len(ids["caption_ids"]) == sum(SHARD_COUNTS) and ids["image_ids"][:2] == [1000, 1001]
    # the report's image-to-text table marks exactly the query's own captions (their text ends "number k j")
    page = (out / "report.html").read_text()
    for row in page.split("<h2>Text to image")[0].split("Image to text")[1].split("<tr>")[1:]:
        k = int(row.split("<b>image #")[1].split("<")[0])
        for cell in row.split("<td")[2:]:
            assert ('class="ok"' in cell) == (f"number {k} " in cell.split("<br>")[0]), cell
    # --sims finds caption_counts.npy beside sims.npy and gives the same figures
    assert job.main(["--sims", str(out / "sims.npy"), "--protocol", "generic", "--json", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text()) == got
    # moved away from its counts, the matrix is refused saying where they go; --caption-counts names them
    shutil.copy(out / "sims.npy", tmp_path / "alone.npy")
    capsys.readouterr()
    assert job.main(["--sims", str(tmp_path / "alone.npy"), "--protocol", "generic"]) == 2
    err = capsys.readouterr().err
    assert f"alone.npy: shape (23, {sum(SHARD_COUNTS)}) does not fit" in err and "--caption-counts NPY" in err
    assert job.main(["--sims", str(tmp_path / "alone.npy"), "--protocol", "generic", "--caption-counts",
                     str(out / "caption_counts.npy"), "--json", str(tmp_path / "m2.json")]) == 0
    assert json.loads((tmp_path / "m2.json").read_text()) == got
    # the fixed-count protocols refuse the saved matrix too, with its counts
    assert job.main(["--sims", str(out / "sims.npy"), "--protocol", "f30k"]) == 2
    assert "captions per image range 1..7 (4 images with 1, 3 with 2, 3 with 3, 3 with 4, 4 with 5, 3 with 6, " \
           "3 with 7); protocol f30k needs exactly 5 per image" in capsys.readouterr().err


@pytest.mark.parametrize("protocol", ["coco5k", "coco1k", "f30k"])
def test_the_fixed_count_protocols_refuse_the_split_naming_its_folder_and_counts(tmp_path, variable_split, capsys,
                                                                                 protocol):
    model_checkpoint(tmp_path, 100, [f"data.test_shards={variable_split}"])
    assert job.main(["--run", str(tmp_path), f"eval.protocols=[generic,{protocol}]"]) == 2
    err = capsys.readouterr().err
    assert (f"test split {variable_split}: captions per image range 1..7 (4 images with 1, 3 with 2, 3 with 3, "
            f"3 with 4, 4 with 5, 3 with 6, 3 with 7); protocol {protocol} needs exactly 5 per image: rebuild the "
            "split with `--first-five`") in err and "or use protocol generic" in err
    assert not (tmp_path / "eval" / "state.json").exists()  # nothing recorded: fix the protocol and rerun


def test_old_saved_matrices_without_counts_keep_working(tmp_path):
    sims = np.random.default_rng(3).standard_normal((30, 150)).astype(np.float32)
    np.save(tmp_path / "sims.npy", sims)  # an eval folder of before: no caption_counts.npy
    assert job.main(["--sims", str(tmp_path / "sims.npy"), "--protocol", "generic", "--json",
                     str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text()) == evaluate(sims, "generic")


def test_a_counts_file_that_is_not_integers_is_refused(tmp_path, capsys):
    np.save(tmp_path / "sims.npy", np.zeros((2, 4), np.float32))
    np.save(tmp_path / "caption_counts.npy", np.array([2.0, 2.0]))
    assert job.main(["--sims", str(tmp_path / "sims.npy"), "--protocol", "generic"]) == 2
    assert "caption_counts.npy: caption counts must be a 1-D integer array" in capsys.readouterr().err


@pytest.mark.slow
def test_training_validation_scores_a_variable_caption_val_split(tiny_shards, tmp_path):
    """A real one-process training job (1 epoch) validating on the variable split: the logged
    val/rsum equals the brute-force rsum of the saved towers on that split."""
    from user_dist import checkpoint as ckpt
    from user_dist.config import load_config
    from user_dist.models import build_model

    val = build_variable_split(tmp_path / "val", SHARD_COUNTS, seed=1)
    overrides = TINY[:9] + [
        f"data.train_shards={tiny_shards / 'train'}", f"data.val_shards={val}", f"data.test_shards={val}",
        "data.num_workers=0", "queue.size_per_rank=48", "train.batch_size=24", "train.epochs=1",
        "train.precision=fp32", "train.log_every=1", "optim.decay_epochs=[10]", f"train.run_root={tmp_path}",
        "train.run_name=r", "eval.batch_size=5"]
    proc = subprocess.run([PYTHON, os.path.join(ROOT, "launch", "train.py"), *overrides], cwd=ROOT,
                          env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    with open(tmp_path / "r" / "train_log.jsonl") as f:
        logged = [json.loads(line) for line in f]
    [rec] = [r for r in logged if "val/rsum" in r]
    cfg = load_config(None, overrides)
    [d] = ckpt.list_checkpoints(str(tmp_path / "r" / "checkpoints"))
    model = build_model(cfg.model, cfg.data.mode)
    model.load_state_dict(ckpt.load_model_weights(d))
    sims, _ = straight_sims(model, cfg, val)
    want = brute_force_metrics(sims, SHARD_COUNTS)
    assert rec["val/rsum"] == pytest.approx(want["rsum"], abs=1e-6)
    assert rec["val/i2t_meanr"] == pytest.approx(want["i2t_meanr"], abs=1e-6)
