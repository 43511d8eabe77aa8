"""Metrics beyond COCO's 5 annotated captions: ECCV Caption, CxC and PMRP on COCO 5K.

COCO 5K recall counts only an image's 5 annotated captions as correct, yet
many other captions of the split describe it as well. Three positive sets
extend the annotation, all over Karpathy's COCO 5K test split and all shipped
(or pointed to) by NAVER's ``eccv_caption`` package (MIT), which computes the
metrics here:

- ECCV Caption (Chun et al. 2022): machine- and human-verified positives for
  1,261 image and 1,332 caption queries; mAP@R, R-Precision and R@1;
- CxC (Parekh et al. 2021): human-rated positives for every query; R@1/5/10;
- PMRP (plausible-match R-Precision, PCME): positives sharing COCO object
  labels; its files (~140 MB) are a separate download (:data:`PM_FILES`).

They are available when the package is installed (``pip install
'user-dist[eval]'``) and the test split carries COCO's caption annotation ids
(the package's id space): its 25,000 caption ids are exactly the package's
and each caption belongs to the image COCO gives it, 5 per image (a split with
another number of captions per image gets none: :func:`compute_extended`'s
caption_counts). The package takes ranked
lists of ids, so each query's list is cut to what the metrics read (10 items,
or its number of positives when that is more). Ties are broken by position in
the split (lower first), as an argsort does; the protocols' own recalls in
:mod:`.metrics` count ties pessimistically, so the two agree only when scores
do not tie (real-valued scores practically never do).

Values are in percent, keys :data:`EXTENDED_KEYS`; the evaluation job stores
them under ``results[EXTENDED]`` next to the protocols.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch

from user_dist.data_format import MANIFEST, SplitIds, read_split_ids
from user_dist.evaluation.metrics import CAPTIONS_PER_IMAGE, Counts, as_counts, caption_owners, describe_counts

EXTENDED = "extended"  # key of these metrics in the job's results, beside the protocols
RECALL_KS = (1, 5, 10)
ECCV_KEYS = tuple(f"eccv_{d}_{m}" for m in ("map_at_r", "rprecision", "r1") for d in ("i2t", "t2i"))
CXC_KEYS = tuple(f"cxc_{d}_r{k}" for d in ("i2t", "t2i") for k in RECALL_KS)
PMRP_KEYS = ("pmrp_i2t", "pmrp_t2i")
EXTENDED_KEYS = ECCV_KEYS + CXC_KEYS + PMRP_KEYS
PM_FILES = ("pm_image_to_caption.json", "pm_caption_to_image.json")
PM_SOURCE = "https://github.com/naver-ai/eccv-caption (README: 'Download the full data', a Google Drive folder)"
INSTALL_HINT = "pip install 'user-dist[eval]' (or pip install eccv_caption)"
_CHUNK = 1024  # queries ranked at once: a (1024, 25000) float32 block is 100 MB

log = logging.getLogger(__name__)
Sims = Union[np.ndarray, torch.Tensor]


class ExtendedUnavailable(Exception):
    """The extended metrics cannot be computed for this split; the message says why in one line."""


def check_pm_dir(pm_dir: str) -> None:
    """Refuse a plausible-match folder without both files, saying where to get them.

    Raises:
        ValueError: (a user error: the job stops) naming the missing files.
    """
    missing = [f for f in PM_FILES if not os.path.isfile(os.path.join(pm_dir, f))]
    if missing:
        raise ValueError(f"PMRP: {pm_dir} lacks {', '.join(missing)}. Download {' and '.join(PM_FILES)} (about "
                         f"140 MB) from {PM_SOURCE} into one folder and pass it as eval.pm_dir=DIR (checkpoints) "
                         "or --pm-dir DIR (--sims); leave it empty to skip PMRP")


def load_package(pm_dir: str = ""):
    """An ``eccv_caption.Metrics`` holding the positive sets (PMRP's too with pm_dir)."""
    if pm_dir:
        check_pm_dir(pm_dir)
    with warnings.catch_warnings():  # "failed to import ujson" at import: json does the same work
        warnings.simplefilter("ignore")
        try:
            from eccv_caption import Metrics
        except ImportError:
            raise ExtendedUnavailable(f"the eccv_caption package is not installed: {INSTALL_HINT}") from None
        return Metrics(extra_file_dir=pm_dir or None)


def load_ids(path: str) -> SplitIds:
    """The ids of a split from its shard folder (manifest.json) or an ids.json (:func:`save_ids`)."""
    if os.path.isfile(os.path.join(path, MANIFEST)):
        return read_split_ids(path)
    try:
        with open(path) as f:
            raw = json.load(f)
        return SplitIds(list(raw["image_ids"]), None if raw["caption_ids"] is None else list(raw["caption_ids"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"--ids {path}: neither a shard folder (with {MANIFEST}) nor an ids.json "
                         f"{{'image_ids': [...], 'caption_ids': [...]}} ({exc!r})") from exc


def save_ids(path: str, ids: SplitIds) -> None:
    """ids.json beside sims.npy: what --sims needs for the extended metrics."""
    from user_dist.atomic import atomic_json

    atomic_json(path, {"image_ids": ids.image_ids, "caption_ids": ids.caption_ids}, indent=None)


def _as_int(values: List[Any], what: str) -> np.ndarray:
    try:
        return np.array([int(v) for v in values], dtype=np.int64)
    except (TypeError, ValueError):
        raise ExtendedUnavailable(f"the test split's {what} are not integers, so not COCO's") from None


def check_coco5k(ids: SplitIds, package) -> Tuple[np.ndarray, np.ndarray]:
    """(image ids (N,), caption ids (5N,)) as int64 when the split is COCO 5K in the package's id space.

    Raises:
        ExtendedUnavailable: no caption ids, other ids, or ids whose images disagree with COCO's.
    """
    if ids.caption_ids is None:
        raise ExtendedUnavailable("the test shards carry no caption ids (built before they were recorded); rebuild "
                                  "them with `python -m data_shards karpathy|precomp` (docs/data.md)")
    images, captions = _as_int(ids.image_ids, "image ids"), _as_int(ids.caption_ids, "caption ids")
    want = set(package.coco_ids.tolist())
    if len(captions) != len(want) or set(captions.tolist()) != want:
        found = len(set(captions.tolist()) & want)
        raise ExtendedUnavailable(f"the test split's caption ids are not COCO 5K's annotation ids ({found} of its "
                                  f"{len(captions)} are among the {len(want)} of Karpathy's COCO test split)")
    owner = package.coco_gts["t2i"]
    sample = caption_owners(None, len(captions))  # (25000,): 5 per image, checked by compute_extended
    for j, cid in enumerate(captions.tolist()):
        if owner[cid][0] != images[sample[j]]:
            raise ExtendedUnavailable(f"caption {cid} belongs to COCO image {owner[cid][0]} but sits with image "
                                      f"{images[sample[j]]} in the shards (sample {sample[j]}); the shards' ids are "
                                      "inconsistent: rebuild them")
    return images, captions


def _needs(gt_sets: List[Mapping[int, List[int]]], base: Mapping[int, int]) -> Dict[int, int]:
    """Query id -> how many of its top items the metrics read: 10, or its positives where more."""
    need = dict(base)
    for gts in gt_sets:
        for q, positives in gts.items():
            need[q] = max(need.get(q, 0), len(set(positives)))
    return need


def _stable_topk(block: torch.Tensor, k: int) -> torch.Tensor:
    """(Q, M) -> (Q, k) positions of each row's k best scores, ties at the k-th score resolved
    towards lower positions (what a stable descending sort keeps; torch.topk picks any)."""
    kth = torch.topk(block, k, dim=1).values[:, -1:]  # (Q, 1): the k-th best score
    above = block > kth
    tied = block == kth
    room = k - above.sum(dim=1, keepdim=True)  # (Q, 1) places left for scores equal to the k-th
    keep = above | (tied & (tied.cumsum(dim=1) <= room))  # exactly k per row
    return keep.nonzero()[:, 1].view(block.shape[0], k)  # row-major: ascending positions per row


@torch.no_grad()
def _top_lists(scores: torch.Tensor, queries: np.ndarray, need: np.ndarray, item_ids: np.ndarray,
               by_row: bool) -> List[List[int]]:
    """Each query's top need[q] item ids, best first, ties by lower position.

    scores: (N, 5N) on any device; queries: row (by_row) or column indices.
    """
    out: List[List[int]] = []
    for lo in range(0, len(queries), _CHUNK):
        q = torch.as_tensor(queries[lo:lo + _CHUNK], device=scores.device)
        block = scores.index_select(0 if by_row else 1, q)
        block = (block if by_row else block.T).float()  # (chunk, items)
        k = min(int(need[lo:lo + _CHUNK].max()), block.shape[1])
        index = _stable_topk(block, k)  # (chunk, k), ascending positions
        values, index = block.gather(1, index).cpu().numpy(), index.cpu().numpy()
        order = np.lexsort((index, -values), axis=-1)  # by score, then position
        ranked = item_ids[np.take_along_axis(index, order, axis=1)]
        out += [ranked[r, :need[lo + r]].tolist() for r in range(len(ranked))]
    return out


def ranked_items(sims: Sims, images: np.ndarray, captions: np.ndarray, package) -> Dict[str, Dict[int, List[int]]]:
    """{'i2t': {image id: caption ids best first}, 't2i': {caption id: image ids}} as the package takes them,
    each list as long as the package's metrics read for that query."""
    scores = torch.from_numpy(np.ascontiguousarray(sims)) if isinstance(sims, np.ndarray) else sims
    sets = [package.eccv_gts, package.pm_gts] if package.pm_gts else [package.eccv_gts]
    out = {}
    for d, ids, items, by_row in (("i2t", images, captions, True), ("t2i", captions, images, False)):
        need = _needs([s[d] for s in sets], {int(q): max(RECALL_KS) for q in ids})
        position = {int(q): k for k, q in enumerate(ids)}
        stray = next((q for q in need if q not in position), None)
        if stray is not None:
            raise ValueError(f"a positive set of the eccv_caption package (or of eval.pm_dir / --pm-dir) has query "
                             f"{stray}, which is not in the COCO 5K test split; check the plausible-match files")
        queries = np.array([position[q] for q in need], dtype=np.int64)
        lists = _top_lists(scores, queries, np.array(list(need.values())), items, by_row)
        out[d] = dict(zip(need, lists))
    return out


def compute_extended(sims: Sims, ids: SplitIds, pm_dir: str = "", caption_counts: Counts = None) -> Dict[str, float]:
    """ECCV Caption, CxC (and PMRP with pm_dir) of a COCO 5K (5000, 25000) matrix, in percent.

    sims: numpy array or torch tensor (ranked where it lives); ids: the split's ids in its order;
    caption_counts: (N,) the split's captions per image (metrics.evaluate), None: 5 per image.
    Raises:
        ExtendedUnavailable: the split does not have 5 captions per image, the package is missing or
            the split is not COCO 5K with COCO caption ids.
        ValueError: pm_dir lacks the plausible-match files.
    """
    if as_counts(caption_counts) is not None:
        raise ExtendedUnavailable(f"they need COCO 5K's {CAPTIONS_PER_IMAGE} captions per image, and the split's "
                                  f"{describe_counts(caption_counts)}")
    package = load_package(pm_dir)
    images, captions = check_coco5k(ids, package)
    if tuple(sims.shape) != (len(images), len(captions)):
        raise ExtendedUnavailable(f"the similarity matrix is {tuple(sims.shape)} but the ids are of "
                                  f"{len(images)} images and {len(captions)} captions")
    items = ranked_items(sims, images, captions, package)
    with contextlib.redirect_stderr(io.StringIO()):  # the package's eccv metrics always draw a tqdm bar
        eccv = package.eccv_metrics(items, "all")
        cxc = {k: package.cxc_recalls(items, "all", K=k) for k in RECALL_KS}
        pmrp = package.pmrp(items, "all") if package.pm_gts else None
    out: Dict[str, float] = {}
    for d in ("i2t", "t2i"):
        for m in ("map_at_r", "rprecision", "r1"):
            out[f"eccv_{d}_{m}"] = 100.0 * float(eccv[f"eccv_{m}"][d])
        for k in RECALL_KS:
            out[f"cxc_{d}_r{k}"] = 100.0 * float(cxc[k][d])
        if pmrp is not None:
            out[f"pmrp_{d}"] = 100.0 * float(pmrp[d])
    return {k: out[k] for k in EXTENDED_KEYS if k in out}


def extended_or_note(sims: Sims, ids: Union[SplitIds, str, None], asked: bool, pm_dir: str = "",
                     caption_counts: Counts = None) -> Optional[dict]:
    """compute_extended, or None with a one-line note: a warning when the user asked for the
    metrics (eval.extended=always, --ids), an info line otherwise. ids: SplitIds or a path for load_ids."""
    try:
        if ids is None:
            raise ExtendedUnavailable("no ids given (--ids SHARD_DIR or ids.json)")
        return compute_extended(sims, load_ids(ids) if isinstance(ids, str) else ids, pm_dir, caption_counts)
    except ExtendedUnavailable as exc:
        (log.warning if asked else log.info)("ECCV Caption / CxC / PMRP metrics not computed: %s", exc)
        return None


def tensorboard_tag(key: str, prefix: str = "eval") -> str:
    """eval/eccv_i2t_map_at_r, eval/cxc_t2i_r5, eval/pmrp_i2t: one group per metric family
    (``prefix`` eval/momentum for the momentum towers')."""
    return f"{prefix}/{key}"
