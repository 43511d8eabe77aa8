"""Retrieval ranks, recall/rank metrics and the evaluation protocols.

A similarity matrix ``sims`` is (N, 5N): images x captions, the captions of
image k in columns 5k..5k+4 (method.md, "Evaluation protocol").

Ranks are 0-based and computed exactly by counting, without sorting:

- image -> text: the rank of image k is the number of *wrong* captions whose
  score is >= the best score among its 5 captions (the position of its
  best-placed correct caption in a ranking of all 5N captions);
- text -> image: the rank of caption j is the number of images other than
  j // 5 whose score is >= the score of image j // 5.

Ties are pessimistic: a wrong item that ties with the ground truth counts as
ranked above it, so constant or degenerate scores cannot look good (an
argsort-based evaluation breaks ties by column order instead, which lets a
model that scores everything equal earn R@1 = 100 when the correct caption
happens to come first). Ties among the 5 correct captions of an image do not
matter: only the best one counts.

Metrics follow VSE++/SCAN/VSE-infinity: R@K = 100 * fraction with rank < K;
median rank = floor(median(rank)) + 1 and mean rank = mean(rank) + 1 (both
1-based); rsum = the sum of the six recalls. COCO 1K averages every metric,
the ranks included, over its 5 folds of 1,000 images.
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np

CAPTIONS_PER_IMAGE = 5
RECALL_KS = (1, 5, 10)
METRIC_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum",
               "i2t_medr", "t2i_medr", "i2t_meanr", "t2i_meanr")
# Images each protocol needs (None: any N), and the fold size of coco1k.
PROTOCOL_IMAGES = {"coco5k": 5000, "coco1k": 5000, "f30k": 1000, "generic": None}
COCO1K_FOLDS, COCO1K_FOLD_IMAGES = 5, 1000
# Rows scored at once: bounds the temporary boolean matrix to ~ rows x 5N bytes.
_CHUNK_ROWS = 256


class ProtocolError(ValueError):
    """A similarity matrix that does not fit the requested protocol."""


def check_shape(shape: tuple, protocol: str, source: str = "similarity matrix") -> None:
    """Refuse a matrix shape that is not (N, 5N) for the protocol's N.

    Raises:
        ProtocolError: naming the source, the shape found and the shape expected.
    """
    if protocol not in PROTOCOL_IMAGES:
        raise ProtocolError(f"unknown protocol '{protocol}'; valid choices: {', '.join(PROTOCOL_IMAGES)}")
    n = PROTOCOL_IMAGES[protocol]
    shape = tuple(shape)
    if n is None:
        ok = len(shape) == 2 and shape[0] > 0 and shape[1] == CAPTIONS_PER_IMAGE * shape[0]
        expected = "(N, 5N): N images x 5 captions per image"
    else:
        ok = shape == (n, CAPTIONS_PER_IMAGE * n)
        expected = f"({n}, {CAPTIONS_PER_IMAGE * n}) for protocol '{protocol}'"
    if not ok:
        raise ProtocolError(f"{source}: shape {shape} does not fit; expected {expected}. "
                            "Rows are images, columns are captions (image k's at 5k..5k+4); "
                            "use protocol 'generic' for a split of another size.")


def check_sims(sims: np.ndarray, protocol: str, source: str = "similarity matrix") -> None:
    """Refuse a matrix that does not fit the protocol (check_shape) or holds NaN/inf."""
    check_shape(sims.shape, protocol, source)
    if not np.issubdtype(sims.dtype, np.floating):
        raise ProtocolError(f"{source}: dtype {sims.dtype} is not a floating-point similarity matrix")
    bad = ~np.isfinite(sims)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise ProtocolError(f"{source}: {int(bad.sum())} non-finite entries (NaN or inf), the first at "
                            f"image {r}, caption {c}; the encoder or the saved file is broken")


def i2t_ranks(sims: np.ndarray) -> np.ndarray:
    """(N, 5N) -> (N,) int64: 0-based rank of each image's best correct caption."""
    n = sims.shape[0]
    rows = np.arange(n)
    gt = sims.reshape(n, n, CAPTIONS_PER_IMAGE)[rows, rows]  # (N, 5): image k's own captions
    best = gt.max(axis=1)  # (N,)
    ranks = np.empty(n, dtype=np.int64)
    for lo in range(0, n, _CHUNK_ROWS):
        hi = min(lo + _CHUNK_ROWS, n)
        at_least = np.count_nonzero(sims[lo:hi] >= best[lo:hi, None], axis=1)  # includes correct ones
        ranks[lo:hi] = at_least - np.count_nonzero(gt[lo:hi] >= best[lo:hi, None], axis=1)
    return ranks


