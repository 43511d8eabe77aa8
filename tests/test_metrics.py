"""Retrieval metrics and protocols against a slow, straightforward float64 reference.

The reference ranks every query with a full sort (wrong items tied with the
truth placed before it: pessimistic ties) and reads off the position of the
first correct item, as VSE++/SCAN do with argsort. The torch path (a tensor on
any device) must give exactly the numpy path's ranks; it runs on the CPU
here, and on CUDA too where there is one.
"""
import numpy as np
import pytest
import torch

from user_dist.evaluation import metrics
from user_dist.evaluation.metrics import (METRIC_KEYS, ProtocolError, check_sims, evaluate, i2t_ranks,
                                          i2t_ranks_torch, recall_curve, t2i_ranks, t2i_ranks_torch)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def reference_ranks(sims):
    s = np.asarray(sims, dtype=np.float64)
    n, m = s.shape
    i2t = []
    for i in range(n):
        correct = np.arange(m) // 5 == i
        order = np.lexsort((correct, -s[i]))  # by score, descending; on a tie the wrong item first
        i2t.append(np.flatnonzero(correct[order])[0])
    t2i = []
    for j in range(m):
        correct = np.arange(n) == j // 5
        order = np.lexsort((correct, -s[:, j]))
        t2i.append(np.flatnonzero(correct[order])[0])
    return np.array(i2t), np.array(t2i)


def reference_metrics(sims):
    return metrics_from_ranks(*reference_ranks(sims))


def metrics_from_ranks(i2t, t2i):
    """The metric dict of 0-based rank vectors, computed plainly (R@K, medr, meanr, rsum)."""
    out = {}
    for name, r in (("i2t", i2t), ("t2i", t2i)):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * np.mean(r < k)
        out[f"{name}_medr"] = np.floor(np.median(r)) + 1
        out[f"{name}_meanr"] = np.mean(r) + 1
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return out


def assert_metrics_equal(got, want):
    for k in METRIC_KEYS:
        assert got[k] == pytest.approx(want[k], abs=1e-9), k


def perfect(n):
    sims = np.zeros((n, 5 * n), np.float32)
    for i in range(n):
        sims[i, 5 * i:5 * i + 5] = 1.0
    return sims


@pytest.mark.parametrize("n", [1, 3, 24])
def test_ranks_match_full_sort_reference_on_random_matrices(n):
    sims = np.random.default_rng(n).standard_normal((n, 5 * n)).astype(np.float32)
    want_i2t, want_t2i = reference_ranks(sims)
    np.testing.assert_array_equal(i2t_ranks(sims), want_i2t)
    np.testing.assert_array_equal(t2i_ranks(sims), want_t2i)
    assert_metrics_equal(evaluate(sims, "generic"), reference_metrics(sims))


def test_ranks_match_reference_when_many_scores_tie():
    sims = np.random.default_rng(1).integers(0, 4, size=(30, 150)).astype(np.float32)  # ~25% ties per value
    want_i2t, want_t2i = reference_ranks(sims)
    np.testing.assert_array_equal(i2t_ranks(sims), want_i2t)
    np.testing.assert_array_equal(t2i_ranks(sims), want_t2i)


def test_ranks_of_a_close_to_trained_matrix_match_reference():
    rng = np.random.default_rng(2)
    sims = perfect(40) * 0.3 + rng.standard_normal((40, 200)).astype(np.float32) * 0.2
    assert_metrics_equal(evaluate(sims, "generic"), reference_metrics(sims))


@pytest.mark.parametrize("protocol,n", [("generic", 7), ("f30k", 1000)])
def test_perfect_retrieval_scores_100_and_rank_1(protocol, n):
    m = evaluate(perfect(n), protocol)
    assert all(m[f"{d}_r{k}"] == 100.0 for d in ("i2t", "t2i") for k in (1, 5, 10))
    assert m["rsum"] == 600.0
    assert (m["i2t_medr"], m["t2i_medr"], m["i2t_meanr"], m["t2i_meanr"]) == (1.0, 1.0, 1.0, 1.0)


