"""Global semantic enhancement: SGE, the CGE guide, the region enhancement,
and the mask-aware BatchNorm every BatchNorm of the model uses.

SGE (self-guided, on raw region features v_i, method.md):
    g0    = mean_i v_i                                  (real regions only)
    l_i   = dropout(tanh(BN(W_l v_i)))
    g     = dropout(tanh(BN(W_g g0)))
    w     = softmax_i(W_c (l_i * g))                     (real regions only)
    g_hat = normalize(sum_i w_i v_i)
CGE (CLIP-guided): g_hat = normalize(Linear(ReLU(BN(Linear(BN(clip)))))),
in the projected (embed) space.
Region enhancement with either guide:
    a = softmax_i(lambda <g_hat, v_i>), a <- a / ||a||_2, v_i' = v_i + a_i g_hat

BatchNorm and masks. The reference normalises W_l v_i with BatchNorm1d(36):
one statistic per region *slot*, over (batch, features). With variable
region counts a slot has no identity, so by default W_l v_i is normalised per
feature over the real regions of the batch (the same BatchNorm the
projection MLP uses). ``paper_regions`` restores the per-slot BatchNorm for
exactly that many unpadded regions. Statistics are taken over the global
batch (all ranks) when ``sync`` is on: see :class:`MaskedBatchNorm`.

Gradient checkpointing (``train.grad_checkpointing``): SGE recomputes its
forward in backward (user_dist.models.recompute) instead of keeping its
(B, R, D) intermediates, about ten of them; the BatchNorm running statistics
move once, in the forward, never in the recomputation.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from user_dist.distributed import all_gather_with_grad, world_size
from user_dist.models.recompute import checkpoint, recomputing


class MaskedBatchNorm(nn.Module):
    """BatchNorm over the last dimension whose batch statistics use only the
    real rows, and (``sync=True`` in a process group) the real rows of every
    rank, exactly like one process holding the global batch.

    Input (..., C) with an optional mask (...) bool, True = real row. Padded
    rows are normalised with the same statistics but never enter them. The
    statistics are computed in at least fp32; ranks combine
    (count, mean, M2) per rank (Chan's parallel formula), with gradient.
    Running statistics follow torch's BatchNorm (momentum 0.1, unbiased
    running variance), so they stay identical on every rank when synced; a
    batch with non-finite statistics does not update them, and neither does a
    gradient-checkpointing recomputation (the forward did already).
    """

    def __init__(self, num_features: int, sync: bool = True, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.num_features, self.sync, self.eps, self.momentum = num_features, sync, eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def _batch_stats(self, x: torch.Tensor, mask: Optional[torch.Tensor]):
        """x (N, C) fp32, mask (N,) -> mean (C,), biased var (C,), count ()."""
        if mask is None:
            count = torch.full((), float(x.shape[0]), device=x.device)
            mean = x.mean(0)
            m2 = ((x - mean) ** 2).sum(0)
        else:
            m = mask.to(x.dtype)[:, None]  # (N, 1)
            count = m.sum()
            mean = (x * m).sum(0) / count.clamp(min=1)
            m2 = (((x - mean) ** 2) * m).sum(0)
        if self.sync and world_size() > 1:
            parts = all_gather_with_grad(torch.cat([count[None], mean, m2])[None])  # (W, 2C+1)
            counts, means, m2s = parts[:, :1], parts[:, 1:1 + self.num_features], parts[:, 1 + self.num_features:]
            count = counts.sum()
            mean = (counts * means).sum(0) / count
            m2 = (m2s + counts * (means - mean) ** 2).sum(0)
        return mean, m2 / count, count

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> None:
        unbiased = var * count / (count - 1).clamp(min=1)
        # A non-finite batch (an overflow, a bad sample) leaves the running
        # statistics as they were: its step is skipped (user_dist.nonfinite),
        # and NaN running statistics would otherwise stay for good, in
        # evaluation and, through the EMA, in every key. Decided on the
        # device; when synced, the same on every rank.
        ok = torch.isfinite(mean).all() & torch.isfinite(unbiased).all()
        new_mean = torch.where(ok, mean.to(self.running_mean.dtype), self.running_mean)
        new_var = torch.where(ok, unbiased.to(self.running_var.dtype), self.running_var)
        self.running_mean.lerp_(new_mean, self.momentum)  # lerp towards itself: unchanged
        self.running_var.lerp_(new_var, self.momentum)
        self.num_batches_tracked.add_(ok.long())

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.shape[-1] != self.num_features:
            raise ValueError(f"MaskedBatchNorm({self.num_features}) got input with {x.shape[-1]} features "
                             f"(shape {tuple(x.shape)})")
        dtype = torch.promote_types(x.dtype, torch.float32)  # bf16/fp16 inputs: statistics in fp32
        flat = x.reshape(-1, self.num_features).to(dtype)  # (N, C)
        if self.training:
            mean, var, count = self._batch_stats(flat, None if mask is None else mask.reshape(-1))
            if not recomputing():  # a checkpoint's recomputation: the forward moved them already
                self._update_running(mean, var, count)
        else:
            mean, var = self.running_mean.to(dtype), self.running_var.to(dtype)
        y = (flat - mean) * torch.rsqrt(var + self.eps) * self.weight.to(dtype) + self.bias.to(dtype)
        return y.to(x.dtype).reshape(x.shape)


def masked_softmax(scores: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Softmax over the last dim of (B, R) scores, padded entries weight 0."""
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1)