def t2i_ranks(sims: np.ndarray) -> np.ndarray:
    """(N, 5N) -> (5N,) int64: 0-based rank of each caption's image j // 5."""
    n, m = sims.shape
    cols = np.arange(m)
    target = sims[cols // CAPTIONS_PER_IMAGE, cols]  # (5N,): score of the correct image
    at_least = np.zeros(m, dtype=np.int64)
    for lo in range(0, n, _CHUNK_ROWS):
        at_least += np.count_nonzero(sims[lo:lo + _CHUNK_ROWS] >= target, axis=0)
    return at_least - 1  # the correct image itself


def recall_curve(ranks: np.ndarray, max_k: int) -> np.ndarray:
    """(Q,) 0-based ranks -> (max_k,) recall in percent at K = 1..max_k."""
    counts = np.bincount(np.minimum(ranks, max_k), minlength=max_k + 1)[:max_k]
    return 100.0 * np.cumsum(counts) / len(ranks)


def metrics_from_ranks(i2t: np.ndarray, t2i: np.ndarray) -> Dict[str, float]:
    """Recalls (percent), rsum and 1-based median/mean ranks from 0-based ranks."""
    out: Dict[str, float] = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in RECALL_KS:
            out[f"{name}_r{k}"] = 100.0 * float(np.count_nonzero(ranks < k)) / len(ranks)
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in RECALL_KS)
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        out[f"{name}_medr"] = float(np.floor(np.median(ranks)) + 1)
        out[f"{name}_meanr"] = float(ranks.mean() + 1)
    return {k: out[k] for k in METRIC_KEYS}


def retrieval_metrics(sims: np.ndarray) -> Dict[str, float]:
    """All metrics of one (N, 5N) matrix, scored as a single pool."""
    return metrics_from_ranks(i2t_ranks(sims), t2i_ranks(sims))


def coco1k_folds(sims: np.ndarray) -> List[np.ndarray]:
    """(5000, 25000) -> 5 views (1000, 5000): fold f = images 1000f.., captions 5000f.."""
    f, c = COCO1K_FOLD_IMAGES, COCO1K_FOLD_IMAGES * CAPTIONS_PER_IMAGE
    return [sims[i * f:(i + 1) * f, i * c:(i + 1) * c] for i in range(COCO1K_FOLDS)]


def evaluate(sims: np.ndarray, protocol: str, source: str = "similarity matrix") -> dict:
    """Metrics of ``sims`` under ``protocol`` (coco5k | coco1k | f30k | generic).

    Returns the keys of METRIC_KEYS; for coco1k each is the mean over the 5
    folds and ``folds`` holds the per-fold dicts.
    Raises:
        ProtocolError: the shape does not fit the protocol, or NaN/inf entries.
    """
    check_sims(sims, protocol, source)
    if sims.dtype == np.float16:
        sims = sims.astype(np.float32)  # exact, order-preserving, and numpy compares float16 slowly
    if protocol != "coco1k":
        return retrieval_metrics(sims)
    folds = [retrieval_metrics(fold) for fold in coco1k_folds(sims)]
    out: dict = {k: float(np.mean([f[k] for f in folds])) for k in METRIC_KEYS}
    out["folds"] = folds
    return out

