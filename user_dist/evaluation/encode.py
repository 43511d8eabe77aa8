"""Encode a test split: every image once, every caption once, in split order.

The evaluation loader (``user_dist.data.eval_loader``) yields batches of B
images with their captions: ``caption_counts`` (B,) gives image k's n_k >= 1
captions, the n_k rows after those of images 0..k-1 of the batch (5 per image,
rows 5k..5k+4, for COCO and F30K), and ``image_index`` (B,) each image's
position in the split. With several ranks each rank reads a disjoint part of
the split, with its own number of captions; the parts are gathered and put
back in split order, so the result does not depend on the number of ranks.
Unlike the reference code, which encodes every image five times (once per
caption), each image is encoded once.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.nn.functional as F

from user_dist import distributed


@dataclass
class EncodedSplit:
    """A split's embeddings in split order (all on the CPU).

    C = caption_counts.sum(): image k's n_k captions are the rows after those of
    images 0..k-1 (5 per image: rows 5k..5k+4), the layout metrics.evaluate takes.
    """

    images: torch.Tensor  # (N, E) float32, L2-normalised
    captions: torch.Tensor  # (C, E) float32, in split order
    input_ids: torch.Tensor  # (C, L) int64, the captions' tokens (for the report's text)
    caption_counts: torch.Tensor  # (N,) int64, n_k >= 1

    def similarities(self, device: torch.device = torch.device("cpu"), keep_on_device: bool = False) -> torch.Tensor:
        """(N, C) float32 image x caption inner products, computed on ``device``.

        Returned on the CPU, or left on ``device`` with keep_on_device (metrics.evaluate
        scores a tensor where it lives: COCO 5K's matrix is 500 MB).
        COCO 5K at E = 1024 is 128 GFLOP: milliseconds on a GPU, tens of seconds on one CPU core.
        """
        sims = self.images.to(device) @ self.captions.to(device).T
        return sims if keep_on_device else sims.cpu()


def autocast_for(device: torch.device, dtype: Optional[torch.dtype] = None):
    """The evaluation's precision on ``device``: autocast to ``dtype``; None means bf16 on CUDA
    and fp32 (no autocast) elsewhere."""
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


def _to_device(batch: dict, device: torch.device) -> dict:
    """Tensors to the device; floating ones as float32 (the loader keeps the
    shards' float16 regions), like TrainStep does."""
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            v = v.to(device, non_blocking=True)
            if v.is_floating_point() and v.dtype != torch.float32:
                v = v.float()
        out[k] = v
    return out


def _gather_padded(x: torch.Tensor, counts: list, device: torch.device, pad_value: int = 0) -> torch.Tensor:
    """Rows of every rank in rank order, on the CPU; x (n_r, ...) with n_r = counts[rank].

    The collective runs on ``device`` (nccl only moves CUDA tensors).
    """
    if len(counts) == 1:
        return x
    padded = x.new_full((max(counts), *x.shape[1:]), pad_value)
    padded[:x.shape[0]] = x
    parts = distributed.all_gather_nograd(padded.to(device)).cpu()  # (world * max, ...)
    return torch.cat([parts[r * max(counts):r * max(counts) + n] for r, n in enumerate(counts)])


def _pad_tokens(ids: list) -> torch.Tensor:
    """Stack (C_i, L_i) token batches of different lengths, right-padded with 0."""
    length = max(t.shape[1] for t in ids)
    return torch.cat([F.pad(t, (0, length - t.shape[1])) for t in ids])


def _check_batch(batch: dict) -> torch.Tensor:
    """The batch's caption_counts (B,) int64 on the CPU, checked against its caption rows.

    Raises:
        ValueError: no caption_counts, a count below 1, or counts that do not sum to the caption rows.
    """
    b = batch["image_index"].shape[0]
    if "caption_counts" not in batch:
        raise ValueError(f"evaluation batch of {b} images holds no caption_counts (B,): the eval loader's contract "
                         "(user_dist.data.Batcher.eval_batch) gives every batch its images' caption counts")
    counts = batch["caption_counts"].long().cpu().reshape(-1)
    rows = batch["input_ids"].shape[0]
    if counts.shape[0] != b or (counts < 1).any() or int(counts.sum()) != rows:
        raise ValueError(f"evaluation batch with {b} images holds {rows} captions but caption_counts "
                         f"{counts.tolist()[:10]}{'...' if len(counts) > 10 else ''}: expected one count >= 1 per "
                         "image summing to the caption rows (the eval loader's contract)")
    return counts


@torch.no_grad()
def encode_split(model: torch.nn.Module, batches: Iterable[dict], device: torch.device,
                 dtype: Optional[torch.dtype] = None) -> EncodedSplit:
    """Run ``model.encode_image`` / ``encode_text`` over the split, gather ranks, order.

    Precision: autocast_for(device, dtype), bf16 on CUDA and fp32
    elsewhere by default. Embeddings come back as float32 on the CPU. Every rank must
    call this (it gathers across the process group).
    Raises:
        ValueError: the batches do not cover images 0..N-1 exactly once, or a
            batch's caption_counts do not describe its caption rows.
    """
    model.eval()
    autocast = autocast_for(device, dtype)
    index, img, cap, ids, per_image = [], [], [], [], []
    for batch in batches:
        per_image.append(_check_batch(batch))
        on_device = _to_device(batch, device)
        with autocast:
            img.append(model.encode_image(on_device).float().cpu())  # (B, E)
            cap.append(model.encode_text(on_device).float().cpu())  # (C_b, E)
        index.append(batch["image_index"].long().cpu())
        ids.append(batch["input_ids"].long().cpu())
    # Agree on every rank's image count, caption count and token length before anything else,
    # so that all ranks raise together instead of some waiting in a gather.
    world = distributed.world_size()
    local = torch.tensor([sum(len(i) for i in index), sum(int(c.sum()) for c in per_image),
                          max((t.shape[1] for t in ids), default=0)])
    sizes = distributed.all_gather_nograd(local.to(device)).cpu().view(world, 3)
    counts = sizes[:, 0].tolist()
    if min(counts) == 0:
        raise ValueError(f"the evaluation split yielded no images on rank(s) "
                         f"{[r for r, c in enumerate(counts) if c == 0]} of {world}; check the shard folder "
                         "and that it holds at least one shard per rank")
    captions = sizes[:, 1].tolist()  # C_r: each rank's captions
    index_t, img_t, cap_t, per_image_t = torch.cat(index), torch.cat(img), torch.cat(cap), torch.cat(per_image)
    ids_t = _pad_tokens(ids)
    ids_t = F.pad(ids_t, (0, int(sizes[:, 2].max()) - ids_t.shape[1]))
    index_t = _gather_padded(index_t, counts, device, pad_value=-1)
    img_t, per_image_t = _gather_padded(img_t, counts, device), _gather_padded(per_image_t, counts, device)
    cap_t, ids_t = _gather_padded(cap_t, captions, device), _gather_padded(ids_t, captions, device)

    n = index_t.shape[0]
    seen = torch.bincount(index_t.clamp(0, n), minlength=n + 1)
    if index_t.min() < 0 or index_t.max() >= n or (seen[:n] != 1).any():
        missing = (seen[:n] == 0).nonzero().flatten()[:5].tolist()
        twice = (seen[:n] > 1).nonzero().flatten()[:5].tolist()
        raise ValueError(f"the evaluation split must yield images 0..{n - 1} exactly once over all ranks; "
                         f"missing e.g. {missing}, repeated e.g. {twice}, range seen "
                         f"[{int(index_t.min())}, {int(index_t.max())}]")
    order = torch.argsort(index_t)  # split position -> gathered row
    cap_order = caption_order(per_image_t, order)
    return EncodedSplit(img_t[order], cap_t[cap_order], ids_t[cap_order], per_image_t[order])


def caption_order(caption_counts: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """(C,) gathered caption rows in split order: image order[0]'s captions, then order[1]'s, ...

    caption_counts (N,): the gathered images' counts, in gathered order (their captions' rows
    follow the same order); order (N,): split position -> gathered image row.
    """
    first = torch.cumsum(caption_counts, 0) - caption_counts  # (N,) each gathered image's first caption row
    counts = caption_counts[order]  # (N,) in split order
    start = torch.repeat_interleave(first[order], counts)  # (C,) the first row of each caption's image
    offset = torch.arange(int(counts.sum())) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    return start + offset
