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

``evaluate`` takes a numpy array or a torch tensor on any device. A tensor is
scored where it lives (``i2t_ranks_torch`` / ``t2i_ranks_torch``: the same
counts, accumulated on the device) and only the rank vectors travel to the
host, once: on a GPU this avoids copying the 500 MB COCO 5K matrix and the
numpy passes over it. 16-bit inputs are compared in float32 (exact and
order-preserving), so every dtype gives the ranks of its values.

Metrics follow VSE++/SCAN/VSE-infinity: R@K = 100 * fraction with rank < K;
median rank = floor(median(rank)) + 1 and mean rank = mean(rank) + 1 (both
1-based); rsum = the sum of the six recalls. COCO 1K averages every metric,
the ranks included, over its 5 folds of 1,000 images.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

CAPTIONS_PER_IMAGE = 5
RECALL_KS = (1, 5, 10)
METRIC_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum",
               "i2t_medr", "t2i_medr", "i2t_meanr", "t2i_meanr")
# Images each protocol needs (None: any N), and the fold size of coco1k.
PROTOCOL_IMAGES = {"coco5k": 5000, "coco1k": 5000, "f30k": 1000, "generic": None}
COCO1K_FOLDS, COCO1K_FOLD_IMAGES = 5, 1000
# Rows scored at once: bounds the temporary boolean matrix to ~ rows x 5N bytes.
_CHUNK_ROWS = 256
TORCH_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Compared in float32: exact, and CPU kernels for 16-bit types are slow.
_WIDER = {torch.float16: torch.float32, torch.bfloat16: torch.float32}

Sims = Union[np.ndarray, torch.Tensor]


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


def _first_non_finite(sims: Sims) -> Optional[Tuple[int, int, int]]:
    """(count, image, caption of the first) NaN/inf entries, or None; one host sync for a tensor."""
    if torch.is_tensor(sims):
        # One reduction pass without a temporary (NaN propagates to min and max); torch.isfinite
        # over the whole matrix costs ~20x more on a CPU, so it only runs to locate a bad entry.
        lo, hi = torch.aminmax(sims)
        if bool(torch.isfinite(lo) & torch.isfinite(hi)):
            return None
        bad = ~torch.isfinite(sims)  # (N, 5N) bool, where sims lives
        r, c = bad.nonzero()[0].tolist()  # row-major order, like np.argwhere
        return int(bad.sum()), r, c
    bad = ~np.isfinite(sims)
    if not bad.any():
        return None
    r, c = np.argwhere(bad)[0]
    return int(bad.sum()), int(r), int(c)