def enhance(regions: torch.Tensor, guide: torch.Tensor, mask: Optional[torch.Tensor], lam: float) -> torch.Tensor:
    """Region enhancement: regions (B, R, D), guide (B, D) -> (B, R, D).

    a = softmax_i(lam <guide, v_i>) over real regions, L2-normalised over the
    regions, then v_i + a_i guide. Padded rows get a_i = 0 (unchanged).
    """
    attn = masked_softmax(lam * torch.einsum("brd,bd->br", regions, guide), mask)  # (B, R)
    attn = F.normalize(attn, dim=-1)
    return regions + attn[..., None] * guide[:, None, :]


def _xavier(linear: nn.Linear) -> nn.Linear:
    nn.init.xavier_uniform_(linear.weight)
    nn.init.zeros_(linear.bias)
    return linear


class SGE(nn.Module):
    """Self-guided enhancement of raw regions (B, R, D) -> (B, R, D).

    ``checkpointing``: recompute the forward in backward (module docstring).
    """

    def __init__(self, dim: int, dropout: float, enhance_lambda: float, sync_norm: bool,
                 paper_regions: Optional[int] = None):
        super().__init__()
        self.paper_regions = paper_regions
        self.enhance_lambda = enhance_lambda
        self.local_fc = _xavier(nn.Linear(dim, dim))
        self.local_norm = MaskedBatchNorm(paper_regions or dim, sync=sync_norm)
        self.global_fc = _xavier(nn.Linear(dim, dim))
        self.global_norm = MaskedBatchNorm(dim, sync=sync_norm)
        self.common = _xavier(nn.Linear(dim, 1))
        self.dropout = nn.Dropout(dropout)
        self.checkpointing = False

    def _local(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Normalise W_l v_i: (B, R, D)."""
        if self.paper_regions is None:
            return self.local_norm(h, mask)
        if h.shape[1] != self.paper_regions:
            raise ValueError(f"model.gse.paper_batchnorm needs exactly {self.paper_regions} region slots per "
                             f"image, got {h.shape[1]}; set model.gse.paper_batchnorm=false for variable region "
                             "counts")
        # BatchNorm1d(R) on (B, R, D): one statistic per region slot over (B, D).
        # As in the reference, padded slots (if any) enter the statistics.
        return self.local_norm(h.transpose(1, 2)).transpose(1, 2)

    def guide(self, regions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """g_hat: (B, D), unit norm."""
        m = mask.to(regions.dtype)[..., None]  # (B, R, 1)
        g0 = (regions * m).sum(1) / m.sum(1).clamp(min=1)  # (B, D) mean of real regions
        local = self.dropout(torch.tanh(self._local(self.local_fc(regions), mask)))  # (B, R, D)
        glob = self.dropout(torch.tanh(self.global_norm(self.global_fc(g0))))  # (B, D)
        w = masked_softmax(self.common(local * glob[:, None]).squeeze(-1), mask)  # (B, R)
        return F.normalize(torch.einsum("br,brd->bd", w, regions), dim=-1)

    def _enhanced(self, regions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return enhance(regions, self.guide(regions, mask), mask, self.enhance_lambda)

    def forward(self, regions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.checkpointing and self.training:
            return checkpoint(self._enhanced, regions, mask)
        return self._enhanced(regions, mask)


class ClipGuide(nn.Module):
    """CGE guide from frozen CLIP features: (B, clip_dim) -> (B, embed), unit norm.

    BN -> Linear -> BN -> ReLU -> Linear (method.md; the activation's place
    is an open point of the paper), then L2 normalisation like SGE's g_hat.
    """

    def __init__(self, clip_dim: int, embed_size: int, sync_norm: bool):
        super().__init__()
        self.norm_in = MaskedBatchNorm(clip_dim, sync=sync_norm)
        self.fc1 = nn.Linear(clip_dim, embed_size)
        self.norm_mid = MaskedBatchNorm(embed_size, sync=sync_norm)
        self.fc2 = nn.Linear(embed_size, embed_size)

    def forward(self, clip_features: torch.Tensor) -> torch.Tensor:
        x = clip_features.to(self.fc1.weight.dtype)
        x = self.fc2(F.relu(self.norm_mid(self.fc1(self.norm_in(x)))))
        return F.normalize(x, dim=-1)