def test_reversed_retrieval_ranks_the_truth_last():
    n = 20
    m = evaluate(1.0 - perfect(n), "generic")  # every wrong item scores above every correct one
    assert m["rsum"] == 0.0
    assert m["i2t_medr"] == m["i2t_meanr"] == 5 * n - 5 + 1  # all 95 wrong captions come first
    assert m["t2i_medr"] == m["t2i_meanr"] == n  # all 19 wrong images come first


def test_constant_scores_count_every_tie_against_the_truth():
    n = 12
    m = evaluate(np.zeros((n, 5 * n), np.float32), "generic")
    assert m["rsum"] == 0.0
    assert m["i2t_meanr"] == 5 * n - 5 + 1 and m["t2i_meanr"] == n


def test_one_wrong_caption_tied_with_the_best_correct_one_costs_one_rank():
    sims = perfect(3)
    sims[0, 7] = 1.0  # a caption of image 1 ties with image 0's captions
    ranks = i2t_ranks(sims)
    assert ranks.tolist() == [1, 0, 0]
    m = evaluate(sims, "generic")
    assert m["i2t_r1"] == pytest.approx(200 / 3) and m["i2t_r5"] == 100.0


def test_image_rank_is_that_of_its_best_caption_and_ties_among_correct_ones_are_free():
    sims = np.zeros((2, 10), np.float32)
    sims[0, 4] = 0.9  # one good caption of image 0 is enough; the other four score 0 like the wrong ones
    sims[1, 5:10] = 0.5  # five tied correct captions of image 1 above all wrong ones
    assert i2t_ranks(sims).tolist() == [0, 0]


def test_caption_rank_counts_images_scoring_at_least_its_own():
    sims = np.zeros((4, 20), np.float32)
    sims[:, 0] = [0.5, 0.7, 0.5, 0.1]  # caption 0 (image 0): one image higher, one tied
    assert t2i_ranks(sims)[0] == 2


def test_median_rank_is_floor_of_the_median_plus_one_and_mean_rank_is_one_based():
    sims = perfect(2)
    sims[1, 0] = 2.0  # image 1 ranks one wrong caption first
    m = evaluate(sims, "generic")
    assert i2t_ranks(sims).tolist() == [0, 1]
    assert m["i2t_medr"] == 1.0  # floor(median(0, 1) = 0.5) + 1, as VSE++ reports
    assert m["i2t_meanr"] == 1.5


def test_rsum_is_the_sum_of_the_six_recalls():
    sims = np.random.default_rng(3).standard_normal((30, 150)).astype(np.float32)
    m = evaluate(sims, "generic")
    assert m["rsum"] == pytest.approx(sum(m[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)))
    assert list(m) == list(METRIC_KEYS)


def test_recall_curve_agrees_with_recall_at_1_5_10():
    sims = np.random.default_rng(4).standard_normal((50, 250)).astype(np.float32)
    m, curve = evaluate(sims, "generic"), recall_curve(i2t_ranks(sims), 10)
    assert curve.shape == (10,)
    assert (curve[0], curve[4], curve[9]) == pytest.approx((m["i2t_r1"], m["i2t_r5"], m["i2t_r10"]))


@pytest.mark.parametrize("n", [6, 7, 8, 20])
def test_ranks_are_counted_across_chunk_boundaries(n, monkeypatch):
    monkeypatch.setattr(metrics, "_CHUNK_ROWS", 7)  # n below, at, just above and not a multiple of the chunk
    sims = np.random.default_rng(n).integers(0, 5, size=(n, 5 * n)).astype(np.float32)
    want_i2t, want_t2i = reference_ranks(sims)
    for got_i2t, got_t2i in ((i2t_ranks(sims), t2i_ranks(sims)),
                             (i2t_ranks_torch(torch.from_numpy(sims)), t2i_ranks_torch(torch.from_numpy(sims)))):
        np.testing.assert_array_equal(np.asarray(got_i2t), want_i2t)
        np.testing.assert_array_equal(np.asarray(got_t2i), want_t2i)


# ----------------------------------------------------------------------------- torch path == numpy path


