"""Retrieval ranks, recall/rank metrics and the evaluation protocols.

A similarity matrix ``sims`` is (N, C): images x captions, image k's n_k >= 1
captions in the n_k columns after those of images 0..k-1, so C = sum of n_k.
``caption_counts`` (N,) gives the n_k; None means 5 per image, C = 5N, image
k's captions in columns 5k..5k+4 (COCO and Flickr30K; method.md, "Evaluation
protocol"). The image a caption belongs to is its owner (``caption_owners``).

Ranks are 0-based and computed exactly by counting, without sorting:

- image -> text: the rank of image k is the number of *wrong* captions whose
  score is >= the best score among its own n_k captions (the position of its
  best-placed correct caption in a ranking of all C captions);
- text -> image: the rank of caption j is the number of images other than
  its owner whose score is >= the score of its owner.

Ties are pessimistic: a wrong item that ties with the ground truth counts as
ranked above it, so constant or degenerate scores cannot look good (an
argsort-based evaluation breaks ties by column order instead, which lets a
model that scores everything equal earn R@1 = 100 when the correct caption
happens to come first). Ties among an image's own captions do not matter:
only the best one counts.

``evaluate`` takes a numpy array or a torch tensor on any device. A tensor is
scored where it lives (``i2t_ranks_torch`` / ``t2i_ranks_torch``: the same
counts, accumulated on the device) and only the rank vectors travel to the
host, once: on a GPU this avoids copying the 500 MB COCO 5K matrix and the
numpy passes over it. 16-bit inputs are compared in float32 (exact and
order-preserving), so every dtype gives the ranks of its values.

Metrics follow VSE++/SCAN/VSE-infinity: R@K = 100 * fraction with rank < K;
median rank = floor(median(rank)) + 1 and mean rank = mean(rank) + 1 (both
1-based); rsum = the sum of the six recalls. COCO 1K averages every metric,
the ranks included, over its 5 folds of 1,000 images. The COCO and F30K
protocols need exactly 5 captions per image; ``generic`` takes any n_k >= 1.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

CAPTIONS_PER_IMAGE = 5  # the COCO / F30K protocols' count, and the layout when no caption counts are given
RECALL_KS = (1, 5, 10)
METRIC_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum",
               "i2t_medr", "t2i_medr", "i2t_meanr", "t2i_meanr")
# Images each protocol needs (None: any N), and the fold size of coco1k.
PROTOCOL_IMAGES = {"coco5k": 5000, "coco1k": 5000, "f30k": 1000, "generic": None}
COCO1K_FOLDS, COCO1K_FOLD_IMAGES = 5, 1000
# Rows scored at once: bounds the temporary boolean matrix to ~ rows x C bytes.
_CHUNK_ROWS = 256
TORCH_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Compared in float32: exact, and CPU kernels for 16-bit types are slow.
_WIDER = {torch.float16: torch.float32, torch.bfloat16: torch.float32}
# Distinct counts a refusal lists (the most frequent ones).
_COUNTS_SHOWN = 8

Sims = Union[np.ndarray, torch.Tensor]
# (N,) captions per image, integers >= 1; None: 5 per image.
Counts = Union[np.ndarray, torch.Tensor, Sequence[int], None]


class ProtocolError(ValueError):
    """A similarity matrix that does not fit the requested protocol."""


def as_counts(caption_counts: Counts) -> Optional[np.ndarray]:
    """caption_counts as a (N,) int64 numpy array, or None (5 per image) when None or all 5: the
    5-per-image layout (owners j // 5, the COCO protocols and folds) applies to every split that has it."""
    if caption_counts is None:
        return None
    counts = caption_counts.cpu().numpy() if torch.is_tensor(caption_counts) else np.asarray(caption_counts)
    counts = counts.astype(np.int64).reshape(-1)
    return None if counts.size and (counts == CAPTIONS_PER_IMAGE).all() else counts


def describe_counts(caption_counts: Counts) -> str:
    """'captions per image range 1..7 (3 images with 1, ..., 4 with 7)', or '... 1 for all 1,000 images'."""
    counts = np.asarray(caption_counts.cpu() if torch.is_tensor(caption_counts) else caption_counts, np.int64)
    values, freq = np.unique(counts, return_counts=True)
    if len(values) == 1:
        return f"captions per image: {values[0]} for all {freq[0]:,} images"
    shown = np.sort(np.argsort(-freq, kind="stable")[:_COUNTS_SHOWN])  # the most frequent, by value
    parts = [f"{freq[i]:,} {'images ' if p == 0 else ''}with {values[i]}" for p, i in enumerate(shown)]
    more = f", and {len(values) - len(shown)} other counts" if len(values) > len(shown) else ""
    return f"captions per image range {values[0]}..{values[-1]} ({', '.join(parts)}{more})"


def check_counts(shape: tuple, caption_counts: Counts, source: str = "similarity matrix") -> None:
    """Refuse caption counts that do not describe an (N, C) matrix: N entries, each >= 1, summing to C.

    Raises:
        ProtocolError: naming the source and what does not fit.
    """
    raw = caption_counts.cpu().numpy() if torch.is_tensor(caption_counts) else np.asarray(caption_counts)
    if raw.ndim != 1 or not np.issubdtype(raw.dtype, np.integer):
        raise ProtocolError(f"{source}: caption counts must be a 1-D integer array (one count per image), got "
                            f"shape {raw.shape} of {raw.dtype}")
    shape = tuple(shape)
    if len(shape) != 2 or raw.shape[0] != shape[0]:
        raise ProtocolError(f"{source}: {raw.shape[0]} caption counts for a matrix of shape {shape}; "
                            "expected one count per image (row)")
    if raw.size and raw.min() < 1:
        k = int(np.argmax(raw < 1))
        raise ProtocolError(f"{source}: image {k} has {int(raw[k])} captions; every image needs one or more")
    if int(raw.sum()) != shape[1]:
        raise ProtocolError(f"{source}: the caption counts sum to {int(raw.sum()):,} captions but the matrix has "
                            f"{shape[1]:,} columns (shape {shape}); the counts belong to another split")


def check_shape(shape: tuple, protocol: str, source: str = "similarity matrix",
                caption_counts: Counts = None) -> None:
    """Refuse a matrix shape (and caption counts) that do not fit the protocol.

    Without caption_counts the matrix must be (N, 5N); with them (N, sum of
    counts). coco5k, coco1k and f30k need exactly 5 captions per image and
    their image count; generic takes any N >= 1 and any counts >= 1.
    Raises:
        ProtocolError: naming the source, what was found and what is expected.
    """
    if protocol not in PROTOCOL_IMAGES:
        raise ProtocolError(f"unknown protocol '{protocol}'; valid choices: {', '.join(PROTOCOL_IMAGES)}")
    n = PROTOCOL_IMAGES[protocol]
    shape = tuple(shape)
    if caption_counts is not None:
        check_counts(shape, caption_counts, source)
        counts = as_counts(caption_counts)
        if counts is not None and counts.size:  # not 5 per image (else: checked as (N, 5N) below)
            if n is not None:
                raise ProtocolError(f"{source}: {describe_counts(counts)}; protocol {protocol} needs exactly "
                                    f"{CAPTIONS_PER_IMAGE} per image: rebuild the split with `--first-five` "
                                    "(python -m data_shards karpathy) or use protocol generic")
            return
    if n is None:
        ok = len(shape) == 2 and shape[0] > 0 and shape[1] == CAPTIONS_PER_IMAGE * shape[0]
        expected = "(N, 5N): N images x 5 captions per image"
    else:
        ok = shape == (n, CAPTIONS_PER_IMAGE * n)
        expected = f"({n}, {CAPTIONS_PER_IMAGE * n}) for protocol '{protocol}'"
    if not ok:
        raise ProtocolError(f"{source}: shape {shape} does not fit; expected {expected}. "
                            "Rows are images, columns are captions (image k's at 5k..5k+4); "
                            "use protocol 'generic' for a split of another size"
                            + ("" if n is not None else ", with the caption counts of a split with another "
                               "number of captions per image") + ".")


def _first_non_finite(sims: Sims) -> Optional[Tuple[int, int, int]]:
    """(count, image, caption of the first) NaN/inf entries, or None; one host sync for a tensor."""
    if torch.is_tensor(sims):
        # One reduction pass without a temporary (NaN propagates to min and max); torch.isfinite
        # over the whole matrix costs ~20x more on a CPU, so it only runs to locate a bad entry.
        lo, hi = torch.aminmax(sims)
        if bool(torch.isfinite(lo) & torch.isfinite(hi)):
            return None
        bad = ~torch.isfinite(sims)  # (N, C) bool, where sims lives
        r, c = bad.nonzero()[0].tolist()  # row-major order, like np.argwhere
        return int(bad.sum()), r, c
    bad = ~np.isfinite(sims)
    if not bad.any():
        return None
    r, c = np.argwhere(bad)[0]
    return int(bad.sum()), int(r), int(c)


def check_sims(sims: Sims, protocol: str, source: str = "similarity matrix", caption_counts: Counts = None) -> None:
    """Refuse a matrix (numpy, or torch on any device) that does not fit the protocol with these
    caption counts (check_shape) or holds NaN/inf."""
    check_shape(sims.shape, protocol, source, caption_counts)
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


def caption_owners(caption_counts: Counts, num_captions: int) -> np.ndarray:
    """(C,) int64: the image each caption column belongs to; caption_counts None: 5 per image (j // 5)."""
    counts = as_counts(caption_counts)
    if counts is None:
        return np.arange(num_captions) // CAPTIONS_PER_IMAGE
    return np.repeat(np.arange(len(counts)), counts)


def _starts(owner: np.ndarray, n: int) -> np.ndarray:
    """(N,) the first column of each image's captions (every image has one or more)."""
    return np.searchsorted(owner, np.arange(n))


def i2t_ranks(sims: np.ndarray, caption_counts: Counts = None) -> np.ndarray:
    """(N, C) -> (N,) int64: 0-based rank of each image's best correct caption (counts: module docstring)."""
    n, m = sims.shape
    owner = caption_owners(caption_counts, m)
    starts = _starts(owner, n)
    gt = sims[owner, np.arange(m)]  # (C,): each caption's score with its own image
    best = np.maximum.reduceat(gt, starts)  # (N,): image k's best own caption
    own = np.add.reduceat((gt >= best[owner]).astype(np.int64), starts)  # (N,) own captions tied with the best
    ranks = np.empty(n, dtype=np.int64)
    for lo in range(0, n, _CHUNK_ROWS):
        hi = min(lo + _CHUNK_ROWS, n)
        ranks[lo:hi] = np.count_nonzero(sims[lo:hi] >= best[lo:hi, None], axis=1)  # includes correct ones
    return ranks - own


def t2i_ranks(sims: np.ndarray, caption_counts: Counts = None) -> np.ndarray:
    """(N, C) -> (C,) int64: 0-based rank of each caption's own image."""
    n, m = sims.shape
    cols = np.arange(m)
    target = sims[caption_owners(caption_counts, m), cols]  # (C,): score of the correct image
    at_least = np.zeros(m, dtype=np.int64)
    for lo in range(0, n, _CHUNK_ROWS):
        at_least += np.count_nonzero(sims[lo:lo + _CHUNK_ROWS] >= target, axis=0)
    return at_least - 1  # the correct image itself


def _owners_torch(caption_counts: Counts, num_captions: int, device: torch.device) -> torch.Tensor:
    """caption_owners as a tensor on ``device``, built there (no host sync)."""
    counts = as_counts(caption_counts)
    cols = torch.arange(num_captions, device=device)
    if counts is None:
        return cols // CAPTIONS_PER_IMAGE
    images = torch.arange(len(counts), device=device)
    return torch.repeat_interleave(images, torch.from_numpy(counts).to(device), output_size=num_captions)


@torch.no_grad()
def i2t_ranks_torch(sims: torch.Tensor, caption_counts: Counts = None) -> torch.Tensor:
    """(N, C) tensor -> (N,) int64 on its device: i2t_ranks without leaving the device.

    Chunks of _CHUNK_ROWS rows; counts are written on the device (no host sync).
    Chunk counts are summed as int32 (a row holds at most C < 2**31 items): torch's
    CPU reduction of booleans into int64 is ~8x slower.
    """
    n, m = sims.shape
    wide = _WIDER.get(sims.dtype, sims.dtype)
    owner = _owners_torch(caption_counts, m, sims.device)  # (C,)
    gt = sims[owner, torch.arange(m, device=sims.device)].to(wide)  # (C,): each caption with its own image
    best = torch.zeros(n, dtype=wide, device=sims.device).scatter_reduce_(0, owner, gt, "amax",
                                                                         include_self=False)  # (N,)
    own = torch.zeros(n, dtype=torch.int64, device=sims.device).index_add_(0, owner, (gt >= best[owner]).long())
    at_least = torch.empty(n, dtype=torch.int64, device=sims.device)
    best = best[:, None]
    for lo in range(0, n, _CHUNK_ROWS):
        hi = min(lo + _CHUNK_ROWS, n)
        at_least[lo:hi] = (sims[lo:hi].to(wide) >= best[lo:hi]).sum(dim=1, dtype=torch.int32)  # with correct
    return at_least - own


@torch.no_grad()
def t2i_ranks_torch(sims: torch.Tensor, caption_counts: Counts = None) -> torch.Tensor:
    """(N, C) tensor -> (C,) int64 on its device: t2i_ranks without leaving the device."""
    n, m = sims.shape
    wide = _WIDER.get(sims.dtype, sims.dtype)
    cols = torch.arange(m, device=sims.device)
    target = sims[_owners_torch(caption_counts, m, sims.device), cols].to(wide)  # (C,): the correct image's score
    at_least = torch.zeros(m, dtype=torch.int64, device=sims.device)
    for lo in range(0, n, _CHUNK_ROWS):
        at_least += (sims[lo:lo + _CHUNK_ROWS].to(wide) >= target).sum(dim=0, dtype=torch.int32)
    return at_least - 1  # the correct image itself


def _ranks_on_device(blocks: Sequence[torch.Tensor], caption_counts: Counts) -> List[Tuple[np.ndarray, np.ndarray]]:
    """(i2t, t2i) numpy ranks of each (n, c) block, counted where the blocks live.

    All rank vectors cross to the host in one transfer (a single sync).
    """
    parts = [r for block in blocks for r in (i2t_ranks_torch(block, caption_counts),
                                             t2i_ranks_torch(block, caption_counts))]
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
    """(5000, 25000) with 5 captions per image -> 5 views (1000, 5000): fold f = images 1000f.., captions 5000f.."""
    f, c = COCO1K_FOLD_IMAGES, COCO1K_FOLD_IMAGES * CAPTIONS_PER_IMAGE
    return [sims[i * f:(i + 1) * f, i * c:(i + 1) * c] for i in range(COCO1K_FOLDS)]


def evaluate(sims: Sims, protocol: str, source: str = "similarity matrix", caption_counts: Counts = None) -> dict:
    """Metrics of ``sims`` under ``protocol`` (coco5k | coco1k | f30k | generic).

    ``sims``: (N, C) a numpy array, or a torch tensor (float16, bfloat16,
    float32 or float64) on any device, ranked there (one transfer of the rank
    vectors). ``caption_counts``: (N,) captions per image n_k >= 1, image k's
    in the n_k columns after those of images 0..k-1; None: 5 per image, C = 5N.
    Returns the keys of METRIC_KEYS; for coco1k each is the mean over the 5
    folds and ``folds`` holds the per-fold dicts.
    Raises:
        ProtocolError: the shape or the caption counts do not fit the protocol (coco5k, coco1k and
            f30k need exactly 5 per image), or NaN/inf entries.
    """
    check_sims(sims, protocol, source, caption_counts)
    counts = as_counts(caption_counts)  # None for 5 per image: the only layout coco1k's folds take
    if not torch.is_tensor(sims) and sims.dtype == np.float16:
        sims = sims.astype(np.float32)  # exact, order-preserving, and numpy compares float16 slowly
    blocks = coco1k_folds(sims) if protocol == "coco1k" else [sims]
    if torch.is_tensor(sims):
        ranks = _ranks_on_device(blocks, counts)
    else:
        ranks = [(i2t_ranks(b, counts), t2i_ranks(b, counts)) for b in blocks]
    folds = [metrics_from_ranks(i2t, t2i) for i2t, t2i in ranks]
    if protocol != "coco1k":
        return folds[0]
    out: dict = {k: float(np.mean([f[k] for f in folds])) for k in METRIC_KEYS}
    out["folds"] = folds
    return out