def check_sims(sims: Sims, protocol: str, source: str = "similarity matrix") -> None:
    """Refuse a matrix (numpy, or torch on any device) that does not fit the protocol (check_shape)
    or holds NaN/inf."""
    check_shape(sims.shape, protocol, source)
    if torch.is_tensor(sims):
        if sims.dtype not in TORCH_DTYPES:
            raise ProtocolError(f"{source}: dtype {sims.dtype} is not a floating-point similarity matrix "
                                f"(one of {', '.join(str(d) for d in TORCH_DTYPES)})")
    elif not np.issubdtype(sims.dtype, np.floating):
        raise ProtocolError(f"{source}: dtype {sims.dtype} is not a floating-point similarity matrix")
    bad = _first_non_finite(sims)
    if bad is not None:
        count, r, c = bad
        raise ProtocolError(f"{source}: {count} non-finite entries (NaN or inf), the first at "
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


@torch.no_grad()
def i2t_ranks_torch(sims: torch.Tensor) -> torch.Tensor:
    """(N, 5N) tensor -> (N,) int64 on its device: i2t_ranks without leaving the device.

    Chunks of _CHUNK_ROWS rows; counts are written on the device (no host sync).
    Chunk counts are summed as int32 (a row holds at most 5N < 2**31 items): torch's
    CPU reduction of booleans into int64 is ~8x slower.
    """
    n = sims.shape[0]
    wide = _WIDER.get(sims.dtype, sims.dtype)
    rows = torch.arange(n, device=sims.device)[:, None]
    own = rows * CAPTIONS_PER_IMAGE + torch.arange(CAPTIONS_PER_IMAGE, device=sims.device)  # (N, 5)
    gt = sims[rows, own].to(wide)  # (N, 5): image k's own captions
    best = gt.amax(dim=1, keepdim=True)  # (N, 1)
    at_least = torch.empty(n, dtype=torch.int64, device=sims.device)
    for lo in range(0, n, _CHUNK_ROWS):
        hi = min(lo + _CHUNK_ROWS, n)
        at_least[lo:hi] = (sims[lo:hi].to(wide) >= best[lo:hi]).sum(dim=1, dtype=torch.int32)  # with correct
    return at_least - (gt >= best).sum(dim=1)


@torch.no_grad()
def t2i_ranks_torch(sims: torch.Tensor) -> torch.Tensor:
    """(N, 5N) tensor -> (5N,) int64 on its device: t2i_ranks without leaving the device."""
    n, m = sims.shape
    wide = _WIDER.get(sims.dtype, sims.dtype)
    cols = torch.arange(m, device=sims.device)
    target = sims[cols // CAPTIONS_PER_IMAGE, cols].to(wide)  # (5N,): score of the correct image
    at_least = torch.zeros(m, dtype=torch.int64, device=sims.device)
    for lo in range(0, n, _CHUNK_ROWS):
        at_least += (sims[lo:lo + _CHUNK_ROWS].to(wide) >= target).sum(dim=0, dtype=torch.int32)
    return at_least - 1  # the correct image itself


def _ranks_on_device(blocks: Sequence[torch.Tensor]) -> List[Tuple[np.ndarray, np.ndarray]]:
    """(i2t, t2i) numpy ranks of each (n, 5n) block, counted where the blocks live.

    All rank vectors cross to the host in one transfer (a single sync).
    """
    parts = [r for block in blocks for r in (i2t_ranks_torch(block), t2i_ranks_torch(block))]
    host = torch.cat(parts).cpu().numpy()
    pieces = np.split(host, np.cumsum([len(p) for p in parts])[:-1])
    return list(zip(pieces[0::2], pieces[1::2]))


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


def coco1k_folds(sims: Sims) -> List[Sims]:
    """(5000, 25000) -> 5 views (1000, 5000): fold f = images 1000f.., captions 5000f.."""
    f, c = COCO1K_FOLD_IMAGES, COCO1K_FOLD_IMAGES * CAPTIONS_PER_IMAGE
    return [sims[i * f:(i + 1) * f, i * c:(i + 1) * c] for i in range(COCO1K_FOLDS)]


def evaluate(sims: Sims, protocol: str, source: str = "similarity matrix") -> dict:
    """Metrics of ``sims`` under ``protocol`` (coco5k | coco1k | f30k | generic).

    ``sims``: a numpy array, or a torch tensor (float16, bfloat16, float32 or
    float64) on any device, ranked there (one transfer of the rank vectors).
    Returns the keys of METRIC_KEYS; for coco1k each is the mean over the 5
    folds and ``folds`` holds the per-fold dicts.
    Raises:
        ProtocolError: the shape does not fit the protocol, or NaN/inf entries.
    """
    check_sims(sims, protocol, source)
    if not torch.is_tensor(sims) and sims.dtype == np.float16:
        sims = sims.astype(np.float32)  # exact, order-preserving, and numpy compares float16 slowly
    blocks = coco1k_folds(sims) if protocol == "coco1k" else [sims]
    if torch.is_tensor(sims):
        ranks = _ranks_on_device(blocks)
    else:
        ranks = [(i2t_ranks(b), t2i_ranks(b)) for b in blocks]
    folds = [metrics_from_ranks(i2t, t2i) for i2t, t2i in ranks]
    if protocol != "coco1k":
        return folds[0]
    out: dict = {k: float(np.mean([f[k] for f in folds])) for k in METRIC_KEYS}
    out["folds"] = folds
    return out