def tie_cases():
    """Hand-built matrices where ties decide the ranks (name -> float32 (N, 5N))."""
    one_tie = perfect(3)
    one_tie[0, 7] = 1.0  # a caption of image 1 ties with image 0's captions
    best_of_five = np.zeros((2, 10), np.float32)
    best_of_five[0, 4], best_of_five[1, 5:10] = 0.9, 0.5
    caption_ties = np.zeros((4, 20), np.float32)
    caption_ties[:, 0] = [0.5, 0.7, 0.5, 0.1]
    return {"perfect": perfect(7), "reversed": 1.0 - perfect(20), "constant": np.zeros((12, 60), np.float32),
            "one tie": one_tie, "best of five": best_of_five, "caption ties": caption_ties,
            "quantised": np.random.default_rng(1).integers(0, 4, size=(30, 150)).astype(np.float32)}


def assert_torch_ranks_equal_numpy(tensor, array):
    i2t, t2i = i2t_ranks_torch(tensor), t2i_ranks_torch(tensor)
    assert i2t.device == tensor.device and i2t.dtype == t2i.dtype == torch.int64
    np.testing.assert_array_equal(i2t.cpu().numpy(), i2t_ranks(array))
    np.testing.assert_array_equal(t2i.cpu().numpy(), t2i_ranks(array))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [1, 3, 24, 300])  # 300: more than one chunk of 256 rows
def test_torch_ranks_equal_numpy_ranks_on_random_matrices(n, device):
    sims = np.random.default_rng(n).standard_normal((n, 5 * n)).astype(np.float32)
    assert_torch_ranks_equal_numpy(torch.from_numpy(sims).to(device), sims)
    assert evaluate(torch.from_numpy(sims).to(device), "generic") == evaluate(sims, "generic")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(tie_cases()))
def test_torch_ranks_equal_numpy_ranks_when_scores_tie(case, device):
    sims = tie_cases()[case]
    assert_torch_ranks_equal_numpy(torch.from_numpy(sims).to(device), sims)
    assert evaluate(torch.from_numpy(sims).to(device), "generic") == evaluate(sims, "generic")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_torch_ranks_of_16_and_64_bit_tensors_equal_numpy_ranks_of_the_same_values(dtype, device):
    rng = np.random.default_rng(6)
    sims = torch.from_numpy(rng.standard_normal((40, 200))).to(dtype)  # 16 bits: rounding makes many ties
    values = sims.float().numpy() if dtype == torch.bfloat16 else sims.numpy()  # numpy has no bfloat16
    on_device = sims.to(device)
    assert_torch_ranks_equal_numpy(on_device, values)
    assert evaluate(on_device, "generic") == evaluate(values, "generic")
    if dtype != torch.float64:
        assert len(np.unique(values)) < values.size  # the case is about ties


def test_torch_coco1k_and_coco5k_equal_the_numpy_results_fold_by_fold(coco_sims):
    tensor = torch.from_numpy(coco_sims)  # the same memory; the folds are strided views
    k1 = evaluate(tensor, "coco1k")
    assert k1 == evaluate(coco_sims, "coco1k")  # the five per-fold dicts included
    assert evaluate(tensor, "coco5k") == evaluate(coco_sims, "coco5k")


# ----------------------------------------------------------------------------- COCO protocols


@pytest.fixture(scope="module")
def coco_sims():
    """(5000, 25000): quantised random scores (many ties) in the five 1K fold blocks; all else 2.0."""
    rng = np.random.default_rng(5)
    sims = np.full((5000, 25000), 2.0, np.float32)
    for f in range(5):
        block = np.floor(rng.random((1000, 5000), dtype=np.float32) * 64) / 64
        block[np.arange(1000).repeat(5), np.arange(5000)] += 0.05 * (f + 1)  # folds differ in quality
        sims[1000 * f:1000 * (f + 1), 5000 * f:5000 * (f + 1)] = block
    return sims


def test_coco1k_averages_every_metric_over_five_folds_checked_against_reference(coco_sims):
    m = evaluate(coco_sims, "coco1k")
    want = [reference_metrics(coco_sims[1000 * f:1000 * (f + 1), 5000 * f:5000 * (f + 1)]) for f in range(5)]
    assert len(m["folds"]) == 5
    for got, ref in zip(m["folds"], want):
        assert_metrics_equal(got, ref)
    assert_metrics_equal(m, {k: np.mean([w[k] for w in want]) for k in METRIC_KEYS})
    assert len({f["rsum"] for f in m["folds"]}) == 5  # the folds really differ: a mean, not one fold


def test_coco1k_scores_each_fold_alone_and_coco5k_scores_all_5000():
    sims = np.full((5000, 25000), 2.0, np.float32)  # across folds every wrong item wins
    for f in range(5):
        sims[1000 * f:1000 * (f + 1), 5000 * f:5000 * (f + 1)] = perfect(1000)
    k1, k5 = evaluate(sims, "coco1k"), evaluate(sims, "coco5k")
    assert k1["rsum"] == 600.0 and k1["i2t_meanr"] == 1.0 and k1["t2i_meanr"] == 1.0
    assert k5["rsum"] == 0.0
    assert k5["i2t_medr"] == 20001.0  # the 20,000 captions of the other folds come first
    assert k5["t2i_medr"] == 4001.0  # the 4,000 images of the other folds come first
    assert_metrics_equal(k5, evaluate(sims, "generic"))


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("protocol,shape,expected", [
    ("coco5k", (1000, 5000), "(5000, 25000)"),
    ("coco1k", (1000, 5000), "(5000, 25000)"),
    ("f30k", (5000, 25000), "(1000, 5000)"),
    ("f30k", (1000, 1000), "(1000, 5000)"),
    ("generic", (10, 40), "(N, 5N)"),
    ("generic", (50, 10), "(N, 5N)"),
])
def test_a_matrix_that_does_not_fit_the_protocol_is_refused_with_both_shapes(protocol, shape, expected):
    sims = np.broadcast_to(np.float32(0), shape)  # no memory for the big ones
    with pytest.raises(ProtocolError) as err:
        check_sims(sims, protocol, source="x.npy")
    assert str(shape) in str(err.value) and expected in str(err.value) and "x.npy" in str(err.value)


def test_nan_entries_are_refused_naming_where():
    sims = perfect(4)
    sims[2, 13] = np.nan
    with pytest.raises(ProtocolError, match=r"NaN.*image 2, caption 13"):
        evaluate(sims, "generic")


def test_unknown_protocol_is_refused_with_the_choices():
    with pytest.raises(ProtocolError, match="coco5k, coco1k, f30k, generic"):
        evaluate(perfect(2), "coco")


# ----------------------------------------------------------------------------- refusals of tensors


@pytest.mark.parametrize("protocol,shape,expected", [
    ("coco5k", (1000, 5000), "(5000, 25000)"),
    ("f30k", (5000, 25000), "(1000, 5000)"),
    ("generic", (50, 10), "(N, 5N)"),
])
def test_a_tensor_that_does_not_fit_the_protocol_is_refused_like_an_array(protocol, shape, expected):
    tensor = torch.zeros(1).expand(shape)  # no memory for the big ones
    with pytest.raises(ProtocolError) as err:
        evaluate(tensor, protocol, source="split X")
    with pytest.raises(ProtocolError) as np_err:
        evaluate(np.broadcast_to(np.float32(0), shape), protocol, source="split X")
    assert str(err.value) == str(np_err.value)
    assert str(shape) in str(err.value) and expected in str(err.value) and "split X" in str(err.value)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_tensor_entries_are_refused_naming_the_source_and_the_first(bad, dtype, device):
    sims = perfect(4)
    sims[2, 13] = sims[3, 1] = bad
    with pytest.raises(ProtocolError) as err:
        evaluate(torch.from_numpy(sims).to(device, dtype), "generic", source="split X")
    with pytest.raises(ProtocolError) as np_err:
        evaluate(sims, "generic", source="split X")
    assert str(err.value) == str(np_err.value)
    assert "split X: 2 non-finite entries (NaN or inf), the first at image 2, caption 13" in str(err.value)


def test_an_integer_tensor_is_refused():
    with pytest.raises(ProtocolError, match="dtype torch.int64 is not a floating-point similarity matrix"):
        evaluate(torch.from_numpy(perfect(2)).long(), "generic")
